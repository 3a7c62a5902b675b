"""``calibrate(cuda_graphs=True)``: the forward pass and its covariance kernels replayed as
one CUDA graph per batch (:mod:`cobkern.cob.graphs`).

This machine has no GPU, so the replay bookkeeping is tested with a fake capture that
keeps CUDA graphs' two rules on CPU tensors: a capture runs the hooks' Python (the sample
counts) but no kernel (the sums are restored), and a replay runs the kernels (the sums
grow, from whatever the static input holds) but no Python (the counts are restored). The
statistics must then equal eager calibration's exactly (``torch.equal``): the same
computations in the same order. The real capture runs in the CUDA tests at the end.
"""

from __future__ import annotations

import contextlib
import importlib
import warnings

import pytest
import torch
from cob_tools import tiny_net
from torch import nn

from cobkern.cob import calibrate, graphs
from cobkern.nn import RMSNormTSRA
from cobkern.ops import use_backend
from cobkern.ops.covariance import CovarianceAccumulator

#: the module itself (the package attribute ``cobkern.cob.calibrate`` is the function)
calibrate_module = importlib.import_module("cobkern.cob.calibrate")


def batches(sizes: list[int]) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return [torch.randn(n, 3, 8, 8, generator=g) for n in sizes]


class FakeCapture:
    """``capture(fn) -> replay`` with CUDA graphs' semantics for the accumulators it is
    given (see the module docstring). Counts its captures and replays. ``fail``: raise it
    after the capture; ``runs_kernels``: let the capture's "kernels" run (as kernels
    launched outside the capture stream would), which the runner must notice.

    What it cannot emulate: a replay here re-runs the Python, so it would not catch code
    that moves a buffer the graph points at (e.g. reallocating the sums) — the CUDA tests
    below use real graphs for that."""

    def __init__(self, accs: list[CovarianceAccumulator], fail: Exception | None = None,
                 runs_kernels: bool = False):
        self.accs, self.fail, self.runs_kernels = accs, fail, runs_kernels
        self.captures = self.replays = 0
        self.static_strides: list[tuple] = []

    def _sums(self) -> list[torch.Tensor]:
        return [t for a in self.accs for t in a.sums()]

    def __call__(self, fn):
        self.captures += 1
        saved = [t.clone() for t in self._sums()]
        fn()  # the Python runs (counts advance) ...
        if not self.runs_kernels:
            for t, s in zip(self._sums(), saved, strict=True):
                t.copy_(s)  # ... but no kernel did
        if self.fail is not None:
            raise self.fail

        def replay() -> None:
            self.replays += 1
            counts = [a.count for a in self.accs]
            fn()  # the kernels run ...
            for a, c in zip(self.accs, counts, strict=True):
                a.count_samples(c - a.count)  # ... the Python does not
        return replay


@pytest.fixture
def fake_graphs(monkeypatch):
    """Make calibrate record "graphs" on CPU with a :class:`FakeCapture` over the
    accumulators it creates; yields a dict that receives the capture object."""
    made: list[CovarianceAccumulator] = []
    original = CovarianceAccumulator.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        made.append(self)

    box: dict = {"fail": None, "runs_kernels": False}

    def capture(fn):
        if "fake" not in box:
            box["fake"] = FakeCapture(made, box["fail"], box["runs_kernels"])
        return box["fake"](fn)

    monkeypatch.setattr(CovarianceAccumulator, "__init__", init)
    monkeypatch.setattr(calibrate_module, "_graphs_on", lambda device: True)
    monkeypatch.setattr(graphs, "cuda_capture", capture)
    return box


def assert_same_stats(a, b) -> None:
    assert list(a.layers) == list(b.layers) and a.num_images == b.num_images
    for name in a.layers:
        x, y = a[name], b[name]
        assert (x.count, x.accumulation) == (y.count, y.accumulation), name
        for p, q in zip((x.gram_u, x.gram_v, x.sum_abs, x.sum_sq),
                        (y.gram_u, y.gram_v, y.sum_abs, y.sum_sq), strict=True):
            assert torch.equal(p, q), name


# ------------------------------------------------------------------ replay bookkeeping
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_replayed_calibration_equals_eager(backend: str, fake_graphs) -> None:
    """Batch 1 eager (warm-up), batch 2 captured and replayed once, batches 3–6 replayed,
    the smaller trailing batch eager: five replays, one capture, and the statistics and
    counts of eager calibration, bit for bit."""
    m, data = tiny_net(), batches([4, 4, 4, 4, 4, 4, 3])
    with use_backend(backend):
        eager = calibrate(m, data, max_samples=None, progress=False)
        replayed = calibrate(m, data, max_samples=None, progress=False, cuda_graphs=True)
    fake = fake_graphs["fake"]
    assert (fake.captures, fake.replays) == (1, 5)
    assert replayed["0"].count == 27 * 8 * 8 and replayed["4"].count == 27
    assert_same_stats(replayed, eager)


def test_the_loader_batches_are_not_overwritten(fake_graphs) -> None:
    """Replays read a static copy: the loader's own tensors keep their values."""
    m, data = tiny_net(), batches([4, 4, 4])
    before = [x.clone() for x in data]
    calibrate(m, data, max_samples=None, progress=False, cuda_graphs=True)
    assert all(torch.equal(x, y) for x, y in zip(data, before, strict=True))
    assert fake_graphs["fake"].replays == 2


def test_a_batch_of_another_shape_between_replays_runs_eagerly(fake_graphs) -> None:
    m, data = tiny_net(), batches([4, 4, 2, 4, 2])
    eager = calibrate(m, data, max_samples=None, progress=False)
    replayed = calibrate(m, data, max_samples=None, progress=False, cuda_graphs=True)
    assert fake_graphs["fake"].replays == 2  # the second 4 (captured) and the third
    assert_same_stats(replayed, eager)


def test_a_sample_cap_cuts_the_last_batch_which_then_runs_eagerly(fake_graphs) -> None:
    m, data = tiny_net(), batches([4, 4, 4, 4])
    eager = calibrate(m, data, max_samples=14, progress=False)
    replayed = calibrate(m, data, max_samples=14, progress=False, cuda_graphs=True)
    assert fake_graphs["fake"].replays == 2 and replayed.num_images == 14
    assert_same_stats(replayed, eager)


def test_a_failed_capture_warns_restores_the_counts_and_goes_on_eagerly(fake_graphs) -> None:
    """A capture error (here the one a host sync raises) costs nothing but the graphs:
    the counts it advanced are taken back, the batch runs eagerly, no further capture is
    tried, and the statistics equal eager calibration's."""
    fake_graphs["fail"] = RuntimeError("operation not permitted when stream is capturing")
    m, data = tiny_net(), batches([4, 4, 4, 4])
    eager = calibrate(m, data, max_samples=None, progress=False)
    with pytest.warns(RuntimeWarning, match="capture of the forward pass failed.*"
                                            "operation not permitted"):
        replayed = calibrate(m, data, max_samples=None, progress=False, cuda_graphs=True)
    fake = fake_graphs["fake"]
    assert (fake.captures, fake.replays) == (1, 0)
    assert_same_stats(replayed, eager)


def test_a_capture_during_which_kernels_ran_is_undone(fake_graphs) -> None:
    """Kernels that ran instead of being recorded (e.g. launched on another device's stream)
    changed the sums during the capture: the runner puts the sums and counts back, warns,
    and the batch is added once, eagerly."""
    fake_graphs["runs_kernels"] = True
    m, data = tiny_net(), batches([4, 4, 4])
    eager = calibrate(m, data, max_samples=None, progress=False)
    with pytest.warns(RuntimeWarning, match="kernels ran during the capture"):
        replayed = calibrate(m, data, max_samples=None, progress=False, cuda_graphs=True)
    assert fake_graphs["fake"].replays == 0
    assert_same_stats(replayed, eager)


def test_the_static_input_keeps_the_batch_layout() -> None:
    """The captured input has the batch's strides (channels-last here, and a gapped slice),
    so the capture records the layout the warm-up compiled for."""
    acc = CovarianceAccumulator(4, 2)
    seen: list[tuple] = []

    def forward(x):
        seen.append(x.stride())
        acc.update(x)

    for x in (torch.randn(3, 4, 5, 5).contiguous(memory_format=torch.channels_last),
              torch.randn(3, 8, 5, 5)[:, ::2]):
        seen.clear()
        run = graphs.ForwardReplay(forward, [acc], capture=FakeCapture([acc]))
        run(x)  # warm-up, then the capture
        run(x)
        assert run.replays == 1 and seen[0] == seen[1] == x.stride()


def test_forward_replay_reports_its_replays_and_failure() -> None:
    """The runner on its own: a capture that raises is recorded in ``failure``."""
    acc = CovarianceAccumulator(4, 2)

    def forward(x):
        acc.update(x)

    run = graphs.ForwardReplay(forward, [acc],
                               capture=FakeCapture([acc], RuntimeError("no graphs here")))
    x = torch.randn(3, 4)
    run(x)
    with pytest.warns(RuntimeWarning, match="no graphs here"):
        run(x)
    run(x)
    assert run.failure == "RuntimeError: no graphs here" and run.replays == 0
    assert acc.count == 9
    ref = CovarianceAccumulator(4, 2)
    for _ in range(3):
        ref.update(x)
    assert torch.equal(acc.gram_u, ref.gram_u) and torch.equal(acc.gram_v, ref.gram_v)


# ------------------------------------------------------------------------ the defaults
def test_on_cpu_cuda_graphs_is_ignored() -> None:
    """Without the monkeypatch, a CPU device never records graphs: plain eager calibration."""
    m, data = tiny_net(), batches([4, 4, 4])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # what a capture failure warns
        a = calibrate(m, data, max_samples=None, progress=False, cuda_graphs=True)
    assert_same_stats(a, calibrate(m, data, max_samples=None, progress=False))


def test_cuda_graphs_is_off_by_default() -> None:
    import inspect

    assert inspect.signature(calibrate).parameters["cuda_graphs"].default is False


@pytest.mark.parametrize("bad", ["yes", 1, None])
def test_cuda_graphs_must_be_a_bool(bad) -> None:
    with pytest.raises(TypeError, match="cuda_graphs must be True or False"):
        calibrate(tiny_net(), batches([2]), progress=False, cuda_graphs=bad)


def test_cuda_graphs_and_overlap_are_exclusive() -> None:
    with pytest.raises(ValueError, match="overlap=True and cuda_graphs=True"):
        calibrate(tiny_net(), batches([2]), progress=False, cuda_graphs=True, overlap=True)


def test_count_samples_checks_its_argument() -> None:
    acc = CovarianceAccumulator(4, 2)
    acc.count_samples(5)
    acc.count_samples(-2)
    assert acc.count == 3
    with pytest.raises(ValueError, match="cannot drop by 4"):
        acc.count_samples(-4)
    with pytest.raises(TypeError, match="must be an int"):
        acc.count_samples(1.0)
    assert acc.count == 3


# --------------------------------------------------------- cuda_capture's control flow
class _FakeCudaAPI:
    """Stand-ins for the ``torch.cuda`` calls :func:`graphs.cuda_capture` makes, recording
    them in order: it runs here without a GPU (the real capture runs in the CUDA tests)."""

    def __init__(self, end_fails: bool = False) -> None:
        self.log: list[str] = []
        self.current = "caller"
        self.end_fails = end_fails
        api = self

        class Stream:
            def __init__(self) -> None:
                self.name = "side"

            def wait_stream(self, other) -> None:
                api.log.append(f"side waits for {other}")

        class Graph:
            def capture_begin(self) -> None:
                api.log.append(f"begin on {api.current}")

            def capture_end(self) -> None:
                api.log.append(f"end on {api.current}")
                if api.end_fails:
                    raise RuntimeError("capture invalidated")

            def reset(self) -> None:
                api.log.append("reset")

            def replay(self) -> None:
                api.log.append("replay")

        @contextlib.contextmanager
        def stream(s):
            before, api.current = api.current, s.name
            yield
            api.current = before

        def set_stream(s) -> None:
            api.log.append(f"set {s}")
            api.current = s

        def forbidden(name):
            def call(*_a, **_k):
                raise AssertionError(f"cuda_capture called torch.cuda.{name}")
            return call

        self.patches = {"current_stream": lambda: self.current, "Stream": Stream,
                        "CUDAGraph": Graph, "stream": stream, "set_stream": set_stream,
                        "synchronize": forbidden("synchronize"),
                        "empty_cache": forbidden("empty_cache"),
                        "graph": forbidden("graph")}


@pytest.fixture
def fake_cuda(monkeypatch):
    def make(**kw) -> _FakeCudaAPI:
        api = _FakeCudaAPI(**kw)
        for name, value in api.patches.items():
            monkeypatch.setattr(torch.cuda, name, value, raising=False)
        return api
    return make


def test_cuda_capture_records_on_a_side_stream_without_emptying_caches(fake_cuda) -> None:
    """The capture begins and ends on a side stream that first waits for the caller's, runs
    ``fn`` in between, returns the graph's replay and leaves the caller's stream current —
    without ``torch.cuda.graph``'s device synchronisation and cache emptying (which would
    make calibration pin its statistics' host buffers anew)."""
    api = fake_cuda()
    replay = graphs.cuda_capture(lambda: api.log.append(f"fn on {api.current}"))
    assert api.log == ["side waits for caller", "begin on side", "fn on side", "end on side"]
    assert api.current == "caller"
    replay()
    assert api.log[-1] == "replay"


@pytest.mark.parametrize("end_fails", [False, True])
def test_cuda_capture_failure_raises_fn_error_and_restores_the_stream(fake_cuda,
                                                                     end_fails) -> None:
    """``fn`` fails mid-capture: the capture is ended (an invalidated one may fail to end:
    that error is not the one raised), the partial graph freed, the caller's stream made
    current again, and ``fn``'s own error raised — ForwardReplay's fallback names it."""
    api = fake_cuda(end_fails=end_fails)

    def fn() -> None:
        raise ValueError("synchronised inside the capture")

    with pytest.raises(ValueError, match="synchronised inside the capture"):
        graphs.cuda_capture(fn)
    assert api.log[-3:] == ["end on side", "set caller", "reset"]
    assert api.current == "caller"


# ------------------------------------------------------------------------------- CUDA
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class HostSync(nn.Module):
    """Reads a value back to the host in its forward: not capturable."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.abs().max().item() < 0:  # never true; the .item() is the point
            raise AssertionError
        return x


def _cold_caches() -> None:
    """Forget compiled launches and device tile tables, so the graphed run meets them cold
    (its warm-up must create them before the capture: a tile table is a host-to-device
    copy, which a capture forbids)."""
    from cobkern.kernels import _launch, covariance

    covariance.tile_table.cache_clear()
    _launch.clear_cache()


@cuda
@pytest.mark.parametrize("channels_last", [False, True])
def test_cuda_graphs_give_the_statistics_of_eager_calibration(channels_last: bool) -> None:
    """Real CUDA graphs (VGG-16 TSRA, width 1/8, float32): the same kernels on the same
    data give the same activations and the same float32 partial sums per sample chunk.
    Only the order in which the chunks' float64 atomic adds land differs from run to run:
    each entry takes ~10³ adds (6 batches × its chunks), each rounding by at most 2^-53 of
    the running sum, ~1e-13 of the largest entry in all; the bound, 1e-11 of each matrix's
    largest entry, leaves a factor 100."""
    from cobkern.models import vgg16_tsra

    model = vgg16_tsra(width=0.125).cuda().eval()
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(32, 3, 32, 32, generator=g).cuda() for _ in range(5)]
    data.append(torch.randn(8, 3, 32, 32, generator=g).cuda())
    _cold_caches()
    stream = torch.cuda.current_stream()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the capture must succeed
        replayed = calibrate(model, data, max_samples=None, progress=False,
                             channels_last=channels_last, cuda_graphs=True)
    assert torch.cuda.current_stream() == stream
    eager = calibrate(model, data, max_samples=None, progress=False,
                      channels_last=channels_last)
    assert list(replayed.layers) == list(eager.layers)
    for name in eager.layers:
        a, b = replayed[name], eager[name]
        assert a.count == b.count
        for p, q in zip((a.gram_u, a.gram_v, a.sum_abs, a.sum_sq),
                        (b.gram_u, b.gram_v, b.sum_abs, b.sum_sq), strict=True):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-11 * q.abs().max().item())


@cuda
def test_cuda_graphs_fall_back_for_a_model_that_syncs() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), HostSync(), RMSNormTSRA(8, split=3),
                          nn.AvgPool2d(2), nn.Flatten(), nn.Linear(8 * 4 * 4, 4)).cuda().eval()
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(16, 3, 8, 8, generator=g).cuda() for _ in range(4)]
    eager = calibrate(model, data, max_samples=None, progress=False)
    stream = torch.cuda.current_stream()
    with pytest.warns(RuntimeWarning, match="capture of the forward pass failed"):
        replayed = calibrate(model, data, max_samples=None, progress=False, cuda_graphs=True)
    assert torch.cuda.current_stream() == stream  # not left on the capture stream
    for name in eager.layers:
        assert replayed[name].count == eager[name].count
        # the same eager computation twice: float64 atomic order only (see above)
        torch.testing.assert_close(replayed[name].gram_u, eager[name].gram_u,
                                   rtol=0, atol=1e-11 * eager[name].gram_u.abs().max().item())


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_cuda_graphs_on_a_gpu_that_is_not_the_current_one() -> None:
    """A model on ``cuda:1`` while ``cuda:0`` is current is captured and replayed on its own
    GPU: the statistics of eager calibration, no fallback."""
    from cobkern.models import vgg16_tsra

    torch.cuda.set_device(0)
    model = vgg16_tsra(width=0.125).to("cuda:1").eval()
    g = torch.Generator().manual_seed(2)
    data = [torch.randn(16, 3, 32, 32, generator=g).to("cuda:1") for _ in range(4)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        replayed = calibrate(model, data, max_samples=None, progress=False, cuda_graphs=True)
    eager = calibrate(model, data, max_samples=None, progress=False)
    for name in eager.layers:
        assert replayed[name].count == eager[name].count
        q = eager[name].gram_u
        torch.testing.assert_close(replayed[name].gram_u, q, rtol=0,
                                   atol=1e-11 * q.abs().max().item())
