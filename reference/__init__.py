"""TRL 1.12, the reference our PPO engine is checked against, in its own environment (reference/README.md).

Only this folder imports `trl.experimental` (TRL 1.12 is the last release with PPO), and only inside
`.venv-reference` (`make reference-env`). The product's environment finds that interpreter with `python()`.
"""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Where `make reference-env` builds it; RLHF_TRL_REFERENCE_PYTHON names another interpreter (a test's fake, say).
DEFAULT_PYTHON = ROOT / ".venv-reference" / "bin" / "python"


def python() -> str:
    """The reference environment's interpreter, for running TRL 1.12's side in a subprocess.

    Raises `rlhf_trl.cli.UserError` (one line, exit status 2) when it does not exist."""
    from rlhf_trl.cli import UserError

    path = os.environ.get("RLHF_TRL_REFERENCE_PYTHON") or str(DEFAULT_PYTHON)
    if not Path(path).is_file():
        raise UserError(
            f"TRL 1.12's side runs in the reference environment and {path} does not exist: run `make reference-env` "
            "first (or set RLHF_TRL_REFERENCE_PYTHON)"
        )
    return path
