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
Where the backward kernel sums it itself (per-program partial sums of the unrounded float32
terms, section "bias gradient" below), the same bound holds with room to spare.
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


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_strided_bias_is_read_by_its_strides(layout, device):
    """A bias that is a strided view (every other value of a longer vector, as a weight
    column or a slice gives) is made contiguous before the kernels, which index it densely:
    without that they read the wrong values — every other entry, then past the view. The
    forward, the input gradient and the bias gradient against the float64 reference at
    the same values (float32 tolerances of ``test_tsra_kernels.py``; the bias gradient
    within the bound of the module docstring). Found by mutation testing."""
    shape, split = (3, 8, 4, 4), 3
    x = _make(shape, layout, torch.float32, device).requires_grad_(True)
    b = (torch.randn(2 * shape[1]) * 0.5).to(device)[::2].requires_grad_(True)
    assert b.stride(0) == 2
    dy = torch.randn(shape, device=device)
    if layout == "channels_last":
        dy = dy.to(memory_format=torch.channels_last)
    y64, dx64, db64 = _reference64(x, b, dy, split, 1, True)
    with cobkern.use_backend("triton"):
        y = rmsnorm_tsra(x, split, bias=b)
        dx, db = torch.autograd.grad(y, (x, b), dy)
    tol = TOL[torch.float32]
    torch.testing.assert_close(y.detach().cpu().double(), y64, **tol)
    torch.testing.assert_close(dx.cpu().double(), dx64, **tol)
    bound = tol["rtol"] * dx64.abs().sum((0, 2, 3)) + tol["atol"]
    assert torch.all((db.cpu().double() - db64).abs() <= bound)


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
    # the backward that returns the bias gradient too (what the forward's formula calls
    # when the bias needs one), differentiable in grad, x and the bias
    bwd_bias = getattr(torch.ops.cobkern, f"{names[1]}_bias").default
    torch.library.opcheck(bwd_bias, (dy.requires_grad_(True), x, *args, b))


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


# ----------------------------------------------------------------------------- bias gradient
# The backward kernels can write the bias gradient's partial sums (one float32 per channel
# and program) as they write dx, so that it costs a sum over programs instead of a second
# read of dx (``kernels.tsra.plan``: where a program's rows hold >= 16 bytes of dx).


def _ops_module():
    import sys

    return sys.modules["cobkern.ops.tsra"]


@pytest.fixture
def partials_everywhere(monkeypatch):
    """Every backward launch with a bias writes the partial sums (the threshold at 0),
    counting the buffers made; plan caches cleared before and after."""
    from cobkern.kernels import tsra as ktsra

    made = []
    real = ktsra.bias_grad_buffer

    def counted(p, device):
        made.append(p.kernel.__name__)
        return real(p, device)

    monkeypatch.setattr(ktsra, "BIAS_GRAD_MIN_ROW_BYTES",
                        dict.fromkeys(ktsra.BIAS_GRAD_MIN_ROW_BYTES, 0))
    monkeypatch.setattr(ktsra, "bias_grad_buffer", counted)
    _ops_module()._PLANS.clear()
    yield made
    _ops_module()._PLANS.clear()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_kernel_bias_gradient_from_partial_sums(case, dtype, device, partials_everywhere):
    """Every kernel family (split, tile, rows, chunked; masked rows and positions, other
    channel axes) writing the partial sums: the bias gradient within the same bound as the
    summed input gradient's (``rtol`` times the sum of the terms' magnitudes plus ``atol``;
    the partials sum float32 terms before their rounding to the storage dtype, so the bound
    only gets looser for them), and ``dx`` as without them."""
    if device.type == "cpu" and not backend.interpreter_enabled():
        pytest.skip("the kernels run on CPU tensors only under TRITON_INTERPRET=1")
    shape, split, dim, layout = case
    x = _make(shape, layout, dtype, device).requires_grad_(True)
    b = (torch.randn(shape[dim]) * 0.5).to(device).requires_grad_(True)
    dy = torch.randn(shape).to(device=device, dtype=dtype)
    _, dx64, db64 = _reference64(x, b, dy, split, dim, True)
    with cobkern.use_backend("triton"):
        dx, db = torch.autograd.grad(rmsnorm_tsra(x, split, dim, bias=b), (x, b), dy)
        dx_only = torch.autograd.grad(rmsnorm_tsra(x, split, dim, bias=b.detach()), x, dy)[0]
    assert len(partials_everywhere) == 1  # the first backward only: the bias needed a grad
    assert torch.equal(dx, dx_only)
    dims = [d for d in range(x.dim()) if d != dim]
    tol = TOL[dtype]
    bound = tol["rtol"] * dx64.abs().sum(dims) + tol["atol"]
    err = (db.cpu().double() - db64).abs()
    assert torch.all(err <= bound), f"bias gradient off by {(err - bound).max():.3g}"


def test_partial_sums_are_made_where_they_pay():
    """The plan writes partial sums where a program's rows hold at least
    ``BIAS_GRAD_MIN_ROW_BYTES`` of dx for the layout — 16 bytes channel-major, 32
    channels-last (where the sum over a row crosses threads; the H200 timed the partials
    slower there at 16-byte rows): every VGG-16 convolution at batch 1024, bf16 and fp32,
    NCHW and channels-last, but the bf16 NCHW 2×2 maps (a program holds one image's 4
    positions, 8 bytes a row: writing and reading the partials would move as many bytes as
    reading dx) and the bf16 channels-last 512-channel maps (8 positions a program, 16
    bytes); not the 4096-wide linear layers (one row per program: the partials would be
    twice dx's bytes), nor without a bias gradient or in the forward."""
    from cobkern.kernels import tsra as ktsra
    from cobkern.ops._checks import channel_geometry

    def fused(shape, cl, itemsize, direction="backward", bias_grad=True):
        x = torch.empty(shape, device="meta")
        if cl:
            x = x.to(memory_format=torch.channels_last)
        p = ktsra.plan(direction, channel_geometry(x, 1), shape[1] // 2, True, itemsize,
                       has_bias=True, bias_grad=bias_grad)
        return p.constexprs.get("BIAS_GRAD")

    for c, hw in ((64, 32), (128, 16), (256, 8), (512, 4), (512, 2)):
        for cl in (False, True):
            for itemsize in (2, 4):
                skipped = (hw == 2 and not cl and itemsize == 2) or \
                    (c == 512 and cl and itemsize == 2)
                assert fused((1024, c, hw, hw), cl, itemsize) is not skipped, \
                    (c, hw, cl, itemsize)
    for itemsize in (2, 4):
        assert fused((1024, 4096), False, itemsize) is False
    assert fused((1024, 64, 8, 8), False, 2, bias_grad=False) is False
    with pytest.raises(ValueError, match="bias_grad is a backward option"):
        fused((1024, 64, 8, 8), False, 2, direction="forward")


def test_launch_refuses_a_partials_buffer_that_does_not_fit_the_plan():
    from cobkern.kernels import tsra as ktsra
    from cobkern.ops._checks import channel_geometry

    x = torch.randn(2, 8, 4, 4)
    geo = channel_geometry(x, 1)
    p = ktsra.plan("backward", geo, 3, True, 4, has_bias=True, bias_grad=True)
    plain = ktsra.plan("backward", geo, 3, True, 4, has_bias=True)
    fwd = ktsra.plan("forward", geo, 3, True, 4, has_bias=True)
    b, buf = torch.randn(8), ktsra.bias_grad_buffer(p, "cpu")
    assert buf.shape == (p.grid[0], 8) and buf.dtype == torch.float32
    t = (x, x, torch.empty_like(x))
    with pytest.raises(ValueError, match="made with the bias gradient's partial sums"):
        ktsra._with_bias(p, t, b)
    with pytest.raises(ValueError, match="made without the bias gradient's partial sums"):
        ktsra._with_bias(plain, t, b, buf)
    with pytest.raises(ValueError, match="contiguous float32"):
        ktsra._with_bias(p, t, b, buf[:1])
    with pytest.raises(ValueError, match="contiguous float32"):
        ktsra._with_bias(p, t, b, buf.double())
    with pytest.raises(ValueError, match="forward launch has no"):
        ktsra._with_bias(fwd, t[:2], b, buf)
    with pytest.raises(ValueError, match="bias_grad is a backward option"):
        ktsra.specialization(8, 16, 3, False, "forward", True, 4, bias_grad=True)
    assert ktsra._with_bias(p, t, b, buf)[-2:] == (b, buf)


@pytest.mark.parametrize("mode", ["opaque", "inline"])
def test_forward_formula_calls_the_bias_gradient_backward(mode):
    """The registered forward's autograd formula runs ``tsra*_backward_bias`` when the bias
    needs a gradient and the plain backward when it does not (or there is none)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Log(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if "cobkern" in str(func):
                self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    x = torch.randn(2, 8, 3, 3, dtype=torch.float64, requires_grad=True)
    extra = ("reference", "") if mode == "inline" else ()
    fwd = torch.ops.cobkern.tsra_inline if mode == "inline" else torch.ops.cobkern.tsra
    prefix = "cobkern.tsra_inline" if mode == "inline" else "cobkern.tsra"
    args = (3, 1, 5.0, 0.5, 5.0, 0.7, 1e-12, 8, 1e-6, *extra)
    for bias, want in ((torch.randn(8, dtype=torch.float64, requires_grad=True),
                        f"{prefix}_backward_bias.default"),
                       (torch.randn(8, dtype=torch.float64), f"{prefix}_backward.default"),
                       (None, f"{prefix}_backward.default")):
        y = fwd(x, *args, bias)
        with Log() as log:
            grads = torch.autograd.grad(y.sum(), [t for t in (x, bias) if t is not None
                                                  and t.requires_grad])
        assert log.ops == [want], log.ops
        if bias is not None and bias.requires_grad:
            torch.testing.assert_close(grads[1], grads[0].sum((0, 2, 3)), rtol=1e-12,
                                       atol=1e-12)


def test_bias_gradient_backward_op_second_derivatives():
    """``cobkern::tsra_backward_bias`` against finite differences in float64 (reference path):
    gradients of both outputs — ``dbias``'s cotangent reaches ``dx``'s broadcast over the
    positions — with respect to ``grad``, ``x`` and the bias (``gradcheck`` defaults)."""
    g = torch.randn(2, 6, 2, 3, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 6, 2, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    for norm in (0, 6):
        def fn(gg, xx, bb, norm=norm):
            return torch.ops.cobkern.tsra_backward_bias(gg, xx, 2, 1, 5.0, 0.5, 5.0, 0.7,
                                                        1e-12, norm, 1e-6 * (norm > 0), bb)

        assert torch.autograd.gradcheck(fn, (g, x, b))
        dx, db = fn(g, x, b)
        torch.testing.assert_close(db, dx.sum((0, 2, 3)), rtol=1e-12, atol=1e-12)


def test_the_bias_gradient_backward_needs_a_bias():
    x = torch.randn(2, 4, 2, 2)
    with pytest.raises(ValueError, match="needs a bias"):
        torch.ops.cobkern.tsra_backward_bias(torch.randn_like(x), x, 2, 1, 5.0, 0.5, 5.0, 0.7,
                                             1e-12, 0, 0.0, None)
