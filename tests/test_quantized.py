"""4-bit and 8-bit loading through TRL's quantization config. Needs CUDA and bitsandbytes; skipped without."""

import pytest
import torch

from rlhf_trl.modeling import load_model, model_kwargs

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="bitsandbytes 4/8-bit loading needs a CUDA GPU"),
]


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_base_loads_and_generates(world, bits):
    from trl import ModelConfig

    model_args = ModelConfig(
        model_name_or_path=str(world / "models/base"), dtype="bfloat16", load_in_4bit=bits == 4, load_in_8bit=bits == 8
    )
    model = load_model(model_args.model_name_or_path, kwargs=model_kwargs(model_args))
    assert getattr(model, f"is_loaded_in_{bits}bit")
    output = model.generate(torch.tensor([[5, 6, 7]], device=model.device), max_new_tokens=4, do_sample=False)
    assert output.shape == (1, 7)
