"""Model directories (docs/formats.md §1–§3): what a directory is, and reading, validating and
writing its config and tensors.

A directory the toolkit wrote is one of:

- `checkpoint`: a training checkpoint (or any HF-style save of `ChtslLlamaForCausalLM`):
  `config.json` with `model_type` `chtsl_llama` + `model.safetensors` of the training form
  (masked dense S, masks, A, B), optionally `trainer_state/` and the tokenizer;
- `packed`: a `chtsl export` with `model.safetensors` in the packed CSR format (its header says
  `format=chtsl-packed` and carries the config), maybe `model.onnx` beside it;
- `onnx`: a `chtsl export --format onnx`: `model.onnx` + `config.json`, no safetensors weights.

`resolve_model_dir` reads only names and the safetensors header (no weights) and raises
`ChtslError` for anything else; loaders (`load_model`, `runtime.backends.load_runtime`) take the
`ModelDir` it returns, so no command inspects a directory twice. Before anything is built, a
config is validated (every size stated and positive) and the weights' names and shapes are
compared with it from the safetensors header alone, so a damaged directory costs milliseconds and
one error line, never a 7B-sized allocation or a random-initialised head. Weights come only
through safetensors (never a pickle); remote code is never trusted, and an export's configs carry
no `auto_map`.

The packed format's in-memory form (`PackedModel`, packing a model) is `formats/packed.py`; this
module writes and reads its file. Torch and transformers are imported inside the functions that
need them: commands resolve directories while `chtsl --help` stays light.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from chtsl_infer.errors import ChtslError, first_line
from chtsl_infer.utils import atomic_path, atomic_write_text

if TYPE_CHECKING:
    import torch

    from chtsl_infer.formats.packed import PackedLinear, PackedModel
    from chtsl_infer.model.configuration import ChtslConfig
    from chtsl_infer.model.modeling import ChtslLlamaForCausalLM

WEIGHTS_NAME = "model.safetensors"
ONNX_NAME = "model.onnx"
CONFIG_NAME = "config.json"
TOKENIZER_NAME = "tokenizer.json"
TOKENIZER_CONFIG_NAME = "tokenizer_config.json"
TRAINER_STATE_DIR = "trainer_state"
MODEL_TYPE = "chtsl_llama"
PACKED_FORMAT = "chtsl-packed"
PACKED_FORMAT_VERSION = "2"
PACKED_READABLE_VERSIONS = ("1", "2")  # 1: float values, absolute columns (docs/formats.md §2)
TRAINER_STATE_FORMAT = "chtsl-trainer-state"
TRAINER_STATE_VERSION = 1

#: Files an export takes from its checkpoint when present (HF config + every tokenizer file format).
SUPPORT_FILES = (
    CONFIG_NAME,
    "generation_config.json",
    TOKENIZER_NAME,
    TOKENIZER_CONFIG_NAME,
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)
#: Configs whose `auto_map` (classes to import from remote code) an export drops: ours need none.
AUTO_MAP_CONFIGS = (CONFIG_NAME, TOKENIZER_CONFIG_NAME)

Kind = Literal["checkpoint", "packed", "onnx"]


@dataclass(frozen=True)
class ModelDir:
    """A resolved model directory: its kind and which of the known files it holds."""

    path: Path
    kind: Kind
    packed_metadata: dict[str, str] | None = None  # the packed safetensors header (kind `packed`)

    @property
    def weights(self) -> Path:
        return self.path / WEIGHTS_NAME

    @property
    def onnx_file(self) -> Path | None:
        """`model.onnx` when the directory has one (an ONNX export, or `--format all`)."""
        f = self.path / ONNX_NAME
        return f if f.is_file() else None

    @property
    def packed_dtype(self) -> str | None:
        """A packed export's value dtype as its header names it (`float32`, …, `int8`), else None."""
        return (self.packed_metadata or {}).get("dtype")

    @property
    def is_training_checkpoint(self) -> bool:
        """A checkpoint the trainer wrote (with `trainer_state/`, so `--resume` and the trainer's
        validation settings are available)."""
        return self.kind == "checkpoint" and (self.path / TRAINER_STATE_DIR / "state.json").is_file()

    def config(self) -> ChtslConfig:
        """The model's `ChtslConfig`, read without loading any weight (the packed header's config
        for packed exports, `config.json` otherwise)."""
        if self.packed_metadata is not None and "config" in self.packed_metadata:
            return _header_config(self.packed_metadata, self.weights)
        return read_config(self.path / CONFIG_NAME)

    def require_weights(self) -> ModelDir:
        """`self` when it holds safetensors weights (a checkpoint or a packed export); ChtslError
        for an ONNX-only export (only the `onnx` backend can run it)."""
        if self.kind == "onnx":
            raise ChtslError(f"{self.path} is not a chtsl checkpoint (expected {CONFIG_NAME} and {WEIGHTS_NAME}; "
                             f"it holds only {ONNX_NAME}: use --backend onnx)")
        return self

    def require_onnx(self) -> Path:
        """The ONNX graph; ChtslError naming the command that makes one when there is none."""
        if self.onnx_file is None:
            raise ChtslError(f"{self.path} has no {ONNX_NAME}; run `chtsl export {self.path} --format onnx` first")
        return self.onnx_file


def packed_metadata(weights: Path) -> dict[str, str] | None:
    """The safetensors header metadata of `weights` when it is a packed export; None otherwise
    (missing, unreadable or not packed: the loader that needs it reports why)."""
    if not weights.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception:  # noqa: BLE001 - any unreadable file is "not packed"
        return None
    return metadata if metadata.get("format") == PACKED_FORMAT else None


def is_packed_dir(path: str | Path) -> bool:
    """True when `path` is a directory whose `model.safetensors` header says `format=chtsl-packed`."""
    return packed_metadata(Path(path) / WEIGHTS_NAME) is not None


def _check_checkpoint(p: Path) -> None:
    config = p / CONFIG_NAME
    if not config.is_file() or not (p / WEIGHTS_NAME).is_file():
        raise ChtslError(f"{p} is not a chtsl checkpoint (expected {CONFIG_NAME} and {WEIGHTS_NAME})")
    raw = _read_json(config)
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if model_type != MODEL_TYPE:
        raise ChtslError(f"{p} is not a chtsl checkpoint (model_type {model_type!r}, expected {MODEL_TYPE!r})")


def resolve_model_dir(path: str | Path | ModelDir) -> ModelDir:
    """The `ModelDir` of `path` (a `ModelDir` passes through); ChtslError when `path` is not a
    directory or not one of the three kinds."""
    if isinstance(path, ModelDir):
        return path
    p = Path(path)
    if not p.is_dir():
        raise ChtslError(f"checkpoint not found: {p} is not a directory")
    metadata = packed_metadata(p / WEIGHTS_NAME)
    if metadata is not None:
        return ModelDir(p, "packed", metadata)
    if not (p / WEIGHTS_NAME).exists() and (p / ONNX_NAME).is_file() and (p / CONFIG_NAME).is_file():
        return ModelDir(p, "onnx")
    _check_checkpoint(p)
    return ModelDir(p, "checkpoint")


# ----------------------------------------------------------------------------- config


# Fields a config must state: transformers' defaults for them describe a 7B model (a config of
# only `model_type` would build one and exhaust the memory).
REQUIRED_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                   "max_position_embeddings")


def _read_json(file: Path) -> Any:
    """The JSON value in `file`; ChtslError naming it when it is unreadable."""
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ChtslError(f"{file} is not readable JSON ({first_line(e)})") from None


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
    if raw.get("model_type", MODEL_TYPE) != MODEL_TYPE:
        raise ChtslError(f"{where}: model_type {raw.get('model_type')!r}, expected {MODEL_TYPE!r}")
    try:
        return ChtslConfig.from_dict({k: v for k, v in raw.items() if k not in ("model_type", "transformers_version")})
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise ChtslError(f"{where}: {first_line(e)}") from None


def read_config(path: str | Path) -> ChtslConfig:
    """The validated config of a model directory (`path/config.json`) or of a config file."""
    p = Path(path)
    file = p / CONFIG_NAME if p.is_dir() else p
    return config_from_dict(_read_json(file), str(file))


def _header_config(metadata: dict[str, str], file: Path) -> ChtslConfig:
    """The validated config a packed file's header carries (`metadata["config"]`, JSON)."""
    try:
        raw = json.loads(metadata["config"])
    except (KeyError, json.JSONDecodeError, TypeError) as e:
        raise ChtslError(f"{file}: invalid config in metadata ({first_line(e)})") from None
    return config_from_dict(raw, f"{file}: the config in its metadata")


# ----------------------------------------------------------------------------- tensors


def _read_safetensors(file: Path, tensors: bool = True) -> tuple[dict[str, str], dict[str, Any]]:
    """(header metadata, {name: tensor} on CPU, or {name: shape} when not `tensors`) of a safetensors
    file; ChtslError naming it when it is missing, corrupt, truncated or not safetensors at all
    (e.g. a pickle)."""
    from safetensors import safe_open

    if not file.is_file():
        raise ChtslError(f"{file}: no such file")
    try:
        with safe_open(str(file), framework="pt") as f:
            metadata = f.metadata() or {}
            read = f.get_tensor if tensors else (lambda k: tuple(f.get_slice(k).get_shape()))
            return metadata, {k: read(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iter)
    except Exception as e:  # SafetensorError, OSError, RuntimeError, ... for bad bytes
        raise ChtslError(f"{file}: not a readable safetensors file ({first_line(e)})") from None


def safetensors_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} from a safetensors header, no tensor read; ChtslError naming the file
    when it is missing, corrupt, truncated or not safetensors at all (e.g. a pickle)."""
    return _read_safetensors(file, tensors=False)[1]


def load_tensors(file: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file (CPU); ChtslError naming the file when it cannot be read."""
    return _read_safetensors(file)[1]


def check_finite(tensors: dict[str, torch.Tensor], where: str | Path) -> None:
    """ChtslError naming the first floating-point tensor holding a NaN or an infinity."""
    import torch

    for k, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ChtslError(f"{where}: tensor {k} holds non-finite values (NaN or inf)")


def _meta_model(config: ChtslConfig) -> ChtslLlamaForCausalLM:
    """A model of `config` on the `meta` device (no memory, no init cost): the layout files are
    checked against."""
    import torch

    from chtsl_infer.model.modeling import ChtslLlamaForCausalLM

    with torch.device("meta"):
        return ChtslLlamaForCausalLM(config)


def _unexpected(file: Path, names: list[str]) -> ChtslError:
    more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
    return ChtslError(f"{file}: unexpected tensor {names[0]}{more}")


# ----------------------------------------------------------------------------- training checkpoint


def expected_shapes(config: ChtslConfig) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """({state-dict key: shape} of a model of `config`, keys that may be absent because they are
    tied), from a model built on the `meta` device."""
    from chtsl_infer.formats.packed import tied_keys

    return {k: tuple(t.shape) for k, t in _meta_model(config).state_dict().items()}, tied_keys(config)


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
        raise _unexpected(file, unexpected)
    for k, shape in have.items():
        if shape != want[k]:
            raise ChtslError(f"{file}: {k} has shape {shape} but {config_file or 'the config'} implies {want[k]}")


def load_checkpoint_weights(path: str | Path, config: ChtslConfig | None = None
                            ) -> tuple[ChtslConfig, dict[str, torch.Tensor]]:
    """(validated config, weights) of a training checkpoint directory: the config is checked
    (`read_config`), the weights' names and shapes against it from the header, then the tensors
    loaded and checked finite. Every failure is one ChtslError naming the file."""
    p = Path(path)
    config = config or read_config(p)
    weights = p / WEIGHTS_NAME
    check_weights_header(config, weights, p / CONFIG_NAME)
    tensors = load_tensors(weights)
    check_finite(tensors, weights)
    return config, tensors


def save_checkpoint_model(model: ChtslLlamaForCausalLM, directory: Path) -> None:
    """Writes `config.json` and `model.safetensors` (training form) of `model` into `directory`
    (transformers' `save_pretrained`, safetensors only); the caller publishes the directory."""
    model.save_pretrained(directory, safe_serialization=True)


def read_trainer_state(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state.json, args.json) of the training checkpoint `path`, their shapes checked (docs/formats.md
    §1); ChtslError if `path` is not a training checkpoint or either file is malformed. Reads JSON
    only: `chtsl eval --perplexity` takes the run's data settings from here without `train/`."""
    p = Path(path)
    try:
        is_training = resolve_model_dir(p).is_training_checkpoint
    except ChtslError:
        is_training = False
    if not is_training:
        raise ChtslError(f"{p} is not a chtsl training checkpoint (expected {CONFIG_NAME}, {WEIGHTS_NAME} "
                         f"and {TRAINER_STATE_DIR}/state.json)")
    sd = p / TRAINER_STATE_DIR
    loaded = []
    for name in ("state.json", "args.json"):
        file = sd / name
        try:
            loaded.append(json.loads(file.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ChtslError(f"{file} is unreadable: {e.strerror if isinstance(e, OSError) else e}") from None
    state, args = loaded
    if not isinstance(state, dict) or not isinstance(args, dict):
        raise ChtslError(f"{sd}: state.json and args.json must hold JSON objects")
    if state.get("format") != TRAINER_STATE_FORMAT or state.get("format_version") != TRAINER_STATE_VERSION:
        raise ChtslError(f"{p} has an unsupported trainer-state format {state.get('format_version')!r}")
    for key in ("step", "tokens_seen"):
        value = state.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ChtslError(f"{sd / 'state.json'}: {key} must be a non-negative integer, got {value!r}")
    groups = (state.get("optimizer") or {}).get("param_groups") if isinstance(state.get("optimizer"), dict) else None
    if not isinstance(groups, list) or not all(isinstance(g, dict) and isinstance(g.get("params"), list)
                                               for g in groups):
        raise ChtslError(f"{sd / 'state.json'}: optimizer.param_groups is missing or malformed")
    if state.get("topology") is not None and not isinstance(state["topology"], dict):
        raise ChtslError(f"{sd / 'state.json'}: topology must be an object or null")
    return state, args


# ----------------------------------------------------------------------------- packed export


def _packed_header(packed: PackedModel) -> dict[str, str]:
    """The packed file's `__metadata__` (docs/formats.md §2)."""
    from chtsl_infer.formats.packed import DTYPE_NAMES

    config = packed.config
    return {
        "format": PACKED_FORMAT,
        "format_version": PACKED_FORMAT_VERSION,
        "method": config.method,
        "activation": config.chtsl["activation"],
        "dtype": DTYPE_NAMES[packed.dtype],
        "float_dtype": DTYPE_NAMES[packed.float_dtype or packed.dtype],
        "index": packed.index,
        "config": config.to_json_string(use_diff=False),
    }


def save_packed(packed: PackedModel, path: str | Path) -> None:
    """Writes `packed` to the safetensors file `path` atomically (temp file + rename)."""
    from safetensors.torch import save_file

    metadata = {**packed.metadata, **_packed_header(packed)}
    with atomic_path(Path(path)) as tmp:
        save_file(packed.tensors(), tmp, metadata=metadata)


def _check_csr(path: Path, lin: PackedLinear, values_dtype: torch.dtype, index: str = "absolute") -> None:
    """Validates one CSR triple (`index` "absolute" columns or "delta8" column deltas) and int8 values' row
    scales; ChtslError naming the file, the layer and the problem."""
    import torch

    from chtsl_infer.formats.encoding import check_deltas, check_int8, check_scale
    from chtsl_infer.formats.packed import col_index_dtype

    where = f"{path}: {lin.name}"
    crow, col, vals = lin.crow_indices, lin.col_indices, lin.values
    assert crow is not None and col is not None and vals is not None
    if crow.dtype != torch.int32 or crow.shape != (lin.out_features + 1,):
        raise ChtslError(f"{where}.crow_indices must be int32 of shape ({lin.out_features + 1},), "
                         f"got {crow.dtype} {tuple(crow.shape)}")
    deltas = index == "delta8"
    want_col = torch.uint8 if deltas else col_index_dtype(lin.in_features)
    col_key = "col_delta" if deltas else "col_indices"
    if col.dtype != want_col or col.dim() != 1:
        raise ChtslError(f"{where}.{col_key} must be a 1-D {want_col} tensor, got {col.dtype} {tuple(col.shape)}")
    if vals.dtype != values_dtype or vals.shape != col.shape:
        raise ChtslError(f"{where}.values must be {values_dtype} of shape {tuple(col.shape)}, "
                         f"got {vals.dtype} {tuple(vals.shape)}")
    crow64 = crow.long()
    if crow64[0] != 0 or crow64[-1] != col.numel():
        raise ChtslError(f"{where}.crow_indices must start at 0 and end at nnz={col.numel()}, "
                         f"got {int(crow64[0])}..{int(crow64[-1])}")
    if bool((crow64[1:] < crow64[:-1]).any()):
        raise ChtslError(f"{where}.crow_indices are not monotone")
    if values_dtype == torch.int8:
        check_int8(f"{where}.values", vals)
        assert lin.values_scale is not None
        check_scale(f"{where}.values_scale", lin.values_scale, lin.out_features)
    if deltas:
        check_deltas(f"{where}.col_delta", crow, col, lin.in_features)
        return
    col64 = col.long()
    if col64.numel() and (int(col64.min()) < 0 or int(col64.max()) >= lin.in_features):
        raise ChtslError(f"{where}.col_indices out of range [0, {lin.in_features}): "
                         f"min {int(col64.min())}, max {int(col64.max())}")
    rows = lin.row_indices()
    same_row = rows[1:] == rows[:-1]
    if bool((same_row & (col64[1:] <= col64[:-1])).any()):
        raise ChtslError(f"{where}.col_indices are not strictly increasing within a row")


def _check_shape(path: Path, key: str, tensor: torch.Tensor, shape: tuple[int, ...] | torch.Size,
                 dtype: torch.dtype) -> None:
    if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
        raise ChtslError(f"{path}: {key} should be {dtype} {tuple(shape)}, got {tensor.dtype} {tuple(tensor.shape)}")


def _header_dtypes(p: Path, metadata: dict[str, str]) -> tuple[torch.dtype, torch.dtype, str]:
    """(value dtype, float dtype, index encoding) of a packed file's header; ChtslError where unknown.
    Version 1 has float values, no `float_dtype` (= dtype) and no `index` (absolute)."""
    from chtsl_infer.formats.packed import DTYPES, FLOAT_DTYPES, INDEX_ENCODINGS

    version = metadata.get("format_version")
    if version not in PACKED_READABLE_VERSIONS:
        raise ChtslError(f"{p}: unsupported format_version {version!r} "
                         f"(this chtsl reads {', '.join(PACKED_READABLE_VERSIONS)})")
    names = DTYPES if version != "1" else FLOAT_DTYPES
    name = metadata.get("dtype", "")
    if name not in names:
        raise ChtslError(f"{p}: unknown dtype {name!r} in metadata; valid: {', '.join(names)}")
    float_name = metadata.get("float_dtype", name) if version != "1" else name
    if float_name not in FLOAT_DTYPES:
        raise ChtslError(f"{p}: unknown float_dtype {float_name!r} in metadata; valid: {', '.join(FLOAT_DTYPES)}")
    index = metadata.get("index", "absolute") if version != "1" else "absolute"
    if index not in INDEX_ENCODINGS:
        raise ChtslError(f"{p}: unknown index encoding {index!r} in metadata; valid: {', '.join(INDEX_ENCODINGS)}")
    return DTYPES[name], DTYPES[float_name], index


def load_packed(path: str | Path) -> PackedModel:
    """Reads and validates a packed safetensors file (or a directory holding `model.safetensors`), of
    format version 2 or 1.

    Checks the header (format, version, dtypes, index encoding, config), every expected tensor's
    presence, dtype and shape against the config, every CSR (row pointers monotone from 0 to nnz;
    columns in range and strictly increasing within rows, or column deltas whose rows stay below
    in_features), and in int8 files every int8 tensor's range and row scales (float32, one per row,
    finite, > 0). Any violation → ChtslError naming the file and the problem, before anything is
    computed; unexpected extra tensors are errors too.
    """
    import torch

    from chtsl_infer.formats.encoding import check_int8, check_scale
    from chtsl_infer.formats.packed import PackedLinear, PackedModel, tied_keys

    p = Path(path)
    if p.is_dir():
        p = p / WEIGHTS_NAME
    metadata, tensors = _read_safetensors(p)
    if metadata.get("format") != PACKED_FORMAT:
        raise ChtslError(f"{p}: not a chtsl packed export (metadata format {metadata.get('format')!r}, "
                         f"expected {PACKED_FORMAT!r})")
    dtype, float_dtype, index = _header_dtypes(p, metadata)
    config = _header_config(metadata, p)
    check_finite(tensors, p)

    skeleton = _meta_model(config)
    layers = skeleton.chtsl_layers()
    skip = tied_keys(config)
    dense_shapes = {key: t.shape for key, t in skeleton.state_dict().items()
                    if key.rsplit(".", 1)[0] not in layers and key not in skip}
    remaining = dict(tensors)
    int8 = dtype == torch.int8

    def take(key: str) -> torch.Tensor:
        if key not in remaining:
            raise ChtslError(f"{p}: missing tensor {key}")
        return remaining.pop(key)

    def take_part(lin: PackedLinear, part: str, shape: tuple[int, int]) -> None:
        """A dense part (rows, cols) in the value dtype, with its row scales when int8."""
        key = f"{lin.name}.{part}"
        setattr(lin, part, take(key))
        _check_shape(p, key, getattr(lin, part), shape, dtype)
        if int8:
            check_int8(f"{p}: {key}", getattr(lin, part))
            setattr(lin, f"{part}_scale", take(f"{key}_scale"))
            check_scale(f"{p}: {key}_scale", getattr(lin, f"{part}_scale"), shape[0])

    linears: dict[str, PackedLinear] = {}
    for name, layer in layers.items():
        lin = PackedLinear(name=name, in_features=layer.in_features, out_features=layer.out_features,
                           scale=float(layer.scale), activation=layer.activation)
        if layer.has_sparse:
            lin.crow_indices = take(f"{name}.crow_indices")
            lin.col_indices = take(f"{name}.col_delta" if index == "delta8" else f"{name}.col_indices")
            lin.values = take(f"{name}.values")
            if int8:
                lin.values_scale = take(f"{name}.values_scale")
            _check_csr(p, lin, dtype, index)
        elif layer.weight is not None:
            take_part(lin, "weight", (layer.out_features, layer.in_features))
        if layer.has_lowrank:
            take_part(lin, "lora_A", (layer.rank, layer.in_features))
            take_part(lin, "lora_B", (layer.out_features, layer.rank))
        linears[name] = lin

    dense: dict[str, torch.Tensor] = {}
    for key, shape in dense_shapes.items():
        tensor = take(key)
        if key == "lm_head.weight":  # the lm_head has the value dtype (int8: with row scales)
            _check_shape(p, key, tensor, shape, dtype)
            if int8:
                check_int8(f"{p}: {key}", tensor)
                dense["lm_head.weight_scale"] = take("lm_head.weight_scale")
                check_scale(f"{p}: lm_head.weight_scale", dense["lm_head.weight_scale"], shape[0])
        else:
            _check_shape(p, key, tensor, shape, float_dtype if tensor.is_floating_point() else tensor.dtype)
        dense[key] = tensor
    if remaining:
        raise _unexpected(p, sorted(remaining))
    return PackedModel(config=config, dtype=dtype, linears=linears, dense=dense, metadata=dict(metadata),
                       float_dtype=float_dtype, index=index)

# ----------------------------------------------------------------------------- any model directory


def load_model(path: str | Path | ModelDir, device: str = "cpu") -> ChtslLlamaForCausalLM:
    """The `ChtslLlamaForCausalLM` of a training checkpoint or a packed export dir, in eval mode.

    A packed export (`chtsl export`, `model.safetensors` with `format=chtsl-packed`) is validated
    (`load_packed`) and rebuilt in fp32 (`packed.unpack_model`). A checkpoint is validated
    (`load_checkpoint_weights`) and its weights loaded into a model built from its config (strict:
    every tensor present, none extra); only safetensors are read, and transformers prints no load
    report or progress bar. ChtslError for any other directory (`resolve_model_dir`).
    """
    import torch

    from chtsl_infer.formats.packed import tied_keys, unpack_model
    from chtsl_infer.model.modeling import ChtslLlamaForCausalLM
    from chtsl_infer.model.storage import convert_state_dict

    model_dir = resolve_model_dir(path).require_weights()
    if model_dir.kind == "packed":
        return unpack_model(load_packed(model_dir.weights), torch.float32).to(device).eval()
    p = model_dir.path
    config, tensors = load_checkpoint_weights(p)
    with torch.random.fork_rng(devices=[]):  # building draws random weights and masks: leave the RNG alone
        model = ChtslLlamaForCausalLM(config)
    try:  # validates every CSR triple of a csr-storage checkpoint (one line naming the layer)
        tensors = convert_state_dict(tensors, model)
    except ValueError as e:
        raise ChtslError(f"{p}: {first_line(e)}") from None
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if k not in tied_keys(config)]
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
        raise ChtslError(f"{p} has no {TOKENIZER_NAME}")
    if (p / CONFIG_NAME).is_file():
        read_config(p)  # AutoTokenizer reads it too: a broken one gets our message, not a traceback
    try:
        return AutoTokenizer.from_pretrained(p, trust_remote_code=False)
    except (OSError, ValueError, TypeError, KeyError) as e:  # a corrupt tokenizer.json and friends
        raise ChtslError(f"cannot load the tokenizer in {p}: {first_line(e)}") from None


#: `from_pretrained` options that locate files on the hub or disk: a packed export is read here instead
HUB_OPTIONS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder", "proxies",
               "use_safetensors", "variant", "_commit_hash")


def packed_pretrained_kwargs(directory: str | Path, kwargs: dict[str, Any]) -> dict[str, Any]:
    """transformers `from_pretrained` keyword arguments (without a path) that load the packed export in
    `directory`: its validated weights in training form (`packed.training_state_dict`) as `state_dict`,
    the caller's config (the Auto classes pass `config.json` with their overrides) or the header's,
    its `generation_config.json`; the caller's other options kept, the file-locating ones dropped."""
    from transformers import GenerationConfig

    from chtsl_infer.formats.packed import training_state_dict
    from chtsl_infer.model.configuration import ChtslConfig

    d = Path(directory)
    packed = load_packed(d / WEIGHTS_NAME)
    out = {k: v for k, v in kwargs.items() if k not in HUB_OPTIONS}
    if not isinstance(out.get("config"), ChtslConfig):
        out["config"] = packed.config
    if out.get("generation_config") is None and (d / "generation_config.json").is_file():
        out["generation_config"] = GenerationConfig.from_pretrained(d)
    out["state_dict"] = training_state_dict(packed)
    return out


def write_support_files(source: str | Path, out_dir: str | Path) -> list[str]:
    """Writes the config and tokenizer files of model directory `source` that exist (`SUPPORT_FILES`)
    into `out_dir`, as an export needs them beside its weights or graph; returns their names.

    Copied byte for byte, except that `auto_map` is dropped from `config.json` and
    `tokenizer_config.json`: it names classes to import from remote code, which a chtsl model never
    needs (the classes are registered by `import chtsl_infer`)."""
    written = []
    for name in SUPPORT_FILES:
        src, dst = Path(source) / name, Path(out_dir) / name
        if not src.is_file():
            continue
        raw = _read_json(src) if name in AUTO_MAP_CONFIGS else None
        if isinstance(raw, dict) and "auto_map" in raw:
            del raw["auto_map"]
            atomic_write_text(dst, json.dumps(raw, indent=2, ensure_ascii=False) + "\n")
        else:
            shutil.copyfile(src, dst)
        written.append(name)
    return written
