"""Chat templates: the Alpaca fallback, and one record of each kind rendered before a stage trains on the data.

Every stage sees a conversation through a chat template: SFT (TRL renders prompt and prompt + answer), the reward
model when its tokenizer has one (`rewards.encode_for_reward`), PPO's prompts (`ppo.tokenize_prompts`), and
`chat`/`eval`/`label`/`prepare` through `modeling.render_prompt`. A template can refuse a conversation (Gemma's
raises "System role not supported" on a system turn) and a tokenizer can ship none (GPT-2, base Llama/Qwen); TRL
then stops deep in its dataset preparation with a traceback. `check_renders` renders, before anything trains, the
first record of each sequence of roles in the data (a handful of renders) and turns a refusal or a missing
template into one line naming the file, the line and the fix.

`FALLBACK_TEMPLATE` is what `modeling.render_prompt` uses for a tokenizer without a template: the Alpaca format
of recipes/templates/alpaca.jinja (the gpt2-alpaca recipe's `chat_template_path`), so a base model is prompted in
the same format SFT teaches it (tests/test_templates.py checks the two render alike). The training stages do not
fall back silently: a template is part of what the model learns, so they ask for `chat_template_path`.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from .errors import UserError

# Keep in step with recipes/templates/alpaca.jinja (a test renders both): system text, then each user turn as an
# instruction, each assistant turn as a response closed by EOS, and the generation prompt.
FALLBACK_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
    "{% else %}{{ '### Response:\\n' + message['content'] + eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
)
ALPACA_PATH = "recipes/templates/alpaca.jinja"
CONVERSATION_FIELDS = ("prompt", "completion", "chosen", "rejected")


def apply_template_path(tokenizer, chat_template_path: str | None) -> None:
    """Gives the tokenizer a recipe's `chat_template_path` when it is a .jinja/.j2 file, as TRL's SFT and reward
    trainers do in their constructors, so the checks (and the reward stage's own encoding) see the template the
    trainer will use. A model folder or Hub id is left to TRL's `clone_chat_template`."""
    if not chat_template_path or not chat_template_path.endswith((".jinja", ".j2")):
        return
    if not Path(chat_template_path).is_file():
        raise UserError(f"chat_template_path {chat_template_path} does not exist: e.g. {ALPACA_PATH}")
    tokenizer.chat_template = Path(chat_template_path).read_text(encoding="utf-8")


class Encoded(NamedTuple):
    """A conversation's token ids as generation sees them (`encode_as_generated`)."""

    prompt_ids: list[int]  # the prompt with the generation prompt: exactly what generation is fed
    ids: list[int]  # the whole conversation; starts with prompt_ids unless how == "rendered"
    how: str  # "prefix", "split" or "rendered"
    merged: str  # the token of the whole text's own tokenization that spans the prompt's end ('' if none)


def encode_as_generated(tokenizer, prompt: list[dict], conversation: list[dict]) -> Encoded:
    """Token ids of `conversation` (prompt messages + the answer's) as generation sees them: the prompt's own ids,
    then the answer's. Used by SFT (`sft.completion_labels`) and the reward model (`rewards.encode_for_reward`), so
    what they train on is what chat, eval and PPO rollouts feed (`ppo.tokenize_prompts`: prompt ids + generated ids).

    how = "prefix": the prompt's ids (apply_chat_template with add_generation_prompt) are a prefix of the whole
    conversation's ids; ids are the latter, as TRL's SFTTrainer takes them. how = "split": they are not, because a
    SentencePiece-style tokenizer merges the prompt's last piece with the answer's first (Llama-2/Mistral's
    `▁[/INST]` + `Many` -> `▁[/INST]Many`, trl #598/#1183), but the conversation's text starts with the prompt's;
    ids are the prompt's ids + the rest of the text tokenized on its own (add_special_tokens=False), as LLaMA-Factory
    (its template's encode_multiturn) and OpenRLHF (SFTDataset) build them. how = "rendered": the text does not start
    with the prompt's (a template that renders a prompt differently when an answer follows); ids are the whole
    conversation's own tokenization and do not start with prompt_ids.
    """
    prompt_ids = list(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)["input_ids"])
    full_ids = list(tokenizer.apply_chat_template(conversation, tokenize=True)["input_ids"])
    if full_ids[: len(prompt_ids)] == prompt_ids:
        return Encoded(prompt_ids, full_ids, "prefix", "")
    pairs = enumerate(zip(prompt_ids, full_ids, strict=False))
    differs = next((i for i, (a, b) in pairs if a != b), min(len(prompt_ids), len(full_ids)))
    at_end = differs == len(prompt_ids) - 1 and differs < len(full_ids)
    merged = tokenizer.convert_ids_to_tokens(full_ids[differs]) if at_end else ""
    prompt_text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    full_text = tokenizer.apply_chat_template(conversation, tokenize=False)
    if not full_text.startswith(prompt_text):
        return Encoded(prompt_ids, full_ids, "rendered", merged)
    rest = tokenizer(full_text[len(prompt_text) :], add_special_tokens=False)["input_ids"]
    return Encoded(prompt_ids, prompt_ids + list(rest), "split", merged)


def renderings(row: dict, purpose: str) -> list[tuple[list[dict], bool]]:
    """The (conversation, add_generation_prompt) pairs a stage renders for one converted record.

    sft and kto: the prompt with the generation prompt and prompt + answer (as TRL's SFTTrainer and KTOTrainer
    tokenize them); reward: prompt + chosen and prompt + rejected (`rewards.encode_for_reward`); prompts: the
    prompt (PPO).
    """
    if purpose in ("sft", "kto"):
        return [(row["prompt"], True), (row["prompt"] + row["completion"], False)]
    if purpose == "reward":
        return [(row["prompt"] + row["chosen"], False), (row["prompt"] + row["rejected"], False)]
    return [(row["prompt"], True)]


def roles(row: dict) -> tuple:
    return tuple(tuple(m["role"] for m in row[key]) for key in CONVERSATION_FIELDS if row.get(key))


def check_renders(rows, tokenizer, model: str, purpose: str, sources: list[str], fix: str) -> None:
    """Renders the first record of each sequence of roles in `rows` (converted records: `data.load_splits`).

    `model` names the tokenizer in messages; `sources` are the files the rows came from (to name the record's
    line); `fix` says how to give the stage a template that takes the data (e.g. "set chat_template_path: ...").
    Raises UserError: the tokenizer has no chat template, or its template raises on a record.
    """
    seen = set()
    for row in rows:
        shape = roles(row)
        if shape in seen:
            continue
        seen.add(shape)
        if not tokenizer.chat_template:
            where = locate(row, sources, purpose)
            raise UserError(f"{where}: the tokenizer of {model} has no chat template for this conversation: {fix}")
        for conversation, generation_prompt in renderings(row, purpose):
            try:
                tokenizer.apply_chat_template(conversation, add_generation_prompt=generation_prompt, tokenize=False)
            except Exception as error:  # jinja2's TemplateError from raise_exception, or any error a template hits
                reason = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
                where = locate(row, sources, purpose)
                hint = "drop the system turn or " if "system" in reason.lower() else "change the data or "
                raise UserError(
                    f"{where}: the chat template of {model} refuses this conversation ({reason}): {hint}{fix}"
                ) from None


def _turns(row: dict) -> list:
    return [[(m["role"], m["content"]) for m in row[key]] for key in CONVERSATION_FIELDS if row.get(key)]


def locate(row: dict, sources: list[str], purpose: str) -> str:
    """'<file> line <n>' of the raw record `row` was converted from, searching `sources` in order (only called
    for an error, so reading a file again costs nothing in a run that works)."""
    from .data import _where, convert, join_accepted_rejected, load_records, seed_pair_files

    wanted = _turns(row)
    for source in filter(None, sources):
        try:
            seed_files = seed_pair_files(source)
            records = join_accepted_rejected(*seed_files, quiet=True) if seed_files else load_records(source)
            name = str(seed_files[0]) if seed_files else source
        except UserError:
            continue
        for index, record in enumerate(records):
            try:
                converted = convert([record], purpose, name)
            except UserError:
                continue
            if _turns(converted[0]) == wanted:
                return _where(name, record, index)
    return f"{sources[0]} (a record with roles {', '.join(r for turns in roles(row) for r in turns)})"


# Markers that name a chat template's family in a log line (first match wins).
TEMPLATE_FAMILIES = (
    ("<|im_start|>", "ChatML"),
    ("<|start_header_id|>", "Llama 3"),
    ("[INST]", "Llama 2/Mistral [INST]"),
    ("<start_of_turn>", "Gemma"),
    ("### Instruction", "Alpaca"),
)


def template_family(template: str | None) -> str:
    if not template:
        return "none"
    return next((name for marker, name in TEMPLATE_FAMILIES if marker in template), "custom")


def template_line(
    stage: str,
    tokenizer,
    source,
    chat_template_path: str | None = None,
    without: str = f"prompts render in the Alpaca fallback ({ALPACA_PATH})",
) -> str:
    """One line for a stage's log: which chat template it uses and where it came from (issue 23 R2: a recipe's
    template replaced SmolLM2's own ChatML without a word). Call it before `apply_template_path`; when
    `chat_template_path` replaces a template the model ships (an instruct model's), the line is a warning. `without`
    says what the stage does with a tokenizer that has no template."""
    own = tokenizer.chat_template
    if chat_template_path:
        if own and chat_template_path.endswith((".jinja", ".j2")) and Path(chat_template_path).is_file():
            replacing = Path(chat_template_path).read_text(encoding="utf-8")
            if replacing.strip() != own.strip():
                return (
                    f"{stage}: warning: chat_template_path {chat_template_path} ({template_family(replacing)}) "
                    f"replaces {source}'s own chat template ({template_family(own)}), which the model was trained on: "
                    "remove "
                    "chat_template_path from the recipe to keep the model's own"
                )
        return f"{stage}: chat template from chat_template_path {chat_template_path}"
    if own:
        return f"{stage}: chat template: {source}'s own ({template_family(own)})"
    return f"{stage}: chat template: none in {source}; {without}"
