"""Bad input: one line on stderr saying what to fix, exit status 2, and no output that looks finished."""

import json
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, ppo_args, reward_args, run_here, run_stage, sft_args, stage_paths, start_stage, wait_until

from rlhf_trl.outputs import read_marker


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


def stage_here(stage: str, *overrides: str):
    """A stage's command run in this process (see conftest.run_here): these all stop before training."""
    return run_here(stage, "--config", str(ROOT / "recipes" / "demo" / f"{stage}.yaml"), *overrides)


@pytest.fixture
def paths(world, tmp_path):
    return stage_paths(world) | {"sft": str(tmp_path / "sft"), "ppo": str(tmp_path / "ppo")}


def test_missing_recipe_file():
    result = run_here("sft", "--config", "recipes/no-such-recipe/sft.yaml")
    assert_one_line_error(result, "recipes/no-such-recipe/sft.yaml", "does not exist")


def test_unknown_yaml_key(tmp_path, paths):
    recipe = tmp_path / "sft.yaml"
    recipe.write_text((ROOT / "recipes/demo/sft.yaml").read_text() + "lerning_rate: 0.1\n")
    result = run_here("sft", "--config", str(recipe), *sft_args(paths))
    assert_one_line_error(result, "lerning_rate")
    assert_nothing_finished(paths["sft"])


def test_unknown_command_line_key(paths):
    assert_one_line_error(stage_here("sft", *sft_args(paths), "--no_such_key", "1"), "no_such_key")


@pytest.mark.parametrize(
    ("stage", "key", "value", "needle"),
    [
        ("sft", "per_device_train_batch_size", "0", "per_device_train_batch_size is 0: it must be at least 1"),
        ("sft", "max_length", "-5", "max_length is -5: it must be at least 1"),
        ("reward", "gradient_accumulation_steps", "0", "gradient_accumulation_steps is 0: it must be at least 1"),
        ("ppo", "temperature", "0", "temperature must be above 0 for PPO's sampled rollouts, not 0.0"),
        ("ppo", "temperature", "-1", "temperature must be above 0 for PPO's sampled rollouts, not -1.0"),
        ("ppo", "response_length", "0", "response_length must be at least 1 token, not 0"),
        ("ppo", "total_episodes", "0", "total_episodes must be at least 1 (or left unset), not 0"),
        ("ppo", "max_prompt_length", "0", "max_prompt_length is 0: it must be at least 1"),
        ("ppo", "num_ppo_epochs", "0", "num_ppo_epochs must be at least 1, not 0"),
        ("ppo", "ppo_engine", "trl", "ppo_engine: trl is retired: PPO now has one engine"),
    ],
)
def test_settings_that_must_be_positive(paths, stage, key, value, needle):
    """Each used to end in a traceback from torch or transformers (exit 1, a .partial left) or, for PPO's
    temperature 0 and total_episodes 0, in a finished-looking run that never sampled or never updated."""
    args = {"sft": sft_args, "reward": reward_args, "ppo": ppo_args}[stage](paths)
    assert_one_line_error(stage_here(stage, *args, f"--{key}", value), needle)
    if stage != "reward":  # reward_args writes to the shared world's finished reward model, left as it was
        assert_nothing_finished(paths[stage])


def test_chat_needs_at_least_one_new_token(tmp_path):
    result = run_here("chat", "--model", str(tmp_path), "--prompt", "hi", "--max-new-tokens", "0")
    assert_one_line_error(result, "--max-new-tokens 0: an answer needs at least 1 new token")


def test_invalid_yaml_names_the_line(tmp_path):
    recipe = tmp_path / "sft.yaml"
    recipe.write_text("model_name_or_path: x\nlearning_rate: [1\n")
    assert_one_line_error(run_here("sft", "--config", str(recipe)), str(recipe), "line")


def test_malformed_jsonl_names_file_and_line(tmp_path, paths):
    data = tmp_path / "sft.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": "c", "output": \n')
    result = stage_here("sft", *sft_args(paths, "--dataset_name", str(data)))
    assert_one_line_error(result, str(data), "line 3", "invalid JSON")
    assert_nothing_finished(paths["sft"])


def test_record_missing_a_required_field(tmp_path, paths):
    data = tmp_path / "sft.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "input": "d"}\n')
    result = stage_here("sft", *sft_args(paths, "--dataset_name", str(data)))
    assert_one_line_error(result, str(data), "line 2", "'output'", "missing")
    assert_nothing_finished(paths["sft"])


def test_empty_dataset(tmp_path, paths):
    data = tmp_path / "empty.jsonl"
    data.write_text("\n")
    assert_one_line_error(stage_here("sft", *sft_args(paths, "--dataset_name", str(data))), "holds no records")
    assert_nothing_finished(paths["sft"])


def test_missing_data_file(paths):
    result = stage_here("sft", *sft_args(paths, "--dataset_name", "data/processed/nothing-here.jsonl"))
    assert_one_line_error(result, "nothing-here.jsonl", "does not exist")


@pytest.mark.parametrize("stage", ["sft", "reward", "ppo", "dpo", "kto"])
@pytest.mark.parametrize("flag", ["--load_in_4bit", "--load_in_8bit"])
def test_a_quantized_base_without_lora_is_refused(paths, tmp_path, stage, flag):
    """A full fine-tune of 4/8-bit weights: refused before any model loads (4/8-bit itself runs on a CPU too:
    tests/test_paths_quant.py)."""
    args = {"sft": sft_args, "reward": reward_args, "ppo": ppo_args}.get(stage, lambda p, *e: e)(paths)
    output = tmp_path / stage
    result = stage_here(stage, *args, flag, "true", "--use_peft", "false", "--output_dir", str(output))
    assert_one_line_error(result, flag.lstrip("-"), "use_peft is false", "use_peft: true", f"{flag[-4:]}: false")
    assert "Loading weights" not in result.stderr, "refused before any model loads"
    assert_nothing_finished(output)


def test_4bit_and_8bit_together_are_refused(paths):
    both = ("--load_in_4bit", "true", "--load_in_8bit", "true", "--use_peft", "true")
    result = stage_here("sft", *sft_args(paths, *both))
    assert_one_line_error(result, "load_in_4bit and load_in_8bit are both true: keep one")
    assert_nothing_finished(paths["sft"])


@pytest.mark.parametrize("flag", ["--load_in_4bit", "--load_in_8bit"])
def test_quantized_loading_without_bitsandbytes(paths, monkeypatch, flag):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now raises ImportError
    result = stage_here("sft", *sft_args(paths, flag, "true", "--use_peft", "true"))
    assert_one_line_error(result, f"{flag[2:]} needs bitsandbytes, which cannot load here", "pip install")
    assert_nothing_finished(paths["sft"])


def test_ppo_before_sft_says_which_target_to_run(paths, tmp_path):
    result = stage_here("ppo", *ppo_args(paths, "--sft_model_path", str(tmp_path / "no-sft")))
    assert_one_line_error(result, "make sft RECIPE=demo")
    assert_nothing_finished(paths["ppo"])


def test_ppo_before_reward_says_which_target_to_run(trained, paths, tmp_path):
    result = stage_here(
        "ppo", *ppo_args(paths, "--sft_model_path", trained["sft"], "--reward_model_path", str(tmp_path / "no-reward"))
    )
    assert_one_line_error(result, "make reward RECIPE=demo")


def test_finished_run_is_not_overwritten(trained):
    weights = Path(trained["sft"]) / "model.safetensors"
    before = weights.stat().st_mtime_ns
    result = stage_here("sft", *sft_args(stage_paths(Path(trained["data"]).parent)))
    assert_one_line_error(result, "already holds a finished run", "--overwrite")
    assert weights.stat().st_mtime_ns == before


def test_hub_id_while_offline(paths):
    result = stage_here("sft", *sft_args(paths, "--model_name_or_path", "someone/some-model"))
    assert_one_line_error(result, "offline", "local folder")


def test_ppo_rollouts_longer_than_the_context(trained, paths):
    result = stage_here("ppo", *ppo_args(paths, "--sft_model_path", trained["sft"], "--response_length", "500"))
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


# --- The rest of the matrix (issue 7): types, damaged files, storage, interrupts, and chat/merge/label. ---


def test_wrong_type_on_the_command_line(paths):
    result = stage_here("sft", *sft_args(paths, "--learning_rate", "fast"))
    assert_one_line_error(result, "--learning_rate", "invalid float value: 'fast'", "recipe or ARGS")


def test_wrong_type_in_the_recipe(tmp_path, paths):
    recipe = tmp_path / "sft.yaml"
    text = (ROOT / "recipes/demo/sft.yaml").read_text()
    recipe.write_text(text.replace("per_device_train_batch_size: 32", "per_device_train_batch_size: many"))
    result = run_here("sft", "--config", str(recipe), *sft_args(paths))
    assert_one_line_error(result, "per_device_train_batch_size", "invalid int value")


def test_resume_must_be_auto_true_or_false(paths):
    assert_one_line_error(stage_here("sft", *sft_args(paths, "--resume", "maybe")), "--resume", "invalid choice")


def test_resume_true_with_nothing_to_resume(paths):
    result = stage_here("sft", *sft_args(paths, "--resume", "true"))
    assert_one_line_error(result, "--resume true", "no unfinished run", "drop RESUME=1")
    assert_nothing_finished(paths["sft"])


def damaged_copy(source: str, destination: Path) -> Path:
    shutil.copytree(source, destination)
    weights = next(destination.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])  # what an interrupted copy leaves
    return destination


def test_damaged_adapter(trained, tmp_path):
    broken = damaged_copy(trained["ppo"], tmp_path / "ppo")
    result = run_here("chat", "--model", str(broken), "--prompt", "hi")
    assert_one_line_error(result, f"adapter {broken} has damaged weights", "rerun the stage")


def test_damaged_model_as_the_next_stage_input(trained, paths, tmp_path):
    broken = damaged_copy(trained["sft"], tmp_path / "sft-copy")
    result = stage_here("reward", *reward_args(paths | {"sft": str(broken), "reward": str(tmp_path / "reward")}))
    assert_one_line_error(result, f"{broken} has damaged weights")
    assert_nothing_finished(tmp_path / "reward")


def test_adapter_on_a_base_of_another_shape(trained, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(trained["sft"])
    config.hidden_size, config.intermediate_size = 2 * config.hidden_size, 2 * config.intermediate_size
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "other-base")
    adapter = tmp_path / "ppo"
    shutil.copytree(trained["ppo"], adapter)
    marker = json.loads((adapter / "rlhf_trl_run.json").read_text())
    (adapter / "rlhf_trl_run.json").write_text(json.dumps({**marker, "base": str(tmp_path / "other-base")}))
    result = run_here("chat", "--model", str(adapter), "--prompt", "hi")
    assert_one_line_error(result, f"adapter {adapter} does not fit its base", "the base it was trained on")


@pytest.mark.slow
def test_disk_full_loses_nothing_and_the_rerun_finishes(paths):
    def small_disk():  # writes past 300 kB fail with EFBIG, as they would with ENOSPC on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))

    args = sft_args(paths, "--max_steps", "6", "--save_steps", "3")
    result = run_stage("sft", *args, preexec_fn=small_disk)
    assert_one_line_error(result, "the disk filled up", "rerun the same command")
    assert read_marker(paths["sft"]) is None
    result = run_stage("sft", *args)
    assert result.returncode == 0, result.stderr[-2000:]
    assert read_marker(paths["sft"])["stage"] == "sft"


def test_read_only_models_folder(paths, tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    remount = 'mount --bind "$1" "$1" && mount -o remount,ro,bind "$1" && shift && exec "$@"'
    prefix = ("unshare", "--mount", "sh", "-c", remount, "sh", str(models))
    if subprocess.run([*prefix, "true"], capture_output=True).returncode != 0:
        pytest.skip("mounting a folder read-only needs `unshare --mount` with root rights")
    result = run_stage("sft", *sft_args(paths | {"sft": str(models / "sft")}), prefix=prefix)
    assert_one_line_error(result, str(models), "Read-only file system", "set output_dir elsewhere")


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["sft", "reward", "ppo"])
def test_ctrl_c_in_a_stage_leaves_nothing_that_looks_finished(stage, trained, tmp_path):
    paths = stage_paths(Path(trained["data"]).parent) | {stage: str(tmp_path / stage)}
    args = {"sft": sft_args, "reward": reward_args, "ppo": ppo_args}[stage](paths, "--save_steps", "1000")
    process = start_stage(stage, *args, "--max_steps" if stage != "ppo" else "--total_episodes", "100000")
    wait_until((Path(paths[stage] + ".partial") / "manifest.json").is_file, process)
    if stage == "sft":  # while it runs, a second run into the same output is refused
        second = run_stage("sft", *args)
        assert_one_line_error(second, "another run is writing", paths["sft"])
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-2000:]
    assert stderr.strip().splitlines()[-1].startswith("interrupted: nothing was marked finished; rerun the same")
    assert read_marker(paths[stage]) is None and not Path(paths[stage]).exists()


def test_chat_merge_and_label_before_their_stage_say_what_to_run(tmp_path):
    chat = run_here("chat", "--recipe", "demo", "--stage", "sft", "--prompt", "hi", cwd=tmp_path)
    assert_one_line_error(chat, "models/demo/sft", "make sft RECIPE=demo")
    merge = run_here("merge", "--recipe", "demo", cwd=tmp_path)
    assert_one_line_error(merge, "models/demo/ppo", "make ppo RECIPE=demo")
    label = run_here("label", "--recipe", "demo", cwd=tmp_path)
    assert_one_line_error(label, "make")


def test_chat_prompt_longer_than_the_context(trained):
    result = run_here("chat", "--model", trained["sft"], "--prompt", "river " * 400)
    assert_one_line_error(result, "context is 128", "shorten the prompt")


def test_merge_of_a_folder_that_does_not_exist(tmp_path):
    result = run_here("merge", "--model", str(tmp_path / "nothing"), "--output", str(tmp_path / "export"))
    assert_one_line_error(result, "nothing does not exist")
    assert_nothing_finished(tmp_path / "export")
