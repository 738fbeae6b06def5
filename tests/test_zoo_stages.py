"""Every stage, end to end, on each tiny zoo model (tests/zoo.py): the real models' tokenizers, templates and
generation settings, at a size where a stage takes seconds.

For each causal LM: `prepare` turns a local Alpaca file into the stages' files with that model's tokenizer,
then `sft` (full fine-tune), `reward` (LoRA + score head on the SFT model), `ppo` (a few episodes), and on the
results `chat --prompt`, `merge`, `evaluate` and `label export`. GPT-2 also gets a DistilBERT reward model with
its own tokenizer, and PPO against it. Stages run through their entry points in this process (`run_here`: the
same exit status and printed lines, without 5 s of imports each); tests/test_launch.py checks the exit status of
real subprocesses.
"""

import csv
import json
import math
import re

import pytest
import torch
from conftest import ROOT, run_here
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
from zoo import DISTILBERT, GEMMA, GPT2, LLAMA2, LLAMA3, QWEN, SPECS

from rlhf_trl.evaluate import load_reward_model
from rlhf_trl.modeling import generate, load_model, load_tokenizer
from rlhf_trl.outputs import read_marker
from rlhf_trl.rewards import score_answers

POLICIES = [GPT2, QWEN, LLAMA3, LLAMA2, GEMMA]
LISTED_STOPS = [name for name in POLICIES if isinstance(SPECS[name].facts["stop"], list)]  # qwen, llama3, gemma
TEMPLATE_ARGS = {GPT2: ("--chat_template_path", str(ROOT / "recipes/templates/alpaca.jinja"))}  # as gpt2-alpaca's
QUESTION = "Tell me about the apple."
TRAIN = ("--save_strategy", "no", "--logging_steps", "1", "--per_device_train_batch_size", "8")


def ok(result, what: str) -> str:
    assert result.returncode == 0, (
        f"{what} exited {result.returncode}:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    )
    return result.stdout


def stage(module: str, *args: str):
    """A training stage through its entry point, in this process: the same exit status and printed lines as
    `run_module`, without 5 s of imports per call (test_launch.py and test_stages.py run them as subprocesses)."""
    return run_here(module, *args)


def one_error_line(result) -> str:
    """The one `error:` line a refused run ends with (progress bars before it aside), as test_bad_inputs checks."""
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    last = [line for line in result.stderr.splitlines() if line.strip()][-1]
    assert errors == [last], result.stderr[-3000:]
    return last


@pytest.fixture(scope="module")
def alpaca(tmp_path_factory):
    """96 Alpaca records about the demo world (instruction, empty input, output): the raw data `prepare` reads."""
    from rlhf_trl.demo import make_records

    rows = make_records(seed=0, sft_size=96, pairs_size=0)["sft_train"]
    records = [
        {"instruction": r["prompt"][0]["content"], "input": "", "output": r["completion"][0]["content"]} for r in rows
    ]
    path = tmp_path_factory.mktemp("raw") / "alpaca.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def chains(zoo, alpaca, tmp_path_factory):
    """Builds prepare -> sft -> reward -> ppo for a zoo model on first use; each model trains once per module."""
    built = {}

    def build(name: str) -> dict:
        if name not in built:
            try:
                built[name] = train_chain(name, zoo[name], alpaca, tmp_path_factory.mktemp(name))
            except BaseException as error:  # fail every test of this model with the cause, without retraining
                built[name] = error
        if isinstance(built[name], BaseException):
            raise built[name]
        return built[name]

    return build


@pytest.fixture(params=POLICIES)
def chain(request, chains) -> dict:
    """One zoo model's stage outputs (paths) and each stage's stdout."""
    return chains(request.param)


def train_chain(name: str, base, alpaca, root) -> dict:
    paths = {"name": name, "base": str(base), "data": str(root / "data"), "models": root / "models"}
    paths |= {stage: str(root / "models" / stage) for stage in ("sft", "reward", "ppo")}
    data = paths["data"]
    prepared = run_here(
        "prepare", "--recipe", "zoo", "--config", str(ROOT / "recipes/gpt2-alpaca/data.yaml"),
        "--raw_dataset", str(alpaca), "--output_dir", data, "--tokenizer_name_or_path", paths["base"],
        "--eval_size", "0.2", "--pair_layout", "pairs",
    )  # fmt: skip
    paths["prepare"] = ok(prepared, f"{name} prepare")
    sft = stage(
        "sft", "--config", str(ROOT / "recipes/demo/sft.yaml"), "--model_name_or_path", paths["base"],
        "--dataset_name", f"{data}/sft_train.jsonl", "--eval_dataset_name", f"{data}/sft_eval.jsonl",
        "--output_dir", paths["sft"], "--max_steps", "2", "--max_length", "128", *TRAIN, *TEMPLATE_ARGS.get(name, ()),
    )  # fmt: skip
    paths["sft_stdout"] = ok(sft, f"{name} sft")
    reward = stage(
        "reward", "--config", str(ROOT / "recipes/demo/reward.yaml"), "--model_name_or_path", paths["sft"],
        "--dataset_name", f"{data}/pairs_train.jsonl", "--eval_dataset_name", f"{data}/pairs_eval.jsonl",
        "--output_dir", paths["reward"], "--max_steps", "2", "--max_length", "128", "--label_mix", "generated", *TRAIN,
    )  # fmt: skip
    paths["reward_stdout"] = ok(reward, f"{name} reward")
    paths["ppo_stdout"] = ok(
        ppo(paths, paths["reward"], paths["ppo"]),
        f"{name} ppo",
    )
    return paths


def ppo(paths: dict, reward: str, output: str, *extra: str, runner=None):
    data = paths["data"]
    return (runner or stage)(
        "ppo", "--config", str(ROOT / "recipes/demo/ppo.yaml"), "--sft_model_path", paths["sft"],
        "--reward_model_path", reward, "--dataset_name", f"{data}/prompts_train.jsonl",
        "--eval_dataset_name", f"{data}/prompts_eval.jsonl", "--output_dir", output, "--total_episodes", "16",
        "--local_rollout_forward_batch_size", "8", "--response_length", "12", "--num_ppo_epochs", "1",
        "--max_prompt_length", "96", *TRAIN, *extra,
    )  # fmt: skip


def test_each_stage_prints_its_summary(chain):
    assert re.search(r"data: 96 raw -> \d+ train \+ \d+ eval in .* \(dropped: ", chain["prepare"])
    assert re.search(r"sft: held-out loss \d+\.\d{3} -> saved to ", chain["sft_stdout"])
    assert re.search(r"reward: held-out pairwise accuracy \d\.\d{3} on \d+ pairs", chain["reward_stdout"])
    assert re.search(r"ppo: mean reward-model score -?\d+\.\d{3} .* -> -?\d+\.\d{3}", chain["ppo_stdout"])
    assert f"ppo: saved to {chain['ppo']}" in chain["ppo_stdout"]
    assert [read_marker(chain[stage])["stage"] for stage in ("sft", "reward", "ppo")] == ["sft", "reward", "ppo"]


def test_the_sft_model_keeps_the_tokenizer_template_and_stop_ids(chain):
    base, sft = AutoTokenizer.from_pretrained(chain["base"]), AutoTokenizer.from_pretrained(chain["sft"])
    assert sft.eos_token == base.eos_token
    if base.chat_template:
        assert sft.chat_template == base.chat_template, "the model's own template, not a replacement"
    else:
        assert "### Instruction" in sft.chat_template, "the recipe's chat_template_path is saved with the model"
    expected = GenerationConfig.from_pretrained(chain["base"]).eos_token_id
    assert GenerationConfig.from_pretrained(chain["sft"]).eos_token_id == expected


def test_the_ppo_policy_reloads_and_answers(chain):
    tokenizer = load_tokenizer(chain["ppo"])
    policy = load_model(chain["ppo"]).eval()
    answers, ids = generate(policy, tokenizer, [[{"role": "user", "content": QUESTION}]], 8, return_ids=True)
    assert isinstance(answers[0], str) and 1 <= len(ids[0]) <= 8


def test_chat_answers_one_prompt(chain):
    result = run_here("chat", "--model", chain["ppo"], "--prompt", QUESTION, "--max-new-tokens", "8")
    settings, conversation = ok(result, "chat").split("\n", 1)
    assert settings.startswith("chat: answers sample with temperature 0.7, top_k 0, top_p 1.0"), settings
    assert conversation.startswith(f"you> {QUESTION}\nassistant> ")


def test_merge_exports_a_model_plain_transformers_loads(chain, tmp_path):
    export = tmp_path / "export"
    assert "merge: wrote a standalone model" in ok(
        run_here("merge", "--model", chain["ppo"], "--output", str(export)), "merge"
    )
    plain = AutoModelForCausalLM.from_pretrained(export).eval()
    merged = load_model(chain["ppo"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(export)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True)
    probe = torch.tensor([prompt if isinstance(prompt, list) else prompt["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(plain(probe).logits, merged(probe).logits, atol=1e-4, rtol=1e-4)
        out = plain.generate(probe, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id or 0)
    assert out.shape[1] > probe.shape[1]


@pytest.mark.parametrize("chain", LISTED_STOPS, indirect=True)
def test_merge_keeps_the_models_stop_ids(chain, tmp_path):
    export = tmp_path / "export"
    ok(run_here("merge", "--model", chain["ppo"], "--output", str(export)), "merge")
    expected = GenerationConfig.from_pretrained(chain["base"]).eos_token_id
    assert isinstance(expected, list) and GenerationConfig.from_pretrained(export).eos_token_id == expected


@pytest.mark.parametrize("chain", LISTED_STOPS, indirect=True)
def test_answers_stop_at_the_models_other_stop_ids(chain):
    """A model whose turn ends with a stop id that is not the tokenizer's EOS (Gemma's <end_of_turn>, Qwen's
    <|endoftext|>, Llama 3.1's <|end_of_text|>): made to say it first, the answer is that one token."""
    tokenizer = load_tokenizer(chain["ppo"])
    policy = load_model(chain["ppo"]).eval()
    stops = GenerationConfig.from_pretrained(chain["base"]).eos_token_id
    other = next(i for i in stops if i != tokenizer.eos_token_id)

    def say_other(module, inputs, logits):
        logits[..., other] += 1e4
        return logits

    policy.get_output_embeddings().register_forward_hook(say_other)
    _, ids = generate(policy, tokenizer, [[{"role": "user", "content": QUESTION}]], 12, temperature=0, return_ids=True)
    assert ids[0] == [other]


@pytest.mark.parametrize("chain", [QWEN], indirect=True)
def test_greedy_answers_ignore_the_models_repetition_penalty(chain):
    """Qwen ships repetition_penalty (and top_k/top_p) in generation_config; the stages' own decoding (greedy here)
    must be what they ask for, or PPO's log-probs and eval's KL describe other samples than the ones drawn."""
    tokenizer = load_tokenizer(chain["ppo"])
    policy = load_model(chain["ppo"]).eval()
    policy.generation_config.repetition_penalty = 5.0  # exaggerated, so a difference shows within a few tokens
    _, ids = generate(policy, tokenizer, [[{"role": "user", "content": QUESTION}]], 16, temperature=0, return_ids=True)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION}], add_generation_prompt=True, tokenize=False
    )
    sequence = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    greedy = []
    with torch.no_grad():  # plain argmax decoding, written out: no generation_config involved
        for _ in range(16):
            greedy.append(int(policy(sequence).logits[0, -1].argmax()))
            sequence = torch.cat([sequence, torch.tensor([[greedy[-1]]])], dim=1)
    assert ids[0] == greedy[: len(ids[0])]


def test_evaluate_compares_sft_and_ppo(chain, tmp_path):
    output = tmp_path / "eval.json"
    result = run_here(
        "evaluate", "--recipe", "zoo", "--models", str(chain["models"]),
        "--prompts", f"{chain['data']}/prompts_eval.jsonl", "--pairs", f"{chain['data']}/pairs_eval.jsonl",
        "--samples", "1", "--max-prompts", "4", "--max-new-tokens", "8", "--output", str(output),
    )  # fmt: skip
    assert re.search(r"eval: reward model pairwise accuracy \d\.\d{3} on \d+ held-out pairs", ok(result, "evaluate"))
    saved = json.loads(output.read_text())
    assert set(saved["stages"]) == {"sft", "ppo"} and saved["stages"]["sft"]["kl"] == 0.0


def test_label_export_writes_answers_to_compare(chain, tmp_path):
    target = tmp_path / "to_label.csv"
    result = run_here(
        "label", "export", "--model", chain["sft"], "--prompts", f"{chain['data']}/prompts_eval.jsonl",
        "--out", str(tmp_path / "labels"), "--limit", "2", "--file", str(target), "--max-new-tokens", "8",
        "--labeler", "zoo",
    )  # fmt: skip
    assert "wrote 2 prompts x 2 answers" in ok(result, "label export")
    with open(target, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 and all(row["prompt"] and row["sample_id"] for row in rows)


def distilbert_reward(zoo, data: str, output, *extra: str):
    """The zoo's DistilBERT trained as a reward model on `data`'s pairs, fully, as recipes/gpt2-alpaca's is."""
    return stage(
        "reward", "--config", str(ROOT / "recipes/demo/reward.yaml"), "--model_name_or_path", str(zoo[DISTILBERT]),
        "--dataset_name", f"{data}/pairs_train.jsonl", "--eval_dataset_name", f"{data}/pairs_eval.jsonl",
        "--output_dir", str(output), "--max_steps", "2", "--max_length", "128", "--label_mix", "generated",
        "--use_peft", "false", *TRAIN, *extra,
    )  # fmt: skip


@pytest.mark.parametrize("chain", [GPT2], indirect=True)
def test_gpt2_policy_against_a_distilbert_reward_model(chain, zoo, tmp_path):
    """A reward model with another tokenizer (WordPiece, 128 positions): trained on the same pairs, then PPO."""
    reward = distilbert_reward(zoo, chain["data"], tmp_path / "reward")
    assert re.search(r"reward: held-out pairwise accuracy \d\.\d{3} on \d+ pairs", ok(reward, "distilbert reward"))
    result = ppo(chain, str(tmp_path / "reward"), str(tmp_path / "ppo"))
    assert f"ppo: saved to {tmp_path / 'ppo'}" in ok(result, "ppo with the distilbert reward")
    policy, tokenizer = load_model(tmp_path / "ppo"), load_tokenizer(tmp_path / "ppo")
    _, ids = generate(policy, tokenizer, [[{"role": "user", "content": QUESTION}]], 8, return_ids=True)
    assert 1 <= len(ids[0]) <= 8


@pytest.mark.parametrize("chain", [GPT2], indirect=True)
def test_a_lora_distilbert_reward_model_trains(chain, zoo, tmp_path):
    """With all-linear, peft used to wrap DistilBERT's new classifier in LoRA and then fail to save it in full
    (TypeError); the head now trains in full and the LoRA adapter goes on the encoder alone."""
    result = distilbert_reward(zoo, chain["data"], tmp_path / "reward", "--use_peft", "true")
    assert "reward: held-out pairwise accuracy" in ok(result, "distilbert LoRA reward")
    saved = json.loads((tmp_path / "reward" / "adapter_config.json").read_text())
    assert set(saved["modules_to_save"]) >= {"pre_classifier", "classifier"}
    scorer, scorer_tokenizer = load_reward_model(tmp_path / "reward")
    assert not hasattr(scorer, "peft_config"), "loads merged, as a plain classifier"
    (score,) = score_answers(scorer, scorer_tokenizer, [[{"role": "user", "content": QUESTION}]], ["It is long."])
    assert math.isfinite(score)


@pytest.mark.parametrize("chain", [LLAMA2], indirect=True)
def test_llama2_sft_trains_the_whole_answer(chain, tmp_path):
    """`[/INST]` + the answer's first word tokenize as one piece: TRL alone masks by the prompt's length and
    warns once per record (the first answer word is never trained). SFT trains on the prompt's own ids, then the
    answer's, as generation sees them, and says so for every record (tests/test_templates.py checks the tokens)."""
    data = chain["data"]
    result = run_here(
        "sft", "--config", str(ROOT / "recipes/demo/sft.yaml"), "--model_name_or_path", chain["base"],
        "--dataset_name", f"{data}/sft_train.jsonl", "--eval_dataset_name", f"{data}/sft_eval.jsonl",
        "--output_dir", str(tmp_path / "sft"), "--max_steps", "1", *TRAIN,
    )  # fmt: skip
    ok(result, "llama2-chat sft")
    assert "Mismatch between tokenized prompt" not in result.stderr
    assert re.search(
        r"sft: (\d+) of \1 training records: the prompt's last token merges with the answer's first \(e\.g\. '.+'\); "
        r"trained as generation sees them: the prompt's own tokens, then the answer's",
        result.stdout,
    )


def test_gpt2_without_a_chat_template_is_refused_in_one_line(zoo, alpaca, tmp_path):
    result = run_here(
        "sft", "--config", str(ROOT / "recipes/demo/sft.yaml"), "--model_name_or_path", str(zoo[GPT2]),
        "--dataset_name", str(alpaca), "--eval_dataset_name", str(alpaca), "--output_dir", str(tmp_path / "sft"),
        "--max_steps", "1", *TRAIN,
    )  # fmt: skip
    assert "chat_template_path" in one_error_line(result)


def test_gemma_with_a_system_turn_is_refused_in_one_line(zoo, tmp_path):
    rows = [
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": QUESTION},
                {"role": "assistant", "content": "The apple is red."},
            ]
        }  # fmt: skip
    ] * 8
    data = tmp_path / "messages.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    result = run_here(
        "sft", "--config", str(ROOT / "recipes/demo/sft.yaml"), "--model_name_or_path", str(zoo[GEMMA]),
        "--dataset_name", str(data), "--eval_dataset_name", str(data), "--output_dir", str(tmp_path / "sft"),
        "--max_steps", "1", *TRAIN,
    )  # fmt: skip
    line = one_error_line(result)
    assert "System role not supported" in line or "system" in line.lower()
    assert not (tmp_path / "sft").exists()
