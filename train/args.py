"""The training settings, declared once: `TrainArgs` (defaults, help, CLI flag) and `resolve_args`.

`chtsl train`'s options are generated from the fields of `TrainArgs` (`cli_parameters`, used by
`train.command`; `parse_cli` parses them the same way for a sweep's forwarded options), so a
setting is added or changed here only. A field whose default is None takes the preset's value
(docs/method.md §5), filled in by `resolve_args`. Nothing here imports torch: `chtsl train
--help` reads this module.
"""

from __future__ import annotations

import inspect
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

from chtsl_infer.errors import ChtslError
from chtsl_infer.model.methods import DEFAULT_METHOD, METHOD_CHOICES, get_method
from chtsl_infer.utils import check_seed, parse_dtype

# Fields a `--resume` may change; every other recipe field must match the checkpoint.
RESUME_MUTABLE = ("out", "stop_at", "eval_every", "save_every", "ocr_every", "device", "progress", "steps",
                  "sparse_storage")


def setting(default: Any, help: str, *, flag: str | None = None, cli: bool = True, preset: str | None = None) -> Any:
    """A `TrainArgs` field. `flag`: the CLI spelling when it is not `--field-name`; `cli=False`:
    Python-only; `preset`: the `Preset` attribute filling it when None (0 is a value, which
    `check_args` refuses where it is meaningless)."""
    return field(default=default, metadata={"help": help, "flag": flag, "cli": cli, "preset": preset})


@dataclass
class TrainArgs:
    """Run arguments; None means "the preset's value" (resolved by `resolve_args`)."""

    preset: str = setting("tiny", "Recipe preset: tiny, llama60m-c4, llama130m-owt, ...")
    method: str = setting(DEFAULT_METHOD, f"{METHOD_CHOICES}.")
    s_total: float = setting(0.9, "Total sparsity of the linears (0.9, 0.8 or 0.7).")
    align: str = setting("all", "Layers in the alignment loss: all|qk|others.")
    align_lambda: float | None = setting(None, "λ of the alignment loss.", preset="align_lambda")
    activation: str | None = setting(None, "Low-rank activation silu|relu|gelu|identity (method's own if omitted).")
    sparsity: float | None = setting(None, "Sparsity s of S, overriding the preset's (s, r) split of --s-total.")
    rank: int | None = setting(None, "Rank r of the low-rank branch, overriding the preset's (s, r) split.")
    brf_randomness: float | None = setting(None, "BRF randomness of the initial masks, in [0, 1] (method's own "
                                           "if omitted: chtsl 0, chts 0.25).")
    lowrank_lr_scale: float = setting(1.0, "Learning-rate multiplier of the low-rank factors A, B.")
    lowrank_init_scale: float | None = setting(None, "Multiplier of the low-rank factors' init std (CoLA's σ0; "
                                               "the preset's: 1, tiny and cpu60m 0.5 for hybrid methods).")
    steps: int | None = setting(None, "Training iterations (preset's if omitted).", preset="steps")
    warmup: int | None = setting(None, "LR warm-up iterations.", preset="warmup")
    lr: float | None = setting(None, "Peak learning rate.")  # the preset's lr or dense_lr: resolve_args
    min_lr_ratio: float | None = setting(None, "Final LR / peak LR of the cosine.", cli=False, preset="min_lr_ratio")
    batch_size: int | None = setting(None, "Global batch size in sequences.", flag="--batch", preset="batch_size")
    micro_batch_size: int | None = setting(None, "Sequences per forward per rank.",
                                            flag="--micro-batch")  # resolve_args
    seq_len: int | None = setting(None, "Tokens per sequence.", preset="seq_len")
    update_interval: int | None = setting(None, "ΔT between topology updates.", preset="update_interval")
    restart_warmup: int | None = setting(None, "LR warm-up after each update.", preset="restart_warmup")
    eval_every: int | None = setting(None, "Validation perplexity every N steps.", preset="eval_every")
    save_every: int | None = setting(None, "Checkpoint every N steps.", preset="save_every")
    ocr_every: int | None = setting(None, "Log per-layer OCR/cosine every N steps.", preset="ocr_every")
    eval_tokens: int | None = setting(None, "Validation tokens per evaluation.", preset="eval_tokens")
    data: str | None = setting(None, "builtin | c4 | owt | PATH (file, dir or glob of txt/jsonl/parquet).",
                               preset="data")
    tokenizer: str | None = setting(None, "bpe (trained on the corpus, cached) or a HF name/path.")  # resolve_args
    vocab_size: int | None = setting(None, "Vocabulary of a trained BPE.", preset="vocab_size")
    packing: bool = setting(False, "Concatenate documents instead of truncate/pad.", flag="--packing")
    grad_clip: float | None = setting(None, "Max grad norm (0: off; the method's default, cola: 0.5).")
    num_layers: int | None = setting(None, "Override the preset's number of blocks.")
    dtype: str = setting("auto", "auto (CUDA: bf16 autocast, CPU: fp32) | fp32 | bf16 (autocast; CPU too).")
    device: str = setting("auto", "auto | cpu | cuda | cuda:N.")
    seed: int = setting(0, "Seed of init, data order and topology.")
    sparse_storage: str = setting(
        "auto", "How S is held in training: csr (values + CSR indices, state ∝ nnz) | masked (dense weight × mask) "
                "| auto (csr on CPU with the compiled kernels at low density, else masked).", flag="--sparse-storage")
    out: str = setting("ckpt", "Checkpoint directory (latest complete checkpoint).")
    resume: str | None = setting(None, "Continue exactly from this checkpoint directory.")
    stop_at: int | None = setting(None, "Save and stop after this step (resume later).")
    progress: bool = setting(True, "Show the Rich progress bar.", flag="--progress/--no-progress")


# The smallest trained BPE: 256 byte symbols + the 4 special tokens of `train.data.tokenizer.train_bpe`.
MIN_BPE_VOCAB = 260
# Integer settings that must be >= 1 when given (None: the preset's value; 0 is never "default").
POSITIVE_INTS = ("steps", "batch_size", "micro_batch_size", "seq_len", "update_interval", "eval_every", "save_every",
                 "ocr_every", "eval_tokens", "vocab_size", "num_layers", "stop_at", "rank")
NON_NEGATIVE_INTS = ("warmup", "restart_warmup")
DEVICES = ("auto", "cpu", "cuda")


def _flag(name: str) -> str:
    """The CLI spelling of the TrainArgs field `name` (its `flag`, else `--field-name`)."""
    flag = TrainArgs.__dataclass_fields__[name].metadata["flag"]
    return flag or "--" + name.replace("_", "-")


def check_args(args: TrainArgs) -> None:
    """Refuses values no run can use, before anything is built (ChtslError naming the option).

    None means "the preset's value"; an explicit 0 or a negative count, a non-finite or
    non-positive learning rate, a NaN clip or λ, an unknown device are errors, never defaults.
    """
    for name in POSITIVE_INTS:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ChtslError(f"{_flag(name)} must be >= 1, got {value}")
    for name in NON_NEGATIVE_INTS:
        value = getattr(args, name)
        if value is not None and value < 0:
            raise ChtslError(f"{_flag(name)} must be >= 0, got {value}")
    if args.lr is not None and not (math.isfinite(args.lr) and args.lr > 0):
        raise ChtslError(f"--lr must be a positive finite number, got {args.lr}")
    if args.grad_clip is not None and not (math.isfinite(args.grad_clip) and args.grad_clip >= 0):
        raise ChtslError(f"--grad-clip must be a finite number >= 0 (0: off), got {args.grad_clip}")
    if args.align_lambda is not None and not (math.isfinite(args.align_lambda) and args.align_lambda >= 0):
        raise ChtslError(f"--align-lambda must be a finite number >= 0, got {args.align_lambda}")
    for name in ("lowrank_lr_scale", "lowrank_init_scale"):
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ChtslError(f"{_flag(name)} must be a positive finite number, got {value}")
    if args.sparsity is not None and not 0.0 <= args.sparsity < 1.0:
        raise ChtslError(f"--sparsity must be in [0, 1), got {args.sparsity}")
    if args.brf_randomness is not None and not 0.0 <= args.brf_randomness <= 1.0:
        raise ChtslError(f"--brf-randomness must be in [0, 1], got {args.brf_randomness}")
    if args.min_lr_ratio is not None and not 0.0 <= args.min_lr_ratio <= 1.0:
        raise ChtslError(f"min_lr_ratio must be in [0, 1], got {args.min_lr_ratio}")
    if not math.isfinite(args.s_total):
        raise ChtslError(f"--s-total must be a finite number, got {args.s_total}")
    if args.device not in DEVICES and not args.device.startswith("cuda:"):
        raise ChtslError(f"unknown --device {args.device!r}; valid: {', '.join(DEVICES)}, cuda:N")
    parse_dtype(args.dtype, ("auto", "fp32", "bf16"), what="--dtype")
    if args.vocab_size is not None and args.vocab_size < MIN_BPE_VOCAB and args.tokenizer in (None, "bpe"):
        raise ChtslError(f"--vocab-size must be >= {MIN_BPE_VOCAB} for a trained BPE (256 bytes + 4 special "
                         f"tokens), got {args.vocab_size}")
    for f in fields(TrainArgs):  # '' would silently mean "the default" (or, for --out, the current directory)
        value = getattr(args, f.name)
        if isinstance(value, str) and not value.strip():
            raise ChtslError(f"{f.metadata.get('flag') or _flag(f.name)} must not be empty")
    check_seed(args.seed)


def given_options(args: TrainArgs) -> list[str]:
    """The fields of `args` set to something else than their default (what a command line gave)."""
    defaults = TrainArgs()
    return [f.name for f in fields(TrainArgs) if getattr(args, f.name) != getattr(defaults, f.name)]


def resolve_args(args: TrainArgs) -> TrainArgs:
    """Fills every None recipe field from the preset (docs/method.md §5); validates values."""
    from chtsl_infer.model.presets import get_preset

    p = get_preset(args.preset)
    m = get_method(args.method)
    values = asdict(args)
    for f in TrainArgs.__dataclass_fields__.values():
        attr = f.metadata.get("preset")
        value = values[f.name]
        if attr and value is None:
            values[f.name] = getattr(p, attr)
    # The settings whose preset value depends on other settings:
    # a preset's trained BPE needs a local corpus; hub data falls back to the paper's tokenizer.
    # A local or builtin corpus trains a BPE of the preset's vocabulary (the paper's t5-base needs the
    # hub, which an offline machine does not reach; pass --tokenizer t5-base to use a cached one).
    hub_data = values["data"] in ("c4", "owt")
    values["tokenizer"] = args.tokenizer or (("t5-base" if p.tokenizer == "bpe" else p.tokenizer) if hub_data
                                             else "bpe")
    values["lr"] = args.lr if args.lr is not None else (p.dense_lr if m.uses_dense_lr else p.lr)
    if args.micro_batch_size is None:
        values["micro_batch_size"] = min(p.micro_batch_size, values["batch_size"])
    values["grad_clip"] = args.grad_clip if args.grad_clip is not None else m.grad_clip
    if args.lowrank_init_scale is None:
        values["lowrank_init_scale"] = p.init_scale(m)
    r = TrainArgs(**values)
    check_args(r)
    r.dtype = parse_dtype(r.dtype, ("auto", "fp32", "bf16"), what="--dtype")
    from chtsl_infer.model.storage import check_choice

    try:
        check_choice(r.sparse_storage, r.method)
    except ValueError as e:
        raise ChtslError(f"--sparse-storage {r.sparse_storage}: {e}") from None
    if m.topology not in (None, "static") and r.restart_warmup >= r.update_interval:
        raise ChtslError(f"--restart-warmup ({r.restart_warmup}) must be shorter than --update-interval "
                         f"({r.update_interval})")
    if r.stop_at is not None and not 1 <= r.stop_at <= r.steps:
        raise ChtslError(f"--stop-at must be in [1, {r.steps}]")
    return r


def check_warmup(given: TrainArgs, resolved: TrainArgs) -> None:
    """ChtslError when a warm-up given explicitly (`given.warmup`, before `resolve_args`) is longer
    than the run. Only an explicit one: a preset's warm-up longer than a short --steps is the
    preset's choice (and args.json, once resolved, no longer tells the two apart)."""
    if given.warmup is not None and given.warmup > resolved.steps:
        raise ChtslError(f"--warmup {given.warmup} is longer than the run (--steps {resolved.steps}): the learning "
                         f"rate would never reach its peak")


def build_model_config(args: TrainArgs, vocab_size: int | None = None, **llama_overrides: Any):
    """The `ChtslConfig` a fresh run of `args` builds (preset, method, split, activation, alignment).

    ChtslError when its (s, r) leave the parameter budget (`budget.budget_problems`) or `seq_len`
    exceeds the positions its rotary embedding covers (`rope_positions`)."""
    from chtsl_infer.model.budget import budget_problems
    from chtsl_infer.model.presets import build_config

    if args.num_layers:
        llama_overrides.setdefault("num_hidden_layers", args.num_layers)
    try:
        config = build_config(args.preset, method=args.method, s_total=args.s_total, sparsity=args.sparsity,
                              rank=args.rank, activation=args.activation, align_lambda=args.align_lambda,
                              align_layers=args.align, lowrank_init_scale=args.lowrank_init_scale,
                              vocab_size=vocab_size, **llama_overrides)
    except ValueError as e:  # ChtslError included; also transformers' own checks of the Llama fields
        raise ChtslError(str(e)) from None
    problems = budget_problems(config)
    if problems:
        raise ChtslError(f"--sparsity/--rank leave the parameter budget: {'; '.join(problems)} (see `chtsl info`)")
    if args.seq_len is not None and args.seq_len > rope_positions(config):
        raise ChtslError(f"--seq-len {args.seq_len} exceeds the {rope_positions(config):,} positions the rotary "
                         f"embedding of preset {args.preset} covers (its longest wavelength, 2π·θ^((d−2)/d) with "
                         f"θ = {_rope_theta(config):g}, head dim d = {config.head_dim})")
    return config


def _rope_theta(config: Any) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    return float(params.get("rope_theta") or getattr(config, "rope_theta", None) or 10000.0)


def rope_positions(config: Any) -> int:
    """The longest wavelength of a config's rotary embedding, 2π·θ^((d−2)/d) positions (d: head dim):
    past it even the slowest-turning pair of query/key dimensions has come full circle, so every
    pair repeats rotations it already gave to shorter distances. A training sequence longer than
    that is outside what the position encoding was made for (on these presets: tens of thousands
    of tokens, beyond any CPU's memory at the presets' micro-batches anyway)."""
    d = config.head_dim
    return int(2 * math.pi * _rope_theta(config) ** ((d - 2) / d))


def activation_bytes(args: TrainArgs) -> int:
    """A lower bound of the memory (bytes) one forward of a micro-batch keeps for its backward.

    Counted per token: in each block the inputs of its two norms, q, k, v, the attention output,
    and the MLP's gate, up and their product (6·hidden + 3·ffn values, at 2 bytes under bf16
    autocast, else 4), plus the fp32 logits (vocab values). Left out: every other saved tensor,
    the attention scores, weights, gradients and optimizer state. `args` resolved."""
    from chtsl_infer.model.presets import get_preset

    p = get_preset(args.preset)
    layers = args.num_layers or p.num_layers
    width = 2 if args.dtype == "bf16" else 4  # `auto` is bf16 only on CUDA: count 4, a lower bound stays one
    per_token = layers * (6 * p.hidden_size + 3 * p.intermediate_size) * width + 4 * (args.vocab_size or p.vocab_size)
    return args.micro_batch_size * args.seq_len * per_token


def check_memory(args: TrainArgs, device: str) -> None:
    """ChtslError when even the lower bound `activation_bytes` of one micro-batch exceeds all the
    memory of `device` (the machine's RAM, or cgroup limit, on CPU; the GPU's on CUDA)."""
    need = activation_bytes(args)
    total, where = device_memory(device)
    if total is not None and need > total:
        raise ChtslError(f"--seq-len {args.seq_len} × --micro-batch-size {args.micro_batch_size} needs at least "
                         f"{need / 2**30:.1f} GiB of activations (estimate: {args.seq_len * args.micro_batch_size:,} "
                         f"tokens × {need // (args.seq_len * args.micro_batch_size):,} bytes), more than the "
                         f"{total / 2**30:.1f} GiB of {where}; lower --seq-len or --micro-batch-size")


def device_memory(device: str) -> tuple[int | None, str]:
    """(bytes of memory of `device` or None when unknown, its name for a message)."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_properties(torch.device(device)).total_memory, device
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            value = Path(limit).read_text().strip()
        except OSError:
            continue
        if value.isdigit():
            total = min(total, int(value))
    return total, "this machine's memory"


def cli_parameters() -> list[inspect.Parameter]:
    """One Typer option per CLI field of `TrainArgs` (default, help and flag from the field; `--device`
    is the shared option of `chtsl_infer.options`): the options of `chtsl train` (train/command.py)
    and what `parse_cli` parses."""
    from typing import Annotated

    import typer

    from chtsl_infer.options import Device

    shared = {"device": Device}  # fields whose option every command declares alike (the default stays the field's)
    hints = get_type_hints(TrainArgs)
    params = []
    for f in fields(TrainArgs):
        if not f.metadata.get("cli", True):
            continue
        flag = f.metadata.get("flag") or _flag(f.name)
        annotation = shared.get(f.name) or Annotated[hints[f.name], typer.Option(flag, help=f.metadata["help"])]
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default,
                                        annotation=annotation))
    return params


def parse_cli(argv: list[str]) -> dict[str, Any]:
    """The `TrainArgs` fields given in `argv` (`chtsl train` options, e.g. forwarded by a sweep),
    parsed and converted exactly as `chtsl train` parses them: {field: value}, only the options
    present in `argv`. ChtslError (one line) for unknown options, bad values and positional arguments."""
    import typer

    from chtsl_infer.options import context_settings

    def given(**options: Any) -> None:
        """Parses only."""

    given.__signature__ = inspect.Signature(cli_parameters())  # type: ignore[attr-defined]
    app = typer.Typer(add_completion=False)
    app.command(context_settings=context_settings("train"))(given)  # old spellings parse too
    try:
        ctx = typer.main.get_command(app).make_context("chtsl train", list(argv))
    except Exception as e:  # typer vendors its own click: its exception classes are not click's
        if hasattr(e, "format_message"):
            raise ChtslError(f"train option: {e.format_message()}") from None
        raise
    return {name: value for name, value in ctx.params.items()
            if getattr(ctx.get_parameter_source(name), "name", None) == "COMMANDLINE"}
