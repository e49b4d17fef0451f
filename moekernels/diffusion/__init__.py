"""Noise schedules, samplers, losses and the training loop shared by the methods."""
from moekernels.diffusion.ddpm import DDPMScheduler  # noqa: F401
from moekernels.diffusion.schedules import DiscreteSchedule, VESchedule, VPSchedule  # noqa: F401
from moekernels.diffusion.sde import probability_flow_sample, reverse_sde_sample  # noqa: F401
