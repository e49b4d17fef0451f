"""Throughput of mog_posterior (DESIGN.md 3.2): eager vs torch.compile vs the readable ref vs each fused backend,
forward and forward+backward, against the floor (the matrix products the op cannot avoid, timed alone).

    python benches/bench_mog_posterior.py                 # full shapes, on cuda if available else cpu
    python benches/bench_mog_posterior.py --device cpu --quick

Variants (float32 unless --dtype):
  eager    mog_posterior_eager: squared distances by matrix products (the eager backend; the baseline)
  compile  torch.compile(mog_posterior_eager)  (compile time excluded: warm-up calls)
  ref      mog_posterior_ref, the readable B x K x D broadcast -- timed on the first `ref_rows` rows only (it
           allocates several B x K x D temporaries); the table shows that time scaled by B / ref_rows, the
           JSON has both
  cpu / cuda / triton   the public mog_posterior(..., backend=...) (fused kernels through MoGPosteriorFn)
  floor    diagonal: [x^2, x] @ W, the B x 2D x K product; isotropic: x @ W (B x D x K). Forward+backward adds
           the two products of its backward (G @ W^T and G^T @ [x^2, x]).
forward: under torch.no_grad(). forward+backward: inputs require grad, backward from given (log_resp, lse)
gradients. Times are medians over --repeat interleaved rounds (benches/_common.bench; a callable faster than
2 ms runs several times per sample). On a shared machine also run --threads 1 (less sensitive to other load).
Writes <out>/mog_posterior_<device-tag>.json (``_quick`` appended with --quick) and prints a markdown table.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

from moekernels.ops import dispatch  # noqa: E402
from moekernels.ops.mog_posterior import SPEC, mog_posterior, mog_posterior_eager, mog_posterior_ref  # noqa: E402

FULL_SHAPES = [
    dict(name="diag B65536 D64 K64", B=65536, D=64, K=64, iso=False),
    dict(name="iso B65536 D2 K16", B=65536, D=2, K=16, iso=True),
    dict(name="diag B8192 D784 K10", B=8192, D=784, K=10, iso=False),
]
QUICK_SHAPES = [
    dict(name="diag B4096 D32 K16", B=4096, D=32, K=16, iso=False),
    dict(name="iso B4096 D2 K16", B=4096, D=2, K=16, iso=True),
    dict(name="diag B512 D100 K10", B=512, D=100, K=10, iso=False),
]
REF_MAX_ELEMENTS = 1 << 24  # B_sub * K * D of the ref's largest temporary


def make_inputs(B, D, K, iso, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(K, D, generator=g) * 3.0
    x = means[torch.randint(0, K, (B,), generator=g)] + torch.randn(B, D, generator=g)
    log_var = torch.randn(K, generator=g) * 0.3 if iso else torch.randn(K, D, generator=g) * 0.3
    log_pi = torch.randn(K, generator=g)
    grads = (torch.randn(B, K, generator=g), torch.randn(B, generator=g))
    cast = lambda t: t.to(device=device, dtype=dtype).contiguous()
    return [cast(t) for t in (x, means, log_var, log_pi)], [cast(t) for t in grads]


def fused_backends(device):
    return ["cpu"] if device == "cpu" else ["cuda", "triton"]


def forward_fn(fn, args):
    def run():
        with torch.no_grad():
            return fn(*args)
    return run


def fwdbwd_fn(fn, args, grads):
    leaves = [a.detach().clone().requires_grad_() for a in args]

    def run():
        out = fn(*leaves)
        torch.autograd.backward([out[0], out[1]], list(grads))
        for t in leaves:
            t.grad = None
    return run


def floor_fns(x, means, iso, grads):
    """The matrix products any implementation must do (same FLOPs as the eager formulation's GEMMs)."""
    K, D = means.shape
    A = x if iso else torch.cat([x * x, x], dim=1)  # (B, D) or (B, 2D)
    W = torch.randn(A.shape[1], K, device=x.device, dtype=x.dtype)
    G = grads[0]

    def fwd():
        return A @ W

    def fwdbwd():
        A @ W
        G @ W.T
        return G.T @ A  # dW^T: same FLOPs as A^T @ G, and the faster of the two in MKL for small K
    return fwd, fwdbwd


def run_shape(shape, args, device, dtype):
    B, D, K, iso = shape["B"], shape["D"], shape["K"], shape["iso"]
    inputs, grads = make_inputs(B, D, K, iso, device, dtype)
    x, means, log_var, log_pi = inputs
    warmup = args.warmup if args.warmup is not None else 2
    repeat = args.repeat if args.repeat is not None else (3 if args.quick else 7)

    compiled_f = torch.compile(mog_posterior_eager, dynamic=False)
    compiled_fb = torch.compile(mog_posterior_eager, dynamic=False)
    fwd = {"eager": forward_fn(mog_posterior_eager, inputs), "compile": forward_fn(compiled_f, inputs)}
    fb = {"eager": fwdbwd_fn(mog_posterior_eager, inputs, grads), "compile": fwdbwd_fn(compiled_fb, inputs, grads)}
    skipped = {}
    for b in fused_backends(device):
        reasons = dispatch.not_supported_reasons(SPEC, b, {"x": x, "means": means, "log_var": log_var, "log_pi": log_pi})
        if reasons:
            skipped[b] = reasons
            continue
        op = lambda *a, _b=b: mog_posterior(*a, backend=_b)
        fwd[b] = forward_fn(op, inputs)
        fb[b] = fwdbwd_fn(op, inputs, grads)
    fl_f, fl_fb = floor_fns(x, means, iso, grads)
    fwd["floor"], fb["floor"] = fl_f, fl_fb

    # accuracy sanity of each fused backend against eager (max |diff| of log_resp and lse), same inputs
    check = {}
    with torch.no_grad():
        e = mog_posterior_eager(*inputs)
        for b in fwd:
            if b in ("eager", "compile", "floor"):
                continue
            o = mog_posterior(*inputs, backend=b)
            check[b] = {"max_abs_diff_log_resp_vs_eager": (o.log_resp.float() - e[0].float()).abs().max().item(),
                        "max_abs_diff_lse_vs_eager": (o.lse.float() - e[1].float()).abs().max().item(),
                        "assign_agreement_vs_eager": (o.assign == e[2]).float().mean().item()}

    res_f = C.bench(fwd, device=device, warmup=warmup, repeat=repeat, min_round_s=0.002)
    res_fb = C.bench(fb, device=device, warmup=warmup, repeat=repeat, min_round_s=0.002)

    # the readable ref on a row subset (it materialises B x K x D several times)
    rows = max(1, min(B, REF_MAX_ELEMENTS // max(1, K * D)))
    sub = [x[:rows]] + inputs[1:]
    sub_grads = [grads[0][:rows], grads[1][:rows]]
    ref_f = C.bench({"ref": forward_fn(mog_posterior_ref, sub)}, device=device, warmup=1, repeat=3)["ref"]
    ref_fb = C.bench({"ref": fwdbwd_fn(mog_posterior_ref, sub, sub_grads)}, device=device, warmup=1, repeat=3)["ref"]
    for r in (ref_f, ref_fb):
        if "median_ms" in r:
            r["rows_timed"] = rows
            r["scale_to_B"] = B / rows
            r["median_ms_subset"], r["min_ms_subset"] = r["median_ms"], r["min_ms"]
            r["median_ms"], r["min_ms"] = r["median_ms"] * B / rows, r["min_ms"] * B / rows
    res_f["ref"], res_fb["ref"] = ref_f, ref_fb
    return {"shape": shape, "forward": res_f, "forward_backward": res_fb, "skipped": skipped, "check": check,
            "ref_rows": rows}


def table(results):
    rows = []
    for r in results:
        for pas, key in (("fwd", "forward"), ("fwd+bwd", "forward_backward")):
            res = r[key]
            med = lambda n: res.get(n, {}).get("median_ms")
            for n, v in res.items():
                if "error" in v:
                    rows.append([r["shape"]["name"], pas, n, "error: " + v["error"][:60], "", "", "", ""])
                    continue
                label = n if n != "ref" else f"ref (x{v['scale_to_B']:.0f} from {v['rows_timed']} rows)"
                rows.append([r["shape"]["name"], pas, label, C.fmt_ms(v["median_ms"]), C.fmt_ms(v["min_ms"]),
                             C.fmt_x(C.ratio(med("eager"), v["median_ms"])),
                             C.fmt_x(C.ratio(med("compile"), v["median_ms"])),
                             C.fmt_x(C.ratio(v["median_ms"], med("floor")))])
    return C.markdown_table(["shape", "pass", "variant", "median ms", "min ms", "speedup vs eager",
                             "speedup vs compile", "time / floor"], rows)


def main(argv=None):
    p = C.add_common_args(argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    p.add_argument("--dtype", choices=("float32", "float64", "float16", "bfloat16"), default="float32")
    p.add_argument("--only", default=None, help="run only the shapes whose name contains this string")
    args = p.parse_args(argv)
    C.apply_threads(args)
    device, dtype = args.device, getattr(torch, args.dtype)
    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    if args.only:
        shapes = [s for s in shapes if args.only in s["name"]]
    results = []
    for s in shapes:
        print(f"[bench_mog_posterior] {s['name']} ({args.dtype}, {device})", flush=True)
        results.append(run_shape(s, args, device, dtype))
    print()
    print(f"mog_posterior on {C.device_name(device)} ({args.dtype}, torch threads {torch.get_num_threads()}); "
          "medians in ms; speedup = other / this; time / floor = this / floor")
    print(table(results))
    for r in results:
        if r["skipped"]:
            for b, why in r["skipped"].items():
                print(f"  {r['shape']['name']}: {b} skipped: {'; '.join(why)}")
    path = C.write_results(args.out, "mog_posterior", device, {
        "quick": args.quick, "threads": args.threads, "dtype": args.dtype, "results": results,
        "notes": "forward under no_grad; forward+backward from given gradients of (log_resp, lse); ref timed on "
                 "a row subset and scaled by B / rows_timed (median_ms_subset is the measured time)"})
    print(f"\nwrote {path}")
    return results


if __name__ == "__main__":
    main()
