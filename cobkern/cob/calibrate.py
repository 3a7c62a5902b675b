"""One-pass calibration: stream every CoB layer's activations into covariance accumulators.

``calibrate(model, loader)`` puts the model in eval mode, disables autograd, hooks the
output of every CoB layer's TSRA module (:func:`~cobkern.cob.find_cob_layers`) and feeds
each batch to a :class:`~cobkern.ops.covariance.CovarianceAccumulator` (the streaming
Triton kernel on GPU). Memory beyond the model: ``O(C²)`` per layer (float64 sums on the
model's device); no activation is kept.

Data: ``loader`` is any iterable of batches ``x`` or ``(x, y, ...)``. By default the first
``max_samples = 10,000`` images are used (a trailing batch is cut to fit). For the
project's data module that is the un-augmented training set; pass the augmenting training
loader to do what the authors did (random crop + flip applied to the calibration images).

Overlap (``overlap=True``, CUDA only; off by default until timed, see ``BENCHMARKS.md``): the
covariance kernels run on a side stream while the forward pass goes on to the next layers,
so the Gram products (FMA / tensor-core work of their own) can hide under the convolutions
instead of following them. Each activation is kept alive by the caching allocator until
its kernel has read it (``record_stream``), and a batch's forward starts only when the
previous batch's kernels are done, so at most one batch of activations is in flight.

CUDA graphs (``cuda_graphs=True``, CUDA only; off by default: on an H200, 2026-11-28, graphed
calibration took 0.154 s against 0.091 s eager, channels-last, by a cost that did not grow
with the number of batches; the capture has changed since, untimed): a calibration
batch is ~60 small launches behind Python (custom-op dispatch, hooks, launchers); in an
H200 profile of four float32 NCHW batches the host's time (30.2 ms, profiler included) was
as long as the GPU's (28.3 ms; ``bench/results/h200-2026-11-27b/gpu_diag.md``). With
graphs the first repeated batch's forward pass and covariance kernels are recorded once
and replayed for every later batch of that shape (:mod:`cobkern.cob.graphs`).

Layout (``channels_last``; by default chosen from the model's dtype and device, below):
with ``channels_last=True`` 4-D input batches are put in channels-last memory format before
the forward pass, so the convolutions produce NHWC activations and the covariance kernel
reads slabs whose contiguous axis is the channels — the layout of the linear layers'
``(N, C)`` activations, on which one float32 kernel launch (64×64 tiles, 8 warps) ran 3×
more FLOP/s than on NCHW maps on an H200 (``BENCHMARKS.md``). On NCHW maps the kernel's
float32 products (the CUDA-core ``tl.dot``) read both operands from unswizzled shared memory
along the samples, mostly as scalar, bank-conflicting loads; on NHWC maps they read them as
conflict-free vectors (offline sm_90 PTX). The model's weights are not touched: cuDNN (and
the CPU convolutions) follow the input's layout. No activation is copied; the statistics
are the same up to float round-off: other convolution kernels, other summation order (on
the H200 run below the float32 Grams differed from NCHW's by up to 2.2e-4 relative, and the
default lossless rule kept the same directions in both layouts).

Automatic layout, measured end to end (``BENCHMARKS.md``; H200, torch 2.11, 2026-11-27,
VGG-16 TSRA width 1.0, 10,000 images, batch 500, forward pass included): a float32 model
calibrated in 0.091–0.094 s channels-last against 0.135 s NCHW (IEEE float32 products),
1.44–1.48× faster (``f32_dot="fp64"`` did not gain from it: 0.111–0.113 s); a bfloat16
model took 0.122 s channels-last against 0.066 s NCHW, 1.84× slower — but 0.061 s against
0.065 s on the lease of 2026-11-28 (``BENCHMARKS.md``): bfloat16 stays NCHW by default until
two leases agree. CPU calibration was never timed either way. So ``channels_last=None``
means channels-last exactly for a float32 model on a CUDA device, NCHW otherwise; pass
``True`` / ``False`` to choose.

Distributed: when ``torch.distributed`` is initialised each rank should iterate over its own
shard (e.g. a ``DistributedSampler``) and takes ``max_samples / world_size`` images (the
remainder going to the lowest ranks); the sums are then all-reduced, so every rank ends with
the statistics of the whole sample set, and N ranks calibrate N× faster.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from cobkern._modes import eval_mode
from cobkern._wrappers import compiled_in_place, parallel_wrapped, unwrap_model
from cobkern.ops._checks import as_int
from cobkern.ops.covariance import CovarianceAccumulator

from .discovery import select_layers
from .graphs import ForwardReplay
from .stats import BASES, CalibrationStats, LayerStats, weight_fingerprint

__all__ = ["calibrate", "batch_inputs"]

#: The only parameter dtype for which ``channels_last=None`` picks channels-last (on CUDA).
_AUTO_CHANNELS_LAST_DTYPE = torch.float32


def batch_inputs(batch: Any) -> Tensor:
    """The input tensor of a batch: ``x`` itself, or the first element of ``(x, y, ...)``."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    if isinstance(batch, dict):
        for key in ("x", "input", "inputs", "image", "images"):
            if key in batch and isinstance(batch[key], Tensor):
                return batch[key]
    raise TypeError(f"calibrate: cannot find the input tensor in a batch of type "
                    f"{type(batch).__name__}; yield x or (x, y)")


def _auto_channels_last(dtype: torch.dtype, device: torch.device | str) -> bool:
    """The layout ``channels_last=None`` picks for a model of parameter ``dtype`` on
    ``device``: channels-last exactly for float32 on CUDA, where it was measured 1.44–1.48×
    faster end to end on an H200; NCHW for bfloat16 (measured 1.84× slower channels-last on
    one lease, 7 % faster on the next) and for every other dtype and device (not measured;
    CPU included). See the module docstring and ``BENCHMARKS.md``."""
    return dtype == _AUTO_CHANNELS_LAST_DTYPE and torch.device(device).type == "cuda"


def _layout_probe(model: nn.Module, input_device: torch.device) -> tuple[torch.dtype,
                                                                          torch.device]:
    """The dtype and device the automatic layout is decided on: those of the model's first
    floating-point parameter (its activations follow them). A model without one (it can
    have no CoB layer, so :func:`calibrate` never meets one) computes in its inputs' dtype,
    unknown before the first batch: :func:`torch.get_default_dtype` is assumed, on
    ``input_device``, the device the inputs are moved to."""
    p = next((p for p in model.parameters() if p.is_floating_point()), None)
    if p is None:
        return torch.get_default_dtype(), input_device
    return p.dtype, p.device


def _resolve_channels_last(model: nn.Module, channels_last: bool | None,
                           input_device: torch.device | str) -> bool:
    """:func:`calibrate`'s ``channels_last`` as a bool: ``True`` / ``False`` as given,
    ``None`` by :func:`_auto_channels_last` on the model's parameters (:func:`_layout_probe`).

    Raises:
        TypeError: ``channels_last`` is neither a bool nor ``None`` (e.g. the string
            ``"yes"``, or ``1``).
    """
    if channels_last is None:
        return _auto_channels_last(*_layout_probe(model, torch.device(input_device)))
    if not isinstance(channels_last, bool):
        raise TypeError(f"calibrate: channels_last must be True or False, or None for the "
                        f"automatic choice, got {channels_last!r}")
    return channels_last


def _resolve_fuse_conv_bias(net: nn.Module, fuse_conv_bias: bool | None,
                            device: torch.device) -> bool | None:
    """:func:`calibrate`'s ``fuse_conv_bias`` as the value to give ``net.fuse_conv_bias``
    for the pass, or ``None`` to leave the model as it is.

    ``None`` (auto): ``True`` for a cobkern :class:`~cobkern.models.VGG` run as it is (not
    through ``torch.compile`` — wrapped or compiled in place with ``.compile()`` — whose
    graphs would be traced again for the switch) on CUDA, where the bias then rides in the
    TSRA kernel's load instead of a pass of its own; otherwise the model's own setting.
    The VGG itself keeps a convolution with hooks unfused, and its whole ``features`` when
    that is not a plain ``nn.Sequential`` (:class:`~cobkern.models.VGG`). ``True`` /
    ``False``: that, for the pass; ``True`` needs a cobkern VGG (inside wrappers too);
    ``False`` on another model leaves it untouched (it has no such switch).

    Raises:
        TypeError: ``fuse_conv_bias`` is neither a bool nor ``None``.
        ValueError: ``True`` for a model that is not a cobkern VGG.
    """
    from cobkern.models.vgg import VGG  # deferred: the models import cobkern.nn only

    if fuse_conv_bias is None:
        auto = isinstance(net, VGG) and device.type == "cuda" and not compiled_in_place(net)
        return True if auto else None
    if not isinstance(fuse_conv_bias, bool):
        raise TypeError(f"calibrate: fuse_conv_bias must be True or False, or None for the "
                        f"automatic choice, got {fuse_conv_bias!r}")
    if fuse_conv_bias and not isinstance(unwrap_model(net), VGG):
        raise ValueError(f"calibrate: fuse_conv_bias=True needs a cobkern VGG model (whose "
                         f"forward can add each convolution's bias inside the TSRA kernel "
                         f"behind it), got {type(unwrap_model(net)).__name__}")
    if not isinstance(unwrap_model(net), VGG):
        return None  # False: nothing to switch off
    return fuse_conv_bias


def _switch_fuse_conv_bias(target: nn.Module, value: bool | None):
    """Set ``target.fuse_conv_bias`` to ``value`` (``None``: leave it) and return what puts
    it back — the instance's own attribute, or none (the class default) as before."""
    if value is None:
        return lambda: None
    had, before = "fuse_conv_bias" in vars(target), vars(target).get("fuse_conv_bias")
    target.fuse_conv_bias = value

    def restore() -> None:
        if had:
            target.fuse_conv_bias = before
        else:
            vars(target).pop("fuse_conv_bias", None)
    return restore


def _graphs_on(device: torch.device) -> bool:
    """Whether ``calibrate(cuda_graphs=True)`` records graphs on ``device``: on CUDA only."""
    return device.type == "cuda"


def _dist_initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _rank_and_world() -> tuple[int, int]:
    import torch.distributed as dist

    if _dist_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def calibrate(
    model: nn.Module,
    loader: Iterable[Any],
    layers: list[str] | None = None,
    max_samples: int | None = 10_000,
    progress: bool = True,
    device: torch.device | str | None = None,
    distributed: bool | None = None,
    meta: dict[str, Any] | None = None,
    overlap: bool = False,
    f32_dot: str | None = None,
    channels_last: bool | None = None,
    cuda_graphs: bool = False,
    fuse_conv_bias: bool | None = None,
) -> CalibrationStats:
    """Collect per-subspace second moments of the CoB layers' activations.

    Args:
        model: the network (its current, un-rotated weights give ``basis="original"``
            statistics; a model that went through :func:`rotate_model` gives rotated ones —
            pass ``meta={"basis": "rotated"}`` then).
        loader: iterable of ``x`` or ``(x, y, ...)`` batches, ``x`` of shape ``(N, ...)``.
        layers: producer names of the CoB layers to calibrate; ``None`` = all.
        max_samples: images to use in total (over all ranks), an int; ``None`` = the whole
            loader. No batch is read beyond the one that reaches it.
        progress: show a tqdm progress bar (rank 0 only).
        device: where to run; default: the device of the model's first parameter.
        distributed: all-reduce across ranks; default: when ``torch.distributed`` is
            initialised (``True`` without a process group is a ``ValueError``).
        meta: extra provenance stored with the statistics.
        overlap: on CUDA, run the covariance kernels on a side stream, overlapping the
            forward pass (see the module docstring); ignored on other devices.
        f32_dot: products of the covariance kernel for float32 activations, one of
            :data:`cobkern.ops.covariance.F32_DOTS`: ``None`` / ``"ieee"`` (exact float32
            products, the default), ``"tf32"`` (one TF32 tensor-core product per float32
            product: operands truncated by up to 2^-10 relative, leading eigenvalues ~7e-4
            low, eigenvectors and lossless counts unchanged in a CPU emulation; the
            cheapest mode offline, not yet timed), ``"tf32x3"`` / ``"bf16x6"`` (tensor
            cores: faster, less exact — check that the lossless rule keeps what it keeps
            with IEEE before relying on them), or ``"fp64"`` (float64 tensor cores of
            A100/H100-class GPUs: exact products, float64 sums — more exact than IEEE; slow
            on GPUs with low-rate float64). Recorded in the statistics' ``meta`` when not
            IEEE; another name is a ``ValueError`` (from the accumulators, built before any
            forward pass).
        channels_last: put 4-D input batches in channels-last memory format, so the
            convolutions' activations reach the covariance kernel channel-contiguous (the
            same statistics up to float round-off; other inputs pass unchanged), or not
            (``False``: NCHW as given). ``None`` (default): channels-last exactly when the
            model's first floating-point parameter is float32 on a CUDA device — measured
            1.44–1.48× faster there end to end (0.091–0.094 s against 0.135 s on an H200),
            while a bfloat16 model was 1.84× slower channels-last on one lease (0.122 s
            against 0.066 s) and 7 % faster on the next (0.061 s against 0.065 s); CPU
            calibration is untimed (module docstring, ``BENCHMARKS.md``). Anything but a
            bool or ``None`` is a ``TypeError``.
        cuda_graphs: on CUDA, record the first repeated batch's forward pass with its
            covariance kernels as one CUDA graph and replay it for every later batch of
            that shape (:mod:`cobkern.cob.graphs`: no Python per layer and batch; the same
            kernels, so the same statistics up to the order of atomic float adds; a
            smaller trailing batch runs eagerly; a model that cannot be captured warns and
            runs eagerly). Off by default: measured slower (``BENCHMARKS.md``); ignored on
            other devices. A replay runs kernels only: Python in the model's forward
            (hooks of your own, prints) runs for the eager batches alone. Not with
            ``overlap=True`` (a ``ValueError``); anything but a bool is a ``TypeError``.
        fuse_conv_bias: for the pass, set a cobkern VGG's ``fuse_conv_bias`` (each
            convolution's bias added inside the TSRA kernel behind it, not in a pass of its
            own: an H200 profile of float32 calibration spent 0.44 ms a batch of 500 in
            those 13 adds, 6 % of its CUDA time). In float32 the same additions, rounded
            once, so the same statistics; in 16-bit models the bias is added in float32
            before the output's one rounding, not to a rounded output. ``None`` (default): on
            for a VGG run as it is on CUDA (not compiled), otherwise the model's own
            setting; ``True`` / ``False`` force it (``True`` on another model is a
            ``ValueError``). The model's setting is restored afterwards. Hooks are kept: a
            convolution with hooks of its own (e.g. :mod:`torch.nn.utils.prune`'s weight
            recomputation) keeps its bias, and so does every one while global module hooks
            are registered (:func:`cobkern.models.forward_fusing_conv_bias`).

    Returns:
        :class:`CalibrationStats` with one float64 :class:`LayerStats` per layer (on CPU).

    Raises:
        ValueError: among others (each names its cause), ``meta["basis"]`` not one of
            :data:`~cobkern.cob.stats.BASES` (checked before the pass), or a layer whose
            activations were not finite (NaN/Inf weights or inputs, a float16 overflow).
    """
    chosen = select_layers(model, layers)
    basis = (meta or {}).get("basis", "original")
    if not isinstance(basis, str) or basis not in BASES:  # before the pass, not after it
        raise ValueError(f"calibrate: meta['basis'] must be one of {BASES}, got {basis!r}")
    if not isinstance(cuda_graphs, bool):
        raise TypeError(f"calibrate: cuda_graphs must be True or False, got {cuda_graphs!r}")
    if cuda_graphs and overlap:
        raise ValueError("calibrate: overlap=True and cuda_graphs=True cannot be combined "
                         "(a replayed graph already runs the covariance kernels without "
                         "host gaps); choose one")
    if max_samples is not None:
        # an int (numpy ints too); a float such as 1e4 used to pass here and fail only when
        # a batch had to be cut, in the middle of the pass ("slice indices must be
        # integers"), and True counted as 1
        max_samples = as_int("calibrate", "max_samples", max_samples, "an int or None")
        if max_samples < 1:
            raise ValueError(f"calibrate: max_samples must be >= 1 or None, got {max_samples}")
    if device is None:
        p = next(model.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
    device = torch.device(device)
    channels_last = _resolve_channels_last(model, channels_last, device)
    rank, world = _rank_and_world()
    if distributed is None:
        distributed = world > 1
    elif distributed and not _dist_initialized():
        # checked before the pass: the all-reduce after it would fail only then, with the
        # whole pass's statistics lost
        raise ValueError("calibrate: distributed=True needs an initialised torch.distributed "
                         "process group (torch.distributed.init_process_group); pass "
                         "distributed=None or False for a single process")
    if not distributed:
        rank, world = 0, 1
    quota = None
    if max_samples is not None:
        quota = max_samples // world + (1 if rank < max_samples % world else 0)

    accs = {lay.name: CovarianceAccumulator(lay.num_channels, lay.split, device=device,
                                            f32_dot=f32_dot)
            for lay in chosen}
    side = torch.cuda.Stream(device) if overlap and device.type == "cuda" else None
    # DataParallel would run the hooks in one thread per GPU, updating the accumulators at
    # once, and there are no gradients for DDP to synchronise: run the plain model
    net = unwrap_model(model) if parallel_wrapped(model) else model
    fused = _resolve_fuse_conv_bias(net, fuse_conv_bias, device)

    def make_hook(acc: CovarianceAccumulator):
        # never traced (the pass runs eagerly, below): the accumulator's update is host
        # bookkeeping around a Triton launch, not a traceable op
        @torch.compiler.disable
        def hook(_module, _inputs, output):
            out = output.detach()
            if side is None:
                acc.update(out)
                return
            side.wait_stream(torch.cuda.current_stream(out.device))  # out is written
            with torch.cuda.stream(side):
                acc.update(out)
            out.record_stream(side)  # not reused by the forward until the kernel read it
        return hook

    seen = 0
    # each change to the model (hooks, modes, the fused-bias switch) and each resource (the
    # graph, the progress bar) registers its undoing as soon as it is made, and the stack
    # runs every undoing even when one of them (or the pass) raises: the model comes back
    # as it was whatever fails
    with contextlib.ExitStack() as undo:
        bar = None
        if progress and rank == 0:  # closed last: after the graph's final synchronize
            from tqdm.auto import tqdm

            known = _images_in(loader)  # a 200-image loader is not shown as 200 of 10,000
            total = max_samples if known is None else \
                known if max_samples is None else min(known, max_samples)
            bar = tqdm(total=total, desc="calibrate", unit="img")
            undo.callback(_close_bar, bar)
        if side is not None:  # the sums are complete once the side stream has drained
            undo.callback(lambda: torch.cuda.current_stream(device).wait_stream(side))
        for lay in chosen:
            undo.callback(lay.activation.register_forward_hook(
                make_hook(accs[lay.name])).remove)
            if isinstance(lay.consumer, nn.Linear):
                undo.callback(lay.consumer.register_forward_pre_hook(
                    _flat_input_check(lay)).remove)
        undo.enter_context(eval_mode(model))
        # Compiled graphs do not guard on hooks added after they were made (Dynamo skips
        # module-hook guards): a graph compiled by an earlier eval / no_grad call would run
        # without these hooks. The pass runs eagerly.
        undo.enter_context(torch.compiler.set_stance("force_eager"))
        undo.callback(_switch_fuse_conv_bias(unwrap_model(net), fused))
        run = net
        if cuda_graphs and _graphs_on(device):
            run = ForwardReplay(net, list(accs.values()))
            undo.callback(run.close)
        with torch.no_grad():
            # stop as soon as the quota is reached: no batch is fetched (and dropped) beyond
            # it, so an iterator passed as the loader keeps its remaining batches, and a
            # rank whose share is zero reads none
            for batch in (loader if quota is None or quota > 0 else ()):
                x = batch_inputs(batch)
                if quota is not None and seen + x.shape[0] > quota:
                    x = x[: quota - seen]
                if side is not None:  # back-pressure: one batch of activations in flight
                    torch.cuda.current_stream(device).wait_stream(side)
                # asynchronous only into accelerator memory: a non-blocking copy from a GPU
                # to the CPU returns before the data has arrived (into pinned memory), and
                # the CPU forward would read it at once
                x = x.to(device, non_blocking=device.type != "cpu")
                if channels_last and x.dim() == 4:
                    x = x.contiguous(memory_format=torch.channels_last)
                run(x)
                seen += x.shape[0]
                if bar is not None:
                    bar.update(x.shape[0] * world)
                if quota is not None and seen >= quota:
                    break
    total = seen
    if distributed:
        import torch.distributed as dist

        for acc in accs.values():
            acc.all_reduce()
        # NCCL: on the device the accumulators reduce on (the model's), not the current one
        nccl = dist.get_backend() == "nccl"
        t = torch.tensor([seen], dtype=torch.float64,
                         device=(device if device.type == "cuda" else "cuda") if nccl else "cpu")
        dist.all_reduce(t)
        total = int(t.item())
    if total == 0:
        raise ValueError("calibrate: the loader yielded no samples")
    idle = [name for name, a in accs.items() if a.count == 0]
    if idle:  # all-zero statistics would let lossless / energy pruning cut such a layer away
        raise ValueError(f"calibrate: the activations of CoB layers {idle} never ran in the "
                         "model's forward; calibrate only the layers the forward pass uses "
                         "(layers=...)")
    meta = dict(meta or {})
    # recorded where it took effect (a CPU pass runs the reference path, which ignores it)
    if f32_dot not in (None, "ieee") and any(a.f32_dot_applied for a in accs.values()):
        meta["f32_dot"] = f32_dot
    basis = meta.pop("basis", "original")
    out = {}
    for lay in chosen:
        a = accs[lay.name]
        gu, gv, sa, sq = _to_cpu(a.tensors())
        out[lay.name] = LayerStats(lay.name, lay.num_channels, lay.split, gu, gv, sa, sq,
                                   a.count, basis, a.accumulation,
                                   weight_fingerprint(lay.producer))
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # the pinned copies below were queued asynchronously
    for s in out.values():
        s.check_finite()  # NaN/Inf activations: say so now, not as odd rankings later
    return CalibrationStats(out, total, meta)


def _images_in(loader: Any) -> int | None:
    """How many images a pass over ``loader`` yields in all (every rank), where it says:
    a :class:`~cobkern.data.DeviceLoader`, or a loader over a sized ``dataset`` (a torch
    ``DataLoader``); ``None`` for anything else (a list of batches, a generator)."""
    from cobkern.data import DeviceLoader

    if isinstance(loader, DeviceLoader):
        return min(len(loader) * loader.global_batch_size, loader.num_samples)
    dataset = getattr(loader, "dataset", None)
    try:
        return len(dataset) if dataset is not None else None
    except TypeError:  # an iterable dataset
        return None


def _close_bar(bar) -> None:
    """Close a tqdm bar; one the loader ran out before (its total not reached) first ends
    at what was seen, so it does not show an unfinished pass."""
    if bar.total is not None and bar.n < bar.total:
        bar.total = bar.n
        bar.refresh()
    bar.close()


def _flat_input_check(lay):
    """A pre-hook asserting that a linear consumer sees ``(N, features)``: otherwise it acts
    on another axis than the channels (e.g. the width of an NCHW map, or what a partial
    flatten left), and a rotation of the channels could not be merged into its columns."""
    def hook(_module, inputs):
        x = inputs[0] if inputs else None
        if isinstance(x, Tensor) and x.dim() != 2:
            raise ValueError(
                f"calibrate: the linear consumer {lay.consumer_name!r} of CoB layer "
                f"{lay.name!r} gets a {x.dim()}-D input of shape {tuple(x.shape)}; CoB needs it "
                "flattened to (N, features) so that its columns are the channels (times "
                "positions) of the layer's activation")
    return hook


def _to_cpu(tensors: list[Tensor]) -> list[Tensor]:
    """Copy device tensors to CPU. From CUDA the copies go to pinned memory, queued without
    waiting (the caller synchronises once): a pageable copy of VGG-16's two 2048² float64
    Gram pairs took ~74 ms on an H200, more than the forward pass over 10,000 images."""
    out = []
    for t in tensors:
        if t.device.type == "cuda":
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            host.copy_(t, non_blocking=True)
            out.append(host)
        else:
            out.append(t.clone())
    return out
