"""Stage 1: supervised fine-tuning of the policy on instruction data.

    accelerate launch -m rlhf_trl.sft --config recipes/demo/sft.yaml [--key value ...]
    make sft RECIPE=demo ARGS="--num_train_epochs 1"

TRL's SFTTrainer does the work. Data of any supported format (alpaca, messages, prompt/completion) is
turned into conversational prompt/completion pairs, so the loss covers the completion only and the
model learns the same chat template that PPO, `chat` and the export use. With `use_peft: true` only a
LoRA adapter is trained and saved; otherwise the whole model is.
"""

from trl import SFTConfig, SFTTrainer, get_peft_config

from . import outputs
from .cli import parse, run
from .data import load_splits
from .launch import check_stage
from .metrics_log import MetricsLog
from .modeling import ensure_distinct_pad, load_model, load_tokenizer, model_kwargs


def main(script_args, training_args, model_args):
    check_stage("sft", model_args)
    final_dir = training_args.output_dir
    with outputs.training_run("sft", script_args, training_args, model_args) as run:
        train, evaluation = load_splits(script_args, "sft", training_args.seed)
        tokenizer = load_tokenizer(model_args.model_name_or_path)
        model = load_model(model_args.model_name_or_path, kwargs=model_kwargs(model_args), what="model_name_or_path")
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
        trainer.train(resume_from_checkpoint=run.checkpoint)
        metrics = trainer.evaluate()
        loss = metrics.get("eval_loss", float("nan"))
        stage_info = {"base": model_args.model_name_or_path, "adapter": model_args.use_peft, "eval_loss": loss}
        if outputs.publish(trainer, tokenizer, run.work, final_dir, "sft", **stage_info):
            print(f"sft: held-out loss {loss:.3f} -> saved to {final_dir}")


if __name__ == "__main__":
    run(lambda: main(*parse(SFTConfig)))
