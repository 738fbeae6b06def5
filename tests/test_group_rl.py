"""RLOO and GRPO (rlhf_trl.rloo, rlhf_trl.grpo): TRL 1.16's trainers against the reward model.

Each trains a LoRA on the SFT policy, saves, reloads and generates; refuses to start before its inputs exist; and
scores every rollout exactly as `rewards.score_answers` scores the same conversation and text directly, also with a
reward model that has its own tokenizer (DistilBERT next to a GPT-2 policy, the seed project's design).
"""

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import run_here
from safetensors.torch import load_file
from test_cross_reward import MULTI, SINGLE, TEXTS, gpt2_like_tokenizer
from tests_helpers import build_distilbert, build_encoder_tokenizer, build_gpt2

from rlhf_trl.generation import stop_token_ids
from rlhf_trl.modeling import base_of, generate, load_model, load_tokenizer
from rlhf_trl.outputs import read_marker
from rlhf_trl.rewards import RewardModelFunction, score_answers

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("rloo", "grpo")


@pytest.mark.parametrize("stage", METHODS)
def test_the_method_trains_a_lora_on_the_sft_policy_that_reloads_and_generates(stage, methods_trained):
    marker = read_marker(methods_trained[stage])
    assert marker["stage"] == stage and base_of(methods_trained[stage]) == methods_trained["sft"]
    assert marker["steps"] == 6 and marker["peak_memory_mib"] > 0 and marker["peak_memory_kind"] == "cpu_resident"
    # 6 steps x 8 answers of 1 to 12 tokens each
    assert 48 <= marker["tokens_generated"] <= 6 * 8 * 12
    assert re.search(rf"{stage}: mean reward -?\d+\.\d{{3}} .* -> -?\d+\.\d{{3}}", methods_trained[f"{stage}_stdout"])
    weights = load_file(f"{methods_trained[stage]}/adapter_model.safetensors")
    lora_b = {name: tensor for name, tensor in weights.items() if "lora_B" in name}
    assert lora_b and all(t.abs().sum() > 0 for t in lora_b.values()), "LoRA B starts at 0: it did not train"
    policy, sft = load_model(methods_trained[stage]), load_model(methods_trained["sft"])
    assert any(not torch.equal(a, b) for a, b in zip(policy.parameters(), sft.parameters(), strict=True))
    prompt = [{"role": "user", "content": "What is a tiger?"}]
    answer = generate(policy, load_tokenizer(methods_trained[stage]), [prompt])
    assert answer[0].strip()
    logs = [json.loads(line) for line in Path(methods_trained[stage], "metrics.jsonl").read_text().splitlines()]
    assert [log["step"] for log in logs if "reward" in log] == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("stage", METHODS)
@pytest.mark.parametrize("missing", ["sft", "reward"])
def test_the_method_refuses_to_start_before_its_inputs_exist(stage, missing, trained, tmp_path):
    # The other input exists (a fresh clone has no models/demo at all), so the error is about the missing one.
    present = {"sft": ("--reward_model_path", trained["reward"]), "reward": ("--sft_model_path", trained["sft"])}
    key = "sft_model_path" if missing == "sft" else "reward_model_path"
    args = ("--config", f"recipes/demo/{stage}.yaml", *present[missing], f"--{key}", str(tmp_path / missing))
    result = run_here(stage, *args, "--output_dir", str(tmp_path / stage))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"make {missing} RECIPE=demo" in lines[0], result.stderr
    assert not (tmp_path / stage).exists()


# --------------------------------------------------------------------------- a reward model with its own tokenizer


@pytest.fixture(scope="module")
def cross(tmp_path_factory):
    """A GPT-2-like policy that pads with its EOS and writes an EOS inside a multi-turn prompt (Alpaca template), a
    DistilBERT reward model with a WordPiece tokenizer, and a prompt file of a single-turn and a multi-turn prompt."""
    root = tmp_path_factory.mktemp("cross_group")
    build_gpt2(gpt2_like_tokenizer(), root / "policy")
    build_distilbert(build_encoder_tokenizer(TEXTS), root / "reward")
    rows = [{"prompt": SINGLE}, {"prompt": MULTI}] * 4
    (root / "prompts.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return root


def group_run(stage: str, root: Path, reward: Path, *extra: str):
    return run_here(
        stage,
        *("--config", f"recipes/demo/{stage}.yaml", "--sft_model_path", str(root / "policy")),
        *("--reward_model_path", str(reward), "--dataset_name", str(root / "prompts.jsonl")),
        *("--eval_dataset_name", str(root / "prompts.jsonl"), "--output_dir", str(root / f"out-{stage}")),
        *("--max_steps", "2", "--per_device_train_batch_size", "8", "--num_generations", "4"),
        *("--max_completion_length", "6", "--max_prompt_length", "128"),
        *extra,
    )


@pytest.mark.parametrize("stage", METHODS)
def test_a_reward_model_with_its_own_tokenizer_scores_each_rollout_as_directly(stage, cross, monkeypatch):
    calls = []
    original = RewardModelFunction.__call__

    def recorded(self, prompts, completions, completion_ids, **kwargs):
        scores = original(self, prompts, completions, completion_ids, **kwargs)
        calls.append((prompts, completion_ids, scores, self.missing_eos_penalty))
        return scores

    monkeypatch.setattr(RewardModelFunction, "__call__", recorded)
    result = group_run(stage, cross, cross / "reward")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{stage}: the reward model has its own tokenizer" in result.stdout
    assert len(calls) == 2  # one scoring call per step

    policy_tokenizer = load_tokenizer(cross / "policy")
    reward_model = load_model(cross / "reward", _classifier())
    reward_tokenizer = load_tokenizer(cross / "reward")
    stops = set(stop_token_ids(policy_tokenizer, cross / "policy"))
    seen = set()
    for prompts, completion_ids, scores, penalty in calls:
        assert len(prompts) == len(scores) == 8
        answers = policy_tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        direct = score_answers(reward_model, reward_tokenizer, prompts, answers)
        ended = [bool(stops.intersection(ids)) for ids in completion_ids]
        expected = [s - (0 if end else penalty) for s, end in zip(direct, ended, strict=True)]
        torch.testing.assert_close(torch.tensor(scores), torch.tensor(expected), rtol=1e-5, atol=1e-6)
        assert len(set(direct)) > 1  # the reward model tells the answers apart: the equality above means something
        for prompt in prompts:  # each row's own conversation, the multi-turn one with its earlier answer included
            assert prompt in (SINGLE, MULTI)
            seen.add(len(prompt))
    assert seen == {1, 3}


def _classifier():
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification


def test_a_reward_tokenizer_that_cannot_read_the_policys_text_is_refused(cross, tmp_path):
    from tests_helpers import distilbert_classifier

    # A WordPiece vocabulary of digits: every word of the prompts is its unknown token.
    tokenizer = build_encoder_tokenizer(["0 1 2 3 4 5 6 7 8 9 10 11 12"] * 10, vocab_size=40)
    distilbert_classifier(tokenizer).save_pretrained(tmp_path / "digits")
    tokenizer.save_pretrained(tmp_path / "digits")
    result = group_run("rloo", cross, tmp_path / "digits", "--output_dir", str(tmp_path / "out"))
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "cannot score this policy's text" in errors[0], result.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


class Constant(torch.nn.Module):
    """A reward model that scores every sequence 2.0."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None):
        return type("Out", (), {"logits": torch.full((input_ids.shape[0], 1), 2.0)})()


def test_missing_eos_penalty_lowers_only_the_answers_cut_off():
    tokenizer = gpt2_like_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token
    eos = tokenizer.eos_token_id
    reward = RewardModelFunction(Constant(), tokenizer, [eos], missing_eos_penalty=1.5)
    prompts = [SINGLE, SINGLE]
    completions = [[{"role": "assistant", "content": "blue"}]] * 2
    # 2.0 for the answer that ended with EOS; 2.0 - 1.5 = 0.5 for the one that ran into the length limit
    assert reward(prompts, completions, [[5, 6, eos], [5, 6, 7]]) == [2.0, 0.5]
    assert reward.tokens_generated == 6


def test_tokens_generated_counts_training_rollouts_not_an_evaluations():
    """TRL scores its eval_strategy evaluation's rollouts with the same reward function, the policy in eval mode:
    those are no training cost (a demo run with eval_steps 1 counted 10631 tokens for 636 sampled in training)."""
    tokenizer = gpt2_like_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token
    policy = torch.nn.Linear(1, 1)
    reward = RewardModelFunction(Constant(), tokenizer, [tokenizer.eos_token_id], policy=policy)
    completions = [[{"role": "assistant", "content": "blue"}]]
    reward([SINGLE], completions, [[5, 6, 7]])
    policy.eval()
    reward([SINGLE], completions, [[5, 6, 7, 8]])
    assert reward.tokens_generated == 3


def test_lora_target_modules_the_model_lacks_is_one_line(cross, tmp_path):
    result = group_run(
        "grpo", cross, cross / "reward", "--lora_target_modules", "q_proj", "--output_dir", str(tmp_path)
    )
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert (
        len(errors) == 1
        and errors[0].startswith("error: lora_target_modules: Target modules")
        and "all-linear" in errors[0]
    )


def test_rollouts_ignore_sampling_settings_in_the_policys_generation_config(cross, tmp_path, monkeypatch):
    """Case C03's kind: TRL leaves every sampling field it does not set to the model's generation_config.json, so a
    policy shipped with `no_repeat_ngram_size: 1` would never repeat a token of its prompt or answer. The rollouts'
    settings stay out of a full model's saved generation_config.json (a plain `generate` would stop at 6 tokens)."""
    import shutil

    policy = shutil.copytree(cross / "policy", tmp_path / "policy")
    config = json.loads((policy / "generation_config.json").read_text())
    (policy / "generation_config.json").write_text(json.dumps({**config, "no_repeat_ngram_size": 1, "top_p": 0.5}))
    sampled = []
    original = RewardModelFunction.__call__

    def recorded(self, prompts, completions, completion_ids, **kwargs):
        sampled.extend(zip(prompts, completion_ids, strict=True))
        return original(self, prompts, completions, completion_ids, **kwargs)

    monkeypatch.setattr(RewardModelFunction, "__call__", recorded)
    result = group_run(
        "rloo", cross, cross / "reward", "--sft_model_path", str(policy), "--output_dir", str(tmp_path / "o"),
        "--use_peft", "false",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    # A full model is saved with the policy's own generation_config.json, not the rollouts' (max_new_tokens 6)
    saved = json.loads((tmp_path / "o/generation_config.json").read_text())
    assert saved["no_repeat_ngram_size"] == 1 and saved["top_p"] == 0.5 and "max_new_tokens" not in saved, saved
    line = next(line for line in result.stdout.splitlines() if line.startswith("rloo: answers sample"))
    assert "ignored from the policy's generation_config.json:" in line, line
    assert "no_repeat_ngram_size 1" in line and "top_p 0.5" in line, line
    tokenizer = load_tokenizer(policy)
    repeats = 0
    for prompt, ids in sampled:
        encoded = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)
        seen = list(encoded["input_ids"])
        for token in ids:
            repeats += token in seen
            seen.append(token)
    assert repeats > 0  # no_repeat_ngram_size 1 would have banned every one of these


def test_rollout_settings_line_shows_the_recipes_top_p_top_k_min_p_and_repetition_penalty():
    """TRL samples with the recipe's top_p, top_k, min_p and repetition_penalty; the stage's line said top_k 0,
    top_p 1.0 whatever the recipe set."""
    from rlhf_trl.generation import describe
    from rlhf_trl.group_rl import RLOOConfig, rollout_config

    args = RLOOConfig(
        output_dir="unused", bf16=False, temperature=0.7, top_p=0.9, top_k=20, min_p=0.05, repetition_penalty=1.1
    )
    line = describe(rollout_config(args, [2], 0))
    assert "temperature 0.7, top_k 20, top_p 0.9, min_p 0.05, repetition_penalty 1.1" in line, line


@pytest.mark.parametrize(
    ("stage", "key", "value", "needle"),
    [
        ("grpo", "temperature", "0", "temperature must be above 0 for sampled rollouts"),
        ("rloo", "max_completion_length", "0", "max_completion_length must be at least 1 token, not 0"),
        ("grpo", "lora_r", "0", "lora_r is 0: it must be at least 1"),
    ],
)
def test_settings_that_cannot_work_are_one_line(stage, key, value, needle, tmp_path):
    """Each ended in a traceback from transformers or peft, after the models were loaded (exit 1)."""
    result = run_here(stage, "--config", f"recipes/demo/{stage}.yaml", f"--{key}", value, "--output_dir", str(tmp_path))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"error: {needle}"), result.stderr
