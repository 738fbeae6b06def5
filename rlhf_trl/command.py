"""`rlhf-trl`: the make targets as one console command, for a pip install or a notebook with no Makefile.

    rlhf-trl sft --recipe demo                        # = make sft RECIPE=demo
    rlhf-trl ppo --recipe demo --total_episodes 64 --overwrite
    rlhf-trl sft --accelerate_config recipes/accelerate_configs/zero2.yaml
    rlhf-trl chat --stage sft --prompt "Describe the castle."
    rlhf-trl all                                      # the offline demo end to end (= make all)
    rlhf-trl env                                      # what a bug report needs, one line each

A training verb builds the recipe's data first (`rlhf_trl.prepare`, which keeps what exists), then runs the stage
through `rlhf_trl.launch` exactly as `make <stage>` does: the accelerate config is checked first, and the stage's
own exit status comes back (2 for bad input, 130 for Ctrl-C). Every other verb calls the module `make` calls, with
the same flags. Run it from the project folder: recipes are `recipes/<name>/` there (or `--recipe` names a folder).
"""

from __future__ import annotations

import importlib
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from .errors import UserError, run
from .outputs import MARKER

TRAINING = ("sft", "reward", "ppo", "rloo", "grpo", "dpo", "kto")
# verb -> module whose main(argv) it runs, and what it does (for --help)
TOOLS = {
    "data": ("prepare", "build the recipe's data (demo: also its tokenizer and tiny base model)"),
    "chat": ("chat", "talk to a stage's model (--stage sft|ppo|...|export, --prompt for one answer)"),
    "merge": ("merge", "write a standalone model of a stage to models/<recipe>/export"),
    "eval": ("evaluate", "SFT against --stage on held-out prompts: did RLHF help?"),
    "report": ("report", "plots, samples and the eval table in models/<recipe>/report/"),
    "compare": ("compare", "every method judged side by side (trains the missing ones first)"),
    "label": ("label", "label answers by hand into data/labels/<recipe>/ (label export|import|agreement)"),
    "ui": ("ui", "the web page: chat, blind arena, labeling, report"),
}
DEFAULT_ACCELERATE_CONFIG = "recipes/accelerate_configs/single_process.yaml"
# What `make all` runs after the data: training stages kept when finished, then chat, merge and report.
ALL_STAGES = ("sft", "reward", "ppo")
ALL_PROMPT = "Tell me about the river."

USAGE = f"""usage: rlhf-trl <verb> [--recipe NAME] [options]

training (data first, then `accelerate launch` through rlhf_trl.launch; any recipe key as --key value):
  {" ".join(TRAINING)}
      --recipe NAME|FOLDER       recipes/NAME/<verb>.yaml (default demo)
      --accelerate_config FILE   default {DEFAULT_ACCELERATE_CONFIG}
      --launch_args "..."        extra `accelerate launch` flags, e.g. "--num_processes 4"
tools (the module's own flags; `rlhf-trl <verb> --help`):
""" + "".join(f"  {verb:<8} {text}\n" for verb, (_, text) in TOOLS.items())
USAGE += """  all      data, sft, reward, ppo (finished ones kept), chat, merge, report: the demo end to end
  env      versions, GPUs and the accelerate config in use, for a bug report
"""


def recipe_dir(recipe: str) -> Path:
    """recipes/<recipe>/ under the current folder, or `recipe` itself when it is a folder."""
    for candidate in (Path("recipes") / recipe, Path(recipe)):
        if candidate.is_dir():
            return candidate
    known = sorted(p.name for p in Path("recipes").glob("*/") if p.is_dir() and p.name != "accelerate_configs")
    where = f"one of: {', '.join(known)}" if known else "run rlhf-trl from the project folder (it has recipes/)"
    raise UserError(f"recipe {recipe!r} not found: use {where}, or pass a recipe folder")


def take_option(argv: list[str], name: str, default: str | None) -> tuple[str | None, list[str]]:
    """Removes `--name value` (or `--name=value`) from argv; returns (value or default, the rest)."""
    rest, value, i = [], default, 0
    while i < len(argv):
        arg = argv[i]
        if arg == f"--{name}":
            if i + 1 >= len(argv):
                raise UserError(f"--{name} needs a value")
            value, i = argv[i + 1], i + 2
            continue
        if arg.startswith(f"--{name}="):
            value = arg.split("=", 1)[1]
        else:
            rest.append(arg)
        i += 1
    return value, rest


def train(stage: str, argv: list[str]) -> None:
    """`make <stage>`: the recipe's data, then the stage through rlhf_trl.launch (which replaces this process for one
    process, so the stage's exit status is the command's)."""
    from . import launch, prepare

    recipe, argv = take_option(argv, "recipe", "demo")
    config_file, argv = take_option(argv, "accelerate_config", os.environ.get("ACCELERATE_CONFIG"))
    launch_args, argv = take_option(argv, "launch_args", os.environ.get("LAUNCH_ARGS", ""))
    folder = recipe_dir(recipe)
    stage_recipe = folder / f"{stage}.yaml"
    if not stage_recipe.is_file():
        raise UserError(f"{stage_recipe} does not exist: recipe {folder.name!r} has no {stage} stage")
    prepare.main(["--recipe", folder.name])
    launch.main(
        ["--quiet", "--config_file", config_file or DEFAULT_ACCELERATE_CONFIG, *launch_args.split()]
        + ["-m", f"rlhf_trl.{stage}", "--config", str(stage_recipe), *argv]
    )


def run_verb(verb: str, argv: list[str]) -> int:
    """Runs `rlhf-trl <verb> <argv>` in a child process; returns its exit status."""
    return subprocess.call([sys.executable, "-m", "rlhf_trl.command", verb, *argv])


def train_stages(recipe: str, stages) -> None:
    """Trains each of `stages` in order, as `rlhf-trl <stage> --recipe <recipe>`; stops at the first failure with that
    stage's status (as `make all` does)."""
    for stage in stages:
        status = run_verb(stage, ["--recipe", recipe])
        if status:
            sys.exit(status)


def train_missing(recipe: str, stages) -> None:
    """Trains each of `stages` whose output has no finished marker yet (`train_stages`), saying which it keeps."""
    missing = []
    for stage in stages:
        output = Path("models") / recipe / stage
        if (output / MARKER).is_file():
            print(f"{stage}: {output} is finished; kept (rlhf-trl {stage} --overwrite redoes it)", flush=True)
        else:
            missing.append(stage)
    train_stages(recipe, missing)


def run_all(argv: list[str]) -> None:
    recipe, argv = take_option(argv, "recipe", "demo")
    if argv:
        raise UserError(f"rlhf-trl all takes only --recipe, not {' '.join(argv)}: pass settings to each stage's verb")
    recipe_dir(recipe)
    from . import prepare

    prepare.main(["--recipe", recipe])
    train_missing(recipe, ALL_STAGES)
    for verb, args in (("chat", ["--stage", "ppo", "--prompt", ALL_PROMPT]), ("merge", []), ("report", [])):
        if verb == "merge" and (Path("models") / recipe / "export" / MARKER).is_file():
            print(f"merge: models/{recipe}/export is finished; kept (rlhf-trl merge --overwrite redoes it)")
            continue
        status = run_verb(verb, ["--recipe", recipe, *args])
        if status:
            sys.exit(status)


def run_tool(verb: str, argv: list[str]) -> None:
    module = importlib.import_module(f"rlhf_trl.{TOOLS[verb][0]}")
    if verb == "compare" and not {"--help", "-h", "--to-train"} & set(argv):
        # What to train first is compare's own decision (`compare.plan`, what `make compare` asks it too).
        args = module.parser().parse_args(argv)
        train_stages(args.recipe, module.plan(args, lambda line: print(line, file=sys.stderr, flush=True)))
    module.main(argv)


PACKAGES = (
    "transformers", "trl", "peft", "accelerate", "datasets", "tokenizers", "bitsandbytes", "deepspeed", "gradio",
    "gguf",
)


def environment() -> list[str]:
    """What a bug report needs, one line each: Python, the OS, torch with its CUDA, the libraries, GPUs with their
    memory, and the accelerate config `make`/`rlhf-trl` would use (ACCELERATE_CONFIG or the default)."""
    from . import __version__

    lines = [f"rlhf-trl: {__version__}", f"python: {platform.python_version()}", f"platform: {platform.platform()}"]
    lines.append(f"cpu cores: {os.cpu_count()}")
    try:
        import torch

        cuda = torch.version.cuda or "none (CPU build)"
        lines.append(f"torch: {torch.__version__} (CUDA {cuda}, available: {torch.cuda.is_available()})")
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            lines.append(f"gpu {i}: {props.name}, {props.total_memory / 2**30:.1f} GiB")
        if not torch.cuda.device_count():
            lines.append("gpus: none")
    except ImportError:
        lines.append("torch: not installed")
    for name in PACKAGES:
        try:
            lines.append(f"{name}: {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            lines.append(f"{name}: not installed")
    config = os.environ.get("ACCELERATE_CONFIG", DEFAULT_ACCELERATE_CONFIG)
    try:
        from .launch import plan_from_config

        plan = plan_from_config(config)
        lines.append(
            f"accelerate config: {config} ({plan.distributed_type}, {plan.num_processes} process(es)"
            + (f", ZeRO-{plan.zero_stage}" if plan.zero_stage else "")
            + ")"
        )
    except (UserError, OSError) as error:
        lines.append(f"accelerate config: {config} ({error})")
    lines.append(f"HF_HUB_OFFLINE: {os.environ.get('HF_HUB_OFFLINE', 'unset')}")
    return lines


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return
    verb, rest = argv[0], argv[1:]
    if verb in TRAINING:
        if "-h" in rest or "--help" in rest:
            print(f"usage: rlhf-trl {verb} [--recipe NAME] [--accelerate_config FILE] [--<recipe key> VALUE ...]\n")
            print(f"Runs recipes/<recipe>/{verb}.yaml through `accelerate launch -m rlhf_trl.{verb}` (as make {verb}).")
            print("Every key of the recipe can be given as --key value and overrides the YAML.")
            return
        train(verb, rest)
    elif verb in TOOLS:
        run_tool(verb, rest)
    elif verb == "all":
        run_all(rest)
    elif verb == "env":
        print("\n".join(environment()))
    else:
        raise UserError(f"unknown verb {verb!r}: rlhf-trl --help lists them ({', '.join([*TRAINING, *TOOLS])})")


def entry_point() -> None:
    """The console script's target (pyproject.toml [project.scripts])."""
    run(main)


if __name__ == "__main__":
    entry_point()
