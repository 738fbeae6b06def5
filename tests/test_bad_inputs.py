"""Bad input: one line on stderr saying what to fix, exit status 2, and no output that looks finished."""

from pathlib import Path

import pytest
import torch
from conftest import ROOT, ppo_args, run_module, run_stage, sft_args, stage_paths


def assert_one_line_error(result, *needles: str) -> str:
    assert result.returncode == 2, f"exit {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    assert "Traceback" not in result.stderr, result.stderr
    last = [line for line in result.stderr.splitlines() if line.strip()][-1]
    for needle in needles:
        assert needle in last, f"{needle!r} not in {last!r}"
    return last


def assert_nothing_finished(output_dir: str | Path) -> None:
    output_dir = Path(output_dir)
    assert not (output_dir / "rlhf_trl_run.json").exists()
    assert not output_dir.with_name(output_dir.name + ".partial").exists(), "a partial dir was left behind"


@pytest.fixture
def paths(world, tmp_path):
    return stage_paths(world) | {"sft": str(tmp_path / "sft"), "ppo": str(tmp_path / "ppo")}


def test_missing_recipe_file():
    result = run_module("sft", "--config", "recipes/no-such-recipe/sft.yaml")
    assert_one_line_error(result, "recipes/no-such-recipe/sft.yaml", "does not exist")


def test_unknown_yaml_key(tmp_path, paths):
    recipe = tmp_path / "sft.yaml"
    recipe.write_text((ROOT / "recipes/demo/sft.yaml").read_text() + "lerning_rate: 0.1\n")
    result = run_module("sft", "--config", str(recipe), *sft_args(paths))
    assert_one_line_error(result, "lerning_rate")
    assert_nothing_finished(paths["sft"])


def test_unknown_command_line_key(paths):
    assert_one_line_error(run_stage("sft", *sft_args(paths), "--no_such_key", "1"), "no_such_key")


def test_invalid_yaml_names_the_line(tmp_path):
    recipe = tmp_path / "sft.yaml"
    recipe.write_text("model_name_or_path: x\nlearning_rate: [1\n")
    assert_one_line_error(run_module("sft", "--config", str(recipe)), str(recipe), "line")


def test_malformed_jsonl_names_file_and_line(tmp_path, paths):
    data = tmp_path / "sft.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": "c", "output": \n')
    result = run_stage("sft", *sft_args(paths, "--dataset_name", str(data)))
    assert_one_line_error(result, str(data), "line 3", "invalid JSON")
    assert_nothing_finished(paths["sft"])


def test_record_missing_a_required_field(tmp_path, paths):
    data = tmp_path / "sft.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "input": "d"}\n')
    result = run_stage("sft", *sft_args(paths, "--dataset_name", str(data)))
    assert_one_line_error(result, str(data), "line 2", "'output'", "missing")
    assert_nothing_finished(paths["sft"])


def test_empty_dataset(tmp_path, paths):
    data = tmp_path / "empty.jsonl"
    data.write_text("\n")
    assert_one_line_error(run_stage("sft", *sft_args(paths, "--dataset_name", str(data))), "holds no records")
    assert_nothing_finished(paths["sft"])


def test_missing_data_file(paths):
    result = run_stage("sft", *sft_args(paths, "--dataset_name", "data/processed/nothing-here.jsonl"))
    assert_one_line_error(result, "nothing-here.jsonl", "does not exist")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine can run bitsandbytes")
@pytest.mark.parametrize("flag", ["--load_in_4bit", "--load_in_8bit"])
def test_quantized_loading_without_cuda(paths, flag):
    result = run_stage("sft", *sft_args(paths, flag, "true", "--use_peft", "true"))
    assert_one_line_error(result, flag.lstrip("-"), "CUDA")
    assert_nothing_finished(paths["sft"])


def test_ppo_before_sft_says_which_target_to_run(paths, tmp_path):
    result = run_stage("ppo", *ppo_args(paths, "--sft_model_path", str(tmp_path / "no-sft")))
    assert_one_line_error(result, "make sft RECIPE=demo")
    assert_nothing_finished(paths["ppo"])


def test_ppo_before_reward_says_which_target_to_run(trained, paths, tmp_path):
    result = run_stage(
        "ppo", *ppo_args(paths, "--sft_model_path", trained["sft"], "--reward_model_path", str(tmp_path / "no-reward"))
    )
    assert_one_line_error(result, "make reward RECIPE=demo")


def test_finished_run_is_not_overwritten(trained):
    weights = Path(trained["sft"]) / "model.safetensors"
    before = weights.stat().st_mtime_ns
    result = run_stage("sft", *sft_args(stage_paths(Path(trained["data"]).parent)))
    assert_one_line_error(result, "already holds a finished run", "--overwrite")
    assert weights.stat().st_mtime_ns == before


def test_hub_id_while_offline(paths):
    result = run_stage("sft", *sft_args(paths, "--model_name_or_path", "someone/some-model"))
    assert_one_line_error(result, "offline", "local folder")


def test_ppo_rollouts_longer_than_the_context(trained, paths):
    result = run_stage("ppo", *ppo_args(paths, "--sft_model_path", trained["sft"], "--response_length", "500"))
    assert_one_line_error(result, "response_length 500", "context of 128 tokens")
    assert_nothing_finished(paths["ppo"])


def test_an_adapter_is_not_merged_into_a_quantized_base(trained):
    from transformers import BitsAndBytesConfig

    from rlhf_trl.cli import UserError
    from rlhf_trl.modeling import load_model

    with pytest.raises(UserError, match=r"LoRA adapter .* 4/8-bit: merge it first with `make merge"):
        load_model(trained["ppo"], kwargs={"quantization_config": BitsAndBytesConfig(load_in_4bit=True)})


def test_overwrite_never_deletes_a_folder_that_is_not_a_run(tmp_path):
    from rlhf_trl.cli import UserError
    from rlhf_trl.outputs import begin

    (tmp_path / "models").mkdir()
    (tmp_path / "models/notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="is not a finished rlhf-trl run: move it away"):
        begin(tmp_path / "models", overwrite=True)
    assert (tmp_path / "models/notes.txt").read_text() == "keep me"
