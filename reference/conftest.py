"""Fixtures of the reference checks: tests/conftest.py's demo world and stage runners, imported, not copied."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # tests/conftest.py as `conftest`, tests/zoo.py and tests/tests_helpers.py

from conftest import (  # noqa: E402
    OFFLINE_ENV,
    ppo_args,
    reward_args,
    run_stage,
    sft_args,
    stage_paths,
    world,  # noqa: F401  (a fixture: pytest finds it here)
)

__all__ = ["OFFLINE_ENV", "ROOT", "ppo_args", "run_reference", "run_stage"]


def run_reference(module: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -m reference.<module> args...` in this interpreter (the reference environment), offline."""
    command = [sys.executable, "-m", f"reference.{module}", *args]
    return subprocess.run(command, cwd=ROOT, env=OFFLINE_ENV, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def sft_and_reward(world) -> dict[str, str]:  # noqa: F811  (tests/conftest.py's fixture)
    """The demo's SFT and reward stages, run briefly once (tests/conftest.py's settings); PPO is each test's."""
    paths = stage_paths(world, "-reference")
    for stage, args in (("sft", sft_args), ("reward", reward_args)):
        result = run_stage(stage, *args(paths))
        assert result.returncode == 0, f"{stage} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return paths
