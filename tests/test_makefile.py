"""The Makefile's stage chain, as a user runs it, on the demo recipe with far fewer steps.

It runs in a scratch copy of the project (same .venv), so the user's models/ and data/ are untouched.
"""

import os
import subprocess

import pytest
import torch
from conftest import scratch_project


@pytest.mark.slow
def test_make_stage_chain(tmp_path):
    project = scratch_project(tmp_path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}

    def make(*args: str) -> str:
        result = subprocess.run(["make", *args], cwd=project, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"make {' '.join(args)}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        return result.stdout

    make("data")
    assert (project / "data/processed/demo/sft_train.jsonl").is_file()
    assert "held-out loss" in make("sft", "ARGS=--max_steps 20")
    assert "pairwise accuracy" in make("reward", "ARGS=--max_steps 10")
    assert "ppo: saved to models/demo/ppo" in make("ppo", "ARGS=--total_episodes 64")
    assert "assistant> " in make("chat", "PROMPT=Describe the castle.", "ARGS=--max-new-tokens 8")
    assert "standalone model" in make("merge")
    for stage in ("sft", "reward", "ppo", "export"):
        assert (project / "models/demo" / stage / "rlhf_trl_run.json").is_file()

    refused = subprocess.run(["make", "sft"], cwd=project, env=env, capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "already holds a finished run" in refused.stderr

    # ACCELERATE_CONFIG and LAUNCH_ARGS reach rlhf_trl.launch, which refuses before accelerate starts a process.
    if torch.cuda.device_count() < 3:
        command = ["make", "sft", "ACCELERATE_CONFIG=recipes/accelerate_configs/multi_gpu.yaml"]
        refused = subprocess.run(
            [*command, "LAUNCH_ARGS=--num_processes 3"], cwd=project, env=env, capture_output=True, text=True
        )
        assert refused.returncode != 0 and "multi_gpu.yaml starts 3 process(es) per machine" in refused.stderr
        assert "Traceback" not in refused.stderr
