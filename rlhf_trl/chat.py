"""Chat in the terminal with the model of any stage (PPO by default), or answer one prompt and exit.

    python -m rlhf_trl.chat --recipe demo [--stage sft|ppo|rloo|grpo|dpo|kto|export] [--model DIR] [--prompt "..."]
    make chat RECIPE=demo STAGE=sft PROMPT="Tell me about the river."

Answers stream token by token through the model's own chat template (the one its SFT stage trained),
so what you see is what PPO optimised. They are sampled at --temperature with top-k and top-p off (greedy at 0),
whatever the model's generation_config.json suggests, and stop at any of its stop tokens (`rlhf_trl.generation`);
the first line printed says so. Type /reset to start a new conversation and /quit to leave.
Stage outputs that are adapters load on their base with the adapters merged; exports load as they are.
"""

import argparse
from pathlib import Path

from . import outputs
from .data import check_unicode
from .errors import UserError, run
from .modeling import context_length, for_inference, generate, load_model, load_tokenizer, render_prompt, sampling_line

STAGES = (*outputs.POLICY_STAGES, "export")


def chat_context(model, tokenizer) -> int:
    """The tokens a prompt and its answer may take: the model's context (`modeling.context_length`), else the
    tokenizer's `model_max_length`. `make chat` and the web page's Chat tab both fit their history to it."""
    return context_length(model) or tokenizer.model_max_length


def fit_history(tokenizer, history: list[dict], context: int, max_new_tokens: int) -> list[dict]:
    """Drops the oldest turns until the prompt plus the answer fit the model's context. Raises UserError when they
    cannot, or when the text holds a lone surrogate (a browser can send one; no tokenizer takes it)."""
    check_unicode(history, "the chat")
    while True:
        length = len(tokenizer(render_prompt(tokenizer, history), add_special_tokens=False)["input_ids"])
        if length + max_new_tokens <= context:
            return history
        if len(history) <= 1:
            raise UserError(
                f"the prompt is {length} tokens and the answer may take {max_new_tokens}, but the model's context "
                f"is {context}: shorten the prompt or lower --max-new-tokens"
            )
        history = history[2:] if len(history) > 2 else history[1:]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="demo")
    parser.add_argument("--stage", default="ppo", choices=STAGES)
    parser.add_argument("--model", type=Path, help="a model or adapter folder; overrides --recipe/--stage")
    parser.add_argument("--prompt", help="answer this once and exit")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.7, help="0 for greedy decoding")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.temperature < 0:
        raise UserError(f"--temperature {args.temperature} is negative: use 0 for greedy decoding or a value above 0")
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens {args.max_new_tokens}: an answer needs at least 1 new token")
    from transformers import TextStreamer

    path = args.model or Path("models", args.recipe, args.stage)
    if args.model is None:
        outputs.require(path, args.stage, args.recipe)
    tokenizer = load_tokenizer(path)
    model = for_inference(load_model(path))
    context = chat_context(model, tokenizer)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    print(sampling_line("chat: answers", model, tokenizer, args.max_new_tokens, args.temperature))

    def answer(history: list[dict]) -> str:
        history = fit_history(tokenizer, history, context, args.max_new_tokens)
        return generate(
            model, tokenizer, [history], args.max_new_tokens, args.temperature, seed=args.seed, streamer=streamer
        )[0]

    if args.prompt is not None:
        print(f"you> {args.prompt}\nassistant> ", end="", flush=True)
        answer([{"role": "user", "content": args.prompt}])
        return
    print(f"chatting with {path} (/reset starts over, /quit leaves)")
    history: list[dict] = []
    while True:
        try:
            line = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):  # Ctrl-D or Ctrl-C at the prompt leaves
            print()
            return
        if line == "/quit":
            return
        if line == "/reset":
            history = []
            print("(conversation cleared)")
            continue
        if not line:
            continue
        print("assistant> ", end="", flush=True)
        try:
            reply = answer([*history, {"role": "user", "content": line}]).strip()
        except KeyboardInterrupt:  # Ctrl-C during an answer stops that answer only
            print("\n(stopped; that exchange is forgotten)")
            continue
        history += [{"role": "user", "content": line}, {"role": "assistant", "content": reply}]


if __name__ == "__main__":
    run(main)
