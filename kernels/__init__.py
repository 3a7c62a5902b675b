"""Triton kernels of cobkern, imported as ``cobkern.kernels`` (one file per kernel family).

Each module holds the ``@triton.jit`` kernels and their thin launchers only; argument
checking, autograd and the CPU reference live in :mod:`cobkern.ops`.
"""
