"""How a stage is launched: the accelerate config, checked before accelerate starts the processes and again in each.

    python -m rlhf_trl.launch --config_file recipes/accelerate_configs/multi_gpu.yaml -m rlhf_trl.sft --config ...
    make sft ACCELERATE_CONFIG=recipes/accelerate_configs/multi_gpu.yaml    # what the Makefile runs

`make` runs every training stage through this module, which reads the accelerate config (and the two recipe keys
that matter to it, load_in_4bit/8bit), refuses a plan that cannot work with one line that says what to change
(more processes than GPUs, DeepSpeed without the extra, a ZeRO or FSDP config on one process, FSDP without a GPU,
a 4/8-bit base under ZeRO-3 or FSDP, PPO under ZeRO-3 or FSDP), and then hands over to `accelerate launch` with
the same arguments, keeping the stage's exit status (see `accelerate_launch`). Checking first matters because
accelerate otherwise fails in every process at once with a traceback, or, given more processes than GPUs on a
machine without CUDA, starts processes that never connect and each train alone on the same output directory.

Each stage calls `check_stage` first (and `cli.parse` the DeepSpeed part, before parsing), so `accelerate launch`
run by hand is checked too, against the recipe as parsed. All of them go through `check`, the one place these
rules live.

The machine, not the config, decides how the processes talk (`process_group_backend`): NCCL on GPUs, gloo without
one, so zero2.yaml and zero3.yaml run unchanged on both (on a CPU, for checking: `make test-paths`).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

from .errors import UserError, run

DEEPSPEED_EXTRA = "install the extra: pip install -e '.[deepspeed]'"
CONFIGS = "recipes/accelerate_configs"
# Set by the test suite only (tests/test_paths_distributed.py): FSDP in CPU processes. accelerate applies FSDP only
# to a GPU-like process state, so without a GPU `check_stage` relabels the state (accelerate's private state) for the
# FSDP code path to run; no one trains with FSDP on a CPU, so users get a refusal instead (`check`).
FSDP_ON_CPU = "RLHF_TRL_FSDP_ON_CPU"


@dataclass(frozen=True)
class Plan:
    """What accelerate was asked for: from a config file before launching, from the environment inside a stage."""

    distributed_type: str = "NO"  # NO, MULTI_GPU, MULTI_CPU, DEEPSPEED or FSDP
    num_processes: int = 1  # over all machines
    num_machines: int = 1
    use_cpu: bool = False
    zero_stage: int | None = None  # DeepSpeed only
    gpu_ids: str = "all"
    offload: bool = False  # DeepSpeed's offload_*_device or FSDP's offload_params: memory moved to the CPU
    fsdp_version: int | None = None  # FSDP only
    source: str = "the accelerate config"

    @property
    def local_processes(self) -> int:
        return max(1, self.num_processes // max(1, self.num_machines))

    @property
    def uses_gpus(self) -> bool:
        """A config that names GPUs: anything distributed but MULTI_CPU, or one process pinned to gpu_ids."""
        if self.use_cpu or self.distributed_type == "MULTI_CPU":
            return False
        return self.distributed_type != "NO" or self.gpu_ids not in ("all", "", None)


def _zero_stage(deepspeed: dict) -> int:
    """The ZeRO stage of an accelerate `deepspeed_config`: inline, or in the DeepSpeed JSON file it points to."""
    import json

    if deepspeed.get("deepspeed_config_file"):
        try:
            loaded = json.loads(Path(deepspeed["deepspeed_config_file"]).read_text(encoding="utf-8"))
            return int(loaded.get("zero_optimization", {}).get("stage", 2))
        except (OSError, ValueError, AttributeError):
            raise UserError(
                f"deepspeed_config_file {deepspeed['deepspeed_config_file']} is missing or not JSON: fix the path "
                "in the accelerate config"
            ) from None
    return int(deepspeed.get("zero_stage", 2))


def plan_from_config(path: str | Path, overrides: argparse.Namespace | None = None) -> Plan:
    """The Plan of an accelerate config file, with `accelerate launch` flags (LAUNCH_ARGS) taking precedence."""
    import yaml

    config_path = Path(path)
    if not config_path.is_file():
        names = ", ".join(sorted(p.stem for p in Path(CONFIGS).glob("*.yaml"))) or "none found"
        raise UserError(
            f"accelerate config {path} does not exist: set ACCELERATE_CONFIG to {CONFIGS}/<name>.yaml ({names})"
        )
    try:
        loaded = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise UserError(f"{path}: invalid YAML ({getattr(error, 'problem', error)})") from None
    if not isinstance(loaded, dict):
        raise UserError(f"{path}: must be a YAML mapping, like the files in {CONFIGS}/")
    overrides = overrides or argparse.Namespace()

    def pick(key, default):
        value = getattr(overrides, key, None)
        return value if value is not None else loaded.get(key, default)

    distributed_type = str(loaded.get("distributed_type", "NO")).upper()
    deepspeed = loaded.get("deepspeed_config") or {}
    fsdp = loaded.get("fsdp_config") or {}
    offload_devices = (deepspeed.get("offload_optimizer_device"), deepspeed.get("offload_param_device"))
    return Plan(
        distributed_type=distributed_type,
        num_processes=int(pick("num_processes", 1)),
        num_machines=int(pick("num_machines", 1)),
        use_cpu=bool(loaded.get("use_cpu", False)) or bool(getattr(overrides, "cpu", False)),
        zero_stage=_zero_stage(deepspeed) if distributed_type == "DEEPSPEED" else None,
        gpu_ids=str(pick("gpu_ids", "all")),
        offload=any(str(d).lower() not in ("none", "") for d in offload_devices if d is not None)
        or bool(fsdp.get("fsdp_offload_params", False)),
        fsdp_version=int(fsdp.get("fsdp_version", 1)) if distributed_type == "FSDP" else None,
        source=str(path),
    )


def plan_from_environment() -> Plan:
    """The Plan of this process, from the variables `accelerate launch` (or torchrun) set for it."""

    def flag(name: str) -> bool:
        return os.environ.get(name, "").lower() in ("1", "true", "yes")

    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if flag("ACCELERATE_USE_DEEPSPEED"):
        distributed_type = "DEEPSPEED"
    elif flag("ACCELERATE_USE_FSDP"):
        distributed_type = "FSDP"
    elif world > 1:
        distributed_type = "MULTI_CPU" if flag("ACCELERATE_USE_CPU") else "MULTI_GPU"
    else:
        distributed_type = "NO"
    stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    offload_devices = [
        os.environ.get(f"ACCELERATE_DEEPSPEED_OFFLOAD_{what}_DEVICE", "none") for what in ("OPTIMIZER", "PARAM")
    ]
    return Plan(
        distributed_type=distributed_type,
        num_processes=world,
        num_machines=max(1, world // max(1, local)),
        use_cpu=flag("ACCELERATE_USE_CPU"),
        zero_stage=int(stage) if stage else (2 if distributed_type == "DEEPSPEED" else None),
        offload=any(d.lower() not in ("none", "") for d in offload_devices) or flag("FSDP_OFFLOAD_PARAMS"),
        fsdp_version=int(os.environ.get("FSDP_VERSION", "1")) if distributed_type == "FSDP" else None,
        source="this accelerate launch",
    )


SHARDED_NAMES = {"DEEPSPEED": "DeepSpeed", "FSDP": "FSDP"}  # as users spell them, in messages


def process_group_backend() -> str | None:
    """The process-group backend of this machine's processes, the one place it is decided: gloo when there is no
    CUDA GPU and more than one process, else None (accelerate's own choice: NCCL on GPUs). `cli.parse` gives it to
    every stage as the default of `ddp_backend`, which the trainers' TrainingArguments (PPO's too) hand to
    accelerate's process state; so zero2.yaml and zero3.yaml run unchanged on GPUs and on a CPU (fsdp.yaml on a
    CPU only under the test suite's FSDP_ON_CPU).

    Without it, accelerate on a GPU-less machine leaves the backend unset and counts 1 process in each while
    DeepSpeed sees all of them (`deepspeed.initialize` then fails on a batch-size assertion), and FSDP processes
    each train alone."""
    import torch

    return "gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available() else None


@contextmanager
def whole_on_every_process(training_args):
    """A context in which models load whole on every process, also under ZeRO-3, whose `zero3_init_flag` otherwise
    partitions every model as it loads: for a frozen helper no trainer wraps (RLOO's and GRPO's reward model, which
    scores answers; a LoRA one is merged into its base as it loads, which partitioned weights cannot take).
    transformers partitions while its DeepSpeed config is set (accelerate's `zero3_init_context_manager` keeps the
    stage-3 config there, measured: no effect), so the config is taken away for the block and put back after."""
    plugin = getattr(training_args, "deepspeed_plugin", None)
    if plugin is None:
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()


def check(plan: Plan, stage: str | None = None, model_args=None, cuda_devices: int | None = None) -> None:
    """Refuses a plan that cannot work here, with what to change. `stage`/`model_args` add the recipe's rules,
    checked first: installing DeepSpeed or finding GPUs would not help a combination that cannot run at all."""
    sharded = plan.distributed_type in SHARDED_NAMES
    if model_args is not None:
        quantized = "load_in_4bit" if model_args.load_in_4bit else "load_in_8bit" if model_args.load_in_8bit else None
        if quantized and plan.zero_stage == 3:
            # modeling.model_kwargs places a whole quantized copy on each process's device (device_map), and ZeRO-3
            # partitions every parameter as the model loads, which bitsandbytes' packed weights do not survive.
            # FSDP2 is allowed: it shards the LoRA tensors and leaves the frozen quantized ones whole on each process
            # (make test-paths runs a 4-bit base under DDP, ZeRO-2 and FSDP2 in 2 processes).
            raise UserError(
                f"{quantized} keeps a whole quantized base on every process, which ZeRO-3 cannot partition: use "
                f"{CONFIGS}/zero2.yaml, fsdp.yaml or multi_gpu.yaml, or set `{quantized}: false` to shard the "
                "full-precision model"
            )
    if stage == "ppo" and (plan.zero_stage == 3 or plan.distributed_type == "FSDP"):
        # Measured in 2 CPU processes with the refusals lifted (docs/multi-gpu.md): ZeRO-3
        # partitions every model as it loads, and merging the reward model's LoRA into partitioned weights fails
        # in peft (a tensor of size 0 against 64); under FSDP2 accelerate wants the model prepared with the
        # optimizer, and PPO runs the policy's body, generate and the heads outside the wrapped model's forward,
        # where FSDP2 gathers the embeddings and heads. Each needs its roles rebuilt for sharding first.
        which = "DeepSpeed ZeRO-3" if plan.zero_stage == 3 else "FSDP"
        why = (
            "it partitions the models as they load and the reward adapter cannot be merged into partitioned weights"
            if plan.zero_stage == 3
            else "PPO runs its roles outside the wrapped model, where FSDP2 does not gather the weights"
        )
        raise UserError(
            f"PPO does not run under {which} in this pipeline ({why}): use {CONFIGS}/zero2.yaml or multi_gpu.yaml "
            f"for `make ppo` ({which} remains fine for sft, reward, dpo, rloo and grpo)"
        )
    if plan.distributed_type == "DEEPSPEED" and importlib.util.find_spec("deepspeed") is None:
        raise UserError(f"{plan.source} uses DeepSpeed, which is not installed: {DEEPSPEED_EXTRA}")
    if sharded and plan.num_processes == 1 and not plan.offload:
        raise UserError(
            f"{plan.source} shards the model with {SHARDED_NAMES[plan.distributed_type]} over 1 process, which "
            f'saves nothing: give it several (LAUNCH_ARGS="--num_processes 2"), or use {CONFIGS}/single_process.yaml'
        )
    if plan.uses_gpus:
        if cuda_devices is None:
            import torch

            cuda_devices = torch.cuda.device_count()
        if sharded and cuda_devices == 0:
            # No GPU: DeepSpeed runs its processes on the CPU over gloo (process_group_backend). accelerate applies
            # FSDP only on GPUs: the processes would each train alone, or drift apart, without a word.
            if plan.distributed_type == "FSDP" and not os.environ.get(FSDP_ON_CPU):
                raise UserError(
                    f"{plan.source} uses FSDP, which needs CUDA GPUs (this machine has none, and without them "
                    f"accelerate skips FSDP): use {CONFIGS}/zero2.yaml or zero3.yaml (DeepSpeed runs on the CPU), "
                    "or multi_cpu.yaml"
                )
            return
        wanted = plan.local_processes
        if plan.gpu_ids not in ("all", "", None):
            cuda_devices = min(cuda_devices, len(plan.gpu_ids.split(",")))
        if wanted > cuda_devices:
            fix = (
                f'lower num_processes (LAUNCH_ARGS="--num_processes {cuda_devices * plan.num_machines}")'
                if cuda_devices
                else f"use {CONFIGS}/single_process.yaml (or multi_cpu.yaml to try several processes on the CPU)"
            )
            raise UserError(
                f"{plan.source} starts {wanted} process(es) per machine, each on its own GPU, but this machine has "
                f"{cuda_devices} usable CUDA GPU(s): {fix}"
            )


def check_stage(stage: str, model_args, training_args=None) -> None:
    """At the start of a stage, in every process: the launch this process is part of, plus the recipe's rules.

    (`cli.parse` has already checked the launch alone, before parsing: see there.) The device check matters here
    for `accelerate launch` run by hand: several processes on a machine without the GPUs their config asks for
    would not connect, and each would train alone and overwrite the others' output.
    """
    from accelerate import PartialState
    from accelerate.utils import DistributedType

    from .modeling import check_quantization

    check_quantization(model_args)  # a 4/8-bit base without LoRA, or without bitsandbytes: before any model loads
    plan = plan_from_environment()
    settings = model_args
    if training_args is not None:  # the trainer-config rules too (PPO's checkpoints), as before launch
        save_strategy = getattr(training_args, "save_strategy", "no")
        settings = SimpleNamespace(
            load_in_4bit=model_args.load_in_4bit,
            load_in_8bit=model_args.load_in_8bit,
            save_strategy=str(getattr(save_strategy, "value", save_strategy)),
        )
    check(plan, stage, settings)
    # PartialState ignores ACCELERATE_USE_CPU (only TrainingArguments reads it); without cpu=True, CPU processes
    # launched together would each come up alone instead of joining one gloo group. (The trainers' arguments have
    # usually made it already, with the backend `cli.parse` gave them.)
    state = PartialState(cpu=plan.use_cpu, backend=process_group_backend())
    if plan.distributed_type == "FSDP" and state.distributed_type == DistributedType.NO and state.num_processes > 1:
        # Only reached with FSDP_ON_CPU (check refuses FSDP without GPUs otherwise): the processes are joined over
        # gloo but accelerate saw no GPU, so it would not apply FSDP. Labelled as multi-GPU, the Accelerator each
        # trainer builds next turns FSDP on (fully_shard works on CPU tensors).
        PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU


def recipe_settings(stage_argv: list[str]) -> SimpleNamespace:
    """load_in_4bit/load_in_8bit and save_strategy from the stage's `--config` recipe and its
    `--key value` overrides, read without TRL's parser (and the seconds it takes to import), so `check` applies the
    recipe's rules before launch.
    """
    import yaml

    values = {"load_in_4bit": False, "load_in_8bit": False}
    strings = {"save_strategy": "no"}  # the config classes' defaults
    if "--config" in stage_argv[:-1]:
        try:
            recipe = yaml.safe_load(Path(stage_argv[stage_argv.index("--config") + 1]).read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError):
            recipe = None  # the stage itself reports a missing or broken recipe, with its line
        if isinstance(recipe, dict):
            values.update({key: bool(recipe[key]) for key in values if key in recipe})
            strings.update({key: str(recipe[key]) for key in strings if key in recipe})
    for i, arg in enumerate(stage_argv):
        key = arg.removeprefix("--").split("=")[0]
        if key in values:
            value = arg.split("=", 1)[1] if "=" in arg else (stage_argv[i + 1] if i + 1 < len(stage_argv) else "")
            values[key] = value.lower() not in ("false", "0", "no")  # a bare `--load_in_4bit` means true
        if key in strings and ("=" in arg or i + 1 < len(stage_argv)):
            strings[key] = arg.split("=", 1)[1] if "=" in arg else stage_argv[i + 1]
    return SimpleNamespace(**values, **strings)


def launch_arguments(argv: list[str]) -> argparse.Namespace:
    """The accelerate flags that change the plan, out of a full `accelerate launch` argument list."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--config_file")
    parser.add_argument("--num_processes", type=int)
    parser.add_argument("--num_machines", type=int)
    parser.add_argument("--gpu_ids")
    parser.add_argument("--cpu", action="store_true")
    # Everything from the training module on belongs to the stage, whose own flags must not be read here.
    cut = next((i for i, arg in enumerate(argv) if arg in ("-m", "--module") or arg.endswith(".py")), len(argv))
    return parser.parse_known_args(argv[:cut])[0]


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    known = launch_arguments(argv)
    if not known.config_file:
        raise UserError("--config_file is required: pass ACCELERATE_CONFIG=recipes/accelerate_configs/<name>.yaml")
    plan = plan_from_config(known.config_file, known)
    at = argv.index("-m") + 1 if "-m" in argv[:-1] else len(argv)
    stage = argv[at].rsplit(".", 1)[-1] if at < len(argv) else None
    check(plan, stage, recipe_settings(argv[at + 1 :]))
    if plan.distributed_type == "MULTI_CPU" and plan.num_processes > 1 and "--mpirun_hostfile" not in argv:
        # accelerate starts MULTI_CPU processes only through mpirun; torchrun (its multi-GPU launcher) starts them
        # just as well, and ACCELERATE_USE_CPU makes them join one gloo group instead of looking for GPUs.
        argv = ["--multi_gpu", *argv]
        os.environ["ACCELERATE_USE_CPU"] = "true"
    sys.exit(accelerate_launch(argv))


def accelerate_launch(argv: list[str]) -> int:
    """Runs `accelerate launch <argv>` in this process and returns the stage's exit status, not accelerate's.

    accelerate turns any failure of the stage into status 1 (its one-process launcher exits 1 under --quiet and
    raises CalledProcessError otherwise; torchrun raises ChildFailedError), so bad input would not exit 2 through
    `make`. Here the one-process case replaces this process with the very command accelerate would run
    (`prepare_simple_launcher_cmd_env`: same interpreter, module and environment), so the stage's own status (2
    for bad input, 130 for Ctrl-C) is the launch's; a multi-process launch returns the status its failed processes
    exited with when they agree (the ones torchrun then stopped aside), else 1.
    """
    import accelerate.commands.launch as accelerate
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    def simple_launcher(args):
        command, env = accelerate.prepare_simple_launcher_cmd_env(args)
        sys.stdout.flush()
        sys.stderr.flush()
        os.execvpe(command[0], command, env)

    accelerate.simple_launcher = simple_launcher  # launch_command picks its launcher by this name
    try:
        accelerate.launch_command(accelerate.launch_command_parser().parse_args(argv))
    except ChildFailedError as error:
        # torchrun stops the other processes (SIGTERM: a negative code) once one fails: their status says nothing.
        codes = {failure.exitcode for failure in error.failures.values() if failure.exitcode > 0}
        return codes.pop() if len(codes) == 1 else 1
    return 0


if __name__ == "__main__":
    run(main)
