"""Mathematical properties of TSRA, gradcheck, the modules, and error messages."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import cobkern
from cobkern.nn import TSRA, RMSNorm, RMSNormTSRA
from cobkern.ops import (
    CovarianceAccumulator,
    rmsnorm_tsra,
    subspace_moments,
    tsra,
    tsra_backward,
)


def _block_rotation(c: int, split: int, dtype=torch.float64) -> torch.Tensor:
    ru, _ = torch.linalg.qr(torch.randn(split, split, dtype=dtype))
    rv, _ = torch.linalg.qr(torch.randn(c - split, c - split, dtype=dtype))
    return torch.block_diag(ru, rv)


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("fused", [False, True])
def test_block_rotation_equivariance(backend, fused, device):
    """TSRA(R x) = R TSRA(x) for R = diag(R_U, R_V); RMSNorm commutes with any rotation.
    float32 inputs: tolerance 1e-5 covers the rotation's own rounding."""
    c, split = 24, 9
    r = _block_rotation(c, split).float().to(device)
    x = torch.randn(50, c, device=device)
    fn = rmsnorm_tsra if fused else tsra
    with cobkern.use_backend(backend):
        lhs = fn(x @ r.T, split)
        rhs = fn(x, split) @ r.T
    torch.testing.assert_close(lhs, rhs, rtol=1e-5, atol=1e-5)


def test_rotation_equivariance_conv_layout(device):
    c, split = 16, 5
    r = _block_rotation(c, split).float().to(device)
    x = torch.randn(2, c, 4, 4, device=device).to(memory_format=torch.channels_last)
    rot = torch.einsum("dc,nchw->ndhw", r, x)
    lhs = tsra(rot, split)
    rhs = torch.einsum("dc,nchw->ndhw", r, tsra(x, split))
    torch.testing.assert_close(lhs, rhs, rtol=1e-5, atol=1e-5)


def test_full_rotation_breaks_equivariance(device):
    """Sanity: a rotation mixing U and V does NOT commute (the property test can fail)."""
    c, split = 12, 6
    q, _ = torch.linalg.qr(torch.randn(c, c, dtype=torch.float64))
    r = q.float().to(device)
    x = torch.randn(20, c, device=device)
    assert (tsra(x @ r.T, split) - tsra(x, split) @ r.T).abs().max() > 1e-2


# eps=0 below: the padded lanes of a kernel tile (x = 0) compute 1/sqrt(0) = inf there; they
# are masked out of every store, but the interpreter's numpy reports the division.
@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
@pytest.mark.parametrize("scale", [1e-3, 0.5, 7.0, 1e4])
def test_positive_scale_invariance_of_gains(scale, device):
    """Gains depend only on r, so TSRA(c x) = c TSRA(x) for c > 0 (r's eps=1e-12 is far below
    these norms); RMSNorm→TSRA is then scale-invariant up to RMSNorm's eps."""
    x = torch.randn(10, 16, 3, 3, device=device)
    torch.testing.assert_close(tsra(scale * x, 8), scale * tsra(x, 8), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rmsnorm_tsra(scale * x, 8, eps=0.0), rmsnorm_tsra(x, 8, eps=0.0),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("fused", [False, True])
def test_zero_input_has_zero_output_and_finite_gradient(backend, fused, device):
    x = torch.zeros(3, 8, 2, 2, device=device)
    x[1, :3] = torch.randn(3, 2, 2, device=device)  # x_U != 0, x_V = 0
    x[2, 3:] = torch.randn(5, 2, 2, device=device)  # x_U = 0, x_V != 0
    x.requires_grad_(True)
    fn = rmsnorm_tsra if fused else tsra
    with cobkern.use_backend(backend):
        y = fn(x, 3)
        (dx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    assert torch.equal(y[0], torch.zeros_like(y[0]))
    assert torch.isfinite(dx).all()
    if not fused:  # at the origin dx = g(r=0) dy exactly
        g_u = torch.sigmoid(torch.tensor(5.0 * (0 - 0.5)))
        g_v = torch.sigmoid(torch.tensor(5.0 * (0 - 0.7)))
        torch.testing.assert_close(dx[0, :3].cpu(), g_u.expand(3, 2, 2))
        torch.testing.assert_close(dx[0, 3:].cpu(), g_v.expand(5, 2, 2))


@pytest.mark.parametrize("fused", [False, True])
def test_gradcheck_reference(fused):
    """Analytic backward vs finite differences, float64 (reference path)."""
    x = torch.randn(3, 7, 2, 2, dtype=torch.float64, requires_grad=True)
    if fused:
        assert torch.autograd.gradcheck(lambda t: rmsnorm_tsra(t, 3, norm_size=9), (x,))
    else:
        assert torch.autograd.gradcheck(lambda t: tsra(t, 3), (x,))


def test_gradcheck_dim0_linear():
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: tsra(t, 2, dim=0, a_u=2.0, b_v=0.3), (x,))


# ----------------------------------------------------------------------------- modules
def test_modules_compose_and_repr(device):
    x = torch.randn(2, 10, 3, 3, device=device)
    fused = RMSNormTSRA(10, split=4, norm_size=16).to(device)
    chain = torch.nn.Sequential(RMSNorm(10, norm_size=16), TSRA(10, split=4)).to(device)
    torch.testing.assert_close(fused(x), chain(x), rtol=1e-5, atol=1e-6)
    assert TSRA(64).split == 32
    assert "split=4" in repr(fused) and "norm_size=16" in repr(fused)
    assert repr(RMSNorm(8)) == "RMSNorm(8, dim=1, eps=1e-06)"
    assert list(fused.parameters()) == [] and list(chain.parameters()) == []


def test_module_rejects_wrong_channel_count():
    with pytest.raises(ValueError, match="expected 10 channels"):
        TSRA(10)(torch.randn(2, 12))
    with pytest.raises(ValueError, match="split=10 is out of range"):
        TSRA(10, split=10)
    with pytest.raises(ValueError, match="at least 2 channels"):
        RMSNormTSRA(1)


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: tsra(torch.randn(2, 8), 0), ValueError, "split=0 is out of range"),
        (lambda: tsra(torch.randn(2, 8), 8), ValueError, "split=8 is out of range"),
        (lambda: tsra(torch.randn(2, 1), 1), ValueError, "at least 2 channels"),
        (lambda: tsra(torch.randn(2, 8), 4, dim=2), IndexError, "dim=2 is out of range"),
        (lambda: tsra(torch.ones(2, 8, dtype=torch.int64), 4), TypeError, "floating-point"),
        (lambda: tsra(torch.randn(8), 4), ValueError, r"got shape \(8,\) \(1-D\)"),
        (lambda: tsra(torch.randn(2, 8), 4.0), TypeError, "split must be an int"),
        (lambda: rmsnorm_tsra(torch.randn(2, 8), 4, norm_size=0), ValueError, "norm_size"),
        (lambda: rmsnorm_tsra(torch.randn(2, 8), 4, eps=-1.0), ValueError, "eps must be"),
        (lambda: tsra_backward(torch.randn(2, 8, device="meta"), torch.randn(2, 8), 4),
         RuntimeError, "one device.*grad on meta.*x on cpu"),
        (lambda: tsra_backward(torch.randn(2, 9), torch.randn(2, 8), 4), ValueError,
         "grad has shape"),
        (lambda: cobkern.ops.set_backend("cuda"), ValueError, "unknown cobkern backend"),
    ],
)
def test_bad_input_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.parametrize("fused", [False, True])
def test_eager_fast_path_matches_the_registered_op(fused, device):
    """Eager calls skip the dispatcher (an autograd.Function around the same launchers);
    outputs and gradients must be bit-identical to the registered custom op's."""
    x = torch.randn(3, 20, 5, 4, device=device, requires_grad=True)
    dy = torch.randn_like(x)
    norm, rms_eps = (20, 1e-6) if fused else (0, 0.0)
    y = (cobkern.rmsnorm_tsra if fused else cobkern.tsra)(x, 7)
    assert type(y.grad_fn).__name__ == "_TSRAFunctionBackward"  # the fast path was taken
    (dx,) = torch.autograd.grad(y, x, dy)
    y_op = torch.ops.cobkern.tsra(x, 7, 1, 5.0, 0.5, 5.0, 0.7, 1e-12, norm, rms_eps)
    (dx_op,) = torch.autograd.grad(y_op, x, dy)
    assert torch.equal(y, y_op)
    assert torch.equal(dx, dx_op)


# ----------------------------------------------------------------------------- double backward
def _as_route(x: torch.Tensor, route: str) -> torch.Tensor:
    """"fast": a plain tensor takes the eager autograd.Function; "op": an nn.Parameter (a
    Tensor subclass) takes the registered custom op and its autograd formulas."""
    return torch.nn.Parameter(x.detach().clone()) if route == "op" else x


@pytest.mark.parametrize("route", ["fast", "op"])
@pytest.mark.parametrize("fused", [False, True])
def test_gradgradcheck_reference(fused, route):
    """Second derivatives vs finite differences of the first, float64 (reference path). The
    custom-op route used to raise "no autograd formula registered for cobkern.tsra_backward"."""
    x = _as_route(torch.randn(3, 7, 2, 2, dtype=torch.float64, requires_grad=True), route)
    if fused:
        assert torch.autograd.gradgradcheck(lambda t: rmsnorm_tsra(t, 3, norm_size=9), (x,))
    else:
        assert torch.autograd.gradgradcheck(lambda t: tsra(t, 3, a_u=2.0, b_v=0.3), (x,))


@pytest.mark.parametrize("route", ["fast", "op"])
def test_third_order_gradcheck_reference(route):
    """The double backward is itself differentiable (create_graph=True inside it)."""
    x = _as_route(torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True), route)

    def grad_of_penalty(t: torch.Tensor) -> torch.Tensor:
        (d,) = torch.autograd.grad(rmsnorm_tsra(t, 2).square().sum(), t, create_graph=True)
        return d

    assert torch.autograd.gradgradcheck(grad_of_penalty, (x,))


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("fused", [False, True])
def test_double_backward_is_finite_where_a_subspace_is_zero(backend, fused, device):
    """Where x = 0 or x_U = 0 the first-order backward uses 1/0 := 0 (finite, method.md §1);
    the second-order terms follow the same convention instead of sqrt'(0) = inf -> NaN,
    which would poison a whole gradient penalty. Kernel vs reference path: rtol/atol 1e-4, as
    in the float64 test (only the float32 first-order parts differ, in summation order)."""
    x0 = torch.randn(4, 8, device=device)
    x0[0] = 0.0
    x0[1, :3] = 0.0
    fn = rmsnorm_tsra if fused else tsra
    grads = {}
    for be in (backend, "reference"):
        x = x0.clone().requires_grad_(True)
        with cobkern.use_backend(be):
            y = fn(x, 3)
            (dx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
            (grads[be],) = torch.autograd.grad(y.sum() + dx.square().sum(), x)
    assert torch.isfinite(grads[backend]).all()
    torch.testing.assert_close(grads[backend], grads["reference"], rtol=1e-4, atol=1e-4)


def test_explicit_backward_is_differentiable():
    """tsra_backward(grad, x) has a gradient in both grad and x (float64 gradcheck)."""
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    g = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda gg, xx: tsra_backward(gg, xx, 2), (g, x))


# ----------------------------------------------------------------------------- raw-op arguments
_C5 = (5.0, 0.5, 5.0, 0.7, 1e-12)
_BAD_OP_CALLS = {
    "tsra-split>C": (lambda x, g: torch.ops.cobkern.tsra(x, 7, 1, *_C5, 0, 0.0),
                     ValueError, "split=7 is out of range for 3 channels"),
    "tsra-split0": (lambda x, g: torch.ops.cobkern.tsra(x, 0, 1, *_C5, 0, 0.0),
                    ValueError, "split=0 is out of range"),
    "tsra-dim3": (lambda x, g: torch.ops.cobkern.tsra(x, 2, 3, *_C5, 0, 0.0),
                  IndexError, "dim=3 is out of range"),
    "tsra-dim-4": (lambda x, g: torch.ops.cobkern.tsra(x, 2, -4, *_C5, 0, 0.0),
                   IndexError, "dim=-4 is out of range"),
    "tsra-norm_size<0": (lambda x, g: torch.ops.cobkern.tsra(x, 2, 1, *_C5, -1, 1e-6),
                         ValueError, "norm_size must be an int >= 0"),
    "tsra-eps0": (lambda x, g: torch.ops.cobkern.tsra(x, 2, 1, 5.0, 0.5, 5.0, 0.7, 0.0, 0, 0.0),
                  ValueError, "must be a number from"),
    "tsra-rms_eps<0": (lambda x, g: torch.ops.cobkern.tsra(x, 2, 1, *_C5, 3, -1.0),
                       ValueError, "rms_eps must be >= 0"),
    "bwd-split>C": (lambda x, g: torch.ops.cobkern.tsra_backward(g, x, 9, 1, *_C5, 0, 0.0),
                    ValueError, "split=9 is out of range"),
    "bwd-dim-5": (lambda x, g: torch.ops.cobkern.tsra_backward(g, x, 2, -5, *_C5, 0, 0.0),
                  IndexError, "dim=-5 is out of range"),
    "bwd-grad-shape": (lambda x, g: torch.ops.cobkern.tsra_backward(g[..., :5], x, 2, 1, *_C5,
                                                                    0, 0.0),
                       ValueError, "grad has shape"),
    "bwd-grad-dtype": (lambda x, g: torch.ops.cobkern.tsra_backward(g.half(), x, 2, 1, *_C5,
                                                                    0, 0.0),
                       TypeError, "grad has dtype"),
    "moments-split>C": (lambda x, g: torch.ops.cobkern.subspace_moments(x, 3, 1),
                        ValueError, "split=3 is out of range"),
    "moments-dim3": (lambda x, g: torch.ops.cobkern.subspace_moments(x, 2, 3),
                     IndexError, "dim=3 is out of range"),
}


@pytest.mark.parametrize("where", ["reference", "meta"])
@pytest.mark.parametrize("case", list(_BAD_OP_CALLS))
def test_registered_ops_reject_bad_arguments(case, where):
    """torch.ops.cobkern.* validate their own arguments, in the real implementation (here
    on the reference backend; the kernel path is checked in a child process below) and in
    the fake/meta one (meta tensors), instead of indexing out of range."""
    call, exc, match = _BAD_OP_CALLS[case]
    dev = "meta" if where == "meta" else "cpu"
    x = torch.randn(4, 3, 6, device=dev)
    g = torch.randn(4, 3, 6, device=dev)
    with cobkern.use_backend("reference"), pytest.raises(exc, match=match):
        call(x, g)


_KERNEL_OP_SCRIPT = r"""
import sys, torch, warnings
warnings.filterwarnings("ignore")
sys.path.insert(0, {tests!r})
import cobkern
from test_tsra_properties import _BAD_OP_CALLS
dev = torch.device({device!r})
x, g = torch.randn(4, 3, 6, device=dev), torch.randn(4, 3, 6, device=dev)
c = (5.0, 0.5, 5.0, 0.7, 1e-12, 0, 0.0)
with cobkern.use_backend("triton"):
    for name, (call, exc, match) in _BAD_OP_CALLS.items():
        try:
            call(x, g)
            print("NO-ERROR", name)
        except exc as e:
            print("OK" if match in str(e) else "WRONG-MESSAGE", name, str(e)[:200])
    # a negative dim is normalised: the same result as the positive one, not a wrong geometry
    checks = [
        (torch.ops.cobkern.tsra(x, 2, -1, *c), torch.ops.cobkern.tsra(x, 2, 2, *c)),
        (torch.ops.cobkern.tsra_backward(g, x, 2, -1, *c),
         torch.ops.cobkern.tsra_backward(g, x, 2, 2, *c)),
    ] + list(zip(torch.ops.cobkern.subspace_moments(x, 2, -1),
                 torch.ops.cobkern.subspace_moments(x, 2, 2)))
    for i, (a, b) in enumerate(checks):
        print("OK" if torch.equal(a, b) else "MISMATCH", "negative-dim", i)
"""


def test_registered_ops_on_the_kernel_path_normalise_dim_and_reject_bad_arguments(device):
    """On the Triton path a bad split or a negative dim used to reach the kernel with a wrong
    geometry: out-of-bounds reads and writes, NaN results or a segfault of the interpreter.
    Run in a child process so that a regression cannot take the test session down."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = _KERNEL_OP_SCRIPT.format(tests=str(Path(__file__).parent), device=str(device))
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       timeout=300, env=dict(os.environ), cwd=str(Path(__file__).parent))
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == len(_BAD_OP_CALLS) + 6, r.stdout + r.stderr
    bad = [ln for ln in lines if not ln.startswith("OK")]
    assert not bad, "\n".join(bad)


# ----------------------------------------------------------------------------- eps and modules
@pytest.mark.parametrize(
    "call",
    [
        lambda: tsra(torch.zeros(2, 4), 2, eps=0.0),
        lambda: tsra(torch.zeros(2, 4), 2, eps=-1.0),
        lambda: tsra(torch.zeros(2, 4), 2, eps=float("nan")),
        lambda: tsra(torch.zeros(2, 4), 2, eps=float("inf")),
        lambda: rmsnorm_tsra(torch.zeros(2, 4), 2, tsra_eps=0.0),
        lambda: tsra_backward(torch.ones(2, 4), torch.zeros(2, 4), 2, eps=0.0),
        lambda: cobkern.ops.rmsnorm_tsra_backward(torch.ones(2, 4), torch.zeros(2, 4), 2,
                                                  tsra_eps=-1e-12),
        lambda: TSRA(4, eps=0.0),
        lambda: RMSNormTSRA(4, tsra_eps=-1.0),
    ],
)
def test_tsra_eps_must_be_positive(call):
    """eps = 0 turned x = 0 into 0/0 = NaN (method.md §1: output 0 there); eps < 0 was
    accepted silently."""
    with pytest.raises(ValueError, match=r"must be a number from"):
        call()


@pytest.mark.parametrize("eps", [1e-50, 1e-40, 1e39])
def test_tsra_eps_must_stay_itself_in_float32(eps):
    """An eps that rounds to 0 in float32 (1e-50; 1e-40 is subnormal, flushed to 0 on GPUs)
    passed the check and gave a NaN output and gradient at x = 0 on both backends, the very
    case the check is there for; 1e39 is inf in float32."""
    with pytest.raises(ValueError, match=r"smallest normal float32"):
        tsra(torch.zeros(2, 6), 3, eps=eps)
    with pytest.raises(ValueError, match=r"smallest normal float32"):
        TSRA(6, eps=eps)
    z = torch.zeros(2, 6, requires_grad=True)
    y = tsra(z, 3, eps=float(torch.finfo(torch.float32).tiny))  # the smallest one allowed
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(z.grad).all()


def test_numpy_integer_module_sizes_are_ints():
    """A numpy integer num_channels, split or dim (read from an array of widths) was
    refused by the modules, where norm_size accepted one; they are stored as Python ints."""
    mods = [TSRA(np.int64(6), split=np.int32(2), dim=np.int64(-1)),
            RMSNormTSRA(np.int64(6), split=np.int64(4)),
            RMSNorm(np.int16(6), dim=np.int64(1))]
    for m in mods:
        assert type(m.num_channels) is int and type(m.dim) is int
    assert type(mods[0].split) is int and mods[0].split == 2 and mods[1].split == 4
    x = torch.randn(3, 6)
    torch.testing.assert_close(mods[0](x), tsra(x, 2, dim=-1), rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")  # padded tile lanes, as
@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # in the scale test above
def test_rmsnorm_eps_zero_is_still_allowed():
    """Only TSRA's eps must be > 0; RMSNorm's eps >= 0 is unchanged."""
    y = rmsnorm_tsra(torch.randn(3, 8), 4, eps=0.0)
    assert torch.isfinite(y).all()


def test_module_eps_attribute_and_repr():
    """TSRA's constructor argument eps is the attribute eps (tsra_eps stays as an alias, as
    model configs read it); non-default epsilons show in the repr; defaults keep the old
    repr."""
    from cobkern.models.io import build_layer, layer_spec

    x = torch.full((1, 8), 1e-3)
    a = TSRA(8)
    assert repr(a) == "TSRA(8, split=4, dim=1, a_u=5.0, b_u=0.5, a_v=5.0, b_v=0.7)"
    b = TSRA(8, eps=1e-3)
    assert b.eps == b.tsra_eps == 1e-3 and "eps=0.001" in repr(b)
    a.eps = 1e-3  # used to create an unused attribute and leave TSRA's epsilon alone
    assert a.tsra_eps == 1e-3 and repr(a) == repr(b) and torch.equal(a(x), b(x))
    torch.testing.assert_close(a(x), tsra(x, 4, eps=1e-3), rtol=0, atol=0)
    with pytest.raises(ValueError, match="must be a number from"):
        a.eps = 0.0
    rebuilt = build_layer(layer_spec(b))
    assert isinstance(rebuilt, TSRA) and rebuilt.eps == 1e-3 and repr(rebuilt) == repr(b)
    assert a.state_dict() == {}

    c = RMSNormTSRA(8)
    d = RMSNormTSRA(8, eps=1e-5, tsra_eps=1.0)
    assert "tsra_eps" not in repr(c) and "eps=1e-06" in repr(c)
    assert "tsra_eps=1.0" in repr(d) and "eps=1e-05" in repr(d)
    assert (d.eps, d.tsra_eps) == (1e-5, 1.0)
    rebuilt = build_layer(layer_spec(d))
    assert (rebuilt.eps, rebuilt.tsra_eps) == (1e-5, 1.0) and repr(rebuilt) == repr(d)


@pytest.mark.parametrize("norm_size, exc", [(True, TypeError), (2.5, TypeError),
                                             ("4", TypeError), (0, ValueError),
                                             (np.int64(0), ValueError)])
def test_rmsnorm_rejects_non_int_norm_size(norm_size, exc):
    """norm_size=True was taken as 1 and 2.5 as a float normaliser; 0 was rejected before.
    Not an integer: a TypeError (as for split and dim); an integer below 1: a ValueError."""
    with pytest.raises(exc, match="norm_size must be a positive int or None"):
        cobkern.ops.rmsnorm(torch.randn(2, 4), norm_size=norm_size)


def test_a_norm_size_beyond_int64_is_named():
    """10**30 passed the check and failed in the dispatcher with "OverflowError: int too big
    to convert", naming no argument."""
    for call in (lambda: rmsnorm_tsra(torch.randn(2, 6), 3, norm_size=10**30),
                 lambda: cobkern.ops.rmsnorm(torch.randn(2, 6), norm_size=2**63),
                 lambda: RMSNormTSRA(6, norm_size=10**30)):
        with pytest.raises(ValueError, match=r"positive int or None \(an int at most 2"):
            call()


def test_numpy_integer_norm_size_is_an_int():
    """A numpy integer (e.g. read from an array of widths) was refused with a ValueError
    saying it must be an int; it is one, and the modules store it as a Python int."""
    x = torch.randn(3, 6, dtype=torch.float64)
    want = cobkern.ops.rmsnorm(x, norm_size=8)
    torch.testing.assert_close(cobkern.ops.rmsnorm(x, norm_size=np.int64(8)), want,
                               rtol=0, atol=0)  # the same normaliser: bit-identical
    for mod in (RMSNorm(6, norm_size=np.int64(8)), RMSNormTSRA(6, norm_size=np.int32(8))):
        assert type(mod.norm_size) is int and mod.norm_size == 8


def test_numpy_and_tensor_integers_are_ints_for_split_and_dim():
    """The functional ops refused ``split`` / ``dim`` given as numpy integers or one-element
    integer tensors ("split must be an int, got int64") where the modules and ``norm_size``
    took them: one rule for every integer argument, and the same result bit for bit."""
    x = torch.randn(3, 6, 2, dtype=torch.float64)
    g = torch.randn_like(x)
    cases = [(lambda s, d: tsra(x, s, d), tsra(x, 2, 1)),
             (lambda s, d: rmsnorm_tsra(x, s, d), rmsnorm_tsra(x, 2, 1)),
             (lambda s, d: tsra_backward(g, x, s, d), tsra_backward(g, x, 2, 1)),
             (lambda s, d: cobkern.ops.rmsnorm_tsra_backward(g, x, s, d),
              cobkern.ops.rmsnorm_tsra_backward(g, x, 2, 1)),
             (lambda s, d: torch.cat([m.flatten() for m in subspace_moments(x, s, d)]),
              torch.cat([m.flatten() for m in subspace_moments(x, 2, 1)]))]
    for call, want in cases:
        for split, dim in ((np.int64(2), np.int32(1)), (torch.tensor(2), torch.tensor(-2))):
            torch.testing.assert_close(call(split, dim), want, rtol=0, atol=0)
    torch.testing.assert_close(cobkern.ops.rmsnorm(x, np.int64(1)), cobkern.ops.rmsnorm(x, 1),
                               rtol=0, atol=0)
    acc = CovarianceAccumulator(6, 2)
    acc.update(x, dim=np.int64(1))
    acc.count_samples(np.int64(0))
    assert acc.count == 6
    for bad, got in ((2.0, "float"), (True, "bool"), ("2", "str")):
        with pytest.raises(TypeError, match=f"cobkern.tsra: split must be an int, got {got}"):
            tsra(x, bad)
        with pytest.raises(TypeError, match=f"cobkern.tsra: dim must be an int, got {got}"):
            tsra(x, 2, bad)


@pytest.mark.parametrize("module", [TSRA(2), RMSNormTSRA(2), RMSNorm(2)])
@pytest.mark.parametrize("bad", [[[1.0, 2.0]], None])
def test_modules_name_a_non_tensor_input(module, bad):
    """The modules' channel check read ``x.dim()`` first: an ``AttributeError`` ("'list'
    object has no attribute 'dim'") instead of the ops' ``TypeError`` naming the input."""
    with pytest.raises(TypeError, match=f"expected a torch.Tensor, got {type(bad).__name__}"):
        module(bad)


@pytest.mark.parametrize("kw, exc, match", [
    ({"a_u": "5"}, TypeError, "a_u must be a float, got str"),
    ({"b_u": None}, TypeError, "b_u must be a float, got NoneType"),
    ({"a_v": True}, TypeError, "a_v must be a float, got bool"),
    ({"b_v": float("nan")}, ValueError, "gain constant b_v must be a finite number, got nan"),
    ({"a_u": float("inf")}, ValueError, "gain constant a_u must be a finite number"),
])
def test_gain_constants_are_checked(kw, exc, match):
    """The four gain constants went through a bare float(): a string was parsed, None gave
    a TypeError naming no argument, and NaN gave an all-NaN output."""
    x, g = torch.randn(3, 6), torch.randn(3, 6)
    calls = [lambda: tsra(x, 2, **kw), lambda: rmsnorm_tsra(x, 2, **kw),
             lambda: tsra_backward(g, x, 2, **kw),
             lambda: cobkern.ops.rmsnorm_tsra_backward(g, x, 2, **kw),
             lambda: TSRA(6, **kw), lambda: RMSNormTSRA(6, **kw)]
    for call in calls:
        with pytest.raises(exc, match=match):
            call()
    # numbers of other types are numbers: numpy and 0-d tensor scalars
    k = next(iter(kw))
    y = tsra(x, 2, **{k: np.float64(0.6)})
    torch.testing.assert_close(y, tsra(x, 2, **{k: torch.tensor(0.6, dtype=torch.float64)}),
                               rtol=0, atol=0)  # the same constant: bit-identical


def test_rmsnorm_names_a_non_tensor_input():
    with pytest.raises(TypeError, match=r"cobkern.rmsnorm: expected a torch.Tensor, got list"):
        cobkern.ops.rmsnorm([[1.0, 2.0]])


@pytest.mark.parametrize("eps", [-1.0, float("nan"), float("inf"), 1e39])
def test_rmsnorm_rejects_a_negative_eps_like_the_fused_op(eps):
    """rmsnorm returned all-NaN for eps=-1 where rmsnorm_tsra raised: one rule for both."""
    x = torch.randn(2, 4)
    with pytest.raises(ValueError, match="eps must be >= 0"):
        cobkern.ops.rmsnorm(x, eps=eps)
    with pytest.raises(ValueError, match="eps must be >= 0"):
        cobkern.rmsnorm_tsra(x, 2, eps=eps)
    assert torch.isfinite(cobkern.ops.rmsnorm(x, eps=0.0)).all()


# ------------------------------------------------------- torch.func and forward-mode AD
@pytest.mark.parametrize("fused", [False, True])
def test_torch_func_transforms_and_forward_ad_match_autograd(fused):
    """``torch.func.jvp`` / ``jacfwd`` returned an all-zero tangent without a word, and
    ``grad`` / ``jacrev`` raised PyTorch's "must override setup_context": a formula registered
    with ``register_autograd`` has neither. Under those transforms (and forward-mode AD) the
    ops now run the plain-PyTorch formula. Reference: the Jacobian by reverse-mode autograd
    through the ops themselves (the fused backward), float64, so 1e-10 is round-off."""
    from torch.autograd import forward_ad as fwad

    x = torch.randn(3, 7, dtype=torch.float64)
    v = torch.randn_like(x)
    fn = (lambda t: rmsnorm_tsra(t, 3, norm_size=9)) if fused else (lambda t: tsra(t, 3))
    jac = torch.autograd.functional.jacobian(fn, x)
    jv = torch.einsum("ijkl,kl->ij", jac, v)
    tol = {"rtol": 1e-10, "atol": 1e-10}
    _, tangent = torch.func.jvp(fn, (x,), (v,))
    torch.testing.assert_close(tangent, jv, **tol)
    torch.testing.assert_close(torch.func.jacfwd(fn)(x), jac, **tol)
    torch.testing.assert_close(torch.func.jacrev(fn)(x), jac, **tol)
    g = torch.func.grad(lambda t: fn(t).square().sum())(x)
    torch.testing.assert_close(g, torch.einsum("ij,ijkl->kl", 2 * fn(x), jac), **tol)
    with fwad.dual_level():
        out = fn(fwad.make_dual(x, v))
        torch.testing.assert_close(fwad.unpack_dual(out).tangent, jv, **tol)
    # at x = 0 the tangent is the gain times v (the kernels' 1/0 := 0), finite
    z = torch.zeros_like(x)
    _, tz = torch.func.jvp(fn, (z,), (v,))
    z.requires_grad_()
    (gz,) = torch.autograd.grad(fn(z), z, v)  # the op's backward: a diagonal gain at 0
    assert torch.isfinite(tz).all()
    torch.testing.assert_close(tz, gz, **tol)


@pytest.mark.parametrize("fused", [False, True])
def test_torch_func_transforms_under_torch_compile_match_eager(fused):
    """Compiled around the op, ``torch.func.jvp`` returned an all-zero tangent without a
    word (the plain-formula switch was off while Dynamo traced, so the registered op, which
    has no forward-mode rule, ran) and ``grad`` with ``fullgraph=True`` raised. Reference:
    the same transforms in eager mode (float32; the compiled formula may fuse differently,
    so 1e-5 relative is float32 round-off over a few operations)."""
    from cobkern.ops import rmsnorm_tsra_backward

    torch._dynamo.reset()
    x = torch.randn(3, 7)
    v = torch.randn_like(x)
    g0 = torch.randn_like(x)
    fn = (lambda t: rmsnorm_tsra(t, 3, norm_size=9)) if fused else (lambda t: tsra(t, 3))
    bw = ((lambda t: rmsnorm_tsra_backward(g0, t, 3, norm_size=9)) if fused
          else (lambda t: tsra_backward(g0, t, 3)))
    tol = {"rtol": 1e-5, "atol": 1e-6}
    for f in (fn, bw):
        def jvp(t, u, f=f):
            return torch.func.jvp(f, (t,), (u,))[1]

        want = jvp(x, v)
        assert want.abs().max() > 0.1
        torch.testing.assert_close(torch.compile(jvp, fullgraph=True)(x, v), want, **tol)
    grad = torch.func.grad(lambda t: fn(t).square().sum())
    torch.testing.assert_close(torch.compile(grad, fullgraph=True)(x), grad(x), **tol)


# ------------------------------------------------------- module errors name the problem
@pytest.mark.parametrize("make, call, exc, match", [
    (lambda: RMSNorm(6), lambda m: m(torch.randn(6)), IndexError, "dim=1 is out of range"),
    (lambda: RMSNorm(6, dim=2), lambda m: m(torch.randn(3, 6)), IndexError, "dim=2 is out"),
    (lambda: TSRA(6, dim=-3), lambda m: m(torch.randn(3, 6)), IndexError, "dim=-3 is out"),
    (lambda: RMSNormTSRA(6, dim=-4), lambda m: m(torch.randn(3, 6)), IndexError, "dim=-4"),
    (lambda: RMSNormTSRA(6, eps=-1.0), None, ValueError, "eps must be >= 0"),
    (lambda: RMSNormTSRA(6, norm_size=0), None, ValueError, "norm_size must be"),
    (lambda: RMSNorm(6, eps=-1.0), None, ValueError, "eps must be >= 0"),
    (lambda: RMSNorm(6, eps=None), None, TypeError, "eps must be a float, got NoneType"),
    (lambda: RMSNorm(6, norm_size=2.5), None, TypeError, "norm_size must be .*got float"),
    (lambda: TSRA(6, split=2.0), None, TypeError, "split must be an int, got float"),
    (lambda: TSRA(6.0), None, TypeError, "num_channels must be an int"),
    (lambda: RMSNorm(6.0), None, TypeError, "RMSNorm: num_channels must be an int"),
    (lambda: RMSNorm(0), None, ValueError, "RMSNorm: num_channels must be positive"),
    (lambda: TSRA(6, dim=1.0), None, TypeError, "TSRA: dim must be an int, got float"),
    (lambda: RMSNormTSRA(6, dim="1"), None, TypeError, "RMSNormTSRA: dim must be an int, got str"),
    (lambda: RMSNorm(6, dim=1.0), None, TypeError, "RMSNorm: dim must be an int, got float"),
])
def test_module_errors_name_the_problem(make, call, exc, match):
    """A wrong rank or negative dim gave a bare ``IndexError: tuple index out of range``
    from the module's own channel check; a bad eps, norm_size or split was accepted by the
    constructor and failed at the first forward (or never showed in the repr)."""
    with pytest.raises(exc, match=match):
        m = make()
        if call is not None:
            call(m)


@pytest.mark.parametrize("call, match", [
    (lambda x: cobkern.ops.rmsnorm(x, 1.0), "dim must be an int, got float"),
    (lambda x: cobkern.ops.rmsnorm(x, True), "dim must be an int, got bool"),
    (lambda x: cobkern.ops.rmsnorm(x, eps="1e-6"), "eps must be a float, got str"),
    (lambda x: rmsnorm_tsra(x, 2, eps=None), "eps must be a float, got NoneType"),
    (lambda x: tsra(x, 2, eps=True), "eps must be a float, got bool"),
])
def test_rmsnorm_dim_and_eps_types_are_named(call, match):
    with pytest.raises(TypeError, match=match):
        call(torch.randn(3, 6))


@pytest.mark.parametrize("fused", [False, True])
def test_explicit_backward_under_torch_func_matches_autograd(fused):
    """``tsra_backward`` called the registered op directly: under ``torch.func.jvp`` its
    tangent was zero without a word (finite differences: 5.84) and ``jacrev`` raised.
    Reference: the reverse-mode Jacobian through the same function (float64, round-off)."""
    from cobkern.ops import rmsnorm_tsra_backward

    x = torch.randn(3, 7, dtype=torch.float64)
    g = torch.randn_like(x)
    v = torch.randn_like(x)
    fn = ((lambda t: rmsnorm_tsra_backward(g, t, 3, norm_size=9)) if fused
          else (lambda t: tsra_backward(g, t, 3)))
    jac = torch.autograd.functional.jacobian(fn, x)
    tol = {"rtol": 1e-10, "atol": 1e-10}
    _, tangent = torch.func.jvp(fn, (x,), (v,))
    torch.testing.assert_close(tangent, torch.einsum("ijkl,kl->ij", jac, v), **tol)
    torch.testing.assert_close(torch.func.jacrev(fn)(x), jac, **tol)


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_vmapped_backward_matches_one_cotangent_at_a_time(backend, fused, with_bias, device):
    """``torch.autograd.grad(..., is_grads_batched=True)`` and ``jacobian`` / ``hessian``
    with ``vectorize=True`` vmap the backward over a batch of cotangents; the eager fast
    path's backward raised there on every backend ("Cannot access storage of
    BatchedTensorImpl" from the kernels, "vmap: aten::copy_(self, ...) is not possible"
    from the reference). Reference: the same gradients one cotangent at a time."""
    x = torch.randn(3, 7, 2, device=device, requires_grad=True)
    b = torch.randn(7, device=device, requires_grad=True) if with_bias else None
    op = rmsnorm_tsra if fused else tsra
    inputs = (x, b) if with_bias else (x,)
    with cobkern.use_backend(backend):
        y = op(x, 3, bias=b)
        v = torch.randn(4, *y.shape, device=device)
        batched = torch.autograd.grad(y, inputs, v, is_grads_batched=True, retain_graph=True)
        one_by_one = [torch.autograd.grad(y, inputs, vi, retain_graph=True) for vi in v]
        for i, got in enumerate(batched):
            torch.testing.assert_close(got, torch.stack([g[i] for g in one_by_one]))

        def f(t):
            return op(t, 3, bias=None if b is None else b.detach())

        x0 = x.detach()
        jac = torch.autograd.functional.jacobian(f, x0)
        torch.testing.assert_close(torch.autograd.functional.jacobian(f, x0, vectorize=True),
                                   jac)
        # the two Hessians sum the same float32 terms in another order (vmapped vs one row
        # at a time): float32 rounding of an O(1)-sized sum, not a loosened check
        hess = torch.autograd.functional.hessian(lambda t: f(t).square().sum(), x0)
        torch.testing.assert_close(torch.autograd.functional.hessian(
            lambda t: f(t).square().sum(), x0, vectorize=True), hess, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------- modules pass on what they are given
def test_default_split_is_half_rounded_down():
    """method.md §1: the default split is C // 2 (U the smaller half for odd C); only even C
    was checked, where rounding up gives the same."""
    assert TSRA(7).split == 3 and RMSNormTSRA(7).split == 3
    assert TSRA(2).split == 1 and RMSNormTSRA(65).split == 32
    x = torch.randn(4, 7)
    torch.testing.assert_close(TSRA(7)(x), tsra(x, 3), rtol=0, atol=0)


def test_modules_forward_every_constant():
    """The modules were only run with default constants (a_U = a_V, RMSNorm eps 1e-6 and
    tsra_eps 1e-12, both too small to matter at these norms), so a module passing a_U for
    a_V, one epsilon for the other, or dropping an epsilon went unnoticed. Here each is
    distinct and large enough to change the output; against the float64 reference, float32
    inputs: rtol/atol 1e-5."""
    from reference64 import tsra64

    x = torch.randn(4, 10, 3, 3)
    consts = dict(a_u=3.0, b_u=0.4, a_v=7.0, b_v=0.8)
    x64 = x.double()
    tol = dict(rtol=1e-5, atol=1e-5)
    act = TSRA(10, split=4, eps=0.5, **consts)
    torch.testing.assert_close(act(x).double(), tsra64(x64, 4, eps=0.5, **consts), **tol)
    fused = RMSNormTSRA(10, split=4, eps=0.5, norm_size=16, tsra_eps=0.05, **consts)
    torch.testing.assert_close(fused(x).double(), tsra64(x64, 4, eps=0.05, norm_size=16,
                                                         rms_eps=0.5, **consts), **tol)
    norm = RMSNorm(10, eps=0.5, norm_size=16)
    ref = x64 / torch.sqrt(x64.square().sum(1, keepdim=True) / 16 + 0.5)
    torch.testing.assert_close(norm(x).double(), ref, **tol)


@pytest.mark.parametrize("dim", [1, 2, -1])
def test_rmsnorm_matches_float64_formula(dim):
    """``rmsnorm`` (the plain-PyTorch op, not otherwise compared with a closed form): eps
    inside the square root, added to the mean square (0.25 is comparable to it here), and
    the default normaliser the size of ``dim`` (5 and 7 differ). float64 input: 1e-12 is
    round-off."""
    x = torch.randn(3, 5, 7, dtype=torch.float64) * 0.6
    n = x.shape[dim]
    ref = x / torch.sqrt(x.square().sum(dim, keepdim=True) / n + 0.25)
    tol = dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(cobkern.ops.rmsnorm(x, dim, eps=0.25), ref, **tol)
    ref3 = x / torch.sqrt(x.square().sum(dim, keepdim=True) / 3 + 0.25)
    torch.testing.assert_close(cobkern.ops.rmsnorm(x, dim, eps=0.25, norm_size=3), ref3, **tol)
