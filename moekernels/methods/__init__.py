"""The methods built end to end on the moekernels ops (see DESIGN.md section 1).

* ``moekernels.methods.dualdiff``: DualDiff (dual-expert gated denoiser + diversity loss) and its 2-D DDPM
  baseline; ``moekernels.methods.dualdiff.main(argv)`` is ``moekernels reproduce dualdiff``.

Submodules are imported on use (they pull in scipy / scikit-learn / matplotlib).
"""
__all__ = ["dualdiff"]
