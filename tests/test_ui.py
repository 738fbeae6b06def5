"""`make ui`: the web page driven in a real headless Chromium (Debian's chromium + chromedriver, through Selenium)
as a person uses it, plus the arena's statistics, concurrency and bad input checked directly.

The stages are the `world` fixture's untrained base model copied twice (PPO's weights nudged), so what they say
does not matter, only what the page shows and records. `.ci/run` installs Chromium; elsewhere the browser tests
skip when it is missing, saying so.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import OFFLINE_ENV, ROOT, run_module

from rlhf_trl import labels

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
MAX_NEW_TOKENS = 8
WAIT = 120  # seconds any one page state may take to appear; a hung page fails the test instead of the suite

needs_browser = pytest.mark.skipif(
    (not CHROMIUM or not DRIVER) and os.environ.get("RLHF_TRL_BROWSER") != "required",
    reason="Chromium/chromedriver are not installed and this machine could not install them "
    "(.ci/run installs them with apt-get as root: apt-get install chromium chromium-driver)",
)


@pytest.fixture(scope="module")
def site_world(world, tmp_path_factory) -> dict[str, Path]:
    """models/ with finished sft and ppo outputs (the base model; PPO's weights nudged), the demo prompts."""
    import torch
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("site")
    base = world / "models" / "base"
    for nudge, stage in enumerate(("sft", "ppo")):
        out = root / "models" / stage
        shutil.copytree(base, out)
        if nudge:
            torch.manual_seed(nudge)
            model = AutoModelForCausalLM.from_pretrained(base)
            with torch.no_grad():
                for parameter in model.parameters():
                    parameter.add_(torch.randn_like(parameter) * 0.05)
            model.save_pretrained(out)
        (out / "rlhf_trl_run.json").write_text(json.dumps({"stage": stage}))
    report = root / "models" / "report"
    report.mkdir()
    (report / "report.md").write_text("# RLHF report: demo\n\n![SFT loss](sft_loss.png)\n", encoding="utf-8")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots()
    axis.plot([3, 2, 1])
    figure.savefig(report / "sft_loss.png")
    plt.close(figure)
    return {"models": root / "models", "data": world / "data", "labels": root / "labels"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(paths: dict, port: int) -> subprocess.Popen:
    """`python -m rlhf_trl.ui` on `port`, returned once the page answers."""
    command = [sys.executable, "-m", "rlhf_trl.ui", "--port", str(port), "--max-new-tokens", str(MAX_NEW_TOKENS)]
    command += ["--models", str(paths["models"]), "--data", str(paths["data"]), "--out", str(paths["labels"])]
    command += ["--label-max-new-tokens", "6"]
    server = subprocess.Popen(
        command, cwd=ROOT, env=OFFLINE_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.monotonic() + WAIT
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as response:
                if response.status == 200:
                    return server
        except OSError:
            pass
        if server.poll() is not None:
            raise AssertionError(f"the server ended first:\n{server.stdout.read()[-3000:]}")
        assert time.monotonic() < deadline, "the page did not answer in time"
        time.sleep(0.2)


def stop(server: subprocess.Popen, sig=signal.SIGTERM) -> None:
    if server.poll() is None:
        server.send_signal(sig)
        server.wait(timeout=30)


def chromium():
    if not CHROMIUM or not DRIVER:
        pytest.fail("RLHF_TRL_BROWSER=required but chromium or chromedriver is missing")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,2200"):
        options.add_argument(argument)
    options.binary_location = CHROMIUM
    return webdriver.Chrome(options=options, service=Service(DRIVER))


@pytest.fixture(scope="module")
def browser():
    driver = chromium()
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def second_browser():
    driver = chromium()
    yield driver
    driver.quit()


class Page:
    """The page as a person sees it: type, click, read."""

    def __init__(self, driver, port: int):
        from selenium.webdriver.support.ui import WebDriverWait

        self.driver, self.wait = driver, WebDriverWait(driver, WAIT)
        driver.get(f"http://127.0.0.1:{port}/")
        self.wait.until(lambda d: "Finished stages:" in self.text("#site-info"))  # the load event has run

    def find(self, css: str):
        from selenium.webdriver.common.by import By

        found = self.driver.find_elements(By.CSS_SELECTOR, css)
        return found[0] if found else None

    def text(self, css: str) -> str:
        """What the element shows (its text content when its tab is hidden)."""
        element = self.find(css)
        if element is None:
            return ""
        return (element.text or element.get_attribute("textContent") or "").strip()

    def value(self, css: str) -> str:
        return self.find(f"{css} textarea, {css} input").get_attribute("value")

    def type(self, css: str, text: str) -> None:
        box = self.find(f"{css} textarea, {css} input")
        box.clear()
        box.send_keys(text)

    def tab(self, name: str) -> None:
        from selenium.webdriver.common.by import By

        [button] = [b for b in self.driver.find_elements(By.CSS_SELECTOR, 'button[role="tab"]') if b.text == name]
        button.click()

    def click(self, css: str) -> None:
        self.find(css).click()

    def until(self, condition, what: str):
        self.wait.until(lambda d: condition(), message=what)


def arena_lines(folder: Path) -> list[dict]:
    text = (folder / labels.LOG).read_text(encoding="utf-8") if (folder / labels.LOG).exists() else ""
    assert not text or text.endswith("\n")
    return [r for r in map(json.loads, text.splitlines()) if r.get("source") == labels.ARENA]


def ask(page: Page) -> str:
    """Asks for the next pair, checks it is blind, and returns the prompt on screen."""
    page.click("#arena-next")
    page.until(lambda: page.value("#arena-a") and page.value("#arena-b") and not page.text("#arena-message"), "a pair")
    assert " was " not in page.find("#tab-arena").text  # blind: which stage wrote which is not on the page
    return page.value("#arena-prompt")


def answer(page: Page, choice: str) -> None:
    page.click(f"#vote-{choice}")
    page.until(lambda: page.text("#arena-message").startswith("Saved:"), "the reveal")
    assert "A was" in page.text("#arena-message") and "B was" in page.text("#arena-message")


def vote(page: Page, choice: str, before: int) -> str:
    """Asks for the next pair, votes, and returns the prompt that was on screen."""
    prompt = ask(page)
    answer(page, choice)
    page.until(lambda: f"{before + 1} vote" in page.text("#arena-stats"), "the updated win rate")
    return prompt


@pytest.mark.browser
@needs_browser
def test_chat_votes_from_two_browsers_and_a_killed_server(site_world, browser, second_browser):
    from rlhf_trl.modeling import for_inference, generate, load_model, load_tokenizer

    port = free_port()
    server = start_server(site_world, port)
    try:
        page = Page(browser, port)
        assert page.text("#chat-status") == ""  # both stages exist: nothing to run first

        # Chat: the streamed answer is the PPO model's own answer at the recipe's settings (seed 0).
        page.type("#chat-input", "Tell me about the river.")
        page.click("#chat-send")
        path = site_world["models"] / "ppo"
        tokenizer, model = load_tokenizer(path), for_inference(load_model(path))
        turn = [{"role": "user", "content": "Tell me about the river."}]
        [expected] = generate(model, tokenizer, [turn], MAX_NEW_TOKENS, 0.7, seed=0)

        def letters(text: str) -> str:
            return "".join(c for c in text if c.isalnum())

        page.until(
            lambda: letters(page.text('#chatbot [data-testid="bot"]')) == letters(expected),
            f"the answer {expected!r}",
        )
        assert "Tell me about the river." in page.text('#chatbot [data-testid="user"]')
        page.click("#chat-reset")
        page.until(lambda: not page.find('#chatbot [data-testid="user"]'), "an empty conversation after reset")

        # Arena: a labeler name is required and checked.
        page.tab("Arena")
        page.click("#arena-next")
        page.until(lambda: "enter your name first" in page.text("#arena-message"), "the empty-name refusal")
        page.type("#labeler", "x" * 41)
        page.click("#arena-next")
        page.until(lambda: "at most 40 characters; this one has 41" in page.text("#arena-message"), "too long")
        assert not arena_lines(site_world["labels"])
        page.type("#labeler", "alice")
        shown = [vote(page, choice, before) for before, choice in enumerate(("a", "b", "tie"))]

        log = arena_lines(site_world["labels"])
        assert [d["labeler"] for d in log] == ["alice"] * 3 and [d["prompt"] for d in log] == shown
        assert len({d["prompt_id"] for d in log}) == 3
        for decision, choice in zip(log, ("a", "b", "tie"), strict=True):
            assert sorted(decision["stages"]) == ["ppo", "sft"] and len(decision["sample_ids"]) == 2
            assert labels.describe(decision) == {"a": "a", "b": "b", "tie": "tie"}[choice]
        [verdict] = labels.human_verdicts(log)
        line = labels.verdict_line(verdict)
        assert page.text("#arena-stats") == line
        assert line.startswith("human win rate of PPO over SFT:") and "3 votes, 1 labeler" in line

        # Two browsers of the same labeler at once: different prompts, both votes kept.
        other = Page(second_browser, port)
        other.tab("Arena")
        other.type("#labeler", "alice")
        page.click("#arena-next")
        second = ask(other)
        page.until(lambda: page.value("#arena-a") and not page.text("#arena-message"), "the first browser's pair")
        first = page.value("#arena-prompt")
        assert first != second and not {first, second} & set(shown)
        answer(other, "a")
        answer(page, "b")
        log = arena_lines(site_world["labels"])
        assert len(log) == 5 and len({d["prompt_id"] for d in log}) == 5
        assert {d["prompt"] for d in log[3:]} == {first, second}

        # The Report tab shows report.md with its plot.
        page.tab("Report")
        page.until(lambda: "RLHF report" in page.text("#report"), "the report")
        page.until(lambda: int(page.find("#report img").get_attribute("naturalWidth") or 0) > 0, "the plot")

        # A sixth pair is on screen when the server dies: only that vote is lost.
        page.tab("Arena")
        page.click("#arena-next")
        page.until(lambda: page.value("#arena-a") and not page.text("#arena-message"), "a sixth pair")
        stop(server, signal.SIGKILL)
        server = start_server(site_world, port)
        page = Page(browser, port)
        page.tab("Arena")
        line = labels.verdict_line(labels.human_verdicts(log)[0])
        page.until(lambda: line in page.text("#arena-stats"), "the five votes back")
        assert "5 votes, 1 labeler" in line
        page.type("#labeler", "alice")
        sixth = vote(page, "both-bad", 5)
        assert sixth not in {d["prompt"] for d in log}  # nothing voted is shown again
        after = arena_lines(site_world["labels"])
        assert after[:5] == log and len(after) == 6 and after[5]["decision"] == "reject"
        assert len({d["prompt_id"] for d in after}) == 6
    finally:
        stop(server)


@pytest.mark.browser
@needs_browser
def test_before_any_stage_each_tab_says_what_to_run(browser, tmp_path):
    port = free_port()
    server = start_server({"models": tmp_path / "models", "data": tmp_path / "data", "labels": tmp_path / "l"}, port)
    try:
        page = Page(browser, port)
        page.until(lambda: "make sft RECIPE=demo" in page.text("#chat-status"), "Chat: make sft")
        for tab, status, target in (
            ("Arena", "#arena-status", "make data RECIPE=demo"),
            ("Label", "#label-status", "make data RECIPE=demo"),
            ("Report", "#report", "make report RECIPE=demo"),
        ):
            page.tab(tab)
            page.until(lambda status=status, target=target: target in page.text(status), f"{tab}: {target}")
    finally:
        stop(server)


def site(paths: dict):
    from rlhf_trl.ui import Site

    args = SimpleNamespace(
        recipe="demo", models=paths["models"], data=paths["data"], out=paths["labels"], seed=0,
        max_new_tokens=MAX_NEW_TOKENS, temperature=None, label_max_new_tokens=4,
    )  # fmt: skip
    return Site(args)


@pytest.mark.browser  # with the site_world server: in the same suite as the browser tests that share it
def test_two_browsers_of_one_labeler_never_get_the_same_prompt_and_lose_no_vote(site_world, tmp_path):
    paths = {**site_world, "labels": tmp_path / "labels"}
    page = site(paths)
    try:
        for session in ("first", "second"):  # load both models before the race
            page.sampler("sft" if session == "first" else "ppo")
        shown: dict[str, dict] = {}

        def open_pair(session):
            shown[session] = page.arena_next("bob", "sft", "ppo", session)

        for _ in range(3):
            threads = [threading.Thread(target=open_pair, args=(s,)) for s in ("first", "second")]
            [t.start() for t in threads]
            [t.join() for t in threads]
            assert shown["first"]["prompt_id"] != shown["second"]["prompt_id"]
            threads = [
                threading.Thread(target=page.arena_vote, args=({**shown[s], "labeler": "bob"}, "bob", "a", s))
                for s in ("first", "second")
            ]
            [t.start() for t in threads]
            [t.join() for t in threads]
        with pytest.raises(ValueError, match="already decided"):  # a second click on the same pair
            page.arena_vote({**shown["first"], "labeler": "bob"}, "bob", "b", "first")
        votes = [d for d in labels.read_decisions(paths["labels"]) if d["source"] == labels.ARENA]
        assert len(votes) == 6 and len({d["prompt_id"] for d in votes}) == 6  # none lost, none twice

        # The Label tab's path: the terminal tool's sampler settings and seeds, the same store, source web.
        item = {**page.label_next("bob", "sft", 2, "first"), "labeler": "bob"}
        assert item["generation"] == {"samples": 2, "max_new_tokens": 4, "temperature": 0.7, "seed": 0}
        decision = page.label(item, "b", "first")
        assert decision["source"] == "web" and labels.describe(decision) == "b"
        with pytest.raises(ValueError, match="already decided"):
            page.label(item, "a", "first")
        assert page.label_next("bob", "sft", 2, "first")["prompt_id"] != item["prompt_id"]
        assert [d["decision_id"] for d in page.store.by("bob")] == [decision["decision_id"]]
    finally:
        page.store.__exit__()


@pytest.mark.browser
def test_chat_streams_the_answer_generate_gives(site_world, tmp_path):
    from rlhf_trl.modeling import generate

    page = site({**site_world, "labels": tmp_path / "labels"})
    try:
        turn = [{"role": "user", "content": "Tell me about the lake."}]
        pieces = list(page.stream_chat("sft", turn, 12, 0.7, 3))
        sampler = page.sampler("sft")
        [expected] = generate(sampler.model, sampler.tokenizer, [turn], 12, 0.7, seed=3)
        assert len(pieces) > 1 and all(b.startswith(a) for a, b in zip(pieces, pieces[1:], strict=False))
        assert pieces[-1].strip() == expected.strip()
        with pytest.raises(ValueError, match="no finished stage 'reward'"):
            page.stage("reward")
        with pytest.raises(ValueError, match="no finished stage '../sft'"):
            page.stage("../sft")
    finally:
        page.store.__exit__()


def test_wilson_interval_and_the_human_verdict_of_known_votes():
    # 8 of 10, z = 1.96: centre (0.8 + 1.9208/10) / 1.38416 = 0.71673; half-width 1.41602 * sqrt(0.016 + 0.009604)
    # = 0.22658: 0.4902 to 0.9433.
    low, high = labels.wilson_interval(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-4) and high == pytest.approx(0.9433, abs=1e-4)

    def arena(labeler, stages, decision, preferred=None):
        return {"source": "arena", "labeler": labeler, "stages": stages, "decision": decision, "preferred": preferred}

    votes = (
        [arena("ann", ["ppo", "sft"], "prefer", 0)] * 4  # PPO shown as A, preferred
        + [arena("ben", ["sft", "ppo"], "prefer", 1)] * 3  # PPO shown as B, preferred
        + [arena("ben", ["sft", "ppo"], "prefer", 0)]  # SFT preferred
        + [arena("ann", ["ppo", "sft"], "tie"), arena("ben", ["sft", "ppo"], "reject")]  # a half each
        + [arena("ann", ["export", "ppo"], "prefer", 1)]  # another pair
        + [{"source": "terminal", "labeler": "ann", "decision": "prefer", "preferred": 0}]  # not an arena vote
    )
    first, second = labels.human_verdicts(votes)
    assert labels.verdict_line(first) == "human win rate of PPO over SFT: 0.80 (95% CI 0.49-0.94, 10 votes, 2 labelers)"
    assert second["stages"] == ("export", "ppo") and second["win_rate"] == 0.0 and second["votes"] == 1
    # 0 of 1: Wilson 0 to 1.9208 / (1 + 3.8416) = 0.7935.
    assert (
        labels.verdict_line(second) == "human win rate of EXPORT over PPO: 0.00 (95% CI 0.00-0.79, 1 vote, 1 labeler)"
    )


def test_labeler_names_are_checked():
    assert labels.check_labeler("  Alice B. ") == "alice b."  # one spelling per person (test_label: the whole rule)
    for name, why in (("", "enter your name first"), ("x" * 41, "at most 40 characters"), ("../x", "letters")):
        with pytest.raises(ValueError, match=why):
            labels.check_labeler(name)


def test_a_port_in_use_is_one_line_naming_it_and_port(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_module("ui", "--port", str(port), "--out", str(tmp_path / "labels"), timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    assert f"port {port}" in line and "PORT=" in line
    assert not (tmp_path / "labels").exists()  # refused before anything was touched


def test_auth_takes_user_and_password():
    from rlhf_trl.cli import UserError
    from rlhf_trl.ui import parse_auth

    assert parse_auth("alice:pa:ss") == ("alice", "pa:ss") and parse_auth(None) is None
    for bad in ("alice", ":secret", "alice:"):
        with pytest.raises(UserError, match="--auth takes user:password"):
            parse_auth(bad)


@pytest.mark.parametrize("host", ["nosuchhost.invalid", "192.0.2.1"])  # no such name; an address not on this machine
def test_a_host_that_is_not_this_machine_is_named_not_the_port(host):
    from rlhf_trl.cli import UserError
    from rlhf_trl.ui import check_port

    with pytest.raises(UserError, match=f"HOST={host} is not an address of this machine") as error:
        check_port(host, 7875)
    assert "port" not in str(error.value).split(":")[0]


def test_arena_votes_count_for_the_runs_they_judged(tmp_path):
    """QA D12: votes recorded stage names only, so after PPO was retrained the report and the page still showed the
    old PPO's win rate, and a labeler who had judged it could never judge the new one. Variant: a vote recorded
    before votes named their runs counts as older too."""
    models = tmp_path / "models"
    for stage in ("sft", "ppo"):
        (models / stage).mkdir(parents=True)
        (models / stage / "rlhf_trl_run.json").write_text(json.dumps({"stage": stage, "finished_at": "day 1"}))
    runs = labels.stage_runs(models)
    assert set(runs) == {"sft", "ppo"} and runs["sft"] != runs["ppo"]

    def vote(n, choice, judged=None):
        shown = [{"sample_id": f"{stage}{n}", "responses": [stage], "stage": stage, "model": stage, "generation": {},
                  "run": (judged or runs)[stage]} for stage in ("ppo", "sft")]  # fmt: skip
        item = {"index": n, "prompt": f"p{n}", "prompt_id": f"p{n}", "messages": []}
        return labels.arena_vote(labels.arena_item(item, shown), "alice", choice)

    paths = {"models": models, "data": tmp_path / "data", "labels": tmp_path / "labels"}
    page = site(paths)
    try:
        legacy = {**vote(9, "b"), "decision_id": "legacy"}
        del legacy["runs"]
        page.store.record([vote(0, "a"), vote(1, "a"), vote(2, "b"), legacy])
        # By hand: PPO shown as A; a, a, b on this run: 2 of 3 for PPO (0.67); the legacy vote is left out.
        assert page.verdict_lines()[0].startswith("human win rate of PPO over SFT: 0.67 (95% CI")
        assert page.verdict_lines()[1].startswith("1 arena vote left out: they judged earlier runs")
        assert len(page.arena_votes("alice", ["ppo", "sft"])) == 3

        (models / "ppo" / "rlhf_trl_run.json").write_text(json.dumps({"stage": "ppo", "finished_at": "day 2"}))
        assert page.verdict_lines() == ["4 arena votes left out: they judged earlier runs of these stages "
                                        "(retrained since), or were recorded before votes named their run; they stay "
                                        "in decisions.jsonl"]  # fmt: skip
        assert page.arena_votes("alice", ["ppo", "sft"]) == []  # the new PPO is offered again
        page.store.record([vote(0, "tie", labels.stage_runs(models))])
        assert page.verdict_lines()[0] == "human win rate of PPO over SFT: 0.50 (95% CI 0.05-0.95, 1 vote, 1 labeler)"
    finally:
        page.store.__exit__()

    from rlhf_trl import report

    section = "\n".join(report.human_section([], 4))
    assert "## Human verdict (arena)" in section and "4 arena votes left out" in section
