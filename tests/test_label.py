"""Human feedback: the labeling tool driven through a pseudo-terminal by key presses, as a person uses it,
batch export/import with validation and agreement, and the reward stage's label_mix.

The answers come from the untrained base model of the `world` fixture: what it says does not matter here,
only what the tool records about it.
"""

import csv
import json
import shutil
import signal
import sys
from collections import Counter
from types import SimpleNamespace

import pexpect
import pytest
from conftest import OFFLINE_ENV, ROOT, run_module

from rlhf_trl import label, labels
from rlhf_trl.cli import UserError
from rlhf_trl.data import human_label_pairs, load_dataset_for, load_splits, mix_training_pairs

PROMPTS = 4
TIMEOUT = 60  # seconds for any one screen; a hung tool fails the test instead of the suite


@pytest.fixture(scope="module")
def sources(world):
    return {"model": str(world / "models" / "base"), "prompts": str(world / "data" / "prompts_train.jsonl")}


def tool_args(sources, out, *extra):
    return [
        "--model", sources["model"], "--prompts", sources["prompts"], "--out", str(out), "--limit", str(PROMPTS),
        "--max-new-tokens", "6", "--labeler", "alice", *extra,
    ]  # fmt: skip


def spawn(sources, out, *extra) -> pexpect.spawn:
    child = pexpect.spawn(
        sys.executable,
        ["-m", "rlhf_trl.label", *tool_args(sources, out, *extra)],
        cwd=str(ROOT),
        env={**OFFLINE_ENV, "PYTHONPATH": str(ROOT)},
        dimensions=(60, 140),
        timeout=TIMEOUT,
        encoding="utf-8",
    )
    return child


def press(child, key: str, expected: str) -> None:
    """Waits for the key prompt, presses `key`, and waits for the tool's answer to it."""
    child.expect_exact("choice> ")
    child.send(key)
    child.expect_exact(expected)


def finish(child) -> int:
    child.expect(pexpect.EOF)
    child.close()
    return child.exitstatus


def lines_of(path) -> list[dict]:
    """Every line of a JSONL file, each of which must be whole JSON."""
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    assert not text or text.endswith("\n"), f"{path} ends in a torn line"
    return [json.loads(line) for line in text.splitlines()]


def live_decisions(out) -> list[dict]:
    undone = {r["undoes"] for r in lines_of(out / labels.LOG) if r["kind"] == "undo"}
    return [r for r in lines_of(out / labels.LOG) if r["kind"] == "decision" and r["decision_id"] not in undone]


def first_prompts(sources) -> list[str]:
    rows = [json.loads(line) for line in open(sources["prompts"], encoding="utf-8")][:PROMPTS]
    return list(dict.fromkeys(row["prompt"][0]["content"] for row in rows))


def assert_files_match_log(out) -> None:
    """accepted/rejected/pairs hold exactly what the live decisions say, once each."""
    expected = {name: [] for name in labels.DERIVED}
    for decision in live_decisions(out):
        for name, records in labels.derived_records(decision).items():
            expected[name] += [(r["decision_id"], r.get("response") or r["chosen"] + r["rejected"]) for r in records]
    for name in labels.DERIVED:
        found = [(r["decision_id"], r.get("response") or r["chosen"] + r["rejected"]) for r in lines_of(out / name)]
        assert sorted(found) == sorted(expected[name]), name


def test_label_undo_quit_and_resume_without_duplicates(sources, tmp_path):
    out = tmp_path / "labels"
    prompts = first_prompts(sources)
    child = spawn(sources, out)
    child.expect_exact(f"labeled 0 of {len(prompts)}")
    child.expect_exact(prompts[0])
    press(child, "\x1b[A", "unknown key")  # an arrow key is not the "a" inside its escape sequence
    press(child, "a", "saved: a (1 of")
    child.expect_exact(prompts[1])
    press(child, "y", "saved: accept (2 of")
    press(child, "u", "undone: accept")
    child.expect_exact(f"labeled 1 of {len(prompts)}")
    child.expect_exact(prompts[1])  # the undone prompt comes back first
    press(child, "n", "saved: reject (2 of")
    press(child, "q", f"label: 2 of {len(prompts)} prompts labeled by alice")
    assert finish(child) == 0

    decisions = live_decisions(out)
    assert [(d["prompt"], labels.describe(d)) for d in decisions] == [(prompts[0], "a"), (prompts[1], "reject")]
    first = decisions[0]
    assert first["labeler"] == "alice" and first["model"] == sources["model"] and first["timestamp"]
    assert first["generation"] == {"samples": 2, "max_new_tokens": 6, "temperature": 0.7, "seed": 0}
    assert_files_match_log(out)
    accepted = lines_of(out / labels.ACCEPTED)
    assert [r["response"] for r in accepted] == [first["responses"][0]]  # the undone "accept all" left nothing
    assert {"labeler", "timestamp", "model", "generation"} <= set(accepted[0])

    child = spawn(sources, out)
    child.expect_exact(f"resuming: 2 of {len(prompts)} prompts already labeled by alice")
    child.expect_exact(prompts[2])
    press(child, "t", "saved: tie (3 of")
    if len(prompts) > 3:
        child.expect_exact(prompts[3])
        press(child, "b", f"saved: b ({len(prompts)} of")
    child.expect_exact(f"label: {len(prompts)} of {len(prompts)} prompts labeled by alice")
    assert finish(child) == 0

    decisions = live_decisions(out)
    assert [d["prompt"] for d in decisions] == prompts  # each prompt once, in order, none shown again
    assert_files_match_log(out)
    # What the reward stage reads: the pairs file, and the seed's two files as a folder.
    pairs = load_dataset_for(str(out / labels.PAIRS), "reward")
    assert len(pairs) == sum(d["responses"][0] != d["responses"][1] for d in decisions if d["decision"] == "prefer")
    assert load_dataset_for(str(out), "reward", allow_unmatched=True)

    child = spawn(sources, out)
    child.expect_exact(f"all {len(prompts)} prompts are labeled by alice")
    assert finish(child) == 0


def test_ctrl_c_and_kill_mid_session_leave_valid_jsonl_with_every_saved_decision(sources, tmp_path):
    out = tmp_path / "labels"
    child = spawn(sources, out, "-k", "3")
    press(child, "c", "saved: c (1 of")
    child.expect_exact("choice> ")
    child.sendintr()  # Ctrl-C
    child.expect_exact("label: interrupted; 1 of")
    assert finish(child) == 130
    child = spawn(sources, out, "-k", "3")
    child.expect_exact("resuming: 1 of")
    press(child, "b", "saved: b (2 of")
    child.expect_exact("choice> ")
    child.kill(signal.SIGKILL)
    child.close()
    assert child.signalstatus == signal.SIGKILL

    saved = live_decisions(out)
    assert [labels.describe(d) for d in saved] == ["c", "b"]
    assert_files_match_log(out)
    # A kill inside a write: a torn log line, and a decision whose data lines never made it.
    with open(out / labels.LOG, "a", encoding="utf-8") as log:
        log.write('{"kind": "decision", "decision_id": "torn", "lab')
    pairs = (out / labels.PAIRS).read_text().splitlines(keepends=True)
    (out / labels.PAIRS).write_text("".join(pairs[:-1]))
    with labels.LabelStore(out):  # what every start of the tool does first (the restart itself: the test above)
        pass
    assert [d["decision_id"] for d in live_decisions(out)] == [d["decision_id"] for d in saved]
    assert_files_match_log(out)


def write_decisions(path, rows: list[dict], decisions: list[str], labeler: str) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(row | {"decision": d, "labeler": labeler} for row, d in zip(rows, decisions, strict=True))


@pytest.fixture(scope="module")
def exported(sources, tmp_path_factory):
    """A labels folder with 3 exported samples, and the exported CSV's rows."""
    out = tmp_path_factory.mktemp("batch") / "labels"
    target = out / "to_label.csv"
    args = tool_args(sources, out, "--limit", "3", "--file", str(target))
    result = run_module("label", "export", *args)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "wrote 3 prompts x 2 answers" in result.stdout
    with open(target, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["sample_id", "prompt", "response_a", "response_b", "decision", "labeler"]
    return out, rows


def test_export_import_and_agreement(sources, exported, tmp_path, capsys):
    out, rows = exported
    write_decisions(tmp_path / "alice.csv", rows, ["a", "b", "tie"], "alice")
    write_decisions(tmp_path / "bob.csv", rows, ["a", "a", ""], "bob")  # bob left the last row unlabeled

    def tool(*args: str) -> str:  # in-process: the pseudo-terminal tests above cover the command itself
        label.main([*args, "--out", str(out)])
        return capsys.readouterr().out

    first = tool("import", "--file", str(tmp_path / "alice.csv"))
    assert "recorded 3 decisions by alice" in first and "no sample has been labeled by two" in first
    second = tool("import", "--file", str(tmp_path / "bob.csv"))
    assert "recorded 2 decisions by bob" in second and "1 rows left unlabeled" in second
    # Two shared samples, agreeing on one: observed 0.5; chance 0.5 (alice a,b; bob a,a): kappa 0.
    assert "alice vs bob on 2 shared samples: 50.0% agree, Cohen's kappa 0.00" in second
    again = tool("import", "--file", str(tmp_path / "bob.csv"))
    assert "recorded 0 decisions" in again and "2 already imported" in again

    decisions = live_decisions(out)
    assert len(decisions) == 5 and all(d["source"].startswith("import:") for d in decisions)
    assert {d["model"] for d in decisions} == {sources["model"]}
    assert_files_match_log(out)
    assert "alice vs bob on 2 shared samples" in tool("agreement")


def test_agreement_statistics():
    def vote(labeler, sample, choice):
        verdict, preferred = ("prefer", "ab".index(choice)) if choice in "ab" else (choice, None)
        return {"labeler": labeler, "sample_id": sample, "decision": verdict, "preferred": preferred}

    votes = [vote("x", s, c) for s, c in enumerate("aabba")] + [vote("y", s, c) for s, c in enumerate("abbba")]
    [result] = labels.agreement(votes + [vote("z", 9, "skip")])
    # observed 4/5; chance (3*2 + 2*3) / 25 = 0.48; kappa (0.8 - 0.48) / 0.52
    assert result["labelers"] == ("x", "y") and result["shared"] == 5
    assert result["agreement"] == pytest.approx(0.8) and result["kappa"] == pytest.approx(0.32 / 0.52)


def bad_import(tmp_path, exported, suffix: str, content: str):
    path = tmp_path / f"decisions{suffix}"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(UserError) as error:
        label.main(["import", "--file", str(path), "--out", str(exported[0]), "--labeler", "carol"])
    return str(error.value), str(path)


def test_import_errors_name_the_file_and_line(exported, tmp_path):
    first = exported[1][0]["sample_id"]
    good = json.dumps({"sample_id": first, "decision": "a"})
    cases = [
        (".jsonl", f'{good}\n{{"sample_id": "x", "decision": \n', "line 2", "invalid JSON"),
        (".jsonl", f'{good}\n{{"decision": "b"}}\n', "line 2", "'sample_id' is missing"),
        (".csv", f"sample_id,decision\n{first},a\nnot-a-sample,b\n", "line 3", "unknown sample_id 'not-a-sample'"),
        (".csv", f"sample_id,decision\n{first},maybe\n", "line 2", "decision 'maybe' is not one of a, b, tie"),
        (".csv", f"sample_id,decision\n{first},c\n", "line 2", "is not one of"),
        (".csv", f"sample_id,decision\n{first},a\n{first},b\n", "line 3", "already on line 2"),
        (".csv", f"sample_id\n{first}\n", "line 2", "'decision' is missing"),
    ]  # fmt: skip
    before = (exported[0] / labels.LOG).read_bytes() if (exported[0] / labels.LOG).exists() else b""
    for suffix, content, where, what in cases:
        message, path = bad_import(tmp_path, exported, suffix, content)
        assert f"{path} {where}" in message and what in message, message
    after = (exported[0] / labels.LOG).read_bytes() if (exported[0] / labels.LOG).exists() else b""
    assert after == before, "a rejected file recorded nothing"

    path = tmp_path / "bad.csv"
    path.write_text(f"sample_id,decision\n{first},perhaps\n", encoding="utf-8")
    result = run_module("label", "import", "--file", str(path), "--out", str(exported[0]), "--labeler", "carol")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {path} line 2: decision 'perhaps'")


def import_file(exported, path, capsys) -> str:
    label.main(["import", "--file", str(path), "--out", str(exported[0])])
    return capsys.readouterr().out


def test_import_reads_semicolon_csv_bom_jsonl_and_skips_cleared_rows(exported, tmp_path, capsys):
    # D09: Excel in a German/French locale saves `;`-separated CSV (and a prompt cell may hold a comma);
    # D10: the last rows' cells cleared (";;;;;" lines) are no rows; D07: a JSONL saved with a BOM.
    # dave labels the 3 samples a, b, tie across the three files: 3 decisions recorded, nothing refused.
    out, rows = exported
    first, second, third = ({**row, "labeler": "dave"} for row in rows)

    def write(name, delimiter, row, blank_rows):
        with open(tmp_path / name, "w", newline="", encoding="utf-8-sig") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]), delimiter=delimiter)
            writer.writeheader()
            writer.writerows([row, *[dict.fromkeys(rows[0], "")] * blank_rows])
        return tmp_path / name

    # the prompt cell holds a comma, the one thing that must not split a `;` file; 3 cleared rows follow on
    # lines 3-5 (a row's cells may hold line breaks: the sample's answers are plain text, one line each here)
    path = write("semicolon.csv", ";", first | {"decision": "a", "prompt": "a, b"}, 3)
    said = import_file(exported, path, capsys)
    assert f"{path}: left out 3 rows whose every cell is empty (line " in said
    assert "recorded 1 decisions by dave" in said
    said = import_file(exported, write("tab.csv", "\t", second | {"decision": "b"}, 1), capsys)
    assert "recorded 1 decisions by dave" in said and "left out 1 rows" in said
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps(third | {"decision": "tie"}).encode() + b"\n")
    assert "recorded 1 decisions by dave" in import_file(exported, tmp_path / "bom.jsonl", capsys)
    mine = [labels.describe(d) for d in live_decisions(out) if d["labeler"] == "dave"]
    assert mine == ["a", "b", "tie"]


def test_a_lone_surrogate_in_the_prompts_or_a_decision_is_one_line(world, tmp_path):
    # D06 in label-export (its prompts file, line 2) and in the store the web page's Label tab records into
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Tell me."}\n{"prompt": "Wave \\ud83d"}\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"prompts.jsonl line 2: field 'prompt' holds a lone surrogate \\ud83d"):
        labels.read_prompts(prompts)
    item = {"prompt": "Wave \ud83d", "responses": ["a", "b"], "sample_id": "s1", "prompt_id": "p", "model": "m"}
    with pytest.raises(UserError, match=r"the decision on sample s1: field 'prompt' holds a lone surrogate"):
        labels.new_decision({**item, "generation": {}}, "alice", "prefer", 0, "web")
    # the Chat tab (and `make chat`): what a browser sends is checked before any tokenizer sees it
    from rlhf_trl.chat import fit_history

    with pytest.raises(UserError, match=r"the chat: field 'content' holds a lone surrogate \\ud83d at character 6"):
        fit_history(None, [{"role": "user", "content": "Wave \ud83d"}], 128, 16)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_reward_trains_on_human_generated_or_mixed_pairs(tmp_path, capsys):
    generated = write_jsonl(
        tmp_path / "generated.jsonl", [{"prompt": f"q{i}", "chosen": "good", "rejected": "bad"} for i in range(40)]
    )
    held_out = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": "e", "chosen": "good", "rejected": "bad"}])
    human = write_jsonl(
        tmp_path / "pairs.jsonl",
        [{"prompt": f"h{i}", "chosen": "yes", "rejected": "no", "labeler": "alice"} for i in range(10)],
    )

    def splits(mix, labels, fraction=None):
        args = SimpleNamespace(
            dataset_name=generated, eval_dataset_name=held_out, dataset_config=None, dataset_format="auto",
            dataset_train_split="train", dataset_test_split="test", allow_unmatched=False, max_train_samples=None,
            eval_split_size=0.05, human_labels=labels, label_mix=mix, human_fraction=fraction,
        )  # fmt: skip
        train, evaluation = load_splits(args, "reward", seed=0)
        assert len(evaluation) == 1  # held-out pairs are the same whatever the mix
        return Counter(row["chosen"][0]["content"] for row in train)

    assert splits("generated", [human]) == {"good": 40}
    assert splits("human", [human]) == {"yes": 10}
    assert splits("mix", [human]) == {"good": 40, "yes": 10}
    assert splits("mix", [human], fraction=0.5) == {"good": 10, "yes": 10}
    missing = str(tmp_path / "nobody-labeled-yet.jsonl")
    assert splits("mix", [missing]) == {"good": 40}  # make all without labels: unchanged
    assert "no human labels at" in capsys.readouterr().out
    with pytest.raises(UserError, match="does not exist"):
        splits("human", [missing])
    with pytest.raises(UserError, match="label_mix 'both' is unknown"):
        splits("both", [human])


def test_one_labeler_name_rule_for_every_way_in():
    # NFKC, invisible characters out, spaces folded, casefolded: one person, one name.
    for given in (
        "Alice",
        "alice\u200b",
        "\uff21\uff4c\uff49\uff43\uff45",
        " al\u202eice ",
        "ALICE\u00ad",
        "\ufeffalice",
    ):
        assert labels.check_labeler(given) == "alice", given
    assert labels.check_labeler("  Carol   ÜNÏCODE ") == "carol ünïcode"
    for name, why in (
        ("x" * 41, "at most 40 characters; this one has 41"),
        ("../x", "letters"),
        ("\u200b", "enter your name"),
    ):
        with pytest.raises(ValueError, match=why):
            labels.check_labeler(name)
    # A log written before the rule spelled one person three ways: the store reads one labeler.
    spellings = ["Alice", "alice\u200b", "alice"]
    logged = [{"kind": "decision", "decision_id": str(i), "labeler": name} for i, name in enumerate(spellings)]
    assert {d["labeler"] for d in labels.live_decisions(logged).values()} == {"alice"}


def test_label_import_takes_labeler_names_by_the_same_rule(exported, tmp_path, capsys):
    """QA D11: label-import took the labeler column as it was: Alice, alice and alice + U+200B were three labelers
    who agreed 100%, each pair once per name in pairs.jsonl, and a 300-character name went in."""
    out = tmp_path / "labels"
    out.mkdir()
    shutil.copy(exported[0] / labels.SAMPLES, out / labels.SAMPLES)
    rows = exported[1]
    for name, labeler in (("lower", "alice"), ("capital", "Alice"), ("zwsp", "alice\u200b")):
        write_decisions(tmp_path / f"{name}.csv", rows, ["a", "b", "tie"], labeler)

    def tool(name: str) -> str:
        label.main(["import", "--file", str(tmp_path / f"{name}.csv"), "--out", str(out)])
        return capsys.readouterr().out

    assert "recorded 3 decisions by alice" in tool("lower")
    for name, given in (("capital", "Alice"), ("zwsp", "alice\u200b")):
        said = tool(name)
        assert "recorded 0 decisions by nobody" in said and "3 already imported" in said
        assert f"labeler {given!r} recorded as 'alice'" in said
        assert "no sample has been labeled by two labelers yet" in said
    # By hand: decisions a and b make one pair each, the tie none: 2 pairs, whatever the names' spellings.
    assert len(lines_of(out / labels.PAIRS)) == 2 and {d["labeler"] for d in live_decisions(out)} == {"alice"}

    write_decisions(tmp_path / "long.csv", rows, ["a", "b", "tie"], "x" * 300)
    with pytest.raises(UserError, match=r"long\.csv line 2: labeler 'x{300}': a labeler name is at most 40 characters"):
        tool("long")
    assert len(live_decisions(out)) == 3  # nothing of the refused file


def test_a_pairs_file_of_arena_votes_only_gives_no_human_pair_not_a_crash(tmp_path, capsys):
    """The D20 situation itself: people only voted in the arena, then `make reward` with the recipe's human_labels
    (pairs.jsonl) and label_mix mix. Every line is an arena vote, left out: the run continues on generated pairs
    (mix) or stops with one line (human), where it ended in an IndexError traceback."""
    out = tmp_path / "labels"
    shown = [
        {"sample_id": f"s{stage}", "responses": [f"{stage} says"], "stage": stage, "model": stage, "generation": {},
         "run": f"run-{stage}"}
        for stage in ("ppo", "sft")
    ]  # fmt: skip
    with labels.LabelStore(out) as store:
        for n in range(2):  # two arena votes for A (PPO's answer): two lines of pairs.jsonl, both votes
            item = {"index": n, "prompt": f"held-out {n}", "prompt_id": f"e{n}", "messages": []}
            store.record([labels.arena_vote(labels.arena_item(item, shown), "alice", "a")])
    assert len(lines_of(out / labels.PAIRS)) == 2
    args = SimpleNamespace(human_labels=[str(out / labels.PAIRS)], label_mix="mix", allow_unmatched=True)
    assert human_label_pairs(args, "reward") == []
    assert "reward: left out 2 human_labels record(s) from arena votes" in capsys.readouterr().out
    args.label_mix = "human"
    with pytest.raises(UserError, match="hold no preference pairs: label more"):
        mix_training_pairs(SimpleNamespace(**vars(args), human_fraction=None), [], 0)
    # The folder (the KTO recipes' human_labels, and the reward stage's when given it): accepted_data.jsonl and
    # rejected_data.jsonl hold 2 lines each, all from the votes: nothing for reward (pairs) nor KTO (rows).
    args = SimpleNamespace(human_labels=[str(out)], label_mix="mix", allow_unmatched=True)
    assert human_label_pairs(args, "reward") == []
    assert "reward: left out 4 human_labels record(s) from arena votes" in capsys.readouterr().out
    assert human_label_pairs(args, "kto", "kto") == []
    assert "kto: left out 4 human_labels record(s) from arena votes" in capsys.readouterr().out


def test_arena_votes_are_not_training_pairs_unless_asked_for(tmp_path, capsys):
    """QA D20: the arena's votes (on held-out prompts) went into pairs.jsonl, which the recipes' reward and DPO
    stages mix into training. Variant: a labels folder given as accepted/rejected files, and older lines that carry
    the stages but no source."""
    out = tmp_path / "labels"
    shown = [
        {"sample_id": f"s{stage}", "responses": [f"{stage} says"], "stage": stage, "model": stage, "generation": {},
         "run": f"run-{stage}"}
        for stage in ("ppo", "sft")
    ]  # fmt: skip
    with labels.LabelStore(out) as store:
        for n in range(3):  # three arena votes for A (PPO's answer), each one pair
            item = {"index": n, "prompt": f"held-out {n}", "prompt_id": f"e{n}", "messages": []}
            store.record([labels.arena_vote(labels.arena_item(item, shown), "alice", "a")])
        labeled = {"index": 9, "prompt": "train 9", "prompt_id": "t9", "messages": [], "responses": ["yes", "no"],
                   "sample_id": "s9", "model": "sft", "generation": {}}  # fmt: skip
        store.record([labels.new_decision(labeled, "alice", "prefer", 0, source="terminal")])
    older = {"prompt": "held-out 7", "chosen": "x", "rejected": "y", "stages": ["ppo", "sft"]}  # before `source`
    with open(out / labels.PAIRS, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(older) + "\n")

    def human(source, allowed=None):
        args = SimpleNamespace(human_labels=[str(source)], label_mix="human", allow_unmatched=False)
        if allowed is not None:
            args.arena_votes_as_training = allowed
        return sorted(pair["prompt"][0]["content"] for pair in human_label_pairs(args, "reward"))

    # By hand: 3 arena pairs + 1 older arena line + 1 labeled pair in pairs.jsonl; only "train 9" is not a vote.
    assert human(out / labels.PAIRS) == ["train 9"]
    assert "reward: left out 4 human_labels record(s) from arena votes" in capsys.readouterr().out
    assert human(out / labels.PAIRS, allowed=True) == [
        "held-out 0",
        "held-out 1",
        "held-out 2",
        "held-out 7",
        "train 9",
    ]
    # The folder as accepted/rejected files: 3 votes x (1 accepted + 1 rejected line) left out.
    assert human(out) == ["train 9"]
    assert "left out 6 human_labels record(s)" in capsys.readouterr().out
