"""PPO for language models: this project's own trainer, on transformers' Trainer and accelerate.

    accelerate launch -m rlhf_trl.ppo --config recipes/demo/ppo.yaml      # make ppo RECIPE=demo

TRL deleted its PPOTrainer in 1.13. This engine runs the same update as TRL 1.12's (same rollouts, rewards, KL
penalty, GAE, clipped losses, metric names; `make test-reference` checks them step for step against TRL 1.12 in an
environment of its own) with less memory, resumable checkpoints and several processes. One update, top to bottom
(`train`):

1. **Rollout** (`rollout`): draw a batch of prompts, sample a response for each with exactly the recipe's settings
   (`generation.sampling_config`: the temperature, top_k 0, top_p 1, every stop id of the policy, nothing from its
   generation_config.json), then score each position: the policy's and the reference's log-probs, the value
   model's values, and the reward model's score of the answer truncated at its first stop token.
2. **Advantages** (`advantages`): `ppo_math`'s missing-EOS penalty, KL-penalised per-token rewards, GAE and
   whitening.
3. **Update** (`update`): `num_ppo_epochs` passes over the batch in shuffled mini-batches, each mini-batch in
   micro-batches of `per_device_train_batch_size` whose gradients accumulate into one optimizer step; the clipped
   policy loss and the clipped value loss (`ppo_math`).
4. **Log, checkpoint**: TRL's metric names through transformers' callbacks (`report_to`, `metrics.jsonl`); a
   checkpoint (`ppo_checkpoint`) holds every trainable tensor, the optimizer, the scheduler, each process's RNG
   states and the trainer state (written last: its presence means the checkpoint is complete), so
   `train(resume_from_checkpoint)` ends where a run that never stopped ends. When training ends, one line says where
   an update's time went (`ppo: time per update ...: generation, scoring, update`; `_timed`).

Beside the loop: `ppo_config` (PPOConfig, the Trainer settings the loop refuses, the launch and batch-size checks)
and `ppo_checkpoint` (saving and resuming); `ppo_math` (the formulas) and `ppo_roles` (policy, reference, value and
reward on one base).

Roles (`ppo_roles`): with LoRA and `shared_base: true` one base serves policy, reference, value and reward. Each
micro-batch then runs two backward passes, the policy loss under the "default" adapter and the value loss under
"value", because a checkpointed layer recomputes its forward in backward with whatever adapter is active then;
their parameters are disjoint, so the gradients equal those of the single combined loss that separate models use.

Several processes (`multi_cpu.yaml`, `multi_gpu.yaml`): each process samples and scores its own share of the batch,
and before each optimizer step the trainable gradients are averaged over the processes (`average_gradients`), as
DistributedDataParallel would average them; the model is not wrapped in DDP, whose hooks expect one forward and one
backward per step, so the shared base works in any number of processes. DeepSpeed (`zero2.yaml`) owns the optimizer
and its step: there the model is prepared by accelerate, roles are separate models and each micro-batch runs one
backward of the combined loss (printed when it happens); a checkpoint then also holds DeepSpeed's own, with each
process's shard of the optimizer state. Gradient clipping (`max_grad_norm`) is not applied, as in
TRL's PPO.
"""

from __future__ import annotations

import copy
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, GradientAccumulationPlugin
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding, Trainer
from transformers.integrations import get_reporting_integration_callbacks
from transformers.trainer import DEFAULT_CALLBACKS
from transformers.trainer_callback import CallbackHandler, ExportableState, TrainerControl

from . import ppo_math
from .errors import UserError
from .generation import sampling_config, sampling_with, settings_line, stop_token_ids
from .metrics_log import StageProgress
from .ppo_checkpoint import Checkpointing, absolute_step_intervals
from .ppo_config import NOT_RUN_BY_PPO, PPOConfig, PPOTrainerState, SetupChecks  # noqa: F401  (re-exported)
from .ppo_roles import (
    PolicyAndValue,
    active_adapter,
    backbone_of,
    causal_lm_of,
    check_logits,
    chunked_logprobs,
    disable_dropout,
    reference_model,
    reward_scores,
    sequence_inputs,
    share_base,
    trainable_flags_kept,
)
from .rewards import CrossTokenizerReward


def rollout_stop_ids(args, tokenizer, generation_config) -> list[int] | None:
    """The ids a rollout stops and is truncated at: with `stop_token: eos` every stop id of the policy
    (`generation.stop_token_ids`: the tokenizer's EOS and the generation_config's eos_token_id list), with
    `stop_token_id: N` that id alone, else None (every rollout runs the full response_length)."""
    if args.stop_token == "eos":
        return stop_token_ids(tokenizer, generation_config)
    if args.stop_token_id is not None:
        if not 0 <= args.stop_token_id < len(tokenizer):
            raise UserError(
                f"stop_token_id {args.stop_token_id} is not a token of the policy's tokenizer (ids 0 to "
                f"{len(tokenizer) - 1}), so no answer could ever stop: fix it, or use stop_token: eos"
            )
        return [args.stop_token_id]
    return None


def average_gradients(parameters, num_processes: int) -> None:
    """Averages the gradients of `parameters` over all processes in place, in one all-reduce (what DDP does
    between backward and the optimizer step). A parameter without a gradient counts as zeros, so every process
    sends the same buffer."""
    import torch.distributed as dist

    parameters = list(parameters)
    for parameter in parameters:
        if parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)
    grads = [parameter.grad for parameter in parameters]
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    flat /= num_processes
    for grad, averaged in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads), strict=True):
        grad.copy_(averaged)


PASS_START_DRAWS = 2  # what torch draws from the global RNG as a pass over a shuffled DataLoader starts


def first_pass_seed(seed: int) -> int:
    """The seed of the prompts' order in the first pass over them: the number torch's RandomSampler draws from the
    global RNG after `torch.manual_seed(seed)` (the second: the DataLoader's iterator draws its base seed first), so
    that pass is TRL 1.12's order (make test-reference). Pass `e` is then shuffled with `first_pass_seed + e`
    (accelerate's SeedableRandomSampler), whatever drew random numbers since."""
    generator = torch.Generator().manual_seed(seed)
    draws = [int(torch.empty((), dtype=torch.int64).random_(generator=generator)) for _ in range(PASS_START_DRAWS)]
    return draws[-1]


class PPOTrainer(SetupChecks, Checkpointing, Trainer):
    """PPO with a value model against a learned reward model (see the module docstring).

    Args: `args` a PPOConfig; `processing_class` the policy's tokenizer (left padding); `model` the policy (the SFT
    model); `ref_model` None (with LoRA: the policy with adapters off; a full fine-tune: a frozen copy is made);
    `reward_model` a sequence-classification model, a `rewards.CrossTokenizerReward`, or None with `reward_adapter`
    (the path of a LoRA reward adapter on the SFT model, for the shared base); `value_model` a sequence-
    classification model, or None for the shared base (needs `peft_config`); `train_dataset` and `eval_dataset`
    tokenized prompts (`input_ids`, and `prompt_index` for a cross-tokenizer reward model); `peft_config` the
    policy's LoRA; `callbacks` transformers TrainerCallbacks.
    Raises UserError for a setting this engine cannot run (see `_check_launch`).
    """

    def __init__(
        self,
        args: PPOConfig,
        processing_class,
        model,
        ref_model,
        reward_model,
        train_dataset,
        value_model=None,
        eval_dataset=None,
        peft_config=None,
        callbacks=None,
        reward_adapter: str | None = None,
        data_collator=None,
    ):
        check_logits(model.config)
        self.args = args
        self.processing_class = processing_class
        policy_config = copy.deepcopy(model.generation_config)
        # Accumulation counts micro-batches only: accelerate's default (sync_with_dataloader) would also step the
        # optimizer at every micro-batch of the last prompt batch of each pass over the data (the update runs while
        # the dataloader sits at its end), as TRL 1.12's PPOTrainer did with gradient_accumulation_steps > 1.
        accumulation = GradientAccumulationPlugin(
            num_steps=args.gradient_accumulation_steps, sync_with_dataloader=False
        )
        # The recipe's bf16/fp16, as transformers' Trainer passes them (TrainingArguments.mixed_precision: fp16 or bf16
        # when set, else the accelerate config's); TRL 1.12's PPOTrainer took the accelerate config's alone, so
        # `bf16: true` trained in float32 under every config here (they say `mixed_precision: no`).
        # The prompts' order in pass e over them depends on (data_seed or seed, e) alone, as in transformers' Trainer
        # (accelerate's seedable sampler and `set_epoch`), so a run resumed inside any pass draws what the run that
        # never stopped drew (QA D02: the order of a pass once came from torch's global RNG at its start).
        order = DataLoaderConfiguration(
            use_seedable_sampler=True,
            data_seed=first_pass_seed(args.seed if args.data_seed is None else args.data_seed),
        )
        self.accelerator = Accelerator(
            gradient_accumulation_plugin=accumulation,
            mixed_precision=getattr(args, "mixed_precision", None),
            dataloader_config=order,
        )
        self.is_deepspeed_enabled = getattr(self.accelerator.state, "deepspeed_plugin", None) is not None
        self.is_fsdp_enabled = getattr(self.accelerator.state, "fsdp_plugin", None) is not None
        self._check_launch()
        self.shares_base = value_model is None
        if self.shares_base:
            if peft_config is None:
                raise UserError("shared_base: true needs LoRA (use_peft: true): set one or shared_base: false")
            model, value_model, shared_reward = share_base(model, peft_config, reward_adapter)
            reward_model = shared_reward or reward_model
        elif peft_config is not None:
            from peft import get_peft_model

            model = get_peft_model(model, peft_config)
        self.policy_model, self.value_model, self.reward_model = model, value_model, reward_model
        self.is_peft_model = hasattr(model, "disable_adapter")
        self.ref_model = ref_model if ref_model is not None or self.is_peft_model else reference_model(model)
        self.train_dataset, self.eval_dataset = train_dataset, eval_dataset
        self.train_dataset_len = len(train_dataset)
        self._batch_sizes()

        # The rollouts' sampling settings, fixed here so nothing from generation_config.json leaks in.
        self.stop_token_ids = rollout_stop_ids(args, processing_class, policy_config)
        self.rollout_config = sampling_config(
            args.temperature + 1e-7, args.response_length, self.stop_token_ids, processing_class.pad_token_id
        )
        self.accelerator.print(
            settings_line("ppo: rollouts", self.rollout_config, policy_config, processing_class, "the policy's")
        )

        for role in (self.policy_model, self.ref_model, self.value_model, self.reward_model):
            if role is not None:
                disable_dropout(role)
        self.model = PolicyAndValue(self.policy_model, self.value_model)
        self.optimizer, self.lr_scheduler, self.optimizer_cls_and_kwargs = None, None, None
        self.seconds: dict[str, float] = {}  # wall time per part of an update (`_timed`)
        self.create_optimizer_and_scheduler(num_training_steps=args.num_total_batches)
        self._callbacks(callbacks)
        if args.should_save:
            Path(args.output_dir).mkdir(parents=True, exist_ok=True)

        collator = data_collator or DataCollatorWithPadding(processing_class)
        # Its own generator: an iterator's base seed, the sampler's numbers and a resume's skipping draw nothing from
        # the global RNG, which the rollouts sample with (`batches` in `train` draws what a plain DataLoader would).
        self.dataloader = DataLoader(
            train_dataset,
            batch_size=args.local_batch_size,
            shuffle=True,
            collate_fn=collator,
            drop_last=True,
            generator=torch.Generator(),
        )
        # Every process shuffles alike (the seedable sampler above) before prepare splits each batch between them.
        torch.manual_seed(args.seed)
        if self.is_deepspeed_enabled:
            self.model, self.optimizer, self.dataloader = self.accelerator.prepare(
                self.model, self.optimizer, self.dataloader
            )
        else:
            self.model = self.model.to(self.accelerator.device)
            self.optimizer, self.dataloader = self.accelerator.prepare(self.optimizer, self.dataloader)
        torch.manual_seed(args.seed + self.accelerator.process_index * 100003)
        self.eval_dataloader = None
        if eval_dataset is not None:
            # Not drop_last: fewer eval prompts than per_device_eval_batch_size still make a sample table.
            eval_loader = DataLoader(eval_dataset, batch_size=args.per_device_eval_batch_size, collate_fn=collator)
            self.eval_dataloader = self.accelerator.prepare(eval_loader)
        for role in (self.ref_model, self.reward_model):
            if role is not None:
                role.to(self.accelerator.device)
        self.lm_head = causal_lm_of(self.policy_model).get_output_embeddings()
        weights = next(causal_lm_of(self.policy_model).parameters()).dtype
        warning = ppo_math.precision_warning(weights, self.accelerator.mixed_precision, self.is_peft_model)
        if warning:
            self.accelerator.print(f"ppo: warning: {warning}")

    # -- set-up ---------------------------------------------------------------------------------------------------

    def _callbacks(self, callbacks) -> None:
        """transformers' callback machinery, as its Trainer sets it up: progress bar, report_to, the caller's."""
        args = self.args
        default = DEFAULT_CALLBACKS + get_reporting_integration_callbacks(args.report_to)
        self.callback_handler = CallbackHandler(
            default + list(callbacks or []), self.model, self.processing_class, self.optimizer, self.lr_scheduler
        )
        self.add_callback(StageProgress)  # one bar with the mean score and KL (metrics_log); no dict per step
        self.control = TrainerControl()
        self.state = PPOTrainerState(
            is_local_process_zero=self.is_local_process_zero(),
            is_world_process_zero=self.is_world_process_zero(),
            stateful_callbacks=[
                cb for cb in self.callback_handler.callbacks + [self.control] if isinstance(cb, ExportableState)
            ],
        )
        self.current_flos, self.hp_search_backend = 0, None

    # -- the passes -----------------------------------------------------------------------------------------------

    def _logprobs(self, query_responses, responses, context_length, model=None):
        """(log-probs [B, T], entropy [B, T]) of `responses` under the policy (or `model`: the reference copy of a
        full fine-tune), at the rollout temperature; entropy only while gradients are on (a training statistic)."""
        model = self.policy_model if model is None else model
        lm_head = self.lm_head if model is self.policy_model else causal_lm_of(model).get_output_embeddings()
        inputs = sequence_inputs(query_responses, self.processing_class.pad_token_id)
        with self.accelerator.autocast():
            hidden = backbone_of(model)(**inputs).last_hidden_state[:, context_length - 1 : -1]
            softcap = getattr(causal_lm_of(model).config, "final_logit_softcapping", None)
            return chunked_logprobs(
                hidden,
                responses,
                lm_head,
                self.args.temperature + 1e-7,
                self.args.logprob_chunk_tokens,
                torch.is_grad_enabled(),
                softcap,
            )

    def _values(self, query_responses, context_length):
        """The value model's prediction at each response position: [B, T] float32."""
        value_model = self.value_model
        backbone = getattr(value_model, value_model.base_model_prefix)
        inputs = sequence_inputs(query_responses, self.processing_class.pad_token_id)
        with self.accelerator.autocast(), self._value_adapter():
            hidden = backbone(**inputs).last_hidden_state
            return value_model.score(hidden[:, context_length - 1 : -1]).squeeze(-1).float()

    def _scores(self, query_responses, context_length):
        """The reward model's score of each truncated query+response: [B]."""
        with self.accelerator.autocast():
            return reward_scores(
                self.reward_model, query_responses, self.processing_class.pad_token_id, context_length
            ).float()

    def _value_adapter(self):
        return active_adapter(self.policy_model, "value") if self.shares_base else nullcontext()

    @contextmanager
    def _reference(self):
        """The reference policy: with LoRA the policy with its adapters disabled (peft's `disable_adapter`, which
        also leaves other adapters frozen on its way out: the trainable flags are put back)."""
        if self.ref_model is not None:
            yield self.ref_model
            return
        with trainable_flags_kept(self.policy_model), self.policy_model.disable_adapter():
            yield self.policy_model

    @contextmanager
    def _generation_mode(self):
        """Gradient checkpointing off while generating (a checkpointed layer in train mode drops its KV cache)."""
        policy = causal_lm_of(self.policy_model)
        checkpointing = getattr(policy, "is_gradient_checkpointing", False)
        if checkpointing:
            policy.gradient_checkpointing_disable()
        try:
            yield
        finally:
            if checkpointing:
                kwargs = self.args.gradient_checkpointing_kwargs or {"use_reentrant": False}
                policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    @torch.no_grad()
    def _generate(self, queries, generation_config):
        """[B, prompt + response] ids: each left-padded prompt in `queries` [B, prompt] and its sampled response,
        generated in chunks of local_rollout_forward_batch_size and right-padded to one length."""
        pad_id, context_length = self.processing_class.pad_token_id, queries.shape[1]
        chunk = self.args.local_rollout_forward_batch_size
        policy = self.policy_model
        sequences = []
        with self._generation_mode(), self.accelerator.autocast(), sampling_with(policy, generation_config):
            for start in range(0, queries.shape[0], chunk):
                query = queries[start : start + chunk]
                attention_mask = query != pad_id
                output = policy.generate(
                    input_ids=torch.masked_fill(query, ~attention_mask, 0),
                    attention_mask=attention_mask,
                    generation_config=generation_config,
                )
                sequences.append(torch.cat((query, output[:, context_length:]), 1))
        width = max(sequence.shape[1] for sequence in sequences)
        padded = [torch.nn.functional.pad(s, (0, width - s.shape[1]), value=pad_id) for s in sequences]
        return torch.cat(padded, 0)

    def _rollout_config(self):
        config = copy.deepcopy(self.rollout_config)
        if self.args.rollout_static_cache:
            config.cache_implementation = "static"
        return config

    # -- one update -----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def rollout(self, queries: torch.Tensor) -> dict[str, torch.Tensor]:
        """Samples a response to each of `queries` ([B, prompt] left-padded ids) and scores it; returns [B, T]
        `responses`, `postprocessed` (truncated at the first stop id), `logprobs`, `ref_logprobs`, `values`, and [B]
        `scores`, plus `query_responses` [B, prompt + T]."""
        with self._timed("generation"):
            query_responses = self._generate(queries, self._rollout_config())
        with self._timed("scoring"):
            return self._score_rollout(queries, query_responses)

    def _score_rollout(self, queries: torch.Tensor, query_responses: torch.Tensor) -> dict[str, torch.Tensor]:
        """`rollout`'s passes over the sampled query+responses: log-probs, reference log-probs, values, scores."""
        pad_id, context_length = self.processing_class.pad_token_id, queries.shape[1]
        chunk = self.args.local_rollout_forward_batch_size
        parts = {key: [] for key in ("logprobs", "ref_logprobs", "values", "scores", "postprocessed")}
        for start in range(0, queries.shape[0], chunk):
            query = queries[start : start + chunk]
            query_response = query_responses[start : start + chunk]
            response = query_response[:, context_length:]
            parts["logprobs"].append(self._logprobs(query_response, response, context_length)[0])
            with self._reference() as reference:
                parts["ref_logprobs"].append(self._logprobs(query_response, response, context_length, reference)[0])
            parts["values"].append(self._values(query_response, context_length))
            postprocessed = response
            if self.stop_token_ids:
                postprocessed = ppo_math.truncate_at_stop(self.stop_token_ids, pad_id, response)
            parts["scores"].append(self._scores(torch.cat((query, postprocessed), 1), context_length))
            parts["postprocessed"].append(postprocessed)
        rollout = {key: torch.cat(value, 0) for key, value in parts.items()}
        rollout["query_responses"] = query_responses
        rollout["responses"] = query_responses[:, context_length:]
        return rollout

    def _queries(self, batch: dict) -> torch.Tensor:
        """A drawn batch's [B, prompt] ids on the device, its rows first shown to a cross-tokenizer reward model (the
        conversations the next scoring calls are for). The reward model is never wrapped: only moved to the device."""
        if isinstance(self.reward_model, CrossTokenizerReward):
            self.reward_model.expect(batch)
        return batch["input_ids"].to(self.accelerator.device)

    def _stops(self, device) -> torch.Tensor:
        """The stop ids as a tensor; without a stop token, the tokenizer's EOS (what TRL's EOS check counts)."""
        return torch.tensor(self.stop_token_ids or [self.processing_class.eos_token_id], device=device)

    @torch.no_grad()
    def advantages(self, rollout: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The rollout plus its KL, per-token rewards, whitened advantages and returns (`ppo_math`, in order)."""
        args, pad_id = self.args, self.processing_class.pad_token_id
        postprocessed = rollout["postprocessed"]
        sequence_lengths, padding_mask, padding_mask_p1 = ppo_math.response_masks(postprocessed, pad_id)
        # An answer that ends with any stop id (Llama 3's <|eot_id|> as well as its EOS) is not penalised.
        stopped = torch.isin(postprocessed, self._stops(postprocessed.device)).any(-1)
        scores = ppo_math.missing_eos_penalty(rollout["scores"], stopped, args.missing_eos_penalty)
        invalid = ppo_math.INVALID_LOGPROB
        logprobs = torch.masked_fill(rollout["logprobs"], padding_mask, invalid)
        ref_logprobs = torch.masked_fill(rollout["ref_logprobs"], padding_mask, invalid)
        values = torch.masked_fill(rollout["values"], padding_mask_p1, 0)
        kl = ppo_math.kl_penalty(logprobs, ref_logprobs, args.kl_estimator)
        rewards, non_score_reward = ppo_math.per_token_rewards(kl, scores, sequence_lengths, args.kl_coef)
        what, mask = "rewards", ~padding_mask_p1
        try:  # TRL would go on with NaN rewards or advantages
            if args.whiten_rewards:
                rewards = ppo_math.masked_whiten(rewards, mask, shift_mean=False)
                rewards = torch.masked_fill(rewards, padding_mask_p1, 0)
            advantages, returns = ppo_math.gae(rewards, values, args.gamma, args.lam)
            what, mask = "advantages", ~padding_mask
            advantages = torch.masked_fill(ppo_math.masked_whiten(advantages, mask), padding_mask, 0)
        except ValueError as error:
            raise UserError(
                f"PPO cannot whiten {what} over {int(mask.sum())} answer token(s) in this process's batch ({error}): "
                "raise per_device_train_batch_size or gradient_accumulation_steps (a pad token equal to EOS also "
                "counts each answer's EOS as padding)"
            ) from error
        return {
            **rollout,
            "scores": scores,
            "logprobs": logprobs,
            "values": values,
            "kl": kl,
            "non_score_reward": non_score_reward,
            "advantages": advantages,
            "returns": returns,
            "padding_mask": padding_mask,
            "padding_mask_p1": padding_mask_p1,
        }

    def _train_micro_batch(self, batch, indices, context_length, stats, at):
        """One micro-batch's clipped policy and value losses, backward, and (at the end of the accumulation) the
        optimizer step. Shared base: one backward per adapter; separate models: one of the combined loss."""
        args, accelerator = self.args, self.accelerator
        query_responses, responses = batch["query_responses"][indices], batch["responses"][indices]
        padding_mask, padding_mask_p1 = batch["padding_mask"][indices], batch["padding_mask_p1"][indices]
        with accelerator.accumulate(self.model):
            new_logprobs, entropy = self._logprobs(query_responses, responses, context_length)
            new_logprobs = torch.masked_fill(new_logprobs, padding_mask, ppo_math.INVALID_LOGPROB)
            pg_loss, pg_stats = ppo_math.policy_loss(
                new_logprobs, batch["logprobs"][indices], batch["advantages"][indices], padding_mask, args.cliprange
            )
            if self.shares_base:
                accelerator.backward(pg_loss)
            values = torch.masked_fill(self._values(query_responses, context_length), padding_mask_p1, 0)
            vf_loss, vf_clipfrac = ppo_math.value_loss(
                values, batch["values"][indices], batch["returns"][indices], padding_mask_p1, args.cliprange_value
            )
            if self.shares_base:
                with self._value_adapter():
                    accelerator.backward(args.vf_coef * vf_loss)
            else:
                accelerator.backward(pg_loss + args.vf_coef * vf_loss)
            if accelerator.sync_gradients and accelerator.num_processes > 1 and not self.is_deepspeed_enabled:
                trainable = [p for p in self.model.parameters() if p.requires_grad]
                average_gradients(trainable, accelerator.num_processes)
            self.optimizer.step()
            self.optimizer.zero_grad()
        with torch.no_grad():
            stats["approxkl"][at] = pg_stats["approxkl"]
            stats["pg_clipfrac"][at] = pg_stats["clipfrac"]
            stats["pg_loss"][at] = pg_loss
            stats["vf_loss"][at] = vf_loss
            stats["vf_clipfrac"][at] = vf_clipfrac
            stats["entropy"][at] = entropy.mean()
            stats["ratio"][at] = pg_stats["ratio"]

    @contextmanager
    def _timed(self, part: str):
        """Adds the block's wall time to `self.seconds[part]` (generation, scoring, update): where an update's time
        goes, printed when training ends (`time_line`)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[part] = self.seconds.get(part, 0.0) + time.perf_counter() - start

    def time_line(self, updates: int) -> str:
        """`ppo: time per update (N updates of B rollouts): generation ..., scoring ..., update ...` (this process)."""
        parts = ", ".join(
            f"{part} {seconds / updates:.1f} s ({seconds / max(sum(self.seconds.values()), 1e-9):.0%})"
            for part, seconds in self.seconds.items()
        )
        what = f"{updates} updates of {self.args.local_batch_size} rollouts"
        what += " per process" if self.accelerator.num_processes > 1 else ""
        return f"ppo: time per update ({what}): {parts}"

    def update(self, batch, context_length: int, stats) -> None:
        """num_ppo_epochs passes over the rollout batch in shuffled mini-batches of micro-batches."""
        with self._timed("update"):
            self._update(batch, context_length, stats)

    def _update(self, batch, context_length: int, stats) -> None:
        args = self.args
        for epoch in range(args.num_ppo_epochs):
            order = np.random.permutation(args.local_batch_size)
            for mini_batch, mini_start in enumerate(range(0, args.local_batch_size, args.local_mini_batch_size)):
                mini_indices = order[mini_start : mini_start + args.local_mini_batch_size]
                micro_starts = range(0, args.local_mini_batch_size, args.per_device_train_batch_size)
                for micro, micro_start in enumerate(micro_starts):
                    indices = mini_indices[micro_start : micro_start + args.per_device_train_batch_size]
                    self._train_micro_batch(batch, indices, context_length, stats, (epoch, mini_batch, micro))

    def _metrics(self, batch, stats, start_time) -> dict:
        """TRL's metric names and definitions, averaged over processes (the EOS count summed)."""
        gather = self.accelerator.gather_for_metrics
        rollout = ppo_math.rollout_metrics(
            batch["kl"], batch["logprobs"], batch["padding_mask"], batch["non_score_reward"], batch["scores"]
        )
        metrics = {"eps": int(self.state.episode / max(time.time() - start_time, 1e-9))}
        metrics.update({name: gather(value).mean().item() for name, value in rollout.items()})
        metrics.update({name: gather(stats[key]).mean().item() for key, name in ppo_math.UPDATE_METRICS.items()})
        ratios = gather(stats["ratio"])  # one value per micro-batch: a single one has no variance
        metrics["val/ratio_var"] = ratios.var().item() if ratios.numel() > 1 else float("nan")
        responses = batch["responses"]
        eos = ppo_math.count_stops(responses, self._stops(responses.device), bool(self.stop_token_ids))
        metrics["val/num_eos_tokens"] = int(self.accelerator.reduce(eos, reduction="sum").item())
        metrics["lr"] = self.lr_scheduler.get_last_lr()[0]
        metrics["episode"] = self.state.episode
        return metrics

    # -- the loop -------------------------------------------------------------------------------------------------

    def train(self, resume_from_checkpoint: str | None = None):
        """Runs PPO to `num_total_batches` updates, from the start or from a complete checkpoint directory."""
        args, device = self.args, self.accelerator.device
        total_updates, start_update = args.num_total_batches, 0
        if resume_from_checkpoint is not None:
            start_update = self._load_checkpoint(Path(resume_from_checkpoint))
            self._load_rng(Path(resume_from_checkpoint))
        else:
            self.state.global_step, self.state.episode, self.state.tokens_generated = 0, 0, 0
        per_pass = len(self.dataloader)  # updates per pass over the prompts (whole batches only)

        def batches():
            """Pass after pass over the prompts from where update `start_update` left off, each pass in its own seeded
            order (nothing is drawn to skip the batches done before a resume)."""
            epoch, done = divmod(start_update, per_pass)
            while True:
                if done == 0:  # what a torch DataLoader draws at a pass start: the rollouts draw TRL 1.12's numbers
                    torch.empty(PASS_START_DRAWS, dtype=torch.int64).random_()
                self.dataloader.set_epoch(epoch)
                yield from self.accelerator.skip_first_batches(self.dataloader, done) if done else self.dataloader
                epoch, done = epoch + 1, 0

        drawn = iter(batches())
        start_time = time.time()
        self.seconds = {}
        shape = (args.num_ppo_epochs, args.num_mini_batches, args.gradient_accumulation_steps)
        stats = {name: torch.zeros(shape, device=device) for name in ppo_math.UPDATE_METRICS}
        self.model.train()
        self.state.max_steps = total_updates
        self.state.num_train_epochs = args.total_episodes / self.train_dataset_len
        absolute_step_intervals(self.state, args, total_updates)
        self.control = self.callback_handler.on_train_begin(args, self.state, self.control)
        with sampling_with(self.policy_model, self.rollout_config):
            for update in range(start_update + 1, total_updates + 1):
                self.state.episode += args.batch_size
                queries = self._queries(next(drawn))
                rollout = self.rollout(queries)
                if update == start_update + 1:  # the reward model's scale against PPO's fixed penalties, once
                    warning = ppo_math.score_spread_warning(rollout["scores"], args.missing_eos_penalty)
                    if warning:
                        self.accelerator.print(f"ppo: warning: {warning}")
                rollout = self.advantages(rollout)
                answer_tokens = (~rollout["padding_mask"]).sum()
                self.state.tokens_generated += int(self.accelerator.reduce(answer_tokens, reduction="sum").item())
                self.update(rollout, queries.shape[1], stats)
                with torch.no_grad():
                    metrics = self._metrics(rollout, stats, start_time)
                self.state.epoch = self.state.episode / self.train_dataset_len
                self.state.global_step += 1
                self.log(metrics)
                self.lr_scheduler.step()
                self.control = self.callback_handler.on_step_end(args, self.state, self.control)
                if update % per_pass == 0:  # a pass over the prompts ends: `save_strategy: epoch` saves here
                    self.control = self.callback_handler.on_epoch_end(args, self.state, self.control)
                if self.control.should_save:
                    self._save_checkpoint(self.model, trial=None)
                    self.control = self.callback_handler.on_save(args, self.state, self.control)
                del rollout
                if args.num_sample_generations > 0 and (update - 1) % self.sample_generations_freq == 0:
                    self.generate_completions()
        self._check_replicas_agree()
        if total_updates > start_update:
            self.accelerator.print(self.time_line(total_updates - start_update))
        self.control = self.callback_handler.on_train_end(args, self.state, self.control)
        if self.control.should_save:
            self._save_checkpoint(self.model, trial=None)
            self.control = self.callback_handler.on_save(args, self.state, self.control)

    @torch.no_grad()
    def _check_replicas_agree(self) -> None:
        """Several processes without DeepSpeed: every process must end with the same trained weights (each steps its
        own optimizer on the averaged gradients). Raises RuntimeError if they drifted apart."""
        processes = self.accelerator.num_processes
        if processes == 1 or self.is_deepspeed_enabled:
            return
        total = sum(p.detach().double().sum() for p in self._trainable_parameters().values())
        totals = self.accelerator.gather(total.reshape(1).to(self.accelerator.device))
        if not torch.allclose(totals, totals[0], rtol=1e-9, atol=0):
            raise RuntimeError(f"PPO's {processes} processes ended with different weights: {totals.tolist()}")
        self.accelerator.print(f"ppo: the {processes} processes hold the same trained weights")

    @torch.no_grad()
    def generate_completions(self) -> None:
        """Prints a table of eval prompts, the policy's near-greedy answers (temperature 0.01) and their scores."""
        if self.eval_dataloader is None or len(self.eval_dataloader) == 0:  # no eval prompts
            return
        pad_id = self.processing_class.pad_token_id
        config = sampling_config(0.01 + 1e-7, self.args.response_length, self.stop_token_ids, pad_id)
        queries = self._queries(next(iter(self.eval_dataloader)))
        context_length = queries.shape[1]
        responses = self._generate(queries, config)[:, context_length:]
        if self.stop_token_ids:
            responses = ppo_math.truncate_at_stop(self.stop_token_ids, pad_id, responses)
        scores = self._scores(torch.cat((queries, responses), 1), context_length)
        if not self.accelerator.is_main_process:
            return
        from rich.console import Console
        from rich.table import Table

        table = Table("prompt", "answer", "score", title=f"ppo: eval samples at step {self.state.global_step}")
        prompts = self.processing_class.batch_decode(queries, skip_special_tokens=True)
        answers = self.processing_class.batch_decode(responses, skip_special_tokens=True)
        for prompt, answer, score in list(zip(prompts, answers, scores.tolist(), strict=True))[:5]:
            table.add_row(prompt, answer, f"{score:.3f}")
        Console().print(table)
