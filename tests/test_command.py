"""`rlhf-trl`, the console command: every verb's --help, a stage trained through it equals `make`'s, bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import OFFLINE_ENV, run_here, scratch_project
from test_bad_inputs import assert_one_line_error

from rlhf_trl import command


@pytest.mark.parametrize("verb", [*command.TRAINING, *command.TOOLS])
def test_every_verb_has_help(verb):
    result = run_here("command", verb, "--help")
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout


def test_help_lists_every_verb_in_one_screen():
    result = run_here("command", "--help")
    assert result.returncode == 0
    for verb in (*command.TRAINING, *command.TOOLS, "all", "env"):
        assert verb in result.stdout
    assert len(result.stdout.splitlines()) <= 25  # one screen


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "rlhf-trl"
    assert script.is_file(), "pip install -e . did not install the rlhf-trl command (pyproject [project.scripts])"
    result = subprocess.run([str(script), "env"], capture_output=True, text=True, env=OFFLINE_ENV, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for name in ("python", "torch", "transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes"):
        assert any(line.startswith(f"{name}: ") for line in lines), name
    assert any(line.startswith("deepspeed: ") for line in lines) and any(line.startswith("gradio: ") for line in lines)
    assert "accelerate config: recipes/accelerate_configs/single_process.yaml (NO, 1 process(es))" in lines


@pytest.mark.parametrize(
    "args, needle",
    [
        (("sft", "--recipe", "no-such-recipe"), "recipe 'no-such-recipe' not found"),
        (("frobnicate",), "unknown verb 'frobnicate'"),
        (("all", "--max_steps", "2"), "rlhf-trl all takes only --recipe"),
        (("sft", "--accelerate_config"), "--accelerate_config needs a value"),
    ],
)
def test_bad_input_is_one_line(args, needle):
    assert_one_line_error(run_here("command", *args), needle)


@pytest.mark.slow
def test_sft_through_the_command_publishes_as_make_does(tmp_path):
    """`rlhf-trl sft --recipe demo --max_steps 2 --output_dir X` and `make sft ARGS=...` in one scratch project (its
    own data and tiny base): the same marker fields, the same trained weights (one machine, one seed), and a bad
    setting through the command exits 2 with one line, as through make."""
    project = scratch_project(tmp_path)
    env = {**OFFLINE_ENV, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}

    def run(*args):
        return subprocess.run(args, cwd=project, env=env, capture_output=True, text=True, timeout=900)

    steps = ("--max_steps", "2", "--eval_steps", "2", "--save_strategy", "no")
    by_command = run("rlhf-trl", "sft", "--recipe", "demo", *steps, "--output_dir", "models/cli/sft")
    assert by_command.returncode == 0, by_command.stderr[-3000:]
    by_make = run("make", "sft", f"ARGS={' '.join(steps)} --output_dir models/make/sft")
    assert by_make.returncode == 0, by_make.stderr[-3000:]
    markers = [json.loads((project / f"models/{who}/sft/rlhf_trl_run.json").read_text()) for who in ("cli", "make")]
    assert markers[0].keys() == markers[1].keys()
    same = {"stage", "kind", "base", "global_step"} & markers[0].keys()
    assert same and {k: markers[0][k] for k in same} == {k: markers[1][k] for k in same}

    from safetensors.torch import load_file

    weights = [load_file(next((project / f"models/{who}/sft").glob("*.safetensors"))) for who in ("cli", "make")]
    assert weights[0].keys() == weights[1].keys()
    assert all((weights[0][k] == weights[1][k]).all() for k in weights[0])

    refused = run("rlhf-trl", "sft", "--recipe", "demo", "--max_steps", "many", "--output_dir", "models/cli/bad")
    assert_one_line_error(refused, "max_steps")
    assert not (project / "models/cli/bad").exists()
