"""Compiling the C kernels on first use, the validated cache of built libraries, and the variant lookup.

Every `.c` file in `csrc/` is compiled into one shared library with the host C compiler (`$CC`, else
`cc`), trying `FLAG_SETS` in order (`-O3 -march=native -fopenmp`, the arm64 spelling `-mcpu=native`,
without OpenMP, plain `-O3`), always with `-fvisibility=hidden` so that only the `CHTSL_EXPORT`
functions of `csrc/kernels.h` (the table's) are exported. The library is cached in
`$CHTSL_CACHE_DIR/kernels` (default `~/.cache/chtsl/kernels`) as `spmm-KEY.so`, KEY hashed from the
sources and headers, the compiler, the flags and the host CPU's feature flags (so a shared home on a
mixed cluster never loads code built for another CPU), beside its build record `spmm-KEY.json`
(size and SHA-256 of the library, compiler, flags). It shares torch's OpenMP runtime (`libgomp.so.1`
is already loaded by torch) and is called through ctypes, which releases the GIL.

A cached library is loaded only after its size and checksum match its record: a truncated or
overwritten file (a full disk, a killed copy, another tool) would otherwise be mapped and crash the
process with SIGBUS on first use. A damaged entry is rebuilt with one warning line. Builds go to a
temporary directory and are renamed into place (the record first), so concurrent first uses never
load a partial file. A flag set that does not compile is recorded (`spmm-KEY.failed`), and the build
that falls back to the next set says so once; removing the cache directory retries every set.
Without a working compiler, `library()` is (None, why), callers use torch, and one warning line says so.

The library in force (`current()`, what `kernel()` looks functions up in) is the base build, or a
build variant (`table.BUILD_VARIANTS`: the same sources with -D flags, `variant_library`) that the
tuner chose on this machine; the first `current()` runs or reads the tuning (`tune.apply`, which
tune.py registers through `on_first_use`: the tuner times operations built on this module), which
also puts the tuned `KernelSettings` in force.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from chtsl_infer.kernels.table import KERNELS, CFunction, bind, check_layouts, probe, symbol, variant_defines
from chtsl_infer.utils import atomic_write_text, cache_dir, warn_once

CSRC = Path(__file__).with_name("csrc")
SOURCES = tuple(sorted(CSRC.glob("*.c")))  # built into one library
HEADERS = tuple(sorted(CSRC.glob("*.h")))  # included by SOURCES: part of the cache key
FLAG_SETS = (  # tried in order until one compiles
    ("-O3", "-march=native", "-fopenmp"),
    ("-O3", "-mcpu=native", "-fopenmp"),  # arm64 compilers spell it -mcpu
    ("-O3", "-march=native"),  # no OpenMP (e.g. Apple clang): single-threaded
    ("-O3",),
)
LINK_FLAGS = ("-shared", "-fPIC", "-fvisibility=hidden")  # every build: only CHTSL_EXPORT symbols are visible
NOT_BUILT = "not built"  # verify(): no library under that name yet (not damage)


@dataclass(frozen=True)
class Library:
    """A loaded, validated build: where it is, how it was built, its bound functions (symbol -> function),
    what `kernel_probe` reported, and which build variant it is ("" = the base build)."""

    path: Path
    compiler: str
    flags: tuple[str, ...]
    functions: dict[str, CFunction]
    probe: tuple[str, ...]
    variant: str = ""

    def probed(self) -> dict[str, list[str]]:
        """`kernel_probe`'s lines as key -> values ("tile_vw" -> ["16"])."""
        return {line.split()[0]: line.split()[1:] for line in self.probe if line.strip()}


def cpu_model() -> str:
    """The host CPU's model name as the OS reports it (x86: "model name"; arm64: the implementer and part)."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    if fields.get("model name"):
        return fields["model name"]
    if fields.get("CPU implementer"):
        return f"implementer {fields['CPU implementer']} part {fields.get('CPU part', '?')}"
    return platform.processor() or platform.machine() or "unknown CPU"


def _cpu_fingerprint() -> str:
    """The host CPU's identity for the cache key: its feature flags where the OS lists them."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}"


def _cache_dir() -> Path:
    return cache_dir() / "kernels"


def source_hash() -> str:
    """SHA-256 of the kernels' sources and headers (hex)."""
    return hashlib.sha256(b"\0".join(path.read_bytes() for path in SOURCES + HEADERS)).hexdigest()


def _cache_key(compiler: str, flags: tuple[str, ...]) -> str:
    """16 hex digits naming a built library: its sources and headers, compiler, flags and the host CPU."""
    return hashlib.sha256(b"\0".join([source_hash().encode(), compiler.encode(), " ".join(flags + LINK_FLAGS).encode(),
                                      _cpu_fingerprint().encode()])).hexdigest()[:16]


def record_path(target: Path) -> Path:
    """The build record beside a cached library: {"size", "sha256", "compiler", "flags"}."""
    return target.with_suffix(".json")


def _failed_path(target: Path) -> Path:
    return target.with_suffix(".failed")


def verify(target: Path) -> str | None:
    """None if the cached library `target` may be loaded: its size and SHA-256 are those its build record
    holds. Otherwise why not: `NOT_BUILT` when there is no library, else what is damaged."""
    try:
        data = target.read_bytes()
    except FileNotFoundError:
        return NOT_BUILT  # also a build between renaming its record and its library into place
    except OSError as exc:
        return f"unreadable: {exc.strerror}"
    try:
        record = json.loads(record_path(target).read_text(encoding="utf-8"))
        size, digest = int(record["size"]), str(record["sha256"])
    except FileNotFoundError:
        return "no build record"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"unreadable build record: {type(exc).__name__}"
    if len(data) != size:
        return f"{len(data)} bytes where {size} were built"
    if hashlib.sha256(data).hexdigest() != digest:
        return "its checksum differs from the build's"
    return None


def _run_compiler(argv: list[str], timeout: float) -> tuple[int, str]:
    """(exit code, stderr) of a compiler run; subprocess.TimeoutExpired after `timeout` seconds, with the
    compiler's whole process group killed (the driver's cc1 and as children too)."""
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.communicate()
        raise
    return proc.returncode, err


def _build(compiler: str, flags: tuple[str, ...], target: Path, timeout: float = 300) -> str | None:
    """Compiles SOURCES into `target` with its build record; None, or the compiler's error (then recorded
    in `_failed_path(target)`, so later processes skip this flag set). TimeoutExpired after `timeout` s."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:  # build aside, then rename:
        tmp_lib = Path(tmp) / target.name  # concurrent first uses never load a partial file
        code, stderr = _run_compiler([compiler, *flags, *LINK_FLAGS, "-o", str(tmp_lib), *map(str, SOURCES), "-lm"],
                                     timeout)
        if code != 0:
            error = (stderr.strip().splitlines() or [f"exit code {code}"])[-1]
            atomic_write_text(_failed_path(target), json.dumps({"error": error}) + "\n")
            return error
        data = tmp_lib.read_bytes()
        # The record first: a reader that finds the library also finds its record.
        atomic_write_text(record_path(target), json.dumps({
            "size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "compiler": compiler,
            "flags": list(flags + LINK_FLAGS)}) + "\n")
        os.replace(tmp_lib, target)
    return None


def _failed(target: Path) -> str | None:
    """The recorded compiler error of a flag set that did not compile, if any."""
    try:
        return str(json.loads(_failed_path(target).read_text(encoding="utf-8"))["error"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _load(target: Path, compiler: str, flags: tuple[str, ...], variant: str = "") -> Library:
    """dlopen a verified library and bind the table; RuntimeError (loud: a bug, not bad input) when the
    library and the table or the ctypes structs disagree."""
    functions = bind(ctypes.CDLL(str(target)))
    probed = probe(functions)
    check_layouts(probed)
    return Library(target, compiler, flags, functions, tuple(probed), variant)


def _ensure_built(compiler: str, flags: tuple[str, ...], target: Path, earlier: list[str],
                  timeout: float = 300) -> tuple[list[str], str]:
    """Makes `target` a verified library of this flag set, building it where it is absent or damaged:
    ([], a note for the warning line or "") or (why it is not, ""). `earlier`: the previous sets' errors;
    `timeout`: seconds a build may take."""
    label = f"{compiler} {' '.join(flags)}"
    problem = verify(target)
    if problem is None:
        return [], ""
    recorded = _failed(target)
    if recorded is not None:
        return [f"{label}: {recorded}"], ""
    damage = [] if problem == NOT_BUILT else [f"the cached {target} was damaged ({problem})"]
    if shutil.which(compiler) is None:
        return [*damage, f"no C compiler: {compiler!r} not found (set CC)"], ""
    try:
        error = _build(compiler, flags, target, timeout)
    except subprocess.TimeoutExpired:
        error = f"not built within {timeout:.0f} s"
    except (OSError, subprocess.SubprocessError) as exc:
        error = str(exc)
    if error is None and (mismatch := verify(target)) is not None:  # e.g. a concurrent repair meanwhile
        error = f"the new build does not match its record ({mismatch})"
    if error is not None:
        return [*damage, f"{label}: {error}"], ""
    if damage:
        return [], f"{damage[0]}; rebuilt it"
    if earlier:
        return [], f"built the CPU kernels with `{label}` after: {'; '.join(earlier)} (to retry, remove {_cache_dir()})"
    return [], ""


def _compile() -> tuple[Library | None, str, str]:
    """(library, how it was built, a note for one warning line or "") or (None, why not, "")."""
    compiler = os.environ.get("CC", "cc")
    errors: list[str] = []
    for flags in FLAG_SETS:
        target = _cache_dir() / f"spmm-{_cache_key(compiler, flags)}.so"
        failed, note = _ensure_built(compiler, flags, target, errors)
        if not failed:
            try:
                return _load(target, compiler, flags), f"{compiler} {' '.join(flags)} ({target})", note
            except OSError as exc:
                failed = [f"loading {target}: {exc}"]
        errors.extend(failed)
    return None, "; ".join(dict.fromkeys(errors)) or "no flag set to try", ""


@functools.cache
def library() -> tuple[Library | None, str]:
    """(the compiled kernels, how they were built) or (None, why not), built or loaded on the first call.
    Prints at most one warning line: what went wrong on the way, or that torch's operations are used."""
    lib, how, note = _compile()
    if lib is None:  # the sparse backend and training still work, only slower
        warn_once(f"the CPU kernels could not be built ({how}); using torch's sparse operations instead (slower)")
    elif note:
        warn_once(note)
    return lib, how


_variants: dict[tuple[Path, str], Library] = {}  # (base path, variant name) -> the loaded variant
_in_force: dict[Path, Library] = {}  # base library path -> the build in force (itself or a tuned variant)
_forced: list[Library] = []  # use_library's stack


def variant_library(name: str, timeout: float = 300) -> tuple[Library | None, str]:
    """(build variant `name` of the base library — one `table.BUILD_VARIANTS` entry or several joined by
    "+" —, "") — built on first use, cached beside it — or (None,
    why not: no base library, a compiler error, not built within `timeout` seconds)."""
    base = library()[0]
    if base is None:
        return None, "no compiled kernels"
    key = (base.path, name)
    if key not in _variants:  # failures are not kept: a compiler error is recorded on disk, a timeout retried
        flags = base.flags + variant_defines(name)
        target = _cache_dir() / f"spmm-{_cache_key(base.compiler, flags)}.so"
        failed, _ = _ensure_built(base.compiler, flags, target, [], timeout)
        if failed:
            return None, "; ".join(failed)
        try:
            _variants[key] = _load(target, base.compiler, flags, name)
        except OSError as exc:
            return None, f"loading {target}: {exc}"
    return _variants[key], ""


# What puts a machine's tuning in force on a base library's first use: `tune.apply`, registered by
# tune.py (imported with this package). The tuner times operations that are built on this module, so
# it sits above it and hands itself down rather than being imported here.
_first_use: Callable[[Library], Library] | None = None


def on_first_use(choose: Callable[[Library], Library]) -> None:
    """`choose(base)` picks the build in force (and installs its settings) the first time `current()`
    serves `base`: the tuner's hook."""
    global _first_use
    _first_use = choose


def current() -> Library | None:
    """The build in force (None without the compiled kernels). The first call for a base library puts
    this machine's tuning in force (`tune.apply` through `on_first_use`: cached measurements, or tuning
    now), which may pick a build variant; inside `use_library(lib)`, `lib`."""
    if _forced:
        return _forced[-1]
    base = library()[0]
    if base is None:
        return None
    chosen = _in_force.get(base.path)
    if chosen is None:
        _in_force[base.path] = base  # in force while the tuner times it (its calls come back here)
        chosen = _in_force[base.path] = _first_use(base) if _first_use else base
    return chosen


@contextmanager
def use_library(lib: Library) -> Iterator[Library]:
    """`lib` (a variant, or the base build) is the build in force inside the block (the tuner, tests)."""
    _forced.append(lib)
    try:
        yield lib
    finally:
        _forced.pop()


def put_in_force(lib: Library) -> None:
    """Makes `lib` (the base build or one of its variants) the build in force for its base library from now on."""
    base = library()[0]
    if base is not None:
        _in_force[base.path] = lib


def kernel(name: str, dtype: torch.dtype | None = None, index: torch.dtype | None = None) -> CFunction | None:
    """The compiled variant of table entry `name` for value dtype `dtype` and column-index dtype `index`
    (each only where the entry has such variants) in the build in force (`current()`), or None without
    the compiled library. LookupError for a variant the table does not declare."""
    c_name = symbol(name, dtype, index)  # LookupError first: a wrong lookup is a bug with or without the library
    lib = current()
    return None if lib is None else lib.functions[c_name]


def require(name: str, dtype: torch.dtype | None = None, index: torch.dtype | None = None) -> CFunction:
    """`kernel(name, dtype, index)` for callers that need it: RuntimeError saying why without the library."""
    fn = kernel(name, dtype, index)
    if fn is None:
        raise RuntimeError(f"{name} needs the compiled CPU kernels: {library()[1]}")
    return fn


def cpu_kernel(name: str, *tensors: torch.Tensor, index: torch.dtype | None = None) -> CFunction | None:
    """`kernel(name, …)` for operands that are all CPU tensors of one value dtype the entry has a variant
    for (entries without dtype variants: any dtypes), and an `index` dtype it has a variant for; None
    where that does not hold or without the compiled library (the caller then uses torch)."""
    spec = KERNELS[name]
    if not all(t.device.type == "cpu" for t in tensors):
        return None
    dtype = None
    if spec.dtypes:
        dtypes = {t.dtype for t in tensors}
        if len(dtypes) != 1 or (dtype := dtypes.pop()) not in spec.dtypes:
            return None
    if (index is not None or spec.indexes) and index not in spec.indexes:
        return None
    return kernel(name, dtype, index)


def cpu_kernel_status() -> tuple[bool, str]:
    """(whether the compiled CPU kernels are in use, how they were built or why they are not)."""
    lib, how = library()
    return lib is not None, how


@dataclass(frozen=True)
class KernelInfo:
    """What the CPU kernels in use are, for reports (`chtsl bench --json`, `chtsl info --kernels`): how or
    why not (`detail`), the CPU model (`cpu`), the build in force — its path, compiler and flags, build
    variant ("" = the base build), the instruction sets the compiler targeted (`isa`), whether it has
    OpenMP, floats per tile vector (`tile_vw`), whether the bf16 gather uses AVX512-BF16 (`bf16_dot`),
    whether the int8 gather takes 16 links per AVX-512 vgatherdps (`gather16`), whether the int8-activation
    products use AVX-512 VBMI/VNNI (`a8_vector`; else plain C) —, the run-time
    settings in force, the built-in defaults, and how the settings were chosen (`tuning`:
    `tune.TuneStatus.as_json`)."""

    available: bool
    detail: str
    cpu: str = ""
    path: str | None = None
    compiler: str | None = None
    flags: tuple[str, ...] = ()
    variant: str = ""
    isa: tuple[str, ...] = ()
    openmp: bool = False
    tile_vw: int | None = None
    bf16_dot: bool = False
    gather16: bool = False
    a8_vector: bool = False
    settings: dict[str, int] = field(default_factory=dict)
    defaults: dict[str, int] = field(default_factory=dict)
    tuning: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return asdict(self)
