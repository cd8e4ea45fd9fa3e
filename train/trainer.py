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
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from chtsl_infer.console import UserError, check_output_dir, console, err_console
from evals.perplexity import perplexity, token_nll_sum
from train import checkpoint as ckpt_io
from train import distributed as dist_utils
from train.data import DataSpec, build_data
from train.schedule import LRSchedule

# Fields a `--resume` may change; every other recipe field must match the checkpoint.
RESUME_MUTABLE = ("out", "stop_at", "eval_every", "save_every", "ocr_every", "device", "progress", "steps",
                  "sparse_storage")


@dataclass
class TrainArgs:
    """Run arguments; None means "the preset's value" (resolved by `resolve_args`)."""

    preset: str = "tiny"
    method: str = "chtsl"
    s_total: float = 0.9
    align: str = "all"
    align_lambda: float | None = None
    activation: str | None = None
    steps: int | None = None
    warmup: int | None = None
    lr: float | None = None
    min_lr_ratio: float | None = None
    batch_size: int | None = None
    micro_batch_size: int | None = None
    seq_len: int | None = None
    update_interval: int | None = None
    restart_warmup: int | None = None
    eval_every: int | None = None
    save_every: int | None = None
    ocr_every: int | None = None
    eval_tokens: int | None = None
    data: str | None = None
    tokenizer: str | None = None
    vocab_size: int | None = None
    packing: bool = False
    grad_clip: float | None = None
    num_layers: int | None = None
    dtype: str = "auto"
    device: str = "auto"
    seed: int = 0
    sparse_storage: str = "auto"  # auto | masked | csr (chtsl_infer.storage)
    out: str = "ckpt"
    resume: str | None = None
    stop_at: int | None = None
    progress: bool = True


# The smallest trained BPE: 256 byte symbols + the 4 special tokens of `train.tokenizer.train_bpe`.
MIN_BPE_VOCAB = 260
# Integer settings that must be >= 1 when given (None: the preset's value; 0 is never "default").
POSITIVE_INTS = ("steps", "batch_size", "micro_batch_size", "seq_len", "update_interval", "eval_every", "save_every",
                 "ocr_every", "eval_tokens", "vocab_size", "num_layers", "stop_at")
NON_NEGATIVE_INTS = ("warmup", "restart_warmup")
DEVICES = ("auto", "cpu", "cuda")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_args(args: TrainArgs) -> None:
    """Refuses values no run can use, before anything is built (UserError naming the option).

    None means "the preset's value"; an explicit 0 or a negative count, a non-finite or
    non-positive learning rate, a NaN clip or λ, an unknown device are errors, never defaults.
    """
    for name in POSITIVE_INTS:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"{_flag(name)} must be >= 1, got {value}")
    for name in NON_NEGATIVE_INTS:
        value = getattr(args, name)
        if value is not None and value < 0:
            raise UserError(f"{_flag(name)} must be >= 0, got {value}")
    if args.lr is not None and not (math.isfinite(args.lr) and args.lr > 0):
        raise UserError(f"--lr must be a positive finite number, got {args.lr}")
    if args.grad_clip is not None and not (math.isfinite(args.grad_clip) and args.grad_clip >= 0):
        raise UserError(f"--grad-clip must be a finite number >= 0 (0: off), got {args.grad_clip}")
    if args.align_lambda is not None and not (math.isfinite(args.align_lambda) and args.align_lambda >= 0):
        raise UserError(f"--align-lambda must be a finite number >= 0, got {args.align_lambda}")
    if args.min_lr_ratio is not None and not 0.0 <= args.min_lr_ratio <= 1.0:
        raise UserError(f"min_lr_ratio must be in [0, 1], got {args.min_lr_ratio}")
    if not math.isfinite(args.s_total):
        raise UserError(f"--s-total must be a finite number, got {args.s_total}")
    if args.device not in DEVICES and not args.device.startswith("cuda:"):
        raise UserError(f"unknown --device {args.device!r}; valid: {', '.join(DEVICES)}, cuda:N")
    if args.dtype not in ("auto", "fp32", "bf16"):
        raise UserError(f"unknown --dtype {args.dtype!r}; valid: auto, fp32, bf16")
    if args.vocab_size is not None and args.vocab_size < MIN_BPE_VOCAB and args.tokenizer in (None, "bpe"):
        raise UserError(f"--vocab-size must be >= {MIN_BPE_VOCAB} for a trained BPE (256 bytes + 4 special "
                        f"tokens), got {args.vocab_size}")


def resolve_args(args: TrainArgs) -> TrainArgs:
    """Fills every None recipe field from the preset (docs/method.md §5); validates values."""
    from chtsl_infer.presets import get_preset

    try:
        p = get_preset(args.preset)
    except ValueError as e:
        raise UserError(str(e)) from None
    # A preset's trained BPE needs a local corpus; hub data falls back to the paper's tokenizer. A
    # local or builtin corpus trains a BPE of the preset's vocabulary (the paper's t5-base needs the
    # hub, which an offline machine does not reach; pass --tokenizer t5-base to use a cached one).
    hub_data = (args.data or p.data) in ("c4", "owt")
    tokenizer = args.tokenizer or (("t5-base" if p.tokenizer == "bpe" else p.tokenizer) if hub_data else "bpe")
    lr = args.lr if args.lr is not None else (p.dense_lr if args.method == "dense" else p.lr)
    r = TrainArgs(**{**asdict(args), **dict(
        steps=_given(args.steps, p.steps), warmup=args.warmup if args.warmup is not None else p.warmup, lr=lr,
        min_lr_ratio=args.min_lr_ratio if args.min_lr_ratio is not None else p.min_lr_ratio,
        batch_size=_given(args.batch_size, p.batch_size),
        micro_batch_size=_given(args.micro_batch_size, min(p.micro_batch_size, _given(args.batch_size, p.batch_size))),
        seq_len=_given(args.seq_len, p.seq_len), update_interval=_given(args.update_interval, p.update_interval),
        restart_warmup=args.restart_warmup if args.restart_warmup is not None else p.restart_warmup,
        eval_every=_given(args.eval_every, p.eval_every), save_every=_given(args.save_every, p.save_every),
        ocr_every=_given(args.ocr_every, p.ocr_every), eval_tokens=_given(args.eval_tokens, p.eval_tokens),
        data=args.data or p.data, tokenizer=tokenizer, vocab_size=_given(args.vocab_size, p.vocab_size),
        grad_clip=args.grad_clip if args.grad_clip is not None else (0.5 if args.method == "cola" else 0.0),
        align_lambda=args.align_lambda if args.align_lambda is not None else p.align_lambda,
    )})
    check_args(r)
    settings = engine_settings(r.method)
    if settings is not None and settings[0] != "static" and r.restart_warmup >= r.update_interval:
        raise UserError(f"--restart-warmup ({r.restart_warmup}) must be shorter than --update-interval "
                        f"({r.update_interval})")
    if r.stop_at is not None and not 1 <= r.stop_at <= r.steps:
        raise UserError(f"--stop-at must be in [1, {r.steps}]")
    from chtsl_infer.storage import check_choice

    try:
        check_choice(r.sparse_storage, r.method)
    except ValueError as e:
        raise UserError(f"--sparse-storage {r.sparse_storage}: {e}") from None
    return r


def _given(value: Any, default: Any) -> Any:
    """`value` unless it is None (0 is a value: `check_args` refuses it where it is meaningless)."""
    return default if value is None else value


def engine_settings(method: str) -> tuple[str, float] | None:
    """(topology mode, BRF randomness) of a method; None when it has no sparse branch to manage."""
    if method in ("chtsl", "act", "naive"):
        return "chts", 0.0
    if method == "chts":
        return "chts", 0.25
    if method == "sltrain":
        return "static", 1.0
    return None


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
    history: list[dict[str, Any]] = field(default_factory=list)


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
        self.file.write(json.dumps(record, default=_json_default) + "\n")
        self.file.flush()
        if self.tb is not None and "step" in record:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step" and math.isfinite(v):
                    self.tb.add_scalar(k, v, record["step"])
                elif isinstance(v, dict) and k in ("ocr", "cosine"):
                    for name, x in v.items():
                        self.tb.add_scalar(f"{k}/{name}", x, record["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def _json_default(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return str(x)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drops the lines logged after `step` (written after the checkpoint being resumed)."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip()
            and json.loads(line).get("step", 0) <= step]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    tmp.replace(path)


def _pick_device(device: str, info: dist_utils.DistInfo) -> str:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError("--device cuda requested but CUDA is not available")
        if info.distributed:
            device = f"cuda:{info.local_rank}"
    return device


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
    resume_dir = None
    saved_state: dict[str, Any] = {}
    if args.resume:
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
                raise UserError(f"--{f.name.replace('_', '-')} {new!r} differs from the checkpoint being resumed "
                                f"({saved_args.get(f.name)!r}); it cannot change on resume")
        merged.update(resume=str(args.resume), stop_at=args.stop_at,
                      out=args.out if args.out != defaults.out else str(args.resume))
        args = TrainArgs(**{k: v for k, v in merged.items() if k in TrainArgs.__dataclass_fields__})
        done = saved_state["step"]
        if args.steps < done:
            raise UserError(f"--steps {args.steps} is below the checkpoint's step {done}")
        if args.steps == done:
            raise UserError(f"{args.resume} already reached its last step ({done}); the run is done "
                            f"(pass a larger --steps to train on)")
    args = resolve_args(args)
    out = Path(args.out)
    same_dir = resume_dir is not None and out.resolve() in (resume_dir.resolve(), Path(args.resume).resolve())
    if not same_dir and (ckpt_io.resolve_checkpoint(out) / "config.json").is_file():
        hint = f"pass --resume {out}" if not args.resume else f"resume into {args.resume} itself"
        raise UserError(f"{out} already holds a checkpoint; {hint} or choose another --out")
    check_output_dir(out, "--out")

    info = dist_utils.setup("cuda" if args.device.startswith("cuda") or (
        args.device == "auto" and torch.cuda.is_available()) else "cpu")
    try:
        return _run(args, info, resume_dir, saved_state, after_step)
    finally:
        dist_utils.teardown(info)


def _run(
    args: TrainArgs,
    info: dist_utils.DistInfo,
    resume_dir: Path | None,
    saved_state: dict[str, Any],
    after_step: Callable[[int, torch.nn.Module], None] | None,
) -> TrainResult:
    """The loop of `train` once arguments are resolved (the process group is set up around it)."""
    import chtsl_infer  # noqa: F401  (registers the Auto classes for from_pretrained)
    from chtsl_infer.checkpoint import load_checkpoint_weights, load_tokenizer
    from chtsl_infer.layers import record_branches
    from chtsl_infer.modeling import ChtslLlamaForCausalLM
    from chtsl_infer.presets import build_config
    from chtsl_infer.storage import convert_state_dict, resolve_storage
    from train.topology import TopologyEngine

    device = _pick_device(args.device, info)
    # bf16 autocast: by default on CUDA; on CPU only when asked (fast on CPUs with AVX512-BF16/AMX,
    # slower elsewhere, but it runs anywhere, which lets CI exercise the mixed-precision paths).
    use_bf16 = args.dtype == "bf16" or (args.dtype == "auto" and device.startswith("cuda"))
    out = Path(args.out)
    torch.manual_seed(args.seed)

    # ---- data (each rank builds its own shard of the train stream)
    spec = DataSpec(data=args.data, tokenizer=args.tokenizer, vocab_size=args.vocab_size, seq_len=args.seq_len,
                    packing=args.packing, eval_tokens=args.eval_tokens, seed=args.seed)
    tokenizer = load_tokenizer(resume_dir) if resume_dir else None
    data = build_data(spec, global_batch=args.batch_size, micro_batch=args.micro_batch_size, rank=info.rank,
                      world=info.world, eval_batch=args.micro_batch_size, tokenizer=tokenizer)
    n_micro = args.batch_size // (args.micro_batch_size * info.world)

    # ---- model, topology engine, optimizer
    resume_weights = None
    if resume_dir:
        config, resume_weights = load_checkpoint_weights(resume_dir)
    else:
        overrides = {"num_hidden_layers": args.num_layers} if args.num_layers else {}
        try:
            config = build_config(args.preset, method=args.method, s_total=args.s_total, activation=args.activation,
                                  align_lambda=args.align_lambda, align_layers=args.align, vocab_size=data.vocab_size,
                                  max_position_embeddings=max(args.seq_len, 256), **overrides)
        except ValueError as e:
            raise UserError(str(e)) from None
    storage, storage_why = resolve_storage(args.sparse_storage, config.method, device, config.chtsl["d_c"])
    config.chtsl["storage"] = storage
    if info.is_main:
        console.print(f"sparse storage: {storage} ({storage_why})", highlight=False)
    model = ChtslLlamaForCausalLM(config)
    if resume_weights is not None:
        try:  # a checkpoint of the other storage is converted; a corrupt CSR is named, nothing written
            resume_weights = convert_state_dict(resume_weights, model)
        except ValueError as e:
            raise UserError(f"{resume_dir}: {e}") from None
        model.load_state_dict(resume_weights, strict=True)
        del resume_weights
    model.to(device).train()
    settings = engine_settings(config.method)
    engine = None
    if settings is not None:
        mode, randomness = settings
        engine = TopologyEngine(model.sparse_layers(), total_steps=args.steps, mode=mode,
                                update_interval=args.update_interval, brf_randomness=randomness, seed=args.seed)
        if not resume_dir and mode != "static":
            # BRF init. The static (SLTrain) support stays the model's own uniformly random mask,
            # which holds exactly the per-group link count `chtsl info` reports.
            engine.init_masks()
    params = [p for p in model.parameters() if p.requires_grad]
    if config.method == "cola":
        optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    else:
        optimizer = torch.optim.Adam(params, lr=args.lr, weight_decay=0.0)
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
    ddp_model: torch.nn.Module = model
    if info.distributed:
        import inspect

        from torch.nn.parallel import DistributedDataParallel

        # Masks are identical on every rank (the engine broadcasts them): no buffer sync per forward.
        no_sync_kw = ({"forward_sync_buffers": False}
                      if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                      else {"broadcast_buffers": False})
        # The CSR index buffers of csr layers are identical on every rank (same init, the engine
        # broadcasts every update) and gloo cannot broadcast their int16 columns: DDP leaves them out.
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            model, [f"{n}.{b}" for n, m in model.sparse_layers().items() if m.storage == "csr"
                    for b in ("crow_indices", "col_indices")])
        ddp_model = DistributedDataParallel(model, device_ids=[info.local_rank] if device.startswith("cuda") else None,
                                            **no_sync_kw)

    # ---- logs (rank 0): resume keeps the lines up to the checkpoint's step
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if resume_dir:
            if resume_dir.resolve() != out.resolve():
                for name in ckpt_io.CARRIED:
                    src = resume_dir / name
                    if src.is_file():
                        shutil.copy2(src, out / name)
            _truncate_metrics(out / "metrics.jsonl", start_step)
        else:  # `out` holds no checkpoint (checked): logs there are a killed run's, which this run replaces
            (out / "metrics.jsonl").unlink(missing_ok=True)
            shutil.rmtree(out / "tensorboard", ignore_errors=True)
        ckpt_io.clean_stale(out)
    log = MetricsLog(out, info.is_main)
    hybrid = {n: m for n, m in model.chtsl_layers().items() if m.has_sparse and m.has_lowrank}
    align_names = set(model.align_layers())
    lam = float(config.chtsl["align_lambda"]) if align_names else 0.0
    run_args = asdict(args)
    trainable = model.trainable_linear_params()
    align_weights = effective_align_weights(lam, args.micro_batch_size, args.seq_len,
                                            {n: hybrid[n].out_features for n in align_names})
    if info.is_main:
        print_header(args, config, trainable, hybrid, lam, align_weights, resumed_at=start_step if resume_dir else None)
    if info.is_main and not resume_dir:
        log.write({"event": "start", "unigram_ppl": data.unigram_ppl, "trainable_linear_params": trainable,
                   "train_rows": data.train_rows, "train_tokens": data.train_tokens, "world_size": info.world,
                   "args": run_args, "s_total": config.chtsl["s_total"], "align_weight": align_weights,
                   "sparse_storage": storage, "sparse_storage_reason": storage_why})
    elif info.is_main:
        log.write({"event": "resume", "from_step": start_step, "sparse_storage": storage,
                   "sparse_storage_reason": storage_why})

    def save(step: int, last_val: dict | None) -> None:
        if info.is_main:
            state = {"step": step, "tokens_seen": tokens_seen, "data_position": {"step": step},
                     "world_size": info.world, "schedule": schedule.state_dict(), "last_val": last_val}
            log.close()
            ckpt_io.save_checkpoint(out, model=model, tokenizer=data.tokenizer, optimizer=optimizer, engine=engine,
                                    state=state, args={**run_args, "resume": None, "stop_at": None})
            log.reopen()
        dist_utils.barrier(info)

    def evaluate() -> dict[str, Any] | None:
        result = None
        if info.is_main:
            r = perplexity(model, data.val, device)
            result = {"val_ppl": r.ppl, "val_nll": r.nll, "val_tokens": r.tokens, "unigram_ppl": data.unigram_ppl}
        dist_utils.barrier(info)
        return result

    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16) if use_bf16 else nullcontext()
    progress = _Progress(args.progress and info.is_main, args.steps, start_step)
    wall_start = time.perf_counter()
    compute_tokens = 0
    last_loss, last_val, stopped = math.nan, saved_state.get("last_val"), None
    n_updates = changed = 0
    history: list[dict[str, Any]] = []
    end = args.stop_at or args.steps
    try:
        for step in range(start_step + 1, end + 1):
            t0 = time.perf_counter()
            lr = schedule(step)
            for g in optimizer.param_groups:
                g["lr"] = lr
            batches = data.train.step_batches(step - 1)
            n_targets = torch.tensor([float(sum(b.n_targets for b in batches))], dtype=torch.float64)
            n_targets = dist_utils.all_reduce_sum(n_targets, info).item()
            diagnostics = bool(hybrid) and (step % args.ocr_every == 0 or step == 1 or step == args.steps)
            sums = torch.zeros(2, dtype=torch.float64)  # task NLL sum, alignment sum
            ocr_vals: dict[str, float] = {}
            cos_vals: dict[str, float] = {}
            align_vals: dict[str, float] = {}
            for i, b in enumerate(batches):
                sync = i == len(batches) - 1 or not info.distributed
                ctx = nullcontext() if sync else ddp_model.no_sync()
                with ctx, record_branches(hybrid, align=align_names,
                                          diagnostics=diagnostics and i == 0 and info.is_main) as rec:
                    with autocast:
                        logits = ddp_model(input_ids=b.input_ids.to(device)).logits
                    nll, _ = token_nll_sum(logits, b.labels.to(device))
                    align = rec.alignment()
                    loss = nll * (info.world / n_targets)
                    if align is not None and lam:
                        loss = loss + lam * align / n_micro
                    loss.backward()
                sums[0] += float(nll.detach())
                sums[1] += float(align.detach()) if align is not None else 0.0
                if rec.ocr:
                    ocr_vals, cos_vals, align_vals = dict(rec.ocr), dict(rec.cosine), dict(rec.align)
            sums = dist_utils.all_reduce_sum(sums, info)
            task = sums[0].item() / n_targets
            align_mean = sums[1].item() / (n_micro * info.world)
            total = task + lam * align_mean
            if not math.isfinite(total):
                stopped = "nan"
                # Logged after the last checkpoint's step: a resume drops it, `chtsl sweep` reads it.
                log.write({"event": "diverged", "step": step, "loss": None, "task_loss": _finite(task),
                           "align_loss": _finite(align_mean)})
                saved = ckpt_io.resolve_checkpoint(out)
                kept = (f"the last good checkpoint in {out} (step {ckpt_io.load_state(out)[0]['step']}) is kept"
                        if ckpt_io.is_training_checkpoint(saved) else f"no checkpoint was written to {out}")
                err_console.print(f"[bold red]error:[/] non-finite loss ({total}) at step {step}; training stopped, "
                                  f"{kept}", highlight=False, soft_wrap=True)
                break
            record: dict[str, Any] = {"step": step, "loss": total, "task_loss": task, "align_loss": align_mean,
                                      "lr": lr}
            if engine is not None and engine.is_update_step(step):
                stats = engine.update(step, optimizer)
                optimizer.zero_grad(set_to_none=True)
                n_updates += 1
                changed += stats["frac_changed"] > 0
                record["topology"] = stats
                record["density"] = _density(model)
            else:
                if args.grad_clip and args.grad_clip > 0:
                    record["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, args.grad_clip))
                optimizer.step()
                if engine is not None:
                    engine.apply_masks(optimizer)
                optimizer.zero_grad(set_to_none=True)
            last_loss = total
            step_tokens = args.batch_size * args.seq_len
            tokens_seen += step_tokens
            compute_tokens += step_tokens
            dt = time.perf_counter() - t0
            record.update(tokens=tokens_seen, tokens_per_s=step_tokens / dt, step_time_s=dt)
            if ocr_vals:
                # align: L_align^(l) of every hybrid layer on the first micro-batch (optimised or not);
                # align_value: their sum, comparable across methods (align_loss is what was optimised).
                record.update(ocr=ocr_vals, cosine=cos_vals, align=align_vals, align_value=sum(align_vals.values()))
                record.setdefault("density", _density(model))
            if step % args.eval_every == 0 or step == args.steps:
                last_val = evaluate()
                if last_val:
                    record.update(last_val)
            if after_step is not None:
                after_step(step, model)
            log.write(record)
            history.append({k: v for k, v in record.items() if k in ("step", "loss", "task_loss", "align_loss", "lr")})
            val_txt = f" · ppl {last_val['val_ppl']:.1f}" if last_val else ""
            progress.update(step, f"loss {total:.3f}{val_txt} · {step_tokens / dt:,.0f} tok/s")
            if step % args.save_every == 0 or step == end:
                save(step, last_val)
    finally:
        progress.stop()
        log.close()
    wall = time.perf_counter() - wall_start
    return TrainResult(
        step=step if stopped is None else step - 1, loss=last_loss,
        val_ppl=last_val["val_ppl"] if last_val else None, unigram_ppl=data.unigram_ppl, tokens=tokens_seen,
        wall_s=wall, tokens_per_s=compute_tokens / wall if wall > 0 else 0.0, topology_updates=n_updates,
        updates_changed_masks=changed, out=str(out), stopped=stopped, history=history,
    )


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
    links = sum(m.values.numel() if m.storage == "csr" else int(m.mask.sum()) for m in layers)
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
