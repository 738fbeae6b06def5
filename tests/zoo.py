"""A zoo of tiny models, built offline, that carry the facts of real models a pipeline trips over.

    from zoo import NAMES, SPECS, build
    path = build("qwen2.5-instruct", tmp_path / "qwen")      # tokenizer + random tiny model + generation_config

Each entry is a randomly initialised model (hidden 32-64, 1-2 layers) with a tokenizer trained here, on the
demo world's texts (`rlhf_trl.demo.make_records`), but with the real model's special tokens (names and
their place in the vocabulary), pad/EOS relation, BOS handling, chat template (copied or cut down from the
real one, keeping what matters: default system prompt, refused roles, `trim`, what follows the generation
prompt), generation_config fields and a context length scaled down to a few hundred positions. The facts
are written out in `SPECS[name].facts` (checked by tests/test_zoo.py), from the real repositories'
tokenizer_config.json / generation_config.json / config.json:

- `gpt2` (openai-community/gpt2): byte-level BPE; `<|endoftext|>` is bos, eos and unk, and the only
  special token; no pad, no chat template; learned positions (n_positions 128 here, model_max_length the same).
- `qwen2.5-instruct` (Qwen/Qwen2.5-0.5B-Instruct): Qwen2; ChatML; the template writes "You are Qwen, created
  by Alibaba Cloud. You are a helpful assistant." when no system turn is given; eos `<|im_end|>`, pad
  `<|endoftext|>`, no BOS; generation_config samples (temperature 0.7, top_p 0.8, top_k 20,
  repetition_penalty 1.05) and stops at [<|im_end|>, <|endoftext|>]; the embedding matrix is larger than the
  tokenizer (config.vocab_size rounded up, as 151936 > 151665); tied embeddings.
- `llama3.1-instruct` (meta-llama/Llama-3.1-8B-Instruct): Llama; special tokens at the end of the vocabulary in
  the real order (<|begin_of_text|>, <|end_of_text|>, reserved, <|finetune_right_pad_id|>, reserved,
  <|start_header_id|>, <|end_header_id|>, <|eom_id|>, <|eot_id|>, <|python_tag|>); the tokenizer adds
  <|begin_of_text|> and the template writes it too; turns end with <|eot_id|>, the tokenizer's eos;
  the template always writes a system header (knowledge/today dates) and trims contents; no pad;
  generation_config eos [<|end_of_text|>, <|eom_id|>, <|eot_id|>], temperature 0.6, top_p 0.9.
- `llama2-chat` (Llama-2-chat / Mistral-Instruct style): Llama; SentencePiece-style Metaspace BPE with byte
  fallback, `<unk>` 0, `<s>` 1 (added by the tokenizer and written by the template), `</s>` 2; no pad (the
  generation_config's pad_token_id is 0, `<unk>`, as Llama-2-chat's); `[INST] ... [/INST]` with the answer
  right after `[/INST]`, so the prompt's last piece merges with the answer's first (`▁[/INST]The`):
  prompt ids are not a prefix of prompt+answer ids; tokenizer model_max_length unset (1e30), as the real one.
- `gemma` (google/gemma-2-2b-it): Gemma2; `<pad>` 0, `<eos>` 1, `<bos>` 2 (added), `<unk>` 3; the template
  raises "System role not supported" on a system turn, requires alternating roles, calls the assistant
  `model` and closes turns with `<end_of_turn>\n`; generation_config eos [<eos>, <end_of_turn>], pad 0; the
  architecture's final_logit_softcapping and sliding window, as Gemma-2's.
- `distilbert-reward`: a DistilBERT sequence classifier (1 label) with its own lowercase WordPiece tokenizer
  ([PAD]/[CLS]/[SEP]) and 128 positions, as a reward model with a tokenizer unlike the policy's.

Nothing here downloads anything; building one model takes about a second.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent

GPT2 = "gpt2"
QWEN = "qwen2.5-instruct"
LLAMA3 = "llama3.1-instruct"
LLAMA2 = "llama2-chat"
GEMMA = "gemma"
DISTILBERT = "distilbert-reward"

QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

# Qwen2.5-Instruct's template without the tool-calling branches.
QWEN_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\n" + QWEN_SYSTEM + "<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) or message.role == 'assistant' %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Llama-3.1-Instruct's template without the tool-calling branches: BOS, an always-present system header
# with the knowledge and today dates, trimmed contents, <|eot_id|> after every turn.
LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if not date_string is defined %}{%- set date_string = '26 Jul 2024' %}{%- endif %}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content']|trim %}{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{{- 'Cutting Knowledge Date: December 2023\\n' }}"
    "{{- 'Today Date: ' + date_string + '\\n\\n' }}"
    "{{- system_message }}{{- '<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

# Mistral-Instruct style (the C04 case's template): the answer follows `[/INST]` with no space.
LLAMA2_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
    "{% else %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}"
)

# gemma-2-2b-it's template, verbatim.
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)

LLAMA3_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|reserved_special_token_2|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
]
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>"]
QWEN_PLAIN_ADDED = ["<tool_call>", "</tool_call>"]  # added, not special: decode keeps them, as Qwen's
GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
LLAMA2_SPECIALS = ["<unk>", "<s>", "</s>"]
UNSET_MAX_LENGTH = int(1e30)  # transformers' VERY_LARGE_INTEGER: what tokenizers without a limit report


@dataclass(frozen=True)
class Spec:
    """What one zoo entry mirrors (`real`), and the facts tests/test_zoo.py checks on the built model.

    facts: token strings for `bos`/`eos`/`pad`/`unk` (None: not set), `bos_added` (the tokenizer puts BOS in
    front of plain text), `template` (has a chat template), `turn_end` (the token closing an assistant turn),
    `stop` (generation_config's eos_token_id, as token strings, a list when the real one is), `context`
    (max_position_embeddings / n_positions), `sampling` (generation_config sampling fields).
    """

    real: str
    causal: bool
    facts: dict = field(default_factory=dict)


SPECS: dict[str, Spec] = {
    GPT2: Spec(
        "openai-community/gpt2",
        True,
        {
            "bos": "<|endoftext|>",
            "eos": "<|endoftext|>",
            "unk": "<|endoftext|>",
            "pad": None,
            "bos_added": False,
            "template": False,
            "stop": "<|endoftext|>",
            "context": 128,
            "sampling": {},
        },
    ),
    QWEN: Spec(
        "Qwen/Qwen2.5-0.5B-Instruct",
        True,
        {
            "bos": None,
            "eos": "<|im_end|>",
            "pad": "<|endoftext|>",
            "bos_added": False,
            "template": True,
            "turn_end": "<|im_end|>",
            "stop": ["<|im_end|>", "<|endoftext|>"],
            "context": 256,
            "sampling": {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05},
        },
    ),
    LLAMA3: Spec(
        "meta-llama/Llama-3.1-8B-Instruct",
        True,
        {
            "bos": "<|begin_of_text|>",
            "eos": "<|eot_id|>",
            "unk": None,
            "pad": None,
            "bos_added": True,
            "template": True,
            "turn_end": "<|eot_id|>",
            "stop": ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"],
            "context": 256,
            "sampling": {"do_sample": True, "temperature": 0.6, "top_p": 0.9},
        },
    ),
    LLAMA2: Spec(
        "meta-llama/Llama-2-7b-chat-hf (template: mistralai/Mistral-7B-Instruct)",
        True,
        {
            "bos": "<s>",
            "eos": "</s>",
            "unk": "<unk>",
            "pad": None,
            "bos_added": True,
            "template": True,
            "turn_end": "</s>",
            "stop": "</s>",
            "context": 256,
            "sampling": {"do_sample": True, "temperature": 0.6, "top_p": 0.9},
        },
    ),
    GEMMA: Spec(
        "google/gemma-2-2b-it",
        True,
        {
            "bos": "<bos>",
            "eos": "<eos>",
            "unk": "<unk>",
            "pad": "<pad>",
            "bos_added": True,
            "template": True,
            "turn_end": "<end_of_turn>",
            "stop": ["<eos>", "<end_of_turn>"],
            "context": 256,
            "sampling": {},
        },
    ),
    DISTILBERT: Spec(
        "distilbert-base-uncased (as a 1-label reward model)",
        False,
        {"pad": "[PAD]", "unk": "[UNK]", "template": False, "context": 128},
    ),
}
NAMES: tuple[str, ...] = tuple(SPECS)
CAUSAL: tuple[str, ...] = tuple(name for name, spec in SPECS.items() if spec.causal)


def corpus() -> list[str]:
    """The texts every zoo tokenizer is trained on: the demo world's prompts and answers (a small sample)."""
    from rlhf_trl.demo import corpus as demo_corpus
    from rlhf_trl.demo import make_records

    return demo_corpus(make_records(seed=0, sft_size=400, pairs_size=200))


def conversations(n: int = 300) -> list[list[dict]]:
    """Demo-world (user, assistant) conversations: what a chat model's tokenizer saw rendered in its format."""
    from rlhf_trl.demo import make_records

    rows = make_records(seed=1, sft_size=n, pairs_size=0)["sft_train"]
    return [row["prompt"] + row["completion"] for row in rows]


def _fast(tokenizer, **kwargs):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **kwargs)


def _byte_level(texts: list[str], specials: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def _sentencepiece_like(texts: list[str], specials: list[str], vocab_size: int, prefix_space: bool):
    """A Llama-2/Gemma-style BPE: spaces become `▁` (one in front of the text too when `prefix_space`), byte
    fallback for unseen characters; `specials` take the first ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    # Pieces never cross a space (SentencePiece's split_by_whitespace), but may run on past punctuation.
    scheme = "first" if prefix_space else "never"
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme, split=True)
    # Llama-2's and Gemma's tokenizer.json decoders: `▁` back to spaces, then bytes, then (Llama-2) the one space
    # the pre-tokenizer put in front. (Metaspace's decoder after Fuse drops every space of the fused piece.)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tokenizer.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix_space else []))
    byte_pieces = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size + len(byte_pieces), special_tokens=[*specials, *byte_pieces], max_token_length=16
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def _prepend_bos(tokenizer, bos: str) -> None:
    from tokenizers import processors

    bos_id = tokenizer.token_to_id(bos)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
    )


def _render(template_user, template_answer, conversation) -> str:
    return template_user(conversation[0]["content"]) + template_answer(conversation[1]["content"])


def build_tokenizer(name: str):
    """The zoo tokenizer for `name` (a transformers fast tokenizer, chat template set), without saving it."""
    texts = corpus()
    chats = conversations()
    facts = SPECS[name].facts
    if name == GPT2:
        tokenizer = _byte_level(texts, ["<|endoftext|>"], 600)
        return _fast(
            tokenizer,
            bos_token="<|endoftext|>",
            eos_token="<|endoftext|>",
            unk_token="<|endoftext|>",
            model_max_length=facts["context"],
        )
    if name == QWEN:
        rendered = [f"user\n{c[0]['content']}\nassistant\n{c[1]['content']}\n" for c in chats]
        tokenizer = _byte_level(texts + rendered + [QWEN_SYSTEM], [], 600)
        tokenizer.add_special_tokens(QWEN_SPECIALS)  # at the end of the vocabulary, as Qwen's
        tokenizer.add_tokens(QWEN_PLAIN_ADDED)
        fast = _fast(
            tokenizer,
            eos_token="<|im_end|>",
            pad_token="<|endoftext|>",
            additional_special_tokens=QWEN_SPECIALS[1:],
            model_max_length=facts["context"],
        )
        fast.chat_template = QWEN_TEMPLATE
        return fast
    if name == LLAMA3:
        rendered = [f"user\n\n{c[0]['content']}assistant\n\n{c[1]['content']}" for c in chats]
        tokenizer = _byte_level(texts + rendered + ["Cutting Knowledge Date: December 2023\nToday Date: "], [], 600)
        tokenizer.add_special_tokens(LLAMA3_SPECIALS)
        _prepend_bos(tokenizer, "<|begin_of_text|>")
        fast = _fast(
            tokenizer, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", model_max_length=facts["context"]
        )
        fast.chat_template = LLAMA3_TEMPLATE
        return fast
    if name == LLAMA2:
        # The tokenizer learns from chats rendered with the template, so `▁[/INST]` + the answer's first
        # word become one piece, as they do for Llama-2/Mistral's SentencePiece on such text.
        rendered = [f"[INST] {c[0]['content']} [/INST]{c[1]['content']}" for c in chats]
        tokenizer = _sentencepiece_like(texts + rendered, LLAMA2_SPECIALS, 700, prefix_space=True)
        _prepend_bos(tokenizer, "<s>")
        fast = _fast(tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
        fast.chat_template = LLAMA2_TEMPLATE
        return fast
    if name == GEMMA:
        rendered = [f"user\n{c[0]['content']}\nmodel\n{c[1]['content']}\n" for c in chats]
        tokenizer = _sentencepiece_like(texts + rendered, GEMMA_SPECIALS, 700, prefix_space=False)
        _prepend_bos(tokenizer, "<bos>")
        fast = _fast(
            tokenizer,
            bos_token="<bos>",
            eos_token="<eos>",
            unk_token="<unk>",
            pad_token="<pad>",
            additional_special_tokens=["<start_of_turn>", "<end_of_turn>"],
        )
        fast.chat_template = GEMMA_TEMPLATE
        return fast
    if name == DISTILBERT:
        from tests_helpers import build_encoder_tokenizer

        return build_encoder_tokenizer(texts, vocab_size=400)
    raise KeyError(f"no zoo model {name!r}: choose one of {', '.join(NAMES)}")


def _ids(tokenizer, value):
    if value is None:
        return None
    if isinstance(value, list):
        return [tokenizer.convert_tokens_to_ids(v) for v in value]
    return tokenizer.convert_tokens_to_ids(value)


def build_model(name: str, tokenizer, seed: int = 0):
    """A randomly initialised tiny model for `name` whose config and generation_config carry the real facts."""
    import torch
    from transformers import GenerationConfig

    torch.manual_seed(seed)
    facts = SPECS[name].facts
    context = facts["context"]
    pad_id = _ids(tokenizer, facts.get("pad"))
    bos_id = _ids(tokenizer, facts.get("bos"))
    stop = _ids(tokenizer, facts.get("stop"))
    if name == GPT2:
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(
            vocab_size=len(tokenizer),
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_positions=context,
            bos_token_id=bos_id,
            eos_token_id=stop,
        )
        model = GPT2LMHeadModel(config)
        model.generation_config = GenerationConfig(bos_token_id=bos_id, eos_token_id=stop)
        return model
    if name == QWEN:
        from transformers import Qwen2Config, Qwen2ForCausalLM

        config = Qwen2Config(
            vocab_size=-(-len(tokenizer) // 64) * 64,  # padded past the tokenizer, as 151936 > 151665
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=context,
            bos_token_id=bos_id or pad_id,
            eos_token_id=_ids(tokenizer, "<|endoftext|>"),  # config.json's eos is <|endoftext|>, as Qwen's
            tie_word_embeddings=True,
        )
        model = Qwen2ForCausalLM(config)
        model.generation_config = GenerationConfig(
            bos_token_id=pad_id, pad_token_id=pad_id, eos_token_id=stop, **facts["sampling"]
        )
        return model
    if name in (LLAMA3, LLAMA2):
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2 if name == LLAMA3 else 4,
            max_position_embeddings=context,
            bos_token_id=bos_id,
            eos_token_id=stop,
            tie_word_embeddings=False,
        )
        model = LlamaForCausalLM(config)
        extra = {"pad_token_id": _ids(tokenizer, "<unk>"), "max_length": context} if name == LLAMA2 else {}
        model.generation_config = GenerationConfig(bos_token_id=bos_id, eos_token_id=stop, **extra, **facts["sampling"])
        return model
    if name == GEMMA:
        from transformers import Gemma2Config, Gemma2ForCausalLM

        config = Gemma2Config(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=context,
            sliding_window=64,
            bos_token_id=bos_id,
            eos_token_id=_ids(tokenizer, "<eos>"),
            pad_token_id=pad_id,
            tie_word_embeddings=True,
        )
        model = Gemma2ForCausalLM(config)
        model.generation_config = GenerationConfig(bos_token_id=bos_id, eos_token_id=stop, pad_token_id=pad_id)
        return model
    if name == DISTILBERT:
        from tests_helpers import distilbert_classifier

        return distilbert_classifier(tokenizer, max_positions=context)
    raise KeyError(f"no zoo model {name!r}: choose one of {', '.join(NAMES)}")


def build(name: str, path: str | Path, seed: int = 0) -> Path:
    """Builds zoo model `name` into `path` (config, weights, generation_config, tokenizer with its template).

    Raises KeyError for a name not in NAMES. Returns `path` as a Path.
    """
    if name not in SPECS:
        raise KeyError(f"no zoo model {name!r}: choose one of {', '.join(NAMES)}")
    path = Path(path)
    tokenizer = build_tokenizer(name)
    model = build_model(name, tokenizer, seed=seed)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "ZOO.json").write_text(json.dumps({"name": name, "real": SPECS[name].real}, indent=1) + "\n")
    return path


class Zoo:
    """Builds each zoo model once, on first use, under `root` (the session fixture `zoo` is one of these)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.built: dict[str, Path] = {}

    def __getitem__(self, name: str) -> Path:
        if name not in self.built:
            self.built[name] = build(name, self.root / name)
        return self.built[name]

    __call__ = __getitem__
