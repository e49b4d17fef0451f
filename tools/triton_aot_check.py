#!/usr/bin/env python
"""Ahead-of-time compile check of every Triton kernel in moekernels/ops/triton/ for NVIDIA GPUs, on any machine
(no GPU needed: triton.compile with an explicit GPUTarget runs the whole pipeline TTIR -> TTGIR -> LLVM -> PTX ->
cubin with the bundled ptxas).

Discovery: every module in moekernels/ops/triton/ whose name does not start with "_" is imported and must define

    AOT_SPECS = [(kernel, signature, constexprs[, options]), ...]

(see moekernels/ops/triton/_common.py). Every module-level @triton.jit function whose name ends in "_kernel" must be
covered by at least one spec, so a new kernel without AOT specs fails the check.

Prints one line per (kernel, config, arch): OK with the compile time, or FAILED with the error; exits 1 on any
failure. Examples:

    python tools/triton_aot_check.py                 # all specs, sm_90 (what CI runs)
    python tools/triton_aot_check.py --arch 90,80 -j 2  # sm_90 and sm_80, two compile processes
    python tools/triton_aot_check.py --quick         # first spec of each kernel, sm_90 (the pytest smoke test)
    python tools/triton_aot_check.py --list          # show the specs, compile nothing
"""
from __future__ import annotations

import os
import sys

# The kernels must be real JITFunctions, not interpreter wrappers: drop TRITON_INTERPRET before importing triton.
os.environ.pop("TRITON_INTERPRET", None)
# Same default as the runtime (FP fusion on), without Triton 3.9's warning about the default changing.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"  # compile_one captures ptxas -v (registers, spills) from stdout

import argparse  # noqa: E402
import contextlib  # noqa: E402
import io  # noqa: E402
import re  # noqa: E402
import importlib  # noqa: E402
import pkgutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PACKAGE = "moekernels.ops.triton"


def _fmt_value(v) -> str:
    import triton.language as tl

    if isinstance(v, tl.dtype):
        return v.name
    if isinstance(v, bool):
        return str(int(v))
    return str(v)


def discover(module_filter: str | None = None):
    """-> (specs, problems): specs = [(module_name, kernel, signature, constexprs, options)], problems = [str]."""
    import triton

    pkg = importlib.import_module(PACKAGE)
    specs, problems = [], []
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        if info.name.startswith("_") or (module_filter and module_filter not in info.name):
            continue
        modname = f"{PACKAGE}.{info.name}"
        try:
            mod = importlib.import_module(modname)
        except Exception as e:  # an import error is a failure of that module's kernels
            problems.append(f"{modname}: import failed: {type(e).__name__}: {e}")
            continue
        kernels = {n: obj for n, obj in vars(mod).items()
                   if isinstance(obj, triton.runtime.jit.JITFunction) and n.endswith("_kernel")
                   and obj.fn.__module__ == modname}
        mod_specs = getattr(mod, "AOT_SPECS", None)
        if mod_specs is None:
            if kernels:
                problems.append(f"{modname}: defines {sorted(kernels)} but no AOT_SPECS")
            continue
        covered = set()
        for i, spec in enumerate(mod_specs):
            if len(spec) not in (3, 4):
                problems.append(f"{modname}: AOT_SPECS[{i}] must be (kernel, signature, constexprs[, options])")
                continue
            kernel, signature, constexprs = spec[:3]
            options = dict(spec[3]) if len(spec) == 4 else {}
            covered.add(kernel.__name__)
            specs.append((info.name, kernel, dict(signature), dict(constexprs), options))
        for name in sorted(set(kernels) - covered):
            problems.append(f"{modname}: kernel {name} has no AOT_SPECS entry")
    return specs, problems


def label(spec) -> str:
    modname, kernel, sig, constexprs, options = spec
    ptrs = "/".join(dict.fromkeys(t for t in sig.values() if isinstance(t, str) and t.startswith("*")))
    cfg = " ".join([ptrs] + [f"{k}={_fmt_value(v)}" for k, v in constexprs.items()])
    opts = " ".join(f"{k}={_fmt_value(v)}" for k, v in options.items() if k != "enable_fp_fusion")
    return f"{modname}.{kernel.__name__} [{cfg}{' ' + opts if opts else ''}]"


def compile_one(spec, arch: int) -> tuple[bool, float, str]:
    """Compile one spec for sm_<arch>; -> (ok, seconds, detail)."""
    import triton
    from triton.backends.compiler import GPUTarget

    _mod, kernel, signature, constexprs, options = spec
    sig = {name: signature.get(name, "constexpr" if name in constexprs else None) for name in kernel.arg_names}
    missing = [n for n, t in sig.items() if t is None]
    if missing:
        return False, 0.0, f"signature has no type for {missing}"
    t0 = time.perf_counter()
    log = io.StringIO()
    try:
        src = triton.compiler.ASTSource(fn=kernel, signature=sig, constexprs=constexprs)
        with contextlib.redirect_stdout(log):  # TRITON_DUMP_PTXAS_LOG=1: ptxas -v report (registers, spills)
            compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    except Exception as e:
        msg = "".join(traceback.format_exception_only(type(e), e)).strip().splitlines()
        return False, time.perf_counter() - t0, " | ".join(line for line in msg if line.strip())[-2000:]
    dt = time.perf_counter() - t0
    if "cubin" not in compiled.asm:
        return False, dt, "no cubin produced"
    detail = f"shared={compiled.metadata.shared}B"
    regs = re.findall(r"Used (\d+) registers", log.getvalue())
    spills = [int(a) + int(b) for a, b in re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log.getvalue())]
    if regs:
        detail += f" regs={max(map(int, regs))}"
    if spills:
        detail += f" spill={max(spills)}B" + ("  (WARNING: register spills)" if max(spills) else "")
    return True, dt, detail


_JOBS: list = []


def _run_job(i: int):
    spec, arch = _JOBS[i]
    return compile_one(spec, arch)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="90", help="comma-separated SM versions, e.g. 90,80 (default: 90)")
    ap.add_argument("--module", default=None, help="only modules whose name contains this substring")
    ap.add_argument("-k", dest="match", default=None, help="only specs whose label contains this substring")
    ap.add_argument("--quick", action="store_true", help="first spec of each kernel only, first --arch only")
    ap.add_argument("--list", action="store_true", help="list the specs and exit")
    ap.add_argument("-j", "--jobs", type=int, default=1, help="parallel compile processes (default 1)")
    ap.add_argument("--use-cache", action="store_true",
                    help="use the normal Triton cache (default: a fresh temporary cache, so everything compiles)")
    args = ap.parse_args(argv)

    try:
        import triton  # noqa: F401
    except Exception as e:
        print(f"triton is not importable: {e}")
        return 1
    if not args.use_cache:
        os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="moek-triton-aot-")
    archs = [int(a) for a in args.arch.split(",") if a.strip()]
    t_start = time.perf_counter()
    specs, problems = discover(args.module)
    if args.match:
        specs = [s for s in specs if args.match in label(s)]
    if args.quick:
        seen, first = set(), []
        for s in specs:
            key = (s[0], s[1].__name__)
            if key not in seen:
                seen.add(key)
                first.append(s)
        specs, archs = first, archs[:1]
    for p in problems:
        print(f"FAILED  {p}")
    if args.list:
        for s in specs:
            print(label(s))
        print(f"{len(specs)} specs x {len(archs)} archs")
        return 1 if problems else 0
    if not specs and not problems:
        print("no AOT specs found")
        return 1

    _JOBS[:] = [(s, a) for a in archs for s in specs]
    n_fail = len(problems)
    if args.jobs > 1:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(args.jobs) as pool:
            results = pool.imap(_run_job, range(len(_JOBS)))
            for (spec, arch), (ok, dt, detail) in zip(_JOBS, results):
                n_fail += not ok
                print(f"{'OK    ' if ok else 'FAILED'}  sm_{arch}  {label(spec)}  {dt:.2f}s  {detail}", flush=True)
    else:
        for i, (spec, arch) in enumerate(_JOBS):
            ok, dt, detail = _run_job(i)
            n_fail += not ok
            print(f"{'OK    ' if ok else 'FAILED'}  sm_{arch}  {label(spec)}  {dt:.2f}s  {detail}", flush=True)
    total = time.perf_counter() - t_start
    print(f"{len(_JOBS) - (n_fail - len(problems))}/{len(_JOBS)} compiled, {n_fail} failure(s), "
          f"archs {','.join(f'sm_{a}' for a in archs)}, {total:.1f}s total")
    return 1 if n_fail else 0


if __name__ == "__main__":
    sys.exit(main())
