"""Builds what a recipe needs before training; for `demo`, the data, tokenizer and tiny base model.

    python -m rlhf_trl.prepare --recipe demo [--force]     # what `make data` runs

Everything is deterministic for `--seed` and made offline. Existing outputs are kept unless --force.
"""

import argparse
from pathlib import Path

from . import outputs
from .cli import UserError, run


def prepare_demo(data_dir: Path, base_dir: Path, seed: int, force: bool) -> None:
    from . import demo

    if force or not (data_dir / "prompts_eval.jsonl").is_file():
        for path in demo.write_data(data_dir, seed):
            print(f"data: wrote {path}")
    if force or outputs.read_marker(base_dir) is None:
        tokenizer = demo.build_tokenizer(demo.corpus(demo.make_records(seed)))
        model = demo.build_base_model(tokenizer, seed=seed)
        with outputs.stage_output(base_dir, overwrite=True) as work:
            model.save_pretrained(work)
            tokenizer.save_pretrained(work)
            outputs.finish(work, base_dir, "base", seed=seed, parameters=model.num_parameters())
        print(
            f"data: built tokenizer ({len(tokenizer)} tokens) and base model ({model.num_parameters():,} "
            f"parameters) in {base_dir}"
        )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="demo")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="rebuild even when the outputs exist")
    parser.add_argument("--data-dir", type=Path, default=None, help="default: data/processed/<recipe>")
    parser.add_argument("--base-dir", type=Path, default=None, help="default: models/<recipe>/base")
    args = parser.parse_args(argv)
    if not Path("recipes", args.recipe).is_dir():
        raise UserError(f"recipe {args.recipe!r} does not exist: choose one of the folders in recipes/")
    if args.recipe == "demo" or (args.data_dir and args.base_dir):
        prepare_demo(
            args.data_dir or Path("data/processed", args.recipe),
            args.base_dir or Path("models", args.recipe, "base"),
            args.seed,
            args.force,
        )
    else:
        print(f"data: recipe {args.recipe} reads its datasets as its YAML files say; nothing to build")


if __name__ == "__main__":
    run(main)
