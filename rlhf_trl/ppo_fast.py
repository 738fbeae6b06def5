"""The fast PPO engine (`ppo_engine: fast`, the recipes' default): TRL's PPO algorithm, with less memory.

    accelerate launch -m rlhf_trl.ppo --config recipes/demo/ppo.yaml                    # fast engine
    accelerate launch -m rlhf_trl.ppo --config recipes/demo/ppo.yaml --ppo_engine trl   # TRL's own loop

TRL's PPOTrainer (the reference, kept as `ppo_engine: trl`) holds four models and full-vocabulary float32 logits:
every generation step's scores (batch x response x vocab) for the rollout log-probs, and the whole logits tensor
of each training forward, its softmax and their gradients. `FastPPOTrainer` runs the same update (the same
rollouts, rewards, KL penalty, GAE, clipped policy and value losses, metrics and checkpoints; one test checks the
metrics against TRL's step by step) and changes where the memory goes:

- **One base for policy, reference, value and reward** (`shared_base: true`, with LoRA). The policy is the base
  plus the PPO adapter; the reference is the same base with adapters disabled; the value model is the base with
  its own adapter ("value") and a one-output head; and when the reward model is a LoRA adapter trained on the
  same SFT model (what `make reward` writes), it is loaded as a third, frozen adapter ("reward") with its head,
  and the value adapter starts as a copy of it (the reward model already knows what a good answer looks like).
  A 4-bit base is then stored once, not three times.
- **Log-probabilities in chunks** (`logprob_chunk_tokens`): the last hidden states go through the output layer a
  few thousand tokens at a time, in float32, and each chunk is recomputed in the backward pass instead of being
  kept, so no full-vocabulary logits tensor exists at any time. Rollouts do not ask `generate` for its scores;
  their log-probs come from one forward pass, the same computation the training step uses.
- **Lean rollouts**: generation stops when every sequence has met a stop token (any of `stop_token_ids`), and with
  `rollout_static_cache: true` it uses a static KV cache (which transformers compiles on a GPU).

Two backward passes per micro-batch, one per adapter, because a checkpointed layer recomputes its forward during
backward with whatever adapter is active then: the policy loss under "default", the value loss under "value".
Their parameters are disjoint, so the gradients equal those of TRL's single combined loss. This engine runs in one
process (the users' one GPU); several processes use `ppo_engine: trl`.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import time
from contextlib import contextmanager, nullcontext

import numpy as np
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import GenerationConfig

from .cli import UserError
from .generation import sampling_with
from .ppo_engine import (
    INVALID_LOGPROB,
    PPOTrainer,
    absolute_step_intervals,
    first_true_indices,
    get_reward,
    masked_mean,
    masked_whiten,
    pad,
    unwrap_model_for_generation,
)

# Models whose logits are more than the output layer applied to the last hidden state (Gemma-2's and Gemma-3's
# final_logit_softcapping is applied by `chunked_logprobs`; these others are not).
_LOGIT_POSTPROCESSING = ("logit_scale", "logits_scaling", "output_multiplier_scale")


@contextmanager
def trainable_flags_kept(model):
    """Puts every parameter's requires_grad back on exit, and whenever the block calls the function it yields:
    peft's adapter switches (`set_adapter`, and `disable_adapter` on its way out) freeze every adapter but the
    active one."""
    flags = [(p, p.requires_grad) for p in model.parameters()]

    def restore():
        for parameter, flag in flags:
            parameter.requires_grad_(flag)

    try:
        yield restore
    finally:
        restore()


@contextmanager
def active_adapter(peft_model, name: str):
    """Runs the block with adapter `name` active. peft's `set_adapter` also freezes every other adapter; the
    trainable flags are put back, since the optimizer trains the policy and value adapters together."""
    previous = peft_model.active_adapter
    if previous == name:
        yield
        return
    with trainable_flags_kept(peft_model) as restore_flags:
        peft_model.set_adapter(name)
        restore_flags()
        try:
            yield
        finally:
            peft_model.set_adapter(previous)


class AdapterView(nn.Module):
    """The policy's transformer body seen through one adapter: what TRL's `get_reward` calls as a backbone."""

    def __init__(self, peft_model, adapter: str):
        super().__init__()
        self.peft_model = peft_model
        self.adapter = adapter

    def forward(self, **kwargs):
        with active_adapter(self.peft_model, self.adapter):
            return backbone_of(self.peft_model)(**kwargs)


class HeadOnSharedBase(nn.Module):
    """A value or reward model that is an adapter on the policy's base plus a one-output head.

    It has TRL's reward-model shape (`base_model_prefix` naming the backbone, and `.score`), so TRL's `get_reward`,
    `PolicyAndValueWrapper` and sample tables take it as they take a separate model."""

    base_model_prefix = "backbone"

    def __init__(self, peft_model, adapter: str, score: nn.Linear):
        super().__init__()
        self.backbone = AdapterView(peft_model, adapter)
        self.score = score


def causal_lm_of(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def backbone_of(model):
    lm = causal_lm_of(model)
    return getattr(lm, lm.base_model_prefix)


def sequence_inputs(query_responses: torch.Tensor, pad_token_id: int) -> dict:
    """The inputs TRL's `forward` builds: pads masked to id 0, positions counted over real tokens only."""
    attention_mask = query_responses != pad_token_id
    return {
        "input_ids": torch.masked_fill(query_responses, ~attention_mask, 0),
        "attention_mask": attention_mask,
        "position_ids": attention_mask.cumsum(1) - attention_mask.long(),
        "use_cache": False,
    }


def _chunk_logprobs(hidden, targets, lm_head, temperature, with_entropy, softcap=None):
    logits = lm_head(hidden).float()  # the module itself: a LoRA on the output layer applies too
    if softcap:  # Gemma-2's final_logit_softcapping, as its forward applies it before any temperature
        logits = torch.tanh(logits / softcap) * softcap
    logits = logits / temperature
    logsumexp = torch.logsumexp(logits, dim=-1)
    logprobs = torch.gather(logits, -1, targets.unsqueeze(-1)).squeeze(-1) - logsumexp
    if not with_entropy:
        return logprobs, torch.zeros_like(logprobs)
    with torch.no_grad():  # TRL reports entropy as a statistic only
        entropy = logsumexp - (torch.softmax(logits, dim=-1) * logits).sum(-1)
    return logprobs, entropy


def chunked_logprobs(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    lm_head: nn.Module,
    temperature: float,
    chunk_tokens: int,
    with_entropy: bool = True,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(target) and the entropy at each position (zeros without `with_entropy`), from hidden states
    [batch, length, hidden].

    At most `chunk_tokens` positions go through the output layer at once, in float32; with gradients each chunk
    is checkpointed, so its logits are recomputed in backward rather than kept (batch x length x vocab x 4 bytes
    would be 1.2 GB for a 0.5B Qwen at 16 x 128 tokens, before softmax and gradients). `softcap` is the model's
    `final_logit_softcapping` (Gemma-2: logits = softcap * tanh(logits / softcap), transformers'
    Gemma2ForCausalLM.forward), applied before the temperature as generation sees it."""
    batch, length, width = hidden.shape
    flat_hidden, flat_targets = hidden.reshape(-1, width), targets.reshape(-1)
    rows_logprobs, rows_entropy = [], []
    for start in range(0, flat_hidden.shape[0], chunk_tokens):
        piece = (flat_hidden[start : start + chunk_tokens], flat_targets[start : start + chunk_tokens])
        if torch.is_grad_enabled() and hidden.requires_grad:
            logprobs, entropy = checkpoint(
                _chunk_logprobs, *piece, lm_head, temperature, with_entropy, softcap, use_reentrant=False
            )
        else:
            logprobs, entropy = _chunk_logprobs(*piece, lm_head, temperature, with_entropy, softcap)
        rows_logprobs.append(logprobs)
        rows_entropy.append(entropy)
    return torch.cat(rows_logprobs).view(batch, length), torch.cat(rows_entropy).view(batch, length)


def truncate_at_stop(stop_ids, pad_token_id: int, responses: torch.Tensor) -> torch.Tensor:
    """TRL's `truncate_response` for several stop ids: everything after the first of ANY stop id becomes
    `pad_token_id`. responses: [batch, length] token ids; returns the same shape. With one id it is TRL's."""
    stops = torch.as_tensor(list(stop_ids), device=responses.device)
    first_stop = first_true_indices(torch.isin(responses, stops)).unsqueeze(-1)
    positions = torch.arange(responses.shape[1], device=responses.device).unsqueeze(0)
    return torch.masked_fill(responses, positions > first_stop, pad_token_id)


def check_fast_engine(config) -> None:
    """Refuses models whose logits the chunked log-probs would get wrong."""
    for key in _LOGIT_POSTPROCESSING:
        if getattr(config, key, None) not in (None, 1, 1.0):
            raise UserError(
                f"the fast PPO engine computes logits as the output layer alone, but this model's config sets {key}: "
                "set ppo_engine: trl in the PPO recipe"
            )


class ScoreHead(nn.Linear):
    """A one-output float32 head that takes hidden states of any dtype (bf16 and 4-bit bases give bf16)."""

    def __init__(self, hidden_size: int, device):
        super().__init__(hidden_size, 1, bias=False, device=device, dtype=torch.float32)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return super().forward(hidden.to(self.weight.dtype))


def new_score_head(hidden_size: int, initializer_range: float, device) -> ScoreHead:
    head = ScoreHead(hidden_size, device)
    nn.init.normal_(head.weight, std=initializer_range)
    return head


def attach_reward_adapter(peft_model, reward_path: str) -> nn.Linear:
    """Loads the reward model's LoRA (trained on the policy's base) as frozen adapter "reward"; returns its head."""
    from peft import PeftConfig, load_peft_weights, set_peft_model_state_dict

    config = PeftConfig.from_pretrained(reward_path)
    if getattr(config, "bias", "none") != "none":
        raise UserError(
            f"reward adapter {reward_path} trains biases (bias: {config.bias}), which would change the shared base "
            "under the policy too: set shared_base: false in the PPO recipe"
        )
    config.task_type, config.modules_to_save, config.inference_mode = "CAUSAL_LM", None, False
    weights = load_peft_weights(reward_path)
    head_keys = [key for key in weights if key.rsplit(".", 2)[-2] == "score"]
    if len(head_keys) != 1:
        raise UserError(
            f"reward adapter {reward_path} has {len(head_keys)} score-head tensors, not 1: retrain it with "
            "`make reward ARGS=--overwrite`, or set shared_base: false in the PPO recipe"
        )
    head_weight = weights.pop(head_keys[0])
    # Anything but LoRA matrices (saved embeddings, token deltas) would be loaded into the shared base itself,
    # under the policy and the reference too.
    foreign = [key for key in weights if "lora_" not in key]
    if foreign:
        raise UserError(
            f"reward adapter {reward_path} holds more than LoRA matrices (e.g. {foreign[0]}), which would change the "
            "policy's base too: set shared_base: false in the PPO recipe"
        )
    peft_model.add_adapter("reward", config)
    result = set_peft_model_state_dict(peft_model, weights, adapter_name="reward")
    missing = [key for key in result.missing_keys if ".reward." in key or key.endswith(".reward")]
    if result.unexpected_keys:  # saved embeddings, token deltas, a LoRA on the head: nothing may be dropped silently
        raise UserError(
            f"reward adapter {reward_path} holds tensors a LoRA on the policy's base cannot take (e.g. "
            f"{result.unexpected_keys[0]}): set shared_base: false in the PPO recipe"
        )
    if missing:
        raise UserError(
            f"reward adapter {reward_path} does not fit the policy's base ({len(missing)} LoRA tensors missing, "
            f"e.g. {missing[0]}): set shared_base: false in the PPO recipe"
        )
    head = ScoreHead(head_weight.shape[1], next(peft_model.parameters()).device)
    with torch.no_grad():
        head.weight.copy_(head_weight.reshape(head.weight.shape))
    return head


def is_adapter_weight(name: str, adapter: str) -> bool:
    """Whether a parameter of the PeftModel belongs to `adapter` (not a base module that happens to be so named)."""
    return f".{adapter}." in name and any(kind in name for kind in ("lora_", "modules_to_save", "trainable_tokens"))


def share_base(model, peft_config, reward_adapter: str | None):
    """The policy as a PeftModel whose base also serves the value model and, given its LoRA, the reward model.

    Returns (policy, value model, reward model or None). Trainable: the policy adapter ("default"), the value
    adapter and the value head; the reward adapter and head are frozen.
    """
    from peft import get_peft_model

    policy = get_peft_model(model, peft_config)
    hidden = policy.config.hidden_size
    reward_model = None
    if reward_adapter is None:
        # The value model needs no copies of modules_to_save (an lm_head copy would train and checkpoint for nothing).
        policy.add_adapter("value", dataclasses.replace(peft_config, modules_to_save=None))
        value_head = new_score_head(hidden, getattr(policy.config, "initializer_range", 0.02), policy.device)
    else:
        reward_head = attach_reward_adapter(policy, reward_adapter).requires_grad_(False)
        reward_model = HeadOnSharedBase(policy, "reward", reward_head)
        policy.add_adapter("value", policy.peft_config["reward"])
        value_head = ScoreHead(hidden, reward_head.weight.device)
        with torch.no_grad():  # the value model starts as the reward model
            value_head.weight.copy_(reward_head.weight)
            parameters = dict(policy.named_parameters())
            for name, parameter in parameters.items():
                if is_adapter_weight(name, "reward"):
                    parameters[name.replace(".reward.", ".value.")].copy_(parameter)
    for name, parameter in policy.named_parameters():
        parameter.requires_grad_(is_adapter_weight(name, "default") or is_adapter_weight(name, "value"))
    return policy, HeadOnSharedBase(policy, "value", value_head), reward_model


class FastPPOTrainer(PPOTrainer):
    """TRL's PPO update with a shared base, chunked log-probs and lean rollouts (see the module docstring)."""

    checks_every_stop_id = True  # truncation, missing_eos_penalty and val/num_eos_tokens count every stop id

    def __init__(self, *, model, value_model, reward_model, peft_config=None, reward_adapter=None, **kwargs):
        check_fast_engine(model.config)
        self.shares_base = value_model is None
        if self.shares_base:
            if peft_config is None:
                raise UserError("shared_base: true needs LoRA (use_peft: true): set one or shared_base: false")
            model, value_model, shared_reward = share_base(model, peft_config, reward_adapter)
            reward_model = shared_reward or reward_model
            peft_config = None  # TRL's trainer takes the PeftModel as it is
        super().__init__(
            model=model, value_model=value_model, reward_model=reward_model, peft_config=peft_config, **kwargs
        )
        if self.accelerator.num_processes > 1 or self.is_deepspeed_enabled or self.is_fsdp_enabled:
            # Two backward passes per micro-batch: DDP cannot sync them, and DeepSpeed would step the optimizer twice.
            raise UserError(
                "the fast PPO engine runs in one plain process (no DDP, DeepSpeed or FSDP): set ppo_engine: trl in "
                "the PPO recipe"
            )
        self.lm_head = causal_lm_of(self.policy_model).get_output_embeddings()
        self.chunk_tokens = self.args.logprob_chunk_tokens

    @contextmanager
    def null_ref_context(self):
        # Without this the first reference pass would leave the value adapter frozen for the rest of the run.
        with trainable_flags_kept(self.policy_model), super().null_ref_context():
            yield

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        if not self.shares_base:
            return super().save_model(output_dir, _internal_call)
        # The published policy is the base plus the PPO adapter; value and reward adapters served training only.
        self.policy_model.save_pretrained(output_dir or self.args.output_dir, selected_adapters=["default"])

    # -- the passes -------------------------------------------------------------------------------------------------

    # Under accelerate's autocast, as TRL's prepared model runs its training forwards (bf16 mixed precision).

    def _logprobs(self, query_responses, responses, context_length, model=None):
        """The policy's (or `model`'s: the reference copy of a full fine-tune) log-probs of `responses`."""
        model = self.policy_model if model is None else model
        lm_head = self.lm_head if model is self.policy_model else causal_lm_of(model).get_output_embeddings()
        inputs = sequence_inputs(query_responses, self.processing_class.pad_token_id)
        with self.accelerator.autocast():
            hidden = backbone_of(model)(**inputs).last_hidden_state[:, context_length - 1 : -1]
            temperature = self.args.temperature + 1e-7
            # Entropy is a training statistic (as in TRL): the rollout passes skip its extra vocabulary-wide buffer.
            softcap = getattr(causal_lm_of(model).config, "final_logit_softcapping", None)
            return chunked_logprobs(
                hidden, responses, lm_head, temperature, self.chunk_tokens, torch.is_grad_enabled(), softcap
            )

    def _values(self, query_responses, context_length):
        value_model = self.value_model
        backbone = getattr(value_model, value_model.base_model_prefix)
        inputs = sequence_inputs(query_responses, self.processing_class.pad_token_id)
        with self.accelerator.autocast():
            hidden = backbone(**inputs).last_hidden_state
            return value_model.score(hidden[:, context_length - 1 : -1]).squeeze(-1).float()

    def _scores(self, query_responses, context_length):
        """The reward model's score at each sequence's last token, as TRL's `get_reward` takes it; on the shared
        base from the last hidden state alone (TRL's call keeps every layer's)."""
        pad_id = self.processing_class.pad_token_id
        if not isinstance(self.reward_model, HeadOnSharedBase):
            return get_reward(self.reward_model, query_responses, pad_id, context_length)[1]
        with self.accelerator.autocast():
            hidden = self.reward_model.backbone(**sequence_inputs(query_responses, pad_id)).last_hidden_state
        last = first_true_indices(query_responses[:, context_length:] == pad_id) - 1 + context_length
        return self.reward_model.score(hidden[torch.arange(hidden.shape[0], device=hidden.device), last]).squeeze(-1)

    def _value_adapter(self):
        return active_adapter(self.policy_model, "value") if self.shares_base else nullcontext()

    def _generation_config(self) -> GenerationConfig:
        """`rollout_config` (plain sampling at the temperature, every stop id; see `ppo_engine.PPOTrainer`), with a
        static KV cache when asked for."""
        config = copy.deepcopy(self.rollout_config)
        if self.args.rollout_static_cache:
            config.cache_implementation = "static"
        return config

    @torch.no_grad()
    def _generate(self, queries):
        """query + response ids for each query, sampled in chunks of local_rollout_forward_batch_size."""
        args, pad_id = self.args, self.processing_class.pad_token_id
        context_length, chunk = queries.shape[1], args.local_rollout_forward_batch_size
        generation_config = self._generation_config()
        with (
            unwrap_model_for_generation(
                self.model, self.accelerator, gather_deepspeed3_params=args.ds3_gather_for_generation
            ) as unwrapped,
            self.accelerator.autocast(),  # generate meets no float32/bf16 mismatch
            # The policy's generation_config.json cannot add its own settings (repetition_penalty, top_p, ...).
            sampling_with(unwrapped.policy, generation_config),
        ):
            sequences = []
            for start in range(0, queries.shape[0], chunk):
                query = queries[start : start + chunk]
                attention_mask = query != pad_id
                output = unwrapped.policy.generate(
                    input_ids=torch.masked_fill(query, ~attention_mask, 0),
                    attention_mask=attention_mask,
                    generation_config=generation_config,
                )
                sequences.append(torch.cat((query, output[:, context_length:]), 1))
        query_responses = pad(sequences, padding_value=pad_id, padding_side="right")
        return query_responses.view(-1, query_responses.shape[-1])[: queries.shape[0]]

    @torch.no_grad()
    def _rollout(self, queries):
        """Samples responses and returns everything the update needs, computed in rollout-sized chunks."""
        args, pad_id = self.args, self.processing_class.pad_token_id
        context_length, chunk = queries.shape[1], args.local_rollout_forward_batch_size
        query_responses = self._generate(queries)
        parts = {key: [] for key in ("logprobs", "ref_logprobs", "values", "scores", "postprocessed")}
        for start in range(0, queries.shape[0], chunk):
            query = queries[start : start + chunk]
            query_response = query_responses[start : start + chunk]
            response = query_response[:, context_length:]
            parts["logprobs"].append(self._logprobs(query_response, response, context_length)[0])
            if self.ref_model is None:  # LoRA: the policy with its adapters disabled
                with self.null_ref_context():
                    parts["ref_logprobs"].append(self._logprobs(query_response, response, context_length)[0])
            else:  # a full fine-tune: TRL's frozen copy of the starting policy
                ref_logprobs = self._logprobs(query_response, response, context_length, model=self.ref_model)[0]
                parts["ref_logprobs"].append(ref_logprobs)
            with self._value_adapter():
                parts["values"].append(self._values(query_response, context_length))
            postprocessed = response
            if self.stop_token_ids:
                postprocessed = truncate_at_stop(self.stop_token_ids, pad_id, response)
            score = self._scores(torch.cat((query, postprocessed), 1), context_length)
            parts["scores"].append(score)
            parts["postprocessed"].append(postprocessed)
        rollout = {key: torch.cat(value, 0) for key, value in parts.items()}
        rollout["query_responses"] = query_responses
        rollout["responses"] = query_responses[:, context_length:]
        return rollout

    def _stops(self, eos_id, device) -> torch.Tensor:
        """The stop ids as a tensor; without a stop token, the tokenizer's EOS (what TRL's EOS check counts)."""
        return torch.tensor(self.stop_token_ids or [eos_id], device=device)

    def _advantages(self, rollout):
        """TRL's reward shaping (EOS penalty, per-token KL penalty, score at the last token) and whitened GAE."""
        args = self.args
        responses, scores = rollout["responses"], rollout["scores"]
        pad_id, eos_id = self.processing_class.pad_token_id, self.processing_class.eos_token_id
        sequence_lengths = first_true_indices(rollout["postprocessed"] == pad_id) - 1
        # An answer that ends with any stop id (Llama 3's <|eot_id|> as well as its EOS) is not penalised.
        contain_eos = torch.isin(rollout["postprocessed"], self._stops(eos_id, responses.device)).any(-1)
        if args.missing_eos_penalty is not None:
            scores[~contain_eos] -= args.missing_eos_penalty
        positions = torch.arange(responses.shape[1], device=responses.device).repeat(responses.shape[0], 1)
        padding_mask = positions > sequence_lengths.unsqueeze(1)
        padding_mask_p1 = positions > (sequence_lengths + 1).unsqueeze(1)
        logprobs = torch.masked_fill(rollout["logprobs"], padding_mask, INVALID_LOGPROB)
        ref_logprobs = torch.masked_fill(rollout["ref_logprobs"], padding_mask, INVALID_LOGPROB)
        values = torch.masked_fill(rollout["values"], padding_mask_p1, 0)
        logr = ref_logprobs - logprobs
        kl = -logr if args.kl_estimator == "k1" else (logr.exp() - 1) - logr
        non_score_reward = -args.kl_coef * kl
        rewards = non_score_reward.clone()
        rows = torch.arange(rewards.size(0), device=rewards.device)
        ends = torch.where(sequence_lengths + 1 < rewards.size(1), sequence_lengths + 1, sequence_lengths)
        rewards[rows, ends] += scores
        if args.whiten_rewards:
            rewards = torch.masked_fill(masked_whiten(rewards, ~padding_mask_p1, shift_mean=False), padding_mask_p1, 0)
        last_advantage, reversed_advantages = 0, []
        length = responses.shape[1]
        for t in reversed(range(length)):
            next_values = values[:, t + 1] if t < length - 1 else 0.0
            delta = rewards[:, t] + args.gamma * next_values - values[:, t]
            last_advantage = delta + args.gamma * args.lam * last_advantage
            reversed_advantages.append(last_advantage)
        advantages = torch.stack(reversed_advantages[::-1], axis=1)
        returns = advantages + values
        advantages = torch.masked_fill(masked_whiten(advantages, ~padding_mask), padding_mask, 0)
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
        """One micro-batch of TRL's clipped PPO loss; the policy and value halves each run their own backward."""
        args, accelerator = self.args, self.accelerator
        query_responses, responses = batch["query_responses"][indices], batch["responses"][indices]
        padding_mask, padding_mask_p1 = batch["padding_mask"][indices], batch["padding_mask_p1"][indices]
        advantages, old_logprobs = batch["advantages"][indices], batch["logprobs"][indices]
        with accelerator.accumulate(self.model):
            new_logprobs, entropy = self._logprobs(query_responses, responses, context_length)
            new_logprobs = torch.masked_fill(new_logprobs, padding_mask, INVALID_LOGPROB)
            logprobs_diff = new_logprobs - old_logprobs
            ratio = torch.exp(logprobs_diff)
            pg_losses = -advantages * ratio
            pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - args.cliprange, 1.0 + args.cliprange)
            pg_loss = masked_mean(torch.max(pg_losses, pg_losses2), ~padding_mask)
            accelerator.backward(pg_loss)
            with self._value_adapter():
                old_values, returns = batch["values"][indices], batch["returns"][indices]
                vpred = torch.masked_fill(self._values(query_responses, context_length), padding_mask_p1, 0)
                vpred_clipped = torch.clamp(vpred, old_values - args.cliprange_value, old_values + args.cliprange_value)
                vf_losses1, vf_losses2 = torch.square(vpred - returns), torch.square(vpred_clipped - returns)
                vf_loss = 0.5 * masked_mean(torch.max(vf_losses1, vf_losses2), ~padding_mask_p1)
                accelerator.backward(args.vf_coef * vf_loss)
            self.optimizer.step()
            self.optimizer.zero_grad()
        with torch.no_grad():
            stats["approxkl"][at] = 0.5 * (logprobs_diff**2).mean()
            stats["pg_clipfrac"][at] = masked_mean((pg_losses2 > pg_losses).float(), ~padding_mask)
            stats["pg_loss"][at] = pg_loss
            stats["vf_loss"][at] = vf_loss
            stats["vf_clipfrac"][at] = masked_mean((vf_losses2 > vf_losses1).float(), ~padding_mask_p1)
            stats["entropy"][at] = entropy.mean()
            stats["ratio"][at] = ratio.mean()

    def _metrics(self, batch, stats, start_time) -> dict:
        """TRL's metric names and definitions, so logs, reports and the TRL comparison read the same."""
        gather = self.accelerator.gather_for_metrics
        kl, scores, padding_mask = batch["kl"], batch["scores"], batch["padding_mask"]
        mean_non_score_reward = batch["non_score_reward"].sum(1).mean()
        metrics = {
            "eps": int(self.state.episode / (time.time() - start_time)),
            "objective/kl": gather(kl.sum(1).mean()).mean().item(),
            "objective/entropy": gather(((-batch["logprobs"]) * (~padding_mask).float()).sum(1).mean()).mean().item(),
            "objective/non_score_reward": gather(mean_non_score_reward).mean().item(),
            "objective/rlhf_reward": gather(mean_non_score_reward + scores.mean()).mean().item(),
            "objective/scores": gather(scores.mean()).mean().item(),
        }
        names = {
            "policy/approxkl_avg": "approxkl",
            "policy/clipfrac_avg": "pg_clipfrac",
            "loss/policy_avg": "pg_loss",
            "loss/value_avg": "vf_loss",
            "val/clipfrac_avg": "vf_clipfrac",
            "policy/entropy_avg": "entropy",
            "val/ratio": "ratio",
        }
        metrics.update({name: gather(stats[key]).mean().item() for name, key in names.items()})
        metrics["val/ratio_var"] = gather(stats["ratio"]).var().item()
        stops = self._stops(self.processing_class.eos_token_id, batch["responses"].device)
        metrics["val/num_eos_tokens"] = torch.isin(batch["responses"], stops).sum().item()
        metrics["lr"] = self.lr_scheduler.get_last_lr()[0]
        metrics["episode"] = self.state.episode
        return metrics

    def _training_loop(self):
        """TRL 1.12's `PPOTrainer.train`, step for step, with the passes above."""
        args = self.args
        device = self.accelerator.device
        dataloader = self.dataloader

        def repeat_generator():
            while True:
                yield from dataloader

        batches = iter(repeat_generator())
        start_time = time.time()
        shape = (args.num_ppo_epochs, args.num_mini_batches, args.gradient_accumulation_steps)
        names = ("approxkl", "pg_clipfrac", "pg_loss", "vf_loss", "vf_clipfrac", "entropy", "ratio")
        stats = {name: torch.zeros(shape, device=device) for name in names}
        self.model.train()
        self.state.global_step, self.state.episode = 0, 0  # TRL's train() set-up
        self.state.max_steps = args.num_total_batches
        self.state.num_train_epochs = args.total_episodes / self.train_dataset_len
        absolute_step_intervals(self.state, args, args.num_total_batches)
        self.control = self.callback_handler.on_train_begin(args, self.state, self.control)
        for update in range(1, args.num_total_batches + 1):
            self.state.episode += args.batch_size
            queries = next(batches)["input_ids"].to(device)
            context_length = queries.shape[1]
            batch = self._advantages(self._rollout(queries))
            for epoch in range(args.num_ppo_epochs):
                order = np.random.permutation(args.local_batch_size)
                for mini_batch, mini_start in enumerate(range(0, args.local_batch_size, args.local_mini_batch_size)):
                    mini_indices = order[mini_start : mini_start + args.local_mini_batch_size]
                    for micro, micro_start in enumerate(
                        range(0, args.local_mini_batch_size, args.per_device_train_batch_size)
                    ):
                        indices = mini_indices[micro_start : micro_start + args.per_device_train_batch_size]
                        self._train_micro_batch(batch, indices, context_length, stats, (epoch, mini_batch, micro))
            with torch.no_grad():
                metrics = self._metrics(batch, stats, start_time)
                self.state.epoch = self.state.episode / self.train_dataset_len
                self.state.global_step += 1
                self.log(metrics)
            self.lr_scheduler.step()
            self.control = self.callback_handler.on_step_end(args, self.state, self.control)
            if self.control.should_save:
                self._save_checkpoint(self.model, trial=None)
                self.control = self.callback_handler.on_save(args, self.state, self.control)
            del batch
            gc.collect()
            if args.num_sample_generations > 0 and (update - 1) % self.sample_generations_freq == 0:
                self.generate_completions(sampling=True)
        self.control = self.callback_handler.on_train_end(args, self.state, self.control)
        if self.control.should_save:
            self._save_checkpoint(self.model, trial=None)
            self.control = self.callback_handler.on_save(args, self.state, self.control)
