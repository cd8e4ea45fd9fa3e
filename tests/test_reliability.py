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
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from chtsl_infer.cli import main
from chtsl_infer.errors import ChtslError
from chtsl_infer.utils import dir_lock, lock_path
from tests.conftest import write_corpus
from train.args import TrainArgs
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
    """ENOSPC in the second save: one line, exit 2, the step-2 checkpoint byte-identical, no temp dir."""
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
    with pytest.raises(ChtslError, match="No space left on device; the previous checkpoint there is intact"):
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
    assert code == 2 and "Traceback" not in output, output
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


# ----------------------------------------------------------------------------- export --force


@pytest.mark.slow  # an export subprocess, killed
def test_export_recovers_from_kill_between_renames(cli_artifacts, tmp_path, capfd) -> None:
    """SIGKILL after `export --force` moved the old export aside and before the new one took its
    place: the next export restores the previous one first (and removes the dead temp dirs)."""
    run = tmp_path / "run"
    shutil.copytree(cli_artifacts["run"], run)
    out = tmp_path / "exp"
    shutil.copytree(cli_artifacts["export"], out)
    before = _sha(out)
    env = {**os.environ, "CHTSL_TEST_KILL_BETWEEN_RENAMES": "1"}
    cmd = [sys.executable, "-c", "from chtsl_infer.cli import main; main()", "export", str(run), "--out", str(out),
           "--force", "--format", "safetensors", "--no-verify"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr
    assert not out.exists() and list(tmp_path.glob(".exp.old-*")) and list(tmp_path.glob(".exp.tmp-*"))
    code, output = _run_cli(["export", str(run), "--out", str(out), "--format", "safetensors", "--no-verify"], capfd)
    assert code == 2 and "restored the previous export" in output and "--force" in output, output
    assert _sha(out) == before
    assert not list(tmp_path.glob(".exp.old-*")) and not list(tmp_path.glob(".exp.tmp-*"))


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
    from chtsl_infer.formats.checkpoint import load_model

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
