"""`make data`: turns a recipe's raw data into the files its stages read.

    python -m rlhf_trl.prepare --recipe demo [--force]             # demo: generate data, tokenizer, tiny base model
    python -m rlhf_trl.prepare --recipe gpt2-alpaca [--key value]  # others: recipes/<recipe>/data.yaml

For a real recipe, the raw dataset (a Hub id, a cloned dataset folder such as data/raw/alpaca-cleaned,
or a file) is validated, cleaned (invalid records, duplicates and answers over `max_tokens` are dropped
and counted), split deterministically into train and eval, and turned into:
    sft_train/sft_eval.jsonl        prompt/completion for SFT
    prompts_train/prompts_eval.jsonl  prompts for PPO
    preference pairs                the reference answer is chosen; the rejected one is either sampled
                                    from the SFT model or a documented corruption (`corrupt_answer`),
                                    written as pairs_*.jsonl or in the seed's accepted_data.jsonl /
                                    rejected_data.jsonl layout (train at the top, eval under eval/)
    data_report.json                what was kept and dropped, and why
The folder is written atomically like a stage output, so a half-written dataset is never used.
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from . import outputs, real_text
from .cli import parse_dataclasses
from .data import convert, load_records
from .errors import UserError, run
from .templates import check_renders, template_line


@dataclass
class DataArguments:
    raw_dataset: str = field(metadata={"help": "Raw data: a Hub id, a cloned dataset folder, or a file."})
    output_dir: str = field(metadata={"help": "Where the processed files go (data/processed/<recipe>)."})
    tokenizer_name_or_path: str = field(metadata={"help": "Tokenizer (of the policy) for the length filter."})
    raw_split: str = field(default="train", metadata={"help": "Split of a Hub or folder dataset."})
    max_tokens: int = field(default=512, metadata={"help": "Drop examples whose prompt + answer exceed this."})
    eval_size: float = field(default=0.02, metadata={"help": "Fraction held out for evaluation."})
    max_examples: int | None = field(default=None, metadata={"help": "Keep at most this many cleaned examples."})
    seed: int = field(default=0, metadata={"help": "Seed of the split and of the corruptions."})
    rejected_source: str = field(
        default="corruption",
        metadata={
            "help": "corruption (no model), sft (samples from sft_model_path) or rule (pairs labeled by the recipe's "
            "ground-truth rule, rlhf_trl.real_text.rule_pairs; raw_dataset chatterbot-corpus)."
        },
    )
    sft_model_path: str | None = field(default=None, metadata={"help": "The SFT model, for rejected_source: sft."})
    pair_layout: str = field(
        default="pairs", metadata={"help": "pairs (pairs_*.jsonl) or accepted_rejected (the seed's two files)."}
    )
    overwrite: bool = field(default=False, metadata={"help": "Rebuild an existing processed folder."})


def corrupt_answer(answer: str, other_answers: list[str], rng: random.Random) -> str:
    """A worse answer without a model: half the time another prompt's reference answer (off-topic), else the
    reference cut to its first third of words (incomplete)."""
    others = [a for a in other_answers if a != answer]
    if others and rng.random() < 0.5:
        return rng.choice(others)
    words = answer.split()
    return " ".join(words[: max(1, len(words) // 3)]) + ("" if len(words) > 1 else " ...")


def token_count(tokenizer, row: dict) -> int:
    from .modeling import render_prompt

    text = render_prompt(tokenizer, row["prompt"]) + row["completion"][-1]["content"]
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def clean(rows: list[dict], tokenizer, max_tokens: int, dropped: Counter) -> list[dict]:
    seen, kept = set(), []
    for row in rows:
        key = json.dumps([row["prompt"], row["completion"]], sort_keys=True).lower()
        if key in seen:
            dropped["duplicate"] += 1
        elif token_count(tokenizer, row) > max_tokens:
            dropped["too_long"] += 1
        else:
            seen.add(key)
            kept.append(row)
    return kept


@functools.cache
def _sft_sampler(path: str):
    from .modeling import for_inference, load_model, load_tokenizer

    outputs.require(path, "sft")
    return for_inference(load_model(path)), load_tokenizer(path)


def rejected_answers(rows: list[dict], args: DataArguments, rng: random.Random, dropped: Counter) -> list[str]:
    """One rejected answer per row; an empty SFT sample is replaced by a corruption (and counted)."""
    answers = [r["completion"][-1]["content"] for r in rows]
    if args.rejected_source == "corruption":
        return [corrupt_answer(a, answers, rng) for a in answers]
    if args.rejected_source != "sft":
        raise UserError(f"rejected_source {args.rejected_source!r} is unknown: use corruption or sft")
    if not args.sft_model_path:
        raise UserError("rejected_source: sft needs sft_model_path (e.g. models/<recipe>/sft)")
    from .modeling import generate, sampling_line

    model, tokenizer = _sft_sampler(args.sft_model_path)
    print(sampling_line("data: rejected answers", model, tokenizer, max_new_tokens=128))
    prompts = [r["prompt"] for r in rows]
    sampled = [
        a
        for i in range(0, len(prompts), 16)
        for a in generate(model, tokenizer, prompts[i : i + 16], max_new_tokens=128, seed=args.seed + i)
    ]
    dropped["empty_sft_sample_replaced_by_corruption"] += sum(not a.strip() for a in sampled)
    return [a if a.strip() else corrupt_answer(ref, answers, rng) for a, ref in zip(sampled, answers, strict=True)]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def write_pairs(folder: Path, split: str, rows: list[dict], rejected: list[str], layout: str, source: str) -> None:
    if layout == "pairs":
        write_jsonl(
            folder / f"pairs_{split}.jsonl",
            [
                {"prompt": r["prompt"], "chosen": r["completion"], "rejected": [{"role": "assistant", "content": bad}]}
                for r, bad in zip(rows, rejected, strict=True)
            ],
        )
        return
    if layout != "accepted_rejected":
        raise UserError(f"pair_layout {layout!r} is unknown: use pairs or accepted_rejected")
    target = folder if split == "train" else folder / "eval"
    prompt = [r["prompt"][-1]["content"] for r in rows]
    write_jsonl(
        target / "accepted_data.jsonl",
        [
            {"prompt": p, "response": r["completion"][-1]["content"], "source": "reference"}
            for p, r in zip(prompt, rows, strict=True)
        ],
    )
    write_jsonl(
        target / "rejected_data.jsonl",
        [{"prompt": p, "response": bad, "source": source} for p, bad in zip(prompt, rejected, strict=True)],
    )


def prompt_key(row: dict) -> str:
    return json.dumps(row["prompt"], sort_keys=True).lower()


def unique_prompts(rows: list[dict]) -> list[dict]:
    """Each distinct prompt once (a prompt with two answers is one PPO prompt), in order of first appearance."""
    seen: dict[str, dict] = {}
    for row in rows:
        seen.setdefault(prompt_key(row), {"prompt": row["prompt"]})
    return list(seen.values())


def split_by_prompt(rows: list[dict], eval_size: float, source: str) -> dict[str, list[dict]]:
    """Held-out and training rows with no prompt on both sides: whole prompts (with all their answers) go to eval,
    `eval_size` of the distinct prompts, in the rows' (shuffled) order. Splitting records instead put a prompt with two
    answers on both sides (9 of 51 held-out prompts were training prompts, issue 23 R1). Prints the counts."""
    keys = list(dict.fromkeys(prompt_key(row) for row in rows))
    if len(keys) < 2:
        raise UserError(f"{source}: all {len(rows)} usable examples share one prompt: need at least 2 distinct prompts")
    held_out = set(keys[: min(len(keys) - 1, max(1, round(len(keys) * eval_size)))])
    splits = {"eval": [r for r in rows if prompt_key(r) in held_out], "train": []}
    splits["train"] = [r for r in rows if prompt_key(r) not in held_out]
    print(
        f"data: split by prompt: {len(keys) - len(held_out)} prompts ({len(splits['train'])} records) train, "
        f"{len(held_out)} prompts ({len(splits['eval'])} records) eval"
    )
    return splits


def describe_drops(dropped: Counter) -> str:
    """`dropped: 2 invalid, 1 duplicate` (or `dropped: none`): the counts data_report.json holds, for one line."""
    return "dropped: " + (", ".join(f"{count} {reason}" for reason, count in dropped.items() if count) or "none")


def prepare_dataset(args: DataArguments) -> None:
    from .modeling import load_tokenizer

    output = Path(args.output_dir)
    if outputs.read_marker(output) is not None and not args.overwrite:
        print(f"data: {output} is ready (see data_report.json); add --overwrite to rebuild it")
        return
    if not Path(args.raw_dataset).exists() and args.raw_dataset.startswith("data/"):
        raise UserError(
            f"raw dataset {args.raw_dataset} does not exist: `git clone` the dataset repo there "
            "(e.g. https://huggingface.co/datasets/yahma/alpaca-cleaned), or set raw_dataset"
        )
    tokenizer = load_tokenizer(args.tokenizer_name_or_path, what="tokenizer_name_or_path")
    print(template_line("data", tokenizer, args.tokenizer_name_or_path))
    if args.raw_dataset == real_text.SOURCE:
        records = real_text.corpus_records(args.seed)
    else:
        records = load_records(args.raw_dataset, args.raw_split, split_key="raw_split")
    skipped: list[str] = []
    rows = convert(records, "sft", args.raw_dataset, skipped=skipped)
    if tokenizer.chat_template:  # without one, render_prompt's Alpaca fallback takes any roles
        check_renders(
            rows,
            tokenizer,
            args.tokenizer_name_or_path,
            "sft",
            [args.raw_dataset],
            "pick another tokenizer_name_or_path",
        )
    dropped = Counter({"invalid": len(skipped)})
    rows = clean(rows, tokenizer, args.max_tokens, dropped)
    rng = random.Random(args.seed)
    rng.shuffle(rows)
    rows = rows[: args.max_examples] if args.max_examples else rows
    if len(rows) < 2:
        reasons = [reason.removeprefix(f"{args.raw_dataset} ") for reason in skipped[:3]]
        why = "; ".join([describe_drops(dropped), *reasons])
        raise UserError(f"{args.raw_dataset}: only {len(rows)} usable examples after cleaning: need at least 2 ({why})")
    splits = split_by_prompt(rows, args.eval_size, args.raw_dataset)
    n_eval = len(splits["eval"])
    made = {}
    with outputs.stage_output(output, args.overwrite) as work:
        for split, split_rows in splits.items():
            write_jsonl(work / f"sft_{split}.jsonl", split_rows)
            write_jsonl(work / f"prompts_{split}.jsonl", unique_prompts(split_rows))
            if args.rejected_source == "rule":
                pairs, made[split] = real_text.rule_pairs(split_rows, rng)
                write_jsonl(work / f"pairs_{split}.jsonl", pairs)
                print(f"data: {len(pairs)} {split} pairs labeled by the ground-truth rule ({made[split]})")
                continue
            rejected = rejected_answers(split_rows, args, rng, dropped)
            write_pairs(work, split, split_rows, rejected, args.pair_layout, args.rejected_source)
        report = {
            "raw_records": len(records),
            "kept": len(rows),
            "train": len(splits["train"]),
            "eval": n_eval,
            "dropped": dict(dropped),
            "first_invalid": skipped[:5],
            "train_prompts": len(unique_prompts(splits["train"])),
            "eval_prompts": len(unique_prompts(splits["eval"])),
            "rejected_source": args.rejected_source,
            **({"rule_pairs": made} if made else {}),
            "seed": args.seed,
        }
        (work / "data_report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        outputs.finish(work, output, "data", raw_dataset=args.raw_dataset, **report)
    summary = f"{len(records)} raw -> {len(splits['train'])} train + {n_eval} eval in {output}"
    print(f"data: {summary} ({describe_drops(dropped)})")


def prepare_demo(data_dir: Path, base_dir: Path, seed: int, force: bool) -> None:
    from . import demo

    if force or not (data_dir / "prompts_eval.jsonl").is_file():
        for path in demo.write_data(data_dir, seed):
            print(f"data: wrote {path}")
    if force or outputs.read_marker(base_dir) is None:
        tokenizer = demo.build_tokenizer(demo.corpus(demo.make_records(seed)))
        model = demo.build_base_model(tokenizer, seed=seed)
        with outputs.stage_output(base_dir, overwrite=True) as work:
            model.save_pretrained(work)
            tokenizer.save_pretrained(work)
            outputs.finish(work, base_dir, "base", seed=seed, parameters=model.num_parameters())
        print(
            f"data: built tokenizer ({len(tokenizer)} tokens) and base model ({model.num_parameters():,} "
            f"parameters) in {base_dir}"
        )


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="demo")
    known, rest = parser.parse_known_args(argv)
    if known.recipe == "demo" and "--config" not in rest:
        demo_parser = argparse.ArgumentParser(description="prepare the demo recipe")
        demo_parser.add_argument("--seed", type=int, default=0)
        demo_parser.add_argument(
            "--force", "--overwrite", action="store_true", help="rebuild even when the outputs exist"
        )
        demo_parser.add_argument("--data-dir", type=Path, default=Path("data/processed/demo"))
        demo_parser.add_argument("--base-dir", type=Path, default=Path("models/demo/base"))
        args = demo_parser.parse_args(rest)
        prepare_demo(args.data_dir, args.base_dir, args.seed, args.force)
        return
    if "--config" not in rest:
        rest = ["--config", str(Path("recipes", known.recipe, "data.yaml")), *rest]
    (args,) = parse_dataclasses((DataArguments,), rest)
    prepare_dataset(args)


if __name__ == "__main__":
    run(main)
