"""SFT, reward and PPO in 2 processes (CPU, gloo: recipes/accelerate_configs/multi_cpu.yaml), as `make <stage>
ACCELERATE_CONFIG=...` runs them, against the same stages in 1 process configured to the same global batch
(16 = 2 x 8 = 1 x 16). Run by `make test-distributed` (about 2 minutes on 2 cores), not by `make test`.

What must hold: each 2-process output is published once, by the main process, and reloads; the two runs take
the same number of optimizer steps over the same global batches (the data is sharded, not duplicated: SFT and
reward see the same tokens per step); the metrics, gathered across ranks, are written once.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import (
    OFFLINE_ENV,
    ROOT,
    kill_launch_when,
    launch,
    ppo_args,
    reward_args,
    sft_args,
    stage_paths,
)
from test_stages import lora_b_weights

from rlhf_trl.metrics_log import read_metrics
from rlhf_trl.modeling import generate, load_model, load_tokenizer
from rlhf_trl.outputs import read_marker

pytestmark = pytest.mark.distributed
GLOBAL_BATCH = 16
STAGES = {  # the conftest arguments, shortened further: enough steps to compare, few enough to stay quick
    "sft": (sft_args, ["--max_steps", "10", "--logging_steps", "2"]),
    "reward": (reward_args, ["--max_steps", "6", "--logging_steps", "2"]),
    "ppo": (ppo_args, ["--total_episodes", "64", "--logging_steps", "1"]),
}
SUMMARY = {"sft": "sft: held-out loss", "reward": "reward: held-out pairwise accuracy", "ppo": "ppo: saved to"}


@pytest.fixture(scope="module")
def runs(world) -> dict[int, dict[str, str]]:
    """The SFT -> reward -> PPO chain once per process count, each stage at a global batch of 16."""
    chains = {}
    for processes, config in ((1, "single_process"), (2, "multi_cpu")):
        paths = stage_paths(world, tag=f"_{processes}proc")
        per_device = str(GLOBAL_BATCH // processes)
        for stage, (stage_args, extra) in STAGES.items():
            batch = ["--per_device_train_batch_size", per_device]
            if stage == "ppo":
                batch += ["--local_rollout_forward_batch_size", per_device]
            result = launch(config, stage, *stage_args(paths), *extra, *batch)
            assert result.returncode == 0, f"{stage} x{processes}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
            paths[f"{stage}_stdout"] = result.stdout
        chains[processes] = paths
    return chains


@pytest.mark.parametrize("stage", list(STAGES))
def test_two_processes_take_the_same_steps_over_the_same_global_batch(runs, stage):
    one, two = (read_marker(runs[n][stage]) for n in (1, 2))
    assert (one["processes"], two["processes"]) == (1, 2)
    assert one["global_batch"] == two["global_batch"] == GLOBAL_BATCH
    assert one["steps"] == two["steps"] > 0
    if stage == "ppo":
        assert one["episodes"] == two["episodes"] == 64  # 4 rollouts of 16 prompts
    logged = {n: read_metrics(runs[n][stage]) for n in (1, 2)}
    assert [r["step"] for r in logged[1]] == [r["step"] for r in logged[2]], "one metrics line per logged step"
    if stage == "ppo":
        assert [r["episode"] for r in logged[2]] == [16, 32, 48, 64]
    else:
        # Each global batch is split between the ranks, not repeated: the tokens seen (summed over ranks) match.
        tokens = {n: [r["num_tokens"] for r in logged[n] if "num_tokens" in r] for n in (1, 2)}
        assert tokens[1] and tokens[1] == tokens[2]


def test_ppo_curves_match_the_one_process_run(runs):
    """The same prompts per update (the shuffled order is shared, then split), sampled by other random streams:
    the 2-process curves follow the 1-process ones within sampling noise, and both processes trained the same
    weights (the trainer checks that its replicas agree at the end, and says so)."""
    logged = {n: read_metrics(runs[n]["ppo"]) for n in (1, 2)}
    for key, tolerance in (("objective/scores", 0.5), ("objective/kl", 0.5), ("loss/value_avg", 1.0)):
        one, two = ([r[key] for r in logged[n]] for n in (1, 2))
        assert sum(two) / 4 == pytest.approx(sum(one) / 4, abs=tolerance), (key, one, two)
    assert "ppo: the 2 processes hold the same trained weights" in runs[2]["ppo_stdout"]


def test_sft_losses_match_the_one_process_run(runs):
    """Same examples per step and gradients averaged across ranks: the training curve is the same one."""
    losses = {n: [r["loss"] for r in read_metrics(runs[n]["sft"]) if "loss" in r] for n in (1, 2)}
    assert len(losses[1]) == len(losses[2]) == 5
    assert losses[1] == pytest.approx(losses[2], abs=1e-2)


@pytest.mark.parametrize("stage", list(STAGES))
def test_the_main_process_alone_publishes_and_reports(runs, stage):
    out = Path(runs[2][stage])
    assert runs[2][f"{stage}_stdout"].count(SUMMARY[stage]) == 1, "only the main process prints the summary"
    assert not out.with_name(out.name + ".partial").exists()
    assert not list(out.glob("checkpoint-*")) and (out / "metrics.jsonl").is_file()
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith(stage)) == [stage]


def test_two_process_outputs_reload_and_work(runs):
    paths = runs[2]
    base, sft = load_model(paths["base"]), load_model(paths["sft"])
    assert all(not torch.equal(a, b) for a, b in zip(base.parameters(), sft.parameters(), strict=True))

    from transformers import AutoModelForSequenceClassification

    reward = load_model(paths["reward"], AutoModelForSequenceClassification, {"num_labels": 1}).eval()
    with torch.no_grad():
        assert torch.isfinite(reward(torch.tensor([[5, 17, 42, 99, 1]])).logits).all()

    assert all(t.abs().sum() > 0 for t in lora_b_weights(paths["ppo"]).values()), "the PPO adapter trained"
    policy = load_model(paths["ppo"])
    answer = generate(policy, load_tokenizer(paths["ppo"]), [[{"role": "user", "content": "What is a tiger?"}]])
    assert answer[0].strip()
    marker = json.loads((Path(paths["ppo"]) / "rlhf_trl_run.json").read_text())
    assert marker["base"] == paths["sft"] and marker["reward_model"] == paths["reward"]


def test_processes_without_their_gpus_stop_instead_of_training_alone(world, tmp_path):
    """`accelerate launch --multi_gpu` by hand on a machine without GPUs: torchrun starts 2 processes that never
    join one group; each would train alone and write the same output. The stage refuses in each instead."""
    if torch.cuda.device_count() >= 2:
        pytest.skip("this machine has the GPUs")
    paths = {**stage_paths(world), "sft": str(tmp_path / "sft")}
    command = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--multi_gpu"]
    command += ["--num_processes", "2", "-m", "rlhf_trl.sft", "--config", str(ROOT / "recipes/demo/sft.yaml")]
    result = subprocess.run(
        [*command, *sft_args(paths)], cwd=ROOT, env=OFFLINE_ENV, capture_output=True, text=True, timeout=300
    )
    assert result.returncode != 0
    assert "0 usable CUDA GPU(s): use recipes/accelerate_configs/single_process.yaml" in result.stderr
    assert not (tmp_path / "sft").exists() and not (tmp_path / "sft.partial").exists()


def test_two_process_ppo_killed_after_a_checkpoint_resumes_to_the_same_result(runs, tmp_path):
    """Every rank's RNG, its shard's place in the prompt order and the shared optimizer come back: the resumed
    2-process run ends with the uninterrupted one's metrics and adapter."""
    from safetensors.torch import load_file

    reference = runs[2]
    paths = {**reference, "ppo": str(tmp_path / "ppo")}
    args = [*ppo_args(paths), *STAGES["ppo"][1], "--per_device_train_batch_size", "8"]
    args += ["--local_rollout_forward_batch_size", "8", "--save_steps", "1"]
    kill_launch_when((tmp_path / "ppo.partial/checkpoint-2/trainer_state.json").is_file, "multi_cpu", "ppo", *args)
    assert read_marker(paths["ppo"]) is None

    result = launch("multi_cpu", "ppo", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ppo: resuming from" in result.stdout

    def curve(run):
        keys = ("step", "episode", "objective/scores", "objective/kl", "loss/value_avg")
        return [{k: r[k] for k in keys if k in r} for r in read_metrics(run)]

    assert curve(paths["ppo"]) == curve(reference["ppo"])
    resumed, uninterrupted = (
        load_file(str(Path(run) / "adapter_model.safetensors")) for run in (paths["ppo"], reference["ppo"])
    )
    for name, tensor in uninterrupted.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
