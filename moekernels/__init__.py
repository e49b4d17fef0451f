"""moekernels: fused kernels for mixture-of-experts diffusion score networks.

    import moekernels
    out = moekernels.mog_posterior(x, means, log_var, log_pi)   # backend="auto"

``python -m moekernels.info`` shows which backends are usable here and why not.
"""
__version__ = "0.1.0"

from moekernels.ops import mog_posterior, mog_posterior_ref  # noqa: E402,F401
from moekernels.ops import molr_mog_score, molr_mog_score_ref  # noqa: E402,F401
from moekernels.ops.dispatch import BackendUnavailableError  # noqa: E402,F401
from moekernels.ops import gated_experts, gated_experts_ref  # noqa: E402,F401
