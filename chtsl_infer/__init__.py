"""chtsl_infer: the CHTsL layer, the model and its config, presets, sparse formats and runtime.

Importing it registers `ChtslConfig` / `ChtslLlamaForCausalLM` with transformers' Auto classes,
so `AutoModelForCausalLM.from_pretrained("ckpt/", use_safetensors=True)` loads a CHTsL checkpoint
without remote code (and never a pickle).
"""

from transformers import AutoConfig, AutoModelForCausalLM

from chtsl_infer.configuration import ChtslConfig
from chtsl_infer.layers import (
    LAYER_TYPES,
    METHODS,
    SparseLowRankLinear,
    alignment_loss,
    branch_cosine,
    ocr,
    record_branches,
)
from chtsl_infer.modeling import ChtslLlamaForCausalLM
from chtsl_infer.presets import PRESETS, build_config, get_preset

AutoConfig.register(ChtslConfig.model_type, ChtslConfig, exist_ok=True)
AutoModelForCausalLM.register(ChtslConfig, ChtslLlamaForCausalLM, exist_ok=True)

__version__ = "0.1.0"
__all__ = [
    "LAYER_TYPES",
    "METHODS",
    "PRESETS",
    "ChtslConfig",
    "ChtslLlamaForCausalLM",
    "SparseLowRankLinear",
    "alignment_loss",
    "branch_cosine",
    "build_config",
    "get_preset",
    "ocr",
    "record_branches",
]
