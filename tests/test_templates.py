"""Chat templates before training (cases C04, C08, C09).

- The fallback renderer for tokenizers without a template goes by role and is recipes/templates/alpaca.jinja.
- A template that refuses a conversation, or no template at all, stops each stage with one line naming the file,
  the line and the fix (exit 2, no output left behind).
- When a SentencePiece-style tokenizer merges the prompt's last piece (`[/INST]`) with the answer's first, SFT
  trains on what generation sees (the prompt's own ids, then the answer's), the loss on exactly the answer; for a
  tokenizer where prompt ids are a prefix, ids and labels are TRL's own.
"""

import json
import random
from pathlib import Path

import pytest
from conftest import ROOT, run_here
from datasets import Dataset
from tests_helpers import build_gpt2

from rlhf_trl.modeling import render_prompt
from rlhf_trl.sft import IGNORE, completion_labels, prepare_records

ALPACA = (ROOT / "recipes/templates/alpaca.jinja").read_text()
# Gemma's template refuses a system turn (sgl-project/sglang #892); the case's copy, shortened.
NO_SYSTEM = (
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ '<user>\\n' + m['content'] + '\\n' }}"
    "{% else %}{{ '<model>\\n' + m['content'] + eos_token + '\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<model>\\n' }}{% endif %}"
)
# Llama-2's format: the answer follows `[/INST]` without a space (the case's llama2ish template).
LLAMA2ISH = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
    "{% else %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}"
)
SYSTEM, USER, ASSISTANT = (
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there."},
    {"role": "assistant", "content": "Hello."},
)


def byte_level_tokenizer(template: str | None = None):
    """GPT-2-like: byte-level BPE whose only special token is <|endoftext|>, no chat template unless given."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(["### Instruction:\n### Response:\n Be brief. Hi there. Hello."] * 10, trainer)
    end = "<|endoftext|>"
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=end, eos_token=end, unk_token=end)
    fast.pad_token = end
    fast.chat_template = template
    return fast


def sft_records(count: int = 24) -> list[dict]:
    rng = random.Random(0)
    colors, things = ["red", "blue", "green", "yellow"], ["apple", "sky", "leaf", "sun"]
    records = []
    for _ in range(count):
        color, thing = rng.choice(colors), rng.choice(things)
        records.append(
            {
                "prompt": [{"role": "user", "content": f"Write one sentence about {color} things."}],
                "completion": [{"role": "assistant", "content": f"Many {color} things exist, such as a {thing}."}],
            }
        )
    return records


def llama2ish_tokenizer():
    """SentencePiece-style: Metaspace BPE trained on the Llama-2-format texts, so '▁[/INST]Many' is one piece."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    texts = [f"[INST] {r['prompt'][0]['content']} [/INST]{r['completion'][0]['content']}" for r in sft_records(40)]
    tokenizer.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"]))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>"
    )
    fast.chat_template = LLAMA2ISH
    return fast


@pytest.mark.parametrize(
    "conversation",
    [[SYSTEM, USER], [USER], [USER, ASSISTANT, USER], [SYSTEM, USER, ASSISTANT, USER]],
    ids=["system-user", "user", "multi-turn", "system-multi-turn"],
)
def test_the_fallback_renders_as_the_alpaca_template_does(conversation):
    tokenizer = byte_level_tokenizer()
    expected = tokenizer.apply_chat_template(
        conversation, chat_template=ALPACA, add_generation_prompt=True, tokenize=False
    )
    assert render_prompt(tokenizer, conversation) == expected


def test_the_fallback_goes_by_role_and_ends_with_the_generation_prompt():
    tokenizer = byte_level_tokenizer()
    assert render_prompt(tokenizer, [SYSTEM, USER]) == "Be brief.\n\n### Instruction:\nHi there.\n\n### Response:\n"
    assert render_prompt(tokenizer, [USER, ASSISTANT, USER]) == (
        "### Instruction:\nHi there.\n\n### Response:\nHello.<|endoftext|>"
        "### Instruction:\nHi there.\n\n### Response:\n"
    )


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("templates")
    build_gpt2(byte_level_tokenizer(NO_SYSTEM), root / "no-system")
    build_gpt2(byte_level_tokenizer(), root / "no-template")
    messages = [{"messages": [SYSTEM, USER, ASSISTANT]} for _ in range(6)]
    (root / "messages_system.jsonl").write_text("".join(json.dumps(r) + "\n" for r in messages))
    plain = [{"instruction": "Hi there.", "output": "Hello."} for _ in range(6)]
    (root / "alpaca.jsonl").write_text("".join(json.dumps(r) + "\n" for r in plain))
    pairs = [{"prompt": [SYSTEM, USER], "chosen": "Hello.", "rejected": "Go away."} for _ in range(6)]
    (root / "pairs_system.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    # The system turn first appears on line 3: the error names that record, not the first one.
    prompts = [{"prompt": "Hi there."}] * 2 + [{"prompt": [SYSTEM, USER]}] * 4
    (root / "prompts_system.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prompts))
    return root


def one_line_error(result, output: Path) -> str:
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr[-2000:]
    assert not output.exists() and not output.with_name(output.name + ".partial").exists(), "nothing left behind"
    return lines[0]


def test_sft_with_a_template_that_refuses_the_system_role_stops_with_the_line_and_the_fix(assets, tmp_path):
    data = assets / "messages_system.jsonl"
    output = tmp_path / "sft"
    result = run_here(
        "sft", "--config", str(ROOT / "recipes/demo/sft.yaml"), "--model_name_or_path", str(assets / "no-system"),
        "--dataset_name", str(data), "--eval_dataset_name", str(data), "--output_dir", str(output),
    )  # fmt: skip
    assert one_line_error(result, output) == (
        f"error: {data} line 1: the chat template of {assets / 'no-system'} refuses this conversation "
        "(System role not supported): drop the system turn or set chat_template_path: recipes/templates/alpaca.jinja "
        "(or the template the model was made for)"
    )


def test_sft_without_a_chat_template_asks_for_chat_template_path(assets, tmp_path):
    data = assets / "alpaca.jsonl"
    output = tmp_path / "sft"
    result = run_here(
        "sft", "--config", str(ROOT / "recipes/demo/sft.yaml"), "--model_name_or_path", str(assets / "no-template"),
        "--dataset_name", str(data), "--eval_dataset_name", str(data), "--output_dir", str(output),
    )  # fmt: skip
    assert one_line_error(result, output) == (
        f"error: {data} line 1: the tokenizer of {assets / 'no-template'} has no chat template for this "
        "conversation: set chat_template_path: recipes/templates/alpaca.jinja (or the template the model was made for)"
    )


def test_ppo_names_the_first_prompt_the_policys_template_refuses(assets, tmp_path):
    data, policy = assets / "prompts_system.jsonl", assets / "no-system"
    output = tmp_path / "ppo"
    result = run_here(
        "ppo", "--config", str(ROOT / "recipes/demo/ppo.yaml"), "--sft_model_path", str(policy),
        "--reward_model_path", str(policy), "--dataset_name", str(data), "--eval_dataset_name", str(data),
        "--output_dir", str(output),
    )  # fmt: skip
    line = one_line_error(result, output)
    assert line.startswith(f"error: {data} line 3: the chat template of {policy} refuses this conversation "), line
    fix = "train the SFT model with chat_template_path: recipes/templates/alpaca.jinja (SFT saves it with the model)"
    assert line.endswith(f"(System role not supported): drop the system turn or {fix}"), line


def test_reward_and_prepare_check_the_template_they_render_with(assets, tmp_path):
    pairs, model = assets / "pairs_system.jsonl", assets / "no-system"
    output = tmp_path / "reward"
    result = run_here(
        "reward", "--config", str(ROOT / "recipes/demo/reward.yaml"), "--model_name_or_path", str(model),
        "--dataset_name", str(pairs), "--eval_dataset_name", str(pairs), "--output_dir", str(output),
    )  # fmt: skip
    assert f"{pairs} line 1: the chat template of {model} refuses" in one_line_error(result, output)
    raw = assets / "messages_system.jsonl"
    output = tmp_path / "data"
    result = run_here(
        "prepare", "--recipe", "gpt2-alpaca", "--raw_dataset", str(raw), "--output_dir", str(output),
        "--tokenizer_name_or_path", str(model),
    )  # fmt: skip
    assert one_line_error(result, output).endswith("drop the system turn or pick another tokenizer_name_or_path")


def generation_prompt_ids(tokenizer, prompt: list[dict]) -> list[int]:
    """The prompt ids chat/eval (`modeling.generate`) and PPO (`ppo.tokenize_prompts`) feed; the test checks both."""
    from rlhf_trl.ppo import tokenize_prompts

    fed = tokenizer(render_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]
    (rollout,) = tokenize_prompts(Dataset.from_list([{"prompt": prompt}]), tokenizer, 1000)["input_ids"]
    assert fed == rollout
    return fed


def test_a_merged_prompt_end_is_trained_as_generation_sees_it(capsys):
    tokenizer = llama2ish_tokenizer()
    record = {
        "prompt": [{"role": "user", "content": "Write one sentence about red things."}],
        "completion": [{"role": "assistant", "content": "Many red things exist, such as a sky."}],
    }
    prompt_ids = generation_prompt_ids(tokenizer, record["prompt"])
    whole = tokenizer.apply_chat_template(record["prompt"] + record["completion"], tokenize=True)["input_ids"]
    assert "▁[/INST]Many" in tokenizer.convert_ids_to_tokens(whole), "the whole text's own tokens merge"
    labelled = completion_labels(record, tokenizer)
    assert labelled["input_ids"][: len(prompt_ids)] == prompt_ids, "training starts with what generation feeds"
    assert tokenizer.convert_ids_to_tokens(labelled["input_ids"]) == [
        "<s>", "[", "INST]", "▁Write", "▁one", "▁sentence", "▁about", "▁red", "▁things.", "▁[/INST]",
        "▁", "Many", "▁red", "▁things", "▁exist,", "▁such", "▁as", "▁a", "▁sky.", "</s>",
    ]  # fmt: skip
    assert labelled["labels"] == [IGNORE] * len(prompt_ids) + labelled["input_ids"][len(prompt_ids) :]
    assert labelled["mismatch"] and labelled["merged"] == "▁[/INST]Many"
    assert tokenizer.decode(labelled["input_ids"][len(prompt_ids) :], skip_special_tokens=True) == (
        "Many red things exist, such as a sky."
    )

    # Through SFTTrainer: TRL takes the ids and labels as they are.
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer

    records = sft_records(24)
    train, evaluation = Dataset.from_list(records), Dataset.from_list(sft_records(8))
    args = SFTConfig(output_dir="unused", max_length=64, report_to="none", bf16=False, use_cpu=True)
    train, evaluation = prepare_records(train, tokenizer, args), prepare_records(evaluation, tokenizer, args, "eval")
    merges = "the prompt's last token merges with the answer's first (e.g. '▁[/INST]Many')"
    done = "trained as generation sees them: the prompt's own tokens, then the answer's"
    assert capsys.readouterr().out == (
        f"sft: 24 of 24 training records: {merges}; {done}\nsft: 8 of 8 eval records: {merges}; {done}\n"
    )
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    trainer = SFTTrainer(
        model=LlamaForCausalLM(config),
        args=args,
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=tokenizer,
    )
    for record, row in zip(records, trainer.train_dataset, strict=True):
        prompt_ids = generation_prompt_ids(tokenizer, record["prompt"])
        first = next(i for i, label in enumerate(row["labels"]) if label != IGNORE)
        assert first == len(prompt_ids) and row["input_ids"][:first] == prompt_ids
        assert tokenizer.convert_ids_to_tokens(row["input_ids"][first - 1 : first + 2]) == ["▁[/INST]", "▁", "Many"]
        assert row["input_ids"][-1] == tokenizer.eos_token_id


def test_where_prompt_ids_are_a_prefix_the_labels_are_trls_own(capsys):
    from transformers import GPT2Config, GPT2LMHeadModel
    from trl import SFTConfig, SFTTrainer

    tokenizer = byte_level_tokenizer(ALPACA)
    train, evaluation = Dataset.from_list(sft_records(12)), Dataset.from_list(sft_records(4))
    args = SFTConfig(output_dir="unused", max_length=256, report_to="none", bf16=False, use_cpu=True)
    assert prepare_records(train, tokenizer, args) is train, "left to TRL as it was"
    assert prepare_records(evaluation, tokenizer, args, "eval") is evaluation
    assert capsys.readouterr().out == ""
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=16, n_layer=1, n_head=2, n_positions=256))
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=train, eval_dataset=evaluation, processing_class=tokenizer
    )
    ours = [completion_labels(record, tokenizer)["labels"] for record in train]
    assert ours == trainer.train_dataset["labels"]
    assert all(not completion_labels(record, tokenizer)["mismatch"] for record in train)


def test_a_prompt_rendered_otherwise_before_an_answer_is_masked_by_character_offsets(capsys):
    """Only when the whole text does not start with the prompt's text (here the generation prompt adds a space the
    answered conversation lacks) is there no prompt/answer split: the loss goes by character offsets."""
    tokenizer = llama2ish_tokenizer()
    tokenizer.chat_template = LLAMA2ISH + "{% if add_generation_prompt %}{{ ' ' }}{% endif %}"
    from trl import SFTConfig

    record = {
        "prompt": [{"role": "user", "content": "Write one sentence about red things."}],
        "completion": [{"role": "assistant", "content": "Many red things exist, such as a sky."}],
    }
    labelled = completion_labels(record, tokenizer)
    tokens = tokenizer.convert_ids_to_tokens(labelled["input_ids"])
    with_loss = [token for token, label in zip(tokens, labelled["labels"], strict=True) if label != IGNORE]
    assert with_loss == ["▁[/INST]Many", "▁red", "▁things", "▁exist,", "▁such", "▁as", "▁a", "▁sky.", "</s>"]
    assert labelled["mismatch"] and not labelled["split"] and labelled["merged"] == "▁[/INST]Many"
    args = SFTConfig(output_dir="unused", max_length=64, report_to="none", bf16=False, use_cpu=True)
    prepare_records(Dataset.from_list(sft_records(4)), tokenizer, args)
    merges = "the prompt's last token merges with the answer's first (e.g. '▁[/INST]Many')"
    assert capsys.readouterr().out == (
        f"sft: 4 of 4 training records: {merges}; masked by character offsets so the loss covers exactly the answer\n"
    )
