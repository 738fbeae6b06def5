"""Stage 3: PPO against the reward model, starting from the SFT policy.

    accelerate launch -m rlhf_trl.ppo --config recipes/demo/ppo.yaml [--key value ...]
    make ppo RECIPE=demo

TRL's PPOTrainer (through `ppo_engine`, the only module that imports it) does the optimisation. Here:
- the policy is the SFT output (an SFT adapter is merged into its base first) with a fresh LoRA on top,
  so the reference model is simply the policy with its adapters disabled: no second copy in memory;
- the reward model is stage 2's output, with its LoRA merged, since TRL reads `.score` off a plain model;
- the value model starts from the reward model when both share the policy's architecture (it already
  knows what a good answer looks like), and from the policy with a fresh head otherwise;
- prompts are rendered with the policy's chat template and tokenized, as TRL's trainer expects.
"""

import copy

from transformers import AutoModelForSequenceClassification
from trl import get_peft_config

from . import outputs
from .cli import UserError, parse, run
from .data import load_splits
from .metrics_log import MetricsLog
from .modeling import check_model_source, load_model, load_tokenizer, model_kwargs
from .ppo_engine import PPOConfig, PPOTrainer


def tokenize_prompts(dataset, tokenizer, max_prompt_length: int):
    def render(example):
        encoded = tokenizer.apply_chat_template(
            example["prompt"], add_generation_prompt=True, tokenize=True, return_dict=True
        )
        return {"input_ids": list(encoded["input_ids"])}

    tokenized = dataset.map(render, remove_columns=dataset.column_names)
    kept = tokenized.filter(lambda example: len(example["input_ids"]) <= max_prompt_length)
    if len(kept) == 0:
        raise UserError(f"every prompt is longer than max_prompt_length={max_prompt_length} tokens: raise it")
    return kept


def same_backbone(a, b) -> bool:
    keys = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")
    return all(getattr(a.config, key, None) == getattr(b.config, key, None) for key in keys)


def main(script_args, training_args, model_args):
    recipe = getattr(script_args, "recipe", None)
    make_hint = f" RECIPE={recipe}" if recipe else ""
    check_model_source(training_args.sft_model_path, "sft_model_path", f"sft{make_hint}")
    check_model_source(training_args.reward_model_path, "reward_model_path", f"reward{make_hint}")
    final_dir = training_args.output_dir
    with outputs.stage_output(final_dir, script_args.overwrite) as work:
        tokenizer = load_tokenizer(training_args.sft_model_path, padding_side="left")
        reward_tokenizer = load_tokenizer(training_args.reward_model_path)
        if reward_tokenizer.get_vocab() != tokenizer.get_vocab():
            raise UserError(
                f"reward model {training_args.reward_model_path} uses another tokenizer than the policy "
                f"{training_args.sft_model_path}: train the reward model from the policy's base (TRL's PPO scores "
                "the policy's token ids as they are)"
            )
        train, evaluation = load_splits(script_args, "prompts", training_args.seed)
        train = tokenize_prompts(train, tokenizer, script_args.max_prompt_length)
        evaluation = tokenize_prompts(evaluation, tokenizer, script_args.max_prompt_length)

        kwargs = model_kwargs(model_args)
        policy = load_model(training_args.sft_model_path, kwargs=kwargs, what="sft_model_path")
        classifier_kwargs = {**kwargs, "num_labels": 1}
        reward_model = load_model(
            training_args.reward_model_path, AutoModelForSequenceClassification, classifier_kwargs, "reward_model_path"
        )
        if same_backbone(reward_model, policy):
            value_model = copy.deepcopy(reward_model)
        else:
            value_model = load_model(
                training_args.sft_model_path, AutoModelForSequenceClassification, classifier_kwargs
            )
        for model in (reward_model, value_model):
            model.config.pad_token_id = tokenizer.pad_token_id
        policy.generation_config.pad_token_id = tokenizer.pad_token_id

        training_args.output_dir = str(work)
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
        )
        trainer.train()
        trainer.save_model(str(work))
        if trainer.accelerator.is_main_process:
            tokenizer.padding_side = "right"
            tokenizer.save_pretrained(str(work))
            scores = [log["objective/scores"] for log in trainer.state.log_history if "objective/scores" in log]
            outputs.finish(
                work,
                final_dir,
                "ppo",
                base=training_args.sft_model_path,
                reward_model=training_args.reward_model_path,
                adapter=model_args.use_peft,
                first_score=scores[0] if scores else None,
                last_score=scores[-1] if scores else None,
            )
            if scores:
                print(f"ppo: mean reward-model score {scores[0]:.3f} (first logged step) -> {scores[-1]:.3f} (last)")
            print(f"ppo: saved to {final_dir}")


if __name__ == "__main__":
    run(lambda: main(*parse(PPOConfig)))
