"""The warm-up note of metrics_log.MetricsLog: a run too short for its warm-up says so (no model needed)."""

from transformers import TrainerState, TrainingArguments

from rlhf_trl.metrics_log import MetricsLog


def _begin(tmp_path, capsys, max_steps: int, **kwargs) -> str:
    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=1e-3, report_to=[], **kwargs)
    MetricsLog().on_train_begin(args, TrainerState(max_steps=max_steps), None)
    return capsys.readouterr().out


def test_a_run_shorter_than_its_warmup_says_the_learning_rate_never_peaks(tmp_path, capsys):
    # By hand: 8 labeled rows at batch 32 are 1 optimizer step; the demo recipes warm up over 5 steps, and linear
    # warm-up runs step 0 at 1e-3 x 0 / 5 = 0, so the weights do not change.
    out = _begin(tmp_path, capsys, 1, warmup_steps=5, lr_scheduler_type="cosine")
    assert (
        "warning: 1 optimizer step but 5 warm-up steps: the learning rate never reaches 0.001 (the weights do not "
        "change)" in out
    )
    # 3 steps of 10: the last (step 2) runs at 1e-3 x 2 / 10 = 2e-4.
    assert "(the largest is 0.0002)" in _begin(tmp_path, capsys, 3, warmup_steps=10)


def test_a_run_longer_than_its_warmup_or_without_one_says_nothing(tmp_path, capsys):
    assert _begin(tmp_path, capsys, 6, warmup_steps=5) == ""
    assert _begin(tmp_path, capsys, 1, warmup_steps=0) == ""
    assert _begin(tmp_path, capsys, 1, warmup_steps=5, lr_scheduler_type="constant") == ""
