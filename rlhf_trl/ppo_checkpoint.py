"""What a PPO checkpoint holds and how a run resumes from one: every trainable tensor, the optimizer (under DeepSpeed
its own sharded save), the scheduler, each process's RNG states and the trainer state, written last, so its
presence means the checkpoint is complete and `train(resume_from_checkpoint)` ends where a run that never stopped
ends. A mixin of `ppo_trainer.PPOTrainer`, beside its loop.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import torch
from transformers.trainer_utils import rotate_checkpoints

from .errors import UserError
from .outputs import CHECKPOINT_STATE as TRAINER_STATE
from .ppo_config import PPOTrainerState

TRAINABLE_WEIGHTS = "trainable_weights.safetensors"
OPTIMIZER = "optimizer.pt"
SCHEDULER = "scheduler.pt"
RNG_STATE = "rng_state_{}.pth"
DEEPSPEED_TAG = "deepspeed"  # the folder of a checkpoint that holds DeepSpeed's own (optimizer shards)


def absolute_step_intervals(state, args, total_updates: int) -> None:
    """logging/eval/save steps given as a fraction of the run made absolute, as transformers' train() does."""
    for name in ("logging_steps", "eval_steps", "save_steps"):
        value = getattr(args, name, None)
        if value is not None:
            setattr(state, name, math.ceil(total_updates * value) if value < 1 else value)


class Checkpointing:
    """Saving the policy, and PPO's resumable checkpoints (a mixin of PPOTrainer: it reads the trainer's `args`,
    `state`, `accelerator`, `model`, `optimizer` and `lr_scheduler`)."""

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        """Writes the policy alone (with a shared base: its "default" adapter; value and reward served training)."""
        output_dir = output_dir or self.args.output_dir
        self.accelerator.wait_for_everyone()
        policy = self.accelerator.unwrap_model(self.model).policy
        if not self.accelerator.is_main_process:
            return
        if self.shares_base:
            policy.save_pretrained(output_dir, selected_adapters=["default"])
        else:
            policy.save_pretrained(output_dir)

    def _trainable_parameters(self) -> dict[str, torch.nn.Parameter]:
        model = self.accelerator.unwrap_model(self.model)
        return {name: parameter for name, parameter in model.named_parameters() if parameter.requires_grad}

    def _save_rng(self, checkpoint: Path) -> None:
        states = {
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "cpu": torch.random.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        }
        torch.save(states, checkpoint / RNG_STATE.format(self.accelerator.process_index))

    def _load_rng(self, checkpoint: Path) -> None:
        path = checkpoint / RNG_STATE.format(self.accelerator.process_index)
        if not path.exists():
            raise UserError(
                f"{checkpoint} has no RNG state for process {self.accelerator.process_index} (it was written by a "
                "run with fewer processes): resume with the same accelerate config, or add RESUME=0 to start over"
            )
        states = torch.load(path, weights_only=False)
        random.setstate(states["python"])
        np.random.set_state(states["numpy"])
        torch.random.set_rng_state(states["cpu"])
        if states["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(states["cuda"])

    def _save_checkpoint(self, model, trial):
        from safetensors.torch import save_file

        checkpoint = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
        if self.args.should_save:  # a leftover of a run that died here must not vouch for what is written now
            (checkpoint / TRAINER_STATE).unlink(missing_ok=True)
        self.accelerator.wait_for_everyone()
        checkpoint.mkdir(parents=True, exist_ok=True)
        if self.args.should_save:
            tensors = {
                name: p.detach().to("cpu").contiguous().clone() for name, p in self._trainable_parameters().items()
            }
            save_file(tensors, str(checkpoint / TRAINABLE_WEIGHTS))
            if not self.is_deepspeed_enabled:
                torch.save(self.optimizer.state_dict(), checkpoint / OPTIMIZER)
            torch.save(self.lr_scheduler.state_dict(), checkpoint / SCHEDULER)
        if self.is_deepspeed_enabled:
            # ZeRO shards the optimizer state (and its float32 master weights) over the processes: DeepSpeed's own
            # checkpoint writes each process's shard (a collective call), and the trainable tensors alone.
            self.model.save_checkpoint(str(checkpoint), tag=DEEPSPEED_TAG, exclude_frozen_parameters=True)
        self._save_rng(checkpoint)  # one file per process
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            self.state.save_to_json(str(checkpoint / TRAINER_STATE))  # last: marks the checkpoint complete
            rotate_checkpoints(self.args.output_dir, save_total_limit=self.args.save_total_limit)

    def _load_checkpoint(self, checkpoint: Path) -> int:
        """Loads a checkpoint's tensors, optimizer, scheduler and progress; returns its update count."""
        from safetensors.torch import load_file

        saved_state = PPOTrainerState.load_from_json(str(checkpoint / TRAINER_STATE))
        saved = load_file(str(checkpoint / TRAINABLE_WEIGHTS))
        parameters = self._trainable_parameters()
        if set(saved) != set(parameters):
            raise UserError(
                f"{checkpoint} holds {len(saved)} trainable tensors but this PPO model has {len(parameters)} "
                "(a different LoRA or model): add RESUME=0 (--resume false) to start over"
            )
        with torch.no_grad():
            for name, parameter in parameters.items():
                parameter.copy_(saved[name])
        if self.is_deepspeed_enabled:  # each process's optimizer shard, and the master weights in it
            self.model.load_checkpoint(
                str(checkpoint), tag=DEEPSPEED_TAG, load_module_strict=False, load_lr_scheduler_states=False
            )
        else:
            # To the CPU: load_state_dict moves each tensor to its parameter's device ("cpu:0" here would fail).
            self.optimizer.load_state_dict(torch.load(checkpoint / OPTIMIZER, map_location="cpu"))
        self.lr_scheduler.load_state_dict(torch.load(checkpoint / SCHEDULER))
        self.state.global_step = saved_state.global_step
        self.state.episode = saved_state.episode
        self.state.tokens_generated = saved_state.tokens_generated
        self.state.log_history = saved_state.log_history
        if self.args.num_sample_generations > 0:
            self.accelerator.print(
                "ppo: num_sample_generations > 0: after a resume the sample tables fall on other steps and draw other "
                "random numbers, so later metrics differ slightly from a run that never stopped"
            )
        return saved_state.global_step
