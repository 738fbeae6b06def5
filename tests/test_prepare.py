"""`make data` for real recipes: cleaning with a report, a deterministic split, and preference pairs in
both layouts, read back by the same loaders the stages use."""

import json

import pytest

from rlhf_trl.cli import UserError
from rlhf_trl.data import convert, join_accepted_rejected, load_records, seed_pair_files
from rlhf_trl.prepare import main

RAW = [
    {"instruction": f"Name fact number {i}.", "input": "", "output": f"Fact {i} is that {i} follows {i - 1}."}
    for i in range(1, 21)
]
RAW += [
    RAW[0],
    {"instruction": "Empty answer.", "input": "", "output": ""},
    {"instruction": "Too long.", "input": "", "output": "word " * 400},
]


def write_recipe(tmp_path, world, name="run", **overrides) -> str:
    raw = tmp_path / "raw.json"
    raw.write_text(json.dumps(RAW))
    settings = {
        "raw_dataset": str(raw),
        "output_dir": str(tmp_path / name),
        "max_tokens": 128,
        "eval_size": 0.2,
        "tokenizer_name_or_path": str(world / "models/base"),
        "seed": 0,
        **overrides,
    }
    recipe = tmp_path / f"{name}.yaml"
    recipe.write_text("".join(f"{key}: {value}\n" for key, value in settings.items()))
    return str(recipe)


def test_cleans_splits_and_reports(tmp_path, world, capsys):
    main(["--config", write_recipe(tmp_path, world)])
    out = tmp_path / "run"
    report = json.loads((out / "data_report.json").read_text())
    assert report["dropped"] == {"invalid": 1, "duplicate": 1, "too_long": 1}
    assert (report["train"], report["eval"]) == (16, 4)
    assert "23 raw -> 16 train + 4 eval" in capsys.readouterr().out
    train = convert(load_records(str(out / "pairs_train.jsonl")), "reward", "pairs")
    assert len(train) == 16 and all(p["chosen"] != p["rejected"] for p in train)
    assert len(load_records(str(out / "prompts_eval.jsonl"))) == 4


def test_same_seed_same_files_and_another_seed_differs(tmp_path, world):
    main(["--config", write_recipe(tmp_path, world, "a")])
    main(["--config", write_recipe(tmp_path, world, "b")])
    main(["--config", write_recipe(tmp_path, world, "c", seed=1)])
    files = ("sft_train.jsonl", "sft_eval.jsonl", "pairs_train.jsonl")
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    assert (tmp_path / "a/sft_eval.jsonl").read_bytes() != (tmp_path / "c/sft_eval.jsonl").read_bytes()


def test_seed_layout_joins_back_into_pairs(tmp_path, world):
    main(["--config", write_recipe(tmp_path, world, pair_layout="accepted_rejected")])
    out = tmp_path / "run"
    assert len(join_accepted_rejected(*seed_pair_files(str(out)))) == 16
    assert len(join_accepted_rejected(*seed_pair_files(str(out / "eval")))) == 4


def test_an_existing_dataset_is_kept_unless_overwrite(tmp_path, world, capsys):
    recipe = write_recipe(tmp_path, world)
    main(["--config", recipe])
    main(["--config", recipe])
    assert "is ready" in capsys.readouterr().out
    main(["--config", recipe, "--overwrite", "true"])


def test_missing_raw_folder_says_how_to_get_it(tmp_path, world):
    with pytest.raises(UserError, match="git clone"):
        main(["--config", write_recipe(tmp_path, world, raw_dataset="data/raw/not-there")])


def test_rejected_answers_can_be_sampled_from_the_sft_model(tmp_path, world, trained):
    main(["--config", write_recipe(tmp_path, world, rejected_source="sft", sft_model_path=trained["sft"])])
    pairs = convert(load_records(str(tmp_path / "run/pairs_train.jsonl")), "reward", "pairs")
    report = json.loads((tmp_path / "run/data_report.json").read_text())
    assert report["rejected_source"] == "sft" and len(pairs) == 16
    assert all(p["rejected"][0]["content"].strip() for p in pairs), "the SFT model's answers are the rejected side"


def test_a_prompt_with_two_answers_lands_on_one_side_only(tmp_path, world, capsys):
    # issue 23 R1: 10 prompts with 2 different answers each (20 records). Splitting records put a prompt on both
    # sides; split by prompt, eval_size 0.2 holds out round(10 x 0.2) = 2 prompts, i.e. 4 records, and trains on 8
    # prompts (16 records).
    raw = [
        {"instruction": f"Name fact number {i}.", "input": "", "output": f"Fact {i} is {how}."}
        for i in range(10)
        for how in ("true", "old")
    ]
    recipe = write_recipe(tmp_path, world)
    (tmp_path / "raw.json").write_text(json.dumps(raw))
    main(["--config", recipe])
    out = tmp_path / "run"
    prompts = {
        split: {json.dumps(r["prompt"]) for r in load_records(str(out / f"sft_{split}.jsonl"))}
        for split in ("train", "eval")
    }
    assert not prompts["train"] & prompts["eval"]
    assert (len(prompts["train"]), len(prompts["eval"])) == (8, 2)
    assert "split by prompt: 8 prompts (16 records) train, 2 prompts (4 records) eval" in capsys.readouterr().out
    assert len(load_records(str(out / "prompts_eval.jsonl"))) == 2  # each prompt once
