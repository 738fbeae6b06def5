"""The one module that imports TRL's PPO.

TRL 1.13 removed PPO; 1.12.0 keeps it under `trl.experimental.ppo`. Every other module imports
`PPOConfig` and `PPOTrainer` from here, so that moving to another PPO engine touches this file only.

TRL's trainer calls the module-level `get_reward(model, query_responses, pad_token_id, context_length)`
for both the value model and the reward model. A reward model with its own tokenizer
(`rewards.CrossTokenizerReward`) answers that call itself; everything else goes to TRL's function.
"""

import warnings

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # TRL warns that experimental APIs may change; the pin makes that moot
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as _trl_ppo

from .rewards import CrossTokenizerReward

_trl_get_reward = _trl_ppo.get_reward


def _get_reward(model, query_responses, pad_token_id, context_length):
    inner = getattr(model, "module", model)  # DeepSpeed wraps the reward model in an engine
    if isinstance(inner, CrossTokenizerReward):
        return inner.get_reward(query_responses, pad_token_id, context_length)
    return _trl_get_reward(model, query_responses, pad_token_id, context_length)


_trl_ppo.get_reward = _get_reward

__all__ = ["PPOConfig", "PPOTrainer"]
