"""PPO's settings (`PPOConfig`, TRL 1.12's keys and defaults plus this engine's), the Trainer settings its loop does not
run (refused in one line before any model loads), and the batch arithmetic checked when the trainer starts.

Read with `ppo_trainer`, whose loop these feed; `ppo_checkpoint` holds what a checkpoint saves and restores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from transformers import TrainerState, TrainingArguments

from .errors import UserError

# transformers' Trainer settings that PPO's own loop (`PPOTrainer.train`) does not run, with the values it accepts and
# what to do instead: a recipe that sets one stops in one line before any model loads, instead of a run that ignores
# it (QA D01: `save_strategy: epoch` once wrote no checkpoint at all). What the loop does run: save_strategy no,
# steps and epoch (one checkpoint per pass over the prompts), save_steps, save_total_limit, seed and data_seed (the
# prompts' order), the optimizer and scheduler keys, bf16/fp16, (gradient|activation)_checkpointing, report_to.
NOT_RUN_BY_PPO = {
    "save_strategy": (
        ("no", "steps", "epoch"),
        "best needs an evaluation metric and PPO runs no evaluation: use steps",
    ),
    "load_best_model_at_end": ((False,), "PPO runs no evaluation, so no checkpoint is best: leave it out"),
    "metric_for_best_model": ((None,), "PPO runs no evaluation: leave it out"),
    "eval_strategy": (("no",), "PPO runs no evaluation; num_sample_generations prints sampled eval answers"),
    "eval_on_start": ((False,), "PPO runs no evaluation; num_sample_generations prints sampled eval answers"),
    "logging_strategy": (("steps",), "PPO logs its metrics after every update: leave it out"),
    "save_only_model": ((False,), "a PPO checkpoint holds what a resume needs (optimizer, RNG): leave it out"),
    "ignore_data_skip": ((False,), "a resumed PPO run always carries on with the prompts it was at: leave it out"),
    "restore_callback_states_from_checkpoint": ((False,), "not supported by PPO: leave it out"),
    "train_sampling_strategy": (("random",), "PPO draws its prompts in a seeded random order: leave it out"),
    "dataloader_num_workers": ((0,), "PPO's prompts are tokenized before training: leave it at 0"),
    "auto_find_batch_size": ((False,), "not supported by PPO: set per_device_train_batch_size"),
    "torch_compile": ((False,), "not supported by PPO's loop: leave it out"),
    "use_liger_kernel": ((False,), "not supported by PPO's loop: leave it out"),
    "neftune_noise_alpha": ((None,), "NEFTune is for supervised fine-tuning: leave it out"),
    "label_smoothing_factor": ((0.0,), "PPO has no labels: leave it out"),
    "full_determinism": ((False,), "not supported by PPO (seed makes its runs repeatable on one machine)"),
    "include_num_input_tokens_seen": (("no", False), "PPO records tokens_generated in its marker: leave it out"),
    "torch_empty_cache_steps": ((None,), "not supported by PPO's loop: leave it out"),
    "deepspeed": ((None,), "PPO takes DeepSpeed from the accelerate config: ACCELERATE_CONFIG=zero2"),
    "fsdp": ((None, "", []), "PPO does not run under FSDP: use the multi_gpu or zero2 accelerate config"),
    "accelerator_config": ((None,), "PPO builds its own Accelerator: leave it out"),
    "push_to_hub": ((False,), "stages write to output_dir only: upload the finished folder yourself"),
    "max_grad_norm": ((1.0, 0, 0.0, None), "PPO does not clip gradients, as TRL 1.12's PPO did not: leave it out"),
}


@dataclass
class PPOConfig(TrainingArguments):
    """PPO's settings: TRL 1.12's PPOConfig keys and defaults (so recipes written for it keep working), plus this
    engine's. Batch sizes that end in `batch_size` without `per_device` are computed by the trainer, not set."""

    # Defaults that TRL's trainers change from TrainingArguments'.
    learning_rate: float = field(default=3e-6, metadata={"help": "The initial learning rate for AdamW."})
    logging_steps: float = field(
        default=10,
        metadata={"help": "Kept for old recipes: PPO logs its metrics after every update, as TRL's PPOTrainer did."},
    )
    activation_checkpointing: bool | None = field(
        default=None,
        metadata={
            "help": "Recompute activations in backward instead of keeping them (less memory); unset: on (TRL's "
            "default), unless the older name gradient_checkpointing says otherwise."
        },
    )
    bf16: bool | None = field(
        default=None, metadata={"help": "bf16 mixed precision; unset: on unless fp16 is set (TRL's default)."}
    )
    # The run's size.
    total_episodes: int | None = field(
        default=None, metadata={"help": "Rollouts to train on in all; unset: num_train_epochs x the prompts."}
    )
    num_mini_batches: int = field(default=1, metadata={"help": "Mini-batches (optimizer steps) per rollout batch."})
    num_ppo_epochs: int = field(default=4, metadata={"help": "Passes over each rollout batch."})
    local_rollout_forward_batch_size: int = field(
        default=64, metadata={"help": "Rollouts per generate call and per scoring forward pass, per process."}
    )
    num_sample_generations: int = field(
        default=10, metadata={"help": "How many times to print a table of sampled eval answers during training."}
    )
    dataset_num_proc: int | None = field(default=None, metadata={"help": "Unused by PPO; kept for old recipes."})
    # Rollouts.
    response_length: int = field(default=53, metadata={"help": "Most tokens sampled per answer."})
    stop_token: str | None = field(
        default=None,
        metadata={"help": "eos: stop answers at the policy's stop ids (its EOS list); none: unset (a recipe's eos)."},
    )
    stop_token_id: int | None = field(default=None, metadata={"help": "Stop answers at this one token id instead."})
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature of the rollouts (above 0)."})
    missing_eos_penalty: float | None = field(
        default=None, metadata={"help": "Subtracted from the score of an answer that never stops."}
    )
    # The roles.
    sft_model_path: str = field(default="", metadata={"help": "The SFT model: the policy's start (path or hub id)."})
    reward_model_path: str = field(default="", metadata={"help": "The reward model (path or hub id)."})
    shared_base: bool = field(
        default=True,
        metadata={
            "help": "With LoRA: policy, reference, value (own adapter and head) and a LoRA reward model on the same "
            "SFT base share one copy of the base."
        },
    )
    model_adapter_name: str | None = field(default=None, metadata={"help": "Not supported (TRL 1.12 key)."})
    ref_adapter_name: str | None = field(default=None, metadata={"help": "Not supported (TRL 1.12 key)."})
    # The loss.
    kl_coef: float = field(default=0.05, metadata={"help": "Weight of the per-token KL penalty."})
    kl_estimator: str = field(default="k1", metadata={"help": "k1 or k3 (see ppo_math.kl_penalty)."})
    whiten_rewards: bool = field(default=False, metadata={"help": "Scale per-token rewards to unit variance."})
    cliprange: float = field(default=0.2, metadata={"help": "Clip range of the policy ratio."})
    vf_coef: float = field(default=0.1, metadata={"help": "Weight of the value loss."})
    cliprange_value: float = field(default=0.2, metadata={"help": "Clip range of the value predictions."})
    gamma: float = field(default=1.0, metadata={"help": "Discount factor of GAE."})
    lam: float = field(default=0.95, metadata={"help": "Lambda of GAE."})
    # Memory.
    logprob_chunk_tokens: int = field(
        default=1024,
        metadata={
            "help": "Tokens per pass through the output layer; each pass holds tokens x vocabulary float32 logits "
            "(0.5 GB at 1024 x 128k; 3 to 4 times that while training computes entropy)."
        },
    )
    rollout_static_cache: bool = field(
        default=False, metadata={"help": "Generate rollouts with a static KV cache (compiled by transformers on GPU)."}
    )
    ds3_gather_for_generation: bool = field(default=True, metadata={"help": "Unused (PPO does not run on ZeRO-3)."})
    # Retired.
    ppo_engine: str | None = field(
        default=None, metadata={"help": "Retired: PPO has one engine. Leave it out of the recipe."}
    )
    # Computed by the trainer from the above and the number of processes.
    world_size: int | None = field(default=None, metadata={"help": "Computed: processes."})
    num_total_batches: int | None = field(default=None, metadata={"help": "Computed: PPO updates in the run."})
    micro_batch_size: int | None = field(default=None, metadata={"help": "Computed."})
    local_batch_size: int | None = field(default=None, metadata={"help": "Computed: rollouts per process."})
    batch_size: int | None = field(default=None, metadata={"help": "Computed: rollouts per update."})
    local_mini_batch_size: int | None = field(default=None, metadata={"help": "Computed."})
    mini_batch_size: int | None = field(default=None, metadata={"help": "Computed."})

    def __post_init__(self):
        self.bf16 = not self.fp16 if self.bf16 is None else self.bf16
        if self.activation_checkpointing is None and self.gradient_checkpointing is None:
            self.activation_checkpointing = True  # transformers then mirrors it into gradient_checkpointing
        if self.ppo_engine not in (None, "fast"):
            raise ValueError(
                f"ppo_engine: {self.ppo_engine} is retired: PPO now has one engine (rlhf_trl/ppo_trainer.py), "
                "which runs in several processes too; delete the ppo_engine line from the recipe (TRL 1.12's PPO is "
                "kept for comparison only: make test-reference, make bench-engines)"
            )
        if self.model_adapter_name or self.ref_adapter_name:
            raise ValueError("model_adapter_name and ref_adapter_name are not supported: leave them out")
        if isinstance(self.stop_token, str) and self.stop_token.strip().lower() in ("", "none", "null"):
            self.stop_token = None  # `--stop_token none` unsets a recipe's `stop_token: eos`
        if self.stop_token not in (None, "eos"):
            raise ValueError(f"stop_token must be eos or none, not {self.stop_token!r}")
        if self.stop_token and self.stop_token_id is not None:
            raise ValueError(
                "set stop_token or stop_token_id, not both (--stop_token none unsets the recipe's stop_token: eos)"
            )
        if self.kl_estimator not in ("k1", "k3"):
            raise ValueError(f"kl_estimator must be k1 or k3, not {self.kl_estimator!r}")
        if self.logprob_chunk_tokens < 1:
            raise ValueError(f"logprob_chunk_tokens must be at least 1, not {self.logprob_chunk_tokens}")
        # PPO samples its rollouts at `temperature` and computes log-probs and KL at it: 0 would be greedy rollouts
        # scored as if sampled at 1e-7, with a KL of 0 and no exploration.
        if not self.temperature > 0:
            raise ValueError(f"temperature must be above 0 for PPO's sampled rollouts, not {self.temperature}")
        if self.response_length < 1:
            raise ValueError(f"response_length must be at least 1 token, not {self.response_length}")
        if self.total_episodes is not None and self.total_episodes < 1:
            raise ValueError(f"total_episodes must be at least 1 (or left unset), not {self.total_episodes}")
        if self.max_steps > 0:  # transformers' key, which PPO's own loop never read
            raise ValueError(
                f"max_steps ({self.max_steps}) does not apply to PPO, whose length is total_episodes rollouts (updates "
                "= total_episodes / (per_device_train_batch_size x gradient_accumulation_steps x processes)): set "
                "total_episodes instead"
            )
        for name, (allowed, instead) in NOT_RUN_BY_PPO.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"{name}: {getattr(value, 'value', value)} does not apply to PPO ({instead})")
        for name in ("num_mini_batches", "num_ppo_epochs", "local_rollout_forward_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}")
        if self.gradient_accumulation_steps > 1 and self.num_mini_batches > 1:
            # TRL's arithmetic: a mini-batch holds gradient_accumulation_steps / num_mini_batches micro-batches, so an
            # optimizer step would span several mini-batches and the per-micro-batch statistics, laid out for
            # gradient_accumulation_steps of them, would average empty slots into loss/policy_avg and the others.
            raise ValueError(
                f"gradient_accumulation_steps ({self.gradient_accumulation_steps}) and num_mini_batches "
                f"({self.num_mini_batches}) cannot both be above 1 in PPO (an optimizer step would span mini-batches "
                "and the logged losses would be diluted): keep one of them at 1"
            )
        super().__post_init__()


@dataclass
class PPOTrainerState(TrainerState):
    """transformers' TrainerState plus the rollouts trained on so far and their answer tokens, up to and including the
    stop token, over every process (saved in each checkpoint)."""

    episode: int = 0
    tokens_generated: int = 0


class SetupChecks:
    """What `PPOTrainer.__init__` checks before it builds anything: the launch it runs under and TRL 1.12's batch
    arithmetic (a mixin: it reads the trainer's `args`, `accelerator` and `train_dataset_len`)."""

    def _check_launch(self) -> None:
        # rlhf_trl.launch.check refuses these first, with the measured reasons; here for a trainer built by hand.
        if self.is_fsdp_enabled:
            raise UserError(
                "PPO does not run under FSDP: use recipes/accelerate_configs/multi_gpu.yaml or zero2.yaml for make ppo"
            )
        if self.is_deepspeed_enabled:
            if self.accelerator.state.deepspeed_plugin.zero_stage == 3:
                raise UserError("PPO does not run under DeepSpeed ZeRO-3: use zero2.yaml or multi_gpu.yaml")
            if self.args.shared_base:
                self.accelerator.print(
                    "ppo: DeepSpeed steps the optimizer after every backward, so the shared base (two backward "
                    "passes per micro-batch) is off: policy, value and reward are separate models"
                )

    def _batch_sizes(self) -> None:
        """TRL 1.12's batch arithmetic: rollouts per update = per_device x accumulation x processes."""
        args = self.args
        if args.total_episodes is None:
            args.total_episodes = int(args.num_train_epochs * self.train_dataset_len)
        args.world_size = self.accelerator.num_processes
        args.local_batch_size = args.per_device_train_batch_size * args.gradient_accumulation_steps
        args.micro_batch_size = args.per_device_train_batch_size * args.world_size
        args.batch_size = args.local_batch_size * args.world_size
        if args.local_batch_size % args.num_mini_batches:
            raise UserError(
                f"per_device_train_batch_size x gradient_accumulation_steps ({args.local_batch_size}) must be a "
                f"multiple of num_mini_batches ({args.num_mini_batches}): change one of them"
            )
        args.mini_batch_size = args.batch_size // args.num_mini_batches
        args.local_mini_batch_size = args.local_batch_size // args.num_mini_batches
        if args.batch_size > self.train_dataset_len:  # whole batches only: the prompts would never yield one
            raise UserError(
                f"each update draws {args.batch_size} prompts (per_device_train_batch_size x "
                f"gradient_accumulation_steps x {args.world_size} processes) but the training set has "
                f"{self.train_dataset_len}: lower one of them"
            )
        args.num_total_batches = math.ceil(args.total_episodes / args.batch_size)
        self.sample_generations_freq = max(1, args.num_total_batches // max(args.num_sample_generations, 1))
