"""gradient_accumulation_steps: each PPO mini-batch is one optimizer step, also on the last prompt batch of a pass.

accelerate's default ends an accumulation at the end of the dataloader, and PPO's update runs while the dataloader
sits at the last batch of a pass over the prompts: every micro-batch of that update stepped the optimizer (with its
loss still divided by the accumulation steps), as in TRL 1.12's PPOTrainer.
"""

from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForSequenceClassification

from rlhf_trl.modeling import load_model, load_tokenizer
from rlhf_trl.ppo import tokenize_prompts
from rlhf_trl.ppo_trainer import PPOConfig, PPOTrainer

PROMPTS = [[{"role": "user", "content": "Name the color of the sky."}], [{"role": "user", "content": "And the leaf?"}]]


def test_accumulated_micro_batches_make_one_optimizer_step_per_mini_batch(zoo, tmp_path):
    path = zoo["qwen2.5-instruct"]
    tokenizer = load_tokenizer(path, padding_side="left")
    train = tokenize_prompts(Dataset.from_list([{"prompt": p} for p in PROMPTS]), tokenizer, 100)
    args = PPOConfig(
        output_dir=str(tmp_path),
        sft_model_path=str(path),
        reward_model_path=str(path),
        shared_base=False,
        per_device_train_batch_size=1,
        gradient_accumulation_steps=2,  # one update = both prompts = the whole (one-batch) pass over the data
        total_episodes=6,  # 3 updates
        num_ppo_epochs=2,
        num_mini_batches=1,
        response_length=4,
        num_sample_generations=0,
        save_strategy="no",
        report_to="none",
        bf16=False,
        seed=0,
    )

    def classifier():
        return AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=1, pad_token_id=tokenizer.pad_token_id
        )

    trainer = PPOTrainer(
        args=args,
        processing_class=tokenizer,
        model=load_model(path),
        ref_model=None,
        reward_model=classifier(),
        value_model=classifier(),
        train_dataset=train,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    trainer.train()

    steps = {int(state["step"]) for state in trainer.optimizer.optimizer.state.values()}
    assert steps == {3 * 2 * 1}, "updates x num_ppo_epochs x num_mini_batches optimizer steps, not one per micro-batch"
