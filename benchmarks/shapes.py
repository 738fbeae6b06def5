"""Named model shapes for the benchmarks: transformers configs of real models, built from their config classes.

    from benchmarks.shapes import SHAPES, build_config, parameter_count
    build_config("llama3.1-8b", pad_token_id=0, eos_token_id=1)

Why configs and not downloads: the benchmarks measure speed and memory, which depend on the shape (hidden size,
layers, heads, KV heads, MLP width, vocabulary) and not on the weights, so random weights of the right shape
give the same numbers offline. The sizes are copied from each model's public config.json; `parameter_count`
builds the model on the meta device (no memory) so a test can check them against the published sizes.
Special-token ids are the benchmark's own (its tokenizer is a stub), so they are passed in.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Shape:
    config_class: str  # "Qwen2Config" or "LlamaConfig"
    dims: dict
    mirrors: str  # the public model whose config.json these numbers come from
    billions: float  # its published parameter count, for the shape test


_QWEN2_5 = {
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1e6},
}

SHAPES: dict[str, Shape] = {
    # Tiny, for CPU runs and CI: the benchmark's code paths, not its numbers.
    "toy": Shape(
        "Qwen2Config",
        {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": True, **_QWEN2_5,
         "max_position_embeddings": 1024},
        "none (a 2-layer Qwen2)",
        0.0001,
    ),
    # The smollm2-135m recipe's policy (real weights there; random here). Small enough for a CPU run.
    "smollm2-135m": Shape(
        "LlamaConfig",
        {"vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
         "num_attention_heads": 9, "num_key_value_heads": 3, "tie_word_embeddings": True,
         "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
         "rope_parameters": {"rope_type": "default", "rope_theta": 100000.0}},
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        0.135,
    ),
    "qwen2.5-0.5b": Shape(
        "Qwen2Config",
        {"vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
         "num_attention_heads": 14, "num_key_value_heads": 2, "tie_word_embeddings": True, **_QWEN2_5},
        "Qwen/Qwen2.5-0.5B",
        0.49,
    ),
    "qwen2.5-1.5b": Shape(
        "Qwen2Config",
        {"vocab_size": 151936, "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
         "num_attention_heads": 12, "num_key_value_heads": 2, "tie_word_embeddings": True, **_QWEN2_5},
        "Qwen/Qwen2.5-1.5B",
        1.54,
    ),
    "qwen2.5-7b": Shape(
        "Qwen2Config",
        {"vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
         "num_attention_heads": 28, "num_key_value_heads": 4, "tie_word_embeddings": False, **_QWEN2_5},
        "Qwen/Qwen2.5-7B",
        7.62,
    ),
    "llama3.1-8b": Shape(
        "LlamaConfig",
        {"vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
         "num_attention_heads": 32, "num_key_value_heads": 8, "tie_word_embeddings": False,
         "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
         "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}},
        "meta-llama/Llama-3.1-8B",
        8.03,
    ),
    # A dense 20B: InternLM2-20B's sizes in a Llama config (InternLM2 is a Llama-style decoder with fused QKV,
    # which changes no size). The target: it fits a 24 GB card in 4-bit.
    "20b": Shape(
        "LlamaConfig",
        {"vocab_size": 92544, "hidden_size": 6144, "intermediate_size": 16384, "num_hidden_layers": 48,
         "num_attention_heads": 48, "num_key_value_heads": 8, "tie_word_embeddings": False,
         "max_position_embeddings": 32768, "rms_norm_eps": 1e-5,
         "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}},
        "internlm/internlm2-20b",
        19.86,
    ),
}


def build_config(name: str, pad_token_id: int, eos_token_id: int):
    import transformers

    shape = SHAPES[name]
    config_class = getattr(transformers, shape.config_class)
    return config_class(**shape.dims, pad_token_id=pad_token_id, bos_token_id=eos_token_id, eos_token_id=eos_token_id)


def parameter_count(name: str) -> int:
    """Parameters of the causal LM of this shape, counted on the meta device (nothing is allocated)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(build_config(name, pad_token_id=0, eos_token_id=1))
    return sum(p.numel() for p in model.parameters())
