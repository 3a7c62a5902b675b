"""Eval mode for a block of code, with every submodule's own flag put back after it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

__all__ = ["eval_mode"]


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run the block with ``model.eval()``; afterwards (also on an exception) each submodule
    gets back its own ``training`` flag — ``model.train(was)`` would also switch a
    BatchNorm or Dropout the caller had frozen in eval mode back to training."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, mode in modes:
            m.training = mode
