"""Shared fixtures: a tiny demo world built once per test session, and a runner for stage commands."""

import contextlib
import io
import json
import os
import runpy
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Tests press Ctrl-C on the stages they start. A shell's background job (`make test &`) starts with SIGINT ignored,
# which every child would inherit (an ignored signal stays ignored across exec), and those tests would wait in vain.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
# Under pytest-xdist (`make test` runs one worker per core), each worker and the stages it starts compute on one
# thread: two workers with a thread per core each would oversubscribe the cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
# In-process runs (run_here) see this process's environment: offline, like the Makefile's.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
OFFLINE_ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONUNBUFFERED": "1",
    "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
}


def run_module(
    module: str, *args: str, cwd: Path = ROOT, timeout: int = 300, prefix: tuple = (), **popen
) -> subprocess.CompletedProcess:
    """Runs `python -m rlhf_trl.<module> args...` the way the Makefile does, capturing its output.

    `prefix` goes before the interpreter (a wrapper command); `popen` reaches subprocess.run (e.g. preexec_fn).
    """
    return subprocess.run(
        [*prefix, sys.executable, "-m", f"rlhf_trl.{module}", *args],
        cwd=cwd,
        env=OFFLINE_ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
        **popen,
    )


def run_here(module: str, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """`python -m rlhf_trl.<module> args...` inside this process: the same entry point and exit status as
    `run_module`, without paying 5 s of imports per call. For commands that fail before they train."""
    stdout, stderr, argv, cwd_before = io.StringIO(), io.StringIO(), sys.argv, Path.cwd()
    sys.argv = [f"rlhf_trl.{module}", *args]
    sys.modules.pop(f"rlhf_trl.{module}", None)  # runpy runs it afresh as __main__; a stale import only confuses it
    os.chdir(cwd)
    returncode = 0
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr), warnings.catch_warnings():
            runpy.run_module(f"rlhf_trl.{module}", run_name="__main__")
    except SystemExit as exit_:
        returncode = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        sys.argv = argv
        os.chdir(cwd_before)
    return subprocess.CompletedProcess(sys.argv, returncode, stdout.getvalue(), stderr.getvalue())


def start_stage(stage: str, *args: str) -> subprocess.Popen:
    """A demo stage started in the background (stderr piped, for the reason it failed), to kill or interrupt."""
    command = [sys.executable, "-m", f"rlhf_trl.{stage}", "--config", str(ROOT / "recipes/demo" / f"{stage}.yaml")]
    return subprocess.Popen(
        [*command, *args], cwd=ROOT, env=OFFLINE_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )


def wait_until(ready, process: subprocess.Popen, timeout: float = 240) -> None:
    """Polls `ready()` while `process` runs; fails with its stderr if it ends first, or after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert process.poll() is None, f"the run ended first:\n{process.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, f"still waiting after {timeout} s"
        time.sleep(0.01)


def scratch_project(tmp_path: Path) -> Path:
    """A copy of the project (Makefile, pyproject.toml, recipes/) that links this .venv and package, for `make` runs
    that must not touch the checkout's models/ and data/. copy2 keeps pyproject.toml's time, so `make setup` there
    sees the shared .venv as up to date: a newer copy made it reinstall the package from the scratch folder, leaving
    .venv/bin/rlhf-trl pointing at a deleted interpreter."""
    project = tmp_path / "project"
    project.mkdir()
    for name in ("Makefile", "pyproject.toml", "recipes"):
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy2)(ROOT / name, project / name)
    for name in (".venv", "rlhf_trl"):
        (project / name).symlink_to(ROOT / name)
    return project


def run_stage(stage: str, *overrides: str, recipe: str = "demo", **options) -> subprocess.CompletedProcess:
    return run_module(stage, "--config", str(ROOT / "recipes" / recipe / f"{stage}.yaml"), *overrides, **options)


def launch_command(config: str, stage: str, *args: str) -> list[str]:
    """`make <stage> ACCELERATE_CONFIG=recipes/accelerate_configs/<config>.yaml ARGS=...`, without make."""
    command = [sys.executable, "-m", "rlhf_trl.launch", "--quiet", "--config_file"]
    command += [str(ROOT / f"recipes/accelerate_configs/{config}.yaml"), "-m", f"rlhf_trl.{stage}"]
    return [*command, "--config", str(ROOT / f"recipes/demo/{stage}.yaml"), *args]


def launch(config: str, stage: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Runs `launch_command` to its end (several processes for a multi-process config), capturing its output."""
    command = launch_command(config, stage, *args)
    return subprocess.run(command, cwd=ROOT, env=env or OFFLINE_ENV, capture_output=True, text=True, timeout=600)


def kill_launch_when(ready, config: str, stage: str, *args: str, env: dict | None = None) -> None:
    """Starts `launch_command` and SIGKILLs every process of it as soon as `ready()` holds, as a crash or a reboot
    would: torchrun starts its workers in sessions of their own, so they are found by their command line, which
    holds the run's output_dir (`--output_dir` must be among `args`)."""
    import psutil

    output_dir = args[args.index("--output_dir") + 1]
    command = launch_command(config, stage, *args)
    first = subprocess.Popen(command, cwd=ROOT, env=env or OFFLINE_ENV, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    wait_until(ready, first, timeout=400)
    os.killpg(first.pid, signal.SIGKILL)
    for process in psutil.process_iter(["cmdline"]):
        if output_dir in " ".join(process.info["cmdline"] or []):
            process.kill()
    first.wait()


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> Path:
    """data/ (demo JSONL splits) and models/base (tokenizer + random tiny Llama) under one temp folder."""
    from rlhf_trl.prepare import prepare_demo

    root = tmp_path_factory.mktemp("world")
    prepare_demo(root / "data", root / "models" / "base", seed=0, force=False)
    return root


def stage_paths(world: Path, tag: str = "") -> dict[str, str]:
    models = world / f"models{tag}"
    return {name: str(models / name) for name in ("sft", "reward", "ppo", "rloo", "grpo", "dpo", "kto", "export")} | {
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


def group_args(stage: str):
    """Arguments of a brief RLOO or GRPO run (`stage`) on the demo world: 6 steps of 2 prompts x 4 answers."""

    def args(paths, *extra):
        data = paths["data"]
        return (
            *("--sft_model_path", paths["sft"], "--reward_model_path", paths["reward"]),
            *("--dataset_name", f"{data}/prompts_train.jsonl", "--eval_dataset_name", f"{data}/prompts_eval.jsonl"),
            *("--output_dir", paths[stage], "--max_steps", "6", "--per_device_train_batch_size", "8"),
            *("--num_generations", "4", "--max_completion_length", "12", "--logging_steps", "1"),
            *extra,
        )

    return args


rloo_args, grpo_args = group_args("rloo"), group_args("grpo")


@pytest.fixture(scope="session")
def methods_trained(trained) -> dict[str, str]:
    """RLOO and GRPO run once, briefly, from the `trained` SFT and reward outputs."""
    paths = dict(trained)
    for stage, args in (("rloo", rloo_args), ("grpo", grpo_args)):
        result = run_stage(stage, *args(paths))
        assert result.returncode == 0, f"{stage} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        paths[f"{stage}_stdout"], paths[f"{stage}_stderr"] = result.stdout, result.stderr
    return paths


@pytest.fixture(scope="session")
def trained(world) -> dict[str, str]:
    """Runs SFT, reward and PPO once, briefly, through the real stage entry points."""
    paths = stage_paths(world)
    for stage, args in (("sft", sft_args), ("reward", reward_args), ("ppo", ppo_args)):
        result = run_stage(stage, *args(paths))
        assert result.returncode == 0, f"{stage} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        paths[f"{stage}_stdout"], paths[f"{stage}_stderr"] = result.stdout, result.stderr
    return paths


@pytest.fixture(scope="session")
def zoo(tmp_path_factory):
    """Tiny models with real models' quirks (tests/zoo.py): `zoo["qwen2.5-instruct"]` builds it on first use
    (about a second) and returns its folder; every later use in the session gets the same folder."""
    from zoo import Zoo

    return Zoo(tmp_path_factory.mktemp("zoo"))


# Finished method outputs without training them (tests of eval, report and compare across methods).
RLOO_LOG = [  # metrics.jsonl lines under the names TRL 1.16's RLOOTrainer logs
    {"step": s, "reward": 0.5 * s, "kl": 0.01 * s, "entropy": 2.0 - 0.1 * s, "completions/mean_length": 10 + s}
    for s in range(1, 5)
]


def rewrite_json(path: Path, **changes) -> dict:
    record = json.loads(path.read_text())
    record.update(changes)
    for key in [k for k, v in changes.items() if v is None]:
        del record[key]
    path.write_text(json.dumps(record))
    return record


@pytest.fixture(scope="session")
def method_models(trained, tmp_path_factory) -> Path:
    """models/ holding the session's tiny sft and reward runs and two finished methods, ppo and rloo.

    The methods follow the contract of a method output (an adapter on the SFT model; marker `stage`,
    `tokens_generated`, peak memory; manifest `wall_time_s`), and nothing here relies on how they were trained: rloo
    is the tiny PPO run with its marker rewritten and TRL's RLOO metric names in its log (until `make rloo` runs in
    the test session, a real output can take its place). PPO's marker loses its peak memory and token count: a
    stage that recorded neither."""
    models = tmp_path_factory.mktemp("compare") / "models"
    models.mkdir()
    for stage in ("sft", "reward"):
        (models / stage).symlink_to(trained[stage])
    shutil.copytree(trained["ppo"], models / "ppo")
    rewrite_json(models / "ppo/rlhf_trl_run.json", peak_memory_mib=None, peak_memory_kind=None, tokens_generated=None)
    shutil.copytree(trained["ppo"], models / "rloo")
    rewrite_json(
        models / "rloo/rlhf_trl_run.json",
        stage="rloo",
        peak_memory_mib=812.5,
        peak_memory_kind="cpu_resident",
        tokens_generated=4321,
    )
    rewrite_json(models / "rloo/manifest.json", stage="rloo", wall_time_s=42.0)
    (models / "rloo/metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RLOO_LOG))
    return models
