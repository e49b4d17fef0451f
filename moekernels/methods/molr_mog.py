"""MoLR-MoG end to end (arXiv 2601.01475): the closed-form score network ``moekernels.nn.MoLRMoGScore`` trained by
denoising score matching, checked against the exact score of synthetic MoLR-MoG data, and the MoE-latent pipeline
on the 8x8 digits.

Synthetic (exact-score oracle; ``moekernels.data.subspaces.SubspaceMoG``): K=4 random d=4 dimensional subspaces of
R^D, L=3 latent modes each (sum_k n_k d_k = 48), D in {64, 256, 1024}, n training points. Models trained on the
same data and budget (AdamW, cosine LR, EMA; ``moekernels.diffusion.training.train``):

* ``molr``: ``MoLRMoGScore(D, K, L, d)`` (K D d + 2 K L d + K L parameters, learned orthonormal bases), fused op.
* ``mlp_sim`` / ``mlp_10x``: ``MLPScore`` (epsilon prediction with a gamma(t) x skip) with about 1x / 10x the
  MoLR-MoG parameter count; ``mlpx0_sim`` / ``mlpx0_10x``: the same MLPs predicting s x_0 (score -x/gamma^2 built in).
* ``molr_randinit``: ``molr`` from random bases (ablation of the K-subspaces initialisation, ``ksubspaces``;
  everything else, the learning rate ``lr_molr`` included, as ``molr``).

DSM loss: t ~ U[t_min, 1], x_t = s x_0 + gamma eps, loss = mean ||gamma score_theta(x_t, t) + eps||^2 (the
epsilon-MSE; VP schedule beta 0.1..20). Metrics (fresh test draws, t on a uniform grid of ``n_t_eval`` points in
[t_min, 1]): relative L2 score error sqrt(sum ||s_theta - s*||^2 / sum ||s*||^2) per t, averaged over t; the
excess epsilon-MSE gamma^2 ||s_theta - s*||^2 (summed over dims; what DSM minimises above its floor) averaged
over t; subspace recovery: principal angles between the true and learned A_k after Hungarian matching
(``match_subspaces``).

Digits (MoE-latent): one ``moekernels.nn.vae.VAE`` per class (latent 8, weak KL as in latent-diffusion VAEs,
latents scaled to unit std per class), then per class a latent score network trained by DSM on draws of q(z|x):

* ``mog``: ``MoLRMoGScore(8, 1, L, 8, basis="identity")`` (the MoG latent score; L = ``--mog-components``),
* ``gaussian``: the same with L = 1 (the paper's blurry baseline),
* ``mlp``: ``MLPScore`` width 128 (the strong baseline), ``mlp_small``: width 32 (about the MoG's size x 10).

Samples: reverse VP SDE (``moekernels.diffusion.sde.reverse_sde_sample``, Euler-Maruyama, Tweedie denoise at the
end) in each class's latent space, decoded by that class's VAE. Metrics: Frechet distance of the in-project digit
classifier's features against all real digits (``moekernels.metrics.frechet.digits_fid``) and the fraction of
samples that the classifier puts in the intended class.

Command line (``main(argv)``, ``moekernels reproduce molr-mog``): a quick default (~10-15 min on one thread) and
``--full``; per-run ``metrics.json`` under ``models/molr_mog/runs`` are reused; ``--results`` writes RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from moekernels.data.subspaces import SubspaceMoG
from moekernels.diffusion.embeddings import sinusoidal_embedding
from moekernels.diffusion.schedules import Schedule, VPSchedule
from moekernels.diffusion.training import TrainConfig, train
from moekernels.methods._results import begin_marker, write_generated
from moekernels.nn.molr import MoLRMoGScore

__all__ = [
    "DigitsConfig",
    "MLPScore",
    "SynthConfig",
    "build_parser",
    "count_parameters",
    "dsm_loss_fn",
    "ksubspaces",
    "latent_dsm_loss_fn",
    "main",
    "match_subspaces",
    "mlp_hidden_for",
    "principal_angles",
    "run_digits",
    "run_synthetic",
    "sample",
    "score_errors",
    "summarize",
    "time_backends",
]

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "models" / "molr_mog"
SYNTH_MODELS = ("molr", "molr_randinit", "mlp_sim", "mlp_10x", "mlpx0_sim", "mlpx0_10x")
DIGIT_MODELS = ("mog", "gaussian", "mlp", "mlp_small")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------------ MLP baseline
class MLPScore(nn.Module):
    """MLP score network on h = [x, SE_16(1000 t)] (``n_hidden`` SiLU layers of width ``hidden``), two
    parametrisations of the epsilon prediction:

    * ``param="eps"``: eps_hat = gamma(t) x + MLP(h). The skip gamma(t) x is the exact epsilon of N(0, I) data
      under the VP schedule, so the MLP learns the correction.
    * ``param="x0"``: eps_hat = (x - MLP(h)) / gamma(t), i.e. the MLP predicts s(t) x_0 (data prediction); the
      -x / gamma^2 part of the score is built in, as in MoLR-MoG.

    ``forward(x, t)`` returns the score -eps_hat / gamma like ``MoLRMoGScore``; ``predict_eps`` the epsilon.
    """

    def __init__(self, dim: int, hidden: int, n_hidden: int = 2, emb: int = 16, schedule: Schedule | None = None,
                 param: str = "eps"):
        super().__init__()
        for name, v in (("dim", dim), ("hidden", hidden), ("n_hidden", n_hidden)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"MLPScore: {name} must be an int >= 1, got {v!r}")
        if param not in ("eps", "x0"):
            raise ValueError(f"MLPScore: param must be 'eps' or 'x0', got {param!r}")
        self.dim, self.hidden, self.emb, self.param = dim, hidden, emb, param
        self.schedule = schedule if schedule is not None else VPSchedule()
        sizes = [dim + emb] + [hidden] * n_hidden + [dim]
        layers = []
        for i in range(len(sizes) - 1):
            layers.append(nn.Linear(sizes[i], sizes[i + 1]))
            if i < len(sizes) - 2:
                layers.append(nn.SiLU())
        self.net = nn.Sequential(*layers)

    def _t(self, x, t):
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).reshape(-1)
        return t.expand(x.shape[0]) if t.numel() == 1 else t

    def predict_eps(self, x: torch.Tensor, t) -> torch.Tensor:
        t = self._t(x, t)
        g = self.schedule.gamma(t).to(x.dtype)[:, None]
        out = self.net(torch.cat((x, sinusoidal_embedding(t * 1000.0, self.emb)), dim=-1))
        return g * x + out if self.param == "eps" else (x - out) / g

    def forward(self, x: torch.Tensor, t) -> torch.Tensor:
        t = self._t(x, t)
        return -self.predict_eps(x, t) / self.schedule.gamma(t).to(x.dtype)[:, None]


def mlp_hidden_for(n_params: int, dim: int, n_hidden: int = 2, emb: int = 16) -> int:
    """The width h whose ``MLPScore(dim, h, n_hidden, emb)`` has the parameter count closest to ``n_params``."""
    def count(h):
        return (dim + emb) * h + h + (n_hidden - 1) * (h * h + h) + h * dim + dim
    best = min(range(1, 4096), key=lambda h: abs(count(h) - n_params))
    return best


# ------------------------------------------------------------------------------------------------ losses
def _check_t_min(t_min):
    if not (isinstance(t_min, (int, float)) and 0 < t_min < 1):
        raise ValueError(f"t_min must be a number in (0, 1), got {t_min!r}")


def dsm_loss_fn(schedule: Schedule, t_min: float = 1e-2):
    """loss_fn(model, x0, generator) for ``train``: t ~ U[t_min, 1], mean over rows of ||gamma score + eps||^2 / D
    (the epsilon-MSE of ``model.predict_eps``)."""
    _check_t_min(t_min)

    def loss_fn(model, x0, gen):
        t = t_min + (1 - t_min) * torch.rand(x0.shape[0], generator=gen, dtype=x0.dtype)
        eps = torch.randn(x0.shape, generator=gen, dtype=x0.dtype)
        x_t = schedule.add_noise(x0, eps, t)
        loss = ((model.predict_eps(x_t, t) - eps) ** 2).mean()
        return loss, {}

    return loss_fn


def latent_dsm_loss_fn(schedule: Schedule, t_min: float = 1e-2, latent_dim: int = 8):
    """Like ``dsm_loss_fn`` on rows [mu, log_var] of q(z | x): a fresh z = mu + exp(log_var / 2) e each batch."""
    base = dsm_loss_fn(schedule, t_min)

    def loss_fn(model, rows, gen):
        mu, log_var = rows[:, :latent_dim], rows[:, latent_dim:]
        z = mu + (0.5 * log_var).exp() * torch.randn(mu.shape, generator=gen, dtype=mu.dtype)
        return base(model, z, gen)

    return loss_fn


# ------------------------------------------------------------------------------------------------ metrics
@torch.no_grad()
def score_errors(model: nn.Module, gen: SubspaceMoG, n_eval: int = 1000, n_t: int = 10, t_min: float = 1e-2,
                 seed: int = 0, dtype=torch.float32) -> dict:
    """Score error of ``model`` against the true score of ``gen`` on fresh draws, per t on a uniform grid of
    ``n_t`` points in [t_min, 1]: relative L2 error and excess epsilon-MSE (see the module docstring)."""
    _check_t_min(t_min)
    for name, v in (("n_eval", n_eval), ("n_t", n_t)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"score_errors: {name} must be an int >= 1, got {v!r}")
    g = torch.Generator().manual_seed(seed)
    x0 = gen.sample(n_eval, generator=g).to(torch.float64)
    ts = np.linspace(t_min, 1.0, n_t)
    rel, emse = [], []
    for t in ts:
        tt = torch.full((n_eval,), float(t), dtype=torch.float64)
        xt = gen.noised(x0, tt, g)
        true = gen.score(xt, tt)  # float64, exact
        est = model(xt.to(dtype), tt.to(dtype)).double()
        d2 = ((est - true) ** 2).sum(1)
        rel.append(float(d2.sum().sqrt() / (true ** 2).sum(1).sum().sqrt()))
        emse.append(float(gen.schedule.gamma(float(t)) ** 2 * d2.mean()))
    return {"t": ts.tolist(), "rel_l2": rel, "eps_mse": emse, "rel_l2_mean": float(np.mean(rel)),
            "eps_mse_mean": float(np.mean(emse))}


def principal_angles(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Principal angles (radians, ascending) between span(A) and span(B), A (D, d1), B (D, d2); min(d1, d2)
    angles. Columns need not be orthonormal (they are orthonormalised by QR)."""
    for name, M in (("A", A), ("B", B)):
        if not isinstance(M, torch.Tensor) or M.dim() != 2:
            raise ValueError(f"principal_angles: {name} must be a (D, d) tensor")
    if A.shape[0] != B.shape[0]:
        raise ValueError(f"principal_angles: A and B need the same D, got {A.shape[0]} and {B.shape[0]}")
    Qa = torch.linalg.qr(A.double())[0]
    Qb = torch.linalg.qr(B.double())[0]
    cos = torch.linalg.svdvals(Qa.T @ Qb).clamp(0.0, 1.0)
    return torch.sort(torch.arccos(cos)).values


def match_subspaces(A_true: torch.Tensor, A_hat: torch.Tensor) -> dict:
    """Hungarian matching (cost: sum of sin^2 of the principal angles) of learned bases A_hat (K, D, d) to true
    ones A_true (K, D, d). Returns perm (A_hat[perm[k]] matches A_true[k]), the largest principal angle of each
    matched pair in degrees, their mean and max, and the mean projection distance ||P - P_hat||_F / sqrt(2 d)."""
    from scipy.optimize import linear_sum_assignment

    if A_true.dim() != 3 or A_hat.dim() != 3 or A_true.shape != A_hat.shape:
        raise ValueError(f"match_subspaces: A_true and A_hat must both be (K, D, d), got {tuple(A_true.shape)} and "
                         f"{tuple(A_hat.shape)}")
    K = A_true.shape[0]
    ang = [[principal_angles(A_true[i], A_hat[j]) for j in range(K)] for i in range(K)]
    cost = np.array([[float((torch.sin(a) ** 2).sum()) for a in row] for row in ang])
    rows, cols = linear_sum_assignment(cost)
    max_deg = [math.degrees(float(ang[i][j].max())) for i, j in zip(rows, cols)]
    d = A_true.shape[2]
    proj = [math.sqrt(cost[i, j] / d) for i, j in zip(rows, cols)]  # ||P-Q||_F^2 = 2 sum sin^2
    return {"perm": cols.tolist(), "max_angle_deg": max_deg, "max_angle_deg_mean": float(np.mean(max_deg)),
            "max_angle_deg_max": float(np.max(max_deg)), "proj_dist_mean": float(np.mean(proj))}


# ------------------------------------------------------------------------------------------------ basis init
@torch.no_grad()
def ksubspaces(x: torch.Tensor, n_subspaces: int, dim: int, n_iter: int = 10, n_trials: int = 30,
               power_iter: int = 5, generator: torch.Generator | None = None) -> torch.Tensor:
    """K-subspaces clustering of the rows of x (n, D) into ``n_subspaces`` linear subspaces of dimension ``dim``
    through the origin; returns orthonormal bases (K, D, d) in float64.

    Seeding (greedy, k-means++-like): for each k, ``n_trials`` candidate spans, each of a seed row (drawn with
    probability proportional to its squared residual to the subspaces chosen so far) and its d-1 nearest rows;
    keep the candidate with the smallest total residual of the union. Then Lloyd-style iterations: assign each
    row to the subspace with the smallest residual, refit each basis as the top-d right singular vectors of its rows (uncentred; ``power_iter``
    subspace iterations from the current basis); stop when the assignment no longer changes."""
    if x.dim() != 2:
        raise ValueError(f"ksubspaces: x must be (n, D), got shape {tuple(x.shape)}")
    n, D = x.shape
    if not (1 <= dim <= D) or n_subspaces < 1 or n < dim:
        raise ValueError(f"ksubspaces: need 1 <= dim <= D, n_subspaces >= 1 and n >= dim, got dim={dim}, D={D}, "
                         f"n_subspaces={n_subspaces}, n={n}")
    for name, v in (("n_iter", n_iter), ("n_trials", n_trials), ("power_iter", power_iter)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"ksubspaces: {name} must be an int >= 1, got {v!r}")
    x = x.double()
    sq = (x * x).sum(1)
    if not bool(torch.isfinite(sq).all()) or float(sq.sum()) == 0.0:
        raise ValueError("ksubspaces: x must be finite with at least one nonzero row")

    def resid(Q):  # (n,) squared distance of each row to span(Q)
        return (sq - ((x @ Q) ** 2).sum(1)).clamp_min(0)

    bases, best_r = [], sq.clone()
    for _ in range(n_subspaces):
        p = best_r + 1e-12 * sq.mean()
        cand = []
        seeds = torch.multinomial(p / p.sum(), min(n_trials, n), replacement=False, generator=generator)
        for i in seeds.tolist():  # the seed row and its d-1 nearest rows (likely one latent mode of one subspace)
            idx = ((x - x[i]) ** 2).sum(1).topk(dim, largest=False).indices
            Q = torch.linalg.qr(x[idx].T)[0]
            cand.append((float(torch.minimum(best_r, resid(Q)).sum()), Q))
        Q = min(cand, key=lambda c: c[0])[1]
        bases.append(Q)
        best_r = torch.minimum(best_r, resid(Q))
    A = torch.stack(bases)
    assign = None
    for _ in range(n_iter):
        r = torch.stack([resid(A[k]) for k in range(n_subspaces)], 1)
        new = r.argmin(1)
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        for k in range(n_subspaces):
            rows = x[assign == k]
            if len(rows) >= dim:  # top-d right singular vectors: subspace iteration from the current basis
                Q = A[k]
                for _ in range(power_iter):
                    Q = torch.linalg.qr(rows.T @ (rows @ Q))[0]
                A[k] = Q
    return A


# ------------------------------------------------------------------------------------------------ sampling
@torch.no_grad()
def sample(model: nn.Module, n: int, dim: int, schedule: Schedule | None = None, n_steps: int = 200,
           t_min: float = 1e-3, seed: int = 0, method: str = "sde", dtype=torch.float32) -> torch.Tensor:
    """n samples from a score model (``model(x, t)`` = score) by the reverse VP SDE (``method="sde"``,
    Euler-Maruyama) or the probability-flow ODE (``"ode"``) from N(0, I) at t = 1 to t_min, Tweedie-denoised;
    deterministic for a seed."""
    from moekernels.diffusion.sde import probability_flow_sample, reverse_sde_sample

    if method not in ("sde", "ode"):
        raise ValueError(f"sample: method must be 'sde' or 'ode', got {method!r}")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"sample: n must be an int >= 1, got {n!r}")
    if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
        raise ValueError(f"sample: dim must be an int >= 1, got {dim!r}")
    schedule = schedule if schedule is not None else getattr(model, "schedule", VPSchedule())
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn(n, dim, generator=g, dtype=dtype)
    if method == "sde":
        return reverse_sde_sample(model, schedule, x_T, n_steps, t_min, prediction="score", generator=g)
    return probability_flow_sample(model, schedule, x_T, n_steps, t_min, prediction="score")


# ------------------------------------------------------------------------------------------------ synthetic runs
@dataclass
class SynthConfig:
    model: str = "molr"                 # one of SYNTH_MODELS (molr_randinit: random bases, no K-subspaces)
    dim: int = 256
    n_train: int = 1000
    n_experts: int = 4
    n_components: int = 3
    latent_dim: int = 4
    mean_scale: float = 1.0
    seed: int = 0                       # the problem (A, mu, var) and the training draws
    steps: int = 1500
    batch_size: int = 256
    lr_molr: float = 2e-2
    lr_mlp: float = 2e-3
    basis_init: str = "ksubspaces"      # ksubspaces | random (molr only)
    t_min: float = 1e-2
    n_eval: int = 1000
    n_t_eval: int = 10
    backend: str = "auto"
    progress: bool = False
    eval_version: int = 2               # 2: the error at init on the same test draws and t grid as the final one


def _synth_model(cfg: SynthConfig, schedule: Schedule, data: torch.Tensor) -> nn.Module:
    K, L, d, D = cfg.n_experts, cfg.n_components, cfg.latent_dim, cfg.dim
    if cfg.model in ("molr", "molr_randinit"):
        m = MoLRMoGScore(D, K, L, d, schedule, backend=cfg.backend)
        g = torch.Generator().manual_seed(cfg.seed + 77)
        m.reset_parameters(g)
        if cfg.basis_init not in ("ksubspaces", "random"):
            raise ValueError(f"SynthConfig.basis_init must be 'ksubspaces' or 'random', got {cfg.basis_init!r}")
        if cfg.model == "molr" and cfg.basis_init == "ksubspaces":  # molr_randinit: random bases (ablation)
            with torch.no_grad():
                m.basis_weight.copy_(ksubspaces(data, K, d, generator=g))
        return m
    if cfg.model in ("mlp_sim", "mlp_10x", "mlpx0_sim", "mlpx0_10x"):
        target = MoLRMoGScore(D, K, L, d).num_parameters() * (1 if cfg.model.endswith("_sim") else 10)
        torch.manual_seed(cfg.seed + 77)
        return MLPScore(D, mlp_hidden_for(target, D), schedule=schedule,
                        param="x0" if cfg.model.startswith("mlpx0") else "eps")
    raise ValueError(f"SynthConfig.model must be one of {SYNTH_MODELS}, got {cfg.model!r}")


def run_synthetic(cfg: SynthConfig, out_dir: str | os.PathLike | None = None) -> dict:
    """Train one score model on n draws of a SubspaceMoG problem and measure it against the true score."""
    schedule = VPSchedule()
    gen = SubspaceMoG(cfg.dim, cfg.n_experts, cfg.n_components, cfg.latent_dim, mean_scale=cfg.mean_scale,
                      seed=cfg.seed, schedule=schedule)
    data = gen.sample(cfg.n_train, seed=cfg.seed + 1000).float()
    t0 = time.perf_counter()
    model = _synth_model(cfg, schedule, data)
    init_s = time.perf_counter() - t0
    lr = cfg.lr_molr if cfg.model.startswith("molr") else cfg.lr_mlp
    tcfg = TrainConfig(steps=cfg.steps, batch_size=min(cfg.batch_size, cfg.n_train), lr=lr, weight_decay=0.0,
                       grad_clip=1.0, seed=cfg.seed, progress=cfg.progress, checkpoint_every=0)
    before = score_errors(model, gen, cfg.n_eval, cfg.n_t_eval, cfg.t_min, seed=cfg.seed + 3000)
    res = train(model, data, dsm_loss_fn(schedule, cfg.t_min), tcfg)
    ema = res.ema_model
    err = score_errors(ema, gen, cfg.n_eval, cfg.n_t_eval, cfg.t_min, seed=cfg.seed + 3000)
    m = {"config": asdict(cfg), "n_params": count_parameters(model), "intrinsic_size": gen.intrinsic_size,
         "train_time_s": res.train_time_s, "init_time_s": init_s, "ms_per_step": 1000 * res.train_time_s / max(cfg.steps, 1),
         "final_loss_mean_last100": float(np.mean(res.history["loss"][-100:])),
         "rel_l2_init": before["rel_l2_mean"], **{k: err[k] for k in ("rel_l2_mean", "eps_mse_mean")},
         "per_t": err, "torch_threads": torch.get_num_threads()}
    if cfg.model in ("molr", "molr_randinit"):
        m["subspace"] = match_subspaces(gen.A, ema.basis().detach())
    else:
        m["hidden"] = model.hidden
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(m, indent=2))
    return m


# ------------------------------------------------------------------------------------------------ digits
@dataclass
class DigitsConfig:
    seed: int = 0
    latent_dim: int = 8
    vae_steps: int = 1500
    vae_beta: float = 0.05
    vae_recon_sigma: float = 0.2
    score_steps: int = 1500
    batch_size: int = 128
    lr_mog: float = 2e-2
    lr_mlp: float = 2e-3
    mog_components: int = 10
    mlp_hidden: int = 128
    mlp_small_hidden: int = 32
    t_min: float = 1e-3
    n_per_class: int = 100
    sampling_steps: int = 200
    models: tuple = DIGIT_MODELS
    backend: str = "auto"
    progress: bool = False


def _latent_model(kind: str, cfg: DigitsConfig, schedule: Schedule, seed: int) -> nn.Module:
    d = cfg.latent_dim
    if kind in ("mog", "gaussian"):
        L = cfg.mog_components if kind == "mog" else 1
        m = MoLRMoGScore(d, 1, L, d, schedule, basis="identity", backend=cfg.backend)
        m.reset_parameters(torch.Generator().manual_seed(seed))
        return m
    if kind in ("mlp", "mlp_small"):
        torch.manual_seed(seed)
        return MLPScore(d, cfg.mlp_hidden if kind == "mlp" else cfg.mlp_small_hidden, schedule=schedule)
    raise ValueError(f"digits model must be one of {DIGIT_MODELS}, got {kind!r}")


def _train_vaes(cfg: DigitsConfig, x, y, out: Path | None):
    from moekernels.nn.vae import ClassVAEs, train_vaes

    torch.manual_seed(cfg.seed)
    vaes = ClassVAEs(10, 64, cfg.latent_dim, beta=cfg.vae_beta, recon_sigma=cfg.vae_recon_sigma)
    path = None if out is None else out / "vae" / "ckpt.pt"
    if path is not None and path.exists():
        vaes.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return vaes.eval(), None
    t0 = time.perf_counter()
    train_vaes(vaes, x, y, steps=cfg.vae_steps, seed=cfg.seed, progress=cfg.progress)
    dt = time.perf_counter() - t0
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(vaes.state_dict(), path)
    return vaes.eval(), dt


def run_digits(cfg: DigitsConfig, out_dir: str | os.PathLike | None = None, save_grids: bool = True) -> dict:
    """One seed of the MoE-latent digits pipeline: VAEs, then each latent score model in ``cfg.models``. Per-model
    metrics are written (and reused) as <out>/<model>/metrics.json. Returns {name: metrics}."""
    from moekernels.data.digits import load_digits, save_digit_grid
    from moekernels.metrics.frechet import classify, digits_fid, get_digits_classifier

    out = Path(out_dir) if out_dir is not None else None
    x, y = load_digits("train")
    xte, yte = load_digits("test")
    schedule = VPSchedule()
    vaes, vae_time = _train_vaes(cfg, x, y, out)
    _, clf_acc = get_digits_classifier(0)
    results = {}
    ref_path = None if out is None else out / "reference" / "metrics.json"
    with torch.no_grad():
        mu, log_var = vaes.encode(x, y)
        # per-class scalar scale (as latent-diffusion VAEs' scale factor): the latent score nets see z / scale
        scale = torch.stack([mu[y == c].std() for c in range(10)])
        if ref_path is not None and ref_path.exists():
            results["reference"] = json.loads(ref_path.read_text())
        else:
            rec = vaes.reconstruct(xte, yte)
            ycls = torch.arange(10).repeat_interleave(cfg.n_per_class)
            g = torch.Generator().manual_seed(cfg.seed + 555)
            prior = vaes.decode(torch.randn(len(ycls), cfg.latent_dim, generator=g) * scale[ycls, None], ycls)
            results["reference"] = {
                "classifier_test_accuracy": clf_acc, "vae_train_time_s": vae_time,
                "vae_test_recon_mse": float(((rec - xte) ** 2).mean()),
                "fid_vae_recon_test": digits_fid(rec), "fid_real_test": digits_fid(xte),
                "fid_real_train": digits_fid(x),
                "fid_vae_prior_n01": digits_fid(prior),
                "acc_vae_prior_n01": float((torch.as_tensor(classify(prior)[0]) == ycls).float().mean()),
                "vae_params": count_parameters(vaes), "latent_scale": scale.tolist()}
        ref = results["reference"]
        if "fid_vae_recon_train" not in ref:  # decoded training latents, same sample size
            idx = torch.cat([(y == c).nonzero()[:cfg.n_per_class, 0] for c in range(10)])
            rec = vaes.reconstruct(x[idx], y[idx])
            ref["fid_vae_recon_train"] = digits_fid(rec)
            ref["acc_vae_recon_train"] = float((torch.as_tensor(classify(rec)[0]) == y[idx]).float().mean())
        if ref_path is not None:
            ref_path.parent.mkdir(parents=True, exist_ok=True)
            ref_path.write_text(json.dumps(ref, indent=2))
    rows = torch.cat((mu / scale[y, None], log_var - 2 * scale[y, None].log()), 1)
    for kind in cfg.models:
        mpath = None if out is None else out / kind / "metrics.json"
        if mpath is not None and mpath.exists():
            results[kind] = json.loads(mpath.read_text())
            continue
        n_params, train_s, sample_s, samples = 0, 0.0, 0.0, []
        for c in range(10):
            model = _latent_model(kind, cfg, schedule, seed=cfg.seed * 100 + c)
            lr = cfg.lr_mog if kind in ("mog", "gaussian") else cfg.lr_mlp
            data_c = rows[y == c]
            tcfg = TrainConfig(steps=cfg.score_steps, batch_size=min(cfg.batch_size, len(data_c)), lr=lr,
                               weight_decay=0.0, grad_clip=1.0, seed=cfg.seed * 100 + c, progress=cfg.progress,
                               checkpoint_every=0)
            res = train(model, data_c, latent_dsm_loss_fn(schedule, cfg.t_min, cfg.latent_dim), tcfg)
            n_params += count_parameters(model)
            train_s += res.train_time_s
            t0 = time.perf_counter()
            z = sample(res.ema_model, cfg.n_per_class, cfg.latent_dim, schedule, cfg.sampling_steps, cfg.t_min,
                       seed=cfg.seed * 100 + c + 31)
            with torch.no_grad():
                samples.append(vaes[c].decode(z * scale[c]))
            sample_s += time.perf_counter() - t0
        xs = torch.cat(samples)
        ycls = torch.arange(10).repeat_interleave(cfg.n_per_class)
        labels, _hist = classify(xs)
        m = {"model": kind, "seed": cfg.seed, "n_params_total": n_params, "n_params_per_class": n_params // 10,
             "train_time_s": train_s, "sample_time_s": sample_s, "fid": digits_fid(xs),
             "class_accuracy": float((torch.as_tensor(labels) == ycls).float().mean()),
             "n_samples": len(xs), "config": asdict(cfg) | {"models": list(cfg.models)}}
        results[kind] = m
        if mpath is not None:
            mpath.parent.mkdir(parents=True, exist_ok=True)
            mpath.write_text(json.dumps(m, indent=2))
            if save_grids:
                order = torch.arange(len(xs)).view(10, cfg.n_per_class)[:, :10].T.reshape(-1)  # one column per class
                save_digit_grid(xs[order], mpath.parent / "samples.png", nrow=10,
                                title=f"{kind} (seed {cfg.seed}): FID {m['fid']:.2f}, acc {m['class_accuracy']:.3f}")
    return results


# ------------------------------------------------------------------------------------------------ fused vs eager
def _loadavg():
    try:
        return os.getloadavg()[0]
    except OSError:  # pragma: no cover
        return None


def time_backends(dim: int = 1024, steps: int = 300, batch_size: int = 256, seed: int = 0, n_train: int = 4000,
                  backends=("auto", "eager"), op_reps: int = 60) -> dict:
    """Per-step training time (forward, backward, AdamW step) of MoLRMoGScore on the synthetic problem with each
    backend, steps interleaved on identical batches (same run, same machine state); then the op alone (forward,
    forward + backward) ``op_reps`` times per backend. Returns medians (ms) and the ratio eager / auto."""
    load0 = _loadavg()
    schedule = VPSchedule()
    gen = SubspaceMoG(dim, 4, 3, 4, seed=seed, schedule=schedule)
    data = gen.sample(n_train, seed=seed + 1000).float()
    loss_fn = dsm_loss_fn(schedule, 1e-2)
    models, opts, times = {}, {}, {b: [] for b in backends}
    for b in backends:
        models[b] = MoLRMoGScore(dim, 4, 3, 4, schedule, backend=b)
        models[b].reset_parameters(torch.Generator().manual_seed(seed))
        opts[b] = torch.optim.AdamW(models[b].parameters(), lr=2e-2, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    for i in range(steps):
        idx = torch.randint(0, n_train, (batch_size,), generator=g)
        for b in (backends if i % 2 == 0 else backends[::-1]):
            gb = torch.Generator().manual_seed(seed * 1_000_003 + i)  # the same t and noise for every backend
            t0 = time.perf_counter()
            loss, _ = loss_fn(models[b], data[idx], gb)
            opts[b].zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(models[b].parameters(), 1.0)
            opts[b].step()
            times[b].append(time.perf_counter() - t0)
    med = {b: 1000 * statistics.median(times[b][10:]) for b in backends}
    # the op alone on one batch (fixed A, per-row t): forward without grad, and forward + backward
    from moekernels.ops.molr_mog_score import molr_mog_score

    m0 = models[backends[0]]
    x = data[:batch_size]
    tt = 1e-2 + (1 - 1e-2) * torch.rand(batch_size, generator=g)
    s_, g_ = schedule(tt)
    A = m0.basis().detach().requires_grad_(True)
    mu, lv, lp = (p.detach().requires_grad_(True) for p in (m0.mu, m0.log_var, m0.log_pi))
    op = {b: {"forward": [], "forward_backward": []} for b in backends}
    for i in range(op_reps):
        for b in (backends if i % 2 == 0 else backends[::-1]):
            t0 = time.perf_counter()
            with torch.no_grad():
                molr_mog_score(x, s_, g_, A, mu, lv, lp, backend=b)
            t1 = time.perf_counter()
            molr_mog_score(x, s_, g_, A, mu, lv, lp, backend=b).backward(x)
            t2 = time.perf_counter()
            op[b]["forward"].append(t1 - t0)
            op[b]["forward_backward"].append(t2 - t1)
    op_med = {b: {k: 1000 * statistics.median(v[5:]) for k, v in op[b].items()} for b in backends}
    out = {"dim": dim, "steps": steps, "batch_size": batch_size, "median_ms": med, "op_median_ms": op_med,
           "torch_threads": torch.get_num_threads(), "loadavg_start": load0, "loadavg_end": _loadavg()}
    if "auto" in med and "eager" in med:
        out["eager_over_auto"] = med["eager"] / med["auto"]
        out["saved_fraction"] = 1 - med["auto"] / med["eager"]
    return out


# ------------------------------------------------------------------------------------------------ summaries
def _ms(v, fmt="{:.4f}"):
    v = [x for x in v if x is not None]
    if not v:
        return "n/a"
    if len(v) == 1:
        return fmt.format(v[0]) + " (1 seed)"
    return f"{fmt.format(float(np.mean(v)))} ± {fmt.format(float(np.std(v, ddof=1)))}"


def summarize(synth: list, digits: list, timing: dict | None, command: str = "") -> str:
    """Markdown tables (mean ± sample std over seeds) of the synthetic runs, the digits runs and the backend timing."""
    lines = []
    if synth:
        lines += [("### Synthetic MoLR-MoG (K=4 subspaces, L=3 modes, d=4: sum_k n_k d_k = 48): score error vs the "
                  "exact score"), "",
                  ("| model | D | n | params | seeds | rel. L2 score error (mean over t) | excess eps-MSE (mean over t) "
                  "| max principal angle, deg (mean of K) | rel. L2 at init | train s | ms/step |"),
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        by = {}
        for r in synth:
            c = r["config"]
            by.setdefault((SYNTH_ORDER.index(c["model"]), c["dim"], c["n_train"]), []).append(r)
        for (mi, D, n), rs in sorted(by.items()):
            ang = [r["subspace"]["max_angle_deg_mean"] for r in rs if "subspace" in r]
            lines.append(f"| {SYNTH_ORDER[mi]} | {D} | {n} | {rs[0]['n_params']:,} | {len(rs)} | "
                         f"{_ms([r['rel_l2_mean'] for r in rs])} | {_ms([r['eps_mse_mean'] for r in rs])} | "
                         f"{_ms(ang, '{:.2f}') if ang else '--'} | {_ms([r['rel_l2_init'] for r in rs])} | "
                         f"{np.mean([r['train_time_s'] for r in rs]):.1f} | "
                         f"{np.mean([r['ms_per_step'] for r in rs]):.2f} |")
        lines.append("")
    if digits:
        ref = [r for r in digits if r.get("model") == "reference"]
        if ref:
            lines += ["### Digits references (same VAEs; FID vs all 1,797 real digits)", "",
                      "| quantity | mean ± std over seeds |", "|---|---:|"]
            for key, label in (("classifier_test_accuracy", "feature classifier: test accuracy"),
                               ("vae_test_recon_mse", "VAE test reconstruction MSE (pixels in [-1, 1])"),
                               ("fid_real_train", "FID real train split (1,437 images)"),
                               ("fid_real_test", "FID real test split (360 images)"),
                               ("fid_vae_recon_test", "FID of VAE reconstructions of the test split (360)"),
                               ("fid_vae_recon_train", ("FID of VAE reconstructions of n-per-class train images "
                                "(same sample size as the models; = a latent prior that reproduces the training latents)")),
                               ("acc_vae_recon_train", "class accuracy of those reconstructions"),
                               ("fid_vae_prior_n01", "FID decoding z ~ N(0, scale^2 I) per class (VAE prior)"),
                               ("acc_vae_prior_n01", "class accuracy of the VAE-prior samples"),
                               ("vae_train_time_s", "VAE training time, s (10 VAEs)")):
                lines.append(f"| {label} | {_ms([r.get(key) for r in ref])} |")
            lines.append("")
        rows = [r for r in digits if r.get("model") != "reference"]
        lines += ["### MoE-latent digits: latent score networks on the same per-class VAEs", "",
                  ("| latent score network | params (10 classes) | seeds | FID (classifier features) | class accuracy | "
                  "train s | sampling s |"), "|---|---:|---:|---:|---:|---:|---:|"]
        by = {}
        for r in rows:
            by.setdefault(r["model"], []).append(r)
        for kind in [k for k in DIGIT_MODELS if k in by]:
            rs = by[kind]
            lines.append(f"| {DIGIT_LABELS[kind]} | {rs[0]['n_params_total']:,} | {len(rs)} | "
                         f"{_ms([r['fid'] for r in rs], '{:.3f}')} | {_ms([r['class_accuracy'] for r in rs], '{:.3f}')}"
                         f" | {np.mean([r['train_time_s'] for r in rs]):.1f} | "
                         f"{np.mean([r['sample_time_s'] for r in rs]):.1f} |")
        lines.append("")
    if timing:
        med = timing["median_ms"]
        lines += ["### Training step time, fused op (backend auto) vs eager", "",
                  (f"MoLRMoGScore D={timing['dim']}, K=4, L=3, d=4, batch {timing['batch_size']}, {timing['steps']} "
                  f"interleaved steps (forward + backward + AdamW), {timing['torch_threads']} thread(s): median "
                  f"{med['auto']:.2f} ms (auto = fused CPU kernel) vs {med['eager']:.2f} ms (eager); eager/auto = "
                  f"{timing['eager_over_auto']:.2f}x, i.e. the fused op saves {100 * timing['saved_fraction']:.0f}% "
                  f"of the training step time.")]
        if "op_median_ms" in timing:
            o = timing["op_median_ms"]
            lines += ["", (f"The op alone on one batch (same shapes): forward {o['auto']['forward']:.2f} ms (auto) vs "
                      f"{o['eager']['forward']:.2f} ms (eager); forward + backward {o['auto']['forward_backward']:.2f}"
                      f" ms vs {o['eager']['forward_backward']:.2f} ms. Load average (1 min) of the 2-core machine "
                      f"at start / end: {timing.get('loadavg_start')} / {timing.get('loadavg_end')}.")]
        lines.append("")
    if command:
        lines += [f"Command: `{command}`", ""]
    return "\n".join(lines)


SYNTH_ORDER = SYNTH_MODELS
DIGIT_LABELS = {"mog": "MoG (MoLR-MoG, A = I)", "gaussian": "Gaussian (L = 1)", "mlp": "MLP (width 128)",
                "mlp_small": "MLP (width 32)"}
BEGIN = begin_marker("moekernels reproduce molr-mog")


def write_results(path: Path, table: str) -> None:
    """Replace the generated block of ``path`` with ``table``."""
    write_generated(path, table, BEGIN)


def plot_synthetic(synth: list, path: Path) -> None:
    """Relative L2 error and excess eps-MSE vs n (log-log), one line per D for MoLR-MoG, markers for the MLPs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = {64: "C0", 256: "C1", 1024: "C2"}
    markers = {"molr": "o-", "molr_randinit": "x:", "mlp_sim": "s--", "mlp_10x": "^--", "mlpx0_sim": "D--",
               "mlpx0_10x": "v--"}
    by = {}
    for r in synth:
        c = r["config"]
        by.setdefault((c["model"], c["dim"]), {}).setdefault(c["n_train"], []).append(r)
    for (model, D), per_n in sorted(by.items()):
        ns = sorted(per_n)
        for ax, key in zip(axes, ("rel_l2_mean", "eps_mse_mean")):
            v = [[r[key] for r in per_n[n]] for n in ns]
            ax.errorbar(ns, [np.mean(a) for a in v], yerr=[np.std(a, ddof=1) if len(a) > 1 else 0 for a in v],
                        fmt=markers.get(model, "o-"), color=colors.get(D, "k"), capsize=3,
                        label=f"{model} D={D}")
    for ax, t in zip(axes, ("relative L2 score error (mean over t)", "excess eps-MSE gamma^2 ||s - s*||^2")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("training points n")
        ax.set_title(t, fontsize=10)
        ax.grid(alpha=0.3, which="both")
    axes[1].legend(fontsize=7, ncol=2)
    fig.suptitle("MoLR-MoG synthetic (K=4, L=3, d=4): learned vs exact score (mean ± std over seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ CLI
QUICK = {"dims": [64, 256, 1024], "ns": [50, 250, 1000, 4000], "mlp_ns": [4000], "seeds": [0, 1, 2], "steps": 1500,
         "ablation": [(256, 1000)], "vae_steps": 1500, "score_steps": 1500, "n_per_class": 100,
         "timing_steps": 300}
FULL = {"dims": [64, 256, 1024], "ns": [50, 250, 1000, 4000, 16000], "mlp_ns": [250, 1000, 4000, 16000],
        "seeds": [0, 1, 2, 3, 4], "steps": 5000, "ablation": [(64, 1000), (256, 1000), (1024, 1000)],
        "vae_steps": 4000, "score_steps": 5000, "n_per_class": 200, "timing_steps": 1000}


def build_parser(prog: str = "moekernels reproduce molr-mog") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="MoLR-MoG (arXiv 2601.01475): DSM training of the "
                                "closed-form score network against the exact score of synthetic MoLR-MoG data, MLP "
                                "baselines, and the MoE-latent VAE pipeline on the 8x8 digits. Finished runs "
                                "(metrics.json) are reused.")
    p.add_argument("--full", action="store_true", help="the bigger budget (more n, steps and seeds; hours on one "
                   "thread) instead of the quick default (~10-15 min)")
    p.add_argument("--parts", nargs="+", default=["synthetic", "digits", "timing"],
                   choices=["synthetic", "digits", "timing"], help="which experiments (default: all)")
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="seeds (default: quick 0 1 2, full 0-4)")
    p.add_argument("--dims", nargs="+", type=int, default=None, help="synthetic D values (default 64 256 1024)")
    p.add_argument("--ns", nargs="+", type=int, default=None, help="synthetic training sizes n")
    p.add_argument("--steps", type=int, default=None, help="synthetic training steps (quick 1500, full 5000)")
    p.add_argument("--out", type=Path, default=None, help="run folder (default models/molr_mog/runs/quick|full)")
    p.add_argument("--results", type=Path, default=None,
                   help="write the tables into this RESULTS.md (between the generated markers) and the plots "
                   "next to it")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    p.add_argument("--backend", default="auto", help="molr_mog_score backend for training (default auto)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--fresh", action="store_true", help="ignore finished runs")
    return p


def _reuse(path: Path, config: dict, fresh: bool):
    if fresh or not path.exists():
        return None
    m = json.loads(path.read_text())
    old = {k: v for k, v in m.get("config", {}).items() if k != "progress"}
    new = {k: v for k, v in config.items() if k != "progress"}
    return m if old == new else None


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads < 1:
        raise SystemExit("--threads must be >= 1")
    torch.set_num_threads(args.threads)
    P = dict(FULL if args.full else QUICK)
    seeds = args.seeds if args.seeds is not None else P["seeds"]
    dims, ns = args.dims or P["dims"], args.ns or P["ns"]
    steps = args.steps or P["steps"]
    out = args.out or (OUT / "runs" / ("full" if args.full else "quick"))
    progress = not args.no_progress
    command = "moekernels reproduce molr-mog " + " ".join(sys.argv[1:] if argv is None else argv)
    synth, digits, timing = [], [], None
    t_start = time.perf_counter()
    if "synthetic" in args.parts:
        jobs = [("molr", D, n) for D in dims for n in ns]
        jobs += [(m, D, n) for m in ("mlp_sim", "mlp_10x", "mlpx0_sim", "mlpx0_10x") for D in dims for n in ns
                 if n in P["mlp_ns"]]
        jobs += [("molr_randinit", D, n) for D, n in P["ablation"] if D in dims]
        from tqdm.auto import tqdm

        bar = tqdm(total=len(jobs) * len(seeds), desc="synthetic", disable=not progress)
        for model, D, n in jobs:
            for s in seeds:
                cfg = SynthConfig(model=model, dim=D, n_train=n, seed=s, steps=steps, backend=args.backend)
                path = out / "synthetic" / model / f"D{D}_n{n}" / f"seed{s}" / "metrics.json"
                m = _reuse(path, asdict(cfg), args.fresh)
                if m is None:
                    m = run_synthetic(cfg, path.parent)
                    print(f"[molr-mog] {model} D={D} n={n} seed {s}: rel L2 {m['rel_l2_mean']:.4f}, eps-MSE "
                          f"{m['eps_mse_mean']:.4f}, train {m['train_time_s']:.1f} s", flush=True)
                synth.append(m)
                bar.update(1)
        bar.close()
    if "digits" in args.parts:
        for s in seeds:
            cfg = DigitsConfig(seed=s, vae_steps=P["vae_steps"], score_steps=P["score_steps"],
                               n_per_class=P["n_per_class"], backend=args.backend, progress=progress)
            d = out / "digits" / f"seed{s}"
            cfg_path = d / "config.json"
            if cfg_path.exists() and (args.fresh or json.loads(cfg_path.read_text()) !=
                                      {k: v for k, v in asdict(cfg).items() if k != "progress"} | {"models": list(cfg.models)}):
                import shutil

                shutil.rmtree(d)  # a different configuration: its VAEs and runs are stale
            d.mkdir(parents=True, exist_ok=True)
            cfg_path.write_text(json.dumps({k: v for k, v in asdict(cfg).items() if k != "progress"}
                                           | {"models": list(cfg.models)}, indent=2))
            res = run_digits(cfg, d)
            for kind, m in res.items():
                digits.append(m | {"model": kind, "seed": s} if kind == "reference" else m)
            print(f"[molr-mog] digits seed {s}: " + ", ".join(f"{k} FID {v['fid']:.3f} acc {v['class_accuracy']:.3f}"
                                                            for k, v in res.items() if k != "reference"), flush=True)
    if "timing" in args.parts:
        tpath = out / "backend_timing.json"
        if tpath.exists() and not args.fresh and json.loads(tpath.read_text()).get("steps") == P["timing_steps"] \
                and "op_median_ms" in json.loads(tpath.read_text()):
            timing = json.loads(tpath.read_text())
        else:
            timing = time_backends(1024, P["timing_steps"])
            tpath.parent.mkdir(parents=True, exist_ok=True)
            tpath.write_text(json.dumps(timing, indent=2))
    table = summarize(synth, digits, timing, command)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text(table)
    print(table)
    print(f"[molr-mog] wall time {time.perf_counter() - t_start:.0f} s", flush=True)
    if args.results is not None:
        write_results(args.results, table)
        if synth:
            plot_synthetic(synth, args.results.parent / "synthetic_scaling.png")
        if digits:
            import shutil

            for kind in DIGIT_MODELS:
                src = out / "digits" / f"seed{seeds[0]}" / kind / "samples.png"
                if src.exists():
                    shutil.copyfile(src, args.results.parent / f"digits_{kind}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
