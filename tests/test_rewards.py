"""Cross-tokenizer rewards: a reward model with its own tokenizer scores what the policy generated."""

import pytest
import torch
from datasets import Dataset
from tests_helpers import build_encoder_tokenizer
from torch import nn

from rlhf_trl import demo
from rlhf_trl.rewards import CrossTokenizerReward, encode_for_reward, needs_cross_tokenizer, score_answers


class CountsAWord(nn.Module):
    """A reward model with a known preference: its score is how often one token id appears."""

    def __init__(self, token_id: int):
        super().__init__()
        self.token_id = token_id
        self.anchor = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None, **_):
        counts = ((input_ids == self.token_id) & attention_mask.bool()).sum(1, keepdim=True).float()
        return type("Output", (), {"logits": counts + self.anchor})()


def test_scores_follow_the_reward_models_preference_through_re_encoding():
    records = demo.make_records()
    policy_tokenizer = demo.build_tokenizer(demo.corpus(records))
    reward_tokenizer = build_encoder_tokenizer(demo.corpus(records))
    reward = CountsAWord(reward_tokenizer.convert_tokens_to_ids("helps"))
    prompt = [{"role": "user", "content": "Describe the river."}]
    query = policy_tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)[
        "input_ids"
    ]
    answers = ["The river is long. I hope this helps!", "The river is long.", "helps helps helps"]
    pad, eos = policy_tokenizer.pad_token_id, policy_tokenizer.eos_token_id
    responses = [policy_tokenizer(a, add_special_tokens=False)["input_ids"] + [eos] for a in answers]
    width = max(map(len, responses)) + 2
    rows = [[pad] * 2 + list(query) + r + [pad] * (width - len(r)) for r in responses]  # left-padded query
    query_responses = torch.tensor(rows)
    context_length = len(query) + 2

    scorer = CrossTokenizerReward(reward, reward_tokenizer, policy_tokenizer, [[], prompt])
    scorer.expect({"input_ids": query_responses[:, :context_length], "prompt_index": torch.tensor([1, 1, 1])})
    per_token, scores, ends = scorer.get_reward(query_responses, pad, context_length)

    assert scores.tolist() == [1.0, 0.0, 3.0]
    assert ends.tolist() == [context_length + len(r) - 1 for r in responses], "index of each response's EOS"
    assert per_token[torch.arange(3), ends].squeeze(-1).tolist() == scores.tolist()
    with pytest.raises(RuntimeError, match="not the next ones"):  # every row of the batch was scored
        scorer.get_reward(query_responses[:1], pad, context_length)
    scorer.expect({"input_ids": query_responses[:, :context_length], "prompt_index": torch.tensor([1, 1, 1])})
    with pytest.raises(RuntimeError, match="not the next ones"):  # rows of another batch are never guessed at
        scorer.get_reward(query_responses[:, 1:], pad, context_length)


def test_encoder_pairs_are_prompt_then_answer_and_truncate_the_prompt_first():
    tokenizer = build_encoder_tokenizer(demo.corpus(demo.make_records()))
    ids = encode_for_reward(tokenizer, [{"role": "user", "content": "describe the river"}], "it is long")
    assert tokenizer.decode(ids) == "[CLS] describe the river [SEP] it is long [SEP]"
    long_prompt = [{"role": "user", "content": "describe the river " * 50}]
    short = encode_for_reward(tokenizer, long_prompt, "it is long", max_length=16)
    assert len(short) == 16 and tokenizer.decode(short).endswith("[SEP] it is long [SEP]")


def test_direct_path_only_for_a_decoder_with_the_policys_tokenizer():
    policy_tokenizer = demo.build_tokenizer(demo.corpus(demo.make_records()))
    encoder_tokenizer = build_encoder_tokenizer(demo.corpus(demo.make_records()))
    decoder_reward = nn.Module()
    decoder_reward.score = nn.Linear(2, 1)
    assert not needs_cross_tokenizer(decoder_reward, policy_tokenizer, policy_tokenizer)
    assert needs_cross_tokenizer(decoder_reward, encoder_tokenizer, policy_tokenizer)
    assert needs_cross_tokenizer(nn.Module(), policy_tokenizer, policy_tokenizer), "no .score head"


def test_ppo_scores_a_llama2_chat_rollout_as_the_reward_stage_encodes_it():
    """With the policy's tokenizer the reward model scores PPO's rollout ids (prompt ids + generated ids) directly.
    Llama-2/Mistral's `[/INST]` merges with the answer's first word in the whole text ('▁[/INST]The'), so the reward
    stage encodes as generation sees it: the prompt's own ids ('... ▁[/INST]'), then the answer's."""
    from transformers import LlamaConfig, LlamaForSequenceClassification
    from trl.experimental.utils import get_reward
    from zoo import LLAMA2, build_tokenizer

    from rlhf_trl.ppo import tokenize_prompts

    tokenizer = build_tokenizer(LLAMA2)
    tokenizer.pad_token = "<unk>"  # id 0, Llama-2-chat generation_config's pad_token_id
    prompts = [
        [{"role": "user", "content": "Tell me about the apple."}],
        [{"role": "user", "content": "Tell me about the apple. Is it red?"}],
    ]
    answers = ["The apple is red.", "The apple is green and the leaf is green."]
    queries = tokenize_prompts(Dataset.from_list([{"prompt": p} for p in prompts]), tokenizer, 1000)["input_ids"]
    # What a policy trained on the same encoding generates: the answer's own tokens, then EOS.
    responses = [tokenizer(a, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for a in answers]
    assert tokenizer.convert_ids_to_tokens(queries[0])[-1] == "▁[/INST]"
    assert tokenizer.convert_ids_to_tokens(responses[0]) == ["▁The", "▁apple", "▁is", "▁red.", "</s>"]
    for prompt, answer, query, response in zip(prompts, answers, queries, responses, strict=True):
        assert encode_for_reward(tokenizer, prompt, answer) == query + response
    whole = tokenizer.apply_chat_template(prompts[0] + [{"role": "assistant", "content": answers[0]}])["input_ids"]
    assert "▁[/INST]The" in tokenizer.convert_ids_to_tokens(whole), "the whole text's own tokens differ"

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, num_labels=1, pad_token_id=0,
    )  # fmt: skip
    model = LlamaForSequenceClassification(config).eval()
    # PPO's rows: queries left-padded to one length, responses right-padded after EOS.
    width = max(map(len, queries))
    rows = [[0] * (width - len(q)) + q + r + [0] * (12 - len(r)) for q, r in zip(queries, responses, strict=True)]
    with torch.no_grad():
        _, direct, _ = get_reward(model, torch.tensor(rows), 0, width)
    expected = score_answers(model, tokenizer, prompts, answers)
    torch.testing.assert_close(direct.squeeze(-1), torch.tensor(expected), atol=1e-5, rtol=1e-4)
