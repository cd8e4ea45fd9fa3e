"""Loading a model the toolkit made: a training checkpoint directory (HF style, docs/formats.md §1).

Weights come only through safetensors (`from_pretrained` with `use_safetensors=True`); remote
code is never trusted.
"""

from __future__ import annotations

import json
from pathlib import Path

from chtsl_infer.console import UserError
from chtsl_infer.modeling import ChtslLlamaForCausalLM


def check_checkpoint_dir(path: str | Path) -> Path:
    """`path` as a Path if it holds a CHTsL `config.json` and `model.safetensors`; else UserError."""
    p = Path(path)
    if not p.is_dir():
        raise UserError(f"checkpoint not found: {p} is not a directory")
    config = p / "config.json"
    if not config.is_file() or not (p / "model.safetensors").is_file():
        raise UserError(f"{p} is not a chtsl checkpoint (expected config.json and model.safetensors)")
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (json.JSONDecodeError, OSError) as e:
        raise UserError(f"{config} is not readable JSON: {e}") from None
    if model_type != "chtsl_llama":
        raise UserError(f"{p} is not a chtsl checkpoint (model_type {model_type!r}, expected 'chtsl_llama')")
    return p


def load_model(path: str | Path, device: str = "cpu") -> ChtslLlamaForCausalLM:
    """The `ChtslLlamaForCausalLM` of a training checkpoint or a packed export dir, in eval mode.

    A packed export (`chtsl export`, `model.safetensors` with `format=chtsl-packed`) is rebuilt in
    fp32 through `chtsl_infer.packed`.
    """
    from chtsl_infer.packed import is_packed_dir, load_packed_model

    if is_packed_dir(path):
        return load_packed_model(path).to(device).eval()
    p = check_checkpoint_dir(path)
    _check_csr(p)
    try:
        model = ChtslLlamaForCausalLM.from_pretrained(p, use_safetensors=True, trust_remote_code=False)
    except (OSError, ValueError, RuntimeError) as e:
        raise UserError(f"cannot load {p}: {str(e).splitlines()[0]}") from None
    return model.to(device).eval()


def _check_csr(p: Path) -> None:
    """UserError naming the layer when a csr-storage checkpoint holds a corrupt CSR (checked before
    loading: a wrong-length tensor would otherwise be re-initialised or fail without the layer)."""
    import torch

    from chtsl_infer.configuration import ChtslConfig
    from chtsl_infer.storage import check_csr_checkpoint

    try:
        config = ChtslConfig.from_pretrained(p)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load {p}: {str(e).splitlines()[0]}") from None
    if config.chtsl.get("storage", "masked") != "csr":
        return
    with torch.device("meta"):
        skeleton = ChtslLlamaForCausalLM(config)
    try:
        check_csr_checkpoint(p, skeleton)
    except (ValueError, OSError) as e:
        raise UserError(f"{p}: {str(e).splitlines()[0]}") from None


def load_tokenizer(path: str | Path):  # -> PreTrainedTokenizerBase
    """The tokenizer saved beside a checkpoint (tokenizer.json); UserError when there is none."""
    from transformers import AutoTokenizer

    p = Path(path)
    if not (p / "tokenizer.json").is_file():
        raise UserError(f"{p} has no tokenizer.json")
    return AutoTokenizer.from_pretrained(p, trust_remote_code=False)
