"""Stage outputs that are either complete or absent.

A stage trains inside `<output_dir>.partial/` and renames it to `<output_dir>` only after the model, the
tokenizer and `rlhf_trl_run.json` are written. The marker records what the output is (full model or
adapter) and what it was built on, so later stages and `chat`/`merge` can rebuild the model chain, and
refuse an input that never finished. A finished output is replaced only with `--overwrite`.
"""

from __future__ import annotations

import json
import platform
import shutil
import sys
import time
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

from .cli import UserError

MARKER = "rlhf_trl_run.json"
# The make target that produces each stage's output, for "run X first" messages.
MAKE_TARGET = {"base": "data", "sft": "sft", "reward": "reward", "ppo": "ppo", "export": "merge"}


def partial_dir(output_dir: str | Path) -> Path:
    final = Path(output_dir)
    return final.with_name(final.name + ".partial")


def read_marker(path: str | Path) -> dict | None:
    marker = Path(path) / MARKER
    if not marker.is_file():
        return None
    try:
        return json.loads(marker.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None


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
    record = {
        "stage": stage,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": {name: _version(name) for name in ("torch", "transformers", "trl", "peft", "accelerate")},
        **info,
    }
    (work / MARKER).write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")
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
    for checkpoint in work.glob("checkpoint-*"):  # optimizer state for resuming; not part of the published model
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
    return shape


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


@contextmanager
def stage_output(output_dir: str | Path, overwrite: bool):
    """`with stage_output(dir, overwrite) as work:` trains in `work`; on a user error the partial dir is removed.

    Only the main process creates, renames or removes directories; the others wait for it.
    """
    from accelerate import PartialState

    state = PartialState()
    check_writable(output_dir, overwrite)  # on every rank, so a refusal never leaves ranks at the barrier
    work = fresh_partial_dir(output_dir) if state.is_main_process else partial_dir(output_dir)
    state.wait_for_everyone()
    try:
        yield work
    except UserError:
        if state.is_main_process:
            shutil.rmtree(work, ignore_errors=True)
        raise
