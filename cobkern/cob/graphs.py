"""CUDA-graph replay of calibration's forward passes (``calibrate(..., cuda_graphs=True)``).

A calibration batch is a no-grad forward pass whose hooks launch one covariance kernel per
CoB layer: on VGG-16, about 60 small launches per batch, each behind some Python (the
custom ops' dispatch, the hooks, the launchers). Where the host cannot issue them as fast
as the GPU runs them, the GPU waits. :class:`ForwardReplay` records the whole batch —
forward pass and covariance kernels — as one CUDA graph and replays it for every later
batch of the same shape: one launch per batch, no Python per layer.

Replay re-runs the recorded kernels on the recorded buffers: each batch is copied into
one static input tensor, and the kernels add into the accumulators' own sums, which do not
move. What a replay does not re-run is Python, so the host-side sample counts of the
:class:`~cobkern.ops.covariance.CovarianceAccumulator` s are advanced by
:meth:`~cobkern.ops.covariance.CovarianceAccumulator.count_samples` with what the
captured batch added.

Policy, per input signature (shape, strides, dtype, device):

1. the first batch runs eagerly — the warm-up capture needs: Triton compiles, cuDNN picks
   its algorithms, the covariance kernel caches its tile tables on the device. On CUDA it
   runs on a side stream, joined at once, as PyTorch's CUDA-graph notes advise, so that
   state created lazily per stream exists before the capture (itself on a side stream);
2. the next batch with the same signature is captured, then replayed once (capture records
   kernels without running them);
3. every later batch with that signature is copied in and replayed.

One graph is kept: batches of another signature (e.g. a smaller trailing batch) run
eagerly. If capture fails (a model that synchronises with the host, e.g. ``.item()``, or
does anything else a stream capture forbids) — or records nothing while the sums change,
i.e. kernels ran instead of being recorded — the sums and counts are put back as they were
before it, the caller's stream is restored, a ``RuntimeWarning`` names the problem, and
every batch runs eagerly from then on: the statistics do not depend on whether a batch was
replayed.

A replay runs kernels only: hooks, prints or any other Python in the model's forward run
for the eager batches (the first, the captured one while it is recorded, and batches of
another shape), not for replayed ones. Everything runs with the input's GPU as the current
device, so a model on ``cuda:1`` is captured and replayed there whichever GPU is current.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from cobkern.ops.covariance import CovarianceAccumulator

__all__ = ["ForwardReplay", "cuda_capture"]

#: ``capture(fn) -> replay``: record ``fn()`` without running it, return a callable that runs
#: what was recorded.
Capture = Callable[[Callable[[], object]], Callable[[], None]]


def cuda_capture(fn: Callable[[], object]) -> Callable[[], None]:
    """Record ``fn()`` as a CUDA graph on the current device (a new stream of that device,
    a private memory pool) and return its ``replay``. Nothing ``fn`` launches on the
    capture stream runs during the capture.

    ``CUDAGraph.capture_begin`` / ``capture_end`` on a side stream that first waits for the
    current one — not the ``torch.cuda.graph`` context manager, which before each capture
    synchronises the device and empties the caching allocators, the pinned host memory's
    included: calibration would then pin its statistics' host buffers (135 MiB for VGG-16)
    anew after every capture. (Graphed calibration on an H200, 2026-11-28, with the
    context manager: 63–83 ms slower than eager whatever the number of batches; whether
    this was the cost is for the next GPU lease to measure.)

    On an error the caller's current stream is put back, the partial graph is freed and
    the error of ``fn`` (not that of ending an invalidated capture) is raised."""
    current = torch.cuda.current_stream()
    side = torch.cuda.Stream()
    side.wait_stream(current)  # what the caller queued (the static input's copy) first
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.stream(side):
            graph.capture_begin()
            try:
                fn()
            except BaseException:
                with contextlib.suppress(Exception):  # an invalidated capture may not end
                    graph.capture_end()
                raise
            graph.capture_end()
    except BaseException:
        torch.cuda.set_stream(current)
        with contextlib.suppress(Exception):  # free what a partial capture holds
            graph.reset()
        raise
    return graph.replay


def _signature(x: Tensor) -> tuple:
    return tuple(x.shape), x.stride(), x.dtype, x.device


class ForwardReplay:
    """Run ``forward(x)`` for calibration batches, as a replayed CUDA graph where it can.

    Args:
        forward: runs one batch, e.g. ``model`` with the calibration hooks registered; its
            return value is ignored. Its only effects that last must be kernels writing
            into buffers that outlive the call (the accumulators' sums) and the
            accumulators' sample counts.
        accumulators: every accumulator the forward's hooks update (their counts are
            advanced by hand after a replay).
        capture: how to record a graph (default :func:`cuda_capture`; tests pass a fake).

    Attributes:
        replays: batches run by replaying the graph (the captured one included).
        failure: the error of a failed capture (``None`` if none failed); after one, every
            batch runs eagerly.
    """

    def __init__(self, forward: Callable[[Tensor], object],
                 accumulators: Sequence[CovarianceAccumulator],
                 capture: Capture | None = None) -> None:
        self.forward = forward
        self.accumulators = list(accumulators)
        self.capture = capture or cuda_capture
        self.replays = 0
        self.failure: str | None = None
        self._warm: set[tuple] = set()
        self._signature: tuple | None = None
        self._static: Tensor | None = None
        self._replay: Callable[[], None] | None = None
        self._added: list[int] = []

    def __call__(self, x: Tensor) -> None:
        """Process one batch ``x`` (on the model's device, in the layout to calibrate in)."""
        on = torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()
        with on:
            self._run(x)

    def _run(self, x: Tensor) -> None:
        sig = _signature(x)
        if self._replay is not None and sig == self._signature:
            self._static.copy_(x)
            self._replay()
            for acc, n in zip(self.accumulators, self._added, strict=True):
                acc.count_samples(n)
            self.replays += 1
        elif self._replay is None and self.failure is None:
            if sig in self._warm:
                self._capture(x, sig)
            else:
                self._warm_up(x)
                self._warm.add(sig)
        else:  # another shape than the graph's, or after a failed capture
            self.forward(x)

    def _warm_up(self, x: Tensor) -> None:
        if x.device.type != "cuda":
            self.forward(x)
            return
        current = torch.cuda.current_stream(x.device)
        side = torch.cuda.Stream(x.device)
        side.wait_stream(current)  # x (and the sums) are written
        with torch.cuda.stream(side):
            self.forward(x)
        current.wait_stream(side)  # later work, and x's reuse, wait for the warm-up

    def _capture(self, x: Tensor, sig: tuple) -> None:
        # a copy with x's strides (the layout the warm-up ran); the loader's own tensor is
        # never overwritten by later batches
        static = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)
        static.copy_(x)
        before = [acc.count for acc in self.accumulators]
        sums = [t for acc in self.accumulators for t in acc.sums()]
        saved = [t.clone() for t in sums]
        try:
            replay = self.capture(lambda: self.forward(static))
            if not all(torch.equal(t, s) for t, s in zip(sums, saved, strict=True)):
                raise RuntimeError("kernels ran during the capture instead of being "
                                   "recorded (launched on another stream or device?)")
        except Exception as e:  # noqa: BLE001 - any capture error: fall back, say why
            for t, s in zip(sums, saved, strict=True):
                t.copy_(s)
            for acc, n in zip(self.accumulators, before, strict=True):
                acc.count_samples(n - acc.count)  # the batch was not added: count it once
            self.failure = f"{type(e).__name__}: {e}"
            warnings.warn(f"calibrate: CUDA-graph capture of the forward pass failed "
                          f"({self.failure}); calibrating eagerly", RuntimeWarning,
                          stacklevel=4)
            self.forward(x)
            return
        del saved
        # the capture ran the hooks' Python (the counts of this batch) but no kernel
        self._added = [acc.count - n for acc, n in zip(self.accumulators, before, strict=True)]
        self._static, self._replay, self._signature = static, replay, sig
        replay()
        self.replays += 1

    def close(self) -> None:
        """Drop the graph and its memory pool (the batch's activations), after the last
        replay has finished."""
        if self._replay is not None and self._signature[3].type == "cuda":
            torch.cuda.synchronize(self._signature[3])
        self._replay = self._static = None
        self._signature = None
