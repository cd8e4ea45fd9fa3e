"""The library's error type and how a caught exception becomes one line.

Library code raises `ChtslError` for bad input (a wrong name, a missing file, a value out of
range); only `chtsl_infer.cli.main` turns it into `error: ...` and exit code 2. It is a
`ValueError`, so Python callers that already catch `ValueError` keep working.
"""

from __future__ import annotations


class ChtslError(ValueError):
    """Bad input, with a one-line message naming what is wrong and what is valid."""


def first_line(exc: BaseException) -> str:
    """The first non-blank line of `str(exc)`, or the exception's type name when it has no text
    (third-party errors often carry multi-line messages; a one-line error keeps only the head)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
