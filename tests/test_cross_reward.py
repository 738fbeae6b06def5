"""A reward model with its own tokenizer scores exactly the conversation the policy was prompted with (case C01).

The policy pads with its EOS token (a GPT-2 tokenizer under LoRA), and its Alpaca template writes an EOS after an
earlier assistant turn, so a multi-turn prompt's ids hold an EOS that looks like padding. The reward PPO computes
for each rollout, in the update and in the sample table, must be `rewards.score_answers` of that rollout's own
conversation and decoded answer.
"""

from pathlib import Path

import pytest
from datasets import Dataset
from tests_helpers import build_distilbert, build_encoder_tokenizer, build_gpt2

from rlhf_trl.modeling import load_model, load_tokenizer
from rlhf_trl.ppo import load_reward_model, load_value_model, tokenize_prompts
from rlhf_trl.ppo_trainer import PPOConfig, PPOTrainer
from rlhf_trl.rewards import CrossTokenizerReward, score_answers

ALPACA = (Path(__file__).resolve().parents[1] / "recipes/templates/alpaca.jinja").read_text()
SINGLE = [{"role": "user", "content": "Name the color of the sky."}]
MULTI = [
    {"role": "user", "content": "Name the color of the sky."},
    {"role": "assistant", "content": "The sky is blue."},
    {"role": "user", "content": "And the leaf?"},
]
TEXTS = [
    "Name the color of the sky. The sky is blue. And the leaf? The leaf is green.",
    "### Instruction:\n### Response:\n user: assistant:",
] * 20


def gpt2_like_tokenizer():
    """Byte-level BPE whose only special token is <|endoftext|> (bos = eos = unk, no pad), as GPT-2's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(TEXTS, trainer)
    special = "<|endoftext|>"
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=special, eos_token=special, unk_token=special)
    fast.chat_template = ALPACA
    return fast


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("cross")
    build_gpt2(gpt2_like_tokenizer(), root / "policy")
    build_distilbert(build_encoder_tokenizer(TEXTS), root / "reward")
    return root


def test_ppo_scores_each_rollout_with_its_own_multi_turn_conversation(models, tmp_path, monkeypatch):
    from peft import LoraConfig

    tokenizer = load_tokenizer(models / "policy", padding_side="left")
    assert tokenizer.pad_token_id == tokenizer.eos_token_id, "the case under test: pad == EOS"
    conversations = []
    prompts = Dataset.from_list([{"prompt": SINGLE}, {"prompt": MULTI}])
    train = tokenize_prompts(prompts, tokenizer, 100, conversations)
    evaluation = tokenize_prompts(prompts, tokenizer, 100, conversations)
    assert tokenizer.eos_token_id in train["input_ids"][1], "the multi-turn prompt holds an EOS inside"

    args = PPOConfig(
        output_dir=str(tmp_path),
        sft_model_path=str(models / "policy"),
        reward_model_path=str(models / "reward"),
        shared_base=False,
        per_device_train_batch_size=2,
        local_rollout_forward_batch_size=1,  # two scoring calls per batch: rows must be taken in order
        total_episodes=4,
        num_ppo_epochs=1,
        num_mini_batches=1,
        response_length=6,
        num_sample_generations=2,  # the sample table scores evaluation batches too
        per_device_eval_batch_size=2,
        save_strategy="no",
        report_to="none",
        bf16=False,
        seed=0,
    )
    reward_tokenizer = load_tokenizer(models / "reward")
    reward_model = load_reward_model(args, {}, reward_tokenizer, tokenizer, conversations)
    assert isinstance(reward_model, CrossTokenizerReward)
    policy = load_model(models / "policy")
    value_model = load_value_model(reward_model, policy, args.reward_model_path, args.sft_model_path, {})
    calls = []
    original = CrossTokenizerReward.get_reward

    def spy(self, query_responses, pad_token_id, context_length):
        result = original(self, query_responses, pad_token_id, context_length)
        calls.append((query_responses.clone(), context_length, result[1].clone()))
        return result

    monkeypatch.setattr(CrossTokenizerReward, "get_reward", spy)
    trainer = PPOTrainer(
        args=args,
        processing_class=tokenizer,
        model=policy,
        ref_model=None,
        reward_model=reward_model,
        value_model=value_model,
        train_dataset=train,
        eval_dataset=evaluation,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    trainer.train()

    # Worked out here, apart from PPO: each row's conversation is the prompt whose left-padded ids it starts with.
    pad = tokenizer.pad_token_id
    scored = []
    for query_responses, context_length, scores in calls:
        padded = {
            tuple([pad] * (context_length - len(ids)) + ids): conv
            for ids, conv in zip(train["input_ids"], [SINGLE, MULTI], strict=True)
        }
        rows = [padded[tuple(row[:context_length].tolist())] for row in query_responses]
        answers = tokenizer.batch_decode(query_responses[:, context_length:], skip_special_tokens=True)
        expected = score_answers(reward_model.reward_model, reward_tokenizer, rows, answers, reward_model.max_length)
        assert scores.tolist() == expected, "the reward PPO used is the reward model's score of that conversation"
        scored += rows
    assert scored.count(MULTI) >= 2 and scored.count(SINGLE) >= 2, "both prompts scored in rollouts and samples"
    assert len(calls) >= 4 + 1, "2 updates x 2 rollout chunks, then the sample tables"
