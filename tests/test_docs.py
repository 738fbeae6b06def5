"""The README and docs/ as a newcomer reads them: every relative link leads somewhere, every `make <target>` they
name exists, and the README stays one page.

Nothing here imports the package or loads a model: it reads the Markdown files and asks `make -n` (a dry run that
prints recipes without running them) in a scratch copy of the Makefile.
"""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_WORDS = 1600  # issue 25: "at most about 1,500 words"

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.S | re.M)
INLINE_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
REFERENCE_LINK = re.compile(r"^\s*\[[^\]]+\]:\s*(\S+)", re.M)
CODE_SPAN = re.compile(r"`([^`\n]+)`")
# `make` then its words up to the first variable (X=...), flag, comment, placeholder or shell punctuation.
MAKE_CALL = re.compile(r"(?<![\w$(./-])make((?:[ \t]+[a-z][a-z0-9-]*)+)")


def without_code_blocks(text: str) -> str:
    return FENCE.sub("", text)


def code_blocks(text: str) -> list[str]:
    return [match.group(0) for match in FENCE.finditer(text)]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, markup and punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors a Markdown file's headings give (outside code blocks; repeats get -1, -2 as on GitHub)."""
    seen: dict[str, int] = {}
    found = set()
    for line in without_code_blocks(path.read_text(encoding="utf-8")).splitlines():
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        base = slug(match.group(1))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def relative_links(path: Path) -> list[str]:
    text = without_code_blocks(path.read_text(encoding="utf-8"))
    targets = INLINE_LINK.findall(text) + REFERENCE_LINK.findall(text)
    return [t for t in targets if not re.match(r"^[a-z][a-z0-9+.-]*:", t)]  # http:, https:, mailto: are not checked


def broken_links(path: Path) -> list[str]:
    """Each relative link of `path` that names no file (or folder), or an #anchor that no heading there gives."""
    broken = []
    for target in relative_links(path):
        file_part, _, anchor = target.partition("#")
        destination = (path.parent / file_part).resolve() if file_part else path
        if not destination.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and destination.suffix == ".md" and anchor not in anchors(destination):
            broken.append(f"{target} (no heading gives #{anchor})")
    return broken


def named_make_targets(text: str) -> set[str]:
    """Every target in a `make ...` command of the text's code spans and code blocks (`make sft reward ppo
    RECIPE=x` names sft, reward and ppo); prose such as "make sure" is not code and is not read."""
    blocks = [re.sub(r"(^|\s)#.*", "", line) for block in code_blocks(text) for line in block.splitlines()]  # comments
    code = "\n".join(blocks + CODE_SPAN.findall(without_code_blocks(text)))
    return {word for match in MAKE_CALL.finditer(code) for word in match.group(1).split()}


@pytest.fixture(scope="module")
def dry_make(tmp_path_factory):
    """`make -n TARGET` in a scratch folder: the Makefile copied, the project's other files and folders linked (a rule
    may name any of them as a prerequisite), but no .venv, models/ or data/, so nothing is up to date and every recipe
    is printed, never run; returns the CompletedProcess."""
    project = tmp_path_factory.mktemp("project")
    shutil.copy(ROOT / "Makefile", project / "Makefile")
    left_out = {"Makefile", ".git", "models", "data", ".cache"}
    for entry in ROOT.iterdir():
        if entry.name not in left_out and not entry.name.startswith(".venv"):
            (project / entry.name).symlink_to(entry)
    # Under `make test` the outer make's MAKEFLAGS/MAKELEVEL would make this one print "Entering directory".
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}

    def run(target: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["make", "--no-print-directory", "-n", target],
            cwd=project,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    return run


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    assert relative_links(page) or page.name != "README.md", "the README links to no page under docs/"
    assert broken_links(page) == [], f"{page.relative_to(ROOT)} has broken links"


def test_the_link_check_finds_a_missing_file_and_a_missing_heading(tmp_path):
    """The checker itself: a link to a missing file, and an #anchor no heading gives, are both reported; a heading
    inside a code block gives no anchor."""
    (tmp_path / "other.md").write_text("# Crashes, resuming and `make ppo`\n\n```\n# not a heading\n```\n")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](other.md#crashes-resuming-and-make-ppo) [gone](missing.md) [bad](other.md#not-a-heading) "
        "[web](https://example.com/x.md)\n"
    )
    assert broken_links(page) == [
        "missing.md (no such file)",
        "other.md#not-a-heading (no heading gives #not-a-heading)",
    ]


def test_the_readme_names_its_two_commands():
    text = README.read_text(encoding="utf-8")
    first_block = code_blocks(text)[0]
    assert "make all" in first_block and "make test" in first_block, "the README's first code block is the two commands"


def test_every_make_target_the_readme_and_docs_name_exists(dry_make):
    named = set()
    for page in PAGES:
        named |= named_make_targets(page.read_text(encoding="utf-8"))
    assert {"all", "test"} <= named
    missing = {}
    for target in sorted(named):
        result = dry_make(target)
        # make -n still runs a recipe line that calls $(MAKE) (compare asks rlhf_trl.compare what to train), which
        # fails here without a .venv: the target exists all the same. A missing target says "No rule to make target".
        if result.returncode != 0 and "No rule to make target" in result.stderr:
            missing[target] = result.stderr.strip().splitlines()[-1:]
    assert missing == {}, "targets named in README.md or docs/ that the Makefile lacks"


def test_a_misspelt_target_is_caught(dry_make):
    """What the check above relies on: `make -n` of a target the Makefile lacks fails, of one it has succeeds."""
    assert named_make_targets("`make sft reward RECIPE=x` and\n```\nmake test-ui  # make all adds\n```\nmake sure") == {
        "sft",
        "reward",
        "test-ui",
    }
    assert dry_make("all").returncode == 0
    assert "No rule to make target" in dry_make("test-everything").stderr


def test_the_docs_pages_that_code_and_recipes_name_exist():
    """The Makefile's, the recipes' and the package's pointers to docs/ (`see docs/multi-gpu.md`) lead to a page."""
    sources = [ROOT / "Makefile", *(ROOT / "recipes").rglob("*.yaml"), *(ROOT / "rlhf_trl").rglob("*.py")]
    named = {(src.relative_to(ROOT), m) for src in sources for m in re.findall(r"docs/[\w.-]+\.md", src.read_text())}
    assert named, "nothing points at docs/: the check reads the wrong files"
    assert sorted((str(src), page) for src, page in named if not (ROOT / page).is_file()) == []


def test_the_readme_is_one_page():
    words = len(README.read_text(encoding="utf-8").split())  # as `wc -w README.md` counts
    assert words <= README_MAX_WORDS, f"README.md has {words} words; move detail to docs/"
