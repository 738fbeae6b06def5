"""Sampling settings and stop tokens: one place for every stage that generates (PPO rollouts, eval, label, chat).

Sampling settings. transformers 5.x merges the model's `generation_config` (its generation_config.json) into the
GenerationConfig a caller passes: `GenerationMixin._prepare_generation_config` fills every field the caller left
None from `model.generation_config`, then from `GenerationConfig._get_default_generation_params()` (top_k 50, ...).
A policy shipped with Qwen2.5-Instruct's defaults (repetition_penalty 1.05, top_p 0.8, top_k 20) would so sample
PPO's rollouts from another distribution than the plain temperature sampling PPO's log-probs and KL assume
(case C03). `sampling_config` therefore builds a complete GenerationConfig: every field the global defaults know is
set to its neutral value, and `sampling_with` makes it the model's own `generation_config` while `generate` runs, so
the fields whose neutral value is None (min_p, suppress_tokens, bad_words_ids, forced tokens, ...) cannot be filled
from the model's file either. The contract: temperature as the recipe or command names it, top_k 0 (off) and
top_p 1.0 (off); temperature 0 decodes greedily.

Stop tokens. A model may end its turns with a token other than its tokenizer's EOS: Llama 3's generation_config
lists [<|end_of_text|>, <|eot_id|>] while its base tokenizer's EOS is <|end_of_text|> and its chat template closes
assistant turns with <|eot_id|> (case C12; Qwen base models with ChatML likewise). `stop_token_ids` is the union of
the tokenizer's EOS and the generation_config's `eos_token_id` (an int or a list), the set that plain
`model.generate` stops at; generation, trimming, EOS rates, PPO truncation and the export all use it.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from pathlib import Path

# Fields of a model's generation_config that say nothing about how tokens are chosen: kept, or not reported.
_NOT_SAMPLING = {
    "_from_model_config",
    "transformers_version",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "decoder_start_token_id",
    "use_cache",
    "output_attentions",
    "output_hidden_states",
    "output_scores",
    "output_logits",
    "return_dict_in_generate",
    "max_length",
    "max_new_tokens",
    "num_return_sequences",
    "cache_implementation",
    "cache_config",
    "compile_config",
    "disable_compile",
}
# Token ids taken over from the model's generation_config (they select no tokens, they only name them).
_KEPT_FROM_MODEL = ("bos_token_id", "decoder_start_token_id")


def as_id_list(value) -> list[int]:
    """An `eos_token_id` as transformers allows it (None, an int, a list or a tensor) as a list of ints."""
    if value is None:
        return []
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def _generation_config_of(source):
    """The GenerationConfig of a model, of a model or adapter folder (an adapter's root base), or itself."""
    from transformers import GenerationConfig

    if source is None or isinstance(source, GenerationConfig):
        return source
    if hasattr(source, "generation_config"):
        return source.generation_config
    from .outputs import base_of, is_adapter

    path = Path(source)
    while is_adapter(path) and not (path / "generation_config.json").is_file():
        path = Path(base_of(path))
    if not (path / "generation_config.json").is_file():
        return None
    return GenerationConfig.from_pretrained(str(path))


def stop_token_ids(tokenizer, source=None) -> list[int]:
    """The ids generation stops at: the tokenizer's EOS, then the generation_config's `eos_token_id` (int or list).

    `source` is a model (its `generation_config`), a GenerationConfig, a model or adapter folder (its
    generation_config.json, an adapter's found on its base), or None for the tokenizer's EOS alone. Order is kept and
    duplicates dropped, so a model whose file names the tokenizer's EOS alone gives `[eos]`. Empty when neither names
    one.
    """
    ids = as_id_list(getattr(tokenizer, "eos_token_id", None))
    config = _generation_config_of(source)
    if config is not None:
        ids += as_id_list(config.eos_token_id)
    return list(dict.fromkeys(ids))


def token_names(tokenizer, ids: Iterable[int]) -> str:
    """`<|end|> (1), <|eot_id|> (4)`: stop ids as a person reads them."""
    return ", ".join(f"{tokenizer.convert_ids_to_tokens(int(i))} ({int(i)})" for i in ids)


def sampling_config(
    temperature: float,
    max_new_tokens: int,
    stop_ids: Sequence[int] | None,
    pad_token_id: int | None,
    num_return_sequences: int = 1,
    **extra,
):
    """A complete GenerationConfig for plain sampling at `temperature` (top_k 0, top_p 1.0), or greedy at 0.

    Every field of `GenerationConfig._get_default_generation_params()` is set (repetition_penalty 1.0,
    no_repeat_ngram_size 0, typical_p 1.0, epsilon/eta cutoff 0.0, num_beams 1, ...), so transformers' merge cannot
    fill one from a model's generation_config.json; the fields that are off when None (min_p, top_h, bad_words_ids,
    suppress_tokens, forced_bos/eos_token_id, sequence_bias, stop_strings, ...) stay None, which `sampling_with`
    keeps so. `stop_ids` become `eos_token_id` (None or empty: run to `max_new_tokens`); `extra` sets further fields
    (e.g. `cache_implementation`). Raises ValueError for a negative temperature.
    """
    from transformers import GenerationConfig

    if temperature < 0:
        raise ValueError(f"temperature must be 0 (greedy) or above, not {temperature}")
    greedy = temperature == 0
    values = GenerationConfig._get_default_generation_params()
    values.update(
        do_sample=not greedy,
        temperature=1.0 if greedy else temperature,
        top_k=50 if greedy else 0,  # greedy ignores it; 50 is the value transformers does not warn about there
        top_p=1.0,
        max_length=None,
        max_new_tokens=max_new_tokens,
        num_return_sequences=num_return_sequences,
        eos_token_id=list(stop_ids or []) or None,
        pad_token_id=pad_token_id,
        **extra,
    )
    config = GenerationConfig()
    for key, value in values.items():  # attribute by attribute: no validation warnings about neutral values
        setattr(config, key, value)
    return config


def ignored_settings(model_config, config) -> dict[str, object]:
    """What a model's generation_config sets that `config` (from `sampling_config`) does not use: name -> value."""
    if model_config is None:
        return {}
    ignored = {}
    for key, value in model_config.to_dict().items():
        if key in _NOT_SAMPLING or key.startswith("_") or value is None:
            continue
        ours = getattr(config, key, None)
        same = ours == value
        if isinstance(value, float) and isinstance(ours, float):
            same = math.isclose(value, ours, rel_tol=1e-5)
        if not same:
            ignored[key] = value
    return ignored


def describe(config, tokenizer=None) -> str:
    """`sample with temperature 0.7, top_k 0, top_p 1.0, up to 28 new tokens, stopping at <|end|> (1)`."""
    if config.do_sample:
        how = f"sample with temperature {config.temperature:g}, top_k {config.top_k}, top_p {float(config.top_p)}"
        if config.min_p:
            how += f", min_p {config.min_p:g}"
    else:
        how = "decode greedily (temperature 0)"
    if config.repetition_penalty not in (None, 1.0):
        how += f", repetition_penalty {config.repetition_penalty:g}"
    how += f", up to {config.max_new_tokens} new tokens"
    stops = as_id_list(config.eos_token_id)
    if not stops:
        return how + ", with no stop token"
    return how + f", stopping at {token_names(tokenizer, stops) if tokenizer is not None else stops}"


def settings_line(prefix: str, config, model, tokenizer=None, whose: str = "the model's") -> str:
    """One line for a stage's log: the effective settings and what the model's generation_config.json loses.

    e.g. `ppo: rollouts sample with temperature 0.7, top_k 0, top_p 1.0, up to 28 new tokens, stopping at <|end|> (1);
    ignored from the policy's generation_config.json: repetition_penalty 1.3, top_p 0.8, top_k 20`.
    """
    line = f"{prefix} {describe(config, tokenizer)}"
    ignored = ignored_settings(_generation_config_of(model), config)
    if ignored:
        line += f"; ignored from {whose} generation_config.json: " + ", ".join(f"{k} {v}" for k, v in ignored.items())
    return line


def generating_model(model):
    """The transformers model whose `generate` runs: a PeftModel's base model, else the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@contextmanager
def sampling_with(model, config):
    """Runs the block with `config` as the model's own generation_config, so `generate` merges nothing else in.

    The model's token ids that select nothing (bos, decoder start) are carried over when `config` leaves them None;
    the model's generation_config is put back on exit (saved models keep their file's settings).
    """
    target = generating_model(model)
    original = target.generation_config
    config = copy.deepcopy(config)
    for key in _KEPT_FROM_MODEL:
        if getattr(config, key, None) is None and original is not None:
            setattr(config, key, getattr(original, key, None))
    target.generation_config = config
    try:
        yield config
    finally:
        target.generation_config = original


def first_stop_trim(ids: Sequence[int], stop_ids: int | Iterable[int]) -> list[int]:
    """An answer's tokens up to and including its first stop id (what generation pads after it is dropped)."""
    stops = set(as_id_list(stop_ids))
    ids = list(ids)
    for position, token in enumerate(ids):
        if token in stops:
            return ids[: position + 1]
    return ids
