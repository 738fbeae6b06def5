"""Merging an adapter trained after tokens were added (LOG C10): its tokenizer and its saved embedding/output
matrices are longer than the base's, and the base is resized to them before the adapter loads."""

import json
import shutil

import pytest
import torch
from conftest import run_module
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GPT2LMHeadModel

ADDED = {"pad_token": "<|pad|>", "additional_special_tokens": ["<|sep|>"]}


@pytest.fixture(scope="module")
def resized_adapter(zoo, tmp_path_factory):
    """A LoRA adapter on the zoo's GPT-2 (600 tokens) whose training added 2 tokens: 602-row wte/lm_head saved
    via modules_to_save, the 602-token tokenizer next to it, adapter_config.json pointing at the 600-token base."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("c10")
    tokenizer = AutoTokenizer.from_pretrained(zoo["gpt2"])
    model = AutoModelForCausalLM.from_pretrained(zoo["gpt2"])
    tokenizer.add_special_tokens(ADDED)
    model.resize_token_embeddings(len(tokenizer))
    config = LoraConfig(r=4, target_modules=["c_attn"], modules_to_save=["wte", "lm_head"], init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():  # what training would have learnt for the new tokens: rows we can recognise
        peft_model.base_model.model.transformer.wte.modules_to_save["default"].weight[-2:] = 0.5
    peft_model.save_pretrained(root / "adapter")
    tokenizer.save_pretrained(root / "adapter")
    assert json.loads((root / "adapter/adapter_config.json").read_text())["base_model_name_or_path"] == str(zoo["gpt2"])
    return root / "adapter"


def test_an_adapter_with_added_tokens_merges_and_the_export_generates(resized_adapter, tmp_path):
    export = tmp_path / "export"
    result = run_module("merge", "--model", str(resized_adapter), "--output", str(export))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "merge: wrote a standalone model" in result.stdout

    tokenizer = AutoTokenizer.from_pretrained(export)
    model = AutoModelForCausalLM.from_pretrained(export).eval()
    assert len(tokenizer) == 602 and model.get_input_embeddings().weight.shape == (602, 64)
    assert torch.equal(model.get_input_embeddings().weight[-2:], torch.full((2, 64), 0.5)), "the adapter's rows"
    saved = load_file(str(resized_adapter / "adapter_model.safetensors"))
    torch.testing.assert_close(
        model.get_input_embeddings().weight, saved["base_model.model.transformer.wte.modules_to_save.weight"]
    )
    prompt = tokenizer("The apple is<|sep|>", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] > prompt.input_ids.shape[1]


def test_an_adapter_on_a_base_of_another_shape_names_the_mismatch(resized_adapter, tmp_path):
    narrow = tmp_path / "narrow"  # the same GPT-2, 32 wide instead of 64
    base = json.loads((resized_adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    config = AutoConfig.from_pretrained(base)
    config.n_embd = 32
    GPT2LMHeadModel(config).save_pretrained(narrow)
    wrong = tmp_path / "wrong"
    shutil.copytree(resized_adapter, wrong)
    adapter_config = json.loads((wrong / "adapter_config.json").read_text())
    (wrong / "adapter_config.json").write_text(json.dumps({**adapter_config, "base_model_name_or_path": str(narrow)}))

    result = run_module("merge", "--model", str(wrong), "--output", str(tmp_path / "export"))
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "size mismatch for" in errors[0], result.stderr[-3000:]
    assert "[602, 64] in the adapter vs [602, 32] in the base" in errors[0]
    assert "point it at the base it was trained on" in errors[0]
    assert not (tmp_path / "export").exists()


def test_an_adapter_without_its_tokenizer_says_how_many_tokens_it_needs(resized_adapter, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(resized_adapter / name, bare / name)
    result = run_module("merge", "--model", str(bare), "--output", str(tmp_path / "export"))
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "size mismatch for" in errors[0], result.stderr[-3000:]
    assert "trained with 602 tokens and the base has 600" in errors[0]
