#!/usr/bin/env bash
# GPU validation of moekernels: the one command a session with a lent H100/H200 runs (fresh machine, no internet,
# the repository copied there; finishes in < 10 minutes).
#
# HOW TO RUN IT (from a session that holds a device lease; the `run` tool of the device machine, not a shell):
#     run(command="bash benches/gpu_check.sh", timeout_s=600)
# (kind left out: an nvidia-h100-x1, or an nvidia-h200 when no H100 opens; the results name the GPU). What it
# leaves in $OUT comes back under the reply's files_at: gpu_check.log (everything, streamed as it runs, so it
# comes back even if the run is cut off), gpu_check_<gpu>.json, gpu_check_<gpu>.md and gpu_check_results.tar.gz
# (benches/results: bench JSONs and logs, junit XML). Copy the .json/.md into benches/results/ and commit them.
# Locally: `bash benches/gpu_check.sh` on any machine with an NVIDIA GPU (results stay in benches/results/).
#
# Steps (each runs under a timeout; a failing step is recorded and the script goes on; exit 1 lists them):
#   env      python (the machine's own: /opt/torch/.venv, torch 2.11+cu130, triton, pytest, numpy, scipy,
#            scikit-learn, nvidia-ml-py are preinstalled there; missing ones come from ./.whl wheels if carried,
#            else from pip when there is a network), nvidia-smi, nvcc
#   build    pip install --no-build-isolation --no-deps --no-index -e .  with TORCH_CUDA_ARCH_LIST=9.0
#            (fallback: python setup.py build_ext --inplace + PYTHONPATH)
#   info     python -m moekernels.info (must report CUDA kernels: True)
#   pytest   the whole suite on the GPU (cuda and triton backends vs the refs)
#   bench_*  every benches/bench_*.py --device cuda --out benches/results
#   report   benches/results/gpu_check_<gpu>.json (+ .md): GPU, driver, clocks (nvidia-ml-py), steps, pytest
#            summary, bench JSON paths and tables
# Env: PYTHON (default python3), TORCH_CUDA_ARCH_LIST (default 9.0), GPU_CHECK_BUDGET_S (default 560),
#      GPU_CHECK_QUICK=1 (benches with --quick), GPU_CHECK_PYTEST_ARGS (pytest targets/options; default: tests).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET_S:-560}
RESULTS=benches/results
mkdir -p "$RESULTS"
LOG="$RESULTS/gpu_check.log"
OUT_DIR="${OUT:-}"
if [ -n "$OUT_DIR" ]; then mkdir -p "$OUT_DIR"; fi
exec > >(tee "$LOG" ${OUT_DIR:+"$OUT_DIR/gpu_check.log"}) 2>&1
export PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-$(nproc 2>/dev/null || echo 8)}"
PY="${PYTHON:-python3}"
ENV_FILE=$(mktemp)  # steps run in child shells: environment changes they make come back through this file
export PY ROOT ENV_FILE RESULTS
MARK=$(mktemp)  # bench JSONs newer than this are this run's
STEPS_FILE=$(mktemp)
FAILED=()

elapsed() { echo $(( $(date +%s) - START )); }
remaining() { echo $(( BUDGET - $(elapsed) )); }
# step NAME MAX_SECONDS CMD...: runs CMD with a timeout of min(MAX_SECONDS, time left - 20 s); records rc/seconds.
step() {
  local name=$1 max=$2
  shift 2
  local left=$(( $(remaining) - 20 ))
  local t=$(( max < left ? max : left ))
  echo
  echo "=== [$(elapsed) s] $name (timeout ${t} s): $*"
  if [ "$t" -le 5 ]; then
    echo "=== $name SKIPPED: out of time budget (${BUDGET} s)"
    echo "$name	skipped	0" >>"$STEPS_FILE"
    FAILED+=("$name(no time)")
    return 1
  fi
  local t0=$(date +%s) rc
  if declare -F "$1" >/dev/null; then  # a shell function: run it in a child bash (timeout runs programs only)
    export -f "$1"
    timeout --kill-after=10 "$t" bash -c "$*"
  else
    timeout --kill-after=10 "$t" "$@"
  fi
  rc=$?
  # shellcheck disable=SC1090
  . "$ENV_FILE"
  local dt=$(( $(date +%s) - t0 ))
  if [ $rc -eq 0 ]; then
    echo "=== $name OK (${dt} s)"
  else
    [ $rc -eq 124 ] && echo "=== $name TIMED OUT after ${t} s" || echo "=== $name FAILED rc=$rc (${dt} s)"
    FAILED+=("$name")
  fi
  echo "$name	$rc	$dt" >>"$STEPS_FILE"
  return $rc
}

echo "moekernels GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ), repo $ROOT, git $(git rev-parse --short HEAD 2>/dev/null || echo '?')"

# ------------------------------------------------------------------------------------------ environment
env_check() {
  command -v nvidia-smi >/dev/null && nvidia-smi || echo "nvidia-smi not found"
  command -v nvcc >/dev/null && nvcc --version | tail -2 || echo "nvcc not on PATH (torch's CUDA_HOME lookup may still find it)"
  "$PY" - <<'EOF'
import importlib, sys
print("python", sys.version.split()[0], sys.executable)
missing = []
for mod in ("torch", "triton", "pytest", "numpy", "scipy", "sklearn", "pynvml", "setuptools", "tqdm"):
    try:
        m = importlib.import_module(mod)
        print(f"  {mod:10s} {getattr(m, '__version__', '?')}")
    except Exception as e:
        print(f"  {mod:10s} MISSING ({type(e).__name__}: {e})")
        missing.append(mod)
open("/tmp/moek_missing", "w").write(" ".join(missing))
import torch
print("torch CUDA", torch.version.cuda, "available:", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
sys.exit(0 if torch.cuda.is_available() else 3)
EOF
}
ensure_packages() {
  local missing
  missing=$(cat /tmp/moek_missing 2>/dev/null || true)
  [ -z "$missing" ] && { echo "all packages present"; return 0; }
  echo "missing: $missing"
  if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl &&
      echo 'export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"' >>"$ENV_FILE"
  else
    local pkgs=${missing//sklearn/scikit-learn}
    pkgs=${pkgs//pynvml/nvidia-ml-py}
    "$PY" -m pip install -q $pkgs
  fi
}
step env 60 env_check
if [ -s /tmp/moek_missing ]; then step packages 120 ensure_packages; fi

# ------------------------------------------------------------------------------------------ build
build() {
  rm -f moekernels/_C*.so
  if "$PY" -m pip install --no-build-isolation --no-deps --no-index -e . ; then
    "$PY" -c "import moekernels._C" && return 0
  fi
  echo "pip install -e . failed or did not give an importable extension; falling back to build_ext --inplace"
  "$PY" setup.py build_ext --inplace && echo "export PYTHONPATH=\"$ROOT\${PYTHONPATH:+:\$PYTHONPATH}\"" >>"$ENV_FILE"
}
step build 300 build
info() {
  "$PY" -m moekernels.info | tee /tmp/moek_info.txt
  grep -q "CUDA kernels: True" /tmp/moek_info.txt || { echo "the extension has no CUDA kernels"; return 1; }
}
step info 60 info

# ------------------------------------------------------------------------------------------ tests
# shellcheck disable=SC2086
step pytest 300 "$PY" -m pytest -q -rs -p no:cacheprovider --junitxml="$RESULTS/gpu_pytest.xml" \
  ${GPU_CHECK_PYTEST_ARGS:-tests}
PYTEST_RC=$?

# ------------------------------------------------------------------------------------------ benchmarks
shopt -s nullglob
BENCH_ARGS=(--device cuda --out "$RESULTS")
[ "${GPU_CHECK_QUICK:-0}" = "1" ] && BENCH_ARGS+=(--quick)
for b in benches/bench_*.py; do
  name=$(basename "$b" .py)
  step "$name" 180 bash -c "set -o pipefail; \"$PY\" \"$b\" ${BENCH_ARGS[*]} 2>&1 | tee \"$RESULTS/${name}_cuda.log\""
done

# ------------------------------------------------------------------------------------------ report
echo
echo "=== [$(elapsed) s] report"
FAILED_STR="${FAILED[*]:-}"
GPU_CHECK_FAILED="$FAILED_STR" GPU_CHECK_STEPS="$STEPS_FILE" GPU_CHECK_MARK="$MARK" GPU_CHECK_RESULTS="$RESULTS" \
  GPU_CHECK_ELAPSED="$(elapsed)" GPU_CHECK_PYTEST_RC="$PYTEST_RC" "$PY" - <<'EOF' || FAILED+=("report")
import glob, json, os, platform, re, subprocess, sys, time
import xml.etree.ElementTree as ET

res = os.environ["GPU_CHECK_RESULTS"]
mark = os.path.getmtime(os.environ["GPU_CHECK_MARK"])
info = {"date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "host": platform.node()}
try:
    info["git"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
except OSError:
    pass
gpu = {}
try:
    import pynvml as nv
    nv.nvmlInit()
    h = nv.nvmlDeviceGetHandleByIndex(0)
    dec = lambda s: s.decode() if isinstance(s, bytes) else s
    gpu["name"] = dec(nv.nvmlDeviceGetName(h))
    gpu["driver"] = dec(nv.nvmlSystemGetDriverVersion())
    gpu["memory_total_mib"] = nv.nvmlDeviceGetMemoryInfo(h).total // 2**20
    for key, clk in (("sm", nv.NVML_CLOCK_SM), ("mem", nv.NVML_CLOCK_MEM), ("graphics", nv.NVML_CLOCK_GRAPHICS)):
        for kind, fn in (("current", nv.nvmlDeviceGetClockInfo), ("max", nv.nvmlDeviceGetMaxClockInfo),
                         ("application", nv.nvmlDeviceGetApplicationsClock)):
            try:
                gpu[f"clock_{key}_{kind}_mhz"] = fn(h, clk)
            except Exception:
                pass
    for k, fn in (("power_limit_w", lambda: nv.nvmlDeviceGetEnforcedPowerLimit(h) / 1000),
                  ("temperature_c", lambda: nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU)),
                  ("cuda_driver_version", nv.nvmlSystemGetCudaDriverVersion)):
        try:
            gpu[k] = fn()
        except Exception:
            pass
except Exception as e:
    gpu["nvml_error"] = f"{type(e).__name__}: {e}"
try:
    import torch
    info["torch"] = torch.__version__
    info["torch_cuda"] = torch.version.cuda
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        gpu.setdefault("name", p.name)
        gpu["sm_count"] = p.multi_processor_count
        gpu["capability"] = f"{p.major}.{p.minor}"
except Exception as e:
    info["torch_error"] = str(e)
try:
    import triton
    info["triton"] = triton.__version__
except Exception:
    pass
try:
    info["nvcc"] = subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
except Exception:
    pass
try:
    info["moekernels_info"] = open("/tmp/moek_info.txt").read().splitlines()
except OSError:
    pass

steps = []
for line in open(os.environ["GPU_CHECK_STEPS"]):
    name, rc, sec = line.rstrip("\n").split("\t")
    steps.append({"step": name, "rc": rc, "seconds": int(sec)})

pytest = {"rc": int(os.environ.get("GPU_CHECK_PYTEST_RC") or -1)}
xml = os.path.join(res, "gpu_pytest.xml")
if os.path.exists(xml) and os.path.getmtime(xml) >= mark:
    root = ET.parse(xml).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    if suite is not None:
        for k in ("tests", "failures", "errors", "skipped"):
            pytest[k] = int(suite.get(k, 0))
        pytest["time_s"] = float(suite.get("time", 0))
        pytest["failed"] = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
                            if c.find("failure") is not None or c.find("error") is not None][:50]
log = open(os.path.join(res, "gpu_check.log"), errors="replace").read()
summ = [l for l in log.splitlines()
        if re.match(r"^=*\s*\d+ (passed|failed|skipped|errors?|deselected)\b.* in [\d.]+s", l.strip())]
if summ:
    pytest["summary"] = summ[-1].strip("= ")

benches = sorted(p for p in glob.glob(os.path.join(res, "*.json"))
                 if os.path.getmtime(p) >= mark and not os.path.basename(p).startswith("gpu_check_"))
tag = re.sub(r"[^A-Za-z0-9._-]+", "_", gpu.get("name", "unknown-gpu")).strip("_")
report = {"gpu": gpu, "env": info, "elapsed_s": int(os.environ["GPU_CHECK_ELAPSED"]),
          "failed_steps": os.environ.get("GPU_CHECK_FAILED", "").split(), "steps": steps, "pytest": pytest,
          "bench_json": benches}
jpath = os.path.join(res, f"gpu_check_{tag}.json")
with open(jpath, "w") as f:
    json.dump(report, f, indent=2)

md = [f"# GPU check: {gpu.get('name', '?')}", "",
      f"{info['date_utc']}, git {info.get('git', '?')[:10]}, driver {gpu.get('driver', '?')}, torch {info.get('torch', '?')} "
      f"(CUDA {info.get('torch_cuda', '?')}), triton {info.get('triton', '?')}; SM clock {gpu.get('clock_sm_current_mhz', '?')}"
      f"/{gpu.get('clock_sm_max_mhz', '?')} MHz, memory clock {gpu.get('clock_mem_current_mhz', '?')} MHz. "
      "Command: `bash benches/gpu_check.sh` (device run, see the script's header).", "",
      "| step | result | seconds |", "|---|---|---|"]
for s in steps:
    md.append(f"| {s['step']} | {'ok' if s['rc'] == '0' else 'FAILED rc=' + s['rc']} | {s['seconds']} |")
md += ["", f"pytest: {pytest.get('summary', '?')} (rc {pytest['rc']})"]
if pytest.get("failed"):
    md += ["", "failed tests:"] + [f"- `{t}`" for t in pytest["failed"]]
for b in glob.glob(os.path.join(res, "bench_*_cuda.log")):
    if os.path.getmtime(b) < mark:
        continue
    rows = [l for l in open(b, errors="replace").read().splitlines() if l.startswith("|")]
    if rows:
        md += ["", f"## {os.path.basename(b)[:-9]}", ""] + rows
md += ["", "bench JSON: " + (", ".join(f"`{p}`" for p in benches) or "none")]
mpath = jpath[:-5] + ".md"
open(mpath, "w").write("\n".join(md) + "\n")
print("\n".join(md))
print(f"wrote {jpath} and {mpath}")
EOF

if [ -n "$OUT_DIR" ]; then
  cp "$RESULTS"/gpu_check_*.json "$RESULTS"/gpu_check_*.md "$OUT_DIR"/ 2>/dev/null
  tar -czf "$OUT_DIR/gpu_check_results.tar.gz" -C "$RESULTS" . 2>/dev/null
  echo "copied results to $OUT_DIR"
fi
rm -f "$MARK" "$STEPS_FILE" "$ENV_FILE"
echo
if [ ${#FAILED[@]} -gt 0 ]; then
  echo "GPU CHECK: FAILED steps: ${FAILED[*]} (total $(elapsed) s)"
  exit 1
fi
echo "GPU CHECK: all steps OK (total $(elapsed) s)"
