"""The offline `demo` world: data, tokenizer, tiny base model and a ground-truth scorer, all made here.

    python -m rlhf_trl.prepare --recipe demo    # `make data`: writes data/processed/demo, models/demo/base

Why it exists: RLHF is only proven to work when something other than the learned reward model can say
that PPO made answers better. Here people "prefer" answers that stay on the asked-about subject and
close politely. The SFT data closes politely only a quarter of the time, so the SFT model mostly does
not; the preference pairs teach a reward model the rule; PPO should then raise the polite, on-topic
share. `ground_truth_score` checks that rule with plain string tests, independently of every model.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SUBJECTS = {
    "apple": ("red", "in an orchard"),
    "river": ("long", "in a valley"),
    "guitar": ("loud", "on a stage"),
    "lemon": ("sour", "in a kitchen"),
    "tiger": ("fast", "in a jungle"),
    "candle": ("warm", "on a table"),
    "bridge": ("strong", "over a river"),
    "cloud": ("white", "in the sky"),
    "violin": ("small", "in a concert"),
    "desert": ("dry", "far from the sea"),
    "castle": ("old", "on a hill"),
    "rocket": ("tall", "at a launch pad"),
    "garden": ("green", "behind a house"),
    "island": ("quiet", "in the ocean"),
    "pencil": ("thin", "in a desk"),
    "forest": ("dark", "in the north"),
    "dolphin": ("clever", "in the sea"),
    "library": ("calm", "in a town"),
    "mountain": ("high", "in the west"),
    "kettle": ("hot", "on a stove"),
    "planet": ("round", "in space"),
    "camera": ("black", "in a bag"),
    "harbor": ("busy", "by the coast"),
    "meadow": ("open", "near a farm"),
    "glacier": ("cold", "near the pole"),
    "lantern": ("bright", "in a tent"),
    "volcano": ("hot", "on an island"),
    "pillow": ("soft", "on a bed"),
    "compass": ("useful", "in a pocket"),
    "orchard": ("sweet", "in the country"),
    "rainbow": ("colorful", "after the rain"),
    "beehive": ("busy", "in a tree"),
    "telescope": ("long", "on a roof"),
    "waterfall": ("loud", "in the hills"),
    "lighthouse": ("tall", "on the shore"),
    "snowman": ("cold", "in a yard"),
}
INSTRUCTIONS = (
    "Tell me about the {s}.",
    "What is a {s}?",
    "Describe the {s}.",
    "Give me a fact about the {s}.",
    "What do you know about the {s}?",
    "Can you explain the {s}?",
)
BODIES = ("The {s} is {a}. It is often found {p}.", "A {s} is {a} and you can see it {p}.")
POLITE_CLOSING = " I hope this helps!"
CURT_CLOSING = " That is all."
# Phrasings that only SFT data and the held-out evaluation prompts use: reward-model pairs and PPO
# prompts never do, so the final score is measured on prompts neither of them saw.
HELD_OUT_INSTRUCTIONS = ("What do you know about the {s}?", "Can you explain the {s}?")

# A chat template with no newline after the end token, so the reward is read at the end token both
# when the reward model is trained and when PPO scores a rollout.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>' + message['content'] + '\n' }}"
    "{% else %}{{ '<|assistant|>' + message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|pad|>", "<|end|>", "<|user|>", "<|assistant|>"]


def mentioned_subject(text: str) -> str | None:
    words = {w.strip(".,!?").lower() for w in text.split()}
    return next((s for s in SUBJECTS if s in words), None)


def ground_truth_score(prompt: str, response: str) -> float:
    """1.0 when the answer is a well-formed polite answer about the prompt's subject, else 0.0.

    Well-formed: names the prompt's subject and no other, states that subject's fact (its adjective),
    and closes with the polite phrase exactly once, at the end. Repeating the closing or dropping the
    fact (what a reward-hacking policy does) scores 0.
    """
    subject = mentioned_subject(prompt)
    if subject is None:
        return 0.0
    words = {w.strip(".,!?").lower() for w in response.split()}
    on_topic = subject in words and not (words & (set(SUBJECTS) - {subject}))
    states_fact = SUBJECTS[subject][0] in words
    closing = POLITE_CLOSING.strip()
    polite = response.rstrip().endswith(closing) and response.count(closing) == 1
    return float(on_topic and states_fact and polite)


def corrupt(answer: str, rng: random.Random) -> str:
    """A degenerate variant of a polite answer: the fact cut short, or the closing repeated."""
    body = answer[: -len(POLITE_CLOSING)]
    if rng.random() < 0.5:
        return " ".join(body.split()[:2]) + POLITE_CLOSING
    return body + POLITE_CLOSING * 2


def _answer(subject: str, rng: random.Random) -> str:
    adjective, place = SUBJECTS[subject]
    return rng.choice(BODIES).format(s=subject, a=adjective, p=place)


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def make_records(seed: int = 0, sft_size: int = 3000, pairs_size: int = 2000) -> dict[str, list[dict]]:
    """All demo splits, deterministic for a seed."""
    rng = random.Random(seed)
    subjects = list(SUBJECTS)
    seen_instructions = [i for i in INSTRUCTIONS if i not in HELD_OUT_INSTRUCTIONS]

    def prompt_for(instructions) -> tuple[str, str]:
        subject = rng.choice(subjects)
        return subject, rng.choice(instructions).format(s=subject)

    def sft_example(instructions):
        subject, prompt = prompt_for(instructions)
        closing = rng.choices([POLITE_CLOSING, CURT_CLOSING, ""], weights=[1, 1, 2])[0]
        return {"prompt": _user(prompt), "completion": _assistant(_answer(subject, rng) + closing)}

    def pair(instructions):
        subject, prompt = prompt_for(instructions)
        body = _answer(subject, rng)
        kind = rng.random()
        if kind < 0.4:  # style: polite beats curt or silent
            chosen, rejected = body + POLITE_CLOSING, body + rng.choice([CURT_CLOSING, ""])
        elif kind < 0.6:  # topic: on-topic beats off-topic, with the same closing
            other = rng.choice([s for s in subjects if s != subject])
            closing = rng.choice([POLITE_CLOSING, CURT_CLOSING, ""])
            chosen, rejected = body + closing, _answer(other, rng) + closing
        elif kind < 0.8:  # fact: the subject's own adjective beats another subject's
            closing = rng.choice([POLITE_CLOSING, CURT_CLOSING, ""])
            wrong = SUBJECTS[rng.choice([s for s in subjects if SUBJECTS[s][0] != SUBJECTS[subject][0]])][0]
            chosen, rejected = body + closing, body.replace(f" {SUBJECTS[subject][0]}", f" {wrong}", 1) + closing
        else:  # form: a whole answer beats a degenerate one (the corruption documented in `corrupt`)
            chosen = body + rng.choice([POLITE_CLOSING, CURT_CLOSING, ""])
            rejected = corrupt(body + POLITE_CLOSING, rng)
        return {"prompt": _user(prompt), "chosen": _assistant(chosen), "rejected": _assistant(rejected)}

    return {
        "sft_train": [sft_example(INSTRUCTIONS) for _ in range(sft_size)],
        "sft_eval": [sft_example(INSTRUCTIONS) for _ in range(200)],
        "pairs_train": [pair(seen_instructions) for _ in range(pairs_size)],
        "pairs_eval": [pair(HELD_OUT_INSTRUCTIONS) for _ in range(200)],
        "prompts_train": [{"prompt": _user(prompt_for(seen_instructions)[1])} for _ in range(1024)],
        "prompts_eval": [{"prompt": _user(prompt_for(HELD_OUT_INSTRUCTIONS)[1])} for _ in range(64)],
    }


def write_data(out_dir: Path, seed: int = 0) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for split, records in make_records(seed).items():
        path = out_dir / f"{split}.jsonl"
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        tmp.replace(path)
        written.append(path)
    return written


def corpus(records: dict[str, list[dict]]) -> list[str]:
    texts = []
    for rows in records.values():
        for row in rows:
            for key in ("prompt", "completion", "chosen", "rejected"):
                texts.extend(m["content"] for m in row.get(key, []))
    return texts


def build_tokenizer(texts: list[str], vocab_size: int = 512):
    """A byte-level BPE trained on the demo corpus, so any typed text still encodes (no unknown tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<|pad|>", eos_token="<|end|>", model_max_length=128
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_base_model(tokenizer, seed: int = 0, hidden_size: int = 64, layers: int = 2):
    """A randomly initialised Llama-architecture causal LM, small enough to train on two CPU cores."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model
