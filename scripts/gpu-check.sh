#!/usr/bin/env bash
# The GPU check: does every CUDA path of chtsl work, and what are the numbers? One run on a machine
# with one NVIDIA GPU, under 8 minutes, every result in ${OUT:-gpu-check-out}/:
#   summary.json     one record per step (status ok|failed|timeout|skipped, seconds, limit, last error
#                    line, key numbers: tokens/s, ratios to dense, peak memory, accuracies), the paper's
#                    A100 numbers next to ours, and the environment (GPU, torch, CUDA, onnxruntime)
#   logs/STEP.log    full output of each step;  json/   the JSON each command wrote (--json)
#
#   OUT=out bash scripts/gpu-check.sh              # run everything (from the repository root)
#   bash scripts/gpu-check.sh --dry-run            # print the steps and their commands, run nothing
#   bash scripts/gpu-check.sh --only bench60,eval_rte   # rerun some steps (those they need are not rerun)
#   bash scripts/gpu-check.sh --rehearse           # the same steps on CPU at toy sizes: tests this script
#
# Environment: OUT, GPU_CHECK_DATA_DIR (as --data-dir), GPU_CHECK_WORK (work directory, kept),
# GPU_CHECK_LIMIT_SCALE (multiplies every step's limit; rehearsal default 6: a loaded CPU), CHTSL_PYTHON.
# Options: --data-dir DIR (GLUE files for eval_rte, DIR/glue/rte/validation.jsonl; default
# $GPU_CHECK_DATA_DIR, else tests/fixtures: 10 RTE examples), --budget SECONDS (default 450, from the
# script's start: a step that no longer fits is skipped and says so, so the run ends before 8 minutes), --keep (keep the work directory
# with checkpoints and exports; default: deleted), --setup (no Python with a CUDA torch and chtsl's
# dependencies found: create .venv-gpu from PyPI, default torch wheel = CUDA build; needs network).
#
# Python: the first of $CHTSL_PYTHON, ./.venv/bin/python, python3 whose torch sees CUDA and imports
# chtsl's dependencies; nothing is downloaded (the GPU machine may be offline; HF_HUB_OFFLINE=1) except
# with --setup. chtsl runs from this checkout (PYTHONPATH, `python -m chtsl_infer.cli`): no install needed.
# Without an NVIDIA GPU: one line on stderr, exit 2, nothing done. Exit status: 0 when every step that
# ran passed, 1 otherwise. Each step runs under `timeout` (limit per step, then SIGKILL after 10 s).
#
# Adding a step is one `step NAME LIMIT_S 'COMMAND'` line below (COMMAND runs in `bash -c`, with
# `chtsl` and `py` on PATH and $W work dir, $J json dir, $DEV device, $BF16 the bf16 dtype name);
# exit status 77 marks a step skipped (e.g. an optional package is missing). Key numbers are read
# from $J/NAME.json by the summary (bench/train/export/eval JSON shapes are recognised).
# shellcheck disable=SC2016,SC2054,SC1003,SC2329  # single-quoted step commands, commas in values, trap handlers
set -u -o pipefail

usage() { sed -n '2,/^# shellcheck/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; }

DRY=0 REHEARSE=0 KEEP=0 SETUP=0 ONLY="" BUDGET=""
DATA_DIR=${GPU_CHECK_DATA_DIR:-}
while (($#)); do
  case $1 in
    --dry-run) DRY=1 ;;
    --rehearse) REHEARSE=1 ;;
    --keep) KEEP=1 ;;
    --setup) SETUP=1 ;;
    --only) ONLY=${2:?--only needs step names}; shift ;;
    --budget) BUDGET=${2:?--budget needs seconds}; shift ;;
    --data-dir) DATA_DIR=${2:?--data-dir needs a directory}; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
[[ -z $BUDGET || $BUDGET =~ ^[0-9]+$ ]] || { echo "error: --budget must be whole seconds, got $BUDGET" >&2; exit 2; }
[[ ${GPU_CHECK_LIMIT_SCALE:-1} =~ ^[1-9][0-9]*$ ]] || { echo "error: GPU_CHECK_LIMIT_SCALE must be a whole number >= 1" >&2; exit 2; }

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 2
OUT=${OUT:-gpu-check-out}
DATA_DIR=${DATA_DIR:-$REPO/tests/fixtures}

# ----------------------------------------------------------------------------- sizes per mode
# GPU: the issue's protocol. Rehearsal: the same commands at toy sizes on CPU (a few minutes).
if ((REHEARSE)); then
  DEV=cpu BENCH_DTYPE=float32 LIMIT_SCALE=${GPU_CHECK_LIMIT_SCALE:-6}
  TINY=(--steps 6 --stop-at 3 --num-layers 2 --seq-len 32 --batch 4 --eval-every 6 --save-every 3
        --update-interval 2 --restart-warmup 1 --ocr-every 2 --eval-tokens 2000)
  TINY_STEPS=6
  M60=(--steps 3 --batch 2 --micro-batch 2 --seq-len 32 --num-layers 1 --update-interval 2
       --restart-warmup 1 --eval-tokens 1000)
  M60_STEPS=3
  PAPER=(--batch 2 --seq 16 --steps 2 --warmup 1)
  ONNX_BENCH=(--batch 2 --seq 16 --steps 2 --warmup 1)
  KERNELS=(--shapes llama60m --tokens 1,16 --repeats 2)
  TOPOLOGY=(--presets llama60m --blocks 1 --tokens 64 --repeats 1)
  RTE_LIMIT=(--limit 4)
  CSR_TRAIN=(--steps 4 --num-layers 2 --seq-len 32 --batch 4 --eval-every 4 --save-every 4 --update-interval 2
             --restart-warmup 1 --ocr-every 2 --eval-tokens 2000)
  CSR_STEPS=4
  DECODE=(--batch 1 --prompt-len 8 --new-tokens 4)
else
  DEV=cuda BENCH_DTYPE=bfloat16 LIMIT_SCALE=${GPU_CHECK_LIMIT_SCALE:-1}
  # tiny preset as is (hidden 128, 4 blocks, batch 16 × 128 tokens), 100 steps, stopped at 50 and resumed
  TINY=(--steps 100 --stop-at 50 --save-every 50)
  TINY_STEPS=100
  # llama60m-c4 recipe (global batch 512 × 256 tokens, micro-batch 64) on the offline corpus; the
  # paper's t5-base tokenizer needs the hub, so a BPE is trained on the corpus; topology updates
  # every 10 steps so updates run at this scale too; a short validation at the end
  M60=(--steps 30 --update-interval 10 --restart-warmup 2 --eval-tokens 200000)
  M60_STEPS=30
  PAPER=(--batch 128 --seq 256 --steps 20 --warmup 5)  # the paper's Table 12 shape, 20 timed steps
  ONNX_BENCH=(--batch 128 --seq 256 --steps 10 --warmup 2)  # logits come back to the host: fewer steps
  KERNELS=()
  TOPOLOGY=(--repeats 2)
  RTE_LIMIT=()
  CSR_TRAIN=(--steps 60)  # tiny preset, S trained as CSR values (issue 11), 3 topology updates
  CSR_STEPS=60
  DECODE=(--batch 1 --prompt-len 128 --new-tokens 64)  # generation with a KV cache (issue 14)
fi
BF16=bf16  # `chtsl train --dtype` spelling of bf16 autocast
BUDGET=${BUDGET:-$((450 * LIMIT_SCALE))}

# ----------------------------------------------------------------------------- the steps
# NAME LIMIT_S COMMAND. Later steps use what earlier ones made ($W/tiny, $W/m60, $W/m60/export);
# if that is missing they fail fast with its error.
define_steps() {
  step env 60 'py "$W/py/env.py" "$J/env.json"'
  step pytest_cuda 180 'cd "$REPO" && py -m pytest -m cuda -o addopts= -q -rfEs -p no:cacheprovider \
      --junitxml "$J/pytest_cuda.xml" "$REPO/tests"'
  step tiny_train 180 'chtsl train --preset tiny --device "$DEV" --dtype "$BF16" --no-progress --out "$W/tiny" \
      "${TINY[@]}" --json "$J/tiny_train_part1.json" \
    && chtsl train --resume "$W/tiny" --no-progress --json "$J/tiny_train.json" \
    && py "$W/py/check_run.py" "$W/tiny" "$TINY_STEPS" "$J/tiny_train.run.json"'
  step eval_rte 150 'for d in cpu "$DEV"; do chtsl eval "$W/tiny" --tasks rte --data-dir "$DATA_DIR" --device "$d" \
      --dtype fp32 "${RTE_LIMIT[@]}" --json "$J/eval_rte_$d.json" --log-samples || exit 1; done \
    && py "$W/py/compare_eval.py" "$J/eval_rte_cpu.json" "$J/eval_rte_$DEV.json" "$J/eval_rte.json"'
  step bench60 150 'chtsl bench --preset llama60m-c4 --backend dense,sparse --device "$DEV" --dtype "$BENCH_DTYPE" \
      "${PAPER[@]}" --json "$J/bench60.json"'
  step bench130 180 'chtsl bench --preset llama130m-c4 --backend dense,sparse --device "$DEV" --dtype "$BENCH_DTYPE" \
      "${PAPER[@]}" --json "$J/bench130.json"'
  step m60_train 180 'chtsl train --preset llama60m-c4 --data builtin --tokenizer bpe --device "$DEV" --dtype "$BF16" \
      --no-progress --out "$W/m60" "${M60[@]}" --json "$J/m60_train.json" \
    && py "$W/py/check_run.py" "$W/m60" "$M60_STEPS" "$J/m60_train.run.json"'
  step export 180 'chtsl export "$W/m60" --format all --verify --verify-device "$DEV" --out "$W/m60/export" --force \
      --json "$J/export.json"'
  step bench_onnx 150 'py "$W/py/ort_cuda.py" "$DEV" || exit 77; chtsl bench "$W/m60/export" \
      --backend onnx,sparse,dense --device "$DEV" --dtype float32 "${ONNX_BENCH[@]}" --json "$J/bench_onnx.json"'
  step kernels 120 'py "$REPO/benchmarks/kernels.py" --device "$DEV" "${KERNELS[@]}" \
    && if [[ $DEV == cuda ]]; then py "$REPO/benchmarks/kernels.py" --device cuda --dtype bfloat16; fi'
  step topology 150 'py "$REPO/benchmarks/topology.py" --device "$DEV" "${TOPOLOGY[@]}"'
  # Features of other issues: skipped (77) until the checkout's CLI has them.
  step csr_train 150 'chtsl train --help | grep -q -- --sparse-storage \
      || { echo "skipped: no chtsl train --sparse-storage here"; exit 77; }; chtsl train --preset tiny --device "$DEV" --dtype "$BF16" \
      --sparse-storage csr --no-progress --out "$W/tiny_csr" "${CSR_TRAIN[@]}" --json "$J/csr_train.json" \
    && py "$W/py/check_run.py" "$W/tiny_csr" "$CSR_STEPS" "$J/csr_train.run.json"'
  step bench_decode 150 'chtsl bench --help | grep -q -- --new-tokens \
      || { echo "skipped: no chtsl bench --mode decode here"; exit 77; }; chtsl bench --mode decode --preset llama60m-c4 \
      --backend dense,sparse --device "$DEV" --dtype "$BENCH_DTYPE" "${DECODE[@]}" --json "$J/bench_decode.json"'
}

# ----------------------------------------------------------------------------- machinery
STEP_NAMES=()
want() { [[ -z $ONLY ]] || [[ ",$ONLY," == *",$1,"* ]]; }

step() {  # step NAME LIMIT_S COMMAND
  local name=$1 limit=$2 cmd=$3
  STEP_NAMES+=("$name")
  want "$name" || return 0
  if ((DRY)); then
    printf '%-12s limit %4ss  %s\n' "$name" "$((limit * LIMIT_SCALE))" "$(printf '%s' "$cmd" | tr -s ' \n\\' ' ')"
    return 0
  fi
  # The budget counts from the script's start ($SECONDS), preconditions included. A step whose
  # remaining time would be under a third of its limit is skipped rather than started to time out.
  local left=$((BUDGET - SECONDS))
  limit=$((limit * LIMIT_SCALE))
  if ((left < 20 || 3 * left < limit)); then
    record "$name" skipped 0 0 "$limit" "skipped: ${left}s of the ${BUDGET}s budget left (--budget, or --only $name)"
    return 0
  fi
  ((limit > left)) && limit=$left
  local log="$OUT/logs/$name.log" start=$SECONDS rc
  echo "[gpu-check $(date -u +%H:%M:%S)] $name (limit ${limit}s)" >&2
  # In the background so a TERM/INT to this script is handled at once (see on_signal); `timeout`
  # puts the step in its own process group, which on_signal and the limit end as a whole.
  timeout --kill-after=10 "$limit" bash -c "set -u -o pipefail; $cmd" >"$log" 2>&1 </dev/null &
  STEP_PID=$!
  wait "$STEP_PID"
  rc=$?
  STEP_PID=""
  local secs=$((SECONDS - start)) status=failed
  case $rc in
    0) status=ok ;;
    77) status=skipped ;;
    124|137) status=timeout ;;
  esac
  local last=""
  if [[ $status != ok ]]; then
    last=$(grep -aE '(^error:|Error|FAILED|Traceback|Exception|assert|not available|skipped:)' "$log" | tail -n 1)
    [[ -z $last ]] && last=$(grep -av '^[[:space:]]*$' "$log" | tail -n 1)
    [[ $status == timeout ]] && last="timed out after ${limit}s; last output: $last"
  fi
  record "$name" "$status" "$rc" "$secs" "$limit" "$last"
  echo "[gpu-check] $name: $status (${secs}s)${last:+ — ${last:0:200}}" >&2
}

record() {  # NAME STATUS RC SECONDS LIMIT LAST_LINE -> one TSV line, then the summary is rewritten
  local last=${6//$'\t'/ }
  last=${last//$'\r'/}
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" "${last:0:400}" >>"$OUT/steps.tsv"
  write_summary
}

json_escape() {  # a bash string as a JSON string literal (no Python needed)
  local s=$1
  s=${s//\\/\\\\}
  s=${s//\"/\\\"}
  s=$(printf '%s' "$s" | tr -d '\000-\037')
  printf '"%s"' "$s"
}

write_summary() {  # summary.json: the Python summary (key numbers) or, if it fails, the step records alone
  if [[ -n ${PY:-} ]] && "$PY" "$W/py/summary.py" "$OUT" "$MODE" "$BUDGET" 2>>"$OUT/logs/summary.log"; then
    return 0
  fi
  local tmp="$OUT/.summary.json.tmp" first=1 name status rc secs limit last
  {
    printf '{"mode": %s, "note": "key numbers unavailable (see logs/summary.log)", "steps": [' "$(json_escape "$MODE")"
    while IFS=$'\t' read -r name status rc secs limit last; do
      ((first)) || printf ', '
      first=0
      printf '{"name": %s, "status": %s, "exit_code": %s, "seconds": %s, "limit_s": %s, "last_error": %s}' \
        "$(json_escape "$name")" "$(json_escape "$status")" "$rc" "$secs" "$limit" "$(json_escape "$last")"
    done <"$OUT/steps.tsv"
    printf ']}\n'
  } >"$tmp" && mv -f "$tmp" "$OUT/summary.json"
}

python_ok() {  # python_ok PY NEED_CUDA ALL -> 0 when PY's torch (sees CUDA if asked) and chtsl's core
  # dependencies import; ALL=1 also wants the optional ones of some steps (lm-eval, ONNX, datasets)
  [[ -x $1 ]] || return 1
  timeout 120 "$1" - "$2" "$3" <<'EOF' >/dev/null 2>&1
import importlib
import sys

core = ["torch", "transformers", "safetensors", "tokenizers", "typer", "rich", "numpy"]
optional = ["datasets", "lm_eval", "onnx", "onnxscript", "onnxruntime"]
for name in core + (optional if sys.argv[2] == "1" else []):
    importlib.import_module(name)
import torch  # noqa: E402

sys.exit(0 if sys.argv[1] == "0" or torch.cuda.is_available() else 3)
EOF
}

pick_python() {  # sets PY: the first candidate with every dependency, else the first with the core ones
  local need=$1 c all candidates=("${CHTSL_PYTHON:-}" "$REPO/.venv/bin/python" "$REPO/.venv-gpu/bin/python"
                                  "$(command -v python3 || true)")
  for all in 1 0; do
    for c in "${candidates[@]}"; do
      [[ -n $c ]] || continue
      if python_ok "$c" "$need" "$all"; then PY=$c; return 0; fi
    done
  done
  PY=""
  TRIED=$(printf '%s ' "${candidates[@]}")
  return 1
}

# ----------------------------------------------------------------------------- dry run
MODE=$([[ $REHEARSE == 1 ]] && echo "rehearsal (cpu, toy sizes)" || echo "gpu")
if ((DRY)); then
  echo "gpu-check steps ($MODE; budget ${BUDGET}s; OUT=$OUT; eval data $DATA_DIR):"
  printf '  %s\n' "DEV=$DEV BENCH_DTYPE=$BENCH_DTYPE BF16=$BF16" "TINY=${TINY[*]}" "M60=${M60[*]}" \
    "PAPER=${PAPER[*]}" "ONNX_BENCH=${ONNX_BENCH[*]}" "KERNELS=${KERNELS[*]:-}" "TOPOLOGY=${TOPOLOGY[*]}" \
    "RTE_LIMIT=${RTE_LIMIT[*]:-}" "CSR_TRAIN=${CSR_TRAIN[*]}" "DECODE=${DECODE[*]}"
  define_steps
  [[ -z $ONLY ]] || for n in ${ONLY//,/ }; do
    [[ " ${STEP_NAMES[*]} " == *" $n "* ]] || { echo "error: unknown step $n; steps: ${STEP_NAMES[*]}" >&2; exit 2; }
  done
  exit 0
fi

# ----------------------------------------------------------------------------- preconditions
if ((!REHEARSE)); then
  if ! { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; } && [[ ! -e /dev/nvidia0 ]]; then
    echo "error: no NVIDIA GPU on this machine (nvidia-smi finds none, no /dev/nvidia0); the GPU check needs one (--dry-run lists its steps)" >&2
    exit 2
  fi
fi
[[ -f $DATA_DIR/glue/rte/validation.jsonl ]] || {
  echo "error: no RTE data at $DATA_DIR/glue/rte/validation.jsonl (--data-dir DIR or GPU_CHECK_DATA_DIR)" >&2
  exit 2
}
DATA_DIR=$(cd "$DATA_DIR" && pwd)
NEED_CUDA=$((1 - REHEARSE))
if ! pick_python "$NEED_CUDA"; then
  if ((SETUP)); then
    echo "[gpu-check] no usable Python (tried: $TRIED); creating .venv-gpu from PyPI" >&2
    timeout 900 bash -c 'set -e; python3 -m venv .venv-gpu; .venv-gpu/bin/python -m pip install --quiet --upgrade pip
      .venv-gpu/bin/python -m pip install --quiet torch; .venv-gpu/bin/python -m pip install --quiet -e ".[dev]"' >&2
    pick_python "$NEED_CUDA"
  fi
  if [[ -z $PY ]]; then
    echo "error: no Python with a CUDA-enabled torch and chtsl's dependencies (tried: $TRIED); set CHTSL_PYTHON, carry .venv, or pass --setup (needs PyPI)" >&2
    exit 2
  fi
fi

# ----------------------------------------------------------------------------- workspace
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
J=$OUT/json
mkdir -p "$OUT/logs" "$J"
rm -f "$OUT/steps.tsv" "$OUT/summary.json"
: >"$OUT/steps.tsv"
W=${GPU_CHECK_WORK:-$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")}
mkdir -p "$W/bin" "$W/py" "$W/cache"
STEP_PID=""
cleanup() { ((KEEP)) || [[ -n ${GPU_CHECK_WORK:-} ]] || rm -rf "$W"; }
on_signal() {  # stop the running step's process group, keep what the summary has, exit
  [[ -n $STEP_PID ]] && kill -TERM -- "-$STEP_PID" 2>/dev/null
  echo "[gpu-check] interrupted; $OUT/summary.json has the steps finished so far" >&2
  exit 130
}
trap cleanup EXIT
trap on_signal TERM INT HUP
printf '#!/usr/bin/env bash\nexec %q -m chtsl_infer.cli "$@"\n' "$PY" >"$W/bin/chtsl"
printf '#!/usr/bin/env bash\nexec %q "$@"\n' "$PY" >"$W/bin/py"
chmod +x "$W/bin/chtsl" "$W/bin/py"
export PATH="$W/bin:$PATH" PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export NO_COLOR=1 TERM=dumb COLUMNS=160 CHTSL_CACHE="$W/cache" CHTSL_CACHE_DIR="$W/cache"
# The dtype spelling each command takes (bf16 or bfloat16), read from its --help, so the script
# follows a renaming of the CLI vocabulary; the defaults above stay if --help fails.
dtype_name() { local h; h=$("$W/bin/chtsl" "$1" --help 2>/dev/null) || { echo "$2"; return; }
  if grep -q bfloat16 <<<"$h"; then echo bfloat16; elif grep -q bf16 <<<"$h"; then echo bf16; else echo "$2"; fi; }
BF16=$(dtype_name train "$BF16")
[[ $BENCH_DTYPE == float32 ]] || BENCH_DTYPE=$(dtype_name bench "$BENCH_DTYPE")
export W J DEV BF16 BENCH_DTYPE DATA_DIR REPO TINY_STEPS M60_STEPS CSR_STEPS
# bash arrays cannot be exported: each step's shell gets them from this file
declare -p TINY M60 PAPER ONNX_BENCH KERNELS TOPOLOGY RTE_LIMIT CSR_TRAIN DECODE >"$W/arrays.sh"
export BASH_ENV="$W/arrays.sh"

# ----------------------------------------------------------------------------- Python helpers (stdlib + torch)
cat >"$W/py/env.py" <<'EOF'
"""The environment: Python, torch, CUDA device, onnxruntime providers, Triton; JSON to argv[1]."""
import json
import platform
import subprocess
import sys

import torch

info = {"python": sys.version.split()[0], "platform": platform.platform(), "torch": torch.__version__,
        "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
        "cpu_threads": torch.get_num_threads()}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(gpu=p.name, gpu_memory_gb=round(p.total_memory / 1e9, 1), capability=f"{p.major}.{p.minor}",
                gpu_count=torch.cuda.device_count(), bf16_supported=torch.cuda.is_bf16_supported(),
                cudnn=torch.backends.cudnn.version())
for name in ("transformers", "onnxruntime", "triton", "lm_eval", "onnx", "onnxscript", "datasets"):
    try:
        mod = __import__(name)
        info[name] = getattr(mod, "__version__", "?")
    except Exception as e:  # noqa: BLE001 - report, never fail on an optional package
        info[name] = f"unavailable: {type(e).__name__}"
try:
    import onnxruntime

    info["onnxruntime_providers"] = onnxruntime.get_available_providers()
except Exception:  # noqa: BLE001
    info["onnxruntime_providers"] = []
try:
    info["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                         "--format=csv,noheader"], capture_output=True, text=True,
                                        timeout=20).stdout.strip()
except (OSError, subprocess.SubprocessError):
    info["nvidia_smi"] = "unavailable"
print(json.dumps(info, indent=1))
with open(sys.argv[1], "w") as f:
    json.dump(info, f, indent=1)
EOF

cat >"$W/py/ort_cuda.py" <<'EOF'
"""Exit 0 when onnxruntime's CUDA provider can be used on argv[1] (cuda); else say why, exit 1."""
import sys

if sys.argv[1] != "cuda":
    sys.exit(0)  # rehearsal: the CPU provider
try:
    import onnxruntime
except ImportError:
    print("skipped: onnxruntime is not installed")
    sys.exit(1)
if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
    print(f"skipped: onnxruntime {onnxruntime.__version__} has no CUDAExecutionProvider (install onnxruntime-gpu)")
    sys.exit(1)
EOF

cat >"$W/py/check_run.py" <<'EOF'
"""Checks a training run's metrics.jsonl (argv: run dir, expected steps, JSON out): every step once in
order (the resume neither lost nor repeated one), finite losses, alignment/OCR/topology logged where the
method has them; writes the median per-step tokens/s (step 1 and topology-update steps excluded)."""
import json
import math
import shutil
import statistics
import sys
from pathlib import Path

run, n, out = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
steps = [r for r in recs if "step" in r]
problems = []
if [r["step"] for r in steps] != list(range(1, n + 1)):
    problems.append(f"steps logged {[r['step'] for r in steps][:5]}... ({len(steps)}), expected 1..{n} once each")
if not all(isinstance(r.get("loss"), float) and math.isfinite(r["loss"]) for r in steps):
    problems.append("non-finite loss")
method = next((r["args"]["method"] for r in recs if r.get("event") == "start"), "?")
ocr = [r for r in steps if "ocr" in r]
updates = [r for r in steps if "topology" in r]
if method == "chtsl":
    if not all(r["align_loss"] > 0 for r in steps):
        problems.append("alignment loss missing")
    if not ocr:
        problems.append("no OCR logged")
    if not updates:
        problems.append("no topology update")
timed = [r["tokens_per_s"] for r in steps if r["step"] > 1 and "topology" not in r]
report = {"steps": len(steps), "method": method, "first_loss": steps[0]["loss"] if steps else None,
          "last_loss": steps[-1]["loss"] if steps else None,
          "val_ppl": next((r["val_ppl"] for r in reversed(steps) if "val_ppl" in r), None),
          "median_tokens_per_s": statistics.median(timed) if timed else None,
          "topology_updates": len(updates), "update_s": [r.get("step_time_s") for r in updates],
          "ocr_steps": len(ocr), "problems": problems}
out.write_text(json.dumps(report, indent=1))
shutil.copy(run / "metrics.jsonl", out.with_suffix(".metrics.jsonl"))
print(json.dumps(report, indent=1))
if problems:
    print("error: " + "; ".join(problems))
    sys.exit(1)
EOF

cat >"$W/py/compare_eval.py" <<'EOF'
"""Compares two `chtsl eval --json` results (argv: CPU json, device json, out json): accuracies must
be equal; also counts per-example predictions that differ and the largest log-likelihood difference."""
import json
import sys
from pathlib import Path


def load(path):
    res = json.loads(Path(path).read_text())
    acc = {t: m.get("acc,none") for t, m in res["results"].items()}
    samples = Path(path).with_name(Path(path).stem + ".samples.jsonl")
    rows = [json.loads(x) for x in samples.read_text().splitlines() if x.strip()] if samples.is_file() else []
    return acc, {(r["task"], r["doc_id"]): r for r in rows}


acc_a, s_a = load(sys.argv[1])
acc_b, s_b = load(sys.argv[2])
differ, max_dll = 0, 0.0
for key, ra in s_a.items():
    rb = s_b.get(key)
    if rb is None:
        differ += 1
        continue
    differ += ra.get("acc") != rb.get("acc")
    la = [float(r[0]) for r in ra.get("filtered_resps", [])]
    lb = [float(r[0]) for r in rb.get("filtered_resps", [])]
    max_dll = max([max_dll] + [abs(x - y) for x, y in zip(la, lb)])
report = {"accuracy_cpu": acc_a, "accuracy_device": acc_b, "equal": acc_a == acc_b, "examples": len(s_a),
          "predictions_differing": differ, "max_abs_loglik_diff": max_dll}
Path(sys.argv[3]).write_text(json.dumps(report, indent=1))
print(json.dumps(report, indent=1))
if acc_a != acc_b:
    print(f"error: accuracy differs between CPU {acc_a} and device {acc_b}")
    sys.exit(1)
EOF

cat >"$W/py/summary.py" <<'EOF'
"""summary.json from steps.tsv, json/ and logs/ (argv: OUT, mode, budget). Standard library only."""
import json
import os
import re
import sys
from pathlib import Path

out, mode, budget = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
J = out / "json"
# The paper's Table 12 (A100, batch 128, seq 256, bf16): tokens/s and peak memory, dense vs CHTsL.
PAPER = {"bench60": {"dense_tokens_per_s": 773111, "chtsl_tokens_per_s": 786004, "speedup": 786004 / 773111,
                     "dense_peak_gb": 2.606, "chtsl_peak_gb": 2.573, "peak_ratio": 2.573 / 2.606},
         "bench130": {"dense_tokens_per_s": 343310, "chtsl_tokens_per_s": 386483, "speedup": 386483 / 343310}}


def load(name):
    p = J / name
    try:
        return json.loads(p.read_text()) if p.is_file() else None
    except ValueError:
        return None


def bench(data):
    rows = []
    for r in data.get("results", []):
        rows.append({"model": r.get("model"), "backend": r.get("backend"),
                     "tokens_per_s": round(r.get("tokens_per_s", 0)), "speedup_vs_dense": r.get("speedup_vs_dense"),
                     "peak_gb": round(r.get("peak_memory_bytes", 0) / 1e9, 3),
                     "peak_ratio": r.get("peak_memory_ratio"), "model_mb": round(r.get("model_bytes", 0) / 1e6, 1),
                     **{k: r[k] for k in ("prefill_tokens_per_s", "decode_tokens_per_s", "latency_p50_ms",
                                          "latency_p90_ms", "latency_p50_s", "latency_p90_s") if k in r}})
    return {"settings": data.get("settings"), "rows": rows}


def numbers(name, log):
    n = {}
    data = load(f"{name}.json")
    if name.startswith("bench") and data:
        n = bench(data)
        if name in PAPER:
            n["paper_a100"] = PAPER[name]
    elif name.endswith("train") and data:
        n = {k: data.get(k) for k in ("step", "loss", "val_ppl", "tokens_per_s", "wall_s", "topology_updates",
                                     "updates_changed_masks", "stopped")}
        run = load(f"{name}.run.json")
        if run:
            n["median_step_tokens_per_s"] = run.get("median_tokens_per_s")
            n["checks"] = run.get("problems") or "ok"
    elif name == "export" and data:
        checks = data.get("verification", [])
        n = {"written": data.get("written"), "checks": len(checks), "failed": sum(not c.get("ok") for c in checks),
             "runtimes": sorted({c.get("runtime") for c in checks}),
             "max_abs_by_runtime": {rt: max(c["max_abs"] for c in checks if c.get("runtime") == rt)
                                    for rt in {c.get("runtime") for c in checks}},
             "files": [{k: f.get(k) for k in ("file", "bytes", "ratio")} for f in data.get("files", [])]}
    elif name == "eval_rte" and data:
        n = data
    elif name == "env":
        n = load("env.json") or {}
    elif name == "pytest_cuda":
        counts = re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed)", log[-3000:])
        n = {k: int(v) for v, k in counts}
        xml = J / "pytest_cuda.xml"
        if xml.is_file():
            import xml.etree.ElementTree as ET

            suite = ET.parse(xml).getroot()
            suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
            n["junit"] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
            n["not_passed"] = [f"{c.get('classname')}::{c.get('name')}: {c[0].tag}" for c in suite.iter("testcase")
                               if len(c) and c[0].tag in ("failure", "error")]
    elif name == "kernels":  # one table per run, each after a "device D, DTYPE, ..." line
        row = re.compile(r"^(\S+)\s+(\S+)\s+(\d+×\d+)\s+(\d+)\s+([\d.]+)\s+(\S+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)"
                         r"\s+([\d.]+)\s*$")
        dtype, rows = "float32", []
        for line in log.splitlines():
            head = re.match(r"^device (\S+), (\w+),", line)
            if head:
                dtype = head.group(2)
            r = row.match(line)
            if r:
                rows.append({"dtype": dtype, "shape": r[1], "layer": r[2], "out_in": r[3], "tokens": int(r[4]),
                             "dense_ms": float(r[5]), "candidate": r[6], "median_ms": float(r[7]),
                             "x_dense_median": float(r[9])})
        n = {"rows": rows}
    elif name == "topology":
        rows = re.findall(r"^(\S+) .*?update\s+([\d.]+) s.*?train step\s+([\d.]+) s.*?= ([\d.]+)%", log, re.M)
        n = {"rows": [{"preset": r[0], "update_s": float(r[1]), "train_step_s": float(r[2]),
                       "update_per_100_steps_pct": float(r[3])} for r in rows]}
    elif data:
        n = data
    return n


steps = []
for line in (out / "steps.tsv").read_text().splitlines():
    name, status, rc, secs, limit, last = (line.split("\t") + [""] * 6)[:6]
    log_path = out / "logs" / f"{name}.log"
    log = log_path.read_text(errors="replace") if log_path.is_file() else ""
    try:
        nums = numbers(name, log)
    except Exception as e:  # noqa: BLE001 - a parse problem must not lose the step's record
        nums = {"parse_error": f"{type(e).__name__}: {e}"}
    steps.append({"name": name, "status": status, "exit_code": int(rc), "seconds": int(secs), "limit_s": int(limit),
                  "last_error": last or None, "log": f"logs/{name}.log", "numbers": nums})
def paper_comparison(steps):
    """Ours next to the paper's Table 12, per model size: tokens/s of dense and of CHTsL per backend,
    the CHTsL/dense ratios, peak memory (GB = 1e9 bytes)."""
    table = {}
    for s in steps:
        paper, rows = s["numbers"].get("paper_a100"), s["numbers"].get("rows")
        if not paper or not rows:
            continue
        ours = {"dense_tokens_per_s": rows[0]["tokens_per_s"], "dense_peak_gb": rows[0]["peak_gb"]}
        for r in rows[1:]:
            ours[f"chtsl_{r['backend']}_tokens_per_s"] = r["tokens_per_s"]
            ours[f"chtsl_{r['backend']}_speedup"] = round(r["speedup_vs_dense"], 3)
            ours[f"chtsl_{r['backend']}_peak_gb"] = r["peak_gb"]
            ours[f"chtsl_{r['backend']}_peak_ratio"] = round(r["peak_ratio"], 3)
        table[s["name"]] = {"ours": ours, "paper_a100": paper, "settings": s["numbers"].get("settings")}
    return table


summary = {"mode": mode, "budget_s": budget, "total_s": sum(s["seconds"] for s in steps),
           "ok": all(s["status"] in ("ok", "skipped") for s in steps),
           "failed": [s["name"] for s in steps if s["status"] in ("failed", "timeout")],
           "skipped": [s["name"] for s in steps if s["status"] == "skipped"],
           "paper_comparison": paper_comparison(steps), "steps": steps}
tmp = out / ".summary.json.tmp"
tmp.write_text(json.dumps(summary, indent=1) + "\n")
os.replace(tmp, out / "summary.json")
EOF

# ----------------------------------------------------------------------------- run
echo "[gpu-check] $MODE; python $PY; out $OUT; work $W; budget ${BUDGET}s" >&2
define_steps
if [[ -n $ONLY ]]; then
  for n in ${ONLY//,/ }; do
    [[ " ${STEP_NAMES[*]} " == *" $n "* ]] || echo "[gpu-check] warning: unknown step $n (steps: ${STEP_NAMES[*]})" >&2
  done
fi
write_summary
awk -F'\t' '{printf "[gpu-check]   %-12s %-8s %5ss%s\n", $1, $2, $4, ($6 == "" ? "" : "  " substr($6, 1, 120))}' \
  "$OUT/steps.tsv" >&2
echo "[gpu-check] done in ${SECONDS}s: $OUT/summary.json" >&2
if cut -f2 "$OUT/steps.tsv" | grep -qE '^(failed|timeout)$'; then
  echo "[gpu-check] failed steps: $(awk -F'\t' '$2 == "failed" || $2 == "timeout" {printf "%s ", $1}' "$OUT/steps.tsv")" >&2
  exit 1
fi
exit 0
