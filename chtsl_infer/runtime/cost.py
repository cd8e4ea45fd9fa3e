"""What a runtime model reads per decoding step and computes per token, counted from its tensors.

Decoding a token is memory-bound: each step streams every weight once, whatever the batch, plus each
sequence's embedding row and KV cache. `decode_bytes` counts those bytes from the built model's
tensors (what the kernels actually read: a sparse group's CSR values, column indices, row pointers
and row order, its low-rank factors, a dense group's weight, the norms and the lm_head), so bytes per
token × tokens/s is the bandwidth a run achieved, to hold against the machine's streaming read
bandwidth (`runtime.machine.stream_read`). A full forward is compute-bound: `forward_flops` counts
its multiply-adds in the linears and the lm_head (2 per link of S, per entry of A and B and of a dense
weight); attention's scores and the elementwise operations, the same in every model of a shape, are
left out, as in the usual 2·params·tokens.
"""

from __future__ import annotations

import torch
from torch import nn

from chtsl_infer.runtime.backends import FusedLinears


def _groups(model: nn.Module) -> list[FusedLinears]:
    return [m for m in model.modules() if isinstance(m, FusedLinears)]


def _group_tensors(group: FusedLinears) -> list[torch.Tensor]:
    """The tensors a group's product reads: its buffers (CSR, low-rank factors, dense weight) and, on
    CUDA, the parts of its `torch.sparse_csr_tensor`."""
    tensors = [t for _, t in group.named_buffers(recurse=False)]
    if group.cuda_csr is not None:
        tensors += [group.cuda_csr.crow_indices(), group.cuda_csr.col_indices(), group.cuda_csr.values()]
    return tensors


def weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of the weights one decoding step reads, by part: "linears" (every fused group's tensors),
    "norms" (every RMSNorm's weight) and "lm_head" (its whole weight, shared or not with the
    embeddings; an int8 one with its row scales). model: a runtime model (`backends.build_model`)."""
    norms = [m.weight for m in model.modules() if type(m).__name__.endswith("RMSNorm")]
    return {"linears": sum(t.nbytes for g in _groups(model) for t in _group_tensors(g)),
            "norms": sum(t.nbytes for t in norms),
            "lm_head": sum(t.nbytes for t in (*model.lm_head.parameters(), *model.lm_head.buffers()))}


def decode_bytes(model: nn.Module, batch: int, kv_bytes_per_position: float,
                 positions: float) -> dict[str, float]:
    """Bytes one decoding step of `batch` sequences reads, by part: `weight_bytes`, "embedding" (one
    row per sequence) and "kv_cache" (`kv_bytes_per_position` — every block's keys and values of all
    sequences at one position — × the `positions` attended, on average over the measured steps).
    Writes (the new keys and values, the logits) are not counted."""
    embed = model.model.embed_tokens.weight
    return {**weight_bytes(model), "embedding": batch * embed.shape[1] * embed.element_size(),
            "kv_cache": kv_bytes_per_position * positions}


def mean_positions(prompt: int, new_tokens: int) -> float:
    """Positions a decoding step attends to, averaged over the `new_tokens` steps after a `prompt`:
    step i (from 0) feeds position prompt + i and attends to prompt + i + 1 positions."""
    return prompt + (new_tokens + 1) / 2


def forward_flops(model: nn.Module) -> int:
    """Floating-point operations per token of a forward's linears and lm_head: 2 per link of a sparse
    S, per entry of the low-rank A and B, and per entry of a dense weight and of the lm_head."""
    entries = model.lm_head.weight.numel()
    for g in _groups(model):
        if g.cuda_csr is not None:
            entries += g.cuda_csr.values().numel()
        elif g.sparse:
            entries += g.nnz
        for t in (g.weight, g.lora_A, g.lora_B):
            entries += 0 if t is None else t.numel()
    return 2 * entries


__all__ = ["decode_bytes", "forward_flops", "mean_positions", "weight_bytes"]
