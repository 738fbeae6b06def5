"""What `rlhf_trl.rloo` and `rlhf_trl.grpo` share: TRL 1.16's RLOOTrainer or GRPOTrainer against the reward model.

    make rloo RECIPE=demo    (accelerate launch -m rlhf_trl.rloo --config recipes/demo/rloo.yaml)
    make grpo RECIPE=demo    (accelerate launch -m rlhf_trl.grpo --config recipes/demo/grpo.yaml)

Both sample `num_generations` answers per prompt and take each answer's advantage against the others of its group,
so neither has a value model (PPO's fourth role): RLOO against the mean of the other answers' rewards (Ahmadian et
al. 2024, "Back to Basics", eq. 5; TRL's RLOOTrainer), GRPO against the group's mean reward, scaled by its spread
(Shao et al. 2024, DeepSeekMath, eq. 3; TRL's GRPOTrainer). Built like `ppo`:
- the policy is the SFT output (an SFT adapter merged into its base first) with a fresh LoRA, handed to TRL with the
  recipe's LoRA settings, so the reference for the KL term (`beta`) is the policy with its adapter disabled;
- the reward is stage 2's model, wrapped as a TRL reward function (`rewards.RewardModelFunction`) that scores each
  prompt's own conversation and answer through the encoding the reward stage trained with, any tokenizer (a
  DistilBERT reward model next to a GPT-2 policy, as in the seed project), less `missing_eos_penalty` for answers cut
  off at `max_completion_length`;
- prompts are the recipe's prompt files, rendered by TRL with the policy's chat template; those over
  `max_prompt_length` tokens are left out and counted (TRL 1.16 would keep them whole);
- output, resume and logs as every stage (`rlhf_trl.outputs`): `<output_dir>.partial/` until finished, the newest
  checkpoint resumed after a crash, metrics.jsonl, and the completion tokens sampled in the marker.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import trl
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState
from trl import get_peft_config

from . import outputs
from .errors import UserError
from .generation import sampling_config, sampling_with, settings_line, stop_token_ids
from .launch import check_stage, whole_on_every_process
from .metrics_log import MetricsLog, use_stage_progress
from .modeling import (
    check_model_source,
    context_length,
    load_model,
    load_tokenizer,
    model_kwargs,
    trainables_in_model_dtype,
)
from .ppo import load_prompts, prompts_within
from .rewards import RewardModelFunction, check_bridge, load_reward_classifier, prompt_text
from .templates import template_line


@dataclass
class RewardModelArguments:
    """The keys RLOO and GRPO add to TRL's configs: where the SFT policy and the reward model are, and PPO's
    missing-EOS penalty."""

    sft_model_path: str = field(
        default="models/demo/sft", metadata={"help": "The SFT output (or any causal LM): the policy to start from."}
    )
    reward_model_path: str = field(
        default="models/demo/reward", metadata={"help": "The reward stage's output: the model that scores answers."}
    )
    missing_eos_penalty: float | None = field(
        default=None,
        metadata={
            "help": "Subtracted from the score of an answer that hit max_completion_length without a stop token "
            "(as PPO's key): the chat template closes every answer for the reward model, so a cut-off answer "
            "would otherwise score as if it had ended."
        },
    )


# Defined here rather than in rloo.py / grpo.py: the trainer pickles its config into each checkpoint, and a class
# defined in the module run as __main__ would not unpickle anywhere else.
@dataclass
class RLOOConfig(RewardModelArguments, trl.RLOOConfig):
    """TRL's RLOOConfig plus where the SFT policy and the reward model are (`RewardModelArguments`)."""


@dataclass
class GRPOConfig(RewardModelArguments, trl.GRPOConfig):
    """TRL's GRPOConfig plus where the SFT policy and the reward model are (`RewardModelArguments`)."""


class TokensGenerated(TrainerCallback, ExportableState):
    """Keeps `RewardModelFunction.tokens_generated` across a crash. As an `ExportableState` its count is written into
    each checkpoint's trainer_state.json (`stateful_callbacks`), the file whose presence marks a checkpoint complete,
    so a complete checkpoint always has it; it is read back from the checkpoint resumed."""

    def __init__(self, reward: RewardModelFunction, resumed_from: str | None):
        self.reward = reward
        if resumed_from:
            saved = json.loads((Path(resumed_from) / outputs.CHECKPOINT_STATE).read_text(encoding="utf-8"))
            state = saved["stateful_callbacks"][type(self).__name__]
            reward.tokens_generated = state["attributes"]["tokens_generated"]

    def state(self) -> dict:
        return {"args": {}, "attributes": {"tokens_generated": self.reward.tokens_generated}}


def prompts_for(script_args, training_args, tokenizer, stage: str):
    """The train and eval prompts (`ppo.load_prompts`: a `prompt` column of messages), without, and counting, those
    over `max_prompt_length` tokens once rendered through the policy's chat template (`ppo.prompts_within`)."""
    return [
        prompts_within(split, tokenizer, script_args.max_prompt_length, name, stage).select_columns(["prompt"])
        for split, name in zip(load_prompts(script_args, training_args, tokenizer), ("training", "eval"), strict=True)
    ]


def rollout_config(training_args, stops: list[int], pad_token_id: int | None):
    """The GenerationConfig the rollouts sample with, made the policy's own: TRL sets temperature, top_p, top_k,
    min_p and repetition_penalty from the recipe, and transformers fills every field it leaves unset from the
    policy's generation_config.json (case C03). A neutral config (`generation.sampling_config`) with the recipe's
    five stops that, carries every stop id (which TRL reads from it) and is what the stage's settings line shows."""
    config = sampling_config(training_args.temperature, training_args.max_completion_length, stops, pad_token_id)
    for key in ("top_p", "top_k", "min_p", "repetition_penalty"):
        setattr(config, key, getattr(training_args, key))
    return config


def main(stage: str, trainer_class, script_args, training_args, model_args):
    """Trains `trainer_class` (TRL's RLOOTrainer or GRPOTrainer) as the module docstring says; `stage` is its name."""
    refuse_unsupported(training_args)
    check_stage(stage, model_args, training_args)
    recipe = getattr(script_args, "recipe", None)
    make_hint = f" RECIPE={recipe}" if recipe else ""
    check_model_source(training_args.sft_model_path, "sft_model_path", f"sft{make_hint}")
    check_model_source(training_args.reward_model_path, "reward_model_path", f"reward{make_hint}")
    final_dir = training_args.output_dir
    with outputs.training_run(stage, script_args, training_args, model_args) as run:
        tokenizer = load_tokenizer(training_args.sft_model_path, padding_side="left")
        print(template_line(stage, tokenizer, training_args.sft_model_path))
        reward_tokenizer = load_tokenizer(training_args.reward_model_path)
        train, evaluation = prompts_for(script_args, training_args, tokenizer, stage)
        kwargs = model_kwargs(model_args)
        policy = load_model(training_args.sft_model_path, kwargs=kwargs, what="sft_model_path")
        with whole_on_every_process(training_args):  # frozen, outside the trainer: never sharded by ZeRO-3
            reward_model = load_reward_classifier(training_args.reward_model_path, kwargs, reward_tokenizer)
        reward_model.eval().requires_grad_(False)
        if "quantization_config" not in kwargs:  # a quantized one sits where device_map put it
            from accelerate import PartialState

            reward_model.to(PartialState().device)
        if reward_tokenizer.get_vocab() != tokenizer.get_vocab():
            check_bridge(reward_tokenizer, [prompt_text(p) for p in train["prompt"][:64]])
            print(f"{stage}: the reward model has its own tokenizer; each answer is scored as text, re-encoded for it")
        limit = min(reward_tokenizer.model_max_length, context_length(reward_model) or 10**9)
        stops = stop_token_ids(tokenizer, training_args.sft_model_path)
        neutral = rollout_config(training_args, stops, tokenizer.pad_token_id)
        print(settings_line(f"{stage}: answers", neutral, policy, tokenizer, "the policy's"))
        reward = RewardModelFunction(
            reward_model, reward_tokenizer, stops, training_args.missing_eos_penalty, limit, policy
        )
        training_args.output_dir = str(run.work)
        evaluating = str(getattr(training_args.eval_strategy, "value", training_args.eval_strategy)) != "no"
        # The neutral config is the policy's own while TRL reads (eos ids) and samples from it; the policy's
        # generation_config.json is put back before a full model is saved with it.
        with sampling_with(policy, neutral):
            trainer = trainer_class(
                model=policy,
                reward_funcs=reward,
                args=training_args,
                train_dataset=train,
                eval_dataset=evaluation if evaluating else None,
                processing_class=tokenizer,
                peft_config=get_peft_config(model_args),
                callbacks=[MetricsLog(), TokensGenerated(reward, run.checkpoint)],
            )
            use_stage_progress(trainer)
            trainables_in_model_dtype(trainer.model)
            trainer.train(resume_from_checkpoint=run.checkpoint)
        tokenizer.padding_side = "right"  # for whoever loads the policy next
        scores = [log["reward"] for log in trainer.state.log_history if "reward" in log]
        stage_info = {
            "base": training_args.sft_model_path,
            "reward_model": training_args.reward_model_path,
            "adapter": model_args.use_peft,
            "first_reward": scores[0] if scores else None,
            "last_reward": scores[-1] if scores else None,
            "tokens_generated": reward.tokens_generated,
        }
        if outputs.publish(trainer, tokenizer, run.work, final_dir, stage, **stage_info):
            if scores:
                print(f"{stage}: mean reward {scores[0]:.3f} (first logged step) -> {scores[-1]:.3f} (last)")
            print(f"{stage}: {reward.tokens_generated} answer tokens sampled; saved to {final_dir}")


def refuse_unsupported(training_args) -> None:
    """Settings of TRL's configs this pipeline cannot honour here, refused in one line."""
    if getattr(training_args, "use_vllm", False):
        raise UserError("use_vllm: true needs vLLM and a GPU, which this pipeline does not set up: remove it")
    if training_args.temperature <= 0:
        raise UserError(
            f"temperature must be above 0 for sampled rollouts (TRL samples each group's answers), not "
            f"{training_args.temperature}"
        )
    if training_args.max_completion_length < 1:
        raise UserError(f"max_completion_length must be at least 1 token, not {training_args.max_completion_length}")
    if training_args.missing_eos_penalty is not None and training_args.missing_eos_penalty < 0:
        raise UserError("missing_eos_penalty must be 0 or more: it is subtracted from cut-off answers' scores")
