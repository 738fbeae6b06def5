"""The PPO engine's fix for plain TRL's 4-bit failure, shown with the same cast on a bf16 model on CPU."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from rlhf_trl.ppo_engine import _trl_ppo, restore_bf16_norms


def test_norms_cast_to_float32_by_trl_go_back_to_bf16_and_generation_works():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    model = get_peft_model(LlamaForCausalLM(config).to(torch.bfloat16), LoraConfig(r=4, target_modules="all-linear"))
    _trl_ppo.peft_module_casting_to_bf16(model)  # what TRL's PPOTrainer does to a 4-bit policy under bf16
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(RuntimeError, match="dtype|scalar type"):
        model.generate(input_ids=ids, max_new_tokens=2, do_sample=False)
    assert restore_bf16_norms(model) == 2 * config.num_hidden_layers + 1
    assert model.generate(input_ids=ids, max_new_tokens=2, do_sample=False).shape == (1, 5)
