"""Data loading: every source and format, and errors that name the file, the line and the field."""

import json

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


def test_unmatched_seed_prompts_are_counted_and_need_allow_unmatched(tmp_path):
    from rlhf_trl.data import join_accepted_rejected, seed_pair_files

    folder = write_seed_pair(
        tmp_path / "processed",
        [{"prompt": "Q1", "response": "a"}, {"prompt": "Q2", "response": "b"}, {"prompt": "Q3", "response": "c"}],
        [{"prompt": "Q1", "response": "x"}, {"prompt": "Q9", "response": "y"}],
    )
    with pytest.raises(
        UserError,
        match=r"2 prompts in accepted_data.jsonl have no rejected answer and 1 in "
        r"rejected_data.jsonl no accepted one.*--allow_unmatched true.*1 matched",
    ):
        join_accepted_rejected(*seed_pair_files(str(folder)))
    assert len(join_accepted_rejected(*seed_pair_files(str(folder)), allow_unmatched=True)) == 1


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
