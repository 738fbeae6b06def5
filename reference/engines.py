"""The two PPO engines the reference compares, each behind one import, configured from one set of settings.

    PPOConfig, PPOTrainer = our_engine()
    config = PPOConfig(**settings, shared_base=False)
    trl_config(config)          # TRL 1.12's PPOConfig with every key both have set to ours' value

`trl_config` copies every setting TRL's PPOConfig also has from ours, defaults included: a key the recipe leaves
out cannot make the two runs differ through a default that differs. Keys only ours has (`shared_base`,
`logprob_chunk_tokens`, `rollout_static_cache`) choose how our engine computes, not what.
"""

import dataclasses
import warnings


def our_engine():
    """(PPOConfig, PPOTrainer) of our engine (`rlhf_trl.ppo_trainer`)."""
    from rlhf_trl.ppo_trainer import PPOConfig, PPOTrainer

    return PPOConfig, PPOTrainer


def trl_engine():
    """(PPOConfig, PPOTrainer) as TRL 1.12 ships them (`trl.experimental.ppo`; TRL 1.13 deleted them)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "experimental APIs may change": the pin makes that moot
        from trl.experimental.ppo import PPOConfig as TrlPPOConfig
        from trl.experimental.ppo import PPOTrainer as TrlPPOTrainer
    return TrlPPOConfig, TrlPPOTrainer


def init_fields(config_class) -> set[str]:
    return {field.name for field in dataclasses.fields(config_class) if field.init}


def shared_settings(config) -> dict:
    """Every setting of `config` (ours) that TRL's PPOConfig also has, by name, with ours' value."""
    theirs = init_fields(trl_engine()[0])
    return {name: getattr(config, name) for name in sorted(init_fields(type(config)) & theirs)}


def trl_config(config, **overrides):
    """TRL 1.12's PPOConfig from ours (`shared_settings`), with `overrides` on top."""
    return trl_engine()[0](**{**shared_settings(config), **overrides})
