"""Training checkpoints (docs/formats.md §1): an HF model directory plus `trainer_state/`, written atomically.

Layout of `ckpt/`: `config.json`, `model.safetensors`, tokenizer files, `metrics.jsonl` (and
`tensorboard/`), and `trainer_state/`:

    state.json             step, tokens seen, data position, world size, LR schedule, optimizer
                           param groups and parameter names, topology scalars, format version
    args.json              the resolved run arguments (data, seq_len, eval tokens, packing,
                           tokenizer, preset, method, seed, ...) — `chtsl eval --perplexity` reads it
    optimizer.safetensors  Adam state: `<param name>.<exp_avg|exp_avg_sq|step>`
    topology.safetensors   engine masks and its RNG state (when the method has an engine)
    rng.safetensors        torch CPU (and CUDA) RNG states

No pickles anywhere. A checkpoint is written into a temporary sibling directory and swapped in
with one atomic `renameat2(RENAME_EXCHANGE)` (Linux); elsewhere the old directory is first renamed
to `<name>.old` (which `resolve_checkpoint` falls back to), so a kill at any moment leaves a
complete checkpoint.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from chtsl_infer.console import UserError

STATE_DIR = "trainer_state"
FORMAT = "chtsl-trainer-state"
FORMAT_VERSION = 1
CARRIED = ("metrics.jsonl", "tensorboard")  # logs that live in ckpt/ and move with each save
# Test hook: seconds to sleep in the middle of a checkpoint write (the SIGKILL-during-save test).
SLOW_SAVE_ENV = "CHTSL_TEST_SLOW_SAVE"


# ----------------------------------------------------------------------------- atomic directory swap


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


def _backup(path: Path) -> Path:
    return path.with_name(f"{path.name}.old")


def publish_dir(tmp: Path, target: Path) -> None:
    """Makes the complete directory `tmp` become `target`, replacing any previous one atomically."""
    if not target.exists():
        tmp.rename(target)
    elif _exchange(tmp, target):
        shutil.rmtree(tmp, ignore_errors=True)  # now holds the previous checkpoint
    else:
        backup = _backup(target)
        shutil.rmtree(backup, ignore_errors=True)
        target.rename(backup)
        tmp.rename(target)
        shutil.rmtree(backup, ignore_errors=True)
    backup = _backup(target)
    if backup.exists():
        shutil.rmtree(backup, ignore_errors=True)


def resolve_checkpoint(path: str | Path) -> Path:
    """`path`, or its `.old` backup when a save was interrupted between the two fallback renames."""
    p = Path(path)
    if not (p / "config.json").is_file() and (_backup(p) / STATE_DIR / "state.json").is_file():
        return _backup(p)
    return p


def is_training_checkpoint(path: str | Path) -> bool:
    p = Path(path)
    return (p / "config.json").is_file() and (p / "model.safetensors").is_file() and (
        p / STATE_DIR / "state.json").is_file()


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
    """Writes a full training checkpoint to `out` atomically; returns `out`.

    `model` is the unwrapped HF model; `state` the JSON-able loop state (step, data position, ...);
    `args` the run arguments. Logs in `CARRIED` are copied from the current `out` into the new one.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.tmp-*"):  # leftovers of a killed save
        shutil.rmtree(stale, ignore_errors=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    tmp.mkdir()
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # our own progress bar is the one on screen
        model.save_pretrained(tmp, safe_serialization=True)
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
        if os.environ.get(SLOW_SAVE_ENV):
            time.sleep(float(os.environ[SLOW_SAVE_ENV]))
        full_state = {"format": FORMAT, "format_version": FORMAT_VERSION, **state, "optimizer": opt_meta,
                      "topology": topo_meta}
        (sd / "args.json").write_text(json.dumps(args, indent=2, default=str) + "\n")
        (sd / "state.json").write_text(json.dumps(full_state, indent=2, default=str) + "\n")
        for name in CARRIED:
            src = out / name
            if src.is_file():
                shutil.copy2(src, tmp / name)
            elif src.is_dir():
                shutil.copytree(src, tmp / name)
        publish_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# ----------------------------------------------------------------------------- load


def load_state(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state.json, args.json) of a training checkpoint; UserError if `path` is not one."""
    p = resolve_checkpoint(path)
    if not is_training_checkpoint(p):
        raise UserError(f"{path} is not a chtsl training checkpoint (expected config.json, model.safetensors "
                        f"and {STATE_DIR}/state.json)")
    try:
        state = json.loads((p / STATE_DIR / "state.json").read_text())
        args = json.loads((p / STATE_DIR / "args.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{p / STATE_DIR} is unreadable: {e}") from None
    if state.get("format") != FORMAT or state.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{p} has an unsupported trainer-state format {state.get('format_version')!r}")
    return state, args


def load_optimizer(path: Path, optimizer: torch.optim.Optimizer, model: torch.nn.Module,
                   meta: dict[str, Any]) -> None:
    """Restores `optimizer` (built over `model`'s parameters in the same groups) from a checkpoint.

    Moments saved in the other sparse storage (masked ↔ csr) are re-laid out for `model`'s."""
    from chtsl_infer.storage import convert_optimizer_state

    tensors = load_file(Path(path) / STATE_DIR / "optimizer.safetensors")
    tensors, meta = convert_optimizer_state(tensors, meta, model)
    params = dict(model.named_parameters())
    index = {id(p): i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
    groups, state = [], {}
    for g in meta["param_groups"]:
        ids = []
        for name in g["params"]:
            if name not in params:
                raise UserError(f"optimizer state names an unknown parameter {name!r}")
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
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def load_topology(path: Path, engine: Any, meta: dict[str, Any]) -> None:
    tensors = load_file(Path(path) / STATE_DIR / "topology.safetensors")
    engine.load_state_dict({**tensors, **meta})


def load_rng(path: Path) -> None:
    rng = load_file(Path(path) / STATE_DIR / "rng.safetensors")
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available():
        states = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda."))]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
