"""Training checkpoints (docs/formats.md §1): an HF model directory plus `trainer_state/`, written atomically.

Layout of `ckpt/`: `config.json`, `model.safetensors`, tokenizer files, `metrics.jsonl` (and
`tensorboard/`), and `trainer_state/`:

    state.json             step (= data position), tokens seen, world size, last validation, optimizer
                           param groups and parameter names, topology scalars, format version
    args.json              the resolved run arguments (data, seq_len, eval tokens, packing,
                           tokenizer, preset, method, seed, ...) — `chtsl eval --perplexity` reads it
    optimizer.safetensors  Adam state: `<param name>.<exp_avg|exp_avg_sq|step>`
    topology.safetensors   engine masks and its RNG state (when the method has an engine)
    rng.safetensors        torch CPU (and CUDA) RNG states

No pickles anywhere. A checkpoint is written into a temporary sibling directory and swapped in
with one atomic `renameat2(RENAME_EXCHANGE)` (Linux); elsewhere the old directory is first renamed
to `.<name>.old` (`utils.publish_dir`; `resolve_checkpoint` falls back to it), so a kill at any
moment leaves a complete checkpoint. The model's files, and the JSON of the trainer state, are
read and validated by `chtsl_infer.formats.model_dir`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from chtsl_infer.errors import ChtslError, WriteFailure, write_failure_reason
from chtsl_infer.formats.model_dir import (
    CONFIG_NAME,
    TRAINER_STATE_DIR,
    TRAINER_STATE_FORMAT,
    TRAINER_STATE_VERSION,
    WEIGHTS_NAME,
    check_weights_header,
    load_tensors,
    read_config,
    read_trainer_state,
    safetensors_shapes,
    save_checkpoint_model,
)
from chtsl_infer.utils import atomic_write_text, backup_path, publish_dir

STATE_DIR = TRAINER_STATE_DIR
CARRIED = ("metrics.jsonl", "tensorboard")  # logs that live in ckpt/ and move with each save


def resolve_checkpoint(path: str | Path) -> Path:
    """`path`, or its `.old` backup when a save was interrupted between the two fallback renames."""
    p = Path(path)
    if not (p / CONFIG_NAME).is_file() and (backup_path(p) / STATE_DIR / "state.json").is_file():
        return backup_path(p)
    return p


# ----------------------------------------------------------------------------- save


def _optimizer_tensors(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> tuple[dict, dict]:
    tensors: dict[str, torch.Tensor] = {}
    groups = []
    for group in optimizer.param_groups:
        meta = {k: v for k, v in group.items() if k != "params"}
        meta["params"] = [names[id(p)] for p in group["params"]]
        groups.append(meta)
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if not isinstance(value, torch.Tensor):
                    raise TypeError(f"optimizer state {key!r} is not a tensor")
                tensors[f"{names[id(p)]}.{key}"] = value.detach().to("cpu").contiguous()
    return tensors, {"param_groups": groups}


def save_checkpoint(
    out: str | Path,
    *,
    model: torch.nn.Module,
    tokenizer: Any,
    optimizer: torch.optim.Optimizer,
    engine: Any | None,
    state: dict[str, Any],
    args: dict[str, Any],
) -> Path:
    """Writes a full training checkpoint to the run directory `out` (which exists: the run made it)
    atomically; returns `out`.

    `model` is the unwrapped HF model; `state` the JSON-able loop state (step, data position, ...);
    `args` the run arguments. Logs in `CARRIED` are copied from the current `out` into the new one.
    A write the environment fails (disk full, read-only, `out` removed meanwhile) raises one-line
    `WriteFailure` and leaves the previous checkpoint as it was.
    """
    out = Path(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        if not (out.is_dir() or backup_path(out).is_dir()):  # the run made it: not recreated behind the user
            raise WriteFailure(f"cannot write the checkpoint to {out}: the directory was removed while the run was "
                               f"writing it; nothing of the run is left there")
        clean_stale(out)
        shutil.rmtree(tmp, ignore_errors=True)  # this process's own, from a save that failed
        tmp.mkdir()
        _write_checkpoint(tmp, out, model=model, tokenizer=tokenizer, optimizer=optimizer, engine=engine,
                          state=state, args=args)
        publish_dir(tmp, out)
    except Exception as e:  # disk full, read-only, vanished: the previous checkpoint is untouched
        shutil.rmtree(tmp, ignore_errors=True)
        reason = write_failure_reason(e)
        if reason is None:
            raise
        raise WriteFailure(f"cannot write the checkpoint to {out}: {reason}; {kept_checkpoint(out)}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def kept_checkpoint(out: str | Path) -> str:
    """What `out` holds for a message after a failure or an interruption: "the checkpoint in OUT
    (step N) is kept", or that none was written."""
    try:
        step = load_state(out)[0]["step"]
    except ChtslError:
        return f"no checkpoint was written to {out}"
    return f"the checkpoint in {out} (step {step}) is kept"


def clean_stale(out: Path) -> None:
    """Removes `.OUT.tmp-PID` directories of saves whose process died (a SIGKILL mid-write)."""
    from chtsl_infer.console import stale_siblings

    for stale in stale_siblings(out, "tmp"):
        shutil.rmtree(stale, ignore_errors=True)


def _write_checkpoint(tmp: Path, out: Path, *, model: torch.nn.Module, tokenizer: Any,
                      optimizer: torch.optim.Optimizer, engine: Any | None, state: dict[str, Any],
                      args: dict[str, Any]) -> None:
    """Writes every file of a checkpoint into the empty directory `tmp` (see `save_checkpoint`)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress bar is the one on screen
    save_checkpoint_model(model, tmp)
    tokenizer.save_pretrained(tmp)
    sd = tmp / STATE_DIR
    sd.mkdir()
    names = {id(p): n for n, p in model.named_parameters()}
    opt_tensors, opt_meta = _optimizer_tensors(optimizer, names)
    save_file(opt_tensors, sd / "optimizer.safetensors")
    topo_meta = None
    if engine is not None:
        topo = engine.state_dict()
        save_file({k: v.contiguous() for k, v in topo.items() if isinstance(v, torch.Tensor)},
                  sd / "topology.safetensors")
        topo_meta = {k: v for k, v in topo.items() if not isinstance(v, torch.Tensor)}
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"cuda.{i}"] = s
    save_file(rng, sd / "rng.safetensors")
    full_state = {"format": TRAINER_STATE_FORMAT, "format_version": TRAINER_STATE_VERSION, **state,
                  "optimizer": opt_meta, "topology": topo_meta}
    (sd / "args.json").write_text(json.dumps(args, indent=2, default=str) + "\n")
    (sd / "state.json").write_text(json.dumps(full_state, indent=2, default=str) + "\n")
    for name in CARRIED:
        src = out / name
        if src.is_file():
            shutil.copy2(src, tmp / name)
        elif src.is_dir():
            shutil.copytree(src, tmp / name)
    _carry_extras(out, tmp)


def _carry_extras(out: Path, tmp: Path) -> None:
    """Carries everything else the user keeps in `out` (e.g. `chtsl export`'s default `out/export`,
    `chtsl plot`'s `out/plots`) into the new checkpoint `tmp` as hard links (no copy of the bytes;
    a copy where links are impossible): the swap would otherwise delete it with the old checkpoint."""
    if not out.is_dir():
        return
    for src in out.iterdir():
        if (tmp / src.name).exists() or src.is_symlink() and not src.exists():
            continue  # written by this save (model, tokenizer, trainer state, carried logs)
        if src.is_dir():
            shutil.copytree(src, tmp / src.name, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(str(src), str(tmp / src.name))


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)


# ----------------------------------------------------------------------------- metrics.jsonl


def _metrics_lines(path: Path, warn: bool = True) -> list[tuple[str, dict[str, Any]]]:
    """(line, record) of each non-blank line of the metrics log `path` (see `read_metrics_log`)."""
    from chtsl_infer.console import err_console

    try:
        data = path.read_bytes()
    except OSError as e:
        raise ChtslError(f"cannot read {path}: {e.strerror or e}") from None
    lines = data.split(b"\n")
    # `data` ends with "\n" when every line is complete: the last piece is then empty.
    out = []
    for lineno, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            if lineno == len(lines):  # no newline after it: an append cut short by a kill
                if warn:
                    err_console.print(f"[yellow]warning:[/] {path}:{lineno}: dropped an incomplete last line "
                                      f"(a run stopped while writing it)", highlight=False, soft_wrap=True)
                break
            raise ChtslError(f"{path}:{lineno} is not valid JSON ({getattr(e, 'msg', None) or e.reason})") from None
        if not isinstance(record, dict):
            raise ChtslError(f"{path}:{lineno} is not a JSON object")
        out.append((raw.decode("utf-8"), record))
    return out


def read_metrics_log(path: str | Path, warn: bool = True) -> list[dict[str, Any]]:
    """The records of a run's `metrics.jsonl`, in order.

    A last line without its newline that is not valid JSON is what a kill in the middle of an
    append leaves: it is dropped with one warning line (`warn`: False for a reader polling a live
    run, whose last line may be half-written) (a complete record whose newline is missing is kept).
    Any other line that is not a JSON object is damage, not a torn append: ChtslError naming
    `path:line`.
    """
    return [record for _, record in _metrics_lines(Path(path), warn)]


def truncate_metrics(path: str | Path, step: int) -> None:
    """Rewrites the metrics log `path` (atomically) without the records logged after `step` (written
    after the checkpoint being resumed) and without a torn last line (`read_metrics_log`)."""
    path = Path(path)
    if not path.is_file():
        return
    keep = [line for line, record in _metrics_lines(path) if record.get("step", 0) <= step]
    atomic_write_text(path, "".join(line + "\n" for line in keep))


# ----------------------------------------------------------------------------- load


def load_state(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state.json, args.json) of a training checkpoint (its `.old` backup after an interrupted save);
    ChtslError if `path` is not one (`model_dir.read_trainer_state`)."""
    return read_trainer_state(resolve_checkpoint(path))


def check_resumable(path: Path, state: dict[str, Any]) -> None:
    """Every file a resume reads is present and a readable safetensors of the right names and shapes
    (headers only, nothing loaded): config.json, model.safetensors, the optimizer, topology (when
    the run has an engine) and RNG states. ChtslError naming the first bad file."""
    config = read_config(path)
    check_weights_header(config, path / WEIGHTS_NAME, path / CONFIG_NAME)
    safetensors_shapes(path / STATE_DIR / "optimizer.safetensors")
    if state.get("topology") is not None:
        safetensors_shapes(path / STATE_DIR / "topology.safetensors")
    if "torch" not in safetensors_shapes(path / STATE_DIR / "rng.safetensors"):
        raise ChtslError(f"{path / STATE_DIR / 'rng.safetensors'}: no torch RNG state")


def load_optimizer(path: Path, optimizer: torch.optim.Optimizer, model: torch.nn.Module,
                   meta: dict[str, Any]) -> None:
    """Restores `optimizer` (built over `model`'s parameters in the same groups) from a checkpoint.

    Moments saved in the other sparse storage (masked ↔ csr) are re-laid out for `model`'s."""
    from chtsl_infer.model.storage import convert_optimizer_state

    tensors = load_tensors(Path(path) / STATE_DIR / "optimizer.safetensors")
    tensors, meta = convert_optimizer_state(tensors, meta, model)
    params = dict(model.named_parameters())
    index = {id(p): i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
    groups, state = [], {}
    for g in meta["param_groups"]:
        ids = []
        for name in g["params"]:
            if name not in params:
                raise ChtslError(f"optimizer state names an unknown parameter {name!r}")
            i = index[id(params[name])]
            ids.append(i)
            prefix = f"{name}."
            entry = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)
                     and "." not in k[len(prefix):]}
            if entry:
                state[i] = entry
        groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": ids})
    for g in groups:  # JSON turned tuples (betas) into lists
        for k, v in g.items():
            if isinstance(v, list) and k != "params":
                g[k] = tuple(v)
    try:
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (KeyError, ValueError, RuntimeError, TypeError) as e:
        raise ChtslError(f"{Path(path) / STATE_DIR / 'optimizer.safetensors'} does not match the model: "
                        f"{str(e).strip().splitlines()[0] if str(e).strip() else e!r}") from None


def load_topology(path: Path, engine: Any, meta: dict[str, Any]) -> None:
    file = Path(path) / STATE_DIR / "topology.safetensors"
    tensors = load_tensors(file)
    try:
        engine.load_state_dict({**tensors, **meta})
    except (KeyError, ValueError, RuntimeError, TypeError) as e:
        raise ChtslError(f"{file} does not match the model: {str(e).strip().splitlines()[0] if str(e).strip() else e!r}"
                        ) from None


def load_rng(path: Path) -> None:
    file = Path(path) / STATE_DIR / "rng.safetensors"
    rng = load_tensors(file)
    try:
        torch.set_rng_state(rng["torch"])
    except (KeyError, RuntimeError, TypeError) as e:
        raise ChtslError(f"{file}: not a torch RNG state ({e})") from None
    if torch.cuda.is_available():
        states = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda."))]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
