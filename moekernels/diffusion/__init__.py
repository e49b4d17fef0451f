"""Noise schedules, samplers, losses and the training loop shared by the methods."""
from moekernels.diffusion.ddpm import DDPMScheduler  # noqa: F401
from moekernels.diffusion.schedules import VESchedule, VPSchedule  # noqa: F401
