"""activation_checkpointing and its old name gradient_checkpointing: a disagreement is an error, not a silent no-op.

transformers 5.24 ignores `gradient_checkpointing` whenever `activation_checkpointing` is set, and every recipe
now sets the new name, so an override with the old one used to change nothing.
"""

import pytest
from trl import SFTConfig

from rlhf_trl.cli import UserError, parse
from rlhf_trl.ppo_trainer import PPOConfig


@pytest.mark.parametrize("config_class, recipe", [(PPOConfig, "ppo"), (SFTConfig, "sft")])
def test_the_old_name_against_the_recipes_new_one_is_refused_in_one_line(config_class, recipe):
    base = ["--config", f"recipes/demo/{recipe}.yaml", "--activation_checkpointing", "false"]
    for old in (["--gradient_checkpointing", "true"], ["--gradient_checkpointing"], ["--gradient_checkpointing=True"]):
        with pytest.raises(UserError, match="old name of activation_checkpointing, which is false and wins"):
            parse(config_class, [*base, *old])


def test_either_name_alone_or_both_agreeing_is_honoured():
    recipe = ["--config", "recipes/demo/ppo.yaml"]  # sets activation_checkpointing: false
    assert parse(PPOConfig, [*recipe, "--activation_checkpointing", "true"])[1].activation_checkpointing is True
    agreeing = parse(PPOConfig, [*recipe, "--gradient_checkpointing", "false"])[1]
    assert agreeing.activation_checkpointing is False and agreeing.gradient_checkpointing is False
    both = [*recipe, "--activation_checkpointing", "true", "--gradient_checkpointing", "true"]
    assert parse(PPOConfig, both)[1].gradient_checkpointing is True
