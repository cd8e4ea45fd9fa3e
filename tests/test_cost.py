"""`runtime.cost`: a decoding step's bytes and a forward's FLOPs, against counts written out from the packed
tensors (what the runtime model is built from), for the sparse and dense backends of every kind of group."""

from __future__ import annotations

import pytest
import torch

from chtsl_infer.runtime.backends import from_packed, random_packed
from chtsl_infer.runtime.cost import decode_bytes, forward_flops, mean_positions, weight_bytes
from tests.conftest import expected_flops, expected_linear_bytes, tiny_config


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("method", "backend"), [("chtsl", "sparse"), ("chtsl", "dense"), ("dense", "dense"),
                                                 ("chts", "sparse"), ("cola", "sparse")])
def test_decode_bytes_count_the_packed_tensors(method: str, backend: str, dtype: torch.dtype) -> None:
    packed = random_packed(tiny_config(method, num_key_value_heads=2))
    cfg = packed.config
    rt = from_packed(packed, backend, dtype=dtype)
    size = dtype.itemsize
    batch, prompt, new = 3, 10, 6
    kv_per_position = cfg.num_hidden_layers * 2 * batch * 2 * (cfg.hidden_size // cfg.num_attention_heads) * size
    assert rt.new_cache(batch, 1).nbytes() == kv_per_position  # what bench passes: the cache's own tensors
    parts = decode_bytes(rt.model, batch, kv_per_position, mean_positions(prompt, new))
    assert parts == {
        "linears": expected_linear_bytes(packed, backend, size),
        "norms": (2 * cfg.num_hidden_layers + 1) * cfg.hidden_size * size,
        "lm_head": cfg.vocab_size * cfg.hidden_size * size,
        "embedding": batch * cfg.hidden_size * size,
        "kv_cache": kv_per_position * (prompt + 3.5),  # steps attend to 11 … 16 positions
    }
    assert weight_bytes(rt.model) == {k: parts[k] for k in ("linears", "norms", "lm_head")}


def test_decode_bytes_of_tied_embeddings_count_the_table_once_as_the_lm_head() -> None:
    rt = from_packed(random_packed(tiny_config("chtsl", tie_word_embeddings=True)), "sparse")
    cfg = rt.config
    parts = decode_bytes(rt.model, 1, 0, 0)
    assert parts["lm_head"] == cfg.vocab_size * cfg.hidden_size * 4 and parts["embedding"] == cfg.hidden_size * 4


def test_mean_positions_over_the_decoding_steps() -> None:
    assert mean_positions(128, 64) == sum(128 + i + 1 for i in range(64)) / 64
    assert mean_positions(5, 1) == 6


@pytest.mark.parametrize(("method", "backend"), [("chtsl", "sparse"), ("chtsl", "dense"), ("dense", "dense"),
                                                 ("sltrain", "sparse"), ("cola", "dense")])
def test_forward_flops_count_links_factors_and_weights(method: str, backend: str) -> None:
    packed = random_packed(tiny_config(method))
    assert forward_flops(from_packed(packed, backend).model) == expected_flops(packed, backend)


def test_forward_flops_of_the_torch_csr_group() -> None:
    """The CUDA form of S (a `torch.sparse_csr_tensor`, built here on CPU) counts its links too."""
    from chtsl_infer.runtime.backends import FusedLinears

    packed = random_packed(tiny_config("chtsl"))
    lin = packed.linears["model.layers.0.self_attn.o_proj"]
    group = FusedLinears([lin], sparse=True, device=torch.device("cpu"), dtype=torch.float32, torch_csr=True)
    model = torch.nn.Module()
    model.add_module("g", group)
    model.lm_head = torch.nn.Linear(1, 1, bias=False)
    assert forward_flops(model) == 2 * (lin.nnz + lin.lora_A.numel() + lin.lora_B.numel() + 1)


@pytest.mark.parametrize("widen", [0, 1])
@pytest.mark.parametrize("method", ["chtsl", "cola", "dense"])
def test_decode_bytes_of_an_int8_model_count_its_int8_weights_and_row_scales(method: str, widen: int) -> None:
    """int8 weights on the sparse backend: 1 byte per weight and link, plus its column (an 8-bit delta as
    the file holds it, or 2 bytes where the runtime widens them), 4 per row scale, an int8 lm_head with
    its scales and the bf16 embedding row (as the packed file's `decode_bytes` counts them)."""
    from chtsl_infer.formats.packed import QUANTIZED_PARTS, convert_packed
    from chtsl_infer.kernels.settings import override

    packed = convert_packed(random_packed(tiny_config(method, num_key_value_heads=2)), torch.int8)
    cfg = packed.config
    with override(widen_deltas=widen):
        rt = from_packed(packed, "sparse", dtype=torch.int8)
        linears = expected_linear_bytes(packed, "sparse", 1)
    parts = decode_bytes(rt.model, 1, 0, 0)
    scales = sum(getattr(lin, f"{p}_scale").numel() for lin in packed.linears.values() for p in QUANTIZED_PARTS
                 if getattr(lin, f"{p}_scale") is not None)
    assert parts["linears"] == linears + 4 * scales
    assert parts["lm_head"] == cfg.vocab_size * (cfg.hidden_size + 4)
    assert parts["embedding"] == cfg.hidden_size * 2  # the stored bf16 row
    assert parts["norms"] == (2 * cfg.num_hidden_layers + 1) * cfg.hidden_size * 4  # widened to the fp32 activations
    stored = packed.decode_bytes()
    assert all(parts[k] == stored[k] for k in ("lm_head", "embedding"))
