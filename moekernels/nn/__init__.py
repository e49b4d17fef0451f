"""Drop-in ``torch.nn`` modules built on the fused ops."""
from moekernels.nn.dispatcher import MoGDispatcher  # noqa: F401
from moekernels.nn.molr import MoLRMoGScore  # noqa: F401
from moekernels.nn.gated import GatedExperts  # noqa: F401
from moekernels.nn.mixture_prior import MixturePrior  # noqa: F401
from moekernels.nn.vae import VAE, ClassVAEs  # noqa: F401
