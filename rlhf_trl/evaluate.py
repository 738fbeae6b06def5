"""Did RLHF help? SFT and a stage-3 method answer the same held-out prompts; the reward model and ground truth judge.

    python -m rlhf_trl.evaluate --recipe demo [--stage ppo|rloo|grpo|dpo|kto] [--prompts FILE] [--samples 4]
    # `make eval`

Prints one table and writes `models/<recipe>/eval.json` for PPO (read by `make report` and the web page) or
`models/<recipe>/eval-<stage>.json` for another method (read by `make report STAGE=<stage>`), with the same keys:
- the reward model's pairwise accuracy on held-out preference pairs (chosen scored above rejected), without the
  pairs whose two sides encode to the same ids (`rewards.encode_pairs`: a tie no model can win; counted, printed);
- for SFT and the method: the mean reward-model score, the win rate of the method over SFT (the same prompt and
  sample index, judged by the reward model; a tie counts half), the KL divergence of the method from SFT, the mean
  answer length in tokens and the share of answers that end with EOS (any of the model's stop ids: the tokenizer's
  EOS and its generation_config's eos_token_id, e.g. Llama 3's <|eot_id|>); for `demo`, the ground-truth score
  (`demo.ground_truth_score`, a rule in code);
- a warning when the reward rises while the ground truth or the EOS rate falls, the usual sign of reward
  hacking (the reward model scores answers through the chat template, which closes every answer with EOS,
  so an answer cut off at the token limit can still score well: the EOS rate shows it).

`make compare` (rlhf_trl.compare) judges SFT and every finished method in one run through the same functions
(`prepare`, then `judge_method` per method): SFT's answers are sampled once, and each method's numbers equal the
ones `make eval STAGE=<method>` gives with the same settings.

The metrics are pure functions of lists and tensors, so tests check them on inputs whose answer is known;
`main` only loads the models (through `modeling`), samples and calls them.

KL: the method's answers are sampled from the full distribution (top-k off) at `--temperature` T, then scored
teacher-forced under the method's policy and under the SFT model, both with logits / T; the log-ratio summed
over the answer's tokens and averaged over answers is an unbiased estimate of KL(policy_T || SFT_T) in nats
per answer. That is the quantity TRL's `objective/kl` tracks during PPO (it samples and scores at the
recipe's temperature too); with `--temperature 1` it is the KL between the models themselves.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import demo, outputs, real_text
from .data import load_dataset_for, seed_pair_files
from .errors import UserError, run
from .generation import as_id_list, first_stop_trim, stop_token_ids
from .modeling import for_inference, generate, load_model, load_tokenizer, render_prompt, sampling_line
from .rewards import describe_pairs, encode_pairs, score_answers

# A recipe's ground truth: a rule checked in code and never shown to any model, (its name in tables, its scorer of
# (prompt text, answer) -> 1.0 or 0.0). demo: on-topic polite answers; smollm2-135m: the prompt's stated word limit.
GROUND_TRUTHS = {
    "demo": ("demo rule", demo.ground_truth_score),
    "smollm2-135m": ("word limit", real_text.ground_truth_score),
}

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


def paired_gain(method: Sequence[float], sft: Sequence[float], samples: int) -> tuple[float, float, int]:
    """(gain, standard error, prompts) of a method's per-answer values (the ground truth) over SFT's, paired by
    prompt: answers come `samples` to a prompt, in the same order for both; each prompt's gain is the mean of its
    method answers minus the mean of its SFT answers, and the standard error is that of the mean over prompts
    (stdev / sqrt(prompts)), since the answers to one prompt are not independent of each other. NaN under 2 prompts."""
    if len(method) != len(sft) or samples < 1 or len(sft) % samples:
        raise ValueError("method and SFT values must be the same prompts, `samples` answers each")
    gains = [mean(method[i : i + samples]) - mean(sft[i : i + samples]) for i in range(0, len(sft), samples)]
    error = statistics.stdev(gains) / len(gains) ** 0.5 if len(gains) > 1 else float("nan")
    return mean(gains), error, len(gains)


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


def hacking_warnings(sft: dict, policy: dict, eos_drop: float = 0.05, name: str = "PPO") -> list[str]:
    """Reward up while the ground truth or the EOS rate goes down: the method `name` (its metrics in `policy`)
    likely found a hole in the reward model. Each warning starts with `name`."""
    if not policy["reward_score"] > sft["reward_score"]:
        return []
    rise = f"{name}: the reward-model score rose ({sft['reward_score']:.3f} -> {policy['reward_score']:.3f})"
    found = []
    if sft.get("ground_truth") is not None and policy.get("ground_truth") is not None:
        if policy["ground_truth"] < sft["ground_truth"]:
            found.append(
                f"{rise} but the ground truth fell ({sft['ground_truth']:.3f} -> {policy['ground_truth']:.3f}): "
                "likely reward hacking"
            )
    if policy["eos_rate"] < sft["eos_rate"] - eos_drop:
        found.append(
            f"{rise} but fewer answers end with EOS ({sft['eos_rate']:.2f} -> {policy['eos_rate']:.2f}): "
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
    taken from the model's generation_config.json: see KL above and `generation.sampling_config`).

    `generate` seeds torch with `args.seed` before sampling, so a model's answers do not depend on which models
    were sampled before it: `make eval STAGE=x` and `make compare` give method x the same answers."""
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


def name(stage: str) -> str:
    """How tables and warnings name a stage: SFT, PPO, RLOO, GRPO, DPO, KTO."""
    return stage.upper()


@dataclass
class Judge:
    """What every method is judged against: the held-out prompts, the reward model and the SFT model's answers.

    Built once by `prepare`; `judge_method` adds one method's answers and metrics to `stages` and `answers`
    (keyed by stage, SFT's first), and `result` turns it into what eval.json holds."""

    args: argparse.Namespace
    models: Path
    prompts_file: Path
    pairs_file: Path
    prompts: list  # held-out conversations
    expanded: list  # each prompt `samples` times, in generate's order
    prompt_ids: list  # the rendered prompt's token ids, per answer
    reward_model: object
    reward_tokenizer: object
    tokenizer: object
    sft_model: object
    accuracy: float
    pair_counts: dict
    stages: dict = field(default_factory=dict)  # stage -> metrics, with per-answer "scores" and "truth"
    answers: dict = field(default_factory=dict)  # stage -> decoded answers

    @property
    def with_truth(self) -> bool:
        return self.args.recipe in GROUND_TRUTHS

    @property
    def methods(self) -> list[str]:
        return [stage for stage in self.stages if stage != "sft"]


def check_settings(args) -> None:
    if args.samples < 1 or args.max_new_tokens < 1:
        raise UserError("--samples and --max-new-tokens must be at least 1")
    if args.temperature <= 0:
        raise UserError("--temperature must be above 0: the KL estimate needs sampled answers")


def prepare(args, methods: Sequence[str], log: Callable[[str], None] = print) -> Judge:
    """Checks that sft, reward and every one of `methods` are finished (else names the make target), loads the
    held-out data and the reward model, measures its pairwise accuracy and samples and judges SFT's answers."""
    check_settings(args)
    models = args.models or Path("models", args.recipe)
    for stage in ("sft", "reward", *methods):
        outputs.require(models / stage, stage, args.recipe)
    prompts_file = default_data(args.recipe, "prompts", args.prompts, "--prompts")
    pairs_file = default_data(args.recipe, "pairs", args.pairs, "--pairs")
    prompts = [row["prompt"] for row in load_dataset_for(str(prompts_file), "prompts")]
    pairs = load_dataset_for(str(pairs_file), "reward")
    if args.max_prompts:
        prompts, pairs = prompts[: args.max_prompts], pairs[: args.max_prompts * 4]

    reward_model, reward_tokenizer = load_reward_model(models / "reward")
    accuracy, pair_counts = reward_accuracy(reward_model, reward_tokenizer, pairs, log)
    tokenizer = load_tokenizer(models / "sft")
    expanded = [p for p in prompts for _ in range(args.samples)]  # generate's order: each prompt's samples together
    judge = Judge(
        args=args,
        models=models,
        prompts_file=prompts_file,
        pairs_file=pairs_file,
        prompts=prompts,
        expanded=expanded,
        prompt_ids=[tokenizer(render_prompt(tokenizer, p), add_special_tokens=False)["input_ids"] for p in expanded],
        reward_model=reward_model,
        reward_tokenizer=reward_tokenizer,
        tokenizer=tokenizer,
        sft_model=for_inference(load_model(models / "sft", what="sft model")),
        accuracy=accuracy,
        pair_counts=pair_counts,
    )
    judge.stages["sft"], _ = judge_answers(judge, "sft", judge.sft_model, log)
    judge.stages["sft"]["kl"] = 0.0
    return judge


def judge_answers(judge: Judge, stage: str, model, log: Callable[[str], None]) -> tuple[dict, list[list[int]]]:
    """Samples `model`'s answers to the held-out prompts and scores them: (metrics, answer token ids)."""
    args = judge.args
    log(sampling_line(f"eval: {stage} answers", model, judge.tokenizer, args.max_new_tokens, args.temperature))
    answers, ids = sample_stage(model, judge.tokenizer, judge.prompts, args)
    judge.answers[stage] = answers
    stops = stop_token_ids(judge.tokenizer, model)
    scores = score_answers(judge.reward_model, judge.reward_tokenizer, judge.expanded, answers)
    truth = (
        [GROUND_TRUTHS[args.recipe][1](p[-1]["content"], a) for p, a in zip(judge.expanded, answers, strict=True)]
        if judge.with_truth
        else None
    )
    metrics = {
        "reward_score": mean(scores),
        "length": mean_length(ids, stops),
        "eos_rate": eos_rate(ids, stops),
        "ground_truth": mean(truth) if truth is not None else None,
        **({"ground_truth_rule": GROUND_TRUTHS[args.recipe][0]} if truth is not None else {}),
        "scores": scores,
        "truth": truth,
    }
    return metrics, ids


def judge_method(judge: Judge, method: str, log: Callable[[str], None] = print) -> dict:
    """One method's answers judged against SFT's on the same prompts and seed: reward score, win rate over SFT,
    KL from SFT, length, EOS rate, ground truth. Stored in `judge.stages[method]` and returned; the method's model is
    freed afterwards (a comparison loads one method at a time)."""
    model = for_inference(load_model(judge.models / method, what=f"{method} model"))
    metrics, ids = judge_answers(judge, method, model, log)
    pad = judge.tokenizer.pad_token_id
    metrics["kl"] = kl_divergence(model, judge.sft_model, judge.prompt_ids, ids, pad, judge.args.temperature)
    metrics["win_rate"] = win_rate(metrics["scores"], judge.stages["sft"]["scores"])
    if judge.with_truth:
        gain = paired_gain(metrics["truth"], judge.stages["sft"]["truth"], judge.args.samples)
        metrics["ground_truth_gain"], metrics["ground_truth_gain_se"], metrics["ground_truth_prompts"] = gain
    judge.stages[method] = metrics
    del model
    gc.collect()
    return metrics


def result(judge: Judge) -> dict:
    """What eval.json holds (and compare.json's shared part): the settings, the reward model's accuracy, each
    stage's metrics, warnings, per-answer scores and the generations side by side."""
    args, stages = judge.args, judge.stages
    return {
        "recipe": args.recipe,
        "models": str(judge.models),
        "prompts_file": str(judge.prompts_file),
        "pairs_file": str(judge.pairs_file),
        "prompts": len(judge.prompts),
        "samples": args.samples,
        "temperature": args.temperature,
        "max_new_tokens": args.max_new_tokens,
        "seed": args.seed,
        "reward_accuracy": judge.accuracy,
        "pairs": judge.pair_counts["kept"],
        "identical_pairs_left_out": judge.pair_counts["read"] - judge.pair_counts["kept"],
        "methods": judge.methods,
        "stages": {stage: {k: v for k, v in s.items() if k not in ("scores", "truth")} for stage, s in stages.items()},
        "warnings": [w for m in judge.methods for w in hacking_warnings(stages["sft"], stages[m], name=name(m))],
        "scores": {stage: s["scores"] for stage, s in stages.items()},
        "generations": [
            {
                "prompt": prompt[-1]["content"],
                **{
                    stage: {
                        "answer": judge.answers[stage][i],
                        "score": stages[stage]["scores"][i],
                        "ground_truth": stages[stage]["truth"][i] if judge.with_truth else None,
                    }
                    for stage in stages
                },
            }
            for i, prompt in enumerate(judge.expanded)
        ],
    }


def eval_file(models: Path, stage: str) -> Path:
    """Where `make eval STAGE=<stage>` writes: eval.json for PPO (what `make report` and the web page read since
    before there were other methods), eval-<stage>.json for the others."""
    return models / ("eval.json" if stage == "ppo" else f"eval-{stage}.json")


def evaluate(args, log: Callable[[str], None] = print) -> dict:
    """Runs the whole evaluation of SFT against `args.stage` (default ppo) and returns what its eval file holds."""
    stage = getattr(args, "stage", "ppo")
    judge = prepare(args, [stage], log)
    judge_method(judge, stage, log)
    evaluation = result(judge)
    output = args.output or eval_file(judge.models, stage)
    output.parent.mkdir(parents=True, exist_ok=True)
    outputs.write_atomically(output, (json.dumps(evaluation, indent=2) + "\n").encode("utf-8"))
    for line in table(evaluation):
        log(line)
    log(f"eval: wrote {output}")
    return evaluation


def methods_of(result: dict) -> list[str]:
    """The methods an evaluation judged (an eval.json written before `methods` existed holds PPO only)."""
    return result.get("methods") or [stage for stage in result["stages"] if stage != "sft"]


def fmt(value, digits: int = 3) -> str:
    """A number for a table cell; "-" when it is missing."""
    return "-" if value is None else f"{value:.{digits}f}"


def metric_rows(stages: dict, methods: Sequence[str]) -> list[tuple[str, list[str]]]:
    """The evaluation's table body, one (metric, [SFT's cell, each method's cell]) per row: what `make eval`,
    `make report` and `make compare` print."""
    sft, judged = stages["sft"], [stages[m] for m in methods]

    def row(title: str, key: str, digits: int, sft_cell: str | None = None):
        return (title, [sft_cell or fmt(sft.get(key), digits), *[fmt(s.get(key), digits) for s in judged]])

    rows = [
        row("mean reward-model score", "reward_score", 3),
        row("win rate over SFT (reward model)", "win_rate", 2, "-"),
        row("KL from SFT (nats per answer)", "kl", 3, "0"),
        row("mean length (tokens)", "length", 1),
        row("answers ending with EOS", "eos_rate", 2),
    ]
    if sft.get("ground_truth") is not None:
        rows.append(row(f"ground truth ({sft.get('ground_truth_rule', 'demo rule')})", "ground_truth", 2))
    return rows


def truth_notes(stages: dict, methods: Sequence[str]) -> list[str]:
    """Each method's ground truth against SFT's, in words (with the gain's standard error over prompts, `paired_gain`,
    where it was measured), and a warning for each that did not beat SFT on it."""
    sft = stages["sft"]
    if sft.get("ground_truth") is None:
        return []
    lines = []
    for method in methods:
        truth = stages[method].get("ground_truth")
        line = f"ground truth: sft {fmt(sft['ground_truth'], 2)} -> {method} {fmt(truth, 2)}"
        error = stages[method].get("ground_truth_gain_se")
        if error is not None and error == error:  # not NaN
            gain = stages[method]["ground_truth_gain"]
            beyond = "beyond" if abs(gain) > 2 * error else "within"
            line += (
                f" ({gain:+.2f}, standard error {error:.2f} over {stages[method]['ground_truth_prompts']} prompts: "
                f"{beyond} 2 standard errors)"
            )
        lines.append(line)
        if truth is None or truth <= sft["ground_truth"]:
            lines.append(f"warning: {name(method)} did not beat SFT on the ground truth: it did not help this run")
    return lines


def text_table(header: Sequence[str], rows: Sequence[tuple[str, Sequence[str]]], indent: str = "  ") -> list[str]:
    """Rows of (title, cells) as aligned text lines under `header` (the cells' column names)."""
    title_width = max([34, *(len(title) for title, _ in rows)])
    widths = [max([8, len(h), *(len(cells[i]) for _, cells in rows)]) for i, h in enumerate(header)]
    lines = [indent + f"{'':{title_width}} " + " ".join(f"{h:>{w}}" for h, w in zip(header, widths, strict=True))]
    for title, cells in rows:
        lines.append(
            indent + f"{title:{title_width}} " + " ".join(f"{c:>{w}}" for c, w in zip(cells, widths, strict=True))
        )
    return lines


def table(result: dict) -> list[str]:
    """The printed summary: reward-model accuracy, then SFT and each judged method side by side, then warnings."""
    methods = methods_of(result)
    lines = [
        f"eval: reward model pairwise accuracy {result['reward_accuracy']:.3f} on {result['pairs']} held-out pairs",
        f"eval: {result['prompts']} held-out prompts x {result['samples']} samples "
        f"(temperature {result['temperature']}, up to {result['max_new_tokens']} new tokens)",
        *text_table(["sft", *methods], metric_rows(result["stages"], methods)),
        *truth_notes(result["stages"], methods),
    ]
    return lines + [f"warning: {warning}" for warning in result["warnings"]]


def add_sampling_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The held-out data and sampling settings `make eval` and `make compare` share (so they judge alike)."""
    parser.add_argument("--recipe", default="demo")
    parser.add_argument(
        "--models",
        type=Path,
        default=None,
        help="folder holding sft/, reward/ and the methods' outputs (default: models/<recipe>)",
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
    return parser


def parser() -> argparse.ArgumentParser:
    parser = add_sampling_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument(
        "--stage", default="ppo", choices=outputs.METHODS, help="the method judged against SFT (default: ppo)"
    )
    parser.add_argument(
        "--output", type=Path, default=None, help="default: <models>/eval.json (ppo), <models>/eval-<stage>.json"
    )
    return parser


def main(argv=None) -> None:
    evaluate(parser().parse_args(argv))


if __name__ == "__main__":
    run(main)
