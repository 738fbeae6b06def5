"""Resume after a crash: each stage is killed with SIGKILL after a checkpoint, rerun, and must end exactly
where an uninterrupted run with the same seed ends (the `trained` fixture is that run)."""

import json
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest
import torch
import trl
from conftest import (
    grpo_args,
    ppo_args,
    reward_args,
    rloo_args,
    run_stage,
    sft_args,
    stage_paths,
    start_stage,
    wait_until,
)
from safetensors.torch import load_file

from rlhf_trl.cli import UserError
from rlhf_trl.metrics_log import read_metrics
from rlhf_trl.modeling import check_model_source
from rlhf_trl.outputs import (
    MANIFEST,
    input_fingerprints,
    partial_dir,
    read_marker,
    recover_publish,
    require,
    resume_point,
    trim_metrics,
    usable_checkpoint,
)

WEIGHTS = {"sft": "model.safetensors"}  # the others are LoRA adapters: adapter_model.safetensors
ARGS = {"sft": sft_args, "reward": reward_args, "ppo": ppo_args, "rloo": rloo_args, "grpo": grpo_args}
FIRST_CHECKPOINT = {"ppo": 1, "rloo": 2, "grpo": 2}  # save_steps; 5 for sft and reward


def kill_when(process: subprocess.Popen, ready) -> None:
    """SIGKILLs the process as soon as `ready()` holds; fails if it ended first."""
    wait_until(ready, process)
    process.send_signal(signal.SIGKILL)
    process.wait()


def logged(output_dir) -> list:
    """Per-step values; not the trainers' windowed `loss`, which averages only the steps since the resume."""
    keys = ("step", "learning_rate", "objective/scores", "objective/kl", "loss/value_avg", "eval_loss", "eval_accuracy")
    keys += ("reward", "kl", "completions/mean_length")  # RLOO and GRPO
    return [{k: record[k] for k in keys if k in record} for record in read_metrics(output_dir)]


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["sft", "reward", "ppo", "rloo", "grpo"])
def test_a_killed_stage_resumes_to_the_same_result(stage, request, tmp_path):
    trained = request.getfixturevalue("methods_trained" if stage in ("rloo", "grpo") else "trained")
    paths = stage_paths(Path(trained["data"]).parent) | {stage: str(tmp_path / stage)}
    for earlier in ("sft", "reward"):
        paths[earlier] = trained[earlier] if earlier != stage else paths[earlier]
    # The trained fixture ran the same arguments without checkpoints; save_steps does not change training.
    step = FIRST_CHECKPOINT.get(stage, 5)
    args = (*ARGS[stage](paths), "--save_steps", str(step))
    work = partial_dir(paths[stage])
    if stage == "sft":  # killed before its first checkpoint: nothing a later stage accepts, and a rerun starts over
        kill_when(start_stage(stage, *args), lambda: (work / MANIFEST).is_file())
        with pytest.raises(UserError, match="never finished"):
            check_model_source(paths[stage], "model_name_or_path")
    first = work / f"checkpoint-{step}"
    kill_when(start_stage(stage, *args), lambda: (first / "trainer_state.json").is_file())
    assert read_marker(paths[stage]) is None and not Path(paths[stage]).exists()
    with pytest.raises(UserError, match="is unfinished"):
        require(paths[stage], stage)

    result = run_stage(stage, *args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{stage}: resuming from {work}/checkpoint-" in result.stdout
    assert not work.exists()
    assert logged(paths[stage]) == logged(trained[stage])
    weights = WEIGHTS.get(stage, "adapter_model.safetensors")
    resumed, uninterrupted = (load_file(str(Path(d) / weights)) for d in (paths[stage], trained[stage]))
    assert resumed.keys() == uninterrupted.keys()
    for name, tensor in uninterrupted.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    manifest = json.loads((Path(paths[stage]) / MANIFEST).read_text())
    assert manifest["attempts"][-1]["resumed_from"].startswith("checkpoint-")
    assert len(manifest["attempts"]) == 2  # a run killed before any checkpoint was started over, not resumed
    if stage in ("ppo", "rloo", "grpo"):  # the answer tokens sampled before the crash still count
        assert read_marker(paths[stage])["tokens_generated"] == read_marker(trained[stage])["tokens_generated"] > 0


def make_checkpoint(work: Path, step: int, complete: bool = True) -> Path:
    checkpoint = work / f"checkpoint-{step}"
    checkpoint.mkdir(parents=True)
    (checkpoint / "optimizer.pt").write_bytes(b"x")
    if complete:
        (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return checkpoint


def test_damaged_newest_checkpoint_is_passed_over(tmp_path, capsys):
    good = make_checkpoint(tmp_path, 2)
    make_checkpoint(tmp_path, 4, complete=False)
    truncated = make_checkpoint(tmp_path, 6)
    (truncated / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    assert usable_checkpoint(tmp_path) == good
    said = capsys.readouterr().out
    assert "checkpoint-4: no readable trainer_state.json" in said
    assert "checkpoint-6: model.safetensors is unreadable" in said


def test_changed_settings_or_data_refuse_to_resume(tmp_path):
    make_checkpoint(tmp_path, 3)
    config = {"learning_rate": 0.001, "seed": 0, "logging_steps": 5}
    inputs = {"dataset_name": {"path": "d.jsonl", "sha256": "aa"}}
    (tmp_path / MANIFEST).write_text(json.dumps({"config": config, "inputs": inputs}))
    assert resume_point(tmp_path, "auto", {**config, "logging_steps": 1}, inputs) == tmp_path / "checkpoint-3"
    with pytest.raises(UserError, match=r"learning_rate: 0\.001 -> 0\.01.*RESUME=0"):
        resume_point(tmp_path, "auto", {**config, "learning_rate": 0.01}, inputs)
    with pytest.raises(UserError, match=r"dataset_name changed \(d\.jsonl\)"):
        resume_point(tmp_path, "auto", config, {"dataset_name": {"path": "d.jsonl", "sha256": "bb"}})
    assert resume_point(tmp_path, "false", config, inputs) is None
    with pytest.raises(UserError, match="no unfinished run"):
        resume_point(tmp_path / "absent", "true", config, inputs)


def test_turning_activation_checkpointing_off_still_resumes(tmp_path):
    # transformers 5.23+ mirrors gradient_checkpointing into activation_checkpointing: both names are memory
    # settings, so switching either after a crash (say, to fit a smaller GPU) must not block the resume.
    make_checkpoint(tmp_path, 3)
    config = {"learning_rate": 0.001, "gradient_checkpointing": True, "activation_checkpointing": True}
    (tmp_path / MANIFEST).write_text(json.dumps({"config": config, "inputs": {}}))
    changed = {**config, "gradient_checkpointing": False, "activation_checkpointing": False}
    assert resume_point(tmp_path, "auto", changed, {}) == tmp_path / "checkpoint-3"
    with pytest.raises(UserError, match=r"learning_rate: 0\.001 -> 0\.01"):
        resume_point(tmp_path, "auto", {**changed, "learning_rate": 0.01}, {})


def test_log_lines_after_the_checkpoint_are_dropped(tmp_path):
    lines = [json.dumps({"step": step, "loss": 1.0}) for step in (5, 10, 15)] + ['{"step": 20, "lo']
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    trim_metrics(tmp_path, 10)
    assert [r["step"] for r in read_metrics(tmp_path)] == [5, 10]


def test_manifest_records_what_produced_the_output(trained):
    manifest = json.loads((Path(trained["sft"]) / MANIFEST).read_text())
    assert manifest["command"][:3] == ["python", "-m", "rlhf_trl.sft"]
    assert manifest["seed"] == 0 and manifest["config"]["learning_rate"] == 3e-3
    data = manifest["inputs"]["dataset_name"]
    assert data["path"].endswith("sft_train.jsonl") and len(data["sha256"]) == 64
    assert manifest["packages"]["trl"] == trl.__version__ and manifest["hardware"]["cpus"] == os.cpu_count()
    assert manifest["git"] is None or len(manifest["git"]["commit"]) == 40
    assert manifest["wall_time_s"] > 0 and manifest["finished_at"]


def test_label_files_in_lists_count_as_inputs_and_a_new_one_blocks_a_resume(tmp_path):
    labels = tmp_path / "pairs.jsonl"
    labels.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    inputs = input_fingerprints({"human_labels": [str(labels)], "seed": 0})
    assert list(inputs) == ["human_labels[0]"] and len(inputs["human_labels[0]"]["sha256"]) == 64
    make_checkpoint(tmp_path / "run", 2)
    (tmp_path / "run" / MANIFEST).write_text(json.dumps({"config": {"seed": 0}, "inputs": {}}))
    with pytest.raises(UserError, match=r"human_labels\[0\] appeared"):
        resume_point(tmp_path / "run", "auto", {"seed": 0}, inputs)
    (tmp_path / "run" / MANIFEST).write_text(json.dumps({"config": {"seed": 0, "processes": 1}, "inputs": {}}))
    with pytest.raises(UserError, match=r"processes: 1 -> 2"):
        resume_point(tmp_path / "run", "auto", {"seed": 0, "processes": 2}, {})


def test_a_publish_cut_between_its_renames_is_completed(tmp_path):
    final = tmp_path / "sft"
    work = partial_dir(final)
    work.mkdir()
    (work / "rlhf_trl_run.json").write_text(json.dumps({"stage": "sft"}))
    recover_publish(final)
    assert read_marker(final)["stage"] == "sft" and not work.exists()


SIX_PROMPTS = [[{"role": "user", "content": f"Name thing number {n}."}] for n in range(6)]


def drawn_prompts(trainer) -> list[int]:
    """Records the prompt each update of `trainer` draws (one a batch), as its number in SIX_PROMPTS."""
    drawn, queries = [], trainer._queries

    def record(batch):
        text = trainer.processing_class.decode(batch["input_ids"][0], skip_special_tokens=True)
        drawn.append(int(re.search(r"Name thing number (\d)\.", text).group(1)))
        return queries(batch)

    trainer._queries = record
    return drawn


PER_STEP = ("objective/scores", "objective/kl", "loss/policy_avg", "loss/value_avg", "episode")


@pytest.mark.parametrize("checkpoint", [8, 6])
def test_ppo_resumed_inside_a_later_pass_draws_the_prompts_of_the_run_that_never_stopped(checkpoint, zoo, tmp_path):
    """QA D02: the order of a pass over the prompts came from torch's global RNG when the pass started, and the
    resume replayed the passes before the checkpoint's RNG state was back: resumed inside pass 2 (checkpoint 8),
    it drew another order. Variant: a checkpoint on a pass boundary (6)."""
    from test_ppo_settings import tiny_trainer

    from rlhf_trl.ppo_trainer import first_pass_seed

    settings = dict(prompts=SIX_PROMPTS, per_device_train_batch_size=1, total_episodes=10, save_strategy="steps")
    model = zoo["qwen2.5-instruct"]  # built (from random numbers) before the seed below
    torch.manual_seed(0)  # the same frozen reward head (it is not in a checkpoint) in both trainers
    straight = tiny_trainer(model, tmp_path / "straight", **settings, save_steps=checkpoint)
    order = drawn_prompts(straight)
    straight.train()
    # By hand: 6 prompts, 1 per update, so updates 1-6 are pass 1 and 7-12 pass 2; pass e is shuffled with the seed
    # first_pass_seed(0) + e (seed 0), whatever drew random numbers before it.
    by_hand = [
        i
        for epoch in (0, 1)
        for i in torch.randperm(6, generator=torch.Generator().manual_seed(first_pass_seed(0) + epoch)).tolist()
    ]
    assert order == by_hand[:10]
    assert sorted(order[6:]) == sorted(set(order[6:]))  # pass 2 repeats no prompt

    torch.manual_seed(0)
    resumed = tiny_trainer(model, tmp_path / "resumed", **settings, save_steps=checkpoint)
    after = drawn_prompts(resumed)
    resumed.train(resume_from_checkpoint=str(tmp_path / "straight" / f"checkpoint-{checkpoint}"))
    assert after == order[checkpoint:]  # updates checkpoint + 1 to 10: the same prompts in the same order
    for step, (ours, theirs) in enumerate(zip(resumed.state.log_history, straight.state.log_history, strict=True)):
        assert {k: ours[k] for k in PER_STEP} == {k: theirs[k] for k in PER_STEP}, step + 1
    for name, tensor in straight._trainable_parameters().items():
        torch.testing.assert_close(resumed._trainable_parameters()[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
