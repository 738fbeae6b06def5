"""The web page for people: chat with any stage, a blind A/B arena, labeling and the report (Gradio).

    python -m rlhf_trl.ui --recipe demo [--host 127.0.0.1] [--port 7860] [--auth user:password]
    make ui RECIPE=demo [PORT=7860] [HOST=0.0.0.0] [ARGS="--auth alice:secret"]

Four tabs, all on the stage outputs in models/<recipe>/ (every finished stage but the reward model):
- Chat: answers stream token by token (transformers' TextIteratorStreamer through `modeling.generate`, the
  helper `make chat` uses) through the model's own chat template; the generation settings start at the
  recipe's (`temperature` and `response_length` of recipes/<recipe>/ppo.yaml) and can be changed.
- Arena: a held-out prompt (prompts_eval.jsonl), one answer from each of two stages in random order, names
  hidden; the two stages are drawn at random among the finished ones (export, a merged copy, only by name), or
  are the ones the person picks. The person picks A, B, tie or both bad and only then sees which was which.
  Each vote is a decision in the labels folder's log (`source: arena`), fsync'd before the page answers, so a
  server killed while people vote loses at most the vote on screen. The running human win rate of each pair and
  its Wilson 95% interval are shown (`labels.human_verdicts`, which `make report` prints too).
- Label: `make label`'s pairwise and K-way labeling (`source: web`), through the same store and sampler
  (`rlhf_trl.labels`), with the terminal tool's settings, so both show a labeler the same answers.
- Report: the human leaderboard of the votes as they are now (`rlhf_trl.leaderboard`: Bradley-Terry ratings,
  win rates against SFT, position bias, labeler agreement), then the recipe's latest report.md from
  `make report`, with its plots.

Fast for people: keys vote (Arena: 1 / 2 / 3 / 4 for A / B / tie / both bad, N the next prompt; Label: 1-4 an
answer, T, Y, R, S, U, N), bound by a script Gradio runs on the page (`keys_js`); each tab counts what this
labeler has done and what is left; recipes/<recipe>/guidelines.md, when it exists, is shown in a panel
(--guidelines FILE for another; a file that is not UTF-8 is refused at start-up).

Several people at once: one process holds the labels folder (its file lock: `make label` waits for the page
to stop), writes are serialised, and a (prompt, labeler) pair shown in one browser is not handed to another
browser of the same labeler until it is voted on. Generation is serialised too (one seed at a time).
Safety: it binds to 127.0.0.1 unless --host says otherwise; --auth user:password is Gradio's own login.
Without it, anyone who can reach the port can chat, vote and label under any name. Labeler names are
checked (`labels.check_labeler`); what a visitor types reaches only models and the decision log, never a
shell or a path: stages are picked from the finished ones by name.
"""

from __future__ import annotations

import argparse
import base64
import errno
import itertools
import json
import os
import random
import re
import socket
import threading
import uuid
from collections.abc import Callable
from pathlib import Path

from . import labels, leaderboard, outputs
from .errors import UserError, run

DEFAULT_PORT = 7860
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
# Stage outputs that answer prompts (chat, arena): the labels' pipeline order plus the merged export.
GENERATING = (*labels.STAGE_ORDER, "export")
ARENA_CHOICES = ("a", "b", "tie", "both bad")
STALE_HUMAN_SECTION = re.compile(r"^## Human (?:leaderboard|verdict) \(arena\)\n.*?(?=^## |\Z)", re.S | re.M)
RANDOM = "(random)"  # the arena's stage choice that draws a stage at random among the finished ones
# Keys that press the visible tab's buttons (`keys_js`): the arena's 1-4 and N, the Label tab's 1-4 (answers A-D),
# T, Y, R, S, U and N. Keys typed into a text box stay text.
ARENA_KEYS = {"1": "vote-a", "2": "vote-b", "3": "vote-tie", "4": "vote-both-bad", "n": "arena-next"}
LABEL_KEYS_PRESSED = {
    "1": "label-key-a", "2": "label-key-b", "3": "label-key-c", "4": "label-key-d", "t": "label-key-t",
    "y": "label-key-y", "r": "label-key-n", "s": "label-key-s", "u": "label-undo", "n": "label-next",
}  # fmt: skip
LABEL_KEYS = {"A": "a", "B": "b", "C": "c", "D": "d", "tie": "t", "accept all": "y", "reject all": "n", "skip": "s"}


def check_port(host: str, port: int) -> None:
    """UserError naming the port when something already listens on it (checked before the slow start)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except socket.gaierror as error:  # a name that resolves to nothing: no port is at fault
            raise UserError(
                f"HOST={host} is not an address of this machine ({error.strerror}): use HOST=127.0.0.1 (this machine "
                "only) or HOST=0.0.0.0 (every network it is on)"
            ) from None
        except OSError as error:
            if error.errno == errno.EADDRNOTAVAIL:
                raise UserError(
                    f"HOST={host} is not an address of this machine: use HOST=127.0.0.1 or HOST=0.0.0.0"
                ) from None
            raise UserError(
                f"port {port} on {host} is already in use ({error.strerror}): stop what uses it, "
                f"or pick another port with PORT= (make ui PORT={port + 1})"
            ) from None


def parse_auth(value: str | None) -> tuple[str, str] | None:
    if value is None:
        return None
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise UserError('--auth takes user:password, e.g. ARGS="--auth alice:a-long-secret"')
    return user, password


def read_guidelines(path: Path, given: bool = False) -> str:
    """The labeling guidelines the page shows (markdown), "" when the recipe has none; UserError, one line, when the
    file is not UTF-8 text, or when `given` (--guidelines) and it does not exist. Read before anything is written."""
    if not path.is_file():
        if given:
            raise UserError(f"guidelines file {path} does not exist: pass an existing markdown file to --guidelines")
        return ""
    try:
        return path.read_text(encoding="utf-8-sig").strip()  # a BOM (some editors write one) is not text
    except UnicodeDecodeError as error:
        raise UserError(
            f"guidelines file {path} is not UTF-8 text (byte {error.start}: {error.reason}): save it as UTF-8 "
            "(e.g. `iconv -f latin1 -t utf-8`), or remove it"
        ) from None


def keys_js() -> str:
    """The page's keyboard voting (Gradio runs it once the page has loaded): a key press clicks the button of the
    tab on screen (ARENA_KEYS, LABEL_KEYS_PRESSED), unless it is typed into a text box or comes with Ctrl, Alt or
    Meta; Escape leaves a text box, so the keys work after typing your name."""
    table = json.dumps([ARENA_KEYS, LABEL_KEYS_PRESSED])
    return (
        "() => {\n"
        f"  const tables = {table};\n"
        "  document.addEventListener('keydown', (event) => {\n"
        "    const target = event.target;\n"
        "    const boxes = ['INPUT', 'TEXTAREA', 'SELECT'];\n"
        "    const typing = target && (target.isContentEditable || boxes.includes(target.tagName));\n"
        "    if (typing) { if (event.key === 'Escape') target.blur(); return; }\n"
        "    if (event.ctrlKey || event.altKey || event.metaKey || event.repeat) return;\n"
        "    for (const keys of tables) {\n"
        "      const id = keys[event.key.toLowerCase()];\n"
        "      const button = id && document.getElementById(id);\n"
        "      if (button && button.offsetParent !== null && !button.disabled) {\n"
        "        event.preventDefault();\n"
        "        button.click();\n"
        "        return;\n"
        "      }\n"
        "    }\n"
        "  });\n"
        "}"
    )


def recipe_settings(recipe: str) -> dict:
    """The recipe's sampling settings: PPO's temperature and response_length (what PPO trained with)."""
    import yaml

    path = Path("recipes", recipe, "ppo.yaml")
    config = {}
    if path.is_file():
        config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    return {
        "temperature": float(config.get("temperature", 0.7)),
        "max_new_tokens": int(config.get("response_length", 64)),
    }


def text_of(content) -> str:
    """A chat message's text, whether Gradio hands it back as a string or as content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text") or content.get("value") or "")
    if isinstance(content, list | tuple):
        return "".join(text_of(part) for part in content)
    return ""


class Site:
    """What the page serves: the recipe's stage outputs, prompts, labels folder and report, and the models."""

    def __init__(self, args):
        self.recipe = args.recipe
        self.models = Path(args.models or Path("models", args.recipe))
        self.data = Path(args.data or Path("data", "processed", args.recipe))
        self.report = self.models / "report"
        self.settings = {**recipe_settings(args.recipe), "seed": args.seed}
        if args.max_new_tokens is not None:
            self.settings["max_new_tokens"] = args.max_new_tokens
        if args.temperature is not None:
            self.settings["temperature"] = args.temperature
        guidelines = getattr(args, "guidelines", None)
        self.guidelines = read_guidelines(guidelines or Path("recipes", args.recipe, "guidelines.md"), bool(guidelines))
        self.label_settings = dict(labels.LABEL_SETTINGS)
        if args.label_max_new_tokens is not None:
            self.label_settings["max_new_tokens"] = args.label_max_new_tokens
        self.store = labels.LabelStore(args.out or Path("data", "labels", args.recipe))
        self.mutex = threading.Lock()  # the samplers dict and the reservations
        self.generating = threading.Lock()  # one generation at a time: torch's seed is global
        self.samplers: dict[str, labels.Sampler] = {}
        self.showing: dict[tuple, str] = {}  # (labeler, task, prompt_id) -> the browser session showing it

    # ------------------------------------------------------------------ what exists

    def stages(self) -> list[str]:
        """Finished stage outputs that generate (base, sft, the methods, export), in pipeline order: not the reward
        model, nor `make compare`'s folder (its marker says stage compare)."""
        found = []
        if self.models.is_dir():
            for folder in self.models.iterdir():
                marker = outputs.read_marker(folder) if folder.is_dir() else None
                if marker is not None and marker.get("stage", folder.name) in GENERATING and folder.name != "reward":
                    found.append(folder.name)
        return sorted(found, key=labels.stage_rank)

    def stage(self, name) -> str:
        """A stage a visitor picked, checked against the finished ones (never used as a path as given)."""
        stages = self.stages()
        if name not in stages:
            raise ValueError(f"no finished stage {name!r} here: pick one of {', '.join(stages) or 'none'}")
        return name

    def make_hint(self, target: str) -> str:
        return f"`make {target} RECIPE={self.recipe}`"

    def chat_status(self) -> str:
        if not self.stages():
            return f"No model to chat with yet: run {self.make_hint('sft')} first (then {self.make_hint('ppo')})."
        return ""

    def arena_status(self) -> str:
        stages = self.stages()
        if not (self.data / "prompts_eval.jsonl").is_file():
            return f"No held-out prompts yet ({self.data / 'prompts_eval.jsonl'}): run {self.make_hint('data')} first."
        if not stages:
            return f"The arena compares two stages and none is finished: run {self.make_hint('sft')} first."
        if len(stages) < 2:
            return f"The arena compares two stages and only {stages[0]} is finished: run {self.make_hint('ppo')} first."
        return ""

    def label_status(self) -> str:
        if not (self.data / "prompts_train.jsonl").is_file():
            return f"No prompts to label yet ({self.data / 'prompts_train.jsonl'}): run {self.make_hint('data')} first."
        if not self.stages():
            return f"No model to answer yet: run {self.make_hint('sft')} first."
        return ""

    # ------------------------------------------------------------------ models

    def sampler(self, stage: str) -> labels.Sampler:
        """The stage's model, loaded again when the stage was retrained since (`outputs.run_id`)."""
        from .modeling import sampling_line

        with self.mutex:
            cached = self.samplers.get(stage)
            if cached is None or cached.run != outputs.run_id(self.models / stage):
                sampler = labels.Sampler(self.models / stage, 1, 1, 1.0, 0, announce=False)  # `sample` sets these
                for where, settings in (("arena", self.settings), ("Label tab", self.label_settings)):
                    line = sampling_line(f"ui: {stage} answers in the {where}", sampler.model, sampler.tokenizer,
                                         settings["max_new_tokens"], settings["temperature"])  # fmt: skip
                    print(line)
                self.samplers[stage] = sampler
            return self.samplers[stage]

    def stream_chat(self, stage: str, turns: list[dict], max_new_tokens: int, temperature: float, seed: int):
        """Yields the growing answer text, streamed from `modeling.generate` (what `make chat` calls)."""
        from transformers import TextIteratorStreamer

        from .chat import chat_context, fit_history
        from .modeling import generate

        sampler = self.sampler(stage)
        model, tokenizer = sampler.model, sampler.tokenizer
        turns = fit_history(tokenizer, turns, chat_context(model, tokenizer), max_new_tokens)
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)
        failure: list[BaseException] = []

        def work():
            with self.generating:
                try:
                    generate(model, tokenizer, [turns], max_new_tokens, temperature, seed=seed, streamer=streamer)
                except BaseException as error:  # handed to the page below, after the stream ends
                    failure.append(error)
                    streamer.end()

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        text = ""
        for piece in streamer:
            text += piece
            yield text
        thread.join()
        if failure:
            raise failure[0]

    def sample(self, stage: str, item: dict, count: int, settings: dict) -> dict:
        sampler = self.sampler(stage).with_settings(count, settings["max_new_tokens"], settings["temperature"])
        sampler.seed = settings["seed"]
        with self.generating:
            return {**sampler.answers(item), "stage": stage}

    # ------------------------------------------------------------------ handing out prompts

    def next_item(self, items: list[dict], done: set[str], key: tuple, session: str) -> dict | None:
        """The first item not `done` and not shown to this labeler in another browser; reserved for `session`.

        `key` is (labeler, task, ...): what this session had reserved for the same key is released first.
        """
        with self.mutex:
            self._release(session, key)
            for item in items:
                if item["prompt_id"] in done or self.showing.get((*key, item["prompt_id"]), session) != session:
                    continue
                self.showing[(*key, item["prompt_id"])] = session
                return item
        return None

    def _release(self, session: str, key: tuple) -> None:
        for reserved in [k for k, owner in self.showing.items() if owner == session and k[: len(key)] == key]:
            del self.showing[reserved]

    def record_once(self, decision: dict, earlier: Callable[[], list[dict]], key: tuple, session: str) -> None:
        """Records `decision` unless one of `earlier()` (the labeler's decisions, read under the same lock as the
        write) already decided its prompt: a second click, or a second browser, never records the same (prompt,
        labeler) twice. Releases the reservation."""
        with self.mutex:
            if any(d["prompt_id"] == decision["prompt_id"] for d in earlier()):
                raise ValueError("you already decided on this prompt; press Next prompt")
            self.store.record([decision])
            self._release(session, key)

    # ------------------------------------------------------------------ arena

    def arena_pairs(self, first: str, second: str) -> list[list[str]]:
        """The pairs of stages (each sorted) the arena may draw for the two choices: RANDOM draws among the finished
        stages but export (`make merge`'s copy of a stage, which answers as that stage does: pick it by name);
        ValueError (said on the page) for a stage that is not finished or the same stage twice."""
        fixed = [self.stage(choice) for choice in (first, second) if choice != RANDOM]
        drawn = [stage for stage in self.stages() if stage != "export"]
        if len(fixed) == 2:
            if fixed[0] == fixed[1]:
                raise ValueError("pick two different stages to compare")
            pairs = [fixed]
        elif fixed:
            pairs = [[fixed[0], other] for other in drawn if other != fixed[0]]
        else:
            pairs = [list(pair) for pair in itertools.combinations(drawn, 2)]
        if not pairs:  # one stage besides export: the random draw leaves export out
            against = f"against {fixed[0]}" if fixed else "from"
            raise ValueError(f"no other finished stage to draw {against} at random: pick both stages by name")
        return [sorted(pair) for pair in pairs]

    def arena_next(self, labeler: str, first: str, second: str, session: str) -> dict:
        """The next arena item for `labeler`: a pair of stages drawn at random among `arena_pairs` (those with a
        prompt left for this labeler), its answers in random order; raises ValueError (said on the page) for a bad
        name or stage, and returns {"done": N} when none is left."""
        labeler = labels.check_labeler(labeler)
        status = self.arena_status()
        if status:
            raise ValueError(status)
        pairs = self.arena_pairs(first, second)
        items = labels.read_prompts(self.data / "prompts_eval.jsonl")
        draw = random.SystemRandom()
        draw.shuffle(pairs)
        with self.mutex:
            self._release(session, (labeler, "arena"))  # the pair this browser was shown before, whichever
        for pair in pairs:
            done = {d["prompt_id"] for d in self.arena_votes(labeler, pair)}
            item = self.next_item(items, done, (labeler, "arena", *pair), session)
            if item is not None:
                break
        else:
            return {"done": len(items), "pairs": len(pairs)}
        shown = [self.sample(stage, item, 1, self.settings) for stage in pair]
        draw.shuffle(shown)
        return labels.arena_item(item, shown)

    def arena_progress(self, labeler: str, first: str, second: str) -> str:
        """How many arena votes `labeler` has cast on the pairs the choices draw from, and how many are left
        ("" until the name and stages are valid)."""
        try:
            labeler = labels.check_labeler(labeler)
            pairs = self.arena_pairs(first, second)
            prompts = {item["prompt_id"] for item in labels.read_prompts(self.data / "prompts_eval.jsonl")}
        except (ValueError, UserError):
            return ""
        done = [{d["prompt_id"] for d in self.arena_votes(labeler, pair)} for pair in pairs]
        left = sum(len(prompts - ids) for ids in done)
        # Blind: a random draw is not named (the pair would say which two stages these answers come from).
        which = "stages drawn at random" if RANDOM in (first, second) else f"{first.upper()} vs {second.upper()}"
        return f"**{labeler}**: {sum(map(len, done))} voted · {left} left ({which})"

    def arena_vote(self, item: dict, labeler: str, choice: str, session: str) -> dict:
        decision = labels.arena_vote(item, labeler, choice)
        pair = sorted(item["stages"])
        self.record_once(decision, lambda: self.arena_votes(labeler, pair), (labeler, "arena", *pair), session)
        return decision

    def arena_votes(self, labeler: str, pair: list[str]) -> list[dict]:
        """`labeler`'s arena votes on the pair of stages `pair` (sorted), on the runs they hold now: a retrained
        stage is offered again to whoever judged the one before (`labels.current_votes`)."""
        votes = [d for d in self.store.by(labeler, arena=True) if sorted(d.get("stages", ())) == pair]
        return labels.current_votes(votes, labels.stage_runs(self.models))[0]

    def label(self, item: dict, key: str, session: str) -> dict:
        """Records a Label-tab decision for a key of `labels.decision_for_key`; ValueError when it does not fit."""
        choice = labels.decision_for_key(key, len(item["responses"]))
        if choice is None:
            raise ValueError(f"there are only {len(item['responses'])} answers")
        decision = labels.new_decision(item, item["labeler"], *choice, source="web")
        labeler = item["labeler"]
        self.record_once(decision, lambda: self.store.by(labeler), (labeler, "label"), session)
        return decision

    def current_votes(self) -> tuple[list[dict], int]:
        """(the decisions, arena votes on the runs on disk only; how many votes on earlier runs were left out)."""
        return labels.current_votes(self.store.all(), labels.stage_runs(self.models))

    def verdict_lines(self) -> list[str]:
        votes, older = self.current_votes()
        lines = [labels.verdict_line(v) for v in labels.human_verdicts(votes)]
        return lines + ([labels.older_votes_line(older)] if older else [])

    def leaderboard_markdown(self) -> str:
        """The human leaderboard of the votes as they are now (`leaderboard.section`, what `make report` writes)."""
        votes, older = self.current_votes()
        lines = leaderboard.section(leaderboard.leaderboard(votes), older, labels.human_verdicts(votes))
        if not lines:
            return "## Human leaderboard (arena)\n\nNo arena votes yet: it shows once people vote in the Arena tab."
        return "\n".join(lines)

    # ------------------------------------------------------------------ label

    def label_next(self, labeler: str, stage: str, count: int, session: str) -> dict | None:
        labeler = labels.check_labeler(labeler)
        stage = self.stage(stage)
        status = self.label_status()
        if status:
            raise ValueError(status)
        if not 1 <= count <= len(labels.LETTERS):
            raise ValueError(f"label 1 to {len(labels.LETTERS)} answers at a time")
        items = labels.read_prompts(self.data / "prompts_train.jsonl")
        done = {d["prompt_id"] for d in self.store.by(labeler)}
        item = self.next_item(items, done, (labeler, "label"), session)
        if item is None:
            return None
        return self.sample(stage, item, count, self.label_settings)

    def label_progress(self, labeler: str) -> str:
        """How many prompts `labeler` has labeled (any tool) and how many are left ("" until the name is valid)."""
        try:
            labeler = labels.check_labeler(labeler)
            prompts = {item["prompt_id"] for item in labels.read_prompts(self.data / "prompts_train.jsonl")}
        except (ValueError, UserError):
            return ""
        done = {d["prompt_id"] for d in self.store.by(labeler)}
        return f"**{labeler}**: {len(done)} labeled · {len(prompts - done)} left"

    # ------------------------------------------------------------------ report

    def report_markdown(self) -> str:
        """The live human leaderboard, then report.md (without the leaderboard it was written with) with its plots
        inlined (data: URIs), so no file path is served."""
        live = self.leaderboard_markdown()
        page = self.report / "report.md"
        if not page.is_file():
            return f"{live}\n\nNo report yet: run {self.make_hint('report')} first ({page} does not exist)."
        # The report's own leaderboard counted the votes when it was written; the live one above replaces it.
        text = live + "\n\n" + STALE_HUMAN_SECTION.sub("", page.read_text(encoding="utf-8"))

        def inline(match: re.Match) -> str:
            name = match.group(2)
            image = self.report / name
            if "/" in name or not image.is_file():
                return match.group(0)
            data = base64.b64encode(image.read_bytes()).decode()
            return f"![{match.group(1)}](data:image/png;base64,{data})"

        return re.sub(r"!\[([^\]]*)\]\(([^)\s]+\.png)\)", inline, text)


# ---------------------------------------------------------------------------------------------- the page


def arena_reveal(item: dict, decision: dict) -> str:
    said = {"prefer": f"you preferred {'AB'[decision.get('preferred', 0)]}", "tie": "you called it a tie"}
    said = said.get(decision["decision"], "you found both bad")
    sides = ", ".join(f"{'AB'[i]} was **{stage.upper()}**" for i, stage in enumerate(item["stages"]))
    return f"Saved: {said}. {sides}."


def build(site: Site):
    import gradio as gr

    def warn(error: Exception) -> str:
        return f"**Not done:** {error}"

    with gr.Blocks(title=f"rlhf-trl: {site.recipe}") as page:
        gr.Markdown(f"# rlhf-trl · recipe `{site.recipe}`")
        info = gr.Markdown(elem_id="site-info")
        labeler = gr.Textbox(
            label="Your name (labeler)",
            placeholder="e.g. alice",
            max_lines=1,
            elem_id="labeler",
            info="Recorded with every vote and label: letters, digits, spaces and . _ @ + -, "
            f"at most {labels.MAX_LABELER} characters.",
        )
        session = gr.State(lambda: uuid.uuid4().hex)
        if site.guidelines:  # recipes/<recipe>/guidelines.md: what a good answer is, for every labeler alike
            with gr.Accordion("Labeling guidelines", open=False, elem_id="guidelines"):
                gr.Markdown(site.guidelines, elem_id="guidelines-text")
        with gr.Tabs():
            # ---------------------------------------------------------------- chat
            with gr.Tab("Chat", elem_id="tab-chat"):
                chat_status = gr.Markdown(elem_id="chat-status")
                chat_stage = gr.Dropdown(label="Stage", choices=[], elem_id="chat-stage", interactive=True)
                chatbot = gr.Chatbot(elem_id="chatbot", render_markdown=False, height=360)
                message = gr.Textbox(label="Message", elem_id="chat-input", max_lines=4)
                with gr.Row():
                    send = gr.Button("Send", variant="primary", elem_id="chat-send")
                    reset = gr.Button("Reset conversation", elem_id="chat-reset")
                with gr.Accordion("Generation settings", open=False):
                    max_new = gr.Slider(1, 512, value=site.settings["max_new_tokens"], step=1, label="max new tokens")
                    temperature = gr.Slider(
                        0.0, 2.0, value=site.settings["temperature"], step=0.05, label="temperature (0: greedy)"
                    )
                    seed = gr.Number(value=site.settings["seed"], precision=0, label="seed")

                def chat(text, history, stage, max_new_tokens, temp, seed_value):
                    history = list(history or [])
                    if not str(text or "").strip():
                        yield history, ""
                        return
                    try:
                        stage = site.stage(stage)
                    except ValueError as error:
                        raise gr.Error(str(error)) from None
                    turns = [{"role": m["role"], "content": text_of(m["content"])} for m in history]
                    turns.append({"role": "user", "content": str(text)})
                    shown = [*history, {"role": "user", "content": str(text)}, {"role": "assistant", "content": ""}]
                    try:
                        for answer in site.stream_chat(stage, turns, int(max_new_tokens), float(temp), int(seed_value)):
                            shown[-1] = {"role": "assistant", "content": answer}
                            yield shown, ""
                    except UserError as error:
                        raise gr.Error(str(error)) from None

                chat_inputs = [message, chatbot, chat_stage, max_new, temperature, seed]
                send.click(chat, chat_inputs, [chatbot, message])
                message.submit(chat, chat_inputs, [chatbot, message])
                reset.click(lambda: ([], ""), None, [chatbot, message])

            # ---------------------------------------------------------------- arena
            with gr.Tab("Arena", elem_id="tab-arena"):
                arena_status = gr.Markdown(elem_id="arena-status")
                gr.Markdown(
                    "Two answers to a held-out prompt, from two stages in random order (two stages drawn at "
                    "random among the finished ones, or the two you pick). Pick the better one; you see which "
                    "stage wrote which only after your vote. Keys: **1** A is better · **2** B is better · "
                    "**3** tie · **4** both bad · **N** next prompt (Esc leaves the name box first)."
                )
                with gr.Row():
                    first = gr.Dropdown(label="Stage", choices=[RANDOM], elem_id="arena-first", interactive=True)
                    second = gr.Dropdown(label="against", choices=[RANDOM], elem_id="arena-second", interactive=True)
                arena_progress = gr.Markdown(elem_id="arena-progress")
                arena_next = gr.Button("Next prompt (N)", variant="primary", elem_id="arena-next")
                arena_prompt = gr.Textbox(label="Prompt", interactive=False, elem_id="arena-prompt", lines=2)
                with gr.Row():
                    answer_a = gr.Textbox(label="A", interactive=False, elem_id="arena-a", lines=4)
                    answer_b = gr.Textbox(label="B", interactive=False, elem_id="arena-b", lines=4)
                with gr.Row():
                    names = {
                        "a": "A is better (1)",
                        "b": "B is better (2)",
                        "tie": "Tie (3)",
                        "both bad": "Both bad (4)",
                    }
                    vote_buttons = {
                        choice: gr.Button(
                            names[choice],
                            elem_id=f"vote-{choice.replace(' ', '-')}",
                        )
                        for choice in ARENA_CHOICES
                    }
                arena_message = gr.Markdown(elem_id="arena-message")
                arena_stats = gr.Markdown(elem_id="arena-stats")
                arena_item = gr.State(None)

                def stats() -> str:
                    lines = site.verdict_lines()
                    return "\n\n".join(lines) if lines else "No arena votes yet."

                def next_prompt(name, stage_a, stage_b, token):
                    progress = site.arena_progress(name, stage_a, stage_b)
                    try:
                        item = site.arena_next(name, stage_a, stage_b, token)
                    except ValueError as error:
                        return None, "", "", "", warn(error), stats(), progress
                    if "done" in item:
                        pairs = "these two stages" if item["pairs"] == 1 else f"all {item['pairs']} pairs of stages"
                        done = f"You have voted on all {item['done']} held-out prompts for {pairs}."
                        return None, "", "", "", done, stats(), progress
                    item["labeler"] = labels.check_labeler(name)  # whoever asked for it votes on it
                    a, b = item["responses"]
                    shown = (a or "(empty answer)", b or "(empty answer)")
                    return item, str(item["prompt"]), *shown, "", stats(), progress

                arena_outputs = [arena_item, arena_prompt, answer_a, answer_b, arena_message, arena_stats]
                arena_outputs.append(arena_progress)
                clear = [arena_item, arena_prompt, answer_a, answer_b, arena_message]
                arena_next.click(lambda: (None, "", "", "", "Sampling two answers ..."), None, clear).then(
                    next_prompt, [labeler, first, second, session], arena_outputs
                )

                def voter(choice):
                    def vote(item, name, token, stage_a, stage_b):
                        progress = site.arena_progress(name, stage_a, stage_b)
                        if item is None:
                            missing = warn("press Next prompt first: there is no answer pair on screen")
                            return None, missing, stats(), progress
                        try:
                            decision = site.arena_vote(item, item["labeler"], choice, token)
                        except ValueError as error:
                            return None, warn(error), stats(), progress
                        progress = site.arena_progress(name, stage_a, stage_b)
                        return None, arena_reveal(item, decision), stats(), progress

                    return vote

                for choice, button in vote_buttons.items():
                    button.click(
                        voter(choice),
                        [arena_item, labeler, session, first, second],
                        [arena_item, arena_message, arena_stats, arena_progress],
                    )
                for dropdown in (first, second):
                    dropdown.change(site.arena_progress, [labeler, first, second], arena_progress)

            # ---------------------------------------------------------------- label
            with gr.Tab("Label", elem_id="tab-label"):
                label_status = gr.Markdown(elem_id="label-status")
                with gr.Row():
                    label_stage = gr.Dropdown(label="Stage that answers", choices=[], elem_id="label-stage")
                    count = gr.Radio([1, 2, 3, 4], value=2, label="answers per prompt (K)", elem_id="label-k")
                gr.Markdown(
                    "Keys: **1**-**4** prefer answer A-D · **T** tie · **Y** accept all · **R** reject all · "
                    "**S** skip · **U** undo · **N** next prompt (Esc leaves the name box first)."
                )
                label_progress = gr.Markdown(elem_id="label-progress")
                label_next = gr.Button("Next prompt (N)", variant="primary", elem_id="label-next")
                label_prompt = gr.Textbox(label="Prompt", interactive=False, elem_id="label-prompt", lines=2)
                with gr.Row():
                    answers = [
                        gr.Textbox(label=letter.upper(), interactive=False, elem_id=f"label-{letter}", lines=4)
                        for letter in labels.LETTERS
                    ]
                with gr.Row():
                    pressed = {button: key.upper() for key, button in LABEL_KEYS_PRESSED.items()}
                    key_buttons = {
                        name: gr.Button(f"{name} ({pressed[f'label-key-{key}']})", elem_id=f"label-key-{key}")
                        for name, key in LABEL_KEYS.items()
                    }
                    undo = gr.Button("Undo my last label (U)", elem_id="label-undo")
                label_message = gr.Markdown(elem_id="label-message")
                label_item = gr.State(None)

                def show_item(item, message_text=""):
                    texts = list(item["responses"]) if item else []
                    shown = len(texts) or 2
                    boxes = [
                        gr.update(value=(texts[i] or "(empty answer)") if i < len(texts) else "", visible=i < shown)
                        for i in range(len(labels.LETTERS))
                    ]
                    prompt = "" if item is None else str(item["prompt"])
                    return [item, prompt, *boxes, message_text]

                label_outputs = [label_item, label_prompt, *answers, label_message]

                def next_label(name, stage, k, token):
                    try:
                        item = site.label_next(name, stage, int(k), token)
                    except (ValueError, UserError) as error:  # UserError: the prompts file (e.g. a lone surrogate)
                        return show_item(None, warn(error))
                    if item is None:
                        return show_item(None, "Every prompt is labeled by you. Thank you!")
                    return show_item({**item, "labeler": labels.check_labeler(name)})

                label_next.click(next_label, [labeler, label_stage, count, session], label_outputs).then(
                    site.label_progress, labeler, label_progress
                )

                def presser(key):
                    def press(item, name, stage, k, token):
                        if item is None:
                            return show_item(None, warn("press Next prompt first: there is nothing on screen"))
                        try:
                            decision = site.label(item, key, token)
                        except (ValueError, UserError) as error:
                            return show_item(item, warn(error))
                        said = f"Saved: {labels.describe(decision)}."
                        following = next_label(name, stage, k, token)
                        following[-1] = " ".join(p for p in (said, following[-1]) if p)
                        return following

                    return press

                for name, key in LABEL_KEYS.items():
                    key_buttons[name].click(
                        presser(key), [label_item, labeler, label_stage, count, session], label_outputs
                    ).then(site.label_progress, labeler, label_progress)

                def undo_last(name, token):
                    try:
                        name = labels.check_labeler(name)
                    except ValueError as error:
                        return show_item(None, warn(error))
                    undone = site.store.undo_last(name)
                    if undone is None:
                        return show_item(None, "Nothing of yours to undo.")
                    return show_item({**undone, "labeler": name}, f"Undone: {labels.describe(undone)}; decide again.")

                undo.click(undo_last, [labeler, session], label_outputs).then(
                    site.label_progress, labeler, label_progress
                )

            labeler.blur(site.arena_progress, [labeler, first, second], arena_progress).then(
                site.label_progress, labeler, label_progress
            )

            # ---------------------------------------------------------------- report
            with gr.Tab("Report", elem_id="tab-report"):
                refresh = gr.Button("Reload the report", elem_id="report-refresh")
                report = gr.Markdown(elem_id="report")
                refresh.click(site.report_markdown, None, report)

        def on_load():
            stages = site.stages()
            chat_default = "ppo" if "ppo" in stages else (stages[-1] if stages else None)
            label_default = "sft" if "sft" in stages else (stages[0] if stages else None)
            found = ", ".join(stages) if stages else "none yet"
            return (
                f"Finished stages: {found} · votes and labels go to `{site.store.folder}`",
                site.chat_status(),
                gr.update(choices=stages, value=chat_default),
                site.arena_status(),
                gr.update(choices=[RANDOM, *stages], value=RANDOM),
                gr.update(choices=[RANDOM, *stages], value=RANDOM),
                stats(),
                site.label_status(),
                gr.update(choices=stages, value=label_default),
                site.report_markdown(),
            )

        page.load(
            on_load,
            None,
            [info, chat_status, chat_stage, arena_status, first, second, arena_stats, label_status, label_stage]
            + [report],
        )
    return page


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="demo")
    parser.add_argument("--host", default="127.0.0.1", help="127.0.0.1 (default): this machine only; 0.0.0.0: the LAN")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--auth", help="user:password, Gradio's login (use it whenever --host is not 127.0.0.1)")
    parser.add_argument("--models", type=Path, help="folder of the stage outputs (default models/<recipe>)")
    parser.add_argument("--data", type=Path, help="folder of the prompts files (default data/processed/<recipe>)")
    parser.add_argument("--out", type=Path, help="labels folder (default data/labels/<recipe>)")
    parser.add_argument("--max-new-tokens", type=int, help="chat and arena (default: the recipe's response_length)")
    parser.add_argument("--temperature", type=float, help="chat and arena (default: the recipe's PPO temperature)")
    parser.add_argument("--label-max-new-tokens", type=int, help="Label tab (default: make label's, 64)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--guidelines", type=Path, help="labeling guidelines to show, markdown (default recipes/<recipe>/guidelines.md)"
    )
    args = parser.parse_args(argv)
    if not 1 <= args.port <= 65535:
        raise UserError(f"--port {args.port}: pick a port from 1 to 65535 (PORT=)")
    auth = parse_auth(args.auth)
    check_port(args.host, args.port)
    if args.host not in LOCAL_HOSTS and auth is None:
        print(
            f"ui: warning: serving on {args.host} without --auth: anyone who can reach port {args.port} can chat, "
            'vote and label under any name (ARGS="--auth user:password")'
        )
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline: no calls home
    site = Site(args)
    import gradio as gr

    page = build(site)
    print(f"ui: serving http://{args.host}:{args.port} (Ctrl-C stops); labels in {site.store.folder}", flush=True)
    page.queue(default_concurrency_limit=8).launch(
        server_name=args.host,
        server_port=args.port,
        auth=auth,
        ssr_mode=False,
        show_error=True,
        quiet=True,
        js=keys_js(),  # keyboard voting
        theme=gr.themes.Default(font=["sans-serif"], font_mono=["monospace"]),  # no web fonts fetched
    )


if __name__ == "__main__":
    run(main)
