"""Every recipe YAML parses with its stage's TrlParser dataclasses; every accelerate config is valid YAML."""

from pathlib import Path

import pytest
import torch
import yaml
from trl import RewardConfig, SFTConfig

from rlhf_trl.cli import parse, parse_dataclasses
from rlhf_trl.dpo import DPOConfig
from rlhf_trl.group_rl import GRPOConfig, RLOOConfig
from rlhf_trl.kto import KTOConfig
from rlhf_trl.ppo_trainer import PPOConfig
from rlhf_trl.prepare import DataArguments

ROOT = Path(__file__).resolve().parents[1]
STAGE_CONFIGS = {
    "sft": SFTConfig,
    "reward": RewardConfig,
    "ppo": PPOConfig,
    "rloo": RLOOConfig,
    "grpo": GRPOConfig,
    "dpo": DPOConfig,
    "kto": KTOConfig,
}
RECIPES = sorted(p for p in (ROOT / "recipes").glob("*/*.yaml") if p.parent.name != "accelerate_configs")


def test_there_are_recipes():
    assert {p.stem for p in RECIPES if p.parent.name == "demo"} == set(STAGE_CONFIGS)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_recipe_parses(recipe):
    first_line = recipe.read_text().splitlines()[0]
    assert first_line.startswith("# make "), "a recipe starts with the command that runs it"
    if recipe.stem == "data":
        (data_args,) = parse_dataclasses((DataArguments,), ["--config", str(recipe)])
        assert data_args.output_dir == f"data/processed/{recipe.parent.name}"
        return
    # GPU recipes train in bf16, which this check may not have: parsing is what is tested here.
    cpu_override = [] if torch.cuda.is_available() else ["--bf16", "false"]
    script_args, training_args, model_args = parse(STAGE_CONFIGS[recipe.stem], ["--config", str(recipe), *cpu_override])
    assert script_args.dataset_name, "every recipe names its data"
    assert training_args.output_dir == f"models/{recipe.parent.name}/{recipe.stem}"
    assert script_args.recipe == recipe.parent.name
    for path in (script_args.dataset_name, getattr(training_args, "chat_template_path", None)):
        if path and path.startswith("recipes/"):
            assert (ROOT / path).is_file(), f"{path} is named by {recipe} but missing"


def test_every_real_recipe_has_a_file_per_stage():
    for folder in (ROOT / "recipes").iterdir():
        if folder.name not in ("accelerate_configs", "templates", "demo"):
            assert {p.stem for p in folder.glob("*.yaml")} == {"data", *STAGE_CONFIGS}, folder.name


ACCELERATE_CONFIGS = sorted((ROOT / "recipes/accelerate_configs").glob("*.yaml"))


def test_every_accelerate_config_of_the_issue_exists():
    names = {p.stem for p in ACCELERATE_CONFIGS}
    assert {"single_process", "single_gpu", "multi_gpu", "zero2", "zero3", "fsdp", "multi_node", "multi_cpu"} <= names


@pytest.mark.parametrize("config", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_accelerate_config(config):
    from accelerate.commands.config.config_args import load_config_from_file

    from rlhf_trl.launch import plan_from_config

    loaded = yaml.safe_load(config.read_text())
    assert loaded["num_processes"] >= 1 and "distributed_type" in loaded
    header = [line for line in config.read_text().splitlines() if line.startswith("#")]
    assert any(f"ACCELERATE_CONFIG=recipes/accelerate_configs/{config.name}" in line for line in header), "no usage"
    accelerate_view = load_config_from_file(str(config))  # accelerate's own reader accepts every key
    plan = plan_from_config(config)
    assert plan.distributed_type == str(accelerate_view.distributed_type).split(".")[-1]
    assert plan.num_processes == accelerate_view.num_processes
    assert plan.zero_stage == {"zero2": 2, "zero3": 3}.get(config.stem)
