"""Stage 1: supervised fine-tuning of the policy on instruction data.

    accelerate launch -m rlhf_trl.sft --config recipes/demo/sft.yaml [--key value ...]
    make sft RECIPE=demo ARGS="--num_train_epochs 1"

TRL's SFTTrainer does the work. Data of any supported format (alpaca, messages, prompt/completion) is
turned into conversational prompt/completion pairs, so the loss covers the completion only and the
model learns the same chat template that PPO, `chat` and the export use. With `use_peft: true` only a
LoRA adapter is trained and saved; otherwise the whole model is.

Before training, one record of each kind is rendered through the template (`templates.check_renders`: a
tokenizer without one, or a template that refuses a role, stops with the file, line and fix), and every record's
loss mask is checked (`completion_labels`): TRL masks the first len(prompt tokens) tokens of prompt + answer, which
is right only when the prompt's tokens are a prefix of prompt + answer's. SentencePiece-style tokenizers merge a
prompt ending in `[/INST]` with the answer's first word ('▁[/INST]The'); TRL then logs "Mismatch between tokenized
prompt and the start of tokenized prompt+completion" and the first answer word is never trained, while chat, eval
and PPO feed the prompt's own `▁[/INST]`, a token training never saw. Such data is tokenized here as generation sees
it (`templates.encode_as_generated`: the prompt's own ids, then the answer's), with the count printed.
The same pass counts what `max_length` does to each record: TRL truncates prompt + answer to it (`keep_start`) and
silently drops the "fully masked examples" whose prompt alone fills it; those are left out here, with the count.
"""

import os

from trl import SFTConfig, SFTTrainer, get_peft_config

from . import outputs
from .cli import parse
from .data import load_splits
from .errors import UserError, run
from .launch import check_stage
from .metrics_log import MetricsLog, use_stage_progress
from .modeling import (
    check_context,
    ensure_distinct_pad,
    load_model,
    load_tokenizer,
    model_kwargs,
    trainables_in_model_dtype,
)
from .templates import ALPACA_PATH, apply_template_path, check_renders, encode_as_generated, template_line

IGNORE = -100  # the label of a token without loss (transformers' and TRL's convention)


def completion_labels(example: dict, tokenizer) -> dict:
    """input_ids and labels of one conversational prompt/completion record, as generation sees it.

    `templates.encode_as_generated` gives the ids: where the prompt's ids (with the generation prompt) are a prefix
    of prompt + completion's, those are TRL 1.12's SFTTrainer's own ids and labels (loss after the first len(prompt
    ids) tokens). Where they are not (a SentencePiece prompt ending in `▁[/INST]` merges with the answer's first
    word), input_ids are the prompt's own ids then the rest of the text tokenized on its own, and the labels mask
    exactly the prompt's ids, so training sees the `▁[/INST]` that chat, eval and PPO feed. Only where the whole
    text does not start with the prompt's text are the labels placed by character offsets on the whole text's
    tokenization: a token has loss when its span starts at or after the answer's first character or straddles it.
    Returns input_ids, labels, `mismatch` (prompt ids not a prefix), `split` (built from the prompt's own ids) and
    `merged` (the token that spans the prompt's end in the whole text, '' if none).
    """
    prompt, conversation = example["prompt"], example["prompt"] + example["completion"]
    encoded = encode_as_generated(tokenizer, prompt, conversation)
    if encoded.how != "rendered":
        labels = [IGNORE] * len(encoded.prompt_ids) + encoded.ids[len(encoded.prompt_ids) :]
        mismatch = encoded.how == "split"
        return {
            "input_ids": encoded.ids,
            "labels": labels,
            "mismatch": mismatch,
            "split": mismatch,
            "merged": encoded.merged,
        }
    full_ids = encoded.ids
    prompt_text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    full_text = tokenizer.apply_chat_template(conversation, tokenize=False)
    common = len(os.path.commonprefix([prompt_text, full_text]))
    start = full_text.find(example["completion"][-1]["content"], common) if common < len(prompt_text) else common
    start = common if start < 0 else start  # the answer's first character in the full text
    offsets = tokenizer(full_text, add_special_tokens=False, return_offsets_mapping=True)
    if list(offsets["input_ids"]) != full_ids:
        raise UserError(
            "sft: this tokenizer tokenizes the chat template's text differently from apply_chat_template, so the "
            "loss mask cannot be placed on the answer: use a fast tokenizer (tokenizer.json)"
        )
    labels, merged = [], ""
    for token_id, (begin, end) in zip(full_ids, offsets["offset_mapping"], strict=True):
        labels.append(token_id if begin >= start or end > start else IGNORE)
        if begin < start < end and not merged:
            merged = tokenizer.convert_ids_to_tokens(token_id)
    return {"input_ids": full_ids, "labels": labels, "mismatch": True, "split": False, "merged": merged}


def packed_cuts(dataset, tokenizer, training_args, split: str = "training") -> int:
    """Prints (and returns) how many records packing cuts: TRL's `packing_strategy: bfd` (its default) truncates a
    record longer than `max_length` to its first max_length tokens, so the end of its answer is never trained;
    `bfd_split` and `wrapped` carry the overflow into other rows (nothing is lost, but a record may be split)."""
    limit, strategy = training_args.max_length, training_args.packing_strategy
    if limit is None or len(dataset) == 0:
        return 0
    lengths = [
        len(
            tokenizer.apply_chat_template(row["prompt"] + row["completion"], tokenize=True, return_dict=True)[
                "input_ids"
            ]
        )
        for row in dataset
    ]
    over = sum(n > limit for n in lengths)
    if over:
        what = "lose their end (the answer's last tokens)" if strategy == "bfd" else "are split across packed rows"
        print(
            f"sft: {over} of {len(dataset)} {split} examples are longer than max_length {limit} and {what} "
            f"(packing_strategy {strategy})"
        )
    return over


def prepare_records(dataset, tokenizer, training_args, split: str = "training"):
    """`dataset` ready for SFTTrainer, tokenized once by `completion_labels` to check each record, printing what it
    changes: records whose prompt alone fills `max_length` are left out (truncation would cut their whole answer
    away; TRL 1.12 drops such "fully masked examples" without a count, trl/trainer/sft_trainer.py `_prepare_dataset`),
    records whose answer is cut short are counted, and where any prompt's ids are not a prefix of its prompt + answer
    ids the records go to TRL pre-tokenized (input_ids, labels) by `completion_labels`.

    Returns `dataset` itself (or a selection of its rows) when TRL's own masking is right. With packing, with
    `completion_only_loss: false`, or with `assistant_only_loss`, nothing is checked here (`packed_cuts` counts what
    packing cuts). Raises UserError when no record keeps any of its answer.
    """
    if training_args.packing:
        packed_cuts(dataset, tokenizer, training_args, split)
    if training_args.packing or training_args.completion_only_loss is False or training_args.assistant_only_loss:
        return dataset
    if len(dataset) == 0:
        return dataset
    labelled = dataset.map(completion_labels, fn_kwargs={"tokenizer": tokenizer})
    limit, keep_end = training_args.max_length, training_args.truncation_mode == "keep_end"
    answer_start = [next((i for i, label in enumerate(row) if label != IGNORE), len(row)) for row in labelled["labels"]]
    lengths = [len(ids) for ids in labelled["input_ids"]]
    unanswered = set() if limit is None or keep_end else {i for i, start in enumerate(answer_start) if start >= limit}
    cut = 0 if limit is None else sum(start < limit < n for start, n in zip(answer_start, lengths, strict=True))
    total = len(dataset)
    if keep_end and limit is not None and any(n > limit for n in lengths):
        # keep_end keeps the last max_length tokens: the prompt's start goes first, all of it when the answer alone
        # fills max_length (and then the answer's start too)
        promptless = sum(n - start >= limit for start, n in zip(answer_start, lengths, strict=True))
        print(
            f"sft: {sum(n > limit for n in lengths)} of {total} {split} examples lose the start of their prompt "
            f"to max_length {limit} (truncation_mode keep_end)"
            + (f"; {promptless} of them keep no prompt token (the answer alone fills it)" if promptless else "")
        )
    if unanswered:
        print(
            f"sft: left out {len(unanswered)} of {total} {split} examples whose prompt alone fills max_length "
            f"{limit} tokens (truncation would cut their whole answer away)"
        )
    if cut and not keep_end:
        print(f"sft: {cut} of {total} {split} examples have their answer truncated to fit max_length {limit}")
    if len(unanswered) == total:
        raise UserError(
            f"every {split} prompt is at least max_length={limit} tokens long, leaving no answer to train on: "
            "raise max_length or shorten the prompts"
        )
    kept = [i for i in range(total) if i not in unanswered]
    checked = labelled.select(kept)
    if not any(checked["mismatch"]):
        return dataset.select(kept) if unanswered else dataset
    for how, done in (
        (True, "trained as generation sees them: the prompt's own tokens, then the answer's"),
        (False, "masked by character offsets so the loss covers exactly the answer"),
    ):
        rows = [
            row
            for row in checked.select_columns(["mismatch", "split", "merged"])
            if row["mismatch"] and row["split"] == how
        ]
        if not rows:
            continue
        merged = next((row["merged"] for row in rows if row["merged"]), "")
        what = (
            f"the prompt's last token merges with the answer's first (e.g. {merged!r})"
            if merged
            else "the prompt's tokens are not the first tokens of prompt + answer"
        )
        print(f"sft: {len(rows)} of {len(kept)} {split} records: {what}; {done}")
    return checked.select_columns(["input_ids", "labels"])


def main(script_args, training_args, model_args):
    check_stage("sft", model_args)
    final_dir = training_args.output_dir
    with outputs.training_run("sft", script_args, training_args, model_args) as run:
        train, evaluation = load_splits(script_args, "sft", training_args.seed)
        tokenizer = load_tokenizer(model_args.model_name_or_path, what="model_name_or_path")
        template_path = training_args.chat_template_path
        print(template_line("sft", tokenizer, model_args.model_name_or_path, template_path))
        apply_template_path(tokenizer, template_path)
        # A model folder or Hub id as chat_template_path: TRL clones that tokenizer's template into this one.
        cloned = bool(template_path) and not template_path.endswith((".jinja", ".j2"))
        template_source = load_tokenizer(template_path) if cloned else tokenizer
        fix = f"set chat_template_path: {ALPACA_PATH} (or the template the model was made for)"
        sources = [script_args.dataset_name, script_args.eval_dataset_name]
        for split in (train, evaluation):
            named = template_path if cloned else model_args.model_name_or_path
            check_renders(split, template_source, named, "sft", sources, fix)
        model = load_model(model_args.model_name_or_path, kwargs=model_kwargs(model_args), what="model_name_or_path")
        check_context(training_args.max_length, model, f"max_length {training_args.max_length}", "lower max_length")
        if not model_args.use_peft and ensure_distinct_pad(tokenizer, model):
            print("sft: the tokenizer padded with its EOS token; added <|pad|> so PPO can tell the two apart")
        if not cloned:  # with a cloned template, TRL's own masking and truncation apply, unchecked
            train = prepare_records(train, tokenizer, training_args)
            evaluation = prepare_records(evaluation, tokenizer, training_args, "eval")
        training_args.output_dir = str(run.work)
        trainer = SFTTrainer(
            model=model,
            args=training_args,
            train_dataset=train,
            eval_dataset=evaluation,
            processing_class=tokenizer,
            peft_config=get_peft_config(model_args),
            callbacks=[MetricsLog()],
        )
        trainables_in_model_dtype(trainer.model)
        if not training_args.packing and len(trainer.train_dataset) < len(train):
            print(f"sft: TRL left out {len(train) - len(trainer.train_dataset)} more fully masked training examples")
        use_stage_progress(trainer)
        trainer.train(resume_from_checkpoint=run.checkpoint)
        metrics = trainer.evaluate()
        loss = metrics.get("eval_loss", float("nan"))
        stage_info = {"base": model_args.model_name_or_path, "adapter": model_args.use_peft, "eval_loss": loss}
        if outputs.publish(trainer, tokenizer, run.work, final_dir, "sft", **stage_info):
            print(f"sft: held-out loss {loss:.3f} -> saved to {final_dir}")


if __name__ == "__main__":
    run(lambda: main(*parse(SFTConfig)))
