"""torch.library registration: opcheck and torch.compile(fullgraph=True), through the opaque
custom ops and through their inline (``triton_op``) twins."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import cobkern
from cobkern.nn import TSRA, RMSNormTSRA
from cobkern.ops import backend

#: the ops each compile-kernels mode puts in a compiled graph
OP_NAMES = {"opaque": ("cobkern.tsra", "cobkern.tsra_backward"),
            "inline": ("cobkern.tsra_inline", "cobkern.tsra_inline_backward")}


@pytest.fixture(params=["opaque", "inline"])
def compile_kernels(request):
    """Run the test in each compile-kernels mode (``cobkern.ops.backend``), with fresh
    dynamo caches."""
    torch._dynamo.reset()
    with backend.use_compile_kernels(request.param):
        yield request.param
    torch._dynamo.reset()


def _op_args(x, norm_size, mode="opaque"):
    """The raw op arguments; the inline ops also take the backend and tuning setting."""
    args = (x, 3, 1, 5.0, 0.5, 5.0, 0.7, 1e-12, norm_size, 1e-6 if norm_size else 0.0)
    return args + (("auto", "") if mode == "inline" else ())


def _ops(mode):
    """The mode's (forward, backward) op overloads."""
    return tuple(getattr(torch.ops.cobkern, n.split(".")[1]).default for n in OP_NAMES[mode])


@pytest.mark.parametrize("mode", ["opaque", "inline"])
@pytest.mark.parametrize("norm_size", [0, 11])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "2d"])
def test_opcheck(norm_size, layout, mode, device):
    if layout == "2d":
        x = torch.randn(5, 8, device=device)
    else:
        x = torch.randn(2, 8, 3, 3, device=device)
        if layout == "channels_last":
            x = x.to(memory_format=torch.channels_last)
    x.requires_grad_(True)
    fwd, bwd = _ops(mode)
    torch.library.opcheck(fwd, _op_args(x, norm_size, mode))
    dy = torch.randn_like(x).detach()
    torch.library.opcheck(bwd, (dy,) + _op_args(x.detach(), norm_size, mode))


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


@pytest.mark.parametrize("backend_name", ["auto", "reference"])
def test_torch_compile_fullgraph_matches_eager(device, compile_kernels, backend_name):
    """The ops trace without graph breaks (fullgraph=True raises on any), as single nodes
    or (inline) as their kernel launches — on a CPU as the reference formula, which inductor
    compiles like any other ops (``"reference"``; under the suite's Triton interpreter
    ``"auto"`` runs the kernels through the opaque op). Tolerance 1e-5: the compiled
    convolution/linear (and the fused reference) may reorder float32 sums."""
    model = _Tiny().to(device)
    x = torch.randn(2, 3, 4, 4, device=device)
    with cobkern.use_backend(backend_name):
        ref_out = model(x)
        ref_grads = torch.autograd.grad(ref_out.square().sum(), list(model.parameters()))
        compiled = torch.compile(model, fullgraph=True)
        out = compiled(x)
        grads = torch.autograd.grad(out.square().sum(), list(model.parameters()))
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    for g, rg in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, rg, rtol=1e-4, atol=1e-5)


def test_torch_export_with_a_dynamic_batch_matches_eager(device, compile_kernels):
    """``torch.export`` of a block using the ops (as graph nodes: the custom ops, or the
    inline twins), with a symbolic batch: the exported module computes the eager outputs
    and gradients at another batch size too, and survives ``run_decompositions``.
    Tolerance as the compiled test's: the exported convolution may reorder float32 sums."""
    model = _Tiny().to(device)
    batch = torch.export.Dim("batch", min=2, max=64)
    ep = torch.export.export(model, (torch.randn(2, 3, 4, 4, device=device),),
                             dynamic_shapes=({0: batch},))
    ops = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert any("cobkern" in o for o in ops), ops  # the ops are nodes, not decomposed away
    x = torch.randn(5, 3, 4, 4, device=device)
    for exported in (ep.module(), ep.run_decompositions().module()):
        want = model(x)
        got = exported(x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        gw = torch.autograd.grad(want.square().sum(), list(model.parameters()))
        gg = torch.autograd.grad(got.square().sum(), list(exported.parameters()))
        for a, b in zip(gg, gw, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_compiled_graph_contains_the_custom_ops(device, compile_kernels):
    """Dynamo's graph holds the mode's forward op once per activation."""
    seen: list[str] = []

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    model = _Tiny().to(device)
    torch.compile(model, backend=backend, fullgraph=True)(torch.randn(1, 3, 4, 4, device=device))
    fwd = OP_NAMES[compile_kernels][0]
    assert sum(s == f"{fwd}.default" for s in seen) == 2, seen
    assert not any(s.startswith("cobkern.") and not s.startswith(fwd + ".") for s in seen), seen


def test_switching_compile_kernels_recompiles(device):
    """``set_compile_kernels`` is guarded: a function compiled in one mode is recompiled
    with the other mode's ops on its next call."""
    torch._dynamo.reset()
    seen: list[list[str]] = []

    def capture(gm, example_inputs):
        seen.append([str(n.target) for n in gm.graph.nodes if "cobkern" in str(n.target)])
        return gm.forward

    f = torch.compile(lambda t: cobkern.rmsnorm_tsra(t, 3), backend=capture, fullgraph=True)
    x = torch.randn(2, 8, 3, 3, device=device)
    with backend.use_compile_kernels("opaque"):
        f(x)
    with backend.use_compile_kernels("inline"):
        f(x)
    with backend.use_compile_kernels("opaque"):
        f(x)  # the first graph again: no third compilation
    assert seen == [["cobkern.tsra.default"], ["cobkern.tsra_inline.default"]]
    torch._dynamo.reset()


def test_compile_kernels_setting_is_validated():
    before = backend.get_compile_kernels()
    with pytest.raises(ValueError, match="'auto', 'opaque', 'inline'"):
        backend.set_compile_kernels("fused")
    assert backend.get_compile_kernels() == before  # unchanged
    env = {k: v for k, v in os.environ.items() if k != "COBKERN_COMPILE_KERNELS"}
    out = subprocess.run([sys.executable, "-c", "import cobkern.ops.backend as b; "
                          "print(b.get_compile_kernels())"], capture_output=True, text=True,
                         env=env, check=True)
    assert out.stdout.strip() == "auto"  # the default
    env = dict(os.environ, COBKERN_COMPILE_KERNELS="inlined")
    out = subprocess.run([sys.executable, "-c", "import cobkern"], capture_output=True,
                         text=True, env=env, check=False)
    assert out.returncode != 0
    assert "COBKERN_COMPILE_KERNELS='inlined'" in out.stderr
    env["COBKERN_COMPILE_KERNELS"] = "inline"
    out = subprocess.run([sys.executable, "-c", "import cobkern.ops.backend as b; "
                          "print(b.get_compile_kernels())"], capture_output=True, text=True,
                         env=env, check=True)
    assert out.stdout.strip() == "inline"


def test_auto_compile_kernels_are_inline_on_cpu_and_on_cuda():
    """``"auto"`` resolves to inline on a CPU (inductor compiles the reference formula) and
    on CUDA (the H200 timed the inline training step faster); explicit modes are kept."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        cuda = torch.empty(2, 4, device="cuda")
    cpu = torch.randn(2, 4)
    with backend.use_compile_kernels("auto"):
        assert backend.compile_kernels_for(cpu) == "inline"
        assert backend.compile_kernels_for(cuda) == "inline"
    for mode in ("opaque", "inline"):
        with backend.use_compile_kernels(mode):
            assert backend.compile_kernels_for(cpu) == backend.compile_kernels_for(cuda) == mode
    seen: list[str] = []

    def capture(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if "cobkern" in str(n.target))
        return gm.forward

    torch._dynamo.reset()
    with backend.use_compile_kernels("auto"):
        torch.compile(lambda t: cobkern.tsra(t, 3), backend=capture, fullgraph=True)(cpu)
    torch._dynamo.reset()
    assert seen == ["cobkern.tsra_inline.default"]


@pytest.fixture(scope="module")
def inline_traces() -> list[dict]:
    """``inline_trace_tools.py`` run in a subprocess (fake sm_90 Triton driver, no GPU)."""
    from aot_tools import run_uninterpreted

    return run_uninterpreted("inline_trace_tools.py", timeout=600)


def test_inline_ops_trace_to_the_eager_launch_plan(inline_traces):
    """Traced on fake CUDA tensors as AOTAutograd traces them for inductor, the inline ops
    leave no cobkern op in the graph, only one ``triton_kernel_wrapper_functional`` per
    direction — and each launches what the eager path launches for that geometry (kernel,
    grid, integer arguments, constexprs, ``num_warps``: ``kernels.tsra.plan``), with the
    constants as passed and only the output marked as written (Triton's mutation analysis
    of our kernels for sm_90 worked: an input marked written would make inductor copy it
    before every launch — the bias pointer included, in the case with a bias). With a bias
    the backward that returns the bias gradient launches the kernel writing its partial
    sums, and marks those written too."""
    int_names = ["C", "P", "split", "n_pblocks", "stride_b", "stride_c", "stride_p"]
    static = [t for t in inline_traces if not t["case"][5]]
    assert len(static) == 5 and sum(t["case"][6] for t in static) == 1
    for trace in static:
        (_, _, _, rmsnorm, norm, _, bias) = trace["case"]
        launches, plans = trace["launches"], trace["plans"]
        assert len(launches) == 2 + bias, trace
        assert trace["ops"] == []
        if bias:
            assert plans[2]["constexprs"]["BIAS_GRAD"] and not plans[1]["constexprs"]["BIAS_GRAD"]
        for launch, plan, out in zip(launches, plans, (["Y"], ["DX"], ["DB", "DX"]),
                                     strict=False):
            assert launch["kernel"] == plan["kernel"]
            assert launch["grid"] == plan["grid"]
            assert [launch["args"][k] for k in int_names] == plan["ints"]
            assert {k: launch["args"][k] for k in plan["constexprs"]} == plan["constexprs"]
            assert launch["args"]["HAS_BIAS"] is bias
            assert launch["num_warps"] == [plan["num_warps"]]
            assert launch["clone"] == out
            assert launch["args"]["inv_norm_size"] == (1.0 / norm if rmsnorm else 0.0)
            assert (launch["args"]["a_u"], launch["args"]["b_v"]) == (5.0, 0.7)


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_traced_launch_binds_each_constant_to_its_own_parameter(monkeypatch, direction):
    """``run_traced`` (what inductor launches under ``torch.compile`` on CUDA, so never run
    by the CPU suite) must pass every argument to the kernel parameter ``run`` passes it to:
    both launches recorded and bound to the kernel's parameter names, with six distinct
    constants — the inline trace above compares only ``a_u`` and ``b_v`` at their defaults,
    where ``a_u == a_v``, so ``a_u, a_v, b_u, b_v`` passed in that order went unnoticed
    (found by mutation testing). Exact: the same Python floats, no arithmetic between."""
    import torch.library

    from cobkern.kernels import tsra as k
    from cobkern.ops._checks import channel_geometry

    x = torch.randn(2, 8, 3, 3)
    geo = channel_geometry(x, 1)
    p = k.plan(direction, geo, 3, True, 4)
    tensors = (x, torch.empty_like(x)) if direction == "forward" else \
        (torch.randn_like(x), x, torch.empty_like(x))
    consts = (2.0, 0.25, 7.0, 0.75, 0.125, 8, 1e-3)  # a_u, b_u, a_v, b_v, eps, n, rms_eps
    names = p.kernel.arg_names
    bound = {}

    def eager(kernel, grid, ptrs, ints, floats, constexprs, num_warps, *rest):
        bound["run"] = dict(zip(names, (*ptrs, *ints, *floats), strict=False))

    class Traced:
        def __init__(self, kernel):
            assert kernel is p.kernel

        def __getitem__(self, grid):
            def call(*args, num_warps, **constexprs):
                assert num_warps == p.num_warps and constexprs == p.constexprs
                bound["traced"] = dict(zip(names, args, strict=False))
            return call

    monkeypatch.setattr(k, "launch", eager)
    monkeypatch.setattr(torch.library, "wrap_triton", Traced)
    k.run(p, tensors, *consts)
    k.run_traced(p, tensors, *consts)
    floats = ("a_u", "b_u", "a_v", "b_v", "eps", "inv_norm_size", "rms_eps")
    want = dict(zip(floats, (2.0, 0.25, 7.0, 0.75, 0.125, 1 / 8, 1e-3), strict=True))
    assert {n: bound["run"][n] for n in floats} == want
    assert bound["traced"].keys() == bound["run"].keys()
    for n, v in bound["run"].items():
        assert bound["traced"][n] is v or bound["traced"][n] == v, n


def test_inline_ops_with_symbolic_sizes_run_the_opaque_ops(inline_traces):
    """With a symbolic batch size (``torch.compile``'s dynamic shapes, ``mark_dynamic``) a
    launch cannot be planned at trace time — its block sizes depend on the sizes — and
    specialising would break a dimension marked dynamic: the inline ops then put the opaque
    ops in the graph, which plan at run time, instead of any kernel launch."""
    dynamic = [t for t in inline_traces if t["case"][5]]
    assert len(dynamic) == 1
    assert dynamic[0]["launches"] == []
    assert dynamic[0]["ops"] == ["cobkern.tsra.default", "cobkern.tsra_backward.default"]


def test_inline_graphs_record_backend_and_tuning_setting(monkeypatch):
    """The inline ops take the backend and the tuning setting as arguments, read where dynamo
    traces: the graph — hence every compile cache's key — holds the values it was traced
    with, and a changed backend or tuning value recompiles (guards). (A variable set after
    compiling while it was unset does not: dynamo does not guard on its absence.)"""
    seen: list[tuple] = []

    def capture(gm, example_inputs):
        # x, the nine parameters, then the backend and the tuning setting (then the bias)
        seen.extend(n.args[10:12] for n in gm.graph.nodes if "cobkern" in str(n.target))
        return gm.forward

    torch._dynamo.reset()
    monkeypatch.delenv("COBKERN_TSRA_TUNING", raising=False)
    auto = "auto" if backend.interpreter_enabled() else "reference"  # CPU tensors
    f = torch.compile(lambda t: cobkern.tsra(t, 3), backend=capture, fullgraph=True)
    x = torch.randn(2, 8, 3, 3)
    with backend.use_compile_kernels("inline"):
        f(x)
        with cobkern.use_backend("reference"):
            f(x)
        torch._dynamo.reset()
        monkeypatch.setenv("COBKERN_TSRA_TUNING", "off")
        f(x)
        f(x)  # nothing changed: no new graph
        monkeypatch.setenv("COBKERN_TSRA_TUNING", "OFF")
        f(x)
        # without the interpreter "auto" means the formula on CPU tensors, and says so: the
        # graph traced with the interpreter (kernels) and the one without then differ, so an
        # on-disk compile cache cannot serve one for the other
        torch._dynamo.reset()
        monkeypatch.delenv("COBKERN_TSRA_TUNING")
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        f(x)
        if auto == "auto":  # (the interpreter cannot be switched on after triton's import)
            monkeypatch.setenv("TRITON_INTERPRET", "1")
            f(x)
    torch._dynamo.reset()
    assert seen == [(auto, ""), ("reference", ""), (auto, "off"), (auto, "OFF"),
                    ("reference", ""), *([("auto", "")] if auto == "auto" else [])]


@pytest.mark.parametrize("forced", ["triton", "reference"])
def test_inline_on_cpu_honours_a_forced_backend(forced):
    """Traced on CPU tensors, the inline ops compile the reference formula — unless the
    kernels would run on them (the Triton interpreter, on in this suite without a GPU, with
    the ``"triton"`` backend forced), which only run eagerly: the graph then calls the
    opaque op. With ``"reference"`` forced no cobkern op is left. Without the interpreter
    (the CUDA machines' suite) forcing ``"triton"`` on CPU tensors is a clear error."""
    from torch._functorch.aot_autograd import aot_function

    graphs = []

    def keep(gm, _):
        graphs.append(gm)
        return gm

    x = torch.randn(2, 8, 3, 3)
    if forced == "triton" and not backend.interpreter_enabled():
        # a CUDA machine runs this suite without the interpreter: no kernel runs on CPU
        # tensors there, and forcing one is an error that names the device
        with backend.use_compile_kernels("inline"), cobkern.use_backend(forced), \
                pytest.raises(RuntimeError, match="forced but Triton cannot run on cpu"):
            aot_function(lambda t: cobkern.tsra(t, 3), fw_compiler=keep)(x)
        return
    with backend.use_compile_kernels("inline"), cobkern.use_backend(forced):
        y = aot_function(lambda t: cobkern.tsra(t, 3), fw_compiler=keep)(x)
        want = cobkern.tsra(x, 3)
    ops = [str(n.target) for n in graphs[0].graph.nodes if "cobkern" in str(n.target)]
    assert ops == (["cobkern.tsra.default"] if forced == "triton" else [])
    # float32; the forced-triton path runs the interpreted kernel on both sides (same bits),
    # the reference path the same formula op by op
    torch.testing.assert_close(y, want, rtol=1e-6, atol=1e-7)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("channels_last", [False, True])
def test_inline_compile_launches_the_same_kernels_on_cuda(channels_last):
    """Inline, inductor's generated code launches the TSRA kernels itself (no cobkern op call
    left in it) and computes the eager launch's bits: the same kernel, arguments and
    options; the constants arrive as fp64 and are cast to the float32 the JIT passes."""
    from torch._inductor.utils import run_and_get_code

    x = torch.randn(64, 96, 8, 8, device="cuda", dtype=torch.bfloat16)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    dy = torch.randn_like(x)

    def f(t, g):
        return cobkern.rmsnorm_tsra(t, 40), cobkern.ops.rmsnorm_tsra_backward(g, t, 40)

    torch._dynamo.reset()
    with backend.use_compile_kernels("inline"):
        (y, dx), codes = run_and_get_code(torch.compile(f, fullgraph=True), x, dy)
    torch._dynamo.reset()
    code = "\n".join(codes)
    assert "torch.ops.cobkern" not in code
    assert "_tsra_fwd" in code and "_tsra_bwd" in code
    ey, edx = f(x, dy)
    assert torch.equal(y, ey) and torch.equal(dx, edx)


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


@pytest.mark.parametrize("mode", ["opaque", "inline"])
@pytest.mark.parametrize("norm_size", [0, 11])
def test_opcheck_backward_op_is_differentiable(norm_size, mode, device):
    """cobkern::tsra_backward (and its inline twin) has an autograd formula (double backward
    through the op): opcheck's autograd-registration and AOT tests run it with inputs that
    require grad. Without the formula, test_autograd_registration fails."""
    x = torch.randn(2, 8, 3, 3, device=device, requires_grad=True)
    dy = torch.randn(2, 8, 3, 3, device=device, requires_grad=True)
    torch.library.opcheck(_ops(mode)[1], (dy,) + _op_args(x, norm_size, mode))


def test_torch_compile_dynamic_shapes_and_symbolic_split(device, compile_kernels):
    """dynamic=True: the argument checks (in the wrappers and in the ops' fake
    implementations) must trace with symbolic sizes and constants, without graph breaks;
    inline on CUDA, a launch's sizes are specialised (its block sizes depend on them)."""
    m = torch.nn.Sequential(RMSNormTSRA(8, split=3), TSRA(8, split=5, eps=1e-9)).to(device)
    g = torch.compile(m, dynamic=True, fullgraph=True)
    f = torch.compile(lambda x: cobkern.tsra(x, x.shape[1] // 2), dynamic=True, fullgraph=True)
    for shape in ((2, 8, 3, 3), (5, 8, 4, 2)):
        x = torch.randn(shape, device=device)
        torch.testing.assert_close(g(x), m(x), rtol=1e-6, atol=1e-6)
    for c in (6, 8):
        x = torch.randn(3, c, 2, 2, device=device)
        torch.testing.assert_close(f(x), cobkern.tsra(x, c // 2), rtol=1e-6, atol=1e-6)
