"""Export: merge the LoRA adapters into a full-precision base and write a standalone model.

    python -m rlhf_trl.merge --recipe demo [--stage sft|ppo|rloo|grpo|dpo|kto] [--output DIR] [--dtype bfloat16]
    make merge RECIPE=demo

The base is reloaded unquantized even when training used 4/8-bit: merging into the quantized weights works
(peft dequantizes, adds the adapter and quantizes again) but rounds the adapter into them. The result
(safetensors, tokenizer with its chat template, generation config whose eos_token_id lists every stop id: the
tokenizer's EOS and the model's own list) loads with plain
`AutoModelForCausalLM.from_pretrained`, without peft, and stops where the stage outputs stopped; the reload is
checked before the export is marked finished.
"""

import argparse
from pathlib import Path

import torch

from . import outputs
from .errors import run
from .generation import as_id_list, stop_token_ids
from .modeling import check_model_source, is_adapter, load_model, load_tokenizer


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="demo")
    parser.add_argument("--stage", default="ppo", choices=outputs.POLICY_STAGES)
    parser.add_argument("--model", type=Path, help="a model or adapter folder; overrides --recipe/--stage")
    parser.add_argument("--output", type=Path, help="default: models/<recipe>/export")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "float32", "bfloat16", "float16"),
        help="weights dtype of the export; auto keeps the base's",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a finished export")
    args = parser.parse_args(argv)
    from transformers import AutoModelForCausalLM

    source = args.model or Path("models", args.recipe, args.stage)
    if args.model is None:
        outputs.require(source, args.stage, args.recipe)
    check_model_source(source, "--model")
    output = args.output or Path("models", args.recipe, "export")
    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    with outputs.stage_output(output, args.overwrite) as work:
        model = load_model(source, kwargs={"dtype": dtype})  # no quantization_config: full precision
        tokenizer = load_tokenizer(source)
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        # Every stop id (Llama 3's [<|end_of_text|>, <|eot_id|>]): with the tokenizer's EOS alone, plain
        # transformers would run an export past each end of turn to max_new_tokens. The model's own list keeps
        # its order; the tokenizer's EOS is added when it is missing from it.
        own = as_id_list(model.generation_config.eos_token_id)
        stops = own + [i for i in stop_token_ids(tokenizer, model) if i not in own]
        model.generation_config.eos_token_id = stops[0] if len(stops) == 1 else (stops or None)
        model.save_pretrained(work)
        tokenizer.save_pretrained(work)
        reloaded = AutoModelForCausalLM.from_pretrained(work, dtype=dtype)
        probe = torch.tensor([[tokenizer.eos_token_id or 0] * 4])
        if not torch.allclose(model(probe).logits, reloaded(probe).logits, atol=1e-4, rtol=1e-3):
            raise RuntimeError(f"the export in {work} does not reproduce the merged model; it was not published")
        outputs.finish(work, output, "export", source=str(source), merged_adapters=is_adapter(source))
    print(f"merge: wrote a standalone model to {output} (loads with AutoModelForCausalLM, no peft needed)")


if __name__ == "__main__":
    run(main)
