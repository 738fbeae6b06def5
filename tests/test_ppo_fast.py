"""The fast PPO engine (rlhf_trl.ppo_fast): chunked log-probs, the shared base and its refusals.

That it equals TRL 1.12's PPOTrainer step for step with separate models is checked in TRL 1.12's own environment
(reference/test_against_trl.py, `make test-reference`); the shared base's curves against TRL's across seeds by
`make bench-engines`.
"""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from transformers import AutoModelForSequenceClassification, LlamaConfig

from rlhf_trl.cli import UserError
from rlhf_trl.modeling import load_model
from rlhf_trl.ppo_engine import get_reward
from rlhf_trl.ppo_fast import FastPPOTrainer, active_adapter, check_fast_engine, chunked_logprobs, share_base


def test_chunked_logprobs_equal_the_full_log_softmax_and_its_gradients():
    torch.manual_seed(0)
    hidden = torch.randn(3, 5, 8, requires_grad=True)
    head = torch.nn.Linear(8, 50, bias=False)
    targets = torch.randint(0, 50, (3, 5))
    logits = head(hidden) / 0.7
    full = torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1)
    full.sum().backward()
    expected_grads = hidden.grad.clone(), head.weight.grad.clone()
    hidden.grad, head.weight.grad = None, None

    chunked, chunked_entropy = chunked_logprobs(hidden, targets, head, 0.7, chunk_tokens=4)  # 15 tokens: 4 chunks
    torch.testing.assert_close(chunked, full)
    torch.testing.assert_close(chunked_entropy, entropy)
    assert not chunked_entropy.requires_grad, "entropy is a statistic; no graph is kept for it"
    with torch.no_grad():  # rollouts: log-probs alone
        alone, no_entropy = chunked_logprobs(hidden, targets, head, 0.7, chunk_tokens=4, with_entropy=False)
    torch.testing.assert_close(alone, full.detach())
    assert not no_entropy.any()
    chunked.sum().backward()
    torch.testing.assert_close(hidden.grad, expected_grads[0])
    torch.testing.assert_close(head.weight.grad, expected_grads[1])


def test_softcapped_logprobs_equal_gemma2s_own_log_softmax():
    """Gemma-2 caps its logits (final_logit_softcapping): the chunked log-probs must be those of the model's logits."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, final_logit_softcapping=2.0,
    )  # fmt: skip
    model = Gemma2ForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # logits well past the cap, where tanh bends them
        ids = torch.randint(0, 64, (2, 6))
        hidden = model.model(input_ids=ids).last_hidden_state[:, :-1]
        logits = model(input_ids=ids).logits[:, :-1] / 0.7
        assert logits.abs().max() * 0.7 <= 2.0 and (model.lm_head(hidden).abs() > 4).any()
        expected = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        got, _ = chunked_logprobs(hidden, ids[:, 1:], model.lm_head, 0.7, 4, softcap=config.final_logit_softcapping)
        uncapped, _ = chunked_logprobs(hidden, ids[:, 1:], model.lm_head, 0.7, 4)
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(uncapped, expected), "without the cap the log-probs differ"
    check_fast_engine(config)  # so the fast engine takes Gemma-2


def test_models_with_other_post_processed_logits_are_sent_to_the_trl_engine():
    check_fast_engine(LlamaConfig())
    config = LlamaConfig()
    config.logit_scale = 0.5
    with pytest.raises(UserError, match="logit_scale: set ppo_engine: trl"):
        check_fast_engine(config)


def test_the_shared_base_scores_like_the_reward_model_and_the_value_starts_there(trained):
    from peft import LoraConfig

    reward = load_model(trained["reward"], AutoModelForSequenceClassification, {"num_labels": 1}).eval()
    policy, sft = load_model(trained["sft"]), load_model(trained["sft"]).eval()
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    peft_policy, value_model, reward_model = share_base(policy, lora, trained["reward"])
    trainable = {name for name, p in peft_policy.named_parameters() if p.requires_grad}
    assert trainable and all(".default." in name or ".value." in name for name in trainable)
    assert any(".value." in name for name in trainable) and any(".default." in name for name in trainable)
    assert value_model.score.weight.requires_grad and not reward_model.score.weight.requires_grad

    # The trainer's reference pass: peft's disable_adapter() freezes "value" on its way out; the trainer's must not.
    trainer = object.__new__(FastPPOTrainer)
    trainer.policy_model, trainer.model = peft_policy, SimpleNamespace(policy=peft_policy)
    trainer.accelerator, trainer.is_peft_model, trainer.ref_adapter_name = Accelerator(), True, None
    peft_policy.eval()
    probe = torch.tensor([[5, 17, 42, 99, 7, 0, 0], [8, 9, 10, 11, 12, 13, 14]])  # 0 pads the first row
    with torch.no_grad():
        with trainer.null_ref_context():  # the reference: the SFT policy itself
            torch.testing.assert_close(peft_policy(probe).logits, sft(probe).logits)
        expected = get_reward(reward, probe, 0, 3)[1]
        torch.testing.assert_close(get_reward(reward_model, probe, 0, 3)[1], expected, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(get_reward(value_model, probe, 0, 3)[1], expected, atol=1e-5, rtol=1e-4)
    assert {name for name, p in peft_policy.named_parameters() if p.requires_grad} == trainable
    with active_adapter(peft_policy, "value"):
        with torch.no_grad():
            value_model.backbone(input_ids=probe)  # nested: the value pass inside the value loss's own switch
        assert peft_policy.active_adapter == "value", "the value backward (and its recomputation) runs under it"
        assert {name for name, p in peft_policy.named_parameters() if p.requires_grad} == trainable
    assert peft_policy.active_adapter == "default"
    with peft_policy.disable_adapter():
        pass
    assert not any(p.requires_grad for name, p in peft_policy.named_parameters() if ".value." in name), (
        "peft itself freezes the inactive adapters; if this changes, trainable_flags_kept is no longer needed"
    )


def test_a_shared_base_run_publishes_the_policy_adapter_alone(trained):
    assert "share one base" in trained["ppo_stdout"], "the demo reward model is a LoRA on the SFT model"
    published = {path.name for path in Path(trained["ppo"]).iterdir()}
    assert "adapter_model.safetensors" in published and not {"value", "reward"} & published
    config = json.loads((Path(trained["ppo"]) / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM"


def test_a_reward_adapter_the_shared_base_cannot_take_whole_is_refused(trained, tmp_path):
    """Extra tensors (saved embeddings, token deltas) or trained biases would be dropped or would move the policy's
    base too: one line that says to keep the reward model separate."""
    import shutil

    from peft import LoraConfig
    from safetensors.torch import load_file, save_file

    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    extra = tmp_path / "extra"
    shutil.copytree(trained["reward"], extra)
    weights = load_file(str(extra / "adapter_model.safetensors"))
    embeddings = load_model(trained["sft"]).get_input_embeddings().weight
    weights["base_model.model.model.embed_tokens.weight"] = torch.zeros_like(embeddings)  # peft would load it
    save_file(weights, str(extra / "adapter_model.safetensors"))
    with pytest.raises(UserError, match=r"embed_tokens.*set shared_base: false"):
        share_base(load_model(trained["sft"]), lora, str(extra))

    biased = tmp_path / "biased"
    shutil.copytree(trained["reward"], biased)
    config = json.loads((biased / "adapter_config.json").read_text())
    (biased / "adapter_config.json").write_text(json.dumps({**config, "bias": "all"}))
    with pytest.raises(UserError, match=r"bias: all.*set shared_base: false"):
        share_base(load_model(trained["sft"]), lora, str(biased))
