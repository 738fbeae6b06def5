"""Training logs as the stages write them: one JSON object per logged step in `<output_dir>/metrics.jsonl`.

    trainer = SFTTrainer(..., callbacks=[MetricsLog()])      # likewise RewardTrainer and ppo_trainer.PPOTrainer

Why a callback and a file: every TRL trainer (PPO's too, through `self.log`) hands each logged step to
`on_log`, whatever `report_to` says, so one small callback covers all three stages with no tensorboard or
other service. The file goes into `args.output_dir`, which is the stage's `.partial/` directory while it
trains, so the log moves into place with the finished output and `make report` (rlhf_trl.report) reads it
from there. Only the main process writes; each line also records the global step and epoch. Under several
processes the values are already global: transformers averages the loss over processes, and TRL's SFT, reward and
PPO trainers gather their metrics (tokens seen, accuracy, rewards, KL) across them before logging.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from transformers import TrainerCallback

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
    """Appends every `logs` dict the trainer reports to `<args.output_dir>/metrics.jsonl`."""

    def __init__(self, filename: str = FILENAME):
        self.filename = filename

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or not state.is_world_process_zero:
            return
        record = {"step": state.global_step, "epoch": state.epoch, **logs}
        path = Path(args.output_dir) / self.filename
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({key: _plain(value) for key, value in record.items()}) + "\n")


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
