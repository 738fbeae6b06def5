"""Human feedback: label your model's answers into accepted, rejected and preference-pair data.

    python -m rlhf_trl.label --recipe demo [--stage sft|ppo|export | --model DIR] [-k 2] [--labeler NAME]
    python -m rlhf_trl.label export --recipe demo [--file to_label.csv] [--limit 100]   # label elsewhere
    python -m rlhf_trl.label export --recipe demo --format hf [--file DIR] [--overwrite]  # decisions as a dataset
    python -m rlhf_trl.label import --recipe demo --file to_label.csv [--labeler NAME]
    python -m rlhf_trl.label agreement --recipe demo
    make label / make label-export / make label-import FILE=... / make label-agreement

The terminal tool samples K answers per prompt (from prompts_train.jsonl of the recipe) and shows them side
by side; one key records a decision. The store, the sampling, the derived data files, export/import and
agreement live in `rlhf_trl.labels`, shared with the web page (`make ui`); this module keeps the terminal
screen and the command line. Keys are read one at a time from the terminal itself, so a person (or a test,
through a pseudo-terminal) drives it exactly as it will be used; rich draws the screen.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
import unicodedata
from pathlib import Path

from .errors import UserError, run
from .labels import (
    LABEL_SETTINGS,
    LETTERS,
    STAGES,
    LabelStore,
    Sampler,
    check_labeler,
    decision_for_key,
    describe,
    export_dataset,
    export_samples,
    import_decisions,
    load_prompts,
    model_path,
    new_decision,
    print_agreement,
)

# ---------------------------------------------------------------------------------------------- terminal


class KeyReader:
    """Single key presses from the terminal (cbreak mode: Ctrl-C still interrupts); lines when stdin is piped."""

    def __enter__(self):
        self.fd = sys.stdin.fileno()
        self.tty = sys.stdin.isatty()
        if self.tty:
            import termios
            import tty

            self.saved = termios.tcgetattr(self.fd)
            tty.setcbreak(self.fd)
        return self

    def __exit__(self, *exc):
        if self.tty:
            import termios

            termios.tcsetattr(self.fd, termios.TCSADRAIN, self.saved)

    def read(self) -> str:
        if not self.tty:
            line = sys.stdin.readline()
            return line.strip()[:1].lower() if line else "q"
        import termios

        termios.tcflush(self.fd, termios.TCIFLUSH)  # keys pressed while answers were sampled are not decisions
        pressed = os.read(self.fd, 32)
        if pressed in (b"", b"\x04"):
            return "q"
        # An arrow or function key arrives as one escape sequence ("\x1b[A"): never read as the letter in it.
        return pressed.decode(errors="replace").lower() if len(pressed) == 1 else "?"


def key_help(count: int) -> str:
    if count == 1:
        return "y accept · n reject · s skip · u undo · q quit"
    letters = "/".join(LETTERS[:count])
    return f"{letters} prefer that answer · t tie · y accept all · n reject all · s skip · u undo · q quit"


def printable(text: str) -> str:
    """Control characters an undertrained model emits would move the cursor or ring the bell: shown as \ufffd."""
    return "".join(c if c in "\n\t" or unicodedata.category(c) != "Cc" else "\ufffd" for c in text)


def show(console, item: dict, labeled: int, total: int, labeler: str) -> None:
    from rich.console import Group
    from rich.panel import Panel
    from rich.progress_bar import ProgressBar
    from rich.table import Table
    from rich.text import Text

    console.clear()
    console.print(Text(f"labeled {labeled} of {total} · labeler {labeler} · model {item['model']}"))
    console.print(ProgressBar(total=max(total, 1), completed=labeled, width=min(60, console.width)))
    prompt = item["prompt"] if isinstance(item["prompt"], str) else json.dumps(item["prompt"], ensure_ascii=False)
    console.print(Panel(Text(printable(prompt)), title="prompt", title_align="left"))
    panels = [
        Panel(
            Text(printable(text)) if text else Text("(empty answer)", style="dim"),
            title=LETTERS[i].upper(),
            title_align="left",
        )
        for i, text in enumerate(item["responses"])
    ]
    if len(panels) > 1 and console.width >= 36 * len(panels):
        grid = Table.grid(expand=True, padding=(0, 1))
        for _ in panels:
            grid.add_column(ratio=1)
        grid.add_row(*panels)
        console.print(grid)
    else:  # too narrow for side by side: one after another
        console.print(Group(*panels))
    console.print(Text(key_help(len(panels)), style="bold"))


def label_session(args) -> None:
    from rich.console import Console

    console = Console(highlight=False)
    with LabelStore(args.out) as store:
        _label_with(store, args, console)


def _label_with(store: LabelStore, args, console) -> None:
    items = load_prompts(args)
    total = len(items)
    in_set = {item["prompt_id"] for item in items}

    def count_labeled() -> int:
        return len(in_set & {d["prompt_id"] for d in store.by(args.labeler)})

    labeled = count_labeled()
    done = {d["prompt_id"] for d in store.by(args.labeler)}
    queue = [item for item in items if item["prompt_id"] not in done]
    if not queue:
        console.print(f"label: all {total} prompts are labeled by {args.labeler} in {args.out}")
        return
    if labeled:
        console.print(f"resuming: {labeled} of {total} prompts already labeled by {args.labeler}")
    path = model_path(args)
    console.print(f"loading {path} ...")
    sampler = Sampler(path, args.k, args.max_new_tokens, args.temperature, args.seed)
    made = 0
    try:
        with KeyReader() as keys:
            while queue:
                item = queue[0]
                if "responses" not in item:
                    console.print(f"sampling {args.k} answers ...")
                    queue[0] = item = sampler.answers(item)
                show(console, item, labeled, total, args.labeler)
                console.print("choice> ", end="")
                key = keys.read()
                console.print(key)
                if key == "q":
                    break
                if key == "u":
                    undone = store.undo_last(args.labeler)
                    if undone is None:
                        console.print("nothing to undo")
                        continue
                    queue.insert(0, undone)  # shown again with the same answers
                    labeled, made = count_labeled(), made - 1
                    console.print(f"undone: {describe(undone)} on {str(undone['prompt'])[:60]!r}")
                    continue
                choice = decision_for_key(key, len(item["responses"]))
                if choice is None:
                    console.print(f"unknown key {key!r}: {key_help(len(item['responses']))}")
                    continue
                decision = new_decision(item, args.labeler, *choice, source="terminal")
                store.record([decision])
                queue.pop(0)
                labeled, made = count_labeled(), made + 1
                console.print(f"saved: {describe(decision)} ({labeled} of {total} labeled)")
    except KeyboardInterrupt:
        console.print(f"\nlabel: interrupted; {labeled} of {total} labeled, all saved in {args.out}; rerun to resume")
        raise SystemExit(130) from None
    console.print(
        f"label: {labeled} of {total} prompts labeled by {args.labeler} ({made:+d} this session) in {args.out}"
    )


# ---------------------------------------------------------------------------------------------- entry point


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", nargs="?", default="label", choices=("label", "export", "import", "agreement"))
    parser.add_argument("--recipe", default="demo")
    parser.add_argument("--stage", default="sft", choices=STAGES, help="the stage whose model answers (default sft)")
    parser.add_argument("--model", type=Path, help="a model or adapter folder; overrides --recipe/--stage")
    parser.add_argument(
        "--prompts", type=Path, help="prompts file (default data/processed/<recipe>/prompts_train.jsonl)"
    )
    parser.add_argument("--out", type=Path, help="labels folder (default data/labels/<recipe>)")
    parser.add_argument("--labeler", help="who labels (default: $LABELER, else the login name)")
    parser.add_argument("-k", type=int, default=2, help="answers per prompt, 1 to 4 (default 2)")
    parser.add_argument("--limit", type=int, help="only the first N prompts (export: default 100)")
    parser.add_argument("--max-new-tokens", type=int, default=LABEL_SETTINGS["max_new_tokens"])
    parser.add_argument("--temperature", type=float, default=LABEL_SETTINGS["temperature"])
    parser.add_argument("--seed", type=int, default=LABEL_SETTINGS["seed"])
    parser.add_argument(
        "--file", type=Path, help="export: where to write (.csv or .jsonl; --format hf: a folder); import: what to read"
    )
    parser.add_argument(
        "--format",
        default="table",
        choices=("table", "hf"),
        help="export: table (samples to label in a spreadsheet) or hf (the decisions as a parquet dataset folder in "
        "TRL's preference and unpaired formats, default <labels folder>-hf)",
    )
    parser.add_argument("--overwrite", action="store_true", help="export --format hf: replace an earlier export")
    args = parser.parse_args(argv)
    if not 1 <= args.k <= len(LETTERS):
        raise UserError(f"-k {args.k}: label 1 to {len(LETTERS)} answers per prompt (K=2 compares two side by side)")
    if args.temperature < 0:
        raise UserError(f"--temperature {args.temperature} is negative: use a temperature above 0 (or 0 with -k 1)")
    if args.temperature <= 0 and args.k > 1:
        raise UserError("--temperature 0 gives K identical answers: use a temperature above 0, or -k 1")
    args.out = args.out or Path("data", "labels", args.recipe)
    args.labeler_given = (args.labeler or os.environ.get("LABELER") or "").strip()
    try:
        args.labeler = args.labeler_given or getpass.getuser()
    except (KeyError, OSError):  # no login name (some containers): a decision must say whose it is
        raise UserError("who is labeling? pass --labeler NAME (make label LABELER=NAME)") from None
    try:
        args.labeler = check_labeler(args.labeler)
    except ValueError as error:
        raise UserError(f"--labeler {args.labeler!r}: {error} (make label LABELER=NAME)") from None
    args.labeler_column = args.labeler_given  # export leaves the column for whoever labels the file
    if args.command == "label":
        label_session(args)
    elif args.command == "export" and args.format == "hf":
        export_dataset(args)
    elif args.command == "export":
        args.limit = args.limit or 100
        export_samples(args)
    elif args.command == "import":
        if args.file is None:
            raise UserError("import needs --file <the labeled .csv or .jsonl> (make label-import FILE=...)")
        import_decisions(args)
    else:
        with LabelStore(args.out) as store:
            print_agreement(store)


if __name__ == "__main__":
    run(main)
