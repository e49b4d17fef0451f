#!/usr/bin/env bash
# Compile check of every CUDA source, where no GPU is needed (DESIGN.md 4: "CUDA sources are compile-checked with
# nvcc even where no GPU exists").
#   * every csrc/cuda/*.cu  -> object file with nvcc (-c, -std=c++17, -Icsrc/include, sm_80 and sm_90, the
#     flags torch's CUDAExtension adds: no implicit half/bfloat16 operators and conversions);
#   * every csrc/cuda/*.cpp -> g++ -fsyntax-only against the installed torch's headers and the CUDA include dir
#     (-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE -DMOEKERNELS_WITH_CUDA=1; c10/cuda headers need nothing else).
# New ops' files are picked up automatically. Prints one line per file; without nvcc it prints why and exits 0.
# Exits non-zero if any file fails. Usage: bash .ci/check_cuda.sh   (from anywhere)
# Env: PYTHON (the python whose torch headers are used; default: the active venv, ./.venv, then python3),
#      NVCC (default: nvcc on PATH), CUDA_ARCHS (default "80 90"), MOEK_CUDA_SRC_DIR (default csrc/cuda),
#      MOEK_CUDA_VERBOSE=1 (ptxas register/spill report per kernel).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
SRC_DIR="${MOEK_CUDA_SRC_DIR:-csrc/cuda}"
ARCHS="${CUDA_ARCHS:-80 90}"
NVCC="${NVCC:-$(command -v nvcc || true)}"
start=$(date +%s)

if [ -z "$NVCC" ] || [ ! -x "$NVCC" ]; then
  echo "[check_cuda] SKIP: nvcc not found on PATH (set NVCC=/path/to/nvcc); CUDA sources were not compile-checked"
  exit 0
fi

shopt -s nullglob
cu_files=("$SRC_DIR"/*.cu)
cpp_files=("$SRC_DIR"/*.cpp)
if [ ${#cu_files[@]} -eq 0 ] && [ ${#cpp_files[@]} -eq 0 ]; then
  echo "[check_cuda] SKIP: no .cu/.cpp files in $SRC_DIR"
  exit 0
fi

# The CUDA toolkit root as nvcc itself sees it (nvcc may be a wrapper script outside the toolkit).
CUDA_ROOT=$("$NVCC" --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -1)
CUDA_INC=""
for cand in "${CUDA_ROOT:+$CUDA_ROOT/include}" "${CUDA_ROOT:+$CUDA_ROOT/targets/x86_64-linux/include}" \
            "${CUDA_HOME:+$CUDA_HOME/include}" "$(dirname "$(dirname "$(readlink -f "$NVCC")")")/include" \
            /usr/local/cuda/include; do
  if [ -n "$cand" ] && [ -f "$cand/cuda_runtime_api.h" ]; then CUDA_INC=$(readlink -f "$cand"); break; fi
done

if [ -z "${PYTHON:-}" ]; then
  if [ -n "${VIRTUAL_ENV:-}" ] && [ -x "$VIRTUAL_ENV/bin/python" ]; then PYTHON="$VIRTUAL_ENV/bin/python"
  elif [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python
  else PYTHON=$(command -v python3 || command -v python || true); fi
fi
TORCH_INC=()
PY_INC=""
if [ -n "$PYTHON" ]; then
  while IFS= read -r p; do [ -n "$p" ] && TORCH_INC+=("-I$p"); done < <("$PYTHON" - <<'EOF' 2>/dev/null
from torch.utils.cpp_extension import include_paths
print("\n".join(include_paths()))
EOF
)
  PY_INC=$("$PYTHON" -c "import sysconfig; print(sysconfig.get_paths()['include'])" 2>/dev/null || true)
fi

echo "[check_cuda] nvcc: $("$NVCC" --version | tail -1)"
echo "[check_cuda] CUDA include: ${CUDA_INC:-not found}; torch headers: ${TORCH_INC[0]:-not found} (python: ${PYTHON:-none})"

gencode=()
for a in $ARCHS; do gencode+=("-gencode" "arch=compute_$a,code=sm_$a"); done
NVCC_FLAGS=(-c -std=c++17 -O3 --use_fast_math -lineinfo --expt-relaxed-constexpr "-I$ROOT/csrc/include"
            -DMOEKERNELS_WITH_CUDA=1 -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
            -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ -Xptxas=-warn-spills "${gencode[@]}")
[ "${MOEK_CUDA_VERBOSE:-0}" = "1" ] && NVCC_FLAGS+=(-Xptxas=-v)
CXX_FLAGS=(-std=c++17 -fsyntax-only -fopenmp "-I$ROOT/csrc/include" -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE
           -DMOEKERNELS_WITH_CUDA=1 "${TORCH_INC[@]}")
[ -n "$CUDA_INC" ] && CXX_FLAGS+=("-I$CUDA_INC")
[ -n "$PY_INC" ] && CXX_FLAGS+=("-I$PY_INC")
[ "$(uname -m)" = "x86_64" ] && CXX_FLAGS+=(-DMOEKERNELS_X86=1)

OBJ_DIR=$(mktemp -d)
trap 'rm -rf "$OBJ_DIR"' EXIT
failed=()
n=0
for f in "${cu_files[@]}"; do
  n=$((n + 1))
  t0=$(date +%s)
  log="$OBJ_DIR/$(basename "$f").log"
  if "$NVCC" "${NVCC_FLAGS[@]}" "${TORCH_INC[@]}" "$f" -o "$OBJ_DIR/$(basename "$f").o" >"$log" 2>&1; then
    spills=$(grep -c "spill" "$log" || true)
    note=""
    [ "${spills:-0}" -gt 0 ] && note=", $spills ptxas spill warnings (MOEK_CUDA_VERBOSE=1 shows them)"
    echo "[check_cuda] OK    nvcc sm_${ARCHS// /,sm_}  $f  ($(( $(date +%s) - t0 )) s$note)"
    [ "${MOEK_CUDA_VERBOSE:-0}" = "1" ] && cat "$log"
  else
    echo "[check_cuda] FAIL  nvcc  $f  ($(( $(date +%s) - t0 )) s):"
    sed 's/^/    /' "$log" | head -60
    failed+=("$f")
  fi
done
for f in "${cpp_files[@]}"; do
  n=$((n + 1))
  t0=$(date +%s)
  log="$OBJ_DIR/$(basename "$f").log"
  if [ ${#TORCH_INC[@]} -eq 0 ]; then
    echo "[check_cuda] FAIL  g++   $f: torch headers not found (python: ${PYTHON:-none}; set PYTHON=)"
    failed+=("$f")
    continue
  fi
  if g++ "${CXX_FLAGS[@]}" "$f" >"$log" 2>&1; then
    echo "[check_cuda] OK    g++ -fsyntax-only  $f  ($(( $(date +%s) - t0 )) s)"
  else
    echo "[check_cuda] FAIL  g++ -fsyntax-only  $f  ($(( $(date +%s) - t0 )) s):"
    sed 's/^/    /' "$log" | head -60
    failed+=("$f")
  fi
done

total=$(( $(date +%s) - start ))
if [ ${#failed[@]} -gt 0 ]; then
  echo "[check_cuda] ${#failed[@]} of $n files FAILED in $total s: ${failed[*]}"
  exit 1
fi
echo "[check_cuda] all $n CUDA sources OK in $total s"
