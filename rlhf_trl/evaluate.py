"""Did RLHF help? SFT and PPO answer the same held-out prompts, and the reward model and the ground truth judge.

    python -m rlhf_trl.evaluate --recipe demo [--prompts FILE] [--pairs FILE] [--samples 4]   # `make eval`

Prints one table and writes `models/<recipe>/eval.json` (read by `make report`):
- the reward model's pairwise accuracy on held-out preference pairs (chosen scored above rejected), without the
  pairs whose two sides encode to the same ids (`rewards.encode_pairs`: a tie no model can win; counted, printed);
- for SFT and PPO: the mean reward-model score, the win rate of PPO over SFT (the same prompt and sample
  index, judged by the reward model; a tie counts half), the KL divergence of PPO from SFT, the mean answer
  length in tokens and the share of answers that end with EOS (any of the model's stop ids: the tokenizer's EOS
  and its generation_config's eos_token_id, e.g. Llama 3's <|eot_id|>); for `demo`, the ground-truth score
  (`demo.ground_truth_score`, a rule in code);
- a warning when the reward rises while the ground truth or the EOS rate falls, the usual sign of reward
  hacking (the reward model scores answers through the chat template, which closes every answer with EOS,
  so an answer cut off at the token limit can still score well: the EOS rate shows it).

The metrics are pure functions of lists and tensors, so tests check them on inputs whose answer is known;
`main` only loads the models (through `modeling`), samples and calls them.

KL: the PPO answers are sampled from the full distribution (top-k off) at `--temperature` T, then scored
teacher-forced under the PPO policy and under the SFT model, both with logits / T; the log-ratio summed
over the answer's tokens and averaged over answers is an unbiased estimate of KL(PPO_T || SFT_T) in nats
per answer. That is the quantity TRL's `objective/kl` tracks during PPO (it samples and scores at the
recipe's temperature too); with `--temperature 1` it is the KL between the models themselves.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from . import demo, outputs
from .cli import UserError, run
from .data import load_dataset_for, seed_pair_files
from .generation import as_id_list, first_stop_trim, stop_token_ids
from .modeling import for_inference, generate, load_model, load_tokenizer, render_prompt, sampling_line
from .rewards import describe_pairs, encode_pairs, score_answers

# ---------------------------------------------------------------------------------------------- metrics


def mean(values: Sequence[float]) -> float:
    return float(statistics.fmean(values)) if len(values) else float("nan")


def pairwise_accuracy(chosen_scores: Sequence[float], rejected_scores: Sequence[float]) -> float:
    """Share of pairs whose chosen answer scores strictly higher (a tie is wrong), as TRL's RewardTrainer counts."""
    if len(chosen_scores) != len(rejected_scores):
        raise ValueError("chosen and rejected scores differ in length")
    return mean([float(c > r) for c, r in zip(chosen_scores, rejected_scores, strict=True)])


def win_rate(policy_scores: Sequence[float], reference_scores: Sequence[float]) -> float:
    """Share of paired answers where the policy's scores higher than the reference's; a tie counts half."""
    if len(policy_scores) != len(reference_scores):
        raise ValueError("policy and reference scores differ in length")
    return mean([float(p > r) + 0.5 * float(p == r) for p, r in zip(policy_scores, reference_scores, strict=True)])


def trim(ids: Sequence[int], stop_ids: int | Sequence[int]) -> list[int]:
    """An answer's tokens up to and including its first stop id (generation pads after it).

    `stop_ids` is one id or the model's list (`generation.stop_token_ids`: the tokenizer's EOS and the
    generation_config's eos_token_id, e.g. Llama 3's <|end_of_text|> and <|eot_id|>)."""
    return first_stop_trim(ids, stop_ids)


def eos_rate(responses: Sequence[Sequence[int]], stop_ids: int | Sequence[int]) -> float:
    """Share of answers that stopped with a stop id (EOS or end of turn) rather than running into the token limit."""
    stops = set(as_id_list(stop_ids))
    return mean([float(any(token in stops for token in ids)) for ids in responses])


def mean_length(responses: Sequence[Sequence[int]], stop_ids: int | Sequence[int]) -> float:
    """Mean answer length in tokens, counting the first stop id and nothing after it."""
    return mean([len(trim(ids, stop_ids)) for ids in responses])


@torch.no_grad()
def response_logprobs(
    model,
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    pad_id: int,
    temperature: float = 1.0,
    batch_size: int = 32,
) -> torch.Tensor:
    """log p(response | prompt) per answer, teacher-forced: the sum of its tokens' log-probabilities.

    Sequences are right-padded (positions start at 0 at the first real token, as in generation), and each
    token's log-probability is its logit minus the logsumexp of its row, so no log-softmax copy of the
    logits is made. Returns a float64 tensor with one value per answer.
    """
    if len(prompts) != len(responses):
        raise ValueError("prompts and responses differ in length")
    device = next(model.parameters()).device
    totals = []
    for start in range(0, len(prompts), batch_size):
        rows = [list(p) + list(r) for p, r in zip(prompts[start : start + batch_size], responses[start:], strict=False)]
        width = max(len(row) for row in rows)
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        scored = torch.zeros((len(rows), width - 1), dtype=torch.bool)  # position t predicts token t + 1
        for i, (row, prompt) in enumerate(zip(rows, prompts[start:], strict=False)):
            input_ids[i, : len(row)] = torch.tensor(row)
            attention_mask[i, : len(row)] = 1
            scored[i, len(prompt) - 1 : len(row) - 1] = True
        logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits[:, :-1]
        logits = logits.double() / temperature
        targets = input_ids[:, 1:].to(device)
        token_logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
        totals.append((token_logp * scored.to(device)).sum(-1).cpu())
    return torch.cat(totals) if totals else torch.zeros(0, dtype=torch.float64)


def kl_divergence(
    policy,
    reference,
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    pad_id: int,
    temperature: float = 1.0,
) -> float:
    """Mean over answers sampled from `policy` of log p_policy(answer) - log p_reference(answer), in nats.

    Unbiased for KL(policy || reference) when the answers were sampled from the policy at `temperature`
    with nothing truncated (no top-k/top-p); a single estimate may come out slightly negative.
    """
    policy_logp = response_logprobs(policy, prompts, responses, pad_id, temperature)
    reference_logp = response_logprobs(reference, prompts, responses, pad_id, temperature)
    return float((policy_logp - reference_logp).mean()) if len(responses) else float("nan")


def hacking_warnings(sft: dict, ppo: dict, eos_drop: float = 0.05) -> list[str]:
    """Reward up while the ground truth or the EOS rate goes down: PPO likely found a hole in the reward model."""
    if not ppo["reward_score"] > sft["reward_score"]:
        return []
    rise = f"the reward-model score rose ({sft['reward_score']:.3f} -> {ppo['reward_score']:.3f})"
    found = []
    if sft.get("ground_truth") is not None and ppo.get("ground_truth") is not None:
        if ppo["ground_truth"] < sft["ground_truth"]:
            found.append(
                f"{rise} but the ground truth fell ({sft['ground_truth']:.3f} -> {ppo['ground_truth']:.3f}): "
                "likely reward hacking"
            )
    if ppo["eos_rate"] < sft["eos_rate"] - eos_drop:
        found.append(
            f"{rise} but fewer answers end with EOS ({sft['eos_rate']:.2f} -> {ppo['eos_rate']:.2f}): "
            "likely reward hacking (answers run into the token limit)"
        )
    return found


# --------------------------------------------------------------------------------------- reward model


def load_reward_model(path: str | Path):
    """The reward output (a LoRA adapter + score head on the SFT model), merged, and its tokenizer."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    tokenizer = load_tokenizer(path, padding_side="right")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the base loads without a score head ("MISSING"): the adapter brings it
    try:
        model = for_inference(
            load_model(path, AutoModelForSequenceClassification, {"num_labels": 1}, what="reward model")
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def reward_accuracy(model, tokenizer, pairs: list[dict], log: Callable[[str], None] = print) -> tuple[float, dict]:
    """The reward model's pairwise accuracy on converted preference `pairs`, and the pair counts behind it.

    Pairs whose two sides encode to the same ids (`rewards.encode_pairs`) are left out and counted in the printed
    line: their scores tie, which `pairwise_accuracy` counts as a miss, so they would cap the accuracy below 1
    whatever the model. Returns (accuracy, {"read", "kept", ...encode_pairs' counts}); NaN when no pair is left.
    """
    kept, counts = encode_pairs(tokenizer, pairs)
    log(f"eval: held-out pairs: {describe_pairs(counts)}")
    pairs = [pairs[row["index"]] for row in kept]
    prompts = [p["prompt"] for p in pairs]
    chosen = score_answers(model, tokenizer, prompts, [message_text(p["chosen"]) for p in pairs])
    rejected = score_answers(model, tokenizer, prompts, [message_text(p["rejected"]) for p in pairs])
    return pairwise_accuracy(chosen, rejected), {**counts, "kept": len(pairs)}


def message_text(messages: list[dict]) -> str:
    """The text of an assistant answer given as messages (preference pairs hold their answers that way)."""
    return "".join(m["content"] for m in messages)


# ------------------------------------------------------------------------------------------- running


def default_data(recipe: str, name: str, given: Path | None, flag: str) -> Path:
    path = given or Path("data/processed", recipe, f"{name}_eval.jsonl")
    seed_layout = Path("data/processed", recipe, "eval")  # `pair_layout: accepted_rejected` keeps eval pairs here
    if given is None and not path.exists() and seed_pair_files(str(seed_layout)):
        path = seed_layout
    if not path.exists():
        if given is None:
            raise UserError(
                f"held-out {name} {path} do not exist: run `make data RECIPE={recipe}` first, or pass your own "
                f'(make eval ARGS="{flag} FILE")'
            )
        raise UserError(f"{flag} {path} does not exist")
    return path


def sample_stage(model, tokenizer, prompts: list[list[dict]], args) -> tuple[list[str], list[list[int]]]:
    """`samples` answers per prompt, from the full distribution at the temperature (top-k and top-p off, nothing
    taken from the model's generation_config.json: see KL above and `generation.sampling_config`)."""
    return generate(
        model,
        tokenizer,
        prompts,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        samples=args.samples,
        seed=args.seed,
        return_ids=True,
    )


def evaluate(args, log: Callable[[str], None] = print) -> dict:
    """Runs the whole evaluation for parsed `args` and returns what eval.json holds."""
    if args.samples < 1 or args.max_new_tokens < 1:
        raise UserError("--samples and --max-new-tokens must be at least 1")
    if args.temperature <= 0:
        raise UserError("--temperature must be above 0: the KL estimate needs sampled answers")
    models = args.models or Path("models", args.recipe)
    paths = {stage: models / stage for stage in ("sft", "reward", "ppo")}
    for stage, path in paths.items():
        outputs.require(path, stage, args.recipe)
    prompts_file = default_data(args.recipe, "prompts", args.prompts, "--prompts")
    pairs_file = default_data(args.recipe, "pairs", args.pairs, "--pairs")
    prompts = [row["prompt"] for row in load_dataset_for(str(prompts_file), "prompts")]
    pairs = load_dataset_for(str(pairs_file), "reward")
    if args.max_prompts:
        prompts, pairs = prompts[: args.max_prompts], pairs[: args.max_prompts * 4]
    with_truth = args.recipe == "demo"

    reward_model, reward_tokenizer = load_reward_model(paths["reward"])
    accuracy, pair_counts = reward_accuracy(reward_model, reward_tokenizer, pairs, log)

    tokenizer = load_tokenizer(paths["sft"])
    pad = tokenizer.pad_token_id
    expanded = [p for p in prompts for _ in range(args.samples)]  # generate's order: each prompt's samples together
    prompt_ids = [tokenizer(render_prompt(tokenizer, p), add_special_tokens=False)["input_ids"] for p in expanded]
    sft_model = for_inference(load_model(paths["sft"], what="sft model"))
    stages: dict[str, dict] = {}
    answers: dict[str, list[str]] = {}
    for stage in ("sft", "ppo"):
        model = sft_model if stage == "sft" else for_inference(load_model(paths["ppo"], what="ppo model"))
        log(sampling_line(f"eval: {stage} answers", model, tokenizer, args.max_new_tokens, args.temperature))
        answers[stage], ids = sample_stage(model, tokenizer, prompts, args)
        stops = stop_token_ids(tokenizer, model)
        scores = score_answers(reward_model, reward_tokenizer, expanded, answers[stage])
        truth = (
            [demo.ground_truth_score(p[-1]["content"], a) for p, a in zip(expanded, answers[stage], strict=True)]
            if with_truth
            else None
        )
        stages[stage] = {
            "reward_score": mean(scores),
            "length": mean_length(ids, stops),
            "eos_rate": eos_rate(ids, stops),
            "ground_truth": mean(truth) if truth is not None else None,
            "scores": scores,
            "truth": truth,
        }
        if stage == "ppo":
            stages["ppo"]["kl"] = kl_divergence(model, sft_model, prompt_ids, ids, pad, args.temperature)
            stages["sft"]["kl"] = 0.0
    stages["ppo"]["win_rate"] = win_rate(stages["ppo"]["scores"], stages["sft"]["scores"])

    result = {
        "recipe": args.recipe,
        "models": str(models),
        "prompts_file": str(prompts_file),
        "pairs_file": str(pairs_file),
        "prompts": len(prompts),
        "samples": args.samples,
        "temperature": args.temperature,
        "max_new_tokens": args.max_new_tokens,
        "seed": args.seed,
        "reward_accuracy": accuracy,
        "pairs": pair_counts["kept"],
        "identical_pairs_left_out": pair_counts["read"] - pair_counts["kept"],
        "stages": {stage: {k: v for k, v in s.items() if k not in ("scores", "truth")} for stage, s in stages.items()},
        "warnings": hacking_warnings(stages["sft"], stages["ppo"]),
        "scores": {stage: s["scores"] for stage, s in stages.items()},
        "generations": [
            {
                "prompt": prompt[-1]["content"],
                **{
                    stage: {
                        "answer": answers[stage][i],
                        "score": stages[stage]["scores"][i],
                        "ground_truth": stages[stage]["truth"][i] if with_truth else None,
                    }
                    for stage in ("sft", "ppo")
                },
            }
            for i, prompt in enumerate(expanded)
        ],
    }
    output = args.output or models / "eval.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    for line in table(result):
        log(line)
    log(f"eval: wrote {output}")
    return result


def table(result: dict) -> list[str]:
    """The printed summary: reward-model accuracy, then SFT and PPO side by side, then any warnings."""
    sft, ppo = result["stages"]["sft"], result["stages"]["ppo"]
    rows = [
        ("mean reward-model score", f"{sft['reward_score']:.3f}", f"{ppo['reward_score']:.3f}"),
        ("win rate over SFT (reward model)", "-", f"{ppo['win_rate']:.2f}"),
        ("KL from SFT (nats per answer)", "0", f"{ppo['kl']:.3f}"),
        ("mean length (tokens)", f"{sft['length']:.1f}", f"{ppo['length']:.1f}"),
        ("answers ending with EOS", f"{sft['eos_rate']:.2f}", f"{ppo['eos_rate']:.2f}"),
    ]
    if sft.get("ground_truth") is not None:
        rows.append(("ground truth (demo rule)", f"{sft['ground_truth']:.2f}", f"{ppo['ground_truth']:.2f}"))
    lines = [
        f"eval: reward model pairwise accuracy {result['reward_accuracy']:.3f} on {result['pairs']} held-out pairs",
        f"eval: {result['prompts']} held-out prompts x {result['samples']} samples "
        f"(temperature {result['temperature']}, up to {result['max_new_tokens']} new tokens)",
        f"  {'':34} {'sft':>8} {'ppo':>8}",
    ]
    lines += [f"  {name:34} {a:>8} {b:>8}" for name, a, b in rows]
    if sft.get("ground_truth") is not None:
        lines.append(f"ground truth: sft {sft['ground_truth']:.2f} -> ppo {ppo['ground_truth']:.2f}")
        if ppo["ground_truth"] <= sft["ground_truth"]:
            lines.append("warning: PPO did not beat SFT on the ground truth: RLHF did not help this run")
    lines += [f"warning: {warning}" for warning in result["warnings"]]
    return lines


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="demo")
    parser.add_argument(
        "--models", type=Path, default=None, help="folder holding sft/, reward/, ppo/ (default: models/<recipe>)"
    )
    parser.add_argument(
        "--prompts",
        type=Path,
        default=None,
        help="held-out prompts (default: data/processed/<recipe>/prompts_eval.jsonl)",
    )
    parser.add_argument(
        "--pairs",
        type=Path,
        default=None,
        help="held-out preference pairs (default: data/processed/<recipe>/pairs_eval.jsonl)",
    )
    parser.add_argument("--samples", type=int, default=4, help="answers sampled per prompt")
    parser.add_argument("--max-prompts", type=int, default=None, help="use only the first N prompts (and 4N pairs)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument(
        "--temperature", type=float, default=0.7, help="sampling temperature (the KL is measured at it)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=None, help="default: <models>/eval.json")
    return parser


def main(argv=None) -> None:
    evaluate(parser().parse_args(argv))


if __name__ == "__main__":
    run(main)
