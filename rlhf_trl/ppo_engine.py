"""The one module that imports TRL's PPO.

TRL 1.13 removed PPO; 1.12.0 keeps it under `trl.experimental.ppo`. Every other module imports
`PPOConfig` and `PPOTrainer` from here, so that moving to another PPO engine touches this file only.

TRL's trainer calls the module-level `get_reward(model, query_responses, pad_token_id, context_length)`
for both the value model and the reward model. A reward model with its own tokenizer
(`rewards.CrossTokenizerReward`) answers that call itself; everything else goes to TRL's function.

Under DDP (several GPUs, or several CPU processes) TRL 1.12's trainer fails: it reads `model.policy` off the
prepared model, for the reference forward (the policy with its LoRA disabled) and in `save_model`, which only
DeepSpeed's engine allows, since it passes attribute reads on to the model it wraps. `PPOTrainer` below lets
the DDP wrapper do the same; without it the run stops at the first rollout with "'DistributedDataParallel'
object has no attribute 'policy'", and its save fails on every process but the main one. It also logs
`val/num_eos_tokens` from the main process's rollouts only; `PPOTrainer.log` sums it over the processes.
"""

import warnings

import torch
from torch.nn.parallel import DistributedDataParallel

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # TRL warns that experimental APIs may change; the pin makes that moot
    from trl.experimental.ppo import PPOConfig
    from trl.experimental.ppo import PPOTrainer as _TrlPPOTrainer
    from trl.experimental.ppo import ppo_trainer as _trl_ppo

from .rewards import CrossTokenizerReward

_trl_get_reward = _trl_ppo.get_reward


def _get_reward(model, query_responses, pad_token_id, context_length):
    inner = getattr(model, "module", model)  # DeepSpeed wraps the reward model in an engine
    if isinstance(inner, CrossTokenizerReward):
        return inner.get_reward(query_responses, pad_token_id, context_length)
    return _trl_get_reward(model, query_responses, pad_token_id, context_length)


_trl_ppo.get_reward = _get_reward


class _ForwardingDDP(DistributedDataParallel):
    """DDP whose unknown attributes are the wrapped model's, as with DeepSpeed's engine: `model.policy` works."""

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)


class PPOTrainer(_TrlPPOTrainer):
    """TRL's PPOTrainer, runnable under DDP (see the module docstring)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Set by transformers' Trainer.__init__, which TRL's PPO does not call; Trainer._save reads it on every rank
        # but the main one, so without it a multi-process save fails. False: no model here is loaded pre-sharded.
        self.is_distributed_loading_by_transformers = False
        # Swapping the class keeps the very object accelerate prepared (and registered for gradient syncing).
        if type(self.model) is DistributedDataParallel:
            self.model.__class__ = _ForwardingDDP

    def log(self, logs: dict, *args, **kwargs) -> None:
        # TRL gathers every PPO metric across processes but this count, which would be the main process's alone:
        # summed, it counts the EOS tokens of the whole rollout batch, as a 1-process run does. Every process
        # logs each rollout, so the sum is a collective they all reach.
        if "val/num_eos_tokens" in logs and self.accelerator.num_processes > 1:
            count = torch.tensor(float(logs["val/num_eos_tokens"]), device=self.accelerator.device)
            logs = {**logs, "val/num_eos_tokens": int(self.accelerator.reduce(count, reduction="sum").item())}
        super().log(logs, *args, **kwargs)


__all__ = ["PPOConfig", "PPOTrainer"]
