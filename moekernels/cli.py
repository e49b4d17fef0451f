"""The ``moekernels`` command.

    moekernels demo [--skip-bench]   every backend of every op against its reference, then the benchmark tables
    moekernels info                  versions and which backends can run here (and why not)
    moekernels bench [OP ...]        run benches/bench_<op>.py (from a source checkout)
    moekernels reproduce dualdiff    train and evaluate the DualDiff baselines/variants (see --help)
    moekernels reproduce mixdiffusion  mixDDPM / mixSGM vs DDPM / SGM at reduced budgets (see --help)
    moekernels reproduce molr-mog    MoLR-MoG: exact-score oracle and MoE-latent digits (see --help)
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCHES = REPO / "benches"
# `moekernels reproduce <method>` -> moekernels.methods.<module>.main(argv)
METHODS = {"dualdiff": "dualdiff", "mixdiffusion": "mixdiffusion", "molr-mog": "molr_mog"}


# ------------------------------------------------------------------------------------------------- demo cases
def _mog_case():
    import importlib

    import torch

    op = importlib.import_module("moekernels.ops.mog_posterior")  # (the package attribute is the function)

    g = torch.Generator().manual_seed(0)
    B, D, K = 2000, 24, 13
    means = torch.randn(K, D, generator=g, dtype=torch.float64) * 3 + 1e3  # far from the origin on purpose
    x = means[torch.randint(0, K, (B,), generator=g)] + torch.randn(B, D, generator=g, dtype=torch.float64)
    inputs = [x, means, torch.randn(K, D, generator=g, dtype=torch.float64) * 0.3, torch.randn(K, generator=g, dtype=torch.float64)]

    def run(ts, backend):
        out = op.mog_posterior(*ts, backend=backend)
        return out.log_resp, out.lse

    def ref(ts):
        lr, lse, _ = op.mog_posterior_ref(*ts)
        return lr, lse

    return f"mog_posterior B={B} D={D} K={K} (+1e3 offset)", op.SPEC, inputs, run, ref


def _molr_case():
    import importlib

    import torch

    op = importlib.import_module("moekernels.ops.molr_mog_score")
    g = torch.Generator().manual_seed(0)
    B, D, K, L, d = 1000, 96, 5, 3, 8
    A = torch.linalg.qr(torch.randn(K, D, d, generator=g, dtype=torch.float64)).Q
    mu = torch.randn(K, L, d, generator=g, dtype=torch.float64)
    z = mu[torch.randint(0, K, (B,), generator=g), torch.randint(0, L, (B,), generator=g)]
    x = torch.einsum("kDd,bd->bD", A, z)[:B] * 0.8 + 0.3 * torch.randn(B, D, generator=g, dtype=torch.float64)
    inputs = [x, A, mu, torch.randn(K, L, d, generator=g, dtype=torch.float64) * 0.3,
              torch.randn(K, L, generator=g, dtype=torch.float64)]
    s, gamma = 0.8, 0.3

    def run(ts, backend):
        out = op.molr_mog_score(ts[0], s, gamma, *ts[1:], return_lse=True, backend=backend)
        return out.score, out.lse

    def ref(ts):
        score, _, lse = op.molr_mog_score_ref(ts[0], s, gamma, *ts[1:])
        return score, lse

    return f"molr_mog_score B={B} D={D} K={K} L={L} d={d}", op.SPEC, inputs, run, ref


def _gated_case():
    import importlib

    import torch

    op = importlib.import_module("moekernels.ops.gated_experts")
    g = torch.Generator().manual_seed(0)
    B, n_in, hidden, out, E = 512, 48, 64, 2, 2

    def lin(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64) / shape[-2] ** 0.5

    widths = [(n_in, hidden), (hidden, hidden), (hidden, hidden), (hidden, out)]
    inputs = [torch.randn(B, n_in, generator=g, dtype=torch.float64)]
    for i, o in widths:
        inputs += [lin(E, i, o), 0.1 * torch.randn(E, o, generator=g, dtype=torch.float64)]
    inputs += [lin(n_in, 32), torch.zeros(32, dtype=torch.float64), lin(32, 1), torch.zeros(1, dtype=torch.float64)]
    n_layers = len(widths)

    def split(ts):
        ep = [(ts[1 + 2 * l], ts[2 + 2 * l]) for l in range(n_layers)]
        rest = ts[1 + 2 * n_layers:]
        return ts[0], ep, [(rest[0], rest[1]), (rest[2], rest[3])]

    def run(ts, backend):
        h, ep, gp = split(ts)
        return tuple(op.gated_experts(h, ep, gp, n_residual=2, backend=backend))

    def ref(ts):
        h, ep, gp = split(ts)
        return tuple(op.gated_experts_ref(h, ep, gp, n_residual=2))

    return f"gated_experts B={B} in={n_in} hidden={hidden} E={E} (2 residual blocks)", op.SPEC, inputs, run, ref


CASES = {"mog_posterior": _mog_case, "molr_mog_score": _molr_case, "gated_experts": _gated_case}


def _check_op(name, make, device_for):
    """Forward and backward of every backend in float32 against the float64 reference; one table row each."""
    import torch

    from moekernels.ops import dispatch

    title, spec, inputs64, run, ref = make()
    rows = []
    ref_ts = [t.detach().clone().requires_grad_() for t in inputs64]
    ref_out = ref(ref_ts)
    weights = [torch.randn_like(o) for o in ref_out]
    ref_loss = sum((o * w).sum() for o, w in zip(ref_out, weights))
    ref_grads = torch.autograd.grad(ref_loss, ref_ts)
    ref32 = ref([t.float() for t in inputs64])  # what float32 rounding alone costs, for scale
    err32 = max((o.double() - r.detach()).abs().max().item() for o, r in zip(ref32, ref_out))
    rows.append(("_ref in float32", "(baseline: float32 rounding)", f"{err32:.2e}", ""))
    for backend in dispatch.BACKENDS:
        dev = device_for(backend)
        ts = [t.float().to(dev).requires_grad_() for t in inputs64]
        reasons = dispatch.not_supported_reasons(spec, backend, {"x": ts[0]}) if dev else ["no CUDA device"]
        if reasons:
            rows.append((backend, "skipped: " + "; ".join(reasons), "", ""))
            continue
        try:
            out = run(ts, backend)
            fwd = max((o.double().cpu() - r.detach()).abs().max().item() for o, r in zip(out, ref_out))
            loss = sum((o.double().cpu() * w).sum() for o, w in zip(out, weights))
            grads = torch.autograd.grad(loss, ts, allow_unused=True)
            bwd = max(((g.double().cpu() - r).abs().max() / r.abs().max().clamp(min=1)).item()
                      for g, r in zip(grads, ref_grads) if g is not None)
            finite = all(torch.isfinite(o).all() for o in out)
            rows.append((backend, "ok" if finite else "NON-FINITE", f"{fwd:.2e}", f"{bwd:.2e}"))
        except Exception as e:  # keep going: the demo reports, it does not stop at the first broken backend
            rows.append((backend, f"FAILED: {type(e).__name__}: {str(e).splitlines()[0][:120]}", "", ""))
    return title, rows


def demo(args) -> int:
    import torch

    if not torch.cuda.is_available():  # run the Triton kernels in the interpreter (must precede their definition)
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from moekernels.info import report

    print(report())
    print()

    def device_for(backend):
        if backend == "cuda" or (backend == "triton" and not os.environ.get("TRITON_INTERPRET") == "1"):
            return "cuda" if torch.cuda.is_available() else ("cpu" if backend == "triton" else None)
        return "cpu"

    failed = False
    for name, make in CASES.items():
        title, rows = _check_op(name, make, device_for)
        print(f"## {title}: float32 backends vs the float64 reference")
        print("| backend | status | max fwd err | max rel grad err |\n|---|---|---|---|")
        for backend, status, fwd, bwd in rows:
            print(f"| {backend} | {status} | {fwd} | {bwd} |")
            failed |= status.startswith(("FAILED", "NON-FINITE"))
        print()
    if not args.skip_bench:
        failed |= bench_ops(list(CASES), quick=True) != 0
    return 1 if failed else 0


def bench_ops(ops, quick=False, device=None) -> int:
    if not BENCHES.is_dir():
        print(f"benchmarks live in the source checkout ({BENCHES} not found); skipped")
        return 0
    rc = 0
    for op in ops:
        script = BENCHES / f"bench_{op}.py"
        if not script.exists():
            print(f"no benchmark for {op} ({script.name} missing)")
            continue
        cmd = [sys.executable, str(script)] + (["--quick"] if quick else []) + (["--device", device] if device else [])
        print(f"$ {' '.join(cmd[1:])}", flush=True)
        rc |= subprocess.call(cmd, cwd=REPO)
    return rc


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="moekernels", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("demo", help="check every backend against its reference and print the benchmark tables")
    p.add_argument("--skip-bench", action="store_true", help="only the correctness table")
    sub.add_parser("info", help="versions and available backends")
    p = sub.add_parser("bench", help="run the benchmarks (source checkout)")
    p.add_argument("ops", nargs="*", help=f"ops to benchmark (default: all of {list(CASES)})")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", choices=["cpu", "cuda"])
    p = sub.add_parser("reproduce", help="reproduce a paper's experiments (models/<method>/RESULTS.md)")
    p.add_argument("method", choices=list(METHODS))
    p.add_argument("rest", nargs=argparse.REMAINDER, help="options of the method (e.g. --help)")
    args = parser.parse_args(argv)
    if args.cmd == "reproduce":
        import importlib

        sys.exit(importlib.import_module(f"moekernels.methods.{METHODS[args.method]}").main(args.rest))
    if args.cmd == "info":
        from moekernels.info import main as info_main

        info_main()
        return
    if args.cmd == "bench":
        sys.exit(bench_ops(args.ops or list(CASES), quick=args.quick, device=args.device))
    sys.exit(demo(args))


if __name__ == "__main__":
    main()
