"""The RLHF report: `models/<recipe>/report/` with report.md, training plots and sample generations.

    python -m rlhf_trl.report --recipe demo [--models DIR] [--output DIR]     # `make report`, end of `make all`

Reads two things and recomputes nothing it can reuse:
- `models/<recipe>/eval.json` from `rlhf_trl.evaluate`; it is run first (and prints its table) when that
  file is missing or older than a stage output, so the report never describes other models than those on disk;
- each stage's `metrics.jsonl` (written while it trained by `rlhf_trl.metrics_log`).

Writes report.md (the evaluation tables, warnings, the human verdict when the web page's arena has votes in
data/labels/<recipe>/ (`--labels`): the human win rate of each voted pair of stages with its Wilson 95% interval,
and the plots inline), samples.md (SFT and PPO answers to
the same prompts side by side, with their reward-model and ground-truth scores), and PNGs drawn with
matplotlib's Agg backend (no display needed): sft_loss.png, reward_accuracy.png, ppo_training.png (reward,
KL, entropy, value loss per step) and reward_distribution.png. A stage trained without a metrics log gets
a note in report.md instead of its plot.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import evaluate, labels
from .cli import UserError, run
from .metrics_log import FILENAME, read_metrics
from .outputs import MARKER

PPO_PANELS = (
    ("objective/scores", "mean reward-model score"),
    ("objective/kl", "KL from the reference (SFT)"),
    ("objective/entropy", "policy entropy"),
    ("loss/value_avg", "value loss"),
)
SAMPLE_ROWS = 24


def eval_is_stale(eval_file: Path, models: Path) -> bool:
    """True when eval.json is missing or older than any stage output it describes."""
    if not eval_file.is_file():
        return True
    built = eval_file.stat().st_mtime
    markers = [models / stage / MARKER for stage in ("sft", "reward", "ppo")]
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


def plot_ppo(path: Path, records: list[dict]) -> bool:
    x_key = "episode" if any("episode" in r for r in records) else "step"
    data = [(title, *series(records, key, x_key)) for key, title in PPO_PANELS]
    if not any(y for _, _, y in data):
        return False
    plt = _pyplot()
    figure, axes = plt.subplots(2, 2, figsize=(9.6, 6.4))
    for axis, (title, x, y) in zip(axes.flat, data, strict=True):
        axis.plot(x, y, "o-", markersize=3)
        axis.set_title(title)
        axis.set_xlabel(x_key)
        axis.grid(alpha=0.3)
    figure.suptitle("PPO training")
    return save(plt, figure, path)


def plot_distribution(path: Path, scores: dict[str, list[float]]) -> bool:
    if not scores.get("sft") or not scores.get("ppo"):
        return False
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6.4, 4.0))
    low = min(min(scores["sft"]), min(scores["ppo"]))
    high = max(max(scores["sft"]), max(scores["ppo"]))
    bins = [low + (high - low) * i / 30 for i in range(31)] if high > low else 10
    for stage, color in (("sft", "tab:blue"), ("ppo", "tab:orange")):
        axis.hist(
            scores[stage],
            bins=bins,
            alpha=0.6,
            color=color,
            label=f"{stage.upper()} (mean {evaluate.mean(scores[stage]):.2f})",
        )
    axis.set_ylabel("answers")
    return save(plt, figure, path, axis, "Reward-model score of held-out answers", "reward-model score")


def cell(text) -> str:
    """Text that is safe inside a markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ").strip() or "(empty)"


def fmt(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def eval_section(result: dict) -> list[str]:
    sft, ppo = result["stages"]["sft"], result["stages"]["ppo"]
    rows = [
        ("mean reward-model score", fmt(sft["reward_score"]), fmt(ppo["reward_score"])),
        ("win rate of PPO over SFT (reward model; ties count half)", "-", fmt(ppo["win_rate"], 2)),
        ("KL from SFT (nats per answer)", "0", fmt(ppo["kl"])),
        ("mean response length (tokens)", fmt(sft["length"], 1), fmt(ppo["length"], 1)),
        ("answers ending with EOS", fmt(sft["eos_rate"], 2), fmt(ppo["eos_rate"], 2)),
    ]
    if sft.get("ground_truth") is not None:
        rows.append(
            ("ground truth (`demo.ground_truth_score`)", fmt(sft["ground_truth"], 2), fmt(ppo["ground_truth"], 2))
        )
    lines = [
        "## Held-out evaluation",
        "",
        f"{result['prompts']} held-out prompts from `{result['prompts_file']}`, {result['samples']} answers each "
        f"(temperature {result['temperature']}, top-k off, up to {result['max_new_tokens']} new tokens, seed "
        f"{result['seed']}); the same prompts and seed for SFT and PPO.",
        "",
        f"Reward model pairwise accuracy: **{result['reward_accuracy']:.3f}** on {result['pairs']} held-out pairs "
        f"from `{result['pairs_file']}` (chosen scored strictly above rejected).",
        "",
        "| metric | SFT | PPO |",
        "|---|---:|---:|",
        *[f"| {name} | {a} | {b} |" for name, a, b in rows],
        "",
        "The KL is estimated on PPO's own answers: the log-probability under PPO minus that under SFT, summed "
        "over the answer's tokens (both at the sampling temperature), averaged over answers.",
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


def samples_page(result: dict, rows: int = SAMPLE_ROWS) -> str:
    with_truth = result["stages"]["sft"].get("ground_truth") is not None
    truth = " / ground truth" if with_truth else ""
    lines = [
        f"# Sample generations: {result['recipe']}",
        "",
        f"The first answer to each of the first {min(rows, result['prompts'])} of {result['prompts']} held-out "
        f"prompts (same seed for both models); scores are reward-model score{truth}.",
        "",
        f"| prompt | SFT | score{truth} | PPO | score{truth} |",
        "|---|---|---:|---|---:|",
    ]
    for g in result["generations"][:: result["samples"]][:rows]:  # the first answer to each prompt
        scores = {
            stage: fmt(g[stage]["score"], 2) + (f" / {g[stage]['ground_truth']:.0f}" if with_truth else "")
            for stage in ("sft", "ppo")
        }
        lines.append(
            f"| {cell(g['prompt'])} | {cell(g['sft']['answer'])} | {scores['sft']} | "
            f"{cell(g['ppo']['answer'])} | {scores['ppo']} |"
        )
    return "\n".join(lines) + "\n"


def human_section(verdicts: list[dict]) -> list[str]:
    """The arena's human verdicts (`labels.human_verdicts`) as report lines; none without arena votes."""
    if not verdicts:
        return []
    return [
        "## Human verdict (arena)",
        "",
        *[f"- {labels.verdict_line(v)}" for v in verdicts],
        "",
        'Blind A/B votes from `make ui` (Arena tab) on held-out prompts; a tie or "both bad" counts half. '
        "The interval is Wilson's score interval.",
        "",
    ]


def build(models: Path, result: dict, output: Path, verdicts: list[dict] | None = None) -> list[Path]:
    """Writes report.md, samples.md and the plots into `output`; returns the PNGs written.

    `verdicts` (`labels.human_verdicts` of the labels folder) adds the human verdict section.
    """
    output.mkdir(parents=True, exist_ok=True)
    for stale in output.glob("*.png"):
        stale.unlink()
    logs = {stage: read_metrics(models / stage) for stage in ("sft", "reward", "ppo")}
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
        "ppo_training.png": ("PPO reward, KL, entropy and value loss", "ppo", lambda path: plot_ppo(path, logs["ppo"])),
        "reward_distribution.png": (
            "Reward distribution, SFT against PPO",
            None,
            lambda path: plot_distribution(path, result.get("scores", {})),
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
    (output / "samples.md").write_text(samples_page(result), encoding="utf-8")
    report = [
        f"# RLHF report: {result['recipe']}",
        "",
        f"Models in `{models}`; written by `make report` (rlhf_trl.report) from `eval.json` and each stage's "
        f"`{FILENAME}`. Sample generations, SFT and PPO side by side: [samples.md](samples.md).",
        "",
        *eval_section(result),
        *human_section(verdicts or []),
        *sections,
    ]
    (output / "report.md").write_text("\n".join(report).rstrip() + "\n", encoding="utf-8")
    return written


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="demo")
    parser.add_argument(
        "--models", type=Path, default=None, help="folder holding sft/, reward/, ppo/ (default: models/<recipe>)"
    )
    parser.add_argument("--eval", type=Path, default=None, help="eval.json to read (default: <models>/eval.json)")
    parser.add_argument("--output", type=Path, default=None, help="default: <models>/report")
    parser.add_argument(
        "--labels", type=Path, default=None, help="labels folder with arena votes (default: data/labels/<recipe>)"
    )
    args = parser.parse_args(argv)
    models = args.models or Path("models", args.recipe)
    eval_file = args.eval or models / "eval.json"
    if eval_is_stale(eval_file, models):
        print(f"report: {eval_file} is missing or older than the stage outputs; running the evaluation first")
        eval_args = evaluate.parser().parse_args(
            ["--recipe", args.recipe, "--models", str(models), "--output", str(eval_file)]
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
        for line in lines:
            print(line)
    output = args.output or models / "report"
    verdicts = labels.human_verdicts(labels.read_decisions(args.labels or Path("data", "labels", args.recipe)))
    for verdict in verdicts:
        print(f"report: {labels.verdict_line(verdict)}")
    try:
        written = build(models, result, output, verdicts)
    except (KeyError, TypeError) as error:
        raise UserError(
            f"{eval_file} lacks what the report needs ({error}): delete it and rerun `make report`"
        ) from None
    print(f"report: {len(written)} plot(s) and samples.md in {output}")
    print(f"report: {output / 'report.md'}")


if __name__ == "__main__":
    run(main)
