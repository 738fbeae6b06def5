"""Did RLHF help? For the `demo` recipe a rule in code, not a model, answers that.

    python -m rlhf_trl.groundtruth --recipe demo     # what `make groundtruth` and the end of `make all` run

The SFT and PPO models answer the same held-out prompts (subjects no reward-model or PPO prompt used),
with the same sampling seed, and `demo.ground_truth_score` grades every answer. Prints, for example,
`ground truth: sft 0.31 -> ppo 0.64`, and exits 1 when PPO did not beat SFT.
"""

import argparse
import json
import sys
from pathlib import Path

from . import demo, outputs
from .cli import UserError, run
from .data import convert, load_records
from .modeling import generate, load_model, load_tokenizer


def score_stage(path: Path, prompts: list[list[dict]], samples: int, max_new_tokens: int, seed: int) -> dict:
    tokenizer = load_tokenizer(path)
    model = load_model(path).eval()
    answers = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, samples=samples, seed=seed)
    questions = [p[-1]["content"] for p in prompts for _ in range(samples)]
    scores = [demo.ground_truth_score(q, a) for q, a in zip(questions, answers, strict=True)]
    return {"score": sum(scores) / len(scores), "examples": list(zip(questions, answers, scores, strict=True))[:6]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="demo")
    parser.add_argument(
        "--prompts", type=Path, default=None, help="default: data/processed/<recipe>/prompts_eval.jsonl"
    )
    parser.add_argument("--samples", type=int, default=4, help="answers sampled per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.recipe != "demo" and args.prompts is None:
        raise UserError(f"recipe {args.recipe} has no ground truth: only the demo's preference rule is known in code")
    prompts_file = args.prompts or Path("data/processed", args.recipe, "prompts_eval.jsonl")
    prompts = [row["prompt"] for row in convert(load_records(str(prompts_file)), "prompts", str(prompts_file))]
    results = {}
    for stage in ("sft", "ppo"):
        path = Path("models", args.recipe, stage)
        outputs.require(path, stage, args.recipe)
        results[stage] = score_stage(path, prompts, args.samples, args.max_new_tokens, args.seed)
    for stage in ("sft", "ppo"):
        for question, answer, score in results[stage]["examples"][:2]:
            print(f"  [{stage}] {question} -> {answer!r} ({score:.0f})")
    sft, ppo = results["sft"]["score"], results["ppo"]["score"]
    report = Path("models", args.recipe, "groundtruth.json")
    report.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(
        f"ground truth: sft {sft:.2f} -> ppo {ppo:.2f} ({len(prompts)} held-out prompts x {args.samples} samples; "
        f"details in {report})"
    )
    if ppo <= sft:
        print("ground truth: PPO did not beat SFT", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    run(main)
