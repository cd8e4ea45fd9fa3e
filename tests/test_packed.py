"""The packed format (chtsl_infer/formats/packed.py): exact round trips, valid CSR, a strict loader, sizes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from chtsl_infer.errors import ChtslError
from chtsl_infer.formats.model_dir import (
    is_packed_dir,
    load_model,
    load_packed,
    load_tokenizer,
    save_packed,
    write_support_files,
)
from chtsl_infer.formats.packed import pack_linear, pack_model, unpack_model
from chtsl_infer.model.layers import SparseLowRankLinear
from chtsl_infer.model.modeling import ChtslLlamaForCausalLM
from chtsl_infer.model.presets import build_config
from export.packed import write_packed
from tests.conftest import ALL_METHODS, tiny_model

IDS = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def logits(model: ChtslLlamaForCausalLM, ids: torch.Tensor = IDS) -> torch.Tensor:
    return model.float()(input_ids=ids, use_cache=False).logits


def with_explicit_zero(model: ChtslLlamaForCausalLM) -> ChtslLlamaForCausalLM:
    """Sets one active link of every sparse layer to exactly 0 (as a regrown link is)."""
    with torch.no_grad():
        for layer in model.sparse_layers().values():
            r, c = layer.mask.nonzero()[0]
            layer.weight[r, c] = 0.0
    return model


def roundtrip(model: ChtslLlamaForCausalLM, path: Path, dtype: torch.dtype = torch.float32):
    save_packed(pack_model(model, dtype), path)
    return load_packed(path)


# ----------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("method", ALL_METHODS)
def test_fp32_roundtrip_is_exact(method: str, tmp_path: Path) -> None:
    model = with_explicit_zero(tiny_model(method))
    packed = roundtrip(model, tmp_path / "m.safetensors")
    rebuilt = unpack_model(packed)
    assert rebuilt.dtype == torch.float32
    assert (logits(rebuilt) - logits(model)).abs().max().item() <= 1e-6
    ref = model.state_dict()
    for key, value in rebuilt.state_dict().items():  # masks, dense S, factors, the dense rest
        assert torch.equal(value, ref[key]), key


@pytest.mark.parametrize("method", ["chtsl", "sltrain", "cola", "dense"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_within_1e2_relative(method: str, dtype: torch.dtype, tmp_path: Path) -> None:
    model = tiny_model(method)
    packed = roundtrip(model, tmp_path / "m.safetensors", dtype)
    assert packed.dtype == dtype
    assert all(t.dtype == dtype for t in packed.tensors().values() if t.is_floating_point())
    ref = logits(model)
    # Weights rounded to dtype, computed in fp32 (as `load_model` does); bf16 also natively
    # (CPU fp16 kernels are too slow for a unit test).
    for compute in (torch.float32,) + ((dtype,) if dtype == torch.bfloat16 else ()):
        out = unpack_model(packed, compute)(input_ids=IDS, use_cache=False).logits.float()
        rel = (torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref)).item()
        assert rel <= 1e-2, (compute, rel)
        assert rel > 0  # the rounding is real: the test would notice an fp32 file


def test_tied_embeddings_roundtrip(tmp_path: Path) -> None:
    model = tiny_model("chtsl", tie_word_embeddings=True)
    packed = roundtrip(model, tmp_path / "m.safetensors")
    assert "lm_head.weight" not in packed.dense
    rebuilt = unpack_model(packed)
    assert rebuilt.lm_head.weight.data_ptr() == rebuilt.model.embed_tokens.weight.data_ptr()
    assert (logits(rebuilt) - logits(model)).abs().max().item() <= 1e-6


def test_unpack_leaves_global_rng_alone(tmp_path: Path) -> None:
    packed = pack_model(tiny_model("chtsl"))
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    unpack_model(packed)
    assert torch.equal(torch.rand(3), expected)


# ----------------------------------------------------------------------------- format 2: int8, column deltas


@pytest.mark.parametrize("method", ALL_METHODS)
def test_column_deltas_roundtrip_exactly(method: str, tmp_path: Path) -> None:
    """fp32 values with 8-bit column deltas: the file holds col_delta, and unpacking gives the model back."""
    model = with_explicit_zero(tiny_model(method))
    path = tmp_path / "m.safetensors"
    save_packed(pack_model(model, torch.float32, index="delta8"), path)
    packed = load_packed(path)
    assert packed.index == "delta8" and packed.metadata["index"] == "delta8"
    assert packed.metadata["format_version"] == "2"
    for lin in packed.linears.values():
        assert lin.col_indices is None or lin.col_indices.dtype == torch.uint8
    rebuilt = unpack_model(packed)
    ref = model.state_dict()
    for key, value in rebuilt.state_dict().items():
        assert torch.equal(value, ref[key]), key


def _quantized_parts(model: ChtslLlamaForCausalLM, packed) -> list[tuple[str, torch.Tensor, torch.Tensor,
                                                                          torch.Tensor]]:
    """(name, trained fp32 rows, dequantized rows (float64), row scales) of every int8 part of `packed`."""
    from chtsl_infer.formats.encoding import dequantize_rows

    parts = []
    for name, layer in model.chtsl_layers().items():
        lin = packed.linears[name]
        if lin.has_sparse:
            dense = lin.dense_sparse_weight(torch.float64)
            parts.append((f"{name}.values", (layer.weight * layer.mask).double() if layer.weight is not None
                          else layer.storage.dense(layer).double(), dense, lin.values_scale))
        for part in ("weight", "lora_A", "lora_B"):
            q = getattr(lin, part)
            if q is not None:
                parts.append((f"{name}.{part}", getattr(layer, part).double(),
                              dequantize_rows(q, getattr(lin, f"{part}_scale"), torch.float64),
                              getattr(lin, f"{part}_scale")))
    if "lm_head.weight" in packed.dense:
        parts.append(("lm_head", model.lm_head.weight.double(),
                      dequantize_rows(packed.dense["lm_head.weight"], packed.dense["lm_head.weight_scale"],
                                      torch.float64), packed.dense["lm_head.weight_scale"]))
    return parts


@pytest.mark.parametrize("method", ALL_METHODS)
def test_int8_roundtrip_within_half_a_step(method: str, tmp_path: Path) -> None:
    """int8 export: every quantized row within half its scale of the trained one, embeddings and norms in
    bf16, the file's int8 tensors back unchanged; logits within 5e-2 (relative) of the fp32 model."""
    model = with_explicit_zero(tiny_model(method))
    path = tmp_path / "m.safetensors"
    save_packed(pack_model(model, torch.int8), path)
    packed = load_packed(path)
    assert packed.dtype == torch.int8 and packed.float_dtype == torch.bfloat16 and packed.index == "delta8"
    assert (packed.metadata["dtype"], packed.metadata["float_dtype"]) == ("int8", "bfloat16")
    assert packed.dense["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert packed.dense["lm_head.weight"].dtype == torch.int8
    parts = _quantized_parts(model, packed)
    assert len(parts) >= 1 + model.config.num_hidden_layers * 7
    for name, trained, dequantized, scale in parts:
        assert bool((scale > 0).all()), name
        assert bool(((dequantized - trained).abs() <= scale.double()[:, None] / 2 * (1 + 1e-6) + 1e-12).all()), name
    ref = logits(model)
    out = logits(unpack_model(packed))
    rel = (torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref)).item()
    assert 0 < rel <= 5e-2, rel


def test_int8_tied_embeddings_keep_the_bf16_embedding_as_lm_head(tmp_path: Path) -> None:
    model = tiny_model("chtsl", tie_word_embeddings=True)
    path = tmp_path / "m.safetensors"
    save_packed(pack_model(model, torch.int8), path)
    packed = load_packed(path)
    assert not any(k.startswith("lm_head") for k in packed.dense)
    rebuilt = unpack_model(packed)
    assert rebuilt.lm_head.weight.data_ptr() == rebuilt.model.embed_tokens.weight.data_ptr()


def test_format_version_1_files_still_load(tmp_path: Path) -> None:
    """A file as chtsl wrote it before format 2: float values, int16 columns, no float_dtype / index keys."""
    model = tiny_model("chtsl")
    v2 = tmp_path / "v2.safetensors"
    save_packed(pack_model(model, torch.bfloat16, index="absolute"), v2)

    def as_v1(m: dict[str, str]) -> None:
        m.update(format_version="1")
        del m["float_dtype"], m["index"]

    v1 = rewrite(v2, tmp_path / "v1.safetensors", lambda t: None, as_v1)
    packed = load_packed(v1)
    assert packed.dtype == packed.float_dtype == torch.bfloat16 and packed.index == "absolute"
    torch.testing.assert_close(logits(unpack_model(packed)), logits(unpack_model(load_packed(v2))), rtol=0, atol=0)
    int8_v1 = rewrite(v2, tmp_path / "v1-int8.safetensors", lambda t: None,
                      lambda m: (as_v1(m), m.update(dtype="int8")))
    with pytest.raises(ChtslError, match="unknown dtype 'int8'"):
        load_packed(int8_v1)


def test_bytes_per_link_and_per_token() -> None:
    """6 bytes per link in fp32 with int16 columns, 3 in bf16 and 2 in int8 with deltas (plus the row
    pointers and scales); a token reads every linear, the lm_head, the norms and one embedding row."""
    model = tiny_model("chtsl")
    links = sum(int(m.mask.sum()) for m in model.sparse_layers().values())
    rows = sum(m.out_features for m in model.sparse_layers().values())
    n_sparse = len(model.sparse_layers())
    for dtype, index, per_link, per_row in ((torch.float32, "absolute", 6, 4), (torch.bfloat16, "delta8", 3, 4),
                                            (torch.int8, "delta8", 2, 8)):
        packed = pack_model(model, dtype, index)
        cost = packed.decode_bytes()
        stored = sum(lin.nnz for lin in packed.linears.values())
        assert stored == links  # in_features 128: no gap over 255, no padding
        assert cost["per_link"] == pytest.approx((per_link * links + per_row * rows + 4 * n_sparse) / links)
        head = packed.dense.get("lm_head.weight")
        assert cost["lm_head"] == head.nbytes + (4 * head.shape[0] if dtype == torch.int8 else 0)
        hidden = model.config.hidden_size
        assert cost["embedding"] == hidden * (2 if dtype != torch.float32 else 4)
        assert cost["total"] == sum(lin.nbytes() for lin in packed.linears.values()) + cost["lm_head"] \
            + cost["norms"] + cost["embedding"]


# ----------------------------------------------------------------------------- CSR validity


@pytest.mark.parametrize("method", ["chtsl", "sltrain", "chts", "naive"])
def test_csr_arrays_are_valid(method: str, tmp_path: Path) -> None:
    model = with_explicit_zero(tiny_model(method))
    packed = roundtrip(model, tmp_path / "m.safetensors")
    layers = model.sparse_layers()
    assert set(packed.linears) == set(model.chtsl_layers())
    for name, layer in layers.items():
        lin = packed.linears[name]
        crow, col = lin.crow_indices.long(), lin.col_indices.long()
        assert lin.crow_indices.dtype == torch.int32 and lin.col_indices.dtype == torch.int16
        assert crow[0] == 0 and crow[-1] == col.numel() == lin.values.numel()
        assert bool((crow[1:] >= crow[:-1]).all())
        assert int(col.min()) >= 0 and int(col.max()) < layer.in_features
        for i in range(layer.out_features):  # sorted, unique columns within every row
            row = col[crow[i] : crow[i + 1]]
            assert bool((row[1:] > row[:-1]).all())
        assert lin.nnz == int(layer.mask.sum())  # explicit zeros stay entries
        assert int((lin.values == 0).sum()) >= 1
        support = torch.zeros_like(layer.mask)
        support[lin.row_indices(), col] = True
        assert torch.equal(support, layer.mask)
        assert torch.equal(lin.dense_sparse_weight(), layer.weight * layer.mask)
        csr = torch.sparse_csr_tensor(lin.crow_indices, lin.col_indices.int(), lin.values,
                                      size=(lin.out_features, lin.in_features), check_invariants=True)
        assert torch.equal(csr.to_dense(), layer.weight * layer.mask)
        assert lin.lora_A is None or torch.equal(lin.lora_A, layer.lora_A)
        assert lin.scale == layer.scale and lin.activation == layer.activation
    for name in model.chtsl_layers():
        if name not in layers:
            assert packed.linears[name].crow_indices is None


def test_no_csr_for_dense_and_cola() -> None:
    dense = pack_model(tiny_model("dense"))
    assert all(lin.weight is not None and lin.crow_indices is None for lin in dense.linears.values())
    cola = pack_model(tiny_model("cola"))
    assert all(lin.weight is None and lin.crow_indices is None and lin.lora_A is not None
               for lin in cola.linears.values())
    assert {lin.activation for lin in cola.linears.values()} == {"silu"}


def test_wide_layers_use_int32_columns() -> None:
    torch.manual_seed(0)
    layer = SparseLowRankLinear(40_000, 3, method="chts", sparsity=0.99)
    torch.nn.init.normal_(layer.weight)
    lin = pack_linear("wide", layer)
    assert lin.col_indices.dtype == torch.int32
    assert int(lin.col_indices.max()) > 32767
    assert torch.equal(lin.dense_sparse_weight(), layer.weight * layer.mask)


# ----------------------------------------------------------------------------- the strict loader


@pytest.fixture(scope="module")
def packed_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("packed") / "model.safetensors"
    save_packed(pack_model(tiny_model("chtsl")), path)
    return path


def rewrite(src: Path, dst: Path, edit, metadata_edit=None) -> Path:
    """Copies a packed file through `edit(tensors)` / `metadata_edit(metadata)`."""
    with safe_open(str(src), framework="pt") as f:
        metadata = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    edit(tensors)
    if metadata_edit:
        metadata_edit(metadata)
    save_file(tensors, str(dst), metadata=metadata)
    return dst


Q = "model.layers.0.self_attn.q_proj"


def _set(key: str, fn):
    def edit(t: dict[str, torch.Tensor]) -> None:
        t[key] = fn(t[key].clone())

    return edit


def _col_out_of_range(c: torch.Tensor) -> torch.Tensor:
    c[-1] = 200  # q_proj has 128 inputs
    return c


def _crow_not_monotone(c: torch.Tensor) -> torch.Tensor:
    c[5] = c[6] + 3  # row 5 would end before it starts
    return c


def _unsorted_row(c: torch.Tensor) -> torch.Tensor:
    c[0], c[1] = c[1].clone(), c[0].clone()
    return c


def _crow_end(c: torch.Tensor) -> torch.Tensor:
    c[-1] -= 1
    return c


CORRUPTIONS = {
    "column out of range": (_set(f"{Q}.col_indices", _col_out_of_range), "out of range"),
    "negative column": (_set(f"{Q}.col_indices", lambda c: c.index_fill_(0, torch.tensor([3]), -1)), "out of range"),
    "row pointers not monotone": (_set(f"{Q}.crow_indices", _crow_not_monotone), "not monotone"),
    "unsorted columns": (_set(f"{Q}.col_indices", _unsorted_row), "not strictly increasing"),
    "row pointers do not end at nnz": (_set(f"{Q}.crow_indices", _crow_end), "end at nnz"),
    "int64 columns": (_set(f"{Q}.col_indices", lambda c: c.long()), "col_indices must be"),
    "wrong value dtype": (_set(f"{Q}.values", lambda v: v.double()), "values must be"),
    "missing tensor": (lambda t: t.pop(f"{Q}.lora_A"), "missing tensor"),
    "extra tensor": (lambda t: t.update(stray=torch.zeros(2)), "unexpected tensor"),
    "wrong factor shape": (_set(f"{Q}.lora_B", lambda b: b[:, :2].contiguous()), "lora_B"),
    "wrong dense shape": (_set("model.norm.weight", lambda w: w[:-1].contiguous()), "model.norm.weight"),
}


@pytest.fixture(scope="module")
def int8_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("packed-int8") / "model.safetensors"
    save_packed(pack_model(tiny_model("chtsl"), torch.int8), path)
    return path


def _delta_past_the_row(d: torch.Tensor) -> torch.Tensor:
    d[-1] = 255  # the last row's last column moves past q_proj's 128 inputs
    return d


def _repeated_column(d: torch.Tensor) -> torch.Tensor:
    d[1] = 0  # row 0's second link on its first link's column
    return d


INT8_CORRUPTIONS = {  # the bad-input cases of an int8 / column-delta file
    "scale missing": (lambda t: t.pop(f"{Q}.values_scale"), f"missing tensor {Q}.values_scale"),
    "scale of the wrong length": (_set(f"{Q}.values_scale", lambda s: s[:-1].contiguous()), "values_scale must be"),
    "NaN scale": (_set(f"{Q}.lora_A_scale", lambda s: s.index_fill_(0, torch.tensor([2]), float("nan"))),
                  "non-finite"),
    "zero scale": (_set("lm_head.weight_scale", lambda s: s.index_fill_(0, torch.tensor([7]), 0.0)),
                   "row 7's scale is 0.0"),
    "negative scale": (_set(f"{Q}.lora_B_scale", lambda s: -s), "must be finite and > 0"),
    "fp16 scale": (_set(f"{Q}.values_scale", lambda s: s.half()), "values_scale must be float32"),
    "-128": (_set(f"{Q}.values", lambda v: v.index_fill_(0, torch.tensor([0]), -128)), "holds -128"),
    "delta past the row's end": (_set(f"{Q}.col_delta", _delta_past_the_row), "past in_features=128"),
    "repeated column": (_set(f"{Q}.col_delta", _repeated_column), "repeats a column"),
    "int16 deltas": (_set(f"{Q}.col_delta", lambda d: d.short()), "col_delta must be a 1-D torch.uint8"),
    "truncated values": (_set(f"{Q}.values", lambda v: v[:-3].contiguous()), "values must be torch.int8 of shape"),
    "absolute columns in a delta8 file": (lambda t: t.update({f"{Q}.col_indices": t.pop(f"{Q}.col_delta")}),
                                          f"missing tensor {Q}.col_delta"),
    "float values in an int8 file": (_set(f"{Q}.values", lambda v: v.float()), "values must be torch.int8"),
}


@pytest.mark.parametrize("case", list(INT8_CORRUPTIONS))
def test_loader_rejects_invalid_int8_and_delta_tensors(case: str, int8_file: Path, tmp_path: Path) -> None:
    edit, message = INT8_CORRUPTIONS[case]
    bad = rewrite(int8_file, tmp_path / "bad.safetensors", edit)
    with pytest.raises(ChtslError, match=message) as e:
        load_packed(bad)
    assert str(bad) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_loader_rejects_invalid_tensors(case: str, packed_file: Path, tmp_path: Path) -> None:
    edit, message = CORRUPTIONS[case]
    bad = rewrite(packed_file, tmp_path / "bad.safetensors", edit)
    with pytest.raises(ChtslError, match=message) as e:
        load_packed(bad)
    assert str(bad) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: m.update(format="something-else"), "not a chtsl packed export"),
        (lambda m: m.update(format_version="99"), "unsupported format_version"),
        (lambda m: m.update(dtype="float8"), "unknown dtype"),
        (lambda m: m.update(dtype="int4"), "unknown dtype 'int4'"),
        (lambda m: m.update(float_dtype="int8"), "unknown float_dtype 'int8'"),
        (lambda m: m.update(index="delta4"), "unknown index encoding 'delta4'"),
        (lambda m: m.update(dtype="int8"), "missing tensor .*values_scale"),
        (lambda m: m.update(config="{not json"), "invalid config"),
    ],
)
def test_loader_rejects_bad_metadata(edit, message: str, packed_file: Path, tmp_path: Path) -> None:
    bad = rewrite(packed_file, tmp_path / "bad.safetensors", lambda t: None, edit)
    with pytest.raises(ChtslError, match=message):
        load_packed(bad)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "missing"])
def test_loader_rejects_corrupt_files(damage: str, packed_file: Path, tmp_path: Path) -> None:
    bad = tmp_path / "model.safetensors"
    data = packed_file.read_bytes()
    if damage == "truncated":
        bad.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        bad.write_bytes(b"\x00\x01not a safetensors file" * 100)
    elif damage == "empty":
        bad.write_bytes(b"")
    with pytest.raises(ChtslError) as e:
        load_packed(bad)
    assert str(bad) in str(e.value)
    assert not is_packed_dir(tmp_path)


def test_save_is_atomic(tmp_path: Path, monkeypatch) -> None:
    """A failing write leaves neither the target nor a temp file behind."""
    import safetensors.torch

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError):
        save_packed(pack_model(tiny_model("chtsl")), tmp_path / "model.safetensors")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- export dirs


def test_export_dir_loads_like_the_checkpoint(tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "export"
    out.mkdir()
    reference = load_model(tiny_checkpoint)
    stats = write_packed(reference, out)
    copied = write_support_files(tiny_checkpoint, out)
    assert {"config.json", "tokenizer.json"} <= set(copied)
    assert is_packed_dir(out) and not is_packed_dir(tiny_checkpoint)
    rebuilt = load_model(out)
    assert (logits(rebuilt) - logits(reference)).abs().max().item() <= 1e-6
    tok = load_tokenizer(out)
    assert tok("def f(x): return x").input_ids == load_tokenizer(tiny_checkpoint)("def f(x): return x").input_ids
    assert stats.file_bytes == (out / "model.safetensors").stat().st_size
    assert stats.nnz == sum(int(m.mask.sum()) for m in reference.sparse_layers().values())


# ----------------------------------------------------------------------------- sizes (Done-when)


@pytest.mark.slow  # 60M shapes
def test_llama60m_packed_linears_within_015_of_dense(tmp_path: Path) -> None:
    """Random llama60m-c4 at s=0.95, r=16, fp32: CHTsL linears ≤ 0.15× the dense linear bytes."""
    config = build_config("llama60m-c4", s_total=0.9)
    assert config.chtsl["sparsity"]["q_proj"] == 0.95 and config.chtsl["rank"]["q_proj"] == 16
    torch.manual_seed(0)
    model = ChtslLlamaForCausalLM(config).eval()
    out = tmp_path / "export"
    out.mkdir()
    stats = write_packed(model, out)
    dense_linear = sum(4 * m.in_features * m.out_features for m in model.chtsl_layers().values())
    assert stats.dense_linear_bytes == dense_linear
    linear_ratio = stats.linear_bytes / stats.dense_linear_bytes
    file_ratio = stats.file_bytes / stats.dense_equivalent_bytes
    print(f"llama60m-c4 packed fp32: linears {linear_ratio:.4f}x, whole file {file_ratio:.4f}x")
    assert linear_ratio <= 0.15
    # The dense embeddings and lm_head bound the whole file (≈ 0.62× expected for 60M).
    assert 0.5 < file_ratio < 0.7
