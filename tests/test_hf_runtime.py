"""`from_pretrained` models compute through the runtime (chtsl_infer/runtime/hf.py): `generate()` gives the
tokens of the stock transformers forward and of `chtsl generate`'s `Runtime.generate`, logits within 1e-4
of the stock forward at every step; padding, unsupported options, training and grad take the stock path;
the runtime form follows the weights."""

from __future__ import annotations

import copy
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from chtsl_infer import kernels
from chtsl_infer.errors import ChtslError
from chtsl_infer.formats.model_dir import save_packed
from chtsl_infer.formats.packed import pack_model
from chtsl_infer.model.modeling import RUNTIME_KEY
from chtsl_infer.runtime import feature_major, hf
from chtsl_infer.runtime.backends import load_runtime
from tests.conftest import ALL_METHODS, random_ids, tiny_model_nonzero_b

pytestmark = pytest.mark.usefixtures("one_thread")
ATOL = 1e-4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hf-ckpt")
    tiny_model_nonzero_b("chtsl").save_pretrained(path)
    return path


@pytest.fixture
def model(model_dir: Path):
    return AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=True)


@pytest.fixture
def runtime_calls(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Every `feature_major.forward` call the fast path makes: whether it had a cache."""
    calls: list[bool] = []
    inner = feature_major.forward

    def spy(*args, **kwargs):
        calls.append(kwargs.get("cache") is not None)
        return inner(*args, **kwargs)

    monkeypatch.setattr(feature_major, "forward", spy)
    return calls


def stock(model, fn):
    """fn() with the model on transformers' own forward."""
    model.use_chtsl_runtime = False
    try:
        return fn()
    finally:
        model.use_chtsl_runtime = True


def greedy(model, ids: torch.Tensor, new: int = 8, **kwargs):
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                          return_dict_in_generate=True, output_logits=True, **kwargs)


@pytest.mark.parametrize("batch", [1, 2])
def test_generate_matches_stock_and_chtsl_generate(model, model_dir, runtime_calls, batch) -> None:
    assert model.use_chtsl_runtime and not model.training
    runtime = load_runtime(model_dir, "sparse")
    for seed, prompt in ((0, 5), (1, 11), (2, 1)):
        ids = random_ids(batch, prompt, seed=seed)
        runtime_calls.clear()
        fast = greedy(model, ids)
        assert runtime_calls == [True] * 8  # prefill + 7 steps, all on the runtime with its cache
        assert isinstance(fast.cache, hf.ChtslCache) and fast.cache.get_seq_length() == prompt + 7
        ref = stock(model, lambda ids=ids: greedy(model, ids))
        assert isinstance(ref.cache, DynamicCache)
        assert torch.equal(fast.sequences, ref.sequences)
        assert torch.equal(fast.sequences, runtime.generate(ids, 8))
        for a, b in zip(fast.logits, ref.logits, strict=True):
            torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    if kernels.cpu_kernel_status()[0]:  # every block of a decoding step in one C call, as chtsl generate
        assert model.__dict__[RUNTIME_KEY].runtime.__dict__["_chtsl_decode_layers"].blocks is not None


@pytest.mark.parametrize("method,storage", [(m, "masked") for m in ALL_METHODS] + [("chtsl", "csr")])
def test_every_method_and_storage(tmp_path, runtime_calls, method, storage) -> None:
    """Every method decodes as the stock forward; all but `dense` (whose runtime form would copy its
    weights) on the runtime."""
    tiny_model_nonzero_b(method, storage=storage).save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, use_safetensors=True)
    ids = random_ids(2, 6, seed=13)
    fast = greedy(model, ids, new=5)
    ref = stock(model, lambda: greedy(model, ids, new=5))
    assert torch.equal(fast.sequences, ref.sequences)
    for a, b in zip(fast.logits, ref.logits, strict=True):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    on_runtime = method != "dense"
    assert (model.__dict__[RUNTIME_KEY].runtime is not None) == on_runtime
    assert runtime_calls == [True] * 5 * on_runtime


@pytest.mark.parametrize("storage", ["masked", "csr"])
def test_packed_export_loads_its_weights(tmp_path, storage, runtime_calls) -> None:
    """from_pretrained of a packed export (CSR tensor names, header config) builds the exported model,
    not a randomly initialised one: state dict equal to the checkpoint's, generate equal to chtsl's."""
    source = tiny_model_nonzero_b("chtsl", storage=storage)
    source.save_pretrained(tmp_path / "ckpt")
    (tmp_path / "export").mkdir()
    save_packed(pack_model(source), tmp_path / "export" / "model.safetensors")
    (tmp_path / "export" / "config.json").write_text((tmp_path / "ckpt" / "config.json").read_text())
    for kwargs in ({}, {"use_safetensors": True, "revision": "main"}):
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "export", **kwargs)
        assert type(model).__name__ == "ChtslLlamaForCausalLM" and model.use_chtsl_runtime and not model.training
        want = source.state_dict()
        assert model.state_dict().keys() == want.keys()
        for key, value in want.items():
            assert torch.equal(model.state_dict()[key], value), key
    ids = random_ids(1, 5, seed=14)
    assert torch.equal(greedy(model, ids).sequences, load_runtime(tmp_path / "export", "sparse").generate(ids, 8))
    assert runtime_calls
    bf16 = AutoModelForCausalLM.from_pretrained(tmp_path / "export", dtype=torch.bfloat16)
    assert bf16.lm_head.weight.dtype == torch.bfloat16
    bad = pack_model(source)  # validated as `chtsl` loads it: a column out of range is one error line
    bad.linears["model.layers.0.mlp.up_proj"].col_indices[0] = 9999
    save_packed(bad, tmp_path / "export" / "model.safetensors")
    with pytest.raises(ChtslError, match="up_proj.col_indices out of range"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "export")


@pytest.mark.parametrize("storage", ["masked", "csr"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.int8])
def test_compressed_packed_export_loads_its_weights(tmp_path, storage, dtype) -> None:
    """from_pretrained of a bf16 or int8 export with 8-bit column deltas (format 2) holds the weights
    `unpack_model` reads from it (dequantized, deltas decoded; a csr layer its number of links)."""
    from chtsl_infer.formats.packed import unpack_model

    source = tiny_model_nonzero_b("chtsl", storage=storage)
    source.save_pretrained(tmp_path / "ckpt")
    (tmp_path / "export").mkdir()
    packed = pack_model(source, dtype)
    assert packed.index == "delta8"
    save_packed(packed, tmp_path / "export" / "model.safetensors")
    (tmp_path / "export" / "config.json").write_text((tmp_path / "ckpt" / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "export", dtype=torch.float32)
    want = unpack_model(packed, torch.float32).state_dict()
    assert model.state_dict().keys() == want.keys()
    for key, value in want.items():
        assert torch.equal(model.state_dict()[key], value), key


def test_forward_loop_with_the_returned_cache(model, runtime_calls) -> None:
    """A user's own loop: model(ids) then model(next, cache=out.cache, ...) as with transformers' cache,
    logits (all positions, logits_to_keep, return_dict=False) within 1e-4 of the stock forward."""
    ids = random_ids(2, 9, seed=4)
    with torch.no_grad():
        fast, ref = model(ids), stock(model, lambda: model(ids))
        torch.testing.assert_close(fast.logits, ref.logits, atol=ATOL, rtol=0)
        cache, ref_cache = fast.cache, ref.cache
        assert isinstance(cache, hf.ChtslCache)
        seen = ids
        for step in range(6):  # one token, then a 3-token chunk after the cache, then tokens again
            nxt = random_ids(2, 3 if step == 2 else 1, seed=10 + step)
            seen = torch.cat([seen, nxt], 1)
            mask = torch.ones_like(seen)
            out = model(nxt, cache=cache, attention_mask=mask, logits_to_keep=2, return_dict=False)
            want = stock(model, lambda nxt=nxt, mask=mask: model(nxt, cache=ref_cache, attention_mask=mask,
                                                               logits_to_keep=2, return_dict=False))
            assert isinstance(out, tuple) and out[1] is cache
            torch.testing.assert_close(out[0], want[0], atol=ATOL, rtol=0)
        assert cache.get_seq_length() == ref_cache.get_seq_length() == seen.shape[1]
    assert runtime_calls[0] is True and len(runtime_calls) == 7
    assert cache.capacity >= seen.shape[1]  # grown (doubling) from the prefill's 9 positions


def test_inference_mode_and_no_grad_mixed(model, runtime_calls) -> None:
    """One cache continued across `torch.inference_mode()` and `torch.no_grad()` calls (the kept buffers
    are written in place in both), logits as the stock forward's."""
    ids = random_ids(1, 5, seed=15)
    with torch.inference_mode():
        out = model(ids)
    with torch.no_grad():
        ref = stock(model, lambda: model(ids))
        torch.testing.assert_close(out.logits, ref.logits, atol=ATOL, rtol=0)
        # 5 tokens: torch writes the cache and the reused gate/up buffer in place (1 token: the C kernels)
        for step, (mode, n) in enumerate(((torch.no_grad, 5), (torch.inference_mode, 1), (torch.no_grad, 1))):
            nxt = random_ids(1, n, seed=20 + step)
            with mode():
                got = model(nxt, cache=out.cache).logits
            want = stock(model, lambda nxt=nxt: model(nxt, cache=ref.cache).logits)
            torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    assert runtime_calls == [True] * 4


def test_loglikelihood_of_right_padded_batches(model, runtime_calls) -> None:
    """As lm-eval scores requests: right-padded batches without a mask, log p(continuation | context)."""
    seqs = [random_ids(1, n, seed=n)[0] for n in (12, 7, 3)]
    batch = torch.zeros(len(seqs), 12, dtype=torch.long)
    for i, s in enumerate(seqs):
        batch[i, :len(s)] = s

    def scores() -> list[float]:
        with torch.no_grad():
            logp = torch.log_softmax(model(batch).logits.float(), -1)
        return [float(logp[i, len(s) - 3:len(s) - 1].gather(1, s[-2:, None]).sum()) for i, s in enumerate(seqs)]

    fast = scores()
    assert runtime_calls == [True]
    assert fast == pytest.approx(stock(model, scores), abs=1e-4)
    with torch.no_grad():  # a perplexity script's call: labels, the loss computed from the runtime's logits
        loss = model(batch, labels=batch, use_cache=False).loss
        assert runtime_calls == [True, False]
        torch.testing.assert_close(loss, stock(model, lambda: model(batch, labels=batch).loss), atol=1e-5, rtol=0)


@pytest.mark.slow  # imports lm-eval (seconds)
def test_lm_eval_loglikelihood_same_numbers(model, model_dir, bpe_tokenizer, runtime_calls) -> None:
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=bpe_tokenizer, backend="causal", batch_size=2, max_length=64)
    pairs = [("def f(x):", " return x"), ("The quick brown", " fox"), ("import", " os"), ("a = 1\nb =", " 2")]
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    fast = lm.loglikelihood(requests, disable_tqdm=True)
    assert runtime_calls
    ref = stock(model, lambda: lm.loglikelihood(requests, disable_tqdm=True))
    assert [ll for ll, _ in fast] == pytest.approx([ll for ll, _ in ref], abs=1e-4)
    assert [g for _, g in fast] == [g for _, g in ref]


def test_padded_batch_and_unsupported_options_take_the_stock_path(model, runtime_calls) -> None:
    ids = random_ids(2, 6, seed=5)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding: the runtime attends to every position
    padded = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0,
                            return_dict_in_generate=True)
    want = stock(model, lambda: model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                                               pad_token_id=0))
    assert torch.equal(padded.sequences, want) and isinstance(padded.cache, DynamicCache)
    beams = model.generate(ids, num_beams=2, max_new_tokens=4, do_sample=False, attention_mask=torch.ones_like(ids))
    assert torch.equal(beams, stock(model, lambda: model.generate(ids, num_beams=2, max_new_tokens=4,
                                                                   do_sample=False,
                                                                   attention_mask=torch.ones_like(ids))))
    assert runtime_calls == []
    with torch.no_grad():
        ref = stock(model, lambda: model(ids, use_cache=False).logits)
        embeds = model.model.embed_tokens(ids)
        for kwargs in ({"output_attentions": True}, {"output_hidden_states": True}, {"inputs_embeds": embeds},
                       {"position_ids": torch.arange(1, 7)[None]}, {"cache": DynamicCache(config=model.config)},
                       {"attention_mask": mask}):
            call = {"input_ids": None if "inputs_embeds" in kwargs else ids, "use_cache": False, **kwargs}
            out = model(**call)
            if "position_ids" not in kwargs and "attention_mask" not in kwargs:
                torch.testing.assert_close(out.logits, ref, atol=1e-6, rtol=0)
        assert runtime_calls == []
        model(ids, position_ids=torch.arange(6)[None], use_cache=False)  # positions the runtime counts: fast
        model(ids, cache_position=torch.arange(6), use_cache=False)
        model(ids, cache_position=torch.arange(2, 8), use_cache=False)  # positions it does not count: stock
    assert runtime_calls == [False, False]


def test_training_grad_and_other_dtypes_are_stock(model, runtime_calls) -> None:
    ids = random_ids(1, 5, seed=6)
    model(ids).logits.sum().backward()  # eval mode, grad on: stock, gradients flow
    assert model.lm_head.weight.grad is not None and runtime_calls == []
    with torch.no_grad():
        model(ids)
    assert runtime_calls == [True] and RUNTIME_KEY in model.__dict__
    model.train()  # training: the kept form is freed, the forward is stock even without grad
    assert RUNTIME_KEY not in model.__dict__
    with torch.no_grad():
        model(ids)
    assert runtime_calls == [True]
    model.eval().half()  # fp16: the kernels compute in fp32/bf16 only
    with torch.no_grad():
        model(ids)
    assert runtime_calls == [True] and model.__dict__[RUNTIME_KEY].runtime is None


def test_no_compiled_kernels_means_stock(model, runtime_calls, no_compiled_kernels) -> None:
    """Without the C kernels `auto` picks the dense backend, which would densify S a second time: stock."""
    with torch.no_grad():
        model(random_ids(1, 4))
    assert runtime_calls == [] and model.__dict__[RUNTIME_KEY].runtime is None


def test_runtime_form_follows_the_weights(model) -> None:
    ids = random_ids(1, 7, seed=8)
    layer, mlp0 = model.model.layers[1].mlp.down_proj, model.model.layers[0].mlp
    with torch.no_grad():
        before = model(ids, use_cache=False).logits
        shared = model.__dict__[RUNTIME_KEY].runtime
        assert shared.model.embed_tokens.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
        assert shared.lm_head.weight.data_ptr() == model.lm_head.weight.data_ptr()
        assert shared.model.norm.weight.data_ptr() == model.model.norm.weight.data_ptr()
        model(ids, use_cache=False)
        assert model.__dict__[RUNTIME_KEY].runtime is shared  # unchanged weights: built once
        for change in (lambda: layer.lora_B.mul_(3.0),  # an in-place update (an optimizer step)
                       lambda: layer.weight.add_(0.5 * layer.mask),  # S's values
                       lambda: model.load_state_dict(model.state_dict() | {  # a new support and its values
                           "model.layers.0.mlp.down_proj.mask": ~model.model.layers[0].mlp.down_proj.mask,
                           "model.layers.0.mlp.down_proj.weight": random_like(layer.weight)}),
                       lambda: setattr(mlp0, "up_proj", _scaled_copy(mlp0.up_proj))):  # a replaced module
            change()
            after = model(ids, use_cache=False).logits
            torch.testing.assert_close(after, stock(model, lambda: model(ids, use_cache=False).logits),
                                       atol=ATOL, rtol=0)
            assert not torch.allclose(after, before, atol=1e-3)
            before = after


def random_like(t: torch.Tensor) -> torch.Tensor:
    return torch.randn(t.shape, generator=torch.Generator().manual_seed(0))


def _scaled_copy(layer: torch.nn.Module) -> torch.nn.Module:
    """A replacement module: the layer with its low-rank B tripled."""
    new = copy.deepcopy(layer)
    new.lora_B.mul_(3.0)
    return new


def test_chtsl_cache_on_the_stock_path(model) -> None:
    """The stock forward continues a `ChtslCache` as a `DynamicCache`: update, growth, crop, reorder."""
    ids = random_ids(2, 5, seed=9)
    with torch.no_grad():
        def run(cache):
            out = [model(ids, cache=cache).logits]
            cache.crop(-2)
            out.append(model(ids[:, -2:], cache=cache).logits)
            cache.reorder_cache(torch.tensor([1, 0]))
            out.append(model(ids[:, :1], cache=cache).logits)
            return out, cache.get_seq_length()

        got = stock(model, lambda: run(hf.ChtslCache(model.config.num_hidden_layers, capacity=2)))
        want = stock(model, lambda: run(DynamicCache(config=model.config)))
    assert got[1] == want[1] == 6
    for a, b in zip(got[0], want[0], strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_bf16_matches_chtsl_generate(model_dir) -> None:
    model = AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=True, dtype=torch.bfloat16)
    ids = random_ids(1, 6, seed=11)
    with torch.no_grad():
        got = greedy(model, ids)
    assert isinstance(got.cache, hf.ChtslCache)
    assert torch.equal(got.sequences, load_runtime(model_dir, "sparse", dtype=torch.bfloat16).generate(ids, 8))


def test_sampling_uses_the_runtime_and_model_still_pickles(model, runtime_calls) -> None:
    ids = random_ids(1, 4, seed=12)
    torch.manual_seed(0)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=True, top_k=5)
    assert out.shape == (1, 8) and runtime_calls == [True] * 4
    clone = pickle.loads(pickle.dumps(model))  # the kept form (bound C pointers) is left behind
    assert RUNTIME_KEY in model.__dict__ and RUNTIME_KEY not in clone.__dict__
    copy.deepcopy(model)


@pytest.mark.slow  # a fresh interpreter per import order
@pytest.mark.parametrize("first", ["import chtsl_infer", "import transformers, chtsl_infer",
                                   "from chtsl_infer.model.modeling import ChtslLlamaForCausalLM",
                                   "from chtsl_infer import ChtslLlamaForCausalLM",
                                   # a module that imports the model, itself imported by runtime/hf.py
                                   "from chtsl_infer.formats.packed import pack_model",
                                   "from chtsl_infer.runtime.backends import load_runtime"])
def test_every_import_order_installs_the_runtime(model_dir, first) -> None:
    """However the class is reached, its from_pretrained model computes on the runtime."""
    auto = "ChtslLlamaForCausalLM" not in first
    code = f"""{first}
from {"transformers import AutoModelForCausalLM" if auto else "chtsl_infer import ChtslLlamaForCausalLM"} as M
import torch
from chtsl_infer.runtime import feature_major
calls = []
inner = feature_major.forward
feature_major.forward = lambda *a, **k: calls.append(1) or inner(*a, **k)
model = M.from_pretrained({str(model_dir)!r})
with torch.no_grad():
    model(torch.zeros(1, 3, dtype=torch.long))
print(type(model).runtime_hooks.__name__, len(calls))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["chtsl_infer.runtime.hf", "1"]
