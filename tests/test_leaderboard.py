"""The human leaderboard (rlhf_trl/leaderboard.py) on arena votes whose answer is known: Bradley-Terry ratings and
their bootstrap intervals, ties, both-bad votes, the win rate against SFT, position bias and labeler agreement, each
against a value worked out by hand in a comment. No model is loaded."""

import math
import random

import numpy as np
import pytest

from rlhf_trl import labels, leaderboard

ELO = 400 / math.log(10)


def vote(stages, choice, labeler="ann", item=None):
    """An arena vote as `labels.arena_vote` records it: `stages` in the order shown (A, B), `choice` a, b, tie or
    both bad; `item` names the two answers judged (two labelers who saw the same answers share it)."""
    decision, preferred = labels.ARENA_CHOICES[choice]
    record = {"kind": "decision", "source": labels.ARENA, "labeler": labeler, "stages": list(stages),
              "decision": decision, "sample_id": item or f"i{random.random()}"}  # fmt: skip
    if preferred is not None:
        record["preferred"] = preferred
    return record


def chain():
    """PPO beats SFT 8 of 10 and DPO beats PPO 8 of 10 (each pair shown both ways round)."""
    return (
        [vote(["ppo", "sft"], "a")] * 4 + [vote(["sft", "ppo"], "b")] * 4 + [vote(["ppo", "sft"], "b")] * 2
        + [vote(["dpo", "ppo"], "a")] * 8 + [vote(["dpo", "ppo"], "b")] * 2
    )  # fmt: skip


def row(board, stage):
    [found] = [r for r in board["rows"] if r["stage"] == stage]
    return found


def test_bradley_terry_on_a_chain_is_the_closed_form():
    votes = chain()
    stages = leaderboard.stages_of(votes)
    assert stages == ["sft", "ppo", "dpo"]
    wins = leaderboard.win_matrix(votes, stages)
    assert wins.tolist() == [[0, 2, 0], [8, 0, 2], [0, 8, 0]]
    members = leaderboard.groups(wins + wins.T > 0)
    # A chain is a tree: the maximum-likelihood fit makes each pair's model win rate its observed one, p_ppo / (p_ppo +
    # p_sft) = 0.8, so p_ppo / p_sft = 4 and p_dpo / p_ppo = 4: 400 * log10(4) = 240.82 points a step, SFT at 1000.
    mle = leaderboard.ratings(leaderboard.bradley_terry(wins, prior=0), stages, members)
    assert mle == pytest.approx([1000, 1240.824, 1481.648], abs=1e-3)
    # The default adds one virtual tie per pair compared (half a win each way): 8.5 to 2.5, a ratio of 3.4,
    # 400 * log10(3.4) = 212.59 points a step.
    board = leaderboard.leaderboard(votes)
    assert [r["stage"] for r in board["rows"]] == ["dpo", "ppo", "sft"] and [r["rank"] for r in board["rows"]] == [
        1,
        2,
        3,
    ]
    assert [r["rating"] for r in board["rows"]] == pytest.approx([1425.183, 1212.592, 1000], abs=1e-3)
    assert board["anchor"] == "sft" and board["groups"] == [["sft", "ppo", "dpo"]]
    assert [(r["votes"], r["labelers"], r["both_bad"]) for r in board["rows"]] == [(10, 1, 0), (20, 1, 0), (10, 1, 0)]
    # PPO against SFT alone: 8 of 10, Wilson 0.490 to 0.943 (test_ui's hand computation); DPO never met SFT.
    assert row(board, "ppo")["vs_sft"] == pytest.approx(
        {"win_rate": 0.8, "low": 0.4902, "high": 0.9433, "votes": 10}, abs=1e-4
    )
    assert row(board, "dpo")["vs_sft"] is None and row(board, "sft")["vs_sft"] is None


def test_the_fit_meets_the_likelihood_equations_on_a_cycle():
    # Not a tree: no closed form, but at the maximum each stage's expected wins, sum_j N_ij p_i / (p_i + p_j), equal
    # its observed wins (the score equations; Hunter 2004). A cycle of equal records (each beats the next 2 to 1)
    # gives three equal strengths.
    cycle = [vote(["sft", "ppo"], "a")] * 2 + [vote(["sft", "ppo"], "b")] + [vote(["ppo", "dpo"], "a")] * 2
    cycle += [vote(["ppo", "dpo"], "b")] + [vote(["dpo", "sft"], "a")] * 2 + [vote(["dpo", "sft"], "b")]
    stages = leaderboard.stages_of(cycle)
    assert leaderboard.bradley_terry(leaderboard.win_matrix(cycle, stages), prior=0) == pytest.approx(
        [0, 0, 0], abs=1e-9
    )
    uneven = cycle + [vote(["sft", "ppo"], "a")] * 3 + [vote(["dpo", "sft"], "tie")] * 2
    wins = leaderboard.win_matrix(uneven, stages)
    strength = np.exp(leaderboard.bradley_terry(wins, prior=0))
    games = wins + wins.T
    expected = (games * strength[:, None] / (strength[:, None] + strength[None, :])).sum(1)
    assert expected == pytest.approx(wins.sum(1), abs=1e-8)
    assert strength[0] == max(strength)  # SFT won most


def test_no_maximum_without_a_loss_says_so_and_the_prior_keeps_it_finite():
    sweep = [vote(["ppo", "sft"], "a")] * 3  # PPO won every vote: the likelihood grows without bound
    stages = leaderboard.stages_of(sweep)
    wins = leaderboard.win_matrix(sweep, stages)
    with pytest.raises(ValueError, match="no maximum-likelihood rating"):
        leaderboard.bradley_terry(wins, prior=0)
    # With the virtual tie: 3.5 to 0.5, 400 * log10(7) = 338.04 points.
    board = leaderboard.leaderboard(sweep)
    assert row(board, "ppo")["rating"] == pytest.approx(1338.039, abs=1e-3)
    # Every resample of 3 unanimous votes is the same 3 votes: the bootstrap's interval would be "1338 to 1338", as
    # certain as can be on 3 votes. It is not shown; the win rate's Wilson interval (0.44-1.00) is.
    assert row(board, "ppo")["one_way"] and row(board, "ppo")["low"] is None
    line = next(line for line in leaderboard.table(board) if "| PPO |" in line)
    assert "none: every vote went one way" in line and "1338 to 1338" not in line and "0.44-1.00" in line


def test_a_tie_is_half_a_win_and_both_bad_is_counted_apart():
    # 6 wins, 2 losses, 2 ties for PPO: 7 to 3, a ratio of 7/3 (without the prior): 400 * log10(7/3) = 147.19.
    votes = [vote(["ppo", "sft"], "a")] * 6 + [vote(["sft", "ppo"], "a")] * 2 + [vote(["sft", "ppo"], "tie")] * 2
    stages = leaderboard.stages_of(votes)
    fitted = leaderboard.bradley_terry(leaderboard.win_matrix(votes, stages), prior=0)
    assert ELO * (fitted[1] - fitted[0]) == pytest.approx(147.191, abs=1e-3)
    before = leaderboard.leaderboard(votes)
    # Five "both bad" votes on the same pair change no rating, interval or win rate; they are counted apart.
    after = leaderboard.leaderboard(votes + [vote(["ppo", "sft"], "both bad")] * 5)
    for stage in ("ppo", "sft"):
        old, new = row(before, stage), row(after, stage)
        assert (new["rating"], new["low"], new["high"]) == pytest.approx((old["rating"], old["low"], old["high"]))
        assert (old["votes"], new["votes"], old["both_bad"], new["both_bad"]) == (10, 15, 0, 5)
    # Win rate 7 of 10: Wilson centre (0.7 + 0.19208) / 1.38415 = 0.64449, half-width 1.41600 * sqrt(0.021 +
    # 0.0096037) = 0.24772: 0.397 to 0.892, with or without the both-bad votes.
    assert row(after, "ppo")["vs_sft"] == pytest.approx(
        {"win_rate": 0.7, "low": 0.3968, "high": 0.8922, "votes": 10}, abs=1e-4
    )
    assert after["both_bad"] == 5 and after["votes"] == 15
    # A stage judged only "both bad" has no rating, and says why.
    only_bad = leaderboard.leaderboard(votes + [vote(["grpo", "sft"], "both bad")])
    assert row(only_bad, "grpo")["rating"] is None and row(only_bad, "grpo")["rank"] is None
    assert "| - | GRPO | - | only both-bad votes: no rating | 1 | 1 |" in "\n".join(leaderboard.table(only_bad))


def test_the_head_to_head_verdict_counts_both_bad_apart_too():
    votes = [vote(["ppo", "sft"], "a")] * 7 + [vote(["ppo", "sft"], "b"), vote(["sft", "ppo"], "tie")]
    votes.append(vote(["sft", "ppo"], "both bad"))
    [verdict] = labels.human_verdicts(votes)
    # 7 wins, 1 loss, 1 tie: 7.5 of 9 = 0.833; Wilson centre (0.83333 + 0.21341) / 1.42683 = 0.73362, half-width
    # 1.37365 * sqrt(0.015432 + 0.011856) = 0.22691: 0.507 to 0.961. The both-bad vote is left out, and said.
    assert labels.verdict_line(verdict) == (
        "human win rate of PPO over SFT: 0.83 (95% CI 0.51-0.96, 9 votes, 1 labeler; 1 both bad, left out)"
    )
    [only_bad] = labels.human_verdicts([vote(["sft", "ppo"], "both bad")] * 2)
    assert labels.verdict_line(only_bad) == "human win rate of PPO over SFT: none (2 both bad only, 1 labeler)"


def test_the_bootstrap_interval_is_reproducible_and_matches_the_binomial():
    votes = [vote(["ppo", "sft"], "a")] * 8 + [vote(["ppo", "sft"], "b")] * 2
    stages = leaderboard.stages_of(votes)
    first = leaderboard.bootstrap(votes, stages, rounds=1000, seed=0)
    assert first.shape == (1000, 2) and np.array_equal(first, leaderboard.bootstrap(votes, stages, rounds=1000, seed=0))
    assert not np.array_equal(first, leaderboard.bootstrap(votes, stages, rounds=1000, seed=1))
    # A resample of the 10 votes holds k ~ Binomial(10, 0.8) PPO wins, rated 400 * log10((k + 0.5) / (10.5 - k))
    # above SFT. P(k <= 4) = 0.6% and P(k <= 5) = 3.3%: the 2.5th percentile is a resample with 5 wins, 1000 (even);
    # P(k = 10) = 10.7%: the 97.5th is 10 wins, 1000 + 400 * log10(21) = 1528.89.
    board = leaderboard.leaderboard(votes)
    ppo = row(board, "ppo")
    assert (ppo["low"], ppo["high"]) == pytest.approx((1000.0, 1528.888), abs=1e-3)
    assert ppo["low"] <= ppo["rating"] <= ppo["high"]  # the point, 1000 + 400 * log10(8.5 / 2.5) = 1212.59, inside
    assert board == leaderboard.leaderboard(votes)  # fixed seed: the same report twice
    assert (row(board, "sft")["low"], row(board, "sft")["high"]) == (1000.0, 1000.0)  # the anchor
    chain_board = leaderboard.leaderboard(chain())
    for r in chain_board["rows"]:
        assert r["low"] <= r["rating"] <= r["high"]
    assert row(chain_board, "dpo")["low"] > 1000  # DPO above SFT in 97.5% of resamples: two steps of 8 to 2


def test_without_sft_the_mean_is_1000_and_separate_groups_are_flagged():
    votes = [vote(["ppo", "dpo"], "a")] * 3 + [vote(["ppo", "dpo"], "b")] + [vote(["rloo", "grpo"], "tie")]
    board = leaderboard.leaderboard(votes)
    assert board["anchor"] == "mean" and board["groups"] == [["ppo", "dpo"], ["rloo", "grpo"]]
    # 3.5 to 1.5 (with the virtual tie): PPO - DPO = 400 * log10(7/3) = 147.19, centred on 1000.
    assert row(board, "ppo")["rating"] == pytest.approx(1073.595, abs=1e-3)
    assert row(board, "rloo")["rating"] == pytest.approx(1000) == row(board, "grpo")["rating"]
    text = "\n".join(leaderboard.section(board))
    assert "never compared with each other: PPO, DPO; RLOO, GRPO" in text and "their mean = 1000" in text


def test_position_bias_counts_the_left_answer_among_votes_for_a_side():
    votes = [vote(["ppo", "sft"], "a")] * 4 + [vote(["sft", "ppo"], "a")] * 3 + [vote(["sft", "ppo"], "b")] * 3
    votes += [vote(["sft", "ppo"], "tie")] * 2 + [vote(["ppo", "sft"], "both bad")]  # neither says a side
    bias = leaderboard.position_bias(votes)
    # A won 7 of the 10 votes for a side: 0.70, Wilson 0.397 to 0.892 (as above).
    assert bias == pytest.approx({"left_wins": 7, "votes": 10, "rate": 0.7, "low": 0.3968, "high": 0.8922}, abs=1e-4)
    line = leaderboard.position_line(leaderboard.leaderboard(votes))
    assert line == (
        "position bias: the left answer (A) won 7 of 10 votes for A or B, 0.70 (95% CI 0.40-0.89; 0.5 is no bias)"
    )


def test_krippendorff_alpha_by_hand():
    # Two labelers, four items: (PPO, PPO), (PPO, PPO), (SFT, SFT), (PPO, SFT), whatever side each saw. Coincidences:
    # o(ppo,ppo) = 4, o(sft,sft) = 2, o(ppo,sft) = o(sft,ppo) = 1; n_ppo = 5, n_sft = 3, n = 8. Nominal alpha =
    # 1 - (n - 1) * sum of off-diagonal o / sum over c != k of n_c n_k = 1 - 7 * 2 / (2 * 5 * 3) = 0.5333.
    votes = [
        vote(["ppo", "sft"], "a", "ann", "i1"), vote(["sft", "ppo"], "b", "ben", "i1"),
        vote(["ppo", "sft"], "a", "ann", "i2"), vote(["ppo", "sft"], "a", "ben", "i2"),
        vote(["ppo", "sft"], "b", "ann", "i3"), vote(["sft", "ppo"], "a", "ben", "i3"),
        vote(["ppo", "sft"], "a", "ann", "i4"), vote(["ppo", "sft"], "b", "ben", "i4"),
        vote(["ppo", "sft"], "a", "ann", "i5"),  # judged by one labeler: not an item two judged
    ]  # fmt: skip
    votes.append({k: v for k, v in vote(["ppo", "sft"], "b", "ben").items() if k != "sample_id"})  # matches none
    agreement = leaderboard.labeler_agreement(votes)
    assert agreement["alpha"] == pytest.approx(1 - 14 / 30) and agreement["items"] == 4 and agreement["labelers"] == 2
    # Each agrees with the other (the others' majority of one) on 3 of 4 items.
    assert [(r["labeler"], r["agree"], r["items"]) for r in agreement["per_labeler"]] == [("ann", 3, 4), ("ben", 3, 4)]


def test_a_careless_labeler_has_the_lowest_agreement():
    rng = random.Random(0)
    truth = ["ppo"] * 12 + ["sft"] * 4 + ["tie"] * 4  # what careful labelers see on 20 items
    votes = []
    for n, said in enumerate(truth):
        for labeler in ("ann", "ben", "cat"):
            shown = ["ppo", "sft"] if rng.random() < 0.5 else ["sft", "ppo"]
            choice = "tie" if said == "tie" else "ab"[shown.index(said)]
            if labeler == "cat":  # votes at random
                choice = rng.choice(["a", "b", "tie", "both bad"])
            votes.append(vote(shown, choice, labeler, f"i{n}"))
    agreement = leaderboard.labeler_agreement(votes)
    rates = {r["labeler"]: r["rate"] for r in agreement["per_labeler"]}
    assert agreement["per_labeler"][0]["labeler"] == "cat"  # lowest first
    assert rates["cat"] < 0.5 < rates["ann"] == rates["ben"] == 1.0
    careful = leaderboard.labeler_agreement([v for v in votes if v["labeler"] != "cat"])
    assert careful["alpha"] == pytest.approx(1.0) and agreement["alpha"] < 0.8
    lines = leaderboard.agreement_lines(leaderboard.leaderboard(votes))
    assert lines[0].startswith(
        f"labeler agreement: Krippendorff's alpha {agreement['alpha']:.2f} over 3 labelers on 20"
    )
    assert lines[1].startswith("labeler cat: agrees with the others' majority on")


def test_the_report_section_shows_the_table():
    votes = chain()
    section = "\n".join(leaderboard.section(leaderboard.leaderboard(votes), 2, labels.human_verdicts(votes)))
    assert section.startswith("## Human leaderboard (arena)")
    assert (
        "| rank | stage | rating | 95% interval | votes | both bad | labelers | win rate vs SFT (95% CI) |" in section
    )
    assert "| 1 | DPO | 1425 |" in section and "| 2 | PPO | 1213 |" in section
    assert "| 3 | SFT | 1000 | (anchor) | 10 | 0 | 1 | - |" in section
    assert "| 0.80 (0.49-0.94, 10 votes) |" in section
    assert "- position bias: the left answer (A) won" in section and "- labeler agreement: no item judged" in section
    assert "- human win rate of PPO over SFT: 0.80" in section and "- 2 arena votes left out" in section
    assert leaderboard.section(None) == [] and leaderboard.leaderboard([]) is None
