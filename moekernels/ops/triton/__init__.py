"""Triton kernels (imported lazily: the package works without Triton). Set TRITON_INTERPRET=1 before importing
moekernels to run them on the CPU."""
