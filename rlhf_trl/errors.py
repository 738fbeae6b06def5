"""One-line errors for everything a user can fix, shared by every module (the lowest layer: it imports no other
module of the package, so any module can raise `UserError` without an import circle).

`run` wraps a command's entry point: a `UserError`, a full disk, an unwritable folder or a recipe key a library
rejected becomes one line on stderr and exit status 2 (`EXIT_USER_ERROR`) instead of a traceback; Ctrl-C becomes
one line and status 130.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import warnings
from collections.abc import Callable

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A problem with the user's input; the message says what is wrong and how to fix it."""


def run(main: Callable[[], None]) -> None:
    """Runs a stage's entry point; a UserError becomes one line on stderr and exit status 2."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Deprecation notices from transformers/TRL internals are not actionable for a recipe author.
    warnings.filterwarnings("ignore", category=FutureWarning)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # weight-loading bars; the trainers' own progress bars stay
    try:
        main()
    except UserError as error:
        fail(str(error))
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the message or the exit short
        _close_progress_bars()
        print(
            "interrupted: nothing was marked finished; rerun the same command (a training stage resumes from its "
            "last checkpoint; RESUME=0 starts over)",
            file=sys.stderr,
        )
        sys.stdout.flush()
        sys.stderr.flush()
        # Straight out with the shell's status for Ctrl-C: outputs are crash-safe, so no cleanup is owed, and
        # interpreter shutdown after an interrupt mid-training was seen to end in SIGINT (-2) instead of 130.
        os._exit(130)
    except Exception as error:
        reason = storage_failure(error) or settings_failure(error)
        if reason is None:
            raise
        fail(reason)


def settings_failure(error: BaseException) -> str | None:
    """A one-line reason and fix for a library's error that a recipe key caused, else None."""
    if type(error).__name__ == "NoMatchingPeftModuleError":  # peft: lora_target_modules names no module of the model
        return (
            f"lora_target_modules: {str(error).splitlines()[0]} Name modules this model has, or use all-linear "
            "(every linear layer but the output layer)"
        )
    return None


def _close_progress_bars() -> None:
    """Closes open tqdm bars now, so their last redraw lands before the error line rather than after it."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def fail(reason: str) -> None:
    _close_progress_bars()
    # One write, newline included: print() writes the text and its newline apart, and under several processes with
    # unbuffered output two ranks' lines could then run together on one line.
    sys.stderr.write(f"error: {reason}\n")
    sys.stderr.flush()
    sys.exit(EXIT_USER_ERROR)


# How a full disk or an unwritable folder shows up: OSError from Python, text from torch.save and safetensors.
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_DISK_FULL_TEXT = ("No space left", "File too large", "FileTooLarge", "StorageFull", "file write failed")
_READ_ONLY = (errno.EACCES, errno.EPERM, errno.EROFS)


def storage_failure(error: BaseException | None) -> str | None:
    """A one-line reason and fix when `error`, or what caused it, is a full disk or an unwritable folder."""
    seen = set()
    while error is not None and id(error) not in seen:  # datasets and others wrap the OSError in their own
        seen.add(id(error))
        reason = _storage_reason(error)
        if reason:
            return reason
        error = error.__cause__ or error.__context__
    return None


def _storage_reason(error: BaseException) -> str | None:
    where = f" ({error.filename})" if getattr(error, "filename", None) else ""
    text = str(error)
    if (isinstance(error, OSError) and error.errno in _DISK_FULL) or any(t in text for t in _DISK_FULL_TEXT):
        return (
            f"the disk filled up while writing{where}: free some space, then rerun the same command; "
            "finished outputs were not touched and the run resumes from its last complete checkpoint"
        )
    if isinstance(error, OSError) and error.errno in _READ_ONLY:
        target = f" {error.filename}" if getattr(error, "filename", None) else ""
        return f"cannot use{target} ({error.strerror}): fix its permissions or mount, or set output_dir elsewhere"
    return None
