"""The RLHF report: `models/<recipe>/report/` with report.md, training plots and sample generations.

    python -m rlhf_trl.report --recipe demo [--stage ppo|rloo|grpo|dpo|kto] [--models DIR] [--output DIR]
    # `make report [STAGE=rloo]`; `make all` ends with the PPO one

The report of SFT against one stage-3 method (`--stage`, default ppo). Reads two things and recomputes nothing it
can reuse:
- the method's evaluation from `rlhf_trl.evaluate` (`models/<recipe>/eval.json` for PPO, `eval-<stage>.json`
  for the others); it is run first (and prints its table) when that file is missing or older than a stage output,
  so the report never describes other models than those on disk;
- each stage's `metrics.jsonl` (written while it trained by `rlhf_trl.metrics_log`).

Writes into `models/<recipe>/report/` (PPO) or `report-<stage>/`: report.md (the evaluation tables, warnings, the
human leaderboard when the web page's arena has votes in data/labels/<recipe>/ (`--labels`): every stage voted on,
ranked by a Bradley-Terry rating with a bootstrap 95% interval, its win rate against SFT, position bias, labeler
agreement and the win rate of each voted pair (`rlhf_trl.leaderboard`), and the plots inline), samples.md (SFT's
and the method's answers to the same prompts side by side, with their reward-model and ground-truth scores), and
PNGs drawn with matplotlib's Agg backend (no display needed): sft_loss.png, reward_accuracy.png,
<stage>_training.png (PPO: reward, KL, entropy, value loss per step; RLOO and GRPO: reward, KL, entropy, completion
length; DPO: loss, implicit reward accuracy and margin, log-probability of the chosen answers; KTO: loss, implicit
reward margin, KL estimate, log-probability of the desirable answers) and reward_distribution.png. A stage trained
without a metrics log gets a note in report.md instead of its plot.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import evaluate, labels, leaderboard
from .errors import UserError, run
from .metrics_log import FILENAME, read_metrics
from .outputs import MARKER, METHODS

PPO_PANELS = (
    ("objective/scores", "mean reward-model score"),
    ("objective/kl", "KL from the reference (SFT)"),
    ("objective/entropy", "policy entropy"),
    ("loss/value_avg", "value loss"),
)
# TRL 1.16's RLOOTrainer and GRPOTrainer log the same names (their `_metrics`); DPOTrainer its implicit rewards.
SAMPLED_PANELS = (
    ("reward", "mean reward (reward model)"),
    ("kl", "KL from the reference (SFT)"),
    ("entropy", "policy entropy"),
    ("completions/mean_length", "mean completion length (tokens)"),
)
TRAINING_PANELS = {
    "ppo": PPO_PANELS,
    "rloo": SAMPLED_PANELS,
    "grpo": SAMPLED_PANELS,
    "dpo": (
        ("loss", "training loss (DPO + loss_type terms)"),
        ("rewards/accuracies", "implicit reward accuracy (chosen above rejected)"),
        ("rewards/margins", "implicit reward margin"),
        ("logps/chosen", "log-probability of the chosen answers"),
    ),
    "kto": (
        ("loss", "training loss (KTO)"),
        ("rewards/margins", "implicit reward margin (desirable - undesirable)"),
        ("kl", "KL estimate (batch, clamped at 0 by TRL)"),
        ("logps/chosen", "log-probability of the desirable answers"),
    ),
}
TRAINING_TITLES = {
    "ppo": "PPO reward, KL, entropy and value loss",
    "rloo": "RLOO reward, KL, entropy and completion length",
    "grpo": "GRPO reward, KL, entropy and completion length",
    "dpo": "DPO loss, implicit reward accuracy and margin",
    "kto": "KTO loss, implicit reward margin and KL estimate",
}
SAMPLE_ROWS = 24


def eval_is_stale(eval_file: Path, models: Path, stage: str = "ppo") -> bool:
    """True when the evaluation file is missing or older than any stage output it describes (sft, reward, `stage`)."""
    if not eval_file.is_file():
        return True
    built = eval_file.stat().st_mtime
    markers = [models / name / MARKER for name in ("sft", "reward", stage)]
    return any(marker.is_file() and marker.stat().st_mtime > built for marker in markers)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def series(records: list[dict], key: str, x_key: str = "step") -> tuple[list[float], list[float]]:
    """(x, y) of every logged step that has `key` with a number.

    The end-of-training summary line (the one with `train_runtime`) is left out: TRL's RewardTrainer puts the
    averages of only the batches since the last logged step into it, which would plot as a last-step jump.
    """
    points = [
        (r.get(x_key, r.get("step", i)), r[key])
        for i, r in enumerate(records)
        if isinstance(r.get(key), int | float) and "train_runtime" not in r
    ]
    return [p[0] for p in points], [p[1] for p in points]


def plot_lines(path: Path, title: str, panels: list[tuple[str, list, list, str]], xlabel: str) -> bool:
    """One axis, one line per (label, x, y, style) (style "hline": a level at y[0]); False when none has data."""
    panels = [p for p in panels if p[2]]
    if not panels:
        return False
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6.4, 4.0))
    for label, x, y, style in panels:
        if style == "hline":  # a reference level, not a series
            axis.axhline(y[0], linestyle="--", color="tab:green", label=label)
        else:
            axis.plot(x, y, style, label=label, markersize=7)
    return save(plt, figure, path, axis, title, xlabel)


def save(plt, figure, path: Path, axis=None, title: str = "", xlabel: str = "") -> bool:
    """Labels a single-axis figure (when given its axis), writes the PNG and frees the figure."""
    if axis is not None:
        axis.set_title(title)
        axis.set_xlabel(xlabel)
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True


def plot_training(path: Path, records: list[dict], method: str = "ppo") -> bool:
    """The method's training curves (`TRAINING_PANELS`), 2 x 2 panels; False when its log has none of them."""
    x_key = "episode" if any("episode" in r for r in records) else "step"
    data = [(title, *series(records, key, x_key)) for key, title in TRAINING_PANELS[method]]
    if not any(y for _, _, y in data):
        return False
    plt = _pyplot()
    figure, axes = plt.subplots(2, 2, figsize=(9.6, 6.4))
    for axis, (title, x, y) in zip(axes.flat, data, strict=True):
        axis.plot(x, y, "o-", markersize=3)
        axis.set_title(title)
        axis.set_xlabel(x_key)
        axis.grid(alpha=0.3)
    figure.suptitle(f"{evaluate.name(method)} training")
    return save(plt, figure, path)


def plot_distribution(path: Path, scores: dict[str, list[float]], method: str = "ppo") -> bool:
    if not scores.get("sft") or not scores.get(method):
        return False
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6.4, 4.0))
    low = min(min(scores["sft"]), min(scores[method]))
    high = max(max(scores["sft"]), max(scores[method]))
    bins = [low + (high - low) * i / 30 for i in range(31)] if high > low else 10
    for stage, color in (("sft", "tab:blue"), (method, "tab:orange")):
        axis.hist(
            scores[stage],
            bins=bins,
            alpha=0.6,
            color=color,
            label=f"{evaluate.name(stage)} (mean {evaluate.mean(scores[stage]):.2f})",
        )
    axis.set_ylabel("answers")
    return save(plt, figure, path, axis, "Reward-model score of held-out answers", "reward-model score")


def cell(text) -> str:
    """Text that is safe inside a markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ").strip() or "(empty)"


def markdown_table(header: list[str], rows: list[tuple[str, list[str]]]) -> list[str]:
    """`evaluate.metric_rows`-shaped rows as a markdown table: the metric, then one right-aligned column each."""
    return [
        "| " + " | ".join(["metric", *header]) + " |",
        "|---|" + "---:|" * len(header),
        *[f"| {title} | " + " | ".join(cells) + " |" for title, cells in rows],
    ]


def eval_section(result: dict) -> list[str]:
    methods = evaluate.methods_of(result)
    judged = ", ".join(evaluate.name(m) for m in methods)
    lines = [
        "## Held-out evaluation",
        "",
        f"{result['prompts']} held-out prompts from `{result['prompts_file']}`, {result['samples']} answers each "
        f"(temperature {result['temperature']}, top-k off, up to {result['max_new_tokens']} new tokens, seed "
        f"{result['seed']}); the same prompts and seed for SFT and {judged}.",
        "",
        f"Reward model pairwise accuracy: **{result['reward_accuracy']:.3f}** on {result['pairs']} held-out pairs "
        f"from `{result['pairs_file']}` (chosen scored strictly above rejected).",
        "",
        *markdown_table(["SFT", *map(evaluate.name, methods)], evaluate.metric_rows(result["stages"], methods)),
        "",
        "The win rate counts a tie half. The KL is estimated on each method's own answers: the log-probability "
        "under the method minus that under SFT, summed over the answer's tokens (both at the sampling temperature), "
        "averaged over answers.",
        "",
        *[
            f"- {line.replace('warning: ', '**Warning:** ')}"
            for line in evaluate.truth_notes(result["stages"], methods)
        ],
        "",
    ]
    if result["warnings"]:
        lines += ["**Warnings**", "", *[f"- {w}" for w in result["warnings"]], ""]
    else:
        lines += [
            "No sign of reward hacking: where the reward rose, the ground truth and the EOS rate did not fall.",
            "",
        ]
    return lines


def samples_page(result: dict, rows: int = SAMPLE_ROWS, method: str | None = None) -> str:
    method = method or evaluate.methods_of(result)[0]
    upper = evaluate.name(method)
    with_truth = result["stages"]["sft"].get("ground_truth") is not None
    truth = " / ground truth" if with_truth else ""
    lines = [
        f"# Sample generations: {result['recipe']}",
        "",
        f"The first answer to each of the first {min(rows, result['prompts'])} of {result['prompts']} held-out "
        f"prompts (same seed for both models); scores are reward-model score{truth}.",
        "",
        f"| prompt | SFT | score{truth} | {upper} | score{truth} |",
        "|---|---|---:|---|---:|",
    ]
    for g in result["generations"][:: result["samples"]][:rows]:  # the first answer to each prompt
        scores = {
            stage: evaluate.fmt(g[stage]["score"], 2) + (f" / {g[stage]['ground_truth']:.0f}" if with_truth else "")
            for stage in ("sft", method)
        }
        lines.append(
            f"| {cell(g['prompt'])} | {cell(g['sft']['answer'])} | {scores['sft']} | "
            f"{cell(g[method]['answer'])} | {scores[method]} |"
        )
    return "\n".join(lines) + "\n"


def human_section(decisions: list[dict], older: int = 0) -> list[str]:
    """The human leaderboard of the arena votes among `decisions` (already `labels.current_votes`), with how many
    votes on earlier runs were left out (`older`): `leaderboard.section`; none without arena votes."""
    return leaderboard.section(leaderboard.leaderboard(decisions), older, labels.human_verdicts(decisions))


def build(
    models: Path,
    result: dict,
    output: Path,
    human: list[str] | None = None,
    method: str | None = None,
) -> list[Path]:
    """Writes report.md, samples.md and the plots into `output`; returns the PNGs written.

    `method` is the stage-3 method reported against SFT (default: the evaluation's first). `human` (the lines of
    `human_section`) adds the human leaderboard.
    """
    method = method or evaluate.methods_of(result)[0]
    upper = evaluate.name(method)
    output.mkdir(parents=True, exist_ok=True)
    for stale in output.glob("*.png"):
        stale.unlink()
    logs = {stage: read_metrics(models / stage) for stage in ("sft", "reward", method)}
    sft, reward = logs["sft"], logs["reward"]
    accuracy = result["reward_accuracy"]
    plots = {
        "sft_loss.png": (
            "SFT loss",
            "sft",
            lambda path: plot_lines(
                path,
                "SFT loss",
                [("training loss", *series(sft, "loss"), "o-"), ("held-out loss", *series(sft, "eval_loss"), "s")],
                "step",
            ),
        ),
        "reward_accuracy.png": (
            "Reward-model accuracy",
            "reward",
            lambda path: plot_lines(
                path,
                "Reward-model pairwise accuracy",
                [
                    ("training batches", *series(reward, "accuracy"), "o-"),
                    ("held-out (end of training)", *series(reward, "eval_accuracy"), "s"),
                    (f"held-out, make eval ({accuracy:.3f})", [0], [accuracy], "hline"),
                ],
                "step",
            ),
        ),
        f"{method}_training.png": (
            TRAINING_TITLES[method],
            method,
            lambda path: plot_training(path, logs[method], method),
        ),
        "reward_distribution.png": (
            f"Reward distribution, SFT against {upper}",
            None,
            lambda path: plot_distribution(path, result.get("scores", {}), method),
        ),
    }
    written, sections = [], ["## Plots", ""]
    for name, (title, stage, draw) in plots.items():
        sections += [f"### {title}", ""]
        if (stage is None or logs[stage]) and draw(output / name):
            written.append(output / name)
            sections += [f"![{title}]({name})", ""]
        elif stage is None:
            sections += ["No data: the evaluation holds no scores; rerun `make eval`.", ""]
        else:
            sections += [
                f"No data: `{models / stage / FILENAME}` is missing or has none of this plot's metrics (a stage "
                f"trained before stages wrote metrics logs has none); `make {stage} ARGS=--overwrite` redoes it.",
                "",
            ]
    (output / "samples.md").write_text(samples_page(result, method=method), encoding="utf-8")
    report = [
        f"# RLHF report: {result['recipe']}",
        "",
        f"Models in `{models}`; written by `make report` (rlhf_trl.report) from "
        f"`{evaluate.eval_file(models, method).name}` and each stage's `{FILENAME}`. Sample generations, SFT and "
        f"{upper} side by side: [samples.md](samples.md).",
        "",
        *eval_section(result),
        *(human or []),
        *sections,
    ]
    (output / "report.md").write_text("\n".join(report).rstrip() + "\n", encoding="utf-8")
    return written


def report_dir(models: Path, stage: str) -> Path:
    """Where `make report STAGE=<stage>` writes: report/ for PPO (what the web page shows), report-<stage>/ else."""
    return models / ("report" if stage == "ppo" else f"report-{stage}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="demo")
    parser.add_argument(
        "--models",
        type=Path,
        default=None,
        help="folder holding sft/, reward/ and the methods' outputs (default: models/<recipe>)",
    )
    parser.add_argument(
        "--stage", default="ppo", choices=METHODS, help="the method reported against SFT (default: ppo)"
    )
    parser.add_argument(
        "--eval",
        type=Path,
        default=None,
        help="evaluation to read (default: <models>/eval.json for ppo, <models>/eval-<stage>.json)",
    )
    parser.add_argument("--output", type=Path, default=None, help="default: <models>/report (ppo), report-<stage>")
    parser.add_argument(
        "--labels", type=Path, default=None, help="labels folder with arena votes (default: data/labels/<recipe>)"
    )
    args = parser.parse_args(argv)
    models = args.models or Path("models", args.recipe)
    eval_file = args.eval or evaluate.eval_file(models, args.stage)
    if eval_is_stale(eval_file, models, args.stage):
        print(f"report: {eval_file} is missing or older than the stage outputs; running the evaluation first")
        eval_args = evaluate.parser().parse_args(
            ["--recipe", args.recipe, "--models", str(models), "--stage", args.stage, "--output", str(eval_file)]
        )
        result = evaluate.evaluate(eval_args)
    else:
        try:
            result = json.loads(eval_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise UserError(f"{eval_file} is not valid JSON ({error.msg}): delete it and rerun `make report`") from None
        try:
            lines = evaluate.table(result)
        except (KeyError, TypeError) as error:
            raise UserError(
                f"{eval_file} lacks what the report needs ({error}): delete it and rerun `make report`"
            ) from None
        if args.stage not in evaluate.methods_of(result):
            raise UserError(
                f"{eval_file} judges {', '.join(evaluate.methods_of(result))}, not {args.stage}: give the --eval of "
                f"`make eval STAGE={args.stage}` ({evaluate.eval_file(models, args.stage)})"
            )
        for line in lines:
            print(line)
    output = args.output or report_dir(models, args.stage)
    decisions = labels.read_decisions(args.labels or Path("data", "labels", args.recipe))
    votes, older = labels.current_votes(decisions, labels.stage_runs(models))
    human = human_section(votes, older)
    for line in human[2:-1]:  # the section without its heading: the leaderboard table and its lines
        print(f"report: {line.removeprefix('- ')}" if line else "report:")
    try:
        written = build(models, result, output, human, args.stage)
    except (KeyError, TypeError) as error:
        raise UserError(
            f"{eval_file} lacks what the report needs ({error}): delete it and rerun `make report`"
        ) from None
    print(f"report: {len(written)} plot(s) and samples.md in {output}")
    print(f"report: {output / 'report.md'}")


if __name__ == "__main__":
    run(main)
