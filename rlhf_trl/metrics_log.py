"""Training logs as the stages write them: one JSON object per logged step in `<output_dir>/metrics.jsonl`.

    trainer = SFTTrainer(..., callbacks=[MetricsLog()])      # likewise RewardTrainer and ppo_trainer.PPOTrainer

Why a callback and a file: every TRL trainer (PPO's too, through `self.log`) hands each logged step to
`on_log`, whatever `report_to` says, so one small callback covers all three stages with no tensorboard or
other service. The file goes into `args.output_dir`, which is the stage's `.partial/` directory while it
trains, so the log moves into place with the finished output and `make report` (rlhf_trl.report) reads it
from there. Only the main process writes; each line also records the global step and epoch.

On screen, `StageProgress` replaces transformers' progress bar, which printed every logged dict in full: one bar
with the step, the elapsed and remaining time, and the stage's key numbers (`KEY_NUMBERS`), while the file keeps
everything. `use_stage_progress(trainer)` installs it on any Trainer. Under several
processes the values are already global: transformers averages the loss over processes, and TRL's SFT, reward and
PPO trainers gather their metrics (tokens seen, accuracy, rewards, KL) across them before logging.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

FILENAME = "metrics.jsonl"


def _plain(value):
    """A JSON-safe value: numbers as floats/ints (NaN and infinity as null), anything else as text."""
    if hasattr(value, "item"):  # a 0-d tensor or numpy scalar
        value = value.item()
    if isinstance(value, bool | int | str) or value is None:
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return str(value)


class MetricsLog(TrainerCallback):
    """Appends every `logs` dict the trainer reports to `<args.output_dir>/metrics.jsonl`; at the start, says when
    the run is too short for its warm-up (`warmup_note`)."""

    def __init__(self, filename: str = FILENAME):
        self.filename = filename

    def on_train_begin(self, args, state, control, **kwargs):
        note = warmup_note(args, state.max_steps)
        if note and state.is_world_process_zero:
            print(note)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or not state.is_world_process_zero:
            return
        record = {"step": state.global_step, "epoch": state.epoch, **logs}
        path = Path(args.output_dir) / self.filename
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({key: _plain(value) for key, value in record.items()}) + "\n")


def warmup_note(args, max_steps: int) -> str | None:
    """A line when the learning rate never leaves its linear warm-up: `max_steps` optimizer steps, no more than the
    warm-up's (a handful of labels, recipes' `warmup_steps: 5`). The warm-up's first step runs at learning rate 0,
    so a 1-step run saves weights that did not change; the stage would say "trained" all the same. None otherwise."""
    warmup = args.get_warmup_steps(max_steps) if max_steps > 0 else 0
    scheduler = str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type))
    if warmup == 0 or warmup < max_steps or scheduler in ("constant", "reduce_lr_on_plateau"):  # no warm-up there
        return None
    # Linear warm-up: step s (from 0) runs at learning_rate x s / warmup, so the last one at (max_steps - 1) / warmup.
    peak = args.learning_rate * (max_steps - 1) / warmup
    effect = "the weights do not change" if max_steps == 1 else f"the largest is {peak:.3g}"
    return (
        f"warning: {max_steps} optimizer step{'s' if max_steps != 1 else ''} but {warmup} warm-up steps: the learning "
        f"rate never reaches {args.learning_rate:g} ({effect}); set warmup_steps below the step count "
        '(ARGS="--warmup_steps 0"), or train on more data or epochs'
    )


def read_metrics(output_dir: str | Path, filename: str = FILENAME) -> list[dict]:
    """The logged steps of a finished stage, oldest first; [] when the stage wrote no log."""
    path = Path(output_dir) / filename
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by a crash; the rest of the log is still worth plotting
    return records


# The numbers a person follows, per stage, by the trainers' own log keys (the first found of each label is shown):
# SFT and reward loss and accuracy, PPO's mean reward-model score and KL (TRL's names), RLOO/GRPO's reward and KL,
# DPO's implicit-reward accuracy and margin (KTO's margin and KL too).
KEY_NUMBERS = {
    "loss": ("loss",),
    "score": ("objective/scores", "reward"),
    "kl": ("objective/kl", "kl"),
    "acc": ("accuracy", "rewards/accuracies", "mean_token_accuracy"),
    "margin": ("rewards/margins",),
    "eval loss": ("eval_loss",),
    "eval acc": ("eval_accuracy",),
}


def key_numbers(logs: dict, shown: dict | None = None) -> dict[str, str]:
    """The KEY_NUMBERS found in `logs`, formatted to 4 significant digits, merged into `shown` (the ones already on
    the bar: an evaluation's log keeps the last training loss)."""
    shown = dict(shown or {})
    for label, keys in KEY_NUMBERS.items():
        for key in keys:
            value = logs.get(key)
            if isinstance(value, int | float) and not isinstance(value, bool):
                shown[label] = f"{value:.4g}"
                break
    return shown


class StageProgress(ProgressCallback):
    """One progress bar: step/total, elapsed<remaining, and the key numbers as its postfix; no dict per step.

    With `disable_tqdm` there is no bar, and each logged step prints one line of the same key numbers instead.
    """

    def __init__(self):
        super().__init__()
        self.shown: dict[str, str] = {}

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or not state.is_world_process_zero:
            return
        self.shown = key_numbers(logs, self.shown)
        if not self.shown:
            return
        if self.training_bar is not None:
            self.training_bar.set_postfix(self.shown, refresh=True)
        elif args.disable_tqdm:
            numbers = ", ".join(f"{label} {value}" for label, value in self.shown.items())
            print(f"step {state.global_step}/{state.max_steps}: {numbers}")

    def on_train_begin(self, args, state, control, **kwargs):
        if not args.disable_tqdm:
            super().on_train_begin(args, state, control, **kwargs)
        self.current_step = 0

    def on_step_end(self, args, state, control, **kwargs):
        if self.training_bar is not None:
            super().on_step_end(args, state, control, **kwargs)

    def on_train_end(self, args, state, control, **kwargs):
        if self.training_bar is not None:
            super().on_train_end(args, state, control, **kwargs)


def use_stage_progress(trainer) -> None:
    """Swaps a Trainer's progress callback (transformers' bar, or its PrinterCallback under disable_tqdm) for
    `StageProgress`."""
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(StageProgress())
