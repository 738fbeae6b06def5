"""Shared fixtures: a tiny demo world built once per test session, and a runner for stage commands."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OFFLINE_ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONUNBUFFERED": "1",
    "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
}


def run_module(module: str, *args: str, cwd: Path = ROOT, timeout: int = 300) -> subprocess.CompletedProcess:
    """Runs `python -m rlhf_trl.<module> args...` the way the Makefile does, capturing its output."""
    return subprocess.run(
        [sys.executable, "-m", f"rlhf_trl.{module}", *args],
        cwd=cwd,
        env=OFFLINE_ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_stage(stage: str, *overrides: str, recipe: str = "demo") -> subprocess.CompletedProcess:
    return run_module(stage, "--config", str(ROOT / "recipes" / recipe / f"{stage}.yaml"), *overrides)


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> Path:
    """data/ (demo JSONL splits) and models/base (tokenizer + random tiny Llama) under one temp folder."""
    from rlhf_trl.prepare import prepare_demo

    root = tmp_path_factory.mktemp("world")
    prepare_demo(root / "data", root / "models" / "base", seed=0, force=False)
    return root


def stage_paths(world: Path, tag: str = "") -> dict[str, str]:
    models = world / f"models{tag}"
    return {name: str(models / name) for name in ("sft", "reward", "ppo", "export")} | {
        "data": str(world / "data"),
        "base": str(world / "models" / "base"),
    }


def sft_args(paths, *extra):
    data = paths["data"]
    return (
        "--model_name_or_path",
        paths["base"],
        "--dataset_name",
        f"{data}/sft_train.jsonl",
        "--eval_dataset_name",
        f"{data}/sft_eval.jsonl",
        "--output_dir",
        paths["sft"],
        "--max_steps",
        "30",
        *extra,
    )


def reward_args(paths, *extra):
    data = paths["data"]
    return (
        "--model_name_or_path",
        paths["sft"],
        "--dataset_name",
        f"{data}/pairs_train.jsonl",
        "--eval_dataset_name",
        f"{data}/pairs_eval.jsonl",
        "--output_dir",
        paths["reward"],
        "--max_steps",
        "20",
        *extra,
    )


def ppo_args(paths, *extra):
    data = paths["data"]
    return (
        "--sft_model_path",
        paths["sft"],
        "--reward_model_path",
        paths["reward"],
        "--dataset_name",
        f"{data}/prompts_train.jsonl",
        "--eval_dataset_name",
        f"{data}/prompts_eval.jsonl",
        "--output_dir",
        paths["ppo"],
        "--total_episodes",
        "64",
        "--per_device_train_batch_size",
        "16",
        "--local_rollout_forward_batch_size",
        "16",
        *extra,
    )


@pytest.fixture(scope="session")
def trained(world) -> dict[str, str]:
    """Runs SFT, reward and PPO once, briefly, through the real stage entry points."""
    paths = stage_paths(world)
    for stage, args in (("sft", sft_args), ("reward", reward_args), ("ppo", ppo_args)):
        result = run_stage(stage, *args(paths))
        assert result.returncode == 0, f"{stage} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        paths[f"{stage}_stdout"] = result.stdout
    return paths
