"""DualDiff method: parameter counts of every paper configuration, the dual model against the baseline
architecture, the diversity loss, the EMA rule, checkpoint/resume, a tiny training run, sampling, the CLI."""
import json

import numpy as np
import pytest
import torch
from torch import nn

from moekernels.diffusion.ddpm import DDPMScheduler
from moekernels.diffusion.training import EMA, TrainConfig, train
from moekernels.methods import dualdiff as dd


def _has_gated():
    try:
        dd._gated_experts_cls()
        return True
    except Exception:
        return False


needs_gated = pytest.mark.skipif(not _has_gated(), reason="moekernels.nn.GatedExperts not available")


def _lin(i, o):
    return i * o + o


def _expert(head=()):
    w = [256] + list(head) + [2]
    return _lin(384, 256) + 3 * _lin(256, 256) + sum(_lin(a, b) for a, b in zip(w, w[1:]))


def test_baseline_parameter_count():
    assert _expert() == 296_450
    assert dd.count_parameters(dd.build_model("baseline")) == 296_450


@needs_gated
@pytest.mark.parametrize("variant,head,gate", [
    ("dual", (), (256,)), ("dual_biggate", (), (256, 128)), ("dual_extra", (128,), (256, 128)),
    ("dual_div0.1", (128,), (256, 128)), ("dual_div0.05", (128,), (256, 128))])
def test_dual_parameter_counts(variant, head, gate):
    gw = [384] + list(gate) + [1]
    expected = 2 * _expert(head) + sum(_lin(a, b) for a, b in zip(gw, gw[1:]))
    assert dd.count_parameters(dd.build_model(variant)) == expected
    assert dd.VARIANTS[variant].diversity_weight == {"dual_div0.1": 0.1, "dual_div0.05": 0.05}.get(variant, 0.0)


@needs_gated
def test_dual_with_equal_experts_is_the_baseline():
    """Copy the baseline's weights into both experts: the output must equal the baseline's for any gate."""
    base, dual = dd.build_model("baseline").double(), dd.build_model("dual", backend="eager").double()
    linears = [base.network[0]] + [blk.ff for blk in base.network[1:4]] + [base.network[5]]
    ge = dual.experts
    with torch.no_grad():
        for l, lin in enumerate(linears):
            ge.weights[l].copy_(lin.weight.t().expand_as(ge.weights[l]))
            ge.biases[l].copy_(lin.bias.expand_as(ge.biases[l]))
    x = torch.randn(33, 2, dtype=torch.float64)
    t = torch.randint(0, 100, (33,))
    out, g = dual.forward_with_gate(x, t)
    torch.testing.assert_close(out, base(x, t))
    assert g.shape == (33,) and bool(((g > 0) & (g < 1)).all())


def test_diversity_loss_matches_pairwise_loop():
    e = torch.randn(7, 2, dtype=torch.float64)
    loop = sum(float(torch.linalg.norm(e[i] - e[j])) for i in range(7) for j in range(7)) / 49
    assert float(dd.diversity_loss(e)) == pytest.approx(-loop, rel=1e-12)


def test_ema_rule():
    p = nn.Linear(1, 1, bias=False)
    ema = EMA(p, beta=0.995, update_every=10, update_after_step=100)
    vals = []
    for s in range(131):
        with torch.no_grad():
            p.weight.fill_(float(s))
        ema.update(p)
        vals.append(float(ema.ema_model.weight))
    assert vals[5] == 0.0 and vals[10] == 10.0 and vals[100] == 100.0 and vals[109] == 100.0  # plain copies
    # step 110: first touch after the copy phase initialises by a copy (ema_pytorch); step 120: counter 121 ->
    # decay 1 - (1 + 20)^(-2/3)
    assert vals[110] == 110.0 and vals[119] == 110.0
    d = 1 - 21 ** (-2 / 3)
    assert vals[120] == pytest.approx(d * 110 + (1 - d) * 120, rel=1e-6)
    ema.step = 10_000
    assert ema.current_decay() == 0.995  # capped


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 16), nn.ReLU(), nn.Linear(16, 2))

    def forward(self, x, t):
        return self.net(torch.cat([x, t[:, None].float() / 100], 1))


def test_checkpointing_does_not_change_the_run_and_a_finished_run_is_reloaded(tmp_path):
    data = torch.randn(100, 2)
    sched = DDPMScheduler(100)
    cfg = TrainConfig(steps=30, batch_size=16, checkpoint_every=10, progress=False, seed=3)
    torch.manual_seed(0)
    full = train(_Tiny(), data, dd.make_loss_fn(sched), cfg)
    torch.manual_seed(0)
    part = train(_Tiny(), data, dd.make_loss_fn(sched), cfg, checkpoint_path=tmp_path / "c.pt")
    assert full.history["loss"] == part.history["loss"]
    ck = torch.load(tmp_path / "c.pt", weights_only=False)
    assert ck["step"] == 30 and len(ck["history"]["loss"]) == 30
    torch.manual_seed(123)
    res = train(_Tiny(), data, dd.make_loss_fn(sched), cfg, checkpoint_path=tmp_path / "c.pt")  # already finished
    assert res.history["loss"] == full.history["loss"]
    for a, b in zip(res.model.state_dict().values(), part.model.state_dict().values()):
        assert torch.equal(a, b)


def test_resume_mid_run_is_bitwise_identical(tmp_path):
    data = torch.randn(100, 2)
    sched = DDPMScheduler(100)
    base = dict(batch_size=16, checkpoint_every=7, progress=False, seed=1)
    torch.manual_seed(0)
    full = train(_Tiny(), data, dd.make_loss_fn(sched), TrainConfig(steps=20, **base))
    # interrupt the same 20-step run at step 8 (last checkpoint: step 7, mid-epoch with 6 batches per epoch)
    torch.manual_seed(0)
    m = _Tiny()
    cfg = TrainConfig(steps=20, **base)
    calls = {"n": 0}
    inner = dd.make_loss_fn(sched)

    def dying(model, x0, gen):
        calls["n"] += 1
        if calls["n"] == 9:
            raise KeyboardInterrupt
        return inner(model, x0, gen)

    with pytest.raises(KeyboardInterrupt):
        train(m, data, dying, cfg, checkpoint_path=tmp_path / "y.pt")
    assert torch.load(tmp_path / "y.pt", weights_only=False)["step"] == 7
    res = train(_Tiny(), data, dd.make_loss_fn(sched), cfg, checkpoint_path=tmp_path / "y.pt")
    assert res.history["loss"] == full.history["loss"]
    for a, b in zip(res.ema_model.state_dict().values(), full.ema_model.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("variant", ["baseline", pytest.param("dual_extra", marks=needs_gated)])
def test_tiny_training_run_decreases_the_loss(variant):
    torch.manual_seed(0)
    data = torch.from_numpy(dd.get_dataset("moons", 2000))
    sched = DDPMScheduler(100)
    model = dd.build_model(variant, backend="eager")
    res = train(model, data, dd.make_loss_fn(sched, dd.VARIANTS[variant].diversity_weight),
                TrainConfig(steps=60, batch_size=64, lr=1e-3, progress=False))
    mse = np.asarray(res.history.get("mse", res.history["loss"]))
    assert mse[-20:].mean() < 0.8 * mse[:10].mean()
    assert dd.eval_loss(res.model, data[:256], sched, 128) < 0.8 * mse[:10].mean()
    assert len(res.history["lr"]) == 60 and np.isfinite(res.history["loss"]).all() and res.history["lr"][0] == 1e-3 and res.history["lr"][-1] < 1e-5


@needs_gated
def test_diversity_variant_records_both_terms():
    torch.manual_seed(0)
    data = torch.from_numpy(dd.get_dataset("line", 500))
    res = train(dd.build_model("dual_div0.05", backend="eager"), data, dd.make_loss_fn(DDPMScheduler(100), 0.05),
                TrainConfig(steps=3, batch_size=32, progress=False))
    h = res.history
    np.testing.assert_allclose(h["loss"], np.add(h["mse"], np.multiply(0.05, h["diversity"])), rtol=1e-5)
    assert all(d < 0 for d in h["diversity"])


@needs_gated
def test_sampling_reproducible_with_gate():
    torch.manual_seed(0)
    model = dd.build_model("dual", backend="eager")
    sched = DDPMScheduler(100)
    sched.set_timesteps(10)  # sample() resets to its own num_inference_steps
    a, g = dd.sample(model, sched, n=50, seed=5, num_inference_steps=20, return_gate=True)
    b = dd.sample(model, sched, n=50, seed=5, num_inference_steps=20)
    assert a.shape == (50, 2) and torch.equal(a, b) and g.shape == (50,)
    assert not torch.equal(a, dd.sample(model, sched, n=50, seed=6, num_inference_steps=20))
    assert dd.sample(dd.build_model("baseline"), sched, n=20, seed=0, num_inference_steps=5, return_gate=True)[1] is None


def test_main_writes_metrics_plots_and_results(tmp_path):
    variants = ["baseline", "dual"] if _has_gated() else ["baseline"]
    results = tmp_path / "RESULTS.md"
    results.write_text("# notes\n")
    rc = dd.main(["--datasets", "line", "--variants", *variants, "--seeds", "0", "--steps", "20", "--batch-size",
                  "32", "--n-samples", "200", "--out", str(tmp_path / "runs"), "--no-progress", "--backend", "eager",
                  "--n-data", "2000", "--sampling-steps", "10", "--results", str(results), "--recipe", str(tmp_path / "none.toml")])
    assert rc == 0
    for v in variants:
        run = tmp_path / "runs" / v / "line" / "seed0"
        m = json.loads((run / "metrics.json").read_text())
        assert m["steps"] == 20 and np.isfinite(m["kl_bits"]) and m["n_params"] > 0
        assert (run / "samples.png").stat().st_size > 0 and (run / "loss.png").exists() and (run / "ckpt.pt").exists()
        assert (run / "gate_hist.png").exists() == (v != "baseline")
    text = results.read_text()
    assert text.startswith("# notes") and dd.BEGIN in text and "| baseline | line |" in text
    dd.main(["--datasets", "line", "--variants", "baseline", "--seeds", "0", "--steps", "20", "--batch-size", "32",
             "--n-samples", "200", "--out", str(tmp_path / "runs"), "--no-progress", "--no-plots",
             "--n-data", "2000", "--sampling-steps", "10",
             "--results", str(results), "--recipe", str(tmp_path / "none.toml")])  # reuses the finished run
    assert results.read_text().count(dd.BEGIN) == 1
    # --table-only: seed 1 was never run, so it is listed as missing and nothing is trained
    dd.main(["--datasets", "line", "--variants", "baseline", "--seeds", "0", "1", "--steps", "20", "--batch-size",
             "32", "--n-samples", "200", "--out", str(tmp_path / "runs"), "--no-progress", "--n-data", "2000",
             "--sampling-steps", "10", "--table-only", "--results", str(results),
             "--recipe", str(tmp_path / "none.toml")])
    assert not (tmp_path / "runs" / "baseline" / "line" / "seed1").exists()
    assert "| baseline | line | 296,450 | 1 |" in results.read_text()


def test_discrete_schedule_is_the_ddpm_noising():
    sched = DDPMScheduler(100)
    view = sched.schedule()
    x0, noise = torch.randn(7, 2, dtype=torch.float64), torch.randn(7, 2, dtype=torch.float64)
    t = torch.tensor([0, 3, 17, 50, 98, 99, 42])
    torch.testing.assert_close(view.add_noise(x0, noise, t.double()), sched.add_noise(x0, noise, t))
    s, g = view(t)
    assert s.dtype == torch.float64
    torch.testing.assert_close(s ** 2 + g ** 2, torch.ones(7, dtype=torch.float64))
    assert view.s(5) == pytest.approx(float(sched.alphas_cumprod[5]) ** 0.5)
    with pytest.raises(ValueError, match="integer"):
        view.gamma(0.5)


def test_mog_expert_is_the_exact_mixture_eps_when_gated_off():
    """With the gate closed, the "mog" denoiser's eps is -gamma_t * score of the noised Gaussian mixture, checked
    against an independent float64 formula."""
    torch.manual_seed(0)
    sched = DDPMScheduler(100)
    data = torch.randn(300, 2, dtype=torch.float64) * 2
    model = dd.build_model(dd.VariantConfig("mog", n_components=24), backend="eager", scheduler=sched).double()
    model.init_from_data(data, torch.Generator().manual_seed(1))
    assert all(any(torch.equal(m, r) for r in data) for m in model.mog.mu[0])  # means are data rows
    with torch.no_grad():
        model.mog.log_var.uniform_(-4, -1)
        model.mog.log_pi.normal_()
        model.gate[-1].bias.fill_(-60.0)  # g = sigmoid(-60 + ...) ~ 1e-26: the mixture expert alone
        model.gate[-1].weight.zero_()
    x, t = torch.randn(11, 2, dtype=torch.float64) * 2, torch.randint(0, 100, (11,))
    ab = sched.alphas_cumprod[t][:, None, None]
    C, V = model.mog.mu[0].detach(), model.mog.log_var[0].detach().exp()
    v = ab * V + (1 - ab)
    diff = x[:, None] - ab.sqrt() * C
    w = torch.softmax(torch.log_softmax(model.mog.log_pi[0].detach(), 0) - 0.5 * (diff ** 2 / v + v.log()).sum(-1), 1)
    want = (w[..., None] * diff / v).sum(1) * (1 - ab[:, 0]).sqrt()
    eps, g = model.forward_with_gate(x, t)
    torch.testing.assert_close(eps, want, rtol=1e-9, atol=1e-12)
    assert float(g.detach().max()) < 1e-20
    with pytest.raises(ValueError, match="n_components"):
        model.init_from_data(data[:5])
