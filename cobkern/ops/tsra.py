"""TSRA and fused RMSNorm→TSRA as ``torch.library`` custom ops with autograd.

Public functions: :func:`tsra`, :func:`rmsnorm_tsra` (differentiable) and their explicit
backward functions :func:`tsra_backward`, :func:`rmsnorm_tsra_backward`.

The ops ``cobkern::tsra`` / ``cobkern::tsra_backward`` carry an integer ``norm_size``:
``0`` is plain TSRA, ``n > 0`` prepends an unlearned RMSNorm with normaliser size ``n``.
They have fake (meta) implementations and an autograd formula, so they trace under
``torch.compile(fullgraph=True)`` as single opaque nodes and pass ``torch.library.opcheck``.
Only ``x`` is saved for backward; the per-position norms are recomputed there from ``x``,
which the backward must read anyway. With a ``bias`` (the ops' optional last argument, added
to ``x`` by the kernels) that needs a gradient, the forward's autograd formula calls
``cobkern::tsra_backward_bias`` instead, which returns ``(dx, dbias)``: the backward kernel
writes per-program partial sums of ``dx`` as it writes ``dx`` (where that pays:
:func:`cobkern.kernels.tsra.plan`), so the bias gradient is not a second read of ``dx``.

Inline twins: ``cobkern::tsra_inline`` / ``cobkern::tsra_inline_backward`` (and
``cobkern::tsra_inline_backward_bias``) are the same ops
registered with ``torch.library.triton_op``: ``torch.compile`` traces into them, so that
inductor's generated code launches the Triton kernels itself (through
``torch.library.wrap_triton``, with the launch plan the eager path would make) instead of
calling an op through the dispatcher, and their outputs join inductor's memory plan. On CPU
tensors they trace to the reference formula, which inductor compiles like any other ops
(with the Triton interpreter on, ``TRITON_INTERPRET=1``, to the opaque op, whose
interpreted kernels then run as in eager mode).
Which pair compiled code uses is :func:`cobkern.ops.set_compile_kernels` (default
``"auto"``: inline, timed faster on a CPU and on an H200); eager calls take the fast path below
either way. The inline ops also take the backend and the ``COBKERN_TSRA_TUNING`` setting as
arguments (:func:`_op_call`), so a compiled graph records what it was traced with. A launch
is planned from the traced sizes (its block sizes depend on them): with symbolic sizes
(dynamic shapes) the inline ops put the opaque op in the graph instead, which plans at run
time.

Higher-order gradients: the backward is itself differentiable. ``cobkern::tsra_backward``
has an autograd formula (autograd through the plain-PyTorch
:func:`cobkern.ops.reference.tsra_backward`, the same closed form), and the eager fast path
wraps its backward launch the same way when ``create_graph=True``, so gradient penalties
and Hessian-vector products get every second-order term on every backend. The first-order
backward (``create_graph=False``) launches the kernel and nothing else.

The registered ops validate their arguments themselves (``split``, ``dim``, ``norm_size``,
the epsilons and, for the backward, ``grad``'s shape, dtype and device), so a direct
``torch.ops.cobkern.*`` call with bad arguments raises instead of reading or writing out of
bounds; the eager fast path, whose public wrappers already validated, does not check twice.

Value range: the per-position sums of squares are accumulated in float32 (float64 for
float64 input), so ``||x||`` over the channel axis must stay below about ``1.8e19``
(``sqrt`` of float32's largest value); beyond that the sum overflows and the output is NaN,
although TSRA itself is scale-invariant. float16 inputs cannot get there; float32 and
bfloat16 inputs can. Rescale such activations first.

Eager fast path: outside ``torch.compile`` tracing, on plain tensors, the public functions
run the same launchers through a ``torch.autograd.Function`` instead of the dispatcher's
custom-op round trip. Both paths call :func:`_launch_or_reference`, so they compute the
same bits; the fast one costs a fraction of the host time per call, which is what limits
small layers (a 1024×512×2×2 activation takes microseconds on the GPU). Tensor subclasses
(fake tensors, ...) and compiled code always take the registered ops.

``torch.func`` transforms (``grad``, ``jvp``, ``jacrev``, ``jacfwd``, ``vmap``) and
forward-mode AD in eager mode run the plain-PyTorch formula in the public functions
(:func:`tsra`, :func:`rmsnorm_tsra` and the explicit backwards; :mod:`.reference` with
``differentiable=True``): an autograd formula registered with
``torch.library.register_autograd`` has no forward-mode rule and no ``torch.func`` support.
The raw ``torch.ops.cobkern.*`` ops therefore support reverse-mode autograd and
``torch.compile`` only (under ``torch.func.grad`` PyTorch raises; under ``jvp`` it returns a
zero tangent): call the public functions under ``torch.func``.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor
from torch.autograd import forward_ad

from . import reference
from ._checks import (
    KERNEL_DTYPES,
    channel_geometry,
    check_activation_input,
    check_bias,
    check_gain,
    check_norm_size,
    check_rms_eps,
    check_same_device,
    check_same_shape,
    check_tsra_eps,
    is_int,
)
from .backend import (
    BACKENDS,
    compile_kernels_for,
    get_backend,
    interpreter_enabled,
    use_triton,
)
from .tuning import ENV_VAR as TUNING_ENV
from .tuning import FROM_ENV, env_setting, launch_tuning

__all__ = ["tsra", "rmsnorm_tsra", "tsra_backward", "rmsnorm_tsra_backward"]

DEFAULT_A_U = 5.0
DEFAULT_B_U = 0.5
DEFAULT_A_V = 5.0
DEFAULT_B_V = 0.7
DEFAULT_EPS = 1e-12
DEFAULT_RMS_EPS = 1e-6


def _kernel_supported(x: Tensor) -> bool:
    return x.dtype in KERNEL_DTYPES


_KERNELS = None
#: Launch plans (:func:`cobkern.kernels.tsra.plan`) by ``(direction, shape, strides, dtype,
#: device, dim, split, RMSNorm?, tuning setting)``: the geometry, tuning lookup and kernel
#: choice of a layer are made once, not on every call (~2 µs of host time per launch, which
#: is what the small layers' eager calls cost). Bounded: past ``_MAX_PLANS`` shapes (e.g. a
#: stream of ever-new batch sizes) launches are planned each time instead.
_PLANS: dict[tuple, object] = {}
_MAX_PLANS = 4096


def _kernels():
    """``cobkern.kernels.tsra``, imported on first use (importing triton is slow) and kept:
    an ``import`` statement on every launch cost ~0.75 µs of host time."""
    global _KERNELS
    if _KERNELS is None:
        from triton.runtime.jit import JITFunction

        from cobkern.kernels import tsra

        # torch.compile's AOTAutograd cache keys a graph on the sources of the kernels its
        # triton_ops launch, which triton_op finds by reading the op's body; ours picks its
        # kernel from a table, so name them (a registry private to PyTorch: without it,
        # editing a kernel could reuse a stale compiled graph, nothing worse). Compiled
        # kernels only: interpreted ones have no source, and the cache would be skipped.
        registry = getattr(torch._library.triton, "triton_ops_to_kernels", None)
        kernels = [k for k in dict.fromkeys(tsra.KERNELS.values()) if isinstance(k, JITFunction)]
        if isinstance(registry, dict) and kernels:
            registry["cobkern::tsra_inline"] = kernels
            registry["cobkern::tsra_inline_backward"] = list(kernels)
            registry["cobkern::tsra_inline_backward_bias"] = list(kernels)
        _KERNELS = tsra
    return _KERNELS


def _launch_or_reference(fwd: bool, x: Tensor, grad: Tensor | None, args: tuple,
                         traced: bool = False, backend: str | None = None,
                         tuning: str | None | object = FROM_ENV,
                         bias: Tensor | None = None,
                         bias_grad: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Run one direction on ``x`` (and ``grad``): the kernel where it can run, else the
    plain-PyTorch reference. ``bias``: a ``(C,)`` tensor added to ``x`` first (by the
    kernel as it loads ``x``; the backward then returns the gradient with respect to
    ``x + bias``).

    ``bias_grad=True`` (backward with a bias) returns ``(dx, dbias)``, the bias gradient in
    the bias's dtype: summed from the partial sums the backward kernel writes where that pays
    (:func:`cobkern.kernels.tsra.plan`), else ``dx`` summed over the positions.

    ``backend`` / ``tuning``: the backend (:mod:`.backend`) and tuning setting (the value of
    :data:`.tuning.ENV_VAR`, ``None`` for unset) to apply instead of the current ones — the
    inline ops carry them as arguments, so that a compiled graph records what it was traced
    with (``torch.compile`` guards on them in :func:`_op_call`, and its caches key on them).

    ``traced=True`` is the body of the inline (``triton_op``) ops while ``torch.compile``
    (or another dispatcher-level tracer) traces them: the launch goes through
    ``torch.library.wrap_triton`` so that it lands in the graph, with a plan made from the
    traced sizes. Where a size or constant is symbolic (dynamic shapes) the plan cannot be
    made — a launch's block sizes depend on the sizes — and the opaque op runs instead,
    planning at run time. CPU tensors take the reference formula (inductor compiles those
    ops like any others) — or, where the kernels would run on them (the Triton interpreter,
    under the ``"auto"`` or ``"triton"`` backend), the opaque op, which runs them then.
    """
    split, dim, a_u, b_u, a_v, b_v, eps, norm_size, rms_eps = args
    op = "cobkern.tsra" if fwd else "cobkern.tsra_backward"
    if x.numel() == 0:
        out = torch.empty_like(x)
        return (out, torch.zeros_like(bias)) if bias_grad else out
    kernel = use_triton(x, op=op, supported=_kernel_supported(x), backend=backend)
    if traced and kernel and (not x.is_cuda or _symbolic(x, grad, args)):
        fwd_op, bwd_op, bwd_bias_op = _OPS["opaque"]
        if fwd:
            return fwd_op(x, *args, bias)
        return (bwd_bias_op if bias_grad else bwd_op)(grad, x, *args, bias)
    if not kernel:
        if fwd:
            return reference.tsra_forward(x, *args, bias=bias)
        out = reference.tsra_backward(grad, x, *args, bias=bias)
        return (out, _bias_grad(out, dim, bias)) if bias_grad else out

    kernels = _kernels()
    has_bias = bias is not None
    if has_bias and bias.stride(0) != 1:
        bias = bias.contiguous()  # C values: the kernels index it densely
    bias_grad = bias_grad and has_bias and not fwd
    out = torch.empty_like(x)
    consts = (a_u, b_u, a_v, b_v, eps, norm_size, rms_eps)
    setting = env_setting() if tuning is FROM_ENV else tuning
    run = kernels.run_traced if traced else kernels.run
    if not traced and (grad is None or grad.stride() == x.stride()):
        # the launch is a function of this key
        key = (fwd, x.shape, x.stride(), x.dtype, x.get_device(), dim, split, norm_size > 0,
               setting, has_bias, bias_grad)
        p = _PLANS.get(key)
        if p is None and len(_PLANS) < _MAX_PLANS:
            geo = channel_geometry(x, dim)
            if geo is not None:
                p = _PLANS[key] = _plan(kernels, fwd, x, geo, split, norm_size, setting,
                                        has_bias, bias_grad)
        if p is not None:
            if bias_grad:
                return _run_with_bias_grad(kernels, run, p, (grad, x, out), consts, bias, dim)
            run(p, (x, out) if fwd else (grad, x, out), *consts, bias)
            return out
    # not planned: a layout the kernels cannot read in place, a grad in another layout than
    # x (both then go through one common contiguous copy), a full plan cache, or tracing
    geo = channel_geometry(x, dim)
    if grad is not None and geo is not None and channel_geometry(grad, dim) != geo:
        geo = None
    if geo is not None:
        p = _plan(kernels, fwd, x, geo, split, norm_size, setting, has_bias, bias_grad)
        if bias_grad:
            return _run_with_bias_grad(kernels, run, p, (grad, x, out), consts, bias, dim)
        run(p, (x, out) if fwd else (grad, x, out), *consts, bias)
        return out
    xc = x.contiguous()
    res = torch.empty_like(xc)
    geo = channel_geometry(xc, dim)
    p = _plan(kernels, fwd, xc, geo, split, norm_size, setting, has_bias, bias_grad)
    if bias_grad:
        _, dbias = _run_with_bias_grad(kernels, run, p, (grad.contiguous(), xc, res), consts,
                                       bias, dim)
        return out.copy_(res), dbias
    run(p, (xc, res) if fwd else (grad.contiguous(), xc, res), *consts, bias)
    out.copy_(res)
    return out


def _run_with_bias_grad(kernels, run, p, tensors: tuple[Tensor, Tensor, Tensor],
                        consts: tuple, bias: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """Launch the backward plan ``p`` on ``(grad, x, dx)``; return ``(dx, dbias)``, the bias
    gradient from the kernel's partial sums where the plan writes them, else from ``dx``."""
    dx = tensors[2]
    if not p.constexprs["BIAS_GRAD"]:
        run(p, tensors, *consts, bias)
        return dx, _bias_grad(dx, dim, bias)
    partials = kernels.bias_grad_buffer(p, dx.device)
    run(p, tensors, *consts, bias, partials)
    return dx, partials.sum(0).to(bias.dtype)


def _symbolic(x: Tensor, grad: Tensor | None, args: tuple) -> bool:
    """Whether a size, stride or argument is symbolic (``torch.compile`` dynamic shapes)."""
    values = [*x.shape, *x.stride(), *args]
    if grad is not None:
        values += [*grad.shape, *grad.stride()]
    return any(isinstance(v, (torch.SymInt, torch.SymFloat)) for v in values)


def _plan(kernels, fwd: bool, x: Tensor, geo, split: int, norm_size: int,
          setting: str | None, has_bias: bool = False, bias_grad: bool = False):
    """The launch plan of one direction on ``x`` (``geo`` its geometry), with the overrides
    of the tuning table that ``setting`` (:data:`.tuning.ENV_VAR`'s value) selects."""
    direction = "forward" if fwd else "backward"
    tuning = launch_tuning(x.device, direction, x.element_size(), geo.channels_contig, geo.C,
                           split, geo.P, setting, rmsnorm=norm_size > 0)
    return kernels.plan(direction, geo, split, norm_size > 0, x.element_size(), tuning,
                        has_bias=has_bias, bias_grad=bias_grad, device=x.device)


def _check_grad(name: str, grad: Tensor, x: Tensor) -> None:
    """``grad`` must be a tensor of ``x``'s shape, dtype and device."""
    if not isinstance(grad, Tensor):
        raise TypeError(f"{name}: grad must be a torch.Tensor, got {type(grad).__name__}")
    check_same_device(name, grad=grad, x=x)
    check_same_shape(name, "grad", grad, "x", x)
    if grad.dtype != x.dtype:
        raise TypeError(f"{name}: grad has dtype {grad.dtype} but x has dtype {x.dtype}")


def _check_op_args(name: str, x: Tensor, split: int, dim: int, eps: float, norm_size: int,
                   rms_eps: float, grad: Tensor | None = None,
                   backend: str | None = None, bias: Tensor | None = None) -> int:
    """Validate a registered op's raw arguments; return ``dim`` normalised to ``[0, x.dim())``.

    The ops are public through ``torch.ops.cobkern``, and the kernels trust ``split``,
    ``dim`` and the shapes, so the op implementations (real and fake) check them here; it
    reads only shapes and Python scalars, never data.
    """
    dim = check_activation_input(name, x, split, dim)[1]
    if not is_int(norm_size) or norm_size < 0:
        raise ValueError(f"{name}: norm_size must be an int >= 0 (0: plain TSRA, n > 0: "
                         f"RMSNorm over n then TSRA), got {norm_size!r}")
    check_tsra_eps(name, eps)
    check_rms_eps(name, rms_eps, "rms_eps")
    if grad is not None:
        _check_grad(name, grad, x)
    check_bias(name, bias, x, dim)
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"{name}: backend must be one of {BACKENDS}, got {backend!r}")
    return dim


# ----------------------------------------------------------------------------- custom ops
def _tracing(x: Tensor) -> bool:
    """Whether an inline op's body runs under a dispatcher-level tracer (``torch.compile``'s
    AOT tracing, fake-tensor propagation) rather than on real tensors: ``triton_op`` turns
    ``wrap_triton`` off around its eager calls. Either answer computes the right values
    (a ``wrap_triton`` launch outside tracing is a plain launch); the fallback is for a
    PyTorch without that switch."""
    enabled = getattr(torch._library.triton, "is_wrap_triton_enabled", None)
    return enabled() if enabled is not None else type(x) is not Tensor


def _fake_forward(x: Tensor, split: int, dim: int, a_u: float, b_u: float, a_v: float,
                  b_v: float, eps: float, norm_size: int, rms_eps: float,
                  bias: Tensor | None = None) -> Tensor:
    """Fake (meta) implementation of ``cobkern::tsra``: ``x``'s shape, dtype, strides."""
    _check_op_args("cobkern.tsra", x, split, dim, eps, norm_size, rms_eps, bias=bias)
    return torch.empty_like(x)


def _fake_backward(grad: Tensor, x: Tensor, split: int, dim: int, a_u: float, b_u: float,
                   a_v: float, b_v: float, eps: float, norm_size: int, rms_eps: float,
                   bias: Tensor | None = None) -> Tensor:
    """Fake (meta) implementation of ``cobkern::tsra_backward``."""
    _check_op_args("cobkern.tsra_backward", x, split, dim, eps, norm_size, rms_eps, grad,
                   bias=bias)
    return torch.empty_like(x)


def _fake_backward_bias(grad: Tensor, x: Tensor, split: int, dim: int, a_u: float,
                        b_u: float, a_v: float, b_v: float, eps: float, norm_size: int,
                        rms_eps: float, bias: Tensor) -> tuple[Tensor, Tensor]:
    """Fake (meta) implementation of ``cobkern::tsra_backward_bias``."""
    _check_op_args("cobkern.tsra_backward_bias", x, split, dim, eps, norm_size, rms_eps, grad,
                   bias=_required_bias("cobkern.tsra_backward_bias", bias))
    return torch.empty_like(x), torch.empty_like(bias)


def _required_bias(name: str, bias: Tensor | None) -> Tensor:
    if bias is None:
        raise ValueError(f"{name}: needs a bias (the op returns its gradient)")
    return bias


def _op_body(name: str, grad: Tensor | None, x: Tensor, params: tuple,
             backend: str | None = None, tuning: str | None = None,
             bias: Tensor | None = None,
             bias_grad: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """What every registered op runs: check the raw arguments, then launch or run the
    reference (``grad is None``: the forward; ``bias_grad``: the backward returning the bias
    gradient too). ``backend`` / ``tuning`` are the inline ops' extra arguments (``None``:
    an opaque op, which applies the current ones)."""
    split, dim, a_u, b_u, a_v, b_v, eps, norm_size, rms_eps = params
    if bias_grad:
        _required_bias(name, bias)
    dim = _check_op_args(name, x, split, dim, eps, norm_size, rms_eps, grad, backend=backend,
                         bias=bias)
    args = (split, dim, a_u, b_u, a_v, b_v, eps, norm_size, rms_eps)
    if backend is None:
        return _launch_or_reference(grad is None, x, grad, args, bias=bias,
                                    bias_grad=bias_grad)
    return _launch_or_reference(grad is None, x, grad, args, traced=_tracing(x),
                                backend=backend, tuning=tuning or None, bias=bias,
                                bias_grad=bias_grad)


def _define_ops(suffix: str, inline: bool) -> tuple:
    """Register ``cobkern::tsra{suffix}``, ``cobkern::tsra{suffix}_backward`` and
    ``cobkern::tsra{suffix}_backward_bias`` with their autograd formulas:
    ``torch.library.custom_op`` (opaque to ``torch.compile``) or, when ``inline``,
    ``torch.library.triton_op`` (traced into: inductor launches the kernels).
    The inline ops take two more arguments, the backend and the tuning setting to apply
    (``""``: the environment variable unset), which :func:`_op_call` reads where dynamo
    traces, so that a compiled graph is guarded and cached on them. Every op ends with a
    ``bias`` (``(C,)``, added to ``x`` first; its gradient is the input gradient summed over
    the positions): optional for the forward and backward, required by ``_backward_bias``,
    which returns ``(dx, dbias)`` — the forward's autograd formula calls it when the bias
    needs a gradient, so that the backward kernel can sum it as it writes ``dx``."""
    fwd_name, bwd_name = f"cobkern.tsra{suffix}", f"cobkern.tsra{suffix}_backward"  # errors
    bwd_bias_name = f"{bwd_name}_bias"
    register = torch.library.triton_op if inline else torch.library.custom_op

    if inline:
        def forward(x: Tensor, split: int, dim: int, a_u: float, b_u: float, a_v: float,
                    b_v: float, eps: float, norm_size: int, rms_eps: float, backend: str,
                    tuning: str, bias: Tensor | None = None) -> Tensor:
            return _op_body(fwd_name, None, x, (split, dim, a_u, b_u, a_v, b_v, eps,
                                                norm_size, rms_eps), backend, tuning, bias)

        def backward(grad: Tensor, x: Tensor, split: int, dim: int, a_u: float, b_u: float,
                     a_v: float, b_v: float, eps: float, norm_size: int, rms_eps: float,
                     backend: str, tuning: str, bias: Tensor | None = None) -> Tensor:
            return _op_body(bwd_name, grad, x, (split, dim, a_u, b_u, a_v, b_v, eps,
                                                norm_size, rms_eps), backend, tuning, bias)

        def backward_bias(grad: Tensor, x: Tensor, split: int, dim: int, a_u: float,
                          b_u: float, a_v: float, b_v: float, eps: float, norm_size: int,
                          rms_eps: float, backend: str, tuning: str,
                          bias: Tensor) -> tuple[Tensor, Tensor]:
            return _op_body(bwd_bias_name, grad, x, (split, dim, a_u, b_u, a_v, b_v, eps,
                                                     norm_size, rms_eps), backend, tuning,
                            bias, bias_grad=True)
    else:
        def forward(x: Tensor, split: int, dim: int, a_u: float, b_u: float, a_v: float,
                    b_v: float, eps: float, norm_size: int, rms_eps: float,
                    bias: Tensor | None = None) -> Tensor:
            return _op_body(fwd_name, None, x, (split, dim, a_u, b_u, a_v, b_v, eps,
                                                norm_size, rms_eps), bias=bias)

        def backward(grad: Tensor, x: Tensor, split: int, dim: int, a_u: float, b_u: float,
                     a_v: float, b_v: float, eps: float, norm_size: int,
                     rms_eps: float, bias: Tensor | None = None) -> Tensor:
            return _op_body(bwd_name, grad, x, (split, dim, a_u, b_u, a_v, b_v, eps,
                                                norm_size, rms_eps), bias=bias)

        def backward_bias(grad: Tensor, x: Tensor, split: int, dim: int, a_u: float,
                          b_u: float, a_v: float, b_v: float, eps: float, norm_size: int,
                          rms_eps: float, bias: Tensor) -> tuple[Tensor, Tensor]:
            return _op_body(bwd_bias_name, grad, x, (split, dim, a_u, b_u, a_v, b_v, eps,
                                                     norm_size, rms_eps), bias=bias,
                            bias_grad=True)

    fwd_op = register(fwd_name.replace(".", "::"), forward, mutates_args=())
    bwd_op = register(bwd_name.replace(".", "::"), backward, mutates_args=())
    bwd_bias_op = register(bwd_bias_name.replace(".", "::"), backward_bias, mutates_args=())
    if not inline:  # a triton_op's fake implementation is its body
        fwd_op.register_fake(_fake_forward)
        bwd_op.register_fake(_fake_backward)
        bwd_bias_op.register_fake(_fake_backward_bias)

    def vjp(ctx, grad):
        x, bias = ctx.saved_tensors
        if bias is not None and _needs_last(ctx):
            dx, dbias = bwd_bias_op(grad, x, *ctx.params, bias)
        else:
            dx, dbias = bwd_op(grad, x, *ctx.params, bias), None
        return (dx,) + (None,) * len(ctx.params) + (dbias,)

    torch.library.register_autograd(bwd_op, _backward_backward,
                                    setup_context=_setup_backward_context)
    torch.library.register_autograd(bwd_bias_op, _backward_bias_backward,
                                    setup_context=_setup_backward_context)
    torch.library.register_autograd(fwd_op, vjp, setup_context=_setup_context)
    return fwd_op, bwd_op, bwd_bias_op


def _double_backward(
    v: Tensor, grad: Tensor, x: Tensor, params: tuple, need_grad: bool, need_x: bool,
    bias: Tensor | None = None, need_bias: bool = False,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Vector-Jacobian product of ``dx = tsra_backward(grad, x[, bias])`` with
    ``v = dL/d(dx)``.

    Returns the partial derivatives ``(dL/dgrad, dL/dx, dL/dbias)`` (``None`` where not
    needed), by ``torch.func.vjp`` through the plain-PyTorch :func:`reference.tsra_backward`
    (the kernels' closed form, differentiable op by op). ``torch.func.vjp`` differentiates
    with respect to ``grad``, ``x`` and ``bias`` only (``grad`` usually depends on ``x`` as
    well; the caller's autograd adds that path), and its results stay differentiable for the
    outer autograd, so with ``create_graph=True`` third and higher orders are right too.
    """
    need_bias = need_bias and bias is not None
    if not (need_grad or need_x or need_bias):
        return None, None, None

    def dx_of(g: Tensor, xx: Tensor, *b: Tensor) -> Tensor:  # b: the bias, when there is one
        return reference.tsra_backward(g, xx, *params, differentiable=True,
                                       bias=b[0] if b else None)

    _, vjp_fn = torch.func.vjp(dx_of, grad, x, *(() if bias is None else (bias,)))
    dgrad, dx, *db = vjp_fn(v)
    return ((dgrad if need_grad else None), (dx if need_x else None),
            (db[0] if need_bias else None))


def _bias_grad(dx: Tensor, dim: int, bias: Tensor | None) -> Tensor | None:
    """The bias gradient: the input gradient summed over every axis but the channels
    (in float32 at least), in the bias's dtype."""
    if bias is None:
        return None
    dim = dim % dx.dim()
    dims = [d for d in range(dx.dim()) if d != dim]
    acc = torch.promote_types(dx.dtype, torch.float32)
    return dx.sum(dims, dtype=acc).to(bias.dtype)


def _needs_last(ctx) -> bool:
    """Whether autograd wants the gradient of a registered op's last input (the bias)."""
    need = ctx.needs_input_grad
    return len(need) == ctx.n_inputs and bool(need[-1])


def _setup_backward_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple,
                            output: Tensor) -> None:
    grad, x, *params, bias = inputs
    ctx.save_for_backward(grad, x, bias)
    ctx.params = tuple(params)
    ctx.n_inputs = len(inputs)


def _backward_backward(ctx: torch.autograd.function.FunctionCtx, v: Tensor) -> tuple:
    """Autograd formula of ``cobkern::tsra_backward`` (double backward of ``cobkern::tsra``)."""
    grad, x, bias = ctx.saved_tensors
    # the formula's nine parameters (the inline op adds its backend and tuning setting)
    dgrad, dx, db = _double_backward(v, grad, x, ctx.params[:9], *ctx.needs_input_grad[:2],
                                     bias=bias, need_bias=_needs_last(ctx))
    return (dgrad, dx) + (None,) * len(ctx.params) + (db,)


def _fold_bias_cotangent(v: Tensor | None, v_bias: Tensor | None, x: Tensor,
                         dim: int) -> Tensor | None:
    """The cotangent of ``dx`` once that of ``dbias`` (``dx`` summed over the positions) is
    added: ``v_bias`` broadcast along the channel axis ``dim``."""
    if v_bias is None:
        return v
    shape = [1] * x.dim()
    shape[dim % x.dim()] = x.shape[dim]
    vb = v_bias.to(x.dtype).reshape(shape)
    return vb.expand_as(x) if v is None else v + vb


def _backward_bias_backward(ctx: torch.autograd.function.FunctionCtx, v: Tensor | None,
                            v_bias: Tensor | None) -> tuple:
    """Autograd formula of ``cobkern::tsra_backward_bias``: ``dbias`` is ``dx`` summed over
    the positions, so its cotangent reaches ``dx``'s broadcast along the channel axis."""
    grad, x, bias = ctx.saved_tensors
    v = _fold_bias_cotangent(v, v_bias, x, ctx.params[1])
    if v is None:
        return (None,) * (ctx.n_inputs)
    dgrad, dx, db = _double_backward(v, grad, x, ctx.params[:9], *ctx.needs_input_grad[:2],
                                     bias=bias, need_bias=_needs_last(ctx))
    return (dgrad, dx) + (None,) * len(ctx.params) + (db,)


def _setup_context(ctx, inputs, output):
    x, *params, bias = inputs
    ctx.save_for_backward(x, bias)
    ctx.params = tuple(params)
    ctx.n_inputs = len(inputs)


#: ``(forward, backward)`` ops by compile-kernels mode (:func:`.backend.set_compile_kernels`)
_OPS = {"opaque": _define_ops("", inline=False), "inline": _define_ops("_inline", inline=True)}


class _TSRAFunction(torch.autograd.Function):
    """Eager fast path: the same launchers as the custom ops, without the dispatcher.
    ``params`` travel as one tuple argument: autograd inspects every argument of
    ``apply`` (nine scalars cost ~0.9 µs more per forward+backward)."""

    @staticmethod
    def forward(ctx, x: Tensor, params: tuple) -> Tensor:
        ctx.save_for_backward(x)
        ctx.params = params
        return _launch_or_reference(True, x, None, params)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (x,) = ctx.saved_tensors
        if _batched_backward(grad):  # vmapped: is_grads_batched, vectorized jacobian
            return _plain_backward(grad, x, None, ctx.params, False)[0], None
        if torch.is_grad_enabled():  # create_graph=True: dx must carry its own graph
            dx = _TSRABackwardFunction.apply(grad, x, None, ctx.params)
        else:
            dx = _launch_or_reference(False, x, grad, ctx.params)
        return dx, None


class _TSRABiasFunction(torch.autograd.Function):
    """The eager fast path with a bias added to ``x`` in the kernel (a separate Function:
    the bias-free one keeps its two-argument ``apply``, whose host time is what the small
    layers cost)."""

    @staticmethod
    def forward(ctx, x: Tensor, bias: Tensor, params: tuple) -> Tensor:
        ctx.save_for_backward(x, bias)
        ctx.params = params
        return _launch_or_reference(True, x, None, params, bias=bias)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, bias = ctx.saved_tensors
        if _batched_backward(grad):  # vmapped: is_grads_batched, vectorized jacobian
            return (*_plain_backward(grad, x, bias, ctx.params, ctx.needs_input_grad[1]), None)
        if torch.is_grad_enabled():  # create_graph=True: dx must carry its own graph
            if ctx.needs_input_grad[1]:
                dx, db = _TSRABackwardBiasFunction.apply(grad, x, bias, ctx.params)
            else:
                dx, db = _TSRABackwardFunction.apply(grad, x, bias, ctx.params), None
        elif ctx.needs_input_grad[1]:  # the kernel sums the bias gradient as it writes dx
            dx, db = _launch_or_reference(False, x, grad, ctx.params, bias=bias,
                                          bias_grad=True)
        else:
            dx, db = _launch_or_reference(False, x, grad, ctx.params, bias=bias), None
        return dx, db, None


class _TSRABackwardFunction(torch.autograd.Function):
    """``dx`` of the eager fast path when ``create_graph=True``: the same launch as the
    first-order backward (same bits), differentiable through :func:`_double_backward`."""

    @staticmethod
    def forward(ctx, grad: Tensor, x: Tensor, bias: Tensor | None, params: tuple) -> Tensor:
        ctx.save_for_backward(grad, x, bias)
        ctx.params = params
        return _launch_or_reference(False, x, grad, params, bias=bias)

    @staticmethod
    def backward(ctx, v: Tensor):
        grad, x, bias = ctx.saved_tensors
        dgrad, dx, db = _double_backward(v, grad, x, ctx.params, *ctx.needs_input_grad[:2],
                                         bias=bias, need_bias=ctx.needs_input_grad[2])
        return dgrad, dx, db, None


class _TSRABackwardBiasFunction(torch.autograd.Function):
    """``(dx, dbias)`` of the eager fast path when ``create_graph=True``: the same launch as
    the first-order backward (same bits, the bias gradient included), differentiable."""

    @staticmethod
    def forward(ctx, grad: Tensor, x: Tensor, bias: Tensor,
                params: tuple) -> tuple[Tensor, Tensor]:
        ctx.save_for_backward(grad, x, bias)
        ctx.params = params
        return _launch_or_reference(False, x, grad, params, bias=bias, bias_grad=True)

    @staticmethod
    def backward(ctx, v: Tensor | None, v_bias: Tensor | None):
        grad, x, bias = ctx.saved_tensors
        v = _fold_bias_cotangent(v, v_bias, x, ctx.params[1])
        if v is None:
            return None, None, None, None
        dgrad, dx, db = _double_backward(v, grad, x, ctx.params, *ctx.needs_input_grad[:2],
                                         bias=bias, need_bias=ctx.needs_input_grad[2])
        return dgrad, dx, db, None


def _plain_formula() -> bool:
    """Whether to run the plain-PyTorch formula: a ``torch.func`` transform or forward-mode
    AD is active. Also asked while ``torch.compile`` traces: a ``torch.func.jvp`` / ``grad``
    compiled around the op reached the registered op, whose formula has no forward-mode or
    functorch rule (a zero tangent without a word); Dynamo folds the answer into a constant,
    so a plain compiled call still keeps the registered op."""
    return torch._C._are_functorch_transforms_active() or forward_ad._current_level >= 0


#: ``torch.autograd.grad(..., is_grads_batched=True)`` and ``jacobian`` / ``hessian`` with
#: ``vectorize=True`` vmap the backward with the legacy vmap, whose batched cotangents are
#: not seen by :func:`_plain_formula` (no ``torch.func`` transform is active)
_is_legacy_batched = getattr(torch._C._functorch, "is_legacy_batchedtensor", lambda t: False)


def _batched_backward(grad: Tensor) -> bool:
    """Whether the eager fast path's backward runs vmapped over a batch of cotangents
    (legacy vmap, or ``torch.func.vmap`` around ``torch.autograd.grad``)."""
    return _is_legacy_batched(grad) or torch._C._are_functorch_transforms_active()


def _plain_backward(grad: Tensor, x: Tensor, bias: Tensor | None, params: tuple,
                    need_bias: bool) -> tuple[Tensor, Tensor | None]:
    """``(dx, dbias)`` of the eager fast path by the plain-PyTorch formula, out of place and
    differentiable: its backward under ``torch.func`` transforms, i.e. when autograd vmaps
    it over a batch of cotangents (``torch.autograd.grad(..., is_grads_batched=True)``,
    ``torch.autograd.functional.jacobian`` / ``hessian`` with ``vectorize=True``). The
    cotangent is then a batched tensor, which has no storage for a kernel to read and
    cannot be copied into an unbatched output."""
    dx = reference.tsra_backward(grad, x, *params, differentiable=True, bias=bias)
    return dx, (_bias_grad(dx, params[1], bias) if need_bias else None)


def _backward_apply(grad: Tensor, x: Tensor, *params, bias: Tensor | None = None) -> Tensor:
    """The explicit VJP through the op, or — under ``torch.func`` / forward-mode AD, which
    the registered formula does not support (a ``jvp`` got a zero tangent) — through the
    plain-PyTorch formula."""
    if _plain_formula():
        return reference.tsra_backward(grad, x, *params, differentiable=True, bias=bias)
    return _op_call(x, 1, (grad, x, *params), bias)


def _apply(x: Tensor, *params, bias: Tensor | None = None) -> Tensor:
    """Run TSRA through the eager fast path when that is safe, else through the custom op.

    Under ``torch.func`` transforms (``grad``, ``jvp``, ``jacrev``, ``vmap``, ...) and
    forward-mode AD, eager or compiled, the plain-PyTorch formula runs instead: an
    autograd formula registered with ``torch.library.register_autograd`` has no forward-mode
    rule and no ``torch.func`` support, so the custom op raised there, or — ``jvp`` — returned
    a zero tangent without a word.
    """
    if _plain_formula():
        return reference.tsra_forward(x, *params, differentiable=True, bias=bias)
    if type(x) is Tensor and not torch.compiler.is_compiling():
        if bias is None:
            return _TSRAFunction.apply(x, params)
        if type(bias) in (Tensor, torch.nn.Parameter):  # a layer's bias is a Parameter
            return _TSRABiasFunction.apply(x, bias, params)
    return _op_call(x, 0, (x, *params), bias)


def _op_call(x: Tensor, direction: int, args: tuple, bias: Tensor | None = None) -> Tensor:
    """Call the forward (``direction`` 0) or backward (1) op that :func:`compile_kernels_for`
    picks for ``x``. The inline ops get the current backend and tuning setting as arguments,
    read here, where dynamo traces: the graph holds them, so every compile cache keys on
    them, and a compiled function is recompiled when the backend or the variable's value
    changes — not when an unset ``COBKERN_TSRA_TUNING`` is set afterwards (dynamo does not
    guard on a variable's absence; ``torch._dynamo.reset()`` then). On a CPU tensor without
    the Triton interpreter ``"auto"`` is recorded as what it means there, ``"reference"``:
    a graph traced with the interpreter (which calls the kernels) and one traced without
    (the formula) then differ, so a compile cache never serves one for the other."""
    mode = compile_kernels_for(x)
    if mode == "inline":
        b = get_backend()
        if b == "auto" and x.device.type == "cpu" and not interpreter_enabled():
            b = "reference"
        args = (*args, b, os.environ.get(TUNING_ENV) or "")
    return _OPS[mode][direction](*args, bias)


# ----------------------------------------------------------------------------- public API
def tsra(
    x: Tensor,
    split: int,
    dim: int = 1,
    *,
    a_u: float = DEFAULT_A_U,
    b_u: float = DEFAULT_B_U,
    a_v: float = DEFAULT_A_V,
    b_v: float = DEFAULT_B_V,
    eps: float = DEFAULT_EPS,
    bias: Tensor | None = None,
) -> Tensor:
    """Two-subspace radial activation (``method.md`` §1), differentiable.

    Splits the channels of ``x`` along ``dim`` into ``U = [0, split)`` and ``V = [split, C)``
    and scales each subspace by a logistic function of ``r = ||x_U|| / (||x|| + eps)``.

    Args:
        x: ``(N, C)``, ``(N, C, L)``, ``(N, C, H, W)`` (NCHW or channels_last) or
            ``(N, C, D, H, W)``; float16, bfloat16, float32 (accumulated in float32) or
            float64 (reference path only). Any ``C >= 2``.
        split: size of the first subspace, ``1 <= split < C``.
        dim: the channel axis (default 1).
        a_u, b_u, a_v, b_v: logistic gain constants; defaults 5, 0.5, 5, 0.7.
        eps: added to ``||x||`` in the ratio; default 1e-12. Must be a normal float32
            number, from about ``1.2e-38`` to ``3.4e38`` (with ``eps = 0`` the output at
            ``x = 0`` would be NaN; a subnormal one too, where the GPU flushes it to 0).
        bias: optional ``(C,)`` float tensor added to ``x`` along ``dim`` first: the
            result is ``tsra(x + bias)``, with the add done by the kernel as it loads ``x``
            (in float32, not rounded to ``x``'s dtype) instead of in a pass of its own —
            the bias of the convolution or linear layer in front, run without it.
            Differentiable; its gradient is the input gradient summed over the positions.

    Returns:
        Tensor of ``x``'s shape, dtype and memory format. Differentiable to any order
        (the second-order terms go through the plain-PyTorch reference formula).

    Raises:
        TypeError, ValueError, IndexError: for a bad ``x``, ``split``, ``dim``, ``eps``,
        gain constant (not a finite number) or ``bias``. RuntimeError: ``bias`` on another
        device than ``x``.

    Range:
        The per-position sums of squares accumulate in float32 (float64 for float64
        input): ``||x||`` over the channel axis must stay below about ``1.8e19`` (the square
        root of float32's largest value), otherwise they overflow and the output is NaN
        even though TSRA is scale-invariant. float16 cannot reach that; for float32 or
        bfloat16 activations that large, rescale first (``tsra(c * x) = c * tsra(x)``).

    Example::

        >>> y = tsra(torch.randn(8, 64, 32, 32), split=32)
    """
    split, dim = check_activation_input("cobkern.tsra", x, split, dim)
    eps = check_tsra_eps("cobkern.tsra", eps)
    gain = check_gain("cobkern.tsra", a_u, b_u, a_v, b_v)
    check_bias("cobkern.tsra", bias, x, dim)
    return _apply(x, split, dim, *gain, eps, 0, 0.0, bias=bias)


def rmsnorm_tsra(
    x: Tensor,
    split: int,
    dim: int = 1,
    *,
    eps: float = DEFAULT_RMS_EPS,
    norm_size: int | None = None,
    a_u: float = DEFAULT_A_U,
    b_u: float = DEFAULT_B_U,
    a_v: float = DEFAULT_A_V,
    b_v: float = DEFAULT_B_V,
    tsra_eps: float = DEFAULT_EPS,
    bias: Tensor | None = None,
) -> Tensor:
    """Fused unlearned RMSNorm followed by TSRA, differentiable.

    Computes ``tsra(x / sqrt(sum(x², dim) / norm_size + eps), split, dim)`` in one read and
    one write of ``x``: the RMS is a function of the same two subspace norms TSRA needs.

    Args:
        x: as in :func:`tsra`.
        split: size of the first subspace, ``1 <= split < C``.
        dim: the channel axis (default 1).
        eps: RMSNorm's epsilon inside the square root (default 1e-6), ``>= 0``; with
            ``eps = 0`` the output and gradient at ``x = 0`` are NaN (``0 / 0``).
        norm_size: the normaliser ``n`` in ``sum(x²)/n``; ``None`` means ``C``. A pruned
            model may keep its original width here so that the scale does not shift.
        a_u, b_u, a_v, b_v, tsra_eps: TSRA's constants, as in :func:`tsra`
            (``tsra_eps`` must be ``> 0``).
        bias: optional ``(C,)``, added to ``x`` first, as in :func:`tsra`: the result is
            ``rmsnorm_tsra(x + bias)`` in the same one read and one write (a convolution's
            bias, with the convolution run without it).

    Returns:
        Tensor of ``x``'s shape, dtype and memory format. Differentiable to any order.

    Range:
        As for :func:`tsra`: the sums of squares accumulate in float32, so ``||x||`` over
        the channel axis must stay below about ``1.8e19`` (float32 / bfloat16 input);
        beyond that the RMS overflows and the output is NaN. With ``eps = 0`` there is a
        lower end too: below an RMS of about ``1e-20`` the float32 sum of squares loses
        precision (subnormal) and at about ``1e-23`` it is 0 — NaN for a non-zero ``x``;
        a positive ``eps`` (the default) has no such end.
    """
    name = "cobkern.rmsnorm_tsra"
    split, dim = check_activation_input(name, x, split, dim)
    n = check_norm_size(name, norm_size, x.shape[dim])
    tsra_eps = check_tsra_eps(name, tsra_eps, "tsra_eps")
    gain = check_gain(name, a_u, b_u, a_v, b_v)
    check_bias(name, bias, x, dim)
    return _apply(x, split, dim, *gain, tsra_eps, n, check_rms_eps(name, eps), bias=bias)


def _check_backward_inputs(name: str, grad: Tensor, x: Tensor, split: int,
                           dim: int) -> tuple[int, int]:
    split, dim = check_activation_input(name, x, split, dim)
    _check_grad(name, grad, x)
    return split, dim


def tsra_backward(
    grad: Tensor,
    x: Tensor,
    split: int,
    dim: int = 1,
    *,
    a_u: float = DEFAULT_A_U,
    b_u: float = DEFAULT_B_U,
    a_v: float = DEFAULT_A_V,
    b_v: float = DEFAULT_B_V,
    eps: float = DEFAULT_EPS,
    bias: Tensor | None = None,
) -> Tensor:
    """Explicit vector-Jacobian product of :func:`tsra`: ``dL/dx`` given ``grad = dL/dy``.

    Reads ``x`` and ``grad`` once and writes ``dx`` once. Shapes and dtypes as ``x``;
    differentiable in ``grad`` and ``x`` (the formula of :func:`_double_backward`), under
    ``torch.func`` transforms and forward-mode AD too (through the plain-PyTorch formula).
    With ``bias``: the gradient of ``tsra(x, bias=bias)`` with respect to ``x`` (the bias's
    is its sum over the positions).
    """
    name = "cobkern.tsra_backward"
    split, dim = _check_backward_inputs(name, grad, x, split, dim)
    eps = check_tsra_eps(name, eps)
    gain = check_gain(name, a_u, b_u, a_v, b_v)
    check_bias(name, bias, x, dim)
    return _backward_apply(grad, x, split, dim, *gain, eps, 0, 0.0, bias=bias)


def rmsnorm_tsra_backward(
    grad: Tensor,
    x: Tensor,
    split: int,
    dim: int = 1,
    *,
    eps: float = DEFAULT_RMS_EPS,
    norm_size: int | None = None,
    a_u: float = DEFAULT_A_U,
    b_u: float = DEFAULT_B_U,
    a_v: float = DEFAULT_A_V,
    b_v: float = DEFAULT_B_V,
    tsra_eps: float = DEFAULT_EPS,
    bias: Tensor | None = None,
) -> Tensor:
    """Explicit vector-Jacobian product of :func:`rmsnorm_tsra` (``bias`` as in
    :func:`tsra_backward`)."""
    name = "cobkern.rmsnorm_tsra_backward"
    split, dim = _check_backward_inputs(name, grad, x, split, dim)
    n = check_norm_size(name, norm_size, x.shape[dim])
    tsra_eps = check_tsra_eps(name, tsra_eps, "tsra_eps")
    gain = check_gain(name, a_u, b_u, a_v, b_v)
    check_bias(name, bias, x, dim)
    return _backward_apply(grad, x, split, dim, *gain, tsra_eps, n, check_rms_eps(name, eps),
                           bias=bias)
