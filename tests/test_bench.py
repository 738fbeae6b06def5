"""benchmarks/bench_ppo.py end to end at toy size (the harness works on CPU), its refusals, and the shape table.

The GPU numbers themselves come from `make bench SHAPE=... MODE=...` on a GPU (benchmarks/NOTES.md); here only
that every row runs, the JSON holds what the table prints, and the timing split adds up.
"""

import json
import subprocess
import sys

import pytest
import torch
from conftest import OFFLINE_ENV, ROOT

from benchmarks.shapes import SHAPES, parameter_count

ENV = {**OFFLINE_ENV, "PYTHONPATH": str(ROOT), "TRL_EXPERIMENTAL_SILENCE": "1"}


def bench(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "benchmarks.bench_ppo", *args]
    return subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the toy run is not what make bench measures")
def test_toy_benchmark_runs_both_sides(tmp_path):
    out = tmp_path / "bench.json"
    tiny = ("--batch", "4", "--prompt-length", "8", "--response-length", "8", "--ppo-epochs", "2", "--steps", "2")
    # With gradient checkpointing asked for: TRL's PPOTrainer ignores the key, the pipeline turns it on.
    checkpointed = ("--gradient-checkpointing",)
    result = bench("--shape", "toy", *tiny, *checkpointed, "--cache-dir", str(tmp_path / "cache"), "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = {(row["task"], row["impl"]): row for row in report["rows"]}
    assert set(rows) == {("ppo", "trl"), ("ppo", "pipeline"), ("sft", "trl"), ("sft", "pipeline")}
    assert rows["ppo", "trl"]["trainer"].endswith("experimental.ppo.ppo_trainer.PPOTrainer")  # TRL's own class
    assert rows["ppo", "pipeline"]["trainer"] == "rlhf_trl.ppo_engine.PPOTrainer"
    for (task, _), row in rows.items():
        assert row["status"] == "ok", row
        assert row["step_time_s"] > 0 and row["tokens_per_s"] > 0 and row["peak_memory_gb"] > 0
        assert row["steps_timed"] == 2 and len(row["step_times_s"]) == 3  # one warm-up step left out
        if task == "ppo":
            assert row["generation_s"] > 0 and row["scoring_s"] > 0
            parts = row["generation_s"] + row["scoring_s"] + row["training_s"]
            assert parts == pytest.approx(row["step_time_s"], rel=0.05, abs=1e-3)
            assert any("objective/kl" in log for log in row["logs"])
    # Same seed, prompts and reward model: the pipeline's PPO follows TRL's reward and KL curves step by step
    # (here with checkpointing on one side only, which must not change what is computed).
    for trl_log, pipeline_log in zip(rows["ppo", "trl"]["logs"], rows["ppo", "pipeline"]["logs"], strict=True):
        for key in ("objective/scores", "objective/kl"):
            assert pipeline_log[key] == pytest.approx(trl_log[key], rel=1e-3, abs=1e-5), key
    assert not rows["ppo", "trl"]["gradient_checkpointing_active"]
    assert rows["ppo", "pipeline"]["gradient_checkpointing_active"]
    assert rows["sft", "trl"]["gradient_checkpointing_active"]
    assert report["ratios"]["ppo step time"] > 0 and report["settings"]["batch"] == 4
    assert "ppo  pipeline" in result.stdout and "tokens/s" in result.stdout and f"wrote {out}" in result.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA 4-bit is allowed")
def test_quantized_mode_without_cuda_is_one_line():
    result = bench("--mode", "4bit", timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: --mode 4bit needs a CUDA GPU for bitsandbytes and this machine has none: use --mode bf16"
    )


def test_shapes_match_the_published_sizes():
    for name, shape in SHAPES.items():
        if name != "toy":
            assert parameter_count(name) / 1e9 == pytest.approx(shape.billions, rel=0.01), name


def test_timed_phases_restores_trl_functions():
    from benchmarks.bench_ppo import Clock, timed_phases
    from rlhf_trl.ppo_engine import TrlPPOTrainer

    module = sys.modules[TrlPPOTrainer.__module__]
    before = (module.batch_generation, module.get_reward)
    with pytest.raises(RuntimeError), timed_phases(Clock(cuda=False)):
        assert module.get_reward is not before[1]
        raise RuntimeError("a failing row")
    assert (module.batch_generation, module.get_reward) == before


def test_a_failing_side_is_a_row_not_a_crash(monkeypatch, tmp_path):
    import benchmarks.bench_ppo as bench_ppo

    def fails(*args):
        raise RuntimeError("expected scalar type Float but found BFloat16\n(the rest of a long message)")

    monkeypatch.setattr(bench_ppo, "ppo_row", fails)
    args = bench_ppo.parse_args(["--shape", "toy"])
    row = bench_ppo.run_row("ppo", "trl", args, tmp_path)
    assert row["status"] == "failed: RuntimeError: expected scalar type Float but found BFloat16"
    result = {
        "shape": {"name": "toy", "parameters": 1},
        "settings": vars(args),
        "device": "cpu",
        "date": "today",
        "rows": [row],
        "ratios": {"ppo step time": None},
    }
    assert "ppo  trl       failed: RuntimeError" in bench_ppo.table(result)
