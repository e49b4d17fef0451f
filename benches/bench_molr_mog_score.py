"""Throughput of molr_mog_score (DESIGN.md 3.1): eager vs torch.compile vs each fused backend, forward and
forward+backward, against the floor (the matrix products the op cannot avoid, timed alone in the same run).

    python benches/bench_molr_mog_score.py                       # full shapes, on cuda if available else cpu
    python benches/bench_molr_mog_score.py --device cpu --quick  # seconds
    python benches/bench_molr_mog_score.py --times per-row       # one t per row (training) instead of one t

Shapes: B=4096, K=10, L=4, d=16 with D in {64, 784, 4096}; the latent case A=None, D=d=64, K=10, L=64.
Variants (float32 unless --dtype):
  eager    molr_mog_score_eager: projections by one matmul against A_cat, the B x K x L x d broadcast for the
           rest (the eager backend; the baseline). Where its B x K x L x d temporaries would exceed
           --eager-max-elements (the latent case: 168M per temporary), eager and compile are timed on a row subset
           and scaled by B / rows (marked in the table; the JSON has both).
  compile  torch.compile(molr_mog_score_eager) (compile time excluded: warm-up calls)
  cpu / cuda / triton   the public molr_mog_score(..., backend=...) (fused kernels through MoLRMoGScoreFn)
  floor    the GEMMs alone: forward X A_cat and C A_cat^T (2 x 2BDKd FLOPs); forward+backward adds the backward's
           five (Z = X A_cat recomputed, G A_cat, dZ A_cat^T, G^T C, X^T dZ): 7 x 2BDKd FLOPs. None for A=None.
Columns: GFLOP/s = the floor's FLOPs / this variant's time (for the floor row itself: the machine's GEMM rate at
these sizes); peak MB = extra peak memory of one call (CPU: the RSS high-water mark, reset through
/proc/self/clear_refs; CUDA: torch.cuda.max_memory_allocated).
forward: under torch.no_grad(). forward+backward: x, A, mu, log_var, log_pi require grad; backward from a given
gradient of the score. Medians over --repeat interleaved rounds (benches/_common.bench).
Writes <out>/molr_mog_score_<device-tag>.json (``_quick`` appended with --quick) and prints a markdown table.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

from moekernels.ops import dispatch  # noqa: E402
from moekernels.ops.molr_mog_score import SPEC, molr_mog_score, molr_mog_score_eager  # noqa: E402

FULL_SHAPES = [
    dict(name="B4096 D64 K10 L4 d16", B=4096, D=64, K=10, L=4, d=16, identity=False),
    dict(name="B4096 D784 K10 L4 d16", B=4096, D=784, K=10, L=4, d=16, identity=False),
    dict(name="B4096 D4096 K10 L4 d16", B=4096, D=4096, K=10, L=4, d=16, identity=False),
    dict(name="latent B4096 D=d64 K10 L64", B=4096, D=64, K=10, L=64, d=64, identity=True),
]
QUICK_SHAPES = [
    dict(name="B512 D64 K10 L4 d16", B=512, D=64, K=10, L=4, d=16, identity=False),
    dict(name="B512 D256 K10 L4 d16", B=512, D=256, K=10, L=4, d=16, identity=False),
    dict(name="latent B256 D=d32 K4 L16", B=256, D=32, K=4, L=16, d=32, identity=True),
]


def make_inputs(shape, device, dtype, per_row, seed=0):
    B, D, K, L, d = (shape[k] for k in ("B", "D", "K", "L", "d"))
    g = torch.Generator().manual_seed(seed)
    A = None if shape["identity"] else torch.linalg.qr(torch.randn(K, D, d, generator=g))[0].contiguous()
    mu = torch.randn(K, L, d, generator=g)
    log_var = torch.randn(K, L, d, generator=g) * 0.3
    log_pi = torch.randn(K, L, generator=g)
    k = torch.randint(0, K, (B,), generator=g)
    z = mu[k, torch.randint(0, L, (B,), generator=g)] + torch.randn(B, d, generator=g)
    x = (z if A is None else torch.einsum("bDd,bd->bD", A[k], z)) * 0.8 + 0.5 * torch.randn(B, D, generator=g)
    if per_row:
        s, gam = torch.rand(B, generator=g) * 0.9 + 0.1, torch.rand(B, generator=g) * 0.9 + 0.1
    else:
        s, gam = torch.full((B,), 0.8), torch.full((B,), 0.5)
    G = torch.randn(B, D, generator=g)
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype).contiguous()
    return [cast(t) for t in (x, A, mu, log_var, log_pi)], cast(s), cast(gam), cast(G)


def forward_fn(fn, tensors, s, g):
    def run():
        with torch.no_grad():
            return fn(tensors[0], s, g, *tensors[1:])
    return run


def fwdbwd_fn(fn, tensors, s, g, G):
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in tensors]

    def run():
        out = fn(leaves[0], s, g, *leaves[1:])
        out = out[0] if isinstance(out, tuple) else out
        out.backward(G)
        for t in leaves:
            if t is not None:
                t.grad = None
    return run


def floor_fns(x, A, G):
    """The op's GEMMs alone (same shapes): 2 forward, 7 forward+backward."""
    K, D, d = A.shape
    A_cat = A.permute(1, 0, 2).reshape(D, K * d).contiguous()
    Cm = torch.randn(x.shape[0], K * d, device=x.device, dtype=x.dtype)
    dZ = torch.randn_like(Cm)

    def fwd():
        x @ A_cat
        return Cm @ A_cat.T

    def fwdbwd():
        x @ A_cat
        Cm @ A_cat.T
        x @ A_cat  # backward: recompute Z
        G @ A_cat  # dC
        dZ @ A_cat.T  # dX
        G.T @ Cm  # dA (1)
        return x.T @ dZ  # dA (2)
    return fwd, fwdbwd


def _status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return None


_LIBC = None


def memory_phase_setup(device):
    """CPU: make glibc return freed tensors to the OS (fixed 64 KiB mmap threshold, heap trimming), so that the
    RSS high-water mark tracks live tensors. Called after every timing: it would slow the timed calls."""
    global _LIBC
    if device != "cpu":
        return
    try:
        import ctypes

        _LIBC = ctypes.CDLL("libc.so.6")
        _LIBC.mallopt(-3, 65536)  # M_MMAP_THRESHOLD
        _LIBC.mallopt(-1, 65536)  # M_TRIM_THRESHOLD
    except OSError:
        _LIBC = None


def peak_mb(fn, device):
    """Extra peak memory of one call (after one warm-up call), MB; None where it cannot be measured.
    CPU: RSS high-water mark (reset through /proc/self/clear_refs) minus RSS before the call.
    CUDA: torch.cuda.max_memory_allocated minus memory_allocated before the call."""
    fn()
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    try:
        if _LIBC is not None:
            _LIBC.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the RSS high-water mark (Linux >= 4.0)
        base = _status_kb("VmRSS")
        fn()
        return (_status_kb("VmHWM") - base) / 1024
    except (OSError, TypeError):
        return None


def run_shape(shape, args, device, dtype):
    B, D, K, L, d = (shape[k] for k in ("B", "D", "K", "L", "d"))
    tensors, s, g, G = make_inputs(shape, device, dtype, args.times == "per-row")
    warmup = args.warmup if args.warmup is not None else 2
    repeat = args.repeat if args.repeat is not None else (3 if args.quick else 7)

    # eager / compile on a row subset where the B x K x L x d temporaries are too big
    rows = max(1, min(B, args.eager_max_elements // (K * L * d)))
    sub = [tensors[0][:rows]] + tensors[1:]
    sub_s, sub_g, sub_G = s[:rows], g[:rows], G[:rows]
    scale_eager = B / rows

    compiled_f = torch.compile(molr_mog_score_eager, dynamic=False)
    compiled_fb = torch.compile(molr_mog_score_eager, dynamic=False)
    fwd = {"eager": forward_fn(molr_mog_score_eager, sub, sub_s, sub_g),
           "compile": forward_fn(compiled_f, sub, sub_s, sub_g)}
    fb = {"eager": fwdbwd_fn(molr_mog_score_eager, sub, sub_s, sub_g, sub_G),
          "compile": fwdbwd_fn(compiled_fb, sub, sub_s, sub_g, sub_G)}
    skipped = {}
    names = ("x", "A", "mu", "log_var", "log_pi")
    for b in (["cpu"] if device == "cpu" else ["cuda", "triton"]):
        reasons = dispatch.not_supported_reasons(SPEC, b, {n: t for n, t in zip(names, tensors) if t is not None})
        if reasons:
            skipped[b] = reasons
            continue
        op = lambda *a, _b=b: molr_mog_score(*a, backend=_b)
        fwd[b] = forward_fn(op, tensors, s, g)
        fb[b] = fwdbwd_fn(op, tensors, s, g, G)
    if not shape["identity"]:
        fwd["floor"], fb["floor"] = floor_fns(tensors[0], tensors[1], G)

    # accuracy sanity of each fused backend against eager on the eager rows
    check = {}
    with torch.no_grad():
        e = molr_mog_score_eager(sub[0], sub_s, sub_g, *sub[1:])[0].float()
        for b in fwd:
            if b in ("eager", "compile", "floor"):
                continue
            o = molr_mog_score(tensors[0], s, g, *tensors[1:], backend=b)[:rows].float()
            check[b] = {"max_rel_diff_score_vs_eager": ((o - e).abs().max() / e.abs().max()).item()}

    res = {}
    for key, fns in (("forward", fwd), ("forward_backward", fb)):
        r = C.bench(fns, device=device, warmup=warmup, repeat=repeat)
        gemms = 2 if key == "forward" else 7
        flops = None if shape["identity"] else gemms * 2.0 * B * D * K * d
        for n, v in r.items():
            if "error" in v:
                continue
            if n in ("eager", "compile") and scale_eager != 1:
                v.update(rows_timed=rows, scale_to_B=scale_eager, median_ms_subset=v["median_ms"],
                         min_ms_subset=v["min_ms"])
                v["median_ms"], v["min_ms"] = v["median_ms"] * scale_eager, v["min_ms"] * scale_eager
            v["gemm_flops"] = flops
            v["gflops_per_s"] = None if flops is None else flops / (v["median_ms"] * 1e6)
        res[key] = r
    result = {"shape": shape, "forward": res["forward"], "forward_backward": res["forward_backward"],
              "skipped": skipped, "check": check, "eager_rows": rows}
    return result, {"forward": fwd, "forward_backward": fb}


def measure_memory(result, fns, device):
    for key in ("forward", "forward_backward"):
        for n, v in result[key].items():
            if "error" in v:
                continue
            pk = peak_mb(fns[key][n], device)
            if "scale_to_B" in v:
                v["peak_mb_subset"] = pk  # measured on the row subset; not scaled
                v["peak_mb"] = None
            else:
                v["peak_mb"] = pk


def table(results):
    rows = []
    for r in results:
        for pas, key in (("fwd", "forward"), ("fwd+bwd", "forward_backward")):
            res = r[key]
            med = lambda n: res.get(n, {}).get("median_ms")
            for n, v in res.items():
                if "error" in v:
                    rows.append([r["shape"]["name"], pas, n, "error: " + v["error"][:60]] + [""] * 6)
                    continue
                label = n if "scale_to_B" not in v else f"{n} (x{v['scale_to_B']:.0f} from {v['rows_timed']} rows)"
                pk = v.get("peak_mb")
                pk = f"{pk:.0f}" if pk is not None else (f"{v['peak_mb_subset']:.0f} (subset)"
                                                         if v.get("peak_mb_subset") is not None else "-")
                gf = v.get("gflops_per_s")
                rows.append([r["shape"]["name"], pas, label, C.fmt_ms(v["median_ms"]), C.fmt_ms(v["min_ms"]),
                             C.fmt_x(C.ratio(med("eager"), v["median_ms"])),
                             C.fmt_x(C.ratio(med("compile"), v["median_ms"])),
                             C.fmt_x(C.ratio(v["median_ms"], med("floor"))),
                             "-" if gf is None else f"{gf:.0f}", pk])
    return C.markdown_table(["shape", "pass", "variant", "median ms", "min ms", "speedup vs eager",
                             "speedup vs compile", "time / floor", "GFLOP/s", "peak MB"], rows)


def main(argv=None):
    p = C.add_common_args(argparse.ArgumentParser(description=__doc__,
                                                  formatter_class=argparse.RawDescriptionHelpFormatter))
    p.add_argument("--dtype", choices=("float32", "float64", "float16", "bfloat16"), default="float32")
    p.add_argument("--times", choices=("scalar", "per-row"), default="scalar",
                   help="one (s, gamma) for the batch (sampling) or one per row (training)")
    p.add_argument("--only", default=None, help="run only the shapes whose name contains this string")
    p.add_argument("--eager-max-elements", type=int, default=1 << 26,
                   help="largest B x K x L x d temporary eager/compile may allocate; beyond it they run on a row subset")
    args = p.parse_args(argv)
    device, dtype = args.device, getattr(torch, args.dtype)
    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    if args.only:
        shapes = [s for s in shapes if args.only in s["name"]]
    results, all_fns = [], []
    for s in shapes:
        print(f"[bench_molr_mog_score] {s['name']} ({args.dtype}, {device}, times {args.times})", flush=True)
        r, fns = run_shape(s, args, device, dtype)
        results.append(r)
        all_fns.append(fns)
    print("[bench_molr_mog_score] peak memory (after all timings)", flush=True)
    memory_phase_setup(device)
    for r, fns in zip(results, all_fns):
        measure_memory(r, fns, device)
    print()
    print(f"molr_mog_score on {C.device_name(device)} ({args.dtype}, times {args.times}, torch threads "
          f"{torch.get_num_threads()}); medians in ms; speedup = other / this; time / floor = this / floor; "
          "GFLOP/s = the op's GEMM FLOPs / this time")
    print(table(results))
    for r in results:
        for b, why in r["skipped"].items():
            print(f"  {r['shape']['name']}: {b} skipped: {'; '.join(why)}")
        for b, c in r["check"].items():
            print(f"  {r['shape']['name']}: {b} max |score - eager| / max |eager| = "
                  f"{c['max_rel_diff_score_vs_eager']:.1e}")
    tag = "" if args.times == "scalar" else "_per-row"
    path = C.write_results(args.out, "molr_mog_score" + tag, device, {
        "quick": args.quick, "dtype": args.dtype, "times": args.times, "results": results,
        "command": "python benches/bench_molr_mog_score.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "notes": "forward under no_grad; forward+backward from a given score gradient; floor = the op's GEMMs "
                 "alone (2 forward, 7 forward+backward); eager/compile scaled from a row subset where marked"})
    print(f"\nwrote {path}")
    return results


if __name__ == "__main__":
    main()
