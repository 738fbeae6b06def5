"""How a reward model sees a (prompt, answer): one encoding for training and for PPO, any tokenizer.

PPO (as TRL's PPOTrainer did) scores rollouts by running the reward model on the policy's own token ids and
reading `.score` off a decoder backbone. That rules out the seed project's design, a DistilBERT reward model
next to a GPT-2 policy. `CrossTokenizerReward` removes the restriction: it decodes each query and
response with the policy's tokenizer, re-encodes them with the reward model's tokenizer (through
`encode_for_reward`, the same function the reward stage trains with) and scores them
(`ppo_roles.reward_scores` calls it). When the reward model shares the policy's tokenizer and is a decoder,
PPO keeps the direct path, which costs nothing extra.

The prompt is never recovered from the query's token ids: stripping pad ids also strips every EOS inside a
multi-turn prompt when pad == EOS (GPT-2, Llama-2 and Mistral tokenizers under LoRA), and the reward model would
then score another text. Each prompt instead travels with its rollout as an index into the prompt dataset
(`ppo.tokenize_prompts` writes a `prompt_index` column); `ppo_trainer.PPOTrainer` hands every batch it draws to
`CrossTokenizerReward.expect`, and the scoring calls that follow take their conversations from it, in order.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import nn

from .errors import UserError
from .ppo_math import first_true_indices
from .templates import encode_as_generated


def prompt_text(messages: list[dict]) -> str:
    """A conversation as plain text for encoders: the user's words, earlier turns labelled by role."""
    if len(messages) == 1:
        return messages[0]["content"]
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def encode_for_reward(tokenizer, prompt: list[dict], answer: str, max_length: int | None = None) -> list[int]:
    """Token ids the reward model scores: its chat template when it has one, else a (prompt, answer) text pair.

    With a chat template the ids are the conversation as generation sees it (`templates.encode_as_generated`): the
    prompt's own ids, then the answer's. When the reward model shares the policy's tokenizer, PPO scores the rollout
    ids (prompt ids + generated ids) directly, so these must be those ids even where a SentencePiece tokenizer
    would merge the prompt's last piece with the answer's first (`▁[/INST]Many`).
    A text pair is what encoder classifiers (BERT, DistilBERT) were pretrained on: [CLS] prompt [SEP] answer [SEP].
    Truncation cuts the prompt first, because the answer is what is being judged.
    """
    if tokenizer.chat_template:
        conversation = prompt + [{"role": "assistant", "content": answer}]
        ids = encode_as_generated(tokenizer, prompt, conversation).ids
        # Templates such as ChatML add text after the end token ("<|im_end|>\n"); PPO cuts a rollout right after
        # it and reads the score there, so training must end at the same token.
        if tokenizer.eos_token_id in ids:
            ids = ids[: len(ids) - ids[::-1].index(tokenizer.eos_token_id)]
        return ids[-max_length:] if max_length else ids
    truncation = "only_first" if max_length else False
    try:
        return tokenizer(prompt_text(prompt), answer, truncation=truncation, max_length=max_length)["input_ids"]
    except Exception:  # the answer alone is longer than max_length: keep its beginning
        return tokenizer(prompt_text(prompt), answer, truncation="longest_first", max_length=max_length)["input_ids"]


def encode_pairs(tokenizer, pairs, max_length: int | None = None) -> tuple[list[dict], Counter]:
    """Each preference pair's `chosen_ids` / `rejected_ids` through `encode_for_reward`, without the pairs that
    compare nothing, and what happened to the pairs.

    `pairs` are converted records (prompt messages; chosen and rejected as messages, the answer being the last one).
    A pair whose two sides encode to the same ids (the same answer twice, a copy error or two labelers disagreeing;
    or answers that differ only past `max_length`, or in what the tokenizer normalizes away, such as case for an
    uncased WordPiece) scores a tie: it trains nothing (loss ln 2, zero gradient) and counts as a miss in pairwise
    accuracy, so a perfect reward model could not score 1 (OpenRLHF #1311, trlx PR #395). Such pairs are left out.
    Returns (kept pairs, each {"chosen_ids", "rejected_ids", "index"} with `index` its position in `pairs`; counts)
    where counts has "read", "identical" (same answer text), "identical_encoded" (different text, same ids) and
    "truncated" (kept pairs with a side cut to `max_length`).
    """
    kept, counts = [], Counter(read=0, identical=0, identical_encoded=0, truncated=0)
    for index, pair in enumerate(pairs):
        counts["read"] += 1
        answers = [pair[side][-1]["content"] for side in ("chosen", "rejected")]
        if answers[0] == answers[1]:
            counts["identical"] += 1
            continue
        # Encoded whole once; a side over max_length is encoded again with the truncation (which a slice would not
        # reproduce for encoder text pairs, cut from the prompt's side). Within max_length the two encodings agree.
        whole = [encode_for_reward(tokenizer, pair["prompt"], answer) for answer in answers]
        over = [bool(max_length) and len(side) > max_length for side in whole]
        ids = [
            encode_for_reward(tokenizer, pair["prompt"], answer, max_length) if cut else side
            for answer, side, cut in zip(answers, whole, over, strict=True)
        ]
        if ids[0] == ids[1]:
            counts["identical_encoded"] += 1
            continue
        if any(over):
            counts["truncated"] += 1
        kept.append({"chosen_ids": ids[0], "rejected_ids": ids[1], "index": index})
    return kept, counts


def describe_pairs(counts: Counter, max_length: int | None = None, mode: str = "keep_start") -> str:
    """One line for `encode_pairs`' counts: `20 read, 8 dropped (chosen == rejected), 12 kept`. DPO's counts
    (`dpo.usable_pairs`) may add "prompt_fills" (pairs dropped because the prompt alone fills max_length) and, with
    `mode` (truncation_mode) keep_end, "no_prompt" (kept pairs whose window holds no prompt token)."""
    kept = counts["read"] - counts["identical"] - counts["identical_encoded"] - counts["prompt_fills"]
    parts = [f"{counts['read']} read"]
    if counts["identical"]:
        parts.append(f"{counts['identical']} dropped (chosen == rejected)")
    if counts["prompt_fills"]:
        parts.append(f"{counts['prompt_fills']} dropped (the prompt alone fills max_length {max_length})")
    if counts["identical_encoded"]:
        cut = f" or truncation to max_length {max_length}" if max_length else ""
        cut += " keeping the end" if cut and mode == "keep_end" else ""
        parts.append(f"{counts['identical_encoded']} dropped (chosen and rejected identical after encoding{cut})")
    if counts["truncated"]:
        what = f"their last {max_length} tokens (truncation_mode keep_end)" if mode == "keep_end" else ""
        parts.append(f"{counts['truncated']} truncated to {what or f'max_length {max_length} tokens'}")
    if counts["no_prompt"]:
        parts.append(f"{counts['no_prompt']} of them with no prompt token left (the answers alone fill max_length)")
    return ", ".join([*parts, f"{kept} kept"])


@torch.no_grad()
def score_answers(
    model, tokenizer, prompts: list[list[dict]], answers: list[str], max_length: int | None = None, batch_size: int = 64
) -> list[float]:
    """The reward model's score of each (prompt messages, answer text), encoded by `encode_for_reward`."""
    device = next(model.parameters()).device
    scores: list[float] = []
    for start in range(0, len(answers), batch_size):
        encoded = [
            encode_for_reward(tokenizer, p, a, max_length)
            for p, a in zip(prompts[start : start + batch_size], answers[start : start + batch_size], strict=True)
        ]
        side, tokenizer.padding_side = tokenizer.padding_side, "right"
        batch = tokenizer.pad({"input_ids": encoded}, return_tensors="pt")
        tokenizer.padding_side = side
        logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
        scores.extend(logits[:, 0].float().tolist())
    return scores


def load_reward_classifier(path: str, kwargs: dict, tokenizer, what: str = "reward_model_path"):
    """Stage 2's output as a plain sequence classifier (one score per sequence, read from its `.score` head), padding
    with `tokenizer`'s pad id. A LoRA reward model is merged into its base; on a 4-bit base it stays a live
    adapter inside it (`modeling.load_model`: merging would round it into quantized weights)."""
    from transformers import AutoModelForSequenceClassification

    from .modeling import load_model

    model = load_model(
        path,
        AutoModelForSequenceClassification,
        {**kwargs, "num_labels": 1},
        what,
        live_adapter="quantization_config" in kwargs,
    )
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


def check_bridge(reward_tokenizer, texts: list[str], what: str = "the policy's prompts") -> None:
    """Raises UserError when `reward_tokenizer` cannot represent `texts`: a reward model with its own tokenizer
    scores each rollout re-encoded as text, and when most of that text becomes the unknown token (another alphabet,
    a vocabulary built for another language) it would score [UNK]s, not the answer. Over half the tokens unknown is
    refused; no re-encoding can bridge that."""
    unk = reward_tokenizer.unk_token_id
    if unk is None or not texts:
        return
    ids = [i for text in texts for i in reward_tokenizer(text, add_special_tokens=False)["input_ids"]]
    unknown = sum(i == unk for i in ids)
    if ids and unknown * 2 > len(ids):
        raise UserError(
            f"the reward model's tokenizer reads {unknown} of {len(ids)} tokens of {what} as its unknown token "
            f"{reward_tokenizer.unk_token}: it cannot score this policy's text; train the reward model on a tokenizer "
            "that covers it (make reward with model_name_or_path: the SFT model)"
        )


class RewardModelFunction:
    """The reward model as a TRL reward function: scores each (prompt, completion) through `score_answers`, the
    encoding the reward stage trained with (`encode_for_reward`), whatever the reward model's tokenizer.

    TRL 1.16's RLOOTrainer and GRPOTrainer call it with `prompts` (each the prompt's own messages, from the dataset:
    the conversation the policy saw, never recovered from token ids), `completions` (each `[{"role": "assistant",
    "content": text}]`, decoded without special tokens) and `completion_ids` (each the sampled ids, up to and
    including the first stop id). It returns one float per completion: the reward-model score, minus
    `missing_eos_penalty` for a completion that ran into the length limit without a stop id (PPO's rule, TRL 1.12's
    `missing_eos_penalty`: the chat template closes every answer, so a cut-off answer would otherwise score as if it
    had ended). TRL's own path for a reward model (`reward_processing_classes`) renders prompt and completion through
    the reward tokenizer's chat template as one text, which for an encoder such as DistilBERT (no template; trained on
    [CLS] prompt [SEP] answer [SEP]) fails or scores another encoding than the one trained.

    `tokens_generated` counts the completion tokens scored while `policy` (the model being trained) is in training
    mode, over every process (each call gathers the counts): the trainers also score the rollouts of their periodic
    evaluation (`eval_strategy`), sampled with the policy in eval mode, which are no training rollouts (PPO counts
    none either).
    """

    __name__ = "reward_model"  # TRL names the logged columns after it (rewards/reward_model/mean)

    def __init__(self, model, tokenizer, stop_ids: list[int], missing_eos_penalty: float | None = None,
                 max_length: int | None = None, policy=None):  # fmt: skip
        self.model, self.tokenizer, self.policy = model, tokenizer, policy
        self.stop_ids = set(stop_ids)
        self.missing_eos_penalty = missing_eos_penalty
        self.max_length = max_length
        self.tokens_generated = 0

    def __call__(self, prompts, completions, completion_ids, **kwargs) -> list[float]:
        answers = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        scores = score_answers(self.model, self.tokenizer, prompts, answers, self.max_length)
        if self.missing_eos_penalty:
            ended = [bool(self.stop_ids.intersection(ids)) for ids in completion_ids]
            scores = [s if end else s - self.missing_eos_penalty for s, end in zip(scores, ended, strict=True)]
        if self.policy is not None and not self.policy.training:
            return scores  # an evaluation's rollouts (TRL: mode "eval" when the policy is not training)
        from accelerate.utils import gather

        device = next(self.model.parameters()).device
        count = torch.tensor([sum(len(ids) for ids in completion_ids)], device=device)
        self.tokens_generated += int(gather(count).sum())
        return scores


def needs_cross_tokenizer(reward_model, reward_tokenizer, policy_tokenizer) -> bool:
    """True unless TRL's direct path applies: same vocabulary and template, and a decoder with `.score`."""
    same_tokens = reward_tokenizer.get_vocab() == policy_tokenizer.get_vocab()
    same_template = reward_tokenizer.chat_template == policy_tokenizer.chat_template
    return not (same_tokens and same_template and hasattr(reward_model, "score"))


class CrossTokenizerReward(nn.Module):
    """Scores policy rollouts with a reward model that has its own tokenizer (see the module docstring).

    `prompts[i]` is the conversation of prompt index i (what `ppo.tokenize_prompts` collects). Before rollouts are
    scored, `expect` receives the batch they come from; `get_reward` then takes that batch's rows in the order
    drawn, in as many calls as the trainer makes, and checks each row's query ids against the batch's.
    """

    def __init__(
        self, reward_model, reward_tokenizer, policy_tokenizer, prompts: list[list[dict]], max_length: int = 512
    ):
        super().__init__()
        self.reward_model = reward_model
        self.reward_tokenizer = reward_tokenizer
        self.policy_tokenizer = policy_tokenizer
        self.prompts = prompts
        self.max_length = max_length
        self._expected: list[tuple[list[int], list[dict]]] = []  # (left-padded query ids, conversation) per row

    @property
    def config(self):
        return self.reward_model.config

    def score(self, prompts: list[list[dict]], answers: list[str]) -> torch.Tensor:
        return torch.tensor(score_answers(self.reward_model, self.reward_tokenizer, prompts, answers, self.max_length))

    def expect(self, batch: dict) -> None:
        """The batch PPO has just drawn ([rows, query length] `input_ids`, [rows] `prompt_index`): the rows the
        next scoring calls are made for."""
        if "prompt_index" not in batch:
            raise RuntimeError("PPO batches need the prompt_index column ppo.tokenize_prompts writes")
        indices = batch["prompt_index"].tolist()
        self._expected = [(ids, self.prompts[i]) for ids, i in zip(batch["input_ids"].tolist(), indices, strict=True)]

    def conversations(self, queries: torch.Tensor) -> list[list[dict]]:
        """The conversations of the next `queries` rows of the expected batch ([rows, query length], left-padded)."""
        rows = queries.tolist()
        taken, self._expected = self._expected[: len(rows)], self._expected[len(rows) :]
        if len(taken) != len(rows) or any(ids != row for (ids, _), row in zip(taken, rows, strict=False)):
            # An internal error: scoring without the prompts' conversations would silently score other text.
            raise RuntimeError(
                "CrossTokenizerReward was asked to score rows that are not the next ones of the batch PPO drew"
            )
        return [conversation for _, conversation in taken]

    def get_reward(self, query_responses: torch.Tensor, pad_token_id: int, context_length: int):
        """(per-token logits [B, L, 1], final scores [B], sequence ends [B]): the contract of TRL 1.12's get_reward."""
        queries, responses = query_responses[:, :context_length], query_responses[:, context_length:]
        conversations = self.conversations(queries)
        answers = self.policy_tokenizer.batch_decode(responses, skip_special_tokens=True)
        scores = self.score(conversations, answers).to(query_responses.device)
        # TRL marks a response's last token as (index of the first pad) - 1, counted from the sequence start.
        sequence_lengths = first_true_indices(responses == pad_token_id) - 1 + context_length
        per_token = scores[:, None, None].expand(-1, query_responses.shape[1], 1)
        return per_token, scores, sequence_lengths
