"""PPO settings that used to be silently ignored or misapplied (TRL 1.12's PPOTrainer did the same).

- gradient_accumulation_steps: accelerate's default ends an accumulation at the end of the dataloader, and PPO's
  update runs while the dataloader sits at the last batch of a pass over the prompts, so every micro-batch of that
  update stepped the optimizer (its loss still divided by the accumulation steps).
- num_sample_generations with fewer eval prompts than per_device_eval_batch_size (8 unless set) printed no table.
- max_steps, transformers' key, changed nothing.
- gradient_accumulation_steps and num_mini_batches both above 1 made optimizer steps span mini-batches and diluted
  the logged losses with empty slots.
- whiten_rewards on a batch with one scored position ended in a traceback.
- a recipe's `stop_token: eos` could not be unset from the command line for a `stop_token_id`, and a
  stop_token_id outside the vocabulary ran every answer to response_length, penalised.
- save_strategy: epoch never wrote a checkpoint (QA D01: the loop called on_step_end only), and the other Trainer
  settings the loop does not run (save_strategy best, eval_strategy, load_best_model_at_end, logging_strategy epoch,
  ...) were taken and ignored.
"""

import pytest
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForSequenceClassification

from rlhf_trl.cli import UserError, parse
from rlhf_trl.modeling import load_model, load_tokenizer
from rlhf_trl.ppo import tokenize_prompts
from rlhf_trl.ppo_trainer import PPOConfig, PPOTrainer

PROMPTS = [[{"role": "user", "content": "Name the color of the sky."}], [{"role": "user", "content": "And the leaf?"}]]


def tiny_trainer(path, tmp_path, prompts=PROMPTS, **settings) -> PPOTrainer:
    """Our PPOTrainer on a tiny model as policy, reward and value model, with `prompts` for training and eval."""
    tokenizer = load_tokenizer(path, padding_side="left")
    prompts = Dataset.from_list([{"prompt": p} for p in prompts])
    train, evaluation = (tokenize_prompts(prompts, tokenizer, 100) for _ in range(2))
    defaults = dict(num_ppo_epochs=1, num_mini_batches=1, response_length=4, num_sample_generations=0)
    args = PPOConfig(
        output_dir=str(tmp_path),
        sft_model_path=str(path),
        reward_model_path=str(path),
        shared_base=False,
        report_to="none",
        seed=0,
        **(defaults | {"bf16": False, "save_strategy": "no"} | settings),
    )

    def classifier():
        return AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=1, pad_token_id=tokenizer.pad_token_id
        )

    return PPOTrainer(
        args=args,
        processing_class=tokenizer,
        model=load_model(path),
        ref_model=None,
        reward_model=classifier(),
        value_model=classifier(),
        train_dataset=train,
        eval_dataset=evaluation,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"),
    )


def test_accumulated_micro_batches_make_one_optimizer_step_per_mini_batch(zoo, tmp_path):
    trainer = tiny_trainer(
        zoo["qwen2.5-instruct"],
        tmp_path,
        per_device_train_batch_size=1,
        gradient_accumulation_steps=2,  # one update = both prompts = the whole (one-batch) pass over the data
        total_episodes=6,  # 3 updates
        num_ppo_epochs=2,
    )
    trainer.train()

    steps = {int(state["step"]) for state in trainer.optimizer.optimizer.state.values()}
    assert steps == {3 * 2 * 1}, "updates x num_ppo_epochs x num_mini_batches optimizer steps, not one per micro-batch"


def test_fewer_eval_prompts_than_an_eval_batch_still_print_the_sample_table(zoo, tmp_path, capsys):
    trainer = tiny_trainer(
        zoo["qwen2.5-instruct"],
        tmp_path,
        per_device_train_batch_size=2,
        total_episodes=2,
        num_sample_generations=1,
        per_device_eval_batch_size=8,  # the default, above the 2 eval prompts
    )
    trainer.train()

    table = capsys.readouterr().out
    assert "eval samples at step 1" in table
    assert "Name the color of the sky." in table and "And the leaf?" in table


def test_the_recipes_bf16_reaches_the_accelerator_and_an_update_runs_under_it(zoo, tmp_path):
    """bf16: true used to leave PPO in float32 (the accelerate configs say mixed_precision: no)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()  # a process has one accelerate state; earlier tests set it to "no"
    try:
        trainer = tiny_trainer(
            zoo["qwen2.5-instruct"], tmp_path, bf16=True, use_cpu=True, per_device_train_batch_size=2, total_episodes=2
        )
        assert trainer.accelerator.mixed_precision == "bf16"
        trainer.train()
        assert trainer.state.global_step == 1
        assert trainer.state.log_history[-1]["objective/kl"] == trainer.state.log_history[-1]["objective/kl"]  # no NaN
    finally:
        AcceleratorState._reset_state()
    fp32 = tiny_trainer(zoo["qwen2.5-instruct"], tmp_path / "fp32", per_device_train_batch_size=2)
    assert fp32.accelerator.mixed_precision == "no"


def test_max_steps_is_refused_in_one_line_naming_total_episodes():
    with pytest.raises(UserError, match="max_steps \\(5\\) does not apply to PPO.*set total_episodes instead"):
        parse(PPOConfig, ["--config", "recipes/demo/ppo.yaml", "--max_steps", "5"])


@pytest.mark.parametrize(
    "whiten_rewards, message", [(True, "rewards over 1 answer token"), (False, "advantages over 0")]
)
def test_a_batch_too_small_to_whiten_stops_in_one_line(whiten_rewards, message):
    """One rollout whose answer starts with a pad: one position carries the score (rewards), none an action."""
    from types import SimpleNamespace

    import torch

    args = SimpleNamespace(
        missing_eos_penalty=None, kl_estimator="k1", kl_coef=0.1, whiten_rewards=whiten_rewards, gamma=1.0, lam=0.95
    )
    trainer = SimpleNamespace(
        args=args, processing_class=SimpleNamespace(pad_token_id=0), _stops=lambda device: torch.tensor([5])
    )
    rollout = {
        "postprocessed": torch.zeros(1, 3, dtype=torch.long),
        "scores": torch.ones(1),
        "logprobs": torch.zeros(1, 3),
        "ref_logprobs": torch.zeros(1, 3),
        "values": torch.zeros(1, 3),
    }
    with pytest.raises(UserError, match=f"PPO cannot whiten {message}"):
        PPOTrainer.advantages(trainer, rollout)


def test_stop_token_none_unsets_the_recipes_eos_for_a_stop_token_id():
    recipe = ["--config", "recipes/demo/ppo.yaml"]  # sets stop_token: eos
    with pytest.raises(UserError, match="not both \\(--stop_token none unsets the recipe's stop_token: eos\\)"):
        parse(PPOConfig, [*recipe, "--stop_token_id", "5"])
    args = parse(PPOConfig, [*recipe, "--stop_token_id", "5", "--stop_token", "none"])[1]
    assert args.stop_token is None and args.stop_token_id == 5


def test_a_stop_token_id_outside_the_vocabulary_is_refused_in_one_line():
    from types import SimpleNamespace

    from rlhf_trl.ppo_trainer import rollout_stop_ids

    tokenizer = [None] * 100  # len() is all the check reads: ids 0 to 99
    assert rollout_stop_ids(SimpleNamespace(stop_token=None, stop_token_id=99), tokenizer, None) == [99]
    with pytest.raises(UserError, match="stop_token_id 100 is not a token of the policy's tokenizer \\(ids 0 to 99\\)"):
        rollout_stop_ids(SimpleNamespace(stop_token=None, stop_token_id=100), tokenizer, None)


def test_accumulation_and_mini_batches_together_are_refused_in_one_line():
    recipe = ["--config", "recipes/demo/ppo.yaml"]
    with pytest.raises(UserError, match="gradient_accumulation_steps \\(2\\) and num_mini_batches \\(2\\) cannot both"):
        parse(PPOConfig, [*recipe, "--gradient_accumulation_steps", "2", "--num_mini_batches", "2"])
    assert parse(PPOConfig, [*recipe, "--num_mini_batches", "2"])[1].num_mini_batches == 2


def test_save_strategy_epoch_writes_a_checkpoint_at_the_end_of_each_pass(zoo, tmp_path):
    trainer = tiny_trainer(
        zoo["qwen2.5-instruct"],
        tmp_path,
        per_device_train_batch_size=1,
        total_episodes=5,  # 5 updates of 1 prompt
        save_strategy="epoch",
    )
    trainer.train()
    # 2 prompts, 1 per update: a pass over them is 2 updates, so passes end after updates 2 and 4; update 5 starts a
    # third pass that the run ends inside (the finished run is what the stage publishes, not a checkpoint).
    written = sorted(p.name for p in tmp_path.glob("checkpoint-*") if (p / "trainer_state.json").is_file())
    assert written == ["checkpoint-2", "checkpoint-4"]
    assert [round(s["epoch"], 6) for s in trainer.state.log_history[1::2]] == [1.0, 2.0]  # logged at updates 2, 4


@pytest.mark.parametrize(
    "setting, value",
    [
        ("save_strategy", "best"),
        ("load_best_model_at_end", "true"),
        ("eval_strategy", "steps"),
        ("logging_strategy", "epoch"),
        ("save_only_model", "true"),
        ("max_grad_norm", "0.5"),
        ("torch_compile", "true"),
    ],
)
def test_trainer_settings_ppo_does_not_run_are_refused_in_one_line(setting, value):
    with pytest.raises(UserError, match=f"^invalid setting: {setting}: .* does not apply to PPO \\(") as error:
        parse(PPOConfig, ["--config", "recipes/demo/ppo.yaml", f"--{setting}", value])
    assert "\n" not in str(error.value)
    assert (
        parse(PPOConfig, ["--config", "recipes/demo/ppo.yaml", "--save_strategy", "epoch"])[1].save_strategy == "epoch"
    )
