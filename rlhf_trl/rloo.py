"""Stage 3, RLOO: REINFORCE with a leave-one-out baseline, TRL 1.16's RLOOTrainer against the reward model.

    accelerate launch -m rlhf_trl.rloo --config recipes/demo/rloo.yaml [--key value ...]
    make rloo RECIPE=demo

Each prompt gets `num_generations` sampled answers; an answer's advantage is its reward less the mean reward of the
other answers to the same prompt (Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for
Learning from Human Feedback in LLMs", eq. 5). No value model, so one role fewer than PPO to hold and train. The
KL to the reference (the SFT model: the policy with its LoRA disabled) is `beta`, added to the reward as in the paper.
Everything but the trainer is shared with GRPO: `rlhf_trl.group_rl`.
"""

from trl import RLOOTrainer

from .cli import parse
from .errors import run
from .group_rl import RLOOConfig, main

if __name__ == "__main__":
    run(lambda: main("rloo", RLOOTrainer, *parse(RLOOConfig)))
