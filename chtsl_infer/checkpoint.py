"""Loading a model the toolkit made: a training checkpoint or packed export (docs/formats.md §1, §2).

Weights come only through safetensors (`from_pretrained` with `use_safetensors=True`); remote
code is never trusted.
"""

from __future__ import annotations

from pathlib import Path

from chtsl_infer.errors import ChtslError, first_line
from chtsl_infer.model_dir import TOKENIZER_NAME, ModelDir, resolve_model_dir
from chtsl_infer.modeling import ChtslLlamaForCausalLM


def load_model(path: str | Path | ModelDir, device: str = "cpu") -> ChtslLlamaForCausalLM:
    """The `ChtslLlamaForCausalLM` of a training checkpoint or a packed export dir, in eval mode.

    A packed export (`chtsl export`, `model.safetensors` with `format=chtsl-packed`) is rebuilt in
    fp32 through `chtsl_infer.packed`. ChtslError for any other directory (`resolve_model_dir`).
    """
    model_dir = resolve_model_dir(path).require_weights()
    if model_dir.kind == "packed":
        from chtsl_infer.packed import load_packed_model

        return load_packed_model(model_dir.weights).to(device).eval()
    p = model_dir.path
    try:
        model = ChtslLlamaForCausalLM.from_pretrained(p, use_safetensors=True, trust_remote_code=False)
    except (OSError, ValueError, RuntimeError) as e:
        raise ChtslError(f"cannot load {p}: {first_line(e)}") from None
    return model.to(device).eval()


def load_tokenizer(path: str | Path | ModelDir):  # -> PreTrainedTokenizerBase
    """The tokenizer saved beside a checkpoint (tokenizer.json); ChtslError when there is none."""
    from transformers import AutoTokenizer

    p = path.path if isinstance(path, ModelDir) else Path(path)
    if not (p / TOKENIZER_NAME).is_file():
        raise ChtslError(f"{p} has no tokenizer.json")
    return AutoTokenizer.from_pretrained(p, trust_remote_code=False)
