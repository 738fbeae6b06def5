"""KTO (rlhf_trl.kto): trains a LoRA on the SFT model from answers marked good or bad one at a time, saves, reloads
and generates; uses every row of accepted/rejected files, matched or not; sets the loss weights from the counts as
the KTO paper advises; refuses bad input with one line."""

import json
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_here, run_stage, stage_paths
from safetensors.torch import load_file
from test_bad_inputs import assert_nothing_finished
from test_bad_inputs import assert_one_line_error as one_line_error

from rlhf_trl.errors import UserError
from rlhf_trl.kto import balance_weights
from rlhf_trl.modeling import base_of, generate, load_model, load_tokenizer
from rlhf_trl.outputs import fingerprint, read_marker


def kto_args(paths, output_dir, *extra):
    data = paths["data"]
    return (
        *("--sft_model_path", paths["sft"]),
        *("--dataset_name", f"{data}/pairs_train.jsonl", "--eval_dataset_name", f"{data}/pairs_eval.jsonl"),
        *("--label_mix", "generated"),  # the recipe's labels folder may exist in this checkout's data/
        *("--max_train_samples", "160", "--per_device_train_batch_size", "8", "--max_steps", "10"),
        *("--logging_steps", "1", "--save_strategy", "no", "--output_dir", str(output_dir)),
        *extra,
    )


def kto_here(*args: str):
    return run_here("kto", "--config", str(ROOT / "recipes/demo/kto.yaml"), *args)


@pytest.fixture(scope="module")
def kto(trained) -> dict:
    """One KTO run on the session's SFT model: its paths, its stdout, and the SFT folder's fingerprint before it."""
    paths = stage_paths(Path(trained["data"]).parent) | {"sft": trained["sft"]}
    sft_before = fingerprint(Path(paths["sft"]) / "model.safetensors")
    result = run_stage("kto", *kto_args(paths, paths["kto"]))
    assert result.returncode == 0, f"kto failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return paths | {"stdout": result.stdout, "sft_before": sft_before}


def test_kto_trains_a_lora_on_the_sft_model_that_reloads_and_generates(kto):
    marker = read_marker(kto["kto"])
    assert marker["stage"] == "kto" and marker["tokens_generated"] == 0 and marker["eval_examples"] == 400
    assert base_of(kto["kto"]) == kto["sft"]
    # 160 of the 4000 shuffled rows of the 2000 pairs; the demo's 200 held-out pairs are 200 + 200 rows.
    assert marker["desirable"] + marker["undesirable"] == 160
    assert "kto: eval examples: 400 read, 200 desirable + 200 undesirable kept" in kto["stdout"]
    weights = load_file(str(Path(kto["kto"]) / "adapter_model.safetensors"))
    assert weights and all("lora_" in name for name in weights), "the adapter holds LoRA weights only"
    b_weights = [t for name, t in weights.items() if "lora_B" in name]
    assert b_weights and all(t.abs().sum() > 0 for t in b_weights), "LoRA B starts at 0: every one must have trained"
    assert fingerprint(Path(kto["sft"]) / "model.safetensors") == kto["sft_before"], "the SFT base is not touched"
    policy, sft = load_model(kto["kto"]), load_model(kto["sft"])
    assert any(not torch.equal(a, b) for a, b in zip(policy.parameters(), sft.parameters(), strict=True))
    answer = generate(policy, load_tokenizer(kto["kto"]), [[{"role": "user", "content": "What is a tiger?"}]])
    assert answer[0].strip()


def write_rows(path: Path, rows: list[tuple[str, str]]) -> None:
    path.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in rows))


def seed_folder(folder: Path, accepted: list[tuple[str, str]], rejected: list[tuple[str, str]]) -> Path:
    folder.mkdir(parents=True)
    write_rows(folder / "accepted_data.jsonl", accepted)
    write_rows(folder / "rejected_data.jsonl", rejected)
    return folder


def test_every_row_of_accepted_and_rejected_files_is_used_matched_or_not(kto, tmp_path):
    """Issue 24: the seed's two files as they are. Only "What is a tiger?" is in both files, so the reward stage
    and DPO get 2 pairs from them; KTO takes all 8 rows."""
    folder = seed_folder(
        tmp_path / "seed",
        accepted=[
            ("What is a tiger?", "A tiger is a big cat."),
            ("What is a tiger?", "A tiger is a striped cat."),
            ("What is a river?", "A river is water."),
            ("What is a castle?", "A castle is a big house."),
            ("What is a forest?", "A forest has trees."),
        ],
        rejected=[
            ("What is a tiger?", "A tiger is a fish."),
            ("What is a boat?", "A boat is a tree."),
            ("What is a lamp?", "A lamp is a river."),
        ],
    )
    output = tmp_path / "kto"
    args = kto_args(kto, output, "--dataset_name", str(folder), "--eval_dataset_name", str(folder))
    result = run_stage("kto", *args, "--per_device_train_batch_size", "4", "--max_steps", "1")
    assert result.returncode == 0, f"kto failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    # By hand: 5 accepted rows (desirable) + 3 rejected rows (undesirable) = 8, none dropped. Balanced as the KTO
    # paper advises: undesirable_weight 1, desirable_weight = 3 / 5 = 0.6, so 0.6 x 5 / (1 x 3) = 1.
    assert "kto: training examples: 8 read, 5 desirable + 3 undesirable kept" in result.stdout
    assert (
        "kto: desirable_weight 0.6, undesirable_weight 1 (chosen from the counts: desirable_weight x 5 / "
        "(undesirable_weight x 3) = 1, within the KTO paper's advised [1, 4/3])"
    ) in result.stdout
    assert "kto: trained on 5 desirable + 3 undesirable examples" in result.stdout
    marker = read_marker(output)
    assert (marker["desirable"], marker["undesirable"], marker["eval_examples"]) == (5, 3, 8)
    assert (marker["desirable_weight"], marker["undesirable_weight"]) == (pytest.approx(0.6), 1.0)


def test_loss_weights_balance_the_counts_as_the_kto_paper_advises():
    # Unset: undesirable 1, desirable = n_undesirable / n_desirable (ratio 1, the low end of the paper's [1, 4/3]).
    assert balance_weights(5, 3)[:2] == (pytest.approx(0.6), 1.0)
    assert balance_weights(2, 6)[:2] == (pytest.approx(3.0), 1.0)  # 3 x 2 / (1 x 6) = 1
    assert balance_weights(4, 4)[:2] == (1.0, 1.0)
    # Set by the user: kept, the other 1; the note says where the ratio falls. 1 x 5 / (2 x 3) = 0.833: outside.
    desirable, undesirable, how = balance_weights(5, 3, undesirable_weight=2.0)
    assert (desirable, undesirable) == (1.0, 2.0)
    assert how == (
        "set in the recipe or ARGS: desirable_weight x 5 / (undesirable_weight x 3) = 0.833, outside the KTO "
        "paper's advised [1, 4/3]"
    )
    assert "= 1.17, within" in balance_weights(5, 3, desirable_weight=0.7)[2]  # 0.7 x 5 / 3 = 1.1667
    assert balance_weights(4, 0) == (1.0, 1.0, "only desirable examples: nothing to balance")
    with pytest.raises(UserError, match="desirable_weight is 0.0: a loss weight must be above 0"):
        balance_weights(5, 3, desirable_weight=0.0)


@pytest.mark.parametrize(
    ("accepted", "rejected", "state"),
    [
        ([], [], "the files hold no rows"),
        ([("What is a tiger?", "")], [("What is a river?", "  ")], "all 2 rows have an empty answer"),
    ],
    ids=["empty", "every-answer-empty"],
)
def test_files_without_a_usable_row_are_one_line(kto, tmp_path, accepted, rejected, state):
    folder = seed_folder(tmp_path / "seed", accepted, rejected)
    output = tmp_path / "kto"
    result = kto_here(*kto_args(kto, output, "--dataset_name", str(folder), "--eval_dataset_name", str(folder)))
    one_line_error(result, f"{folder}: no usable row for KTO ({state})", "add prompts with non-empty answers")
    assert "Loading weights" not in result.stderr, "refused before any model loads"
    assert_nothing_finished(output)


def test_a_batch_of_one_is_refused_before_any_model_loads(kto, tmp_path):
    output = tmp_path / "kto"
    result = kto_here(*kto_args(kto, output, "--per_device_train_batch_size", "1"))
    one_line_error(result, "per_device_train_batch_size is 1", "at least 2")
    assert_nothing_finished(output)


def test_kto_training_plot_draws_trl_kto_metrics(tmp_path):
    from rlhf_trl import report

    keys = ("loss", "rewards/margins", "kl", "logps/chosen")  # what TRL 1.16's KTOTrainer logs
    records = [{"step": s, **{k: 0.1 * s for k in keys}} for s in range(1, 4)]
    assert report.plot_training(tmp_path / "kto.png", records, "kto") and (tmp_path / "kto.png").stat().st_size > 0
