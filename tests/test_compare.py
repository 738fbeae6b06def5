"""`make compare`: SFT and every finished method judged side by side from tiny runs, with what each training cost."""

import json
import math
import os
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import ROOT, run_here, run_module
from test_bad_inputs import assert_one_line_error

from rlhf_trl import compare, evaluate, outputs

# The evaluation settings every run here shares: compare's numbers must equal make eval's for the same ones.
SETTINGS = ("--max-prompts", "4", "--samples", "2", "--max-new-tokens", "12", "--seed", "3")


def data_args(trained) -> tuple[str, ...]:
    data = trained["data"]
    return ("--prompts", f"{data}/prompts_eval.jsonl", "--pairs", f"{data}/pairs_eval.jsonl", *SETTINGS)


@pytest.fixture(scope="module")
def compared(trained, method_models) -> SimpleNamespace:
    result = run_module("compare", "--models", str(method_models), *data_args(trained))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    folder = method_models / "compare"
    return SimpleNamespace(stdout=result.stdout, folder=folder, saved=json.loads((folder / "compare.json").read_text()))


def recorded_cost(folder: Path) -> dict:
    """A stage's cost as its marker and manifest hold it, read here by hand (None: not recorded)."""
    marker = json.loads((folder / "rlhf_trl_run.json").read_text())
    manifest = json.loads((folder / "manifest.json").read_text())
    keys = ("peak_memory_mib", "peak_memory_kind", "tokens_generated")
    attempts = len(manifest["attempts"])
    return {"wall_time_s": manifest.get("wall_time_s"), **{key: marker.get(key) for key in keys}, "attempts": attempts,
            "processes": marker["processes"]}  # fmt: skip


def test_compare_prints_the_table_of_every_finished_method_last(compared, method_models):
    saved = compared.saved
    assert saved["methods"] == ["ppo", "rloo"] and set(saved["stages"]) == {"sft", "ppo", "rloo"}
    assert saved["missing"] == {
        "grpo": "make grpo RECIPE=demo",
        "dpo": "make dpo RECIPE=demo",
        "kto": "make kto RECIPE=demo",
    }
    for method in ("ppo", "rloo"):
        assert saved["costs"][method] == recorded_cost(method_models / method)
        assert 0 <= saved["stages"][method]["win_rate"] <= 1
    assert saved["costs"]["rloo"]["tokens_generated"] == 4321 and saved["costs"]["ppo"]["tokens_generated"] is None

    lines = compared.stdout.rstrip().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("compare: demo: 4 held-out prompts x 2 samples"))
    table = lines[start:]  # the table is the last thing printed
    assert table[1].split() == ["sft", "ppo", "rloo"]
    row = {line.split("  ")[1].strip(): line.split()[-3:] for line in table[2:11]}
    rloo, ppo = saved["stages"]["rloo"], saved["stages"]["ppo"]
    assert row["mean reward-model score"] == [f"{saved['stages']['sft']['reward_score']:.3f}",
                                              f"{ppo['reward_score']:.3f}", f"{rloo['reward_score']:.3f}"]  # fmt: skip
    assert row["win rate over SFT (reward model)"] == ["-", f"{ppo['win_rate']:.2f}", f"{rloo['win_rate']:.2f}"]
    assert row["tokens generated in training"] == ["-", "-", "4321"]  # PPO recorded none: "-", not a crash
    assert table[9].split()[-3:] == ["-", "812", "cpu"]  # peak memory: rloo's, in MiB; none for ppo
    assert "training wall time (s)" in table[8] and table[8].split()[-1] == "42"
    assert lines[-1] == (
        "missing (not finished): grpo (run `make grpo RECIPE=demo`), dpo (run `make dpo RECIPE=demo`), "
        "kto (run `make kto RECIPE=demo`)"
    )
    for method in ("ppo", "rloo"):
        truth = f"ground truth: sft {saved['stages']['sft']['ground_truth']:.2f} -> {method} "
        assert any(line.startswith(truth) for line in table)
        beaten = saved["stages"][method]["ground_truth"] > saved["stages"]["sft"]["ground_truth"]
        warning = f"warning: {method.upper()} did not beat SFT on the ground truth: it did not help this run"
        assert (warning in table) != beaten

    page = (compared.folder / "compare.md").read_text()
    assert "| metric | SFT | PPO | RLOO |" in page and "](compare.png)" in page
    assert "| tokens generated in training | - | - | 4321 |" in page
    assert "grpo (run `make grpo RECIPE=demo`)" in page


def test_compare_plot_is_an_image_with_data(compared):
    import matplotlib.image

    pixels = matplotlib.image.imread(compared.folder / "compare.png")
    assert pixels.ndim == 3 and pixels.shape[0] > 400 and pixels.shape[1] > 600
    assert len({tuple(p) for p in pixels.reshape(-1, pixels.shape[2])[::7].tolist()}) > 10, "not one flat colour"


def test_compare_numbers_equal_make_eval_stage(compared, method_models, trained):
    """`make eval STAGE=rloo` with the same settings: the same answers, scores and metrics (one place for each)."""
    result = run_module("evaluate", "--models", str(method_models), "--stage", "rloo", *data_args(trained))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"eval: wrote {method_models / 'eval-rloo.json'}" in result.stdout, (
        "a method other than PPO: eval-<stage>.json"
    )
    assert result.stdout.splitlines()[[i for i, s in enumerate(result.stdout.splitlines()) if "samples" in s][-1] + 1
                                      ].split() == ["sft", "rloo"]  # fmt: skip
    alone = json.loads((method_models / "eval-rloo.json").read_text())
    assert alone["methods"] == ["rloo"] and set(alone["stages"]) == {"sft", "rloo"}
    for stage in ("sft", "rloo"):
        assert alone["stages"][stage] == compared.saved["stages"][stage]
        assert alone["scores"][stage] == compared.saved["scores"][stage]
    assert [g["rloo"] for g in alone["generations"]] == [g["rloo"] for g in compared.saved["generations"]]
    assert alone["reward_accuracy"] == compared.saved["reward_accuracy"]


def test_the_compare_folder_is_a_finished_output_but_not_a_stage_to_chat_with(compared, method_models, tmp_path):
    from rlhf_trl.ui import Site

    assert json.loads((compared.folder / "rlhf_trl_run.json").read_text())["stage"] == "compare"
    assert not compared.folder.with_name("compare.partial").exists()
    args = SimpleNamespace(
        recipe="demo", models=method_models, data=tmp_path, out=tmp_path / "labels", seed=0, max_new_tokens=4,
        temperature=None, label_max_new_tokens=4,
    )  # fmt: skip
    assert Site(args).stages() == ["sft", "ppo", "rloo"]


def test_a_compare_that_fails_midway_leaves_the_previous_one(compared, method_models, trained, tmp_path, monkeypatch):
    previous = tmp_path / "compare"
    shutil.copytree(compared.folder, previous)

    def broken_plot(path, summary):
        raise RuntimeError("the disk filled up")

    monkeypatch.setattr(compare, "plot", broken_plot)
    args = compare.parser().parse_args(["--models", str(method_models), "--methods", "rloo", "--output", str(previous),
                                        *data_args(trained)])  # fmt: skip
    with pytest.raises(RuntimeError, match="the disk filled up"):
        compare.compare(args, log=lambda line: None)
    assert json.loads((previous / "compare.json").read_text()) == compared.saved, "the finished one is untouched"
    assert not (previous.with_name("compare.partial") / "rlhf_trl_run.json").exists()


def test_compare_with_no_finished_method_says_so_in_one_line(trained, tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    for stage in ("sft", "reward"):
        (models / stage).symlink_to(trained[stage])
    (models / "ppo.partial").mkdir()  # a crashed run is not a finished method
    result = run_here("compare", "--models", str(models), *data_args(trained))
    assert_one_line_error(result, "no finished method", "make compare RECIPE=demo", "make ppo RECIPE=demo")
    assert not (models / "compare").exists() and not (models / "compare.partial").exists()


def test_evaluate_names_the_make_target_of_a_missing_method(trained, tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    for stage in ("sft", "reward"):
        (models / stage).symlink_to(trained[stage])
    result = run_here("evaluate", "--models", str(models), "--stage", "grpo", *data_args(trained))
    assert_one_line_error(result, "the grpo output", "make grpo RECIPE=demo")


def test_truth_notes_name_each_method_that_did_not_beat_sft():
    stages = {"sft": {"ground_truth": 0.5}, "rloo": {"ground_truth": 0.75}, "dpo": {"ground_truth": 0.5}}
    assert evaluate.truth_notes(stages, ["rloo", "dpo"]) == [
        "ground truth: sft 0.50 -> rloo 0.75",
        "ground truth: sft 0.50 -> dpo 0.50",
        "warning: DPO did not beat SFT on the ground truth: it did not help this run",
    ]
    assert evaluate.truth_notes({"sft": {"ground_truth": None}, "dpo": {}}, ["dpo"]) == []  # not the demo


def test_the_ground_truth_gain_is_paired_by_prompt_with_its_standard_error():
    # 3 prompts x 2 answers; per prompt, method mean - SFT mean: (1 - 0.5), (0.5 - 0), (1 - 1) = 0.5, 0.5, 0
    sft, method = [0, 1, 0, 0, 1, 1], [1, 1, 0, 1, 1, 1]
    gain, error, prompts = evaluate.paired_gain(method, sft, samples=2)
    assert gain == pytest.approx(1 / 3) and prompts == 3
    assert error == pytest.approx(math.sqrt(1 / 12) / math.sqrt(3))  # stdev of (0.5, 0.5, 0) is sqrt(1/12); / sqrt(3)
    with pytest.raises(ValueError):
        evaluate.paired_gain([1, 0, 1], [0, 0, 1], samples=2)  # 3 answers are not whole prompts of 2

    def stage(truth, gain, error):
        measured = {"ground_truth_gain": gain, "ground_truth_gain_se": error, "ground_truth_prompts": 49}
        return {"ground_truth": truth, **measured}

    stages = {"sft": {"ground_truth": 0.5}, "ppo": stage(0.75, 0.25, 0.05), "dpo": stage(0.6, 0.1, 0.08)}
    assert evaluate.truth_notes(stages, ["ppo", "dpo"]) == [
        "ground truth: sft 0.50 -> ppo 0.75 (+0.25, standard error 0.05 over 49 prompts: beyond 2 standard errors)",
        "ground truth: sft 0.50 -> dpo 0.60 (+0.10, standard error 0.08 over 49 prompts: within 2 standard errors)",
    ]


def test_a_stage_that_recorded_no_cost_reads_as_unknown(tmp_path):
    (tmp_path / "rlhf_trl_run.json").write_text(json.dumps({"stage": "dpo", "manifest": "manifest.json"}))
    cost = compare.stage_cost(tmp_path)  # no manifest at all
    assert cost == {"wall_time_s": None, "peak_memory_mib": None, "peak_memory_kind": None, "tokens_generated": None,
                    "attempts": None, "processes": None}  # fmt: skip
    assert [cells for _, cells in compare.cost_rows({"dpo": cost}, ["dpo"])] == [["-", "-"]] * 3


def test_a_resumed_runs_wall_time_and_a_multi_process_runs_memory_say_what_they_count(tmp_path):
    """outputs.finish takes wall_time_s from the last start: a run resumed at step 40 of 60 showed a third of its
    cost, as if it were the fastest method."""
    (tmp_path / "rlhf_trl_run.json").write_text(json.dumps({"stage": "grpo", "manifest": "manifest.json"}))
    (tmp_path / "manifest.json").write_text(json.dumps({"wall_time_s": 9.0, "attempts": [{}, {"resumed_from": "c"}]}))
    cost = compare.stage_cost(tmp_path)
    assert compare.cost_rows({"grpo": cost}, ["grpo"])[0][1] == ["-", "9*"]
    # peak memory is the main process's: a 2-process run says so (it held about twice that)
    assert compare.memory_cell({**cost, "peak_memory_mib": 579.0, "peak_memory_kind": "cpu_resident"}) == "579 cpu"
    assert compare.memory_cell({"peak_memory_mib": 579.0, "peak_memory_kind": "cpu_resident", "processes": 2}) == (
        "579 cpu x2"
    )
    summary = {"stages": {"sft": {"ground_truth": None}, "grpo": {}}, "methods": ["grpo"], "warnings": [],
               "costs": {"grpo": cost}, "missing": {}, "shared_costs": {"sft": cost, "reward": cost}}  # fmt: skip
    assert any(line.startswith("* grpo: resumed") for line in compare.notes(summary))


def test_a_method_trained_from_an_older_sft_model_is_flagged(tmp_path):
    """`make sft ARGS=--overwrite` after `make rloo`: compare kept rloo and judged it against the new SFT model."""
    for stage in ("sft", "reward", "rloo"):
        (tmp_path / stage).mkdir()
        (tmp_path / stage / "rlhf_trl_run.json").write_text(json.dumps({"stage": stage, "run": 1}))
    recorded = {key: {"path": "x", "sha256": outputs.fingerprint(tmp_path / stage)}
                for key, stage in (("sft_model_path", "sft"), ("reward_model_path", "reward"))}  # fmt: skip
    (tmp_path / "rloo/manifest.json").write_text(json.dumps({"inputs": recorded}))
    assert compare.started_elsewhere(tmp_path, "rloo") is None
    (tmp_path / "sft/rlhf_trl_run.json").write_text(json.dumps({"stage": "sft", "run": 2}))  # retrained
    assert compare.started_elsewhere(tmp_path, "rloo") == "sft_model_path"
    cost = compare.stage_cost(tmp_path / "rloo")
    summary = {"stages": {"sft": {"ground_truth": None}, "rloo": {}}, "methods": ["rloo"], "warnings": [],
               "costs": {"rloo": cost}, "missing": {}, "shared_costs": {"sft": cost, "reward": cost},
               "recipe": "demo", "stale": {"rloo": "sft_model_path"}}  # fmt: skip
    assert any(
        line.startswith("warning: RLOO was trained from another sft_model_path") for line in compare.notes(summary)
    )


def test_make_passes_stage_and_compare_trains_only_what_is_missing(tmp_path):
    """`make -n` in a scratch project: eval, report, merge get STAGE; compare keeps the finished and trains the rest."""
    project = tmp_path / "project"
    project.mkdir()
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(ROOT / name, project / name)
    (project / ".venv").symlink_to((ROOT / ".venv").resolve())
    for stage in ("sft", "reward", "ppo"):
        (project / "models/demo" / stage).mkdir(parents=True)
        (project / "models/demo" / stage / "rlhf_trl_run.json").write_text("{}")

    def dry(*args: str) -> str:
        # Under `make test` the outer make's MAKEFLAGS/MAKELEVEL would make this one print "Entering directory".
        env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
        command = ["make", "--no-print-directory", "-n", *args]
        result = subprocess.run(command, cwd=project, capture_output=True, text=True, timeout=60, env=env)
        assert result.returncode == 0, result.stderr
        return result.stderr + result.stdout  # compare --to-train says what it keeps and trains on stderr

    assert "-m rlhf_trl.evaluate --recipe demo --stage rloo" in dry("eval", "STAGE=rloo")
    assert "-m rlhf_trl.report --recipe demo --stage dpo" in dry("report", "STAGE=dpo")
    assert "-m rlhf_trl.report --recipe demo --stage ppo" in dry("report")
    assert "-m rlhf_trl.merge --recipe demo --stage grpo" in dry("merge", "STAGE=grpo")  # make help's advice
    assert "-m rlhf_trl.merge --recipe demo --stage ppo" in dry("merge")
    planned = dry("compare")
    assert "ppo: models/demo/ppo is finished; kept" in planned and "-m rlhf_trl.ppo" not in planned
    for method in ("rloo", "grpo", "dpo", "kto"):
        assert f"-m rlhf_trl.{method} --config recipes/demo/{method}.yaml" in planned
    assert planned.rstrip().splitlines()[-1].endswith("-m rlhf_trl.compare --recipe demo")


def test_make_compare_trains_only_the_methods_it_is_asked_to_compare(tmp_path):
    """QA D15: `make compare ARGS="--methods ppo"` trained RLOO, GRPO and DPO first (the Makefile's loop ran before
    rlhf_trl.compare read --methods). Variant: with SFT, reward and PPO finished, it trains nothing."""
    models = tmp_path / "models" / "demo"
    assert compare.to_train(models, ["ppo"]) == ["sft", "reward", "ppo"]  # nothing finished: what ppo needs
    for stage in ("sft", "reward", "ppo"):
        (models / stage).mkdir(parents=True)
        (models / stage / outputs.MARKER).write_text(json.dumps({"stage": stage}))
    assert compare.to_train(models, ["ppo"]) == []
    assert compare.to_train(models, ["ppo", "dpo"]) == ["dpo"]

    # The Makefile asks rlhf_trl.compare (make -n runs that line, as it holds $(MAKE), and prints the rest).
    recipe = "qa-nothing-trained"  # models/qa-nothing-trained does not exist: sft, reward and ppo are missing
    result = subprocess.run(
        ["make", "-n", "compare", f"RECIPE={recipe}", "ARGS=--methods ppo"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-2000:]
    trained = [m for m in ("sft", "reward", *outputs.METHODS) if f"-m rlhf_trl.{m} " in result.stdout]
    assert trained == ["sft", "reward", "ppo"]
    assert f"compare: training first, as they are not finished: sft (`make sft RECIPE={recipe}`)" in result.stderr
    assert f"-m rlhf_trl.compare --recipe {recipe} --methods ppo" in result.stdout
    bad = subprocess.run(["make", "compare", f"RECIPE={recipe}", "ARGS=--methods sfx"], cwd=ROOT, capture_output=True)
    assert bad.returncode != 0 and b"rlhf_trl.sft" not in bad.stdout  # a bad --methods stops before any training
