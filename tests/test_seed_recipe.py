"""The seed project's setup, shrunk: a GPT-2 policy, a DistilBERT reward model with its own tokenizer,
trained on accepted_data.jsonl / rejected_data.jsonl, then PPO scoring rollouts across tokenizers.
Same code path as recipes/gpt2-alpaca, pointed at tiny local models with command-line overrides."""

import json

import pytest
import torch
from conftest import ppo_args, run_stage, sft_args
from tests_helpers import build_distilbert, build_encoder_tokenizer, build_gpt2

from rlhf_trl import demo
from rlhf_trl.modeling import load_model, load_tokenizer
from rlhf_trl.outputs import read_marker


def write_seed_files(pairs: list[dict], folder) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, side in (("accepted_data.jsonl", "chosen"), ("rejected_data.jsonl", "rejected")):
        rows = [{"prompt": p["prompt"][0]["content"], "response": p[side][0]["content"]} for p in pairs]
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def seed_run(world, tmp_path_factory):
    root = tmp_path_factory.mktemp("seed")
    records = demo.make_records()
    write_seed_files(records["pairs_train"][:600], root / "data/processed")
    write_seed_files(records["pairs_eval"][:100], root / "data/eval")
    build_gpt2(load_tokenizer(world / "models/base"), root / "gpt2")
    build_distilbert(build_encoder_tokenizer(demo.corpus(records)), root / "distilbert")
    paths = {
        "base": str(root / "gpt2"),
        "data": str(world / "data"),
        "sft": str(root / "sft"),
        "reward": str(root / "reward"),
        "ppo": str(root / "ppo"),
    }
    runs = {
        # The tiny models have 128 positions, where the recipe's max_length of 512 is refused before training.
        "sft": run_stage("sft", *sft_args(paths, "--bf16", "false", "--max_length", "128"), recipe="gpt2-alpaca"),
        "reward": run_stage(
            "reward",
            "--model_name_or_path",
            str(root / "distilbert"),
            "--dataset_name",
            str(root / "data/processed"),
            "--eval_dataset_name",
            str(root / "data/eval/accepted_data.jsonl"),
            "--output_dir",
            paths["reward"],
            "--max_steps",
            "40",
            "--learning_rate",
            "1e-3",
            "--bf16",
            "false",
            "--max_length",
            "128",
            recipe="gpt2-alpaca",
        ),
    }
    runs["ppo"] = run_stage("ppo", *ppo_args(paths, "--bf16", "false", "--response_length", "24"), recipe="gpt2-alpaca")
    for stage, result in runs.items():
        assert result.returncode == 0, f"{stage}:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return paths, runs


def test_distilbert_reward_model_trains_on_the_seed_files(seed_run):
    paths, runs = seed_run
    assert read_marker(paths["reward"])["eval_pairs"] == 100
    assert "pairwise accuracy" in runs["reward"].stdout
    from transformers import AutoModelForSequenceClassification

    reward = load_model(paths["reward"], AutoModelForSequenceClassification, {"num_labels": 1})
    assert reward.config.model_type == "distilbert"


def test_ppo_scores_rollouts_through_the_reward_models_own_tokenizer(seed_run):
    paths, runs = seed_run
    assert "re-encoded" in runs["ppo"].stdout
    assert read_marker(paths["ppo"])["last_score"] is not None
    policy, sft = load_model(paths["ppo"]), load_model(paths["sft"])
    assert any(not torch.equal(a, b) for a, b in zip(policy.parameters(), sft.parameters(), strict=True))
