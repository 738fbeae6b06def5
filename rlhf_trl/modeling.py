"""Loading models and tokenizers: one place for every stage, `chat` and `merge`.

A stage output is either a full model or a LoRA adapter. An adapter records its base (in the run marker
and in adapter_config.json), and that base may itself be an adapter (LoRA SFT, then LoRA PPO), so loading
walks the chain and merges each adapter into a full-precision base. Quantized loading (4/8-bit, bitsandbytes) goes
through TRL's `get_quantization_config` onto the process's device, a GPU or the CPU (`model_kwargs`); every model
loaded quantized gets `guard_quantized`, which keeps LoRA gradients through a 4-bit base right on a CPU. Settings
that cannot train quantized are refused up front (`check_quantization`).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError

from .data import looks_like_hub_id
from .errors import UserError
from .outputs import base_of, is_adapter, partial_dir, read_marker  # noqa: F401  (re-exported)
from .pretrained import PACKAGED, damaged_fix, gguf_message, gguf_only, offline_hint, resolve


def check_model_source(path: str | Path, what: str, make_target: str | None = None) -> None:
    """Fails with a fix when `path` is neither a usable local model nor reachable on the Hub."""
    if not path:
        raise UserError(f"{what} is not set: add `{what.split()[0]}: <model folder or Hub id>` to the recipe")
    local = Path(path)
    if local.exists():
        if any((local / name).is_file() for name in ("config.json", "adapter_config.json", "tokenizer_config.json")):
            return
        if gguf_only(local):
            raise UserError(gguf_message(what, path, gguf_only(local)))
        hint = f": run `make {make_target}` first" if make_target else ""
        raise UserError(f"{what} {path} holds no model (no config.json or adapter_config.json){hint}")
    if partial_dir(local).exists():
        hint = f"rerun `make {make_target}`" if make_target else "rerun the stage that writes it"
        raise UserError(f"{what} {path} never finished (only {partial_dir(local)} exists): {hint}")
    if not looks_like_hub_id(str(path)):
        hint = f": run `make {make_target}` first" if make_target else ""
        raise UserError(f"{what} {path} does not exist{hint}")
    if str(path) in PACKAGED:
        resolve(path, what)  # offline: the packaged copy, or one line naming the extra to install
        return
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise UserError(
            f"{what} {path} is a Hub id but the Hub is offline (HF_HUB_OFFLINE=1): download it elsewhere and pass "
            f'the local folder instead, e.g. ARGS="--model_name_or_path /path/to/{Path(str(path)).name}"'
        )


def check_quantization(model_args) -> None:
    """Refuses a 4/8-bit setting that cannot train, before any model loads: a quantized base without LoRA (its
    weights cannot take gradient steps) and bitsandbytes missing; both bits set is TRL's ModelConfig's refusal
    (`cli.parse_dataclasses`). Runs with or without a GPU: bitsandbytes' wheel carries its CPU library too
    (`quantization_notes` says what that means on a CPU). Every stage calls it first (`launch.check_stage`)."""
    if not (model_args.load_in_4bit or model_args.load_in_8bit):
        return
    flag = "load_in_4bit" if model_args.load_in_4bit else "load_in_8bit"
    if not getattr(model_args, "use_peft", True):
        raise UserError(
            f"{flag} trains LoRA adapters on a frozen quantized base, and use_peft is false (a full fine-tune of "
            f'{flag[8]}-bit weights): set `use_peft: true` (ARGS="--use_peft true"), or `{flag}: false` to fine-tune '
            "every weight in full precision"
        )
    quiet_bitsandbytes()
    try:
        import bitsandbytes  # noqa: F401
    except Exception as error:  # a broken native library raises more than ImportError
        raise UserError(
            f"{flag} needs bitsandbytes, which cannot load here ({str(error).splitlines()[0][:200]}): "
            f"pip install 'bitsandbytes>=0.50.2' (Linux x86_64: its wheel holds the CPU and CUDA libraries), or set "
            f"`{flag}: false`"
        ) from None


# bitsandbytes log lines that say nothing a user can act on: the 8-bit matmul announces on every call that it casts
# its float32 input to float16 (how LLM.int8() works), and on a CPU with AVX512-BF16 the import reports that an
# optional fused kernel from the Hub (the `kernels` package) is missing, after which its own native one is used.
BITSANDBYTES_NOISE = (
    "MatMul8bitLt: inputs will be cast",
    "Failed to load CPU gemm_4bit_forward from kernels-community",
)


class _BitsandbytesNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(BITSANDBYTES_NOISE)


def quiet_bitsandbytes() -> None:
    """Drops BITSANDBYTES_NOISE from bitsandbytes' loggers, and nothing else they say. Idempotent; runs before
    bitsandbytes is first imported where it can (its import logs the `kernels` line)."""
    for name in ("bitsandbytes.autograd._functions", "bitsandbytes.backends.cpu.ops"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _BitsandbytesNoise) for f in logger.filters):
            logger.addFilter(_BitsandbytesNoise())


_NOTED: set[str] = set()


def quantization_notes(flag: str, on_cpu: bool) -> None:
    """Says once per process (the main one), in one line, that a quantized base on a CPU is for checks."""
    from accelerate import PartialState

    if not on_cpu or "cpu" in _NOTED or not PartialState().is_main_process:
        return
    _NOTED.add("cpu")
    compute = " (4-bit computes in float32)" if flag == "load_in_4bit" else ""
    print(
        f"note: {flag} without a GPU runs on bitsandbytes' CPU library{compute}: slow, meant for checks; train on a "
        "GPU"
    )


def model_kwargs(model_args, quantize: bool = True) -> dict:
    """from_pretrained keyword arguments from TRL's ModelConfig (dtype, attention, 4/8-bit).

    A quantized base goes whole onto this process's device (`device_map`): its GPU (each process its own copy, what
    TRL's get_kbit_device_map did), or the CPU without one. On a CPU the 4-bit compute dtype is float32 whatever
    `dtype` says: bitsandbytes' bfloat16 CPU path was 4-20x slower per step (tried on the 2-core CI machine).
    """
    from accelerate import PartialState
    from trl import get_quantization_config

    dtype = model_args.dtype if model_args.dtype in (None, "auto") else getattr(torch, model_args.dtype)
    kwargs = {"revision": model_args.model_revision, "dtype": dtype}
    if model_args.attn_implementation:
        kwargs["attn_implementation"] = model_args.attn_implementation
    if quantize:
        check_quantization(model_args)
        quantization_config = get_quantization_config(model_args)
        if quantization_config is not None:
            device = PartialState().device
            on_cpu = device.type == "cpu"
            if on_cpu and model_args.load_in_4bit:
                quantization_config.bnb_4bit_compute_dtype = torch.float32
            kwargs["quantization_config"] = quantization_config
            kwargs["device_map"] = {"": str(device)}
            quantization_notes("load_in_4bit" if model_args.load_in_4bit else "load_in_8bit", on_cpu)
    return kwargs


def guard_quantized(model):
    """Keeps gradients through a 4-bit base right on a CPU, for every model `load_model` loads quantized.

    On a CPU with AVX512-BF16, bitsandbytes' `Linear4bit.forward` in eval mode on an input without grad (what
    `generate`, `Trainer.evaluate` and PPO's rollouts do between updates) repacks its weight in place into an
    inference layout; from then on its matmul has no autograd formula, the gradient through every 4-bit layer is
    dropped, LoRA gradients come out wrong (about half, measured), `model.train()` does not undo it, and the only
    sign is a UserWarning ("an autograd kernel was not registered"). A CPU without AVX512-BF16 never repacks, so the
    same run is right there. Turning the layer's `support_avx512bf16_for_cpu` off keeps the training layout.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model


def trainables_in_model_dtype(model) -> None:
    """Puts the trainable parameters of a quantized `model` back in the dtype of its unquantized weights.

    TRL 1.16's trainers cast every trainable parameter of a 4/8-bit model to bfloat16 (the QLoRA paper's choice),
    whatever `dtype` says. Under `dtype: float32` (a CPU's: bitsandbytes' bfloat16 path there was 4-20x slower) a
    reward model's score head (peft's modules_to_save) then meets float32 hidden states and the first step fails
    with a dtype mismatch, and every LoRA matmul runs in bfloat16. Under the QLoRA recipes' `dtype: bfloat16` this
    changes nothing. Called by each stage right after it builds a TRL trainer (PPO's own engine casts nothing)."""
    if not (getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)):
        return
    dtype = model.get_input_embeddings().weight.dtype
    for parameter in model.parameters():
        if parameter.requires_grad and parameter.dtype != dtype:
            parameter.data = parameter.data.to(dtype)


def model_config(path: str | Path):
    """The transformers config of a model or of an adapter chain's root base, without loading weights."""
    from transformers import AutoConfig

    while is_adapter(path):
        path = base_of(path)
    return AutoConfig.from_pretrained(resolve(path))


# Config keys that hold a model's position limit: BERT/Llama/Qwen, GPT-2 (`n_positions`), MPT, ChatGLM, GPT-J-style.
POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "n_ctx")


def context_length(model) -> int | None:
    """The most tokens `model` takes in one sequence, from its config (a model, a config, or a model/adapter path).

    Learned position tables (GPT-2, BERT, DistilBERT) fail past it with "index out of range in self" or a tensor-size
    mismatch (transformers #28393, #15867); rotary models were trained up to it. None when the config names no limit.
    """
    config = model_config(model) if isinstance(model, str | Path) else getattr(model, "config", model)
    for key in POSITION_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_context(tokens: int | None, model, what: str, fix: str, role: str = "model") -> None:
    """Stops with one line when `tokens` (e.g. a stage's max_length) exceed `model`'s `context_length`.

    `what` names the length (`max_length 512`), `fix` says how to lower it; nothing is checked when either is None.
    """
    limit = context_length(model)
    if tokens is not None and limit is not None and tokens > limit:
        raise UserError(f"{what} exceeds the {role}'s context of {limit} tokens: {fix}")


DAMAGED_FIX = "copy it again or rerun the stage that wrote it (make <stage> ARGS=--overwrite)"


def load_model(
    path: str | Path, auto_class=None, kwargs: dict | None = None, what: str = "model", live_adapter: bool = False
):
    """Loads a full model, or an adapter chain merged into its full-precision base.

    `auto_class` picks the head (AutoModelForCausalLM by default; AutoModelForSequenceClassification for
    reward and value models). An adapter trained on a causal LM loads onto a classifier of the same base
    too, because the adapted modules have the same names in both. With `live_adapter`, the last adapter
    stays unmerged, injected into the plain model (what a frozen reward model on a 4-bit base needs).
    """
    from transformers import AutoModelForCausalLM

    auto_class = auto_class or AutoModelForCausalLM
    kwargs = dict(kwargs or {})
    check_model_source(path, what)
    if not is_adapter(path):
        try:
            model = auto_class.from_pretrained(resolve(path, what), **kwargs)
        except SafetensorError as error:
            fix = damaged_fix(path) or DAMAGED_FIX
            raise UserError(f"{what} {path} has damaged weights ({error}): {fix}") from None
        except OSError as error:
            hint = offline_hint(path)
            raise UserError(f"{what} {path} could not be loaded ({str(error).splitlines()[0]}){hint}") from None
        return guard_quantized(model) if kwargs.get("quantization_config") is not None else model
    if kwargs.get("quantization_config") is not None and not live_adapter:
        # Merging would round the adapter into 4/8-bit weights, and a live adapter cannot take a second
        # trainable LoRA in TRL's trainers: export a full-precision merge once and quantize that instead.
        raise UserError(
            f"{what} {path} is a LoRA adapter and this stage loads in 4/8-bit: merge it first with "
            f'`make merge ARGS="--model {path} --output {path}-merged"` and point {what} at {path}-merged'
        )
    from peft import PeftConfig, PeftModel

    base = load_model(base_of(path), auto_class, kwargs, what=f"base of {path}")
    grown = grow_to_adapter_tokenizer(base, path)
    config = PeftConfig.from_pretrained(str(path))
    if config.task_type == "CAUSAL_LM" and auto_class is not AutoModelForCausalLM:
        config.task_type = None  # a causal-LM adapter on a classifier head: plain LoRA injection, no LM wrapper
    try:
        model = PeftModel.from_pretrained(base, str(path), config=config)
    except SafetensorError as error:
        raise UserError(f"adapter {path} has damaged weights ({error}): {DAMAGED_FIX}") from None
    except (OSError, ValueError, RuntimeError, KeyError) as error:
        raise UserError(adapter_mismatch(path, error, grown)) from None
    if live_adapter:
        return model.get_base_model()
    # peft loads adapters frozen and merging keeps that; a merged chain must train like any full model.
    return model.merge_and_unload().requires_grad_(True)


def grow_to_adapter_tokenizer(base, adapter_dir: str | Path) -> int | None:
    """Resizes `base`'s token embeddings (input and output) to the adapter's tokenizer when that is longer.

    An adapter trained after tokens were added (a pad, a chat token) carries the grown embedding and output
    matrices (peft saves them via modules_to_save, or by itself when it sees them resized) and ships its
    longer tokenizer; peft loads those weights only into a base of the same shape, so the base grows first
    (`resize_token_embeddings`, as transformers and open-instruct's merge do; the new rows are then overwritten
    by the adapter's, so how they start does not matter). Returns the new number of rows, or None when nothing
    changed. A base with more rows than the tokenizer (Qwen's are padded to a multiple of 64) is left as it is.
    """
    if not (Path(adapter_dir) / "tokenizer_config.json").is_file():
        return None
    from transformers import AutoTokenizer

    try:
        rows = len(AutoTokenizer.from_pretrained(str(adapter_dir)))
    except (OSError, ValueError):
        return None  # load_tokenizer reports an unreadable tokenizer where it is used
    if rows <= base.get_input_embeddings().num_embeddings:
        return None
    base.resize_token_embeddings(rows, mean_resizing=False)
    return rows


def adapter_mismatch(adapter_dir: str | Path, error: Exception, grown: int | None) -> str:
    """One line for an adapter that peft cannot load onto its base: peft's own size-mismatch line (the first line of
    its message only says "Error(s) in loading state_dict"), shortened, and the fix that fits it."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    cause = next((line for line in lines if "size mismatch" in line), lines[0] if lines else type(error).__name__)
    # "size mismatch for <name>: copying a param with shape torch.Size([556, 64]) from checkpoint, the shape in
    # current model is torch.Size([554, 64])."
    shapes = [[int(n) for n in s.split(",") if n.strip()] for s in re.findall(r"torch\.Size\(\[([^\]]*)\]\)", cause)]
    fix = (
        "retrain the adapter or point it at the base it was trained on (adapter_config.json's base_model_name_or_path)"
    )
    if len(shapes) == 2:
        name = cause.split(":")[0]
        cause = f"{name}: {shapes[0]} in the adapter vs {shapes[1]} in the base"
        token_rows = re.search(r"embed|wte|lm_head|shared", name) and len(shapes[0]) == len(shapes[1]) == 2
        if token_rows and shapes[0][1] == shapes[1][1] and shapes[0][0] > shapes[1][0] and not grown:
            fix = (
                f"the adapter was trained with {shapes[0][0]} tokens and the base has {shapes[1][0]}: save the "
                f"tokenizer it was trained with into {adapter_dir} (tokenizer.save_pretrained) so the base is resized "
                "to it, or point the adapter at the base it was trained on"
            )
    return f"adapter {adapter_dir} does not fit its base {base_of(adapter_dir)} ({cause[:300]}): {fix}"


def load_tokenizer(path: str | Path, padding_side: str = "right", what: str = "tokenizer"):
    """The tokenizer of a model or adapter folder (an adapter without one: its base's), or of a Hub id (`resolve`).
    `what` names the setting the path came from in messages (model_name_or_path...). A tokenizer that pads with EOS
    or has no pad gets a distinct token of its own vocabulary when it has one (`spare_pad_token`)."""
    from transformers import AutoTokenizer

    source = path
    if is_adapter(path) and not (Path(path) / "tokenizer_config.json").is_file():
        source = base_of(path)
    check_model_source(source, what)
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolve(source, what))
    except (OSError, ValueError) as error:
        raise UserError(f"tokenizer of {source} could not be loaded ({str(error).splitlines()[0][:200]})") from None
    tokenizer.padding_side = padding_side
    choose_pad(tokenizer)
    return tokenizer


def choose_pad(tokenizer) -> None:
    """A pad token that is not EOS, from the tokenizer's own vocabulary, when the tokenizer has none or pads with its
    EOS (SmolLM2 ships pad = EOS = <|im_end|>): `spare_pad_token`, else EOS as before (GPT-2: SFT in full then adds
    <|pad|>, `ensure_distinct_pad`). The vocabulary never grows here; each stage saves the tokenizer with its pad."""
    if tokenizer.pad_token is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return
    tokenizer.pad_token = spare_pad_token(tokenizer) or tokenizer.pad_token or tokenizer.eos_token


def for_inference(model):
    """Eval mode, on the GPU when there is one (quantized models were already placed when loaded)."""
    if torch.cuda.is_available() and not getattr(model, "hf_device_map", None):
        model = model.to("cuda")
    return model.eval()


def ensure_distinct_pad(tokenizer, model) -> bool:
    """Gives a tokenizer whose pad is its EOS (GPT-2) a pad token of its own, growing the model's embeddings.

    TRL's PPO takes every pad id for the end of a sequence, so pad == EOS hides each EOS from the policy loss.
    Only for full fine-tuning: a LoRA adapter cannot carry the grown embedding matrix.
    """
    if tokenizer.pad_token_id != tokenizer.eos_token_id:
        return False
    tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
    model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    return True


def spare_pad_token(tokenizer) -> str | None:
    """A special token made for padding that the tokenizer has but does not use as pad (Llama 3's
    <|finetune_right_pad_id|>). Falling back to EOS as pad makes TRL's PPO treat every EOS as padding."""
    for token in tokenizer.all_special_tokens + list(tokenizer.added_tokens_encoder):
        if "pad" in token.lower() and token != tokenizer.eos_token:
            return token
    # Else its unknown token (SmolLM2's <|endoftext|>): a byte-level tokenizer never produces it and the chat template
    # never writes it, so it cannot be mistaken for an answer's end. Not when it is also EOS or BOS (GPT-2's).
    unk = getattr(tokenizer, "unk_token", None)
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    if unk and unk not in (tokenizer.eos_token, tokenizer.bos_token) and unk not in (template or ""):
        return unk
    return None


def sampling_for(model, tokenizer, max_new_tokens: int = 64, temperature: float = 0.7, samples: int = 1):
    """The GenerationConfig `generate` uses: plain sampling at `temperature` (greedy at 0), stopping at every stop
    id (`generation.stop_token_ids`), nothing taken from the model's generation_config.json sampling settings."""
    from .generation import sampling_config, stop_token_ids

    return sampling_config(
        temperature, max_new_tokens, stop_token_ids(tokenizer, model), tokenizer.pad_token_id, samples
    )


def sampling_line(prefix: str, model, tokenizer, max_new_tokens: int = 64, temperature: float = 0.7) -> str:
    """The one line a stage prints about `generate`'s settings (see `generation.settings_line`)."""
    from .generation import settings_line

    config = sampling_for(model, tokenizer, max_new_tokens, temperature)
    return settings_line(prefix, config, model, tokenizer)


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list[list[dict]],
    max_new_tokens: int = 64,
    temperature: float = 0.7,
    samples: int = 1,
    seed: int = 0,
    streamer=None,
    return_ids: bool = False,
) -> list[str] | tuple[list[str], list[list[int]]]:
    """Answers each conversation in `prompts` (`samples` times, sampled) and returns the decoded answers.

    Sampling is plain (top_k and top_p off) at `temperature`, greedy at 0, whatever the model's
    generation_config.json says (`generation.sampling_config`); answers stop at any of the model's stop ids
    (`generation.stop_token_ids`: the tokenizer's EOS and the generation_config's eos_token_id list). With
    `return_ids`, also returns each answer's token ids, up to and including its first stop id (the padding after it
    dropped): what `rlhf_trl.evaluate` needs for lengths, EOS rates and log-probabilities.
    """
    from .generation import first_stop_trim, sampling_with

    torch.manual_seed(seed)
    side, tokenizer.padding_side = tokenizer.padding_side, "left"  # generation continues from the right edge
    texts = [render_prompt(tokenizer, messages) for messages in prompts]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    tokenizer.padding_side = side
    config = sampling_for(model, tokenizer, max_new_tokens, temperature, samples)
    with sampling_with(model, config) as config:
        output = model.generate(**batch, generation_config=config, streamer=streamer)
    answers = tokenizer.batch_decode(output[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    if not return_ids:
        return answers
    ids = [row.tolist() for row in output[:, batch["input_ids"].shape[1] :]]
    return answers, [first_stop_trim(row, config.eos_token_id) for row in ids]


def render_prompt(tokenizer, messages: list[dict]) -> str:
    """The text the model continues: its chat template with a generation prompt, else the Alpaca format of
    recipes/templates/alpaca.jinja (`templates.FALLBACK_TEMPLATE`), which goes by role: system text first, user
    turns as instructions, assistant turns as responses closed by EOS, then the generation prompt."""
    from .templates import FALLBACK_TEMPLATE

    template = tokenizer.chat_template or FALLBACK_TEMPLATE
    return tokenizer.apply_chat_template(messages, chat_template=template, add_generation_prompt=True, tokenize=False)
