"""Human feedback: label your model's answers into accepted, rejected and preference-pair data.

    python -m rlhf_trl.label --recipe demo [--stage sft|ppo|export | --model DIR] [-k 2] [--labeler NAME]
    python -m rlhf_trl.label export --recipe demo [--file to_label.csv] [--limit 100]   # label elsewhere
    python -m rlhf_trl.label import --recipe demo --file to_label.csv [--labeler NAME]
    python -m rlhf_trl.label agreement --recipe demo
    make label / make label-export / make label-import FILE=... / make label-agreement

The terminal tool samples K answers per prompt (from prompts_train.jsonl of the recipe) and shows them side
by side; one key records a decision. Everything lands in data/labels/<recipe>/ (--out), not inside
data/processed/<recipe>/, which `make data --overwrite` rebuilds: human labels cannot be regenerated.

    decisions.jsonl     the source of truth: one line per decision or undo, appended and fsync'd at once
    accepted_data.jsonl / rejected_data.jsonl   the seed project's layout (prompt, response)
    pairs.jsonl         prompt/chosen/rejected, what the reward stage reads (`human_labels`, `label_mix`)
    samples.jsonl       the samples `export` handed out, so `import` can check every sample_id

Why it is built this way: the three data files are derived from the log, appended as each decision is
made, and reconciled with it at every start, so a crash or kill at any moment loses at most the decision
on screen and leaves valid JSONL. Undo appends a tombstone to the log and rewrites the data files without
that decision's lines (a temp file renamed over the old one); lines this tool did not write are kept.
Keys are read one at a time from the terminal itself, so a person (or a test, through a pseudo-terminal)
drives it exactly as it will be used; rich draws the screen. The samples of a prompt come from a seed
derived from the prompt's position, so the terminal and `export` show two labelers the same answers,
which is what `agreement` (percent agreement and Cohen's kappa per pair of labelers) compares.
"""

from __future__ import annotations

import argparse
import csv
import getpass
import hashlib
import itertools
import json
import os
import sys
import unicodedata
import uuid
from collections import Counter
from datetime import datetime
from pathlib import Path

from . import outputs
from .cli import UserError, run
from .data import load_dataset_for, read_jsonl

STAGES = ("sft", "ppo", "export")
LOG, ACCEPTED, REJECTED, PAIRS, SAMPLES = (
    "decisions.jsonl",
    "accepted_data.jsonl",
    "rejected_data.jsonl",
    "pairs.jsonl",
    "samples.jsonl",
)
DERIVED = (ACCEPTED, REJECTED, PAIRS)
LETTERS = "abcd"  # at most four answers side by side; other keys never clash with these
VERDICTS = ("tie", "accept", "reject", "skip")


def now() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


def plain_prompt(messages: list[dict]):
    """A lone user turn as its text (the seed's layout), any longer conversation as its messages."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    return messages


def short_hash(value) -> str:
    return hashlib.sha1(json.dumps(value, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------------------------- files


def append_lines(path: Path, records: list[dict]) -> None:
    """Appends whole lines in one write and fsyncs, so a kill leaves either the line or nothing."""
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def rewrite_atomically(path: Path, lines: list[bytes]) -> None:
    outputs.write_atomically(path, b"".join(lines))


def mend_torn_tail(path: Path) -> None:
    """A last line without its newline is a write cut short by a power loss: dropped, unless it is whole JSON."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if data.endswith(b"\n"):
        return
    cut = data.rfind(b"\n") + 1
    try:
        json.loads(data[cut:])
        rewrite_atomically(path, [data, b"\n"])
    except ValueError:
        rewrite_atomically(path, [data[:cut]])


# ---------------------------------------------------------------------------------------------- the store


def derived_records(decision: dict) -> dict[str, list[dict]]:
    """What one decision adds to accepted_data, rejected_data and pairs."""
    meta = {
        key: decision[key]
        for key in ("labeler", "timestamp", "model", "generation", "decision_id", "sample_id")
        if key in decision
    }
    prompt, responses, verdict = decision["prompt"], decision["responses"], decision["decision"]
    accepted, rejected, pairs = [], [], []
    if verdict == "prefer":
        best = responses[decision["preferred"]]
        others = [r for i, r in enumerate(responses) if i != decision["preferred"]]
        accepted, rejected = [best], others
        # Identical texts teach the reward model nothing (and contradict each other), so they make no pair.
        pairs = [{"prompt": prompt, "chosen": best, "rejected": other, **meta} for other in others if other != best]
    elif verdict == "accept":
        accepted = responses
    elif verdict == "reject":
        rejected = responses
    return {
        ACCEPTED: [{"prompt": prompt, "response": r, **meta} for r in accepted],
        REJECTED: [{"prompt": prompt, "response": r, **meta} for r in rejected],
        PAIRS: pairs,
    }


class LabelStore:
    """The labels folder: the decision log and the data files derived from it. One session holds it at a time."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        busy = (
            f"{self.folder} is in use by another labeling session: finish that one first, "
            "or label into another folder with --out"
        )
        self._lock = outputs.hold_lock(self.folder / ".lock", busy)  # held for the whole session
        for name in (LOG, *DERIVED, SAMPLES):
            mend_torn_tail(self.folder / name)
        self.decisions: dict[str, dict] = {}  # live decisions by id, in the order they were made
        log = self.folder / LOG
        for record in read_jsonl(log) if log.is_file() else []:
            record.pop("_line")
            if record.get("kind") == "undo":
                self.decisions.pop(record.get("undoes"), None)
            elif record.get("kind") == "decision":
                self.decisions[record["decision_id"]] = record
        self.reconcile()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._lock.close()  # releases the lock

    def path(self, name: str) -> Path:
        return self.folder / name

    def by(self, labeler: str) -> list[dict]:
        return [d for d in self.decisions.values() if d["labeler"] == labeler]

    def record(self, decisions: list[dict]) -> None:
        """The log first: a kill between the two writes is repaired from it by the next `reconcile`."""
        append_lines(self.path(LOG), decisions)
        derived: dict[str, list[dict]] = {name: [] for name in DERIVED}
        for decision in decisions:
            self.decisions[decision["decision_id"]] = decision
            for name, lines in derived_records(decision).items():
                derived[name] += lines
        for name, lines in derived.items():
            if lines:
                append_lines(self.path(name), lines)

    def undo_last(self, labeler: str) -> dict | None:
        mine = self.by(labeler)
        if not mine:
            return None
        last = mine[-1]
        append_lines(
            self.path(LOG), [{"kind": "undo", "undoes": last["decision_id"], "labeler": labeler, "timestamp": now()}]
        )
        del self.decisions[last["decision_id"]]
        self.reconcile()
        return last

    def reconcile(self) -> None:
        """Makes each data file hold exactly the live decisions' lines (plus any lines it did not write)."""
        for name in DERIVED:
            path = self.path(name)
            expected = {key: derived_records(d)[name] for key, d in self.decisions.items()}
            lines = path.read_bytes().splitlines(keepends=True) if path.is_file() else []
            owners = [self._owner(path, number, raw) for number, raw in enumerate(lines, start=1)]
            counts = Counter(owners)
            # Lines of undone decisions, or a decision whose lines were cut short by a hand edit: rewritten.
            wrong = {key for key in counts if key is not None and len(expected.get(key, ())) != counts[key]}
            if wrong:
                rewrite_atomically(path, [raw for raw, key in zip(lines, owners, strict=True) if key not in wrong])
            missing = [line for key, records in expected.items() if key in wrong or not counts[key] for line in records]
            if missing:
                append_lines(path, missing)

    def _owner(self, path: Path, line_number: int, raw: bytes) -> str | None:
        """The decision a data line was derived from; None for blank lines and lines this tool did not write."""
        try:
            return json.loads(raw).get("decision_id") if raw.strip() else None
        except (ValueError, AttributeError):
            raise UserError(
                f"{path} line {line_number}: not a JSON object; fix or delete that line "
                f"(the decisions in {self.path(LOG)} are written into it again)"
            ) from None

    def samples(self) -> dict[str, dict]:
        path = self.path(SAMPLES)
        return {r["sample_id"]: r for r in read_jsonl(path)} if path.is_file() else {}


# ---------------------------------------------------------------------------------------------- sampling


class Sampler:
    """K answers per prompt from one stage's model, seeded by the prompt's position in the prompts file."""

    def __init__(self, model_path: Path, samples: int, max_new_tokens: int, temperature: float, seed: int):
        from .modeling import for_inference, load_model, load_tokenizer, sampling_line

        self.model_path = str(model_path)
        self.tokenizer = load_tokenizer(model_path)
        self.model = for_inference(load_model(model_path))
        self.settings = {"samples": samples, "max_new_tokens": max_new_tokens, "temperature": temperature}
        self.seed = seed
        # Plain sampling at the temperature, as `modeling.generate` does it, whatever the model's file suggests.
        print(sampling_line("label: answers", self.model, self.tokenizer, max_new_tokens, temperature))

    def answers(self, item: dict) -> dict:
        from .modeling import generate

        seed = self.seed + item["index"]
        responses = generate(
            self.model,
            self.tokenizer,
            [item["messages"]],
            max_new_tokens=self.settings["max_new_tokens"],
            temperature=self.settings["temperature"],
            samples=self.settings["samples"],
            seed=seed,
        )
        responses = [r.strip() for r in responses]
        return {
            **item,
            "responses": responses,
            # A letter first: spreadsheets read an all-digit (or digits-e-digits) id as a number and mangle it.
            "sample_id": "s" + short_hash([item["prompt"], responses]),
            "model": self.model_path,
            "generation": {**self.settings, "seed": seed},
        }


def model_path(args) -> Path:
    if args.model is not None:
        return args.model
    path = Path("models", args.recipe, args.stage)
    outputs.require(path, args.stage, args.recipe)
    return path


def load_prompts(args) -> list[dict]:
    source = args.prompts or Path("data", "processed", args.recipe, "prompts_train.jsonl")
    if not Path(source).exists():
        raise UserError(f"prompts file {source} does not exist: run `make data RECIPE={args.recipe}` or pass --prompts")
    rows = load_dataset_for(str(source), "prompts")[: args.limit]
    items, seen = [], set()
    for index, row in enumerate(rows):
        prompt = plain_prompt(row["prompt"])
        prompt_id = short_hash(prompt)
        if prompt_id not in seen:  # a repeated prompt is one labeling item
            seen.add(prompt_id)
            items.append({"index": index, "prompt": prompt, "prompt_id": prompt_id, "messages": row["prompt"]})
    return items


def new_decision(item: dict, labeler: str, verdict: str, preferred: int | None, source: str) -> dict:
    decision = {
        "kind": "decision",
        "decision_id": uuid.uuid4().hex,
        "labeler": labeler,
        "timestamp": now(),
        "source": source,
        **{key: item[key] for key in ("prompt_id", "sample_id", "prompt", "responses", "model", "generation")},
        "decision": verdict,
    }
    if preferred is not None:
        decision["preferred"] = preferred
    return decision


def describe(decision: dict) -> str:
    """The decision as a short word: a, b, ... for a preferred answer, else tie/accept/reject/skip."""
    return LETTERS[decision["preferred"]] if decision["decision"] == "prefer" else decision["decision"]


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


def decision_for_key(key: str, count: int) -> tuple[str, int | None] | None:
    if count > 1 and key in LETTERS[:count]:
        return "prefer", LETTERS.index(key)
    verdict = {"y": "accept", "n": "reject", "s": "skip", "t": "tie" if count > 1 else None}.get(key)
    return (verdict, None) if verdict else None


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


# ---------------------------------------------------------------------------------------------- batch mode


def export_samples(args) -> None:
    with LabelStore(args.out) as store:
        _export_with(store, args)


def _export_with(store: LabelStore, args) -> None:
    items = load_prompts(args)
    sampler = Sampler(model_path(args), args.k, args.max_new_tokens, args.temperature, args.seed)
    registry = store.samples()
    rows, new = [], []
    for item in items:
        sample = sampler.answers(item)
        record = {key: sample[key] for key in ("sample_id", "prompt_id", "prompt", "responses", "model", "generation")}
        if record["sample_id"] not in registry:
            registry[record["sample_id"]] = record
            new.append({**record, "timestamp": now()})
        row = {"sample_id": record["sample_id"], "prompt": as_cell(record["prompt"])}
        row |= {f"response_{LETTERS[i]}": text for i, text in enumerate(record["responses"])}
        rows.append(row | {"decision": "", "labeler": args.labeler_column})
    if new:
        append_lines(store.path(SAMPLES), new)
    target = args.file or store.path("to_label.csv")
    write_table(Path(target), rows)
    choices = ", ".join([*LETTERS[: args.k], *VERDICTS]) if args.k > 1 else "accept, reject, skip"
    print(
        f"label-export: wrote {len(rows)} prompts x {args.k} answers to {target}; fill in `decision` ({choices}; "
        f"leave it empty to leave a row unlabeled) and `labeler`, then `make label-import FILE={target}`"
    )


def as_cell(prompt) -> str:
    return prompt if isinstance(prompt, str) else json.dumps(prompt, ensure_ascii=False)


def write_table(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    if path.suffix == ".csv":
        with open(temporary, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    elif path.suffix == ".jsonl":
        temporary.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    else:
        raise UserError(f"{path}: unsupported file type {path.suffix!r}; use .csv or .jsonl")
    os.replace(temporary, path)


def read_table(path: Path) -> list[dict]:
    """Rows of a labeled CSV or JSONL file, each with its line number in `_line`."""
    if not path.is_file():
        raise UserError(f"decisions file {path} does not exist: pass FILE=<the labeled .csv or .jsonl>")
    if path.suffix == ".jsonl":
        return read_jsonl(path)
    if path.suffix != ".csv":
        raise UserError(f"{path}: unsupported file type {path.suffix!r}; use .csv or .jsonl")
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:  # -sig: Excel's "CSV UTF-8" starts with a BOM
            reader = csv.DictReader(handle)
            rows = []
            for row in reader:
                if None in row:
                    raise UserError(f"{path} line {reader.line_num}: more cells than the header has columns")
                rows.append({**row, "_line": reader.line_num})
    except UnicodeDecodeError as error:
        raise UserError(f"{path}: not UTF-8 ({error.reason}); re-save the file as UTF-8") from None
    except csv.Error as error:
        raise UserError(f"{path} line {reader.line_num}: invalid CSV ({error})") from None
    return rows


def import_decisions(args) -> None:
    """Validates the whole file first, then records its decisions: a bad line changes nothing."""
    with LabelStore(args.out) as store:
        _import_with(store, Path(args.file), args)


def _import_with(store: LabelStore, path: Path, args) -> None:
    rows = read_table(path)
    registry = store.samples()
    existing = {(d["labeler"], d["sample_id"]): d for d in store.decisions.values()}
    decisions, seen, already, empty = [], {}, 0, 0
    for row in rows:
        where = f"{path} line {row['_line']}"
        sample_id = str(row.get("sample_id") or "").strip()
        if not sample_id:
            raise UserError(
                f"{where}: field 'sample_id' is {'missing' if 'sample_id' not in row else 'empty'}; "
                "keep the column `make label-export` wrote"
            )
        sample = registry.get(sample_id)
        if sample is None:
            raise UserError(
                f"{where}: unknown sample_id {sample_id!r} (not in {store.path(SAMPLES)}): import only "
                f"rows of files `make label-export RECIPE={args.recipe}` wrote"
            )
        if "decision" not in row:
            raise UserError(f"{where}: field 'decision' is missing; keep the column `make label-export` wrote")
        key = str(row["decision"] or "").strip().lower()
        if not key:
            empty += 1
            continue
        count = len(sample["responses"])
        choices = [*LETTERS[:count], *VERDICTS] if count > 1 else ["accept", "reject", "skip"]
        if key not in choices:
            raise UserError(
                f"{where}: decision {row['decision']!r} is not one of {', '.join(choices)} "
                "(leave it empty for a row not labeled yet)"
            )
        labeler = str(row.get("labeler") or "").strip() or args.labeler_given
        if not labeler:
            raise UserError(f"{where}: no labeler: fill the `labeler` column or pass --labeler (LABELER=...)")
        if (labeler, sample_id) in seen:
            raise UserError(f"{where}: {labeler} labeled sample {sample_id} already on line {seen[labeler, sample_id]}")
        seen[labeler, sample_id] = row["_line"]
        preferred = LETTERS.index(key) if key in LETTERS[:count] else None
        verdict = "prefer" if preferred is not None else key
        earlier = existing.get((labeler, sample_id))
        if earlier is not None:
            if describe(earlier) != key:
                raise UserError(
                    f"{where}: {labeler} already labeled sample {sample_id} as {describe(earlier)!r} "
                    f"in {store.path(LOG)}: fix the row, or undo the earlier decision in `make label`"
                )
            already += 1
            continue
        decisions.append(new_decision(sample, labeler, verdict, preferred, source=f"import:{path.name}"))
    if decisions:
        store.record(decisions)
    labelers = ", ".join(sorted({d["labeler"] for d in decisions})) or "nobody"
    print(
        f"label-import: recorded {len(decisions)} decisions by {labelers} from {path} into {store.folder} "
        f"({already} already imported, {empty} rows left unlabeled)"
    )
    print_agreement(store)


# ---------------------------------------------------------------------------------------------- agreement


def agreement(decisions: list[dict]) -> list[dict]:
    """Percent agreement and Cohen's kappa for each pair of labelers, on the samples both decided (skips left out)."""
    by_sample: dict[str, dict[str, str]] = {}
    for decision in decisions:
        if decision["decision"] != "skip":
            by_sample.setdefault(decision["sample_id"], {})[decision["labeler"]] = describe(decision)
    labelers = sorted({labeler for votes in by_sample.values() for labeler in votes})
    results = []
    for first, second in itertools.combinations(labelers, 2):
        shared = [(v[first], v[second]) for v in by_sample.values() if first in v and second in v]
        if not shared:
            continue
        observed = sum(a == b for a, b in shared) / len(shared)
        left, right = Counter(a for a, _ in shared), Counter(b for _, b in shared)
        expected = sum(left[c] * right[c] for c in left) / len(shared) ** 2
        kappa = (observed - expected) / (1 - expected) if expected < 1 else None
        results.append({"labelers": (first, second), "shared": len(shared), "agreement": observed, "kappa": kappa})
    return results


def print_agreement(store: LabelStore) -> None:
    results = agreement(list(store.decisions.values()))
    if not results:
        print("agreement: no sample has been labeled by two labelers yet")
    for result in results:
        kappa = "n/a (both always chose the same)" if result["kappa"] is None else f"{result['kappa']:.2f}"
        first, second = result["labelers"]
        print(
            f"agreement: {first} vs {second} on {result['shared']} shared samples: "
            f"{100 * result['agreement']:.1f}% agree, Cohen's kappa {kappa}"
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
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--file", type=Path, help="export: where to write (.csv or .jsonl); import: what to read")
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
    args.labeler_column = args.labeler_given  # export leaves the column for whoever labels the file
    if args.command == "label":
        label_session(args)
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
