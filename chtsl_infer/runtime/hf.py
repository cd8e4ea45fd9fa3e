"""transformers' entry points on the runtime: a `from_pretrained` model scores and decodes through the kernels.

This module installs itself as `ChtslLlamaForCausalLM.runtime_hooks` (`chtsl_infer.register_auto_classes`
imports it once transformers is loaded: the model layer does not import the runtime above it), and
the model's `forward` hands over to `forward` here when the model was loaded with `from_pretrained`
(`use_chtsl_runtime`; packed exports too, `pretrained_arguments`), is in eval mode and grad is off (`torch.no_grad()`,
`torch.inference_mode()`, `generate()`): then `model(...)`, `model.generate(...)` and the
loglikelihood calls of lm-eval run `feature_major.forward` on the runtime form of the same
weights (the `sparse` backend: CSR kernels, the KV cache written in place, every block of a
decoding step in one `decode_layers` call), as `chtsl generate` does. Everything else — training
mode, grad enabled, CUDA, fp16, a padded attention mask, `inputs_embeds`, `output_attentions` /
`output_hidden_states`, a cache of another class, explicit position ids that do not count on from
the cache — returns None, and the model runs transformers' own forward, unchanged.

The runtime form (`_Kept`) is built once, on first use, by `pack_model` + `backends.build_model`:
embeddings, norms and `lm_head` are the model's own tensors (no copy in the model's dtype), the
block linears the packed CSR + low-rank factors the kernels read. It is kept outside the module
tree (not in `state_dict`, not moved by `.to()`) beside the identity, address and version counter
of every parameter, buffer and submodule of the model, and rebuilt when any of them changed (an
optimizer step, `load_state_dict`, a topology update, a replaced module); `train()` and `.to()`
drop it. Writes through `.data` bypass the version counters: after such a write, `model.train()`
then `model.eval()` drops the stale form.

`ChtslCache` is the transformers `Cache` of the fast path: preallocated per-block keys/values
(batch, kv_heads, capacity, head_dim) that `feature_major.forward` writes in place, grown by
doubling when a call needs more room. Its layers also implement transformers' cache-layer
interface (`update`, `get_mask_sizes`, `crop`, `reorder_cache`, ...), so a forward that falls back
to the stock path continues the same cache. `generate()` gets one for greedy and sampled decoding
(`prepare_generation_cache`, sized to `max_length`); a `DynamicCache` the caller passes in is
always left to the stock path (it is filled in place, which the runtime cannot do).
"""

from __future__ import annotations

import operator
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache
from transformers.generation.configuration_utils import GenerationMode
from transformers.modeling_outputs import CausalLMOutputWithPast

from chtsl_infer.formats.model_dir import is_packed_dir, packed_pretrained_kwargs
from chtsl_infer.formats.packed import pack_model
from chtsl_infer.model.modeling import RUNTIME_KEY, ChtslLlamaForCausalLM
from chtsl_infer.runtime import feature_major
from chtsl_infer.runtime.backends import build_model, resolve_backend

DTYPES = (torch.float32, torch.bfloat16)  # what the CPU kernels compute in
# RoPE types whose frequencies do not depend on the sequence length: one table serves every call
STATIC_ROPE = ("default", "linear", "llama3")
# generate() modes that feed one token per sequence after the prefill, in order (no beams, no rollback)
CACHE_MODES = (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE)


# ----------------------------------------------------------------------------- the runtime form


@dataclass
class _Kept:
    """The runtime form of a model (`runtime` None: the model does not qualify, use the stock path) and
    what it was built from: every parameter, buffer and submodule of the model with its owner dict and
    name, and each tensor's address and version counter then."""

    runtime: ChtslLlamaForCausalLM | None
    num_layers: int
    kv_heads: tuple[int, int]  # (key/value heads, head_dim): the KV cache's shape
    owners: list[dict[str, Any]]  # module._parameters / _buffers / _modules
    names: list[str]
    objects: list[torch.Tensor | nn.Module]
    tensors: list[torch.Tensor]
    ptrs: list[int]
    versions: list[int]
    # the runtime's reused activation buffers, one set per inference mode: a buffer made under
    # `torch.inference_mode()` cannot be written outside it
    workspaces: dict[bool, dict[str, torch.Tensor]] = field(default_factory=dict)

    @classmethod
    def of(cls, model: nn.Module, runtime: ChtslLlamaForCausalLM | None) -> _Kept:
        owners, names, objects = [], [], []
        for module in model.modules():
            for owner in (module._parameters, module._buffers, module._modules):
                for name, obj in owner.items():
                    if obj is not None:
                        owners.append(owner)
                        names.append(name)
                        objects.append(obj)
        tensors = [t for t in objects if isinstance(t, torch.Tensor)]
        cfg = model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return cls(runtime, cfg.num_hidden_layers, (cfg.num_key_value_heads, head_dim), owners, names, objects,
                   tensors, [t.data_ptr() for t in tensors], [t._version for t in tensors])

    def still_valid(self) -> bool:
        # Checked every call, so no Python loop: 250 tensors (60M) cost ~0.05 ms, a decoding step ~5 ms.
        return (list(map(_VERSION, self.tensors)) == self.versions
                and list(map(torch.Tensor.data_ptr, self.tensors)) == self.ptrs
                and all(map(operator.is_, map(dict.get, self.owners, self.names), self.objects)))


_VERSION = operator.attrgetter("_version")


def _qualifies(model: ChtslLlamaForCausalLM) -> bool:
    """Whether the runtime can compute this model as it is: CPU, one float dtype the kernels take, static RoPE."""
    floats = {t.dtype for t in model.parameters() if t.is_floating_point()}
    devices = {t.device.type for t in model.parameters()}
    rope = getattr(model.model.rotary_emb, "rope_type", "default")
    return devices == {"cpu"} and len(floats) == 1 and floats.pop() in DTYPES and rope in STATIC_ROPE


@torch.no_grad()
def _build(model: ChtslLlamaForCausalLM) -> _Kept:
    runtime = None
    if _qualifies(model):
        dtype = model.lm_head.weight.dtype
        with torch.inference_mode(False):  # plain tensors: usable by later calls outside inference mode
            packed = pack_model(model, dtype)  # the dense tensors are the model's own (same dtype, CPU)
            backend = resolve_backend("auto", packed, torch.device("cpu"))
            # `dense` would hold S (or a dense method's weight) a second time, densified: the stock path
            # computes the same from the model's own tensors. Low-rank-only models lose nothing.
            if backend == "sparse" or not any(lin.has_sparse or lin.weight is not None
                                              for lin in packed.linears.values()):
                runtime = build_model(packed, backend, "cpu", dtype, consume=True)
            del packed
    return _Kept.of(model, runtime)


def kept_runtime(model: ChtslLlamaForCausalLM) -> _Kept | None:
    """The model's kept runtime form, built or rebuilt if its weights changed; None where it does not qualify."""
    kept: _Kept | None = model.__dict__.get(RUNTIME_KEY)
    if kept is None or not kept.still_valid():
        model.__dict__.pop(RUNTIME_KEY, None)  # free the stale form before building the new one
        kept = model.__dict__[RUNTIME_KEY] = _build(model)
    return kept if kept.runtime is not None else None


# ----------------------------------------------------------------------------- the cache


class ChtslCache(Cache):
    """A transformers `Cache` over preallocated keys/values, the layout of `feature_major.KVCache`.

    `key[i]`, `value[i]`: block i's (batch, kv_heads, capacity, head_dim) tensors, positions
    `[0, layers[i].length)` filled. Allocated on first use with `capacity` positions (or as many as
    that call needs), grown by doubling; the fast path's RoPE tables over the capacity kept beside.
    """

    def __init__(self, num_layers: int, capacity: int = 0) -> None:
        super().__init__(layers=[_CacheLayer(self, i) for i in range(num_layers)])
        self.capacity_hint = capacity
        self.key: list[torch.Tensor] = []
        self.value: list[torch.Tensor] = []
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def capacity(self) -> int:
        return self.key[0].shape[2] if self.key else 0

    def lengths(self) -> set[int]:
        return {layer.length for layer in self.layers}

    def reserve(self, batch: int, heads: int, head_dim: int, like: torch.Tensor, needed: int) -> None:
        """Room for `needed` positions of (batch, heads, ·, head_dim) keys in `like`'s dtype and device:
        allocates, or grows by doubling with the filled positions copied over."""
        key = self.key[0] if self.key else None
        fits = key is not None and (key.shape[0] == batch and key.shape[1] == heads and key.shape[3] == head_dim
                                    and key.dtype == like.dtype and key.device == like.device)
        if fits and needed <= key.shape[2]:
            return
        if key is not None and not fits and any(layer.length for layer in self.layers):
            raise ValueError(f"a cache of {tuple(key.shape)} keys was fed ({batch}, {heads}, ·, {head_dim}) ones")
        capacity = max(needed, self.capacity_hint, 2 * self.capacity if fits else 0)

        def grown(old: torch.Tensor | None, n: int) -> torch.Tensor:
            new = like.new_empty(batch, heads, capacity, head_dim)
            if old is not None and n:
                new[:, :, :n] = old[:, :, :n]
            return new

        olds = [(k if fits else None, v if fits else None) for k, v in zip(self.key, self.value, strict=True)]
        olds = olds or [(None, None)] * len(self.layers)
        with torch.inference_mode(False):  # plain tensors: writable whether or not later calls are in inference mode
            self.key = [grown(k, layer.length) for (k, _), layer in zip(olds, self.layers, strict=True)]
            self.value = [grown(v, layer.length) for (_, v), layer in zip(olds, self.layers, strict=True)]
        self._rope = None

    def runtime_cache(self, runtime: ChtslLlamaForCausalLM, batch: int, kv_heads: tuple[int, int],
                      needed: int) -> feature_major.KVCache:
        """A `feature_major.KVCache` over these tensors at the common length, with room for `needed`
        positions of `batch` sequences; kv_heads: (key/value heads, head_dim)."""
        weight = runtime.model.embed_tokens.weight
        self.reserve(batch, *kv_heads, weight, needed)
        if self._rope is None:
            positions = torch.arange(self.capacity, device=weight.device)
            self._rope = feature_major.rope_tables(runtime, positions, weight)
        cos, sin = self._rope
        return feature_major.KVCache(self.key, self.value, cos, sin, length=self.layers[0].length)

    def set_length(self, length: int) -> None:
        for layer in self.layers:
            layer.length = length


class _CacheLayer(CacheLayerMixin):
    """One block's view of a `ChtslCache`: transformers' cache-layer interface for the stock path."""

    is_sliding = False
    is_croppable = True
    is_compileable = False

    def __init__(self, cache: ChtslCache, index: int) -> None:  # no super().__init__: keys/values are views
        self.cache, self.index, self.length = cache, index, 0

    @property
    def keys(self) -> torch.Tensor | None:
        return self.cache.key[self.index][:, :, :self.length] if self.cache.key else None

    @property
    def values(self) -> torch.Tensor | None:
        return self.cache.value[self.index][:, :, :self.length] if self.cache.value else None

    @property
    def is_initialized(self) -> bool:
        return bool(self.cache.key)

    @property
    def batch_size(self) -> int:
        return self.cache.key[self.index].shape[0]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads, _, head_dim = key_states.shape
        self.cache.reserve(batch, heads, head_dim, key_states, self.length)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        batch, heads, seq, head_dim = key_states.shape
        end = self.length + seq
        self.cache.reserve(batch, heads, head_dim, key_states, end)
        self.cache.key[self.index][:, :, self.length:end] = key_states
        self.cache.value[self.index][:, :, self.length:end] = value_states
        self.length = end
        return self.cache.key[self.index][:, :, :end], self.cache.value[self.index][:, :, :end]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1  # grows

    def offload(self) -> None:
        pass

    def prefetch(self) -> None:
        pass

    def reset(self) -> None:
        self.length = 0

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes the number of tokens to remove as a negative int, got {tokens_to_remove}")
        self.length = max(0, self.length + tokens_to_remove)

    def _select(self, fn) -> None:
        for store in (self.cache.key, self.cache.value):
            if store:
                store[self.index] = fn(store[self.index])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._select(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select(lambda t: t[indices].contiguous())


def prepare_generation_cache(model: ChtslLlamaForCausalLM, generation_config: Any, model_kwargs: dict[str, Any],
                             generation_mode: Any, max_cache_length: int) -> None:
    """Swaps the empty `DynamicCache` `generate()` just made for a `ChtslCache` of `max_cache_length`
    positions, where the fast path will serve the whole generation; otherwise leaves it."""
    cache = model_kwargs.get("cache")
    mask = model_kwargs.get("attention_mask")
    if (type(cache) is not DynamicCache or getattr(cache, "_is_user_defined", False) or cache.offloading
            or cache.get_seq_length() > 0 or generation_mode not in CACHE_MODES
            or generation_config.output_attentions or generation_config.output_hidden_states
            or model_kwargs.get("inputs_embeds") is not None
            or (mask is not None and not (mask.dim() == 2 and bool(mask.all())))):
        return
    kept = kept_runtime(model)
    if kept is not None:
        model_kwargs["cache"] = ChtslCache(kept.num_layers, capacity=max_cache_length)


# ----------------------------------------------------------------------------- the forward


def _counts_on(position_ids: torch.Tensor, start: int, batch: int, seq: int) -> bool:
    """Whether position_ids (1 or batch, seq) are start, start+1, … in every row (what the runtime computes)."""
    want = torch.arange(start, start + seq, device=position_ids.device)
    return position_ids.dim() == 2 and position_ids.shape[0] in (1, batch) and position_ids.shape[1] == seq \
        and bool((position_ids == want).all())


def forward(model: ChtslLlamaForCausalLM, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None,
            position_ids: torch.Tensor | None, cache: Any, inputs_embeds: torch.Tensor | None,
            labels: torch.Tensor | None, use_cache: bool | None, logits_to_keep: int | torch.Tensor,
            kwargs: dict[str, Any]) -> CausalLMOutputWithPast | None:
    """`ChtslLlamaForCausalLM.forward` on the runtime, or None where it does not apply (see the module doc).

    input_ids (batch, seq) -> logits (batch, seq, vocab) in the model's dtype, the last `logits_to_keep`
    positions only when it is > 0 (`generate()` asks for 1), as transformers' forward; the cache (a
    `ChtslCache`, created when `use_cache` and none is given) advanced by seq.
    """
    extra = dict(kwargs)  # `return_dict` was taken by the caller's `can_return_tuple`
    if cache is None:
        cache = extra.pop("past_key_values", None)
    cache_position = extra.pop("cache_position", None)  # transformers 4's name for the positions, still sent
    cfg = model.config
    if (extra or input_ids is None or inputs_embeds is not None or input_ids.dim() != 2 or input_ids.numel() == 0
            or input_ids.device.type != "cpu" or not isinstance(logits_to_keep, int) or logits_to_keep < 0
            or cfg.output_attentions or cfg.output_hidden_states):
        return None
    batch, seq = input_ids.shape
    start = 0
    if isinstance(cache, ChtslCache):
        lengths = cache.lengths()
        if len(lengths) != 1:
            return None
        start = lengths.pop()
        if start and cache.key[0].shape[0] != batch:
            return None
    elif cache is not None:
        return None
    if attention_mask is not None and not (attention_mask.dim() == 2 and attention_mask.shape == (batch, start + seq)
                                           and bool(attention_mask.all())):
        return None
    if position_ids is not None and not _counts_on(position_ids, start, batch, seq):
        return None
    if cache_position is not None and not _counts_on(cache_position[None], start, 1, seq):
        return None
    kept = kept_runtime(model)
    if kept is None:
        return None
    if cache is None and (use_cache if use_cache is not None else cfg.use_cache):
        cache = ChtslCache(kept.num_layers)
    last_only = logits_to_keep == 1
    workspace = kept.workspaces.setdefault(torch.is_inference_mode_enabled(), {})
    if cache is None:
        logits = feature_major.forward(kept.runtime, input_ids, last_only=last_only, workspace=workspace)
    else:
        kv = cache.runtime_cache(kept.runtime, batch, kept.kv_heads, start + seq)
        logits = feature_major.forward(kept.runtime, input_ids, cache=kv, last_only=last_only, workspace=workspace)
        cache.set_length(kv.length)
    if last_only:
        logits = logits[:, None]
    elif logits_to_keep:
        logits = logits[:, -logits_to_keep:]
    loss = None if labels is None else model.loss_function(logits=logits, labels=labels, vocab_size=cfg.vocab_size)
    return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache)


def pretrained_arguments(path: Any, kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """(path, kwargs) for transformers' `from_pretrained`: a packed export's directory is read here (its
    tensor names are not the model's), handed over as `state_dict` without a path; anything else as given."""
    if path is not None and kwargs.get("state_dict") is None:
        local = Path(path, kwargs.get("subfolder") or "")
        if local.is_dir() and is_packed_dir(local):
            return None, packed_pretrained_kwargs(local, kwargs)
    return path, kwargs


ChtslLlamaForCausalLM.runtime_hooks = sys.modules[__name__]  # the model layer's entry points into this module
