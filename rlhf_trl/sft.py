"""Stage 1: supervised fine-tuning of the policy on instruction data.

    accelerate launch -m rlhf_trl.sft --config recipes/demo/sft.yaml [--key value ...]
    make sft RECIPE=demo ARGS="--num_train_epochs 1"

TRL's SFTTrainer does the work. Data of any supported format (alpaca, messages, prompt/completion) is
turned into conversational prompt/completion pairs, so the loss covers the completion only and the
model learns the same chat template that PPO, `chat` and the export use. With `use_peft: true` only a
LoRA adapter is trained and saved; otherwise the whole model is.
"""

from pathlib import Path

from trl import SFTConfig, SFTTrainer, get_peft_config

from . import outputs
from .cli import UserError, parse, run
from .data import load_splits
from .launch import check_stage
from .metrics_log import MetricsLog
from .modeling import check_context, ensure_distinct_pad, load_model, load_tokenizer, model_kwargs


def answer_lengths(dataset, tokenizer, chat_template: str | None) -> list[tuple[int, int]]:
    """(prompt tokens, prompt + answer tokens) of each prompt/completion record, tokenized as TRL's SFTTrainer does:
    the prompt through the chat template with a generation prompt, the whole conversation without."""

    def ids(messages, **kwargs):
        encoded = tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True, chat_template=chat_template, **kwargs
        )
        return encoded["input_ids"]

    return [
        (len(ids(row["prompt"], add_generation_prompt=True)), len(ids(row["prompt"] + row["completion"])))
        for row in dataset
    ]


def drop_unanswered(dataset, tokenizer, training_args, split: str = "training"):
    """`dataset` without the records whose answer `max_length` would cut away entirely, printing how many were left
    out and how many keep only part of their answer.

    TRL's SFTTrainer truncates each tokenized prompt + answer to max_length (`truncation_mode: keep_start`) and then
    drops the "fully masked examples", those whose prompt alone fills max_length, without a count (trl/trainer/
    sft_trainer.py, `_prepare_dataset`). Counted here with the same tokenization (`answer_lengths`) and the template
    TRL will use (`chat_template_path` when it names a .jinja file). With no template, or with packing, nothing is
    checked here. Raises UserError when no record keeps any of its answer.
    """
    template = tokenizer.chat_template
    path, limit = training_args.chat_template_path, training_args.max_length
    if path and Path(path).is_file() and path.endswith((".jinja", ".j2")):
        template = Path(path).read_text(encoding="utf-8")
    if not template or limit is None or training_args.packing or len(dataset) == 0:
        return dataset
    lengths = answer_lengths(dataset, tokenizer, template)
    if training_args.truncation_mode == "keep_end":  # the answer is kept; the prompt loses its start
        cut = sum(full > limit for _, full in lengths)
        if cut:
            print(f"sft: {cut} of {len(lengths)} {split} examples lose the start of their prompt to max_length {limit}")
        return dataset
    unanswered = {i for i, (prompt, _) in enumerate(lengths) if prompt >= limit}
    cut = sum(prompt < limit < full for prompt, full in lengths)
    if unanswered:
        print(
            f"sft: left out {len(unanswered)} of {len(lengths)} {split} examples whose prompt alone fills max_length "
            f"{limit} tokens (truncation would cut their whole answer away)"
        )
    if cut:
        print(f"sft: {cut} of {len(lengths)} {split} examples have their answer truncated to fit max_length {limit}")
    if len(unanswered) == len(lengths):
        raise UserError(
            f"every {split} prompt is at least max_length={limit} tokens long, leaving no answer to train on: "
            "raise max_length or shorten the prompts"
        )
    return dataset.select([i for i in range(len(lengths)) if i not in unanswered])


def main(script_args, training_args, model_args):
    check_stage("sft", model_args)
    final_dir = training_args.output_dir
    with outputs.training_run("sft", script_args, training_args, model_args) as run:
        train, evaluation = load_splits(script_args, "sft", training_args.seed)
        tokenizer = load_tokenizer(model_args.model_name_or_path)
        model = load_model(model_args.model_name_or_path, kwargs=model_kwargs(model_args), what="model_name_or_path")
        check_context(training_args.max_length, model, f"max_length {training_args.max_length}", "lower max_length")
        train = drop_unanswered(train, tokenizer, training_args)
        evaluation = drop_unanswered(evaluation, tokenizer, training_args, "eval")
        if not model_args.use_peft and ensure_distinct_pad(tokenizer, model):
            print("sft: the tokenizer padded with its EOS token; added <|pad|> so PPO can tell the two apart")
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
        if not training_args.packing and len(trainer.train_dataset) < len(train):
            print(f"sft: TRL left out {len(train) - len(trainer.train_dataset)} more fully masked training examples")
        trainer.train(resume_from_checkpoint=run.checkpoint)
        metrics = trainer.evaluate()
        loss = metrics.get("eval_loss", float("nan"))
        stage_info = {"base": model_args.model_name_or_path, "adapter": model_args.use_peft, "eval_loss": loss}
        if outputs.publish(trainer, tokenizer, run.work, final_dir, "sft", **stage_info):
            print(f"sft: held-out loss {loss:.3f} -> saved to {final_dir}")


if __name__ == "__main__":
    run(lambda: main(*parse(SFTConfig)))
