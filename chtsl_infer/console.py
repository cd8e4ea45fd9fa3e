"""Shared terminal output of every `chtsl` command, and the JSON readers/writers they share."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rich.console import Console

from chtsl_infer.errors import ChtslError
from chtsl_infer.utils import atomic_write_text

console = Console()
err_console = Console(stderr=True)


def iter_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) of each non-blank line of a JSONL file; a line that is not JSON
    raises ChtslError naming `path:line`. OSError/UnicodeDecodeError propagate to the caller."""
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise ChtslError(f"{path}:{lineno} is not valid JSON ({e.msg})") from None


def write_json(data: Any, path: str | Path | None) -> None:
    """Writes `data` as indented JSON to `path` ("-" = stdout) atomically; nothing when None."""
    if path is None:
        return
    text = json.dumps(data, indent=2, sort_keys=False, default=str)
    if str(path) == "-":
        sys.stdout.write(text + "\n")
        return
    try:
        atomic_write_text(path, text + "\n")
    except OSError as e:
        raise ChtslError(f"cannot write {path}: {e.strerror or e}") from None
