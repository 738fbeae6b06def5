"""TRL 1.12's own PPOTrainer on a recipe's ppo.yaml: the reference run our engine's curves are compared with.

    .venv-reference/bin/python -m reference.trl_ppo --config recipes/demo/ppo.yaml [--key value ...]

Runs in `.venv-reference` only (`make reference-env`): `trl.experimental.ppo` exists up to TRL 1.12.
The recipe is read as `rlhf_trl.ppo` reads it (`rlhf_trl.cli.parse` with our PPOConfig: the same keys, CLI
overrides and one-line errors), and TRL's PPOConfig takes every setting both configs have from ours
(`reference.engines.trl_config`). The roles are the ones `rlhf_trl.ppo` builds with separate models
(`shared_base: false`), through its own helpers and in its order, so both runs draw the same random numbers:
the policy is the SFT model (with a fresh LoRA from the recipe's settings when `use_peft`), the reference is the
policy with its adapters disabled (LoRA) or TRL's frozen copy (full fine-tune), the reward model is stage 2's
output as a plain model (`load_reward_model`) and the value model a separate copy of it (`load_value_model`).
TRL's PPOTrainer always holds separate models, so `shared_base`, `logprob_chunk_tokens` and
`rollout_static_cache` (how our engine computes) are not used here.

Writes into `output_dir`: `metrics.jsonl` (`rlhf_trl.metrics_log.MetricsLog`, as the stage writes it), and at the
end the trained policy (`trainer.save_model`: the LoRA adapter, or the full model) with its tokenizer. It keeps
no checkpoints (`save_strategy` is set to no) and cannot resume: TRL's PPO starts at step 0 every time.
A reward model with its own tokenizer (`rewards.CrossTokenizerReward`) is refused: TRL's trainer scores the
policy's token ids as they are.
"""

import shutil
from pathlib import Path

from rlhf_trl.cli import UserError, parse, run
from rlhf_trl.data import load_splits
from rlhf_trl.metrics_log import MetricsLog
from rlhf_trl.modeling import check_model_source, load_model, load_tokenizer, model_kwargs
from rlhf_trl.ppo import enable_gradient_checkpointing, load_reward_model, load_value_model, tokenize_prompts
from rlhf_trl.rewards import CrossTokenizerReward

from .engines import our_engine, trl_config, trl_engine


def main(script_args, training_args, model_args) -> None:
    from trl import get_peft_config

    check_model_source(training_args.sft_model_path, "sft_model_path", "sft")
    check_model_source(training_args.reward_model_path, "reward_model_path", "reward")
    output_dir = Path(training_args.output_dir)
    if output_dir.exists() and any(output_dir.iterdir()):
        if not script_args.overwrite:
            raise UserError(f"{output_dir} is not empty: pass --overwrite true to replace it, or another --output_dir")
        shutil.rmtree(output_dir)
    # From here on as rlhf_trl.ppo.main, with separate models.
    tokenizer = load_tokenizer(training_args.sft_model_path, padding_side="left")
    reward_tokenizer = load_tokenizer(training_args.reward_model_path)
    train, evaluation = load_splits(script_args, "prompts", training_args.seed)
    conversations = []
    train = tokenize_prompts(train, tokenizer, script_args.max_prompt_length, conversations)
    evaluation = tokenize_prompts(evaluation, tokenizer, script_args.max_prompt_length, conversations, "eval")
    kwargs = model_kwargs(model_args)
    policy = load_model(training_args.sft_model_path, kwargs=kwargs, what="sft_model_path")
    policy.generation_config.pad_token_id = tokenizer.pad_token_id
    reward_model = load_reward_model(training_args, kwargs, reward_tokenizer, tokenizer, conversations)
    if isinstance(reward_model, CrossTokenizerReward):
        raise UserError(
            f"{training_args.reward_model_path} has its own tokenizer, which TRL's PPOTrainer cannot score with "
            "(it reads the policy's token ids): the reference runs take a reward model on the policy's tokenizer"
        )
    value_model = load_value_model(
        reward_model, policy, training_args.reward_model_path, training_args.sft_model_path, kwargs
    )
    value_model.config.pad_token_id = tokenizer.pad_token_id
    enable_gradient_checkpointing(training_args, policy, value_model)
    trainer = trl_engine()[1](
        args=trl_config(training_args, output_dir=str(output_dir), save_strategy="no"),
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
    trainer.save_model(str(output_dir))
    tokenizer.padding_side = "right"  # as the stage publishes it
    tokenizer.save_pretrained(str(output_dir))
    scores = [log["objective/scores"] for log in trainer.state.log_history if "objective/scores" in log]
    if scores:
        print(f"trl_ppo: mean reward-model score {scores[0]:.3f} (first logged step) -> {scores[-1]:.3f} (last)")
    print(f"trl_ppo: saved to {output_dir}")


if __name__ == "__main__":
    run(lambda: main(*parse(our_engine()[0])))
