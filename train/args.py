"""The training settings, declared once: `TrainArgs` (defaults, help, CLI flag) and `resolve_args`.

`chtsl train`'s options are generated from the fields of `TrainArgs` (see `train.command`), so a
setting is added or changed here only. A field whose default is None takes the preset's value
(docs/method.md §5), filled in by `resolve_args`. Nothing here imports torch: `chtsl train
--help` reads this module.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from chtsl_infer.errors import ChtslError
from chtsl_infer.methods import DEFAULT_METHOD, METHOD_CHOICES, get_method
from chtsl_infer.utils import parse_dtype

# Fields a `--resume` may change; every other recipe field must match the checkpoint.
RESUME_MUTABLE = ("out", "stop_at", "eval_every", "save_every", "ocr_every", "device", "progress", "steps")


def setting(default: Any, help: str, *, flag: str | None = None, cli: bool = True, preset: str | None = None,
            zero_is_unset: bool = False) -> Any:
    """A `TrainArgs` field. `flag`: the CLI spelling when it is not `--field-name`; `cli=False`:
    Python-only; `preset`: the `Preset` attribute filling it when None; `zero_is_unset`: 0 also
    takes the preset's value (counts and intervals, where 0 means "not given")."""
    return field(default=default, metadata={"help": help, "flag": flag, "cli": cli, "preset": preset,
                                            "zero_is_unset": zero_is_unset})


@dataclass
class TrainArgs:
    """Run arguments; None means "the preset's value" (resolved by `resolve_args`)."""

    preset: str = setting("tiny", "Recipe preset: tiny, llama60m-c4, llama130m-owt, ...")
    method: str = setting(DEFAULT_METHOD, f"{METHOD_CHOICES}.")
    s_total: float = setting(0.9, "Total sparsity of the linears (0.9, 0.8 or 0.7).")
    align: str = setting("all", "Layers in the alignment loss: all|qk|others.")
    align_lambda: float | None = setting(None, "λ of the alignment loss.", preset="align_lambda")
    activation: str | None = setting(None, "Low-rank activation (the method's own when None).", cli=False)
    steps: int | None = setting(None, "Training iterations (preset's if omitted).", preset="steps",
                                zero_is_unset=True)
    warmup: int | None = setting(None, "LR warm-up iterations.", preset="warmup")
    lr: float | None = setting(None, "Peak learning rate.")  # the preset's lr or dense_lr: resolve_args
    min_lr_ratio: float | None = setting(None, "Final LR / peak LR of the cosine.", cli=False, preset="min_lr_ratio")
    batch_size: int | None = setting(None, "Global batch size in sequences.", preset="batch_size",
                                     zero_is_unset=True)
    micro_batch_size: int | None = setting(None, "Sequences per forward per rank.")  # resolve_args
    seq_len: int | None = setting(None, "Tokens per sequence.", preset="seq_len", zero_is_unset=True)
    update_interval: int | None = setting(None, "ΔT between topology updates.", preset="update_interval",
                                          zero_is_unset=True)
    restart_warmup: int | None = setting(None, "LR warm-up after each update.", preset="restart_warmup")
    eval_every: int | None = setting(None, "Validation perplexity every N steps.", preset="eval_every",
                                     zero_is_unset=True)
    save_every: int | None = setting(None, "Checkpoint every N steps.", preset="save_every", zero_is_unset=True)
    ocr_every: int | None = setting(None, "Log per-layer OCR/cosine every N steps.", preset="ocr_every",
                                    zero_is_unset=True)
    eval_tokens: int | None = setting(None, "Validation tokens per evaluation.", preset="eval_tokens",
                                      zero_is_unset=True)
    data: str | None = setting(None, "builtin | c4 | owt | PATH (file, dir or glob of txt/jsonl/parquet).",
                               preset="data", zero_is_unset=True)
    tokenizer: str | None = setting(None, "bpe (trained on the corpus, cached) or a HF name/path.")  # resolve_args
    vocab_size: int | None = setting(None, "Vocabulary of a trained BPE.", preset="vocab_size", zero_is_unset=True)
    packing: bool = setting(False, "Concatenate documents instead of truncate/pad.", flag="--packing")
    grad_clip: float | None = setting(None, "Max grad norm (0: off; the method's default, cola: 0.5).")
    num_layers: int | None = setting(None, "Override the preset's number of blocks.")
    dtype: str = setting("auto", "auto (CUDA: bf16 autocast, CPU: fp32) | fp32 | bf16 (autocast; CPU too).")
    device: str = setting("auto", "auto | cpu | cuda | cuda:N.")
    seed: int = setting(0, "Seed of init, data order and topology.")
    out: str = setting("ckpt", "Checkpoint directory (latest complete checkpoint).")
    resume: str | None = setting(None, "Continue exactly from this checkpoint directory.")
    stop_at: int | None = setting(None, "Save and stop after this step (resume later).")
    progress: bool = setting(True, "Show the Rich progress bar.", flag="--progress/--no-progress")


def resolve_args(args: TrainArgs) -> TrainArgs:
    """Fills every None recipe field from the preset (docs/method.md §5); validates values."""
    from chtsl_infer.presets import get_preset

    p = get_preset(args.preset)
    m = get_method(args.method)
    values = asdict(args)
    for f in TrainArgs.__dataclass_fields__.values():
        attr = f.metadata.get("preset")
        value = values[f.name]
        if attr and (value is None or (f.metadata["zero_is_unset"] and not value)):
            values[f.name] = getattr(p, attr)
    # The settings whose preset value depends on other settings:
    # a preset's trained BPE needs a local corpus; hub data falls back to the paper's tokenizer.
    values["tokenizer"] = args.tokenizer or ("t5-base" if values["data"] in ("c4", "owt") and p.tokenizer == "bpe"
                                             else p.tokenizer)
    values["lr"] = args.lr if args.lr is not None else (p.dense_lr if m.uses_dense_lr else p.lr)
    values["micro_batch_size"] = args.micro_batch_size or min(p.micro_batch_size, values["batch_size"])
    values["grad_clip"] = args.grad_clip if args.grad_clip is not None else m.grad_clip
    r = TrainArgs(**values)
    if r.steps < 1 or r.lr <= 0 or r.warmup < 0:
        raise ChtslError("--steps and --lr must be positive and --warmup >= 0")
    r.dtype = parse_dtype(r.dtype, ("auto", "fp32", "bf16"), what="--dtype")
    if r.stop_at is not None and not 1 <= r.stop_at <= r.steps:
        raise ChtslError(f"--stop-at must be in [1, {r.steps}]")
    return r
