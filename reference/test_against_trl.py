"""Our PPO engine against TRL 1.12's PPOTrainer, the reference it must agree with (runs in .venv-reference).

With separate models (`shared_base: false`) our engine computes TRL's update on other code paths (chunked
log-probs from hidden states, rollouts without generation scores, two backward passes): the same seed, prompts
and models must give TRL's metrics step for step and the same trained weights. Ours runs as the product runs it
(`python -m rlhf_trl.ppo`), TRL's through `reference/trl_ppo.py` on the same recipe and overrides, which builds
the roles with the stage's own helpers. With the shared base (the recipes' setting) the value model is an adapter
and a head instead of a full copy, so only a statistical comparison is left: `make bench-engines`.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhf_trl.metrics_log import read_metrics

from .conftest import OFFLINE_ENV, ROOT, ppo_args, run_reference, run_stage
from .engines import our_engine, trl_engine

COMPARED = ("objective/scores", "objective/kl", "objective/entropy", "loss/policy_avg", "loss/value_avg", "val/ratio")


def trained_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    """The saved policy's weights: its LoRA adapter, or the whole model after a full fine-tune."""
    folder = Path(folder)
    adapter = folder / "adapter_model.safetensors"
    return load_file(adapter if adapter.is_file() else folder / "model.safetensors")


@pytest.mark.parametrize("training", ["lora", "full"])
def test_our_engine_takes_trls_steps_with_separate_models(training, sft_and_reward, tmp_path):
    """Per step: reward-model scores, KL, entropy, policy and value losses and the probability ratio; at the end the
    trained adapter (LoRA) or model (full fine-tune). A full fine-tune's reference is TRL's frozen copy: a KL stuck
    at 0 would mean the policy was its own reference."""
    settings = ["--shared_base", "false", "--logging_steps", "1", "--save_strategy", "no"]
    settings += ["--use_peft", str(training == "lora").lower(), "--logprob_chunk_tokens", "100"]
    runs = {}
    for engine in ("ours", "trl"):
        paths = {**sft_and_reward, "ppo": str(tmp_path / engine)}
        if engine == "ours":
            result = run_stage("ppo", *ppo_args(paths, *settings), timeout=600)  # a busy 2-core machine
        else:
            result = run_reference(
                "trl_ppo", "--config", str(ROOT / "recipes/demo/ppo.yaml"), *ppo_args(paths, *settings)
            )
        assert result.returncode == 0, f"{engine}:\n{result.stderr[-3000:]}"
        runs[engine] = read_metrics(paths["ppo"])
    assert len(runs["trl"]) == len(runs["ours"]) == 4  # 64 episodes, 16 a step
    assert any(abs(step["objective/kl"]) > 1e-4 for step in runs["ours"]), "the policy moved away from its reference"
    for step, (trl, ours) in enumerate(zip(runs["trl"], runs["ours"], strict=True), start=1):
        for key in COMPARED:
            assert ours[key] == pytest.approx(trl[key], rel=2e-3, abs=2e-4), f"step {step}: {key}"

    ours, trl = trained_weights(tmp_path / "ours"), trained_weights(tmp_path / "trl")
    assert ours.keys() == trl.keys()
    if training == "lora":  # LoRA's B starts at zero: how far it went is all of it
        start = {name: torch.zeros_like(value) if "lora_B" in name else value for name, value in trl.items()}
        assert any("lora_B" in name for name in trl)
    else:
        start = load_file(Path(sft_and_reward["sft"]) / "model.safetensors")
        assert start.keys() == trl.keys()
    moved = sum((trl[name] - start[name]).norm() ** 2 for name in trl) ** 0.5
    apart = sum((ours[name] - trl[name]).norm() ** 2 for name in trl) ** 0.5
    assert moved > 1e-3, "training changed the weights"
    assert apart < 1e-2 * moved, f"ours ended {apart:.2e} from TRL's weights, which moved {moved:.2e}"


TINY = ("--batch", "4", "--prompt-length", "8", "--response-length", "8", "--ppo-epochs", "2", "--steps", "2")


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the toy run is not what make bench runs")
def test_bench_toy_rows_of_our_engine_with_separate_models_and_trl_take_the_same_steps(tmp_path):
    """`make bench --no-shared-base`: the pipeline row (our engine, on the trl row's reward model) computes TRL's
    update, step by step, and trains the same adapter; here with checkpointing on, which TRL's PPOTrainer ignores
    and ours turns on, and which must not change what is computed. TRL's row runs in a child of this environment."""
    out, saved = tmp_path / "bench.json", tmp_path / "policies"
    args = ["--shape", "toy", *TINY, "--no-shared-base", "--tasks", "ppo", "--gradient-checkpointing"]
    args += ["--cache-dir", str(tmp_path / "cache"), "--out", str(out), "--save-policy", str(saved)]
    env = {**OFFLINE_ENV, "RLHF_TRL_REFERENCE_PYTHON": sys.executable, "TRL_EXPERIMENTAL_SILENCE": "1"}
    command = [sys.executable, "-m", "benchmarks.bench_ppo", *args]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {(row["task"], row["impl"]): row for row in json.loads(out.read_text())["rows"]}
    assert set(rows) == {("ppo", "trl"), ("ppo", "pipeline")}
    trl, pipeline = rows["ppo", "trl"], rows["ppo", "pipeline"]
    assert trl["status"] == pipeline["status"] == "ok"
    assert trl["trainer"] == "trl.experimental.ppo.ppo_trainer.PPOTrainer"  # TRL's own class
    assert trl["versions"] == {"trl": "1.12.0", "transformers": "5.23.0"}
    engine = our_engine()[1]
    assert pipeline["trainer"] == f"{engine.__module__}.{engine.__name__}"
    assert pipeline["shared_base"] is False and pipeline["reward_shared"] is False
    assert pipeline["gradient_checkpointing_active"] and not trl["gradient_checkpointing_active"]
    assert len(trl["logs"]) == len(pipeline["logs"]) == 3  # one warm-up step and two timed
    assert trl["logs"][0]["objective/kl"] == pytest.approx(0, abs=1e-4), "both start at their reference"
    for step, (theirs, ours) in enumerate(zip(trl["logs"], pipeline["logs"], strict=True), start=1):
        for key in ("objective/scores", "objective/kl", "loss/policy_avg", "loss/value_avg"):
            assert ours[key] == pytest.approx(theirs[key], rel=1e-3, abs=1e-5), f"step {step}: {key}"
    ours, theirs = trained_weights(saved / "pipeline"), trained_weights(saved / "trl")
    assert ours.keys() == theirs.keys() and any("lora_B" in name for name in theirs)
    for name, value in theirs.items():
        if "lora_B" in name:
            assert value.abs().max() > 0, f"{name} never left zero"
        torch.testing.assert_close(ours[name], value, rtol=1e-3, atol=1e-5, msg=name)
    assert "separate value and reward models; reward: random full classifier" in result.stdout
    assert "trl rows: TRL 1.12.0, transformers 5.23.0 (the reference environment)" in result.stdout


def test_timed_phases_restores_trls_functions():
    from benchmarks.bench_ppo import Clock, timed_phases

    module = sys.modules[trl_engine()[1].__module__]
    before = (module.batch_generation, module.get_reward)
    with pytest.raises(RuntimeError), timed_phases(Clock(cuda=False)):
        assert module.get_reward is not before[1]
        raise RuntimeError("a failing row")
    assert (module.batch_generation, module.get_reward) == before


def test_trls_4bit_cast_breaks_generate_and_either_fix_mends_it():
    """reference/repro_4bit_dtype.py, the cause of plain TRL's 4-bit PPO failure (benchmarks/NOTES.md)."""
    result = run_reference("repro_4bit_dtype", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0] == (
        "generate after TRL's cast: RuntimeError: mat1 and mat2 must have the same dtype, but got Float and BFloat16"
    )
    assert lines[1].startswith("fix 1, generate under autocast: tensor([5, 6, 7,")
    assert lines[2].startswith("fix 2, norms back in bf16: tensor([5, 6, 7,")


def test_the_trl_runner_keeps_a_folder_it_did_not_write(sft_and_reward, tmp_path):
    paths = {**sft_and_reward, "ppo": str(tmp_path / "taken")}
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    result = run_reference("trl_ppo", "--config", str(ROOT / "recipes/demo/ppo.yaml"), *ppo_args(paths))
    assert result.returncode == 2 and result.stderr.strip() == (
        f"error: {tmp_path / 'taken'} is not empty: pass --overwrite true to replace it, or another --output_dir"
    )
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"
