"""Stage 2: a reward model trained on preference pairs (prompt, chosen, rejected).

    accelerate launch -m rlhf_trl.reward --config recipes/demo/reward.yaml [--key value ...]
    make reward RECIPE=demo

TRL's RewardTrainer trains a one-output sequence classifier so that chosen answers score higher than
rejected ones. Decoder models (started from the SFT model) and encoder classifiers such as DistilBERT
both work: pairs are tokenized by `rewards.encode_for_reward`, the same encoding PPO scores with.
Starting a decoder reward model from the SFT model (as InstructGPT did) gives it a head start on the data,
and lets PPO score the policy's tokens directly. With LoRA the new score head must stay trainable and be saved
with the adapter, otherwise it stays random: the adapter is built for sequence classification, which
peft does by keeping the head in `modules_to_save`. Held-out pairwise accuracy is printed at the end: the share
of all kept held-out pairs ranked right (`PairRewardTrainer`), not TRL's mean of per-batch accuracies.
"""

from transformers import AutoModelForSequenceClassification
from trl import RewardConfig, RewardTrainer, get_peft_config

from . import outputs
from .cli import parse
from .data import load_splits
from .errors import UserError, run
from .evaluate import pairwise_accuracy
from .launch import check_stage
from .metrics_log import MetricsLog, use_stage_progress
from .modeling import check_context, load_model, load_tokenizer, model_kwargs, trainables_in_model_dtype
from .rewards import describe_pairs, encode_pairs
from .templates import ALPACA_PATH, apply_template_path, check_renders, template_line


def tokenize_pairs(dataset, tokenizer, max_length: int | None, split: str = "training"):
    """chosen_ids/rejected_ids through `encode_for_reward`, the encoding PPO scores with too, printing what
    `rewards.encode_pairs` dropped (pairs identical on both sides, also once encoded and truncated) and truncated.

    Raises UserError when no pair is left. Returns a `datasets.Dataset` of the kept pairs."""
    from datasets import Dataset

    kept, counts = encode_pairs(tokenizer, dataset, max_length)
    print(f"reward: {split} pairs: {describe_pairs(counts, max_length)}")
    if not kept:
        raise UserError(f"reward: no {split} pair has two different answers: chosen and rejected must differ")
    return Dataset.from_list([{k: row[k] for k in ("chosen_ids", "rejected_ids")} for row in kept])


class PairRewardTrainer(RewardTrainer):
    """TRL's RewardTrainer whose `eval_accuracy` is the share of all held-out pairs ranked right.

    TRL logs the accuracy of each evaluation batch and averages those means (`RewardTrainer.compute_loss`, `log`),
    so with 13 pairs in batches of 8 the last 5 pairs weigh as much as the first 8 (a 0.350 printed for 5/13).
    Here each evaluation batch's chosen and rejected scores (the model's logits, gathered across processes without
    the padding repeats of the last batch) are kept, and the logged `eval_accuracy` is
    `evaluate.pairwise_accuracy` of all of them: pairs whose chosen answer scores strictly higher / pairs.
    `pair_accuracy` holds the last evaluation's value and `pair_count` the pairs it counted.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._eval_scores: tuple[list[float], list[float]] = ([], [])
        self.pair_accuracy, self.pair_count = float("nan"), 0

    def evaluate(self, *args, **kwargs):
        self._eval_scores = ([], [])  # nothing left over from a `predict`, which scores through compute_loss too
        return super().evaluate(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if not self.model.training:
            import torch

            with torch.no_grad():
                chosen, rejected = torch.chunk(outputs.logits.squeeze(-1).float(), chunks=2)
                for kept, side in zip(self._eval_scores, (chosen, rejected), strict=True):
                    kept.extend(self.accelerator.gather_for_metrics(side).tolist())
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        chosen, rejected = self._eval_scores
        if not self.model.training and chosen:
            self.pair_accuracy, self.pair_count = pairwise_accuracy(chosen, rejected), len(chosen)
            self._metrics["eval"]["accuracy"] = [self.pair_accuracy]  # replaces TRL's per-batch means
            self._eval_scores = ([], [])
        super().log(logs, start_time)


def head_modules(model) -> list[str]:
    """Names of the classifier's own linear layers, outside its backbone (`score`; DistilBERT's `pre_classifier`
    and `classifier`). They start untrained, so with LoRA they train in full (peft's `modules_to_save`) and are
    kept out of `all-linear`: peft cannot save a module it has already wrapped in LoRA (it raises
    "modules_to_save cannot be applied to modules of type ...lora.layer.Linear")."""
    import torch

    return [
        name
        for name, module in model.named_children()
        if name != model.base_model_prefix and isinstance(module, torch.nn.Linear)
    ]


def main(script_args, training_args, model_args):
    check_stage("reward", model_args)
    final_dir = training_args.output_dir
    with outputs.training_run("reward", script_args, training_args, model_args) as run:
        train, evaluation = load_splits(script_args, "reward", training_args.seed)
        tokenizer = load_tokenizer(model_args.model_name_or_path, what="model_name_or_path")
        without = "pairs are encoded as (prompt, answer) text pairs (rewards.encode_for_reward)"
        template_path = training_args.chat_template_path
        print(template_line("reward", tokenizer, model_args.model_name_or_path, template_path, without))
        apply_template_path(tokenizer, training_args.chat_template_path)
        if tokenizer.chat_template:  # without one, pairs are encoded as text pairs (rewards.encode_for_reward)
            sources = [script_args.dataset_name, script_args.eval_dataset_name, *script_args.human_labels]
            fix = f"set chat_template_path: {ALPACA_PATH} in the reward recipe"
            for split in (train, evaluation):
                check_renders(split, tokenizer, model_args.model_name_or_path, "reward", sources, fix)
        train = tokenize_pairs(train, tokenizer, training_args.max_length)
        evaluation = tokenize_pairs(evaluation, tokenizer, training_args.max_length, "eval")
        model = load_model(
            model_args.model_name_or_path,
            AutoModelForSequenceClassification,
            kwargs={**model_kwargs(model_args), "num_labels": 1},
            what="model_name_or_path",
        )
        check_context(training_args.max_length, model, f"max_length {training_args.max_length}", "lower max_length")
        longest = max(
            len(ids) for split in (train, evaluation) for side in ("chosen_ids", "rejected_ids") for ids in split[side]
        )
        check_context(longest, model, f"a pair of {longest} tokens", "set max_length to truncate longer pairs")
        model.config.pad_token_id = tokenizer.pad_token_id
        peft_config = get_peft_config(model_args)
        if peft_config is not None:
            peft_config.task_type = "SEQ_CLS"  # keeps and saves the score head (peft's modules_to_save)
            heads = head_modules(model)
            peft_config.modules_to_save = sorted(set(peft_config.modules_to_save or []) | set(heads))
            # all-linear leaves out peft's own head names (SEQ_CLS_HEAD_NAMES: score, classifier) but would wrap any
            # other head layer (DistilBERT's pre_classifier) in LoRA, and then fail to save it in full.
            extra_heads = [name for name in heads if name not in ("score", "classifier")]
            if peft_config.target_modules == "all-linear" and extra_heads:
                peft_config.exclude_modules = extra_heads
        training_args.output_dir = str(run.work)
        trainer = PairRewardTrainer(
            model=model,
            args=training_args,
            train_dataset=train,
            eval_dataset=evaluation,
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=[MetricsLog()],
        )
        use_stage_progress(trainer)
        trainables_in_model_dtype(trainer.model)
        trainer.train(resume_from_checkpoint=run.checkpoint)
        trainer.evaluate()  # logs eval_loss and the exact eval_accuracy over every kept held-out pair
        accuracy = trainer.pair_accuracy
        stage_info = {
            "base": model_args.model_name_or_path,
            "adapter": model_args.use_peft,
            "eval_accuracy": accuracy,
            "eval_pairs": trainer.pair_count,
        }
        if outputs.publish(trainer, tokenizer, run.work, final_dir, "reward", **stage_info):
            print(
                f"reward: held-out pairwise accuracy {accuracy:.3f} on {trainer.pair_count} pairs "
                f"({round(accuracy * trainer.pair_count)} ranked right) -> saved to {final_dir}"
            )


if __name__ == "__main__":
    run(lambda: main(*parse(RewardConfig)))
