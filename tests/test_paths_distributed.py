"""DeepSpeed ZeRO-2, ZeRO-3 and FSDP2 run for real: each training stage in 2 CPU processes with the project's own
recipes/accelerate_configs/{zero2,zero3,fsdp}.yaml, as `make <stage> ACCELERATE_CONFIG=...` runs them, against the
same stage in 1 process at the same global batch (8 = 2 x 4 = 1 x 8), started from the same inputs (the 1-process
SFT and reward outputs). Run by `make test-paths` (marker paths), which installs the `deepspeed` extra.

What must hold: the same number of optimizer steps; the deterministic losses (sft, reward, dpo) step for step, the
sampled scores (rloo, grpo, ppo) within sampling noise; the output is published once and reloads and generates;
and a ZeRO-2 PPO run killed after a checkpoint resumes to the uninterrupted run's adapter.

No stage code here knows it runs on a CPU: rlhf_trl.launch picks the gloo backend for processes without a GPU. The
one thing only a test needs is FSDP on a CPU, which accelerate applies to GPUs alone: the test environment sets
launch.FSDP_ON_CPU, and the stages relabel accelerate's process state (launch.check_stage); users get a refusal.
"""

from pathlib import Path

import pytest
import torch
from conftest import (
    OFFLINE_ENV,
    group_args,
    kill_launch_when,
    launch,
    ppo_args,
    reward_args,
    sft_args,
    stage_paths,
)
from safetensors.torch import load_file
from test_dpo import dpo_args
from test_stages import lora_b_weights

from rlhf_trl.launch import FSDP_ON_CPU
from rlhf_trl.metrics_log import read_metrics
from rlhf_trl.modeling import generate, load_model, load_tokenizer
from rlhf_trl.outputs import read_marker

pytestmark = pytest.mark.paths
GLOBAL_BATCH = 8
ENV = {**OFFLINE_ENV, FSDP_ON_CPU: "1"}
CHAIN = ("sft", "reward", "dpo", "rloo", "grpo", "ppo")


def stage_args(stage: str, paths: dict, per_device: int) -> list[str]:
    """The conftest arguments of `stage`, shortened to a few steps at `per_device` x processes = GLOBAL_BATCH, on a
    few records (each process tokenizes them all), and at full learning rate from the first step (no warm-up), so
    processes that trained apart would log other losses."""
    batch = ["--per_device_train_batch_size", str(per_device), "--max_train_samples", "64"]
    if stage == "sft":
        return [*sft_args(paths), "--max_steps", "6", "--logging_steps", "2", "--warmup_steps", "0", *batch]
    if stage == "reward":
        return [*reward_args(paths), "--max_steps", "6", "--logging_steps", "2", "--warmup_steps", "0", *batch]
    if stage == "dpo":
        return [*dpo_args(paths, paths["dpo"]), "--max_steps", "4", "--warmup_steps", "0", *batch]
    if stage in ("rloo", "grpo"):  # 2 prompts x 4 answers per step
        return [*group_args(stage)(paths), "--max_steps", "3", *batch]
    # ppo: 2 updates of 8 rollouts
    return [*ppo_args(paths), "--total_episodes", "16", "--logging_steps", "1", *batch,
            "--local_rollout_forward_batch_size", str(per_device)]  # fmt: skip


# A 4-bit base with LoRA on every linear layer, as recipes/llama3.1-8b-qlora trains it.
FOUR_BIT = ("--load_in_4bit", "true", "--use_peft", "true", "--lora_r", "8", "--lora_target_modules", "all-linear")


def run(config: str, stage: str, paths: dict, processes: int, extra: tuple = ()) -> dict:
    result = launch(config, stage, *stage_args(stage, paths, GLOBAL_BATCH // processes), *extra, env=ENV)
    assert result.returncode == 0, f"{stage} {config}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return {"out": paths[stage], "stdout": result.stdout}


@pytest.fixture(scope="module")
def runs(world):
    """`runs(config, stage)`: `stage` under `config` (single_process: 1 process, else 2), run once on first use. Every
    run starts from the 1-process outputs of the stages before it (sft, reward), run first when missing."""
    done = {}

    def get(config: str, stage: str, four_bit: bool = False) -> dict:
        if (config, stage, four_bit) not in done:
            paths = stage_paths(world, tag=f"_paths_{config}{'_4bit' if four_bit else ''}")
            for earlier in ("sft", "reward")[: CHAIN.index(stage)]:
                paths[earlier] = get("single_process", earlier)["out"]
            processes = 1 if config == "single_process" else 2
            done[config, stage, four_bit] = run(config, stage, paths, processes, FOUR_BIT if four_bit else ())
        return done[config, stage, four_bit]

    return get


def values(out: str, key: str) -> list[float]:
    return [record[key] for record in read_metrics(out) if key in record]


# What each stage logs that must agree with the 1-process run, and how closely: the same examples per step and
# gradients averaged over the ranks give the same losses; sampled answers differ between the runs (each rank samples
# its share with its own random stream), so their mean score agrees only within noise.
COMPARED = {
    "sft": ("loss", 1e-3),
    "reward": ("loss", 1e-3),
    "dpo": ("loss", 1e-2),  # its NLL term is a token mean within each rank, then averaged over the ranks
    "rloo": ("reward", 0.5),
    "grpo": ("reward", 0.5),
    "ppo": ("objective/scores", 0.5),
}
# Every stage under ZeRO-2, ZeRO-3 and FSDP2, but PPO under ZeRO-3 and FSDP, which is refused (rlhf_trl.launch.check
# says why; tests/test_launch.py).
MATRIX = [("zero2", stage) for stage in CHAIN] + [
    (config, stage) for config in ("zero3", "fsdp") for stage in CHAIN if stage != "ppo"
]


@pytest.mark.parametrize(("config", "stage"), MATRIX)
def test_two_processes_match_one_at_the_same_global_batch(runs, config, stage):
    one, two = runs("single_process", stage), runs(config, stage)
    marks = read_marker(one["out"]), read_marker(two["out"])
    assert (marks[0]["processes"], marks[1]["processes"]) == (1, 2)
    assert marks[0]["global_batch"] == marks[1]["global_batch"] == GLOBAL_BATCH
    assert marks[0]["steps"] == marks[1]["steps"] > 0
    key, tolerance = COMPARED[stage]
    curves = values(one["out"], key), values(two["out"], key)
    assert curves[0] and len(curves[0]) == len(curves[1]), (key, curves)
    if tolerance < 0.1:
        assert curves[1] == pytest.approx(curves[0], abs=tolerance), (key, curves)
        # Each global batch is split between the ranks, not repeated: the tokens seen (summed over ranks) match.
        tokens = values(one["out"], "num_tokens"), values(two["out"], "num_tokens")
        assert tokens[0] == tokens[1]
    else:
        assert sum(curves[1]) / len(curves[1]) == pytest.approx(sum(curves[0]) / len(curves[0]), abs=tolerance)
    if stage != "sft":  # a LoRA adapter: every B matrix trained away from its zeros (and was gathered to be saved)
        trained = lora_b_weights(two["out"])
        assert trained and all(t.numel() and t.abs().sum() > 0 for t in trained.values())
    assert sum(stage in line for line in two["stdout"].splitlines() if "saved to" in line) == 1, "published once"
    assert not Path(two["out"] + ".partial").exists()
    works(stage, two["out"])


@pytest.mark.parametrize("config", ["multi_cpu", "zero2", "fsdp"])
def test_a_4bit_base_with_lora_trains_in_two_processes_as_in_one(runs, config):
    """QLoRA past one device: DDP and ZeRO-2 keep a whole 4-bit base on each process, FSDP2 shards the LoRA tensors
    and leaves the frozen 4-bit ones whole. Same steps and (deterministic) losses as 1 process at the same global
    batch; the adapter is saved once, gathered whole, and reloads and answers."""
    one, two = runs("single_process", "sft", four_bit=True), runs(config, "sft", four_bit=True)
    assert "load_in_4bit" in two["stdout"]  # the CPU note: the base really was quantized in these processes
    marks = read_marker(one["out"]), read_marker(two["out"])
    assert (marks[0]["processes"], marks[1]["processes"]) == (1, 2)
    assert marks[0]["steps"] == marks[1]["steps"] > 0
    curves = values(one["out"], "loss"), values(two["out"], "loss")
    assert curves[0] and curves[1] == pytest.approx(curves[0], abs=1e-3), curves
    adapters = lora_b_weights(one["out"]), lora_b_weights(two["out"])
    assert adapters[1].keys() == adapters[0].keys() and adapters[0]
    for name, tensor in adapters[0].items():  # whole (not a rank's shard) and trained away from zero
        assert adapters[1][name].shape == tensor.shape and adapters[1][name].abs().sum() > 0, name
    assert sum("saved to" in line for line in two["stdout"].splitlines()) == 1, "published once"
    works("sft", two["out"])


def works(stage: str, out: str) -> None:
    """The output reloads in one process and answers (the reward model: scores)."""
    if stage == "reward":
        from transformers import AutoModelForSequenceClassification

        reward = load_model(out, AutoModelForSequenceClassification, {"num_labels": 1}).eval()
        with torch.no_grad():
            assert torch.isfinite(reward(torch.tensor([[5, 17, 42, 99, 1]])).logits).all()
        return
    answer = generate(load_model(out), load_tokenizer(out), [[{"role": "user", "content": "What is a tiger?"}]])
    assert answer[0].strip()


def test_zero2_ppo_killed_after_a_checkpoint_resumes_to_the_uninterrupted_adapter(world, runs):
    """DeepSpeed's own checkpoint holds each process's optimizer shard; with the RNG states and the trainable tensors
    the resumed run ends where the uninterrupted one (`runs`) ends."""
    reference = runs("zero2", "ppo")["out"]
    paths = stage_paths(world, tag="_paths_resume") | {
        key: runs("single_process", key)["out"] for key in ("sft", "reward")
    }
    args = [*stage_args("ppo", paths, GLOBAL_BATCH // 2), "--save_steps", "1"]
    kill_launch_when(Path(paths["ppo"] + ".partial/checkpoint-1/trainer_state.json").is_file, "zero2", "ppo", *args,
                     env=ENV)  # fmt: skip
    assert read_marker(paths["ppo"]) is None
    result = launch("zero2", "ppo", *args, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ppo: resuming from" in result.stdout
    keys = ("step", "episode", "objective/scores", "objective/kl", "loss/value_avg")
    assert [{k: r[k] for k in keys if k in r} for r in read_metrics(paths["ppo"])] == [
        {k: r[k] for k in keys if k in r} for r in read_metrics(reference)
    ]
    resumed, uninterrupted = (
        load_file(str(Path(out) / "adapter_model.safetensors")) for out in (paths["ppo"], reference)
    )
    assert resumed.keys() == uninterrupted.keys()
    for name, tensor in uninterrupted.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
