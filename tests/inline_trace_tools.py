"""What ``torch.compile`` sees of the inline TSRA ops on CUDA tensors, on a machine without a GPU.

Run as a script (interpreter off, :mod:`fake_triton_driver` installed so that Triton has an
sm_90 target for inductor's mutation analysis), it traces ``cobkern.tsra`` /
``cobkern.rmsnorm_tsra`` and their explicit backwards on *fake* CUDA tensors with
``set_compile_kernels("inline")``, the way AOTAutograd traces them for inductor, and prints
one JSON line per case: for every ``triton_kernel_wrapper_functional`` node of the traced
graph, the kernel, grid, arguments, ``num_warps`` and the tensors inductor would have to
clone, and the cobkern ops left in the graph; and, for comparison, the launch plan the eager
path makes for the same geometry
(:func:`cobkern.kernels.tsra.plan`). ``COBKERN_TSRA_TUNING=off`` keeps both on the heuristic
(the tuning lookup reads the device's name, which a fake device does not have).
"""

from __future__ import annotations

import json
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)
os.environ["COBKERN_TSRA_TUNING"] = "off"

#: (shape, channels_last, split, rmsnorm, dynamic, bias) traced on fake CUDA tensors;
#: ``dynamic``: symbolic sizes, as ``torch.compile(dynamic=True)`` traces them; ``bias``: a
#: float32 ``(C,)`` bias added in the kernels
CASES = [
    ((4, 64, 8, 8), False, 32, True, False, False),
    ((4, 64, 8, 8), True, 32, False, False, False),
    ((6, 300), False, 100, True, False, False),
    ((2, 8, 2, 2), False, 3, False, False, False),
    ((4, 64, 8, 8), False, 32, True, False, True),
    ((4, 64, 8, 8), True, 32, True, True, False),
]


def _trace(shape, channels_last, split, rmsnorm, dynamic, bias) -> dict:
    import torch
    from torch._functorch.aot_autograd import aot_function
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
    from torch._subclasses.fake_tensor import FakeTensorMode

    import cobkern
    from cobkern.kernels import tsra as ktsra
    from cobkern.ops._checks import channel_geometry

    graphs = []

    def keep(gm, _):
        graphs.append(gm)
        return gm

    norm = shape[1] if rmsnorm else 0

    def f(x, dy, b):
        if rmsnorm:
            out = (cobkern.rmsnorm_tsra(x, split, bias=b),
                   cobkern.ops.rmsnorm_tsra_backward(dy, x, split, bias=b))
        else:
            out = (cobkern.tsra(x, split, bias=b), cobkern.ops.tsra_backward(dy, x, split, bias=b))
        if b is None:
            return out
        # with a bias: also the backward that returns its gradient (what the forward's
        # autograd formula calls when the bias needs one), which writes partial sums
        return (*out, *torch.ops.cobkern.tsra_inline_backward_bias(
            dy, x, split, 1, 5.0, 0.5, 5.0, 0.7, 1e-12, norm, 1e-6 if rmsnorm else 0.0,
            "auto", "off", b))

    mode, sizes = FakeTensorMode(), list(shape)
    if dynamic:  # a symbolic batch size, as torch.compile's dynamic shapes make it
        from torch._dynamo.source import ConstantSource
        from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv

        env, src = ShapeEnv(), ConstantSource("batch")
        sym = env.create_symbol(shape[0], source=src, dynamic_dim=DimDynamic.DYNAMIC)
        sizes[0] = env.create_symintnode(sym, hint=shape[0], source=src)
        mode = FakeTensorMode(shape_env=env)
    with mode:
        x = torch.empty(sizes, device="cuda", dtype=torch.bfloat16)
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        dy = torch.empty_like(x)
        b = torch.empty(shape[1], device="cuda") if bias else None
        aot_function(f, fw_compiler=keep)(x, dy, b)
        geo = channel_geometry(x, 1)
    launches = []
    ops = [str(n.target) for n in graphs[0].graph.nodes if "cobkern" in str(n.target)]
    for node in graphs[0].graph.nodes:
        if "triton_kernel_wrapper" not in str(node.target):
            continue
        kernel = kernel_side_table.get_kernel(node.kwargs["kernel_idx"])
        configs = getattr(kernel, "configs", [])
        inner = getattr(kernel, "fn", kernel)
        args = {k: v for k, v in node.kwargs["kwargs"].items() if not hasattr(v, "meta")}
        launches.append({"kernel": inner.__name__, "grid": list(node.kwargs["grid"][0]),
                         "args": args, "num_warps": [c.num_warps for c in configs],
                         "clone": sorted(node.kwargs["tensors_to_clone"])})
    plans = []
    directions = ("forward", "backward") + (("backward-bias",) if bias else ())
    for direction in directions if not dynamic else ():
        p = ktsra.plan(direction.split("-")[0], geo, split, rmsnorm, 2, has_bias=bias,
                       bias_grad=direction == "backward-bias")
        plans.append({"kernel": p.kernel.__name__, "grid": list(p.grid) + [1, 1],
                      "ints": list(p.ints), "constexprs": p.constexprs,
                      "num_warps": p.num_warps})
    return {"case": [list(shape), channels_last, split, rmsnorm, norm, dynamic, bias],
            "launches": launches, "ops": ops, "plans": plans}


def main() -> None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import fake_triton_driver

    fake_triton_driver.install()
    from cobkern.ops import backend

    backend.set_compile_kernels("inline")
    print(json.dumps([_trace(*case) for case in CASES]))


if __name__ == "__main__":
    main()
