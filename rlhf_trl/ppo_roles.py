"""The four roles of PPO (policy, reference, value model, reward model) and the passes through them.

`rlhf_trl.ppo_trainer` builds its roles here, one way for each case:

- **Shared base** (`shared_base: true`, with LoRA; the recipes' choice). The policy is the SFT base plus the PPO
  adapter ("default"); the reference is the same base with adapters disabled; the value model is the base with its
  own adapter ("value") and a one-output head; and when the reward model is a LoRA adapter trained on the same SFT
  model (what `make reward` writes), it is loaded as a third, frozen adapter ("reward") with its head, and the
  value adapter starts as a copy of it (the reward model already knows what a good answer looks like). A 4-bit
  base is then stored once, not three times. `share_base` builds it.
- **Separate models**: the policy (with or without a LoRA), a frozen copy of it as the reference for a full
  fine-tune (`reference_model`), and value and reward models of their own, each with a `.score` head on a
  backbone named by `base_model_prefix` (transformers' `AutoModelForSequenceClassification` shape). A reward
  model with its own tokenizer is a `rewards.CrossTokenizerReward`, which scores decoded text (`reward_scores`).

The passes: `chunked_logprobs` takes log-probabilities through the output layer a few thousand tokens at a time,
in float32, each chunk recomputed in backward rather than kept, so no [B, T, vocabulary] logits tensor exists at
any time (1.2 GB for a 0.5B Qwen at 16 x 128 tokens, before softmax and gradients). Inputs are built as TRL 1.12's
PPO built them (`sequence_inputs`): pads masked to id 0, positions counted over real tokens.
"""

from __future__ import annotations

import copy
import dataclasses
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .errors import UserError
from .ppo_math import first_true_indices
from .rewards import CrossTokenizerReward

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
    """The policy's transformer body seen through one adapter: the backbone of a value or reward model on it."""

    def __init__(self, peft_model, adapter: str):
        super().__init__()
        self.peft_model = peft_model
        self.adapter = adapter

    def forward(self, **kwargs):
        with active_adapter(self.peft_model, self.adapter):
            return backbone_of(self.peft_model)(**kwargs)


class HeadOnSharedBase(nn.Module):
    """A value or reward model that is an adapter on the policy's base plus a one-output head.

    It has a reward model's shape (`base_model_prefix` naming the backbone, and `.score`), so `reward_scores` and
    the value pass take it as they take a separate model."""

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
    """Model inputs for [B, L] query+response ids, as TRL 1.12's PPO built them: pads masked to id 0, positions
    counted over real tokens only (so left-padded prompts start at position 0), no KV cache."""
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


def check_logits(config) -> None:
    """Refuses models whose logits the chunked log-probs would get wrong (UserError naming the config key)."""
    for key in _LOGIT_POSTPROCESSING:
        if getattr(config, key, None) not in (None, 1, 1.0):
            raise UserError(
                f"PPO computes logits as the output layer alone (plus Gemma's softcapping), but this model's config "
                f"sets {key}, which it would leave out: this architecture is not supported by make ppo"
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


def reward_scores(reward_model, query_responses: torch.Tensor, pad_token_id: int, context_length: int) -> torch.Tensor:
    """The reward (or value) model's score of each [B, L] query+response at its last real token: [B] floats.

    The last real token is the one before the response's first pad (TRL 1.12's `get_reward`: the score head on
    the final hidden state there). A `rewards.CrossTokenizerReward` scores the decoded answers in its own tokenizer.
    """
    if isinstance(reward_model, CrossTokenizerReward):
        return reward_model.get_reward(query_responses, pad_token_id, context_length)[1]
    backbone = getattr(reward_model, reward_model.base_model_prefix)
    hidden = backbone(**sequence_inputs(query_responses, pad_token_id)).last_hidden_state
    last = first_true_indices(query_responses[:, context_length:] == pad_token_id) - 1 + context_length
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return reward_model.score(hidden[rows, last]).squeeze(-1)


def reference_model(policy):
    """A frozen copy of the starting policy, in eval mode: the reference of a full fine-tune (with LoRA the
    reference is the policy with its adapters disabled, and no copy is made)."""
    reference = copy.deepcopy(policy)
    for parameter in reference.parameters():
        parameter.requires_grad_(False)
    return reference.eval()


def disable_dropout(model: nn.Module) -> None:
    """Sets every dropout's probability to 0: PPO's log-probs of the same tokens must agree between the rollout and
    the update, or the ratio is noise (TRL does the same)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0


class PolicyAndValue(nn.Module):
    """The trained roles in one module, for the optimizer, checkpoints and accelerate: `.policy` and `.value_model`.

    With a shared base the value model's adapter and head live inside the policy's PeftModel; `parameters()` names
    each tensor once either way.
    """

    def __init__(self, policy, value_model):
        super().__init__()
        self.policy = policy
        self.value_model = value_model
        self.config = policy.config
