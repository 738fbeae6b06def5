"""Stage 3, GRPO: group-relative policy optimization, TRL 1.16's GRPOTrainer against the reward model.

    accelerate launch -m rlhf_trl.grpo --config recipes/demo/grpo.yaml [--key value ...]
    make grpo RECIPE=demo

Each prompt gets `num_generations` sampled answers; an answer's advantage is its reward less the group's mean reward,
divided by the group's standard deviation (`scale_rewards: group`; Shao et al. 2024, "DeepSeekMath", eq. 3), and the
clipped surrogate of PPO is taken per token (`loss_type`: TRL's default is "dapo", Yu et al. 2025, which averages over
all tokens of the batch). No value model. The KL to the reference (the policy with its LoRA disabled) is `beta`,
a loss term (k3 estimator) as in the paper; TRL's default is 0. Everything but the trainer is shared with RLOO:
`rlhf_trl.group_rl`.
"""

from trl import GRPOTrainer

from .cli import parse
from .errors import run
from .group_rl import GRPOConfig, main

if __name__ == "__main__":
    run(lambda: main("grpo", GRPOTrainer, *parse(GRPOConfig)))
