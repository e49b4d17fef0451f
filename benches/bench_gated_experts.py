"""Throughput of gated_experts (DESIGN.md 3.3) on the DualDiff dual-expert denoiser: the user's eager modules vs
torch.compile vs the stacked plain-PyTorch form vs each fused backend, against the floor (the layers' matrix
products alone).

    python benches/bench_gated_experts.py                 # full shapes, on cuda if available else cpu
    python benches/bench_gated_experts.py --device cpu --quick

Config (the DualDiff expert): in=384, hidden=256, 3 residual blocks, out=2, E=2 experts, sigmoid gate with one
hidden layer of 128 (``--gate-hidden``). Two passes:
  sampling   forward under torch.no_grad() at B=10,000 (--quick: 2,000)
  training   forward + backward at B=256 (--quick: 64): h requires grad in every variant, backward from fixed
             random gradients of (out, gate)
  sampling-loop  the whole DualDiff sampler: 10,000 points x 100 ancestral steps (--quick: 2,000 x 10), each step
             = shared input embedding of (x_t, t) -> model -> DDPMScheduler.step; "modules" / "compile" run the two
             user experts + gate on the embedding, "cpu"/"cuda"/"triton" run DualExpertDenoiser (the method's model
             on GatedExperts); the floor is the forward floor x steps (the embedding and the step are not in it)
  training-hfixed  the same with h NOT requiring grad (DualDiff: h is a fixed embedding of x_t): the modules and
             the floor skip dh = G W0^T; the fused kernels' contract always computes dh (one GEMM of ~13)
Variants (float32 unless --dtype):
  modules    the way a user writes DualDiff: two separate nn.Module experts (nn.Linear layers, residual blocks) and
             an nn.Module gate, out = g e1(h) + (1 - g) e2(h)  (the baseline "eager")
  compile    torch.compile(modules)  (compile time excluded: warm-up calls)
  stacked    gated_experts_eager: shared layer-0 GEMM + baddbmm over the stacked experts (the eager backend)
  cpu / cuda / triton   gated_experts(..., backend=...) (the fused kernels through GatedExpertsFn)
  floor      the matrix products alone, on preallocated operands with out=: forward h @ W0cat (B x in x E*hidden),
             one bmm per later layer, the gate's GEMMs; training adds, per layer, dW = A^T G and dA = G W^T (dh
             only when h requires grad)
Times are medians over --repeat interleaved rounds (benches/_common.bench). Writes
<out>/gated_experts_<device-tag>.json (``_quick`` appended with --quick) and prints a markdown table.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

from moekernels.nn.gated import GatedExperts  # noqa: E402
from moekernels.ops import dispatch  # noqa: E402
from moekernels.ops.gated_experts import SPEC, gated_experts, gated_experts_eager  # noqa: E402


# ----------------------------------------------------------------------------------------------- the user's way
class UserExpert(nn.Module):
    def __init__(self, in_dim, hidden, out_dim, n_residual):
        super().__init__()
        self.inp = nn.Linear(in_dim, hidden)
        self.blocks = nn.ModuleList([nn.Linear(hidden, hidden) for _ in range(n_residual)])
        self.out = nn.Linear(hidden, out_dim)

    def forward(self, h):
        a = self.inp(h)
        for blk in self.blocks:
            a = a + blk(torch.relu(a))
        return self.out(torch.relu(a))


class UserDualDiff(nn.Module):
    """Two separate experts and a sigmoid gate: out = g e1(h) + (1 - g) e2(h)."""

    def __init__(self, in_dim, hidden, out_dim, n_residual, gate_hidden):
        super().__init__()
        self.e1 = UserExpert(in_dim, hidden, out_dim, n_residual)
        self.e2 = UserExpert(in_dim, hidden, out_dim, n_residual)
        layers, w = [], in_dim
        for gh in gate_hidden:
            layers += [nn.Linear(w, gh), nn.ReLU()]
            w = gh
        self.gate = nn.Sequential(*layers, nn.Linear(w, 1))

    def forward(self, h):
        g = torch.sigmoid(self.gate(h))
        return g * self.e1(h) + (1 - g) * self.e2(h), torch.cat([g, 1 - g], dim=-1)

    @torch.no_grad()
    def load_from(self, m: GatedExperts):
        for e, ex in enumerate((self.e1, self.e2)):
            lins = [ex.inp, *ex.blocks, ex.out]
            for lin, W, b in zip(lins, m.weights, m.biases):
                lin.weight.copy_(W[e].T)
                lin.bias.copy_(b[e])
        lins = [l for l in self.gate if isinstance(l, nn.Linear)]
        for lin, W, b in zip(lins, m.gate_weights, m.gate_biases):
            lin.weight.copy_(W.T)
            lin.bias.copy_(b)
        return self


# ----------------------------------------------------------------------------------------------- floor
def floor_fns(m: GatedExperts, h, g_out, g_gate, with_dh: bool = True):
    """The matrix products any implementation must do, on preallocated operands (out= variants)."""
    E, B = m.n_experts, h.shape[0]
    dev, dt = h.device, h.dtype
    Ws = [W.detach() for W in m.weights]
    gWs = [W.detach() for W in m.gate_weights]
    W0cat = Ws[0].permute(1, 0, 2).reshape(Ws[0].shape[1], -1).contiguous()
    A0 = torch.empty(B, W0cat.shape[1], device=dev, dtype=dt)
    acts = [torch.randn(E, B, W.shape[1], device=dev, dtype=dt) for W in Ws[1:]]  # inputs of layers 1..L-1
    outs = [torch.empty(E, B, W.shape[2], device=dev, dtype=dt) for W in Ws[1:]]
    gin = [h] + [torch.randn(B, W.shape[0], device=dev, dtype=dt) for W in gWs[1:]]
    gout = [torch.empty(B, W.shape[1], device=dev, dtype=dt) for W in gWs]
    # backward operands
    G0 = torch.randn(B, W0cat.shape[1], device=dev, dtype=dt)
    dW0 = torch.empty_like(W0cat)
    dh = torch.empty_like(h)
    grads = [torch.randn_like(o) for o in outs]
    dWs = [torch.empty_like(W) for W in Ws[1:]]
    dAs = [torch.empty_like(a) for a in acts]
    gG = [torch.randn_like(o) for o in gout]
    dgWs = [torch.empty_like(W) for W in gWs]
    dgin = [torch.empty_like(x) for x in gin]

    def fwd():
        torch.mm(h, W0cat, out=A0)
        for a, W, o in zip(acts, Ws[1:], outs):
            torch.bmm(a, W, out=o)
        for x, W, o in zip(gin, gWs, gout):
            torch.mm(x, W, out=o)

    def fwdbwd():
        fwd()
        torch.mm(h.T, G0, out=dW0)
        if with_dh:
            torch.mm(G0, W0cat.T, out=dh)
        for a, W, g, dW, dA in zip(acts, Ws[1:], grads, dWs, dAs):
            torch.bmm(a.transpose(1, 2), g, out=dW)
            torch.bmm(g, W.transpose(1, 2), out=dA)
        for x, W, g, dW, dx in zip(gin, gWs, gG, dgWs, dgin):
            torch.mm(x.T, g, out=dW)
            torch.mm(g, W.T, out=dx)
    return fwd, fwdbwd


# ----------------------------------------------------------------------------------------------- variants
def fused_backends(device):
    return ["cpu"] if device == "cpu" else ["cuda", "triton"]


def run_shape(name, B, args, device, dtype, train: bool, h_grad: bool = True):
    torch.manual_seed(0)
    m = GatedExperts(args.in_dim, args.hidden, args.out_dim, n_experts=2, n_residual=args.n_residual,
                     gate_hidden=args.gate_hidden, device=device, dtype=dtype)
    user = UserDualDiff(args.in_dim, args.hidden, args.out_dim, args.n_residual, args.gate_hidden).to(device, dtype)
    user.load_from(m)
    h = torch.randn(B, args.in_dim, device=device, dtype=dtype)
    g_out = torch.randn(B, args.out_dim, device=device, dtype=dtype)
    g_gate = torch.randn(B, 2, device=device, dtype=dtype)
    ep, gp = m.expert_params, m.gate_params

    def call(kind):
        if kind == "modules":
            return lambda x: user(x)
        if kind == "compile":
            cu = torch.compile(user, dynamic=False)
            return lambda x: cu(x)
        if kind == "stacked":
            return lambda x: gated_experts_eager(x, ep, gp, n_residual=args.n_residual)
        return lambda x, _b=kind: gated_experts(x, ep, gp, n_residual=args.n_residual, backend=_b)

    variants = ["modules", "compile", "stacked"]
    skipped = {}
    for b in fused_backends(device):
        reasons = dispatch.not_supported_reasons(SPEC, b, {"h": h})
        if reasons:
            skipped[b] = reasons
        else:
            variants.append(b)
    fns, check = {}, {}
    hg = h.detach().clone().requires_grad_(h_grad)
    params = list(m.parameters()) + list(user.parameters()) + [hg]
    with torch.no_grad():
        want = user(h)
    for v in variants:
        f = call(v)
        if train:
            def run(f=f):
                out, gate = f(hg)
                torch.autograd.backward([out, gate], [g_out, g_gate])
                for p in params:
                    p.grad = None
        else:
            def run(f=f):
                with torch.no_grad():
                    return f(h)
        fns[v] = run
        if v != "compile":
            with torch.no_grad():
                got = f(h)
            check[v] = {"max_abs_diff_out_vs_modules": (got[0] - want[0]).abs().max().item(),
                        "max_abs_diff_gate_vs_modules": (got[1] - want[1]).abs().max().item()}
    fl_f, fl_fb = floor_fns(m, h, g_out, g_gate, with_dh=h_grad)
    fns["floor"] = fl_fb if train else fl_f
    warmup = args.warmup if args.warmup is not None else 3
    repeat = args.repeat if args.repeat is not None else (5 if args.quick else 11)
    res = C.bench(fns, device=device, warmup=warmup, repeat=repeat, min_round_s=0.05 if train else 0.0)
    return {"name": name, "B": B, "pass": "forward+backward" if train else "forward (no_grad)", "h_requires_grad": h_grad,
            "results": res,
            "skipped": skipped, "check": check}


def run_loop(name, B, steps, args, device, dtype):
    """The full sampling loop, timed end to end (one call = `steps` ancestral steps from N(0, I))."""
    from moekernels.diffusion.ddpm import DDPMScheduler
    from moekernels.methods.dualdiff import DualExpertDenoiser

    torch.manual_seed(0)
    sched = DDPMScheduler(100)
    sched.set_timesteps(steps)
    model = DualExpertDenoiser(gate_hidden=args.gate_hidden, backend="eager").to(device, dtype).eval()
    m = model.experts
    user = UserDualDiff(m.in_dim, args.hidden, args.out_dim,
                        args.n_residual, args.gate_hidden).to(device, dtype)
    user.load_from(m)
    x0 = torch.randn(B, 2, device=device, dtype=dtype)
    ts = sched.timesteps.tolist()

    def loop(eps_fn):
        def run():
            g = torch.Generator(device=device).manual_seed(0)
            x = x0
            with torch.no_grad():
                for t in ts:
                    tt = torch.full((B,), t, device=device, dtype=torch.long)
                    x = sched.step(eps_fn(x, tt), t, x, generator=g)
            return x
        return run

    fns, skipped = {}, {}
    fns["modules"] = loop(lambda x, t: user(model.embed(x, t))[0])
    cu = torch.compile(user, dynamic=False)
    fns["compile"] = loop(lambda x, t: cu(model.embed(x, t))[0])
    for b in fused_backends(device):
        reasons = dispatch.not_supported_reasons(SPEC, b, {"h": x0.new_empty(B, args.in_dim)})
        if reasons:
            skipped[b] = reasons
            continue
        def fused(x, t, _b=b):
            m.backend = _b
            return model(x, t)
        fns[b] = loop(fused)
    fl_f, _ = floor_fns(m, torch.randn(B, args.in_dim, device=device, dtype=dtype), None, None)

    def floor():
        for _ in ts:
            fl_f()
    fns["floor"] = floor
    check = {}
    want = fns["modules"]()
    for v in fns:
        if v not in ("modules", "compile", "floor"):
            check[v] = {"max_abs_diff_samples_vs_modules": (fns[v]() - want).abs().max().item()}
    repeat = args.repeat if args.repeat is not None else 3
    res = C.bench(fns, device=device, warmup=1, repeat=repeat, min_round_s=0.0)
    return {"name": name, "B": B, "pass": f"sampling loop ({steps} steps, no_grad)", "h_requires_grad": False,
            "results": res, "skipped": skipped, "check": check}


def table(results):
    rows = []
    for r in results:
        res = r["results"]
        med = lambda n: res.get(n, {}).get("median_ms")
        for n, v in res.items():
            if "error" in v:
                rows.append([r["name"], n, "error: " + v["error"][:60], "", "", "", ""])
                continue
            rows.append([r["name"], n, C.fmt_ms(v["median_ms"]), C.fmt_ms(v["min_ms"]),
                         C.fmt_x(C.ratio(med("modules"), v["median_ms"])),
                         C.fmt_x(C.ratio(med("compile"), v["median_ms"])),
                         C.fmt_x(C.ratio(v["median_ms"], med("floor")))])
    return C.markdown_table(["shape", "variant", "median ms", "min ms", "speedup vs modules (eager)",
                             "speedup vs compile", "time / floor"], rows)


def main(argv=None):
    p = C.add_common_args(argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    p.add_argument("--dtype", choices=("float32", "float64", "float16", "bfloat16"), default="float32")
    p.add_argument("--in-dim", type=int, default=384)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--out-dim", type=int, default=2)
    p.add_argument("--n-residual", type=int, default=3)
    p.add_argument("--gate-hidden", type=lambda s: tuple(int(x) for x in s.split(",") if x), default=(128,),
                   help="comma-separated gate hidden widths (default 128; '' = linear gate)")
    p.add_argument("--only", choices=("sampling", "sampling-loop", "training"), default=None)
    args = p.parse_args(argv)
    device, dtype = args.device, getattr(torch, args.dtype)
    Bt = 64 if args.quick else 256
    shapes = [("sampling", 2000 if args.quick else 10000, False, True), ("training", Bt, True, True),
              ("training-hfixed", Bt, True, False)]
    results = []
    for name, B, train, h_grad in shapes:
        if args.only and (not name.startswith(args.only) or args.only == "sampling-loop"):
            continue
        label = f"{name} B={B}"
        print(f"[bench_gated_experts] {label} ({args.dtype}, {device})", flush=True)
        results.append(run_shape(label, B, args, device, dtype, train, h_grad))
    if args.only in (None, "sampling-loop"):
        B, steps = (2000, 10) if args.quick else (10000, 100)
        label = f"sampling-loop B={B} x {steps} steps"
        print(f"[bench_gated_experts] {label} ({args.dtype}, {device})", flush=True)
        results.append(run_loop(label, B, steps, args, device, dtype))
    print()
    print(f"gated_experts (DualDiff expert in={args.in_dim} hidden={args.hidden} res={args.n_residual} "
          f"out={args.out_dim} E=2 gate_hidden={args.gate_hidden}) on {C.device_name(device)} ({args.dtype}, torch "
          f"threads {torch.get_num_threads()}); medians in ms; speedup = other / this; time / floor = this / floor")
    print(table(results))
    for r in results:
        for b, why in r["skipped"].items():
            print(f"  {r['name']}: {b} skipped: {'; '.join(why)}")
    path = C.write_results(args.out, "gated_experts", device, {
        "quick": args.quick, "dtype": args.dtype,
        "config": {"in": args.in_dim, "hidden": args.hidden, "n_residual": args.n_residual, "out": args.out_dim,
                   "E": 2, "gate_hidden": list(args.gate_hidden)},
        "results": results,
        "notes": "sampling: forward under no_grad; training: forward+backward with h requiring grad, from fixed "
                 "gradients of (out, gate); floor = the matrix products alone on preallocated operands"})
    print(f"\nwrote {path}")
    return results


if __name__ == "__main__":
    main()
