"""The mathematics of PPO for language models, as plain functions on tensors: no model, no trainer.

Read top to bottom, this is one PPO update's arithmetic after the rollout (`rlhf_trl.ppo_trainer` calls it):

1. `truncate_at_stop`: everything after a response's first stop token becomes padding.
2. `response_masks`: which response positions are past the answer (`padding_mask`) and past the token after it
   (`padding_mask_p1`, where the value model still predicts).
3. `kl_penalty`: the per-token KL estimate between policy and reference (k1 or k3).
4. `missing_eos_penalty`: answers that never stop lose a fixed amount of score.
5. `per_token_rewards`: -kl_coef x KL at every token, plus the reward model's score at the end of the answer.
6. `gae`: advantages and returns by generalized advantage estimation, then `masked_whiten` on the advantages.
7. `policy_loss` and `value_loss`: the clipped surrogate objective and the clipped value regression.

Shapes: B = rollouts in the batch, T = response tokens (the rollout's `response_length`, or shorter when every
response stopped early). Log-probabilities and KL are in nats. The definitions, masks and constants are those of
TRL 1.12's PPOTrainer (trl/experimental/ppo/ppo_trainer.py, the last TRL release with PPO), which in turn follows
the OpenAI lm-human-preferences / summarize-from-feedback code; `make test-reference` checks the trainer built on
these functions against that trainer step for step. Metric names are TRL's too (`objective/kl`, `loss/policy_avg`,
...), so reports and metrics.jsonl files from either read the same.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

# The log-probability written at padded response positions (TRL's INVALID_LOGPROB). It is a placeholder, not a
# probability: the masks keep those positions out of every mean, and policy and reference both carry it, so the
# KL there is exactly 0.
INVALID_LOGPROB = 1.0


def first_true_indices(bools: torch.Tensor, dtype=torch.long) -> torch.Tensor:
    """Index of the first True in each row of a [B, T] bool tensor; T where a row has none. Returns [B]."""
    length = bools.size(-1)
    positions = torch.arange(length, dtype=dtype, device=bools.device)
    return torch.min(length * (~bools).type(dtype) + positions, dim=-1).values


def masked_mean(values: torch.Tensor, mask: torch.Tensor, axis: int | None = None) -> torch.Tensor:
    """Mean of `values` over the positions where `mask` is True (same shape); over all axes, or along `axis`."""
    if axis is not None:
        return (values * mask).sum(axis=axis) / mask.sum(axis=axis)
    return (values * mask).sum() / mask.sum()


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of `values` over the masked positions; with `unbiased`, Bessel's correction n / (n - 1).

    With `unbiased` (the default, and what `masked_whiten` uses), raises ValueError when the mask is empty or holds
    one position; with `unbiased=False` an empty mask gives NaN.
    """
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        count = mask.sum()
        if count == 0:
            raise ValueError("masked_var: the mask selects no position")
        if count == 1:
            raise ValueError("masked_var: one position has no unbiased variance")
        variance = variance * count / (count - 1)
    return variance


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(values - mean) / sqrt(var + 1e-8) with mean and (unbiased) variance over the masked positions only.

    Positions outside the mask are transformed too (the caller zeroes them); `shift_mean=False` adds the mean
    back, scaling without centring, as TRL does for `whiten_rewards`. Same shape as `values`.
    """
    mean, variance = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(variance + 1e-8)
    return whitened if shift_mean else whitened + mean


def truncate_at_stop(stop_ids: Iterable[int], pad_token_id: int, responses: torch.Tensor) -> torch.Tensor:
    """[B, T] response ids with every token after the first of ANY stop id replaced by `pad_token_id`.

    The stop token itself is kept. With one id this is TRL's `truncate_response`; several ids cover models whose
    generation_config stops at more than the tokenizer's EOS (Llama 3's <|eot_id|>, Qwen2.5's <|im_end|>).
    """
    stops = torch.as_tensor(list(stop_ids), device=responses.device)
    first_stop = first_true_indices(torch.isin(responses, stops)).unsqueeze(-1)
    positions = torch.arange(responses.shape[1], device=responses.device).unsqueeze(0)
    return torch.masked_fill(responses, positions > first_stop, pad_token_id)


def response_masks(postprocessed: torch.Tensor, pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sequence_lengths [B], padding_mask [B, T], padding_mask_p1 [B, T]) of truncated responses.

    `sequence_lengths` is the index of each answer's last token before its first pad (-1 for an answer that
    starts with a pad). `padding_mask` is True past it: log-probs, KL and the policy loss ignore those positions.
    `padding_mask_p1` is True one position later: the value model also predicts the value at the token after the
    answer, where the score is paid (`per_token_rewards`). As in TRL, a tokenizer whose pad token is its EOS
    counts the EOS itself as padding.
    """
    sequence_lengths = first_true_indices(postprocessed == pad_token_id) - 1
    positions = torch.arange(postprocessed.shape[1], device=postprocessed.device).unsqueeze(0)
    return (
        sequence_lengths,
        positions > sequence_lengths.unsqueeze(1),
        positions > (sequence_lengths + 1).unsqueeze(1),
    )


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from sampled tokens' log-probs, [B, T] in nats.

    With r = ref_logprobs - logprobs (the log-ratio at the sampled token): k1 = -r, unbiased and of high variance,
    negative on single tokens; k3 = (e^r - 1) - r, unbiased, never negative, of lower variance (J. Schulman,
    "Approximating KL divergence", 2020). Raises ValueError for any other estimator.
    """
    log_ratio = ref_logprobs - logprobs
    if estimator == "k1":
        return -log_ratio
    if estimator == "k3":
        return (log_ratio.exp() - 1) - log_ratio
    raise ValueError(f"kl_estimator must be k1 or k3, not {estimator!r}")


def missing_eos_penalty(scores: torch.Tensor, stopped: torch.Tensor, penalty: float | None) -> torch.Tensor:
    """Scores [B] with `penalty` subtracted where `stopped` [B] is False (the answer holds no stop token).

    A new tensor; `penalty=None` returns the scores as they are. TRL's `missing_eos_penalty`: it pushes the policy
    to finish answers within response_length instead of being cut off.
    """
    if penalty is None:
        return scores
    return torch.where(stopped, scores, scores - penalty)


def per_token_rewards(
    kl: torch.Tensor, scores: torch.Tensor, sequence_lengths: torch.Tensor, kl_coef: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The KL-penalised reward of each response token: (rewards [B, T], non_score_reward [B, T]).

    non_score_reward = -kl_coef x kl at every token; rewards adds the reward model's score [B] once per row, at
    position sequence_length + 1 (the first position past the answer, or the last position when the answer fills
    the response). This is the reward of Ziegler et al. 2019 (eq. 2) and Ouyang et al. 2022 (eq. 2) spread over
    tokens, placed where TRL 1.12 places it.
    """
    non_score_reward = -kl_coef * kl
    rewards = non_score_reward.clone()
    rows = torch.arange(rewards.size(0), device=rewards.device)
    ends = torch.where(sequence_lengths + 1 < rewards.size(1), sequence_lengths + 1, sequence_lengths)
    rewards[rows, ends] += scores
    return rewards, non_score_reward


def gae(rewards: torch.Tensor, values: torch.Tensor, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation over response tokens: (advantages [B, T], returns [B, T]).

    delta_t = r_t + gamma V_{t+1} - V_t (with V_T = 0 past the last token), A_t = delta_t + gamma lam A_{t+1},
    and returns = A + V: Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage
    Estimation", eq. 16. Masked positions must carry values of 0 (the caller fills them).
    """
    length = rewards.shape[1]
    last, reversed_advantages = 0.0, []
    for t in reversed(range(length)):
        next_values = values[:, t + 1] if t < length - 1 else 0.0
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        last = delta + gamma * lam * last
        reversed_advantages.append(last)
    advantages = torch.stack(reversed_advantages[::-1], dim=1)
    return advantages, advantages + values


def policy_loss(
    new_logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    padding_mask: torch.Tensor,
    cliprange: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate loss over response tokens; returns (loss, statistics).

    ratio = exp(new - old) per token; loss = mean over real tokens of max(-A ratio, -A clip(ratio, 1 - eps,
    1 + eps)), the negated L^CLIP of Schulman et al. 2017, "Proximal Policy Optimization Algorithms", eq. 7.
    Statistics (scalars, no gradient): `approxkl` 0.5 E[(new - old)^2] over all positions as TRL logs it,
    `clipfrac` the share of real tokens where the clip binds, `ratio` the mean ratio over all positions.
    """
    log_ratio = new_logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.max(unclipped, clipped), ~padding_mask)
    with torch.no_grad():
        statistics = {
            "approxkl": 0.5 * (log_ratio**2).mean(),
            "clipfrac": masked_mean((clipped > unclipped).float(), ~padding_mask),
            "ratio": ratio.mean(),
        }
    return loss, statistics


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    padding_mask_p1: torch.Tensor,
    cliprange_value: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The clipped value loss; returns (loss, clipfrac).

    loss = 0.5 mean over valued positions of max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2): value clipping
    as in OpenAI baselines' ppo2 (the PPO paper has no value clip) and TRL. clipfrac: the share of positions where
    the clipped error is the larger.
    """
    clipped_values = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)
    unclipped_error, clipped_error = torch.square(values - returns), torch.square(clipped_values - returns)
    loss = 0.5 * masked_mean(torch.max(unclipped_error, clipped_error), ~padding_mask_p1)
    with torch.no_grad():
        clipfrac = masked_mean((clipped_error > unclipped_error).float(), ~padding_mask_p1)
    return loss, clipfrac


# Per-minibatch statistics, as the update collects them, and the metric each one is logged as (TRL's names).
UPDATE_METRICS = {
    "approxkl": "policy/approxkl_avg",
    "pg_clipfrac": "policy/clipfrac_avg",
    "pg_loss": "loss/policy_avg",
    "vf_loss": "loss/value_avg",
    "vf_clipfrac": "val/clipfrac_avg",
    "entropy": "policy/entropy_avg",
    "ratio": "val/ratio",
}


def rollout_metrics(
    kl: torch.Tensor,
    logprobs: torch.Tensor,
    padding_mask: torch.Tensor,
    non_score_reward: torch.Tensor,
    scores: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """One process's rollout metrics, as scalar tensors for the trainer to average over processes (TRL's names).

    `objective/kl`: the summed per-token KL of a response, averaged over responses (nats); `objective/entropy`:
    the summed -log p of the sampled tokens; `objective/non_score_reward`: the summed KL penalty;
    `objective/rlhf_reward`: that plus the score, the return PPO maximises; `objective/scores`: the mean score.
    """
    mean_non_score_reward = non_score_reward.sum(1).mean()
    return {
        "objective/kl": kl.sum(1).mean(),
        "objective/entropy": ((-logprobs) * (~padding_mask).float()).sum(1).mean(),
        "objective/non_score_reward": mean_non_score_reward,
        "objective/rlhf_reward": mean_non_score_reward + scores.mean(),
        "objective/scores": scores.mean(),
    }


def count_stops(responses: torch.Tensor, stop_ids: torch.Tensor, stopped_at_first: bool) -> torch.Tensor:
    """`val/num_eos_tokens`: the stop tokens the policy generated in `responses` [B, T].

    When rollouts stop at a stop id (`stopped_at_first`), each answer holds at most one real stop, its first; every
    later position is padding, and a tokenizer that pads with its EOS fills them with the same id. TRL 1.12 counted
    every such id, padding included (123 for 8 answers of at most 32 tokens, issue 23 R4); this counts the answers
    that stopped. Without a stop (every answer runs the full length, nothing is padding) every stop id is counted.
    """
    hits = torch.isin(responses, stop_ids)
    return hits.any(-1).sum() if stopped_at_first else hits.sum()


def score_spread_warning(scores: torch.Tensor, missing_eos_penalty: float | None, ratio: float = 10.0) -> str | None:
    """A warning when the reward model's scores on the first rollouts (before any penalty) spread less than
    1/`ratio` of PPO's fixed `missing_eos_penalty`: then the penalty, not the reward model's preference, decides
    almost every advantage (issue 23: scores spanned -0.10 to +0.03 against a penalty of 1.0, and PPO did not move).
    None when the spread is comparable, or when there is no penalty."""
    if not missing_eos_penalty or scores.numel() < 2:
        return None
    spread = scores.float().std().item()
    if spread * ratio >= abs(missing_eos_penalty):
        return None
    low, high = scores.min().item(), scores.max().item()
    return (
        f"the reward model's scores on the first rollouts spread only {spread:.3g} (std; {low:.3g} to {high:.3g}), "
        f"under 1/{ratio:g} of missing_eos_penalty {missing_eos_penalty:g}: the penalty, not the reward model, will "
        "drive PPO. Lower missing_eos_penalty to the scores' scale, or train the reward model longer (its margins grow)"
    )


def precision_warning(weight_dtype: torch.dtype, mixed_precision: str | None, lora: bool) -> str | None:
    """A warning when PPO's log-probs come from half-precision arithmetic: weights in bfloat16/float16, or bf16/fp16
    autocast. A bfloat16 log-prob carries ~3 significant digits, so the small per-token differences PPO lives on (the
    policy/old ratio, the KL to the reference) are mostly rounding: issue 23 measured a per-token gap of 0.097 nats
    between adapter on and off in bfloat16 against 0.014 in float32 for the same answers. Worst with LoRA, whose
    early updates move log-probs by less than that rounding."""
    half = {torch.bfloat16: "bfloat16", torch.float16: "float16"}
    reasons = []
    if weight_dtype in half:
        reasons.append(f"the policy's weights are {half[weight_dtype]}")
    if mixed_precision in ("bf16", "fp16"):
        reasons.append(f"{mixed_precision} autocast is on")
    if not reasons:
        return None
    size = "a LoRA policy's early updates" if lora else "small policy updates"
    return (
        f"{' and '.join(reasons)}: PPO's log-probs, ratios and KL carry ~0.1-nat rounding per token, more than "
        f"{size} move them, so the logged KL and clipping are mostly rounding. Where memory allows, use dtype: "
        "float32 and bf16: false (a CPU gains nothing from bfloat16 anyway)"
    )
