#!/usr/bin/env bash
# Creates ./.venv (if missing) with the CPU build of torch, Triton and the test/method deps, and builds moekernels
# (C++ CPU kernels; CUDA kernels too when torch has CUDA and nvcc exists) into it. Idempotent.
# Env: VENV (default .venv), TORCH_SPEC (default torch==2.13.0, the CPU build on this project's machines).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install -q --disable-pip-version-check "$TORCH_SPEC"
"$PY" -m pip install -q --disable-pip-version-check triton numpy scipy scikit-learn pytest matplotlib tqdm nvidia-ml-py ninja
echo "[setup] building moekernels (about a minute)"
"$PY" -m pip install -q --disable-pip-version-check --no-build-isolation -e . 
"$PY" -m moekernels.info
