"""Stage outputs that are either complete or absent, resumable, and traceable to what produced them.

A stage trains inside `<output_dir>.partial/` and renames it to `<output_dir>` only after the model, the
tokenizer and `rlhf_trl_run.json` are written. The marker records what the output is (full model or
adapter) and what it was built on, so later stages and `chat`/`merge` can rebuild the model chain, and
refuse an input that never finished. A finished output is replaced only with `--overwrite`.

`manifest.json` sits next to the marker: the resolved config, package versions, git commit, fingerprints of
every local file or folder the config names (data included), the seed, the hardware and the wall time.
A training stage writes it when it starts, so a crashed run's `.partial/` says what it was; rerunning the
same command resumes from the newest complete `checkpoint-*` in it, and refuses (rather than silently
mixing) when the settings or the data changed since.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

from .errors import UserError, storage_failure

MARKER = "rlhf_trl_run.json"
MANIFEST = "manifest.json"
# Written last into a checkpoint by transformers trainers and by ppo_trainer: present means complete.
CHECKPOINT_STATE = "trainer_state.json"
# Settings that may change between a crash and the resume without changing what is trained.
RESUME_IGNORES = {
    "output_dir", "logging_dir", "overwrite", "resume", "save_strategy", "save_steps", "save_total_limit",
    "logging_steps", "logging_strategy", "logging_first_step", "log_level", "log_level_replica", "report_to",
    "run_name", "disable_tqdm", "dataloader_num_workers", "dataloader_pin_memory", "eval_strategy", "eval_steps",
    "per_device_eval_batch_size", "eval_on_start", "gradient_checkpointing", "gradient_checkpointing_kwargs",
    "activation_checkpointing", "activation_checkpointing_kwargs",  # transformers' new names of the two above
    "ddp_timeout", "push_to_hub", "hub_model_id", "hub_strategy", "hub_token", "hub_private_repo",
}  # fmt: skip
# Stage 3: the methods that turn the SFT model into the assistant, each an adapter on it in models/<recipe>/<method>.
METHODS = ("ppo", "rloo", "grpo", "dpo", "kto")
# Every stage whose output is a policy that answers: what chat, merge, eval, report and label take as STAGE.
POLICY_STAGES = ("sft", *METHODS)
# The make target that produces each stage's output, for "run X first" messages.
MAKE_TARGET = {"base": "data", "sft": "sft", "reward": "reward", **{m: m for m in METHODS}, "export": "merge"}


def partial_dir(output_dir: str | Path) -> Path:
    final = Path(output_dir)
    return final.with_name(final.name + ".partial")


def is_adapter(path: str | Path) -> bool:
    """True when `path` holds a LoRA adapter (peft's adapter_config.json), not a full model."""
    return (Path(path) / "adapter_config.json").is_file()


def base_of(adapter_dir: str | Path) -> str:
    """The model an adapter was trained on: the run marker's record, else peft's own."""
    marker = read_marker(adapter_dir) or {}
    if marker.get("base"):
        return marker["base"]
    from peft import PeftConfig

    return PeftConfig.from_pretrained(str(adapter_dir)).base_model_name_or_path


def read_marker(path: str | Path) -> dict | None:
    return _read_json(Path(path) / MARKER)


def run_id(path: str | Path) -> str | None:
    """Which finished run a stage folder holds now: the sha256 of its marker (written once per run, with the run's
    finish time), or None when it holds no finished run. A retrained stage gets another one."""
    marker = Path(path) / MARKER
    return fingerprint(marker) if marker.is_file() else None


def check_writable(output_dir: str | Path, overwrite: bool) -> None:
    """Refuses an output_dir that holds a finished run (unless overwrite) or anything that is not a run."""
    final = Path(output_dir)
    if not final.exists():
        return
    if not final.is_dir():
        raise UserError(f"output_dir {final} is a file: choose another output_dir")
    if read_marker(final) is not None:
        if not overwrite:
            raise UserError(
                f'{final} already holds a finished run: add --overwrite (make ... ARGS="--overwrite") '
                "to replace it, or set another output_dir"
            )
    elif any(final.iterdir()):
        # --overwrite replaces finished runs only: a typo such as output_dir: models/demo must not wipe a tree.
        raise UserError(f"{final} exists and is not a finished rlhf-trl run: move it away or set another output_dir")


def begin(output_dir: str | Path, overwrite: bool) -> Path:
    """Checks that output_dir may be written and returns a fresh `.partial` directory to train in."""
    check_writable(output_dir, overwrite)
    return fresh_partial_dir(output_dir)


def fresh_partial_dir(output_dir: str | Path) -> Path:
    work = partial_dir(output_dir)
    shutil.rmtree(work, ignore_errors=True)  # left by a crashed run; it never counted as an output
    work.mkdir(parents=True)
    return work


def finish(work: Path, output_dir: str | Path, stage: str, **info) -> Path:
    """Writes the marker into `work`, then renames it over output_dir in one step."""
    final = Path(output_dir)
    for file in work.rglob("*"):  # on disk before the rename makes them count: a power cut must not publish holes
        if file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
    finished_at = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    manifest = _read_json(work / MANIFEST) or new_manifest(stage)
    manifest["finished_at"] = finished_at
    manifest["wall_time_s"] = round(time.time() - manifest["attempts"][-1]["started_unix"], 1)
    _write_json(work / MANIFEST, manifest)
    _write_json(work / MARKER, {"stage": stage, "finished_at": finished_at, "manifest": MANIFEST, **info})
    if final.exists():
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        work.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        work.rename(final)
    return final


def publish(trainer, tokenizer, work: Path, output_dir: str | Path, stage: str, **info) -> bool:
    """Saves the trained model and its tokenizer into `work` and marks the output finished.

    Every process takes part in saving (sharded or DeepSpeed models need it); only the main process writes
    the tokenizer and the marker, and it alone gets True back, to print the stage's summary.
    """
    trainer.save_model(str(work))
    trainer.accelerator.wait_for_everyone()  # sharded saves: every rank has written before the rename
    if not trainer.accelerator.is_main_process:
        return False
    info = {**run_shape(trainer), **info}
    tokenizer.save_pretrained(str(work))
    for checkpoint in work.glob("checkpoint-*"):  # for resuming only; not part of the published model
        shutil.rmtree(checkpoint, ignore_errors=True)
    finish(work, output_dir, stage, **info)
    return True


def run_shape(trainer) -> dict:
    """How the run was spread: processes, the global batch per optimizer step (over all processes) and the steps.

    TRL's PPO computes its rollout batch itself (`args.batch_size`, per device x accumulation x processes) and
    counts episodes; the other trainers' global batch is per device x accumulation x processes.
    """
    args, processes = trainer.args, trainer.accelerator.num_processes
    global_batch = getattr(args, "batch_size", None) or (
        args.per_device_train_batch_size * args.gradient_accumulation_steps * processes
    )
    shape = {"processes": processes, "global_batch": global_batch, "steps": trainer.state.global_step}
    if getattr(trainer.state, "episode", None) is not None:
        shape["episodes"] = trainer.state.episode
    return {**shape, **peak_memory()}


def peak_memory() -> dict:
    """This process's peak memory so far, in MiB: `peak_memory_mib` and what it counts (`peak_memory_kind`).

    On a GPU, the most torch has had allocated on it (`torch.cuda.max_memory_allocated`: tensors only, not the
    allocator's cache); on CPU the peak resident set of the process (`getrusage` ru_maxrss, KiB on Linux), which
    includes Python and the libraries (several hundred MiB before any model)."""
    import resource

    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return {"peak_memory_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1), "peak_memory_kind": "gpu"}
    return {
        "peak_memory_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_memory_kind": "cpu_resident",
    }


def require(path: str | Path, stage: str, recipe: str | None = None) -> dict:
    """Returns the marker of a finished stage output, or says which make target produces it."""
    marker = read_marker(path)
    if marker is None:
        target = MAKE_TARGET.get(stage, stage)
        recipe_hint = f" RECIPE={recipe}" if recipe else ""
        state = "is unfinished" if partial_dir(path).exists() or Path(path).exists() else "does not exist"
        raise UserError(f"the {stage} output {path} {state}: run `make {target}{recipe_hint}` first")
    return marker


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def write_atomically(path: Path, data: bytes) -> None:
    """Replaces `path` with `data` in one step: a crash mid-write leaves the previous version, never half a file."""
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def _write_json(path: Path, record: dict) -> None:
    write_atomically(path, (json.dumps(record, indent=2, default=str) + "\n").encode("utf-8"))


def _git_commit() -> dict | None:
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if commit.returncode != 0:
        return None
    return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}


def _hardware() -> dict:
    import torch

    hardware = {
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "processes": int(os.environ.get("WORLD_SIZE", 1)),
    }
    if torch.cuda.is_available():
        hardware["gpus"] = [
            f"{torch.cuda.get_device_name(i)} ({torch.cuda.get_device_properties(i).total_memory / 2**30:.0f} GiB)"
            for i in range(torch.cuda.device_count())
        ]
    return hardware


def _command() -> list[str]:
    """sys.argv as the user would retype it: `python -m rlhf_trl.sft ...` rather than a path into the package."""
    program = Path(sys.argv[0])
    if program.parent.name == "rlhf_trl":
        return ["python", "-m", f"rlhf_trl.{program.stem}", *sys.argv[1:]]
    return [program.name, *sys.argv[1:]]


def _attempt(**extra) -> dict:
    """One start of a run: when, and on which code (a resume may run on newer code than the first attempt)."""
    return {
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "started_unix": time.time(),
        "git": _git_commit(),
        **extra,
    }


def new_manifest(stage: str, config: dict | None = None, inputs: dict | None = None) -> dict:
    """What produced an output: config, inputs, code, packages, machine; `finish` adds the wall time."""
    attempt = _attempt()
    return {
        "stage": stage,
        "command": _command(),
        "config": config or {},
        "seed": (config or {}).get("seed"),
        "inputs": inputs or {},
        "git": attempt["git"],  # the code of the first attempt; each later one records its own
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": {
            name: _version(name)
            for name in ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes")
        },
        "hardware": _hardware(),
        "attempts": [attempt],
    }


def resolved_config(*argument_sets) -> dict:
    """The parsed dataclasses as one flat JSON-safe dict (later sets win on a shared key)."""
    config = {}
    for arguments in argument_sets:
        values = arguments.to_dict() if hasattr(arguments, "to_dict") else dataclasses.asdict(arguments)
        config.update(json.loads(json.dumps(values, default=str)))
    return config


def fingerprint(path: Path) -> str:
    """sha256 of a file; for a folder, of its finished-run marker or else its file names, sizes and small files."""
    digest = hashlib.sha256()
    if path.is_file():
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()
    if (path / MARKER).is_file():  # names one finished run exactly, without hashing gigabytes of weights
        return fingerprint(path / MARKER)
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        size = file.stat().st_size
        digest.update(f"{file.relative_to(path)}:{size}\n".encode())
        if size < (1 << 20):
            digest.update(file.read_bytes())
    return digest.hexdigest()


def input_fingerprints(config: dict) -> dict:
    """Fingerprints of the local files and folders (data, models) that the config names."""
    inputs = {}
    for key, value in sorted(config.items()):
        if key in RESUME_IGNORES:
            continue
        named = {f"{key}[{i}]": item for i, item in enumerate(value)} if isinstance(value, list) else {key: value}
        for name, item in named.items():
            if not isinstance(item, str) or not item or len(item) > 4096:
                continue
            path = Path(item)
            if path.exists() and (path.is_file() or path.is_dir()) and path.resolve() != Path.cwd().resolve():
                inputs[name] = {"path": item, "sha256": fingerprint(path)}
    return inputs


def checkpoint_step(checkpoint: Path) -> int:
    match = re.fullmatch(r"checkpoint-(\d+)", checkpoint.name)
    return int(match.group(1)) if match else -1


def damage(checkpoint: Path) -> str | None:
    """Why a checkpoint cannot be resumed from, or None when it is complete and readable."""
    state = _read_json(checkpoint / CHECKPOINT_STATE)
    if state is None:
        return f"no readable {CHECKPOINT_STATE} (the run stopped while writing it)"
    for file in checkpoint.iterdir():
        if file.suffix in (".safetensors", ".pt", ".pth", ".bin") and file.stat().st_size == 0:
            return f"{file.name} is empty"
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            try:
                with safe_open(str(file), framework="pt") as handle:
                    handle.keys()
            except Exception as error:  # safetensors raises its own error types for a damaged header
                return f"{file.name} is unreadable ({str(error).splitlines()[0][:80]})"
    return None


def usable_checkpoint(work: Path) -> Path | None:
    """The newest complete checkpoint in `work`; damaged newer ones are reported and passed over."""
    for checkpoint in sorted(work.glob("checkpoint-*"), key=checkpoint_step, reverse=True):
        problem = damage(checkpoint)
        if problem is None:
            return checkpoint
        print(f"resume: passing over {checkpoint}: {problem}")
    return None


def _differences(old: dict, new: dict) -> list[str]:
    keys = sorted((set(old) | set(new)) - RESUME_IGNORES)
    return [f"{key}: {old.get(key)!r} -> {new.get(key)!r}" for key in keys if old.get(key) != new.get(key)]


def resume_point(work: Path, resume: str, config: dict, inputs: dict) -> Path | None:
    """The checkpoint to resume from (None: start over), by the `--resume auto|true|false` rule."""
    resume_hint = "add RESUME=0 (--resume false) to discard it and start over"
    if resume == "false" or not work.is_dir():
        if resume == "true":
            raise UserError(f"--resume true, but there is no unfinished run in {work}: drop RESUME=1 to start one")
        return None
    checkpoint = usable_checkpoint(work)
    if checkpoint is None:
        if resume == "true":
            raise UserError(f"--resume true, but {work} holds no complete checkpoint: {resume_hint}")
        print(f"resume: {work} holds no complete checkpoint; starting over")
        return None
    manifest = _read_json(work / MANIFEST)
    if manifest is None:
        raise UserError(f"{work} holds checkpoints but no {MANIFEST}, so its settings are unknown: {resume_hint}")
    changed = _differences(manifest.get("config", {}), config)
    before = manifest.get("inputs", {})
    for key in sorted(set(before) | set(inputs)):
        if before.get(key) != inputs.get(key):
            path = (inputs.get(key) or before.get(key))["path"]
            state = "appeared" if key not in before else "is gone" if key not in inputs else "changed"
            changed.append(f"{key} {state} ({path})")
    if changed:
        raise UserError(
            f"{work} holds an unfinished run with other settings ({'; '.join(changed[:3])}): restore them to "
            f"resume it from {checkpoint.name}, or {resume_hint}"
        )
    return checkpoint


def trim_metrics(work: Path, step: int) -> None:
    """Drops log lines written after the checkpoint: the resumed run logs those steps again."""
    from .metrics_log import FILENAME

    path = work / FILENAME
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except json.JSONDecodeError:
            continue  # a line cut short by the crash
    write_atomically(path, "".join(line + "\n" for line in kept).encode("utf-8"))


@dataclasses.dataclass
class TrainingRun:
    work: Path  # the `.partial` directory to train in (the trainer's output_dir)
    checkpoint: str | None  # resume_from_checkpoint for the trainer, or None for a fresh start


def hold_lock(lock_file: Path, busy: str):
    """`lock_file`, open and exclusively locked, or UserError(busy) when another process holds it.

    Close the handle to release it; the OS releases it however the process ends, so a crash never leaves it stuck.
    """
    import fcntl

    lock_file.parent.mkdir(parents=True, exist_ok=True)
    handle = open(lock_file, "a+")  # noqa: SIM115 (held for the whole run)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise UserError(busy) from None
    return handle


def lock_output(output_dir: str | Path):
    """Refuses a second run writing the same output: two runs sharing one `.partial` destroy each other's work."""
    final = Path(output_dir)
    busy = f"another run is writing {final} right now: wait for it to end or stop it"
    return hold_lock(final.with_name(f".{final.name}.lock"), busy)


def _decided_by_main(decide):
    """Runs `decide()` on the main process only and hands its result, or its UserError, to every rank."""
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    state = PartialState()
    outcome, failure = [None], None
    if state.is_main_process:
        try:
            outcome = [("ok", decide())]
        except Exception as error:  # any failure must reach every rank, or they wait at the broadcast forever
            failure = error
            outcome = [("error", str(error) if isinstance(error, UserError) else storage_failure(error) or repr(error))]
    if state.num_processes > 1:
        broadcast_object_list(outcome)
    kind, value = outcome[0]
    if failure is not None:
        raise failure
    if kind == "error":
        raise UserError(value)
    return value


def recover_publish(output_dir: str | Path) -> None:
    """Completes a publish cut short between its two renames: a marked `.partial` and no output is a finished run."""
    final, work = Path(output_dir), partial_dir(output_dir)
    if read_marker(work) is not None and not final.exists():
        work.rename(final)
        shutil.rmtree(final.with_name(final.name + ".old"), ignore_errors=True)
        print(f"{final}: completed the publishing of a finished run that a crash had interrupted")


@contextmanager
def training_run(stage: str, script_args, training_args, model_args):
    """`with training_run("sft", *args) as run:` trains in `run.work`, resuming from `run.checkpoint` if set.

    The main process takes the output's lock, checks it, picks the checkpoint and prepares `.partial/`;
    every rank gets the same decision (or the same one-line error) from it.
    """
    from accelerate import PartialState

    output_dir = training_args.output_dir
    work = partial_dir(output_dir)
    locks = []

    def decide() -> str | None:
        locks.append(lock_output(output_dir))
        recover_publish(output_dir)
        check_writable(output_dir, script_args.overwrite)
        # The process count shapes every batch and shard: a resume must keep it.
        config = {**resolved_config(script_args, training_args, model_args), "processes": PartialState().num_processes}
        inputs = input_fingerprints(config)
        checkpoint = resume_point(work, script_args.resume, config, inputs)
        if checkpoint is not None:
            for newer in work.glob("checkpoint-*"):  # damaged ones passed over; the resumed run rewrites those steps
                if checkpoint_step(newer) > checkpoint_step(checkpoint):
                    shutil.rmtree(newer)
        if checkpoint is None:
            fresh_partial_dir(output_dir)
            _write_json(work / MANIFEST, new_manifest(stage, config, inputs))
            return None
        trim_metrics(work, checkpoint_step(checkpoint))
        manifest = _read_json(work / MANIFEST)
        manifest["attempts"].append(_attempt(resumed_from=checkpoint.name))
        _write_json(work / MANIFEST, manifest)
        print(f"{stage}: resuming from {checkpoint} (RESUME=0 starts over instead)")
        return str(checkpoint)

    try:
        checkpoint = _decided_by_main(decide)
        yield TrainingRun(work, checkpoint)
    except UserError:
        if locks and not any(work.glob("checkpoint-*")):  # locks: this is the main process and owned the run
            shutil.rmtree(work, ignore_errors=True)
        raise
    finally:
        for handle in locks:
            handle.close()


@contextmanager
def stage_output(output_dir: str | Path, overwrite: bool):
    """`with stage_output(dir, overwrite) as work:` writes in `work`; on a user error the partial dir is removed.

    For outputs built without a trainer (data, base model, export): nothing to resume, so always fresh.
    """
    locks = []

    def decide() -> str:
        locks.append(lock_output(output_dir))
        check_writable(output_dir, overwrite)
        return str(fresh_partial_dir(output_dir))

    try:
        work = Path(_decided_by_main(decide))
        yield work
    except UserError:
        if locks:
            shutil.rmtree(partial_dir(output_dir), ignore_errors=True)
        raise
    finally:
        for handle in locks:
            handle.close()
