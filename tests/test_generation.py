"""Sampling settings and stop tokens (rlhf_trl.generation): cases C03 and C12.

C03: a policy whose generation_config.json carries sampling defaults (Qwen2.5-Instruct's do_sample, temperature,
top_p 0.8, top_k 20, repetition_penalty) must sample exactly as without them, in PPO's rollouts, eval, label and
chat; transformers 5.x would otherwise merge them into every GenerationConfig we pass.
C12: a Llama-3.1-like model (tokenizer EOS <|end_of_text|>, turns closed by <|eot_id|>, generation_config
eos_token_id [eos, eot]) must stop at <|eot_id|> everywhere, be counted as ending there, and keep the list on export.
"""

import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import ppo_args, run_module, run_stage

from rlhf_trl import evaluate
from rlhf_trl.generation import (
    ignored_settings,
    sampling_config,
    sampling_with,
    settings_line,
    stop_token_ids,
)
from rlhf_trl.metrics_log import read_metrics
from rlhf_trl.modeling import generate, load_model, load_tokenizer, render_prompt
from rlhf_trl.ppo_math import truncate_at_stop
from rlhf_trl.ppo_trainer import PPOTrainer, rollout_stop_ids

# The qwen-like file of case C03, written out so the test does not depend on the case folder.
QWEN_LIKE = {"do_sample": True, "repetition_penalty": 1.3, "temperature": 0.7, "top_p": 0.8, "top_k": 20}
# Further fields a model's file may carry, each of which would change what is sampled.
MORE_EXTRAS = {
    "min_p": 0.2,
    "typical_p": 0.9,
    "no_repeat_ngram_size": 2,
    "suppress_tokens": [5, 6],
    "begin_suppress_tokens": [7],
    "bad_words_ids": [[8]],
    "forced_eos_token_id": 1,
    "min_new_tokens": 3,
    "epsilon_cutoff": 0.001,
    "exponential_decay_length_penalty": (2, 1.5),
}
PROMPTS = [[{"role": "user", "content": f"Tell me about the {s}."}] for s in ("river", "castle", "tiger")]


def demo_model():
    from rlhf_trl import demo

    tokenizer = demo.build_tokenizer(demo.corpus(demo.make_records(0)))
    return demo.build_base_model(tokenizer).eval(), tokenizer


def with_extras(model, extras: dict):
    for key, value in extras.items():
        setattr(model.generation_config, key, value)
    return model


# ------------------------------------------------------------------------------------------------ C03: sampling


def test_sampling_config_sets_every_field_transformers_would_fill_from_the_model():
    config = sampling_config(0.7, 28, [1, 4], pad_token_id=0)
    expected = {
        "do_sample": True,
        "temperature": 0.7,
        "top_k": 0,
        "top_p": 1.0,
        "typical_p": 1.0,
        "repetition_penalty": 1.0,
        "encoder_repetition_penalty": 1.0,
        "no_repeat_ngram_size": 0,
        "encoder_no_repeat_ngram_size": 0,
        "length_penalty": 1.0,
        "num_beams": 1,
        "min_length": 0,
        "epsilon_cutoff": 0.0,
        "eta_cutoff": 0.0,
        "max_new_tokens": 28,
        "eos_token_id": [1, 4],
        "pad_token_id": 0,
        "num_return_sequences": 1,
        # Off when None; `sampling_with` keeps them None (the model's file cannot fill them).
        "min_p": None,
        "top_h": None,
        "min_new_tokens": None,
        "bad_words_ids": None,
        "suppress_tokens": None,
        "begin_suppress_tokens": None,
        "forced_bos_token_id": None,
        "forced_eos_token_id": None,
        "sequence_bias": None,
        "exponential_decay_length_penalty": None,
        "stop_strings": None,
    }
    assert {key: getattr(config, key) for key in expected} == expected
    greedy = sampling_config(0, 10, None, pad_token_id=0)
    assert (greedy.do_sample, greedy.temperature, greedy.repetition_penalty, greedy.eos_token_id) == (
        False,
        1.0,
        1.0,
        None,
    )
    with pytest.raises(ValueError, match="temperature"):
        sampling_config(-1, 10, None, 0)


def test_a_models_generation_config_changes_nothing_that_is_sampled():
    """What transformers builds for `generate` inside `sampling_with`: temperature alone, whatever the file says;
    outside it (what the code did before), the file's settings leak in."""
    from transformers import TemperatureLogitsWarper

    model, tokenizer = demo_model()
    with_extras(model, {**QWEN_LIKE, **MORE_EXTRAS})
    original = model.generation_config
    config = sampling_config(0.7, 12, stop_token_ids(tokenizer, model), tokenizer.pad_token_id)

    def processors(generation_config):
        effective, _ = model._prepare_generation_config(generation_config)
        effective._eos_token_tensor = torch.tensor(effective.eos_token_id or [1])
        return effective, model._get_logits_processor(effective, input_ids_seq_length=4, device="cpu")

    leaked, leaked_processors = processors(config)
    assert leaked.repetition_penalty == 1.0 and leaked.min_p == 0.2, "the explicit value holds, a None one leaks"
    assert len(leaked_processors) > 1
    with sampling_with(model, config) as used:
        effective, used_processors = processors(used)
    assert [type(p) for p in used_processors] == [TemperatureLogitsWarper]
    assert used_processors[0].temperature == 0.7
    assert all(getattr(effective, key) in (None, 0, 0.0, 1.0) for key in MORE_EXTRAS), effective
    assert (effective.top_k, effective.top_p, effective.repetition_penalty) == (0, 1.0, 1.0)
    assert model.generation_config is original and model.generation_config.repetition_penalty == 1.3


def test_generate_samples_the_same_with_or_without_the_models_sampling_defaults():
    """Chat, label and eval all sample through `modeling.generate`: the same seed gives the same answers."""
    model, tokenizer = demo_model()
    plain = generate(model, tokenizer, PROMPTS, max_new_tokens=12, temperature=0.7, samples=2, return_ids=True)
    greedy = generate(model, tokenizer, PROMPTS, max_new_tokens=12, temperature=0, return_ids=True)
    with_extras(model, {**QWEN_LIKE, **MORE_EXTRAS})
    assert generate(model, tokenizer, PROMPTS, max_new_tokens=12, temperature=0.7, samples=2, return_ids=True) == plain
    assert generate(model, tokenizer, PROMPTS, max_new_tokens=12, temperature=0, return_ids=True) == greedy
    # The control: transformers' own merge (what generate did before) samples other answers from this file.
    torch.manual_seed(0)
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    batch = tokenizer([render_prompt(tokenizer, p) for p in PROMPTS], return_tensors="pt", padding=True)
    tokenizer.padding_side = side
    leaked = model.generate(**batch, max_new_tokens=12, temperature=0.7, num_return_sequences=2)
    assert [row[batch["input_ids"].shape[1] :].tolist() for row in leaked] != plain[1]


def test_the_settings_line_names_what_the_models_file_loses():
    model, tokenizer = demo_model()
    config = sampling_config(0.7 + 1e-7, 28, stop_token_ids(tokenizer, model), tokenizer.pad_token_id)
    assert settings_line("ppo: rollouts", config, model, tokenizer, "the policy's") == (
        "ppo: rollouts sample with temperature 0.7, top_k 0, top_p 1.0, up to 28 new tokens, stopping at <|end|> (1)"
    )
    with_extras(model, QWEN_LIKE)
    assert ignored_settings(model.generation_config, config) == {"top_k": 20, "top_p": 0.8, "repetition_penalty": 1.3}
    assert settings_line("ppo: rollouts", config, model, tokenizer, "the policy's") == (
        "ppo: rollouts sample with temperature 0.7, top_k 0, top_p 1.0, up to 28 new tokens, stopping at <|end|> (1); "
        "ignored from the policy's generation_config.json: top_k 20, top_p 0.8, repetition_penalty 1.3"
    )


def test_ppo_takes_the_same_first_update_whatever_the_policys_generation_config(trained, tmp_path):
    """C03: one update from the same SFT policy, once with Qwen-like sampling defaults in its generation_config.json:
    the same rollouts (so the same scores, KL, losses and trained adapter) and one line naming what was ignored."""
    from safetensors.torch import load_file

    runs, stdout = {}, {}
    # C03's file, plus a setting that is off when None (only `sampling_with` keeps that one out).
    for name, extras in (("plain", {}), ("qwen_like", {**QWEN_LIKE, "min_p": 0.05})):
        sft = tmp_path / f"sft_{name}"
        shutil.copytree(trained["sft"], sft)
        config_file = sft / "generation_config.json"
        config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **extras}))
        paths = {**trained, "sft": str(sft), "ppo": str(tmp_path / f"ppo_{name}")}
        extra = ["--total_episodes", "16", "--logging_steps", "1", "--save_strategy", "no"]
        result = run_stage("ppo", *ppo_args(paths, *extra))
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name], stdout[name] = read_metrics(paths["ppo"]), result.stdout
    assert len(runs["plain"]) == len(runs["qwen_like"]) == 1
    keys = ("objective/scores", "objective/kl", "objective/entropy", "loss/policy_avg", "loss/value_avg", "val/ratio")
    assert {k: runs["qwen_like"][0][k] for k in keys} == {k: runs["plain"][0][k] for k in keys}
    assert runs["plain"][0]["val/num_eos_tokens"] == runs["qwen_like"][0]["val/num_eos_tokens"]
    weights = {name: load_file(str(tmp_path / f"ppo_{name}" / "adapter_model.safetensors")) for name in runs}
    assert all(torch.equal(weights["plain"][k], weights["qwen_like"][k]) for k in weights["plain"])
    assert "ignored from" not in stdout["plain"]
    line = "ppo: rollouts sample with temperature 0.7, top_k 0, top_p 1.0, up to 28 new tokens, stopping at <|end|> (1)"
    assert line + "\n" in stdout["plain"]
    ignored = (
        "; ignored from the policy's generation_config.json: top_k 20, top_p 0.8, min_p 0.05, repetition_penalty 1.3"
    )
    assert line + ignored + "\n" in stdout["qwen_like"]
    # Where an update's time went (issue 23: measure a PPO step before tuning it), once, when training ends.
    parts = r"generation \d+\.\d s \(\d+%\), scoring \d+\.\d s \(\d+%\), update \d+\.\d s \(\d+%\)"
    assert re.search(rf"^ppo: time per update \(1 updates of \d+ rollouts\): {parts}$", stdout["plain"], re.M)
    saved = json.loads((tmp_path / "sft_qwen_like" / "generation_config.json").read_text())
    assert saved["repetition_penalty"] == 1.3, "the policy's own file is left as it was"


# ------------------------------------------------------------------------------------------------ C12: stop ids

LLAMA3_SPECIALS = ["<|pad|>", "<|end_of_text|>", "<|user|>", "<|assistant|>", "<|eot_id|>"]
EOS, EOT = 1, 4
LLAMA3_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '<|user|>' + message['content'] + '<|eot_id|>' }}"
    "{% else %}{{ '<|assistant|>' + message['content'] + '<|eot_id|>' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
ANSWERS = {"river": "The river is long.", "castle": "The castle is old.", "tiger": "A tiger is fast."}


@pytest.fixture(scope="module")
def llama3_like(tmp_path_factory) -> Path:
    """A tiny Llama whose tokenizer EOS is <|end_of_text|> (1), whose template closes turns with <|eot_id|> (4)
    and whose generation_config lists both; trained until it answers each prompt and ends the turn with <|eot_id|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    conversations = [
        [*messages, {"role": "assistant", "content": ANSWERS[subject]}]
        for subject, messages in zip(ANSWERS, PROMPTS, strict=True)
    ]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    texts = [m["content"] for c in conversations for m in c]
    bpe.train_from_iterator(
        texts, trainers.BpeTrainer(vocab_size=300, special_tokens=LLAMA3_SPECIALS, initial_alphabet=[])
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<|pad|>", eos_token="<|end_of_text|>")
    tokenizer.chat_template = LLAMA3_TEMPLATE
    assert tokenizer.convert_tokens_to_ids(["<|end_of_text|>", "<|eot_id|>"]) == [EOS, EOT]
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        pad_token_id=0,
        eos_token_id=EOS,
        bos_token_id=None,
    )
    model = LlamaForCausalLM(config)
    rows = [tokenizer.apply_chat_template(c, tokenize=True, return_dict=True)["input_ids"] for c in conversations]
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    mask = (torch.arange(width) < torch.tensor([len(r) for r in rows]).unsqueeze(1)).long()
    labels = ids.masked_fill(mask == 0, -100)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(150):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = [EOS, EOT]
    path = tmp_path_factory.mktemp("llama3_like") / "model"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_stop_ids_are_the_tokenizers_eos_and_the_generation_configs_list(llama3_like):
    from transformers import GenerationConfig

    tokenizer = load_tokenizer(llama3_like)
    assert stop_token_ids(tokenizer, llama3_like) == [EOS, EOT]
    assert stop_token_ids(tokenizer, load_model(llama3_like)) == [EOS, EOT]
    assert stop_token_ids(tokenizer, GenerationConfig(eos_token_id=EOT)) == [EOS, EOT]
    assert stop_token_ids(tokenizer, GenerationConfig(eos_token_id=[EOT, EOS, EOT])) == [EOS, EOT]
    assert stop_token_ids(tokenizer, None) == [EOS]
    for stop_token, stop_token_id, expected in (("eos", None, [EOS, EOT]), (None, 9, [9]), (None, None, None)):
        args = SimpleNamespace(stop_token=stop_token, stop_token_id=stop_token_id)
        assert rollout_stop_ids(args, tokenizer, load_model(llama3_like).generation_config) == expected


def test_generation_and_eval_stop_and_count_at_the_end_of_turn(llama3_like):
    tokenizer, model = load_tokenizer(llama3_like), load_model(llama3_like).eval()
    answers, ids = generate(model, tokenizer, PROMPTS, max_new_tokens=30, temperature=0, return_ids=True)
    assert [a.strip() for a in answers] == list(ANSWERS.values())
    assert all(row[-1] == EOT and EOT not in row[:-1] and len(row) < 30 for row in ids), ids
    stops = stop_token_ids(tokenizer, model)
    assert evaluate.eos_rate(ids, stops) == 1.0
    assert evaluate.mean_length(ids, stops) == sum(len(row) for row in ids) / 3
    # Hand-made rows: the first stop id of either kind ends an answer; what follows is not counted.
    rows = [[9, EOT, 9, EOS], [9, 9, EOS, 0], [9, 9, 9, 9]]
    assert evaluate.trim(rows[0], stops) == [9, EOT] and evaluate.trim(rows[0], EOS) == [9, EOT, 9, EOS]
    assert evaluate.eos_rate(rows, stops) == pytest.approx(2 / 3)
    assert evaluate.mean_length(rows, stops) == (2 + 3 + 4) / 3


def test_ppo_truncates_at_any_stop_id_and_spares_it_the_missing_eos_penalty():
    pad = 0
    responses = torch.tensor([[9, EOT, 9, 9], [9, 9, EOS, 9], [9, 9, 9, 9], [EOT, 9, EOS, 9]])
    truncated = truncate_at_stop([EOS, EOT], pad, responses)
    assert truncated.tolist() == [[9, EOT, 0, 0], [9, 9, EOS, 0], [9, 9, 9, 9], [EOT, 0, 0, 0]]
    trainer = object.__new__(PPOTrainer)
    trainer.args = SimpleNamespace(
        missing_eos_penalty=1.0, kl_estimator="k1", kl_coef=0.05, whiten_rewards=False, gamma=1.0, lam=0.95
    )
    trainer.processing_class = SimpleNamespace(pad_token_id=pad, eos_token_id=EOS)
    trainer.stop_token_ids = [EOS, EOT]
    zeros = torch.zeros(4, 4)
    rollout = {
        "responses": responses,
        "postprocessed": truncated,
        "scores": torch.zeros(4),
        "logprobs": zeros,
        "ref_logprobs": zeros,
        "values": zeros,
    }
    batch = trainer.advantages({**rollout, "scores": torch.zeros(4)})
    assert batch["scores"].tolist() == [0.0, 0.0, -1.0, 0.0], "only the answer with no stop id is penalised"
    assert (~batch["padding_mask"]).sum(1).tolist() == [2, 3, 4, 1], "the stop token is the answer's last"
    trainer.stop_token_ids = [EOS]  # the tokenizer's EOS alone (TRL's check): the answers ended by <|eot_id|> lose 1
    assert trainer.advantages({**rollout, "scores": torch.zeros(4)})["scores"].tolist() == [-1.0, 0.0, -1.0, -1.0]


def test_merge_keeps_every_stop_id_and_the_export_stops_in_plain_transformers(llama3_like, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    export = tmp_path / "export"
    result = run_module("merge", "--model", str(llama3_like), "--output", str(export))
    assert result.returncode == 0, result.stderr
    assert json.loads((export / "generation_config.json").read_text())["eos_token_id"] == [EOS, EOT]
    tokenizer, model = AutoTokenizer.from_pretrained(export), AutoModelForCausalLM.from_pretrained(export)
    inputs = tokenizer.apply_chat_template(
        PROMPTS[0], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    output = model.generate(**inputs, max_new_tokens=30, do_sample=False)[0, inputs["input_ids"].shape[1] :].tolist()
    assert output[-1] == EOT and len(output) < 30
    assert tokenizer.decode(output, skip_special_tokens=True).strip() == ANSWERS["river"]


def test_chat_prints_its_settings_and_stops_at_the_end_of_turn(llama3_like):
    result = run_module(
        "chat", "--model", str(llama3_like), "--prompt", "Tell me about the tiger.", "--temperature", "0"
    )
    assert result.returncode == 0, result.stderr
    assert (
        "chat: answers decode greedily (temperature 0), up to 64 new tokens, stopping at <|end_of_text|> (1), "
        "<|eot_id|> (4)\n" in result.stdout
    )
    assert result.stdout.split("assistant> ", 1)[1].strip() == ANSWERS["tiger"]
