"""Each stage end to end on the tiny demo world: it trains, saves, and what it saved reloads and works."""

import json
import re
import subprocess
import sys
from pathlib import Path

import torch
from conftest import run_module
from safetensors.torch import load_file

from rlhf_trl.modeling import base_of, generate, load_model, load_tokenizer
from rlhf_trl.outputs import read_marker


def lora_b_weights(adapter_dir: str) -> dict[str, torch.Tensor]:
    weights = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
    return {name: tensor for name, tensor in weights.items() if "lora_B" in name}


def test_sft_changes_weights_and_reloads_to_generate(trained):
    assert read_marker(trained["sft"])["stage"] == "sft"
    assert re.search(r"sft: held-out loss \d+\.\d{3}", trained["sft_stdout"])
    base, sft = load_model(trained["base"]), load_model(trained["sft"])
    changed = [
        name
        for (name, a), (_, b) in zip(base.named_parameters(), sft.named_parameters(), strict=True)
        if not torch.equal(a, b)
    ]
    assert len(changed) == len(list(base.parameters())), "full fine-tuning should update every weight"
    answer = generate(sft, load_tokenizer(trained["sft"]), [[{"role": "user", "content": "Describe the river."}]])
    assert isinstance(answer[0], str) and answer[0].strip()


def test_reward_trains_lora_and_saves_its_score_head(trained):
    assert re.search(r"reward: held-out pairwise accuracy \d\.\d{3} on 200 pairs", trained["reward_stdout"])
    config = json.loads((Path(trained["reward"]) / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS"
    weights = load_file(str(Path(trained["reward"]) / "adapter_model.safetensors"))
    assert any("score" in name for name in weights), "the score head must be saved with the adapter"
    assert all(t.abs().sum() > 0 for t in lora_b_weights(trained["reward"]).values()), "LoRA B starts at 0"

    from transformers import AutoModelForSequenceClassification

    reward = load_model(trained["reward"], AutoModelForSequenceClassification, {"num_labels": 1}).eval()
    tokenizer = load_tokenizer(trained["reward"])
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": "Describe the river."}, {"role": "assistant", "content": a}], tokenize=False
        )
        for a in ("The river is long. I hope this helps!", "The river is long.")
    ]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        scores = reward(**batch).logits.squeeze(-1)
    assert scores.shape == (2,) and torch.isfinite(scores).all()


def test_ppo_trains_an_adapter_on_the_sft_policy(trained):
    marker = read_marker(trained["ppo"])
    assert marker["stage"] == "ppo" and base_of(trained["ppo"]) == trained["sft"]
    assert 64 <= marker["tokens_generated"] <= 64 * 28  # 64 episodes of 1 to response_length 28 answer tokens
    assert re.search(r"ppo: mean reward-model score -?\d+\.\d{3} .* -> -?\d+\.\d{3}", trained["ppo_stdout"])
    b_weights = lora_b_weights(trained["ppo"])
    assert b_weights and all(t.abs().sum() > 0 for t in b_weights.values()), "LoRA B starts at 0"
    policy = load_model(trained["ppo"])
    sft = load_model(trained["sft"])
    assert any(not torch.equal(a, b) for a, b in zip(policy.parameters(), sft.parameters(), strict=True))
    answer = generate(policy, load_tokenizer(trained["ppo"]), [[{"role": "user", "content": "What is a tiger?"}]])
    assert answer[0].strip()


def test_merge_writes_a_model_that_loads_without_peft(trained, tmp_path):
    export = tmp_path / "export"
    result = run_module("merge", "--model", trained["ppo"], "--output", str(export))
    assert result.returncode == 0, result.stderr
    assert not (export / "adapter_config.json").exists()
    assert (export / "model.safetensors").is_file() and (export / "generation_config.json").is_file()

    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(export).eval()
    merged = load_model(trained["ppo"]).eval()
    probe = torch.tensor([[5, 17, 42, 99]])
    with torch.no_grad():
        torch.testing.assert_close(plain(probe).logits, merged(probe).logits, atol=1e-4, rtol=1e-4)
    assert plain.generation_config.eos_token_id == load_tokenizer(export).eos_token_id

    again = run_module("merge", "--model", trained["ppo"], "--output", str(export))
    assert again.returncode == 2 and "--overwrite" in again.stderr


def test_chat_answers_once_and_interactively(trained):
    once = run_module("chat", "--model", trained["ppo"], "--prompt", "Describe the castle.", "--max-new-tokens", "12")
    assert once.returncode == 0, once.stderr
    answer = once.stdout.split("assistant> ", 1)[1]
    assert answer.strip(), "a streamed answer should follow the prompt"

    session = subprocess.run(
        [sys.executable, "-m", "rlhf_trl.chat", "--model", trained["sft"], "--max-new-tokens", "8"],
        input="Describe the castle.\n/reset\nWhat is a tiger?\n/quit\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert session.returncode == 0, session.stderr
    assert session.stdout.count("assistant> ") == 2 and "(conversation cleared)" in session.stdout


def test_a_live_reward_adapter_scores_like_the_merged_one(trained):
    """PPO on a 4-bit base keeps the reward adapter unmerged; on CPU the same path must score identically."""
    from transformers import AutoModelForSequenceClassification

    kwargs = {"num_labels": 1}
    merged = load_model(trained["reward"], AutoModelForSequenceClassification, kwargs).eval()
    live = load_model(trained["reward"], AutoModelForSequenceClassification, kwargs, live_adapter=True).eval()
    assert type(live).__name__ == "LlamaForSequenceClassification", "a plain model, as TRL's reward call expects"
    assert any("lora_A" in name for name, _ in live.named_parameters()), "the adapter is injected, not merged"
    assert not any("lora_A" in name for name, _ in merged.named_parameters())
    probe = torch.tensor([[5, 17, 42, 99, 1]])
    with torch.no_grad():
        torch.testing.assert_close(live(probe).logits, merged(probe).logits, atol=1e-5, rtol=1e-4)


def test_value_model_starts_from_the_reward_model_and_trains(trained):
    from transformers import AutoModelForSequenceClassification

    from rlhf_trl.ppo import start_value_from_reward

    reward = load_model(trained["reward"], AutoModelForSequenceClassification, {"num_labels": 1})
    assert all(p.requires_grad for p in reward.parameters()), "a merged adapter chain loads trainable"
    value = start_value_from_reward(reward, trained["reward"], {"num_labels": 1})
    assert all(p.requires_grad for p in value.parameters()), "PPO's optimizer only sees trainable weights"
    assert torch.equal(value.score.weight, reward.score.weight) and value.score.weight is not reward.score.weight


def test_progress_bar_shows_the_key_numbers_not_a_dict_per_step(trained):
    # transformers' bar wrote every logged step as a dict ("{'loss': '1.234', 'grad_norm': ...}"); metrics.jsonl
    # keeps everything, the screen shows one bar whose postfix holds the stage's key numbers (tqdm: "loss=1.234").
    from rlhf_trl.metrics_log import key_numbers, read_metrics

    shown = {}
    for stage in ("sft", "reward", "ppo"):
        screen = trained[f"{stage}_stdout"] + trained[f"{stage}_stderr"]
        assert "{'" not in screen, f"{stage} printed a metrics dict"
        # The key numbers of the steps logged while the bar was open (not the evaluation after training).
        logged = [r for r in read_metrics(trained[stage]) if "train_runtime" not in r and "eval_loss" not in r]
        shown[stage] = key_numbers({k: v for record in logged for k, v in record.items()})
        for label, value in shown[stage].items():
            assert f"{label}={value}" in trained[f"{stage}_stderr"], f"{stage}: {label}={value} not on its bar"
    assert {"loss"} <= shown["sft"].keys() and {"score", "kl"} <= shown["ppo"].keys()


def test_key_numbers_pick_each_stages_names_and_keep_the_last_seen():
    from rlhf_trl.metrics_log import key_numbers

    # PPO's TRL names; grad_norm and lr are not key numbers; 0.123456 -> 4 significant digits.
    assert key_numbers({"objective/scores": 4.82812, "objective/kl": 0.123456, "lr": 1e-3}) == {
        "score": "4.828",
        "kl": "0.1235",
    }
    # An evaluation's log keeps the training loss already shown; RLOO/GRPO's "reward" is the score.
    assert key_numbers({"eval_loss": 0.5}, {"loss": "0.7"}) == {"loss": "0.7", "eval loss": "0.5"}
    assert key_numbers({"reward": 1.0, "kl": 2.0}) == {"score": "1", "kl": "2"}
    assert key_numbers({"loss": True}) == {}  # a flag is no number
