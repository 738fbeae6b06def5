"""The launch checks (rlhf_trl.launch): plans that cannot work stop with one line that says what to change,
before accelerate starts any process. Fast: nothing here trains."""

import importlib.util
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import OFFLINE_ENV, ROOT

from rlhf_trl.cli import UserError
from rlhf_trl.launch import Plan, check, plan_from_config, plan_from_environment, recipe_settings

CONFIGS = ROOT / "recipes/accelerate_configs"
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
NO_QUANT = SimpleNamespace(load_in_4bit=False, load_in_8bit=False)
FOUR_BIT = SimpleNamespace(load_in_4bit=True, load_in_8bit=False)


def launch(config: str, *stage_args: str, module: str = "rlhf_trl.sft", launch_args=()) -> subprocess.CompletedProcess:
    """What `make <stage> ACCELERATE_CONFIG=... LAUNCH_ARGS=...` runs."""
    return subprocess.run(
        [sys.executable, "-m", "rlhf_trl.launch", "--quiet", "--config_file", str(CONFIGS / f"{config}.yaml")]
        + [*launch_args, "-m", module, *stage_args],
        cwd=ROOT,
        env=OFFLINE_ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    return lines[0]


def test_more_processes_than_gpus_names_the_fix():
    plan = plan_from_config(CONFIGS / "multi_gpu.yaml")
    with pytest.raises(UserError, match=r"2 process\(es\) per machine.*0 usable CUDA GPU.*single_process.yaml"):
        check(plan, cuda_devices=0)
    with pytest.raises(UserError, match=r'1 usable CUDA GPU.*LAUNCH_ARGS="--num_processes 1"'):
        check(plan, cuda_devices=1)
    check(plan, cuda_devices=2)
    check(plan_from_config(CONFIGS / "multi_node.yaml"), cuda_devices=8)  # 16 over 2 machines: 8 per machine
    with pytest.raises(UserError, match="per machine"):
        check(plan_from_config(CONFIGS / "single_gpu.yaml"), cuda_devices=0)
    check(plan_from_config(CONFIGS / "single_process.yaml"), cuda_devices=0)  # the default falls back to the CPU
    check(plan_from_config(CONFIGS / "multi_cpu.yaml"), cuda_devices=0)


@pytest.mark.skipif(torch.cuda.device_count() >= 2, reason="this machine has the GPUs multi_gpu.yaml asks for")
def test_make_refuses_more_processes_than_gpus_before_launching():
    line = one_line_error(launch("multi_gpu", "--config", "recipes/demo/sft.yaml"))
    assert "--num_processes" in line or "single_process.yaml" in line


@pytest.mark.skipif(HAS_DEEPSPEED, reason="deepspeed is installed here")
def test_deepspeed_without_the_extra():
    line = one_line_error(launch("zero2", "--config", "recipes/demo/sft.yaml"))
    assert "pip install -e '.[deepspeed]'" in line
    with pytest.raises(UserError, match=r"pip install -e '\.\[deepspeed\]'"):
        check(Plan(distributed_type="DEEPSPEED", num_processes=2, zero_stage=2), "sft", NO_QUANT, cuda_devices=2)


@pytest.mark.skipif(HAS_DEEPSPEED, reason="deepspeed is installed here")
def test_a_stage_launched_by_hand_for_deepspeed_stops_before_parsing(tmp_path):
    """accelerate launch sets these for a DeepSpeed config; transformers would otherwise fail with a traceback."""
    env = {**OFFLINE_ENV, "ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}
    result = subprocess.run(
        [sys.executable, "-m", "rlhf_trl.sft", "--config", "recipes/demo/sft.yaml", "--output_dir", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "pip install -e '.[deepspeed]'" in one_line_error(result)


def test_a_4bit_base_under_zero3_says_what_to_change():
    line = one_line_error(launch("zero3", "--config", "recipes/llama3.1-8b-qlora/sft.yaml"))
    assert "load_in_4bit" in line and "zero2.yaml" in line and "load_in_4bit: false" in line
    eight_bit = SimpleNamespace(load_in_4bit=False, load_in_8bit=True)
    with pytest.raises(UserError, match="load_in_8bit"):
        check(plan_from_config(CONFIGS / "zero3.yaml"), "reward", eight_bit, cuda_devices=2)
    # DDP and ZeRO-2 keep a quantized copy per process; FSDP2 shards the LoRA tensors around it
    # (tests/test_paths_distributed.py runs all three in 2 processes).
    for config in ("multi_gpu", "zero2", "fsdp"):
        try:
            check(plan_from_config(CONFIGS / f"{config}.yaml"), "sft", FOUR_BIT, cuda_devices=2)
        except UserError as refused:  # without the deepspeed extra (make test): that, and not the 4-bit base
            assert config == "zero2" and not HAS_DEEPSPEED and "load_in_4bit" not in str(refused), str(refused)


def test_ppo_under_zero3_is_refused_and_zero2_is_not():
    line = one_line_error(launch("zero3", "--config", "recipes/demo/ppo.yaml", module="rlhf_trl.ppo"))
    assert "zero2.yaml or multi_gpu.yaml" in line
    with pytest.raises(UserError, match="PPO does not run under DeepSpeed ZeRO-3"):
        check(Plan(distributed_type="DEEPSPEED", zero_stage=3), "ppo", NO_QUANT)
    if HAS_DEEPSPEED:
        check(Plan(distributed_type="DEEPSPEED", num_processes=2, zero_stage=2), "ppo", FOUR_BIT, cuda_devices=2)


def test_ppo_checkpoints_under_zero2_are_allowed():
    """DeepSpeed's own checkpoint holds each process's optimizer shard (tests/test_paths_distributed.py resumes one)."""
    saving = SimpleNamespace(load_in_4bit=False, load_in_8bit=False, save_strategy="steps")
    if HAS_DEEPSPEED:
        check(Plan(distributed_type="DEEPSPEED", num_processes=2, zero_stage=2), "ppo", saving, cuda_devices=2)
    assert recipe_settings(["--config", "recipes/demo/ppo.yaml"]).save_strategy == "steps"
    assert recipe_settings(["--config", "recipes/demo/ppo.yaml", "--save_strategy", "no"]).save_strategy == "no"


def test_a_sharded_config_given_one_process_says_what_to_change():
    """Sharding over one process saves nothing."""
    line = one_line_error(launch("fsdp", "--config", "recipes/demo/sft.yaml", launch_args=["--num_processes", "1"]))
    assert "over 1 process" in line and "--num_processes 2" in line and "single_process.yaml" in line
    if HAS_DEEPSPEED:
        for config in ("zero2", "zero3"):
            plan = plan_from_config(CONFIGS / f"{config}.yaml", SimpleNamespace(num_processes=1))
            with pytest.raises(UserError, match="DeepSpeed over 1 process"):
                check(plan, "sft", NO_QUANT, cuda_devices=1)
        offloading = Plan(distributed_type="DEEPSPEED", num_processes=1, zero_stage=3, offload=True)
        check(offloading, "sft", NO_QUANT, cuda_devices=1)  # one GPU with its optimizer state in RAM: a real use


@pytest.mark.skipif(torch.cuda.device_count() > 0, reason="this machine has GPUs")
def test_fsdp_without_gpus_is_refused_and_deepspeed_runs_on_the_cpu(monkeypatch):
    """accelerate skips FSDP without a GPU (each process would train alone): refused. DeepSpeed runs over gloo."""
    monkeypatch.delenv("RLHF_TRL_FSDP_ON_CPU", raising=False)
    line = one_line_error(launch("fsdp", "--config", "recipes/demo/sft.yaml"))
    assert "needs CUDA GPUs" in line and "zero2.yaml" in line
    if HAS_DEEPSPEED:
        check(plan_from_config(CONFIGS / "zero3.yaml"), "sft", NO_QUANT)
    monkeypatch.setenv("RLHF_TRL_FSDP_ON_CPU", "1")  # the test suite's switch (launch.FSDP_ON_CPU)
    check(plan_from_config(CONFIGS / "fsdp.yaml"), "sft", NO_QUANT)


def test_fsdp_config_is_fsdp2():
    plan = plan_from_config(CONFIGS / "fsdp.yaml")
    assert (plan.distributed_type, plan.fsdp_version, plan.num_processes, plan.offload) == ("FSDP", 2, 2, False)


def test_ppo_runs_in_several_processes_but_not_sharded_by_fsdp():
    """One engine now: several processes are fine (gradients averaged by hand); FSDP is refused in one line."""
    demo = recipe_settings(["--config", "recipes/demo/ppo.yaml"])
    check(Plan(distributed_type="MULTI_CPU", num_processes=2, use_cpu=True), "ppo", demo)
    check(Plan(), "ppo", demo)
    with pytest.raises(
        UserError, match=r"PPO does not run under FSDP in this pipeline \(.*\): use .*zero2.yaml or multi_gpu"
    ):
        check(Plan(distributed_type="FSDP"), "ppo", NO_QUANT, cuda_devices=2)
    with pytest.raises(UserError, match=r"PPO does not run under DeepSpeed ZeRO-3"):
        check(Plan(distributed_type="DEEPSPEED", zero_stage=3), "ppo", NO_QUANT, cuda_devices=2)


def test_recipe_settings_reads_the_recipe_and_its_overrides():
    qlora = "recipes/llama3.1-8b-qlora/sft.yaml"
    assert recipe_settings(["--config", qlora]).load_in_4bit
    assert not recipe_settings(["--config", qlora, "--load_in_4bit", "false"]).load_in_4bit
    assert recipe_settings(["--config", "recipes/demo/sft.yaml", "--load_in_8bit"]).load_in_8bit
    assert recipe_settings(["--config", "recipes/demo/sft.yaml", "--load_in_4bit=true"]).load_in_4bit
    assert not recipe_settings(["--config", "no/such.yaml"]).load_in_4bit


def test_a_missing_accelerate_config_lists_the_choices():
    line = one_line_error(launch("nope", "--config", "recipes/demo/sft.yaml"))
    assert "multi_gpu" in line and "zero3" in line


def test_plan_from_the_environment_accelerate_sets(monkeypatch):
    for name in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP", "ACCELERATE_USE_CPU", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert plan_from_environment().distributed_type == "NO"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    assert plan_from_environment() == Plan("MULTI_CPU", 2, 1, True, None, source="this accelerate launch")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    assert plan_from_environment().zero_stage == 3


@pytest.mark.parametrize("config", ["single_process", "multi_cpu"])
def test_a_stage_refusing_bad_input_exits_2_through_the_launch(config, tmp_path):
    """accelerate maps any failure of the stage to 1; `make` and the README promise 2 for bad input."""
    missing = tmp_path / "missing.jsonl"
    # Its own output_dir: a finished models/demo/sft in the checkout (after `make all`) must not answer first.
    output = ["--output_dir", str(tmp_path / "sft")]
    result = launch(config, "--config", "recipes/demo/sft.yaml", "--dataset_name", str(missing), *output)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert lines and set(lines) == {f"error: data file {missing} does not exist: check dataset_name in the recipe"
                                    " (or run `make data`)"}, result.stderr[-2000:]  # fmt: skip
    if config == "single_process":
        assert result.stderr.strip().splitlines() == lines[:1], "one process: nothing but the one line"
