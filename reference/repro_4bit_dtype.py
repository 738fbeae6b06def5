"""The cause of plain TRL's 4-bit PPO failure ("expected scalar type Float but found BFloat16"), shown on CPU.

    .venv-reference/bin/python -m reference.repro_4bit_dtype    # a few seconds; no GPU, no bitsandbytes

TRL 1.12 only (`make reference-env`): TRL 1.13 deleted PPO and this cast with it; reference/test_against_trl.py
runs this and checks what it prints.

When `bf16` is on and the policy is loaded in 4-bit, TRL 1.12's PPOTrainer.__init__ calls
`peft_module_casting_to_bf16`, which moves every module named "*norm*" to float32. A Llama/Qwen RMSNorm returns
`weight * hidden.to(input_dtype)`, so with a float32 weight its output is float32, and the next layer that is not
4-bit (the bf16 `lm_head`; on CPU already the first bf16 Linear) gets float32 input against bf16 weights. Training
does not see it (its forward goes through the accelerate-prepared wrapper, under autocast when mixed precision is
on), but `generate` and the reference forward call the policy directly: the run stops in the first generate.
bitsandbytes does not run on CPU, so this shows the mechanism on a bf16 toy model with the same cast; either fix
below makes generation work again; the second is what `rlhf_trl.ppo_engine` did for `ppo_engine: trl`
(benchmarks/NOTES.md).
"""

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
from trl.experimental.utils import peft_module_casting_to_bf16

from benchmarks.shapes import build_config


def main() -> None:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(build_config("toy", pad_token_id=0, eos_token_id=1), dtype=torch.bfloat16)
    model = get_peft_model(model, LoraConfig(r=16, target_modules="all-linear"))
    ids = torch.tensor([[5, 6, 7]])
    peft_module_casting_to_bf16(model)  # what TRL's PPOTrainer.__init__ does to a 4-bit policy under bf16
    try:
        model.generate(input_ids=ids, max_new_tokens=2, do_sample=False)
        print("generate after TRL's cast: works (the cause is elsewhere)")
    except RuntimeError as error:
        print(f"generate after TRL's cast: RuntimeError: {error}")
    with torch.autocast("cpu", dtype=torch.bfloat16):  # fix 1: generate under autocast, as training runs
        print("fix 1, generate under autocast:", model.generate(input_ids=ids, max_new_tokens=2, do_sample=False)[0])
    for name, module in model.named_modules():  # fix 2: the norms back in bf16 (RMSNorm computes in fp32 anyway)
        if "norm" in name:
            module.to(torch.bfloat16)
    print("fix 2, norms back in bf16:", model.generate(input_ids=ids, max_new_tokens=2, do_sample=False)[0])


if __name__ == "__main__":
    main()
