"""Argument parsing and error reporting shared by every stage.

Each stage is parsed by TRL's `TrlParser` into (ScriptArguments, <Trainer>Config, ModelConfig), exactly as
TRL's own scripts and alignment-handbook do, with one difference: unknown YAML keys and unknown flags are
errors, because a misspelt key silently falling back to a default wastes a GPU-day.

Anything a user can fix (a bad path, a bad key, a missing earlier stage) is raised as `UserError`, and
`run` turns it into one line on stderr and exit status 2, instead of a traceback.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A problem with the user's input; the message says what is wrong and how to fix it."""


@dataclass
class ScriptArguments:
    """Data and run-control arguments shared by every stage (the first dataclass TrlParser fills)."""

    dataset_name: str | None = field(
        default=None,
        metadata={"help": "Training data: a local file (.jsonl/.json/.parquet/.csv), a folder, or a Hub id."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on (Hub or folder data)."})
    eval_dataset_name: str | None = field(
        default=None,
        metadata={"help": "Held-out data, same forms as dataset_name. Without it, eval_split_size is cut off."},
    )
    eval_split_size: float = field(
        default=0.05, metadata={"help": "Fraction held out when no eval_dataset_name is given (deterministic by seed)."}
    )
    dataset_format: str = field(
        default="auto",
        metadata={"help": "auto (detect from the fields), alpaca, messages, prompt_completion, preference or prompt."},
    )
    allow_unmatched: bool = field(
        default=False,
        metadata={"help": "accepted/rejected files: train on the matched prompts when some prompts are unmatched."},
    )
    human_labels: list[str] = field(
        default_factory=list,
        metadata={
            "help": "reward, dpo: human preference labels (`make label` writes data/labels/<recipe>/pairs.jsonl): "
            "pair files or accepted/rejected folders, joined to the training data as label_mix says."
        },
    )
    label_mix: str = field(
        default="generated",
        metadata={
            "help": "reward, dpo: generated (dataset_name alone), human (human_labels alone) or mix (both; a "
            "human_labels file that does not exist yet is skipped with a note, so a recipe can name it before "
            "anyone labels)."
        },
    )
    human_fraction: float | None = field(
        default=None,
        metadata={
            "help": "reward, dpo, label_mix mix: the share of training pairs that are human labels, reached by a "
            "seeded subsample of the generated pairs. Unset: every pair of both."
        },
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training records."})
    max_prompt_length: int = field(
        default=256, metadata={"help": "PPO: prompts longer than this (tokens) are dropped."}
    )
    overwrite: bool = field(default=False, metadata={"help": "Replace a finished run in output_dir."})
    resume: str = field(
        default="auto",
        metadata={
            "help": "auto: continue an unfinished run of the same settings from its newest checkpoint in "
            "<output_dir>.partial; true: the same, but fail when there is none; false: start over (make RESUME=0/1).",
            "choices": ["auto", "true", "false"],
        },
    )


def parse_dataclasses(dataclass_types: tuple, argv: list[str] | None = None) -> tuple:
    """`--config file.yaml` plus `--key value` overrides into `dataclass_types`; unknown keys are errors."""
    import yaml
    from trl import TrlParser

    argv = list(sys.argv[1:] if argv is None else argv)
    loaded = {}
    if "--config" in argv:
        if argv.index("--config") + 1 >= len(argv):
            raise UserError("--config needs a recipe file: --config recipes/<recipe>/<stage>.yaml")
        config_path = Path(argv[argv.index("--config") + 1])
        if not config_path.is_file():
            raise UserError(f"recipe file {config_path} does not exist: check RECIPE= (see the folders in recipes/)")
        try:
            loaded = yaml.safe_load(config_path.read_text(encoding="utf-8"))
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise UserError(f"{config_path}{where}: invalid YAML ({getattr(error, 'problem', error)})") from None
        if not isinstance(loaded, dict):
            raise UserError(f"{config_path}: must be a YAML mapping of `key: value` lines")
    parser = TrlParser(dataclass_types)

    def refuse(message: str):  # argparse would print a usage of hundreds of lines first
        raise UserError(f"{message}: fix the value in the recipe or ARGS (see --help)")

    parser.error = refuse
    try:
        *parsed, unknown = parser.parse_args_and_config(args=argv, return_remaining_strings=True)
    except SystemExit as exit_:  # --help
        raise SystemExit(EXIT_USER_ERROR if exit_.code else 0) from None
    except (ValueError, TypeError) as error:
        if "bf16" in str(error):
            raise UserError('bf16: true needs a GPU that supports bfloat16: add ARGS="--bf16 false"') from None
        if "8 bit and 4 bit" in str(error):  # TRL's ModelConfig
            raise UserError(
                "load_in_4bit and load_in_8bit are both true: keep one (set the other to false in the recipe or ARGS)"
            ) from None
        raise UserError(f"invalid setting: {error}") from None
    if unknown:
        keys = [s.lstrip("-").split("=")[0] for s in unknown if s.startswith("--")] or unknown
        names = "/".join(t.__name__ for t in dataclass_types[1:] or dataclass_types)
        raise UserError(f"unknown key(s) {', '.join(keys)} for {names}: fix the spelling in the recipe or ARGS")
    check_renamed_checkpointing(loaded, argv, parsed)
    return tuple(parsed)


def _given(name: str, loaded: dict, argv: list[str]):
    """The value `name` is given on the command line (last occurrence; a bare flag is True), else in the YAML,
    else None."""
    value = loaded.get(name)
    for position, token in enumerate(argv):
        if token == f"--{name}":
            following = argv[position + 1] if position + 1 < len(argv) else None
            value = True if following is None or following.startswith("--") else following
        elif token.startswith(f"--{name}="):
            value = token.split("=", 1)[1]
    if isinstance(value, str):
        value = value.strip().lower() in ("true", "yes", "1", "y", "t", "on")
    return value


def check_renamed_checkpointing(loaded: dict, argv: list[str], parsed) -> None:
    """Raises UserError when `gradient_checkpointing` and `activation_checkpointing` are both given and disagree.

    transformers 5.24 renamed the first to the second and ignores the old name whenever the new one is set, so
    `ARGS="--gradient_checkpointing true"` on a recipe with `activation_checkpointing: false` did nothing."""
    old, new = _given("gradient_checkpointing", loaded, argv), _given("activation_checkpointing", loaded, argv)
    if old is None or new is None or bool(old) == bool(new):
        return
    if any(hasattr(config, "activation_checkpointing") for config in parsed):
        raise UserError(
            f"gradient_checkpointing: {str(bool(old)).lower()} is the old name of activation_checkpointing, which is "
            f"{str(bool(new)).lower()} and wins: set activation_checkpointing alone (in the recipe or ARGS)"
        )


def parse(config_class, argv: list[str] | None = None):
    """Parses a stage: (ScriptArguments, the trainer's config, TRL's ModelConfig)."""
    from trl import ModelConfig

    from .launch import check, plan_from_environment

    # Before the config classes are built: asked for DeepSpeed (by `accelerate launch`), transformers' training
    # arguments import it at once and fail with a traceback when the extra is missing.
    check(plan_from_environment())
    argv = list(sys.argv[1:] if argv is None else argv)
    script_args, training_args, model_args = parse_dataclasses((ScriptArguments, config_class, ModelConfig), argv)
    # recipes/<recipe>/<stage>.yaml names the recipe, which "run `make X RECIPE=...` first" hints repeat.
    check_sizes(script_args)
    check_sizes(training_args)
    check_sizes(model_args)
    script_args.recipe = Path(argv[argv.index("--config") + 1]).parent.name if "--config" in argv else None
    if isinstance(script_args.human_labels, str):  # `human_labels: one/file.jsonl` in YAML reaches us unsplit
        script_args.human_labels = [script_args.human_labels]
    # Seeded before any model is loaded: a new score head or LoRA is drawn at load time, before the trainer
    # seeds anything, and an unseeded draw made identical runs differ (issue 7).
    from transformers import set_seed

    set_seed(training_args.seed)
    return script_args, training_args, model_args


# Counts that must be positive in every stage's config (TrainingArguments, TRL's configs, ModelConfig); 0 or less
# would fail deep in torch's DataLoader or peft, or train on nothing.
POSITIVE_KEYS = (
    "per_device_train_batch_size",
    "per_device_eval_batch_size",
    "gradient_accumulation_steps",
    "max_length",
    "max_prompt_length",
    "lora_r",  # ModelConfig: peft's traceback after the models are loaded
)


def check_sizes(config) -> None:
    """Raises UserError naming the first key of POSITIVE_KEYS that `config` sets to 0 or less (None is unset)."""
    for key in POSITIVE_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value < 1:
            raise UserError(f"{key} is {value}: it must be at least 1; fix it in the recipe or ARGS")


def run(main: Callable[[], None]) -> None:
    """Runs a stage's entry point; a UserError becomes one line on stderr and exit status 2."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Deprecation notices from transformers/TRL internals are not actionable for a recipe author.
    warnings.filterwarnings("ignore", category=FutureWarning)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # weight-loading bars; the trainers' own progress bars stay
    try:
        main()
    except UserError as error:
        fail(str(error))
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the message or the exit short
        _close_progress_bars()
        print(
            "interrupted: nothing was marked finished; rerun the same command (a training stage resumes from its "
            "last checkpoint; RESUME=0 starts over)",
            file=sys.stderr,
        )
        sys.stdout.flush()
        sys.stderr.flush()
        # Straight out with the shell's status for Ctrl-C: outputs are crash-safe, so no cleanup is owed, and
        # interpreter shutdown after an interrupt mid-training was seen to end in SIGINT (-2) instead of 130.
        os._exit(130)
    except Exception as error:
        reason = storage_failure(error) or settings_failure(error)
        if reason is None:
            raise
        fail(reason)


def settings_failure(error: BaseException) -> str | None:
    """A one-line reason and fix for a library's error that a recipe key caused, else None."""
    if type(error).__name__ == "NoMatchingPeftModuleError":  # peft: lora_target_modules names no module of the model
        return (
            f"lora_target_modules: {str(error).splitlines()[0]} Name modules this model has, or use all-linear "
            "(every linear layer but the output layer)"
        )
    return None


def _close_progress_bars() -> None:
    """Closes open tqdm bars now, so their last redraw lands before the error line rather than after it."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def fail(reason: str) -> None:
    _close_progress_bars()
    # One write, newline included: print() writes the text and its newline apart, and under several processes with
    # unbuffered output two ranks' lines could then run together on one line.
    sys.stderr.write(f"error: {reason}\n")
    sys.stderr.flush()
    sys.exit(EXIT_USER_ERROR)


# How a full disk or an unwritable folder shows up: OSError from Python, text from torch.save and safetensors.
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_DISK_FULL_TEXT = ("No space left", "File too large", "FileTooLarge", "StorageFull", "file write failed")
_READ_ONLY = (errno.EACCES, errno.EPERM, errno.EROFS)


def storage_failure(error: BaseException | None) -> str | None:
    """A one-line reason and fix when `error`, or what caused it, is a full disk or an unwritable folder."""
    seen = set()
    while error is not None and id(error) not in seen:  # datasets and others wrap the OSError in their own
        seen.add(id(error))
        reason = _storage_reason(error)
        if reason:
            return reason
        error = error.__cause__ or error.__context__
    return None


def _storage_reason(error: BaseException) -> str | None:
    where = f" ({error.filename})" if getattr(error, "filename", None) else ""
    text = str(error)
    if (isinstance(error, OSError) and error.errno in _DISK_FULL) or any(t in text for t in _DISK_FULL_TEXT):
        return (
            f"the disk filled up while writing{where}: free some space, then rerun the same command; "
            "finished outputs were not touched and the run resumes from its last complete checkpoint"
        )
    if isinstance(error, OSError) and error.errno in _READ_ONLY:
        target = f" {error.filename}" if getattr(error, "filename", None) else ""
        return f"cannot use{target} ({error.strerror}): fix its permissions or mount, or set output_dir elsewhere"
    return None
