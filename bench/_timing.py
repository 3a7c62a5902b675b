"""CUDA-graph timing shared by the benchmark scripts."""

from __future__ import annotations

from collections.abc import Callable

import torch


def cudagraph_ms(fn: Callable[[], object], rep_ms: float = 30.0) -> float:
    """Median ms of ``fn`` replayed from a CUDA graph: the device work without host overhead.

    ``fn`` runs once first, outside the capture, so compilation and module loading stay out
    of the graph. Raises whatever capture raises.
    """
    import triton.testing

    fn()
    torch.cuda.synchronize()
    try:
        return float(triton.testing.do_bench_cudagraph(fn, rep=rep_ms, return_mode="median"))
    except TypeError:  # older triton: no return_mode
        return float(triton.testing.do_bench_cudagraph(fn, rep=rep_ms))
