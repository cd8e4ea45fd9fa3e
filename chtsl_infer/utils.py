"""Small shared helpers: atomic file and directory writes, the one-writer lock of an output
directory, and the device of a command.

Every writer goes through `atomic_path` (files) or `publish_dir` (directories), so a crash or a
full disk never leaves a half-written file under the final name; `dir_lock` keeps two writers out
of one output directory. Torch is imported only inside `resolve_device`, so the CLI's `--help`
stays free of it.
"""

from __future__ import annotations

import ctypes
import fcntl
import functools
import os
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from chtsl_infer.errors import ChtslError, Interrupted


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yields a temporary path beside `target` to write; renames it onto `target` when the block
    ends normally and removes it otherwise. The temporary name keeps `target`'s suffix (writers
    such as matplotlib pick the format from it) and the file gets the usual umask mode."""
    target = Path(target)
    # `.NAME.tmp-PID-…`: the process id lets `console.stale_siblings` tell a killed writer's leftover.
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.tmp-{os.getpid()}-", suffix=target.suffix, dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(target: str | Path, text: str) -> None:
    """Writes `text` (UTF-8) to `target` atomically."""
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def make_temp_dir(target: Path) -> Path:
    """An empty directory beside `target` (same file system, so `publish_dir` is a rename), with the
    usual umask mode; `publish_dir` or the caller's cleanup removes it."""
    # `.NAME.tmp-PID-…`: the process id lets `console.stale_siblings` tell a killed writer's leftover.
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp creates 0700
    return tmp


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swaps two directories (Linux renameat2 RENAME_EXCHANGE); False if unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def backup_path(path: Path) -> Path:
    """Where `publish_dir` keeps the previous directory between its two fallback renames: hidden,
    `.NAME.old`, so that it never takes (and removes) a directory of the user's."""
    return path.with_name(f".{path.name}.old")


def publish_dir(tmp: Path, target: Path) -> None:
    """Makes the complete directory `tmp` become `target`, replacing any previous one atomically
    (one RENAME_EXCHANGE; elsewhere two renames through `backup_path(target)`)."""
    if not target.exists():
        tmp.rename(target)
    elif _exchange(tmp, target):
        shutil.rmtree(tmp, ignore_errors=True)  # now holds the previous directory
    else:
        backup = backup_path(target)
        shutil.rmtree(backup, ignore_errors=True)
        target.rename(backup)
        tmp.rename(target)
    backup = backup_path(target)
    if backup.exists():
        shutil.rmtree(backup, ignore_errors=True)


def lock_path(path: str | Path) -> Path:
    """The lock file `dir_lock` holds for the output directory `path`: `.NAME.lock` beside it."""
    target = Path(path).resolve()  # one lock whatever the spelling (relative, symlinked) of the path
    return target.with_name(f".{target.name}.lock")


@contextmanager
def dir_lock(path: str | Path) -> Iterator[Path]:
    """Holds the exclusive writer lock of the output directory `path` for the block (yields the
    lock file). A second writer of the same directory, in this or another process, gets at once a
    ChtslError naming the holder's PID; readers take no lock.

    The lock is an `flock` on `.NAME.lock` beside `path` (its parent is created if needed): the
    kernel drops it when the holder exits, however it dies, so a killed run never leaves a stale
    lock. It lives beside the directory, not inside it, because writers replace the directory as a
    whole (a checkpoint swap, `export --force`) and a lock inside would leave with the old one. The
    file holds the holder's PID and is removed on release.
    """
    target = Path(path).resolve()
    lock = lock_path(target)
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = _acquire(lock, target)
    except OSError as e:
        raise ChtslError(f"cannot lock {target}: cannot write {lock}: {e.strerror or e}") from None
    try:
        yield lock
    finally:
        with suppress(OSError):  # a file system turned read-only keeps the file; the lock goes anyway
            lock.unlink(missing_ok=True)  # while still held: a process that opened it sees the unlink
        os.close(fd)


def lock_holder(path: str | Path) -> int | None:
    """The PID of the live process holding `dir_lock(path)`, or None. Reads the PID the holder wrote
    and checks that the process exists, without touching the lock (a reader must never make a
    starting writer fail)."""
    try:
        pid = int(lock_path(path).read_text(encoding="ascii").strip())
        os.kill(pid, 0)
    except (OSError, ValueError):  # no lock file, no PID in it yet, or its process is gone
        return None
    return pid


def _acquire(lock: Path, target: Path) -> int:
    """The open, flock-ed descriptor of `lock`, with this process's PID written in it."""
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode("ascii", "replace").strip()
                who = f"process {holder}" if holder.isdigit() else "another process"
                raise ChtslError(f"{target} is being written by {who} (lock {lock}); wait for it to finish "
                                 f"or choose another output directory") from None
            # The previous holder unlinks the file on release: a lock won on an unlinked file
            # (opened just before that) guards nothing, so take the one now at the path instead.
            held = os.fstat(fd)
            try:
                now = os.stat(lock)
            except FileNotFoundError:
                now = None
            if now is not None and (held.st_dev, held.st_ino) == (now.st_dev, now.st_ino):
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


# Signals held back by `deferred_interrupts` (depth of nesting, the first signal that arrived).
_deferral: dict[str, int | None] = {"depth": 0, "pending": None}


def _raise_interrupted(signum: int, frame: object) -> None:
    if _deferral["depth"] and _deferral["pending"] is None:
        _deferral["pending"] = signum  # raised when the deferring block ends; a second signal raises now
        return
    raise Interrupted(signum)


@contextmanager
def interruptible() -> Iterator[None]:
    """In the block, SIGINT and SIGTERM raise `Interrupted` (the KeyboardInterrupt a command turns
    into one line and exit code 130/143) instead of killing the process silently (SIGTERM); the
    previous handlers come back after it. Outside the main thread (where Python cannot install
    handlers) it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _raise_interrupted) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Holds back the `Interrupted` of a signal arriving in the block until the block has finished
    (a checkpoint being written completes and can be named); a second signal interrupts at once."""
    _deferral["depth"] += 1
    completed = False
    try:
        yield
        completed = True
    finally:
        _deferral["depth"] -= 1
        if not _deferral["depth"]:
            pending, _deferral["pending"] = _deferral["pending"], None
            if pending is not None and completed:  # a block that failed reports its own error
                raise Interrupted(pending)


#: The largest `--seed`: numpy's range, well inside every generator a run seeds (the data order
#: seeds torch with `seed · 1_000_003 + epoch`, which must stay below 2**64).
SEED_MAX = 2**32 - 1


def check_seed(seed: int, flag: str = "--seed") -> None:
    """ChtslError unless `seed` is in [0, SEED_MAX]."""
    if not 0 <= seed <= SEED_MAX:
        raise ChtslError(f"{flag} must be in [0, {SEED_MAX}], got {seed}")


def check_utf8(text: str, flag: str) -> None:
    """ChtslError unless `text` is valid Unicode text: a command-line argument that is not UTF-8
    reaches Python with its bad bytes as lone surrogates (PEP 383), which no tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = os.fsencode(text[e.start:e.end])
        raise ChtslError(f"{flag} is not valid UTF-8 (byte 0x{bad[:1].hex()} at character {e.start}); "
                         f"pass UTF-8 text") from None


#: The one spelling of `--dtype` in every command; torch's long names are accepted too. DTYPES are the
#: float dtypes a model computes in; PACKED_DTYPES add `int8`, weights a packed export stores as int8
#: with per-row scales (docs/formats.md §2), computed with fp32 activations.
DTYPES = ("fp32", "bf16", "fp16")
PACKED_DTYPES = (*DTYPES, "int8")
_DTYPE_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
_TORCH_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "int8": "int8"}


def parse_dtype(value: str, choices: tuple[str, ...] = DTYPES, what: str = "dtype") -> str:
    """The canonical name (`fp32`, `bf16`, `fp16`, `int8` or `auto` when in `choices`) of a `--dtype`
    value; `float32`/`bfloat16`/`float16` are read as their short names. ChtslError otherwise
    ("unknown `what` ...")."""
    name = _DTYPE_ALIASES.get(value, value)
    if name not in choices:
        raise ChtslError(f"unknown {what} {value!r}; valid: {', '.join(choices)}")
    return name


def inference_dtype(value: str, device: str, stored: str | None = None) -> str:
    """The canonical `--dtype` of an inference command: `value` parsed (int8: int8 weights, fp32
    activations); `auto` = fp32 on CPU, bf16 on CUDA, except an int8 export (`stored` "int8", its
    packed dtype) on CPU, which keeps its int8 weights."""
    name = parse_dtype(value, ("auto", *PACKED_DTYPES))
    if name != "auto":
        return name
    return "bf16" if device != "cpu" else "int8" if stored == "int8" else "fp32"


def torch_dtype(name: str):  # -> torch.dtype
    """The torch dtype of a canonical `--dtype` name (`parse_dtype`)."""
    import torch

    return getattr(torch, _TORCH_NAMES[name])


def cache_dir() -> Path:
    """The root of chtsl's caches (trained tokenizers, the compiled kernel): `$CHTSL_CACHE_DIR`,
    else `~/.cache/chtsl`. The old name `$CHTSL_CACHE` is still read, with a deprecation line."""
    root = os.environ.get("CHTSL_CACHE_DIR")
    if not root and os.environ.get("CHTSL_CACHE"):
        root = os.environ["CHTSL_CACHE"]
        warn_once("CHTSL_CACHE is deprecated; set CHTSL_CACHE_DIR instead")
    return Path(root) if root else Path.home() / ".cache" / "chtsl"


@functools.cache
def warn_once(message: str) -> None:
    """Prints `warning: message` on stderr, once per process for each message."""
    sys.stderr.write(f"warning: {message}\n")


def resolve_device(device: str | None = "auto", local_rank: int | None = None, flag: str = "--device") -> str:
    """The torch device string of a `--device` value: `auto`/None is `cuda` when available, else
    `cpu`; `cuda` (or `cuda:N`) must be available. Under torchrun (`local_rank` given) a plain
    `cuda` becomes this process's `cuda:<local_rank>`. ChtslError naming `flag` on anything else."""
    import torch

    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return device
    if device != "cuda" and not (device.startswith("cuda:") and device[5:].isdigit()):
        raise ChtslError(f"unknown {flag} {device!r}; valid: auto, cpu, cuda, cuda:N")
    if not torch.cuda.is_available():
        raise ChtslError(f"{flag} {device}: CUDA is not available on this machine (no CUDA device)")
    if device == "cuda" and local_rank is not None:
        device = f"cuda:{local_rank}"
    return device
