"""rlhf_trl.ppo_math against values worked out by hand on tiny tensors.

Every expected number below was computed on paper (the arithmetic is in the comment beside it), never with the
function under test or a copy of its formula. The definitions are TRL 1.12's PPOTrainer's
(trl/experimental/ppo/ppo_trainer.py), which the engine must equal.
"""

import ast
import math
from pathlib import Path

import pytest
import torch

from rlhf_trl import ppo_math

ROOT = Path(__file__).resolve().parents[1]


def t(rows, dtype=torch.float64):
    return torch.tensor(rows, dtype=dtype)


def close(actual, expected, atol=1e-9):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), atol=atol, rtol=0)


# -- indices, truncation and masks ---------------------------------------------------------------------------------


def test_first_true_indices_gives_the_row_length_where_a_row_has_no_true():
    bools = torch.tensor([[False, True, True], [False, False, False], [True, False, False]])
    # row 0: first True at index 1; row 1: none -> T = 3; row 2: index 0
    assert ppo_math.first_true_indices(bools).tolist() == [1, 3, 0]


def test_truncate_at_stop_pads_everything_after_the_first_of_any_stop_id():
    stop_ids, pad = [2, 3], 0
    responses = torch.tensor(
        [
            [5, 3, 6, 2, 7],  # 3 (second stop id) comes first, at index 1: keep [5, 3], pad the rest
            [5, 6, 2, 3, 7],  # 2 comes first, at index 2: keep [5, 6, 2]; the later 3 is padded too
            [5, 6, 7, 8, 9],  # no stop id: unchanged
            [2, 5, 6, 7, 8],  # a stop id first: only it is kept
        ]
    )
    truncated = ppo_math.truncate_at_stop(stop_ids, pad, responses)
    assert truncated.tolist() == [
        [5, 3, 0, 0, 0],
        [5, 6, 2, 0, 0],
        [5, 6, 7, 8, 9],
        [2, 0, 0, 0, 0],
    ]
    assert responses[0].tolist() == [5, 3, 6, 2, 7]  # the input is not modified
    # with the first stop id alone, row 0 runs to its 2 at index 3 (the 3 is then an ordinary token)
    assert ppo_math.truncate_at_stop([2], pad, responses)[0].tolist() == [5, 3, 6, 2, 0]


def test_response_masks_with_a_stop_mid_way_a_row_that_never_stops_and_an_empty_answer():
    pad, eos = 0, 2
    postprocessed = torch.tensor(
        [
            [5, 6, eos, pad, pad],  # first pad at index 3 -> sequence_length 3 - 1 = 2 (the EOS is the last token)
            [5, 6, 7, 8, 9],  # no pad: first_true_indices gives T = 5 -> sequence_length 5 - 1 = 4
            [pad, pad, pad, pad, pad],  # pad at index 0 -> sequence_length 0 - 1 = -1
        ]
    )
    lengths, padding_mask, padding_mask_p1 = ppo_math.response_masks(postprocessed, pad)
    assert lengths.tolist() == [2, 4, -1]
    F, T = False, True
    # padding_mask: position > sequence_length
    assert padding_mask.tolist() == [[F, F, F, T, T], [F, F, F, F, F], [T, T, T, T, T]]
    # padding_mask_p1: position > sequence_length + 1 (one more position where the value model predicts)
    assert padding_mask_p1.tolist() == [[F, F, F, F, T], [F, F, F, F, F], [F, T, T, T, T]]


def test_response_masks_count_the_eos_as_padding_when_pad_is_eos():
    pad = eos = 2
    postprocessed = torch.tensor([[5, 6, eos, pad, pad]])
    lengths, padding_mask, padding_mask_p1 = ppo_math.response_masks(postprocessed, pad)
    # the first "pad" is the EOS at index 2 -> sequence_length 2 - 1 = 1: the EOS itself is masked, as in TRL
    assert lengths.tolist() == [1]
    assert padding_mask.tolist() == [[False, False, True, True, True]]  # position > 1
    assert padding_mask_p1.tolist() == [[False, False, False, True, True]]  # position > 2


# -- masked statistics -----------------------------------------------------------------------------------------------

# Masked positions: 1, 3, 5, 7 (the 99s are outside the mask).
# mean = (1 + 3 + 5 + 7) / 4 = 16 / 4 = 4
# deviations -3, -1, 1, 3; squares 9, 1, 1, 9; sum 20
# biased variance 20 / 4 = 5; unbiased 20 / (4 - 1) = 6.666666666666667
# 1 / sqrt(20 / 3) = sqrt(3 / 20) = sqrt(0.15) = 0.3872983346207417
WHITEN_VALUES = [[1.0, 3.0, 99.0], [5.0, 7.0, 99.0]]
WHITEN_MASK = [[True, True, False], [True, True, False]]


def test_masked_mean_and_var_use_the_masked_positions_only():
    values, mask = t(WHITEN_VALUES), torch.tensor(WHITEN_MASK)
    close(ppo_math.masked_mean(values, mask), 4.0)  # 16 / 4; with the 99s it would be 214 / 6 = 35.67
    close(ppo_math.masked_mean(values, mask, axis=1), [2.0, 6.0])  # (1 + 3) / 2, (5 + 7) / 2
    close(ppo_math.masked_var(values, mask), 20.0 / 3.0)  # 6.666..., unbiased
    close(ppo_math.masked_var(values, mask, unbiased=False), 5.0)  # 20 / 4


def test_masked_whiten_uses_the_masked_mean_and_unbiased_variance():
    values, mask = t(WHITEN_VALUES), torch.tensor(WHITEN_MASK)
    # s = 1 / sqrt(20/3) = 0.3872983346207417; the 1e-8 added to the variance scales s by 1 - 7.5e-10
    # (1e-8 / (2 * 20/3)): at most 3e-8 on these numbers, inside the tolerance
    whitened = ppo_math.masked_whiten(values, mask)
    # (value - 4) * s: -3s, -1s, (99 - 4)s = 95s; 1s, 3s, 95s
    close(
        whitened,
        [
            [-1.1618950038622251, -0.3872983346207417, 36.79334178897046],
            [0.3872983346207417, 1.1618950038622251, 36.79334178897046],
        ],
        atol=1e-7,
    )
    # over the masked positions: mean 0 and unbiased variance 1 ((9 + 1 + 1 + 9) * s^2 / 3 = 20 * 0.15 / 3 = 1)
    inside = whitened[mask]
    assert abs(inside.mean().item()) < 1e-9
    assert inside.var(unbiased=True).item() == pytest.approx(1.0, abs=1e-7)


def test_masked_whiten_without_shifting_the_mean_adds_the_mean_back():
    values, mask = t(WHITEN_VALUES), torch.tensor(WHITEN_MASK)
    whitened = ppo_math.masked_whiten(values, mask, shift_mean=False)
    # (value - 4) * s + 4: 4 - 1.1618950039 = 2.8381049961, 4 - 0.3872983346 = 3.6127016654, 4 + 36.7933417890
    close(
        whitened,
        [
            [2.838104996137775, 3.612701665379258, 40.79334178897046],
            [4.387298334620742, 5.161895003862225, 40.79334178897046],
        ],
        atol=1e-7,
    )


def test_masked_var_refuses_an_empty_mask_and_a_single_position():
    values = t([[1.0, 2.0, 3.0]])
    with pytest.raises(ValueError, match="no position"):
        ppo_math.masked_var(values, torch.tensor([[False, False, False]]))
    with pytest.raises(ValueError, match="one position"):
        ppo_math.masked_var(values, torch.tensor([[False, True, False]]))


# -- KL, rewards, EOS penalty ----------------------------------------------------------------------------------------


def test_kl_penalty_k1_and_k3():
    logprobs = t([[-1.0, -2.0, -0.5]])
    ref_logprobs = t([[-2.0, -1.0, -0.5]])
    # r = ref - logprob = [-1, 1, 0]
    # k1 = -r = [1, -1, 0] (negative on a single token is allowed)
    close(ppo_math.kl_penalty(logprobs, ref_logprobs, "k1"), [[1.0, -1.0, 0.0]])
    close(ppo_math.kl_penalty(logprobs, ref_logprobs), [[1.0, -1.0, 0.0]])  # k1 is the default
    # k3 = (e^r - 1) - r: r = -1 -> e^-1 - 1 + 1 = e^-1 = 0.36787944117144233
    #                     r = 1  -> e - 1 - 1 = 2.718281828459045 - 2 = 0.7182818284590451
    #                     r = 0  -> 1 - 1 - 0 = 0
    close(ppo_math.kl_penalty(logprobs, ref_logprobs, "k3"), [[0.36787944117144233, 0.7182818284590451, 0.0]])


def test_k3_is_never_negative():
    generator = torch.Generator().manual_seed(0)
    logprobs = -torch.rand(64, 16, generator=generator, dtype=torch.float64) * 5
    ref_logprobs = -torch.rand(64, 16, generator=generator, dtype=torch.float64) * 5
    assert (ppo_math.kl_penalty(logprobs, ref_logprobs, "k1") < 0).any()  # k1 is negative on some tokens
    assert (ppo_math.kl_penalty(logprobs, ref_logprobs, "k3") >= 0).all()


def test_an_unknown_kl_estimator_is_an_error():
    with pytest.raises(ValueError, match="k1 or k3.*'k2'"):
        ppo_math.kl_penalty(t([[0.0]]), t([[0.0]]), "k2")


def test_missing_eos_penalty_lowers_only_the_answers_that_never_stopped():
    scores = t([1.0, 2.0, 3.0])
    stopped = torch.tensor([True, False, True])
    penalised = ppo_math.missing_eos_penalty(scores, stopped, 1.5)
    close(penalised, [1.0, 0.5, 3.0])  # 2.0 - 1.5 = 0.5; the stopped rows keep theirs
    close(scores, [1.0, 2.0, 3.0])  # a new tensor: the input is unchanged
    close(ppo_math.missing_eos_penalty(scores, stopped, None), [1.0, 2.0, 3.0])  # None: no penalty
    close(ppo_math.missing_eos_penalty(scores, torch.tensor([False] * 3), 0.0), [1.0, 2.0, 3.0])  # 0: no change


def test_per_token_rewards_pay_the_score_after_the_answer_or_at_the_last_position():
    kl_coef = 0.5
    kl = t(
        [
            [0.2, 0.4, 0.0, 0.0],  # answer = positions 0..1 (sequence_length 1): score at 1 + 1 = 2
            [0.2, -0.2, 0.6, 1.0],  # answer fills the response (sequence_length 3): 3 + 1 = 4 is past T, so 3
            [0.4, 0.4, 0.4, 0.0],  # sequence_length 2: score at 2 + 1 = 3, the last position
        ]
    )
    scores = t([3.0, -1.0, 2.0])
    lengths = torch.tensor([1, 3, 2])
    rewards, non_score_reward = ppo_math.per_token_rewards(kl, scores, lengths, kl_coef)
    # non_score_reward = -0.5 * kl at every position
    expected_non_score = [
        [-0.1, -0.2, 0.0, 0.0],  # -0.5*0.2, -0.5*0.4, 0, 0
        [-0.1, 0.1, -0.3, -0.5],  # -0.5*0.2, -0.5*(-0.2), -0.5*0.6, -0.5*1.0
        [-0.2, -0.2, -0.2, 0.0],  # -0.5*0.4 three times, 0
    ]
    close(non_score_reward, expected_non_score)
    close(
        rewards,
        [
            [-0.1, -0.2, 3.0, 0.0],  # 0 + 3.0 at position 2
            [-0.1, 0.1, -0.3, -1.5],  # -0.5 + (-1.0) at position 3
            [-0.2, -0.2, -0.2, 2.0],  # 0 + 2.0 at position 3
        ],
    )
    close(kl[0], [0.2, 0.4, 0.0, 0.0])  # the input is unchanged


# -- GAE ---------------------------------------------------------------------------------------------------------------


def test_gae_over_a_three_token_answer():
    gamma, lam = 0.9, 0.5  # gamma * lam = 0.45
    rewards = t([[0.0, 1.0, 3.0], [0.0, 0.0, 1.0]])
    values = t([[1.0, 2.0, 0.5], [0.0, 0.0, 0.0]])
    advantages, returns = ppo_math.gae(rewards, values, gamma, lam)
    # row 0, backwards (V past the last token is 0):
    #   delta_2 = 3.0 + 0.9 * 0   - 0.5 = 2.5              A_2 = 2.5
    #   delta_1 = 1.0 + 0.9 * 0.5 - 2.0 = -0.55            A_1 = -0.55 + 0.45 * 2.5   = 0.575
    #   delta_0 = 0.0 + 0.9 * 2.0 - 1.0 = 0.8              A_0 = 0.8   + 0.45 * 0.575 = 1.05875
    #   returns = A + V = [1.05875 + 1.0, 0.575 + 2.0, 2.5 + 0.5] = [2.05875, 2.575, 3.0]
    # row 1 (values 0): delta = rewards; A_2 = 1, A_1 = 0.45 * 1 = 0.45, A_0 = 0.45 * 0.45 = 0.2025; returns = A
    close(advantages, [[1.05875, 0.575, 2.5], [0.2025, 0.45, 1.0]])
    close(returns, [[2.05875, 2.575, 3.0], [0.2025, 0.45, 1.0]])


# -- losses ------------------------------------------------------------------------------------------------------------


def test_policy_loss_clips_on_both_sides_and_ignores_masked_positions():
    cliprange = 0.2  # ratios are clipped to [0.8, 1.2]
    old_logprobs = t([[-1.0, -1.0, -1.0, -1.0]])
    ratios = [1.5, 0.5, 1.1, 3.0]
    new_logprobs = (old_logprobs + t([[math.log(r) for r in ratios]])).requires_grad_()
    advantages = t([[1.0, -2.0, 2.0, 100.0]])
    padding_mask = torch.tensor([[False, False, False, True]])  # the last position is past the answer
    loss, stats = ppo_math.policy_loss(new_logprobs, old_logprobs, advantages, padding_mask, cliprange)
    # token 0: A = 1,  ratio 1.5 > 1.2: unclipped -1 * 1.5 = -1.5, clipped -1 * 1.2 = -1.2; max = -1.2 (clip binds)
    # token 1: A = -2, ratio 0.5 < 0.8: unclipped  2 * 0.5 =  1.0, clipped  2 * 0.8 =  1.6; max =  1.6 (clip binds)
    # token 2: A = 2,  ratio 1.1 inside: unclipped = clipped = -2 * 1.1 = -2.2; max = -2.2 (no clip)
    # token 3: masked (its -100 * 1.2 = -120 would dominate)
    # loss = (-1.2 + 1.6 - 2.2) / 3 = -1.8 / 3 = -0.6; clipfrac = 2 / 3
    close(loss, -0.6)
    close(stats["clipfrac"], 2.0 / 3.0)
    # ratio: mean over ALL positions, as TRL logs it: (1.5 + 0.5 + 1.1 + 3.0) / 4 = 6.1 / 4 = 1.525
    close(stats["ratio"], 1.525)
    # the clip stops the gradient on tokens 0 and 1; token 2: d/dnew of -A * e^(new - old) / 3 = -2 * 1.1 / 3
    loss.backward()
    close(new_logprobs.grad, [[0.0, 0.0, -2.2 / 3.0, 0.0]])


def test_policy_loss_approxkl_is_half_the_mean_squared_log_ratio_over_all_positions():
    old_logprobs = t([[-1.0, -1.0], [-1.0, -1.0]])
    new_logprobs = old_logprobs + t([[0.2, -0.4], [0.0, 0.6]])
    advantages = t([[1.0, 1.0], [1.0, 1.0]])
    padding_mask = torch.tensor([[False, False], [False, True]])
    _, stats = ppo_math.policy_loss(new_logprobs, old_logprobs, advantages, padding_mask, 0.2)
    # 0.5 * (0.04 + 0.16 + 0 + 0.36) / 4 = 0.5 * 0.56 / 4 = 0.07 (the masked 0.6 counts, as in TRL)
    close(stats["approxkl"], 0.07)


def test_value_loss_clips_predictions_outside_the_old_value_range():
    cliprange_value = 0.2
    old_values = t([[1.0, 1.0, 0.0, 0.0]])
    values = t([[1.5, 1.5, 0.1, 10.0]]).requires_grad_()
    returns = t([[2.0, 1.0, 0.5, -10.0]])
    padding_mask_p1 = torch.tensor([[False, False, False, True]])
    loss, clipfrac = ppo_math.value_loss(values, old_values, returns, padding_mask_p1, cliprange_value)
    # pos 0: V 1.5 outside 1.0 +- 0.2 -> 1.2; (1.5 - 2)^2 = 0.25, (1.2 - 2)^2 = 0.64; max 0.64 (clipped larger)
    # pos 1: V 1.5 -> 1.2;                    (1.5 - 1)^2 = 0.25, (1.2 - 1)^2 = 0.04; max 0.25 (clipped smaller)
    # pos 2: V 0.1 inside 0.0 +- 0.2;         (0.1 - 0.5)^2 = 0.16 both;             max 0.16
    # pos 3: masked ((10 + 10)^2 = 400 would dominate)
    # loss = 0.5 * (0.64 + 0.25 + 0.16) / 3 = 0.5 * 1.05 / 3 = 0.175; clipfrac = 1 / 3 (position 0 only)
    close(loss, 0.175)
    close(clipfrac, 1.0 / 3.0)
    # gradient: pos 0 goes through the clipped value (flat in V): 0; pos 1: 0.5 * 2 * (1.5 - 1) / 3 = 1/6;
    # pos 2: 0.5 * 2 * (0.1 - 0.5) / 3 = -0.4 / 3
    loss.backward()
    close(values.grad, [[0.0, 1.0 / 6.0, -0.4 / 3.0, 0.0]])


# -- metrics -----------------------------------------------------------------------------------------------------------


def test_rollout_metrics_by_hand():
    kl = t([[0.1, 0.3], [0.2, 0.0]])
    logprobs = t([[-1.0, -2.0], [-0.5, ppo_math.INVALID_LOGPROB]])
    padding_mask = torch.tensor([[False, False], [False, True]])
    non_score_reward = t([[-0.05, -0.15], [-0.1, 0.0]])
    scores = t([1.0, 2.0])
    metrics = ppo_math.rollout_metrics(kl, logprobs, padding_mask, non_score_reward, scores)
    assert set(metrics) == {
        "objective/kl",
        "objective/entropy",
        "objective/non_score_reward",
        "objective/rlhf_reward",
        "objective/scores",
    }
    close(metrics["objective/kl"], 0.3)  # row sums 0.4, 0.2 -> mean 0.3
    close(metrics["objective/entropy"], 1.75)  # row sums 1 + 2 = 3, 0.5 (INVALID_LOGPROB masked) -> mean 1.75
    close(metrics["objective/non_score_reward"], -0.15)  # row sums -0.2, -0.1 -> mean -0.15
    close(metrics["objective/scores"], 1.5)  # (1 + 2) / 2
    close(metrics["objective/rlhf_reward"], 1.35)  # -0.15 + 1.5


def test_update_metric_names_are_trls():
    assert set(ppo_math.UPDATE_METRICS.values()) == {
        "policy/approxkl_avg",
        "policy/clipfrac_avg",
        "loss/policy_avg",
        "loss/value_avg",
        "val/clipfrac_avg",
        "policy/entropy_avg",
        "val/ratio",
    }


# -- no trl.experimental in the product ----------------------------------------------------------------------------


def _is_trl_experimental(module: str) -> bool:
    return module == "trl.experimental" or module.startswith("trl.experimental.")


def trl_experimental_imports(source: str) -> list[int]:
    """Line numbers where `source` imports trl.experimental: `import trl.experimental...`, `from trl.experimental...
    import`, `from trl import experimental`, importlib.import_module / __import__ of it, or `trl.experimental` used
    as an attribute. Names in strings and docstrings are not imports."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found = any(_is_trl_experimental(alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            found = node.level == 0 and (
                _is_trl_experimental(module)
                or (module == "trl" and any(alias.name == "experimental" for alias in node.names))
            )
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            function = getattr(node.func, "attr", getattr(node.func, "id", ""))
            target = node.args[0].value
            found = function in {"import_module", "__import__"} and isinstance(target, str)
            found = found and _is_trl_experimental(target)
        elif isinstance(node, ast.Attribute):
            found = node.attr == "experimental" and isinstance(node.value, ast.Name) and node.value.id == "trl"
        else:
            found = False
        if found:
            lines.append(node.lineno)
    return sorted(lines)


@pytest.mark.parametrize(
    "source",
    [
        "import trl.experimental",
        "import trl.experimental.ppo as ppo",
        "import os, trl.experimental.utils",
        "from trl.experimental import ppo",
        "from trl.experimental.ppo.ppo_trainer import PPOTrainer",
        "from trl import experimental",
        "from trl import SFTTrainer, experimental as x",
        "def f():\n    from trl.experimental.utils import get_reward\n",
        "import importlib\nimportlib.import_module('trl.experimental.ppo')",
        "import trl\ntrainer = trl.experimental.ppo.PPOTrainer",
    ],
)
def test_the_checker_finds_each_way_of_importing_trl_experimental(source):
    assert trl_experimental_imports(source)


@pytest.mark.parametrize(
    "source",
    [
        "import trl\nfrom trl import SFTTrainer",
        "from trl.trainer.utils import selective_log_softmax",
        '"""Same contract as trl.experimental.utils.get_reward."""',  # a docstring naming it is not an import
        "import trl_experimental_helpers",
    ],
)
def test_the_checker_passes_sources_that_do_not_import_it(source):
    assert trl_experimental_imports(source) == []


def test_no_module_of_rlhf_trl_imports_trl_experimental():
    sources = sorted((ROOT / "rlhf_trl").rglob("*.py"))
    assert ROOT / "rlhf_trl" / "ppo_math.py" in sources  # the walk found the package
    offenders = {
        str(path.relative_to(ROOT)): lines
        for path in sources
        if (lines := trl_experimental_imports(path.read_text(encoding="utf-8")))
    }
    assert offenders == {}, f"rlhf_trl must not import trl.experimental (TRL 1.13 deleted PPO): {offenders}"


def test_count_stops_counts_real_eos_only_when_pad_is_eos():
    # issue 23 R4: EOS = pad = 2. Answer 1 stops at position 1 and is padded with 2s; answer 2 never stops; answer 3
    # stops at its last position. Real stops: 2 (TRL 1.12's count, every 2 in the tensor, gives 3 + 0 + 1 = 4).
    responses = torch.tensor([[5, 2, 2, 2], [5, 6, 7, 8], [5, 6, 7, 2]])
    stops = torch.tensor([2])
    assert torch.isin(responses, stops).sum() == 4
    assert ppo_math.count_stops(responses, stops, stopped_at_first=True) == 2
    # Without a stop token nothing is padding: every stop id the policy wrote counts.
    assert ppo_math.count_stops(responses, stops, stopped_at_first=False) == 4


def test_score_spread_warning_when_scores_are_far_below_the_penalty():
    # issue 23: scores from -0.10 to +0.03 (std 0.057) against missing_eos_penalty 1.0: under 1/10 of it.
    narrow = torch.tensor([-0.10, -0.05, 0.0, 0.03])
    assert "spread only 0.0572 (std; -0.1 to 0.03)" in ppo_math.score_spread_warning(narrow, 1.0)
    assert ppo_math.score_spread_warning(narrow, 0.5) is None  # 0.057 x 10 >= 0.5
    assert ppo_math.score_spread_warning(narrow * 20, 1.0) is None  # std 1.1: comparable
    assert ppo_math.score_spread_warning(narrow, None) is None


def test_precision_warning_for_half_precision_log_probs():
    assert "bfloat16" in ppo_math.precision_warning(torch.bfloat16, None, lora=True)
    assert "bf16 autocast" in ppo_math.precision_warning(torch.float32, "bf16", lora=False)
    assert ppo_math.precision_warning(torch.float32, "no", lora=True) is None
