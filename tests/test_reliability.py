"""Reliability behaviours that are not a malformed command line (issue 12): disk full during a
checkpoint save, leftovers of killed runs, a SIGKILL inside `export --force`, perplexity overflow,
the NaN-stop message, the last topology update, safetensors-only loading, quiet loaders."""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from chtsl_infer.cli import main
from chtsl_infer.errors import ChtslError, Interrupted, WriteFailure
from chtsl_infer.utils import deferred_interrupts, dir_lock, interruptible, lock_path
from tests.conftest import write_corpus
from train.args import TrainArgs
from train.checkpoint import read_metrics_log
from train.trainer import train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _env(cli_artifacts, monkeypatch):
    monkeypatch.setenv("CHTSL_CACHE_DIR", str(cli_artifacts["cache"]))
    monkeypatch.setenv("CHTSL_CACHE_DIR", str(cli_artifacts["cache"]))
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _args(tmp_path: Path, **overrides) -> TrainArgs:
    fields = dict(preset="tiny", data=str(write_corpus(tmp_path / "corpus.jsonl")), tokenizer="bpe", vocab_size=512,
                  num_layers=2, seq_len=32, batch_size=4, micro_batch_size=4, steps=4, warmup=1, update_interval=5,
                  restart_warmup=1, eval_every=100, save_every=2, ocr_every=100, eval_tokens=500,
                  out=str(tmp_path / "ckpt"), progress=False)
    fields.update(overrides)
    return TrainArgs(**fields)


def _sha(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _run_cli(argv: list[str], capfd) -> tuple[int, str]:
    capfd.readouterr()
    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 0
    out, err = capfd.readouterr()
    return code, out + err


# ----------------------------------------------------------------------------- checkpoints


def test_disk_full_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch, capfd) -> None:
    """ENOSPC in the second save: one line, exit 74, the step-2 checkpoint byte-identical, no temp dir."""
    import train.checkpoint as ckpt_io

    real = ckpt_io.save_file
    saves = {"n": 0}

    def full_disk(tensors, path, *a, **k):
        if Path(path).name == "optimizer.safetensors":
            saves["n"] += 1
            if saves["n"] == 2:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(tensors, path, *a, **k)

    out = tmp_path / "ckpt"
    state: dict[str, dict[str, str]] = {}

    def remember(step: int, model) -> None:
        if step == 3:  # the step-2 checkpoint is complete
            state["before"] = _sha(out)

    monkeypatch.setattr(ckpt_io, "save_file", full_disk)
    with pytest.raises(WriteFailure, match=r"No space left on device; the checkpoint in .* \(step 2\) is kept"):
        train(_args(tmp_path), after_step=remember)
    def checkpoint_files(sha: dict[str, str]) -> dict[str, str]:  # the logs grow after the save, as they should
        return {k: v for k, v in sha.items() if k != "metrics.jsonl" and not k.startswith("tensorboard")}

    assert checkpoint_files(_sha(out)) == checkpoint_files(state["before"])
    assert json.loads((out / "trainer_state" / "state.json").read_text())["step"] == 2
    assert not list(tmp_path.glob(".ckpt.tmp-*"))

    # the same through the CLI: exactly one line
    shutil.rmtree(out)
    saves["n"] = 0
    argv = ["train", "--data", str(tmp_path / "corpus.jsonl"), "--tokenizer", "bpe", "--vocab-size", "512",
            "--num-layers", "2", "--seq-len", "32", "--batch-size", "4", "--micro-batch-size", "4", "--steps", "4",
            "--warmup", "1", "--save-every", "2", "--eval-every", "100", "--eval-tokens", "500", "--no-progress",
            "--out", str(out)]
    code, output = _run_cli(argv, capfd)
    lines = [ln for ln in output.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]  # the run's own header lines come first
    assert code == 74 and "Traceback" not in output, output
    assert len(errors) == 1 and lines[-1] == errors[0] and "cannot write the checkpoint" in errors[0], output


def test_restart_after_kill_before_first_checkpoint(tmp_path) -> None:
    """A killed run left metrics.jsonl (start + steps 1-3) and a temp dir of a dead process; a new run
    starts its log afresh (one start event, each step once) and removes the dead temp dir."""
    out = tmp_path / "ckpt"
    out.mkdir()
    stale = [{"event": "start", "args": {}}] + [{"step": s, "loss": 9.0} for s in (1, 2, 3)]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in stale))
    dead = tmp_path / ".ckpt.tmp-999999999"
    (dead / "trainer_state").mkdir(parents=True)
    train(_args(tmp_path, steps=2, save_every=2))
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert sum(r.get("event") == "start" for r in recs) == 1
    assert [r["step"] for r in recs if "step" in r] == [1, 2]
    assert not dead.exists()


def test_save_keeps_other_files_of_the_out_directory(tmp_path) -> None:
    """`chtsl export`'s default output (CKPT/export) and other files inside a run directory survive
    the checkpoint swap of a resumed run (it used to delete them with the previous checkpoint)."""
    out = tmp_path / "ckpt"
    train(_args(tmp_path, steps=2, save_every=2))
    (out / "export").mkdir()
    (out / "export" / "model.onnx").write_bytes(b"onnx bytes")
    (out / "notes.txt").write_text("mine\n")
    train(_args(tmp_path, steps=4, save_every=2, resume=str(out)))
    assert json.loads((out / "trainer_state" / "state.json").read_text())["step"] == 4
    assert (out / "export" / "model.onnx").read_bytes() == b"onnx bytes"
    assert (out / "notes.txt").read_text() == "mine\n"


def test_nan_stop_without_checkpoint_says_so(tmp_path, capfd) -> None:
    def poison(step: int, model) -> None:
        with torch.no_grad():
            model.model.embed_tokens.weight.fill_(float("nan"))

    r = train(_args(tmp_path, steps=4, save_every=4), after_step=poison)
    err = capfd.readouterr().err
    assert r.stopped == "nan"
    assert "no checkpoint was written" in err and "is kept" not in err


# ----------------------------------------------------------------------------- one writer per directory

# A second process holding the writer lock of argv[1] until killed (what a concurrent run would be).
_HOLD_LOCK = """
import sys, time
from chtsl_infer.utils import dir_lock
with dir_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


@contextmanager
def _lock_held_elsewhere(path: Path) -> Iterator[subprocess.Popen]:
    proc = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(path)], stdout=subprocess.PIPE, text=True,
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert proc.stdout.readline().strip() == "held"
        yield proc
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


def test_dir_lock_one_writer_names_the_holder_and_dies_with_it(tmp_path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (tmp_path / "alias").symlink_to(out, target_is_directory=True)
    with _lock_held_elsewhere(out) as holder:
        with pytest.raises(ChtslError, match=f"being written by process {holder.pid} "), dir_lock(out):
            pass
    # SIGKILLed holder: its lock died with it (the file it left is taken over, then removed)
    assert lock_path(out).exists()
    with dir_lock(out) as lock:
        assert lock.read_text() == f"{os.getpid()}\n"
        # another spelling of the same directory is the same lock, even in the same process
        for spelling in (tmp_path / "alias", tmp_path / "." / "run"):
            with pytest.raises(ChtslError, match=f"process {os.getpid()}"), dir_lock(spelling):
                pass
    assert not lock_path(out).exists()
    with dir_lock(out):  # released: free again
        pass


def test_train_holds_the_lock_and_a_second_writer_fails_at_once(tmp_path, capfd) -> None:
    out = tmp_path / "ckpt"
    seen: list[str] = []

    def second_writer(step: int, model) -> None:
        with pytest.raises(ChtslError) as e, dir_lock(out):
            pass
        seen.append(str(e.value))

    train(_args(tmp_path, steps=2, save_every=2), after_step=second_writer)
    assert len(seen) == 2 and all(f"process {os.getpid()}" in m for m in seen)
    assert not lock_path(out).exists()

    # a `chtsl train` into a directory another process writes: one line naming it, nothing written
    new = tmp_path / "new"
    argv = ["train", "--data", str(tmp_path / "corpus.jsonl"), "--tokenizer", "bpe", "--vocab-size", "512",
            "--num-layers", "2", "--seq-len", "32", "--batch-size", "4", "--micro-batch-size", "4", "--steps", "2",
            "--warmup", "1", "--eval-tokens", "500", "--no-progress", "--out", str(new)]
    for target in (new, out):  # a fresh directory, and a resume of the finished run
        with _lock_held_elsewhere(target) as holder:
            before = _sha(tmp_path)
            code, output = _run_cli(argv if target == new else ["train", "--resume", str(out), "--steps", "3",
                                                                "--no-progress"], capfd)
        lines = [ln for ln in output.splitlines() if ln.strip()]
        assert code == 2 and len(lines) == 1, output
        assert lines[0].startswith("error:") and f"process {holder.pid}" in lines[0], output
        assert _sha(tmp_path) == before and not new.exists()


def test_export_force_refuses_a_second_writer(cli_artifacts, tmp_path, capfd) -> None:
    exp = tmp_path / "exp"
    shutil.copytree(cli_artifacts["export"], exp)
    before = _sha(exp)
    with _lock_held_elsewhere(exp) as holder:
        code, output = _run_cli(["export", str(cli_artifacts["run"]), "--out", str(exp), "--force",
                                 "--format", "safetensors", "--no-verify"], capfd)
    lines = [ln for ln in output.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and f"process {holder.pid}" in lines[0], output
    assert _sha(exp) == before


# ----------------------------------------------------------------------------- a torn metrics line


def test_read_metrics_log_drops_only_a_torn_last_line(tmp_path, capfd) -> None:
    log = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"event": "start"}), json.dumps({"step": 1, "loss": 2.5}), "", json.dumps({"step": 2})]
    good = [{"event": "start"}, {"step": 1, "loss": 2.5}, {"step": 2}]
    for torn in (b'{"step": 3, "lo', b'{"step": 3, "note": "caf\xc3'):  # cut mid-record, mid-UTF-8 character
        log.write_bytes(("\n".join(lines) + "\n").encode() + torn)
        capfd.readouterr()
        assert read_metrics_log(log) == good
        warnings = [ln for ln in capfd.readouterr().err.splitlines() if ln.strip()]
        assert len(warnings) == 1 and "metrics.jsonl:5: dropped an incomplete last line" in warnings[0], warnings
    log.write_text("\n".join(lines) + "\n" + json.dumps({"step": 3}))  # complete, only its newline missing
    assert read_metrics_log(log) == [*good, {"step": 3}]
    assert not capfd.readouterr().err
    for damaged in ([*lines[:2], '{"step": 2, "lo', lines[3]], [*lines, '{"step": 3, "lo']):  # not the last line,
        log.write_text("\n".join(damaged) + "\n")  # or a last line with its newline: damage, not a torn append
        with pytest.raises(ChtslError, match=r"metrics.jsonl:\d is not valid JSON"):
            read_metrics_log(log)
    log.write_text('{"step": 1}\n[1, 2]\n')
    with pytest.raises(ChtslError, match="metrics.jsonl:2 is not a JSON object"):
        read_metrics_log(log)


def test_resume_repairs_a_torn_last_metrics_line(tmp_path, capfd) -> None:
    """A kill in the middle of an append left half a line: --resume drops it with one warning and
    continues; the log holds each step once, every line whole."""
    out = tmp_path / "ckpt"
    train(_args(tmp_path, steps=4, save_every=2, stop_at=2))
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "loss": 5.1, "task_lo')
    capfd.readouterr()
    code, output = _run_cli(["train", "--resume", str(out), "--no-progress"], capfd)
    assert code == 0, output
    warnings = [ln for ln in output.splitlines() if "warning:" in ln]
    assert len(warnings) == 1 and "dropped an incomplete last line" in warnings[0], output
    text = (out / "metrics.jsonl").read_text()
    assert text.endswith("\n")
    assert [r["step"] for r in map(json.loads, text.splitlines()) if "step" in r] == [1, 2, 3, 4]


# ----------------------------------------------------------------------------- write errors


def _small_tmpfs(path: Path, size_kib: int) -> bool:
    """Mounts a tmpfs of `size_kib` KiB at `path` (root only); False when this machine cannot."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(path)],
                          capture_output=True)
    return proc.returncode == 0


@contextmanager
def _mounted_tmpfs(path: Path, size_kib: int) -> Iterator[Path]:
    if not _small_tmpfs(path, size_kib):
        pytest.skip("mounting a small tmpfs needs root and mount(8) (a real full disk); the monkeypatched "
                    "ENOSPC tests cover the code path")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _checkpoint_bytes(tmp_path: Path) -> int:
    """Bytes of a 2-step checkpoint of `_args` (model, optimizer, tokenizer, trainer state, logs)."""
    probe = tmp_path / "probe"
    train(_args(tmp_path, steps=2, save_every=2, out=str(probe)))
    size = sum(p.stat().st_size for p in probe.rglob("*") if p.is_file())
    shutil.rmtree(probe)
    return size


def test_real_full_disk_during_save_is_one_line_and_keeps_the_checkpoint(tmp_path, capfd) -> None:
    """On a tmpfs holding one checkpoint and a half: the second save (a new checkpoint is written
    beside the old one) runs out of space inside safetensors. One line, exit 74, the step-2
    checkpoint complete and loadable, no temporary directory left."""
    size = _checkpoint_bytes(tmp_path)
    with _mounted_tmpfs(tmp_path / "disk", size * 3 // 2 // 1024) as disk:
        out = disk / "ckpt"
        argv = ["train", "--data", str(tmp_path / "corpus.jsonl"), "--tokenizer", "bpe", "--vocab-size", "512",
                "--num-layers", "2", "--seq-len", "32", "--batch-size", "4", "--micro-batch-size", "4",
                "--steps", "4", "--warmup", "1", "--save-every", "2", "--eval-every", "100", "--eval-tokens", "500",
                "--no-progress", "--out", str(out)]
        code, output = _run_cli(argv, capfd)
        errors = [ln for ln in output.splitlines() if ln.startswith("error:")]
        assert code == 74 and "Traceback" not in output, output
        assert len(errors) == 1 and output.rstrip().endswith(errors[0]), output
        assert "No space left on device; the checkpoint in" in errors[0] and "(step 2) is kept" in errors[0]
        assert json.loads((out / "trainer_state" / "state.json").read_text())["step"] == 2
        from chtsl_infer.formats.model_dir import load_model

        load_model(out)
        assert not [p for p in disk.iterdir() if p.name != "ckpt"]  # no temporary directory, no lock file


def test_real_full_disk_every_writer_is_recognised(tmp_path) -> None:
    """The writers a run uses, on a really full disk: each failure is recognised as I/O (one line),
    never mistaken for a bug. safetensors and tokenizers report Rust io::Errors, torch's zip writer
    its own message, plain writes an OSError."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models

    from chtsl_infer.errors import write_failure_reason

    with _mounted_tmpfs(tmp_path / "disk", 64) as disk:
        with pytest.raises(OSError) as plain, (disk / "filler").open("wb") as f:
            f.write(b"\0" * (1 << 20))
            f.flush()
        failures = {"plain": plain.value}
        for name, write in (("safetensors", lambda: save_file({"x": torch.zeros(4096)}, disk / "x.safetensors")),
                            ("torch", lambda: torch.save(torch.zeros(4096), disk / "x.pt")),
                            ("tokenizers", lambda: Tokenizer(models.BPE()).save(str(disk / "t.json")))):
            with pytest.raises(Exception) as e:  # noqa: B017 - each library raises its own type
                write()
            failures[name] = e.value
    for name, exc in failures.items():
        reason = write_failure_reason(exc)
        assert reason is not None, (name, exc)
        if name != "torch":  # torch's message names no errno
            assert reason == os.strerror(errno.ENOSPC), (name, reason)
    assert write_failure_reason(ValueError("No space left on device (os error 28)")) is None  # not a writer's
    assert write_failure_reason(RuntimeError("size mismatch")) is None
    assert write_failure_reason(Exception("tokenizer has no vocabulary")) is None


def test_safetensors_disk_full_during_save(tmp_path, monkeypatch) -> None:
    """The error safetensors raises on a full disk (its current and its older wording), faked in the
    second save: one-line WriteFailure, the step-2 checkpoint byte-identical."""
    from safetensors import SafetensorError

    import train.checkpoint as ckpt_io

    real = ckpt_io.save_file
    state_dir = tmp_path / "ckpt" / "trainer_state"
    seen: dict[str, dict[str, str]] = {}

    def remember(step: int, model) -> None:
        if step == 3:
            seen["step 2"] = _sha(state_dir)

    for message in ("Error while serializing: I/O error: No space left on device (os error 28)",
                    'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left '
                    'on device" })'):
        calls = {"n": 0}

        def full_disk(tensors, path, *a, message=message, calls=calls, **k):
            if Path(path).name == "optimizer.safetensors":
                calls["n"] += 1
                if calls["n"] == 2:
                    raise SafetensorError(message)
            return real(tensors, path, *a, **k)

        monkeypatch.setattr(ckpt_io, "save_file", full_disk)
        shutil.rmtree(state_dir.parent, ignore_errors=True)
        seen.clear()
        with pytest.raises(WriteFailure, match=r"No space left on device; the checkpoint in .* \(step 2\) is kept"):
            train(_args(tmp_path), after_step=remember)
        assert _sha(state_dir) == seen["step 2"]
    monkeypatch.setattr(ckpt_io, "save_file", lambda *a, **k: (_ for _ in ()).throw(SafetensorError("bad dtype")))
    with pytest.raises(SafetensorError, match="bad dtype"):  # not an I/O failure: a bug, reported as one
        train(_args(tmp_path, out=str(tmp_path / "other")))


@contextmanager
def _read_only(path: Path) -> Iterator[None]:
    """`path` read-only for this process: chmod for a normal user; root ignores permissions, so a
    read-only bind mount over it (files already open stay writable, as after a remount)."""
    if os.geteuid() != 0:
        path.chmod(0o555)
        try:
            yield
        finally:
            path.chmod(0o755)
        return
    mounted = subprocess.run(["mount", "--bind", str(path), str(path)], capture_output=True).returncode == 0
    if not mounted or subprocess.run(["mount", "-o", "remount,bind,ro", str(path)],
                                     capture_output=True).returncode != 0:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], check=False)
        pytest.skip("root cannot make a directory read-only here (no bind mount)")
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_directory_turned_read_only_or_removed_mid_run(tmp_path, capfd) -> None:
    """The run directory's file system turns read-only, or the directory is removed, after the step-2
    checkpoint: the step-4 save fails with one line (exit 74) naming what is left; nothing is
    recreated behind the user's back."""
    area = tmp_path / "area"
    area.mkdir()
    out = area / "ckpt"
    ro: list = []

    def turn_read_only(step: int, model) -> None:
        if step == 3:
            ro.append(_read_only(area))
            ro[0].__enter__()

    try:
        with pytest.raises(WriteFailure, match=r"cannot write the checkpoint to .*: Read-only file system|"
                                               r"Permission denied"):
            train(_args(tmp_path, out=str(out)), after_step=turn_read_only)
    finally:
        if ro:
            ro[0].__exit__(None, None, None)
    assert json.loads((out / "trainer_state" / "state.json").read_text())["step"] == 2
    # no temporary directory; the lock file could not be removed from a read-only directory (its lock is gone)
    assert {p.name for p in area.iterdir()} <= {"ckpt", ".ckpt.lock"}

    removed = tmp_path / "gone"
    code, output = _run_cli(["train", "--resume", str(out), "--out", str(removed), "--steps", "6", "--no-progress"],
                            capfd)
    assert code == 0, output

    def remove(step: int, model) -> None:
        if step == 7:
            shutil.rmtree(removed)

    with pytest.raises(WriteFailure, match=r"the directory was removed while the run was writing it; nothing"):
        train(TrainArgs(resume=str(removed), steps=8, progress=False), after_step=remove)
    assert not removed.exists()


def test_metrics_append_on_a_full_disk(tmp_path, capfd) -> None:
    """A plain write fails: the metrics log's append after the disk filled up (real tmpfs): one line
    naming the log and the kept checkpoint; on resume the torn line it may leave is dropped."""
    size = _checkpoint_bytes(tmp_path)
    with _mounted_tmpfs(tmp_path / "disk", size * 3 // 2 // 1024) as disk:
        out = disk / "ckpt"

        def fill(step: int, model) -> None:
            if step == 3:
                with suppress(OSError), (disk / "filler").open("wb") as f:
                    while True:
                        f.write(b"\0" * 65536)
                        f.flush()

        with pytest.raises(WriteFailure, match=r"metrics.jsonl: No space left on device; the checkpoint in .* "
                                               r"\(step 2\) is kept"):
            train(_args(tmp_path, out=str(out)), after_step=fill)
        resumed = tmp_path / "resumed"  # (this disk holds one checkpoint, not the two of a swap)
        r = train(_args(tmp_path, out=str(resumed), resume=str(out)))
    assert r.step == 4
    assert [m["step"] for m in read_metrics_log(resumed / "metrics.jsonl") if "step" in m] == [1, 2, 3, 4]


# ----------------------------------------------------------------------------- signals


def test_interruptible_and_deferred_signals() -> None:
    with interruptible():
        with pytest.raises(Interrupted) as e:
            os.kill(os.getpid(), signal.SIGTERM)
        assert e.value.exit_code == 143 and e.value.signame == "SIGTERM"
        done = []
        with pytest.raises(Interrupted) as e:
            with deferred_interrupts():
                os.kill(os.getpid(), signal.SIGINT)
                done.append("the block finished first")
        assert done and e.value.exit_code == 130
        with pytest.raises(Interrupted), deferred_interrupts():  # a second signal does not wait
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
            done.append("never")
        assert done == ["the block finished first"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


@pytest.mark.parametrize(("signum", "at_step", "expect"), [
    (signal.SIGINT, 3, "interrupted by SIGINT: the checkpoint in {out} (step 2) is kept"),
    (signal.SIGTERM, 1, "interrupted by SIGTERM: no checkpoint was written to {out}"),
])
def test_signal_during_train_names_the_kept_checkpoint(tmp_path, capfd, signum, at_step, expect) -> None:
    """SIGINT/SIGTERM while `chtsl train` runs: one line naming the checkpoint kept (or that none
    was), exit 130/143; the kept checkpoint resumes."""
    import train.trainer as trainer_module

    out = tmp_path / "ckpt"
    real_loop = trainer_module.train_loop

    def loop_sending_signal(run, after_step=None):
        return real_loop(run, lambda step, model: os.kill(os.getpid(), signum) if step == at_step else None)

    argv = ["train", "--data", str(write_corpus(tmp_path / "corpus.jsonl")), "--tokenizer", "bpe", "--vocab-size",
            "512", "--num-layers", "2", "--seq-len", "32", "--batch-size", "4", "--micro-batch-size", "4",
            "--steps", "4", "--warmup", "1", "--save-every", "2", "--eval-every", "100", "--eval-tokens", "500",
            "--no-progress", "--out", str(out)]
    capfd.readouterr()
    with pytest.MonkeyPatch.context() as m:
        m.setattr(trainer_module, "train_loop", loop_sending_signal)
        code, output = _run_cli(argv, capfd)
    assert code == 128 + signum, output
    assert output.splitlines()[-1] == expect.format(out=out), output
    assert "Traceback" not in output and "error" not in output.lower(), output
    if at_step > 2:
        assert train(TrainArgs(resume=str(out), progress=False)).step == 4


def test_signal_during_a_save_lets_it_complete(tmp_path, monkeypatch, capfd) -> None:
    """SIGTERM in the middle of writing the step-2 checkpoint: the checkpoint completes, the run
    stops after it and names it."""
    import train.checkpoint as ckpt_io

    real = ckpt_io._write_checkpoint

    def signalled_write(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **k)

    monkeypatch.setattr(ckpt_io, "_write_checkpoint", signalled_write)
    out = tmp_path / "ckpt"
    capfd.readouterr()
    with pytest.raises(Interrupted):
        train(_args(tmp_path, steps=4, save_every=2))
    last = capfd.readouterr().err.splitlines()[-1]
    assert last == f"interrupted by SIGTERM: the checkpoint in {out} (step 2) is kept"
    assert json.loads((out / "trainer_state" / "state.json").read_text())["step"] == 2


# ----------------------------------------------------------------------------- options the method decides


def test_options_the_method_does_not_use_warn_and_stay_out_of_config(tmp_path, capfd) -> None:
    out = tmp_path / "ckpt"
    capfd.readouterr()
    train(_args(tmp_path, method="chts", rank=8, activation="relu", lowrank_init_scale=0.5, steps=2, save_every=2))
    err = capfd.readouterr().err
    warnings = [ln for ln in err.splitlines() if "warning:" in ln]
    assert len(warnings) == 1, err
    for flag in ("--rank (no low-rank branch)", "--activation (no low-rank branch)",
                 "--lowrank-init-scale (no low-rank branch)"):
        assert flag in warnings[0], warnings[0]
    assert "--update-interval" not in warnings[0]  # chts has a dynamic topology: it uses it
    block = json.loads((out / "config.json").read_text())["chtsl"]
    assert set(block["rank"].values()) == {0} and block["activation"] == "identity"
    assert block["lowrank_init_scale"] == 1.0
    # the same settings on a method that uses them: no warning, in the config
    capfd.readouterr()
    train(_args(tmp_path, rank=8, activation="relu", steps=2, save_every=2, out=str(tmp_path / "chtsl")))
    assert "warning:" not in capfd.readouterr().err
    block = json.loads((tmp_path / "chtsl" / "config.json").read_text())["chtsl"]
    assert set(block["rank"].values()) == {8} and block["activation"] == "relu"


@pytest.mark.parametrize(("method", "given", "unused"), [
    ("dense", ["sparsity", "rank", "align_lambda", "brf_randomness", "steps"],
     ["sparsity", "rank", "align_lambda", "brf_randomness"]),
    ("cola", ["sparsity", "rank", "activation", "align", "update_interval"], ["sparsity", "align", "update_interval"]),
    ("sltrain", ["sparsity", "rank", "brf_randomness", "restart_warmup", "lowrank_lr_scale"],
     ["brf_randomness", "restart_warmup"]),
    ("act", ["align_lambda", "rank", "sparsity"], ["align_lambda"]),
    ("chtsl", ["align_lambda", "rank", "sparsity", "brf_randomness", "update_interval"], []),
])
def test_unused_options_per_method(method, given, unused) -> None:
    from chtsl_infer.model.methods import unused_options_warning

    line = unused_options_warning(method, given)
    named = [g for g in given if line and f"--{g.replace('_', '-')} (" in line]
    assert named == unused, line


def test_warmup_beyond_steps_only_when_given(tmp_path) -> None:
    """The preset's warm-up (tiny: 30) longer than a short --steps is the preset's choice, and
    re-resolving a run's saved arguments (`chtsl sweep` compares recipes) must not fail on it."""
    from dataclasses import asdict

    from train.args import check_warmup, resolve_args

    r = train(_args(tmp_path, warmup=None, steps=2, save_every=2))
    saved = json.loads((Path(r.out) / "trainer_state" / "args.json").read_text())
    assert saved["warmup"] == 30 and saved["steps"] == 2
    again = resolve_args(TrainArgs(**{**saved, "lr": None}))
    assert asdict(again) == saved
    check_warmup(TrainArgs(), again)  # not given: no error
    with pytest.raises(ChtslError, match="--warmup 30 is longer than the run"):
        check_warmup(TrainArgs(warmup=30), again)


def test_info_flags_what_train_refuses(capfd) -> None:
    for argv, fragment in ((["--sparsity", "0.9999999"], "too few links for BRF"),
                           (["--preset", "llama60m-c4", "--rank", "100000"], "more than the dense model's")):
        code, output = _run_cli(["info", "--preset", "tiny", *argv, "--json", "-"], capfd)
        assert code == 0, output
        report = json.loads(output[:output.rindex("}") + 1])
        assert len(report["problems"]) == 1 and fragment in report["problems"][0]
        assert f"outside the budget: {report['problems'][0]}" in output.replace("\n", " ")
    code, output = _run_cli(["info", "--preset", "tiny"], capfd)
    assert code == 0 and "outside the budget" not in output and "warning" not in output
    code, output = _run_cli(["info", "--preset", "tiny", "--method", "chts", "--rank", "8", "--json", "-"], capfd)
    assert code == 0 and "warning: method 'chts' does not use --rank (no low-rank branch)" in output, output
    assert {row["rank"] for row in json.loads(output[output.index("{"):output.rindex("}") + 1])["layers"]} == {0}


def test_rope_positions_and_memory_estimate(tmp_path, monkeypatch) -> None:
    import train.args as train_args

    config = train_args.build_model_config(train_args.resolve_args(_args(tmp_path)))
    assert config.head_dim == 32
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    # the longest wavelength of the model's own rotary embedding (its slowest frequency, fp32)
    slowest = float(LlamaRotaryEmbedding(config).inv_freq.min())
    assert abs(train_args.rope_positions(config) - 2 * math.pi / slowest) <= 1
    assert train_args.rope_positions(config) == 35_332
    # tiny, 2 blocks: 6·128 + 3·344 values per block and token (fp32) + 512 fp32 logits, × 4 × 32 tokens
    resolved = train_args.resolve_args(_args(tmp_path))
    assert train_args.activation_bytes(resolved) == 4 * 32 * (2 * (6 * 128 + 3 * 344) * 4 + 4 * 512)
    monkeypatch.setattr(train_args, "device_memory", lambda device: (2**30, "a 1 GiB test machine"))
    with pytest.raises(ChtslError, match=r"--seq-len 30000 × --micro-batch-size 4 needs at least 1\.8 GiB "
                                         r".*16,448 bytes.* more than the 1\.0 GiB of a 1 GiB test machine"):
        train(_args(tmp_path, seq_len=30000))
    assert not (tmp_path / "ckpt").exists()


# ----------------------------------------------------------------------------- export --force


# `chtsl export` in a subprocess that SIGKILLs itself inside `publish_dir`: with the two-rename
# fallback (no renameat2), right after the previous export was moved aside; with renameat2, right
# after the exchange (the previous export now sits in the temporary directory).
_KILL_IN_PUBLISH = """
import os, sys
from pathlib import Path
import chtsl_infer.utils as utils
out = Path(sys.argv[sys.argv.index("--out") + 1])
if sys.argv.pop(1) == "fallback":
    utils._exchange = lambda a, b: False
    rename = Path.rename
    def rename_then_die(self, target):
        result = rename(self, target)
        if Path(self) == out:
            os.kill(os.getpid(), 9)
        return result
    Path.rename = rename_then_die
else:
    exchange = utils._exchange
    def exchange_then_die(a, b):
        assert exchange(a, b), "renameat2(RENAME_EXCHANGE) is unavailable here"
        os.kill(os.getpid(), 9)
    utils._exchange = exchange_then_die
from chtsl_infer.cli import main
main()
"""


@pytest.mark.slow  # an export subprocess, killed
@pytest.mark.parametrize("path", ["fallback", "exchange"])
def test_export_recovers_from_kill_inside_publish(cli_artifacts, tmp_path, capfd, path: str) -> None:
    """SIGKILL inside `export --force`'s publish: the output is never lost. Between the fallback's
    two renames (`out` gone, the previous export set aside) the next export restores the previous
    one first; after the exchange the new export is complete. Either way the dead temp dirs go."""
    from chtsl_infer.formats.model_dir import load_packed
    from chtsl_infer.utils import backup_path

    run = tmp_path / "run"
    shutil.copytree(cli_artifacts["run"], run)
    out = tmp_path / "exp"
    shutil.copytree(cli_artifacts["export"], out)
    before = _sha(out)
    cmd = [sys.executable, "-c", _KILL_IN_PUBLISH, path, "export", str(run), "--out", str(out), "--force",
           "--format", "safetensors", "--no-verify"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr
    if path == "fallback":
        assert not out.exists() and _sha(backup_path(out)) == before and list(tmp_path.glob(".exp.tmp-*"))
    else:
        assert not (out / "model.onnx").exists() and list(tmp_path.glob(".exp.tmp-*"))  # the new export
    code, output = _run_cli(["export", str(run), "--out", str(out), "--format", "safetensors", "--no-verify"], capfd)
    assert code == 2 and "--force" in output, output
    assert ("restored the previous export" in output) == (path == "fallback"), output
    if path == "fallback":
        assert _sha(out) == before
    load_packed(out)  # complete
    assert not backup_path(out).exists() and not list(tmp_path.glob(".exp.tmp-*"))


# ----------------------------------------------------------------------------- numbers


def test_perplexity_overflow_is_inf() -> None:
    """A diverged model's mean NLL above ~709 nats overflows math.exp: the perplexity is inf."""
    from chtsl_infer.model.loss import perplexity

    class Diverged(torch.nn.Module):
        def forward(self, input_ids):
            logits = torch.zeros(*input_ids.shape, 8)
            logits[..., 0] = 1e4  # every target below is token 1: NLL = 1e4 nats
            return SimpleNamespace(logits=logits)

    ids = torch.ones(2, 5, dtype=torch.long)
    r = perplexity(Diverged(), [SimpleNamespace(input_ids=ids, labels=ids)])
    assert r.nll == pytest.approx(1e4) and r.ppl == math.inf


def test_no_topology_update_at_t_end() -> None:
    """ζ_t = 0 at T_end: no update there (it would skip an optimizer step and restart the warm-up)."""
    from tests.conftest import tiny_model
    from train.schedule import LRSchedule
    from train.topology import TopologyEngine

    engine = TopologyEngine(tiny_model().sparse_layers(), total_steps=12, update_interval=3)
    assert engine.t_end == 9 and engine.zeta_at(9) == 0.0
    assert [s for s in range(1, 13) if engine.is_update_step(s)] == [3, 6]
    s = LRSchedule(lr=1.0, total_steps=12, warmup=1, update_interval=3, t_end=9, restart_warmup=2)
    assert s(10) == pytest.approx(s.cosine(10))  # no restarted warm-up after step 9
    assert s(7) < s.cosine(7)  # the one after the update at 6


# ----------------------------------------------------------------------------- loading


def test_loaders_never_unpickle(tmp_path, cli_artifacts) -> None:
    """A directory with only a planted pytorch_model.bin is refused by our loader and by the
    README's `from_pretrained(..., use_safetensors=True)`; the README shows that call."""
    from transformers import AutoModelForCausalLM

    import chtsl_infer  # noqa: F401
    from chtsl_infer.formats.model_dir import load_model

    d = tmp_path / "planted"
    d.mkdir()
    shutil.copy(cli_artifacts["run"] / "config.json", d / "config.json")
    torch.save({"x": torch.zeros(1)}, d / "pytorch_model.bin")
    with pytest.raises(ChtslError, match="model.safetensors"):
        load_model(d)
    with pytest.raises(OSError):
        AutoModelForCausalLM.from_pretrained(d, use_safetensors=True)
    readme = (ROOT / "README.md").read_text()
    calls = [line for line in readme.splitlines() if "from_pretrained(" in line]
    assert calls and all("use_safetensors=True" in line for line in calls)


def test_eval_and_generate_print_no_third_party_bars(cli_artifacts, tmp_path, capfd, monkeypatch) -> None:
    """No transformers load report or "Loading weights" bar in our commands' output."""
    run = cli_artifacts["run"]
    monkeypatch.chdir(tmp_path)
    code, output = _run_cli(["eval", str(run), "--perplexity", "--max-tokens", "200", "--device", "cpu"], capfd)
    assert code == 0, output
    code2, output2 = _run_cli(["generate", str(run), "--prompt", "The", "--max-new-tokens", "3", "--backend", "dense"],
                              capfd)
    assert code2 == 0, output2
    for text in (output, output2):
        assert "Loading weights" not in text and "LOAD REPORT" not in text.upper() and "%|" not in text, text
