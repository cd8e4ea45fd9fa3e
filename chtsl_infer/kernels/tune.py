"""Self-tuning: on first use on a machine, the kernels' settings are timed and the fastest cached.

The first kernel call of a process (`build.current()`) calls `apply(base library)`: it reads this
machine's tuning from the cache, or tunes now (once per machine, ≤ `CHTSL_TUNE_BUDGET` seconds,
default 20, one progress line on stderr), then puts the chosen `KernelSettings` in force and returns
the build to use (the base library or a build variant).

What is tuned:
- every `KernelSettings` field over `CANDIDATES`, by coordinate descent from the built-in defaults
  (one pass, in `CANDIDATES`' order): a value replaces the current one only where the workloads it
  changes (`workloads.py`: representative synthetic calls, ~1 ms each) run at least `MARGIN` faster —
  the geometric mean of median-time ratios, the two settings timed alternately, `REPEATS` times
  each — so noise does not flip a setting;
- then each `table.BUILD_VARIANTS` entry that applies to this CPU (e.g. `vw8`, 8-float tile vectors
  on an AVX-512 build; `g8`, gathers without vgatherdps), on top of those accepted before it (the
  build "vw8+g8" has both): compiled within what is left of the budget and timed the same way on the
  workloads that run the code path it changes.
Where the budget runs out, the rest keeps its defaults (the record says so: "complete": false).

Where: `$CHTSL_CACHE_DIR/kernels/tune-KEY.json` (default `~/.cache/chtsl/kernels`), beside the
compiled library; KEY hashes the CPU model, the library's name (itself a hash of the kernel sources,
compiler, flags and CPU feature flags), the thread count, the settings' fields and `SCHEMA`. The
record holds a SHA-256 of its content: a damaged or truncated file is tuned anew with one warning
line. It also holds the share of the CPUs other processes took while it was measured: above
`LOAD_LIMIT` it was measured under load, and the first process that starts on an idle machine
(`omp.machine_idle`) tunes anew, with one warning line. One process tunes at a time (an flock on
`tune-KEY.lock`; the others wait for its result and read it), and the file is written to a temporary
name and renamed. An unwritable cache directory
keeps the built-in defaults, with one warning line.

Environment: `CHTSL_TUNE=0` turns tuning off (built-in defaults, no cache read); `CHTSL_TUNE_BUDGET`
is the seconds one tuning may take. `chtsl info --kernels` shows the result, `--retune` tunes anew.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

import torch

from chtsl_infer import omp
from chtsl_infer.errors import ChtslError
from chtsl_infer.kernels import build, workloads
from chtsl_infer.kernels.settings import KernelSettings, install
from chtsl_infer.kernels.settings import settings as settings_in_force
from chtsl_infer.kernels.table import BUILD_VARIANTS, variant_applies
from chtsl_infer.utils import atomic_write_text, warn_once

SCHEMA = 1
BUDGET_S = 20.0  # default seconds for one tuning, compiling build variants included
MARGIN = 0.03  # a candidate must be this much faster (geometric mean over the workloads it changes)
REPEATS = 5  # timed samples per setting and workload (median)
MIN_SAMPLE_S = 1e-3  # a sample repeats its call until it takes this long
MISSING = "missing"  # read_record(): no file (not damage)
LOAD_LIMIT = 0.1  # a tuning during which other processes took more of the CPUs was measured under load

# The values tried per field (each field's default among them), in the order the search visits them.
CANDIDATES: dict[str, tuple[int, ...]] = {
    "tile_bytes": (1 << 18, 1 << 19, 1 << 20, 1 << 21),
    "gather_below": (1, 2, 3, 4, 5),
    "chunks_per_thread": (1, 2, 4, 8),
    "decode_item_bytes": (16 << 10, 32 << 10, 64 << 10, 128 << 10, 256 << 10),
    "attn_min_work": (1 << 12, 1 << 14, 1 << 16, 1 << 18, 1 << 20),
    "mm_tile": (16, 32, 64),
    "sddmm_tile": (16, 32, 64),
    "sddmm_tile_bytes": (1 << 17, 1 << 18, 1 << 19, 1 << 20, 1 << 21),
    "widen_deltas": (0, 1),
}


@dataclass(frozen=True)
class TuneStatus:
    """How the settings in force were chosen.

    state: "tuned" (measured by this process), "cached" (read from `path`), "off" (CHTSL_TUNE=0),
    "defaults" (tuning could not run or be kept: `detail` says why), "not yet" (no kernel used yet).
    record: the tuning record (`run_tuning`) where there is one."""

    state: str
    detail: str
    path: str | None = None
    record: dict[str, Any] | None = None

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


_status = TuneStatus("not yet", "the kernels have not been used yet")


def status() -> TuneStatus:
    """How this process's kernel settings were chosen."""
    return _status


def enabled() -> bool:
    """Whether tuning is on: `CHTSL_TUNE` unset, 1/on/yes/true; off for 0/off/no/false. ChtslError otherwise."""
    value = os.environ.get("CHTSL_TUNE", "1").strip().lower()
    if value in ("0", "off", "no", "false"):
        return False
    if value in ("", "1", "on", "yes", "true"):
        return True
    raise ChtslError(f"CHTSL_TUNE must be 0 or 1 (off or on), got {value!r}")


def budget() -> float:
    """Seconds one tuning may take: `CHTSL_TUNE_BUDGET`, default `BUDGET_S`. ChtslError unless positive."""
    text = os.environ.get("CHTSL_TUNE_BUDGET", "").strip()
    if not text:
        return BUDGET_S
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ChtslError(f"CHTSL_TUNE_BUDGET must be a positive number of seconds, got {text!r}")
    return value


# --- the cache --------------------------------------------------------------------------------------

def tune_dir() -> Path:
    """Where tuning records live: beside the compiled libraries."""
    return build._cache_dir()


def record_key(base: build.Library, threads: int) -> dict[str, Any]:
    """What a tuning depends on: CPU model, the instructions the build targets, the library (its name
    hashes sources, compiler, flags and CPU feature flags), the sources' hash, the thread count."""
    return {"cpu": build.cpu_model(), "isa": base.probed().get("isa", []), "library": base.path.name,
            "sources_sha256": build.source_hash(), "threads": threads}


def record_path(base: build.Library, threads: int) -> Path:
    """`tune-KEY.json` for this machine, library and thread count."""
    key = json.dumps([SCHEMA, record_key(base, threads), [f.name for f in fields(KernelSettings)]], sort_keys=True)
    return tune_dir() / f"tune-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def _checksum(record: dict[str, Any]) -> str:
    body = {k: v for k, v in record.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def read_record(path: Path, base: build.Library, threads: int) -> tuple[dict[str, Any] | None, str]:
    """(the valid record at `path`, "") or (None, why not: `MISSING`, or what is damaged)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None, MISSING
    except (OSError, UnicodeDecodeError) as exc:
        return None, f"unreadable: {exc}"
    try:
        record = json.loads(text)
    except ValueError:
        return None, f"not JSON ({len(text)} bytes)"
    problem = validate_record(record, base, threads)
    return (None, problem) if problem else (record, "")


def validate_record(record: Any, base: build.Library, threads: int) -> str:
    """"" if `record` is a whole tuning record of this version for `base` at `threads` threads, else what
    is wrong with it."""
    if not isinstance(record, dict) or record.get("schema") != SCHEMA:
        return "not a tuning record of this version"
    if record.get("sha256") != _checksum(record):
        return "its checksum differs from its content"
    if record.get("key") != record_key(base, threads):
        return "it was measured for another CPU, library or thread count"
    settings = record.get("settings")
    if not isinstance(settings, dict) or set(settings) != {f.name for f in fields(KernelSettings)}:
        return "its settings are not KernelSettings' fields"
    try:
        KernelSettings(**settings)
    except (TypeError, ValueError) as exc:
        return f"invalid settings: {exc}"
    variant = record.get("variant")
    if not isinstance(variant, str) or variant and not variant_applies(variant, base.probed()):
        return f"unknown build variant {variant!r}"
    return ""


@contextlib.contextmanager
def _locked(path: Path, timeout: float) -> Iterator[bool]:
    """An exclusive flock on `path` (created), waiting at most `timeout` seconds; yields whether it was
    taken (no fcntl: True, unlocked). OSError where the file cannot be created."""
    with open(path, "a+b") as handle:
        try:
            import fcntl
        except ImportError:  # Windows: no lock; the rename still keeps the record whole
            yield True
            return
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    yield False
                    return
                time.sleep(0.05)
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --- timing -----------------------------------------------------------------------------------------

@contextlib.contextmanager
def _in_force(settings: KernelSettings, lib: build.Library) -> Iterator[None]:
    previous = install(settings)
    try:
        with build.use_library(lib):
            yield
    finally:
        install(previous)


def _sample(run: Callable[[], object], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        run()
    return (time.perf_counter() - start) / calls


def compare(work: list[Any], a: tuple[KernelSettings, build.Library], b: tuple[KernelSettings, build.Library],
            calls: dict[str, int], deadline: float = math.inf) -> float | None:
    """Geometric mean over `work` of (median time under b) / (median time under a), the two timed
    alternately `REPEATS` times; `calls`: calls per sample by workload name. None where `deadline`
    (time.monotonic()) passes first."""
    times: dict[str, tuple[list[float], list[float]]] = {w.name: ([], []) for w in work}
    for _ in range(REPEATS):
        for w in work:
            for side, (settings, lib) in enumerate((a, b)):
                with _in_force(settings, lib):
                    times[w.name][side].append(_sample(w.run, calls[w.name]))
            if time.monotonic() > deadline:
                return None
    logs = [math.log(statistics.median(tb) / statistics.median(ta)) for ta, tb in times.values()]
    return math.exp(sum(logs) / len(logs))


def _calibrate(workload: Any) -> tuple[int, float]:
    """(calls per sample, seconds per sample) of a workload under the settings in force: the fastest of
    three calls after a warm-up call (a loaded CPU's preemptions inflate single calls)."""
    workload.run()
    once = min(_sample(workload.run, 1) for _ in range(3))
    calls = max(1, math.ceil(MIN_SAMPLE_S / max(once, 1e-7)))
    return calls, calls * once


class _Search:
    """One tuning's state: the workloads, their calibration, the deadline, the trials so far."""

    def __init__(self, base: build.Library, threads: int, deadline: float) -> None:
        self.base, self.deadline = base, deadline
        started = time.monotonic()
        self.work: list[Any] = []
        self.calls: dict[str, int] = {}
        self.sample_s: dict[str, float] = {}
        self.all_made, self.out_of_time = True, False
        making = iter(workloads.workloads(threads))
        with _in_force(KernelSettings(), base):
            while True:  # each made and calibrated while less than half of the budget is spent
                if time.monotonic() > started + (deadline - started) / 2:
                    self.all_made = False
                    break
                workload = next(making, None)
                if workload is None:
                    break
                self.work.append(workload)
                self.calls[workload.name], self.sample_s[workload.name] = _calibrate(workload)
        self.setup_s = round(time.monotonic() - started, 2)
        self.trials: list[dict[str, Any]] = []

    def cost(self, work: list[Any]) -> float:
        """Seconds one `compare` of these workloads takes (estimated from the calibration)."""
        return sum(2 * REPEATS * self.sample_s[w.name] for w in work)

    def faster(self, work: list[Any], a: tuple[KernelSettings, build.Library],
               b: tuple[KernelSettings, build.Library], trial: dict[str, Any]) -> bool:
        """Whether b beats a by `MARGIN` on `work` (recorded in the trials); False, and the search
        out of time from now on, where the budget does not allow the comparison."""
        ratio = None
        if not self.out_of_time and time.monotonic() + self.cost(work) <= self.deadline:
            ratio = compare(work, a, b, self.calls, self.deadline)
        if ratio is None:
            self.out_of_time = True
            return False
        accepted = ratio < 1 - MARGIN
        self.trials.append({**trial, "ratio": round(ratio, 4), "accepted": accepted,
                            "workloads": [w.name for w in work]})
        return accepted

    def settings(self) -> KernelSettings:
        """Coordinate descent over `CANDIDATES` from the defaults, then the result against the defaults
        on every workload where they differ (a chain of noisy wins must still win as a whole)."""
        defaults = best = KernelSettings()
        for name, values in CANDIDATES.items():
            for value in values:
                candidate = replace(best, **{name: value})
                changed = [w for w in self.work if w.choice(candidate) != w.choice(best)]
                if changed and self.faster(changed, (best, self.base), (candidate, self.base),
                                           {"setting": name, "value": value, "against": getattr(best, name)}):
                    best = candidate
        changed = [w for w in self.work if w.choice(best) != w.choice(defaults)]
        if not changed or self.out_of_time:
            return best
        verified = self.faster(changed, (defaults, self.base), (best, self.base),
                               {"setting": "all", "value": "tuned", "against": "defaults"})
        return best if verified or self.out_of_time else defaults  # no time to check: the descent's result

    def variant(self, best: KernelSettings) -> str:
        """The build variants that beat the build without them under `best`, joined by "+" ("" for none):
        each applicable one in `BUILD_VARIANTS`' order, added to those accepted before it, compiled
        within what is left of the budget and timed on the workloads that run the path it changes."""
        accepted: list[str] = []
        current = self.base
        for spec in BUILD_VARIANTS.values():
            changed = [w for w in self.work if spec.path in w.paths(best)]
            if not (spec.applies(self.base.probed()) and changed):
                continue
            name = "+".join([*accepted, spec.name])
            left = self.deadline - time.monotonic() - self.cost(changed)
            lib, why = build.variant_library(name, timeout=left) if left >= 1 else (None, "no time left")
            if lib is None:
                self.trials.append({"variant": name, "error": why, "accepted": False})
                self.out_of_time = self.out_of_time or left < 1 or time.monotonic() > self.deadline
            elif self.faster(changed, (best, current), (best, lib), {"variant": name}):
                accepted.append(spec.name)
                current = lib
        return "+".join(accepted)


def _cpu_snapshot() -> tuple[float, int, int] | None:
    """(monotonic seconds, jiffies every CPU has spent busy, jiffies this process and its finished
    children have spent) from /proc/stat and /proc/self/stat; None where they cannot be read (not
    Linux). The children count as this process: the tuner's own compiles of the build variants (a C
    compiler run to completion) once marked every record that built a variant as measured under load."""
    try:
        with open("/proc/stat", encoding="ascii") as stat:
            ticks = [int(v) for v in stat.readline().split()[1:]]
        with open("/proc/self/stat", encoding="ascii") as own:
            after_name = own.read().rsplit(")", 1)[1].split()
        mine = sum(int(v) for v in after_name[11:15])  # utime, stime, cutime, cstime (fields 14 to 17)
    except (OSError, ValueError, IndexError):
        return None
    return time.monotonic(), sum(ticks) - ticks[3] - (ticks[4] if len(ticks) > 4 else 0), mine  # minus idle, iowait


def _others_share(before: tuple[float, int, int] | None, after: tuple[float, int, int] | None) -> float | None:
    """The share of all CPUs that other processes kept busy between two `_cpu_snapshot`s (None: unknown)."""
    if before is None or after is None or after[0] <= before[0]:
        return None
    capacity = (after[0] - before[0]) * os.sysconf("SC_CLK_TCK") * (os.cpu_count() or 1)
    return max(0.0, ((after[1] - before[1]) - (after[2] - before[2])) / capacity)


def run_tuning(base: build.Library, seconds: float, threads: int) -> dict[str, Any]:
    """Tunes the settings, then the build variants, for `base` at `threads` threads within `seconds`
    (workloads made and calibrated, compiling included): the tuning record (`read_record` validates it).
    It says how much of the CPUs other processes took meanwhile; above `LOAD_LIMIT` it was measured
    under load (`apply` tunes anew once the machine is idle)."""
    start = time.monotonic()
    before = _cpu_snapshot()
    search = _Search(base, threads, start + seconds)
    best = search.settings()
    variant = search.variant(best)
    others = _others_share(before, _cpu_snapshot())
    record = {
        "schema": SCHEMA, "key": record_key(base, threads),
        "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(time.monotonic() - start, 2), "budget_s": seconds, "setup_s": search.setup_s,
        "workloads": [w.name for w in search.work], "complete": search.all_made and not search.out_of_time,
        "settings": asdict(best), "defaults": asdict(KernelSettings()), "variant": variant, "trials": search.trials,
        "others_cpu_share": None if others is None else round(others, 3),
        "under_load": others is not None and others > LOAD_LIMIT,
    }
    record["sha256"] = _checksum(record)
    return record


# --- in force ---------------------------------------------------------------------------------------

def _put_in_force(record: dict[str, Any], base: build.Library, state: str, detail: str, path: Path) -> build.Library:
    """Installs the record's settings; the build to use (its variant where that loads, else the base)."""
    global _status
    install(KernelSettings(**record["settings"]))
    _status = TuneStatus(state, detail, str(path), record)
    if not record["variant"]:
        return base
    lib, why = build.variant_library(record["variant"])
    if lib is None:
        warn_once(f"the tuned kernel build {record['variant']!r} is unavailable ({why}); using the base build")
        return base
    return lib


def _defaults(detail: str, path: Path | None = None) -> None:
    global _status
    install(KernelSettings())
    _status = TuneStatus("defaults", detail, None if path is None else str(path))


def _never(record: dict[str, Any]) -> bool:
    """`_tune`'s default `stale`: a valid record always serves."""
    return False


def under_load(record: dict[str, Any]) -> bool:
    """Whether a tuning record was measured while other processes took over `LOAD_LIMIT` of the CPUs."""
    return bool(record.get("under_load"))


def _tune(base: build.Library, path: Path, threads: int, force: bool,
          err: IO[str], stale: Callable[[dict[str, Any]], bool] = _never
          ) -> tuple[dict[str, Any], str] | None:
    """Under the lock: the record another process wrote meanwhile (unless `force`, or `stale` says it no
    longer serves), else a new tuning, saved. (record, "tuned" or "cached"), or None where the cache
    cannot be written (defaults then)."""
    seconds = budget()
    lock_path = path.with_suffix(".lock")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not os.access(path.parent, os.W_OK | os.X_OK):
            raise PermissionError(13, "permission denied")
        lock_path.touch()
    except OSError as exc:
        why = f"cannot write the kernel tuning cache in {path.parent} ({exc.strerror or exc})"
        warn_once(f"{why}; using the built-in kernel settings")
        _defaults(why, path)
        return None
    with _locked(lock_path, timeout=3 * seconds + 300) as taken:
        if not taken:
            why = f"another process held {lock_path} for too long"
            warn_once(f"{why}; using the built-in kernel settings")
            _defaults(why, path)
            return None
        record, problem = read_record(path, base, threads)
        if record is not None and not force and not stale(record):
            return record, "cached"
        if record is not None and not force:
            share = 100 * (record.get("others_cpu_share") or 0)
            warn_once(f"the kernel tuning in {path} was measured under load (other processes took {share:.0f} % "
                      "of the CPUs); tuning anew on the idle machine")
        if problem not in ("", MISSING) and not force:
            warn_once(f"the kernel tuning cache {path} is damaged ({problem}); tuning anew")
        err.write(f"tuning the CPU kernels for this machine (once, at most {seconds:g} s; CHTSL_TUNE=0 skips it) ... ")
        err.flush()
        record = run_tuning(base, seconds, threads)
        changed = [k for k, v in record["settings"].items() if v != record["defaults"][k]]
        err.write(f"done in {record['seconds']:.1f} s: {len(changed)} setting(s) changed"
                  f"{', build ' + record['variant'] if record['variant'] else ''} (see `chtsl info --kernels`)\n")
        err.flush()
        try:
            atomic_write_text(path, json.dumps(record, indent=1) + "\n")
        except OSError as exc:
            warn_once(f"could not save the kernel tuning to {path} ({exc.strerror or exc}); it holds for this "
                      f"process only")
        return record, "tuned"


def apply(base: build.Library) -> build.Library:
    """Puts this machine's tuning for `base` in force (read from the cache, or measured now and saved);
    returns the build to use. CHTSL_TUNE=0: the built-in defaults and `base`."""
    global _status
    if not enabled():
        install(KernelSettings())
        _status = TuneStatus("off", "the built-in defaults (CHTSL_TUNE=0)")
        return base
    threads = torch.get_num_threads()
    path = record_path(base, threads)
    record, _ = read_record(path, base, threads)
    # A tuning measured under load is kept while the machine stays loaded (tuning again would be measured
    # under load too, and cost every process its budget), and redone once a process starts on an idle one.
    retune_it = record is not None and under_load(record) and omp.machine_idle()
    if record is not None and not retune_it:
        return _put_in_force(record, base, "cached", f"measured {record['measured_at']}", path)
    tuned = _tune(base, path, threads, force=False, err=sys.stderr, stale=under_load if retune_it else _never)
    if tuned is None:
        return base
    record, state = tuned
    return _put_in_force(record, base, state, f"measured {record['measured_at']}", path)


def retune() -> TuneStatus:
    """Tunes anew now (`chtsl info --kernels --retune`), replacing the cached record; the result is in
    force for this process. ChtslError without compiled kernels or with CHTSL_TUNE=0."""
    base, how = build.library()
    if base is None:
        raise ChtslError(f"there are no compiled CPU kernels to tune: {how}")
    if not enabled():
        raise ChtslError("CHTSL_TUNE=0 turns kernel tuning off; unset it to retune")
    threads = torch.get_num_threads()
    path = record_path(base, threads)
    tuned = _tune(base, path, threads, force=True, err=sys.stderr)
    if tuned is not None:
        record, state = tuned
        build.put_in_force(_put_in_force(record, base, state, f"measured {record['measured_at']}", path))
    return _status


def kernel_info() -> build.KernelInfo:
    """The `build.KernelInfo` of this process's kernels (building and tuning them on first use)."""
    lib, how = build.library()
    defaults = asdict(KernelSettings())
    if lib is None:
        return build.KernelInfo(False, how, build.cpu_model(), settings=asdict(settings_in_force()), defaults=defaults)
    lib = build.current() or lib
    probed = lib.probed()
    return build.KernelInfo(True, how, build.cpu_model(), str(lib.path), lib.compiler, lib.flags, lib.variant,
                            tuple(probed.get("isa", [])), probed["openmp"] == ["1"], int(probed["tile_vw"][0]),
                            probed["bf16_dot"] == ["1"], probed["gather16"] == ["1"], probed["a8_vector"] == ["1"],
                            asdict(settings_in_force()),
                            defaults, status().as_json())


build.on_first_use(apply)
