"""`ChtslLlamaForCausalLM`: the stock transformers Llama with its block linears as CHTsL layers.

Attention, RoPE, the KV cache and `generate()` are transformers' own; only the seven linears of
every decoder block (q, k, v, o, gate, up, down) are swapped for `SparseLowRankLinear`.
Embeddings, RMSNorms and `lm_head` stay dense (docs/method.md §1).

A model loaded with `from_pretrained` (the Auto classes, lm-eval, users' scripts) computes through
the runtime's kernels when it is in eval mode on CPU with grad off (`chtsl_infer.runtime.hf`);
training, grad, CUDA and options the runtime does not cover take the stock forward above.
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaForCausalLM, LlamaModel, LlamaPreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils.generic import can_return_tuple

from chtsl_infer.model.configuration import ChtslConfig
from chtsl_infer.model.layers import LAYER_TYPES, SparseLowRankLinear
from chtsl_infer.model.methods import get_method
from chtsl_infer.model.storage import DEFAULT_STORAGE

#: where a model keeps its runtime form (`chtsl_infer.runtime.hf`): its __dict__, outside the module tree
RUNTIME_KEY = "_chtsl_runtime"


class ChtslLlamaModel(LlamaModel):
    """The Llama decoder stack with `SparseLowRankLinear` block linears."""

    config_class = ChtslConfig
    config: ChtslConfig

    def __init__(self, config: ChtslConfig) -> None:
        super().__init__(config)
        block = config.chtsl
        for layer in self.layers:
            for parent in (layer.self_attn, layer.mlp):
                for t in LAYER_TYPES:
                    old = getattr(parent, t, None)
                    if old is None:
                        continue
                    setattr(
                        parent,
                        t,
                        SparseLowRankLinear(
                            old.in_features,
                            old.out_features,
                            method=block["method"],
                            sparsity=block["sparsity"][t],
                            rank=block["rank"][t],
                            activation=block["activation"],
                            alpha=block["alpha"],
                            group_rows=config.head_dim if t in ("q_proj", "k_proj", "v_proj") else None,
                            storage=block.get("storage", DEFAULT_STORAGE),
                        ),
                    )
        self.post_init()  # initialises the new modules only (the rest are flagged as initialised)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        if not isinstance(module, SparseLowRankLinear):
            super()._init_weights(module)
            return
        sltrain_init = get_method(module.method).init == "sltrain"
        if not getattr(module.storage.parameter(module), "_is_hf_initialized", False):
            init_sparse_values(module, self.config.initializer_range)
        if module.has_lowrank:
            scale = float(self.config.chtsl.get("lowrank_init_scale", 1.0))
            if sltrain_init:  # SLTrain: A kaiming-uniform, B = 0
                init.kaiming_uniform_(module.lora_A, a=math.sqrt(5))
                if scale != 1.0:
                    module.lora_A.mul_(scale)
                init.zeros_(module.lora_B)
            else:  # CoLA: every entry N(0, σ0²), σ0 = (r·(in+out))^(-1/4)
                sigma = scale * (module.rank * (module.in_features + module.out_features)) ** -0.25
                init.normal_(module.lora_A, mean=0.0, std=sigma)
                init.normal_(module.lora_B, mean=0.0, std=sigma)


@torch.no_grad()
def init_sparse_values(layer: SparseLowRankLinear, std: float, generator: torch.Generator | None = None) -> None:
    """Draws S's initial values on the layer's current support (docs/method.md §1, init).

    As Hugging Face Llama: N(0, std²) (`std` = `initializer_range`), kept on the support, not
    rescaled; SLTrain: uniform(±1/√in). One dense (out × in) draw — transient, one layer at a time,
    at initialisation only — gathered on the support, so the masked and csr storages consume the
    same random numbers and equal seeds give equal models. Called at construction and again by the
    topology engine after it replaces the support by the BRF one: without the second call a new
    support would keep only the links it shares with the old one (≈ density of them) non-zero.
    """
    target = layer.storage.parameter(layer)
    if target is None or target.device.type == "meta":
        return
    dense = torch.empty(layer.out_features, layer.in_features, device=target.device, dtype=target.dtype)
    if get_method(layer.method).init == "sltrain":
        bound = 1.0 / math.sqrt(layer.in_features)
        dense.uniform_(-bound, bound, generator=generator)
    else:
        dense.normal_(mean=0.0, std=std, generator=generator)
    target.copy_(layer.storage.from_dense(layer, dense))


class ChtslLlamaForCausalLM(LlamaForCausalLM):
    """A causal Llama LM whose block linears are `SparseLowRankLinear` (per `config.chtsl`)."""

    config_class = ChtslConfig
    config: ChtslConfig

    def __init__(self, config: ChtslConfig) -> None:
        # LlamaForCausalLM.__init__ with our decoder stack (building a stock one first would waste
        # the memory and init time of every dense linear).
        LlamaPreTrainedModel.__init__(self, config)
        self.model = ChtslLlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    #: compute through the runtime's kernels in eval mode with grad off; set by `from_pretrained`, so the
    #: trainer's and the loaders' own models keep transformers' forward
    use_chtsl_runtime: bool = False
    #: `chtsl_infer.runtime.hf` (`forward`, `prepare_generation_cache`, `pretrained_arguments`), which sets
    #: it when imported (this layer does not import the runtime above it); `chtsl_infer/__init__.py`
    #: imports it once transformers is loaded and no module of the package is half-imported
    runtime_hooks: ClassVar[ModuleType | None] = None

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *args: Any, **kwargs: Any) -> Any:
        """transformers' `from_pretrained`, which also reads a packed export (`chtsl export`: CSR weights,
        validated, loaded in training form); the model computes through the runtime where it can."""
        if cls.runtime_hooks is not None:
            pretrained_model_name_or_path, kwargs = cls.runtime_hooks.pretrained_arguments(
                pretrained_model_name_or_path, kwargs)
        loaded = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        (loaded[0] if isinstance(loaded, tuple) else loaded).use_chtsl_runtime = True  # output_loading_info
        return loaded

    @can_return_tuple
    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, cache: Any = None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.LongTensor | None = None,
                use_cache: bool | None = None, logits_to_keep: int | torch.Tensor = 0,
                **kwargs: Any) -> CausalLMOutputWithPast:
        """`LlamaForCausalLM.forward`; on the runtime where `use_chtsl_runtime` and it applies."""
        hooks = self.runtime_hooks
        if hooks is not None and self.use_chtsl_runtime and not self.training and not torch.is_grad_enabled():
            out = hooks.forward(self, input_ids, attention_mask, position_ids, cache, inputs_embeds, labels,
                                use_cache, logits_to_keep, kwargs)
            if out is not None:
                return out
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               cache=cache, inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache,
                               logits_to_keep=logits_to_keep, **kwargs)

    def _prepare_cache_for_generation(self, generation_config: Any, model_kwargs: dict[str, Any],
                                      generation_mode: Any, batch_size: int, max_cache_length: int) -> None:
        super()._prepare_cache_for_generation(generation_config, model_kwargs, generation_mode, batch_size,
                                              max_cache_length)
        if self.runtime_hooks is not None and self.use_chtsl_runtime and not self.training:
            self.runtime_hooks.prepare_generation_cache(self, generation_config, model_kwargs, generation_mode,
                                                        max_cache_length)

    def train(self, mode: bool = True) -> ChtslLlamaForCausalLM:
        if mode:  # the weights will change: free the runtime form now rather than at the next fast call
            self.__dict__.pop(RUNTIME_KEY, None)
        return super().train(mode)

    def _apply(self, fn: Any, recurse: bool = True) -> ChtslLlamaForCausalLM:
        self.__dict__.pop(RUNTIME_KEY, None)  # .to(), .half(), ...: new tensors, the form is stale
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop(RUNTIME_KEY, None)  # bound C pointers: never pickled or deep-copied
        return state

    def chtsl_layers(self) -> dict[str, SparseLowRankLinear]:
        """Every block linear by its module name (e.g. `model.layers.0.self_attn.q_proj`)."""
        return {n: m for n, m in self.named_modules() if isinstance(m, SparseLowRankLinear)}

    def sparse_layers(self) -> dict[str, SparseLowRankLinear]:
        """The block linears with a sparse branch (either storage) — what the topology engine manages."""
        return {n: m for n, m in self.chtsl_layers().items() if m.has_sparse}

    def align_layers(self) -> dict[str, SparseLowRankLinear]:
        """The layers whose branches enter the alignment loss (`config.chtsl.align_layers`)."""
        types = self.config.align_layer_types()
        return {n: m for n, m in self.chtsl_layers().items() if n.rsplit(".", 1)[-1] in types and m.has_sparse}

    def trainable_linear_params(self) -> int:
        """Exact trainable entries of the block linears (active links + low-rank factors)."""
        return sum(m.trainable_entries() for m in self.chtsl_layers().values())


# `from_pretrained` through the Auto classes, without remote code (see chtsl_infer/__init__.py).
AutoModelForCausalLM.register(ChtslConfig, ChtslLlamaForCausalLM, exist_ok=True)
