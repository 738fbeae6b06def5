"""`make report`: built from a tiny run, every plot is a real image with data in it, and eval is rerun when stale."""

import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import run_module
from test_eval import eval_command

from rlhf_trl import report

PLOTS = ("sft_loss.png", "reward_accuracy.png", "ppo_training.png", "reward_distribution.png")


@pytest.fixture(scope="module")
def built(trained, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("report")
    result = eval_command(trained, folder / "eval.json")
    assert result.returncode == 0, result.stderr[-3000:]
    result = run_module(
        "report",
        "--models",
        str(Path(trained["sft"]).parent),
        "--eval",
        str(folder / "eval.json"),
        "--output",
        str(folder / "report"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == f"report: {folder / 'report' / 'report.md'}"
    assert "mean reward-model score" in result.stdout, "the report prints the evaluation table"
    assert "running the evaluation" not in result.stdout, "a fresh eval.json is reused"
    return folder / "report"


@pytest.mark.parametrize("name", PLOTS)
def test_every_plot_is_an_image_with_data(built, name):
    import matplotlib.image

    pixels = matplotlib.image.imread(built / name)
    assert pixels.ndim == 3 and pixels.shape[0] > 200 and pixels.shape[1] > 300
    assert len({tuple(p) for p in pixels.reshape(-1, pixels.shape[2])[::7].tolist()}) > 10, "not one flat colour"


def test_report_md_holds_the_tables_plots_and_samples(built):
    text = (built / "report.md").read_text()
    for needle in (
        "pairwise accuracy",
        "| mean reward-model score |",
        "win rate",
        "KL from SFT",
        "answers ending with EOS",
    ):
        assert needle in text
    assert "ground truth" in text
    for name in PLOTS:
        assert f"]({name})" in text
    samples = (built / "samples.md").read_text()
    assert samples.count("\n| ") == 1 + 6 and "| prompt | SFT |" in samples  # one answer to each of 6 prompts


def test_arena_votes_add_the_human_verdict(trained, built, tmp_path):
    """`make report` with arena votes in the labels folder: the human win rate line, in report.md and printed.
    Each vote names the runs it judged (the stages' current runs here: votes on earlier runs are left out)."""
    from rlhf_trl.labels import stage_runs

    runs = stage_runs(Path(trained["sft"]).parent)
    votes = [
        {"kind": "decision", "decision_id": f"d{i}", "labeler": labeler, "source": "arena", "stages": stages,
         "runs": [runs[stage] for stage in stages], "decision": "prefer", "preferred": preferred, "prompt_id": f"p{i}"}
        for i, (labeler, stages, preferred) in enumerate(
            [("ann", ["ppo", "sft"], 0)] * 5 + [("ben", ["sft", "ppo"], 1)] * 2 + [("ben", ["sft", "ppo"], 0)] * 3
        )
    ]  # fmt: skip
    votes.append({"kind": "undo", "undoes": "d9", "labeler": "ben"})  # an undone vote does not count
    folder = tmp_path / "labels"
    folder.mkdir()
    (folder / "decisions.jsonl").write_text("".join(json.dumps(v) + "\n" for v in votes))
    result = run_module(
        "report", "--models", str(Path(trained["sft"]).parent), "--eval", str(built.parent / "eval.json"),
        "--output", str(tmp_path / "report"), "--labels", str(folder),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    # PPO preferred in 7 of 9 live votes: 0.778; Wilson 95%: centre (0.77778 + 0.21342) / 1.42684 = 0.69468,
    # half-width 1.37366 * sqrt(0.019204 + 0.011857) = 0.24210: 0.453 to 0.937.
    line = "human win rate of PPO over SFT: 0.78 (95% CI 0.45-0.94, 9 votes, 2 labelers)"
    assert f"report: {line}" in result.stdout
    assert f"- {line}" in (tmp_path / "report" / "report.md").read_text()
    # The leaderboard: PPO 7 to 2 over SFT, plus one virtual tie: 7.5 to 2.5, 400 * log10(3) = 190.85 points.
    text = (tmp_path / "report" / "report.md").read_text()
    assert "## Human leaderboard (arena)" in text
    assert "| 1 | PPO | 1191 |" in text and "| 9 | 0 | 2 | 0.78 (0.45-0.94, 9 votes) |" in text
    assert "| 2 | SFT | 1000 | (anchor) | 9 | 0 | 2 | - |" in text
    assert "report: | 1 | PPO | 1191 |" in result.stdout
    assert "report: position bias: the left answer (A) won" in result.stdout
    assert "Human leaderboard" not in (built / "report.md").read_text()  # no arena votes: no section


def test_a_stage_without_a_metrics_log_gets_a_note_not_a_crash(trained, built, tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    for stage in ("sft", "reward", "ppo"):
        shutil.copytree(trained[stage], models / stage)
    (models / "sft" / "metrics.jsonl").unlink()
    result = json.loads((built.parent / "eval.json").read_text())
    written = report.build(models, result, tmp_path / "out")
    assert {p.name for p in written} == set(PLOTS) - {"sft_loss.png"}
    assert "make sft ARGS=--overwrite" in (tmp_path / "out" / "report.md").read_text()


def test_eval_is_stale_when_a_stage_is_newer(trained, built, tmp_path):
    eval_file = built.parent / "eval.json"
    models = Path(trained["sft"]).parent
    assert not report.eval_is_stale(eval_file, models)
    copy = tmp_path / "eval.json"
    shutil.copy(eval_file, copy)
    marker = Path(trained["ppo"]) / "rlhf_trl_run.json"
    os.utime(copy, (marker.stat().st_mtime - 10, marker.stat().st_mtime - 10))
    assert report.eval_is_stale(copy, models)
    assert report.eval_is_stale(tmp_path / "missing.json", models)


def test_report_on_a_missing_stage_says_which_make_target_to_run(tmp_path):
    result = run_module("report", "--models", str(tmp_path / "none"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "run `make sft RECIPE=demo` first" in result.stderr.strip().splitlines()[-1]


def test_report_on_a_broken_eval_json_says_to_rerun(tmp_path):
    for text in ("{not json", '{"stages": {}}'):
        (tmp_path / "eval.json").write_text(text)
        result = run_module("report", "--models", str(tmp_path), "--eval", str(tmp_path / "eval.json"))
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert "rerun `make report`" in result.stderr.strip().splitlines()[-1]


def test_report_of_another_method_reads_its_eval_and_plots_its_training(method_models, trained):
    """`make report STAGE=rloo`: eval-rloo.json and report-rloo/ by default, RLOO's columns, samples and curves."""
    result = eval_command(trained, method_models / "eval-rloo.json", "--models", str(method_models), "--stage", "rloo")
    assert result.returncode == 0, result.stderr[-3000:]
    result = run_module("report", "--models", str(method_models), "--stage", "rloo")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "running the evaluation" not in result.stdout, "make eval STAGE=rloo's file is the one read"
    output = method_models / "report-rloo"
    assert result.stdout.strip().splitlines()[-1] == f"report: {output / 'report.md'}"
    text = (output / "report.md").read_text()
    assert "| metric | SFT | RLOO |" in text and "`eval-rloo.json`" in text and "SFT and RLOO side by side" in text
    for name in ("rloo_training.png", "reward_distribution.png"):
        assert f"]({name})" in text and (output / name).is_file()
    assert (
        "| prompt | SFT | score / ground truth | RLOO | score / ground truth |" in (output / "samples.md").read_text()
    )


def test_report_refuses_an_eval_of_another_method(trained, built):
    result = run_module(
        "report",
        "--models",
        str(Path(trained["sft"]).parent),
        "--stage",
        "dpo",
        "--eval",
        str(built.parent / "eval.json"),
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "judges ppo, not dpo" in result.stderr.strip().splitlines()[-1]


def test_dpo_training_plot_draws_trl_dpo_metrics(tmp_path):
    records = [
        {"step": s, "loss": 0.7 - 0.1 * s, "rewards/accuracies": 0.5 + 0.1 * s, "rewards/margins": 0.2 * s,
         "logps/chosen": -30.0 + s}
        for s in range(1, 5)
    ]  # fmt: skip
    assert report.plot_training(tmp_path / "dpo.png", records, "dpo") and (tmp_path / "dpo.png").stat().st_size > 0
    assert not report.plot_training(tmp_path / "none.png", [{"step": 1, "loss": 0.5}], "rloo"), "no RLOO metric"
