"""The methods built end to end on the moekernels ops (see DESIGN.md section 1); each ``main(argv)`` is a
``moekernels reproduce <method>`` command that writes ``models/<method>/RESULTS.md``.

* ``moekernels.methods.dualdiff``: DualDiff (dual-expert gated denoiser + diversity loss), its 2-D DDPM baseline
  and our MLP + Gaussian-mixture-expert variant (``reproduce dualdiff``).
* ``moekernels.methods.mixdiffusion``: mixDDPM / mixSGM with a Gaussian-mixture prior and dispatcher
  (``reproduce mixdiffusion``).
* ``moekernels.methods.molr_mog``: MoLR-MoG score networks: the exact-score oracle on synthetic union-of-subspaces
  data and the MoE-latent VAEs on the 8x8 digits (``reproduce molr-mog``).

Submodules are imported on use (they pull in scipy / scikit-learn / matplotlib).
"""
__all__ = ["dualdiff", "mixdiffusion", "molr_mog"]
