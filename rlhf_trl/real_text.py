"""Real human-written text and a ground truth for it: the smollm2-135m recipe's data (`make data RECIPE=smollm2-135m`).

    python -m rlhf_trl.prepare --recipe smollm2-135m    # raw_dataset: chatterbot-corpus (the `real` extra)

The text: chatterbot-corpus 1.3.3's English conversations (BSD-3-Clause), written by people: each turn and the reply
that follows it is one record, the reply being the answer. Every prompt asks for a short answer, "<turn> Answer in at
most 6 words." (three phrasings, `LIMITS`), while the people's replies follow that only about half the time (their
median is 6 words, a quarter run past 12), so SFT on them learns to ignore the limit about as often, like the demo's
SFT data that closes politely only a quarter of the time.

The ground truth (`ground_truth_score`): an answer is good when it obeys the word limit its prompt states (at least 1
word, at most N), checked here in code and never shown to any model. A person who asked for at most 6 words holds the
same preference. The reward model learns it from pairs that the rule labels (`rule_pairs`), both sides human-written
replies to the same turn: one within the limit, one past it; where a turn has only short replies, the rejected side is
the short reply followed by a long reply to another turn, and where it has only long ones,
the chosen side is the long reply's first sentence when that sentence is within the limit.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

from .errors import UserError

SOURCE = "chatterbot-corpus"
LIMIT = 6
# How a prompt states the limit; `stated_limit` reads each back.
LIMITS = ("Answer in at most {n} words.", "Reply in {n} words or fewer.", "Use no more than {n} words.")
_LIMIT_PATTERN = re.compile(r"(?:at most|no more than) (\d+) words|(\d+) words or fewer")
_WORD = re.compile(r"[A-Za-z0-9]+(?:['’][A-Za-z]+)*")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def words(text: str) -> int:
    """Words as a person counts them: runs of letters or digits, with an apostrophe inside one word ("don't")."""
    return len(_WORD.findall(text))


def stated_limit(prompt: str) -> int | None:
    match = _LIMIT_PATTERN.search(prompt)
    return int(match.group(1) or match.group(2)) if match else None


def ground_truth_score(prompt: str, response: str) -> float:
    """1.0 when the answer obeys the word limit its prompt states (1 to N words), else 0.0 (also when no limit)."""
    limit = stated_limit(prompt)
    return float(limit is not None and 1 <= words(response) <= limit)


def corpus_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"raw_dataset {SOURCE} needs the chatterbot-corpus package: pip install -e '.[real]'")
    folder = Path(list(spec.submodule_search_locations)[0]) / "data" / "english"
    if not any(folder.glob("*.yml")):
        raise UserError(f"{folder} holds no conversations: pip install --force-reinstall chatterbot-corpus==1.3.3")
    return folder


def corpus_records(seed: int = 0) -> list[dict]:
    """Alpaca records (instruction, output) from every consecutive pair of turns, each prompt with one of the
    `LIMITS` phrasings (drawn per turn, so a turn's replies share their prompt)."""
    import yaml

    rng = random.Random(seed)
    records, phrasing = [], {}
    for path in sorted(corpus_dir().glob("*.yml")):
        try:
            conversations = yaml.safe_load(path.read_text(encoding="utf-8")).get("conversations") or []
        except (yaml.YAMLError, AttributeError) as error:
            raise UserError(f"{path} is not a chatterbot corpus file ({error}): reinstall chatterbot-corpus") from None
        for conversation in conversations:
            turns = [str(turn).strip() for turn in conversation if str(turn).strip()]
            for turn, reply in zip(turns, turns[1:], strict=False):
                if turn not in phrasing:
                    phrasing[turn] = rng.choice(LIMITS).format(n=LIMIT)
                records.append({"instruction": f"{turn} {phrasing[turn]}", "output": reply})
    return records


def first_sentence(text: str) -> str:
    return _SENTENCE_END.split(text.strip(), maxsplit=1)[0]


def rule_pairs(rows: list[dict], rng: random.Random) -> tuple[list[dict], dict]:
    """Preference pairs for one split's rows (prompt/completion), labeled by `ground_truth_score`: per prompt, each
    reply within the limit against each past it (at most 2 pairs per prompt), else the constructions of the module
    docstring. Returns (pairs, counts by how each pair was made)."""
    by_prompt: dict[str, list[str]] = {}
    prompts = {}
    for row in rows:
        text = row["prompt"][-1]["content"]
        prompts.setdefault(text, row["prompt"])
        answers = by_prompt.setdefault(text, [])
        if row["completion"][-1]["content"] not in answers:
            answers.append(row["completion"][-1]["content"])
    long_replies = [a for text, answers in by_prompt.items() for a in answers if not ground_truth_score(text, a)]
    pairs, counts = [], {"both_replies": 0, "short_plus_other_reply": 0, "first_sentence": 0, "no_pair": 0}
    for text, answers in by_prompt.items():
        good = [a for a in answers if ground_truth_score(text, a)]
        bad = [a for a in answers if not ground_truth_score(text, a) and words(a) > 0]
        made = []
        if good and bad:
            made = [(g, b, "both_replies") for g in good for b in bad][:2]
        elif good and long_replies:
            made = [(good[0], f"{good[0]} {rng.choice(long_replies)}", "short_plus_other_reply")]
        elif bad and ground_truth_score(text, first_sentence(bad[0])) and first_sentence(bad[0]) != bad[0]:
            made = [(first_sentence(bad[0]), bad[0], "first_sentence")]
        if not made:
            counts["no_pair"] += 1
        for chosen, rejected, how in made:
            counts[how] += 1
            pairs.append(
                {
                    "prompt": prompts[text],
                    "chosen": [{"role": "assistant", "content": chosen}],
                    "rejected": [{"role": "assistant", "content": rejected}],
                }
            )
    rng.shuffle(pairs)
    return pairs, counts
