"""A generic training loop for small diffusion models: AdamW, cosine LR to 0, grad-norm clipping, EMA of the
weights, tqdm progress, per-step loss history and checkpoints (resumable) so that nothing is lost.

    cfg = TrainConfig(steps=10_000, batch_size=256, lr=3e-4, grad_clip=0.5)
    result = train(model, data, loss_fn, cfg, checkpoint_path="run/ckpt.pt")
    result.ema_model, result.history["loss"], result.train_time_s

``loss_fn(model, batch, generator) -> (loss, extras)`` where ``extras`` is a dict of floats that is recorded next
to the loss (e.g. the MSE and diversity terms). Batches are drawn like a shuffled DataLoader with
``drop_last=True``: a fresh permutation of ``data`` every epoch from a seeded ``torch.Generator``.

EMA (the ema_pytorch rule used by the DualDiff baseline): a step counter s counts ``update`` calls (one per
optimiser step); every ``update_every`` calls the EMA is touched: while s <= ``update_after_step`` it is a plain
copy of the model, afterwards ema <- decay ema + (1 - decay) model with
decay = clamp(1 - (1 + e)^(-power), 0, beta), e = s + 1 - update_after_step - 1 (beta 0.995, power 2/3).
"""
from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from torch import nn

__all__ = ["TrainConfig", "TrainResult", "EMA", "train"]


@dataclass
class TrainConfig:
    steps: int = 10_000
    batch_size: int = 256
    lr: float = 3e-4
    weight_decay: float = 0.01          # torch's AdamW default
    betas: tuple = (0.9, 0.999)         # torch's AdamW default
    grad_clip: float | None = 0.5
    ema_beta: float = 0.995
    ema_update_every: int = 10
    ema_update_after_step: int = 100
    ema_power: float = 2.0 / 3.0
    seed: int = 0
    checkpoint_every: int = 1000
    progress: bool = True


@dataclass
class TrainResult:
    model: nn.Module
    ema_model: nn.Module
    history: dict = field(default_factory=dict)
    train_time_s: float = 0.0
    steps: int = 0


class EMA:
    """Exponential moving average of a model's parameters and buffers (see the module docstring for the rule)."""

    def __init__(self, model: nn.Module, beta: float = 0.995, update_every: int = 10, update_after_step: int = 100,
                 power: float = 2.0 / 3.0, inv_gamma: float = 1.0, min_value: float = 0.0):
        self.ema_model = copy.deepcopy(model).eval()
        for p in self.ema_model.parameters():
            p.requires_grad_(False)
        self.beta, self.update_every, self.update_after_step = beta, update_every, update_after_step
        self.power, self.inv_gamma, self.min_value = power, inv_gamma, min_value
        self.step = 0
        self.initted = False

    def current_decay(self) -> float:
        epoch = max(self.step - self.update_after_step - 1, 0)
        if epoch <= 0:
            return 0.0
        value = 1 - (1 + epoch / self.inv_gamma) ** (-self.power)
        return min(max(value, self.min_value), self.beta)

    @torch.no_grad()
    def _copy(self, model):
        for e, p in zip(self.ema_model.state_dict().values(), model.state_dict().values()):
            e.copy_(p)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        step = self.step
        self.step += 1
        if step % self.update_every != 0:
            return
        if step <= self.update_after_step:
            self._copy(model)
            return
        if not self.initted:
            self._copy(model)
            self.initted = True
        decay = self.current_decay()
        for e, p in zip(self.ema_model.state_dict().values(), model.state_dict().values()):
            if e.is_floating_point():
                e.lerp_(p, 1 - decay)
            else:
                e.copy_(p)

    def state_dict(self) -> dict:
        return {"ema_model": self.ema_model.state_dict(), "step": self.step, "initted": self.initted}

    def load_state_dict(self, sd: dict) -> None:
        self.ema_model.load_state_dict(sd["ema_model"])
        self.step, self.initted = sd["step"], sd["initted"]


def _batches(n: int, batch_size: int, gen: torch.Generator):
    """Infinite stream of index batches: shuffled epochs, last partial batch dropped."""
    if batch_size > n:
        raise ValueError(f"batch_size {batch_size} > dataset size {n}")
    while True:
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n - batch_size + 1, batch_size):
            yield perm[i:i + batch_size]


def train(model: nn.Module, data: torch.Tensor, loss_fn: Callable, config: TrainConfig | None = None,
          checkpoint_path: str | os.PathLike | None = None, resume: bool = True) -> TrainResult:
    """Train ``model`` on the rows of ``data`` for ``config.steps`` optimiser steps (see the module docstring).

    With ``checkpoint_path`` the whole state (model, EMA, optimiser, LR schedule, RNGs, history) is saved every
    ``checkpoint_every`` steps and at the end; with ``resume`` an existing checkpoint there is continued.
    """
    cfg = config or TrainConfig()
    data = torch.as_tensor(data)
    gen = torch.Generator().manual_seed(cfg.seed)          # batches, timesteps and noise
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=tuple(cfg.betas))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.steps, eta_min=0.0)
    ema = EMA(model, cfg.ema_beta, cfg.ema_update_every, cfg.ema_update_after_step, cfg.ema_power)
    history: dict = {"loss": [], "lr": []}
    start, elapsed = 0, 0.0
    batch_gen = torch.Generator().manual_seed(cfg.seed + 1_000_003)
    batches = None
    epoch_start_state = batch_gen.get_state()
    if checkpoint_path is not None and resume and os.path.exists(checkpoint_path):
        ck = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["lr_scheduler"])
        ema.load_state_dict(ck["ema"])
        gen.set_state(ck["gen"])
        batch_gen.set_state(ck["batch_gen_epoch_start"])
        epoch_start_state = ck["batch_gen_epoch_start"]
        history, start, elapsed = ck["history"], ck["step"], ck["train_time_s"]
        batches = _batches(len(data), cfg.batch_size, batch_gen)
        for _ in range(ck["batch_in_epoch"]):  # replay the position inside the current epoch
            next(batches)
    if batches is None:
        batches = _batches(len(data), cfg.batch_size, batch_gen)
    per_epoch = len(data) // cfg.batch_size

    def save(step):
        if checkpoint_path is None:
            return
        os.makedirs(os.path.dirname(os.path.abspath(checkpoint_path)), exist_ok=True)
        tmp = f"{checkpoint_path}.tmp"
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "lr_scheduler": sched.state_dict(),
                    "ema": ema.state_dict(), "gen": gen.get_state(), "batch_gen_epoch_start": epoch_start_state,
                    "batch_in_epoch": step % per_epoch, "history": history, "step": step,
                    "train_time_s": elapsed, "config": asdict(cfg)}, tmp)
        os.replace(tmp, checkpoint_path)

    try:
        from tqdm.auto import tqdm
        bar = tqdm(total=cfg.steps, initial=start, disable=not cfg.progress, mininterval=2.0, leave=False)
    except ImportError:  # pragma: no cover
        bar = None
    model.train()
    t0 = time.perf_counter()
    for step in range(start, cfg.steps):
        if step % per_epoch == 0:
            epoch_start_state = batch_gen.get_state()
        idx = next(batches)
        loss, extras = loss_fn(model, data[idx], gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        history["lr"].append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
        ema.update(model)
        lv = float(loss.detach())
        if not math.isfinite(lv):
            raise FloatingPointError(f"non-finite loss {lv} at step {step}")
        history["loss"].append(lv)
        for k, v in (extras or {}).items():
            history.setdefault(k, []).append(float(v))
        if bar is not None:
            bar.update(1)
            if step % 100 == 0:
                bar.set_postfix(loss=f"{lv:.4f}")
        if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
            elapsed_now = elapsed + time.perf_counter() - t0
            elapsed, t0 = elapsed_now, time.perf_counter()
            if (step + 1) % per_epoch == 0:
                epoch_start_state = batch_gen.get_state()
            save(step + 1)
    elapsed += time.perf_counter() - t0
    if bar is not None:
        bar.close()
    save(cfg.steps)
    model.eval()
    return TrainResult(model=model, ema_model=ema.ema_model, history=history, train_time_s=elapsed, steps=cfg.steps)
