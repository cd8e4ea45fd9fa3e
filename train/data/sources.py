"""Training text sources (`--data`): the builtin corpus and local files, split train/validation.

- `builtin` (default): an offline corpus built deterministically from the documentation every
  CPython ships (`pydoc_data.topics` and the stdlib's docstrings, read with `ast`, nothing imported);
- `PATH`: a file, directory or glob of `.txt` (documents separated by blank lines), `.jsonl` (a
  `text` field per line) or `.parquet` (a `text` column).

In-memory sources split documents into train/validation by a hash of their text (5 % validation),
so the split does not depend on file order. The hub sources (`c4`, `owt`) stream instead:
`train.data.streaming`.
"""

from __future__ import annotations

import ast
import functools
import glob
import os
import stat
import sysconfig
import zlib
from collections.abc import Sequence
from pathlib import Path

from chtsl_infer.console import iter_jsonl
from chtsl_infer.errors import ChtslError, first_line

VAL_FRACTION_PER_MILLE = 50  # 5 % of documents go to validation
_BUILTIN_DOC_CHARS = 600  # builtin paragraphs are grouped into documents of about this size
_SKIP_STDLIB = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "ensurepip",
                "turtledemo", "__pycache__", "tkinter"}


def _paragraph_documents(text: str, target_chars: int = _BUILTIN_DOC_CHARS) -> list[str]:
    """Greedy groups of consecutive blank-line-separated paragraphs of about `target_chars`."""
    docs, current = [], ""
    for para in (p.strip() for p in text.split("\n\n")):
        if not para:
            continue
        current = f"{current}\n\n{para}" if current else para
        if len(current) >= target_chars:
            docs.append(current)
            current = ""
    if current:
        docs.append(current)
    return docs


@functools.lru_cache(maxsize=1)
def _builtin_documents() -> tuple[str, ...]:
    return tuple(builtin_documents_uncached())


def builtin_documents() -> list[str]:
    """The built-in corpus (computed once per process); see `builtin_documents_uncached`."""
    return list(_builtin_documents())


def builtin_documents_uncached() -> list[str]:
    """The built-in corpus: pydoc topics and stdlib docstrings (>= 200 chars) as ~600-char documents.

    Deterministic for a given CPython (sorted topics, sorted files, `ast` walk order).
    """
    import pydoc_data.topics

    texts = [pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)]
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if any(p in _SKIP_STDLIB or p.startswith("test") for p in parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 200:
                    texts.append(doc)
    return [d for t in texts for d in _paragraph_documents(t)]


def _expand_paths(spec: str) -> list[Path]:
    """The .txt/.jsonl/.parquet files `spec` names (a file, a directory searched recursively, or a glob)."""
    p = Path(spec).expanduser()
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in (".txt", ".jsonl", ".parquet"))
    elif p.is_file():
        files = [p]
    elif any(c in spec for c in "*?["):
        files = sorted(Path(f) for f in glob.glob(os.path.expanduser(spec), recursive=True) if Path(f).is_file())
    elif p.exists():  # a device, FIFO or socket: reading it could block forever or never end
        raise ChtslError(f"data path {spec} is {_file_kind(p)}, not a file or directory of .txt, .jsonl or .parquet "
                         f"files")
    else:
        raise ChtslError(f"data path not found: {spec}")
    if not files:
        raise ChtslError(f"no .txt, .jsonl or .parquet files in {spec}")
    return files


def _file_kind(path: Path) -> str:
    """What the existing non-regular, non-directory `path` is, for a message ("a FIFO (named pipe)")."""
    mode = path.stat().st_mode
    for test, kind in ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "not a regular file"


def _read_file(path: Path) -> list[str]:
    try:
        if path.suffix == ".jsonl":
            docs = []
            for lineno, record in iter_jsonl(path):
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise ChtslError(f"{path}:{lineno} has no string `text` field")
                docs.append(record["text"])
            return docs
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            if "text" not in table.column_names:
                raise ChtslError(f"{path} has no `text` column (columns: {', '.join(table.column_names)})")
            return [t for t in table.column("text").to_pylist() if isinstance(t, str)]
        return [d.strip() for d in path.read_text(encoding="utf-8").split("\n\n")]
    except ChtslError:
        raise
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ChtslError(f"cannot read {path}: {first_line(e)}") from None


def local_documents(spec: str) -> list[str]:
    """Non-empty documents of the files named by `spec` (file, directory or glob), in path order."""
    docs = [d for f in _expand_paths(spec) for d in _read_file(f) if d and d.strip()]
    if not docs:
        raise ChtslError(f"the corpus {spec} is empty (no non-blank documents)")
    return docs


def split_documents(docs: Sequence[str]) -> tuple[list[str], list[str]]:
    """(train, validation): a document is validation iff crc32(text) mod 1000 < 50 (5 %)."""
    train, val = [], []
    for d in docs:
        (val if zlib.crc32(d.encode("utf-8")) % 1000 < VAL_FRACTION_PER_MILLE else train).append(d)
    if not train or not val:
        raise ChtslError(f"the corpus is too small to split into train and validation ({len(docs)} documents)")
    return train, val


def check_corpus(data: str) -> None:
    """ChtslError (one line) unless a run could train on the in-memory source `data`, checked before
    anything is written (e.g. by `chtsl sweep` for all its cells): `builtin` passes; a PATH must name
    readable .txt/.jsonl/.parquet files with a `text` column or field, not empty, large enough for
    both splits. The files are read as a run reads them (seconds for tens of MB)."""
    if data != "builtin":
        split_documents(local_documents(data))


def train_val_documents(data: str) -> tuple[list[str], list[str]]:
    """(train, validation) documents of an in-memory source: `builtin` or a PATH."""
    docs = builtin_documents() if data == "builtin" else local_documents(data)
    return split_documents(docs)
