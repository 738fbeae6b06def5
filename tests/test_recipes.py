"""Every recipe YAML parses with its stage's TrlParser dataclasses; every accelerate config is valid YAML."""

from pathlib import Path

import pytest
import torch
import yaml
from trl import RewardConfig, SFTConfig

from rlhf_trl.cli import parse, parse_dataclasses
from rlhf_trl.ppo_engine import PPOConfig
from rlhf_trl.prepare import DataArguments

ROOT = Path(__file__).resolve().parents[1]
STAGE_CONFIGS = {"sft": SFTConfig, "reward": RewardConfig, "ppo": PPOConfig}
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


def test_every_real_recipe_has_all_four_files():
    for folder in (ROOT / "recipes").iterdir():
        if folder.name not in ("accelerate_configs", "templates", "demo"):
            assert {p.stem for p in folder.glob("*.yaml")} == {"data", "sft", "reward", "ppo"}, folder.name


@pytest.mark.parametrize("config", sorted((ROOT / "recipes/accelerate_configs").glob("*.yaml")), ids=lambda p: p.name)
def test_accelerate_config(config):
    loaded = yaml.safe_load(config.read_text())
    assert loaded["num_processes"] >= 1 and "distributed_type" in loaded
