"""4-bit and 8-bit bases run for real (marker `paths`, `make test-paths`): bitsandbytes' CPU library here, a GPU
where there is one.

- Every training stage (sft, reward, ppo, rloo, grpo, dpo, kto) on a 4-bit and an 8-bit tiny base with LoRA, as the
  QLoRA recipes chain them: SFT on the base, `merge` (full precision), then reward on the merge, and PPO (policy,
  reference, value and reward on one quantized base), RLOO, GRPO, DPO and KTO from it. Each stage runs in this process
  (`conftest.run_here`, the stage's own entry point), so the warning filter below covers it. Checked: the LoRA
  tensors it saved moved from where they start, the quantized base layers it trained on are bit for bit a fresh
  load's, its output reloads and answers through `chat`, and `merge`'s export loads in plain transformers and
  generates.
- The guard (`modeling.guard_quantized`): LoRA gradients through a 4-bit base after an eval-mode no-grad forward
  equal those of a float32 model holding the same dequantized weights.

On a CPU with AVX512-BF16 that forward repacks a `Linear4bit`'s weight and later gradients through it are silently
wrong (`modeling.guard_quantized`). A CPU without it never repacks, so there the `avx512bf16_cpu` fixture makes
every `Linear4bit` built here start as it would on such a CPU (bitsandbytes' `has_avx512bf16`, read when a layer is
made): the same code is then at risk on every machine, and a load that skipped the guard fails these tests. The
warning bitsandbytes' repacked layers give when backpropagated through is an error here (pytestmark).

Tiny Llama-shaped models (the demo world's: hidden 64, MLP 128), since bitsandbytes' CPU repack needs input sizes
that are multiples of 64.
"""

import contextlib
import importlib
import time
from pathlib import Path
from unittest import mock

import pytest
import torch
from conftest import ROOT, grpo_args, ppo_args, reward_args, rloo_args, run_here, sft_args, stage_paths
from safetensors.torch import load_file

pytestmark = [
    pytest.mark.paths,
    pytest.mark.filterwarnings("error:.*autograd kernel was not registered:UserWarning"),
]
CUDA = torch.cuda.is_available()
FLAGS = {4: "--load_in_4bit", 8: "--load_in_8bit"}
POLICIES = ("sft", "ppo", "rloo", "grpo", "dpo", "kto")


@pytest.fixture(scope="module", autouse=True)
def avx512bf16_cpu():
    """Every `Linear4bit` made in this module starts as on a CPU with AVX512-BF16 (see the module docstring)."""
    import bitsandbytes.functional

    if bitsandbytes.functional.has_avx512bf16():
        yield "this CPU"
        return
    with mock.patch("bitsandbytes.nn.modules.has_avx512bf16", lambda: True):
        yield "simulated"


def model_config(path, bits: int, **settings):
    """TRL's ModelConfig of a quantized base with LoRA, as a stage parses it from a recipe."""
    from trl import ModelConfig

    return ModelConfig(
        model_name_or_path=str(path),
        dtype="float32",
        load_in_4bit=bits == 4,
        load_in_8bit=bits == 8,
        use_peft=True,
        **settings,
    )


def load_quantized(path, bits: int, auto_class=None):
    """`path` loaded as every stage loads its base: `modeling.model_kwargs` and `modeling.load_model`."""
    from rlhf_trl.modeling import load_model, model_kwargs

    return load_model(str(path), auto_class, model_kwargs(model_config(path, bits)))


def quantized_layers(model) -> dict[str, list[tuple[torch.Tensor, ...]]]:
    """What each bitsandbytes layer of `model` stores, by its name from `layers.` on: 4-bit, the packed weight and its
    block scales; 8-bit, the int8 weight and its row scales. Wrappers (peft's base_layer) left out of the name."""
    import bitsandbytes as bnb

    found: dict[str, list] = {}
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            stored = (module.weight.data.clone(), module.weight.quant_state.absmax.clone())
        elif isinstance(module, bnb.nn.Linear8bitLt):  # the first forward moves the row scales into its state
            scales = module.weight.SCB if module.weight.SCB is not None else module.state.SCB
            stored = (module.weight.data.clone(), scales.clone())
        else:
            continue
        found.setdefault(name[name.index("layers.") :].replace(".base_layer", ""), []).append(stored)
    return found


def assert_base_untouched(trained: dict, fresh: dict) -> None:
    assert trained and set(trained) == set(fresh), sorted(set(trained) ^ set(fresh))
    for name, copies in trained.items():
        for stored in copies:
            assert all(torch.equal(a, b) for a, b in zip(stored, fresh[name][0], strict=True)), name


@contextlib.contextmanager
def captured_trainers():
    """The trainer each stage hands to `outputs.publish`, by stage name, while the block runs."""
    outputs = importlib.import_module("rlhf_trl.outputs")
    seen, publish = {}, outputs.publish

    def capture(trainer, tokenizer, work, final_dir, stage, **info):
        seen[stage] = trainer
        return publish(trainer, tokenizer, work, final_dir, stage, **info)

    outputs.publish = capture
    try:
        yield seen
    finally:
        outputs.publish = publish


def stage_here(stage: str, *args: str):
    """A stage's command in this process, as `make <stage> RECIPE=demo ARGS=...` with the given overrides."""
    importlib.import_module("rlhf_trl.modeling")._NOTED.clear()  # a note is once per process: here, once per stage
    return run_here(stage, "--config", str(ROOT / "recipes/demo" / f"{stage}.yaml"), *args)


def pair_method_args(stage: str):
    """Arguments of a brief DPO or KTO run (`stage`): both train on the demo's preference pairs."""

    def args(paths, *extra):
        data = paths["data"]
        return (
            *("--sft_model_path", paths["sft"], "--output_dir", paths[stage], "--max_steps", "3"),
            *("--dataset_name", f"{data}/pairs_train.jsonl", "--eval_dataset_name", f"{data}/pairs_eval.jsonl"),
            *extra,
        )

    return args


dpo_args, kto_args = pair_method_args("dpo"), pair_method_args("kto")


def small_data(data: Path, into: Path, records: int = 16) -> Path:
    """The demo world's data with each held-out split cut to its first `records` lines: every stage evaluates its
    whole eval split at the end, which on a CPU's 4-bit path would be most of the run."""
    import shutil

    into.mkdir()
    for source in data.glob("*.jsonl"):
        if source.stem.endswith("_eval"):
            lines = source.read_text().splitlines(keepends=True)[:records]
            (into / source.name).write_text("".join(lines))
        else:
            shutil.copy(source, into / source.name)
    return into


@pytest.fixture(scope="module", params=[4, 8], ids=["4bit", "8bit"])
def chain(request, world, tmp_path_factory):
    """The QLoRA recipes' chain on a `bits`-bit demo base, each stage briefly: sft (LoRA on the quantized base),
    merge (full precision: `sft-merged`), then reward, ppo, rloo, grpo, dpo and kto from the merge, and merge again for
    each method. Returns the paths, each run's stdout and the quantized layers its trainer ended with, and those of a
    fresh quantized load of each base."""
    bits = request.param
    root = tmp_path_factory.mktemp(f"quant{bits}bit")
    paths = stage_paths(world) | {name: str(root / name) for name in (*POLICIES, "reward", "sft-merged")}
    paths["data"] = str(small_data(Path(paths["data"]), root / "data"))
    quantized = (FLAGS[bits], "true", "--use_peft", "true", "--lora_r", "8", "--lora_target_modules", "all-linear")
    batch = ("--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "16")
    quantized += ("--max_train_samples", "64")  # the stages read and check all of a split first
    runs = {}

    def train(stage, *args):
        start, cpu = time.perf_counter(), time.process_time()
        with captured_trainers() as trainers:
            result = stage_here(stage, *args, *quantized, *(batch if stage not in ("rloo", "grpo", "ppo") else ()))
        assert result.returncode == 0, f"{stage} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        runs[stage] = {"stdout": result.stdout, "layers": quantized_layers(trainers[stage].model)}
        print(f"{bits}-bit {stage}: {time.perf_counter() - start:.1f} s ({time.process_time() - cpu:.1f} s CPU)")

    def merge(stage, output):
        result = run_here("merge", "--model", paths[stage], "--output", output)
        assert result.returncode == 0, f"merge of {stage} failed:\n{result.stderr[-3000:]}"

    train("sft", *sft_args(paths, "--max_steps", "3"))
    merge("sft", paths["sft-merged"])
    after_sft = dict(paths, sft=paths["sft-merged"])  # every later stage starts from the full-precision merge
    train("reward", *reward_args(after_sft, "--max_steps", "3"))
    after_sft["reward"] = paths["reward"]
    train("ppo", *ppo_args(after_sft, "--total_episodes", "16", "--per_device_train_batch_size", "8",
                           "--local_rollout_forward_batch_size", "8", "--num_ppo_epochs", "2",
                           "--response_length", "12"))  # fmt: skip
    train("rloo", *rloo_args(after_sft, "--max_steps", "2"))
    train("grpo", *grpo_args(after_sft, "--max_steps", "2"))
    train("dpo", *dpo_args(after_sft))
    train("kto", *kto_args(after_sft, "--label_mix", "generated"))
    for stage in POLICIES:
        merge(stage, str(root / f"export-{stage}"))
    fresh = {
        "base": quantized_layers(load_quantized(paths["base"], bits)),
        "sft-merged": quantized_layers(load_quantized(paths["sft-merged"], bits)),
    }
    return {"bits": bits, "root": root, "paths": paths, "runs": runs, "fresh": fresh}


def lora_tensors(output: str) -> dict[str, torch.Tensor]:
    return {n: t for n, t in load_file(str(Path(output) / "adapter_model.safetensors")).items() if "lora_B" in n}


@pytest.mark.parametrize("stage", ["sft", "reward", "ppo", "rloo", "grpo", "dpo", "kto"])
def test_each_stage_trains_lora_on_a_frozen_quantized_base(chain, stage):
    bits, run = chain["bits"], chain["runs"][stage]
    # LoRA B starts at zero (peft's default): every one the stage saved moved, on every linear layer (all-linear).
    moved = lora_tensors(chain["paths"][stage])
    assert moved and all(t.abs().sum() > 0 for t in moved.values()), [n for n, t in moved.items() if not t.any()]
    assert len(moved) >= 14  # 2 layers x 7 projections
    # The quantized layers the trainer ended with are a fresh load's, bit for bit (and not repacked for inference).
    fresh = chain["fresh"]["base" if stage == "sft" else "sft-merged"]
    assert_base_untouched(run["layers"], fresh)
    assert len(run["layers"]) == 14  # q, k, v, o, gate, up, down in each of the 2 layers
    stored = torch.uint8 if bits == 4 else torch.int8  # two 4-bit codes a byte, or one int8 a weight
    assert all(copies[0][0].dtype == stored for copies in run["layers"].values())
    if not CUDA:  # said once, in one line, by every stage
        assert run["stdout"].count(f"note: load_in_{bits}bit without a GPU") == 1, run["stdout"][-2000:]


def test_ppo_keeps_every_role_on_one_quantized_base(chain):
    stdout = chain["runs"]["ppo"]["stdout"]
    assert "ppo: policy, reference, value and reward share one base" in stdout
    # one copy of each layer: the reward and value adapters sit on the policy's base
    assert all(len(copies) == 1 for copies in chain["runs"]["ppo"]["layers"].values())


@pytest.mark.parametrize("stage", POLICIES)
def test_outputs_reload_and_answer_through_chat(chain, stage):
    result = run_here("chat", "--model", chain["paths"][stage], "--prompt", "Describe the river.",
                      "--max-new-tokens", "6", "--temperature", "0")  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "assistant> " in result.stdout


def test_the_reward_output_scores(chain):
    from transformers import AutoModelForSequenceClassification

    from rlhf_trl.modeling import load_model, load_tokenizer

    path = chain["paths"]["reward"]
    tokenizer = load_tokenizer(path)
    reward = load_model(path, AutoModelForSequenceClassification, {"num_labels": 1}).eval()
    batch = tokenizer(["The river is long.", "A river."], return_tensors="pt", padding=True)
    with torch.no_grad():
        scores = reward(**batch).logits.squeeze(-1)
    assert scores.shape == (2,) and torch.isfinite(scores).all() and scores[0] != scores[1]


@pytest.mark.parametrize("stage", POLICIES)
def test_merge_exports_a_plain_model_that_generates(chain, stage):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    export = chain["root"] / f"export-{stage}"
    assert not (export / "adapter_config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(export)  # plain transformers: no peft, no quantization
    assert not getattr(model, "is_quantized", False) and model.dtype == torch.float32
    tokenizer = AutoTokenizer.from_pretrained(export)
    ids = tokenizer("Describe the river.", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] > ids["input_ids"].shape[1]


# --------------------------------------------------------------------------------------------------------- the guard


def lora_gradients(model, ids: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
    """Gradients of every LoRA tensor of a fixed, non-zero adapter (seeded) for one batch, in training mode."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(123)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))
    peft_model.train()
    loss = peft_model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad}


@pytest.mark.skipif(CUDA, reason="the repack is bitsandbytes' CPU path; with a GPU the stages load onto it")
def test_lora_gradients_on_a_4bit_base_survive_an_eval_mode_forward(world, avx512bf16_cpu):
    """What generate(), Trainer.evaluate() and PPO's rollouts do between updates: an eval-mode forward without grad.
    Without the guard, on an AVX512-BF16 CPU (real or simulated), the layers repack and the gradients go wrong
    (about 50% relative error measured on a real one; more when simulated) with only a warning, an error here."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as functional
    from transformers import AutoModelForCausalLM

    base = world / "models/base"
    quantized = load_quantized(base, 4)
    # The reference: the float32 model holding exactly the weights the 4-bit layers dequantize to.
    reference = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    layers = [(name, m) for name, m in quantized.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 14
    with torch.no_grad():
        for name, layer in layers:
            weight = functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
            reference.get_submodule(name).weight.copy_(weight)
    ids = torch.randint(3, quantized.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(1))
    quantized.eval()
    with torch.no_grad():
        quantized(input_ids=ids)
    assert not any(getattr(layer.weight.quant_state, "packing_format_for_cpu", False) for _, layer in layers)
    loss, gradients = lora_gradients(quantized, ids)
    expected_loss, expected = lora_gradients(reference, ids)
    assert loss == pytest.approx(expected_loss, rel=1e-5)
    assert gradients.keys() == expected.keys() and len(expected) == 28  # A and B of 14 layers
    for name, gradient in expected.items():
        assert gradient.abs().sum() > 0, name
        error = ((gradients[name] - gradient).norm() / gradient.norm()).item()
        assert error < 1e-4, f"{name}: relative gradient error {error:.2e} ({avx512bf16_cpu} AVX512-BF16)"


def test_the_guard_is_what_keeps_the_layout(world):
    """Without the guard, the same eval-mode forward repacks (so the test above fails): the simulation is faithful."""
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    from rlhf_trl.modeling import model_kwargs

    kwargs = model_kwargs(model_config(world / "models/base", 4)) | {"device_map": {"": "cpu"}}
    unguarded = AutoModelForCausalLM.from_pretrained(world / "models/base", **kwargs)
    unguarded.eval()
    with torch.no_grad():
        unguarded(input_ids=torch.tensor([[5, 6, 7, 8]]))
    layers = [m for m in unguarded.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(layer.weight.quant_state.packing_format_for_cpu for layer in layers)


def test_bitsandbytes_noise_is_dropped_and_nothing_else():
    import logging

    from rlhf_trl.modeling import quiet_bitsandbytes

    quiet_bitsandbytes()
    matmul = logging.getLogger("bitsandbytes.autograd._functions")
    cpu = logging.getLogger("bitsandbytes.backends.cpu.ops")
    seen = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = seen.append
    levels = [(logger, logger.level) for logger in (matmul, cpu)]
    for logger, _ in levels:
        logger.addHandler(handler)
        logger.setLevel(logging.WARNING)
    try:
        matmul.warning("MatMul8bitLt: inputs will be cast from %s to float16 during quantization", torch.float32)
        cpu.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please ...", "No module")
        matmul.warning("something else entirely")
        cpu.warning("and this too")
    finally:
        for logger, level in levels:
            logger.removeHandler(handler)
            logger.setLevel(level)
    assert [record.getMessage() for record in seen] == ["something else entirely", "and this too"]


# ------------------------------------------------------------------------------------------- CUDA (skipped without)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="4/8-bit on a GPU needs CUDA")
@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_base_loads_onto_the_gpu_and_generates(world, bits):
    model = load_quantized(world / "models/base", bits)
    assert getattr(model, f"is_loaded_in_{bits}bit") and model.device.type == "cuda"
    output = model.generate(torch.tensor([[5, 6, 7]], device=model.device), max_new_tokens=4, do_sample=False)
    assert output.shape == (1, 7)
