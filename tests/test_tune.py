"""The kernel tuner (chtsl_infer/kernels/tune.py): the search, the cache (written, read back, damaged,
unwritable, concurrent first uses), CHTSL_TUNE, the chosen build variant in force, `chtsl info --kernels`.

The suite runs with CHTSL_TUNE=0 (tests/conftest.py); these tests turn tuning on with a tiny budget
and, where the search itself is not the subject, with stand-in workloads whose time depends on one
setting in a known way (sleeps), so they are fast and their outcome is known."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path

import pytest
import torch

from chtsl_infer import kernels
from chtsl_infer.errors import ChtslError
from chtsl_infer.kernels import build, tune, workloads
from chtsl_infer.kernels.settings import KernelSettings, install, settings
from chtsl_infer.kernels.table import BUILD_VARIANTS, variant_applies
from chtsl_infer.utils import warn_once
from tests.conftest import run_cli

ROOT = Path(__file__).resolve().parents[1]


def sleepy_workloads(threads: int, seed: int = 0) -> list[workloads.Workload]:
    """Stand-ins: one takes chunks_per_thread ms (fastest at 1), one 1 ms with attention split at the
    default threshold and 4 ms where a larger one keeps it on one thread (the default is fastest)."""
    def chunks() -> None:
        time.sleep(1e-3 * settings().chunks_per_thread)

    def attention() -> None:
        time.sleep(1e-3 if settings().attn_min_work <= 1 << 14 else 4e-3)

    return [workloads.Workload("sleep chunks ms", chunks, lambda s: (s.chunks_per_thread,)),
            workloads.Workload("sleep attention", attention, lambda s: (s.attn_min_work <= 1 << 14,))]


@pytest.fixture
def base() -> build.Library:
    lib = build.library()[0]
    if lib is None:
        pytest.skip("no compiled kernels")
    return lib


@pytest.fixture
def tuning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, base: build.Library) -> Path:
    """Tuning on (budget 10 s) into tmp_path/tune with the sleepy workloads; the process's settings, build
    in force and tuning status restored after. Returns the tuning directory."""
    monkeypatch.setenv("CHTSL_TUNE", "1")
    monkeypatch.setenv("CHTSL_TUNE_BUDGET", "10")
    directory = tmp_path / "tune"
    monkeypatch.setattr(tune, "tune_dir", lambda: directory)
    monkeypatch.setattr(workloads, "workloads", sleepy_workloads)
    saved, status, in_force = settings(), tune.status(), dict(build._in_force)
    build._in_force.clear()  # the next kernel use applies the tuning
    warn_once.cache_clear()
    yield directory
    install(saved)
    tune._status = status
    build._in_force.clear()
    build._in_force.update(in_force)
    warn_once.cache_clear()


def _lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def _rewrite(path: Path, change) -> None:
    """Applies `change(record)` to the record at `path` and writes it back with a valid checksum."""
    record = json.loads(path.read_text())
    change(record)
    record["sha256"] = tune._checksum(record)
    path.write_text(json.dumps(record))


# --- candidates and the search ---------------------------------------------------------------------

def test_candidates_cover_every_setting_and_include_its_default() -> None:
    defaults = KernelSettings()
    assert list(tune.CANDIDATES) and set(tune.CANDIDATES) == {f.name for f in fields(KernelSettings)}
    for name, values in tune.CANDIDATES.items():
        assert getattr(defaults, name) in values and len(set(values)) == len(values) >= 2, name
        for value in values:
            KernelSettings(**{name: value})  # every candidate is a valid setting


def test_descent_takes_faster_values_and_keeps_slower_ones(tuning: Path, base: build.Library) -> None:
    """1 ms beats 2 ms (chunks_per_thread 1 over the default 2); 4 and 8 chunks and a never-split
    attention are slower and kept out; the result is checked against the defaults as a whole."""
    record = tune.run_tuning(base, 10.0, 2)
    assert record["settings"] == {**asdict(KernelSettings()), "chunks_per_thread": 1}, record["trials"]
    assert record["complete"] and record["variant"] == "" and record["seconds"] <= 10.5
    tried = {(t["setting"], t["value"]): t for t in record["trials"]}
    assert tried[("chunks_per_thread", 1)]["accepted"] and tried[("chunks_per_thread", 1)]["ratio"] < 0.8
    assert not tried[("chunks_per_thread", 4)]["accepted"] and tried[("chunks_per_thread", 4)]["against"] == 1
    assert not tried[("attn_min_work", 1 << 16)]["accepted"] and ("attn_min_work", 1 << 12) not in tried  # same code
    assert tried[("all", "tuned")]["accepted"]
    assert tune.validate_record(record, base, 2) == ""


@pytest.mark.parametrize(("ratio", "changes"), [(0.98, False), (0.9, True)])
def test_only_a_margin_changes_a_setting(ratio: float, changes: bool, tuning: Path, base: build.Library,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Measured 2 % faster (within the 3 % margin) keeps the defaults; 10 % faster takes the candidate."""
    monkeypatch.setattr(tune, "compare", lambda *args, **kwargs: ratio)
    record = tune.run_tuning(base, 10.0, 2)
    assert (record["settings"] != asdict(KernelSettings())) == changes
    assert all(t["accepted"] == changes for t in record["trials"])


def test_the_budget_bounds_the_search(tuning: Path, base: build.Library, monkeypatch: pytest.MonkeyPatch) -> None:
    """A budget too small for the comparisons: the record says it is incomplete and keeps the defaults
    it could not test; its time stays within the budget and one sample."""
    monkeypatch.setattr(tune, "REPEATS", 50)  # one comparison: 2 × 50 samples ≥ 0.1 s
    record = tune.run_tuning(base, 0.3, 2)
    assert not record["complete"] and record["seconds"] < 0.3 + 0.25
    assert record["settings"]["chunks_per_thread"] in (1, 2)


# --- first use, the cache, CHTSL_TUNE ---------------------------------------------------------------

def test_first_use_tunes_once_and_later_uses_read_the_cache(tuning: Path, base: build.Library,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert tune.apply(base) is base
    err = _lines(capsys)
    assert len(err) == 1 and err[0].startswith("tuning the CPU kernels") and "done in" in err[0], err
    files = sorted(p.name for p in tuning.iterdir())
    assert len(files) == 2 and files[0].endswith(".json") and files[1].endswith(".lock")  # no temporary files
    path = tuning / files[0]
    record, problem = tune.read_record(path, base, torch.get_num_threads())
    assert problem == "" and record["settings"]["chunks_per_thread"] == 1
    assert tune.status().state == "tuned" and settings().chunks_per_thread == 1
    install(KernelSettings())
    assert tune.apply(base) is base and _lines(capsys) == []  # read back: silent
    assert tune.status().state == "cached" and tune.status().record == record
    assert settings() == KernelSettings(**record["settings"])


def test_a_tuning_measured_under_load_is_redone_once_the_machine_is_idle(
        tuning: Path, base: build.Library, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Other processes took half the CPUs during the tuning: the record says so; while the machine stays
    loaded, later first uses read it (silently); the first on an idle machine tunes anew, with one
    warning line, and the new record (no load) is kept from then on."""
    from chtsl_infer import omp

    monkeypatch.setattr(tune, "_others_share", lambda before, after: 0.5)
    tune.apply(base)
    path = next(tuning.glob("*.json"))
    record, _ = tune.read_record(path, base, torch.get_num_threads())
    assert record["under_load"] and record["others_cpu_share"] == 0.5
    capsys.readouterr()
    monkeypatch.setattr(omp, "machine_idle", lambda: False)
    tune.apply(base)
    assert _lines(capsys) == [] and tune.status().state == "cached"
    monkeypatch.setattr(omp, "machine_idle", lambda: True)
    monkeypatch.setattr(tune, "_others_share", lambda before, after: 0.01)
    tune.apply(base)
    err = _lines(capsys)
    assert len(err) == 2 and "measured under load (other processes took 50 % of the CPUs)" in err[0], err
    assert err[1].startswith("tuning the CPU kernels") and tune.status().state == "tuned"
    record, _ = tune.read_record(path, base, torch.get_num_threads())
    assert not record["under_load"] and record["others_cpu_share"] == 0.01
    tune.apply(base)
    assert _lines(capsys) == [] and tune.status().state == "cached"


def test_others_share_is_the_busy_time_not_this_process_s() -> None:
    """Busy jiffies of all CPUs minus this process's own, over the CPUs' capacity in the interval."""
    capacity = 2.0 * os.sysconf("SC_CLK_TCK") * (os.cpu_count() or 1)  # 2 seconds of every CPU
    before = (10.0, 1000, 300)
    after = (12.0, 1000 + int(0.25 * capacity) + 40, 340)  # this process: 40 jiffies of the busy time
    assert tune._others_share(before, after) == pytest.approx(int(0.25 * capacity) / capacity)
    assert tune._others_share(None, after) is None and tune._others_share(after, before) is None
    snapshot = tune._cpu_snapshot()
    if snapshot is not None:  # Linux: this process's own time is among the busy time
        assert snapshot[1] >= snapshot[2] >= 0


def test_the_tuners_own_compiler_runs_are_not_load() -> None:
    """A child process run to completion (as the tuner compiles a build variant) counts as this process:
    0.6 s of a busy child leaves the others' share near 0, not at the child's CPU time."""
    before = tune._cpu_snapshot()
    if before is None:
        pytest.skip("needs /proc (Linux)")
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.6: pass"
    subprocess.run([sys.executable, "-c", burn], check=True)
    share = tune._others_share(before, tune._cpu_snapshot())
    busy_child = 0.6 / ((os.cpu_count() or 1) * 0.6)  # what the child alone would have counted for
    assert share is not None and share < 0.5 * busy_child


@pytest.mark.parametrize("damage", ["truncated", "garbage", "edited", "invalid setting", "other threads",
                                    "unknown variant", "not a dict"])
def test_a_damaged_cache_is_tuned_anew_with_one_warning(damage: str, tuning: Path, base: build.Library,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    tune.apply(base)
    capsys.readouterr()
    path = next(tuning.glob("tune-*.json"))
    text = path.read_text()
    if damage == "truncated":
        path.write_text(text[: len(text) // 2])
    elif damage == "garbage":
        path.write_bytes(os.urandom(len(text)))
    elif damage == "edited":  # a value changed, the checksum not
        path.write_text(text.replace('"chunks_per_thread": 1', '"chunks_per_thread": 8'))
    elif damage == "invalid setting":
        _rewrite(path, lambda r: r["settings"].update(mm_tile=48))
    elif damage == "other threads":
        _rewrite(path, lambda r: r["key"].update(threads=r["key"]["threads"] + 1))
    elif damage == "unknown variant":
        _rewrite(path, lambda r: r.update(variant="vw4"))
    else:
        path.write_text("[1, 2]")
    assert tune.read_record(path, base, torch.get_num_threads())[0] is None
    install(KernelSettings())
    tune.apply(base)
    err = _lines(capsys)
    warnings = [line for line in err if line.startswith("warning:")]
    assert len(warnings) == 1 and "is damaged" in warnings[0] and "tuning anew" in warnings[0], err
    assert len(err) == 2 and err[1].startswith("tuning the CPU kernels")
    assert tune.read_record(path, base, torch.get_num_threads())[1] == "" and tune.status().state == "tuned"


def test_an_unwritable_cache_keeps_the_defaults_with_one_line(tuning: Path, base: build.Library,
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tuning.parent / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setattr(tune, "tune_dir", lambda: blocker / "tune")  # mkdir fails (as root too)
    install(KernelSettings(chunks_per_thread=8))
    assert tune.apply(base) is base
    err = _lines(capsys)
    assert len(err) == 1 and err[0].startswith("warning: cannot write the kernel tuning cache") and \
        "using the built-in kernel settings" in err[0], err
    assert settings() == KernelSettings() and tune.status().state == "defaults"


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_cache_directory_keeps_the_defaults(tuning: Path, base: build.Library,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    tuning.mkdir()
    tuning.chmod(0o555)
    try:
        assert tune.apply(base) is base
    finally:
        tuning.chmod(0o755)
    err = _lines(capsys)
    assert len(err) == 1 and "cannot write the kernel tuning cache" in err[0]


def test_chtsl_tune_0_uses_the_defaults_and_reads_no_cache(tuning: Path, base: build.Library,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    tune.apply(base)  # a cached tuning with chunks_per_thread 1
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in tuning.iterdir()}
    for off in ("0", "off", "False"):
        monkeypatch.setenv("CHTSL_TUNE", off)
        assert tune.apply(base) is base and _lines(capsys) == []
        assert settings() == KernelSettings() and tune.status().state == "off"
    assert {p.name: p.read_bytes() for p in tuning.iterdir()} == before


@pytest.mark.parametrize(("name", "value"), [("CHTSL_TUNE", "maybe"), ("CHTSL_TUNE_BUDGET", "abc"),
                                             ("CHTSL_TUNE_BUDGET", "-1"), ("CHTSL_TUNE_BUDGET", "nan"),
                                             ("CHTSL_TUNE_BUDGET", "inf"), ("CHTSL_TUNE_BUDGET", "0")])
def test_bad_environment_values_are_user_errors(name: str, value: str, tuning: Path, base: build.Library,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ChtslError, match=name):
        tune.apply(base)


def test_a_tuned_build_variant_is_the_build_in_force(tuning: Path, base: build.Library) -> None:
    """A record choosing `vw8` (where it applies): the first kernel use loads it, `kernel()` looks
    functions up in it, `kernel_info()` reports it; without tuning the base build is back."""
    if not BUILD_VARIANTS["vw8"].applies(base.probed()):
        pytest.skip("vw8 applies to AVX-512 builds only")
    tune.apply(base)
    path = next(tuning.glob("tune-*.json"))
    _rewrite(path, lambda r: r.update(variant="vw8"))
    build._in_force.clear()
    lib = build.current()
    assert lib is not None and lib.variant == "vw8" and lib.path != base.path
    assert kernels.kernel("spmm", dtype=torch.float32, index=torch.int16) is lib.functions["spmm_i16"]
    assert lib.probed()["tile_vw"] == ["8"]
    info = kernels.kernel_info()
    assert info.variant == "vw8" and info.tile_vw == 8 and info.tuning["state"] == "cached"
    x = torch.randn(64, 40)
    crow, col, values = workloads.random_csr(30, 64, torch.Generator().manual_seed(0))
    dense = torch.zeros(30, 64)
    dense[torch.arange(30).repeat_interleave(3), col.long()] = values
    torch.testing.assert_close(kernels.spmm_cpu(x, crow, col, values), dense @ x, atol=1e-5, rtol=1e-5)


def test_build_variants_combine(tuning: Path, base: build.Library) -> None:
    """A record choosing "vw8+g8" (where both apply) puts one build with both variants' flags in force:
    8-float tiles and no vgatherdps, and its int8 and bf16 gathers match the reference."""
    if not variant_applies("vw8+g8", base.probed()):
        pytest.skip("vw8 and g8 apply to AVX-512 builds only")
    assert not variant_applies("g8+g8", base.probed()) and not variant_applies("vw8+vw4", base.probed())
    tune.apply(base)
    path = next(tuning.glob("tune-*.json"))
    _rewrite(path, lambda r: r.update(variant="vw8+g8"))
    build._in_force.clear()
    lib = build.current()
    assert lib is not None and lib.variant == "vw8+g8"
    assert lib.probed()["tile_vw"] == ["8"] and lib.probed()["gather16"] == ["0"]
    assert lib.probed()["bf16_dot"] == ["0"]
    gen = torch.Generator().manual_seed(0)
    crow, col, _ = workloads.random_csr(30, 640, gen)
    q = torch.randint(-127, 128, (col.numel(),), generator=gen, dtype=torch.int8)
    scale = torch.rand(30, generator=gen)
    dense = torch.zeros(30, 640, dtype=torch.float64)
    dense[torch.arange(30).repeat_interleave(col.numel() // 30), col.long()] = q.double()
    x = torch.randn(640, 1, generator=gen)
    want = (dense @ x.double()) * scale.double()[:, None]
    torch.testing.assert_close(kernels.spmm_cpu(x, crow, col, q, scale=scale).double(), want, atol=1e-4, rtol=1e-5)
    bf = q.to(torch.bfloat16)
    got = kernels.spmm_cpu(x.bfloat16(), crow, col, bf).double()
    torch.testing.assert_close(got, dense @ x.bfloat16().double(), atol=0.05, rtol=1e-2)


def test_random_csr_is_sorted_distinct_and_at_the_density() -> None:
    crow, col, values = workloads.random_csr(7, 5461, torch.Generator().manual_seed(1))
    per_row = round(workloads.DENSITY * 5461)
    assert crow.tolist() == list(range(0, 8 * per_row, per_row)) and col.dtype == torch.int16
    rows = col.long().view(7, per_row)
    assert bool((rows[:, 1:] > rows[:, :-1]).all()) and int(rows.min()) >= 0 and int(rows.max()) < 5461
    assert values.shape == (7 * per_row,)


# --- real workloads, processes, the CLI -------------------------------------------------------------

def test_real_workloads_run_and_make_a_valid_record(base: build.Library, monkeypatch: pytest.MonkeyPatch,
                                                    tmp_path: Path) -> None:
    """The real workloads under a 3 s budget: a record `read_record` accepts, every trial a ratio or an
    error, within the budget and the last workload's making (the bound is loose: a loaded CPU)."""
    saved = settings()
    try:
        record = tune.run_tuning(base, 3.0, torch.get_num_threads())
    finally:
        install(saved)
    assert tune.validate_record(record, base, torch.get_num_threads()) == ""
    assert record["seconds"] < 2 * 3.0 and record["workloads"][0].startswith("spmm 256 tok")
    assert all(("ratio" in t) != ("error" in t) for t in record["trials"])


WORKER = """
import json, sys
from pathlib import Path
from chtsl_infer.kernels import tune
tune.tune_dir = lambda: Path(sys.argv[1])
from chtsl_infer import kernels
info = kernels.kernel_info()
print(json.dumps({"state": info.tuning["state"], "settings": info.settings}))
"""


@pytest.mark.slow  # two processes tuning with the real workloads
def test_concurrent_first_uses_tune_once_and_leave_one_valid_cache(tmp_path: Path, base: build.Library) -> None:
    """Two processes start at once with no tuning: one tunes (one progress line), the other waits on
    the lock and reads its record; both end with the same settings and the cache holds one valid record."""
    directory = tmp_path / "tune"
    env = {**os.environ, "CHTSL_TUNE": "1", "CHTSL_TUNE_BUDGET": "3", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"}
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(directory)], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
        results.append((json.loads(out.strip().splitlines()[-1]), [line for line in err.splitlines() if line]))
    assert sorted(r["state"] for r, _ in results) == ["cached", "tuned"], results
    assert sum(len(err) for _, err in results) == 1 and all(line.startswith("tuning the CPU kernels")
                                                             for _, err in results for line in err)
    assert results[0][0]["settings"] == results[1][0]["settings"]
    files = sorted(p.name for p in directory.iterdir())
    assert len(files) == 2 and files[1] == files[0].replace(".json", ".lock")
    record, problem = tune.read_record(directory / files[0], base, 2)
    assert problem == "" and record["settings"] == results[0][0]["settings"]


def test_info_kernels_shows_the_build_and_the_settings(tuning: Path, capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """`chtsl info --kernels --json -`: the CPU, ISA, library, settings in force and defaults, how they were
    chosen; `--retune` tunes anew (the progress line on stderr) and reports "tuned"; the table lists
    every setting with its default."""
    monkeypatch.setenv("CHTSL_TUNE", "0")
    code, out, err = run_cli(["info", "--kernels", "--json", "-"])
    report = json.loads(out)
    assert code == 0 and report["available"] and report["isa"] and report["cpu"] == build.cpu_model()
    assert report["settings"] == report["defaults"] == asdict(KernelSettings()) and report["variant"] == ""
    assert report["tuning"]["state"] == "off" and set(report["candidates"]) == set(report["settings"])
    monkeypatch.setenv("CHTSL_TUNE", "1")
    code, out, err = run_cli(["info", "--retune", "--json", "-"])
    report = json.loads(out)
    assert code == 0 and "tuning the CPU kernels" in err
    assert report["tuning"]["state"] == "tuned" and report["settings"]["chunks_per_thread"] == 1
    assert report["tuning"]["path"] == str(next(tuning.glob("tune-*.json")))
    code, out, err = run_cli(["info", "--kernels"])
    assert code == 0 and err == ""
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.split()}
    for name, default in asdict(KernelSettings()).items():  # setting, in force [*], default, the values tried
        cells = [c for c in rows[name] if c != "*"]
        assert cells[:2] == [str(getattr(settings(), name)), str(default)], rows[name]
        assert ("*" in rows[name]) == (getattr(settings(), name) != default)
    assert rows["chunks_per_thread"][:3] == ["1", "*", "2"] and "tuned: measured" in out
