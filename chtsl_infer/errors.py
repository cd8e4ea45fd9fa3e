"""The library's error types and how a caught exception becomes one line.

Library code raises `ChtslError` for bad input (a wrong name, a missing file, a value out of
range); only `chtsl_infer.cli.main` turns it into `error: ...` and exit code 2. It is a
`ValueError`, so Python callers that already catch `ValueError` keep working. `WriteFailure`
is the environment failing a write the checks let through (a full disk, a file system turned
read-only, a directory removed under a running command): one line too, exit code 74
(`EX_IOERR` of sysexits.h), so scripts can tell "fix the command" from "fix the machine".
"""

from __future__ import annotations

import os
import re


class ChtslError(ValueError):
    """Bad input, with a one-line message naming what is wrong and what is valid."""

    exit_code = 2


class WriteFailure(ChtslError):
    """A write the environment failed (disk full, read-only or vanished directory, I/O error)."""

    exit_code = 74


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived (raised by `chtsl_infer.utils.interruptible`); a command reports
    what it kept and exits with `exit_code`, the shell's 128 + signal number (130, 143)."""

    def __init__(self, signum: int) -> None:
        import signal

        self.signum = signum
        self.signame = signal.Signals(signum).name
        super().__init__(self.signame)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def first_line(exc: BaseException) -> str:
    """The first non-blank line of `str(exc)`, or the exception's type name when it has no text
    (third-party errors often carry multi-line messages; a one-line error keeps only the head)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# "... (os error 28)" (Rust's io::Error: safetensors, tokenizers) or "code: 28" (its Debug form).
_OS_ERROR_CODE = re.compile(r"\(os error (\d+)\)|\bcode: (\d+)")
# What torch's zip writer (torch.save) says when the file system refuses its bytes.
_TORCH_WRITE = ("PytorchStreamWriter failed", "inline_container.cc", "file write failed")


def write_failure_reason(exc: BaseException) -> str | None:
    """The one-line reason (e.g. "No space left on device") when `exc` is a writer's I/O failure:
    an OSError, a safetensors or tokenizers error carrying an OS error code, or torch's zip writer
    failing; None for anything else (a bug, or bad input, which must not be reported as I/O)."""
    if isinstance(exc, OSError):
        return exc.strerror or first_line(exc)
    text = str(exc)
    if type(exc).__name__ == "SafetensorError" or type(exc) is Exception:  # safetensors', tokenizers' (Rust)
        m = _OS_ERROR_CODE.search(text)
        if m:
            return os.strerror(int(m.group(1) or m.group(2)))
        if "I/O error" in text or "IoError" in text:
            return first_line(exc)
        return None
    if isinstance(exc, RuntimeError) and any(s in text for s in _TORCH_WRITE):
        # Its message names no errno ("unexpected pos 576 vs 534" when the disk filled up).
        return f"torch's file writer failed (disk full or an I/O error: {first_line(exc)})"
    return None
