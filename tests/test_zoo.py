"""The zoo's models carry the facts of the real models they stand for (see tests/zoo.py for the sources)."""

import json

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GenerationConfig,
)
from zoo import CAUSAL, DISTILBERT, GEMMA, GPT2, LLAMA2, LLAMA3, NAMES, QWEN, QWEN_SYSTEM, SPECS

HI = [{"role": "user", "content": "Tell me about the apple."}]
ANSWER = [{"role": "assistant", "content": "The apple is red."}]


def ids(tokenizer, tokens):
    return (
        [tokenizer.convert_tokens_to_ids(t) for t in tokens]
        if isinstance(tokens, list)
        else (tokenizer.convert_tokens_to_ids(tokens))
    )


@pytest.mark.parametrize("name", NAMES)
def test_special_tokens_are_the_real_ones(zoo, name):
    facts = SPECS[name].facts
    tokenizer = AutoTokenizer.from_pretrained(zoo[name])
    for role in ("bos", "eos", "pad", "unk"):
        if role in facts:
            assert getattr(tokenizer, f"{role}_token") == facts[role], role
    assert bool(tokenizer.chat_template) == facts["template"]
    if "bos_added" in facts:
        first = tokenizer("The apple").input_ids[0]
        assert (first == tokenizer.bos_token_id) == facts["bos_added"]


@pytest.mark.parametrize("name", CAUSAL)
def test_causal_model_reloads_and_generates_with_its_generation_config(zoo, name):
    facts = SPECS[name].facts
    tokenizer = AutoTokenizer.from_pretrained(zoo[name])
    model = AutoModelForCausalLM.from_pretrained(zoo[name]).eval()
    assert sum(p.numel() for p in model.parameters()) < 500_000, "tiny, so a stage runs in seconds"
    generation = GenerationConfig.from_pretrained(zoo[name])
    assert generation.eos_token_id == ids(tokenizer, facts["stop"])
    for key, value in facts["sampling"].items():
        assert getattr(generation, key) == value, key
    config = AutoConfig.from_pretrained(zoo[name])
    assert config.max_position_embeddings == facts["context"]  # n_positions for GPT-2
    inputs = tokenizer("Tell me about the apple.", return_tensors="pt")
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=5, pad_token_id=tokenizer.pad_token_id or 0)
    assert out.shape[1] > inputs.input_ids.shape[1]


def test_gpt2_has_only_endoftext_and_a_short_context(zoo):
    tokenizer = AutoTokenizer.from_pretrained(zoo[GPT2])
    assert tokenizer.all_special_tokens == ["<|endoftext|>"]
    assert tokenizer.pad_token is None and tokenizer.chat_template is None
    assert AutoConfig.from_pretrained(zoo[GPT2]).n_positions == tokenizer.model_max_length == 128


def test_qwen_writes_its_default_system_prompt_and_samples_by_default(zoo):
    tokenizer = AutoTokenizer.from_pretrained(zoo[QWEN])
    text = tokenizer.apply_chat_template(HI, tokenize=False, add_generation_prompt=True)
    assert text == (
        f"<|im_start|>system\n{QWEN_SYSTEM}<|im_end|>\n<|im_start|>user\nTell me about the apple.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    own = tokenizer.apply_chat_template([{"role": "system", "content": "Be brief."}, *HI], tokenize=False)
    assert QWEN_SYSTEM not in own and own.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    generation = json.loads((zoo[QWEN] / "generation_config.json").read_text())
    im_end, endoftext = ids(tokenizer, ["<|im_end|>", "<|endoftext|>"])
    assert generation["eos_token_id"] == [im_end, endoftext]
    assert generation["pad_token_id"] == endoftext
    assert (generation["do_sample"], generation["temperature"], generation["top_p"]) == (True, 0.7, 0.8)
    assert (generation["top_k"], generation["repetition_penalty"]) == (20, 1.05)
    config = AutoConfig.from_pretrained(zoo[QWEN])
    assert config.vocab_size > len(tokenizer), "Qwen's embedding matrix has rows no token uses"
    assert config.vocab_size % 64 == 0


def test_llama3_ends_turns_with_eot_and_stops_at_three_ids(zoo):
    tokenizer = AutoTokenizer.from_pretrained(zoo[LLAMA3])
    text = tokenizer.apply_chat_template([*HI, *ANSWER], tokenize=False)
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date")
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\nThe apple is red.<|eot_id|>")
    assert tokenizer.eos_token == "<|eot_id|>" and tokenizer.pad_token is None
    finetune_pad = tokenizer.convert_tokens_to_ids("<|finetune_right_pad_id|>")
    assert finetune_pad == tokenizer.convert_tokens_to_ids("<|begin_of_text|>") + 4  # 128004 vs 128000
    generation = GenerationConfig.from_pretrained(zoo[LLAMA3])
    assert generation.eos_token_id == ids(tokenizer, ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"])
    # The template writes BOS and so does the tokenizer: encoding the rendered text naively doubles it.
    doubled = tokenizer(text).input_ids
    assert doubled[:2] == [tokenizer.bos_token_id] * 2
    # Contents are trimmed, as Llama-3.1's template does.
    padded = tokenizer.apply_chat_template([{"role": "user", "content": "  Hi  "}], tokenize=False)
    assert "<|end_header_id|>\n\nHi<|eot_id|>" in padded


def test_llama2_prompt_is_not_a_prefix_of_prompt_and_answer(zoo):
    tokenizer = AutoTokenizer.from_pretrained(zoo[LLAMA2])
    prompt = tokenizer.apply_chat_template(HI, add_generation_prompt=True, return_dict=False)
    whole = tokenizer.apply_chat_template([*HI, *ANSWER], return_dict=False)
    assert whole[: len(prompt)] != prompt
    assert tokenizer.convert_ids_to_tokens(prompt)[-1] == "▁[/INST]"
    assert "▁[/INST]The" in tokenizer.convert_ids_to_tokens(whole)
    assert whole[-1] == tokenizer.eos_token_id and whole[0] == tokenizer.bos_token_id
    # Decoding gives the spaces back (`▁` -> ' ', the one put in front stripped), as Llama-2's tokenizer does.
    plain = tokenizer("The leaf is green.", add_special_tokens=False).input_ids
    assert tokenizer.convert_ids_to_tokens(plain)[0] == "▁The" and tokenizer.decode(plain) == "The leaf is green."
    text = "[INST] Tell me about the apple. [/INST]The apple is red."
    assert tokenizer.decode(whole, skip_special_tokens=True) == text
    assert tokenizer.pad_token is None and tokenizer.model_max_length > 10**20  # unset, as Llama-2's
    assert tokenizer.convert_ids_to_tokens([0, 1, 2]) == ["<unk>", "<s>", "</s>"]
    generation = GenerationConfig.from_pretrained(zoo[LLAMA2])
    assert generation.pad_token_id == 0 and generation.eos_token_id == 2


def test_gemma_refuses_a_system_turn_and_calls_the_assistant_model(zoo):
    tokenizer = AutoTokenizer.from_pretrained(zoo[GEMMA])
    with pytest.raises(Exception, match="System role not supported"):
        tokenizer.apply_chat_template([{"role": "system", "content": "Be brief."}, *HI], tokenize=False)
    text = tokenizer.apply_chat_template([*HI, *ANSWER], tokenize=False)
    assert text == (
        "<bos><start_of_turn>user\nTell me about the apple.<end_of_turn>\n"
        "<start_of_turn>model\nThe apple is red.<end_of_turn>\n"
    )
    assert tokenizer.convert_ids_to_tokens([0, 1, 2, 3]) == ["<pad>", "<eos>", "<bos>", "<unk>"]
    generation = GenerationConfig.from_pretrained(zoo[GEMMA])
    assert generation.eos_token_id == ids(tokenizer, ["<eos>", "<end_of_turn>"])
    assert generation.pad_token_id == 0


def test_distilbert_reward_is_a_one_label_classifier_with_128_positions(zoo):
    tokenizer = AutoTokenizer.from_pretrained(zoo[DISTILBERT])
    model = AutoModelForSequenceClassification.from_pretrained(zoo[DISTILBERT]).eval()
    assert model.config.num_labels == 1 and model.config.max_position_embeddings == 128
    batch = tokenizer(["the apple is red.", "a river"], ["i hope this helps!", "ok"], padding=True, return_tensors="pt")
    assert tokenizer.convert_ids_to_tokens(batch.input_ids[0])[0] == "[CLS]"
    with torch.no_grad():
        assert model(**batch).logits.shape == (2, 1)


def test_an_unknown_name_is_refused(tmp_path):
    from zoo import build

    with pytest.raises(KeyError, match="choose one of"):
        build("gpt-5", tmp_path)
