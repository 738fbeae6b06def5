"""The one module that imports TRL's PPO, and the resumable trainer built on it.

TRL 1.13 removed PPO; 1.12.0 keeps it under `trl.experimental.ppo`. Every other module imports
`PPOConfig`, `PPOTrainer` and the pieces of TRL's update that the fast engine (`rlhf_trl.ppo_fast`) reuses from
here, so that moving to another PPO engine touches this file only. `PPOConfig` is TRL's plus the choice of
engine (`ppo_engine: fast | trl`) and the fast engine's settings; `PPOTrainer.train` runs `_training_loop`, TRL's
loop here and the fast engine's in `ppo_fast.FastPPOTrainer`, under the same resume bookkeeping.

TRL's trainer calls the module-level `get_reward(model, query_responses, pad_token_id, context_length)`
for both the value model and the reward model. A reward model with its own tokenizer
(`rewards.CrossTokenizerReward`) answers that call itself; everything else goes to TRL's function. Such a reward
model needs each rollout's conversation, which token ids cannot give back: `PPOTrainer` hands it every batch the
training and evaluation dataloaders yield (`_AnnouncedBatches`), whose `prompt_index` names the prompts.

TRL's PPO cannot resume: its checkpoints hold the policy only, and `train()` always starts at step 0.
`PPOTrainer` here keeps TRL's training loop untouched and adds what resuming needs. A checkpoint holds
every trainable tensor (the policy's LoRA and the value model), the optimizer, the scheduler, each rank's
RNG states and the trainer state, which is written last so its presence means the checkpoint is complete.
`train(resume_from_checkpoint=...)` loads them, replays the shuffled prompt order up to the saved step
(the sampler has its own generator, so the order comes out the same) and runs the remaining updates, so a
resumed run ends at the same step with the same metrics as one that never stopped.

Under DDP (several GPUs, or several CPU processes) TRL 1.12's trainer fails: it reads `model.policy` off the
prepared model, for the reference forward (the policy with its LoRA disabled) and in `save_model`, which only
DeepSpeed's engine allows, since it passes attribute reads on to the model it wraps. `PPOTrainer` below lets
the DDP wrapper do the same; without it the run stops at the first rollout with "'DistributedDataParallel'
object has no attribute 'policy'", and its save fails on every process but the main one. It also logs
`val/num_eos_tokens` from the main process's rollouts only; `PPOTrainer.log` sums it over the processes.
"""

import copy
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from transformers import TrainerCallback
from transformers.trainer_utils import rotate_checkpoints

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # TRL warns that experimental APIs may change; the pin makes that moot
    from trl.experimental.ppo import PPOConfig as _TrlPPOConfig
    from trl.experimental.ppo import PPOTrainer as _TrlPPOTrainer
    from trl.experimental.ppo import ppo_trainer as _trl_ppo

    # The pieces of TRL's PPO update that `ppo_fast` reuses as they are.
    from trl.experimental.ppo.ppo_trainer import (
        INVALID_LOGPROB,
        first_true_indices,
        masked_mean,
        masked_whiten,
        truncate_response,
    )
from trl.models.utils import unwrap_model_for_generation
from trl.trainer.utils import pad

from .cli import UserError
from .generation import sampling_config, sampling_with, settings_line, stop_token_ids, token_names
from .outputs import CHECKPOINT_STATE as TRAINER_STATE
from .rewards import CrossTokenizerReward

TRAINABLE_WEIGHTS = "trainable_weights.safetensors"
OPTIMIZER = "optimizer.pt"
SCHEDULER = "scheduler.pt"
_trl_get_reward = _trl_ppo.get_reward
# TRL's trainer as TRL ships it, for `benchmarks/bench_ppo.py`'s baseline row (it also shares the patched get_reward).
TrlPPOTrainer = _TrlPPOTrainer


def _get_reward(model, query_responses, pad_token_id, context_length):
    inner = getattr(model, "module", model)  # DeepSpeed wraps the reward model in an engine
    if isinstance(inner, CrossTokenizerReward):
        return inner.get_reward(query_responses, pad_token_id, context_length)
    return _trl_get_reward(model, query_responses, pad_token_id, context_length)


_trl_ppo.get_reward = _get_reward
get_reward = _get_reward


@dataclass
class PPOConfig(_TrlPPOConfig):
    """TRL's PPOConfig plus the choice of engine and the fast engine's settings (`rlhf_trl.ppo_fast`)."""

    ppo_engine: str = field(
        default="fast",
        metadata={
            "help": "fast (rlhf_trl.ppo_fast: one shared base, chunked log-probs; one process) or trl "
            "(TRL 1.12's own PPOTrainer loop, the reference; several processes)."
        },
    )
    shared_base: bool = field(
        default=True,
        metadata={
            "help": "fast engine with LoRA: policy, reference, value (own adapter and head) and a LoRA reward "
            "model on the same SFT base share one copy of the base."
        },
    )
    logprob_chunk_tokens: int = field(
        default=1024,
        metadata={
            "help": "fast engine: tokens per pass through the output layer; each pass holds tokens x vocabulary "
            "float32 logits (0.5 GB at 1024 x 128k; 3 to 4 times that while training computes entropy), so smaller "
            "saves memory on large vocabularies."
        },
    )
    rollout_static_cache: bool = field(
        default=False,
        metadata={"help": "fast engine: generate rollouts with a static KV cache (compiled by transformers on a GPU)."},
    )

    def __post_init__(self):
        super().__post_init__()
        if self.ppo_engine not in ("fast", "trl"):
            raise ValueError(f"ppo_engine must be fast or trl, not {self.ppo_engine!r}")
        if self.logprob_chunk_tokens < 1:
            raise ValueError(f"logprob_chunk_tokens must be at least 1, not {self.logprob_chunk_tokens}")
        # PPO samples its rollouts at `temperature` and computes log-probs and KL at it: 0 would be greedy rollouts
        # scored as if sampled at 1e-7 (TRL adds 1e-7), with a KL of 0 and no exploration.
        if not self.temperature > 0:
            raise ValueError(f"temperature must be above 0 for PPO's sampled rollouts, not {self.temperature}")
        if self.response_length < 1:
            raise ValueError(f"response_length must be at least 1 token, not {self.response_length}")
        if self.total_episodes is not None and self.total_episodes < 1:
            raise ValueError(f"total_episodes must be at least 1 (or left unset), not {self.total_episodes}")


class _SkipFirstBatches:
    """The prepared dataloader, with its first `skip` batches drawn and dropped so the order carries on."""

    def __init__(self, dataloader, skip: int):
        self.dataloader = dataloader
        self.pending = iter(dataloader)
        for _ in range(skip):
            try:
                next(self.pending)
            except StopIteration:  # TRL cycles through the prompts; so does the replay
                self.pending = iter(dataloader)
                next(self.pending)

    def __iter__(self):
        if self.pending is None:
            yield from self.dataloader
        else:
            pending, self.pending = self.pending, None
            yield from pending

    def __len__(self):
        return len(self.dataloader)


class _AnnouncedBatches:
    """A prepared dataloader that shows each batch to a cross-tokenizer reward model as it yields it, so the
    scoring calls that follow know the rows' conversations (`rewards.CrossTokenizerReward.expect`)."""

    def __init__(self, dataloader, reward: CrossTokenizerReward):
        self.dataloader = dataloader
        self.reward = reward

    def __iter__(self):
        for batch in self.dataloader:
            self.reward.expect(batch)
            yield batch

    def __len__(self):
        return len(self.dataloader)


def absolute_step_intervals(state, args, total_updates: int) -> None:
    """logging/eval/save steps given as a fraction of the run made absolute, as TRL's `train()` does."""
    for name in ("logging_steps", "eval_steps", "save_steps"):
        value = getattr(args, name, None)
        if value is not None:
            setattr(state, name, math.ceil(total_updates * value) if value < 1 else value)


class _RestoreProgress(TrainerCallback):
    """Puts the saved step, episode and log back after TRL's `train()` has reset them to zero."""

    def __init__(self, saved, total_updates: int):
        self.saved = saved
        self.total_updates = total_updates

    def on_train_begin(self, args, state, control, **kwargs):
        state.global_step = self.saved.global_step
        state.episode = self.saved.episode
        state.log_history = self.saved.log_history
        state.max_steps = self.total_updates
        absolute_step_intervals(state, args, self.total_updates)  # fractions are of the whole run


class _ForwardingDDP(DistributedDataParallel):
    """DDP whose unknown attributes are the wrapped model's, as with DeepSpeed's engine: `model.policy` works."""

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)


def restore_bf16_norms(model) -> int:
    """Puts the norm layers that TRL cast to float32 back in bfloat16; returns how many it moved.

    With `bf16` and a 4-bit policy, TRL's PPOTrainer casts every norm to float32 (`peft_module_casting_to_bf16`).
    An RMSNorm returns `weight * hidden.to(input_dtype)`, so its output turns float32 and meets the bf16 `lm_head`
    outside autocast in `generate` and the reference forward: plain TRL stops in its first rollout with
    "expected scalar type Float but found BFloat16" (benchmarks/repro_4bit_dtype.py shows it on CPU). The norms are
    frozen under LoRA and compute their statistics in float32 anyway, so bf16 weights cost nothing.
    """
    moved = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.LayerNorm) or "norm" in name.rsplit(".", 1)[-1]:
            weight = getattr(module, "weight", None)
            if weight is not None and weight.dtype == torch.float32:
                module.to(torch.bfloat16)
                moved += 1
    return moved


def rollout_stop_ids(args, tokenizer, generation_config) -> list[int] | None:
    """The ids a rollout stops and is truncated at: with `stop_token: eos` every stop id of the policy
    (`generation.stop_token_ids`: the tokenizer's EOS and the generation_config's eos_token_id list), with
    `stop_token_id: N` that id alone, else None (every rollout runs the full response_length)."""
    if args.stop_token == "eos":
        return stop_token_ids(tokenizer, generation_config)
    if args.stop_token_id is not None:
        return [args.stop_token_id]
    return None


class PPOTrainer(_TrlPPOTrainer):
    """TRL's PPOTrainer with complete checkpoints, `train(resume_from_checkpoint=...)`, and DDP support.

    Rollouts sample exactly as PPO's log-probs assume: at the recipe's temperature with top_k 0 and top_p 1.0, and
    nothing from the policy's generation_config.json (`generation.sampling_config`, made the policy's own
    generation_config while training runs), stopping at any of `stop_token_ids`.
    """

    # Whether the update truncates at, and spares from missing_eos_penalty, every stop id (the fast engine) or
    # the tokenizer's EOS alone (TRL's loop: `truncate_response` and its EOS check take one id).
    checks_every_stop_id = False

    def __init__(self, *args, **kwargs):
        policy_config = copy.deepcopy(kwargs["model"].generation_config)
        super().__init__(*args, **kwargs)
        # TRL writes its single stop id into the policy's generation_config; a published full fine-tune keeps the
        # file's own list (Llama 3's [<|end_of_text|>, <|eot_id|>]) instead.
        self.policy_model.generation_config.eos_token_id = policy_config.eos_token_id
        tokenizer = self.processing_class
        self.stop_token_ids = rollout_stop_ids(self.args, tokenizer, policy_config)
        self.rollout_config = sampling_config(
            self.args.temperature + 1e-7, self.args.response_length, self.stop_token_ids, tokenizer.pad_token_id
        )
        self.accelerator.print(
            settings_line("ppo: rollouts", self.rollout_config, policy_config, tokenizer, "the policy's")
        )
        stops = self.stop_token_ids or []
        if not self.checks_every_stop_id and len(stops) > 1 and self.args.missing_eos_penalty is not None:
            self.accelerator.print(
                f"ppo: warning: ppo_engine trl spares only the tokenizer's EOS {token_names(tokenizer, stops[:1])} "
                f"from missing_eos_penalty, so answers that stop at {token_names(tokenizer, stops[1:])} are "
                "penalised too: use ppo_engine: fast, or drop missing_eos_penalty"
            )
        # Set by transformers' Trainer.__init__, which TRL's PPO does not call; Trainer._save reads it on every rank
        # but the main one, so without it a multi-process save fails. False: no model here is loaded pre-sharded.
        self.is_distributed_loading_by_transformers = False
        # Swapping the class keeps the very object accelerate prepared (and registered for gradient syncing).
        if type(self.model) is DistributedDataParallel:
            self.model.__class__ = _ForwardingDDP
        reward = getattr(self.reward_model, "module", self.reward_model)  # DeepSpeed wraps it in an engine
        if isinstance(reward, CrossTokenizerReward):
            self.dataloader = _AnnouncedBatches(self.dataloader, reward)
            self.eval_dataloader = _AnnouncedBatches(self.eval_dataloader, reward)
        if self.args.bf16 and getattr(self.policy_model, "is_loaded_in_4bit", False):
            restore_bf16_norms(self.policy_model)
        if (self.is_deepspeed_enabled or self.is_fsdp_enabled) and self.args.save_strategy != "no":
            # Each rank holds only shards of the optimizer (and under ZeRO-3/FSDP of the weights): a checkpoint
            # from rank 0 alone would resume wrong, so none is written rather than a silently bad one.
            raise UserError(
                "PPO checkpoints are not supported under DeepSpeed or FSDP: set save_strategy: no in the PPO recipe "
                "(the run then cannot resume) or use the multi_gpu accelerate config"
            )

    def _trainable_parameters(self) -> dict[str, torch.nn.Parameter]:
        model = self.accelerator.unwrap_model(self.model)
        return {name: parameter for name, parameter in model.named_parameters() if parameter.requires_grad}

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
            # Plain state dicts: transformers' own helpers expect Trainer attributes TRL's PPOTrainer lacks.
            torch.save(self.optimizer.state_dict(), checkpoint / OPTIMIZER)
            torch.save(self.lr_scheduler.state_dict(), checkpoint / SCHEDULER)
        self._save_rng_state(str(checkpoint))  # one file per rank
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            self.state.save_to_json(str(checkpoint / TRAINER_STATE))  # last: marks the checkpoint complete
            rotate_checkpoints(self.args.output_dir, save_total_limit=self.args.save_total_limit)

    def _load_trainable(self, checkpoint: Path) -> None:
        from safetensors.torch import load_file

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

    def train(self, resume_from_checkpoint: str | None = None):
        if resume_from_checkpoint is None:
            return self._sampled_training_loop()
        checkpoint = Path(resume_from_checkpoint)
        saved = type(self.state).load_from_json(str(checkpoint / TRAINER_STATE))
        self._load_trainable(checkpoint)
        # To the CPU: load_state_dict moves each tensor to its parameter's device ("cpu:0" here would fail).
        self.optimizer.load_state_dict(torch.load(checkpoint / OPTIMIZER, map_location="cpu"))
        self.lr_scheduler.load_state_dict(torch.load(checkpoint / SCHEDULER))
        total_updates = self.args.num_total_batches
        self.dataloader = _SkipFirstBatches(self.dataloader, saved.global_step)
        # First in line, so the progress bar and the others already see the restored step in on_train_begin.
        self.callback_handler.callbacks.insert(0, _RestoreProgress(saved, total_updates))
        if self.args.num_sample_generations > 0:
            self.accelerator.print(
                "ppo: num_sample_generations > 0: after a resume the sample tables fall on other steps and draw other "
                "random numbers, so later metrics differ slightly from a run that never stopped"
            )
        self._load_rng_state(str(checkpoint))  # after the replay, which must not shift the sampling RNG
        self.args.num_total_batches = total_updates - saved.global_step  # TRL's loop counts from 1 to this
        try:
            return self._sampled_training_loop()
        finally:
            self.args.num_total_batches = total_updates

    def _sampled_training_loop(self):
        """The training loop with `rollout_config` as the policy's generation_config: TRL's GenerationConfig (and
        its sample tables') take the rest of their settings from it, not from the policy's file."""
        with sampling_with(self.policy_model, self.rollout_config):
            return self._training_loop()

    def _training_loop(self):
        """TRL's loop; `ppo_fast.FastPPOTrainer` puts its own here, under the same resume bookkeeping."""
        return _TrlPPOTrainer.train(self)

    def log(self, logs: dict, *args, **kwargs) -> None:
        # TRL gathers every PPO metric across processes but this count, which would be the main process's alone:
        # summed, it counts the EOS tokens of the whole rollout batch, as a 1-process run does. Every process
        # logs each rollout, so the sum is a collective they all reach.
        if "val/num_eos_tokens" in logs and self.accelerator.num_processes > 1:
            count = torch.tensor(float(logs["val/num_eos_tokens"]), device=self.accelerator.device)
            logs = {**logs, "val/num_eos_tokens": int(self.accelerator.reduce(count, reduction="sum").item())}
        super().log(logs, *args, **kwargs)


__all__ = [
    "INVALID_LOGPROB",
    "PPOConfig",
    "PPOTrainer",
    "TrlPPOTrainer",
    "absolute_step_intervals",
    "first_true_indices",
    "get_reward",
    "masked_mean",
    "masked_whiten",
    "pad",
    "rollout_stop_ids",
    "truncate_response",
    "unwrap_model_for_generation",
]
