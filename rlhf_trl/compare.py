"""Which method helped most? SFT and every finished stage-3 method judged side by side, with what each cost.

    python -m rlhf_trl.compare --recipe demo [--methods ppo rloo grpo dpo kto] [make eval's options]
    # `make compare ARGS="--methods ppo"`: first trains what of sft, reward and the methods asked for is missing
    # (`--to-train` tells make which: the methods are parsed here, not in the Makefile)

Judges SFT and each finished method in `models/<recipe>/` (`outputs.METHODS`: ppo, rloo, grpo, dpo, kto) exactly as
`make eval` does, through its functions (`evaluate.prepare` samples and scores SFT once, `evaluate.judge_method`
each method): the same held-out prompts, samples, temperature and seed, so each method's numbers equal those of
`make eval STAGE=<method>` with the same options. Per method: the mean reward-model score, the win rate over SFT,
the KL from SFT, the answer length, the EOS rate, the ground truth (demo), and what its training stage cost:
its wall time (manifest.json `wall_time_s`), its peak memory (marker `peak_memory_mib`: the GPU's allocated peak
or the CPU process's resident peak, `peak_memory_kind`) and the completion tokens it sampled while training
(marker `tokens_generated`; DPO and KTO sample none). A value a stage did not record shows as "-".

Writes `models/<recipe>/compare/` (`--output`): compare.json (eval.json's keys for all the stages, plus `costs`
and `missing`), compare.md (the table, notes and the plot) and compare.png; prints the table last. A method that
does not beat SFT on the ground truth gets a warning line; a method not finished is listed with the make target
that trains it. The folder is written as `compare.partial/` and renamed when complete (`outputs.stage_output`),
so a comparison that fails midway leaves the previous one, never half of a new one.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from pathlib import Path

from . import evaluate, outputs
from .errors import UserError, run

PLOT = "compare.png"
COLORS = {
    "sft": "tab:gray",
    "ppo": "tab:blue",
    "rloo": "tab:orange",
    "grpo": "tab:green",
    "dpo": "tab:purple",
    "kto": "tab:brown",
}


def split_methods(models: Path, methods: Sequence[str]) -> tuple[list[str], list[str]]:
    """(finished, missing) among `methods`, in the order given: finished means its output has a marker."""
    finished = [m for m in methods if outputs.read_marker(models / m) is not None]
    return finished, [m for m in methods if m not in finished]


def to_train(models: Path, methods: Sequence[str]) -> list[str]:
    """The stages `make compare` trains before comparing `methods`: SFT (every method starts from it), the reward
    model (it judges) and the methods asked for, each only when its output is not finished, in pipeline order."""
    return split_methods(models, ["sft", "reward", *methods])[1]


def plan(args, log: Callable[[str], None]) -> list[str]:
    """`--to-train`: says on stderr (`log`) what make will train and keep, and returns the stages to train. With
    --models elsewhere than models/<recipe>, where the recipes write, it trains nothing."""
    models, default = args.models or Path("models", args.recipe), Path("models", args.recipe)
    if models.resolve() != default.resolve():
        log(f"compare: --models {models}: make trains into {default} only, so it trains nothing first")
        return []
    stages = to_train(models, args.methods)
    for stage in ["sft", "reward", *args.methods]:
        if stage not in stages:
            log(f"{stage}: {models / stage} is finished; kept (make {stage} ARGS=--overwrite redoes it)")
    if stages:
        hints = ", ".join(f"{s} (`make {outputs.MAKE_TARGET[s]} RECIPE={args.recipe}`)" for s in stages)
        log(f"compare: training first, as they are not finished: {hints}; then comparing {', '.join(args.methods)}")
    return stages


def make_hint(method: str, recipe: str) -> str:
    return f"make {outputs.MAKE_TARGET[method]} RECIPE={recipe}"


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def stage_cost(folder: Path) -> dict:
    """What a finished stage's training cost, from its marker and manifest; None for what it did not record.

    Returns {"wall_time_s": seconds, "peak_memory_mib": MiB, "peak_memory_kind": "gpu" | "cpu_resident",
    "tokens_generated": completion tokens sampled while training, "attempts": starts of the run (more than 1: it
    was resumed, and `wall_time_s`, which `outputs.finish` takes from the last start, leaves the earlier ones out),
    "processes": how many processes trained (peak memory is the main one's)}."""
    marker = _read_json(folder / outputs.MARKER)
    manifest = _read_json(folder / marker.get("manifest", outputs.MANIFEST))

    def number(record: dict, key: str):
        value = record.get(key)
        return value if isinstance(value, int | float) and not isinstance(value, bool) else None

    return {
        "wall_time_s": number(manifest, "wall_time_s"),
        "peak_memory_mib": number(marker, "peak_memory_mib"),
        "peak_memory_kind": marker.get("peak_memory_kind") if number(marker, "peak_memory_mib") is not None else None,
        "tokens_generated": number(marker, "tokens_generated"),
        "attempts": len(manifest["attempts"]) if isinstance(manifest.get("attempts"), list) else None,
        "processes": number(marker, "processes"),
    }


def wall_time_cell(cost: dict) -> str:
    """The wall time, marked `*` when it is a resumed run's last attempt only (the note under the table says so)."""
    resumed = (cost.get("attempts") or 0) > 1 and cost["wall_time_s"] is not None
    return evaluate.fmt(cost["wall_time_s"], 0) + ("*" if resumed else "")


def started_elsewhere(models: Path, method: str) -> str | None:
    """The input of `method`'s run (sft_model_path, reward_model_path) whose recorded fingerprint is not the current
    models/<recipe>/sft or reward output's (retrained since), or None. Such a method is judged against an SFT model
    or reward model it was not trained with."""
    inputs = _read_json(models / method / outputs.MANIFEST).get("inputs") or {}
    for key, stage in (("sft_model_path", "sft"), ("reward_model_path", "reward")):
        recorded = (inputs.get(key) or {}).get("sha256")
        if recorded and (models / stage).is_dir() and recorded != outputs.fingerprint(models / stage):
            return key
    return None


def memory_cell(cost: dict) -> str:
    if cost.get("peak_memory_mib") is None:
        return "-"
    kind = {"gpu": "gpu", "cpu_resident": "cpu"}.get(cost.get("peak_memory_kind"), "?")
    # the main process's peak (outputs.peak_memory): a run over N processes (or GPUs) held about N times that
    processes = cost.get("processes") or 1
    return f"{cost['peak_memory_mib']:.0f} {kind}" + (f" x{processes:.0f}" if processes > 1 else "")


def cost_rows(costs: dict, methods: Sequence[str]) -> list[tuple[str, list[str]]]:
    """The table's cost rows, shaped like `evaluate.metric_rows` (SFT's cell first, "-": the methods' own costs)."""

    def cells(render: Callable[[dict], str]) -> list[str]:
        return ["-", *[render(costs[m]) for m in methods]]

    return [
        ("training wall time (s)", cells(wall_time_cell)),
        ("peak memory (MiB; cpu resident / gpu)", cells(memory_cell)),
        (
            "tokens generated in training",
            cells(lambda c: "-" if c["tokens_generated"] is None else str(c["tokens_generated"])),
        ),
    ]


def rows(summary: dict) -> list[tuple[str, list[str]]]:
    methods = summary["methods"]
    return evaluate.metric_rows(summary["stages"], methods) + cost_rows(summary["costs"], methods)


def notes(summary: dict) -> list[str]:
    """The lines under the table: the ground truth per method (with a warning for each that did not beat SFT),
    the reward-hacking warnings, what the costs leave out, and the methods not finished."""
    lines = [*evaluate.truth_notes(summary["stages"], summary["methods"])]
    lines += [f"warning: {warning}" for warning in summary["warnings"]]
    shared = summary["shared_costs"]
    lines.append(
        f"costs are each method's own training stage; every method starts from the SFT model (sft: "
        f"{evaluate.fmt(shared['sft']['wall_time_s'], 0)} s) and all but DPO and KTO score with the reward model "
        f"(reward: {evaluate.fmt(shared['reward']['wall_time_s'], 0)} s)"
    )
    resumed = [m for m in summary["methods"] if wall_time_cell(summary["costs"][m]).endswith("*")]
    if resumed:
        lines.append(
            f"* {', '.join(resumed)}: resumed after an interruption; the wall time is the last attempt's only "
            "(each attempt is in its manifest.json)"
        )
    for method, key in summary.get("stale", {}).items():
        lines.append(
            f"warning: {evaluate.name(method)} was trained from another {key} than the one compared against (retrained "
            f"since): its numbers do not measure what it gained; `make {outputs.MAKE_TARGET[method]} "
            f"RECIPE={summary['recipe']} ARGS=--overwrite` retrains it"
        )
    if summary["missing"]:
        lines.append(
            "missing (not finished): " + ", ".join(f"{m} (run `{hint}`)" for m, hint in summary["missing"].items())
        )
    return lines


def settings(summary: dict) -> str:
    return (
        f"{summary['prompts']} held-out prompts x {summary['samples']} samples (temperature "
        f"{summary['temperature']}, up to {summary['max_new_tokens']} new tokens, seed {summary['seed']}); "
        f"reward model pairwise accuracy {summary['reward_accuracy']:.3f} on {summary['pairs']} held-out pairs"
    )


def table(summary: dict) -> list[str]:
    """What `make compare` prints last: the settings, one column per stage, then the notes."""
    return [
        f"compare: {summary['recipe']}: {settings(summary)}",
        *evaluate.text_table(["sft", *summary["methods"]], rows(summary)),
        *notes(summary),
    ]


def markdown(summary: dict) -> str:
    from .report import markdown_table

    names = ["SFT", *map(evaluate.name, summary["methods"])]
    lines = [
        f"# Which method? {summary['recipe']}",
        "",
        f"Written by `make compare` (rlhf_trl.compare) from `{summary['models']}`: {settings(summary)}; prompts "
        f"from `{summary['prompts_file']}`, the same prompts and seed for every stage (as `make eval`).",
        "",
        *markdown_table(names, rows(summary)),
        "",
        "Win rate: the share of answers the reward model scores above SFT's answer to the same prompt and sample "
        "(a tie counts half). KL: log-probability under the method minus under SFT, summed over each answer's "
        "tokens, averaged over the method's own answers. Peak memory: the GPU's allocated peak (gpu) or the "
        "training process's resident set (cpu), of one process; xN: the run had N processes, each about as large.",
        "",
        *[f"- {line.replace('warning: ', '**Warning:** ')}" for line in notes(summary)],
        "",
        f"![SFT and each method]({PLOT})",
        "",
    ]
    return "\n".join(lines)


def plot(path: Path, summary: dict) -> bool:
    """compare.png: bars per stage for the ground truth (demo; else the EOS rate), the reward-model score and the
    win rate over SFT, and the reward-model score against the KL from SFT; False when no method was judged."""
    from .report import _pyplot, save

    methods, stages = summary["methods"], summary["stages"]
    if not methods:
        return False
    plt = _pyplot()
    figure, axes = plt.subplots(2, 2, figsize=(10.0, 7.2))
    everyone = ["sft", *methods]
    labels = [evaluate.name(s) for s in everyone]
    colors = [COLORS.get(s, "tab:red") for s in everyone]
    with_truth = stages["sft"].get("ground_truth") is not None
    key, title = (
        ("ground_truth", f"ground truth ({stages['sft'].get('ground_truth_rule', 'demo rule')}; higher is better)")
        if with_truth
        else (
            "eos_rate",
            "answers ending with EOS",
        )
    )
    panels = (
        (axes[0, 0], [stages[s][key] for s in everyone], labels, colors, title, stages["sft"][key]),
        (axes[0, 1], [stages[s]["reward_score"] for s in everyone], labels, colors, "mean reward-model score",
         stages["sft"]["reward_score"]),
        (axes[1, 0], [stages[m]["win_rate"] for m in methods], labels[1:], colors[1:],
         "win rate over SFT (reward model; 0.5 = as good)", 0.5),
    )  # fmt: skip
    for axis, values, names, palette, name, level in panels:
        bars = axis.bar(names, [v if v is not None else 0 for v in values], color=palette)
        axis.bar_label(bars, labels=[evaluate.fmt(v, 2) for v in values], fontsize=8)
        axis.axhline(level, linestyle="--", color="black", linewidth=1)  # SFT's level (win rate: a coin toss)
        axis.set_title(name, fontsize=10)
        axis.grid(alpha=0.3, axis="y")
        axis.margins(y=0.15)
    scatter = axes[1, 1]
    for stage, label, color in zip(everyone, labels, colors, strict=True):
        x, y = stages[stage]["kl"], stages[stage]["reward_score"]
        scatter.scatter([x], [y], s=60, color=color)
        scatter.annotate(label, (x, y), textcoords="offset points", xytext=(6, 4), fontsize=9)
    scatter.set_title("reward-model score against KL from SFT", fontsize=10)
    scatter.set_xlabel("KL from SFT (nats per answer)")
    scatter.set_ylabel("mean reward-model score")
    scatter.grid(alpha=0.3)
    figure.suptitle(f"{summary['recipe']}: SFT and each method on the same held-out prompts")
    return save(plt, figure, path)


def compare(args, log: Callable[[str], None] = print) -> dict:
    """Judges SFT and every finished method of `args.methods`, writes the compare folder and returns compare.json."""
    models = args.models or Path("models", args.recipe)
    finished, missing = split_methods(models, args.methods)
    if not finished:
        raise UserError(
            f"no finished method in {models} ({', '.join(args.methods)}): run `make compare RECIPE={args.recipe}` "
            f"(it trains them) or one of them, e.g. `{make_hint(args.methods[0], args.recipe)}`"
        )
    for method in missing:
        log(f"compare: {method} is not finished ({models / method}); `{make_hint(method, args.recipe)}` trains it")
    output = args.output or models / "compare"
    outputs.check_writable(output, overwrite=True)  # refuse a folder that is not ours before the long part
    config = {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}
    config["compared"] = [str(models / stage) for stage in ("sft", "reward", *finished)]
    inputs = outputs.input_fingerprints({"compared": config["compared"]})  # each output's marker: which run it was
    manifest = outputs.new_manifest("compare", config, inputs)

    judge = evaluate.prepare(args, finished, log)
    for method in finished:
        evaluate.judge_method(judge, method, log)
    summary = {
        **evaluate.result(judge),
        "costs": {m: stage_cost(models / m) for m in finished},
        "shared_costs": {stage: stage_cost(models / stage) for stage in ("sft", "reward")},
        "missing": {m: make_hint(m, args.recipe) for m in missing},
        "stale": {m: key for m in finished if (key := started_elsewhere(models, m))},
    }
    with outputs.stage_output(output, overwrite=True) as work:
        outputs.write_atomically(work / outputs.MANIFEST, (json.dumps(manifest, indent=2, default=str) + "\n").encode())
        (work / "compare.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        plot(work / PLOT, summary)
        (work / "compare.md").write_text(markdown(summary), encoding="utf-8")
        outputs.finish(work, output, "compare", methods=finished, missing=list(missing))
    log(f"compare: wrote {output / 'compare.md'}, compare.json and {PLOT}")
    for line in table(summary):
        log(line)
    return summary


def parser() -> argparse.ArgumentParser:
    parser = evaluate.add_sampling_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=outputs.METHODS,
        default=list(outputs.METHODS),
        help="the methods to compare with SFT (default: all; the ones not finished are listed as missing)",
    )
    parser.add_argument("--output", type=Path, default=None, help="folder to write (default: <models>/compare)")
    parser.add_argument(
        "--to-train",
        action="store_true",
        help="print the stages `make compare` must train first (one a line), compare nothing; what and why on stderr",
    )
    return parser


def main(argv=None) -> None:
    import sys

    args = parser().parse_args(argv)
    if args.to_train:
        for stage in plan(args, lambda line: print(line, file=sys.stderr)):
            print(stage)
        return
    compare(args)


if __name__ == "__main__":
    run(main)
