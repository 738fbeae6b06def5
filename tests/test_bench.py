"""benchmarks/bench_ppo.py end to end at toy size (the harness works on CPU), its refusals, and the shape table.

The GPU numbers themselves come from `make bench SHAPE=... MODE=...` on a GPU (benchmarks/NOTES.md); here only
that every row runs, the JSON holds what the table prints, and the timing split adds up.
"""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import OFFLINE_ENV, ROOT

from benchmarks.shapes import SHAPES, parameter_count

ENV = {**OFFLINE_ENV, "PYTHONPATH": str(ROOT), "TRL_EXPERIMENTAL_SILENCE": "1"}


def bench(
    *args: str, timeout: int = 240, module: str = "benchmarks.bench_ppo", env: dict | None = None
) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", module, *args]
    return subprocess.run(command, cwd=ROOT, env=env or ENV, capture_output=True, text=True, timeout=timeout)


TINY = ("--batch", "4", "--prompt-length", "8", "--response-length", "8", "--ppo-epochs", "2", "--steps", "2")
ON_CPU_ONLY = pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the toy run is not what make bench runs")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """One random toy checkpoint (and reward adapter) for the toy runs of this module."""
    return tmp_path_factory.mktemp("bench-cache")


def check_rows(rows: dict) -> None:
    """Every row ran its steps; each PPO row's timing split adds up to its step time."""
    for (task, _), row in rows.items():
        assert row["status"] == "ok", row
        assert row["step_time_s"] > 0 and row["tokens_per_s"] > 0 and row["peak_memory_gb"] > 0
        assert row["steps_timed"] == 2 and len(row["step_times_s"]) == 3  # one warm-up step left out
        if task == "ppo":
            assert row["generation_s"] > 0 and row["scoring_s"] > 0
            parts = row["generation_s"] + row["scoring_s"] + row["training_s"]
            assert parts == pytest.approx(row["step_time_s"], rel=0.05, abs=1e-3)
            assert any("objective/kl" in log for log in row["logs"])


FAKE_REFERENCE = """#!{python}
# Stands in for .venv-reference/bin/python: records its arguments and writes the row it was asked for.
import json, sys
argv = sys.argv[1:]
with open({log!r}, "a") as log:
    log.write(json.dumps(argv) + "\\n")
task, impl, mode = argv[argv.index("--row") + 1].split(":")
row = {{"task": task, "impl": impl, "mode": mode, "status": "ok", "trainer": "fake TRL", "step_time_s": 1.0,
       "training_s": 0.5, "tokens_per_s": 64.0, "peak_memory_gb": 0.5, "steps_timed": 2,
       "step_times_s": [1.0, 1.0, 1.0], "versions": {{"trl": "1.12.0", "transformers": "5.23.0"}}}}
if task == "ppo":
    row.update(generation_s=0.2, scoring_s=0.3, logs=[{{"objective/kl": 0.0, "objective/scores": 0.1}}])
with open(argv[argv.index("--row-out") + 1], "w") as out:
    json.dump(row, out)
"""


@pytest.fixture
def fake_reference(tmp_path) -> tuple[dict, Path]:
    """An environment whose reference interpreter is FAKE_REFERENCE, and the file it logs its calls to."""
    log, script = tmp_path / "reference-calls.jsonl", tmp_path / "reference-python"
    script.write_text(FAKE_REFERENCE.format(python=sys.executable, log=str(log)))
    script.chmod(0o755)
    return {**ENV, "RLHF_TRL_REFERENCE_PYTHON": str(script)}, log


@ON_CPU_ONLY
def test_toy_benchmark_runs_both_sides(tmp_path, cache_dir, fake_reference):
    """The pipeline rows run here; TRL's rows (TRL 1.12) run in the reference environment, faked here
    (reference/test_against_trl.py runs the real one), given the same settings."""
    env, calls = fake_reference
    out = tmp_path / "bench.json"
    # With gradient checkpointing asked for: the pipeline turns it on.
    settings = ("--shape", "toy", *TINY, "--gradient-checkpointing", "--cache-dir", str(cache_dir), "--out", str(out))
    result = bench(*settings, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = {(row["task"], row["impl"]): row for row in report["rows"]}
    assert set(rows) == {("ppo", "trl"), ("ppo", "pipeline"), ("sft", "trl"), ("sft", "pipeline")}
    asked = [json.loads(line) for line in calls.read_text().splitlines()]
    assert [call[call.index("--row") + 1] for call in asked] == ["ppo:trl:bf16", "sft:trl:bf16"]
    for call in asked:
        assert call[:2] == ["-m", "benchmarks.bench_ppo"] and tuple(call[2 : 2 + len(settings)]) == settings
    assert rows["ppo", "trl"]["trainer"] == rows["sft", "trl"]["trainer"] == "fake TRL"
    pipeline = rows["ppo", "pipeline"]
    assert pipeline["trainer"] == "rlhf_trl.ppo_trainer.PPOTrainer"
    check_rows(rows)
    # The default: one base for policy, reference, value and the random LoRA reward adapter written to the cache.
    assert pipeline["shared_base"] is True and pipeline["reward_shared"] is True
    assert pipeline["reward_model"] == "random LoRA adapter"
    assert pipeline["logprob_chunk_tokens"] == 1024 and pipeline["static_cache"] is False
    adapter = Path(pipeline["reward_adapter"])
    checkpoint = adapter.with_name(adapter.name.split("-reward-")[0])  # next to the checkpoint, named after it
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    assert adapter.parent == cache_dir and (checkpoint / "config.json").is_file()
    assert adapter_config["task_type"] == "SEQ_CLS" and adapter_config["r"] == 16
    assert Path(adapter_config["base_model_name_or_path"]) == checkpoint.resolve()
    # The policy starts at its reference (LoRA B = 0), so the first rollout's KL is ~0.
    assert pipeline["logs"][0]["objective/kl"] == pytest.approx(0, abs=1e-4)
    assert pipeline["gradient_checkpointing_active"] and rows["sft", "pipeline"]["gradient_checkpointing_active"]
    assert report["ratios"]["ppo step time"] == pytest.approx(pipeline["step_time_s"] / 1.0)
    assert report["settings"]["batch"] == 4 and report["settings"]["shared_base"] is True
    assert "ppo  pipeline" in result.stdout and "tokens/s" in result.stdout and f"wrote {out}" in result.stdout
    assert "ppo pipeline: rlhf_trl.ppo_trainer.PPOTrainer; policy, reference, value and reward on one base" in (
        result.stdout
    )
    assert "trl rows: TRL 1.12.0, transformers 5.23.0 (the reference environment)" in result.stdout


@ON_CPU_ONLY
def test_on_a_cpu_only_shapes_up_to_smollm2_135m_run(tmp_path):
    # SmolLM2-135M's shape runs on a CPU (issue 23: measure the smollm2-135m recipe's PPO step); a 0.5B one is refused.
    from benchmarks import bench_ppo
    from rlhf_trl.errors import UserError

    bench_ppo.check(bench_ppo.parse_args(["--shape", "smollm2-135m", "--cache-dir", str(tmp_path)]))
    with pytest.raises(UserError) as caught:
        bench_ppo.check(bench_ppo.parse_args(["--shape", "qwen2.5-0.5b", "--cache-dir", str(tmp_path)]))
    assert str(caught.value) == (
        "--shape qwen2.5-0.5b (0.49B parameters) needs a CUDA GPU: without one only shapes up to 0.2B run "
        "(toy, smollm2-135m)"
    )


def test_trl_rows_without_the_reference_environment_say_what_to_run(tmp_path):
    missing = tmp_path / "no-venv" / "python"
    result = bench("--shape", "toy", env={**ENV, "RLHF_TRL_REFERENCE_PYTHON": str(missing)}, timeout=120)
    assert result.returncode == 2 and result.stderr.strip() == (
        f"error: TRL 1.12's side runs in the reference environment and {missing} does not exist: run "
        "`make reference-env` first (or set RLHF_TRL_REFERENCE_PYTHON)"
    )
    assert "bench:" not in result.stdout, "refused before any checkpoint is built"


@pytest.mark.paths
@ON_CPU_ONLY
@pytest.mark.parametrize("mode", ["4bit", "8bit"])
def test_quantized_modes_run_on_cpu_beside_an_unquantized_baseline(tmp_path, cache_dir, fake_reference, mode):
    """`make bench MODE=4bit|8bit` on the toy shape: every row twice, unquantized (float32 on a CPU) and in `mode`,
    each in its own process (so each peak memory is its own), and the table and JSON put them side by side."""
    env, calls = fake_reference
    out = tmp_path / "bench.json"
    result = bench("--shape", "toy", "--mode", mode, *TINY, "--cache-dir", str(cache_dir), "--out", str(out), env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = {(row["task"], row["impl"], row["mode"]): row for row in report["rows"]}
    assert set(rows) == {(t, i, m) for t in ("ppo", "sft") for i in ("trl", "pipeline") for m in ("bf16", mode)}
    assert report["settings"]["modes"] == ["bf16", mode] and report["settings"]["isolate"] is True
    asked = [json.loads(line) for line in calls.read_text().splitlines()]
    expected = [f"{task}:trl:{precision}" for precision in ("bf16", mode) for task in ("ppo", "sft")]
    assert [call[call.index("--row") + 1] for call in asked] == expected
    assert all(row["status"] == "ok" for row in rows.values()), rows
    pipeline = {m: rows["ppo", "pipeline", m] for m in ("bf16", mode)}
    assert pipeline[mode]["shared_base"] and pipeline[mode]["reward_shared"]
    ratio = report["ratios"][f"ppo pipeline step time {mode}/fp32"]
    assert ratio == pytest.approx(pipeline[mode]["step_time_s"] / pipeline["bf16"]["step_time_s"])
    assert report["ratios"][f"sft pipeline peak memory {mode}/fp32"] > 0
    assert "ppo  pipeline  fp32" in result.stdout and f"ppo  pipeline  {mode}" in result.stdout
    assert f"{mode}/fp32: ppo trl step time 1.00" in result.stdout  # the fake TRL rows are all alike


def test_a_quantized_full_fine_tune_is_one_line():
    result = bench("--mode", "4bit", "--full", timeout=120)
    assert result.returncode == 2
    line = "error: --full trains every weight, which 4bit weights cannot: use --lora (the default)"
    assert result.stderr.strip() == line


def test_shapes_match_the_published_sizes():
    for name, shape in SHAPES.items():
        if name != "toy":
            assert parameter_count(name) / 1e9 == pytest.approx(shape.billions, rel=0.01), name


def test_timed_fast_phases_restores_the_fast_engine_and_times_rollout_passes_only(monkeypatch):
    from benchmarks.bench_ppo import Clock, timed_fast_phases
    from rlhf_trl.ppo_trainer import PPOTrainer as FastPPOTrainer

    def busy(self, *args):
        time.sleep(0.01)
        return "done"

    for name in ("_generate", "_scores", "_values"):
        monkeypatch.setattr(FastPPOTrainer, name, busy)
    before = {name: vars(FastPPOTrainer)[name] for name in ("_generate", "_scores", "_values")}
    clock = Clock(cuda=False)
    with timed_fast_phases(clock):
        assert FastPPOTrainer._values(None, "ids", 8) == "done"  # with gradients: a PPO epoch, training time
        assert clock.scoring == 0
        with torch.no_grad():  # as in the rollout
            FastPPOTrainer._values(None, "ids", 8)
            FastPPOTrainer._scores(None, "ids", 8)
        assert clock.scoring >= 0.02 and clock.generation == 0
        FastPPOTrainer._generate(None, "queries")
        assert clock.generation >= 0.01
    assert {name: vars(FastPPOTrainer)[name] for name in before} == before
    with pytest.raises(RuntimeError), timed_fast_phases(clock):
        assert vars(FastPPOTrainer)["_generate"] is not before["_generate"]
        raise RuntimeError("a failing row")
    assert {name: vars(FastPPOTrainer)[name] for name in before} == before


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


def test_engine_comparison_calls_a_gap_within_seed_noise_only_when_it_is():
    from benchmarks.compare_engines import summarise, windows

    assert windows(60) == [(0, 10), (10, 30), (30, 60)]

    def curve(score, kl, updates=12):
        return [{"objective/scores": score, "objective/kl": kl} for _ in range(updates)]

    close = summarise(
        {"trl": {0: curve(5.0, 1.0), 1: curve(5.4, 1.2)}, "ours": {0: curve(5.1, 1.1), 1: curve(5.3, 1.0)}}
    )
    assert close["verdict"]["objective/scores"] == {
        "gap": pytest.approx(0.0),
        "seed_spread": pytest.approx(0.4),
        "within_noise": True,
    }
    apart = summarise(
        {"trl": {0: curve(5.0, 1.0), 1: curve(5.1, 1.0)}, "ours": {0: curve(3.0, 1.0), 1: curve(3.1, 1.0)}}
    )
    assert not apart["verdict"]["objective/scores"]["within_noise"] and apart["verdict"]["objective/kl"]["within_noise"]
    assert apart["runs"]["ours 1"]["windows"] == ["1-2", "3-6", "7-12"]


def test_engine_comparison_without_the_recipes_models_says_what_to_run(tmp_path):
    result = bench("--recipe", "qwen2.5-0.5b", "--models", str(tmp_path), module="benchmarks.compare_engines")
    assert result.returncode == 2 and result.stderr.strip() == (
        f"error: {tmp_path}/qwen2.5-0.5b/sft is not finished: run `make sft RECIPE=qwen2.5-0.5b`"
    )


def test_engine_comparison_without_the_reference_environment_says_what_to_run(tmp_path):
    for stage in ("sft", "reward"):  # finished stage outputs, as far as the check looks
        (tmp_path / "demo" / stage).mkdir(parents=True)
        (tmp_path / "demo" / stage / "rlhf_trl_run.json").write_text("{}")
    missing = tmp_path / "no-venv" / "python"
    env = {**ENV, "RLHF_TRL_REFERENCE_PYTHON": str(missing)}
    result = bench("--models", str(tmp_path), module="benchmarks.compare_engines", env=env)
    assert result.returncode == 2 and result.stderr.strip() == (
        f"error: TRL 1.12's side runs in the reference environment and {missing} does not exist: run "
        "`make reference-env` first (or set RLHF_TRL_REFERENCE_PYTHON)"
    )
    assert "engines:" not in result.stdout
