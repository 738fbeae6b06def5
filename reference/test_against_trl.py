"""Our PPO engine against TRL 1.12's PPOTrainer, the reference it must agree with (runs in .venv-reference).

With separate models (`shared_base: false`) our engine computes TRL's update on other code paths (chunked
log-probs from hidden states, rollouts without generation scores, two backward passes): the same seed, prompts
and models must give TRL's metrics step for step and the same trained weights. Ours runs as the product runs it
(`python -m rlhf_trl.ppo`), TRL's through `reference/trl_ppo.py` on the same recipe and overrides, which builds
the roles with the stage's own helpers. With the shared base (the recipes' setting) the value model is an adapter
and a head instead of a full copy, so only a statistical comparison is left: `make bench-engines`.
"""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhf_trl.metrics_log import read_metrics

from .conftest import ROOT, ppo_args, run_reference, run_stage

COMPARED = ("objective/scores", "objective/kl", "objective/entropy", "loss/policy_avg", "loss/value_avg", "val/ratio")


def trained_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    """The saved policy's weights: its LoRA adapter, or the whole model after a full fine-tune."""
    folder = Path(folder)
    adapter = folder / "adapter_model.safetensors"
    return load_file(adapter if adapter.is_file() else folder / "model.safetensors")


@pytest.mark.parametrize("training", ["lora", "full"])
def test_our_engine_takes_trls_steps_with_separate_models(training, sft_and_reward, tmp_path):
    """Per step: reward-model scores, KL, entropy, policy and value losses and the probability ratio; at the end the
    trained adapter (LoRA) or model (full fine-tune). A full fine-tune's reference is TRL's frozen copy: a KL stuck
    at 0 would mean the policy was its own reference."""
    settings = ["--shared_base", "false", "--logging_steps", "1", "--save_strategy", "no"]
    settings += ["--use_peft", str(training == "lora").lower(), "--logprob_chunk_tokens", "100"]
    runs = {}
    for engine in ("ours", "trl"):
        paths = {**sft_and_reward, "ppo": str(tmp_path / engine)}
        if engine == "ours":
            result = run_stage("ppo", *ppo_args(paths, *settings))
        else:
            result = run_reference(
                "trl_ppo", "--config", str(ROOT / "recipes/demo/ppo.yaml"), *ppo_args(paths, *settings)
            )
        assert result.returncode == 0, f"{engine}:\n{result.stderr[-3000:]}"
        runs[engine] = read_metrics(paths["ppo"])
    assert len(runs["trl"]) == len(runs["ours"]) == 4  # 64 episodes, 16 a step
    assert any(abs(step["objective/kl"]) > 1e-4 for step in runs["ours"]), "the policy moved away from its reference"
    for step, (trl, ours) in enumerate(zip(runs["trl"], runs["ours"], strict=True), start=1):
        for key in COMPARED:
            assert ours[key] == pytest.approx(trl[key], rel=2e-3, abs=2e-4), f"step {step}: {key}"

    ours, trl = trained_weights(tmp_path / "ours"), trained_weights(tmp_path / "trl")
    assert ours.keys() == trl.keys()
    if training == "lora":  # LoRA's B starts at zero: how far it went is all of it
        start = {name: torch.zeros_like(value) if "lora_B" in name else value for name, value in trl.items()}
        assert any("lora_B" in name for name in trl)
    else:
        start = load_file(Path(sft_and_reward["sft"]) / "model.safetensors")
        assert start.keys() == trl.keys()
    moved = sum((trl[name] - start[name]).norm() ** 2 for name in trl) ** 0.5
    apart = sum((ours[name] - trl[name]).norm() ** 2 for name in trl) ** 0.5
    assert moved > 1e-3, "training changed the weights"
    assert apart < 1e-2 * moved, f"ours ended {apart:.2e} from TRL's weights, which moved {moved:.2e}"
