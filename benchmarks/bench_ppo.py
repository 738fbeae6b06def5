"""PPO and SFT speed and memory: the pipeline against plain TRL 1.12, in the same run, with the same settings.

    make bench                                        # toy shape: checks the harness works (CPU, under a minute)
    make bench SHAPE=qwen2.5-0.5b MODE=bf16           # a real shape, on a GPU
    make bench SHAPE=llama3.1-8b MODE=4bit BENCH_ARGS="--batch 4"
    make bench MODE=4bit                              # toy shape on CPU: fp32 and 4-bit rows side by side
    python -m benchmarks.bench_ppo --shape toy --steps 2 --batch 4 --out /tmp/bench.json

Rows: `ppo trl` is TRL 1.12's own PPOTrainer (`trl.experimental.ppo`, deleted in TRL 1.13) fed the way TRL's
example script feeds it (separate policy, value and reward loads, plus a reference copy when training in full);
`ppo pipeline` is this project's engine, `rlhf_trl.ppo_trainer.PPOTrainer`, built as `rlhf_trl.ppo.main` builds
it:
- with LoRA and `--shared-base` (the default) one base serves the policy (PPO adapter), the reference (adapters
  off), the value model (its own adapter and a float32 head) and the reward model: a random LoRA reward adapter
  (task SEQ_CLS, the row's r/alpha/targets, small seeded random lora_B so it is not a no-op, and a random score
  head), written once to `--cache-dir` next to the checkpoint and loaded as a frozen "reward" adapter; the value
  adapter starts as its copy, as with a reward model from `make reward`. Under 4/8-bit the base is stored once,
  quantized, with the adapters on top;
- with `--no-shared-base` or `--full`, separate reward and value models loaded as `rlhf_trl.ppo` loads them (the
  value model a copy of the reward model, the same random full classifier the trl row gets), `shared_base: false`;
- either way log-probs come from hidden states through the output layer `--logprob-chunk-tokens` at a time, and
  rollouts are generated without `output_scores` (`--static-cache`: with a static KV cache).
`sft trl` and `sft pipeline` do the same for SFTTrainer (plain load against `rlhf_trl.sft`'s).
The `trl` rows are the baseline, TRL 1.12: each runs in its own process in the reference environment
(`.venv-reference`, `make reference-env`; reference/README.md), so the product's environment never imports TRL's
PPO; the `pipeline` rows run in this environment. Each row records the TRL and transformers it ran with, and
reports the median step time over the steps after `--warmup` warm-up steps, its split, peak memory and tokens per
second.
Each PPO pipeline row records what actually ran: the trainer class, whether the base was shared (and by the
reward model), the log-prob chunk size and the static cache; the table prints them under the rows.
The JSON goes to `benchmarks/results/<date>-<shape>-<mode>.json` (`-full` added for --full, `-separate` for
--no-shared-base) unless --out says.

Why it is built this way:
- Random weights of a real shape (`benchmarks/shapes.py`) measure what real weights would, offline. They are
  saved once to `--cache-dir` and every row loads that same checkpoint with `from_pretrained`, because 4/8-bit
  loading (bitsandbytes) happens there, and so both sides start from identical weights. Prompts are random
  token ids and the tokenizer a three-token stub (pad, eos, unk): nothing decodes text here.
- The split is taken by wrapping functions for the run only. For the trl row, the two TRL's `train()` looks up
  in its own module: `batch_generation` (generation) and `get_reward` (scoring: value and reward forwards). For
  the pipeline row, PPOTrainer's `_generate` (generation) and its `_scores` and `_values` when called without
  gradients, i.e. in the rollout (scoring). The rest of a step is reported as training: the PPO epochs, plus the
  reference forward and the log-prob bookkeeping, and on the pipeline side the rollout's policy log-prob forward
  too (TRL takes those from generate's scores, inside its generation time).
  On CUDA each mark synchronises first, so the times are the GPU's, not the launch queue's.
- On a GPU every row runs in its own process (`--isolate`, the default there): the peak memory of one row is
  then never the leftovers of another, and a row that dies (out of memory, the known 4-bit failure of plain
  TRL) is recorded as `failed: <reason>` while the others still run. On CPU the pipeline rows run in this process
  by default, to save the ~7 s each new process spends importing torch and TRL (the trl rows always have their
  own, in the reference environment); the memory column is then the process's resident size sampled during the
  row, which includes whatever earlier rows left behind.
- Without CUDA torch runs on one thread unless --threads says otherwise: the toy's matrices gain nothing from
  more, and next to another busy process (a test suite) two spinning threads made a toy PPO step 30 times
  slower (24 s against 0.7 s, measured on the 2-core CI machine).
- Real shapes need a GPU, except the ones up to `CPU_BILLIONS` (SmolLM2-135M's): refused up front with one line
  without one. 4/8-bit runs on CPU too (bitsandbytes' CPU
  library; 4-bit computes in float32 there, as `rlhf_trl.modeling.model_kwargs` sets it), on the toy shape; with
  --baseline (the default) every row runs unquantized first (bf16 on a GPU, float32 on CPU) and the table puts the
  precisions side by side, each row in its own process so its peak memory is its own.

Known limits:
- With the shared base the two PPO rows run the same update on different reward models (the pipeline's the
  random LoRA adapter, TRL's the random full classifier its example script loads, with the same score head), so
  their score curves differ. `--no-shared-base` gives both the same reward model; their scores and KL then agree
  step by step, and so do the trained adapters (reference/test_against_trl.py).
- This row's shared base under 4/8-bit (quantized once, the adapters on top) has not yet run on a GPU.
- The CPU memory column is the whole process; only the GPU column measures the models.
With the shared base the pipeline row no longer has the harness's old limit, a full random reward model where a
real QLoRA run has a LoRA adapter on the base (and under 4/8-bit a value model that trains its score head only):
its value model is now an adapter of its own and a head. `--no-shared-base` under 4/8-bit still has it.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import reference

ROOT = Path(__file__).resolve().parents[1]
PAD_ID, EOS_ID, UNK_ID = 0, 1, 2  # the stub tokenizer's only tokens; prompts are drawn above them
ROWS = [("ppo", "trl"), ("ppo", "pipeline"), ("sft", "trl"), ("sft", "pipeline")]
CPU_DEFAULTS = {"batch": 8, "prompt_length": 32, "response_length": 32, "steps": 3}
# The largest shape a CPU run takes (billions of parameters): SmolLM2-135M's, the smollm2-135m recipe's policy, whose
# PPO step takes about a minute on one shared core (benchmarks/NOTES.md); a 0.5B shape would take many.
CPU_BILLIONS = 0.2
GPU_DEFAULTS = {"batch": 16, "prompt_length": 128, "response_length": 128, "steps": 5}


def parse_args(argv: list[str] | None):
    from benchmarks.shapes import SHAPES

    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_ppo", description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="toy", choices=sorted(SHAPES))
    parser.add_argument("--mode", default="bf16", choices=["bf16", "8bit", "4bit"])
    parser.add_argument(
        "--baseline",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="with --mode 4bit or 8bit, also run every row unquantized (bf16 on a GPU, float32 on CPU), side by side "
        "(default: on)",
    )
    lora = parser.add_mutually_exclusive_group()
    lora.add_argument("--lora", dest="lora", action="store_true", default=True, help="LoRA r=16, all linear (default)")
    lora.add_argument("--full", dest="lora", action="store_false", help="train every weight")
    parser.add_argument("--batch", type=int, help="rollout and training batch (default: 16 on a GPU, 8 on CPU)")
    parser.add_argument("--prompt-length", type=int, help="prompt tokens (default: 128 on a GPU, 32 on CPU)")
    parser.add_argument("--response-length", type=int, help="generated tokens (default: 128 on a GPU, 32 on CPU)")
    parser.add_argument("--ppo-epochs", type=int, default=4)
    parser.add_argument("--steps", type=int, help="timed steps after the warm-up (default: 5 on a GPU, 3 on CPU)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed first steps (compilation, allocator)")
    parser.add_argument("--tasks", default="ppo,sft", help="comma-separated: ppo, sft")
    parser.add_argument("--impls", default="trl,pipeline", help="comma-separated: trl, pipeline")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="on for both sides")
    parser.add_argument(
        "--shared-base",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="pipeline PPO with LoRA: one base for policy, reference, value and a random LoRA reward "
        "adapter (default: on); off: separate reward and value models",
    )
    parser.add_argument(
        "--logprob-chunk-tokens",
        type=int,
        default=1024,
        help="pipeline PPO: tokens per pass through the output layer (default: 1024)",
    )
    parser.add_argument("--static-cache", action="store_true", help="pipeline PPO: rollouts with a static KV cache")
    parser.add_argument(
        "--isolate",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="each row in its own process (default: on with CUDA, off on CPU)",
    )
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: 1 without CUDA, see above)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default=str(ROOT / "benchmarks" / ".cache"), help="random checkpoints")
    parser.add_argument("--out", help="JSON path (default: benchmarks/results/<date>-<shape>-<mode>.json)")
    parser.add_argument("--row", help=argparse.SUPPRESS)  # internal: run one row, e.g. ppo:trl, in this process
    parser.add_argument("--row-out", help=argparse.SUPPRESS)
    # internal: each PPO row saves its trained policy into DIR/<impl> (reference/test_against_trl.py compares them)
    parser.add_argument("--save-policy", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    import torch

    args.cuda = torch.cuda.is_available()
    for key, value in (GPU_DEFAULTS if args.cuda else CPU_DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.isolate is None:  # several precisions side by side: each row's memory its own, on CPU too
        args.isolate = args.cuda or len(modes(args)) > 1
    if args.threads is None and not args.cuda:
        args.threads = 1
    # bf16 mode computes in bfloat16 on a GPU; on CPU (toy only) in float32, which is what CPU kernels are fast at.
    args.dtype = "bfloat16" if args.cuda else "float32"
    return args


def modes(args) -> list[str]:
    """The precisions the rows run in: the asked mode, after the unquantized baseline for 4bit and 8bit."""
    return ["bf16", args.mode] if args.mode != "bf16" and args.baseline else [args.mode]


def mode_label(args, mode: str) -> str:
    """How the table names a mode: bf16 mode is float32 on CPU (see parse_args)."""
    return ("bf16" if args.dtype == "bfloat16" else "fp32") if mode == "bf16" else mode


def check(args) -> None:
    from benchmarks.shapes import SHAPES, build_config
    from rlhf_trl.cli import UserError
    from rlhf_trl.modeling import check_quantization

    if args.mode != "bf16" and not args.lora:
        raise UserError(f"--full trains every weight, which {args.mode} weights cannot: use --lora (the default)")
    check_quantization(model_config(args, Path(args.cache_dir)))  # bitsandbytes missing: one line, before anything
    if SHAPES[args.shape].billions > CPU_BILLIONS and not args.cuda:
        small = ", ".join(name for name, shape in SHAPES.items() if shape.billions <= CPU_BILLIONS)
        raise UserError(
            f"--shape {args.shape} ({SHAPES[args.shape].billions:g}B parameters) needs a CUDA GPU: "
            f"without one only shapes up to {CPU_BILLIONS:g}B run ({small})"
        )
    for name in ("batch", "prompt_length", "response_length", "ppo_epochs", "steps", "logprob_chunk_tokens"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, not {getattr(args, name)}")
    if args.warmup < 0:
        raise UserError(f"--warmup must be 0 or more, not {args.warmup}")
    unknown = set(split(args.tasks)) - {"ppo", "sft"} | set(split(args.impls)) - {"trl", "pipeline"}
    if unknown:
        raise UserError(f"unknown task or impl {', '.join(sorted(unknown))}: --tasks ppo,sft --impls trl,pipeline")
    context = build_config(args.shape, PAD_ID, EOS_ID).max_position_embeddings
    if args.prompt_length + args.response_length > context:
        raise UserError(f"--prompt-length plus --response-length exceed the shape's context of {context} tokens")


def split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def checkpoint(args) -> Path:
    """The shape's random weights in `--cache-dir`, written once (through a .partial folder, so a crash leaves none)."""
    import torch
    from transformers import AutoModelForCausalLM, set_seed

    from benchmarks.shapes import SHAPES, build_config

    # The dims' hash in the name: an edited shape gets a new checkpoint instead of a stale one.
    dims = hashlib.sha1(json.dumps(SHAPES[args.shape].dims, sort_keys=True).encode()).hexdigest()[:8]
    path = Path(args.cache_dir) / f"{args.shape}-{dims}-{args.dtype}-seed{args.seed}"
    if (path / "config.json").is_file():
        return path
    partial = path.with_name(path.name + ".partial")
    set_seed(args.seed)
    config = build_config(args.shape, PAD_ID, EOS_ID)
    # Initialising billions of weights is minutes on a CPU and seconds on the GPU, where the bf16 copy fits.
    with torch.device("cuda" if args.cuda else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, args.dtype))
    model.save_pretrained(partial)
    del model
    if args.cuda:  # give the memory back: the rows run in child processes that need the whole GPU
        torch.cuda.empty_cache()
    partial.rename(path)
    return path


def shares_base(args) -> bool:
    """Whether the pipeline's PPO row runs on one shared base (as `rlhf_trl.ppo.main`: fast engine, LoRA, asked)."""
    return args.lora and args.shared_base


def reward_lora_config(peft_config):
    """The reward adapter's LoRA: a sequence classifier's, with the PPO adapter's rank, alpha, dropout and targets."""
    from peft import LoraConfig

    return LoraConfig(
        task_type="SEQ_CLS",
        r=peft_config.r,
        lora_alpha=peft_config.lora_alpha,
        lora_dropout=peft_config.lora_dropout,
        target_modules=peft_config.target_modules,
    )


def reward_adapter(args, path: Path, peft_config) -> Path:
    """A random LoRA reward adapter on the checkpoint, what `make reward` writes: written once to `--cache-dir` next
    to the checkpoint (keyed by its name and the LoRA settings), through a .partial folder like the checkpoint.

    Its lora_B weights get small seeded random values (peft starts them at zero, which would make the adapter a
    no-op and the reward model the plain random classifier); its score head is the classifier's random one, saved
    with the adapter (peft's SEQ_CLS task keeps `score` in modules_to_save)."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForSequenceClassification, set_seed

    config = reward_lora_config(peft_config)
    targets = config.target_modules
    settings = {
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "lora_dropout": config.lora_dropout,
        "target_modules": targets if isinstance(targets, str) else sorted(targets),
    }
    digest = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
    adapter = path.with_name(f"{path.name}-reward-lora-r{config.r}-{digest}")
    if (adapter / "adapter_config.json").is_file():
        return adapter
    partial = adapter.with_name(adapter.name + ".partial")
    set_seed(args.seed)
    device = "cuda" if args.cuda else "cpu"
    classifier = AutoModelForSequenceClassification.from_pretrained(
        str(path), num_labels=1, dtype=getattr(torch, args.dtype), device_map=device
    )
    model = get_peft_model(classifier, config)
    generator = torch.Generator().manual_seed(args.seed)
    std = getattr(classifier.config, "initializer_range", 0.02)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                values = torch.randn(parameter.shape, generator=generator) * std
                parameter.copy_(values.to(parameter.device, parameter.dtype))
    # The checkpoint it was trained on, as `rlhf_trl.ppo.reward_is_adapter_on` reads it (not the .partial folder).
    model.peft_config["default"].base_model_name_or_path = str(path.resolve())
    model.save_pretrained(partial)
    del model, classifier
    if args.cuda:
        torch.cuda.empty_cache()
    partial.rename(adapter)
    return adapter


def stub_tokenizer():
    """A tokenizer that knows pad, eos and unk only: enough for TRL's collators, which pad and never decode."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": PAD_ID, "<eos>": EOS_ID, "<unk>": UNK_ID}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
        pad_token="<pad>",
        eos_token="<eos>",
        unk_token="<unk>",
    )
    tokenizer.padding_side = "left"  # PPO generates from the right edge
    return tokenizer


def random_ids(args, rows: int, length: int) -> list[list[int]]:
    import torch

    from benchmarks.shapes import build_config

    vocab = build_config(args.shape, PAD_ID, EOS_ID).vocab_size
    generator = torch.Generator().manual_seed(args.seed)
    return torch.randint(UNK_ID + 1, vocab, (rows, length), generator=generator).tolist()


def model_config(args, path: Path):
    """TRL's ModelConfig as the recipes set it (recipes/llama3.1-8b-qlora for 4-bit); both sides load through it.
    On CPU `rlhf_trl.modeling.model_kwargs` makes the 4-bit compute dtype float32 (the recipe's is bfloat16)."""
    from trl import ModelConfig

    return ModelConfig(
        model_name_or_path=str(path),
        dtype=args.dtype,
        load_in_4bit=args.mode == "4bit",
        load_in_8bit=args.mode == "8bit",
        bnb_4bit_quant_type="nf4",
        use_bnb_nested_quant=True,
        use_peft=args.lora,
        lora_r=16,
        lora_alpha=32,
        lora_dropout=0.0,
        lora_target_modules="all-linear",
    )


class Clock:
    """Wall time in seconds; on CUDA it waits for the GPU first, so a mark falls after the work it ends."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.generation = 0.0
        self.scoring = 0.0

    def now(self) -> float:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        return time.perf_counter()


@contextlib.contextmanager
def timed_phases(clock: Clock):
    """Wraps TRL's module-level `batch_generation` and `get_reward` while the block runs; restores them after."""
    from reference.engines import trl_engine

    module = sys.modules[trl_engine()[1].__module__]  # where TRL's train() looks both up
    originals = {"batch_generation": module.batch_generation, "get_reward": module.get_reward}

    def timed(name: str, phase: str):
        original = originals[name]

        def wrapper(*args, **kwargs):
            start = clock.now()
            try:
                return original(*args, **kwargs)
            finally:
                setattr(clock, phase, getattr(clock, phase) + clock.now() - start)

        return wrapper

    module.batch_generation = timed("batch_generation", "generation")
    module.get_reward = timed("get_reward", "scoring")
    try:
        yield
    finally:
        for name, function in originals.items():
            setattr(module, name, function)


@contextlib.contextmanager
def timed_fast_phases(clock: Clock):
    """The same split for `rlhf_trl.ppo_trainer.PPOTrainer`, which calls neither of TRL's functions: wraps its
    `_generate` (generation), and its `_scores` and `_values` (scoring) when they run without gradients, as in the
    rollout (the value forward of the PPO epochs is training). Patches the class; restores it after."""
    import torch

    from rlhf_trl.ppo_trainer import PPOTrainer as FastPPOTrainer

    originals = {name: vars(FastPPOTrainer)[name] for name in ("_generate", "_scores", "_values")}

    def timed(name: str, phase: str, rollout_only: bool):
        original = originals[name]

        def wrapper(self, *args, **kwargs):
            if rollout_only and torch.is_grad_enabled():
                return original(self, *args, **kwargs)
            start = clock.now()
            try:
                return original(self, *args, **kwargs)
            finally:
                setattr(clock, phase, getattr(clock, phase) + clock.now() - start)

        return wrapper

    FastPPOTrainer._generate = timed("_generate", "generation", rollout_only=False)
    FastPPOTrainer._scores = timed("_scores", "scoring", rollout_only=True)
    FastPPOTrainer._values = timed("_values", "scoring", rollout_only=True)
    try:
        yield
    finally:
        for name, function in originals.items():
            setattr(FastPPOTrainer, name, function)


def step_timer(clock: Clock):
    """A callback that records each optimizer step's wall time and its generation/scoring share, and the logs."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.steps: list[dict] = []
            self.logs: list[dict] = []

        def _mark(self):
            self.last = (clock.now(), clock.generation, clock.scoring)

        def on_train_begin(self, args, state, control, **kwargs):
            self._mark()

        def on_step_end(self, args, state, control, **kwargs):
            start, generation, scoring = self.last
            self._mark()
            now, generation_now, scoring_now = self.last
            self.steps.append(
                {"step": now - start, "generation": generation_now - generation, "scoring": scoring_now - scoring}
            )

        def on_log(self, args, state, control, logs=None, **kwargs):
            keep = ("objective/scores", "objective/kl", "objective/rlhf_reward", "loss/policy_avg", "loss/value_avg")
            keep += ("loss",)
            self.logs.append({key: float(logs[key]) for key in keep if key in (logs or {})})

    return StepTimer()


class PeakMemory:
    """Peak memory of a block: CUDA's max_memory_allocated, or on CPU the process's resident size sampled."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.peak_rss = 0
        self.stop = threading.Event()

    def __enter__(self):
        if self.cuda:
            import torch

            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        else:
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self):
        page = os.sysconf("SC_PAGE_SIZE")
        while not self.stop.is_set():
            try:
                with open("/proc/self/statm") as statm:
                    self.peak_rss = max(self.peak_rss, int(statm.read().split()[1]) * page)
            except OSError:  # no /proc (macOS): ru_maxrss below still answers
                return
            self.stop.wait(0.02)

    def __exit__(self, *exc):
        self.stop.set()
        if not self.cuda:
            self.thread.join()

    def result(self) -> dict:
        if self.cuda:
            import torch

            return {"peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30, "memory": "cuda max_memory_allocated"}
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30  # KiB on Linux
        return {
            "peak_memory_gb": self.peak_rss / 2**30 if self.peak_rss else maxrss,
            "memory": "CPU: peak RSS of the process, sampled during the row" if self.peak_rss else "CPU: ru_maxrss",
            "ru_maxrss_gb": maxrss,
        }


def summarise(timer, args, warmup: int, tokens_per_step: int) -> dict:
    timed = timer.steps[warmup:] or timer.steps  # fewer steps than the warm-up: time what there is
    step = statistics.median(s["step"] for s in timed)
    generation = statistics.median(s["generation"] for s in timed)
    scoring = statistics.median(s["scoring"] for s in timed)
    return {
        "step_time_s": step,
        "generation_s": generation,
        "scoring_s": scoring,
        "training_s": statistics.median(s["step"] - s["generation"] - s["scoring"] for s in timed),
        "tokens_per_s": tokens_per_step / step,
        "steps_timed": len(timed),
        "step_times_s": [s["step"] for s in timer.steps],
        "logs": timer.logs,
    }


def checkpointing(model) -> bool:
    """Whether any layer of `model` actually checkpoints (what the config asked for is not always what ran)."""
    return any(getattr(module, "gradient_checkpointing", False) is True for module in model.modules())


def silence(trainer) -> None:
    """Drops the progress bar, or without a terminal the printer, that writes every step's metrics: the table
    says what matters and the JSON keeps the logs."""
    from transformers import PrinterCallback, ProgressCallback

    for callback in (ProgressCallback, PrinterCallback):
        trainer.remove_callback(callback)


def plain_load(auto_class, path: Path, kwargs: dict):
    """`from_pretrained` as TRL's example scripts call it, plus the pipeline's 4-bit CPU guard
    (`rlhf_trl.modeling.guard_quantized`): without it TRL's rollouts in eval mode would silently break its LoRA
    gradients on an AVX512-BF16 CPU, and the row would time a wrong update."""
    from rlhf_trl.modeling import guard_quantized

    model = auto_class.from_pretrained(str(path), **kwargs)
    return guard_quantized(model) if "quantization_config" in kwargs else model


def ppo_row(impl: str, args, path: Path, workdir: str) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, set_seed
    from trl import get_peft_config

    from rlhf_trl.metrics_log import MetricsLog
    from rlhf_trl.modeling import load_model, model_kwargs
    from rlhf_trl.ppo import enable_gradient_checkpointing, load_value_model
    from rlhf_trl.ppo_roles import HeadOnSharedBase
    from rlhf_trl.ppo_trainer import PPOConfig, PPOTrainer

    set_seed(args.seed)
    model_args = model_config(args, path)
    kwargs = model_kwargs(model_args)
    classifier_kwargs = {**kwargs, "num_labels": 1}
    peft_config = get_peft_config(model_args)
    callbacks, extra, engine = [], {}, {}
    ref_model = reward_model = value_model = None
    if impl == "trl":  # as TRL's examples/scripts/ppo/ppo.py loads them
        policy = plain_load(AutoModelForCausalLM, path, kwargs)
        ref_model = None if peft_config else plain_load(AutoModelForCausalLM, path, kwargs)
        value_model = plain_load(AutoModelForSequenceClassification, path, classifier_kwargs)
        # The reward's score head is drawn right after the seed, as the pipeline's is (and as this value head is,
        # loading the policy draws nothing): with the same prompts and sampling seed, the two sides' reward and KL
        # curves can then be compared step by step (reference/test_against_trl.py, with --no-shared-base).
        set_seed(args.seed)
        reward_model = plain_load(AutoModelForSequenceClassification, path, classifier_kwargs)
        from reference.engines import trl_engine  # TRL 1.12: this row runs in the reference environment

        config_class, trainer_class = trl_engine()
    else:  # as rlhf_trl.ppo.main builds our engine
        shared = shares_base(args)
        policy = load_model(str(path), kwargs=kwargs)  # quantized under 4/8-bit; the adapters go on top
        if shared:  # policy, reference, value and reward on one base: the reward a LoRA adapter on the checkpoint
            extra["reward_adapter"] = str(reward_adapter(args, path, peft_config))
        else:  # separate models; with a full reward checkpoint, no adapter to keep live or copy
            quantized = "quantization_config" in kwargs
            classifier = AutoModelForSequenceClassification
            set_seed(args.seed)
            reward_model = load_model(str(path), classifier, classifier_kwargs, live_adapter=quantized)
            value_model = load_value_model(reward_model, policy, str(path), str(path), kwargs)
        engine = {
            "shared_base": shared,
            "logprob_chunk_tokens": args.logprob_chunk_tokens,
            "rollout_static_cache": args.static_cache,
        }
        config_class, trainer_class = PPOConfig, PPOTrainer
        callbacks.append(MetricsLog())
    updates = args.warmup + args.steps
    prompts = Dataset.from_dict({"input_ids": random_ids(args, args.batch * updates, args.prompt_length)})
    config = config_class(  # one set of settings for both sides; `engine`: ours' own keys
        output_dir=workdir,
        seed=args.seed,
        bf16=args.cuda,
        gradient_checkpointing=args.gradient_checkpointing,
        learning_rate=1e-5,
        total_episodes=args.batch * updates,
        per_device_train_batch_size=args.batch,
        local_rollout_forward_batch_size=args.batch,
        gradient_accumulation_steps=1,
        num_mini_batches=1,
        num_ppo_epochs=args.ppo_epochs,
        response_length=args.response_length,
        stop_token="eos",
        temperature=0.7,
        kl_coef=0.05,
        missing_eos_penalty=1.0,
        num_sample_generations=0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        **engine,
    )
    if impl == "pipeline":  # TRL's own trainer leaves the key unused: that is the baseline
        enable_gradient_checkpointing(config, *[m for m in (policy, value_model) if m is not None])
    clock = Clock(args.cuda)
    timer = step_timer(clock)
    trainer = trainer_class(
        args=config,
        processing_class=stub_tokenizer(),
        model=policy,
        ref_model=ref_model,
        reward_model=reward_model,
        value_model=value_model,
        train_dataset=prompts,
        eval_dataset=prompts.select(range(args.batch)),
        peft_config=peft_config,
        callbacks=[*callbacks, timer],
        **extra,
    )
    silence(trainer)
    with (timed_phases if impl == "trl" else timed_fast_phases)(clock):
        trainer.train()
    if args.save_policy:  # the trained adapter (or model), for comparing the two sides' weights
        trainer.save_model(str(Path(args.save_policy) / impl))
    row = summarise(timer, args, args.warmup, args.batch * (args.prompt_length + args.response_length))
    row["gradient_checkpointing_active"] = checkpointing(trainer.accelerator.unwrap_model(trainer.model))
    row["trainer"] = f"{type(trainer).__module__}.{type(trainer).__name__}"
    if impl == "pipeline":  # what actually ran, not what was asked for
        row["shared_base"] = trainer.shares_base
        row["reward_shared"] = isinstance(trainer.reward_model, HeadOnSharedBase)
        row["reward_model"] = "random LoRA adapter" if "reward_adapter" in extra else "random full classifier"
        row["reward_adapter"] = extra.get("reward_adapter")
        row["logprob_chunk_tokens"] = trainer.args.logprob_chunk_tokens
        row["static_cache"] = trainer.args.rollout_static_cache
    return row


def sft_row(impl: str, args, path: Path, workdir: str) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, set_seed
    from trl import SFTConfig, SFTTrainer, get_peft_config

    from rlhf_trl.metrics_log import MetricsLog
    from rlhf_trl.modeling import load_model, model_kwargs

    set_seed(args.seed)
    model_args = model_config(args, path)
    kwargs = model_kwargs(model_args)
    if impl == "trl":
        model = plain_load(AutoModelForCausalLM, path, kwargs)
        callbacks = []
    else:  # rlhf_trl.sft's load and callbacks
        model = load_model(str(path), kwargs=kwargs)
        callbacks = [MetricsLog()]
    steps = args.warmup + args.steps
    length = args.prompt_length + args.response_length
    # Pre-tokenized prompt + completion: SFTTrainer takes input_ids as they are, and completion_mask gives the
    # completion-only loss the recipes use.
    data = Dataset.from_dict(
        {
            "input_ids": random_ids(args, args.batch * steps, length),
            "completion_mask": [[0] * args.prompt_length + [1] * args.response_length] * (args.batch * steps),
        }
    )
    config = SFTConfig(
        output_dir=workdir,
        seed=args.seed,
        bf16=args.cuda,
        gradient_checkpointing=args.gradient_checkpointing,
        learning_rate=1e-5,
        max_steps=steps,
        per_device_train_batch_size=args.batch,
        max_length=length,
        completion_only_loss=True,
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        dataloader_num_workers=0,
        dataloader_pin_memory=args.cuda,
    )
    clock = Clock(args.cuda)
    timer = step_timer(clock)
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=data,
        processing_class=stub_tokenizer(),
        peft_config=get_peft_config(model_args),
        callbacks=[*callbacks, timer],
    )
    silence(trainer)
    trainer.train()
    row = summarise(timer, args, args.warmup, args.batch * length)
    for key in ("generation_s", "scoring_s"):  # SFT has neither
        row.pop(key)
    row["training_s"] = row["step_time_s"]
    row["gradient_checkpointing_active"] = checkpointing(trainer.model)
    row["trainer"] = f"{type(trainer).__module__}.{type(trainer).__name__}"
    return row


def one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:240] if text else ''}".rstrip(": ")


def run_row(task: str, impl: str, args, path: Path, mode: str | None = None) -> dict:
    """One row in this process, in `mode` (default: --mode); an exception becomes `failed: <reason>` so the other
    rows still run."""
    import gc

    import transformers
    import trl

    args = argparse.Namespace(**{**vars(args), "mode": mode or args.mode})
    row = {"task": task, "impl": impl, "mode": args.mode}
    row["versions"] = {"trl": trl.__version__, "transformers": transformers.__version__}
    start = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix=f"bench-{task}-{impl}-") as workdir, PeakMemory(args.cuda) as memory:
            row.update((ppo_row if task == "ppo" else sft_row)(impl, args, path, workdir))
        row.update(memory.result())
        row["status"] = "ok"
    except Exception as error:  # recorded, not raised: a side that fails is itself a result
        row["status"] = f"failed: {one_line(error)}"
    row["wall_s"] = time.perf_counter() - start
    gc.collect()
    if args.cuda:
        import torch

        torch.cuda.empty_cache()
    return row


def run_isolated(
    task: str, impl: str, args, argv: list[str], path: Path, python: str = sys.executable, mode: str | None = None
) -> dict:
    """One row in a fresh process of `python` (the trl rows: the reference environment's) with the same arguments,
    in `mode` (default: --mode); a crash (killed for memory, say) becomes `failed`."""
    mode = mode or args.mode
    with tempfile.TemporaryDirectory(prefix="bench-row-") as tmp:
        out = Path(tmp) / "row.json"
        row_args = ["--row", f"{task}:{impl}:{mode}", "--row-out", str(out)]
        command = [python, "-m", "benchmarks.bench_ppo", *argv, *row_args]
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        if out.is_file():
            return json.loads(out.read_text())
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        reason = lines[-1][:240] if lines else f"exit status {result.returncode}"
        status = f"failed: process exited {result.returncode}: {reason}"
        return {"task": task, "impl": impl, "mode": mode, "status": status}


def ratio(rows: dict, task: str, key: str, mode: str) -> float | None:
    """pipeline / trl for `task`'s `key` in `mode`."""
    return quotient(rows.get((task, "pipeline", mode), {}), rows.get((task, "trl", mode), {}), key)


def quotient(top: dict, bottom: dict, key: str) -> float | None:
    if top.get("status") == "ok" and bottom.get("status") == "ok" and bottom.get(key):
        return top[key] / bottom[key]
    return None


def ratios(rows: dict, args) -> dict:
    """pipeline / trl in --mode, and under 4/8-bit with the baseline each impl's quantized row / its unquantized one."""
    found = {
        "ppo step time": ratio(rows, "ppo", "step_time_s", args.mode),
        "ppo peak memory": ratio(rows, "ppo", "peak_memory_gb", args.mode),
        "sft tokens/s": ratio(rows, "sft", "tokens_per_s", args.mode),
    }
    if len(modes(args)) > 1:
        quantized, base = args.mode, mode_label(args, "bf16")
        for task, impl in ROWS:
            for key, name in (("step_time_s", "step time"), ("peak_memory_gb", "peak memory")):
                value = quotient(rows.get((task, impl, args.mode), {}), rows.get((task, impl, "bf16"), {}), key)
                found[f"{task} {impl} {name} {quantized}/{base}"] = value
    return found


def engine_line(row: dict) -> str:
    """What the pipeline's PPO row ran, in one line under the table."""
    if row["shared_base"]:
        sharing = "policy, reference, value" + (" and reward" if row["reward_shared"] else "") + " on one base"
    else:
        sharing = "separate value and reward models"
    static = "on" if row["static_cache"] else "off"
    return (
        f"{row['trainer']}; {sharing}; reward: {row['reward_model']}; "
        f"log-probs in chunks of {row['logprob_chunk_tokens']} tokens; static KV cache {static}"
    )


def table(result: dict) -> str:
    s = result["settings"]
    lines = [
        f"{result['shape']['name']} ({result['shape']['parameters'] / 1e9:.2f}B) {s['mode']} "
        f"({s['dtype']}) {'LoRA' if s['lora'] else 'full'}, batch {s['batch']}, {s['prompt_length']}+"
        f"{s['response_length']} tokens, {s['ppo_epochs']} PPO epochs, median of {s['steps']} steps after "
        f"{s['warmup']} warm-up; {result['device']}, {result['date']}",
        f"{'task':<5}{'impl':<10}{'step s':>9}{'gen s':>9}{'score s':>9}{'train s':>9}{'tokens/s':>11}{'peak GB':>9}",
    ]

    def cell(row, key, width, digits=3):
        return f"{row[key]:>{width}.{digits}f}" if key in row else f"{'-':>{width}}"

    labels = {mode: mode_label(argparse.Namespace(dtype=s["dtype"]), mode) for mode in s.get("modes", [s["mode"]])}
    several = len(labels) > 1  # a mode column only when the run compares precisions
    if several:
        lines[1] = lines[1][:15] + f"{'mode':<6}" + lines[1][15:]
    for row in result["rows"]:
        head = f"{row['task']:<5}{row['impl']:<10}" + (f"{labels.get(row.get('mode'), '?'):<6}" if several else "")
        if row["status"] != "ok":
            lines.append(head + row["status"])
            continue
        lines.append(
            head
            + cell(row, "step_time_s", 9)
            + cell(row, "generation_s", 9)
            + cell(row, "scoring_s", 9)
            + cell(row, "training_s", 9)
            + cell(row, "tokens_per_s", 11, 1)
            + cell(row, "peak_memory_gb", 9, 2)
        )
    for row in result["rows"]:
        if row["task"] == "ppo" and row["impl"] == "pipeline" and row["status"] == "ok" and "shared_base" in row:
            mode = f" {labels.get(row.get('mode'), '?')}" if several else ""
            lines.append(f"ppo pipeline{mode}: {engine_line(row)}")
    for impl, where in (("trl", "the reference environment"), ("pipeline", "this environment")):
        stacks = sorted(
            {
                f"TRL {r['versions']['trl']}, transformers {r['versions']['transformers']}"
                for r in result["rows"]
                if r["impl"] == impl and "versions" in r
            }
        )
        if stacks:
            lines.append(f"{impl} rows: {'; '.join(stacks)} ({where})")
    memory = sorted({row["memory"] for row in result["rows"] if "memory" in row})
    if memory:
        lines.append(f"peak GB: {'; '.join(memory)}")
    found = {name: value for name, value in result["ratios"].items() if value is not None}
    versus = f" {s['mode']}/{labels.get('bf16', '')}"  # the names `ratios` gives quantized / unquantized
    against_trl = [f"{name} {value:.2f}" for name, value in found.items() if not name.endswith(versus)]
    if against_trl:
        lines.append("pipeline / trl: " + ", ".join(against_trl))
    precision = [f"{name.removesuffix(versus)} {value:.2f}" for name, value in found.items() if name.endswith(versus)]
    if precision and several:
        lines.append(f"{versus.strip()}: " + ", ".join(precision))
    return "\n".join(lines)


def device_name(cuda: bool) -> str:
    if cuda:
        import torch

        return torch.cuda.get_device_name(0)
    return f"CPU ({os.cpu_count()} cores)"


def default_out(args, date: str) -> Path:
    suffix = "" if args.lora else "-full"
    if args.lora and not args.shared_base:
        suffix = "-separate"
    return ROOT / "benchmarks" / "results" / f"{date}-{args.shape}-{args.mode}{suffix}.json"


def quiet() -> None:
    """No weight-loading reports (the score head is new by design) and no dataset progress bars."""
    import datasets
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    datasets.disable_progress_bars()


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    quiet()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.row:  # a child of run_isolated: the settings are already checked and the checkpoint written
        task, impl, mode = [*args.row.split(":"), args.mode][:3]
        row = run_row(task, impl, args, checkpoint(args), mode)
        Path(args.row_out).write_text(json.dumps(row))
        return
    check(args)
    # TRL 1.12's rows run in the reference environment: missing, that is one line before anything is built.
    reference_python = reference.python() if "trl" in split(args.impls) else None
    import peft
    import torch
    import transformers
    import trl

    from benchmarks.shapes import SHAPES, parameter_count

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    now = datetime.datetime.now(datetime.UTC)
    print(f"bench: random {args.shape} weights in {args.cache_dir} (written on first use)", flush=True)
    path = checkpoint(args)
    if "ppo" in split(args.tasks) and "pipeline" in split(args.impls) and shares_base(args):
        from trl import get_peft_config

        # Here, not in the row: under --isolate every row is a child process, and writing it is not the row's cost.
        reward_adapter(args, path, get_peft_config(model_config(args, path)))
    rows = {}
    for mode in modes(args):
        for task, impl in ROWS:
            if task not in split(args.tasks) or impl not in split(args.impls):
                continue
            name = f"{task} {impl}" + (f" {mode_label(args, mode)}" if len(modes(args)) > 1 else "")
            print(f"bench: {name} ...", flush=True)
            if impl == "trl":
                row = run_isolated(task, impl, args, argv, path, reference_python, mode)
            elif args.isolate:
                row = run_isolated(task, impl, args, argv, path, mode=mode)
            else:
                row = run_row(task, impl, args, path, mode)
            rows[task, impl, mode] = row
            print(f"bench: {name}: {row['status']}", flush=True)
    result = {
        "date": now.strftime("%Y-%m-%d"),
        "time_utc": now.strftime("%H:%M:%S"),
        "command": "python -m benchmarks.bench_ppo " + shlex.join(argv),
        "device": device_name(args.cuda),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "trl": trl.__version__,
            "peft": peft.__version__,
        },
        "shape": {"name": args.shape, "mirrors": SHAPES[args.shape].mirrors, "parameters": parameter_count(args.shape)},
        "settings": {
            key: getattr(args, key)
            for key in (
                "mode",
                "baseline",
                "dtype",
                "lora",
                "batch",
                "prompt_length",
                "response_length",
                "ppo_epochs",
                "steps",
                "warmup",
                "gradient_checkpointing",
                "shared_base",
                "logprob_chunk_tokens",
                "static_cache",
                "isolate",
                "threads",
                "seed",
            )
        }
        | {"modes": modes(args)},
        "rows": list(rows.values()),
        "ratios": ratios(rows, args),
    }
    out = Path(args.out) if args.out else default_out(args, result["date"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    print(f"bench: wrote {out}")


if __name__ == "__main__":
    from rlhf_trl.cli import run

    run(main)
