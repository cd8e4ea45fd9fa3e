"""`chtsl export CKPT`: packed safetensors and/or a sparse ONNX graph, verified against PyTorch.

Everything is written into a temporary directory beside the output and published
(`chtsl_infer.utils.publish_dir`) only when every stage (and the verification, when on) has
succeeded, so a failure leaves no partial output behind; `--force` replaces an existing output the
same way.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Annotated

import typer

from chtsl_infer.console import check_output_file, console, err_console, stale_siblings, write_json
from chtsl_infer.errors import ChtslError, WriteFailure, first_line, write_failure_reason
from chtsl_infer.formats.model_dir import ONNX_NAME, TRAINER_STATE_DIR, WEIGHTS_NAME, is_packed_dir, resolve_model_dir
from chtsl_infer.options import Checkpoint, Force, JsonOut, PackedDtype
from chtsl_infer.utils import (
    PACKED_DTYPES,
    backup_path,
    dir_lock,
    make_temp_dir,
    parse_dtype,
    publish_dir,
    resolve_device,
    torch_dtype,
)

FORMATS = ("safetensors", "onnx", "all")


def _human(n: int) -> str:
    """Bytes as a short human-readable size (KiB/MiB/GiB, binary units)."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def is_export_dir(path: Path) -> bool:
    """True when `path` is a directory `chtsl export` wrote: a packed model.safetensors or a
    model.onnx, and no trainer state (a training checkpoint is never an export)."""
    return path.is_dir() and not (path / TRAINER_STATE_DIR).exists() and (
        is_packed_dir(path) or (path / ONNX_NAME).is_file())


def _check_output(ckpt: Path, out: Path, force: bool) -> None:
    """ChtslError when `out` may not be (re)written: exists without --force, is not a previous export
    (only those may be replaced), or would hit `ckpt`."""
    c, o = ckpt.resolve(), out.resolve()
    if o == c or o in c.parents:
        raise ChtslError(f"output {out} would overwrite the checkpoint {ckpt}; choose another --out")
    if out.exists() or out.is_symlink():
        if not out.is_dir() or out.is_symlink():
            raise ChtslError(f"output {out} exists and is not a directory")
        if not force:
            raise ChtslError(f"output {out} already exists; pass --force to replace it")
        if not is_export_dir(out):
            raise ChtslError(f"output {out} is not a previous export (no packed model.safetensors or model.onnx, "
                            f"or it holds a training state); --force only replaces an export")
    if not out.parent.is_dir():
        raise ChtslError(f"cannot write to {out}: {out.parent} is not a directory")


def recover_output(out: Path) -> str | None:
    """Repairs what a killed export left beside `out`: the previous export `publish_dir` set aside
    (`backup_path(out)`, where renameat2 is unavailable and the kill fell between its two renames,
    so `out` is gone) is moved back, and temporary directories of dead exports are removed. Returns
    a note when it restored one."""
    note = None
    backup = backup_path(out)
    if is_export_dir(backup):
        if not out.exists() and not out.is_symlink():
            backup.rename(out)
            note = f"restored the previous export {out} (an interrupted --force had moved it aside)"
        else:  # the kill came after the new export took its place
            shutil.rmtree(backup, ignore_errors=True)
    for p in stale_siblings(out, "tmp"):
        shutil.rmtree(p, ignore_errors=True)
    return note


def _make_temp_dir(out: Path) -> Path:
    try:
        return make_temp_dir(out)
    except OSError as e:
        raise ChtslError(f"cannot write to {out.parent}: {e.strerror or e}") from None


class _Stages:
    """A Rich progress bar over the export's stages; each finished stage prints one line."""

    def __init__(self, names: list[str]) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self.progress = Progress(
            SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), console=console, transient=True,
            disable=not console.is_terminal,  # a log file gets the per-stage lines only
        )
        self.task = self.progress.add_task("export", total=len(names))

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.progress.update(self.task, description=name)
        start = time.perf_counter()
        yield
        self.progress.console.print(f"[green]✓[/] {name} [dim]({time.perf_counter() - start:.1f} s)[/]")
        self.progress.advance(self.task)


def export_command(
    ckpt: Checkpoint,
    fmt: Annotated[str, typer.Option("--format", help="safetensors|onnx|all.")] = "all",
    out: Annotated[Path | None, typer.Option("--out", help="Output directory (default: CKPT/export).")] = None,
    dtype: PackedDtype = "fp32",
    index: Annotated[str | None, typer.Option(
        "--index", help="Column encoding of S: absolute (int16/int32) or delta8 (8-bit deltas; the default for bf16 "
        "and int8).")] = None,
    opset: Annotated[int, typer.Option("--opset", help="ONNX opset (>= 18; the exporter cannot go down to 17).")] = 18,
    verify: Annotated[bool, typer.Option("--verify/--no-verify", help="Compare exported logits with PyTorch.")] = True,
    verify_device: Annotated[str | None, typer.Option(
        "--verify-device", help="Also verify the packed file through the inference runtime (dense and sparse "
        "backends) on this device: auto, cpu, cuda or cuda:N.")] = None,
    force: Force = False,
    json_out: JsonOut = None,
) -> None:
    """Export a checkpoint as packed CSR + low-rank safetensors and/or a sparse ONNX graph."""
    if fmt not in FORMATS:
        raise ChtslError(f"unknown format {fmt!r}; valid: {', '.join(FORMATS)}")
    dtype = parse_dtype(dtype, PACKED_DTYPES)
    if dtype == "int8" and fmt == "onnx":
        raise ChtslError("--dtype int8 is for the packed safetensors; the ONNX graph stays float32 "
                         "(use --format safetensors or all)")
    from chtsl_infer.formats.packed import INDEX_ENCODINGS

    if index is not None and index not in INDEX_ENCODINGS:
        raise ChtslError(f"unknown --index {index!r}; valid: {', '.join(INDEX_ENCODINGS)}")
    if index is not None and fmt == "onnx":
        raise ChtslError("--index encodes the packed safetensors' columns: use it with --format safetensors|all")
    from export.onnx import MIN_OPSET

    if opset < MIN_OPSET:
        raise ChtslError(f"opset must be >= {MIN_OPSET}, got {opset}")
    if fmt != "safetensors":
        import onnx.defs

        if opset > onnx.defs.onnx_opset_version():
            raise ChtslError(f"--opset {opset} does not exist: the installed onnx knows opsets up to "
                            f"{onnx.defs.onnx_opset_version()}")
    device = None
    if verify_device is not None:
        if not verify or fmt not in ("safetensors", "all"):
            raise ChtslError("--verify-device verifies the packed safetensors: use it with --verify and --format "
                             "safetensors|all")
        device = resolve_device(verify_device, flag="--verify-device")
    model_dir = resolve_model_dir(ckpt).require_weights()
    out = out if out is not None else ckpt / "export"
    # One writer per output directory (its parent must exist: `_check_output` says so otherwise);
    # the checks run under the lock, so two exports started at once cannot both pass them.
    with dir_lock(out) if out.parent.is_dir() else nullcontext():
        _export_locked(ckpt, model_dir, out, fmt, dtype, index, opset, verify, force, device, json_out)


def _export_locked(ckpt: Path, model_dir, out: Path, fmt: str, dtype: str, index: str | None, opset: int,
                   verify: bool, force: bool, device: str | None, json_out: str | None) -> None:
    """The export of `model_dir` (a `ModelDir`) into `out`, whose writer lock the caller holds."""
    if out.parent.is_dir():
        note = recover_output(out)
        if note:
            err_console.print(f"[yellow]note:[/] {note}", highlight=False, soft_wrap=True)
    _check_output(ckpt, out, force)
    check_output_file(json_out, force)

    want_packed, want_onnx = fmt in ("safetensors", "all"), fmt in ("onnx", "all")
    names = ["load checkpoint"] + ["pack safetensors"] * want_packed
    names += ["export ONNX graph", "sparsify ONNX weights", "check ONNX (full_check)"] * want_onnx
    names += ["copy config + tokenizer"] + ["verify vs PyTorch"] * verify
    tmp = _make_temp_dir(out)
    try:
        summary, checks = _run(model_dir, tmp, names, want_packed, want_onnx, dtype, index, opset, verify, device)
        failed = [c for c in checks if not c.ok]
        if not failed:
            try:
                publish_dir(tmp, out)
            except OSError as e:
                raise WriteFailure(f"cannot write {out}: {e.strerror or e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # no-op once renamed into place

    _print_summary(summary, out, dtype, want_onnx)
    if checks:
        from export.verify import checks_table

        console.print(checks_table(checks))
    write_json({"out": str(out), "dtype": dtype, "files": summary, "verification": [c.to_dict() for c in checks],
                "written": not failed}, json_out, force)
    if failed:
        console.print(f"[bold red]verification failed[/] ({len(failed)} of {len(checks)} checks beyond tolerance); "
                      f"nothing written to {out}")
        raise typer.Exit(1)
    console.print(f"exported to [bold]{out}[/]")


def _run(model_dir, tmp: Path, names: list[str], want_packed: bool, want_onnx: bool, dtype: str, index: str | None,
         opset: int, verify: bool, device: str | None = None) -> tuple[list[dict], list]:
    """The export stages of `model_dir` (a `ModelDir`) into `tmp`: returns (summary rows, verification checks)."""
    ckpt = model_dir.path
    from transformers.utils import logging as hf_logging

    from chtsl_infer.formats.model_dir import load_model, write_support_files
    from chtsl_infer.model.storage import to_storage
    from export import onnx as onnx_export
    from export.packed import write_packed

    hf_logging.disable_progress_bar()  # our own progress bar reports the stages
    stages = _Stages(names)
    summary: list[dict] = []
    checks: list = []
    with stages.progress:
        with stages.stage("load checkpoint"):
            try:
                model = load_model(model_dir).float()
                if want_onnx:  # the ONNX graph traces dense S (weight·mask) for a csr-storage checkpoint
                    to_storage(model, "masked")
            except ChtslError:
                raise
            except Exception as e:  # corrupt/truncated weights surface as assorted library errors
                raise ChtslError(f"cannot load {ckpt}: {first_line(e)}") from None
        if want_packed:
            with stages.stage("pack safetensors"):
                stats = _writing(lambda: write_packed(model, tmp, torch_dtype(dtype), index), tmp)
            summary += [
                _row(WEIGHTS_NAME, stats.file_bytes, stats.dense_equivalent_bytes, stats.decode),
                _row("  └ CHTsL linears", stats.linear_bytes, stats.dense_linear_bytes),
            ]
        if want_onnx:
            try:
                ostats = _writing(lambda: onnx_export.export_onnx(model, tmp / ONNX_NAME, opset,
                                                                  stage=stages.stage), tmp)
            except ValueError as e:  # the requested opset could not be produced
                raise ChtslError(str(e)) from None
            summary += [
                _row("model.onnx (float32)", ostats.file_bytes, ostats.dense_equivalent_bytes),
                _row("  └ CHTsL linears", ostats.linear_bytes, ostats.dense_linear_bytes),
            ]
        with stages.stage("copy config + tokenizer"):
            _writing(lambda: write_support_files(ckpt, tmp), tmp)
        if verify:
            with stages.stage("verify vs PyTorch"):
                from export.verify import (
                    cached_batch,
                    random_batches,
                    reference_logits,
                    verify_onnx,
                    verify_onnx_cached,
                    verify_packed,
                    verify_runtime,
                )

                batches = random_batches(model.config.vocab_size)
                refs = reference_logits(model, batches)
                if want_packed:
                    checks += verify_packed(tmp / WEIGHTS_NAME, batches, refs)
                    if device is not None:
                        checks += verify_runtime(tmp, batches, refs, device)
                if want_onnx:
                    checks += verify_onnx(tmp / ONNX_NAME, batches, refs)
                    ids = cached_batch(model.config.vocab_size)
                    checks += verify_onnx_cached(tmp / ONNX_NAME, ids, reference_logits(model, [ids])[0])
    return summary, checks


def _writing(fn, tmp: Path):
    """Runs a writing step; I/O failures (disk full, permissions, from plain writes or safetensors)
    become one-line `WriteFailure`s."""
    try:
        return fn()
    except Exception as e:
        reason = write_failure_reason(e)
        if reason is None:
            raise
        raise WriteFailure(f"cannot write into {tmp.parent}: {reason}; nothing was written to the output") from None


def _row(name: str, size: int, dense: int, decode: dict[str, float] | None = None) -> dict:
    """A summary row; `decode`: what a decoded token reads (`PackedModel.decode_bytes`), for the packed file."""
    row = {"file": name, "bytes": size, "dense_equivalent_bytes": dense, "ratio": size / dense if dense else None}
    if decode:
        row.update(bytes_per_link=decode["per_link"], bytes_per_token=decode["total"])
    return row


def _print_summary(rows: list[dict], out: Path, dtype: str, onnx: bool) -> None:
    from rich.table import Table

    table = Table(title=f"chtsl export → {out} (packed values {dtype})")
    for col in ("file", "size", "dense-equivalent size", "ratio"):
        table.add_column(col, justify="left" if col == "file" else "right")
    for r in rows:
        ratio = f"{r['ratio']:.3f}×" if r["ratio"] is not None else "-"
        table.add_row(r["file"], _human(r["bytes"]), _human(r["dense_equivalent_bytes"]), ratio)
    console.print(table)
    for r in rows:
        if "bytes_per_token" in r:
            per_link = r["bytes_per_link"]
            link = f"{per_link:.2f} bytes per link of S · " if per_link == per_link else ""  # NaN: no sparse branch
            console.print(f"{r['file']}: {link}{_human(int(r['bytes_per_token']))} read per decoded token")
    if onnx and dtype != "fp32":
        console.print("[dim]the ONNX graph is float32 (--dtype sets the packed safetensors' values)[/]")
