"""Stage 3 by DPO: the SFT model trained straight on the reward stage's preference pairs.

    accelerate launch -m rlhf_trl.dpo --config recipes/demo/dpo.yaml [--key value ...]
    make dpo RECIPE=demo

TRL's DPOTrainer does the work: no reward model and no rollouts (so `tokens_generated` is 0). Here:
- the policy is the SFT output (an SFT adapter is merged into its base first) with a fresh LoRA on top, so the
  reference model is the same model with its adapter disabled (TRL does this with `peft_config` and no
  `ref_model`): no second copy in memory. Without LoRA, a second, frozen copy of the SFT model is the reference,
  loaded here: TRL would reload it by the model config's name, which for a merged SFT adapter names its base;
- the pairs are the reward stage's (`dataset_name`, `eval_dataset_name`), with human labels mixed in as
  `label_mix` says (`data.load_splits`, the same code the reward stage uses), as conversational
  prompt/chosen/rejected records that TRL renders with the SFT model's chat template;
- pairs that cannot teach anything are left out, with the count printed (`usable_pairs`): the same answer on both
  sides, a prompt that alone fills `max_length` (TRL drops those without a count, with `truncation_mode:
  keep_start`), and two answers that are the same once cut to `max_length` as `truncation_mode` cuts them (TRL
  would train on them: loss ln 2, zero gradient);
- a pair whose prompt's last token merges with the answer's first (Llama-2's `▁[/INST]The`) is trained on the
  prompt's own tokens, then the answer's, as generation sees it (`as_generated`, as SFT does).
The summary line gives TRL's implicit-reward accuracy and margin (beta x the policy's log-ratio to the reference,
chosen minus rejected) at the first and the last logged step, and the held-out loss (the recipe's `loss_type`).
"""

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import trl
from trl import DPOTrainer, get_peft_config

from . import outputs
from .cli import parse
from .data import load_splits
from .errors import UserError, run
from .launch import check_stage
from .metrics_log import MetricsLog, use_stage_progress
from .modeling import (
    check_context,
    check_model_source,
    load_model,
    load_tokenizer,
    model_kwargs,
    trainables_in_model_dtype,
)
from .rewards import describe_pairs
from .templates import ALPACA_PATH, check_renders, encode_as_generated, template_line


@dataclass
class DPOConfig(trl.DPOConfig):
    """TRL's DPOConfig plus the model DPO starts from."""

    sft_model_path: str = field(
        default="",
        metadata={"help": "The SFT model: the policy's start and, with its LoRA off, the reference (path or Hub id)."},
    )


def distinct_pairs(dataset, source: str, split: str = "training"):
    """`dataset` without the pairs whose chosen and rejected answers are the same, and their counts.

    Returns (kept pairs, Counter with "read" and "identical", the keys `rewards.describe_pairs` reads). Raises
    UserError, naming `source`, when no pair is left."""
    counts = Counter(read=len(dataset))
    keep = [i for i, pair in enumerate(dataset) if pair["chosen"] != pair["rejected"]]
    counts["identical"] = len(dataset) - len(keep)
    if not keep:
        raise UserError(
            f"dpo: no usable {split} pair in {source}: every chosen answer equals its rejected one "
            f"({len(dataset)} pairs); give each prompt two different answers, the preferred one as chosen"
        )
    return (dataset.select(keep) if counts["identical"] else dataset), counts


def usable_pairs(
    tokenized, counts: Counter, max_length: int | None, source: str, split: str = "training", mode: str = "keep_start"
):
    """TRL's tokenized pairs (prompt_ids, chosen_ids, rejected_ids) without those that differ in nothing DPO sees,
    printing what was dropped and truncated (`rewards.describe_pairs`).

    `counts` comes from `distinct_pairs`, whose kept pairs TRL tokenized. TRL's collator cuts each side's prompt +
    answer to `max_length` as `mode` (truncation_mode) says: keep_start keeps the first max_length tokens, and TRL
    leaves out the pairs whose prompt alone fills it (counted here as "prompt_fills"); keep_end keeps the last
    max_length tokens, so TRL keeps every pair, and a pair whose answers alone fill it trains without its prompt
    ("no_prompt"). A pair whose two sides are the same token window once cut (ids and answer mask) is dropped
    ("identical_encoded": loss ln 2, no gradient); a kept pair with a side cut is counted as "truncated".
    Raises UserError when no pair is left.
    """
    counts["prompt_fills"] = counts["read"] - counts["identical"] - len(tokenized)
    window = slice(None, max_length) if mode == "keep_start" else slice(-max_length if max_length else None, None)
    keep = []
    for index, pair in enumerate(tokenized.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"])):
        prompt_length = len(pair["prompt_ids"])
        sides = [pair["prompt_ids"] + pair[side] for side in ("chosen_ids", "rejected_ids")]
        if max_length is not None and mode == "keep_start" and prompt_length >= max_length:  # grown by `as_generated`
            counts["prompt_fills"] += 1
            continue
        # what the loss sees of each side: the token window and which of its tokens are the answer's
        seen = [(ids[window], ([0] * prompt_length + [1] * (len(ids) - prompt_length))[window]) for ids in sides]
        if max_length is not None and seen[0] == seen[1]:
            counts["identical_encoded"] += 1
            continue
        counts["truncated"] += max_length is not None and max(map(len, sides)) > max_length
        counts["no_prompt"] += max_length is not None and mode == "keep_end" and 0 not in seen[0][1] + seen[1][1]
        keep.append(index)
    print(f"dpo: {split} pairs: {describe_pairs(counts, max_length, mode)}")
    if not keep:
        raise UserError(
            f"dpo: no usable {split} pair in {source}: none differs within max_length={max_length} tokens "
            f"(prompt + answer, {mode}); raise max_length or shorten the prompts"
        )
    return tokenized.select(keep) if len(keep) < len(tokenized) else tokenized


def as_generated(tokenized, tokenizer, split: str = "training"):
    """TRL's tokenized pairs with each prompt's own ids, as chat, eval and the other stages feed it.

    TRL takes the prompt to end where the prompt's ids and prompt + answer's ids part: where a SentencePiece-style
    tokenizer merges the prompt's last piece with the answer's first (`▁[/INST]` + `The` -> `▁[/INST]The`), the
    merged piece goes to the answer and the model learns a context generation never shows it (TRL only warns once).
    Such pairs are re-encoded by `templates.encode_as_generated`, as SFT does: the prompt's own ids, then each
    answer's; the count is printed. Pairs whose prompt renders differently once an answer follows keep TRL's ids.
    """
    prompts = [
        list(tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
        for p in tokenized["prompt"]
    ]
    merged = [i for i, (own, ids) in enumerate(zip(prompts, tokenized["prompt_ids"], strict=True)) if own != ids]
    if not merged:
        return tokenized
    fixed, example = {}, ""
    for index in merged:
        pair = tokenized[index]
        sides = [
            encode_as_generated(tokenizer, pair["prompt"], pair["prompt"] + pair[s]) for s in ("chosen", "rejected")
        ]
        if all(side.how == "split" for side in sides):
            cut = len(sides[0].prompt_ids)
            fixed[index] = (sides[0].prompt_ids, sides[0].ids[cut:], sides[1].ids[cut:])
            example = example or sides[0].merged
    if not fixed:
        return tokenized
    print(
        f"dpo: {len(fixed)} of {len(tokenized)} {split} pairs: the prompt's last token merges with the answer's first "
        f"(e.g. {example!r}); trained as generation sees them: the prompt's own tokens, then the answer's"
    )

    def encode(pair, index):
        if index not in fixed:
            return {}
        return dict(zip(("prompt_ids", "chosen_ids", "rejected_ids"), fixed[index], strict=True))

    return tokenized.map(encode, with_indices=True)


class PairDPOTrainer(DPOTrainer):
    """TRL's DPOTrainer whose tokenized pairs are encoded as generation sees them (`as_generated`) and all usable
    (`usable_pairs`), checked as TRL prepares each split, before it precomputes any reference log-probs from it.

    `pair_counts` and `pair_sources` are `distinct_pairs`' counts and the files, per split ("train", "eval").
    """

    def __init__(self, *args, pair_counts: dict, pair_sources: dict, **kwargs):
        self.pair_counts, self.pair_sources = pair_counts, pair_sources
        super().__init__(*args, **kwargs)

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        tokenized = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        if dataset_name not in self.pair_counts:  # a dataset handed to evaluate() later: TRL's own preparation
            return tokenized
        split = "training" if dataset_name == "train" else dataset_name
        tokenized = as_generated(tokenized, processing_class, split)
        counts, source = self.pair_counts.pop(dataset_name), self.pair_sources[dataset_name]
        return usable_pairs(tokenized, counts, args.max_length, source, split, args.truncation_mode)


def training_sources(script_args) -> str:
    """The files the training pairs came from, as `label_mix` chose them (`data.load_splits`), for messages."""
    files = [] if script_args.label_mix == "human" else [script_args.dataset_name]
    if script_args.label_mix != "generated":
        files += [source for source in script_args.human_labels if Path(source).exists()]
    return ", ".join(files)


def logged(trainer, key: str) -> list[float]:
    return [log[key] for log in trainer.state.log_history if key in log]


def policy_and_reference(stage: str, splits, script_args, training_args, model_args, renders_as: str):
    """(tokenizer, policy, reference) for an offline preference stage (DPO, KTO) that starts from the SFT model.

    Prints the chat template line, checks that every record of `splits` renders with the SFT tokenizer's template
    (`renders_as`: the data purpose named in the error) and that `max_length` fits the model's context. The reference
    is None with LoRA (TRL uses the adapter-off model) or with precomputed log-probs; otherwise a frozen second copy
    of the SFT model. Raises UserError (one line) on an unrenderable record or a too-long max_length.
    """
    sft = training_args.sft_model_path
    tokenizer = load_tokenizer(sft)
    print(template_line(stage, tokenizer, sft))
    fix = f"train the SFT model with chat_template_path: {ALPACA_PATH} (SFT saves it with the model)"
    named = [script_args.dataset_name, script_args.eval_dataset_name, *script_args.human_labels]
    for split in splits:
        check_renders(split, tokenizer, sft, renders_as, named, fix)
    model = load_model(sft, kwargs=model_kwargs(model_args), what="sft_model_path")
    reference = None
    if not model_args.use_peft and not training_args.precompute_ref_log_probs:
        reference = load_model(sft, kwargs=model_kwargs(model_args), what="sft_model_path")
    check_context(training_args.max_length, model, f"max_length {training_args.max_length}", "lower max_length")
    return tokenizer, model, reference


def main(script_args, training_args, model_args):
    check_stage("dpo", model_args, training_args)
    recipe = getattr(script_args, "recipe", None)
    check_model_source(training_args.sft_model_path, "sft_model_path", f"sft{' RECIPE=' + recipe if recipe else ''}")
    final_dir = training_args.output_dir
    with outputs.training_run("dpo", script_args, training_args, model_args) as run:
        train, evaluation = load_splits(script_args, "reward", training_args.seed, stage="dpo")
        sources = {
            "training": training_sources(script_args),
            "eval": script_args.eval_dataset_name or "the held-out cut",
        }
        train, train_counts = distinct_pairs(train, sources["training"])
        evaluation, eval_counts = distinct_pairs(evaluation, sources["eval"], "eval")
        tokenizer, model, reference = policy_and_reference(
            "dpo", (train, evaluation), script_args, training_args, model_args, renders_as="reward"
        )
        training_args.output_dir = str(run.work)
        trainer = PairDPOTrainer(
            model=model,
            ref_model=reference,
            args=training_args,
            train_dataset=train,
            eval_dataset=evaluation,
            processing_class=tokenizer,
            peft_config=get_peft_config(model_args),
            callbacks=[MetricsLog()],
            pair_counts={"train": train_counts, "eval": eval_counts},
            pair_sources={"train": sources["training"], "eval": sources["eval"]},
        )
        use_stage_progress(trainer)
        trainables_in_model_dtype(trainer.model)
        trainer.train(resume_from_checkpoint=run.checkpoint)
        loss = trainer.evaluate().get("eval_loss", float("nan"))
        accuracy, margin = logged(trainer, "rewards/accuracies"), logged(trainer, "rewards/margins")
        stage_info = {
            "base": training_args.sft_model_path,
            "adapter": model_args.use_peft,
            "tokens_generated": 0,  # DPO samples nothing: it scores the given answers
            "eval_loss": loss,
            "eval_pairs": len(trainer.eval_dataset),
            "first_reward_accuracy": accuracy[0] if accuracy else None,
            "last_reward_accuracy": accuracy[-1] if accuracy else None,
            "first_reward_margin": margin[0] if margin else None,
            "last_reward_margin": margin[-1] if margin else None,
        }
        if outputs.publish(trainer, tokenizer, run.work, final_dir, "dpo", **stage_info):
            trend = (
                f"reward accuracy {accuracy[0]:.2f} -> {accuracy[-1]:.2f}, margin {margin[0]:.3f} -> {margin[-1]:.3f} "
                "(first -> last logged step); "
                if accuracy and margin
                else ""
            )
            print(f"dpo: {trend}held-out loss {loss:.3f} on {len(trainer.eval_dataset)} pairs -> saved to {final_dir}")


if __name__ == "__main__":
    # The trainer pickles its config into every checkpoint and the output (training_args.bin): the class must be
    # rlhf_trl.dpo's, which unpickles anywhere, not this __main__ module's (group_rl keeps RLOO's and GRPO's apart).
    import importlib

    dpo = importlib.import_module("rlhf_trl.dpo")
    run(lambda: dpo.main(*parse(dpo.DPOConfig)))
