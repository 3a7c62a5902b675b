"""Host-side integer helpers for the launchers.

``triton.cdiv`` and ``triton.next_power_of_2`` are ``constexpr_function``s in recent Triton,
with microseconds of dispatch per call; the launchers run on every kernel launch, where host
time is what limits small layers, so they use these plain-Python equivalents.
"""

from __future__ import annotations


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for positive ``b``."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two ``>= n`` (1 for ``n <= 1``)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()
