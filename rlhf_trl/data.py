"""Loading and validating data for every stage, in one place.

Sources: a local .jsonl/.json/.parquet/.csv file, a local folder (a `git clone` of a Hub dataset repo
works), or a Hub dataset id. Formats are detected from the fields and converted to the conversational
forms TRL's trainers take, so that every model is trained through its chat template:

    alpaca             instruction, input?, output        -> prompt/completion
    messages           messages (last turn = assistant)   -> prompt/completion
    prompt_completion  prompt, completion                 -> prompt/completion
    preference         prompt?, chosen, rejected          -> prompt/chosen/rejected (no prompt: TRL's implicit-
                                                             prompt format, see `split_implicit_prompt`)
    unpaired           prompt, completion, label          -> prompt/completion/label (KTO; TRL's unpaired
                                                             preference format, label true = desirable)
    prompt             prompt                             -> prompt (PPO rollouts)
    accepted/rejected  the seed project's accepted_data.jsonl + rejected_data.jsonl, joined on the prompt
                                                          -> prompt/chosen/rejected (prompts in one file only
                                                             are counted and left out: `join_accepted_rejected`)
                                                          -> prompt/completion/label for KTO, every row
                                                             (`unpaired_seed_records`)
    label export       `make label-export FORMAT=hf`'s folder: its `preference` config for pairs, its `unpaired`
                       config for KTO (`export_config`)

KTO (purpose "kto") takes unpaired rows, and preference pairs split into one desirable and one undesirable row.

Bad records fail early with the file, the line and the field, rather than deep inside a trainer.
"""

from __future__ import annotations

import csv
import json
import math
import numbers
import os
import re
from pathlib import Path

from .errors import UserError

FILE_TYPES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
FORMAT_FIELDS = {  # checked in order: the first whose required fields are all present wins
    "preference": ("chosen", "rejected"),
    "alpaca": ("instruction", "output"),
    "messages": ("messages",),
    "unpaired": ("prompt", "completion", "label"),
    "prompt_completion": ("prompt", "completion"),
    "prompt": ("prompt",),
}
STAGE_FORMATS = {
    "sft": ("alpaca", "messages", "prompt_completion"),
    "reward": ("preference",),
    "kto": ("unpaired", "preference"),
    "prompts": ("prompt", "alpaca", "messages", "prompt_completion", "preference", "unpaired"),
}
# A `make label-export FORMAT=hf` folder holds one config per format (labels.export_dataset): what each purpose reads.
EXPORT_CONFIGS = {"reward": "preference", "kto": "unpaired", "prompts": "unpaired"}


BOM = "\ufeff"  # "UTF-8 with BOM" (Windows Notepad, PowerShell 5's Out-File, Excel's "CSV UTF-8") opens with it
LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # json.loads makes one of a "\\ud83d" escape without its pair
CSV_DELIMITERS = ",;\t"  # comma; semicolon (Excel where the decimal mark is a comma); tab


def read_text(path: Path) -> str:
    """A user's text file as str, by the rules every reader of user files shares (JSONL, JSON, CSV; data and labels):
    UTF-8, a leading BOM dropped. Bytes that are not UTF-8 raise UserError naming the file and the line."""
    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        raise UserError(f"{path} line {line}: not UTF-8 ({error.reason}); re-save the file as UTF-8") from None
    return text.removeprefix(BOM)


def check_unicode(value, where: str, field: str | None = None) -> None:
    """Raises UserError naming `where` and the field when a string in `value` (a record, nested lists and dicts
    included) holds a lone surrogate: JSON's `"\\ud83d"` escape is valid JSON but not a character (half of an emoji,
    cut by a scraper or a truncated dump), and no tokenizer, Arrow table or UTF-8 file can take it."""
    if isinstance(value, str):
        bad = LONE_SURROGATE.search(value)
        if bad:
            raise UserError(
                f"{where}: field '{field}' holds a lone surrogate \\u{ord(bad[0]):04x} at character {bad.start() + 1} "
                "(half of a character such as an emoji, cut in two): fix or delete that text"
            )
    elif isinstance(value, dict):
        for key, item in value.items():
            check_unicode(item, where, key if field is None else field)
    elif isinstance(value, list):
        for item in value:
            check_unicode(item, where, field)


def _json_record(text: str, where: str) -> dict:
    try:
        record = json.loads(text)
    except json.JSONDecodeError as error:
        raise UserError(f"{where}: invalid JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(record).__name__}")
    check_unicode(record, where)
    return record


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSON Lines file (`read_text`'s rules, lone surrogates refused), each with its `_line`."""
    records = []
    for line_number, line in enumerate(read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        # without its line ending, so that a line cut short is reported where it stops, not at column 1
        # of the next line (where the decoder's position lands when the newline is still there)
        record = _json_record(line.rstrip("\r"), f"{path} line {line_number}")
        record["_line"] = line_number
        records.append(record)
    return records


def read_json(path: Path) -> list[dict]:
    """The records of a .json file: one array of objects (each with its `_line`: where the object starts), or, as
    `datasets` reads a .json file, one object per line."""
    text = read_text(path)
    if not text.lstrip().startswith("["):
        return read_jsonl(path)
    try:
        array = json.loads(text)
    except json.JSONDecodeError as error:
        raise UserError(f"{path} line {error.lineno}: invalid JSON ({error.msg} at column {error.colno})") from None
    records, decoder, position = [], json.JSONDecoder(), text.index("[") + 1
    for index, record in enumerate(array):
        # where the object starts: the array's items in order, each found past the previous one
        position = text.find("{", position) if isinstance(record, dict) else position
        line = text.count("\n", 0, position) + 1
        where = f"{path} line {line}"
        if not isinstance(record, dict):
            raise UserError(f"{path} record {index + 1}: expected a JSON object, got {type(record).__name__}")
        check_unicode(record, where)
        records.append({**record, "_line": line})
        position = decoder.raw_decode(text, position)[1]
    return records


def csv_delimiter(header: str) -> str:
    """The delimiter of a CSV file from its header line: whichever of comma, semicolon and tab splits it into the most
    columns (quotes respected); a one-column header is comma-separated."""
    columns = {d: len(next(csv.reader([header], delimiter=d), [])) for d in CSV_DELIMITERS}
    return max(CSV_DELIMITERS, key=lambda d: (columns[d], d == ","))


def read_csv(path: Path) -> list[dict]:
    """The rows of a CSV file as dicts of the text in each cell (`read_text`'s rules; the delimiter by
    `csv_delimiter`), each with its `_line`; a blank cell is None, and every cell is text as written: `3.10`,
    `02134`, `007` and `NA` stay what they are (pandas' type inference would make them 3.1, 2134, 7 and missing).

    Rows whose every cell is blank (a spreadsheet's cleared rows, `,,,,`) are left out, and their count printed.
    Raises UserError when there is no header line, a column name repeats, or a row has more cells than the header.
    """
    import io

    text = read_text(path)
    header_line = text.split("\n", 1)[0].rstrip("\r")
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=csv_delimiter(header_line))
    try:
        header = [name.strip() for name in next(reader, [])]
        if not any(header):
            raise UserError(f"{path}: no header line; the first line must name the columns (e.g. instruction,output)")
        repeated = sorted({name for name in header if header.count(name) > 1})
        if repeated:
            raise UserError(
                f"{path}: column {repeated[0]!r} appears more than once in the header: name each column once"
            )
        rows, blank = [], []
        for cells in reader:
            if not cells:  # an empty line
                continue
            if not any(cell.strip() for cell in cells):
                blank.append(reader.line_num)
                continue
            if len(cells) > len(header) and any(cell.strip() for cell in cells[len(header) :]):
                raise UserError(f"{path} line {reader.line_num}: more cells than the header has columns")
            cells += [""] * (len(header) - len(cells))
            row = {name: cell if cell != "" else None for name, cell in zip(header, cells, strict=False)}
            rows.append({**row, "_line": reader.line_num})
    except csv.Error as error:
        raise UserError(f"{path} line {reader.line_num}: invalid CSV ({error})") from None
    if blank:
        lines = ", ".join(map(str, blank[:5])) + (", ..." if len(blank) > 5 else "")
        print(f"{path}: left out {len(blank)} rows whose every cell is empty (line {lines})")
    return rows


def load_records(source: str, split: str = "train", config: str | None = None, split_key: str = "") -> list[dict]:
    """Reads every record of `source` as dicts; records of JSONL, JSON and CSV files carry their line in `_line`.

    `split` is the split of a folder or Hub dataset (a file has one); `split_key` names the setting that chose it
    (dataset_train_split, dataset_test_split), for the error when the dataset has no such split.
    """
    path = Path(source)
    if path.is_file():
        readers = {".jsonl": read_jsonl, ".json": read_json, ".csv": read_csv}
        if path.suffix in readers:
            records = readers[path.suffix](path)
        elif path.suffix in FILE_TYPES:
            records = _load_with_datasets(FILE_TYPES[path.suffix], data_files=str(path), split="train", source=source)
        else:
            raise UserError(f"{path}: unsupported file type {path.suffix!r}; use one of {', '.join(FILE_TYPES)}")
    elif path.is_dir():
        records = _load_with_datasets(str(path), name=config, split=split, source=source, split_key=split_key)
    elif looks_like_hub_id(source):
        if os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1":
            raise UserError(
                f"dataset {source} is a Hub id but the Hub is offline: `git clone` it elsewhere into data/raw/ and "
                f'set dataset_name to that folder (ARGS="--dataset_name data/raw/{path.name}")'
            )
        records = _load_with_datasets(source, name=config, split=split, source=source, split_key=split_key)
    else:
        raise UserError(f"data file {source} does not exist: check dataset_name in the recipe (or run `make data`)")
    if not records:
        raise UserError(f"{source} holds no records: add data or point dataset_name at a non-empty file")
    return records


def looks_like_hub_id(source: str) -> bool:
    """`owner/name` that is not a local path: what the Hub would be asked for."""
    return str(source).count("/") == 1 and not str(source).startswith((".", "/", "data/", "models/"))


def _load_with_datasets(*args, source: str, split_key: str = "", **kwargs) -> list[dict]:
    import tempfile

    import datasets
    from accelerate import PartialState

    try:
        if Path(source).exists():
            # Local data gets an Arrow cache of its own, deleted once read: datasets 5.2 keys the cache of a folder
            # with README configs (a cloned Hub dataset) by the folder's name alone, so an edited copy, or another
            # folder of the same name, would load the first one's records without a word.
            with tempfile.TemporaryDirectory(prefix="rlhf_trl-data-") as cache:
                return list(datasets.load_dataset(*args, cache_dir=cache, **kwargs))
        # load_dataset writes an Arrow cache: under several processes the main one builds it and the others
        # then read it, instead of all of them writing the same cache files at once.
        with PartialState().main_process_first():
            return list(datasets.load_dataset(*args, **kwargs))
    except (ValueError, FileNotFoundError, datasets.exceptions.DatasetsError) as error:
        message = str(error).splitlines()[0][:300]
        unknown = re.match(r"Unknown split \"(.*)\"\. Should be one of (\[.*\])", message)
        if unknown:
            key = f"set {split_key} to one of them" if split_key else "choose one of them"
            raise UserError(
                f"dataset {source} has no split {unknown[1]!r}; its splits are {unknown[2]}: {key}"
            ) from None
        if Path(source).is_dir():  # name the file and line where one of the folder's text files breaks the rules
            readers = {".jsonl": read_jsonl, ".json": read_json, ".csv": read_csv}
            for file in sorted(Path(source).rglob("*")):
                if file.suffix in readers and ".git" not in file.parts:
                    readers[file.suffix](file)
        raise UserError(f"could not read dataset {source}: {message}") from None


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


TEXT_PART_TYPES = ("text", "input_text", "output_text")  # TRL's and OpenAI's chat/responses text parts


def content_text(content, where: str, key: str):
    """A message's `content` as text: a string, or a list of typed parts (OpenAI's and TRL's multimodal layout,
    `[{"type": "text", "text": ...}]`) whose text parts are joined as they are written, with nothing between them
    (as the chat templates that take parts render them). Any other part (an image, audio, a file) raises UserError:
    this pipeline trains text models, and a template would print the list's Python repr into the text."""
    if not isinstance(content, list):
        return as_text(content)
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
        if kind not in TEXT_PART_TYPES or not isinstance(part.get("text"), str):
            raise UserError(
                f"{where}: field '{key}' has a content part of type {kind!r}; only text parts "
                '({"type": "text", "text": ...}) can be trained here: remove the other parts or the record'
            )
        texts.append(part["text"])
    return as_text("".join(texts))


def _text(record: dict, key: str, where: str, required: bool = True):
    """A non-empty string (numbers become text, see `as_text`), or a non-empty list of {role, content} messages,
    each content text (`content_text`: a list of text parts is joined).

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
        messages = []
        for message in value:
            content = content_text(message.get("content"), where, key) if isinstance(message, dict) else None
            if not isinstance(content, str) or "role" not in message:
                raise UserError(f"{where}: field '{key}' must hold messages with 'role' and non-empty 'content'")
            messages.append({**message, "content": content})
        return messages
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
    """Validates `records` and converts them to TRL's conversational form for `purpose` (sft/reward/kto/prompts).

    An invalid record raises UserError, or, when a `skipped` list is given, is left out and its reason
    appended there (data preparation drops and reports what training would refuse). For KTO, preference pairs
    become unpaired rows (`unpair`).
    """
    fmt = detect_format(records, source, fmt)
    if fmt not in STAGE_FORMATS[purpose]:
        raise UserError(
            f"{source}: {fmt} data cannot be used for {purpose}; expected {' or '.join(STAGE_FORMATS[purpose])}"
        )
    if purpose == "kto" and fmt == "preference":
        return unpair(convert(records, "reward", source, fmt, skipped), source)
    out = []
    for index, record in enumerate(records):
        try:
            out.append(_convert_one(record, fmt, purpose, _where(source, record, index)))
        except UserError as error:
            if skipped is None:
                raise
            skipped.append(str(error))
    return out


def unpair(pairs: list[dict], source: str) -> list[dict]:
    """Converted preference pairs as KTO's unpaired rows, as TRL's `unpair_preference_dataset` splits them: each
    pair's chosen answer a desirable row, its rejected answer an undesirable one. A pair whose two answers are the
    same says nothing about either: left out, and counted."""
    rows, same = [], 0
    for pair in pairs:
        if pair["chosen"] == pair["rejected"]:
            same += 1
            continue
        for side, label in (("chosen", True), ("rejected", False)):
            rows.append({"prompt": pair["prompt"], "completion": pair[side], "label": label})
    if same:
        print(f"{source}: left out {same} pairs whose chosen and rejected answers are the same (neither is better)")
    return rows


LABEL_WORDS = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False}


def _label(record: dict, where: str) -> bool:
    """An unpaired row's `label`: true (a desirable answer) or false (an undesirable one); JSON/parquet booleans,
    or true/false, yes/no, 1/0 as a CSV writes them."""
    value = record.get("label")
    if isinstance(value, bool):
        return value
    text = as_text(value)
    if isinstance(text, str) and text.strip().lower() in LABEL_WORDS:
        return LABEL_WORDS[text.strip().lower()]
    raise UserError(
        f"{where}: field 'label' is {value!r}: use true (the answer is desirable) or false (it is undesirable)"
    )


# Fields that hold part of what the model is asked in the layouts people use (Alpaca and LLaMA-Factory: instruction,
# input, system, history; Intel/orca_dpo_pairs: system, question; argilla's orca pairs: system, input; Dolly:
# context; query). A format reads those it knows (`PROMPT_READS`); one present that it does not read is refused
# rather than dropped, since training without it teaches another task (`unread_fields`).
CONTEXT_FIELDS = ("prompt", "question", "query", "instruction", "input", "context", "system", "history")
PREFERENCE_PROMPTS = ("prompt", "question", "query", "instruction", "input")  # a preference pair's prompt, any one
PROMPT_READS = {
    "preference": ("prompt", "question", "query", "instruction", "input", "system"),
    "alpaca": ("instruction", "input", "system", "history"),
    "messages": ("system",),
    "prompt_completion": ("prompt", "system"),
    "unpaired": ("prompt", "system"),
    "prompt": ("prompt", "system"),
}


def unread_fields(record: dict, fmt: str, where: str) -> None:
    """Raises UserError when `record` holds a field of `CONTEXT_FIELDS` (with a value) that format `fmt` does not
    read: nothing a person wrote into the prompt side is dropped without a word."""
    unread = [f for f in CONTEXT_FIELDS if f not in PROMPT_READS[fmt] and as_text(record.get(f)) not in (None, [])]
    if unread:
        reads = ", ".join(FORMAT_FIELDS[fmt] + tuple(f for f in PROMPT_READS[fmt] if f not in FORMAT_FIELDS[fmt]))
        raise UserError(
            f"{where}: field '{unread[0]}' is not read by the {fmt} format (it reads {reads}): training without it "
            "would drop part of the prompt; rename it to a field the format reads, or delete it"
        )


def preference_prompt(record: dict, where: str):
    """A preference pair's prompt: `prompt`, or the one other prompt field its layout has (`question` in
    Intel/orca_dpo_pairs, `instruction` with an optional `input` in Alpaca-style pairs, `input` alone in argilla's
    pairs, `query`), or None (TRL's implicit-prompt format). Two prompt fields raise UserError."""
    present = [f for f in PREFERENCE_PROMPTS if as_text(record.get(f)) is not None]
    if present[1:] and present != ["instruction", "input"]:
        raise UserError(
            f"{where}: fields {present[0]!r} and {present[1]!r} both look like the prompt: keep one (or use "
            "'instruction' with 'input', as Alpaca does)"
        )
    if not present:
        return None
    if present[0] == "instruction":
        return _alpaca_prompt(record, where)
    return _text(record, present[0], where)


def _alpaca_prompt(record: dict, where: str) -> str:
    instruction = _text(record, "instruction", where)
    extra = _text(record, "input", where, required=False)
    if isinstance(instruction, list) or isinstance(extra, list):
        raise UserError(f"{where}: 'instruction' and 'input' must be text")
    return instruction + (f"\n\n{extra}" if extra else "")


def _history(record: dict, where: str) -> list[dict]:
    """LLaMA-Factory's Alpaca `history`: earlier [question, answer] turns, as messages."""
    history = record.get("history")
    if history is None or (isinstance(history, list) and not history):
        return []
    if not isinstance(history, list) or not all(isinstance(t, list | tuple) and len(t) == 2 for t in history):
        raise UserError(f"{where}: field 'history' must be a list of [question, answer] pairs")
    turns = []
    for question, answer in history:
        if not all(isinstance(text, str) and text.strip() for text in (question, answer)):
            raise UserError(f"{where}: field 'history' must be a list of [question, answer] pairs of text")
        turns += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return turns


def _with_system(record: dict, prompt: list[dict], where: str) -> list[dict]:
    """`prompt` with the record's `system` text as its first turn."""
    system = _text(record, "system", where, required=False)
    if system is None:
        return prompt
    if not isinstance(system, str):
        raise UserError(f"{where}: field 'system' must be text")
    if prompt and prompt[0]["role"] == "system":
        raise UserError(f"{where}: a 'system' field and a system turn in the conversation: keep one")
    return [{"role": "system", "content": system}, *prompt]


def _convert_one(record: dict, fmt: str, purpose: str, where: str) -> dict:
    unread_fields(record, fmt, where)
    if fmt == "preference":
        prompt = preference_prompt(record, where)
        chosen, rejected = _text(record, "chosen", where), _text(record, "rejected", where)
        if prompt is None:
            prompt, chosen, rejected = split_implicit_prompt(chosen, rejected, where)
        prompt = _with_system(record, _as_messages(prompt, "user"), where)
        if purpose != "reward":
            return {"prompt": prompt}
        return {
            "prompt": prompt,
            "chosen": _as_messages(chosen, "assistant"),
            "rejected": _as_messages(rejected, "assistant"),
        }
    if fmt == "alpaca":
        prompt = _history(record, where) + _as_messages(_alpaca_prompt(record, where), "user")
        completion = _as_messages(_text(record, "output", where), "assistant")
    elif fmt == "messages":
        messages = _text(record, "messages", where)
        if messages[-1]["role"] != "assistant":
            raise UserError(f"{where}: the last message must be the assistant's answer")
        prompt, completion = messages[:-1], messages[-1:]
    else:
        prompt = _as_messages(_text(record, "prompt", where), "user")
        completion = _as_messages(_text(record, "completion", where), "assistant") if fmt != "prompt" else None
    prompt = _with_system(record, prompt, where)
    if purpose == "kto":
        return {"prompt": prompt, "completion": completion, "label": _label(record, where)}
    return {"prompt": prompt, "completion": completion} if purpose == "sft" else {"prompt": prompt}


SEED_FILES = ("accepted_data.jsonl", "rejected_data.jsonl")
LABELS_LOG = "decisions.jsonl"  # the log of a labels folder (rlhf_trl.labels.LOG), beside the seed files it derives
PROMPT_FIELDS = ("prompt", "instruction", "query", "question")
ANSWER_FIELDS = ("response", "output", "completion", "answer", "chosen", "rejected", "text")


def seed_files(source: str) -> tuple[Path | None, Path | None] | None:
    """The seed project's layout: a folder holding accepted_data.jsonl and/or rejected_data.jsonl, or the path of
    accepted_data.jsonl. Returns the two paths, None for a file that is absent; None when neither is there."""
    path = Path(source)
    folder = path if path.is_dir() else path.parent if path.name == SEED_FILES[0] else None
    if folder is None:
        return None
    found = tuple(folder / name if (folder / name).is_file() else None for name in SEED_FILES)
    return found if any(found) else None


def seed_pair_files(source: str) -> tuple[Path, Path] | None:
    """The seed project's layout with both files, as pairing needs them (`seed_files`)."""
    found = seed_files(source)
    return found if found is not None and all(found) else None


def _seed_record(record: dict, where: str, required: bool = True) -> tuple:
    """(prompt, answer) of one line of a seed file; the answer is None when it is empty and not `required`."""
    prompt_field = next((f for f in PROMPT_FIELDS if f in record), None)
    answer_field = next((f for f in ANSWER_FIELDS if f in record), None)
    if prompt_field is None or answer_field is None:
        raise UserError(
            f"{where}: needs a prompt field ({'/'.join(PROMPT_FIELDS)}) and an answer field "
            f"({'/'.join(ANSWER_FIELDS)}); found {sorted(set(record) - {'_line'})}"
        )
    read = (prompt_field, "input") if prompt_field == "instruction" else (prompt_field,)
    unread = [f for f in CONTEXT_FIELDS if f not in read and as_text(record.get(f)) is not None]
    if unread:
        raise UserError(
            f"{where}: field '{unread[0]}' is not read next to '{prompt_field}' (the prompt): training without it "
            "would drop part of the prompt; keep one prompt field"
        )
    prompt = _alpaca_prompt(record, where) if prompt_field == "instruction" else _text(record, prompt_field, where)
    return prompt, _text(record, answer_field, where, required=required)


def _answers_by_prompt(path: Path, keep=None) -> dict[str, tuple]:
    """prompt key -> (prompt, [answers], first line) for one of the two seed files (the records `keep` keeps)."""
    raw = read_jsonl(path)
    records = [record for record in raw if keep is None or keep(record)]
    if not records and raw:  # `keep` left out every record (arena votes only, say): the caller counts them
        return {}
    if not records:
        raise UserError(f"{path} holds no records")
    grouped: dict[str, tuple] = {}
    for record in records:
        prompt, answer = _seed_record(record, f"{path} line {record['_line']}")
        # Prompts match when they differ only in case and whitespace.
        key = " ".join(prompt.split()).lower() if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)
        grouped.setdefault(key, (prompt, [], record["_line"]))[1].append(answer)
    return grouped


def join_accepted_rejected(
    accepted: Path, rejected: Path, allow_unmatched: bool = True, keep=None, quiet: bool = False
) -> list[dict]:
    """Pairs each prompt's accepted answers with its rejected ones (cycling the shorter list).

    A prompt found in one file only makes no pair: its rows are left out of the pairs and a line says how many
    prompts were paired and how many rows only KTO can use (`make kto`, `unpaired_seed_records`; `quiet` keeps the
    line back). With `allow_unmatched` false such prompts stop the run instead. No prompt in both files raises
    UserError: there is no pair at all.
    """
    good, bad = _answers_by_prompt(accepted, keep), _answers_by_prompt(rejected, keep)
    if not good and not bad:  # every record left out by `keep`
        return []
    only_good, only_bad = [k for k in good if k not in bad], [k for k in bad if k not in good]
    matched = [k for k in good if k in bad]
    if not matched:
        raise UserError(
            f"no prompt is in both {accepted.name} ({len(good)} prompts) and {rejected.name} ({len(bad)}), so there "
            f"is no preference pair in {accepted.parent}: `make kto` trains on unpaired answers like these, or give "
            "some prompts an answer in each file"
        )
    if (only_good or only_bad) and not allow_unmatched:
        example = good[only_good[0]][0] if only_good else bad[only_bad[0]][0]
        raise UserError(
            f"{len(only_good)} prompts in {accepted.name} have no rejected answer and {len(only_bad)} in "
            f"{rejected.name} no accepted one (first: {str(example)[:60]!r}): fix the files, or set allow_unmatched: "
            f"true to train on the {len(matched)} matched prompts (`make kto` uses every row)"
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
    if (only_good or only_bad) and not quiet:
        rows = sum(len(good[k][1]) for k in only_good) + sum(len(bad[k][1]) for k in only_bad)
        print(
            f"{accepted.parent}: {len(matched)} prompts paired ({len(pairs)} pairs); {len(only_good)} prompts with "
            f"accepted answers only and {len(only_bad)} with rejected answers only make no pair: their {rows} rows "
            "are left out here, and only KTO can use them (`make kto`)"
        )
    return pairs


def unpaired_seed_records(accepted: Path | None, rejected: Path | None, keep=None) -> list[dict]:
    """Every row of the seed files (`seed_files`; the records `keep` keeps) as KTO's unpaired rows, matched or
    not: prompt, completion (the answer) and label (true in accepted_data.jsonl, false in rejected_data.jsonl).

    A row whose answer is empty says nothing about any answer: left out, and counted. None left (empty files, or
    every answer empty) raises UserError."""
    rows, empty, read, skipped = [], [], 0, 0
    for path, label in ((accepted, True), (rejected, False)):
        for record in read_jsonl(path) if path is not None else []:
            if keep is not None and not keep(record):
                skipped += 1
                continue
            read += 1
            where = f"{path} line {record['_line']}"
            prompt, answer = _seed_record(record, where, required=False)
            if answer is None:
                empty.append(where)
                continue
            record = {"prompt": prompt, "completion": answer, "label": label}
            rows.append(_convert_one(record, "unpaired", "kto", where))
    folder = (accepted or rejected).parent
    if skipped and not read:  # `keep` left out every record (arena votes only, say): the caller counts them
        return []
    if empty:
        print(f"{folder}: left out {len(empty)} of {read} rows whose answer is empty (first: {empty[0]})")
    if not rows:
        state = f"all {read} rows have an empty answer" if read else "the files hold no rows"
        raise UserError(
            f"{folder}: no usable row for KTO ({state}): add prompts with non-empty answers to {' / '.join(SEED_FILES)}"
        )
    return rows


def export_config(source: str, purpose: str) -> str | None:
    """The config that `purpose` reads (`EXPORT_CONFIGS`) of a `make label-export FORMAT=hf` folder (a README card
    and a folder per config that has rows, `labels.export_dataset`); None for any other source. Raises UserError
    when the export has no rows of that kind (decisions without any preference, say)."""
    folder, wanted = Path(source), EXPORT_CONFIGS.get(purpose)
    written = [name for name in sorted(set(EXPORT_CONFIGS.values())) if (folder / name).is_dir()]
    if wanted is None or not folder.is_dir() or not (folder / "README.md").is_file() or not written:
        return None
    if wanted not in written:
        raise UserError(
            f"{source} (a label export) holds no {wanted} rows, only {', '.join(written)}: label more, or train on "
            "it with the stage that reads those (`make kto` reads unpaired rows, the reward stage and DPO pairs)"
        )
    return wanted


def load_dataset_for(
    source: str,
    purpose: str,
    split: str = "train",
    config: str | None = None,
    fmt: str = "auto",
    allow_unmatched: bool = True,
    split_key: str = "",
    keep=None,
) -> list[dict]:
    """Any supported source (the seed's accepted/rejected folder and a label export included), validated and
    converted for `purpose`: KTO reads every row of the seed files (`unpaired_seed_records`), the others their
    pairs (`join_accepted_rejected`).

    `split` (and `split_key`, the setting that names it) as `load_records` takes them; `keep`, a test of a raw
    record, leaves out those it fails."""
    found = seed_files(source)
    if purpose == "kto" and found is not None:
        return unpaired_seed_records(*found, keep=keep)
    if purpose == "kto" and (Path(source) / LABELS_LOG).is_file():  # a labels folder whose decisions made no row
        print(f"{source}: no accept or reject decision yet (ties and skips make no row)")
        return []
    if found is not None and all(found):  # both seed files (seed_pair_files), read as pairs
        records = join_accepted_rejected(*found, allow_unmatched=allow_unmatched, keep=keep)
        return convert(records, purpose, str(found[0])) if records else []  # [] when `keep` left out all
    records = load_records(source, split, config or export_config(source, purpose), split_key)
    kept = [r for r in records if keep is None or keep(r)]
    if records and not kept:  # `keep` left out every record (arena votes only, say): the caller counts them
        return []
    return convert(kept, purpose, source, fmt)


LABEL_MIXES = ("generated", "human", "mix")
ARENA = "arena"  # the `source` of the web page's blind A/B votes (rlhf_trl.labels)


def is_arena_vote(record: dict) -> bool:
    """A decision of the web page's Arena tab, or a line the labels store derived from one: those carry `source:
    arena` and the `stages` that answered (older labels folders have the stages only)."""
    return record.get("source") == ARENA or "stages" in record


def human_label_pairs(script_args, stage: str = "reward", purpose: str = "reward") -> list[dict]:
    """The human preference pairs from `human_labels` (see `label_mix`), converted for `purpose` (reward: pairs; kto:
    unpaired rows, every accept/reject decision of a labels folder); `stage` (reward, dpo, kto) names the stage in
    what is printed.

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
            data = "examples" if purpose == "kto" else "pairs"
            print(f"{stage}: no human labels at {source} yet (`make label` writes them); using generated {data} there")
            continue
        if not Path(source).exists():
            raise UserError(
                f"human_labels {source} does not exist: label some answers first (`make label`) or set label_mix: mix"
            )
        pairs += load_dataset_for(source, purpose, allow_unmatched=script_args.allow_unmatched, keep=keep)
    if left_out:
        print(
            f"{stage}: left out {len(left_out)} human_labels record(s) from arena votes: they judge held-out prompts, "
            "which evaluation measures with (set arena_votes_as_training: true to train on them anyway)"
        )
    return pairs


def mix_training_pairs(
    script_args, generated: list[dict], seed: int, stage: str = "reward", purpose: str = "reward"
) -> list[dict]:
    """Training pairs (KTO: rows) as `label_mix` says: generated alone, human labels alone, or both (see
    `human_fraction`)."""
    import random

    noun = "examples" if purpose == "kto" else "pairs"
    mode, fraction = script_args.label_mix, script_args.human_fraction
    if mode not in LABEL_MIXES:
        raise UserError(f"label_mix {mode!r} is unknown: use one of {', '.join(LABEL_MIXES)}")
    if mode == "generated":
        return generated
    if mode == "human" and not script_args.human_labels:
        raise UserError("label_mix: human needs human_labels (e.g. [data/labels/<recipe>/pairs.jsonl])")
    if fraction is not None and not 0 < fraction <= 1:
        raise UserError(f"human_fraction {fraction} must be in (0, 1]: the share of training {noun} that are human")
    human = human_label_pairs(script_args, stage, purpose)
    if mode == "human":
        if not human:
            files = ", ".join(script_args.human_labels)
            raise UserError(f"{files} hold no preference {noun}: label more with `make label`")
        print(f"{stage}: training on {len(human)} human {noun} (label_mix: human)")
        return human
    if human and fraction is not None:
        # Human labels are the scarce side: the generated pairs are subsampled (seeded) to reach the share.
        wanted = round(len(human) * (1 - fraction) / fraction)
        if wanted < len(generated):
            generated = random.Random(seed).sample(generated, wanted)
    if human:
        print(f"{stage}: training on {len(generated)} generated + {len(human)} human {noun} (label_mix: mix)")
    return generated + human


def load_splits(script_args, purpose: str, seed: int, stage: str | None = None):
    """(train, eval) as `datasets.Dataset`s; eval comes from eval_dataset_name or a seeded hold-out.

    For preference pairs (`purpose` reward: the reward stage, and DPO with `stage="dpo"`) and KTO's unpaired rows
    (`purpose` kto), human labels join the training data as `label_mix` says; held-out data come from
    eval_dataset_name either way, so runs with and without human labels compare on the same pairs. `stage`
    (default: `purpose`) names the stage in what is printed.

    KTO's rows are shuffled (seeded) as they are read and again once mixed: TRL's KTOTrainer takes them in order
    (its KL estimate pairs each row with its neighbour in the batch), and the seed's files list every accepted answer
    before every rejected one, so batches (and `max_train_samples`) would hold desirable answers alone.
    """
    import random

    from datasets import Dataset

    mixed = purpose in ("reward", "kto")
    label_mix = getattr(script_args, "label_mix", "generated") if mixed else "generated"
    shuffle = random.Random(seed).shuffle if purpose == "kto" else lambda rows: None
    if not script_args.dataset_name and label_mix != "human":
        raise UserError("no dataset_name set: add `dataset_name: <file, folder or Hub id>` to the recipe")
    options = {
        "config": script_args.dataset_config,
        "fmt": script_args.dataset_format,
        "allow_unmatched": script_args.allow_unmatched,
    }
    train = []
    if label_mix != "human":
        train = load_dataset_for(
            script_args.dataset_name,
            purpose,
            script_args.dataset_train_split,
            split_key="dataset_train_split",
            **options,
        )
        shuffle(train)
        if script_args.max_train_samples and script_args.eval_dataset_name:  # before mixing: human pairs all stay
            train = train[: script_args.max_train_samples]
    if mixed:
        train = mix_training_pairs(script_args, train, seed, stage or purpose, purpose)
        shuffle(train)
    if script_args.eval_dataset_name:
        evaluation = load_dataset_for(
            script_args.eval_dataset_name,
            purpose,
            script_args.dataset_test_split,
            split_key="dataset_test_split",
            **options,
        )
        shuffle(evaluation)
    else:
        split = Dataset.from_list(train).train_test_split(test_size=script_args.eval_split_size, seed=seed)
        train, evaluation = split["train"].to_list(), split["test"].to_list()
    if script_args.max_train_samples and not script_args.eval_dataset_name:
        train = train[: script_args.max_train_samples]
    return Dataset.from_list(train), Dataset.from_list(evaluation)
