"""Stage 3: PPO against the reward model, starting from the SFT policy.

    accelerate launch -m rlhf_trl.ppo --config recipes/demo/ppo.yaml [--key value ...]
    make ppo RECIPE=demo

The update is this project's own (`rlhf_trl.ppo_trainer`, its arithmetic in `rlhf_trl.ppo_math`, its roles in
`rlhf_trl.ppo_roles`); TRL 1.12's PPOTrainer, which TRL deleted in 1.13, is only the reference it is checked
against (`make test-reference`). Here:
- the policy is the SFT output (an SFT adapter is merged into its base first) with a fresh LoRA on top,
  so the reference model is simply the policy with its adapters disabled: no second copy in memory;
- with LoRA and `shared_base` (the recipes' choice), a reward model that is a LoRA adapter on the SFT model (what
  `make reward` writes) is loaded onto the policy's own base as a frozen second adapter, and the value model is a
  third adapter on it, started as a copy of the reward adapter: one copy of the base serves all four roles;
- otherwise the reward model is stage 2's output as a plain model with a `.score` head: its LoRA
  merged, or on a 4-bit base left unmerged inside it (merging would round it into quantized weights);
  one with its own tokenizer (DistilBERT next to GPT-2, as in the seed project) is wrapped in
  `rewards.CrossTokenizerReward`, which re-encodes each rollout as text; and the value model is a separate copy
  of the reward model when both share the policy's architecture (it already knows what a good answer looks
  like), or the policy with a fresh head;
- prompts are rendered with the policy's chat template and tokenized, left-padded for generation.
"""

import copy
from pathlib import Path

from transformers import AutoModelForSequenceClassification
from trl import get_peft_config

from . import outputs
from .cli import parse
from .data import load_splits
from .errors import UserError, run
from .generation import stop_token_ids
from .launch import check_stage
from .metrics_log import MetricsLog
from .modeling import (
    base_of,
    check_context,
    check_model_source,
    context_length,
    is_adapter,
    load_model,
    load_tokenizer,
    model_kwargs,
)
from .ppo_trainer import PPOConfig, PPOTrainer
from .rewards import (
    CrossTokenizerReward,
    check_bridge,
    load_reward_classifier,
    needs_cross_tokenizer,
    prompt_text,
)
from .templates import ALPACA_PATH, check_renders, template_line


def load_prompts(script_args, training_args, tokenizer):
    """The train and eval prompt datasets (`data.load_splits`, a `prompt` column of messages), each checked to render
    through the policy's chat template (`templates.check_renders`, a one-line error naming the fix). PPO, RLOO and
    GRPO all start from these."""
    train, evaluation = load_splits(script_args, "prompts", training_args.seed)
    fix = f"train the SFT model with chat_template_path: {ALPACA_PATH} (SFT saves it with the model)"
    sources = [script_args.dataset_name, script_args.eval_dataset_name]
    for split in (train, evaluation):
        check_renders(split, tokenizer, training_args.sft_model_path, "prompts", sources, fix)
    return train, evaluation


def prompts_within(dataset, tokenizer, max_prompt_length: int, split: str = "training", stage: str = "ppo"):
    """`dataset` with an `input_ids` column (each prompt through the policy's chat template, generation prompt added),
    without the prompts longer than `max_prompt_length` tokens, whose number is printed. Raises UserError when none
    is left."""

    def render(example):
        encoded = tokenizer.apply_chat_template(
            example["prompt"], add_generation_prompt=True, tokenize=True, return_dict=True
        )
        return {"input_ids": list(encoded["input_ids"])}

    tokenized = dataset.map(render)
    kept = tokenized.filter(lambda example: len(example["input_ids"]) <= max_prompt_length)
    if len(kept) == 0:
        raise UserError(f"every prompt is longer than max_prompt_length={max_prompt_length} tokens: raise it")
    if len(kept) < len(tokenized):
        print(
            f"{stage}: left out {len(tokenized) - len(kept)} of {len(tokenized)} {split} prompts longer than "
            f"max_prompt_length={max_prompt_length} tokens"
        )
    return kept


def tokenize_prompts(
    dataset, tokenizer, max_prompt_length: int, conversations: list | None = None, split: str = "training"
):
    """input_ids of each prompt through the policy's chat template (`prompts_within`).

    Given a `conversations` list, each kept prompt's conversation is appended to it and its position there is written
    as the `prompt_index` column, which travels with the rollout so a reward model with its own tokenizer scores that
    very conversation (`rewards.CrossTokenizerReward`).
    """
    kept = prompts_within(dataset, tokenizer, max_prompt_length, split)
    if conversations is not None:
        kept = kept.add_column("prompt_index", range(len(conversations), len(conversations) + len(kept)))
        conversations.extend(kept["prompt"])
    return kept.remove_columns([c for c in kept.column_names if c not in ("input_ids", "prompt_index")])


def same_backbone(a, b) -> bool:
    keys = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")
    return all(getattr(a.config, key, None) == getattr(b.config, key, None) for key in keys)


def start_value_from_reward(reward_model, reward_path: str, classifier_kwargs: dict):
    """A trainable copy of the reward model. On a 4-bit base the copy is loaded again (quantized weights do not
    deep-copy) and trains only its own copy of the reward adapter and score head."""
    if "quantization_config" not in classifier_kwargs:
        return copy.deepcopy(reward_model)
    value_model = load_model(reward_path, AutoModelForSequenceClassification, classifier_kwargs, live_adapter=True)
    for name, parameter in value_model.named_parameters():
        if "lora_" in name or "modules_to_save" in name:
            parameter.requires_grad_(True)
    return value_model


def enable_gradient_checkpointing(training_args, *models) -> bool:
    """Honours `gradient_checkpointing` for the policy and value model; True when it was asked for.

    transformers' Trainer turns checkpointing on in its own train(), which the PPO trainer replaces (TRL 1.12's
    PPOTrainer read the key and never acted on it: benchmarks/NOTES.md). Non-reentrant by default, which needs no
    gradient on the inputs of a frozen base under LoRA. Rollouts stay right: a checkpointed layer in train mode
    drops its KV cache, so `PPOTrainer` turns checkpointing off around each rollout; a toy run gives the same
    scores and KL with and without it (benchmarks/NOTES.md).
    """
    if not training_args.gradient_checkpointing:
        return False
    kwargs = training_args.gradient_checkpointing_kwargs or {"use_reentrant": False}
    for model in models:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return True


def reward_is_adapter_on(reward_path: str, sft_path: str) -> bool:
    """Whether the reward model is a LoRA adapter trained on the SFT model itself (what `make reward` writes)."""
    if not is_adapter(reward_path):
        return False
    base = base_of(reward_path)
    return base == sft_path or (Path(base).exists() and Path(base).resolve() == Path(sft_path).resolve())


def load_reward_model(training_args, kwargs, reward_tokenizer, tokenizer, conversations):
    """Stage 2's output as a plain model with its `.score` head, wrapped when it has its own tokenizer."""
    reward_model = load_reward_classifier(training_args.reward_model_path, kwargs, reward_tokenizer)
    if needs_cross_tokenizer(reward_model, reward_tokenizer, tokenizer):
        check_bridge(reward_tokenizer, [prompt_text(c) for c in conversations[:64]])
        limit = min(reward_tokenizer.model_max_length, context_length(reward_model) or 512)
        print("ppo: the reward model has its own tokenizer; each rollout is decoded and re-encoded for it")
        return CrossTokenizerReward(reward_model, reward_tokenizer, tokenizer, conversations, limit)
    return reward_model


def load_value_model(reward_model, policy, reward_path: str, sft_path: str, kwargs: dict):
    """A separate value model: a copy of the reward model when it shares the policy's architecture, else the
    SFT model with a fresh head."""
    classifier_kwargs = {**kwargs, "num_labels": 1}
    if not isinstance(reward_model, CrossTokenizerReward) and same_backbone(reward_model, policy):
        return start_value_from_reward(reward_model, reward_path, classifier_kwargs)
    return load_model(sft_path, AutoModelForSequenceClassification, classifier_kwargs)


def deepspeed_launch() -> bool:
    """Whether this process runs under DeepSpeed (which steps the optimizer after every backward, so PPO's roles
    are separate models there: see rlhf_trl.ppo_trainer)."""
    from accelerate import PartialState

    return PartialState().distributed_type.value == "DEEPSPEED"


def main(script_args, training_args, model_args):
    check_stage("ppo", model_args, training_args)
    recipe = getattr(script_args, "recipe", None)
    make_hint = f" RECIPE={recipe}" if recipe else ""
    check_model_source(training_args.sft_model_path, "sft_model_path", f"sft{make_hint}")
    check_model_source(training_args.reward_model_path, "reward_model_path", f"reward{make_hint}")
    final_dir = training_args.output_dir
    with outputs.training_run("ppo", script_args, training_args, model_args) as run:
        tokenizer = load_tokenizer(training_args.sft_model_path, padding_side="left")
        print(template_line("ppo", tokenizer, training_args.sft_model_path))
        reward_tokenizer = load_tokenizer(training_args.reward_model_path)
        if tokenizer.pad_token_id in stop_token_ids(tokenizer, training_args.sft_model_path):
            which = "its EOS token" if tokenizer.pad_token_id == tokenizer.eos_token_id else "one of its stop tokens"
            print(
                f"ppo: warning: the policy pads with {which} ({tokenizer.pad_token}), so PPO cannot reward "
                "ending an answer with it; train SFT in full (it then adds a pad token) or use a tokenizer with a pad "
                "token"
            )
        train, evaluation = load_prompts(script_args, training_args, tokenizer)
        conversations = []
        train = tokenize_prompts(train, tokenizer, script_args.max_prompt_length, conversations)
        evaluation = tokenize_prompts(evaluation, tokenizer, script_args.max_prompt_length, conversations, "eval")

        longest = max(len(ids) for split in (train, evaluation) for ids in split["input_ids"])
        check_context(
            longest + training_args.response_length,
            training_args.sft_model_path,
            f"a prompt of {longest} tokens plus response_length {training_args.response_length}",
            "lower response_length or max_prompt_length",
            role="policy",
        )

        kwargs = model_kwargs(model_args)
        policy = load_model(training_args.sft_model_path, kwargs=kwargs, what="sft_model_path")
        policy.generation_config.pad_token_id = tokenizer.pad_token_id
        shared = training_args.shared_base and model_args.use_peft and not deepspeed_launch()
        reward_adapter = None
        if shared and reward_is_adapter_on(training_args.reward_model_path, training_args.sft_model_path):
            reward_adapter = training_args.reward_model_path
            print("ppo: policy, reference, value and reward share one base (the reward model is a LoRA on it)")
        reward_model = value_model = None
        if reward_adapter is None:
            reward_model = load_reward_model(training_args, kwargs, reward_tokenizer, tokenizer, conversations)
        if not shared:
            value_model = load_value_model(
                reward_model, policy, training_args.reward_model_path, training_args.sft_model_path, kwargs
            )
            value_model.config.pad_token_id = tokenizer.pad_token_id
        elif reward_adapter is None:
            print(
                "ppo: value model: a fresh adapter and head on the policy's base (the reward model is not a LoRA "
                "on the SFT model, so it cannot share that base)"
            )
        enable_gradient_checkpointing(training_args, *[m for m in (policy, value_model) if m is not None])
        training_args.output_dir = str(run.work)
        trainer = PPOTrainer(
            args=training_args,
            processing_class=tokenizer,
            model=policy,
            ref_model=None,
            reward_model=reward_model,
            value_model=value_model,
            train_dataset=train,
            eval_dataset=evaluation,
            peft_config=get_peft_config(model_args),
            callbacks=[MetricsLog()],
            reward_adapter=reward_adapter,
        )
        trainer.train(resume_from_checkpoint=run.checkpoint)
        tokenizer.padding_side = "right"  # for whoever loads the policy next; PPO needed left for generation
        scores = [log["objective/scores"] for log in trainer.state.log_history if "objective/scores" in log]
        stage_info = {
            "base": training_args.sft_model_path,
            "reward_model": training_args.reward_model_path,
            "adapter": model_args.use_peft,
            "first_score": scores[0] if scores else None,
            "last_score": scores[-1] if scores else None,
            "tokens_generated": trainer.state.tokens_generated,
        }
        if outputs.publish(trainer, tokenizer, run.work, final_dir, "ppo", **stage_info):
            if scores:
                print(f"ppo: mean reward-model score {scores[0]:.3f} (first logged step) -> {scores[-1]:.3f} (last)")
            print(f"ppo: saved to {final_dir}")


if __name__ == "__main__":
    run(lambda: main(*parse(PPOConfig)))
