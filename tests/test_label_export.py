"""`make label-export FORMAT=hf`: the label store's decisions as a parquet dataset folder in TRL's preference and
unpaired-preference formats, which `datasets.load_dataset` reads and the reward stage and KTO train on; an existing
folder is refused unless --overwrite."""

from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import ROOT, run_here, run_stage, stage_paths
from test_bad_inputs import assert_one_line_error as one_line_error
from test_kto import kto_args

from rlhf_trl import labels
from rlhf_trl.data import human_label_pairs
from rlhf_trl.outputs import read_marker


def item(n: int, prompt: str, responses: list[str]) -> dict:
    return {"index": n, "prompt": prompt, "prompt_id": f"p{n}", "messages": [], "responses": responses,
            "sample_id": f"s{n}", "model": "sft", "generation": {}}  # fmt: skip


@pytest.fixture
def store(tmp_path) -> Path:
    """A labels folder with one decision of each kind. By hand, what each makes (`labels.derived_records`):
    alice prefers A (2 answers): 1 pair, 1 accepted + 1 rejected row; bob accepts 1 answer: 1 accepted row;
    alice rejects 2 answers: 2 rejected rows; carol's tie: nothing; an arena vote: left out of every export.
    So: 1 preference pair, and 5 unpaired rows, 2 desirable and 3 undesirable."""
    out = tmp_path / "labels"
    shown = [{"sample_id": f"a{stage}", "responses": [f"{stage} says"], "stage": stage, "model": stage,
              "generation": {}, "run": f"run-{stage}"} for stage in ("kto", "sft")]  # fmt: skip
    with labels.LabelStore(out) as store:
        store.record([labels.new_decision(item(0, "What is a tiger?", ["A tiger is a big cat.", "A tiger is a fish."]),
                                          "alice", "prefer", 0, source="terminal")])  # fmt: skip
        store.record([labels.new_decision(item(1, "What is a river?", ["A river is water."]), "bob", "accept", None,
                                          source="terminal")])  # fmt: skip
        store.record([labels.new_decision(item(2, "What is a castle?", ["A castle is a fish.", "A castle is blue."]),
                                          "alice", "reject", None, source="terminal")])  # fmt: skip
        store.record([labels.new_decision(item(3, "What is a boat?", ["A boat floats.", "A boat sails."]), "carol",
                                          "tie", None, source="terminal")])  # fmt: skip
        arena = {"index": 4, "prompt": "held-out", "prompt_id": "e4", "messages": []}
        store.record([labels.arena_vote(labels.arena_item(arena, shown), "alice", "a")])
    return out


def export(out: Path, target: Path, *extra: str):
    args = ("export", "--recipe", "demo", "--out", str(out), "--format", "hf", "--file", str(target), *extra)
    return run_here("label", *args, "--labeler", "exporter")


def test_the_export_reloads_with_load_dataset(store, tmp_path):
    import datasets

    target = tmp_path / "labels-hf"
    result = export(store, target)
    assert result.returncode == 0, result.stderr
    assert (
        f"label-export: wrote 1 preference pairs and 5 unpaired rows (2 desirable) from 5 decisions to {target} "
        "(left out: 1 arena votes)"
    ) in result.stdout
    cache = str(tmp_path / "cache")
    preference = datasets.load_dataset(str(target), cache_dir=cache)["train"]  # the default config
    assert preference.num_rows == 1
    assert preference[0]["prompt"] == [{"role": "user", "content": "What is a tiger?"}]
    assert preference[0]["chosen"] == [{"role": "assistant", "content": "A tiger is a big cat."}]
    assert preference[0]["rejected"] == [{"role": "assistant", "content": "A tiger is a fish."}]
    assert preference[0]["labeler"] == "alice" and preference[0]["decision_id"]
    unpaired = datasets.load_dataset(str(target), "unpaired", cache_dir=cache)["train"]
    rows = sorted((row["completion"][0]["content"], row["label"]) for row in unpaired)
    assert rows == [
        ("A castle is a fish.", False),
        ("A castle is blue.", False),
        ("A river is water.", True),
        ("A tiger is a big cat.", True),
        ("A tiger is a fish.", False),
    ]
    card = (target / "README.md").read_text()
    row = "| unpaired | unpaired preference (KTO): prompt, completion, label | 5 (2 desirable, 3 undesirable) |"
    assert row in card
    assert "Decisions: 4 (1 accept, 1 prefer, 1 reject, 1 tie)" in card
    assert "Labelers: alice (2), bob (1), carol (1)." in card and "Left out: 1 arena votes." in card


def test_an_existing_export_folder_is_refused_unless_overwrite(store, tmp_path):
    target = tmp_path / "labels-hf"
    assert export(store, target).returncode == 0
    before = (target / "README.md").read_text()
    one_line_error(export(store, target), f"{target} exists: add --overwrite")
    assert (target / "README.md").read_text() == before
    assert export(store, target, "--overwrite").returncode == 0
    assert not target.with_name("labels-hf.partial").exists()
    elsewhere = tmp_path / "notes"
    elsewhere.mkdir()
    (elsewhere / "mine.txt").write_text("keep me")
    one_line_error(export(store, elsewhere, "--overwrite"), f"{elsewhere} is not a label export")
    assert (elsewhere / "mine.txt").read_text() == "keep me"


def test_make_label_export_passes_the_format():
    import subprocess

    result = subprocess.run(["make", "-n", "label-export", "FORMAT=hf"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0 and "-m rlhf_trl.label export --recipe demo" in result.stdout
    assert '--format "hf"' in result.stdout


def test_kto_takes_every_accept_and_reject_decision_of_a_labels_folder(store, capsys):
    args = SimpleNamespace(human_labels=[str(store)], label_mix="human", allow_unmatched=True)
    rows = human_label_pairs(args, "kto", "kto")
    # The 5 unpaired rows of the fixture; the arena vote's accepted and rejected lines (2) are left out.
    assert sorted(row["label"] for row in rows) == [False, False, False, True, True]
    assert "kto: left out 2 human_labels record(s) from arena votes" in capsys.readouterr().out


def test_the_reward_stage_and_kto_train_on_the_export(trained, store, tmp_path):
    target = tmp_path / "labels-hf"
    assert export(store, target).returncode == 0
    paths = stage_paths(Path(trained["data"]).parent) | {"sft": trained["sft"]}
    reward = tmp_path / "reward"
    held_out = ("--eval_dataset_name", str(target), "--dataset_test_split", "train")  # the export has one split
    result = run_stage(
        "reward",
        *("--model_name_or_path", trained["sft"], "--dataset_name", str(target), *held_out),
        *("--label_mix", "generated", "--output_dir", str(reward), "--max_steps", "2", "--save_strategy", "no"),
    )
    assert result.returncode == 0, f"reward failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert "reward: training pairs: 1 read, 1 kept" in result.stdout
    assert read_marker(reward)["eval_pairs"] == 1
    kto = tmp_path / "kto"
    args = kto_args(paths, kto, "--dataset_name", str(target), *held_out)
    result = run_stage("kto", *args, "--per_device_train_batch_size", "4", "--max_steps", "1")
    assert result.returncode == 0, f"kto failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    # By hand (the fixture): 2 desirable + 3 undesirable rows; desirable_weight 3 / 2 = 1.5.
    assert "kto: training examples: 5 read, 2 desirable + 3 undesirable kept" in result.stdout
    assert "kto: desirable_weight 1.5, undesirable_weight 1 (chosen from the counts" in result.stdout
    assert read_marker(kto)["stage"] == "kto"


def test_a_labels_folder_without_accept_or_reject_gives_kto_no_row(tmp_path, capsys):
    out = tmp_path / "labels"
    with labels.LabelStore(out) as store:
        store.record([labels.new_decision(item(0, "What is a boat?", ["A boat floats.", "A boat sails."]), "carol",
                                          "tie", None, source="terminal")])  # fmt: skip
    args = SimpleNamespace(human_labels=[str(out)], label_mix="mix", allow_unmatched=True, human_fraction=None)
    generated = [{"prompt": [], "completion": [], "label": True}]
    assert human_label_pairs(args, "kto", "kto") == []
    assert f"{out}: no accept or reject decision yet (ties and skips make no row)" in capsys.readouterr().out
    from rlhf_trl.data import mix_training_pairs

    assert mix_training_pairs(args, generated, 0, "kto", "kto") == generated
