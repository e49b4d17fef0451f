"""Shared helpers of the benchmark scripts ``benches/bench_<op>.py`` (reuse these; don't copy them).

* :func:`add_common_args` -- the flags every bench accepts: ``--device cpu|cuda``, ``--quick``, ``--out DIR``,
  ``--repeat N``, ``--warmup N``, ``--threads N`` (then :func:`apply_threads`).
* :func:`bench` -- times several callables *interleaved* (round-robin, one call of each per round) after a
  warm-up, so that load from other processes on a shared machine hits all of them alike; returns per-callable
  median / min / all times in milliseconds. CUDA work is synchronised around each call.
* :func:`device_tag` / :func:`device_info` -- the CPU model (or GPU name) as a file-name tag and as metadata.
* :func:`markdown_table`, :func:`fmt_ms`, :func:`ratio` -- the printed table.
* :func:`write_results` -- ``<out>/<op>_<device-tag>.json`` with the metadata, the settings and the rows.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import time
from typing import Callable, Mapping, Sequence

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
try:
    _LOADAVG_AT_IMPORT: float | None = os.getloadavg()[0]  # the machine's load when the bench started
except OSError:  # pragma: no cover
    _LOADAVG_AT_IMPORT = None


# ----------------------------------------------------------------------------------------------- arguments
def add_common_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the inputs live (default: cuda if available)")
    parser.add_argument("--quick", action="store_true", help="small shapes, few repeats (seconds; a smoke test)")
    parser.add_argument("--out", default=RESULTS_DIR, help="directory of the JSON results (default: benches/results)")
    parser.add_argument("--repeat", type=int, default=None, help="timed rounds per measurement (median reported)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls of each callable before timing")
    parser.add_argument("--threads", type=int, default=None, action=_ThreadsAction,
                        help="torch.set_num_threads(N) for the run (applied when parsed; default: torch's default); "
                             "the JSON name gets _t<N>")
    return parser


_THREADS_FLAG: int | None = None  # an explicit --threads N, for write_results' file name


class _ThreadsAction(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        global _THREADS_FLAG
        setattr(namespace, self.dest, values)
        _THREADS_FLAG = values
        torch.set_num_threads(values)


def apply_threads(args) -> None:
    """Honours --threads (already applied by the parser; kept for scripts that build args otherwise)."""
    global _THREADS_FLAG
    if getattr(args, "threads", None):
        _THREADS_FLAG = args.threads
        torch.set_num_threads(args.threads)


# ----------------------------------------------------------------------------------------------- devices
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if platform.system() == "Darwin":
        try:
            return subprocess.check_output(["sysctl", "-n", "machdep.cpu.brand_string"], text=True).strip()
        except Exception:
            pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return _cpu_model()


def device_tag(device: str) -> str:
    """File-name tag: the CPU model or GPU name, lower-case, [a-z0-9-] only (e.g. ``amd-epyc``, ``nvidia-h100-80gb-hbm3``)."""
    name = device_name(device).lower()
    name = re.sub(r"\((r|tm)\)", "", name)
    name = re.sub(r"\b(cpu|processor|\d+-core)\b", "", name) if device == "cpu" else name
    tag = re.sub(r"[^a-z0-9]+", "-", name).strip("-")
    return tag or device


def device_info(device: str) -> dict:
    info = {
        "device": device,
        "name": device_name(device),
        "tag": device_tag(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if _LOADAVG_AT_IMPORT is not None:
        info["loadavg_1m_at_start"] = _LOADAVG_AT_IMPORT
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda,
                    capability=f"{p.major}.{p.minor}")
    try:
        import moekernels._extension as ext

        info["moekernels_C"] = ext.available()
        if ext.available():
            info["cpu_capability"] = ext.C.cpu_capability()
            info["C_has_cuda"] = bool(ext.C.has_cuda())
    except Exception as e:  # pragma: no cover
        info["moekernels_C_error"] = repr(e)
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:
        pass
    return info


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------- timing
def bench(fns: Mapping[str, Callable[[], object]], *, device: str = "cpu", warmup: int = 2, repeat: int = 7,
          min_round_s: float = 0.0) -> dict[str, dict]:
    """Time every callable in ``fns``, interleaved: ``warmup`` untimed calls each, then ``repeat`` rounds in which
    each callable runs once (order rotated per round). If ``min_round_s`` > 0, a callable faster than that runs
    several times per timed sample (the sample is the mean per call). Returns name -> {median_ms, min_ms,
    times_ms, calls_per_sample}. A callable that raises is reported as {"error": "..."} and dropped."""
    names = list(fns)
    errors: dict[str, str] = {}
    inner: dict[str, int] = {}
    for n in names:
        try:
            for _ in range(max(1, warmup)):
                fns[n]()
            sync(device)
            t0 = time.perf_counter()
            fns[n]()
            sync(device)
            dt = time.perf_counter() - t0
            inner[n] = max(1, int(min_round_s / max(dt, 1e-9))) if min_round_s > 0 else 1
        except Exception as e:  # keep the other measurements
            errors[n] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
    live = [n for n in names if n not in errors]
    times: dict[str, list[float]] = {n: [] for n in live}
    for r in range(repeat):
        order = live[r % len(live):] + live[:r % len(live)] if live else []
        for n in order:
            f, k = fns[n], inner[n]
            sync(device)
            t0 = time.perf_counter()
            for _ in range(k):
                f()
            sync(device)
            times[n].append((time.perf_counter() - t0) * 1e3 / k)
    out: dict[str, dict] = {}
    for n in names:
        if n in errors:
            out[n] = {"error": errors[n]}
        else:
            ts = times[n]
            out[n] = {"median_ms": statistics.median(ts), "min_ms": min(ts), "times_ms": [round(t, 4) for t in ts],
                      "calls_per_sample": inner[n]}
    return out


def time_fn(fn: Callable[[], object], *, device: str = "cpu", warmup: int = 2, repeat: int = 7) -> dict:
    """One callable: {median_ms, min_ms, times_ms}."""
    return bench({"f": fn}, device=device, warmup=warmup, repeat=repeat)["f"]


# ----------------------------------------------------------------------------------------------- reporting
def fmt_ms(ms: float | None) -> str:
    if ms is None:
        return "-"
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    if ms >= 1:
        return f"{ms:.2f}"
    return f"{ms:.3f}"


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is missing."""
    if a is None or b is None or b == 0:
        return None
    return a / b


def fmt_x(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}x"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(c) for c in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


def write_results(out_dir: str, op: str, device: str, payload: dict) -> str:
    """Writes ``<out_dir>/<op>_<device-tag>.json``; ``_t<N>`` is appended after an explicit ``--threads N``
    (or payload["threads"]) and ``_quick`` when payload["quick"] is true."""
    os.makedirs(out_dir, exist_ok=True)
    info = device_info(device)
    try:
        info["loadavg_1m_at_end"] = os.getloadavg()[0]
    except OSError:
        pass
    threads = payload.get("threads") or _THREADS_FLAG
    suffix = (f"_t{threads}" if threads else "") + ("_quick" if payload.get("quick") else "")
    path = os.path.join(out_dir, f"{op}_{info['tag']}{suffix}.json")
    doc = {"op": op, "date": datetime.datetime.now().isoformat(timespec="seconds"), "device_info": info, **payload}
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    return path
