"""The human leaderboard: every stage the arena voted on, ranked by a Bradley-Terry rating from the pairwise votes.

    make report            # report.md's "Human leaderboard (arena)" section; the web page's Report tab shows it live

The arena (`make ui`, rlhf_trl.ui) records one decision per vote (`labels.arena_vote`): two stages' answers to a
held-out prompt, shown in random order, and A, B, tie or both bad. This module turns the current votes
(`labels.current_votes`: only votes on the runs the stage folders hold now) into what the public arenas report:

- a Bradley-Terry rating per stage (`bradley_terry`), the maximum-likelihood fit (a logistic regression, by
  Newton's method in numpy), on the Elo scale of LMSYS's Chatbot Arena: 400 * log10(strength), SFT anchored at 1000
  (the mean at 1000 when SFT has no votes). A tie counts half a win to each side; "both bad" says nothing about
  which answer is better, so it is left out of the fit and counted apart. One virtual tie per pair of stages
  compared (`PRIOR`) keeps a stage that won every vote at a finite rating; with many votes it changes little;
- a 95% interval per rating by bootstrap (`bootstrap`): the votes resampled with replacement and the model refitted,
  `ROUNDS` times, with a fixed seed, so a report is reproducible; the interval is the 2.5th to 97.5th percentile;
- the number of votes (both bad included) and labelers per stage, and each stage's win rate against SFT with Wilson's
  interval (`labels.wilson_interval`), from the votes on that pair alone;
- position bias (`position_bias`): how often the answer on the left (A) won, among votes for A or B; 0.5 is none;
- labeler agreement (`labeler_agreement`): Krippendorff's alpha (the `krippendorff` package) over all labelers, and
  each labeler's agreement with the majority of the others, so a careless labeler shows.

Why Bradley-Terry: with five methods voted pair by pair, per-pair win rates do not rank them; the Bradley-Terry
model (P(i beats j) = p_i / (p_i + p_j)) uses every vote, also those of pairs that were rarely drawn.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np

from . import labels

ANCHOR = "sft"
ANCHOR_RATING = 1000.0
ELO = 400.0 / math.log(10.0)  # rating points per unit of log strength (400 points: 10 to 1 odds)
PRIOR = 1.0  # virtual ties per pair of stages compared (half a win each way)
ROUNDS = 1000
SEED = 0
BOTH_BAD = "both bad"  # labels.arena_outcome's word


def arena_votes(decisions: list[dict]) -> list[dict]:
    """The decisions that are arena votes on two different stages (what every function here counts)."""
    return [d for d in decisions if labels.is_arena(d) and len(set(d.get("stages", ()))) == 2]


def stages_of(votes: list[dict]) -> list[str]:
    """The stages the votes judged, in pipeline order (`labels.stage_rank`)."""
    return sorted({s for v in votes for s in v["stages"]}, key=labels.stage_rank)


def win_matrix(votes: list[dict], stages: list[str]) -> np.ndarray:
    """(k, k) float array: entry [i, j] is stage i's wins over stage j, a tie half a win to each, both bad left out."""
    index = {s: i for i, s in enumerate(stages)}
    wins = np.zeros((len(stages), len(stages)))
    for vote in votes:
        first, second = vote["stages"]
        score = labels.arena_score(vote, first)
        if score is not None:
            wins[index[first], index[second]] += score
            wins[index[second], index[first]] += 1.0 - score
    return wins


def groups(compared: np.ndarray) -> list[list[int]]:
    """The connected groups of stages (indices), given a (k, k) array whose nonzero entries are pairs compared."""
    left, found = set(range(len(compared))), []
    while left:
        stack, group = [min(left)], set()
        while stack:
            i = stack.pop()
            if i not in group:
                group.add(i)
                stack += [j for j in np.flatnonzero(compared[i]) if j not in group]
        found.append(sorted(group))
        left -= group
    return found


def bradley_terry(wins: np.ndarray, prior: float = PRIOR, pairs: np.ndarray | None = None) -> np.ndarray:
    """Bradley-Terry log strengths from wins: (k, k) -> (k,), or a batch (B, k, k) -> (B, k).

    `wins[..., i, j]` is how often i beat j (ties half to each). The model, P(i beats j) = sigmoid(t_i - t_j), is a
    logistic regression on the pairs (what LMSYS fits with scikit-learn); its log-likelihood,
    sum_ij W_ij log sigmoid(t_i - t_j), is maximised here by Newton's method (iteratively reweighted least squares)
    with a step-halving line search, for a whole bootstrap batch at once in numpy. At the maximum each stage's
    expected wins, sum_j N_ij sigmoid(t_i - t_j), equal its observed wins W_i (the score equations; Hunter 2004,
    "MM algorithms for generalized Bradley-Terry models", whose MM iteration reaches the same point more slowly).
    `prior` virtual ties are added to each pair in `pairs` (default: the pairs compared in `wins`; a bootstrap
    passes the original votes' pairs, so a resample that misses a pair keeps the same groups). Each connected
    group of stages has its own scale: its log strengths are returned with mean 0 (`ratings` anchors them).
    ValueError when prior is 0 and the maximum does not exist (a stage of a group won, or lost, every vote).
    """
    wins = np.asarray(wins, dtype=float)
    batch = wins if wins.ndim == 3 else wins[None]
    pairs = (batch.sum(0) + batch.sum(0).T > 0) if pairs is None else np.asarray(pairs, dtype=bool)
    batch = batch + prior / 2 * pairs  # a virtual tie: half a win each way
    games = batch + np.swapaxes(batch, 1, 2)
    if prior == 0:
        for one, played in zip(batch, games, strict=True):
            check_mle_exists(one, played > 0)
    total = batch.sum(-1)
    # One indicator outer product per group makes the Newton system solvable (the likelihood ignores a shift of a
    # group) and keeps each group's log strengths summing to 0, where they start.
    fixed = sum(np.outer(np.isin(range(len(total[0])), group), np.isin(range(len(total[0])), group)) for group in
                groups(pairs | (games.sum(0) > 0)))  # fmt: skip

    def likelihood(theta):
        return -(batch * np.logaddexp(0.0, theta[..., None, :] - theta[..., :, None])).sum((-1, -2))

    theta = np.zeros(total.shape)
    steps = 0.5 ** np.arange(12)
    for _ in range(200):
        chance = 1.0 / (1.0 + np.exp(theta[:, None, :] - theta[:, :, None]))  # sigmoid(t_i - t_j)
        gradient = total - (games * chance).sum(-1)
        if np.abs(gradient).max() < 1e-9:
            break
        weight = games * chance * (1.0 - chance)
        laplacian = np.eye(len(theta[0])) * weight.sum(-1)[:, :, None] - weight
        direction = np.linalg.solve(laplacian + fixed, gradient[..., None])[..., 0]
        tried = theta[None] + steps[:, None, None] * direction[None]  # (steps, B, k)
        scores = np.stack([likelihood(t) for t in tried])
        best = scores.argmax(0)
        improves = scores[best, np.arange(len(theta))] > likelihood(theta)
        theta = np.where(improves[:, None], tried[best, np.arange(len(theta))], theta)
        if not improves.any():
            break
    return theta if wins.ndim == 3 else theta[0]


def check_mle_exists(wins: np.ndarray, compared: np.ndarray) -> None:
    """ValueError unless every stage of each group can be reached from every other by a chain of wins (Ford 1957:
    the condition for the Bradley-Terry maximum likelihood estimate to exist)."""
    reach = wins > 0
    for middle in range(len(wins)):  # transitive closure (Warshall)
        reach = reach | (reach[:, [middle]] & reach[[middle], :])
    for group in groups(compared):
        if not all(reach[i, j] for i in group for j in group if i != j):
            raise ValueError("no maximum-likelihood rating: a stage won, or lost, every vote of its group")


def ratings(log_strength: np.ndarray, stages: list[str], members: list[list[int]]) -> np.ndarray:
    """Elo-scale ratings (`ELO` points per unit of log strength): SFT = 1000 in its group, mean 1000 in others.
    (..., k) -> (..., k)."""
    points = ELO * np.asarray(log_strength, dtype=float)
    for group in members:
        names = [stages[i] for i in group]
        level = points[..., [group[names.index(ANCHOR)]]] if ANCHOR in names else points[..., group].mean(-1)[..., None]
        points[..., group] = points[..., group] - level + ANCHOR_RATING
    return points


def bootstrap(votes: list[dict], stages: list[str], rounds: int = ROUNDS, seed: int = SEED, prior: float = PRIOR):
    """(rounds, k) ratings of `rounds` resamples of the votes (with replacement; both bad left out, as in the fit).

    A resample of n votes is a multinomial draw over the kinds of vote (pair, outcome) with their observed shares,
    the same as drawing n votes with replacement, from numpy's Generator seeded with `seed`: the same votes give the
    same intervals. Needs prior > 0 (a resample may hold a stage that won every vote)."""
    if prior <= 0:
        raise ValueError("the bootstrap needs prior > 0: a resample may hold a stage that won every vote")
    index = {s: i for i, s in enumerate(stages)}
    kinds = Counter()
    for vote in votes:
        first, second = sorted(vote["stages"], key=index.get)
        score = labels.arena_score(vote, first)
        if score is not None:
            kinds[index[first], index[second], score] += 1
    keys = list(kinds)
    counts = np.array([kinds[k] for k in keys], dtype=float)
    draws = np.random.default_rng(seed).multinomial(int(counts.sum()), counts / counts.sum(), size=rounds)
    wins = np.zeros((rounds, len(stages), len(stages)))
    for column, (first, second, score) in enumerate(keys):
        wins[:, first, second] += draws[:, column] * score
        wins[:, second, first] += draws[:, column] * (1 - score)
    pairs = win_matrix(votes, stages)
    pairs = (pairs + pairs.T) > 0
    return ratings(bradley_terry(wins, prior, pairs), stages, groups(pairs))


def pair_record(votes: list[dict], stage: str, other: str) -> dict:
    """`stage` against `other` on their votes: wins (a tie half), votes (both bad left out) and both_bad."""
    scores = [labels.arena_score(v, stage) for v in votes if sorted(v["stages"]) == sorted((stage, other))]
    counted = [score for score in scores if score is not None]
    return {"wins": sum(counted), "votes": len(counted), "both_bad": len(scores) - len(counted)}


def win_rate(record: dict) -> dict | None:
    """A `pair_record` as win_rate, low, high (Wilson 95%) and votes; None without a vote for a side or a tie."""
    if not record["votes"]:
        return None
    low, high = labels.wilson_interval(record["wins"], record["votes"])
    return {"win_rate": record["wins"] / record["votes"], "low": low, "high": high, "votes": record["votes"]}


def position_bias(votes: list[dict]) -> dict | None:
    """How often the left answer (A) won among the votes for A or B (ties and both bad say nothing about a side):
    left_wins, votes, rate, low, high (Wilson 95%); None without such votes. 0.5 is no bias."""
    decided = [v for v in votes if v["decision"] == "prefer"]
    if not decided:
        return None
    left = sum(v["preferred"] == 0 for v in decided)
    low, high = labels.wilson_interval(left, len(decided))
    return {"left_wins": left, "votes": len(decided), "rate": left / len(decided), "low": low, "high": high}


def labeler_agreement(votes: list[dict]) -> dict:
    """Agreement among the labelers who judged the same items (an item: the same two answers, `sample_id`).

    Each vote is read as what it says whatever side each answer was on (`labels.arena_outcome`: the preferred
    stage, tie or both bad), a nominal value. Returns:
      alpha: Krippendorff's alpha (nominal) over all labelers, from the `krippendorff` package (Krippendorff 2004;
        1 full agreement, 0 chance level), or None when fewer than two labelers share an item or every vote says
        the same thing;
      items: how many items two or more labelers judged; labelers: how many labelers voted;
      per_labeler: for each labeler, agreement with the majority of the others: on each item that labeler and at
        least one other judged, whether the labeler's vote equals the most common vote of the others (an item where
        the others' most common vote is not unique is left out); {labeler, items, agree, rate}, lowest rate first.
    A careless labeler agrees with the others' majority about as often as chance allows (a quarter, for four
    choices at random) and comes first; careful ones agree most of the time.
    """
    by_item: dict[str, dict[str, str]] = {}
    for vote in votes:
        if vote.get("sample_id"):  # a vote written by hand without one matches no other labeler's
            by_item.setdefault(vote["sample_id"], {})[vote["labeler"]] = labels.arena_outcome(vote)
    everyone = sorted({v["labeler"] for v in votes})
    shared = {item: said for item, said in by_item.items() if len(said) > 1}
    result = {"alpha": None, "items": len(shared), "labelers": len(everyone), "per_labeler": []}
    if not shared:
        return result
    values = sorted({value for said in shared.values() for value in said.values()})
    if len(values) > 1:
        import krippendorff

        data = np.full((len(everyone), len(shared)), np.nan)
        for column, said in enumerate(shared.values()):
            for labeler, value in said.items():
                data[everyone.index(labeler), column] = values.index(value)
        result["alpha"] = float(krippendorff.alpha(reliability_data=data, level_of_measurement="nominal"))
    for labeler in everyone:
        items = agree = 0
        for said in shared.values():
            if labeler not in said:
                continue
            others = Counter(value for name, value in said.items() if name != labeler).most_common()
            if len(others) > 1 and others[0][1] == others[1][1]:
                continue  # the others are split: no majority
            items += 1
            agree += said[labeler] == others[0][0]
        if items:
            result["per_labeler"].append({"labeler": labeler, "items": items, "agree": agree, "rate": agree / items})
    result["per_labeler"].sort(key=lambda row: (row["rate"], row["labeler"]))
    return result


def leaderboard(decisions: list[dict], rounds: int = ROUNDS, seed: int = SEED, prior: float = PRIOR) -> dict | None:
    """Everything the leaderboard shows, from current decisions (`labels.current_votes`); None without arena votes.

    Returns rows (best first): {rank, stage, rating, low, high (None when every decided vote of the stage went one
    way, `one_way`: the bootstrap would give a zero-width interval), votes, both_bad, labelers, vs_sft (`win_rate` of
    the stage against SFT, or None)}; votes, both_bad and labelers over all; groups (lists of stage names: stages of two
    groups were never compared, directly or through others, so their ratings do not compare); anchor ("sft" or
    "mean"); position (`position_bias`); agreement (`labeler_agreement`); rounds, seed and prior.
    """
    votes = arena_votes(decisions)
    if not votes:
        return None
    stages = stages_of(votes)
    wins = win_matrix(votes, stages)
    members = groups((wins + wins.T) > 0)
    rows = []
    if (wins + wins.T).any():
        point = ratings(bradley_terry(wins, prior), stages, members)
        resampled = bootstrap(votes, stages, rounds, seed, prior)
        low, high = np.percentile(resampled, [2.5, 97.5], axis=0)
    for i, stage in enumerate(stages):
        mine = [v for v in votes if stage in v["stages"]]
        rated = (wins[i].sum() + wins[:, i].sum()) > 0  # not only both-bad votes
        # Every decided vote one way (no loss, or no win, ties counting half each way): each resample redraws the same
        # unanimous votes, so the bootstrap interval has no width although a few votes prove little. Not shown.
        one_way = rated and (wins[i].sum() == 0 or wins[:, i].sum() == 0)
        rows.append(
            {
                "stage": stage,
                "rating": float(point[i]) if rated else None,
                "low": float(low[i]) if rated and not one_way else None,
                "high": float(high[i]) if rated and not one_way else None,
                "one_way": one_way,
                "votes": len(mine),
                "both_bad": sum(labels.arena_outcome(v) == BOTH_BAD for v in mine),
                "labelers": len({v["labeler"] for v in mine}),
                "vs_sft": win_rate(pair_record(votes, stage, ANCHOR)) if stage != ANCHOR else None,
            }
        )
    rows.sort(key=lambda row: (row["rating"] is None, -(row["rating"] or 0.0), labels.stage_rank(row["stage"])))
    for rank, row in enumerate(rows, start=1):
        row["rank"] = rank if row["rating"] is not None else None
    return {
        "rows": rows,
        "votes": len(votes),
        "both_bad": sum(labels.arena_outcome(v) == BOTH_BAD for v in votes),
        "labelers": len({v["labeler"] for v in votes}),
        "groups": [[stages[i] for i in group] for group in members if len(group) > 1],
        "anchor": "sft" if any(r["stage"] == ANCHOR and r["rating"] is not None for r in rows) else "mean",
        "position": position_bias(votes),
        "agreement": labeler_agreement(votes),
        "rounds": rounds,
        "seed": seed,
        "prior": prior,
    }


# ---------------------------------------------------------------------------------------------- markdown


def plural(count: int, word: str) -> str:
    return f"{count} {word}" + ("s" if count != 1 else "")


def table(board: dict) -> list[str]:
    """The leaderboard as a markdown table: rank, stage, rating, 95% interval, votes, both bad, labelers, win rate
    against SFT with its 95% interval."""
    lines = [
        "| rank | stage | rating | 95% interval | votes | both bad | labelers | win rate vs SFT (95% CI) |",
        "|---:|---|---:|---|---:|---:|---:|---|",
    ]
    for row in board["rows"]:
        if row["rating"] is None:
            rank, rating, interval = "-", "-", "only both-bad votes: no rating"
        else:
            rank, rating = str(row["rank"]), f"{row['rating']:.0f}"
            if row["stage"] == ANCHOR and board["anchor"] == "sft":
                interval = "(anchor)"
            elif row["low"] is None:  # one_way: the bootstrap cannot vary unanimous votes; the win rate's CI can
                interval = "none: every vote went one way"
            else:
                interval = f"{row['low']:.0f} to {row['high']:.0f}"
        if row["stage"] == ANCHOR:
            vs = "-"
        elif row["vs_sft"] is None:
            vs = "no votes against SFT"
        else:
            r = row["vs_sft"]
            vs = f"{r['win_rate']:.2f} ({r['low']:.2f}-{r['high']:.2f}, {plural(r['votes'], 'vote')})"
        lines.append(
            f"| {rank} | {row['stage'].upper()} | {rating} | {interval} | {row['votes']} | {row['both_bad']} | "
            f"{row['labelers']} | {vs} |"
        )
    return lines


def position_line(board: dict) -> str:
    """position bias: the left answer (A) won 22 of 40 votes for A or B, 0.55 (95% CI 0.40-0.69; 0.5 is no bias)"""
    position = board["position"]
    if position is None:
        return "position bias: no vote for A or B yet"
    return (
        f"position bias: the left answer (A) won {position['left_wins']} of {plural(position['votes'], 'vote')} for "
        f"A or B, {position['rate']:.2f} (95% CI {position['low']:.2f}-{position['high']:.2f}; 0.5 is no bias)"
    )


def agreement_lines(board: dict) -> list[str]:
    """The overall alpha line, then one line per labeler (lowest agreement first)."""
    agreement = board["agreement"]
    if not agreement["items"]:
        return [
            f"labeler agreement: no item judged by two labelers yet ({plural(agreement['labelers'], 'labeler')}); "
            "it shows once two people vote on the same prompt and pair of stages"
        ]
    alpha = "n/a (every vote said the same)" if agreement["alpha"] is None else f"{agreement['alpha']:.2f}"
    lines = [
        f"labeler agreement: Krippendorff's alpha {alpha} over {plural(agreement['labelers'], 'labeler')} on "
        f"{plural(agreement['items'], 'item')} judged by two or more (1: full agreement, 0: chance)"
    ]
    for row in agreement["per_labeler"]:
        lines.append(
            f"labeler {row['labeler']}: agrees with the others' majority on {row['agree']} of "
            f"{plural(row['items'], 'item')} ({row['rate']:.2f})"
        )
    return lines


def section(board: dict | None, older: int = 0, verdicts: list[dict] | None = None) -> list[str]:
    """The report's "Human leaderboard (arena)" section (also the web page's Report tab): the table, position bias,
    agreement, the head-to-head win rate of each pair voted on (`labels.human_verdicts`) and how many votes on
    earlier runs were left out; nothing without arena votes."""
    if board is None and not older:
        return []
    lines = ["## Human leaderboard (arena)", ""]
    if board is not None:
        anchor = "SFT = 1000" if board["anchor"] == "sft" else "their mean = 1000 (SFT has no votes)"
        lines += [
            *table(board),
            "",
            f"Blind A/B votes from `make ui` (Arena tab) on held-out prompts: {plural(board['votes'], 'vote')} "
            f"({board['both_bad']} both bad) by {plural(board['labelers'], 'labeler')}. Rating: Bradley-Terry on the "
            f"Elo scale (400 points: 10 to 1 odds), {anchor}; a tie counts half a win to each side, both bad is "
            f"counted apart and left out of the ratings and win rates; one virtual tie per pair of stages compared "
            f"keeps a stage that won every vote finite. 95% interval: {board['rounds']} bootstrap resamples of the "
            f"votes (seed {board['seed']}). Win rate vs SFT: that pair's votes alone, Wilson's interval.",
            "",
        ]
        if len(board["groups"]) > 1:
            named = "; ".join(", ".join(s.upper() for s in group) for group in board["groups"])
            lines += [
                f"**Warning:** these groups of stages were never compared with each other: {named}. Ratings compare "
                "only within a group; vote on pairs across them (the arena's random draw does).",
                "",
            ]
        lines += [f"- {position_line(board)}", *[f"- {line}" for line in agreement_lines(board)]]
        lines += [f"- {labels.verdict_line(v)}" for v in verdicts or []]
    if older:
        lines.append(f"- {labels.older_votes_line(older)}")
    return [*lines, ""]
