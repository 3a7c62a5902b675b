"""The ops' ``bias`` input: ``tsra(x, bias=b)`` is the TSRA of ``x + b``, the add done by the
kernel as it loads ``x`` (so a convolution can run without its bias and skip the pass that
adds it).

Runs the real Triton kernels (natively on a GPU, under ``TRITON_INTERPRET=1`` on a CPU) and
the plain-PyTorch reference against an independent float64 reference evaluated at the same
rounded ``x`` plus the exact bias. Tolerances: outputs and input gradients as in
``test_tsra_kernels.py`` (float32 accumulation plus one rounding to the storage dtype; the
``x + b`` add itself is one more float32 rounding, 2^-24 relative). The bias gradient is the
input gradient summed over the positions, each term already rounded to the storage dtype,
so its error is bounded by ``rtol`` times the sum of the terms' magnitudes (plus ``atol``).
"""

from __future__ import annotations

import pytest
import torch
from reference64 import tsra64
from test_tsra_kernels import TOL, _ids, _make

import cobkern
from cobkern.nn import TSRA, RMSNormTSRA
from cobkern.ops import backend, rmsnorm_tsra, rmsnorm_tsra_backward, tsra, tsra_backward

# (shape, split, dim, layout): each kernel family — NCHW split blocks (masked and short
# rows too), a channels-last tile, (N, C) rows, the chunked kernels — and other channel axes
CASES = [
    ((3, 7, 5, 3), 3, 1, "nchw"),
    ((2, 64, 4, 4), 32, 1, "nchw"),
    ((3, 10, 2, 2), 4, 1, "nchw"),
    ((3, 7, 5, 3), 3, 1, "channels_last"),
    ((2, 64, 6, 6), 32, 1, "channels_last"),
    ((37, 64), 32, 1, "2d"),
    ((3, 5000), 2000, 1, "2d"),
    ((6, 10), 4, 0, "2d"),
    ((2, 3, 9), 5, 2, "nchw"),
]


def _view(b: torch.Tensor, x: torch.Tensor, dim: int) -> torch.Tensor:
    shape = [1] * x.dim()
    shape[dim] = -1
    return b.view(shape)


def _reference64(x, b, dy, split, dim, fused):
    """``(y, dL/dx, dL/db)`` of the function of ``x + b`` in float64."""
    xd = x.detach().cpu().double().requires_grad_(True)
    bd = b.detach().cpu().double().requires_grad_(True)
    kw = dict(norm_size=None, rms_eps=1e-6) if fused else {}
    y = tsra64(xd + _view(bd, xd, dim), split, dim, **kw)
    dx, db = torch.autograd.grad(y, (xd, bd), dy.cpu().double())
    return y.detach(), dx, db


@pytest.mark.parametrize("backend_name", ["triton", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=_ids)
@pytest.mark.parametrize("fused", [False, True], ids=["tsra", "rmsnorm_tsra"])
def test_bias_matches_float64(case, dtype, backend_name, fused, device):
    shape, split, dim, layout = case
    x = _make(shape, layout, dtype, device).requires_grad_(True)
    b = (torch.randn(shape[dim]) * 0.5).to(device).requires_grad_(True)  # float32 bias
    dy = torch.randn(shape).to(device=device, dtype=dtype)
    y64, dx64, db64 = _reference64(x, b, dy, split, dim, fused)
    fn = rmsnorm_tsra if fused else tsra
    with cobkern.use_backend(backend_name):
        y = fn(x, split, dim, bias=b)
        dx, db = torch.autograd.grad(y, (x, b), dy)
    assert y.dtype == dtype and y.stride() == x.stride() and dx.stride() == x.stride()
    assert db.dtype == b.dtype and db.shape == b.shape
    tol = TOL[dtype]
    torch.testing.assert_close(y.cpu().double(), y64, **tol)
    torch.testing.assert_close(dx.cpu().double(), dx64, **tol)
    dims = [d for d in range(x.dim()) if d != dim]
    bound = tol["rtol"] * dx64.abs().sum(dims) + tol["atol"]
    err = (db.cpu().double() - db64).abs()
    assert torch.all(err <= bound), f"bias gradient off by {(err - bound).max():.3g}"


@pytest.mark.parametrize("backend_name", ["triton", "reference"])
@pytest.mark.parametrize("fused", [False, True], ids=["tsra", "rmsnorm_tsra"])
def test_bias_equals_adding_it_first(backend_name, fused, device):
    """float32: the same values as adding the bias in a pass of its own (the same float32
    add; tolerance 1e-6 relative for the compiler's freedom to contract it differently)."""
    x = torch.randn(4, 24, 3, 3, device=device)
    b = torch.randn(24, device=device)
    dy = torch.randn_like(x)
    fn = rmsnorm_tsra if fused else tsra
    bwd = rmsnorm_tsra_backward if fused else tsra_backward
    with cobkern.use_backend(backend_name):
        y = fn(x, 10, bias=b)
        dx = bwd(dy, x, 10, bias=b)
        xb = x + b.view(1, -1, 1, 1)
        torch.testing.assert_close(y, fn(xb, 10), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(dx, bwd(dy, xb, 10), rtol=1e-6, atol=1e-6)


def test_bias_gradcheck_and_double_backward():
    """float64 (reference path): first and second derivatives in ``x`` and ``bias`` against
    finite differences (``gradcheck`` / ``gradgradcheck`` defaults)."""
    x = torch.randn(3, 6, 2, 2, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    for fn in (lambda t, c: tsra(t, 2, bias=c), lambda t, c: rmsnorm_tsra(t, 4, bias=c)):
        assert torch.autograd.gradcheck(fn, (x, b))
        assert torch.autograd.gradgradcheck(fn, (x, b))


def test_kernel_double_backward_keeps_the_first_order_bits(device):
    """``create_graph=True`` through the kernel path with a bias: the first-order values
    are the plain backward's bit for bit, and the second-order terms in ``x`` and ``bias``
    match the float64 reference path's to float32 accuracy (1e-4: second derivatives of
    float32 first derivatives)."""
    x = torch.randn(3, 12, 3, 3, device=device, requires_grad=True)
    b = torch.randn(12, device=device, requires_grad=True)
    y = rmsnorm_tsra(x, 5, bias=b)
    dy = torch.randn_like(y)
    dx, db = torch.autograd.grad(y, (x, b), dy, create_graph=True)
    dx0, db0 = torch.autograd.grad(rmsnorm_tsra(x, 5, bias=b), (x, b), dy)
    assert torch.equal(dx, dx0) and torch.equal(db, db0)
    h = torch.autograd.grad(dx.square().sum() + db.square().sum(), (x, b))
    x64 = x.detach().cpu().double().requires_grad_(True)
    b64 = b.detach().cpu().double().requires_grad_(True)
    with cobkern.use_backend("reference"):
        d64 = torch.autograd.grad(rmsnorm_tsra(x64, 5, bias=b64), (x64, b64), dy.cpu().double(),
                                  create_graph=True)
        h64 = torch.autograd.grad(d64[0].square().sum() + d64[1].square().sum(), (x64, b64))
    for a, r in zip(h, h64, strict=True):
        torch.testing.assert_close(a.cpu().double(), r, rtol=1e-4, atol=1e-4 * r.abs().max())


@pytest.mark.parametrize("mode", ["opaque", "inline"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_opcheck_with_bias(mode, layout, device):
    """The registered ops with their optional last argument set (schema, fake tensor,
    autograd registration, ``torch.compile`` tracing: ``torch.library.opcheck``)."""
    x = torch.randn(2, 8, 3, 3, device=device)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_(True)
    b = torch.randn(8, device=device, requires_grad=True)
    names = ("tsra", "tsra_backward") if mode == "opaque" else ("tsra_inline",
                                                                "tsra_inline_backward")
    fwd, bwd = (getattr(torch.ops.cobkern, n).default for n in names)
    extra = ("auto", "") if mode == "inline" else ()
    args = (3, 1, 5.0, 0.5, 5.0, 0.7, 1e-12, 8, 1e-6) + extra
    torch.library.opcheck(fwd, (x, *args, b))
    dy = torch.randn_like(x).detach()
    torch.library.opcheck(bwd, (dy, x.detach(), *args, b))


class _ConvBlock(torch.nn.Module):
    """A convolution run without its bias, the bias handed to the activation."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.act = RMSNormTSRA(8, split=3)
        self.fc = torch.nn.Linear(8 * 4 * 4, 6)
        self.act2 = TSRA(6, split=2)

    def forward(self, x, fused=True):
        if fused:
            h = self.act(self.conv._conv_forward(x, self.conv.weight, None), self.conv.bias)
            return self.act2(torch.nn.functional.linear(h.flatten(1), self.fc.weight),
                             self.fc.bias)
        return self.act2(self.fc(self.act(self.conv(x)).flatten(1)))


@pytest.mark.parametrize("mode", ["opaque", "inline"])
def test_modules_take_the_bias_eager_and_compiled(mode, device):
    """``RMSNormTSRA(x, bias)`` / ``TSRA(x, bias)``: a block that hands its layers' biases to
    the activations computes what the plain block computes (values and every parameter's
    gradient, 1e-5: float32 in both, different summation orders), eagerly and under
    ``torch.compile(fullgraph=True)`` through either kind of registered op."""
    torch.manual_seed(0)
    m = _ConvBlock().to(device)
    x = torch.randn(5, 3, 4, 4, device=device)

    def run(fn):
        m.zero_grad()
        out = fn(x)
        out.square().sum().backward()
        return out.detach(), [p.grad.clone() for p in m.parameters()]

    plain = run(lambda t: m(t, fused=False))
    eager = run(lambda t: m(t, fused=True))
    torch._dynamo.reset()
    with backend.use_compile_kernels(mode):
        compiled = run(torch.compile(lambda t: m(t, fused=True), fullgraph=True))
    torch._dynamo.reset()
    for got in (eager, compiled):
        torch.testing.assert_close(got[0], plain[0], rtol=1e-5, atol=1e-5)
        for g, r in zip(got[1], plain[1], strict=True):
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad, err, match", [
    (torch.randn(7), ValueError, r"bias must have shape \(8,\)"),
    (torch.randn(8, 1), ValueError, r"bias must have shape \(8,\)"),
    (torch.ones(8, dtype=torch.int64), TypeError, "floating-point"),
    ([0.0] * 8, TypeError, "bias must be a torch.Tensor or None"),
    (torch.randn(8, device="meta"), RuntimeError, "bias on meta"),
])
def test_bad_bias_is_refused(bad, err, match):
    x = torch.randn(2, 8, 3, 3)
    with pytest.raises(err, match=match):
        tsra(x, 3, bias=bad)
    with pytest.raises(err, match=match):
        rmsnorm_tsra_backward(torch.randn_like(x), x, 3, bias=bad)
    if isinstance(bad, torch.Tensor):  # (the dispatcher itself refuses a list as Tensor?)
        with pytest.raises(err, match=match):
            torch.ops.cobkern.tsra(x, 3, 1, 5.0, 0.5, 5.0, 0.7, 1e-12, 0, 0.0, bad)


def test_a_layer_bias_takes_the_eager_fast_path(monkeypatch, device):
    """A convolution's bias is an ``nn.Parameter``: eager calls with it (and with a plain
    tensor) take the fast path, not the dispatcher's custom-op round trip, whose host time
    is what small layers cost."""
    import sys

    ops_module = sys.modules["cobkern.ops.tsra"]

    def refuse(*args, **kwargs):
        raise AssertionError("the eager call went through the registered op")

    monkeypatch.setattr(ops_module, "_op_call", refuse)
    x = torch.randn(2, 8, 3, 3, device=device, requires_grad=True)
    for b in (torch.nn.Parameter(torch.randn(8, device=device)), torch.randn(8, device=device)):
        rmsnorm_tsra(x, 3, bias=b).sum().backward()
