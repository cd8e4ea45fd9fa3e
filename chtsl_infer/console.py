"""Shared terminal output and the one-line error convention of every `chtsl` command."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stdout
from pathlib import Path
from typing import Any

from rich.console import Console

from chtsl_infer.errors import ChtslError, WriteFailure
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


# Files that make a directory a checkpoint or an export: nothing of ours may replace a file there.
MODEL_DIR_MARKERS = ("config.json", "model.safetensors", "model.onnx", "trainer_state")


def _in_model_dir(target: Path) -> Path | None:
    """The checkpoint/export directory `target` would be written into (its parent or grandparent,
    e.g. CKPT/trainer_state/state.json), or None."""
    for d in (target.parent, target.parent.parent):
        if any((d / m).exists() for m in MODEL_DIR_MARKERS):
            return d
    return None


def check_output_file(path: str | Path | None, force: bool = False, flag: str = "--json") -> None:
    """ChtslError unless a report may be written to `path` ("-" = stdout, None = nowhere): never onto
    a file of a checkpoint or export, never onto a directory, onto another existing file only with
    `force`, and only into an existing directory. Called up front and again right before writing."""
    if path is None or str(path) == "-":
        return
    target = Path(path)
    if target.is_dir():
        raise ChtslError(f"{flag} {target} is a directory; give a file name")
    if target.exists() or target.is_symlink():
        owner = _in_model_dir(target)
        if owner is not None:
            raise ChtslError(f"{flag} {target} would replace a file of the checkpoint or export {owner}; "
                            f"choose another file")
        if not force:
            raise ChtslError(f"{flag} {target} already exists; pass --force to replace it")
    if not target.parent.is_dir():
        raise ChtslError(f"{flag} {target}: the directory {target.parent} does not exist")


def check_output_dir(path: str | Path, flag: str = "--out") -> Path:
    """`path` as a Path once proven usable as an output directory, without creating it: not a file,
    and a temporary file can be made in it (or, while it does not exist, in its nearest existing
    ancestor) and beside it (a checkpoint swap writes a sibling). ChtslError naming the reason."""
    import tempfile

    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ChtslError(f"{flag} {out} exists and is not a directory")
    probes = [out] if out.is_dir() else []
    ancestor = out.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ChtslError(f"cannot write to {flag} {out}: {ancestor} is not a directory")
    probes.append(ancestor)
    try:
        for where in probes:
            fd, probe = tempfile.mkstemp(prefix=".chtsl-probe-", dir=where)
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        raise ChtslError(f"cannot write to {flag} {out}: {e.strerror or e}") from None
    return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def stale_siblings(path: Path, kind: str) -> list[Path]:
    """`.NAME.<kind>-PID[-*]` siblings of `path` (temporary or set-aside copies our writers name
    with their process id) whose process is no longer running: leftovers of a killed run."""
    prefix = f".{path.name}.{kind}-"
    found = []
    for p in path.parent.glob(f"{prefix}*"):
        pid = p.name[len(prefix):].split("-", 1)[0]
        if not pid.isdigit() or not _pid_alive(int(pid)):
            found.append(p)
    return found


@contextmanager
def json_on_stdout(path: str | Path | None) -> Iterator[None]:
    """With `--json -` stdout carries the JSON only: inside this block what the command prints
    (tables, streamed text, progress) goes to stderr instead, and `write_json` after it writes the
    JSON to stdout. A no-op for any other `path`."""
    if path is None or str(path) != "-":
        yield
        return
    with redirect_stdout(sys.stderr):  # `console` looks sys.stdout up on every write
        yield


def write_json(data: Any, path: str | Path | None, force: bool = False, flag: str = "--json") -> None:
    """Writes `data` as indented JSON to `path` ("-" = stdout) atomically; nothing when None.
    `check_output_file` guards it (no checkpoint/export file, no existing file without `force`)."""
    if path is None:
        return
    text = json.dumps(data, indent=2, sort_keys=False, default=str)
    if str(path) == "-":
        sys.stdout.write(text + "\n")
        return
    check_output_file(path, force, flag)
    try:
        atomic_write_text(path, text + "\n")
    except OSError as e:
        raise WriteFailure(f"cannot write {path}: {e.strerror or e}") from None
