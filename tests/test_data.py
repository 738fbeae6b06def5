"""Data loading: every source and format, and errors that name the file, the line and the field."""

import json
import re

import pytest

from rlhf_trl.cli import UserError
from rlhf_trl.data import convert, detect_format, load_records


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ({"instruction": "Add 2 and 2.", "input": "", "output": "4"}, "alpaca"),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}, "messages"),
        ({"prompt": "hi", "completion": "hello"}, "prompt_completion"),
        ({"prompt": "hi", "chosen": "hello", "rejected": "go away"}, "preference"),
        ({"prompt": "hi"}, "prompt"),
    ],
)
def test_format_detection(row, expected):
    assert detect_format([row], "x.jsonl") == expected


def test_alpaca_becomes_a_conversational_prompt_completion(tmp_path):
    source = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Translate.", "input": "chat", "output": "cat"}])
    [row] = convert(load_records(source), "sft", source)
    assert row == {
        "prompt": [{"role": "user", "content": "Translate.\n\nchat"}],
        "completion": [{"role": "assistant", "content": "cat"}],
    }


def test_messages_split_off_the_last_assistant_turn(tmp_path):
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "bye"},
        {"role": "assistant", "content": "see you"},
    ]
    source = write_jsonl(tmp_path / "m.jsonl", [{"messages": messages}])
    [row] = convert(load_records(source), "sft", source)
    assert row["prompt"] == messages[:3] and row["completion"] == messages[3:]


def test_plain_preference_pairs_become_conversational(tmp_path):
    source = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "good", "rejected": "bad"}])
    [row] = convert(load_records(source), "reward", source)
    assert row["chosen"] == [{"role": "assistant", "content": "good"}] and row["prompt"][0]["content"] == "q"
    assert convert(load_records(source), "prompts", source) == [{"prompt": [{"role": "user", "content": "q"}]}]


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".json"])
def test_other_file_types(tmp_path, suffix):
    import pandas as pd

    frame = pd.DataFrame({"prompt": ["a", "b"], "completion": ["c", "d"]})
    path = tmp_path / f"data{suffix}"
    {
        ".csv": lambda: frame.to_csv(path, index=False),
        ".parquet": lambda: frame.to_parquet(path),
        ".json": lambda: frame.to_json(path, orient="records"),
    }[suffix]()
    rows = convert(load_records(str(path)), "sft", str(path))
    assert [r["completion"][0]["content"] for r in rows] == ["c", "d"]


def test_a_cloned_dataset_folder(tmp_path):
    folder = tmp_path / "alpaca-cleaned"
    folder.mkdir()
    (folder / "alpaca_data_cleaned.json").write_text(json.dumps([{"instruction": "i", "input": "", "output": "o"}]))
    rows = convert(load_records(str(folder)), "sft", str(folder))
    assert rows[0]["completion"][0]["content"] == "o"


def test_unknown_fields_are_listed(tmp_path):
    source = write_jsonl(tmp_path / "x.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(UserError, match=r"found fields \['answer', 'question'\].*alpaca \(instruction, output\)"):
        convert(load_records(source), "sft", source)


def test_wrong_format_for_the_stage(tmp_path):
    source = write_jsonl(tmp_path / "x.jsonl", [{"prompt": "q", "completion": "a"}])
    with pytest.raises(UserError, match="cannot be used for reward; expected preference"):
        convert(load_records(source), "reward", source)


def test_empty_response_names_line_and_field(tmp_path):
    source = write_jsonl(
        tmp_path / "x.jsonl",
        [{"prompt": "q", "chosen": "a", "rejected": "b"}, {"prompt": "q", "chosen": "a", "rejected": "  "}],
    )
    with pytest.raises(UserError, match=r"x.jsonl line 2: field 'rejected' is empty"):
        convert(load_records(source), "reward", source)


def test_non_utf8_bytes_name_the_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(UserError, match=r"latin1.jsonl line 2: not UTF-8"):
        load_records(str(path))


@pytest.mark.parametrize("ending", ["\n", "\r\n", ""])
def test_malformed_json_names_the_column_where_the_line_stops(tmp_path, ending):
    # line 4 is cut short after `"output": ` (31 characters): the missing value is at column 32 of line 4, whatever
    # ends the line (the decoder used to count the newline and report column 1).
    path = tmp_path / "cut.jsonl"
    good = '{"instruction": "a", "output": "b"}'
    path.write_bytes(f'{good}\n{good}\n{good}\n{{"instruction": "e", "output": {ending}'.encode())
    with pytest.raises(UserError) as error:
        load_records(str(path))
    assert str(error.value) == f"{path} line 4: invalid JSON (Expecting value at column 32)"


def test_hub_id_offline_says_how_to_use_a_local_folder(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(UserError, match=r"offline.*data/raw/alpaca-cleaned"):
        load_records("yahma/alpaca-cleaned")


def write_seed_pair(folder, accepted, rejected):
    folder.mkdir(exist_ok=True)
    write_jsonl(folder / "accepted_data.jsonl", accepted)
    write_jsonl(folder / "rejected_data.jsonl", rejected)
    return folder


def test_seed_accepted_and_rejected_files_join_on_the_prompt(tmp_path):
    from rlhf_trl.data import join_accepted_rejected, seed_pair_files

    folder = write_seed_pair(
        tmp_path / "processed",
        [{"prompt": "Q1", "response": "good 1"}, {"instruction": "Q2", "output": "good 2"}],
        [
            {"prompt": "Q2", "response": "bad 2a"},
            {"prompt": "q1 ", "response": "bad 1"},
            {"prompt": "Q2", "response": "bad 2b"},
        ],
    )
    files = seed_pair_files(str(folder))
    assert files == seed_pair_files(str(folder / "accepted_data.jsonl"))
    pairs = join_accepted_rejected(*files)
    assert [(p["prompt"], p["chosen"], p["rejected"]) for p in pairs] == [
        ("Q1", "good 1", "bad 1"),
        ("Q2", "good 2", "bad 2a"),
        ("Q2", "good 2", "bad 2b"),
    ]
    rows = convert(pairs, "reward", "seed")
    assert rows[0]["chosen"] == [{"role": "assistant", "content": "good 1"}]


def test_unmatched_seed_prompts_are_counted_and_left_to_kto(tmp_path, capsys):
    """Issue 24: a prompt in one file only is no longer an error for pairs: the matched prompts are paired, and the
    rows of the others are counted and pointed at `make kto`; allow_unmatched: false still stops the run."""
    from rlhf_trl.data import join_accepted_rejected, seed_pair_files

    folder = write_seed_pair(
        tmp_path / "processed",
        [
            {"prompt": "Q1", "response": "a"},
            {"prompt": "Q2", "response": "b"},
            {"prompt": "Q3", "response": "c"},
            {"prompt": "Q3", "response": "c2"},
        ],
        [{"prompt": "Q1", "response": "x"}, {"prompt": "Q9", "response": "y"}],
    )
    pairs = join_accepted_rejected(*seed_pair_files(str(folder)))
    assert [(p["prompt"], p["chosen"], p["rejected"]) for p in pairs] == [("Q1", "a", "x")]
    # By hand: Q1 is in both files (1 pair); Q2 and Q3 (3 rows) are accepted only, Q9 (1 row) rejected only: 4 rows.
    assert (
        f"{folder}: 1 prompts paired (1 pairs); 2 prompts with accepted answers only and 1 with rejected answers only "
        "make no pair: their 4 rows are left out here, and only KTO can use them (`make kto`)"
    ) in capsys.readouterr().out
    with pytest.raises(
        UserError,
        match=r"2 prompts in accepted_data.jsonl have no rejected answer and 1 in "
        r"rejected_data.jsonl no accepted one.*allow_unmatched: true.*1 matched.*make kto",
    ):
        join_accepted_rejected(*seed_pair_files(str(folder)), allow_unmatched=False)


def test_seed_files_without_a_shared_prompt_make_no_pair_and_point_to_kto(tmp_path):
    from rlhf_trl.data import load_dataset_for

    folder = write_seed_pair(tmp_path / "p", [{"prompt": "Q1", "response": "a"}], [{"prompt": "Q2", "response": "x"}])
    with pytest.raises(UserError, match=r"no prompt is in both accepted_data.jsonl \(1 prompts\).*`make kto`"):
        load_dataset_for(str(folder), "reward")
    rows = load_dataset_for(str(folder), "kto")  # KTO takes both rows
    assert [(r["completion"][0]["content"], r["label"]) for r in rows] == [("a", True), ("x", False)]


def test_seed_file_missing_an_answer_names_the_line(tmp_path):
    from rlhf_trl.data import join_accepted_rejected, seed_pair_files

    folder = write_seed_pair(
        tmp_path / "p", [{"prompt": "Q1", "response": "a"}, {"prompt": "Q2"}], [{"prompt": "Q1", "response": "x"}]
    )
    with pytest.raises(UserError, match=r"accepted_data.jsonl line 2: needs a prompt field"):
        join_accepted_rejected(*seed_pair_files(str(folder)))


def test_forced_format_must_match_the_fields(tmp_path):
    source = write_jsonl(tmp_path / "x.jsonl", [{"prompt": "q", "completion": "a"}])
    assert convert(load_records(source), "prompts", source, "prompt") == [
        {"prompt": [{"role": "user", "content": "q"}]}
    ]
    with pytest.raises(UserError, match=r"dataset_format alpaca needs fields \['instruction', 'output'\]"):
        convert(load_records(source), "sft", source, "alpaca")


def test_one_human_labels_file_written_as_a_plain_string_is_one_file(tmp_path):
    from trl import RewardConfig

    from rlhf_trl.cli import parse

    recipe = tmp_path / "reward.yaml"
    recipe.write_text("output_dir: x\nbf16: false\nhuman_labels: data/labels/demo/pairs.jsonl\nlabel_mix: mix\n")
    script_args, _, _ = parse(RewardConfig, ["--config", str(recipe)])
    assert script_args.human_labels == ["data/labels/demo/pairs.jsonl"]


# ----------------------------------------------------- 2026-12-02 replay: D04 D05 D06 D07 D08 D09 D10 (issue 22)


def test_orca_question_and_system_fields_are_the_prompt(tmp_path):
    # D04: Intel/orca_dpo_pairs' layout. Read as TRL's implicit-prompt format, the answers' shared opening "A river
    # is" became the prompt and the question and the system text were dropped; the prompt is the question, after a
    # system turn holding the system text, and the answers are whole.
    row = {
        "system": "Be brief.",
        "question": "What is a river?",
        "chosen": "A river is long.",
        "rejected": "A river is wet.",
    }
    source = write_jsonl(tmp_path / "orca.jsonl", [row])
    [pair] = convert(load_records(source), "reward", source)
    assert pair == {
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a river?"}],
        "chosen": [{"role": "assistant", "content": "A river is long."}],
        "rejected": [{"role": "assistant", "content": "A river is wet."}],
    }
    # the same file as PPO prompts: the question, not the answers' opening
    assert convert(load_records(source), "prompts", source)[0]["prompt"][1] == {
        "role": "user",
        "content": "What is a river?",
    }


@pytest.mark.parametrize(
    ("row", "prompt"),
    [
        # argilla's distilabel orca pairs: the question is in `input`
        ({"system": "S", "input": "Q?", "chosen": "A b", "rejected": "A c"}, [("system", "S"), ("user", "Q?")]),
        # LLaMA-Factory's Alpaca-style pairs: instruction + input, joined as Alpaca does
        (
            {"instruction": "Translate.", "input": "chat", "chosen": "cat", "rejected": "dog"},
            [("user", "Translate.\n\nchat")],
        ),
        ({"query": "Q?", "chosen": "A b", "rejected": "A c"}, [("user", "Q?")]),
    ],
)
def test_other_preference_layouts_name_their_prompt(tmp_path, row, prompt):
    source = write_jsonl(tmp_path / "pairs.jsonl", [row])
    [pair] = convert(load_records(source), "reward", source)
    assert [(m["role"], m["content"]) for m in pair["prompt"]] == prompt
    assert pair["chosen"][0]["content"] == row["chosen"]


def test_alpaca_system_and_history_are_turns(tmp_path):
    # LLaMA-Factory's Alpaca: system, then each [question, answer] of history, then instruction + input.
    row = {"system": "S", "history": [["Hi", "Hello"]], "instruction": "Add.", "input": "2 2", "output": "4"}
    source = write_jsonl(tmp_path / "a.jsonl", [row])
    [record] = convert(load_records(source), "sft", source)
    assert [(m["role"], m["content"]) for m in record["prompt"]] == [
        ("system", "S"), ("user", "Hi"), ("assistant", "Hello"), ("user", "Add.\n\n2 2")
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("row", "needle"),
    [
        # Dolly's `context` next to an Alpaca record: the format reads instruction, input, output, system, history
        (
            {"instruction": "i", "context": "c", "output": "o"},
            "line 1: field 'context' is not read by the alpaca format",
        ),
        ({"prompt": "p", "completion": "c", "question": "q"}, "field 'question' is not read by the prompt_completion"),
        (
            {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}], "instruction": "i"},
            "field 'instruction' is not read by the messages format",
        ),
        (
            {"prompt": "p", "question": "q", "chosen": "a", "rejected": "b"},
            "fields 'prompt' and 'question' both look like",
        ),
        (
            {"system": "S", "messages": [{"role": "system", "content": "T"}, {"role": "assistant", "content": "a"}]},
            "a 'system' field and a system turn",
        ),
    ],
)
def test_a_prompt_field_a_format_does_not_read_is_refused(tmp_path, row, needle):
    source = write_jsonl(tmp_path / "x.jsonl", [row])
    purpose = "reward" if "chosen" in row else "sft"
    with pytest.raises(UserError, match=re.escape(needle)):
        convert(load_records(source), purpose, source)


def parts(*texts):
    return [{"type": "text", "text": text} for text in texts]


def test_content_as_a_list_of_text_parts_is_its_text(tmp_path):
    # D05: the OpenAI/TRL layout. The text parts are joined as written ("Describe " + "the lantern."); before, the
    # list went to the template as is and Llama-3.1's printed its repr "[{'type': 'text', ...}]".
    messages = [
        {"role": "user", "content": parts("Describe ", "the lantern.")},
        {"role": "assistant", "content": parts("It glows.")},
    ]
    source = write_jsonl(tmp_path / "m.jsonl", [{"messages": messages}])
    [record] = convert(load_records(source), "sft", source)
    assert record == {
        "prompt": [{"role": "user", "content": "Describe the lantern."}],
        "completion": [{"role": "assistant", "content": "It glows."}],
    }


def test_text_parts_in_preference_pairs_and_other_parts_refused(tmp_path):
    # the variant: conversational preference pairs (explicit prompt) with parts on every side
    row = {
        "prompt": [{"role": "user", "content": parts("Q?")}],
        "chosen": [{"role": "assistant", "content": parts("Yes.")}],
        "rejected": [{"role": "assistant", "content": [{"type": "output_text", "text": "No."}]}],
    }
    source = write_jsonl(tmp_path / "p.jsonl", [row])
    [pair] = convert(load_records(source), "reward", source)
    assert [pair[k][0]["content"] for k in ("prompt", "chosen", "rejected")] == ["Q?", "Yes.", "No."]
    image = {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}
    row["prompt"][0]["content"] = [image, *parts("What is this?")]
    source = write_jsonl(tmp_path / "img.jsonl", [row])
    with pytest.raises(UserError, match=r"img.jsonl line 1: field 'prompt' has a content part of type 'image_url'"):
        convert(load_records(source), "reward", source)


def test_a_lone_surrogate_names_the_file_line_and_field(tmp_path):
    # D06: "\ud83d" (half an emoji) is valid JSON and no text: line 3's completion holds it at character 9
    path = tmp_path / "s.jsonl"
    path.write_text(
        '{"prompt": "a", "completion": "b"}\n\n{"prompt": "c", "completion": "Wave it \\ud83d"}\n', encoding="utf-8"
    )
    with pytest.raises(UserError) as error:
        load_records(str(path))
    assert str(error.value) == (
        f"{path} line 3: field 'completion' holds a lone surrogate \\ud83d at character 9 (half of a character such "
        "as an emoji, cut in two): fix or delete that text"
    )


def test_a_lone_surrogate_in_a_json_array_or_in_messages(tmp_path):
    # the variant: a .json array (the second object starts on line 3) and a surrogate inside a message's content
    path = tmp_path / "s.json"
    messages = [{"role": "user", "content": "hi \udc00"}, {"role": "assistant", "content": "ok"}]
    path.write_text('[\n{"prompt": "a", "completion": "b"},\n' + json.dumps({"messages": messages}) + "\n]", "utf-8")
    with pytest.raises(
        UserError, match=r"s.json line 3: field 'messages' holds a lone surrogate \\udc00 at character 4"
    ):
        load_records(str(path))


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_a_utf8_bom_is_dropped(tmp_path, suffix):
    # D07: Notepad's and PowerShell 5's "UTF-8 with BOM", Excel's "CSV UTF-8": the same two records as without it
    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}]
    text = {
        ".jsonl": "".join(json.dumps(r) + "\n" for r in rows),
        ".json": json.dumps(rows),
        ".csv": "prompt,completion\r\na,b\r\nc,d\r\n",
    }[suffix]
    path = tmp_path / f"bom{suffix}"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert [{k: r[k] for k in ("prompt", "completion")} for r in load_records(str(path))] == rows


@pytest.mark.parametrize("delimiter", [";", "\t", ","])
def test_csv_delimiter_is_detected(tmp_path, delimiter):
    # D09: Excel saves CSV with ";" where the decimal mark is a comma; tab-separated exports too. The cell "3,5"
    # holds a comma: with ";" or tab it is one cell, and with "," it is quoted.
    cell = '"3,5"' if delimiter == "," else "3,5"
    path = tmp_path / "x.csv"
    path.write_text(
        delimiter.join(["instruction", "input", "output"]) + "\n" + delimiter.join(["Double.", cell, "7"]) + "\n"
    )
    [row] = convert(load_records(str(path)), "sft", str(path))
    assert row["prompt"][0]["content"] == "Double.\n\n3,5" and row["completion"][0]["content"] == "7"


def test_csv_rows_of_empty_cells_are_left_out_and_counted(tmp_path, capsys):
    # D10: a spreadsheet's cleared rows (",," at lines 3, 5 and 6) are no records; the 2 rows with text are read.
    path = tmp_path / "x.csv"
    path.write_text("prompt,completion\na,b\n,,\nc,d\n, ,\n,\n", encoding="utf-8")
    records = load_records(str(path))
    assert [(r["prompt"], r["_line"]) for r in records] == [("a", 2), ("c", 4)]
    assert capsys.readouterr().out == f"{path}: left out 3 rows whose every cell is empty (line 3, 5, 6)\n"


def hub_style_folder(tmp_path, sizes=(("train", 4), ("validation", 2))):
    import pandas as pd

    folder = tmp_path / "hub_style"
    (folder / "data").mkdir(parents=True)
    for split, n in sizes:
        frame = pd.DataFrame({"prompt": [f"{split} {i}" for i in range(n)], "completion": ["x"] * n})
        frame.to_parquet(folder / "data" / f"{split}-00000-of-00001.parquet")
    (folder / "README.md").write_text(
        "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: data/train-*\n"
        "  - split: validation\n    path: data/validation-*\n---\n"
    )
    return str(folder)


def test_dataset_test_split_chooses_the_held_out_split(tmp_path):
    # D08: a Hub-style folder with train (4 records) and validation (2): TRL's key picks validation as eval
    from rlhf_trl.cli import ScriptArguments
    from rlhf_trl.data import load_splits

    folder = hub_style_folder(tmp_path)
    args = ScriptArguments(dataset_name=folder, eval_dataset_name=folder, dataset_test_split="validation")
    train, evaluation = load_splits(args, "sft", seed=0)
    assert [r["prompt"][0]["content"] for r in evaluation] == ["validation 0", "validation 1"] and len(train) == 4
    with pytest.raises(UserError) as error:
        load_splits(ScriptArguments(dataset_name=folder, eval_dataset_name=folder), "sft", seed=0)
    assert str(error.value) == (
        f"dataset {folder} has no split 'test'; its splits are ['train', 'validation']: set dataset_test_split to "
        "one of them"
    )


def test_dataset_train_split_names_itself_and_the_stages_take_the_key(tmp_path):
    # the variant: the train split's key, and dataset_test_split accepted by a stage's parser (it was "unknown key")
    from trl import DPOConfig

    from rlhf_trl.cli import ScriptArguments, parse_dataclasses
    from rlhf_trl.data import load_splits

    folder = hub_style_folder(tmp_path)
    with pytest.raises(UserError, match=r"has no split 'training'; .*: set dataset_train_split to one of them"):
        load_splits(ScriptArguments(dataset_name=folder, dataset_train_split="training"), "sft", seed=0)
    argv = ["--dataset_test_split", "validation", "--bf16", "false"]
    script_args, _ = parse_dataclasses((ScriptArguments, DPOConfig), argv)
    assert script_args.dataset_test_split == "validation"


def test_a_lone_surrogate_in_a_dataset_folder_names_its_file(tmp_path):
    # the variant through `datasets` (a folder): its error says only "An error occurred while generating the dataset"
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "train.jsonl").write_text(
        '{"prompt": "a", "completion": "b"}\n{"prompt": "\\ud83d", "completion": "b"}\n'
    )
    with pytest.raises(UserError, match=r"folder/train.jsonl line 2: field 'prompt' holds a lone surrogate \\ud83d"):
        load_records(str(folder))


def test_a_dataset_folder_is_read_as_it_is_now(tmp_path):
    # datasets 5.2 caches a folder with README configs under the folder's name alone: another folder of the same name
    # (here: 4 + 2 records, then 1 + 1) or the same one edited came back as the first one read. Each is read afresh.
    from rlhf_trl.cli import ScriptArguments
    from rlhf_trl.data import load_splits

    first = hub_style_folder(tmp_path / "a")
    (tmp_path / "b").mkdir()
    second = hub_style_folder(tmp_path / "b", sizes=(("train", 1), ("validation", 1)))
    for folder, sizes in ((first, (4, 2)), (second, (1, 1))):
        args = ScriptArguments(dataset_name=folder, eval_dataset_name=folder, dataset_test_split="validation")
        assert tuple(map(len, load_splits(args, "sft", seed=0))) == sizes
