"""Loading and validating data for every stage, in one place.

Sources: a local .jsonl/.json/.parquet/.csv file, a local folder (a `git clone` of a Hub dataset repo
works), or a Hub dataset id. Formats are detected from the fields and converted to the conversational
forms TRL's trainers take, so that every model is trained through its chat template:

    alpaca             instruction, input?, output        -> prompt/completion
    messages           messages (last turn = assistant)   -> prompt/completion
    prompt_completion  prompt, completion                 -> prompt/completion
    preference         prompt?, chosen, rejected          -> prompt/chosen/rejected (no prompt: TRL's implicit-
                                                             prompt format, see `split_implicit_prompt`)
    prompt             prompt                             -> prompt (PPO rollouts)
    accepted/rejected  the seed project's accepted_data.jsonl + rejected_data.jsonl, joined on the prompt
                                                          -> prompt/chosen/rejected

Bad records fail early with the file, the line and the field, rather than deep inside a trainer.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import re
from pathlib import Path

from .cli import UserError

FILE_TYPES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
FORMAT_FIELDS = {  # checked in order: the first whose required fields are all present wins
    "preference": ("chosen", "rejected"),
    "alpaca": ("instruction", "output"),
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "prompt": ("prompt",),
}
STAGE_FORMATS = {
    "sft": ("alpaca", "messages", "prompt_completion"),
    "reward": ("preference",),
    "prompts": ("prompt", "alpaca", "messages", "prompt_completion", "preference"),
}


def read_jsonl(path: Path) -> list[dict]:
    records = []
    with open(path, "rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise UserError(
                    f"{path} line {line_number}: not UTF-8 ({error.reason}); re-save the file as UTF-8"
                ) from None
            if not line.strip():
                continue
            try:
                # without its line ending, so that a line cut short is reported where it stops, not at column 1
                # of the next line (where the decoder's position lands when the newline is still there)
                record = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as error:
                raise UserError(
                    f"{path} line {line_number}: invalid JSON ({error.msg} at column {error.colno})"
                ) from None
            if not isinstance(record, dict):
                raise UserError(f"{path} line {line_number}: expected a JSON object, got {type(record).__name__}")
            record["_line"] = line_number
            records.append(record)
    return records


def load_records(source: str, split: str = "train", config: str | None = None) -> list[dict]:
    """Reads every record of `source` as dicts; JSONL records carry their line number in `_line`."""
    path = Path(source)
    if path.is_file():
        if path.suffix == ".jsonl":
            records = read_jsonl(path)
        elif path.suffix == ".csv":
            records = _load_with_datasets(
                "csv", data_files=str(path), split="train", source=source, **csv_as_text(path, source)
            )
        elif path.suffix in FILE_TYPES:
            records = _load_with_datasets(FILE_TYPES[path.suffix], data_files=str(path), split="train", source=source)
        else:
            raise UserError(f"{path}: unsupported file type {path.suffix!r}; use one of {', '.join(FILE_TYPES)}")
    elif path.is_dir():
        records = _load_with_datasets(str(path), name=config, split=split, source=source)
    elif looks_like_hub_id(source):
        if os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1":
            raise UserError(
                f"dataset {source} is a Hub id but the Hub is offline: `git clone` it elsewhere into data/raw/ and "
                f'set dataset_name to that folder (ARGS="--dataset_name data/raw/{path.name}")'
            )
        records = _load_with_datasets(source, name=config, split=split, source=source)
    else:
        raise UserError(f"data file {source} does not exist: check dataset_name in the recipe (or run `make data`)")
    if not records:
        raise UserError(f"{source} holds no records: add data or point dataset_name at a non-empty file")
    return records


def csv_as_text(path: Path, source: str) -> dict:
    """`datasets` csv-builder options that read every cell of the CSV file `path` as the text in the file.

    Left to itself the builder (pandas `read_csv`) infers column types, so answers such as `3.10`, `02134`, `1.50`
    and `007` would come back as 3.1, 2134, 1.5 and 7, and cells reading `NA`, `null` or `None` as missing. Here
    every column is declared a string (`features`, which the builder passes to pandas as the column dtype) and only
    a blank cell is missing (None). Raises UserError when the file has no header line or repeats a column name.
    """
    import csv

    import datasets

    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:  # as pandas, past a BOM
            header = next(csv.reader(handle), None)
    except UnicodeDecodeError as error:
        raise UserError(f"{source}: not UTF-8 ({error.reason}); re-save the file as UTF-8") from None
    if not header:
        raise UserError(f"{source}: no header line; the first line must name the columns (e.g. instruction,output)")
    repeated = sorted({name for name in header if header.count(name) > 1})
    if repeated:
        raise UserError(f"{source}: column {repeated[0]!r} appears more than once in the header: name each column once")
    return {
        "features": datasets.Features({name: datasets.Value("string") for name in header}),
        "keep_default_na": False,
        "na_values": [""],
    }


def looks_like_hub_id(source: str) -> bool:
    """`owner/name` that is not a local path: what the Hub would be asked for."""
    return str(source).count("/") == 1 and not str(source).startswith((".", "/", "data/", "models/"))


def _load_with_datasets(*args, source: str, **kwargs) -> list[dict]:
    import datasets
    from accelerate import PartialState

    try:
        # load_dataset writes an Arrow cache: under several processes the main one builds it and the others
        # then read it, instead of all of them writing the same cache files at once.
        with PartialState().main_process_first():
            return list(datasets.load_dataset(*args, **kwargs))
    except (ValueError, FileNotFoundError, datasets.exceptions.DatasetsError) as error:
        raise UserError(f"could not read dataset {source}: {str(error).splitlines()[0][:300]}") from None


def detect_format(records: list[dict], source: str, forced: str = "auto") -> str:
    fields = set(records[0]) - {"_line"}
    if forced != "auto":
        if forced not in FORMAT_FIELDS:
            raise UserError(f"dataset_format {forced!r} is unknown: use auto or one of {', '.join(FORMAT_FIELDS)}")
        if not set(FORMAT_FIELDS[forced]) <= fields:
            raise UserError(
                f"{source}: dataset_format {forced} needs fields {list(FORMAT_FIELDS[forced])}, found {sorted(fields)}"
            )
        return forced
    for name, required in FORMAT_FIELDS.items():
        if set(required) <= fields:
            return name
    raise UserError(
        f"{source}: no known data format; found fields {sorted(fields)}, expected one of "
        + "; ".join(f"{name} ({', '.join(req)})" for name, req in FORMAT_FIELDS.items())
    )


def _where(source: str, record: dict, index: int) -> str:
    return f"{source} line {record['_line']}" if "_line" in record else f"{source} record {index + 1}"


def as_text(value):
    """A field's value as text, or None when it is absent.

    None, NaN (what pandas and `datasets` make of a blank CSV cell) and whitespace-only strings are absent. A number
    is text: CSV readers type a column of answers such as `5` or `1969` as integers, and a column of integers with
    a blank cell as floats, so an integral float is written without its `.0` (2.0 -> "2"). Lists (messages) and any
    other type are returned unchanged, for the caller to check.
    """
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        value = float(value)
        if math.isnan(value):
            return None
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, str) and not value.strip():
        return None
    return value


def _text(record: dict, key: str, where: str, required: bool = True):
    """A non-empty string (numbers become text, see `as_text`), or a non-empty list of {role, content} messages.

    An optional field that is missing, null, NaN or only whitespace is absent (None); a required one raises
    UserError naming the field and why.
    """
    value = as_text(record.get(key))
    if value is None or (isinstance(value, list) and not value):
        if not required:
            return None
        state = "missing" if key not in record else "empty"
        raise UserError(f"{where}: field '{key}' is {state}: every record needs it")
    if isinstance(value, list):
        for message in value:
            if not isinstance(message, dict) or "role" not in message or not str(message.get("content", "")).strip():
                raise UserError(f"{where}: field '{key}' must hold messages with 'role' and non-empty 'content'")
        return value
    if not isinstance(value, str):
        raise UserError(f"{where}: field '{key}' must be text or a list of messages, not {type(value).__name__}")
    return value


# A line that opens the answerer's turn in a plain-text transcript ("Assistant:", as in Anthropic's HH-RLHF).
ANSWER_MARKER = re.compile(r"^[ \t]*(?:assistant|gpt|bot|ai|### response)[ \t]*:", re.IGNORECASE | re.MULTILINE)


def split_implicit_prompt(chosen, rejected, where: str) -> tuple:
    """(prompt, chosen, rejected) of a pair in TRL's implicit-prompt format, where `chosen` and `rejected` are whole
    conversations (or whole texts) that open the same way.

    The shared opening is found by TRL's `extract_prompt` (trl/data_utils.py). Conversations: the shared leading
    messages are the prompt, and it ends before each side's last assistant turn, which is the answer; the two sides
    may differ only in that turn. Texts: TRL's shared leading characters, cut back to a boundary: just after the last
    answer marker line ("Assistant:", "### Response:") in the shared text when there is one, else to the last
    whitespace when the cut falls inside a word (TRL would split "It is blue" / "It is bad" into "It is b" + "lue";
    here it is "It is" + "blue"). Raises UserError naming the line when the sides share no prompt, differ before
    the last answer, or one of them has no answer left.
    """
    from trl import extract_prompt

    if isinstance(chosen, list) != isinstance(rejected, list):
        raise UserError(f"{where}: 'chosen' and 'rejected' must both be conversations or both be texts")
    if isinstance(chosen, list):
        shared = len(extract_prompt({"chosen": chosen, "rejected": rejected})["prompt"])
        last = [
            max((i for i, m in enumerate(side) if m["role"] == "assistant"), default=-1) for side in (chosen, rejected)
        ]
        if min(last) < 0:
            raise UserError(f"{where}: 'chosen' and 'rejected' each need an assistant turn, the answer being compared")
        shared = min(shared, *last)
        if shared == 0:
            raise UserError(
                f"{where}: 'chosen' and 'rejected' share no opening messages, so there is no prompt: add a 'prompt' "
                "field, or start both conversations with the same turns"
            )
        if shared != last[0] or shared != last[1]:
            raise UserError(
                f"{where}: 'chosen' and 'rejected' differ at message {shared + 1}, before their last assistant turn: "
                "a pair compares two answers to the same conversation, so give both sides the same earlier turns"
            )
        return chosen[:shared], chosen[shared:], rejected[shared:]
    cut = len(extract_prompt({"chosen": chosen, "rejected": rejected})["prompt"])
    markers = list(ANSWER_MARKER.finditer(chosen[:cut]))
    if markers:
        cut = markers[-1].end()
    elif chosen[cut - 1 : cut].strip() and (chosen[cut : cut + 1].strip() or rejected[cut : cut + 1].strip()):
        # the cut falls inside a word: back off to the whitespace before it
        cut = max(chosen.rfind(" ", 0, cut), chosen.rfind("\n", 0, cut), 0)
    prompt, good, bad = chosen[:cut].strip(), chosen[cut:].strip(), rejected[cut:].strip()
    if not prompt:
        raise UserError(
            f"{where}: 'chosen' and 'rejected' share no opening text, so there is no prompt: add a 'prompt' field, "
            "or start both texts with the same prompt"
        )
    for name, text in (("chosen", good), ("rejected", bad)):
        if not text:
            raise UserError(f"{where}: '{name}' holds nothing after the prompt it shares with the other side")
    return prompt, good, bad


def _as_messages(value, role: str) -> list[dict]:
    return value if isinstance(value, list) else [{"role": role, "content": value}]


def convert(
    records: list[dict], purpose: str, source: str, fmt: str = "auto", skipped: list[str] | None = None
) -> list[dict]:
    """Validates `records` and converts them to TRL's conversational form for `purpose` (sft/reward/prompts).

    An invalid record raises UserError, or, when a `skipped` list is given, is left out and its reason
    appended there (data preparation drops and reports what training would refuse).
    """
    fmt = detect_format(records, source, fmt)
    if fmt not in STAGE_FORMATS[purpose]:
        raise UserError(
            f"{source}: {fmt} data cannot be used for {purpose}; expected {' or '.join(STAGE_FORMATS[purpose])}"
        )
    out = []
    for index, record in enumerate(records):
        try:
            out.append(_convert_one(record, fmt, purpose, _where(source, record, index)))
        except UserError as error:
            if skipped is None:
                raise
            skipped.append(str(error))
    return out


def _convert_one(record: dict, fmt: str, purpose: str, where: str) -> dict:
    if fmt == "preference":
        prompt = _text(record, "prompt", where, required=False)
        chosen, rejected = _text(record, "chosen", where), _text(record, "rejected", where)
        if prompt is None:
            prompt, chosen, rejected = split_implicit_prompt(chosen, rejected, where)
        prompt = _as_messages(prompt, "user")
        if purpose != "reward":
            return {"prompt": prompt}
        return {
            "prompt": prompt,
            "chosen": _as_messages(chosen, "assistant"),
            "rejected": _as_messages(rejected, "assistant"),
        }
    if fmt == "alpaca":
        instruction = _text(record, "instruction", where)
        extra = _text(record, "input", where, required=False)
        prompt = _as_messages(instruction + (f"\n\n{extra}" if extra else ""), "user")
        completion = _as_messages(_text(record, "output", where), "assistant")
    elif fmt == "messages":
        messages = _text(record, "messages", where)
        if messages[-1]["role"] != "assistant":
            raise UserError(f"{where}: the last message must be the assistant's answer")
        prompt, completion = messages[:-1], messages[-1:]
    else:
        prompt = _as_messages(_text(record, "prompt", where), "user")
        completion = _as_messages(_text(record, "completion", where), "assistant") if fmt != "prompt" else None
    return {"prompt": prompt, "completion": completion} if purpose == "sft" else {"prompt": prompt}


SEED_FILES = ("accepted_data.jsonl", "rejected_data.jsonl")
PROMPT_FIELDS = ("prompt", "instruction", "query", "question")
ANSWER_FIELDS = ("response", "output", "completion", "answer", "chosen", "rejected", "text")


def seed_pair_files(source: str) -> tuple[Path, Path] | None:
    """The seed project's layout: a folder holding both files, or the path of accepted_data.jsonl."""
    path = Path(source)
    folder = path if path.is_dir() else path.parent if path.name == SEED_FILES[0] else None
    if folder is not None and all((folder / name).is_file() for name in SEED_FILES):
        return folder / SEED_FILES[0], folder / SEED_FILES[1]
    return None


def _answers_by_prompt(path: Path, keep=None) -> dict[str, tuple]:
    """prompt key -> (prompt, [answers], first line) for one of the two seed files (the records `keep` keeps)."""
    records = [record for record in read_jsonl(path) if keep is None or keep(record)]
    if not records:
        raise UserError(f"{path} holds no records")
    grouped: dict[str, tuple] = {}
    for record in records:
        where = f"{path} line {record['_line']}"
        prompt_field = next((f for f in PROMPT_FIELDS if f in record), None)
        answer_field = next((f for f in ANSWER_FIELDS if f in record), None)
        if prompt_field is None or answer_field is None:
            raise UserError(
                f"{where}: needs a prompt field ({'/'.join(PROMPT_FIELDS)}) and an answer field "
                f"({'/'.join(ANSWER_FIELDS)}); found {sorted(set(record) - {'_line'})}"
            )
        prompt = _text(record, prompt_field, where)
        extra = _text(record, "input", where, required=False) if prompt_field == "instruction" else None
        if extra:
            prompt = f"{prompt}\n\n{extra}"
        answer = _text(record, answer_field, where)
        # Prompts match when they differ only in case and whitespace.
        key = " ".join(prompt.split()).lower() if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)
        grouped.setdefault(key, (prompt, [], record["_line"]))[1].append(answer)
    return grouped


def join_accepted_rejected(accepted: Path, rejected: Path, allow_unmatched: bool = False, keep=None) -> list[dict]:
    """Pairs each prompt's accepted answers with its rejected ones (cycling the shorter list)."""
    good, bad = _answers_by_prompt(accepted, keep), _answers_by_prompt(rejected, keep)
    only_good, only_bad = [k for k in good if k not in bad], [k for k in bad if k not in good]
    matched = [k for k in good if k in bad]
    if (only_good or only_bad) and (not allow_unmatched or not matched):
        example = good[only_good[0]][0] if only_good else bad[only_bad[0]][0] if only_bad else ""
        fix = "fix the files" + (
            f" or add --allow_unmatched true to train on the {len(matched)} matched prompts" if matched else ""
        )
        raise UserError(
            f"{len(only_good)} prompts in {accepted.name} have no rejected answer and {len(only_bad)} in "
            f"{rejected.name} no accepted one (first: {str(example)[:60]!r}): {fix}"
        )
    pairs = []
    for key in matched:
        (prompt, chosen, line), (_, refused, _) = good[key], bad[key]
        for i in range(max(len(chosen), len(refused))):
            pairs.append(
                {
                    "prompt": prompt,
                    "chosen": chosen[i % len(chosen)],
                    "rejected": refused[i % len(refused)],
                    "_line": line,
                }
            )
    return pairs


def load_dataset_for(
    source: str,
    purpose: str,
    split: str = "train",
    config: str | None = None,
    fmt: str = "auto",
    allow_unmatched: bool = False,
    keep=None,
) -> list[dict]:
    """Any supported source (the seed's accepted/rejected folder included), validated and converted for `purpose`;
    `keep`, a test of a raw record, leaves out those it fails."""
    seed_files = seed_pair_files(source)
    if seed_files is not None:
        records = join_accepted_rejected(*seed_files, allow_unmatched=allow_unmatched, keep=keep)
        return convert(records, purpose, str(seed_files[0]))
    records = load_records(source, split, config)
    return convert([r for r in records if keep is None or keep(r)], purpose, source, fmt)


LABEL_MIXES = ("generated", "human", "mix")
ARENA = "arena"  # the `source` of the web page's blind A/B votes (rlhf_trl.labels)


def is_arena_vote(record: dict) -> bool:
    """A decision of the web page's Arena tab, or a line the labels store derived from one: those carry `source:
    arena` and the `stages` that answered (older labels folders have the stages only)."""
    return record.get("source") == ARENA or "stages" in record


def human_label_pairs(script_args, stage: str = "reward") -> list[dict]:
    """The human preference pairs from `human_labels` (see `label_mix`), converted for training; `stage` (reward,
    dpo) names the stage in what is printed.

    In `mix` mode a file nobody has labeled into yet is skipped with a note, so a recipe can name the labels
    file before it exists and behave exactly as before; in `human` mode there must be labels.

    Arena votes (`is_arena_vote`) are left out, and counted, unless `arena_votes_as_training` is set: they are
    votes on the held-out prompts (prompts_eval.jsonl) that `make eval`, `make compare` and the reward model's own
    held-out pairs measure with, so training on them would grade the models on what they were taught (QA D20).
    """
    pairs, left_out = [], []
    allowed = getattr(script_args, "arena_votes_as_training", False)

    def keep(record: dict) -> bool:
        if allowed or not is_arena_vote(record):
            return True
        left_out.append(record)
        return False

    for source in script_args.human_labels:
        if not Path(source).exists() and script_args.label_mix == "mix":
            print(f"{stage}: no human labels at {source} yet (`make label` writes them); using generated pairs there")
            continue
        if not Path(source).exists():
            raise UserError(
                f"human_labels {source} does not exist: label some answers first (`make label`) or set label_mix: mix"
            )
        pairs += load_dataset_for(source, "reward", allow_unmatched=script_args.allow_unmatched, keep=keep)
    if left_out:
        print(
            f"{stage}: left out {len(left_out)} human_labels record(s) from arena votes: they judge held-out prompts, "
            "which evaluation measures with (set arena_votes_as_training: true to train on them anyway)"
        )
    return pairs


def mix_training_pairs(script_args, generated: list[dict], seed: int, stage: str = "reward") -> list[dict]:
    """Training pairs as `label_mix` says: generated alone, human labels alone, or both (see `human_fraction`)."""
    import random

    mode, fraction = script_args.label_mix, script_args.human_fraction
    if mode not in LABEL_MIXES:
        raise UserError(f"label_mix {mode!r} is unknown: use one of {', '.join(LABEL_MIXES)}")
    if mode == "generated":
        return generated
    if mode == "human" and not script_args.human_labels:
        raise UserError("label_mix: human needs human_labels (e.g. [data/labels/<recipe>/pairs.jsonl])")
    if fraction is not None and not 0 < fraction <= 1:
        raise UserError(f"human_fraction {fraction} must be in (0, 1]: the share of training pairs that are human")
    human = human_label_pairs(script_args, stage)
    if mode == "human":
        if not human:
            files = ", ".join(script_args.human_labels)
            raise UserError(f"{files} hold no preference pairs: label more with `make label`")
        print(f"{stage}: training on {len(human)} human pairs (label_mix: human)")
        return human
    if human and fraction is not None:
        # Human labels are the scarce side: the generated pairs are subsampled (seeded) to reach the share.
        wanted = round(len(human) * (1 - fraction) / fraction)
        if wanted < len(generated):
            generated = random.Random(seed).sample(generated, wanted)
    if human:
        print(f"{stage}: training on {len(generated)} generated + {len(human)} human pairs (label_mix: mix)")
    return generated + human


def load_splits(script_args, purpose: str, seed: int, stage: str | None = None):
    """(train, eval) as `datasets.Dataset`s; eval comes from eval_dataset_name or a seeded hold-out.

    For preference pairs (`purpose` reward: the reward stage, and DPO with `stage="dpo"`), human labels join the
    training pairs as `label_mix` says; held-out pairs come from eval_dataset_name either way, so runs with and
    without human labels compare on the same pairs. `stage` (default: `purpose`) names the stage in what is printed.
    """
    from datasets import Dataset

    label_mix = getattr(script_args, "label_mix", "generated") if purpose == "reward" else "generated"
    if not script_args.dataset_name and label_mix != "human":
        raise UserError("no dataset_name set: add `dataset_name: <file, folder or Hub id>` to the recipe")
    options = {
        "config": script_args.dataset_config,
        "fmt": script_args.dataset_format,
        "allow_unmatched": script_args.allow_unmatched,
    }
    train = []
    if label_mix != "human":
        train = load_dataset_for(script_args.dataset_name, purpose, script_args.dataset_train_split, **options)
        if script_args.max_train_samples and script_args.eval_dataset_name:  # before mixing: human pairs all stay
            train = train[: script_args.max_train_samples]
    if purpose == "reward":
        train = mix_training_pairs(script_args, train, seed, stage or purpose)
    if script_args.eval_dataset_name:
        evaluation = load_dataset_for(script_args.eval_dataset_name, purpose, "test", **options)
    else:
        split = Dataset.from_list(train).train_test_split(test_size=script_args.eval_split_size, seed=seed)
        train, evaluation = split["train"].to_list(), split["test"].to_list()
    if script_args.max_train_samples and not script_args.eval_dataset_name:
        train = train[: script_args.max_train_samples]
    return Dataset.from_list(train), Dataset.from_list(evaluation)
