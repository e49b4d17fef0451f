"""mixDDPM and mixSGM: diffusion with a Gaussian-mixture prior and a dispatcher (arXiv 2410.19149), end to end.

The paper's full text was not available to us; this implements the formulation stated in its abstract:

* K centres c_k with weights p_k (``moekernels.nn.MixturePrior``: a diagonal Gaussian mixture fitted by EM with
  ``MoGDispatcher.fit`` / the fused ``mog_posterior`` op); a dispatcher sends each training point to the argmax
  component (default) or to a component drawn from its posterior.
* mixDDPM: standard DDPM on x - c_k. Forward x_t = sqrt(abar_t) x_0 + (1 - sqrt(abar_t)) c_k + sqrt(1 - abar_t) eps;
  loss ||eps - eps_theta(x_t, t[, k])||^2; sampling draws k ~ p, x_T ~ N(c_k, I), then the project's
  ``DDPMScheduler.step`` on x - c_k (+ c_k after each step). No second copy of the DDPM step.
* mixSGM: the VP-SDE recentred on c_k, dx = -beta(t)/2 (x - c_k) dt + sqrt(beta(t)) dW, trained by denoising score
  matching in the eps form (score = -eps / gamma); sampling by Euler-Maruyama on the reverse SDE or Euler on the
  probability-flow ODE (``moekernels.diffusion.sde``) with centre c_k.
* DDPM / SGM are the same classes with ``MixturePrior.standard(dim)`` (K = 1, c = 0): same network, same steps.
* One shared network ``EpsMLP`` (sinusoidal time embedding); conditioning on k (a learned embedding of the
  component index added to the first hidden layer) is an option (methods ``mixddpm+k`` / ``mixsgm+k``).

Reverse effort: E||x_T - x_0||^2 over generated chains (x_T the prior draw, x_0 the output), compared with the
analytic reduction sum_k p_k ||c_k||^2 of ``MixturePrior.effort_reduction``.

Command line: ``moekernels reproduce mixdiffusion`` (``main(argv)``; see ``build_parser`` and
``models/mixdiffusion/recipe.toml``).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from moekernels.data.gmm import GMM_DATASETS, get_gmm
from moekernels.diffusion.ddpm import DDPMScheduler
from moekernels.diffusion.embeddings import sinusoidal_embedding
from moekernels.diffusion.schedules import VPSchedule
from moekernels.diffusion.sde import probability_flow_sample, reverse_sde_sample
from moekernels.diffusion.training import TrainConfig, train
from moekernels.methods._results import begin_marker, load_recipe, write_generated
from moekernels.nn.mixture_prior import MixturePrior

__all__ = ["EpsMLP", "ExactGMMEps", "oracle_rows", "MixDDPM", "MixSGM", "METHODS", "DATASETS", "RunConfig", "run_one", "build_model",
           "summarize", "main", "build_parser"]

REPO = Path(__file__).resolve().parents[2]
METHODS = ("ddpm", "mixddpm", "mixddpm+k", "sgm", "mixsgm", "mixsgm+k")
DATASETS = tuple(GMM_DATASETS) + ("digits",)


# ------------------------------------------------------------------------------------------------ network
class EpsMLP(nn.Module):
    """eps_theta(x, t[, k]): Linear(D + time_emb -> hidden) [+ Embedding(k)], ``n_residual`` blocks
    h + Linear(SiLU(h)), SiLU, Linear(hidden -> D). ``t`` is embedded by ``sinusoidal_embedding(t, time_emb)``.

    Args:
        dim: D. hidden: width. n_residual: residual blocks. time_emb: even embedding size.
        n_components: 0 (no conditioning) or K (a learned K x hidden embedding of the component index).
    """

    def __init__(self, dim: int, hidden: int = 128, n_residual: int = 2, time_emb: int = 64, n_components: int = 0):
        super().__init__()
        for name, v, lo in (("dim", dim, 1), ("hidden", hidden, 1), ("n_residual", n_residual, 0),
                            ("time_emb", time_emb, 4), ("n_components", n_components, 0)):
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ValueError(f"EpsMLP: {name} must be an int >= {lo}, got {v!r}")
        if time_emb % 2:
            raise ValueError(f"EpsMLP: time_emb must be even, got {time_emb}")
        self.dim, self.time_emb, self.n_components = dim, time_emb, n_components
        self.inp = nn.Linear(dim + time_emb, hidden)
        self.k_emb = nn.Embedding(n_components, hidden) if n_components else None
        self.blocks = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(n_residual))
        self.out = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, t: torch.Tensor, k: torch.Tensor | None = None) -> torch.Tensor:
        t = torch.as_tensor(t, device=x.device)
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        h = self.inp(torch.cat((x, sinusoidal_embedding(t.to(x.dtype), self.time_emb)), dim=-1))
        if self.k_emb is not None:
            if k is None:
                raise ValueError("EpsMLP: this network is conditioned on the component: pass k")
            h = h + self.k_emb(k)
        for blk in self.blocks:
            h = h + blk(F.silu(h))
        return self.out(F.silu(h))


def _check_model_args(net, prior, condition_on_k, where):
    if not isinstance(net, EpsMLP):
        raise ValueError(f"{where}: net must be an EpsMLP, got {type(net).__name__}")
    if not isinstance(prior, MixturePrior):
        raise ValueError(f"{where}: prior must be a MixturePrior, got {type(prior).__name__}")
    if net.dim != prior.dim:
        raise ValueError(f"{where}: net.dim={net.dim} != prior.dim={prior.dim}")
    if condition_on_k and net.n_components != prior.n_components:
        raise ValueError(f"{where}: condition_on_k needs net.n_components == prior.n_components "
                         f"({net.n_components} != {prior.n_components})")
    if not prior.fitted:
        raise ValueError(f"{where}: prior is not fitted: call prior.fit(x) or use MixturePrior.standard(dim)")


class _MixBase(nn.Module):
    def __init__(self, net, prior, condition_on_k, where):
        super().__init__()
        _check_model_args(net, prior, condition_on_k, where)
        self.net, self.prior, self.condition_on_k = net, prior, bool(condition_on_k)
        self.prior.requires_grad_(False)  # fitted once by EM, never by the diffusion loss

    def _k(self, k):
        return k if self.condition_on_k else None

    def training_loss(self, x0, generator=None):  # pragma: no cover - abstract
        raise NotImplementedError

    @staticmethod
    def loss_fn(model, batch, generator):
        """``loss_fn`` for ``moekernels.diffusion.training.train``."""
        return model.training_loss(batch, generator)


class MixDDPM(_MixBase):
    """DDPM on x - c_k with a ``MixturePrior`` (``MixturePrior.standard`` gives plain DDPM).

    forward(x_t, t (B,) int, k (B,)) -> eps_hat; ``training_loss(x0, generator)``; ``sample(n, generator)``.
    """

    def __init__(self, net: EpsMLP, prior: MixturePrior, scheduler: DDPMScheduler, condition_on_k: bool = False):
        super().__init__(net, prior, condition_on_k, "MixDDPM")
        if not isinstance(scheduler, DDPMScheduler):
            raise ValueError(f"MixDDPM: scheduler must be a DDPMScheduler, got {type(scheduler).__name__}")
        self.scheduler = scheduler

    def forward(self, x, t, k=None):
        return self.net(x, t, self._k(k))

    def q_sample(self, x0, noise, t, k):
        """x_t = c_k + add_noise(x0 - c_k, noise, t)."""
        c = self.prior.centres_of(k, x0.dtype)
        return c + self.scheduler.add_noise(x0 - c, noise, t)

    def training_loss(self, x0, generator=None):
        k = self.prior.dispatch(x0, generator=generator)
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
        t = torch.randint(0, self.scheduler.num_train_timesteps, (x0.shape[0],), generator=generator)
        mse = F.mse_loss(self(self.q_sample(x0, noise, t, k), t, k), noise)
        return mse, {}

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None, num_inference_steps: int | None = None,
               return_start: bool = False):
        """k ~ p, x_T ~ N(c_k, I), ancestral ``DDPMScheduler.step`` on x - c_k. Returns x_0 (n, D), and with
        ``return_start`` also (x_T, k)."""
        xT, k = self.prior.sample(n, generator=generator, return_components=True)
        c = self.prior.centres_of(k, xT.dtype)
        self.scheduler.set_timesteps(num_inference_steps or self.scheduler.num_train_timesteps)
        x = xT
        for t in self.scheduler.timesteps.tolist():
            tt = torch.full((n,), t, dtype=torch.long)
            x = c + self.scheduler.step(self(x, tt, k), t, x - c, generator=generator)
        return (x, xT, k) if return_start else x


class MixSGM(_MixBase):
    """VP-SDE recentred on c_k (``MixturePrior.standard`` gives the plain VP SGM), eps-parametrised score
    (score = -eps / gamma); the network sees ``time_scale * t``."""

    def __init__(self, net: EpsMLP, prior: MixturePrior, schedule: VPSchedule | None = None,
                 condition_on_k: bool = False, t_min: float = 1e-3, time_scale: float = 1000.0):
        super().__init__(net, prior, condition_on_k, "MixSGM")
        self.schedule = schedule if schedule is not None else VPSchedule()
        if not isinstance(self.schedule, VPSchedule):
            raise ValueError(f"MixSGM: schedule must be a VPSchedule, got {type(self.schedule).__name__}")
        if not (isinstance(t_min, (int, float)) and 0 < t_min < 1):
            raise ValueError(f"MixSGM: t_min must be in (0, 1), got {t_min!r}")
        if not (isinstance(time_scale, (int, float)) and 0 < time_scale < math.inf):
            raise ValueError(f"MixSGM: time_scale must be a finite number > 0, got {time_scale!r}")
        self.t_min, self.time_scale = float(t_min), float(time_scale)

    def forward(self, x, t, k=None):
        return self.net(x, t * self.time_scale, self._k(k))

    def q_sample(self, x0, noise, t, k):
        """x_t = c_k + s(t) (x0 - c_k) + gamma(t) noise."""
        c = self.prior.centres_of(k, x0.dtype)
        return c + self.schedule.add_noise(x0 - c, noise, t)

    def training_loss(self, x0, generator=None):
        k = self.prior.dispatch(x0, generator=generator)
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
        t = self.t_min + (1 - self.t_min) * torch.rand(x0.shape[0], generator=generator, dtype=x0.dtype)
        mse = F.mse_loss(self(self.q_sample(x0, noise, t, k), t, k), noise)
        return mse, {}

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None, n_steps: int = 200, sampler: str = "sde",
               return_start: bool = False):
        """k ~ p, x_T ~ N(c_k, I), then the reverse SDE (``sampler="sde"``) or the probability-flow ODE
        (``"ode"``) with centre c_k. Returns x_0, and with ``return_start`` also (x_T, k)."""
        if sampler not in ("sde", "ode"):
            raise ValueError(f"MixSGM.sample: sampler must be 'sde' or 'ode', got {sampler!r}")
        xT, k = self.prior.sample(n, generator=generator, return_components=True)
        c = self.prior.centres_of(k, xT.dtype)

        def model(x, t):
            return self(x, t, k)

        if sampler == "sde":
            x = reverse_sde_sample(model, self.schedule, xT, n_steps, self.t_min, center=c, generator=generator)
        else:
            x = probability_flow_sample(model, self.schedule, xT, n_steps, self.t_min, center=c)
        return (x, xT, k) if return_start else x


class ExactGMMEps(EpsMLP):
    """The exact eps of an isotropic Gaussian-mixture data set under a ``MixturePrior``'s recentred forward process
    (an oracle network: no training). Data component j (mean mu_j, std sd_j, weight w_j) is dispatched to prior
    component ``assign[j]``; given x_t (and k when ``condition_on_k``), eps = E[eps | x_t (, k)] =
    sum_j post_j gamma (x_t - m_j) / v_j with m_j = c + s (mu_j - c), v_j = s^2 sd_j^2 + gamma^2, c = c_assign[j].
    ``s_gamma(t)`` maps the network's time input to (s, gamma) tensors."""

    def __init__(self, mu, sd, w, prior: MixturePrior, s_gamma, assign=None):
        super().__init__(mu.shape[1], hidden=4, n_residual=0, time_emb=4, n_components=prior.n_components)
        self.mu, self.sd, self.logw = mu.double(), sd.double(), w.double().log()
        c = prior.centres.double()
        self.assign = (torch.cdist(self.mu, c).argmin(1) if assign is None else assign)
        self.c = c[self.assign]  # (J, D) centre of each data component
        self.covered = torch.zeros(prior.n_components, dtype=torch.bool)
        self.covered[self.assign] = True  # prior components with at least one data component
        self.s_gamma = s_gamma

    def forward(self, x, t, k=None):
        s, g = self.s_gamma(t)
        s, g = s.double().reshape(-1, 1, 1), g.double().reshape(-1, 1, 1)
        xd = x.double()[:, None, :]
        m = self.c + s * (self.mu - self.c)                      # (B, J, D)
        v = s[..., 0] ** 2 * self.sd ** 2 + g[..., 0] ** 2         # (B, J)
        logp = self.logw - 0.5 * x.shape[1] * v.log() - 0.5 * (xd - m).square().sum(-1) / v
        if k is not None:
            if not bool(self.covered[k].all()):
                empty = sorted(set(k.tolist()) - set(self.assign.tolist()))
                raise ValueError(f"ExactGMMEps: no data component is assigned to prior component(s) {empty} "
                                 f"(assign={self.assign.tolist()}): the eps conditioned on such a k is undefined")
            logp = logp.masked_fill(self.assign[None, :] != k[:, None], -math.inf)
        post = torch.softmax(logp, -1)
        return (post[..., None] * g * (xd - m) / v[..., None]).sum(1).to(x.dtype)


def oracle_rows(cfg: RunConfig) -> list:
    """Every method's sampler with the exact eps (``ExactGMMEps``) on a synthetic set: separates what the
    formulation and sampler do from what training does. One sampling seed."""
    spec = GMM_DATASETS[cfg.dataset]
    mu, sd, w = (torch.from_numpy(a) for a in spec.arrays())
    x_train, ref, _ = _load_data(cfg)
    rows = []
    for meth in METHODS:
        c = replace(cfg, method=meth)
        model = build_model(c, x_train)
        if isinstance(model, MixDDPM):
            ab = model.scheduler.alphas_cumprod
            sg = lambda t, ab=ab: (ab[t.long()].sqrt(), (1 - ab[t.long()]).sqrt())  # noqa: E731
        else:
            sch, ts = model.schedule, model.time_scale
            sg = lambda t, sch=sch, ts=ts: (sch.s(t.double() / ts), sch.gamma(t.double() / ts))  # noqa: E731
        model.net = ExactGMMEps(mu, sd, w, model.prior, sg)
        model.condition_on_k = meth.endswith("+k")
        for sampler in (["ddpm"] if isinstance(model, MixDDPM) else ["sde", "ode"]):
            gen = torch.Generator().manual_seed(cfg.seed + 12345)
            if sampler == "ddpm":
                x0, xT, _ = model.sample(cfg.n_samples, generator=gen, return_start=True)
            else:
                x0, xT, _ = model.sample(cfg.n_samples, generator=gen, n_steps=cfg.sgm_steps, sampler=sampler,
                                         return_start=True)
            m = _sample_metrics(cfg, x0, xT, ref, spec)
            rows.append({"dataset": cfg.dataset, "method": meth, "sampler": sampler, **m})
    return rows


def oracle_table(rows: list) -> str:
    lines = ["| dataset | " + " | ".join(f"{r['method']} ({r['sampler']})" for r in rows if r["dataset"] == rows[0]["dataset"])
             + " |", "|---|" + "---:|" * sum(r["dataset"] == rows[0]["dataset"] for r in rows)]
    for ds in dict.fromkeys(r["dataset"] for r in rows):
        rs = [r for r in rows if r["dataset"] == ds]
        metric = MAIN_METRIC[ds]
        lines.append(f"| {ds} ({metric} / effort) | " + " | ".join(f"{r[metric]:.3g} / {r['effort']:.3g}" for r in rs) + " |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ one run
@dataclass
class RunConfig:
    dataset: str = "sep2d"
    method: str = "mixddpm"
    budget: float = 1.0             # fraction of full_steps
    seed: int = 0
    full_steps: int = 3000
    batch_size: int = 256
    lr: float = 1e-3
    hidden: int = 128
    n_residual: int = 2
    time_emb: int = 64
    n_components: int = 0           # 0: the true number of modes (synthetic) / 10 (digits)
    soft_dispatch: bool = False
    ddpm_timesteps: int = 200
    ddpm_beta_end: float = 0.1      # linear 1e-4..beta_end: abar_T ~ 3e-5, so N(0, I) / N(c_k, I) is the right prior
    sgm_steps: int = 200
    n_data: int = 20000
    n_samples: int = 4000
    n_ref: int = 20000
    progress: bool = True


def _load_data(cfg: RunConfig):
    """(train x, reference x for the metrics, spec or None)."""
    if cfg.dataset == "digits":
        from moekernels.data.digits import load_digits

        return load_digits("train")[0], load_digits("all")[0], None
    spec = GMM_DATASETS[cfg.dataset]
    return (get_gmm(cfg.dataset, cfg.n_data, seed=1000 + cfg.seed)[0], get_gmm(cfg.dataset, cfg.n_ref, seed=999_999)[0],
            spec)


def build_model(cfg: RunConfig, x_train: torch.Tensor) -> nn.Module:
    """The method's model (prior fitted on x_train for the mix* methods); network initialised from cfg.seed."""
    if cfg.method not in METHODS:
        raise ValueError(f"build_model: method must be one of {METHODS}, got {cfg.method!r}")
    D = x_train.shape[1]
    mix, cond = cfg.method.startswith("mix"), cfg.method.endswith("+k")
    K = cfg.n_components or (10 if cfg.dataset == "digits" else GMM_DATASETS[cfg.dataset].n_components)
    if mix:
        prior = MixturePrior(K, D, hard=not cfg.soft_dispatch).fit(
            x_train, generator=torch.Generator().manual_seed(cfg.seed), n_iter=200, tol=1e-4)
    else:
        prior = MixturePrior.standard(D)
    torch.manual_seed(cfg.seed)
    net = EpsMLP(D, cfg.hidden, cfg.n_residual, cfg.time_emb, n_components=K if cond else 0)
    if "ddpm" in cfg.method:
        return MixDDPM(net, prior, DDPMScheduler(cfg.ddpm_timesteps, 1e-4, cfg.ddpm_beta_end), condition_on_k=cond)
    return MixSGM(net, prior, VPSchedule(0.1, 20.0), condition_on_k=cond)


def _sample_metrics(cfg, x0, xT, ref, spec, prefix=""):
    from moekernels.metrics.wasserstein import mode_coverage, sliced_wasserstein, wasserstein_1d

    m = {prefix + "effort": float((xT.double() - x0.double()).square().sum(1).mean())}
    if not bool(torch.isfinite(x0).all()):
        m[prefix + "nonfinite"] = int((~torch.isfinite(x0)).any(1).sum())
        x0 = torch.nan_to_num(x0, nan=1e6, posinf=1e6, neginf=-1e6)
    if spec is None:  # digits
        from moekernels.metrics.frechet import classify, digits_fid

        m[prefix + "fid"] = float(digits_fid(x0, real=ref))
        _, hist = classify(x0)
        hist = np.asarray(hist, dtype=np.float64)
        m[prefix + "label_hist"] = hist.tolist()
        from moekernels.data.digits import load_digits

        true = np.bincount(load_digits("all")[1].numpy(), minlength=10) / len(ref)
        m[prefix + "label_tv"] = float(0.5 * np.abs(hist - true).sum())
        return m
    if x0.shape[1] == 1:
        m[prefix + "w1"] = wasserstein_1d(x0, ref)
    else:
        from moekernels.metrics.knn import knn_kl_divergence

        m[prefix + "sw1"] = sliced_wasserstein(x0, ref, n_projections=256, seed=0)
        m[prefix + "knn_kl_bits"] = knn_kl_divergence(ref.numpy(), x0.numpy(), k=5)
    means, stds, weights = spec.arrays()
    cov = mode_coverage(x0, means, stds, weights)
    m[prefix + "mode_tv"] = cov["tv"]
    m[prefix + "mode_min_ratio"] = cov["min_ratio"]
    m[prefix + "mode_fractions"] = cov["fractions"]
    m[prefix + "off_mode"] = cov["off_mode"]
    return m


def run_one(cfg: RunConfig, out_dir: str | Path | None = None) -> dict:
    """Fit the prior, train, sample and evaluate one (dataset, method, budget, seed); writes metrics.json and
    samples.npy into ``out_dir`` when given. Returns the metrics."""
    x_train, ref, spec = _load_data(cfg)
    t0 = time.perf_counter()
    model = build_model(cfg, x_train)
    fit_s = time.perf_counter() - t0
    steps = max(1, int(round(cfg.budget * cfg.full_steps)))
    tcfg = TrainConfig(steps=steps, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed, progress=cfg.progress,
                       checkpoint_every=0, ema_update_every=1, ema_update_after_step=min(100, steps // 10))
    res = train(model, x_train, MixDDPM.loss_fn, tcfg)
    ema = res.ema_model
    gen = torch.Generator().manual_seed(cfg.seed + 12345)
    t0 = time.perf_counter()
    m = {"config": asdict(cfg), "steps": steps, "train_time_s": res.train_time_s, "prior_fit_s": fit_s,
         "final_loss_mean_last100": float(np.mean(res.history["loss"][-100:])),
         "first_loss_mean_first20": float(np.mean(res.history["loss"][:20])),
         "n_params": sum(p.numel() for p in model.net.parameters()),
         "prior_K": model.prior.n_components, "effort_reduction_analytic": model.prior.effort_reduction(),
         "prior_weights": model.prior.weights.tolist()}
    samples = {}
    if isinstance(model, MixDDPM):
        x0, xT, _ = ema.sample(cfg.n_samples, generator=gen, return_start=True)
        m.update(_sample_metrics(cfg, x0, xT, ref, spec))
        samples["samples"] = x0
    else:
        x0, xT, _ = ema.sample(cfg.n_samples, generator=gen, n_steps=cfg.sgm_steps, sampler="sde", return_start=True)
        m.update(_sample_metrics(cfg, x0, xT, ref, spec))
        samples["samples"] = x0
        x0, xT, _ = ema.sample(cfg.n_samples, generator=torch.Generator().manual_seed(cfg.seed + 12345),
                               n_steps=cfg.sgm_steps, sampler="ode", return_start=True)
        m.update(_sample_metrics(cfg, x0, xT, ref, spec, prefix="ode_"))
        samples["samples_ode"] = x0
    m["eval_time_s"] = time.perf_counter() - t0
    # data-side analytic effort: D + E||x0 - c_k(x0)||^2 with the dispatcher's assignment (c = 0 for the standard prior)
    xd = x_train.double()
    k = model.prior.dispatch(x_train)
    m["effort_analytic_data"] = float(xd.shape[1] + (xd - model.prior.centres_of(k, torch.float64)).square().sum(1).mean())
    if spec is None:
        from moekernels.metrics.frechet import get_digits_classifier

        m["classifier_test_accuracy"] = get_digits_classifier()[1]
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for name, x in samples.items():
            np.save(out / f"{name}.npy", x.numpy().astype(np.float32))
        (out / "metrics.json").write_text(json.dumps(m, indent=1))
    return m


# ------------------------------------------------------------------------------------------------ summary
MAIN_METRIC = {"sep1d": "w1", "unbal1d": "w1", "sep2d": "sw1", "unbal2d": "sw1", "digits": "fid"}
METRIC_NAME = {"w1": "W1 (exact)", "sw1": "sliced W1 (256 dirs)", "fid": "classifier Frechet distance",
               "mode_tv": "mode-coverage TV", "knn_kl_bits": "k-NN KL (bits)", "label_tv": "label-histogram TV",
               "effort": "E||x_T - x_0||^2"}


def _fmt(v, digits=3):
    v = np.asarray(v, dtype=np.float64)
    if len(v) == 0:
        return ""
    big = abs(float(v.mean())) >= 1000
    f = (lambda a: f"{a:.3g}") if big else (lambda a: f"{a:.{digits}f}")
    return f"{f(v.mean())} ± {f(v.std(ddof=1))}" if len(v) > 1 else f"{f(v.mean())} (1 seed)"


def _variants(rows):
    """(label, method, key-prefix) rows of the tables: SGM methods twice (SDE and probability-flow ODE)."""
    out = []
    for meth in METHODS:
        if any(r["config"]["method"] == meth for r in rows):
            if "sgm" in meth:
                out += [(f"{meth} (SDE)", meth, ""), (f"{meth} (ODE)", meth, "ode_")]
            else:
                out.append((meth, meth, ""))
    return out


def _group(rows):
    by = {}
    for r in rows:
        c = r["config"]
        by.setdefault((c["dataset"], c["method"], c["budget"]), []).append(r)
    return by


def _metric_table(rows, ds, metric, budgets, by):
    lines = [f"| method | " + " | ".join(f"{b:.0%} ({int(round(b * _full(rows, ds)))} steps)" for b in budgets) + " |",
             "|---|" + "---:|" * len(budgets)]
    for label, meth, pre in _variants([r for r in rows if r["config"]["dataset"] == ds]):
        cells = []
        for b in budgets:
            rs = by.get((ds, meth, b), [])
            vals = [r[pre + metric] for r in rs if (pre + metric) in r]
            n = f" (n={len(vals)})" if 1 < len(vals) < 3 else ""
            cells.append(_fmt(vals) + n)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def _full(rows, ds):
    return next(r["config"]["full_steps"] for r in rows if r["config"]["dataset"] == ds)


PAIRS = (("ddpm", "mixddpm", ""), ("ddpm", "mixddpm+k", ""), ("sgm", "mixsgm", ""), ("sgm", "mixsgm+k", ""),
         ("sgm", "mixsgm", "ode_"), ("sgm", "mixsgm+k", "ode_"))


def _claim_table(rows, ds, metric, budgets, by):
    """Relative change of the main metric, (mix - std) / std, paired by seed; negative = mixture prior better."""
    lines = ["| pair | " + " | ".join(f"{b:.0%}" for b in budgets) + " | helps most at the shortest budget? |",
             "|---|" + "---:|" * len(budgets) + "---|"]
    for a, b_, pre in PAIRS:
        rel = []
        for b in budgets:
            ra = {r["config"]["seed"]: r.get(pre + metric) for r in by.get((ds, a, b), [])}
            rb = {r["config"]["seed"]: r.get(pre + metric) for r in by.get((ds, b_, b), [])}
            seeds = sorted(s for s in ra if s in rb and ra[s] is not None and rb[s] is not None)
            rel.append([(rb[s] - ra[s]) / ra[s] for s in seeds])
        if not any(rel):
            continue
        means = [np.mean(v) if v else np.nan for v in rel]
        stds = [np.std(v, ddof=1) if len(v) > 1 else 0.0 for v in rel]
        cells = [(f"{100 * np.mean(v):+.0f}% ± {100 * np.std(v, ddof=1):.0f}%" if len(v) > 1 else
                  (f"{100 * v[0]:+.0f}% (1 seed)" if v else "")) for v in rel]
        if any(np.isnan(means)):
            verdict = "incomplete"
        elif means[0] < 0 and means[0] <= min(means):
            verdict = "yes"
        elif means[0] < 0 and means[0] - min(means) <= max(stds[0], stds[int(np.argmin(means))]):
            verdict = f"tie: the gain at {budgets[0]:.0%} is within seed noise of the best ({budgets[int(np.argmin(means))]:.0%})"
        elif min(means) < 0:
            verdict = f"no: it helps most at {budgets[int(np.argmin(means))]:.0%}"
        else:
            verdict = "no: it never helps here"
        lines.append(f"| {b_} vs {a}{' (ODE)' if pre else ''} | " + " | ".join(cells) + f" | {verdict} |")
    return lines


def summarize(rows: list) -> str:
    """Markdown tables (mean ± std over seeds) of every finished run, grouped by dataset."""
    by = _group(rows)
    out = []
    for ds in [d for d in DATASETS if any(r["config"]["dataset"] == d for r in rows)]:
        drows = [r for r in rows if r["config"]["dataset"] == ds]
        budgets = sorted({r["config"]["budget"] for r in drows})
        metric = MAIN_METRIC[ds]
        c0 = drows[0]["config"]
        out += [f"### {ds}", "",
                f"Full run = {c0['full_steps']} steps x batch {c0['batch_size']}; MLP width {c0['hidden']}, "
                f"{drows[0]['n_params']:,} parameters (+ K x width with +k); {c0['n_samples']} samples; "
                f"train time of a full run {np.mean([r['train_time_s'] for r in drows if r['config']['budget'] == 1.0] or [np.nan]):.1f} s "
                f"(1 thread). Commands: " + ", ".join(f"`{c}`" for c in sorted({r.get('command', '') for r in drows})),
                "", f"**{METRIC_NAME[metric]}** (lower is better; mean ± std over seeds):", ""]
        out += _metric_table(drows, ds, metric, budgets, by)
        if "floor_" + metric in drows[0]:
            out += ["", f"Sampling floor (a fresh draw of {c0['n_samples']} points from the true distribution vs the "
                    f"reference set): {_fmt([drows[0]['floor_' + metric]])}."]
        for sec in (["mode_tv", "knn_kl_bits"] if ds != "digits" else ["label_tv"]):
            if sec in drows[0]:
                out += ["", f"**{METRIC_NAME[sec]}**:", ""] + _metric_table(drows, ds, sec, budgets, by)
        out += ["", "Relative change of the main metric, mixture prior vs standard prior, paired by seed "
                "(negative = the mixture prior is better):", ""] + _claim_table(drows, ds, metric, budgets, by)
        # reverse effort at the full budget
        out += ["", "Reverse effort at the full budget: E||x_T - x_0||^2 over generated chains (SDE / ancestral "
                "sampler), against the data-side value D + E||x_0 - c_k(x_0)||^2 and the analytic reduction "
                "sum_k p_k ||c_k||^2:", "",
                "| method | empirical effort | data-side analytic | empirical reduction vs standard | "
                "analytic reduction Σ p_k ‖c_k‖² |", "|---|---:|---:|---:|---:|"]
        for meth in METHODS:
            rs = by.get((ds, meth, 1.0), [])
            if not rs:
                continue
            base = "ddpm" if "ddpm" in meth else "sgm"
            rb = {r["config"]["seed"]: r["effort"] for r in by.get((ds, base, 1.0), [])}
            red = [rb[r["config"]["seed"]] - r["effort"] for r in rs if r["config"]["seed"] in rb]
            out.append(f"| {meth} | {_fmt([r['effort'] for r in rs], 2)} | {_fmt([r['effort_analytic_data'] for r in rs], 2)} | "
                       f"{_fmt(red, 2) if meth.startswith('mix') else ''} | "
                       f"{_fmt([r['effort_reduction_analytic'] for r in rs], 2) if meth.startswith('mix') else ''} |")
        if ds == "digits":
            acc = drows[0].get("classifier_test_accuracy")
            out += ["", f"Feature classifier (moekernels.metrics.frechet, MLP 64-256-128-10 trained on the train "
                    f"split): test accuracy {acc:.4f}.", "", "Classifier label histogram of the samples at the full "
                    "budget (mean over seeds):", "", "| method | " + " | ".join(str(i) for i in range(10)) + " |",
                    "|---|" + "---:|" * 10]
            for label, meth, pre in _variants(drows):
                rs = by.get((ds, meth, 1.0), [])
                if rs and pre + "label_hist" in rs[0]:
                    h = np.mean([r[pre + "label_hist"] for r in rs], 0)
                    out.append(f"| {label} | " + " | ".join(f"{v:.3f}" for v in h) + " |")
        out.append("")
    return "\n".join(out) + "\n"


BEGIN = begin_marker("moekernels reproduce mixdiffusion")
ORACLE_BEGIN = begin_marker("moekernels reproduce mixdiffusion --oracle")


# ------------------------------------------------------------------------------------------------ plots
def save_plots(rows: list, runs: Path, out: Path) -> list:
    """metric_vs_budget.png, samples_<dataset>.png (seed 0), digits grids. Returns the written paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    by = _group(rows)
    dss = [d for d in DATASETS if any(r["config"]["dataset"] == d for r in rows)]
    if not dss:
        return paths
    fig, axes = plt.subplots(1, len(dss), figsize=(4.2 * len(dss), 3.8), squeeze=False)
    for ax, ds in zip(axes[0], dss):
        drows = [r for r in rows if r["config"]["dataset"] == ds]
        metric = MAIN_METRIC[ds]
        budgets = sorted({r["config"]["budget"] for r in drows})
        full = _full(rows, ds)
        for label, meth, pre in _variants(drows):
            xs, ms, ss = [], [], []
            for b in budgets:
                v = [r[pre + metric] for r in by.get((ds, meth, b), []) if pre + metric in r]
                if v:
                    xs.append(b * full), ms.append(np.mean(v)), ss.append(np.std(v, ddof=1) if len(v) > 1 else 0)
            if xs:
                ax.errorbar(xs, ms, yerr=ss, marker="o", capsize=3, label=label,
                            ls="--" if not meth.startswith("mix") else "-")
        if "floor_" + metric in drows[0]:
            ax.axhline(drows[0]["floor_" + metric], color="k", lw=0.8, ls=":", label="true-sample floor")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks([b * full for b in budgets], [str(int(round(b * full))) for b in budgets])
        ax.minorticks_off()
        ax.set_xlabel("training steps")
        ax.set_title(f"{ds}: {METRIC_NAME[metric]}", fontsize=9)
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    paths.append(out / "metric_vs_budget.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    for ds in dss:
        drows = [r for r in rows if r["config"]["dataset"] == ds]
        budgets = sorted({r["config"]["budget"] for r in drows})
        labels = _variants(drows)
        if ds == "digits":
            from moekernels.data.digits import save_digit_grid

            for label, meth, pre in labels:
                for b in (budgets[0], budgets[-1]):
                    f = runs / ds / meth / f"b{b:g}" / "seed0" / ("samples_ode.npy" if pre else "samples.npy")
                    if f.exists():
                        name = f"digits_{meth.replace('+', '_')}{'_ode' if pre else ''}_b{b:g}.png"
                        save_digit_grid(np.load(f), out / name, title=f"{label}, {b:.0%} budget, seed 0")
                        paths.append(out / name)
            continue
        spec = GMM_DATASETS[ds]
        data = get_gmm(ds, 4000, seed=999_999)[0].numpy()
        fig, axes = plt.subplots(len(labels), len(budgets), figsize=(3.0 * len(budgets), 2.4 * len(labels)),
                                 squeeze=False)
        for i, (label, meth, pre) in enumerate(labels):
            for j, b in enumerate(budgets):
                ax = axes[i][j]
                f = runs / ds / meth / f"b{b:g}" / "seed0" / ("samples_ode.npy" if pre else "samples.npy")
                x = np.load(f) if f.exists() else None
                lim = 1.6 * np.abs(np.asarray(spec.means)).max()
                if spec.dim == 1:
                    bins = np.linspace(-lim, lim, 121)
                    ax.hist(data[:, 0], bins=bins, density=True, color="0.75")
                    if x is not None:
                        ax.hist(np.clip(x[:, 0], -lim, lim), bins=bins, density=True, histtype="step", color="C0")
                else:
                    ax.scatter(data[:, 0], data[:, 1], s=0.3, c="0.75")
                    if x is not None:
                        ax.scatter(x[:, 0], x[:, 1], s=0.3, c="C0")
                    ax.set_xlim(-lim, lim), ax.set_ylim(-lim, lim)
                    ax.set_aspect("equal")
                ax.set_xticks([]), ax.set_yticks([])
                if i == 0:
                    ax.set_title(f"{b:.0%} budget", fontsize=9)
                if j == 0:
                    ax.set_ylabel(label, fontsize=8)
        fig.suptitle(f"{ds}: samples (blue, seed 0; escaped samples clipped to the frame) over the true "
                     f"distribution (grey)", fontsize=9)
        fig.tight_layout(rect=(0, 0, 1, 0.97))
        paths.append(out / f"samples_{ds}.png")
        fig.savefig(paths[-1], dpi=90)
        plt.close(fig)
    return paths


# ------------------------------------------------------------------------------------------------ CLI
def build_parser(prog: str = "moekernels reproduce mixdiffusion") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="DDPM vs mixDDPM and SGM vs mixSGM (Gaussian-mixture prior + "
                                "dispatcher) at reduced training budgets on synthetic mixtures and the 8x8 digits; "
                                "per-run metrics.json, tables in RESULTS.md, plots.")
    p.add_argument("--datasets", nargs="+", default=None, choices=DATASETS, help="default: recipe [run].datasets")
    p.add_argument("--methods", nargs="+", default=None, choices=METHODS, help="default: recipe [run].methods")
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="default: recipe [run].seeds (0 1 2)")
    p.add_argument("--budgets", nargs="+", type=float, default=None,
                   help="fractions of the full run (default: recipe [run].budgets = 0.1 0.25 1.0)")
    p.add_argument("--full-steps", type=int, default=None, help="steps of a full run (default: recipe, per dataset kind)")
    p.add_argument("--n-samples", type=int, default=None, help="generated samples per run (default: recipe)")
    p.add_argument("--soft-dispatch", action="store_true", help="draw the component from the posterior (default argmax)")
    p.add_argument("--out", type=Path, default=REPO / "models" / "mixdiffusion" / "runs")
    p.add_argument("--recipe", type=Path, default=REPO / "models" / "mixdiffusion" / "recipe.toml")
    p.add_argument("--results", type=Path, default=None,
                   help="write the tables of every finished run under --out into this RESULTS.md (generated block)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--fresh", action="store_true", help="rerun runs that have a metrics.json")
    p.add_argument("--summary-only", action="store_true", help="only rebuild tables and plots from finished runs")
    p.add_argument("--oracle", action="store_true", help="only sample every method with the exact eps of the synthetic "
                   "sets (no training; <out>/oracle.json and a table)")
    return p


def _floor(cfg: RunConfig) -> dict:
    """The metric of a fresh true sample of n_samples points against the reference set (the best achievable)."""
    if cfg.dataset == "digits":
        from moekernels.data.digits import load_digits
        from moekernels.metrics.frechet import digits_fid

        return {"floor_fid": float(digits_fid(load_digits("train")[0]))}
    from moekernels.metrics.wasserstein import sliced_wasserstein, wasserstein_1d

    x = get_gmm(cfg.dataset, cfg.n_samples, seed=424242)[0]
    ref = get_gmm(cfg.dataset, cfg.n_ref, seed=999_999)[0]
    return {"floor_w1": wasserstein_1d(x, ref)} if x.shape[1] == 1 else \
        {"floor_sw1": sliced_wasserstein(x, ref, n_projections=256, seed=0)}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    recipe = load_recipe(args.recipe)
    run = recipe.get("run", {})
    datasets = args.datasets or run.get("datasets", list(DATASETS))
    methods = args.methods or run.get("methods", list(METHODS))
    seeds = args.seeds if args.seeds is not None else run.get("seeds", [0, 1, 2])
    budgets = args.budgets or run.get("budgets", [0.1, 0.25, 1.0])
    for name, vals in (("--seeds", seeds), ("--budgets", budgets)):
        if not vals:
            raise SystemExit(f"{name}: give at least one value")
    if any(not 0 < b <= 1 for b in budgets):
        raise SystemExit(f"--budgets: every budget must be in (0, 1], got {budgets}")
    for name, v in (("--threads", args.threads), ("--full-steps", args.full_steps), ("--n-samples", args.n_samples)):
        if v is not None and v < 1:
            raise SystemExit(f"{name} must be >= 1, got {v}")
    torch.set_num_threads(args.threads)
    command = "moekernels reproduce mixdiffusion " + " ".join(sys.argv[1:] if argv is None else argv)
    todo = []
    for seed in seeds:
        for ds in datasets:
            sect = recipe.get("digits" if ds == "digits" else "synthetic", {})
            base = replace(RunConfig(), **{k: v for k, v in sect.items() if k in RunConfig.__dataclass_fields__})
            base = replace(base, dataset=ds, seed=seed, soft_dispatch=args.soft_dispatch, progress=False)
            if args.full_steps:
                base = replace(base, full_steps=args.full_steps)
            if args.n_samples:
                base = replace(base, n_samples=args.n_samples)
            for meth in methods:
                for b in budgets:
                    todo.append(replace(base, method=meth, budget=float(b)))
    from tqdm.auto import tqdm

    if args.oracle:
        rows = []
        for ds in [d for d in datasets if d != "digits"]:
            cfg = next(c for c in todo if c.dataset == ds)
            rows += oracle_rows(cfg)
        for r in rows:
            r["command"] = command
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "oracle.json").write_text(json.dumps(rows, indent=1))
        text = oracle_table(rows)
        print(text)
        if args.results is not None:
            write_generated(args.results, text, ORACLE_BEGIN)
        return 0
    floors = {}
    for cfg in tqdm(todo, desc="mixdiffusion runs", disable=args.no_progress or args.summary_only):
        if args.summary_only:
            break
        out = args.out / cfg.dataset / cfg.method / f"b{cfg.budget:g}" / f"seed{cfg.seed}"
        mpath = out / "metrics.json"
        if mpath.exists() and not args.fresh:
            old = json.loads(mpath.read_text())["config"]
            if all(old.get(k) == v for k, v in asdict(cfg).items() if k != "progress"):
                continue
        if cfg.dataset not in floors:
            floors[cfg.dataset] = _floor(cfg)
        m = run_one(cfg, out)
        m.update(floors[cfg.dataset])
        m["command"] = command
        m["torch_threads"] = torch.get_num_threads()
        mpath.write_text(json.dumps(m, indent=1))
        metric = MAIN_METRIC[cfg.dataset]
        tqdm.write(f"[mixdiffusion] {cfg.dataset}/{cfg.method}/b{cfg.budget:g}/seed{cfg.seed}: {metric} "
                   f"{m[metric]:.4g}, effort {m['effort']:.3g}, train {m['train_time_s']:.1f} s, eval {m['eval_time_s']:.1f} s")
    rows = [json.loads(p.read_text()) for p in sorted(args.out.glob("*/*/*/seed*/metrics.json"))]
    text = summarize(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.md").write_text(text)
    print(text)
    if args.results is not None:
        write_generated(args.results, text, BEGIN)
    if not args.no_plots:
        for pth in save_plots(rows, args.out, args.out.parent):
            print(f"wrote {pth}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
