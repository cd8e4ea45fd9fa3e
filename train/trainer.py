"""The CHTsL training loop (docs/method.md §2, §3, §5): task + alignment loss, topology updates, eval, checkpoints.

One iteration (`step`, 1-based, as the topology engine counts):

1. LR of the step from `LRSchedule` (warm-up, cosine, restarted warm-ups after topology updates);
2. forward/backward of every micro-batch of this rank (gradient accumulation = global ÷ (micro ×
   world)); the loss is `Σ token NLL / (targets of the global batch) + λ · mean over micro-batches of
   Σ_l L_align^(l)`, scaled so that DDP's gradient average gives exactly that gradient;
3. topology-update iterations run `engine.update` instead of the optimizer step (as the reference);
   other iterations clip (optional), step Adam and re-apply the masks to weights and Adam moments;
4. metrics (rank 0), validation perplexity every `eval_every`, checkpoints every `save_every`.

Everything that decides a step (weights, masks, optimizer, engine RNG, data position = step) is in
the checkpoint, so `--resume` continues bit-identically on CPU.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from chtsl_infer.console import check_output_dir, console, err_console
from chtsl_infer.errors import ChtslError, Interrupted, WriteFailure
from chtsl_infer.model.layers import branch_grad_norms, record_branches
from chtsl_infer.model.loss import perplexity, token_nll_sum
from chtsl_infer.model.methods import get_method, unused_options_warning
from chtsl_infer.utils import deferred_interrupts, dir_lock, interruptible, resolve_device
from train import checkpoint as ckpt_io
from train import distributed as dist_utils
from train.args import (
    RESUME_MUTABLE,
    TrainArgs,
    build_model_config,
    check_args,
    check_memory,
    check_warmup,
    given_options,
    resolve_args,
)
from train.data.pipeline import DataSpec, build_data
from train.schedule import LRSchedule


def build_engine(model, total_steps: int, update_interval: int, seed: int = 0, init_masks: bool = True,
                 brf_randomness: float | None = None):
    """The topology engine of `model`'s method (`Method.topology`), or None when it has none.

    With `init_masks`, a dynamic (CHTs) engine replaces the masks by BRF ones; the static (SLTrain)
    support stays the model's own uniformly random mask, which holds exactly the per-group link
    count `chtsl info` reports. `brf_randomness`: the initial masks' BRF randomness (None: the
    method's own).
    """
    from train.topology import TopologyEngine

    method = get_method(model.config.method)
    if method.topology is None:
        return None
    engine = TopologyEngine(model.sparse_layers(), total_steps=total_steps, mode=method.topology,
                            update_interval=update_interval, seed=seed,
                            brf_randomness=method.brf_randomness if brf_randomness is None else brf_randomness)
    if init_masks and method.topology != "static":
        engine.init_masks(init_std=model.config.initializer_range)
    return engine


@dataclass
class TrainResult:
    """What a run ends with (also printed as the final table)."""

    step: int
    loss: float
    val_ppl: float | None
    unigram_ppl: float
    tokens: int
    wall_s: float
    tokens_per_s: float
    topology_updates: int
    updates_changed_masks: int
    out: str
    stopped: str | None = None  # "nan" when a non-finite loss stopped the run


class MetricsLog:
    """metrics.jsonl (one JSON object per step, rank 0) and TensorBoard scalars when installed."""

    def __init__(self, out: Path, enabled: bool) -> None:
        self.out, self.enabled = out, enabled
        self.file = None
        self.tb = None
        if enabled:
            self.reopen()

    def reopen(self) -> None:
        """(Re)opens the writers in `out` (after a checkpoint swap moved the old files away)."""
        if not self.enabled:
            return
        self.close()
        with self._io():
            self.out.mkdir(parents=True, exist_ok=True)
            self.file = (self.out / "metrics.jsonl").open("a")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.out / "tensorboard"))
        except ImportError:
            self.tb = None

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self._io():
            self.file.write(json.dumps(record, default=_json_default) + "\n")
            self.file.flush()
        if self.tb is not None and "step" in record:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step" and math.isfinite(v):
                    self.tb.add_scalar(k, v, record["step"])
                elif isinstance(v, dict) and k in ("ocr", "cosine", "sparse_rms", "lowrank_rms", "grad_norms"):
                    for name, x in v.items():
                        self.tb.add_scalar(f"{k}/{name}", x, record["step"])

    def close(self) -> None:
        if self.file is not None:
            with self._io():
                self.file.close()
            self.file = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None

    @contextmanager
    def _io(self) -> Iterator[None]:
        """A failed write of the log (disk full, read-only or removed directory) becomes one line
        saying which checkpoint is kept; a torn last line it may leave is dropped on resume."""
        try:
            yield
        except OSError as e:
            file, self.file = self.file, None
            if file is not None:
                with suppress(OSError):  # closing flushes the same buffer again
                    file.close()
            raise WriteFailure(f"cannot write {self.out / 'metrics.jsonl'}: {e.strerror or e}; "
                               f"{ckpt_io.kept_checkpoint(self.out)}") from None


def _json_default(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return str(x)


class _Progress:
    """Rich progress bar with loss / ppl / tokens/s (rank 0; a no-op otherwise)."""

    def __init__(self, enabled: bool, total: int, start: int) -> None:
        self.bar = None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                TextColumn("{task.fields[info]}"), console=err_console, transient=False)
            self.task = self.bar.add_task("train", total=total, completed=start, info="")
            self.bar.start()

    def update(self, step: int, info: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step, info=info)

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def train(args: TrainArgs, after_step: Callable[[int, torch.nn.Module], None] | None = None) -> TrainResult:
    """Runs (or resumes) a training run; `after_step(step, model)` is a hook for tests."""
    check_args(args)
    main = dist_utils.is_main_process()
    resume_dir, saved_state = None, {}
    if args.resume:
        args, resume_dir, saved_state = _resume_args(args)
    elif main:
        unused = unused_options_warning(args.method, given_options(args))
        if unused:
            err_console.print(f"[yellow]warning:[/] {unused}", highlight=False, soft_wrap=True)
    given, args = args, resolve_args(args)
    if not resume_dir:
        check_warmup(given, args)
        build_model_config(args)  # its budget and sequence length, before any data is read
    out = check_output_dir(args.out, "--out")
    # One writer per run directory: rank 0 (the only one writing) holds the lock for the whole run,
    # and the checks below run under it, so two runs started at once cannot both pass them.
    with dir_lock(out) if main else nullcontext(), interruptible():
        same_dir = resume_dir is not None and out.resolve() in (resume_dir.resolve(), Path(args.resume).resolve())
        if not same_dir and (ckpt_io.resolve_checkpoint(out) / "config.json").is_file():
            hint = f"pass --resume {out}" if not args.resume else f"resume into {args.resume} itself"
            raise ChtslError(f"{out} already holds a checkpoint; {hint} or choose another --out")
        info = dist_utils.setup("cuda" if args.device.startswith("cuda") or (
            args.device == "auto" and torch.cuda.is_available()) else "cpu")
        try:
            run = build_run(args, info, resume_dir, saved_state)
            return train_loop(run, after_step)
        except Interrupted as e:  # SIGINT/SIGTERM: say what is kept (a save in progress completed first)
            if main:
                err_console.print(f"interrupted by {e.signame}: {ckpt_io.kept_checkpoint(out)}", highlight=False,
                                  soft_wrap=True)
            raise
        finally:
            dist_utils.teardown(info)


def _resume_args(args: TrainArgs) -> tuple[TrainArgs, Path, dict[str, Any]]:
    """(the checkpoint's arguments with this command line's changes, its directory, its state.json).

    A field counts as given when it differs from the `TrainArgs` default; only `RESUME_MUTABLE`
    fields may differ from the checkpoint's.
    """
    resume_dir = ckpt_io.resolve_checkpoint(args.resume)
    saved_state, saved_args = ckpt_io.load_state(args.resume)
    ckpt_io.check_resumable(resume_dir, saved_state)
    merged = dict(saved_args)
    defaults = TrainArgs()
    for f in fields(TrainArgs):
        new, default = getattr(args, f.name), getattr(defaults, f.name)
        if f.name in ("resume", "stop_at", "out") or new is None or new == default:
            continue  # not given on the command line
        if f.name in RESUME_MUTABLE:
            merged[f.name] = new
        elif new != saved_args.get(f.name):
            raise ChtslError(f"--{f.name.replace('_', '-')} {new!r} differs from the checkpoint being resumed "
                             f"({saved_args.get(f.name)!r}); it cannot change on resume")
    merged.update(resume=str(args.resume), stop_at=args.stop_at,
                  out=args.out if args.out != defaults.out else str(args.resume))
    args = TrainArgs(**{k: v for k, v in merged.items() if k in TrainArgs.__dataclass_fields__})
    done = saved_state["step"]
    if args.steps < done:
        raise ChtslError(f"--steps {args.steps} is below the checkpoint's step {done}")
    if args.steps == done:
        raise ChtslError(f"{args.resume} already reached its last step ({done}); the run is done "
                         f"(pass a larger --steps to train on)")
    return args, resume_dir, saved_state


# ----------------------------------------------------------------------------- build


@dataclass
class Run:
    """Everything a training run works with once built (`build_run`), and its running totals."""

    args: TrainArgs
    info: dist_utils.DistInfo
    device: str
    out: Path
    data: Any  # train.data.pipeline.Data
    model: torch.nn.Module  # ChtslLlamaForCausalLM, unwrapped
    ddp_model: torch.nn.Module  # `model`, or its DistributedDataParallel wrapper
    engine: Any  # train.topology.TopologyEngine | None
    optimizer: torch.optim.Optimizer
    schedule: LRSchedule
    log: MetricsLog
    autocast: Any  # context manager of each forward
    hybrid: dict[str, torch.nn.Module]  # layers with both branches (OCR, cosine, alignment)
    align_names: set[str]  # layers in the alignment loss
    lam: float  # alignment λ (0 when no layer aligns)
    n_micro: int  # micro-batches per rank per step
    step: int = 0  # last completed step
    tokens_seen: int = 0
    last_val: dict[str, Any] | None = None
    topology_updates: int = 0
    updates_changed_masks: int = 0


def build_run(args: TrainArgs, info: dist_utils.DistInfo, resume_dir: Path | None,
              saved_state: dict[str, Any]) -> Run:
    """Data, model, topology engine, optimizer, LR schedule, DDP wrapper and logs of a run
    (restored from `resume_dir` when resuming)."""
    device = resolve_device(args.device, info.local_rank if info.distributed else None)
    check_memory(args, device)
    # bf16 autocast: by default on CUDA; on CPU only when asked (fast on CPUs with AVX512-BF16/AMX,
    # slower elsewhere, but it runs anywhere, which lets CI exercise the mixed-precision paths).
    use_bf16 = args.dtype == "bf16" or (args.dtype == "auto" and device.startswith("cuda"))
    torch.manual_seed(args.seed)

    data = _build_data(args, info, resume_dir)
    model, storage, storage_why = _build_model(args, data.vocab_size, resume_dir, device, info)
    model.to(device).train()
    engine = build_engine(model, args.steps, args.update_interval, seed=args.seed, init_masks=not resume_dir,
                          brf_randomness=args.brf_randomness)
    optimizer = build_optimizer(model, args.lr, lowrank_lr_scale=args.lowrank_lr_scale)
    start_step, tokens_seen = 0, 0
    if resume_dir:
        ckpt_io.load_optimizer(resume_dir, optimizer, model, saved_state["optimizer"])
        if engine is not None:
            ckpt_io.load_topology(resume_dir, engine, saved_state["topology"])
        ckpt_io.load_rng(resume_dir)
        start_step, tokens_seen = int(saved_state["step"]), int(saved_state["tokens_seen"])
    schedule = LRSchedule(
        lr=args.lr, total_steps=args.steps, warmup=args.warmup, min_lr_ratio=args.min_lr_ratio,
        update_interval=args.update_interval if engine is not None and engine.mode != "static" else None,
        t_end=engine.t_end if engine is not None else 0.0, restart_warmup=args.restart_warmup,
    )
    out = Path(args.out)
    log = _open_log(out, info, resume_dir, start_step)
    hybrid = {n: m for n, m in model.chtsl_layers().items() if m.has_sparse and m.has_lowrank}
    align_names = set(model.align_layers())
    run = Run(args=args, info=info, device=device, out=out, data=data, model=model,
              ddp_model=_wrap_ddp(model, info, device), engine=engine, optimizer=optimizer, schedule=schedule,
              log=log, autocast=torch.autocast(torch.device(device).type, dtype=torch.bfloat16) if use_bf16
              else nullcontext(),
              hybrid=hybrid, align_names=align_names,
              lam=float(model.config.chtsl["align_lambda"]) if align_names else 0.0,
              n_micro=args.batch_size // (args.micro_batch_size * info.world), step=start_step,
              tokens_seen=tokens_seen, last_val=saved_state.get("last_val"))
    trainable = model.trainable_linear_params()
    align_weights = effective_align_weights(run.lam, args.micro_batch_size, args.seq_len,
                                            {n: hybrid[n].out_features for n in align_names})
    if info.is_main:
        print_header(args, model.config, trainable, hybrid, run.lam, align_weights,
                     resumed_at=start_step if resume_dir else None)
    if info.is_main and not resume_dir:
        log.write({"event": "start", "unigram_ppl": data.unigram_ppl, "trainable_linear_params": trainable,
                   "train_rows": data.train_rows, "train_tokens": data.train_tokens, "world_size": info.world,
                   "args": asdict(args), "s_total": model.config.chtsl["s_total"], "align_weight": align_weights,
                   "sparse_storage": storage, "sparse_storage_reason": storage_why, "threads": torch.get_num_threads()})
    elif info.is_main:
        log.write({"event": "resume", "from_step": start_step, "sparse_storage": storage,
                   "sparse_storage_reason": storage_why, "threads": torch.get_num_threads()})
    return run


def _build_data(args: TrainArgs, info: dist_utils.DistInfo, resume_dir: Path | None):  # -> train.data.pipeline.Data
    """This rank's shard of the train stream and the validation batches (the checkpoint's
    tokenizer when resuming)."""
    from chtsl_infer.formats.model_dir import load_tokenizer

    spec = DataSpec(data=args.data, tokenizer=args.tokenizer, vocab_size=args.vocab_size, seq_len=args.seq_len,
                    packing=args.packing, eval_tokens=args.eval_tokens, seed=args.seed)
    tokenizer = load_tokenizer(resume_dir) if resume_dir else None
    return build_data(spec, global_batch=args.batch_size, micro_batch=args.micro_batch_size, rank=info.rank,
                      world=info.world, eval_batch=args.micro_batch_size, tokenizer=tokenizer)


def _build_model(args: TrainArgs, vocab_size: int, resume_dir: Path | None, device: str,
                 info: dist_utils.DistInfo) -> tuple[torch.nn.Module, str, str]:
    """(model, sparse storage, why that storage): the preset's model at `args`, or the checkpoint's
    config and weights when resuming (converted when the storage differs)."""
    from chtsl_infer.formats.model_dir import load_checkpoint_weights
    from chtsl_infer.model.modeling import ChtslLlamaForCausalLM
    from chtsl_infer.model.storage import convert_state_dict, resolve_storage

    weights = None
    if resume_dir:
        config, weights = load_checkpoint_weights(resume_dir)  # validated before the model is built
    else:
        config = build_model_config(args, vocab_size, max_position_embeddings=max(args.seq_len, 256))
    storage, storage_why = resolve_storage(args.sparse_storage, config.method, device, config.chtsl["d_c"])
    config.chtsl["storage"] = storage
    if info.is_main:
        console.print(f"sparse storage: {storage} ({storage_why})", highlight=False)
    model = ChtslLlamaForCausalLM(config)
    if weights is not None:
        try:  # a checkpoint of the other storage is converted; a corrupt CSR is named, nothing written
            weights = convert_state_dict(weights, model)
        except ValueError as e:
            raise ChtslError(f"{resume_dir}: {e}") from None
        model.load_state_dict(weights, strict=True)
        del weights
    return model, storage, storage_why


def build_optimizer(model: torch.nn.Module, lr: float, lowrank_lr_scale: float = 1.0) -> torch.optim.Optimizer:
    """The optimizer of the model's method (`Method.optimizer`, `Method.weight_decay`).

    With `lowrank_lr_scale` ≠ 1 the low-rank factors A, B form a second parameter group whose
    `lr_scale` multiplies the scheduled learning rate (`train_step`)."""
    method = get_method(model.config.method)
    optimizer_class = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[method.optimizer]
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if lowrank_lr_scale == 1.0:
        groups = [{"params": [p for _, p in named]}]
    else:
        is_lowrank = [n.endswith(("lora_A", "lora_B")) for n, _ in named]
        groups = [{"params": [p for (_, p), low in zip(named, is_lowrank, strict=True) if not low]},
                  {"params": [p for (_, p), low in zip(named, is_lowrank, strict=True) if low],
                   "lr_scale": lowrank_lr_scale}]
    # The fused (one kernel per parameter) update is ~10-15 % faster per step on CPU and makes no
    # parameter-sized temporaries: without it the embedding's alone add ~0.2 GB to peak RSS at 130M.
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for _, p in named)
    return optimizer_class(groups, lr=lr, weight_decay=method.weight_decay, fused=fused or None)


def _wrap_ddp(model: torch.nn.Module, info: dist_utils.DistInfo, device: str) -> torch.nn.Module:
    """`model` wrapped in DistributedDataParallel under torchrun, else `model` itself."""
    if not info.distributed:
        return model
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    # The support buffers (masks, CSR indices) are identical on every rank (same init, the engine
    # broadcasts every update) and gloo cannot broadcast csr's int16 columns: DDP leaves them out.
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
        model, [f"{n}.{b}" for n, m in model.sparse_layers().items() for b in m.storage.support_buffers])
    # Masks are identical on every rank (the engine broadcasts them): no buffer sync per forward.
    no_sync_kw = ({"forward_sync_buffers": False}
                  if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                  else {"broadcast_buffers": False})
    return DistributedDataParallel(model, device_ids=[info.local_rank] if device.startswith("cuda") else None,
                                   **no_sync_kw)


def _open_log(out: Path, info: dist_utils.DistInfo, resume_dir: Path | None, start_step: int) -> MetricsLog:
    """The metrics log in `out` (rank 0); a resume keeps the lines up to the checkpoint's step."""
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if resume_dir:
            if resume_dir.resolve() != out.resolve():
                for name in ckpt_io.CARRIED:
                    src = resume_dir / name
                    if src.is_file():
                        shutil.copy2(src, out / name)
            ckpt_io.truncate_metrics(out / "metrics.jsonl", start_step)
        else:  # `out` holds no checkpoint (checked): logs there are a killed run's, which this run replaces
            (out / "metrics.jsonl").unlink(missing_ok=True)
            shutil.rmtree(out / "tensorboard", ignore_errors=True)
        ckpt_io.clean_stale(out)
    return MetricsLog(out, info.is_main)


# ----------------------------------------------------------------------------- one step


def train_step(run: Run, step: int) -> dict[str, Any]:
    """One iteration (`step`, 1-based): forward/backward of this rank's micro-batches, then a
    topology update or an optimizer step. Returns the step's metrics record; when its loss is not
    finite, nothing is updated and the record holds only the losses."""
    args = run.args
    lr = run.schedule(step)
    for g in run.optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
    diagnostic_step = step % args.ocr_every == 0 or step == 1 or step == args.steps
    task, align_mean, branches = _forward_backward(run, step, bool(run.hybrid) and diagnostic_step)
    total = task + run.lam * align_mean
    record: dict[str, Any] = {"step": step, "loss": total, "task_loss": task, "align_loss": align_mean, "lr": lr}
    if not math.isfinite(total):
        return record
    if diagnostic_step:  # of the whole step's gradient (all micro-batches, all ranks), before clipping
        record["grad_norms"] = branch_grad_norms(run.model.chtsl_layers().values())
    if run.engine is not None and run.engine.is_update_step(step):
        stats = run.engine.update(step, run.optimizer)
        run.optimizer.zero_grad(set_to_none=True)
        run.topology_updates += 1
        run.updates_changed_masks += stats["frac_changed"] > 0
        record["topology"] = stats
        record["density"] = _density(run.model)
    else:
        if args.grad_clip and args.grad_clip > 0:
            params = [p for g in run.optimizer.param_groups for p in g["params"]]
            record["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, args.grad_clip))
        run.optimizer.step()
        if run.engine is not None:
            run.engine.apply_masks(run.optimizer)
        run.optimizer.zero_grad(set_to_none=True)
    if branches:
        # Per hybrid layer, on the first micro-batch: ocr, cosine, align (L_align^(l), optimised or
        # not), sparse_rms / lowrank_rms (the two branch outputs' scales); align_value: Σ align,
        # comparable across methods (align_loss is what was optimised).
        record.update(branches, align_value=sum(branches["align"].values()))
        record.setdefault("density", _density(run.model))
    return record


def _forward_backward(run: Run, step: int, diagnostics: bool) -> tuple[float, float, dict[str, dict[str, float]]]:
    """Accumulates the gradient of the step's loss over this rank's micro-batches.

    Returns (task loss: Σ NLL / targets of the global batch, alignment: mean over all micro-batches
    of Σ_l L_align^(l), and when `diagnostics` the branch diagnostics of the first micro-batch:
    {"ocr" | "cosine" | "align" | "sparse_rms" | "lowrank_rms": {hybrid layer: value}}, else {}).
    """
    info = run.info
    batches = run.data.train.step_batches(step - 1)
    n_targets = torch.tensor([float(sum(b.n_targets for b in batches))], dtype=torch.float64)
    n_targets = dist_utils.all_reduce_sum(n_targets, info).item()
    sums = torch.zeros(2, dtype=torch.float64)  # task NLL sum, alignment sum
    branches: dict[str, dict[str, float]] = {}
    for i, b in enumerate(batches):
        sync = i == len(batches) - 1 or not info.distributed
        ctx = nullcontext() if sync else run.ddp_model.no_sync()
        with ctx, record_branches(run.hybrid, align=run.align_names,
                                  diagnostics=diagnostics and i == 0 and info.is_main) as rec:
            with run.autocast:
                logits = run.ddp_model(input_ids=b.input_ids.to(run.device)).logits
            nll, _ = token_nll_sum(logits, b.labels.to(run.device))
            align = rec.alignment()
            # Scaled so that DDP's gradient average gives exactly the gradient of the global loss.
            loss = nll * (info.world / n_targets)
            if align is not None and run.lam:
                loss = loss + run.lam * align / run.n_micro
            loss.backward()
        sums[0] += float(nll.detach())
        sums[1] += float(align.detach()) if align is not None else 0.0
        if rec.ocr:
            branches = {"ocr": dict(rec.ocr), "cosine": dict(rec.cosine), "align": dict(rec.align),
                        "sparse_rms": dict(rec.sparse_rms), "lowrank_rms": dict(rec.lowrank_rms)}
    sums = dist_utils.all_reduce_sum(sums, info)
    return sums[0].item() / n_targets, sums[1].item() / (run.n_micro * info.world), branches


# ----------------------------------------------------------------------------- the loop


def train_loop(run: Run, after_step: Callable[[int, torch.nn.Module], None] | None = None) -> TrainResult:
    """Steps from the run's last completed step to `stop_at` (or `steps`): metrics every step,
    validation every `eval_every`, checkpoints every `save_every` and at the end."""
    args = run.args
    progress = _Progress(args.progress and run.info.is_main, args.steps, run.step)
    wall_start = time.perf_counter()
    compute_tokens = 0
    last_loss, stopped = math.nan, None
    end = args.stop_at or args.steps
    try:
        for step in range(run.step + 1, end + 1):
            t0 = time.perf_counter()
            record = train_step(run, step)
            if not math.isfinite(record["loss"]):
                stopped = "nan"
                # Logged after the last checkpoint's step: a resume drops it, `chtsl sweep` reads it.
                run.log.write({"event": "diverged", "step": step, "loss": None,
                               "task_loss": _finite(record["task_loss"]), "align_loss": _finite(record["align_loss"])})
                err_console.print(f"[bold red]error:[/] non-finite loss ({record['loss']}) at step {step}; "
                                  f"training stopped, {ckpt_io.kept_checkpoint(run.out)}", highlight=False,
                                  soft_wrap=True)
                break
            run.step, last_loss = step, record["loss"]
            step_tokens = args.batch_size * args.seq_len
            run.tokens_seen += step_tokens
            compute_tokens += step_tokens
            dt = time.perf_counter() - t0
            record.update(tokens=run.tokens_seen, tokens_per_s=step_tokens / dt, step_time_s=dt)
            if step % args.eval_every == 0 or step == args.steps:
                run.last_val = evaluate(run)
                if run.last_val:
                    record.update(run.last_val)
            if after_step is not None:
                after_step(step, run.model)
            run.log.write(record)
            val_txt = f" · ppl {run.last_val['val_ppl']:.1f}" if run.last_val else ""
            progress.update(step, f"loss {record['loss']:.3f}{val_txt} · {step_tokens / dt:,.0f} tok/s")
            if step % args.save_every == 0 or step == end:
                save(run)
    finally:
        progress.stop()
        run.log.close()
    wall = time.perf_counter() - wall_start
    return TrainResult(
        step=run.step, loss=last_loss, val_ppl=run.last_val["val_ppl"] if run.last_val else None,
        unigram_ppl=run.data.unigram_ppl, tokens=run.tokens_seen, wall_s=wall,
        tokens_per_s=compute_tokens / wall if wall > 0 else 0.0, topology_updates=run.topology_updates,
        updates_changed_masks=run.updates_changed_masks, out=str(run.out), stopped=stopped,
    )


def evaluate(run: Run) -> dict[str, Any] | None:
    """Validation perplexity on rank 0 (None on the other ranks, which wait for it)."""
    result = None
    if run.info.is_main:
        r = perplexity(run.model, run.data.val, run.device)
        result = {"val_ppl": r.ppl, "val_nll": r.nll, "val_tokens": r.tokens, "unigram_ppl": run.data.unigram_ppl}
    dist_utils.barrier(run.info)
    return result


def save(run: Run) -> None:
    """Writes the checkpoint of the last completed step (rank 0; every rank waits for it)."""
    if run.info.is_main:
        state = {"step": run.step, "tokens_seen": run.tokens_seen, "world_size": run.info.world,
                 "last_val": run.last_val}
        with deferred_interrupts():  # a signal now lets the checkpoint complete, then stops the run
            run.log.close()
            ckpt_io.save_checkpoint(run.out, model=run.model, tokenizer=run.data.tokenizer,
                                    optimizer=run.optimizer, engine=run.engine, state=state,
                                    args={**asdict(run.args), "resume": None, "stop_at": None})
            run.log.reopen()
    dist_utils.barrier(run.info)


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def effective_align_weights(lam: float, micro_batch: int, seq_len: int, outs: dict[str, int]) -> dict[str, float]:
    """λ/√(B·N_l) per aligned layer type: the weight of RMS(S_l − L_l) in λ·L_align^(l).

    `L_align^(l) = ||S_l − L_l||_F / (B·N_l)` with B = micro-batch (sequences per forward) and
    N_l = seq_len · out_l equals RMS(S_l − L_l)/√(B·N_l): for a fixed λ its pull on the branches,
    relative to the (mean) task loss, shrinks like 1/√(B·N) (docs/sweep.md). `outs`: layer name → out.
    """
    weights: dict[str, float] = {}
    for name, out in sorted(outs.items()):
        kind = name.rsplit(".", 1)[-1]
        weights.setdefault(kind, lam / math.sqrt(micro_batch * seq_len * out))
    return weights


def print_header(args: TrainArgs, config: Any, trainable: int, hybrid: dict[str, Any], lam: float,
                 align_weights: dict[str, float], resumed_at: int | None) -> None:
    """The run header (stderr): recipe in one line, and how the alignment loss acts in this run."""
    head = (f"chtsl train · {config.method} · preset {args.preset} · s_total {config.chtsl['s_total']:.4f} · "
            f"{trainable:,} trainable linear params · {args.steps} steps · batch {args.batch_size} × seq "
            f"{args.seq_len} (micro-batch {args.micro_batch_size}) · lr {args.lr:g} · seed {args.seed}")
    if get_method(config.method).has_lowrank:
        head += f" · low-rank init × {config.chtsl['lowrank_init_scale']:g}"
    if resumed_at is not None:
        head += f" · resumed at step {resumed_at}"
    err_console.print(head, highlight=False, soft_wrap=True)
    if align_weights:
        by_weight: dict[float, list[str]] = {}
        for kind, w in align_weights.items():
            by_weight.setdefault(w, []).append(kind.removesuffix("_proj"))
        parts = ", ".join(f"{w:.3g} ({'/'.join(k)})" for w, k in by_weight.items())
        err_console.print(f"alignment: λ = {lam:g} on Σ_l ||S_l − L_l||_F/(B·N_l), B = micro-batch "
                          f"{args.micro_batch_size}, N_l = {args.seq_len}·out_l: effective weight λ/√(B·N_l) "
                          f"on RMS(S_l − L_l) = {parts}", highlight=False, soft_wrap=True)
    elif hybrid:
        err_console.print(f"alignment: not optimised by {config.method}; its value is logged every "
                          f"{args.ocr_every} steps with OCR and cosine", highlight=False, soft_wrap=True)


def _density(model: torch.nn.Module) -> float:
    """Active links / positions over all sparse layers."""
    layers = model.sparse_layers().values()
    total = sum(m.out_features * m.in_features for m in layers)
    links = sum(m.storage.n_links(m) for m in layers)
    return links / total if total else 1.0


def print_result(r: TrainResult) -> None:
    """The final Rich table of a run."""
    from rich.table import Table

    t = Table(title=f"chtsl train → {r.out}")
    t.add_column("metric")
    t.add_column("value", justify="right")
    rows = [("steps", str(r.step)), ("final loss", f"{r.loss:.4f}"),
            ("val ppl", f"{r.val_ppl:.2f}" if r.val_ppl is not None else "-"),
            ("unigram ppl (val)", f"{r.unigram_ppl:.2f}"), ("tokens", f"{r.tokens:,}"),
            ("wall time", f"{r.wall_s:.1f} s"), ("tokens/s", f"{r.tokens_per_s:,.0f}"),
            ("topology updates (changed masks)", f"{r.topology_updates} ({r.updates_changed_masks})")]
    for k, v in rows:
        t.add_row(k, v)
    console.print(t)
