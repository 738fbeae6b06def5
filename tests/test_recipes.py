"""Every recipe YAML parses with its stage's TrlParser dataclasses; every accelerate config is valid YAML."""

from pathlib import Path

import pytest
import yaml
from trl import RewardConfig, SFTConfig

from rlhf_trl.cli import parse
from rlhf_trl.ppo_engine import PPOConfig

ROOT = Path(__file__).resolve().parents[1]
STAGE_CONFIGS = {"sft": SFTConfig, "reward": RewardConfig, "ppo": PPOConfig}
RECIPES = sorted(p for p in (ROOT / "recipes").glob("*/*.yaml") if p.parent.name != "accelerate_configs")


def test_there_are_recipes():
    assert {p.stem for p in RECIPES if p.parent.name == "demo"} == set(STAGE_CONFIGS)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_recipe_parses(recipe):
    script_args, training_args, model_args = parse(STAGE_CONFIGS[recipe.stem], ["--config", str(recipe)])
    assert script_args.dataset_name, "every recipe names its data"
    assert training_args.output_dir == f"models/{recipe.parent.name}/{recipe.stem}"
    assert script_args.recipe == recipe.parent.name
    first_line = recipe.read_text().splitlines()[0]
    assert first_line.startswith("# make "), "a recipe starts with the command that runs it"


@pytest.mark.parametrize("config", sorted((ROOT / "recipes/accelerate_configs").glob("*.yaml")), ids=lambda p: p.name)
def test_accelerate_config(config):
    loaded = yaml.safe_load(config.read_text())
    assert loaded["num_processes"] >= 1 and "distributed_type" in loaded
