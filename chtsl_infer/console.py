"""Shared terminal output and the one-line error convention of every `chtsl` command."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rich.console import Console

console = Console()
err_console = Console(stderr=True)


class UserError(Exception):
    """Bad input: `chtsl` prints the message as one line and exits with code 2 (no traceback)."""


def iter_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) of each non-blank line of a JSONL file; a line that is not JSON
    raises UserError naming `path:line`. OSError/UnicodeDecodeError propagate to the caller."""
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno} is not valid JSON ({e.msg})") from None


def write_json(data: Any, path: str | Path | None) -> None:
    """Writes `data` as indented JSON to `path` ("-" = stdout) atomically; nothing when None."""
    if path is None:
        return
    text = json.dumps(data, indent=2, sort_keys=False, default=str)
    if str(path) == "-":
        sys.stdout.write(text + "\n")
        return
    target = Path(path)
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        tmp.write_text(text + "\n")
        tmp.replace(target)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write {target}: {e.strerror or e}") from None
