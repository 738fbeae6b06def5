"""Stage 3 by KTO: the SFT model trained on answers people marked good or bad, one at a time, pairs not needed.

    accelerate launch -m rlhf_trl.kto --config recipes/demo/kto.yaml [--key value ...]
    make kto RECIPE=demo

KTO (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization") learns from unpaired binary
feedback: each example is a prompt, one answer and a label, desirable or undesirable. That is what the seed
project's accepted_data.jsonl / rejected_data.jsonl hold, and what `make label`'s accept/reject decisions write:
the reward stage and DPO can use only the prompts found in both files, KTO uses every row. TRL's KTOTrainer does
the work; here:
- the data (`data.load_splits`, purpose kto): every row of an accepted/rejected folder (true in accepted_data.jsonl,
  false in rejected_data.jsonl, matched or not; rows with an empty answer left out and counted), unpaired rows
  (prompt, completion, label; `make label-export FORMAT=hf`'s `unpaired` config), or preference pairs split into a
  desirable and an undesirable row; human labels mixed in as `label_mix` says, as the reward stage does. The rows
  are shuffled (seeded): TRL takes them in order;
- the policy is the SFT output with a fresh LoRA on top, so the reference model is the same model with its adapter
  disabled (TRL does this with `peft_config` and no `ref_model`). Without LoRA a frozen second copy of the SFT model
  is the reference, loaded here (TRL would reload it by the config's name, the base of a merged SFT adapter);
- the desirable and undesirable examples are counted after TRL's tokenization (which drops, without a count, the
  examples whose prompt alone fills `max_length`: counted here) and the loss weights are set from those counts
  (`balance_weights`) as the KTO paper advises, unless the recipe or ARGS set `desirable_weight` or
  `undesirable_weight`. Both counts and both weights are printed, and recorded in the output's marker.
The summary line gives TRL's implicit-reward margin (beta x the policy's log-ratio to the reference, desirable
minus undesirable) at the first and the last logged step, and the held-out loss.
"""

from collections import Counter
from dataclasses import dataclass, field

import trl
from trl import KTOTrainer, get_peft_config

from . import outputs
from .cli import parse
from .data import load_splits
from .dpo import logged, policy_and_reference, training_sources
from .errors import UserError, run
from .launch import check_stage
from .metrics_log import MetricsLog, use_stage_progress
from .modeling import (
    check_model_source,
    trainables_in_model_dtype,
)

# The KTO paper's advice (section 4.2, eq. 8; TRL's KTO docs repeat it): desirable_weight x n_desirable /
# (undesirable_weight x n_undesirable) within these bounds.
ADVISED_RATIO = (1.0, 4 / 3)


@dataclass
class KTOConfig(trl.KTOConfig):
    """TRL's KTOConfig plus the model KTO starts from; the two loss weights are unset by default (chosen from the
    counts of desirable and undesirable examples: `balance_weights`)."""

    sft_model_path: str = field(
        default="",
        metadata={"help": "The SFT model: the policy's start and, with its LoRA off, the reference (path or Hub id)."},
    )
    desirable_weight: float | None = field(
        default=None,
        metadata={
            "help": "Weight of the desirable examples' loss. Unset (with undesirable_weight unset): chosen from the "
            "counts so that desirable_weight x desirable / (undesirable_weight x undesirable) = 1 (KTO paper)."
        },
    )
    undesirable_weight: float | None = field(
        default=None,
        metadata={"help": "Weight of the undesirable examples' loss. Unset: 1 (see desirable_weight)."},
    )


def balance_weights(
    desirable: int, undesirable: int, desirable_weight: float | None = None, undesirable_weight: float | None = None
) -> tuple[float, float, str]:
    """(desirable_weight, undesirable_weight, how they were chosen) for these counts of training examples.

    The KTO paper advises desirable_weight x desirable / (undesirable_weight x undesirable) in [1, 4/3]
    (`ADVISED_RATIO`). Both unset: undesirable_weight 1 and desirable_weight = undesirable / desirable, a ratio of 1,
    so each kind weighs as much in the loss however unbalanced the data (5 desirable, 3 undesirable: 0.6 and 1).
    Either one set (recipe or ARGS): kept, the other 1 (TRL's default), and `how` says whether the ratio is within
    the advice. Only one kind of example: nothing to balance (1 and 1, unless set).
    """
    given = desirable_weight is not None or undesirable_weight is not None
    for name, value in (("desirable_weight", desirable_weight), ("undesirable_weight", undesirable_weight)):
        if value is not None and value <= 0:
            raise UserError(f"{name} is {value}: a loss weight must be above 0; fix it in the recipe or ARGS")
    if not desirable or not undesirable:
        only = "desirable" if desirable else "undesirable"
        weights = (desirable_weight or 1.0, undesirable_weight or 1.0)
        return (*weights, f"only {only} examples: nothing to balance")
    if given:
        weights = (desirable_weight or 1.0, undesirable_weight or 1.0)
        how = "set in the recipe or ARGS"
    else:
        weights, how = (undesirable / desirable, 1.0), "chosen from the counts"
    ratio = weights[0] * desirable / (weights[1] * undesirable)
    inside = ADVISED_RATIO[0] - 1e-9 <= ratio <= ADVISED_RATIO[1] + 1e-9
    advice = f"{'within' if inside else 'outside'} the KTO paper's advised [1, 4/3]"
    formula = f"desirable_weight x {desirable} / (undesirable_weight x {undesirable}) = {ratio:.3g}"
    return (*weights, f"{how}: {formula}, {advice}")


def describe_examples(read: int, kept: Counter, dropped: int, truncated: int, max_length: int | None) -> str:
    """`400 read, 200 desirable + 200 undesirable kept` plus what TRL dropped and truncates."""
    parts = [f"{read} read"]
    if dropped:
        parts.append(f"{dropped} dropped (the prompt alone fills max_length {max_length})")
    if truncated:
        parts.append(f"{truncated} truncated to max_length {max_length} (the answer's end cut)")
    parts.append(f"{kept[True]} desirable + {kept[False]} undesirable kept")
    return ", ".join(parts)


class UnpairedKTOTrainer(KTOTrainer):
    """TRL's KTOTrainer that counts what it keeps of each split and sets the loss weights from the training counts.

    `given_weights` are the recipe's (desirable_weight, undesirable_weight), None where unset; `sources` name each
    split's data ("train", "eval") in errors. After construction `kept` holds each split's Counter of labels and
    `weight_note` how the weights were chosen.
    """

    def __init__(self, *args, given_weights: tuple, sources: dict, **kwargs):
        self.given_weights, self.sources, self.kept, self.weight_note = given_weights, sources, {}, ""
        super().__init__(*args, **kwargs)

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if dataset_name == "train":  # TRL's own balance check (in its preparation) sees the weights of the rows read
            read = Counter(dataset["label"])
            self.desirable_weight, self.undesirable_weight, _ = balance_weights(
                read[True], read[False], *self.given_weights
            )
        tokenized = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        if dataset_name not in self.sources:  # a dataset handed to evaluate() later: TRL's own preparation
            return tokenized
        split = "training" if dataset_name == "train" else dataset_name
        kept = Counter(tokenized["label"])
        lengths = (len(p) + len(c) for p, c in zip(tokenized["prompt_ids"], tokenized["completion_ids"], strict=True))
        truncated = sum(length > args.max_length for length in lengths) if args.max_length is not None else 0
        dropped = len(dataset) - len(tokenized)
        print(f"kto: {split} examples: {describe_examples(len(dataset), kept, dropped, truncated, args.max_length)}")
        if not len(tokenized):
            raise UserError(
                f"kto: no usable {split} example in {self.sources[dataset_name]}: every prompt alone fills "
                f"max_length={args.max_length} tokens; raise max_length or shorten the prompts"
            )
        self.kept[dataset_name] = kept
        if dataset_name == "train":
            desirable, undesirable, self.weight_note = balance_weights(kept[True], kept[False], *self.given_weights)
            self.desirable_weight = args.desirable_weight = desirable
            self.undesirable_weight = args.undesirable_weight = undesirable
            print(f"kto: desirable_weight {desirable:.4g}, undesirable_weight {undesirable:.4g} ({self.weight_note})")
        return tokenized


def check_settings(training_args) -> None:
    """The settings TRL's KTOTrainer refuses with a traceback once the models are loaded, refused here first."""
    if training_args.loss_type == "kto" and training_args.per_device_train_batch_size < 2:
        raise UserError(
            f"per_device_train_batch_size is {training_args.per_device_train_batch_size}: KTO estimates its KL term "
            "from the other answers in the batch, so it needs at least 2; raise it (gradient_accumulation_steps does "
            "not count)"
        )
    if training_args.loss_type == "kto" and training_args.train_sampling_strategy != "sequential":
        raise UserError(
            f"train_sampling_strategy is {training_args.train_sampling_strategy}: KTO's KL term pairs each example "
            "with its neighbour in a fixed-order batch, so it must be sequential (the rows are shuffled when read)"
        )


def main(script_args, training_args, model_args):
    check_stage("kto", model_args, training_args)
    recipe = getattr(script_args, "recipe", None)
    check_model_source(training_args.sft_model_path, "sft_model_path", f"sft{' RECIPE=' + recipe if recipe else ''}")
    check_settings(training_args)
    given = (training_args.desirable_weight, training_args.undesirable_weight)
    balance_weights(1, 1, *given)  # a weight of 0 or less: refused before anything loads
    final_dir = training_args.output_dir
    with outputs.training_run("kto", script_args, training_args, model_args) as run:
        train, evaluation = load_splits(script_args, "kto", training_args.seed, stage="kto")
        sources = {
            "train": training_sources(script_args),
            "eval": script_args.eval_dataset_name or "the held-out cut",
        }
        for name, split in (("train", train), ("eval", evaluation)):
            if not len(split):
                raise UserError(f"kto: no usable {name} example in {sources[name]}: give it rows with an answer")
        tokenizer, model, reference = policy_and_reference(
            "kto", (train, evaluation), script_args, training_args, model_args, renders_as="kto"
        )
        training_args.output_dir = str(run.work)
        trainer = UnpairedKTOTrainer(
            model=model,
            ref_model=reference,
            args=training_args,
            train_dataset=train,
            eval_dataset=evaluation,
            processing_class=tokenizer,
            peft_config=get_peft_config(model_args),
            callbacks=[MetricsLog()],
            given_weights=given,
            sources=sources,
        )
        use_stage_progress(trainer)
        trainables_in_model_dtype(trainer.model)
        trainer.train(resume_from_checkpoint=run.checkpoint)
        metrics = trainer.evaluate()
        loss = metrics.get("eval_loss", float("nan"))
        margin = logged(trainer, "rewards/margins")
        kept = trainer.kept["train"]
        stage_info = {
            "base": training_args.sft_model_path,
            "adapter": model_args.use_peft,
            "tokens_generated": 0,  # KTO samples nothing: it scores the given answers
            "desirable": kept[True],
            "undesirable": kept[False],
            "desirable_weight": trainer.desirable_weight,
            "undesirable_weight": trainer.undesirable_weight,
            "weights": trainer.weight_note,
            "eval_loss": loss,
            "eval_examples": len(trainer.eval_dataset),
            "eval_reward_margin": metrics.get("eval_rewards/margins"),
            "first_reward_margin": margin[0] if margin else None,
            "last_reward_margin": margin[-1] if margin else None,
        }
        if outputs.publish(trainer, tokenizer, run.work, final_dir, "kto", **stage_info):
            trend = f"reward margin {margin[0]:.3f} -> {margin[-1]:.3f} (first -> last logged step); " if margin else ""
            print(
                f"kto: trained on {kept[True]} desirable + {kept[False]} undesirable examples; {trend}held-out loss "
                f"{loss:.3f} on {len(trainer.eval_dataset)} examples -> saved to {final_dir}"
            )


if __name__ == "__main__":
    # The trainer pickles its config into every checkpoint and the output (training_args.bin): the class must be
    # rlhf_trl.kto's, which unpickles anywhere, not this __main__ module's (as rlhf_trl.dpo does).
    import importlib

    kto = importlib.import_module("rlhf_trl.kto")
    run(lambda: kto.main(*parse(kto.KTOConfig)))
