"""Fused ops. Each op module holds ``<op>_ref``, the autograd Function and the public function."""
from moekernels.ops.mog_posterior import MoGPosterior, mog_posterior, mog_posterior_eager, mog_posterior_ref  # noqa: F401
from moekernels.ops.molr_mog_score import (  # noqa: F401
    MoLRMoGScoreOutput, molr_mog_score, molr_mog_score_eager, molr_mog_score_ref)
from moekernels.ops.gated_experts import (  # noqa: F401
    GatedExpertsOutput, gated_experts, gated_experts_eager, gated_experts_ref)
