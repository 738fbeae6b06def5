"""Padding and reward encodings that TRL's PPO depends on: pad must not be EOS, and a reward is read at EOS."""

from tests_helpers import build_gpt2

from rlhf_trl import demo
from rlhf_trl.modeling import ensure_distinct_pad, load_tokenizer
from rlhf_trl.rewards import encode_for_reward


def demo_tokenizer():
    return demo.build_tokenizer(demo.corpus(demo.make_records()))


def test_a_spare_pad_token_is_preferred_to_eos(tmp_path):
    tokenizer = demo_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|finetune_right_pad_id|>"]})
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path)
    assert load_tokenizer(tmp_path).pad_token == "<|finetune_right_pad_id|>"


def test_full_fine_tuning_gets_its_own_pad_token(tmp_path):
    from transformers import AutoModelForCausalLM

    tokenizer = demo_tokenizer()
    build_gpt2(tokenizer, tmp_path / "gpt2")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "gpt2")
    tokenizer.pad_token = tokenizer.eos_token
    assert ensure_distinct_pad(tokenizer, model)
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer) == model.config.vocab_size
    assert not ensure_distinct_pad(tokenizer, model), "a second call changes nothing"


def test_reward_encoding_ends_at_eos_even_when_the_template_adds_text_after_it():
    tokenizer = demo_tokenizer()
    tokenizer.chat_template = demo.CHAT_TEMPLATE.replace("+ eos_token }}", "+ eos_token + '\\n' }}")
    ids = encode_for_reward(tokenizer, [{"role": "user", "content": "Describe the river."}], "It is long.")
    assert ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids).endswith("It is long.<|end|>")
