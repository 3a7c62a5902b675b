"""Mathematical properties of TSRA, gradcheck, the modules, and error messages."""

from __future__ import annotations

import pytest
import torch

import cobkern
from cobkern.nn import TSRA, RMSNorm, RMSNormTSRA
from cobkern.ops import rmsnorm_tsra, tsra, tsra_backward


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
