"""The one module that imports TRL's PPO.

TRL 1.13 removed PPO; 1.12.0 keeps it under `trl.experimental.ppo`. Every other module imports
`PPOConfig` and `PPOTrainer` from here, so that moving to another PPO engine touches this file only.
"""

import warnings

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # TRL warns that experimental APIs may change; the pin makes that moot
    from trl.experimental.ppo import PPOConfig, PPOTrainer

__all__ = ["PPOConfig", "PPOTrainer"]
