"""llama.cpp beside chtsl: a dense GGUF of a preset's shape against chtsl's sparse decoding, in one run.

    python benchmarks/llamacpp.py --preset llama60m-c4
    python benchmarks/llamacpp.py --preset llama1b-c4 --pad-ffn --chtsl-dtypes fp32,bf16,int8 --json out.json
    python benchmarks/llamacpp.py --preset tiny --types Q8_0 --repeats 1      # a quick check of the set-up

What runs: for each GGUF type (`--types`, default F32, F16, Q8_0, Q4_0) a dense llama model of the
preset's shape with random weights (written once, cached in `--gguf-dir`), timed by llama.cpp:
prefill tokens/s of a `--prompt-len` prompt (128) and decode tokens/s of `--new-tokens` (64) single
tokens after it; then `chtsl bench --mode decode --batch 1` with the same prompt, new tokens,
threads and repetitions (the dense fp32 baseline and the CHTsL model at `--s-total` on the sparse
backend, per `--chtsl-dtypes`). One Rich table and, with `--json`, every number; `÷` is chtsl's sparse
tokens/s (the first dtype) over the row's, so > 1 means chtsl is faster. Medians over `--repeats`.

How llama.cpp times it: with `llama-bench` (preferred: on PATH, or `--llama-bench PATH`) prefill is
`-p 128 -n 0` and decode `-p 0 -n 64 -d 128` (64 tokens after a 128-token context, as chtsl's decode);
tokens are random (no sampling). With llama-cpp-python (importable here, or in the interpreter given as
`--llama-python`) a worker process evaluates the prompt, then feeds the argmax of each step's logits
back for the new tokens, as `chtsl bench` does. Both get `--threads` (default: torch's thread count,
which chtsl uses) and flash attention `--flash-attn` (on: what llama.cpp's `auto` picks on a CPU).

The GGUF: architecture `llama`, the preset's hidden size, FFN width, layers, heads, context (256),
RMSNorm ε and RoPE base; an untied `output.weight` like chtsl's lm_head; a synthetic SentencePiece
vocabulary (`<unk>`, `<s>`, `</s>`, the 256 byte tokens, then `t<i>`). Every 2-D weight is in the
file's type ("pure": llama-quantize would keep `output.weight` at Q6_K for quality; speed is the
question here), norms stay F32. Q8_0/Q4_0 blocks hold 32 values of a row: a row whose width is not a
multiple of 32 (`ffn_down` at llama1b-c4's FFN of 5,461) is stored F16, the fallback llama-quantize
takes, and llama.cpp runs slower paths on it; `--pad-ffn` rounds the FFN width up to a multiple of 32
(5,472) for llama.cpp's fair best — chtsl keeps the preset's width. Files are cached by shape, type and
seed: llama1b-c4 takes ≈ 5.4 GB in F32, 2.7 in F16, 1.4 in Q8_0, 0.75 in Q4_0.

Getting llama.cpp (not a chtsl dependency; keep it out of the project's venv if you like):

    python3 -m venv ~/llamacpp-venv && ~/llamacpp-venv/bin/pip install llama-cpp-python
    python benchmarks/llamacpp.py --llama-python ~/llamacpp-venv/bin/python

builds llama.cpp from the sdist (CPU build with `-march=native`; needs a C++ compiler and cmake).
`llama-bench` builds from the llama.cpp sources that sdist vendors (`vendor/llama.cpp`):

    pip download --no-deps --no-binary :all: llama-cpp-python && tar xzf llama_cpp_python-*.tar.gz
    cmake -S llama_cpp_python-*/vendor/llama.cpp -B llama-build -DCMAKE_BUILD_TYPE=Release \\
        -DBUILD_SHARED_LIBS=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \\
        -DLLAMA_OPENSSL=OFF
    cmake --build llama-build --target llama-bench -j
    python benchmarks/llamacpp.py --llama-bench llama-build/bin/llama-bench

and llama-cpp-python can then load that build's libraries instead of compiling its own:
`CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" pip install llama_cpp_python-*.tar.gz` and
`export LLAMA_CPP_LIB_PATH=$PWD/llama-build/bin` (same sources, so the same llama.cpp either way).

Without llama.cpp the script prints one line on how to get it and exits 0 (2 with `--require`).
Needs the `gguf` package (in chtsl's `dev` extra). Not run by CI: time it on an idle machine
(`cat /proc/loadavg` below 0.3) and name the CPU; docs/performance.md §3 says where it fits.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

GGUF_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0")
BLOCK = 32  # values per Q8_0 / Q4_0 block: the row widths llama.cpp's quantized kernels want
GGUF_VERSION = 1  # of this writer's output: part of the cached file names, bump when it changes
INSTALL_HINT = ("llama.cpp not found: `pip install llama-cpp-python` (here or in a venv passed as --llama-python), or "
                "put llama-bench on PATH / pass --llama-bench (benchmarks/llamacpp.py's docstring says how)")
WORKER_FLAG = "--llama-cpp-python-worker"


@dataclass(frozen=True)
class GgufShape:
    """A dense llama model's shape and constants, as a GGUF's `llama.*` metadata gives them."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int  # FFN width
    num_layers: int
    num_heads: int
    num_kv_heads: int
    context_length: int  # positions
    rms_norm_eps: float
    rope_theta: float

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """(GGUF name, numpy shape) of every tensor, in file order; a 2-D weight is (out, in), so
        its rows are the GGUF's `ne[0]`-wide rows that quantized blocks tile."""
        import gguf

        def name(t: gguf.MODEL_TENSOR, bid: int | None = None) -> str:
            return gguf.TENSOR_NAMES[t].format(bid=bid) + ".weight"

        h, f, kv = self.hidden_size, self.intermediate_size, self.num_kv_heads * self.head_dim
        t = gguf.MODEL_TENSOR
        out = [(name(t.TOKEN_EMBD), (self.vocab_size, h))]
        for i in range(self.num_layers):
            out += [(name(t.ATTN_NORM, i), (h,)), (name(t.ATTN_Q, i), (h, h)), (name(t.ATTN_K, i), (kv, h)),
                    (name(t.ATTN_V, i), (kv, h)), (name(t.ATTN_OUT, i), (h, h)), (name(t.FFN_NORM, i), (h,)),
                    (name(t.FFN_GATE, i), (f, h)), (name(t.FFN_UP, i), (f, h)), (name(t.FFN_DOWN, i), (h, f))]
        return out + [(name(t.OUTPUT_NORM), (h,)), (name(t.OUTPUT), (self.vocab_size, h))]


def preset_shape(preset: str, pad_ffn: bool = False) -> GgufShape:
    """The dense model of `preset` (chtsl_infer.model.presets); `pad_ffn` rounds the FFN width up to
    a multiple of 32. ChtslError for an unknown preset."""
    from chtsl_infer.model.presets import build_config

    c = build_config(preset, method="dense")
    ffn = c.intermediate_size
    return GgufShape(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size,
        intermediate_size=-(-ffn // BLOCK) * BLOCK if pad_ffn else ffn, num_layers=c.num_hidden_layers,
        num_heads=c.num_attention_heads, num_kv_heads=c.num_key_value_heads,
        context_length=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
        rope_theta=float(c.rope_parameters["rope_theta"]))


def tensor_type(file_type: str, shape: tuple[int, ...]):  # -> gguf.GGMLQuantizationType
    """The type a tensor is stored in: F32 for 1-D (norms); the file's type for a 2-D weight, or F16
    where its rows are not whole blocks of that type (llama-quantize's fallback)."""
    import gguf

    q = gguf.GGMLQuantizationType
    if len(shape) == 1:
        return q.F32
    qtype = q[file_type]
    return qtype if shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0] == 0 else q.F16


def _vocabulary(n: int) -> tuple[list[str], list[int]]:
    """A SentencePiece-style vocabulary of `n` tokens: <unk> <s> </s>, the byte tokens llama.cpp's
    SPM tokenizer falls back to (when `n` leaves room), then `t<i>`."""
    import gguf

    tt = gguf.TokenType
    tokens, types = ["<unk>", "<s>", "</s>"], [tt.UNKNOWN, tt.CONTROL, tt.CONTROL]
    if n >= 3 + 256:
        tokens += [f"<0x{b:02X}>" for b in range(256)]
        types += [tt.BYTE] * 256
    tokens += [f"t{i}" for i in range(len(tokens), n)]
    types += [tt.NORMAL] * (n - len(types))
    return tokens[:n], [int(t) for t in types[:n]]


def write_gguf(path: Path, shape: GgufShape, file_type: str,
               values: Callable[[int, str, tuple[int, ...]], Any], name: str = "chtsl-dense") -> dict[str, str]:
    """Writes a llama GGUF of `shape` with every 2-D weight in `file_type` (GGUF_TYPES) to `path`,
    atomically. `values(index, tensor_name, shape)` gives each tensor as a float32 numpy array (it is
    called once per tensor, in file order, so a model larger than memory streams). Returns
    {tensor name: stored type name}."""
    import gguf
    import numpy as np

    from chtsl_infer.utils import atomic_path

    if file_type not in GGUF_TYPES:
        raise ValueError(f"unknown GGUF type {file_type!r}; valid: {', '.join(GGUF_TYPES)}")
    q = gguf.GGMLQuantizationType
    w = gguf.GGUFWriter(None, "llama")
    w.add_name(name)
    w.add_file_type({"F32": gguf.LlamaFileType.ALL_F32, "F16": gguf.LlamaFileType.MOSTLY_F16,
                     "BF16": gguf.LlamaFileType.MOSTLY_BF16, "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                     "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[file_type])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_vocab_size(shape.vocab_size)
    w.add_context_length(shape.context_length)
    w.add_embedding_length(shape.hidden_size)
    w.add_block_count(shape.num_layers)
    w.add_feed_forward_length(shape.intermediate_size)
    w.add_head_count(shape.num_heads)
    w.add_head_count_kv(shape.num_kv_heads)
    w.add_layer_norm_rms_eps(shape.rms_norm_eps)
    w.add_rope_freq_base(shape.rope_theta)
    w.add_rope_dimension_count(shape.head_dim)
    tokens, types = _vocabulary(shape.vocab_size)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    stored: dict[str, str] = {}
    for tname, tshape in shape.tensors():
        qtype = tensor_type(file_type, tshape)
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        nbytes = int(np.prod(tshape[:-1], dtype=np.int64)) * (tshape[-1] // block) * type_size
        # F32/F16 go as numpy dtypes; the block types (BF16 too) as raw bytes of the element shape
        plain = {q.F32: np.float32, q.F16: np.float16}.get(qtype)
        w.add_tensor_info(tname, tshape, np.dtype(plain or np.float32), nbytes, raw_dtype=None if plain else qtype)
        stored[tname] = qtype.name
    path = Path(path)
    with atomic_path(path) as tmp:
        w.write_header_to_file(tmp)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for i, (tname, tshape) in enumerate(shape.tensors()):
            data = np.ascontiguousarray(values(i, tname, tshape), dtype=np.float32)
            if data.shape != tshape:
                raise ValueError(f"values() gave {tname} the shape {data.shape}, expected {tshape}")
            w.write_tensor_data(gguf.quants.quantize(data, q[stored[tname]]))
        w.close()
    return stored


def random_values(seed: int) -> Callable[[int, str, tuple[int, ...]], Any]:
    """Random weights for `write_gguf`: N(0, 0.02²) (the presets' initializer range), norms 1."""
    import numpy as np

    def values(index: int, name: str, shape: tuple[int, ...]):
        if len(shape) == 1:
            return np.ones(shape, dtype=np.float32)
        return np.random.default_rng([seed, index]).standard_normal(shape, dtype=np.float32) * np.float32(0.02)

    return values


def cached_gguf(directory: Path, preset: str, shape: GgufShape, file_type: str, seed: int) -> Path:
    """The GGUF of `shape` in `file_type`, written once into `directory` (named by preset, FFN width,
    type, seed and the writer's version) and reused by later runs."""
    path = directory / f"{preset}-ffn{shape.intermediate_size}-{file_type}-seed{seed}-v{GGUF_VERSION}.gguf"
    if not path.exists():
        directory.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        print(f"writing {path} ...", file=sys.stderr, flush=True)
        write_gguf(path, shape, file_type, random_values(seed), name=f"{preset} dense (random)")
        print(f"  {path.stat().st_size / 2**20:,.0f} MiB in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return path


# --- llama.cpp -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Runner:
    """How llama.cpp is reached: a llama-bench binary, or a Python interpreter with llama_cpp."""

    kind: str  # "llama-bench" | "llama-cpp-python"
    program: str  # the binary, or the interpreter


def find_runner(choice: str, llama_bench: str | None, llama_python: str | None) -> Runner | None:
    """llama-bench (`llama_bench` or on PATH) first, then llama-cpp-python (`llama_python`'s, or this
    interpreter's); `choice` (auto, llama-bench, python) restricts the search. None when absent."""
    if choice in ("auto", "llama-bench"):
        found = shutil.which(llama_bench or "llama-bench")
        if found:
            return Runner("llama-bench", found)
        if llama_bench:
            return None
    if choice in ("auto", "python"):
        if llama_python:
            try:
                ok = subprocess.run([llama_python, "-c", "import llama_cpp"], capture_output=True).returncode == 0
            except OSError:  # no such interpreter
                ok = False
            return Runner("llama-cpp-python", llama_python) if ok else None
        if importlib.util.find_spec("llama_cpp") is not None:
            return Runner("llama-cpp-python", sys.executable)
    return None


def run_llamacpp(runner: Runner, model: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """Prefill and decode tokens/s of `model` (medians over `settings['repeats']`) by `runner`."""
    if runner.kind == "llama-bench":
        return _run_llama_bench(runner.program, model, settings)
    spec = {"model": str(model), **settings}
    out = _run([runner.program, str(Path(__file__).resolve()), WORKER_FLAG, json.dumps(spec)], settings["timeout"])
    return json.loads(out.strip().splitlines()[-1])


def _run(cmd: list[str], timeout: float, env: dict[str, str] | None = None) -> str:
    """stdout of `cmd`; ChtslError with the last stderr line when it fails or outlasts `timeout`."""
    from chtsl_infer.errors import ChtslError

    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise ChtslError(f"{Path(cmd[0]).name} timed out after {timeout:.0f} s") from None
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        raise ChtslError(f"{' '.join(cmd[:3])} ... failed: {lines[-1] if lines else f'exit {proc.returncode}'}")
    return proc.stdout


def _run_llama_bench(binary: str, model: Path, s: dict[str, Any]) -> dict[str, Any]:
    """Prefill: `-p P -n 0`; decode: `-p 0 -n N -d P` (N tokens after a P-token context)."""
    common = [binary, "-m", str(model), "-t", str(s["threads"]), "-r", str(s["repeats"]),
              "-fa", s["flash_attn"], "-o", "json"]
    (pp,) = json.loads(_run([*common, "-p", str(s["prompt_len"]), "-n", "0"], s["timeout"]))
    (tg,) = json.loads(_run([*common, "-p", "0", "-n", str(s["new_tokens"]), "-d", str(s["prompt_len"])],
                            s["timeout"]))
    return {"prefill_tokens_per_s": statistics.median(pp["samples_ts"]),
            "tokens_per_s": statistics.median(tg["samples_ts"]),
            "prefill_samples_ts": pp["samples_ts"], "decode_samples_ts": tg["samples_ts"],
            "llamacpp": {k: tg.get(k) for k in ("build_commit", "build_number", "cpu_info", "backends", "n_threads",
                                                "flash_attn", "n_batch", "n_ubatch", "type_k", "type_v")}}


def _python_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Times `spec['model']` with llama-cpp-python in this process (needs only llama_cpp and numpy):
    per repetition a fresh context state, the prompt in one batch, then greedy single-token steps."""
    import llama_cpp
    import numpy as np

    prompt, new = spec["prompt_len"], spec["new_tokens"]
    llm = llama_cpp.Llama(model_path=spec["model"], n_ctx=prompt + new, n_batch=max(prompt, 1), n_ubatch=max(prompt, 1),
                          n_threads=spec["threads"], n_threads_batch=spec["threads"],
                          flash_attn=spec["flash_attn"] == "on", verbose=False)
    n_vocab = llm.n_vocab()
    ids = np.random.default_rng(0).integers(3, n_vocab, prompt).tolist()

    def generate(n: int) -> tuple[float, float]:
        llm.reset()
        start = time.perf_counter()
        llm.eval(ids)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(n):
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))
            llm.eval([int(logits.argmax())])
        return prefill, time.perf_counter() - start

    generate(min(new, 4))  # warm-up
    runs = [generate(new) for _ in range(spec["repeats"])]
    return {"prefill_tokens_per_s": prompt / statistics.median(r[0] for r in runs),
            "tokens_per_s": new / statistics.median(r[1] for r in runs),
            "prefill_samples_ts": [prompt / r[0] for r in runs], "decode_samples_ts": [new / r[1] for r in runs],
            "llamacpp": {"llama_cpp_python": llama_cpp.__version__,
                         "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip(),
                         "n_threads": spec["threads"], "flash_attn": spec["flash_attn"]}}


# --- chtsl ---------------------------------------------------------------------------------------

def run_chtsl(preset: str, dtype: str, settings: dict[str, Any]) -> list[dict[str, Any]]:
    """`chtsl bench --mode decode --batch 1` on the CPU at `dtype` (int8a8: int8 with int8 activations)
    with `settings`' prompt, new tokens, repetitions and threads (OMP_NUM_THREADS: torch's and the
    kernels' pool); its results (the dense baseline, then the CHTsL model on the sparse backend)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        cmd = [sys.executable, "-m", "chtsl_infer.cli", "bench", "--mode", "decode", "--preset", preset,
               "--s-total", str(settings["s_total"]), "--batch", "1", "--prompt-len", str(settings["prompt_len"]),
               "--new-tokens", str(settings["new_tokens"]), "--steps", str(settings["repeats"]),
               "--backend", "sparse", "--device", "cpu", "--dtype", "int8" if dtype == "int8a8" else dtype,
               *(["--int8-activations"] if dtype == "int8a8" else []), "--json", str(out),
               "--timeout", str(settings["timeout"])]
        env = {**os.environ, "OMP_NUM_THREADS": str(settings["threads"])}
        _run(cmd, settings["timeout"] * 3, env=env)
        return json.loads(out.read_text())["results"]


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else the platform's processor string."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# --- the command ---------------------------------------------------------------------------------

def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="llama60m-c4")
    ap.add_argument("--s-total", type=float, default=0.9, help="chtsl model's total sparsity")
    ap.add_argument("--types", default="F32,F16,Q8_0,Q4_0", help=f"GGUF types, of {', '.join(GGUF_TYPES)}")
    ap.add_argument("--pad-ffn", action="store_true", help="round llama.cpp's FFN width up to a multiple of 32")
    ap.add_argument("--chtsl-dtypes", default="fp32",
                    help="chtsl bench dtypes (fp32, bf16, int8, int8a8: int8 with --int8-activations); the first "
                         "is the ÷ ref")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None, help="both engines' threads [default: torch's]")
    ap.add_argument("--repeats", type=int, default=3, help="timed generations per configuration (medians)")
    ap.add_argument("--flash-attn", choices=("on", "off"), default="on", help="llama.cpp's flash attention")
    ap.add_argument("--runner", choices=("auto", "llama-bench", "python"), default="auto")
    ap.add_argument("--llama-bench", default=None, help="llama-bench binary [default: on PATH]")
    ap.add_argument("--llama-python", default=None, help="a Python with llama-cpp-python [default: this one]")
    ap.add_argument("--require", action="store_true", help="exit 2 (not 0) when llama.cpp is absent")
    ap.add_argument("--gguf-dir", type=Path, default=None, help="GGUF cache [default: $CHTSL_CACHE_DIR/gguf]")
    ap.add_argument("--seed", type=int, default=0, help="of the GGUFs' random weights")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per llama.cpp or chtsl configuration")
    ap.add_argument("--json", type=Path, default=None, help="also write every number here")
    ap.add_argument("--force", action="store_true", help="let --json replace an existing file")
    return ap.parse_args(argv)


def _check(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """The GGUF types and chtsl dtypes asked for; ChtslError on bad input."""
    from chtsl_infer.console import check_output_file
    from chtsl_infer.errors import ChtslError
    from chtsl_infer.utils import parse_dtype

    types = [t.strip().upper() for t in args.types.split(",") if t.strip()]
    for t in types:
        if t not in GGUF_TYPES:
            raise ChtslError(f"unknown GGUF type {t!r} in --types; valid: {', '.join(GGUF_TYPES)}")
    dtypes = [d.strip() if d.strip() == "int8a8" else parse_dtype(d.strip(), ("fp32", "bf16", "int8"), "--chtsl-dtypes")
              for d in args.chtsl_dtypes.split(",") if d.strip()]
    if not types or not dtypes:
        raise ChtslError("--types and --chtsl-dtypes each need at least one entry")
    for flag, value in (("--prompt-len", args.prompt_len), ("--new-tokens", args.new_tokens),
                        ("--repeats", args.repeats), ("--timeout", args.timeout), ("--threads", args.threads or 1)):
        if not value > 0:
            raise ChtslError(f"{flag} must be positive, got {value}")
    check_output_file(args.json, args.force)
    return types, dtypes


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    runner = find_runner(args.runner, args.llama_bench, args.llama_python)
    if runner is None:
        print(INSTALL_HINT)
        return 2 if args.require else 0
    from chtsl_infer.errors import ChtslError

    try:
        return _compare(args, runner)
    except ChtslError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _compare(args: argparse.Namespace, runner: Runner) -> int:
    from chtsl_infer.console import console, write_json
    from chtsl_infer.errors import ChtslError
    from chtsl_infer.utils import cache_dir

    types, dtypes = _check(args)
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ChtslError("writing GGUF files needs the gguf package: pip install gguf") from None
    shape = preset_shape(args.preset, args.pad_ffn)
    if args.prompt_len + args.new_tokens > shape.context_length:
        raise ChtslError(f"--prompt-len {args.prompt_len} + --new-tokens {args.new_tokens} exceeds the model's "
                         f"{shape.context_length} positions")
    if args.threads is None:
        import torch

        args.threads = torch.get_num_threads()
    settings = {"preset": args.preset, "s_total": args.s_total, "prompt_len": args.prompt_len,
                "new_tokens": args.new_tokens, "threads": args.threads, "repeats": args.repeats,
                "flash_attn": args.flash_attn, "timeout": args.timeout, "runner": asdict(runner),
                "cpu": cpu_name(), "gguf_shape": asdict(shape), "pad_ffn": args.pad_ffn,
                "chtsl_ffn": preset_shape(args.preset).intermediate_size}
    directory = args.gguf_dir or cache_dir() / "gguf"
    rows: list[dict[str, Any]] = []
    for t in types:
        path = cached_gguf(directory, args.preset, shape, t, args.seed)
        console.print(f"llama.cpp {t} ({runner.kind}) ...", style="dim")
        rows.append({"engine": "llama.cpp", "weights": t, "ffn": shape.intermediate_size, "file": str(path),
                     "model_bytes": path.stat().st_size, **run_llamacpp(runner, path, settings)})
    for dtype in dtypes:
        console.print(f"chtsl bench --mode decode --dtype {dtype} ...", style="dim")
        for r in run_chtsl(args.preset, dtype, settings):
            rows.append({"engine": "chtsl", "weights": f"{'dense' if r['method'] == 'dense' else 'sparse'} {dtype}",
                         "ffn": settings["chtsl_ffn"], "model_bytes": r["model_bytes"],
                         "prefill_tokens_per_s": r["prefill_tokens_per_s"], "tokens_per_s": r["tokens_per_s"],
                         "chtsl_bench": r})
    ref = next(r for r in rows if r["engine"] == "chtsl" and r["weights"].startswith("sparse"))
    for r in rows:
        r["sparse_over_prefill"] = ref["prefill_tokens_per_s"] / r["prefill_tokens_per_s"]
        r["sparse_over_decode"] = ref["tokens_per_s"] / r["tokens_per_s"]
    _print_table(rows, settings, ref["weights"])
    if args.json:
        write_json({"settings": settings, "results": rows}, args.json, args.force)
    return 0


def _print_table(rows: list[dict[str, Any]], s: dict[str, Any], ref: str) -> None:
    from rich import box
    from rich.table import Table

    from chtsl_infer.console import console

    table = Table(title=f"llama.cpp vs chtsl: {s['preset']}, batch 1, prompt {s['prompt_len']} + "
                        f"{s['new_tokens']} new, {s['threads']} threads, median of {s['repeats']}",
                  caption=f"÷: chtsl {ref} tok/s over the row's (> 1: chtsl faster) · chtsl s_total {s['s_total']} · "
                          f"MiB: GGUF file, chtsl's resident model · llama.cpp via {s['runner']['kind']} · {s['cpu']}",
                  box=box.SIMPLE_HEAD, show_edge=False, collapse_padding=True)  # fits 80 columns untruncated
    for col in ("model", "FFN", "MiB", "prefill tok/s", "÷", "decode tok/s", "÷"):
        table.add_column(col, justify="left" if col == "model" else "right", no_wrap=True,
                         min_width=4 if col == "÷" else None)
    for r in rows:
        table.add_row(f"{r['engine']} {r['weights']}", str(r["ffn"]), f"{r['model_bytes'] / 2**20:,.1f}",
                      f"{r['prefill_tokens_per_s']:,.1f}", f"{r['sparse_over_prefill']:.2f}",
                      f"{r['tokens_per_s']:,.1f}", f"{r['sparse_over_decode']:.2f}")
    console.print(table)

if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == WORKER_FLAG:  # in the llama-cpp-python interpreter: no chtsl here
        print(json.dumps(_python_worker(json.loads(sys.argv[2]))))
        sys.exit(0)
    sys.exit(main())
