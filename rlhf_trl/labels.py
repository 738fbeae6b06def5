"""Human labels: one store, one sampler and the derived files, for every way a person labels.

The terminal tool (`rlhf_trl.label`, `make label`), batch export/import (`make label-export`/`label-import`)
and the web page (`rlhf_trl.ui`, `make ui`: its Label and Arena tabs) all read and write through this module,
so a decision made in one shows up in the others. Everything lands in data/labels/<recipe>/ (--out), not
inside data/processed/<recipe>/, which `make data --overwrite` rebuilds: human labels cannot be regenerated.

    decisions.jsonl     the source of truth: one line per decision or undo, appended and fsync'd at once
    accepted_data.jsonl / rejected_data.jsonl   the seed project's layout (prompt, response)
    pairs.jsonl         prompt/chosen/rejected, what the reward stage reads (`human_labels`, `label_mix`)
    samples.jsonl       the samples `export` handed out, so `import` can check every sample_id

`export --format hf` (`make label-export FORMAT=hf`, `export_dataset`) writes the live decisions as a parquet
dataset folder elsewhere, in TRL's preference and unpaired-preference (KTO) formats, with a README card.

Why it is built this way: the three data files are derived from the log, appended as each decision is
made, and reconciled with it at every start, so a crash or kill at any moment loses at most the decision
on screen and leaves valid JSONL. Undo appends a tombstone to the log and rewrites the data files without
that decision's lines (a temp file renamed over the old one); lines this tool did not write are kept.
One process holds the folder at a time (a file lock); inside it, threads (the web page's visitors) share one
`LabelStore`, whose writes are serialised by a lock. The samples of a prompt come from a seed derived from
the prompt's position, so the terminal, `export` and the web page show two labelers the same answers, which is
what `agreement` (percent agreement and Cohen's kappa per pair of labelers) compares.

Arena votes (`source: arena`, from the web page) are decisions too: `responses` holds the two stages' answers
in the order shown, `stages` and `sample_ids` say which stage wrote which, and `decision` is prefer (with
`preferred`), tie, or reject (both bad). `human_verdicts` turns them into a win rate per pair of stages with a
Wilson score interval (a tie half a win, both bad counted apart); `rlhf_trl.leaderboard` ranks every stage voted on;
`make report` prints both.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import itertools
import json
import math
import os
import threading
import unicodedata
import uuid
from collections import Counter
from datetime import datetime
from pathlib import Path

from . import outputs
from .data import ARENA, LABELS_LOG, check_unicode, load_dataset_for, read_csv, read_jsonl
from .data import is_arena_vote as is_arena
from .errors import UserError

STAGES = (*outputs.POLICY_STAGES, "export")
LOG, ACCEPTED, REJECTED, PAIRS, SAMPLES = (
    LABELS_LOG,
    "accepted_data.jsonl",
    "rejected_data.jsonl",
    "pairs.jsonl",
    "samples.jsonl",
)
DERIVED = (ACCEPTED, REJECTED, PAIRS)
# The terminal tool's sampling defaults, which the web page's Label tab uses too: the same seed and settings
# give two labelers the same answers (and sample ids) whichever of the two they label in.
LABEL_SETTINGS = {"max_new_tokens": 64, "temperature": 0.7, "seed": 0}
LETTERS = "abcd"  # at most four answers side by side; other keys never clash with these
VERDICTS = ("tie", "accept", "reject", "skip")
MAX_LABELER = 40
LABELER_PUNCTUATION = " ._@+-"


def now() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


def plain_prompt(messages: list[dict]):
    """A lone user turn as its text (the seed's layout), any longer conversation as its messages."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    return messages


def short_hash(value) -> str:
    return hashlib.sha1(json.dumps(value, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:12]


def normalize_labeler(name) -> str:
    """One spelling per person: NFKC (full-width and compatibility forms), invisible format characters (zero-width
    spaces and joiners, direction marks, a BOM) and control characters removed, runs of spaces made one, stripped,
    then casefolded, so `Alice`, `alice` and `alice` + U+200B are one labeler. `check_labeler` applies it to every
    name that comes in (the terminal tool, label-import's rows, the web page); the store to the names in its log."""
    text = unicodedata.normalize("NFKC", str(name or ""))
    text = "".join(c for c in text if unicodedata.category(c) not in ("Cf", "Cc"))
    return " ".join(text.split()).casefold()


def check_labeler(name) -> str:
    """The labeler name as `normalize_labeler` spells it; ValueError saying why when it is empty, longer than
    MAX_LABELER characters, or holds anything but letters, digits, spaces and . _ @ + - (first a letter or digit).

    Names go into the decision log and the agreement tables, never into a path or a command.
    """
    name = normalize_labeler(name)
    if not name:
        raise ValueError("enter your name first: every decision records who made it")
    if len(name) > MAX_LABELER:
        raise ValueError(f"a labeler name is at most {MAX_LABELER} characters; this one has {len(name)}")
    if not name[0].isalnum() or not all(c.isalnum() or c in LABELER_PUNCTUATION for c in name):
        raise ValueError(
            "a labeler name holds letters, digits, spaces and . _ @ + - only, and starts with a letter or digit"
        )
    return name


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
        for key in (
            "labeler",
            "timestamp",
            "source",
            "model",
            "generation",
            "decision_id",
            "sample_id",
            "stages",
            "runs",
        )
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


def live_decisions(records) -> dict[str, dict]:
    """The decisions of a log's records that no later undo took back, by id, in the order they were made."""
    decisions: dict[str, dict] = {}
    for record in records:
        record.pop("_line", None)
        if record.get("kind") == "undo":
            decisions.pop(record.get("undoes"), None)
        elif record.get("kind") == "decision":
            # A log written before names were normalized may spell one person several ways (QA D11).
            record["labeler"] = normalize_labeler(record.get("labeler"))
            decisions[record["decision_id"]] = record
    return decisions


def read_decisions(folder: Path) -> list[dict]:
    """The live decisions in a labels folder, read without taking its lock (`make report` while `make ui` runs).

    A last line still being written (no newline yet) is left out; the log is not repaired here.
    """
    log = Path(folder) / LOG
    if not log.is_file():
        return []
    data = log.read_bytes()
    lines = data.split(b"\n")
    torn = lines.pop()  # b"" when the log ends with its newline
    records = []
    for number, raw in enumerate(lines, start=1):
        if raw.strip():
            try:
                records.append(json.loads(raw))
            except ValueError:
                raise UserError(f"{log} line {number}: not valid JSON; fix or delete that line") from None
    try:
        records += [json.loads(torn)] if torn.strip() else []
    except ValueError:
        pass  # the tail of a write in progress, or cut short (the next LabelStore mends it)
    return list(live_decisions(records).values())


class LabelStore:
    """The labels folder: the decision log and the data files derived from it. One process holds it at a time;
    its threads share this object (record, undo and reads take `self.mutex`)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        busy = (
            f"{self.folder} is in use by another labeling session (make label, make ui, import): finish that one "
            "first, or label into another folder with --out"
        )
        self._lock = outputs.hold_lock(self.folder / ".lock", busy)  # held for the whole session
        self.mutex = threading.RLock()
        for name in (LOG, *DERIVED, SAMPLES):
            mend_torn_tail(self.folder / name)
        log = self.folder / LOG
        self.decisions = live_decisions(read_jsonl(log) if log.is_file() else [])
        self.reconcile()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._lock.close()  # releases the lock

    def path(self, name: str) -> Path:
        return self.folder / name

    def by(self, labeler: str, arena: bool = False) -> list[dict]:
        """The labeler's live decisions: labels (terminal, import, web Label tab), or with `arena` arena votes."""
        with self.mutex:
            return [d for d in self.decisions.values() if d["labeler"] == labeler and is_arena(d) == arena]

    def all(self) -> list[dict]:
        with self.mutex:
            return list(self.decisions.values())

    def record(self, decisions: list[dict]) -> None:
        """The log first: a kill between the two writes is repaired from it by the next `reconcile`."""
        with self.mutex:
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
        """Takes back the labeler's last label (arena votes are not undone: the person saw the stages)."""
        with self.mutex:
            mine = self.by(labeler)
            if not mine:
                return None
            last = mine[-1]
            append_lines(
                self.path(LOG),
                [{"kind": "undo", "undoes": last["decision_id"], "labeler": labeler, "timestamp": now()}],
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

    def __init__(
        self, model_path: Path, samples: int, max_new_tokens: int, temperature: float, seed: int, announce: bool = True
    ):
        """`announce`: print the sampling settings line (the web page prints its own: its settings come later)."""
        from .modeling import for_inference, load_model, load_tokenizer, sampling_line

        self.model_path = str(model_path)
        self.run = outputs.run_id(model_path)  # read first: a retrain after this shows as another run
        self.tokenizer = load_tokenizer(model_path)
        self.model = for_inference(load_model(model_path))
        self.settings = {"samples": samples, "max_new_tokens": max_new_tokens, "temperature": temperature}
        self.seed = seed
        # Plain sampling at the temperature, as `modeling.generate` does it, whatever the model's file suggests.
        if announce:
            print(sampling_line("label: answers", self.model, self.tokenizer, max_new_tokens, temperature))

    def with_settings(self, samples: int, max_new_tokens: int, temperature: float) -> Sampler:
        """This sampler's loaded model and seed with other settings (the web page loads each stage once)."""
        other = copy.copy(self)
        other.settings = {"samples": samples, "max_new_tokens": max_new_tokens, "temperature": temperature}
        return other

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
            "run": self.run,
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
    return read_prompts(Path(source), args.limit)


def read_prompts(source: Path, limit: int | None = None) -> list[dict]:
    """The labeling items of a prompts file: each distinct prompt once, with its position (`index`, its seed)."""
    rows = load_dataset_for(str(source), "prompts")[:limit]
    items, seen = [], set()
    for index, row in enumerate(rows):
        prompt = plain_prompt(row["prompt"])
        prompt_id = short_hash(prompt)
        if prompt_id not in seen:  # a repeated prompt is one labeling item
            seen.add(prompt_id)
            items.append({"index": index, "prompt": prompt, "prompt_id": prompt_id, "messages": row["prompt"]})
    return items


def new_decision(item: dict, labeler: str, verdict: str, preferred: int | None, source: str) -> dict:
    """A decision on a sampled item (`Sampler.answers`, or `arena_item`, whose `stages` and `sample_ids` it keeps).

    Raises UserError when its text holds a lone surrogate (`data.check_unicode`): the log is UTF-8."""
    check_unicode(
        {key: item.get(key) for key in ("prompt", "responses")}, f"the decision on sample {item.get('sample_id')}"
    )
    decision = {
        "kind": "decision",
        "decision_id": uuid.uuid4().hex,
        "labeler": labeler,
        "timestamp": now(),
        "source": source,
        **{key: item[key] for key in ("prompt_id", "sample_id", "prompt", "responses", "model", "generation")},
        **{key: item[key] for key in ("stages", "sample_ids", "runs") if key in item},
        "decision": verdict,
    }
    if preferred is not None:
        decision["preferred"] = preferred
    return decision


def describe(decision: dict) -> str:
    """The decision as a short word: a, b, ... for a preferred answer, else tie/accept/reject/skip."""
    return LETTERS[decision["preferred"]] if decision["decision"] == "prefer" else decision["decision"]


def decision_for_key(key: str, count: int) -> tuple[str, int | None] | None:
    """(verdict, preferred) for a key (a-d, t tie, y accept, n reject, s skip) on `count` answers; None if none."""
    if count > 1 and key in LETTERS[:count]:
        return "prefer", LETTERS.index(key)
    verdict = {"y": "accept", "n": "reject", "s": "skip", "t": "tie" if count > 1 else None}.get(key)
    return (verdict, None) if verdict else None


# ---------------------------------------------------------------------------------------------- arena

# Pipeline order: a verdict is stated for the later stage over the earlier one ("PPO over SFT"). Stages not
# listed sort between the methods and export, by name.
STAGE_ORDER = ("base", *outputs.POLICY_STAGES)
ARENA_CHOICES = {"a": ("prefer", 0), "b": ("prefer", 1), "tie": ("tie", None), "both bad": ("reject", None)}


def stage_rank(stage: str) -> tuple:
    if stage in STAGE_ORDER:
        return (STAGE_ORDER.index(stage), "")
    return (len(STAGE_ORDER) + (1 if stage == "export" else 0), stage)


def arena_item(item: dict, shown: list[dict]) -> dict:
    """An arena item from a prompt and each stage's one-answer sample (`Sampler.answers`), in the order shown."""
    sample_ids = [s["sample_id"] for s in shown]
    return {
        **item,
        "responses": [s["responses"][0] for s in shown],
        "stages": [s["stage"] for s in shown],
        "sample_ids": sample_ids,
        "model": [s["model"] for s in shown],
        "runs": [s.get("run") for s in shown],  # which run of each stage was judged (`outputs.run_id`)
        "generation": shown[0]["generation"],
        # The same two answers make the same id whatever order they were shown in.
        "sample_id": "a" + short_hash(sorted(sample_ids)),
    }


def arena_vote(item: dict, labeler: str, choice: str) -> dict:
    """The decision for an arena choice: "a", "b", "tie" or "both bad" (ValueError for anything else)."""
    if choice not in ARENA_CHOICES:
        raise ValueError(f"unknown arena choice {choice!r}: one of {', '.join(ARENA_CHOICES)}")
    verdict, preferred = ARENA_CHOICES[choice]
    return new_decision(item, labeler, verdict, preferred, source=ARENA)


def stage_runs(models: Path) -> dict[str, str]:
    """The run each finished stage folder in `models` holds now (`outputs.run_id`), by folder name."""
    models = Path(models)
    folders = sorted(p for p in models.iterdir() if p.is_dir()) if models.is_dir() else []
    return {folder.name: run for folder in folders if (run := outputs.run_id(folder))}


def current_votes(decisions: list[dict], runs: dict[str, str]) -> tuple[list[dict], int]:
    """(the decisions without the arena votes on other runs than `runs` (`stage_runs`) holds, how many of those).

    A vote counts for the runs it judged: after a stage is retrained its old votes say nothing about the new model
    (QA D12). Votes recorded before votes named their runs cannot say which they judged, so they count as older too;
    all stay in the log."""
    kept, older = [], 0
    for decision in decisions:
        judged = dict(zip(decision.get("stages", ()), decision.get("runs") or (), strict=False))
        if is_arena(decision) and any(judged.get(stage) != runs.get(stage) for stage in decision.get("stages", ())):
            older += 1
        else:
            kept.append(decision)
    return kept, older


def older_votes_line(older: int) -> str:
    """What `current_votes` left out, said where the verdicts are shown."""
    votes = f"{older} arena vote" + ("s" if older != 1 else "")
    return (
        f"{votes} left out: they judged earlier runs of these stages (retrained since), or were recorded before "
        "votes named their run; they stay in decisions.jsonl"
    )


def wilson_interval(wins: float, votes: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval (95% for the default z) of a proportion of `wins` in `votes`.

    Wilson (1927); unlike the normal approximation it stays inside [0, 1] and is sensible for few votes
    (8 of 10: 0.490 to 0.943). `wins` may hold halves (ties). ValueError for no votes.
    """
    if votes <= 0:
        raise ValueError("no votes: no interval")
    p, z2 = wins / votes, z * z
    centre = (p + z2 / (2 * votes)) / (1 + z2 / votes)
    half = z / (1 + z2 / votes) * math.sqrt(p * (1 - p) / votes + z2 / (4 * votes * votes))
    return max(0.0, centre - half), min(1.0, centre + half)


def arena_outcome(vote: dict) -> str:
    """What an arena vote says, whatever side each answer was shown on: the preferred stage's name, "tie" or
    "both bad"."""
    if vote["decision"] == "prefer":
        return vote["stages"][vote["preferred"]]
    return "tie" if vote["decision"] == "tie" else "both bad"


def arena_score(vote: dict, stage: str) -> float | None:
    """`stage`'s score in an arena vote it was judged in: 1 a win, 0 a loss, 0.5 a tie, None for "both bad" (it
    says nothing about which answer is better: counted apart, never as a tie)."""
    said = arena_outcome(vote)
    if said == "both bad":
        return None
    return 0.5 if said == "tie" else float(said == stage)


def human_verdicts(decisions: list[dict]) -> list[dict]:
    """Win rate of the later stage over the earlier one, for each pair of stages with arena votes.

    A vote for the later stage counts 1, for the earlier 0, a tie one half (`arena_score`; as the reward-model win
    rate of `rlhf_trl.evaluate` counts ties); "both bad" is counted apart. Returns dicts with stages (later,
    earlier), win_rate, low, high (Wilson 95%; all None when every vote was both bad), votes (both bad left out),
    both_bad and labelers, the pairs in pipeline order.
    """
    by_pair: dict[tuple[str, str], list[dict]] = {}
    for decision in decisions:
        if is_arena(decision) and len(set(decision.get("stages", ()))) == 2:
            pair = tuple(sorted(decision["stages"], key=stage_rank, reverse=True))
            by_pair.setdefault(pair, []).append(decision)
    results = []
    for (later, earlier), votes in sorted(by_pair.items(), key=lambda kv: [stage_rank(s) for s in kv[0][::-1]]):
        scores = [score for v in votes if (score := arena_score(v, later)) is not None]
        low, high = wilson_interval(sum(scores), len(scores)) if scores else (None, None)
        results.append(
            {
                "stages": (later, earlier),
                "win_rate": sum(scores) / len(scores) if scores else None,
                "low": low,
                "high": high,
                "votes": len(scores),
                "both_bad": len(votes) - len(scores),
                "labelers": len({v["labeler"] for v in votes}),
            }
        )
    return results


def verdict_line(verdict: dict) -> str:
    """human win rate of PPO over SFT: 0.80 (95% CI 0.49-0.94, 10 votes, 2 labelers; 1 both bad, left out)"""
    later, earlier = (stage.upper() for stage in verdict["stages"])
    labelers = f"{verdict['labelers']} labeler" + ("s" if verdict["labelers"] != 1 else "")
    votes = f"{verdict['votes']} vote" + ("s" if verdict["votes"] != 1 else "")
    both_bad = f"; {verdict['both_bad']} both bad, left out" if verdict.get("both_bad") else ""
    if verdict["win_rate"] is None:
        return f"human win rate of {later} over {earlier}: none ({verdict['both_bad']} both bad only, {labelers})"
    return (
        f"human win rate of {later} over {earlier}: {verdict['win_rate']:.2f} "
        f"(95% CI {verdict['low']:.2f}-{verdict['high']:.2f}, {votes}, {labelers}{both_bad})"
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
    """Rows of a labeled CSV or JSONL file, each with its line number in `_line`, read by `data`'s rules for every
    user file (`data.read_text`: a BOM dropped; a CSV's delimiter detected, its rows of empty cells left out)."""
    if not path.is_file():
        raise UserError(f"decisions file {path} does not exist: pass FILE=<the labeled .csv or .jsonl>")
    if path.suffix == ".jsonl":
        return read_jsonl(path)
    if path.suffix != ".csv":
        raise UserError(f"{path}: unsupported file type {path.suffix!r}; use .csv or .jsonl")
    return read_csv(path)


def import_decisions(args) -> None:
    """Validates the whole file first, then records its decisions: a bad line changes nothing."""
    with LabelStore(args.out) as store:
        _import_with(store, Path(args.file), args)


def _import_with(store: LabelStore, path: Path, args) -> None:
    rows = read_table(path)
    registry = store.samples()
    existing = {(d["labeler"], d["sample_id"]): d for d in store.all()}
    decisions, seen, already, empty, renamed = [], {}, 0, 0, {}
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
        given = str(row.get("labeler") or "").strip() or args.labeler_given
        if not given:
            raise UserError(f"{where}: no labeler: fill the `labeler` column or pass --labeler (LABELER=...)")
        try:
            labeler = check_labeler(given)  # the rule of make label and the web page
        except ValueError as error:
            raise UserError(f"{where}: labeler {given!r}: {error}; fix the `labeler` column") from None
        if labeler != given:
            renamed[given] = labeler
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
    for given, labeler in sorted(renamed.items()):
        print(f"label-import: labeler {given!r} recorded as {labeler!r} (names are compared case- and width-blind)")
    print(
        f"label-import: recorded {len(decisions)} decisions by {labelers} from {path} into {store.folder} "
        f"({already} already imported, {empty} rows left unlabeled)"
    )
    print_agreement(store)


# ---------------------------------------------------------------------------------------------- dataset export

# TRL's two formats, conversational, plus who decided what when: the configs of `make label-export FORMAT=hf`.
EXPORT_META = ("labeler", "timestamp", "source", "decision_id", "sample_id")
EXPORT_FILE = "train-00000-of-00001.parquet"


def _export_features() -> dict:
    """The `datasets.Features` of each config (`data.EXPORT_CONFIGS` names what each stage reads)."""
    from datasets import Features, Value

    messages = [{"role": Value("string"), "content": Value("string")}]
    meta = {key: Value("string") for key in EXPORT_META}
    return {
        "preference": Features({"prompt": messages, "chosen": messages, "rejected": messages, **meta}),
        "unpaired": Features({"prompt": messages, "completion": messages, "label": Value("bool"), **meta}),
    }


def as_messages(prompt) -> list[dict]:
    """A decision's prompt (text, or messages: `plain_prompt`) as a conversation of {role, content} turns."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [{"role": turn["role"], "content": turn["content"]} for turn in prompt]


def dataset_rows(decisions: list[dict]) -> tuple[dict[str, list[dict]], Counter]:
    """The decisions as rows of TRL's preference format (prompt/chosen/rejected, from the lines `derived_records`
    gives pairs.jsonl) and unpaired-preference format (prompt/completion/label: accepted_data.jsonl's lines true,
    rejected_data.jsonl's false), conversational, each with `EXPORT_META`. Returns them and what was left out:
    arena votes (they judge held-out prompts that evaluation measures with, see `data.human_label_pairs`) and answers
    that are empty (no stage can train on them)."""
    rows: dict[str, list[dict]] = {"preference": [], "unpaired": []}
    left_out = Counter()
    for decision in decisions:
        if is_arena(decision):
            left_out["arena votes"] += 1
            continue
        derived = derived_records(decision)
        meta = {key: str(decision.get(key) or "") for key in EXPORT_META}
        prompt = as_messages(decision["prompt"])

        def answer(text: str) -> list[dict]:
            return [{"role": "assistant", "content": text}]

        for pair in derived[PAIRS]:
            if not (pair["chosen"].strip() and pair["rejected"].strip()):
                left_out["pairs with an empty answer"] += 1
                continue
            rows["preference"].append(
                {"prompt": prompt, "chosen": answer(pair["chosen"]), "rejected": answer(pair["rejected"]), **meta}
            )
        for name, label in ((ACCEPTED, True), (REJECTED, False)):
            for line in derived[name]:
                if not line["response"].strip():
                    left_out["empty answers"] += 1
                    continue
                completion = answer(line["response"])
                rows["unpaired"].append({"prompt": prompt, "completion": completion, "label": label, **meta})
    return rows, left_out


def export_card(recipe: str, source: Path, target: Path, rows: dict, decisions: list[dict], left_out) -> str:
    """The README.md of an export: the configs (for `datasets.load_dataset`), then counts, labelers and dates."""
    written = [name for name in ("preference", "unpaired") if rows[name]]
    configs = "".join(
        f"- config_name: {name}\n  data_files:\n  - split: train\n    path: {name}/train-*.parquet\n"
        + ("  default: true\n" if name == written[0] else "")
        for name in written
    )
    kept = [d for d in decisions if not is_arena(d)]
    by_labeler = Counter(d["labeler"] for d in kept)
    kinds = Counter(d["decision"] for d in kept)
    times = sorted(d["timestamp"] for d in kept if d.get("timestamp"))
    desirable = sum(row["label"] for row in rows["unpaired"])
    lines = [
        "---",
        f"configs:\n{configs.rstrip()}",
        "tags:\n- rlhf-trl\n- trl\n- human-feedback",
        "---",
        f"# Human labels of the {recipe} recipe",
        "",
        f"Exported by `make label-export FORMAT=hf RECIPE={recipe}` (rlhf-trl) from `{source}` on {now()}.",
        "",
        "| config | format (TRL) | rows |",
        "|---|---|---|",
        f"| preference{' (default)' if written[:1] == ['preference'] else ''} | preference: prompt, chosen, rejected | "
        + (f"{len(rows['preference'])}" if rows["preference"] else "0 (not written)")
        + " |",
        f"| unpaired{' (default)' if written[:1] == ['unpaired'] else ''} | unpaired preference (KTO): prompt, "
        f"completion, label | {len(rows['unpaired'])} ({desirable} desirable, {len(rows['unpaired']) - desirable} "
        "undesirable) |",
        "",
        f"Decisions: {len(kept)} ({', '.join(f'{n} {kind}' for kind, n in sorted(kinds.items())) or 'none'}), "
        f"made from {times[0] if times else '-'} to {times[-1] if times else '-'}.",
        f"Labelers: {', '.join(f'{name} ({n})' for name, n in sorted(by_labeler.items())) or 'none'}.",
        "Left out: " + (", ".join(f"{n} {what}" for what, n in sorted(left_out.items())) or "nothing") + ".",
        "Each row names its `labeler`, `timestamp`, `source`, `decision_id` and `sample_id`.",
        "",
        f'Load it with `datasets.load_dataset("{target}")` (the default config) or `load_dataset("{target}", '
        '"unpaired")`. rlhf-trl stages take the folder as `dataset_name` or in `human_labels`: the reward stage and '
        "DPO read its preference pairs, KTO its unpaired rows.",
        "",
    ]
    return "\n".join(lines)


def is_export(folder: Path) -> bool:
    """True when `folder` holds nothing but what `export_dataset` writes (README.md and the config folders)."""
    return all(entry.name in ("README.md", "preference", "unpaired") for entry in folder.iterdir())


def export_dataset(args) -> Path:
    """`make label-export FORMAT=hf`: the labels folder's live decisions (`read_decisions`: no lock needed, so the
    web page may keep running) as a parquet dataset folder (`--file`, default `<labels folder>-hf`) that
    `datasets.load_dataset` reads: a config per format (`dataset_rows`; one without rows is not written) and a README
    card (`export_card`). An existing folder is refused unless `--overwrite`, and replaced only when it holds nothing
    but an earlier export. Written as `<folder>.partial` and renamed when complete."""
    import shutil

    from datasets import Dataset

    target = Path(args.file) if args.file else args.out.with_name(args.out.name + "-hf")
    if target.exists():
        if not args.overwrite:
            raise UserError(
                f"{target} exists: add --overwrite (make label-export FORMAT=hf ARGS=--overwrite) to replace it, or "
                "FILE=<another folder>"
            )
        if not target.is_dir() or not is_export(target):
            raise UserError(f"{target} is not a label export (it holds other files): move it away or choose FILE=")
    decisions = read_decisions(args.out)
    rows, left_out = dataset_rows(decisions)
    if not rows["preference"] and not rows["unpaired"]:
        raise UserError(
            f"{args.out} holds no decision to export ({len(decisions)} decisions, left out: "
            f"{', '.join(f'{n} {what}' for what, n in sorted(left_out.items())) or 'none'}): label first (`make label`)"
        )
    work = target.with_name(target.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    features = _export_features()
    for name, config_rows in rows.items():
        if config_rows:
            (work / name).mkdir()
            columns = {key: [row[key] for row in config_rows] for key in features[name]}
            Dataset.from_dict(columns, features=features[name]).to_parquet(str(work / name / EXPORT_FILE))
    card = export_card(args.recipe, args.out, target, rows, decisions, left_out)
    (work / "README.md").write_text(card, encoding="utf-8")
    if target.exists():
        shutil.rmtree(target)
    work.rename(target)
    desirable = sum(row["label"] for row in rows["unpaired"])
    dropped = ", ".join(f"{n} {what}" for what, n in sorted(left_out.items()))
    print(
        f"label-export: wrote {len(rows['preference'])} preference pairs and {len(rows['unpaired'])} unpaired rows "
        f"({desirable} desirable) from {len(decisions)} decisions to {target}"
        + (f" (left out: {dropped})" if dropped else "")
        + "; datasets.load_dataset reads it, and every training stage takes it as dataset_name or human_labels"
    )
    return target


# ---------------------------------------------------------------------------------------------- agreement


def agreement(decisions: list[dict]) -> list[dict]:
    """Percent agreement and Cohen's kappa for each pair of labelers, on the samples both decided (skips left out).

    Arena votes are left out too: each person saw the two answers in their own random order.
    """
    by_sample: dict[str, dict[str, str]] = {}
    for decision in decisions:
        if decision["decision"] != "skip" and not is_arena(decision):
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
    results = agreement(store.all())
    if not results:
        print("agreement: no sample has been labeled by two labelers yet")
    for result in results:
        kappa = "n/a (both always chose the same)" if result["kappa"] is None else f"{result['kappa']:.2f}"
        first, second = result["labelers"]
        print(
            f"agreement: {first} vs {second} on {result['shared']} shared samples: "
            f"{100 * result['agreement']:.1f}% agree, Cohen's kappa {kappa}"
        )
