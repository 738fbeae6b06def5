"""Do our PPO engine and TRL 1.12's learn alike? Reward and KL curves of both, over seeds.

    make bench-engines                                   # demo recipe, seeds 0 1 2 (about 5 minutes on 2 CPU cores)
    python -m benchmarks.compare_engines --recipe demo --seeds 0 1 2 [--ppo-args "--total_episodes 960"]

`reference/test_against_trl.py` (`make test-reference`) shows that our engine computes TRL's update step for step
when both hold the same models. With the shared base (the recipes' setting) the value model is an adapter and a
head instead of a full copy, so the runs part after the first update and only a statistical comparison is left:
this runs the recipe once per engine and seed (same seed, same prompts, same SFT and reward models) and compares
each engine's mean score and KL over the second half of the updates with the spread between seeds of one engine.
Ours is the PPO stage (`python -m rlhf_trl.ppo`) in this environment; TRL's is TRL 1.12's PPOTrainer with
separate models (`python -m reference.trl_ppo`), in the reference environment (`.venv-reference`, built by
`make reference-env`), since TRL 1.13 deleted PPO.
"Within noise" means the gap between the engines' means is no larger than the larger of the two engines' seed
spreads (max - min). The stage outputs go to a temporary folder; the recipe's own outputs are not touched.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import reference
from rlhf_trl.cli import UserError

ROOT = Path(__file__).resolve().parents[1]
KEYS = ("objective/scores", "objective/kl")


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="demo")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--engines", nargs="+", default=["trl", "ours"], choices=["trl", "ours"])
    parser.add_argument("--models", default=str(ROOT / "models"), help="where <recipe>/sft and <recipe>/reward are")
    parser.add_argument("--ppo-args", default="", help="extra `--key value` settings for every PPO run")
    parser.add_argument("--out", help="JSON path (default: benchmarks/results/<date>-engines-<recipe>.json)")
    return parser.parse_args(argv)


def windows(updates: int) -> list[tuple[int, int]]:
    """The first sixth, the next third and the second half of the updates (1-10, 11-30, 31-60 for 60)."""
    first, middle = max(1, updates // 6), max(2, updates // 2)
    return [(0, first), (first, middle), (middle, updates)]


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def summarise(curves: dict[str, dict[int, list[dict]]]) -> dict:
    """Per run: window means of score and KL; per engine: the mean and seed spread over the second half."""
    runs, engines = {}, {}
    for engine, by_seed in curves.items():
        late = {key: [] for key in KEYS}
        for seed, logs in by_seed.items():
            spans = windows(len(logs))
            runs[f"{engine} {seed}"] = {
                key: [mean([log[key] for log in logs[a:b]]) for a, b in spans] for key in KEYS
            } | {"updates": len(logs), "windows": [f"{a + 1}-{b}" for a, b in spans]}
            for key in KEYS:
                late[key].append(runs[f"{engine} {seed}"][key][-1])
        engines[engine] = {key: {"mean": mean(v), "spread": max(v) - min(v)} for key, v in late.items()}
    verdict = {}
    if len(engines) == 2:
        (a, first), (b, second) = engines.items()
        for key in KEYS:
            gap = abs(first[key]["mean"] - second[key]["mean"])
            noise = max(first[key]["spread"], second[key]["spread"])
            verdict[key] = {"gap": gap, "seed_spread": noise, "within_noise": gap <= noise}
    return {"runs": runs, "engines": engines, "verdict": verdict}


def table(summary: dict) -> str:
    lines = []
    any_run = next(iter(summary["runs"].values()))
    spans = "  ".join(f"{w:>6}" for w in any_run["windows"])
    lines.append(f"{'run':8} | mean score, updates {spans} | mean KL, updates {spans}")
    for name, run in summary["runs"].items():
        scores = "  ".join(f"{v:6.3f}" for v in run["objective/scores"])
        kls = "  ".join(f"{v:6.3f}" for v in run["objective/kl"])
        lines.append(f"{name:8} |                     {scores} |                  {kls}")
    for engine, stats in summary["engines"].items():
        parts = [f"{key.split('/')[1]} {s['mean']:.3f} (seed spread {s['spread']:.3f})" for key, s in stats.items()]
        lines.append(f"{engine}, second half: " + ", ".join(parts))
    for key, v in summary["verdict"].items():
        word = "within" if v["within_noise"] else "OUTSIDE"
        lines.append(f"{key}: engines differ by {v['gap']:.3f}, {word} the seed spread of {v['seed_spread']:.3f}")
    return "\n".join(lines)


def fail(message: str) -> None:
    """One line on stderr and exit status 2, as the stages report bad input."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def run_ppo(
    recipe: str, engine: str, seed: int, output_dir: Path, extra: list[str], python: str | None = None
) -> tuple[list[dict], float]:
    """One PPO run of `engine`: ours, the stage in this environment, or trl, `reference.trl_ppo` run by `python`
    (the reference environment's interpreter); the logged updates and the wall time in seconds."""
    from rlhf_trl.metrics_log import read_metrics

    module = "reference.trl_ppo" if engine == "trl" else "rlhf_trl.ppo"
    command = [python or sys.executable, "-m", module, "--config", f"recipes/{recipe}/ppo.yaml"]
    command += ["--output_dir", str(output_dir), "--seed", str(seed), "--logging_steps", "1"]
    command += ["--save_strategy", "no", "--resume", "false", *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRL_EXPERIMENTAL_SILENCE": "1"}
    start = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
        fail(f"{engine} seed {seed} failed: {last}")
    logs = [log for log in read_metrics(output_dir) if "objective/scores" in log]
    return logs, seconds


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    recipe = ROOT / "recipes" / args.recipe / "ppo.yaml"
    if not recipe.is_file():
        fail(f"{recipe} does not exist: pick a folder of recipes/ with --recipe")
    for stage in ("sft", "reward"):
        folder = Path(args.models) / args.recipe / stage
        if not (folder / "rlhf_trl_run.json").is_file():
            fail(f"{folder} is not finished: run `make {stage} RECIPE={args.recipe}`")
    # TRL 1.12 runs in the reference environment: missing, that is one line before the first run.
    try:
        python = reference.python() if "trl" in args.engines else None
    except UserError as error:
        fail(str(error))
    extra = shlex.split(args.ppo_args)
    if Path(args.models) != ROOT / "models":  # the recipe names models/<recipe>/...: point it at the other folder
        models = Path(args.models) / args.recipe
        extra = ["--sft_model_path", str(models / "sft"), "--reward_model_path", str(models / "reward"), *extra]
    curves, seconds = {engine: {} for engine in args.engines}, {}
    with tempfile.TemporaryDirectory(prefix="engines-") as work:
        for seed in args.seeds:
            for engine in args.engines:  # alternated, so a busy machine slows both alike
                logs, took = run_ppo(args.recipe, engine, seed, Path(work) / f"{engine}-{seed}", extra, python)
                curves[engine][seed], seconds[f"{engine} {seed}"] = logs, round(took, 1)
                print(f"engines: {engine} seed {seed}: {len(logs)} updates in {took:.1f} s", flush=True)
    summary = summarise(curves)
    summary["wall_s"] = seconds
    summary["command"] = " ".join(["python -m benchmarks.compare_engines", *(argv or sys.argv[1:])])
    summary["date"] = datetime.date.today().isoformat()
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"{summary['date']}-engines-{args.recipe}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(table(summary))
    print(f"engines: wrote {out}")


if __name__ == "__main__":
    main()
