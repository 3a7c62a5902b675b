"""torch.library registration: opcheck and torch.compile(fullgraph=True)."""

from __future__ import annotations

import pytest
import torch

import cobkern
from cobkern.nn import TSRA, RMSNormTSRA


def _op_args(x, norm_size):
    return (x, 3, 1, 5.0, 0.5, 5.0, 0.7, 1e-12, norm_size, 1e-6 if norm_size else 0.0)


@pytest.mark.parametrize("norm_size", [0, 11])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "2d"])
def test_opcheck(norm_size, layout, device):
    if layout == "2d":
        x = torch.randn(5, 8, device=device)
    else:
        x = torch.randn(2, 8, 3, 3, device=device)
        if layout == "channels_last":
            x = x.to(memory_format=torch.channels_last)
    x.requires_grad_(True)
    torch.library.opcheck(torch.ops.cobkern.tsra.default, _op_args(x, norm_size))
    dy = torch.randn_like(x).detach()
    torch.library.opcheck(torch.ops.cobkern.tsra_backward.default,
                          (dy,) + _op_args(x.detach(), norm_size))


class _Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.act = RMSNormTSRA(8, split=3)
        self.pool = torch.nn.AvgPool2d(2)
        self.fc = torch.nn.Linear(8 * 2 * 2, 12)
        self.act2 = TSRA(12, split=5)
        self.out = torch.nn.Linear(12, 4)

    def forward(self, x):
        h = self.pool(self.act(self.conv(x))).flatten(1)
        return self.out(self.act2(self.fc(h)))


def test_torch_compile_fullgraph_matches_eager(device):
    """The ops trace as single nodes: fullgraph=True raises on any graph break.
    Tolerance 1e-5: the compiled convolution/linear may reorder float32 sums."""
    torch._dynamo.reset()
    model = _Tiny().to(device)
    x = torch.randn(2, 3, 4, 4, device=device)
    ref_out = model(x)
    ref_grads = torch.autograd.grad(ref_out.square().sum(), list(model.parameters()))
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x)
    grads = torch.autograd.grad(out.square().sum(), list(model.parameters()))
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    for g, rg in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, rg, rtol=1e-4, atol=1e-5)


def test_compiled_graph_contains_the_custom_ops(device):
    torch._dynamo.reset()
    seen: list[str] = []

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    model = _Tiny().to(device)
    torch.compile(model, backend=backend, fullgraph=True)(torch.randn(1, 3, 4, 4, device=device))
    assert sum("cobkern.tsra" in s for s in seen) == 2, seen


def test_backend_context_restores():
    assert cobkern.ops.get_backend() == "auto"
    with cobkern.use_backend("reference"):
        assert cobkern.ops.get_backend() == "reference"
    assert cobkern.ops.get_backend() == "auto"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_capture_replays_forward_and_backward():
    """Whole-step CUDA-graph capture (the standard ``torch.cuda.graph`` recipe, and what
    ``torch.compile(mode="reduce-overhead")`` does) takes the fused ops: nothing in their
    launch path synchronises or allocates outside the graph pool, so a small model's host
    overhead can be replayed away. The replay with a new input must give the eager loss and
    gradients: same kernels and inputs; 1e-5 as in the compile test, since cuDNN's
    convolution backward may sum in another order from run to run."""
    torch.manual_seed(0)
    model = _Tiny().cuda()
    static_x = torch.randn(4, 3, 4, 4, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture: compiles every kernel
        for _ in range(2):
            model.zero_grad(set_to_none=True)
            model(static_x).square().sum().backward()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    model.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        static_loss = model(static_x).square().sum()
        static_loss.backward()
    x = torch.randn_like(static_x)
    static_x.copy_(x)
    graph.replay()
    torch.cuda.synchronize()
    replayed = [static_loss.clone()] + [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    loss = model(x).square().sum()
    loss.backward()
    eager = [loss.detach()] + [p.grad for p in model.parameters()]
    for r, e in zip(replayed, eager, strict=True):
        torch.testing.assert_close(r, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("norm_size", [0, 11])
def test_opcheck_backward_op_is_differentiable(norm_size, device):
    """cobkern::tsra_backward has an autograd formula (double backward through the custom
    op): opcheck's autograd-registration and AOT tests run it with inputs that require
    grad. Without the formula, test_autograd_registration fails."""
    x = torch.randn(2, 8, 3, 3, device=device, requires_grad=True)
    dy = torch.randn(2, 8, 3, 3, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.cobkern.tsra_backward.default, (dy,) + _op_args(x, norm_size))


def test_torch_compile_dynamic_shapes_and_symbolic_split(device):
    """dynamic=True: the argument checks (in the wrappers and in the ops' fake
    implementations) must trace with symbolic sizes and constants, without graph breaks."""
    torch._dynamo.reset()
    m = torch.nn.Sequential(RMSNormTSRA(8, split=3), TSRA(8, split=5, eps=1e-9)).to(device)
    g = torch.compile(m, dynamic=True, fullgraph=True)
    f = torch.compile(lambda x: cobkern.tsra(x, x.shape[1] // 2), dynamic=True, fullgraph=True)
    for shape in ((2, 8, 3, 3), (5, 8, 4, 2)):
        x = torch.randn(shape, device=device)
        torch.testing.assert_close(g(x), m(x), rtol=1e-6, atol=1e-6)
    for c in (6, 8):
        x = torch.randn(3, c, 2, 2, device=device)
        torch.testing.assert_close(f(x), cobkern.tsra(x, c // 2), rtol=1e-6, atol=1e-6)
