"""The LoRA path on a second architecture: GPT-2 with LoRA SFT, a reward model and PPO on that adapter,
then export. Every output is an adapter on an adapter, and chat/merge must rebuild the whole chain."""

import pytest
import torch
from conftest import ppo_args, reward_args, run_module, run_stage, sft_args
from tests_helpers import build_gpt2

from rlhf_trl.modeling import base_of, generate, is_adapter, load_model, load_tokenizer
from rlhf_trl.outputs import read_marker


@pytest.fixture(scope="module")
def gpt2_chain(world, tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt2")
    build_gpt2(load_tokenizer(world / "models/base"), root / "base")
    paths = {"base": str(root / "base"), "data": str(world / "data")} | {
        name: str(root / name) for name in ("sft", "reward", "ppo", "export")
    }
    lora = ("--use_peft", "true", "--lora_target_modules", "all-linear", "--lora_r", "8")
    for stage, args in (("sft", sft_args), ("reward", reward_args), ("ppo", ppo_args)):
        result = run_stage(stage, *args(paths, *lora))
        assert result.returncode == 0, f"{stage}:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return paths


def test_every_stage_is_an_adapter_on_the_one_before(gpt2_chain):
    assert all(is_adapter(gpt2_chain[stage]) for stage in ("sft", "reward", "ppo"))
    assert base_of(gpt2_chain["sft"]) == gpt2_chain["base"]
    assert base_of(gpt2_chain["reward"]) == gpt2_chain["sft"]
    assert base_of(gpt2_chain["ppo"]) == gpt2_chain["sft"]


def test_ppo_policy_differs_from_sft_and_generates(gpt2_chain):
    sft, ppo = load_model(gpt2_chain["sft"]), load_model(gpt2_chain["ppo"])
    assert all(p.requires_grad for p in sft.parameters()), "a merged adapter chain trains like a full model"
    assert any(not torch.equal(a, b) for a, b in zip(sft.parameters(), ppo.parameters(), strict=True))
    answer = generate(ppo, load_tokenizer(gpt2_chain["ppo"]), [[{"role": "user", "content": "What is a tiger?"}]])
    assert answer[0].strip()


def test_export_merges_the_whole_chain(gpt2_chain):
    result = run_module("merge", "--model", gpt2_chain["ppo"], "--output", gpt2_chain["export"])
    assert result.returncode == 0, result.stderr
    assert read_marker(gpt2_chain["export"])["merged_adapters"] is True

    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(gpt2_chain["export"]).eval()
    chained = load_model(gpt2_chain["ppo"]).eval()
    probe = torch.tensor([[5, 17, 42, 99]])
    with torch.no_grad():
        torch.testing.assert_close(plain(probe).logits, chained(probe).logits, atol=1e-4, rtol=1e-4)
