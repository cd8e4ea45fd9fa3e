"""Loading a model the toolkit made: a training checkpoint or packed export (docs/formats.md §1, §2).

Weights come only through safetensors (never a pickle); remote code is never trusted. Before
anything is built, the config is validated (every size stated and positive) and the weights'
names and shapes are compared with it from the safetensors header alone, so a damaged directory
costs milliseconds and one error line, never a 7B-sized allocation or a random-initialised head.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from chtsl_infer.errors import ChtslError, first_line
from chtsl_infer.formats.model_dir import TOKENIZER_NAME, ModelDir, resolve_model_dir
from chtsl_infer.model.modeling import ChtslLlamaForCausalLM

if TYPE_CHECKING:
    from chtsl_infer.model.configuration import ChtslConfig


# Fields a config must state: transformers' defaults for them describe a 7B model (a config of
# only `model_type` would build one and exhaust the memory).
REQUIRED_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                   "max_position_embeddings")


def check_config_fields(raw: Any, where: str) -> None:
    """ChtslError unless the config dict `raw` states every size in `REQUIRED_FIELDS` as a positive
    integer and its attention shapes divide (heads | hidden, kv-heads | heads); checked before any
    model is built, so a bad size fails in milliseconds instead of allocating a 7B model."""
    if not isinstance(raw, dict):
        raise ChtslError(f"{where} is not a JSON object")
    missing = [k for k in REQUIRED_FIELDS if k not in raw]
    if missing:
        raise ChtslError(f"{where} lacks {', '.join(missing)} (required: the model's sizes are never defaulted)")
    for key in (*REQUIRED_FIELDS, "num_key_value_heads", "head_dim"):
        value = raw.get(key)
        if key in REQUIRED_FIELDS or value is not None:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ChtslError(f"{where}: {key} must be a positive integer, got {value!r}")
    heads = raw["num_attention_heads"]
    kv = raw.get("num_key_value_heads") or heads
    if raw["hidden_size"] % heads and raw.get("head_dim") is None:
        raise ChtslError(f"{where}: hidden_size {raw['hidden_size']} is not a multiple of num_attention_heads {heads}")
    if heads % kv:
        raise ChtslError(f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}")


def config_from_dict(raw: Any, where: str) -> ChtslConfig:
    """A validated `ChtslConfig` of a config dict (see `check_config_fields`); ChtslError otherwise."""
    from chtsl_infer.model.configuration import ChtslConfig

    check_config_fields(raw, where)
    if raw.get("model_type", "chtsl_llama") != "chtsl_llama":
        raise ChtslError(f"{where}: model_type {raw.get('model_type')!r}, expected 'chtsl_llama'")
    try:
        return ChtslConfig.from_dict({k: v for k, v in raw.items() if k not in ("model_type", "transformers_version")})
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise ChtslError(f"{where}: {first_line(e)}") from None


def read_config(path: str | Path) -> ChtslConfig:
    """The validated config of a model directory (`path/config.json`) or of a config file."""
    p = Path(path)
    file = p / "config.json" if p.is_dir() else p
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ChtslError(f"{file} is not readable JSON ({first_line(e)})") from None
    return config_from_dict(raw, str(file))


def safetensors_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} from a safetensors header, no tensor read; ChtslError naming the file
    when it is missing, corrupt, truncated or not safetensors at all (e.g. a pickle)."""
    from safetensors import safe_open

    if not file.is_file():
        raise ChtslError(f"{file}: no such file")
    try:
        with safe_open(str(file), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except Exception as e:  # SafetensorError, OSError, ... for bad bytes
        raise ChtslError(f"{file}: not a readable safetensors file ({first_line(e)})") from None


def load_tensors(file: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file (CPU); ChtslError naming the file when it cannot be read."""
    from safetensors.torch import load_file

    safetensors_shapes(file)  # the header first: a clear message for a non-safetensors file
    try:
        return load_file(file)
    except Exception as e:
        raise ChtslError(f"{file}: not a readable safetensors file ({first_line(e)})") from None


def expected_shapes(config: ChtslConfig) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """({state-dict key: shape} of a model of `config`, keys that may be absent because they are
    tied), from a model built on the `meta` device (no memory, no init cost)."""
    with torch.device("meta"):
        model = ChtslLlamaForCausalLM(config)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    return {k: tuple(t.shape) for k, t in model.state_dict().items()}, tied


def check_weights_header(config: ChtslConfig, file: Path, config_file: Path | None = None) -> None:
    """ChtslError naming the first missing, unexpected or mis-shaped tensor of `file` (a training
    checkpoint's model.safetensors) against `config`; reads the header only."""
    have = safetensors_shapes(file)
    want, tied = expected_shapes(config)
    missing = [k for k in want if k not in have and k not in tied]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ChtslError(f"{file}: missing tensor {missing[0]}{more}")
    unexpected = [k for k in have if k not in want]
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise ChtslError(f"{file}: unexpected tensor {unexpected[0]}{more}")
    for k, shape in have.items():
        if shape != want[k]:
            raise ChtslError(f"{file}: {k} has shape {shape} but {config_file or 'the config'} implies {want[k]}")


def check_finite(tensors: dict[str, torch.Tensor], where: str | Path) -> None:
    """ChtslError naming the first floating-point tensor holding a NaN or an infinity."""
    for k, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ChtslError(f"{where}: tensor {k} holds non-finite values (NaN or inf)")


def load_checkpoint_weights(path: str | Path, config: ChtslConfig | None = None
                            ) -> tuple[ChtslConfig, dict[str, torch.Tensor]]:
    """(validated config, weights) of a training checkpoint directory: the config is checked
    (`read_config`), the weights' names and shapes against it from the header, then the tensors
    loaded and checked finite. Every failure is one ChtslError naming the file."""
    p = Path(path)
    config = config or read_config(p)
    weights = p / "model.safetensors"
    check_weights_header(config, weights, p / "config.json")
    tensors = load_tensors(weights)
    check_finite(tensors, weights)
    return config, tensors


def load_model(path: str | Path | ModelDir, device: str = "cpu") -> ChtslLlamaForCausalLM:
    """The `ChtslLlamaForCausalLM` of a training checkpoint or a packed export dir, in eval mode.

    A packed export (`chtsl export`, `model.safetensors` with `format=chtsl-packed`) is rebuilt in
    fp32 through `chtsl_infer.formats.packed`. A checkpoint is validated (`load_checkpoint_weights`) and its
    weights loaded into a model built from its config (strict: every tensor present, none extra);
    only safetensors are read, and transformers prints no load report or progress bar. ChtslError
    for any other directory (`resolve_model_dir`).
    """
    model_dir = resolve_model_dir(path).require_weights()
    if model_dir.kind == "packed":
        from chtsl_infer.formats.packed import load_packed_model

        return load_packed_model(model_dir.weights).to(device).eval()
    p = model_dir.path
    config, tensors = load_checkpoint_weights(p)
    with torch.random.fork_rng(devices=[]):  # building draws random weights and masks: leave the RNG alone
        model = ChtslLlamaForCausalLM(config)
    try:  # validates every CSR triple of a csr-storage checkpoint (one line naming the layer)
        from chtsl_infer.model.storage import convert_state_dict

        tensors = convert_state_dict(tensors, model)
    except ValueError as e:
        raise ChtslError(f"{p}: {first_line(e)}") from None
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:  # unreachable after check_weights_header; kept as the strict check
        raise ChtslError(f"cannot load {p}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.to(device).eval()


def load_tokenizer(path: str | Path | ModelDir):  # -> PreTrainedTokenizerBase
    """The tokenizer saved beside a checkpoint (tokenizer.json); ChtslError when there is none."""
    from transformers import AutoTokenizer

    p = path.path if isinstance(path, ModelDir) else Path(path)
    if not (p / TOKENIZER_NAME).is_file():
        raise ChtslError(f"{p} has no tokenizer.json")
    if (p / "config.json").is_file():
        read_config(p)  # AutoTokenizer reads it too: a broken one gets our message, not a traceback
    try:
        return AutoTokenizer.from_pretrained(p, trust_remote_code=False)
    except (OSError, ValueError, TypeError, KeyError) as e:  # a corrupt tokenizer.json and friends
        raise ChtslError(f"cannot load the tokenizer in {p}: {first_line(e)}") from None
