"""Argument parsing and error reporting shared by every stage.

Each stage is parsed by TRL's `TrlParser` into (ScriptArguments, <Trainer>Config, ModelConfig), exactly as
TRL's own scripts and alignment-handbook do, with one difference: unknown YAML keys and unknown flags are
errors, because a misspelt key silently falling back to a default wastes a GPU-day.

Anything a user can fix (a bad path, a bad key, a missing earlier stage) is raised as `UserError`, and
`errors.run` turns it into one line on stderr and exit status 2, instead of a traceback.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from .errors import EXIT_USER_ERROR, UserError, run  # noqa: F401  (re-exported for older imports; the package imports them from errors)
from .launch import check, plan_from_environment, process_group_backend


@dataclass
class ScriptArguments:
    """Data and run-control arguments shared by every stage (the first dataclass TrlParser fills)."""

    dataset_name: str | None = field(
        default=None,
        metadata={"help": "Training data: a local file (.jsonl/.json/.parquet/.csv), a folder, or a Hub id."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    dataset_train_split: str = field(
        default="train", metadata={"help": "The split of dataset_name to train on (a folder or Hub dataset)."}
    )
    dataset_test_split: str = field(
        default="test",
        metadata={
            "help": "The split of eval_dataset_name held out (a folder or Hub dataset; e.g. validation), as TRL's "
            "scripts name it. To hold out a split of the training dataset, set eval_dataset_name to it too."
        },
    )
    eval_dataset_name: str | None = field(
        default=None,
        metadata={"help": "Held-out data, same forms as dataset_name. Without it, eval_split_size is cut off."},
    )
    eval_split_size: float = field(
        default=0.05, metadata={"help": "Fraction held out when no eval_dataset_name is given (deterministic by seed)."}
    )
    dataset_format: str = field(
        default="auto",
        metadata={
            "help": "auto (detect from the fields), alpaca, messages, prompt_completion, preference, unpaired (KTO: "
            "prompt, completion, label) or prompt."
        },
    )
    allow_unmatched: bool = field(
        default=True,
        metadata={
            "help": "accepted/rejected files, for pairs (reward, dpo): true pairs the prompts found in both files and "
            "counts the rows of the others (only `make kto` uses them); false stops the run when a prompt is in one "
            "file only."
        },
    )
    human_labels: list[str] = field(
        default_factory=list,
        metadata={
            "help": "reward, dpo, kto: human preference labels (`make label` writes data/labels/<recipe>/pairs.jsonl): "
            "pair files, accepted/rejected folders (KTO: every accept/reject decision) or label exports, joined to the "
            "training data as label_mix says."
        },
    )
    label_mix: str = field(
        default="generated",
        metadata={
            "help": "reward, dpo, kto: generated (dataset_name alone), human (human_labels alone) or mix (both; a "
            "human_labels file that does not exist yet is skipped with a note, so a recipe can name it before "
            "anyone labels)."
        },
    )
    arena_votes_as_training: bool = field(
        default=False,
        metadata={
            "help": "reward, dpo, kto: also train on the arena votes in human_labels (the web page's blind A/B votes, "
            "on held-out prompts that make eval and make compare judge with); off: they are left out and counted."
        },
    )
    human_fraction: float | None = field(
        default=None,
        metadata={
            "help": "reward, dpo, kto, label_mix mix: the share of training pairs that are human labels, reached by a "
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


def parse_dataclasses(dataclass_types: tuple, argv: list[str] | None = None, defaults: dict | None = None) -> tuple:
    """`--config file.yaml` plus `--key value` overrides into `dataclass_types`; unknown keys are errors.
    `defaults` replace the dataclasses' own defaults (the YAML and the command line still win)."""
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
    if defaults:
        parser.set_defaults(**defaults)

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

    # Before the config classes are built: asked for DeepSpeed (by `accelerate launch`), transformers' training
    # arguments import it at once and fail with a traceback when the extra is missing.
    check(plan_from_environment())
    argv = list(sys.argv[1:] if argv is None else argv)
    # The training arguments join this process to the others as they are built, over the machine's backend.
    backend = process_group_backend()
    defaults = {"ddp_backend": backend} if backend else None
    dataclasses_ = (ScriptArguments, config_class, ModelConfig)
    script_args, training_args, model_args = parse_dataclasses(dataclasses_, argv, defaults)
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
