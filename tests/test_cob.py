"""CoB layer discovery, calibration, statistics I/O and the rotation merge.

Function-preservation tolerance: the merged model computes the same function in exact
arithmetic; in float32 the rotated weights and activations carry ~1e-7 relative round-off
per operation through a few layers, so we allow 1e-4 relative (max |Δ| / max |logit|) on
the logits, as the issue states. In float64, 1e-10.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from cobkern.cob import (
    CalibrationStats,
    LayerStats,
    calibrate,
    find_cob_layers,
    rotate_model,
)
from cobkern.cob.discovery import select_layers
from cobkern.cob.rotate import ROTATION_MARK
from cobkern.nn import TSRA, RMSNorm, RMSNormTSRA
from cobkern.ops import use_backend
from cobkern.ops.covariance import subspace_moments_reference

LOGIT_RTOL = 1e-4


def small_net(fused: bool = True, spatial_out: int = 2) -> nn.Sequential:
    """conv→(RMSNorm)TSRA→pool ×2 → flatten (S = spatial_out²) → linear→TSRA→linear."""

    def block(cin, cout, split=None):
        if fused:
            return [nn.Conv2d(cin, cout, 3, padding=1), RMSNormTSRA(cout, split=split)]
        return [nn.Conv2d(cin, cout, 3, padding=1), RMSNorm(cout), TSRA(cout, split=split)]

    return nn.Sequential(
        *block(3, 8), nn.AvgPool2d(2),
        *block(8, 6, split=2), nn.AvgPool2d(2), nn.Dropout(0.5),
        nn.Flatten(), nn.Linear(6 * spatial_out**2, 20), TSRA(20, split=7), nn.Dropout(0.5),
        nn.Identity(), nn.Linear(20, 5),
    )


def batches(n_batches=3, n=8, hw=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 3, hw, hw, generator=g), torch.randint(0, 5, (n,), generator=g))
            for _ in range(n_batches)]


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def train_briefly(model, data, steps=12):
    """A few Adam steps so that weights are no longer at their random init."""
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for i in range(steps):
        x, y = data[i % len(data)]
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model


# ------------------------------------------------------------------------- discovery
@pytest.mark.parametrize("fused", [True, False])
def test_discovery_small_net(fused):
    m = small_net(fused)
    layers = find_cob_layers(m)
    assert [lay.name for lay in layers] == (["0", "3", "8"] if fused else ["0", "4", "10"])
    assert [lay.num_channels for lay in layers] == [8, 6, 20]
    assert [lay.split for lay in layers] == [4, 2, 7]
    assert [lay.spatial for lay in layers] == [1, 4, 1]  # conv→flatten→linear: S = 2·2
    assert layers[-1].consumer is m[-1]  # the logits layer is a consumer, never a producer
    if not fused:
        assert len(layers[0].norms) == 1 and len(layers[0].tsra) == 1


@pytest.mark.parametrize("bad", [nn.ReLU(), nn.MaxPool2d(1), nn.BatchNorm2d(8)])
def test_discovery_refuses_non_commuting_module(bad):
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), RMSNormTSRA(8), bad,
                      nn.Conv2d(8, 4, 1))
    with pytest.raises(ValueError, match=rf"'2' \(torch\.nn\.{type(bad).__name__}\)"):
        find_cob_layers(m)


def test_discovery_names_torch_rmsnorm_apart_from_cobkerns():
    """torch.nn.RMSNorm (a learned per-channel gain: no rotation commutes with it) was refused
    as "(RMSNorm) ... CoB needs only [..., 'RMSNorm', ...]": the message named both classes
    alike. Classes are named by their public path now."""
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.RMSNorm(8), TSRA(8), nn.Conv2d(8, 4, 1))
    with pytest.raises(ValueError, match=r"'1' \(torch\.nn\.RMSNorm\).*'cobkern\.nn\.RMSNorm'"):
        find_cob_layers(m)


def test_discovery_nested_and_vgg():
    outer = nn.Sequential(nn.Sequential(nn.Linear(4, 6), TSRA(6)), nn.Sequential(nn.Linear(6, 2)))
    (lay,) = find_cob_layers(outer)
    assert (lay.name, lay.activation_name, lay.consumer_name) == ("0.0", "0.1", "1.0")
    models = pytest.importorskip("cobkern.models")
    if not hasattr(models, "vgg16_tsra"):
        pytest.skip("cobkern.models.vgg16_tsra not available yet")
    vgg = models.vgg16_tsra(width=1 / 16)
    layers = find_cob_layers(vgg)
    assert len(layers) == 15  # 13 conv blocks + 2 hidden linears, never the logits
    assert all(isinstance(lay.producer, nn.Conv2d) for lay in layers[:13])
    assert all(isinstance(lay.producer, nn.Linear) for lay in layers[13:])
    assert layers[12].spatial == 1 and layers[12].consumer is layers[13].producer


# ------------------------------------------------------------------------- calibration
def test_calibrate_matches_materialized_reference():
    """Streaming sums == the moments of all hooked activations concatenated."""
    torch.manual_seed(0)
    m = small_net().double().eval()
    data = batches()
    acts = {}
    hooks = [lay.activation.register_forward_hook(
        lambda mod, i, o, n=lay.name: acts.setdefault(n, []).append(o))
        for lay in find_cob_layers(m)]
    with torch.no_grad():
        for x, _ in data:
            m(x.double())
    for h in hooks:
        h.remove()
    stats = calibrate(m, [(x.double(), y) for x, y in data], progress=False)
    assert stats.num_images == 24
    for lay in find_cob_layers(m):
        a = torch.cat(acts[lay.name])
        ref = subspace_moments_reference(a, lay.split)
        s = stats[lay.name]
        assert s.count == a.numel() // a.shape[1]  # every spatial position is a sample
        for got, want in zip((s.gram_u, s.gram_v, s.sum_abs, s.sum_sq), ref, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_calibrate_max_samples_and_plain_tensors():
    m = small_net().eval()
    xs = [x for x, _ in batches(n_batches=4, n=5)]
    with use_backend("reference"):
        st = calibrate(m, xs, max_samples=12, progress=False)
        st_first = calibrate(m, [torch.cat(xs)[:12]], progress=False)
    assert st.num_images == 12
    assert st["0"].count == 12 * 8 * 8
    # float32 convolutions of differently composed batches differ in the last bits
    torch.testing.assert_close(st["3"].gram_u, st_first["3"].gram_u, rtol=1e-6, atol=0)
    assert m.training is False


def test_calibrate_kernel_path_matches_reference():
    """The same calibration through the Triton kernel (interpreter on CPU) and the reference."""
    torch.manual_seed(0)
    m = small_net().eval()
    data = batches(n_batches=2)
    with use_backend("reference"):
        ref = calibrate(m, data, progress=False)
    with use_backend("auto"):  # interpreter when TRITON_INTERPRET=1, CUDA kernel on GPU
        got = calibrate(m, data, progress=False)
    for n in ref.layers:
        for a, b in zip((got[n].gram_u, got[n].gram_v, got[n].sum_abs, got[n].sum_sq),
                        (ref[n].gram_u, ref[n].gram_v, ref[n].sum_abs, ref[n].sum_sq),
                        strict=True):
            # float32 activations, float32 Kahan tiles vs float64 sums: a few ulps
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


def test_calibrate_fp64_products_match_reference_to_float64(device):
    """``f32_dot="fp64"``: the kernel's float32 products exact and summed in float64, so the
    statistics equal float64 sums of the very float32 activations the forward produced
    (kept by hooks) to float64 round-off — 1e-12 relative, where the IEEE kernel is a few
    float32 ulps — and they say so: accumulation "float64", which gives the lossless rule
    the float64 tolerance."""
    from cobkern.pruning.strategy import DEFAULT_RANK_TOL

    torch.manual_seed(0)
    m = small_net().eval().to(device)
    data = [(x.to(device), y) for x, y in batches(n_batches=2)]
    acts: dict[str, list[torch.Tensor]] = {}
    layers = find_cob_layers(m)
    hooks = [lay.activation.register_forward_hook(
        lambda mod, i, o, n=lay.name: acts.setdefault(n, []).append(o.detach().double()))
        for lay in layers]
    try:
        with use_backend("triton"):
            got = calibrate(m, data, progress=False, f32_dot="fp64")
    finally:
        for h in hooks:
            h.remove()
    assert got.meta.get("f32_dot") == "fp64"
    for lay in layers:
        s = got[lay.name]
        assert s.accumulation == "float64"
        assert DEFAULT_RANK_TOL[s.accumulation] == 1e-10
        ref = subspace_moments_reference(torch.cat(acts[lay.name]), lay.split,
                                         accum_dtype=torch.float64)
        for a, b in zip((s.gram_u, s.gram_v, s.sum_abs, s.sum_sq), ref, strict=True):
            torch.testing.assert_close(a.cpu(), b.cpu(), rtol=1e-12,
                                       atol=1e-12 * b.abs().max().item())


def test_calibrate_overlap_matches_serial(device):
    """``overlap=True`` (the covariance kernels on a side stream, CUDA only; ignored on a CPU)
    computes the same statistics: float64 sums of the same float32 tiles, added in another
    order at most, so 1e-12 relative."""
    torch.manual_seed(0)
    m = small_net().eval().to(device)
    data = [(x.to(device), y) for x, y in batches(n_batches=5)]
    serial = calibrate(m, data, progress=False)
    overlapped = calibrate(m, data, progress=False, overlap=True)
    assert overlapped.num_images == serial.num_images
    for n in serial.layers:
        a, b = serial[n], overlapped[n]
        assert a.count == b.count
        for x, y in zip((a.gram_u, a.gram_v, a.sum_abs, a.sum_sq),
                        (b.gram_u, b.gram_v, b.sum_abs, b.sum_sq), strict=True):
            torch.testing.assert_close(y, x, rtol=1e-12, atol=1e-12 * x.abs().max().item())


def test_calibrate_f32_dot_reaches_every_kernel_launch(device, request):
    """``calibrate(f32_dot=...)`` picks the covariance kernel's float32 products (the faster
    tensor-core modes); every launch must get it — not the module default — and the
    statistics must say which products made them. ``tf32x3`` is one the interpreter runs;
    its Gram stays within 1e-5 of IEEE's here (three TF32 products, ~1e-7 relative error
    per product, far inside it). A bad name is refused before any work."""
    torch.manual_seed(0)
    m = small_net().eval().to(device)
    data = [(x.to(device), y) for x, y in batches(n_batches=2)]
    ieee = calibrate(m, data, progress=False)
    seen = request.getfixturevalue("f32_dot_launches")  # spying from here on
    got = calibrate(m, data, progress=False, f32_dot="tf32x3")
    assert seen and set(seen) == {"tf32x3"}
    assert got.meta["f32_dot"] == "tf32x3" and "f32_dot" not in ieee.meta
    for n in ieee.layers:
        torch.testing.assert_close(got[n].gram_u, ieee[n].gram_u, rtol=1e-5,
                                   atol=1e-5 * ieee[n].gram_u.abs().max().item())
    with pytest.raises(ValueError, match="f32_dot must be one of"):
        calibrate(m, data, progress=False, f32_dot="fp16")
    # the reference path (a CPU's default) ignores f32_dot: the statistics recorded it
    # anyway, and the report then stated float32 products no kernel had used
    with use_backend("reference"):
        assert "f32_dot" not in calibrate(m, data, progress=False, f32_dot="tf32x3").meta


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_calibrate_channels_last_feeds_nhwc_activations(device, backend, monkeypatch):
    """``channels_last=True`` puts the input batches in channels-last format, so every conv
    activation reaches the accumulator channel-contiguous (the layout whose float32 Gram
    products read conflict-free vectors from shared memory) without a copy, and the
    statistics equal NCHW calibration's. Tolerance: the two layouts' convolutions are
    different kernels with float32 round-off (~1e-7 relative per product, summed over 27–54
    terms), so the Grams agree to 1e-5 of their largest entry, not bit for bit."""
    from cobkern.ops.covariance import CovarianceAccumulator

    torch.manual_seed(0)
    m = small_net().eval().to(device)
    data = [(x.to(device), y) for x, y in batches(n_batches=2)]
    layouts: list[tuple[int, bool]] = []
    original = CovarianceAccumulator.update

    def spy(self, x):
        if x.dim() == 4:
            layouts.append((x.shape[1], x.is_contiguous(memory_format=torch.channels_last)
                            and not x.is_contiguous()))
        return original(self, x)

    with use_backend(backend):
        nchw = calibrate(m, data, progress=False)
        monkeypatch.setattr(CovarianceAccumulator, "update", spy)
        nhwc = calibrate(m, data, progress=False, channels_last=True)
    assert layouts and all(cl for _, cl in layouts), layouts
    assert all(p.is_contiguous() for p in m.parameters())  # the model was not converted
    assert nhwc.num_images == nchw.num_images
    for n in nchw.layers:
        a, b = nchw[n], nhwc[n]
        assert a.count == b.count and a.accumulation == b.accumulation
        for x, y in zip((a.gram_u, a.gram_v, a.sum_abs, a.sum_sq),
                        (b.gram_u, b.gram_v, b.sum_abs, b.sum_sq), strict=True):
            torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-5 * x.abs().max().item())
    with pytest.raises(TypeError, match="channels_last must be True or False"):
        calibrate(m, data, progress=False, channels_last="yes")


def test_stats_eigh_save_load(tmp_path):
    m = small_net().eval()
    with use_backend("reference"):
        st = calibrate(m, batches(), progress=False, meta={"source": "test"})
    s = st["0"]
    e = s.eigh()
    assert torch.all(e.values_u[:-1] >= e.values_u[1:])  # descending
    r = e.vectors_u  # rows are eigenvectors: R G Rᵀ = diag(λ)
    torch.testing.assert_close(r @ s.gram_u @ r.T, torch.diag(e.values_u), rtol=0,
                               atol=1e-10 * e.values_u[0].item())
    torch.testing.assert_close(r @ r.T, torch.eye(4, dtype=torch.float64), rtol=0, atol=1e-12)
    path = tmp_path / "stats.pt"
    st.save(path)
    back = CalibrationStats.load(path)
    assert list(back.layers) == list(st.layers) and back.num_images == st.num_images
    assert back.meta == {"source": "test"}
    for n in st.layers:
        assert torch.equal(back[n].gram_v, st[n].gram_v) and back[n].count == st[n].count
        assert back[n].accumulation == st[n].accumulation == "float64"  # reference path
    bad = tmp_path / "bad.pt"
    torch.save({"x": 1}, bad)
    with pytest.raises(ValueError, match="not a cobkern"):
        CalibrationStats.load(bad)


def test_statistics_record_the_kernel_precision(device):
    """float32 activations through the Triton kernel (natively or interpreted) give
    float32-accumulated sums; the lossless default tolerance depends on it."""
    m = small_net().eval().to(device)
    with use_backend("triton"):
        st = calibrate(m, [(x.to(device), y) for x, y in batches()], progress=False)
    assert {s.accumulation for s in st.layers.values()} == {"float32"}
    assert st["0"].rotated().accumulation == "float32"


# ------------------------------------------------------------------------- rotation
@pytest.mark.parametrize("trained", [False, True])
@pytest.mark.parametrize("fused", [True, False])
def test_rotation_preserves_function(trained, fused):
    torch.manual_seed(0)
    m = small_net(fused)
    data = batches()
    with use_backend("reference"):
        if trained:
            train_briefly(m, data)
        m.eval()
        st = calibrate(m, data, progress=False)
        x = torch.randn(16, 3, 8, 8)
        y0 = m(x)
        res = rotate_model(m, st)
        y1 = m(x)
        assert rel_err(y1, y0) <= LOGIT_RTOL
        # the rotated model's statistics are diagonal with the eigenvalues on the diagonal
        st2 = calibrate(m, data, progress=False)
    for n, r in res.rotations.items():
        s2, e = st2[n], st[n].eigh()
        assert torch.equal(r, e.rotation())
        scale = e.values.max().item()
        torch.testing.assert_close(s2.sum_sq, e.values, rtol=0, atol=1e-4 * scale)
        off = s2.gram_u - torch.diag(torch.diag(s2.gram_u))
        assert off.abs().max() <= 1e-4 * scale


def test_rotation_float64_and_vgg():
    torch.manual_seed(0)
    m = small_net().double().eval()
    data = [(x.double(), y) for x, y in batches()]
    st = calibrate(m, data, progress=False)
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    y0 = m(x)
    rotate_model(m, st)
    assert rel_err(m(x), y0) <= 1e-10
    models = pytest.importorskip("cobkern.models")
    if not hasattr(models, "vgg16_tsra"):
        pytest.skip("cobkern.models.vgg16_tsra not available yet")
    vgg = models.vgg16_tsra(width=1 / 16).eval()
    imgs = [torch.randn(8, 3, 32, 32) for _ in range(2)]
    with use_backend("reference"):
        st = calibrate(vgg, imgs, progress=False)
        x = torch.randn(4, 3, 32, 32)
        y0 = vgg(x)
        rotate_model(vgg, st)
        assert rel_err(vgg(x), y0) <= LOGIT_RTOL


def test_rotation_errors():
    m = small_net().eval()
    with use_backend("reference"):
        st = calibrate(m, batches(), progress=False)
        other = small_net()
        other[3] = nn.Conv2d(8, 7, 3, padding=1)
        other[4] = RMSNormTSRA(7)
        other[8] = nn.Linear(28, 20)
        with pytest.raises(ValueError, match="another"):
            rotate_model(other, st)
        with pytest.raises(ValueError, match="not CoB layers"):
            rotate_model(m, st, layers=["0", "nope"])
        with pytest.raises(ValueError, match="un-rotated"):
            rotate_model(m, st.rotated())


# ------------------------------------------------------- what discovery and calibration refuse
def test_discovery_skips_a_relu_head_after_a_tsra_trunk():
    """A chain with no TSRA is not a CoB layer, whatever lies in it: a ReLU MLP head must
    not make the TSRA trunk unusable."""
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), RMSNormTSRA(8), nn.AvgPool2d(2),
                      nn.Flatten(), nn.Linear(8 * 16, 12), nn.ReLU(), nn.Linear(12, 5)).eval()
    assert [lay.name for lay in find_cob_layers(m)] == ["0"]
    with use_backend("reference"):
        st = calibrate(m, batches(), progress=False)
        x = batches(1, seed=7)[0][0]
        y0 = m(x)
        rotate_model(m, st)
        assert rel_err(m(x), y0) <= LOGIT_RTOL


def test_discovery_refuses_a_partial_flatten():
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), RMSNormTSRA(4), nn.Flatten(2),
                      nn.Linear(64, 5))
    with pytest.raises(ValueError, match=r"Flatten '2' has start_dim=2"):
        find_cob_layers(m)


@pytest.mark.parametrize("where", ["producer", "consumer"])
@pytest.mark.parametrize("how", ["parametrization", "legacy"])
def test_discovery_refuses_parametrized_weights(where, how):
    """A weight_norm'd weight is recomputed on every access: a rotation written into it
    would be lost silently (the function would change)."""
    m = nn.Sequential(nn.Linear(4, 6), TSRA(6), nn.Linear(6, 2))
    idx = 0 if where == "producer" else 2
    if how == "parametrization":
        m[idx] = torch.nn.utils.parametrizations.weight_norm(m[idx])
        expected = "a parametrization"
    else:
        with pytest.warns(FutureWarning):
            m[idx] = torch.nn.utils.weight_norm(m[idx])
        expected = "WeightNorm"
    with pytest.raises(ValueError, match=rf"'{idx}'.*computed by {expected}"):
        find_cob_layers(m)


def test_calibrate_refuses_a_linear_consumer_on_another_axis():
    """Conv→TSRA→Linear without a flatten: the linear acts on the width axis of the NCHW
    map, not on the channels, so no rotation of the channels can be merged into it."""
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), RMSNormTSRA(4), nn.Linear(8, 5))
    with use_backend("reference"), pytest.raises(ValueError, match=r"'2'.*4-D input"):
        calibrate(m, batches(), progress=False)
    assert not m[2]._forward_pre_hooks and not m[1]._forward_hooks  # hooks removed


def test_calibrate_refuses_layers_the_forward_never_runs():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Sequential(nn.Linear(4, 6), TSRA(6), nn.Linear(6, 2))
            self.unused = nn.Sequential(nn.Linear(2, 6), TSRA(6), nn.Linear(6, 2))

        def forward(self, x):
            return self.used(x)

    with use_backend("reference"), pytest.raises(ValueError, match=r"\['unused.0'\] never ran"):
        calibrate(Branchy(), [torch.randn(8, 4)], progress=False)


def test_select_layers_refuses_repeated_names():
    m = small_net()
    with pytest.raises(ValueError, match=r"\['0'\] are listed more than once"):
        select_layers(m, ["0", "3", "0"])


def test_rotation_refuses_statistics_of_a_partly_matching_model():
    """Statistics of another model whose layer names only partly overlap are refused, not
    applied to the overlap."""
    a = nn.Sequential(nn.Linear(4, 6), TSRA(6), nn.Linear(6, 6), TSRA(6), nn.Linear(6, 2))
    b = nn.Sequential(nn.Linear(4, 6), TSRA(6), nn.Dropout(), nn.Linear(6, 6), TSRA(6),
                      nn.Linear(6, 2))
    with use_backend("reference"):
        st = calibrate(a, [torch.randn(16, 4)], progress=False)
    with pytest.raises(ValueError, match=r"layers \['2'\] that are not CoB layers"):
        rotate_model(b, st)


def test_stats_save_converts_or_refuses_metadata(tmp_path):
    """Every file ``save`` writes must load (``weights_only=True``): paths and numpy scalars
    become plain values; anything else is refused before a file is written."""
    np = pytest.importorskip("numpy")
    m = small_net().eval()
    with use_backend("reference"):
        st = calibrate(m, batches(1), progress=False,
                       meta={"root": tmp_path, "t": np.float64(0.5), "pair": (1, 2),
                             "device": torch.device("cpu")})
    st.save(tmp_path / "s.pt")
    back = CalibrationStats.load(tmp_path / "s.pt")
    assert back.meta == {"root": str(tmp_path), "t": 0.5, "pair": (1, 2),
                         "device": torch.device("cpu")}
    assert type(back.meta["t"]) is float
    # a namedtuple failed in save (TypeError from its constructor); a (str, Enum) member was
    # saved as its name "Mode.AUG", not its value
    import collections
    import enum

    class Mode(str, enum.Enum):
        AUG = "aug"

    pair = collections.namedtuple("Pair", "a b")
    st.meta.update(nt=pair(1, np.int64(2)), mode=Mode.AUG, size=torch.Size([2, 3]))
    st.save(tmp_path / "s2.pt")
    back = CalibrationStats.load(tmp_path / "s2.pt").meta
    assert back["nt"] == (1, 2) and type(back["nt"]) is tuple
    assert back["mode"] == "aug" and type(back["mode"]) is str
    assert back["size"] == torch.Size([2, 3])
    for k in ("nt", "mode", "size"):
        del st.meta[k]
    st.meta["bad"] = object()
    with pytest.raises(TypeError, match=r"meta\['bad'\] is a object"):
        st.save(tmp_path / "bad.pt")
    assert not (tmp_path / "bad.pt").exists()


def test_stats_load_names_a_damaged_file(tmp_path):
    m = small_net().eval()
    with use_backend("reference"):
        st = calibrate(m, batches(1), progress=False)
    path = tmp_path / "s.pt"
    st.save(path)
    data = path.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut\.pt: cannot read calibration statistics"):
        CalibrationStats.load(tmp_path / "cut.pt")
    torch.save({"format": "cobkern.calibration_stats/1", "layers": [{"name": "0"}]},
               tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"bad\.pt: malformed calibration statistics"):
        CalibrationStats.load(tmp_path / "bad.pt")
    with pytest.raises(FileNotFoundError, match="no calibration statistics"):
        CalibrationStats.load(tmp_path / "missing.pt")
    # a file that is no torch file at all: one line, not torch's weights_only=False advice
    (tmp_path / "notes.pt").write_text('{"not": "a torch file"}')
    with pytest.raises(ValueError, match=r"notes\.pt: not a cobkern calibration-statistics "
                                         r"file \(not a torch file") as err:
        CalibrationStats.load(tmp_path / "notes.pt")
    assert "weights_only" not in str(err.value)


# ------------------------------------------------------- statistics belong to their weights
def test_statistics_refuse_other_weights_of_the_same_shape(tmp_path):
    """Width and split alone cannot tell another model of the same architecture, or the
    model after rotate_model, from the calibrated one; each would select the wrong channels
    (or rotate twice) without a word. The weight fingerprint refuses them, and accepts the
    same weights after a save/load of the statistics or a cast to bfloat16."""
    torch.manual_seed(0)
    m = small_net().eval()
    with use_backend("reference"):
        st = calibrate(m, batches(), progress=False)
        other = small_net().eval()  # same shapes, other random weights
        with pytest.raises(ValueError, match="other weights"):
            rotate_model(other, st)
        st.save(tmp_path / "s.pt")
        loaded = CalibrationStats.load(tmp_path / "s.pt")
        assert loaded["0"].fingerprint is not None
        torch.testing.assert_close(loaded["0"].fingerprint, st["0"].fingerprint)
        rotate_model(copy.deepcopy(m).to(torch.bfloat16), loaded)  # same weights, rounded
        rotated = copy.deepcopy(m)
        res = rotate_model(rotated, loaded)
        with pytest.raises(ValueError, match="already rotated"):
            rotate_model(rotated, st)  # a second rotation with the original statistics
        # the rotated statistics belong to the rotated weights, and only to them
        res.stats.check_matches(find_cob_layers(rotated))
        with pytest.raises(ValueError, match="other weights"):
            res.stats.check_matches(find_cob_layers(m))
        # statistics without a fingerprint (files from before it existed) are not checked
        for s in loaded:
            s.fingerprint = None
        rotate_model(other, loaded)


def test_fingerprint_checks_every_row_when_the_biases_agree():
    """The fingerprint has a weight row and a bias row, and a difference in either refuses
    the statistics. Zero-initialised biases (common) are identical across models and left
    unchanged by a rotation (R·0 = 0): then only the weight row tells the weights apart, so
    a check that looked at the bias row alone would accept other weights, or the model
    rotate_model already rotated. The weights differ by order 1 (other random init, or an
    output rotation), far above FINGERPRINT_RTOL (1e-2), so no tolerance is at stake."""
    torch.manual_seed(0)
    m = small_net().eval()
    other = small_net().eval()  # same shapes, other random weights
    with torch.no_grad():
        for mod in (*m.modules(), *other.modules()):
            if isinstance(mod, (nn.Conv2d, nn.Linear)):
                mod.bias.zero_()
    with use_backend("reference"):
        st = calibrate(m, batches(), progress=False)
        with pytest.raises(ValueError, match="other weights"):
            rotate_model(other, st)
        rotate_model(m, st)
        with pytest.raises(ValueError, match="already rotated"):
            rotate_model(m, st)


def test_a_second_rotation_is_refused_where_the_fingerprint_cannot_see_it():
    """With orthonormal rows (W Wᵀ = c·I, orthogonal init) and zero biases a rotation leaves
    the weight fingerprint as it was (R W Wᵀ Rᵀ u = c·u, R·0 = 0): rotate_model accepted the
    original statistics twice, leaving the layers out of their principal basis (a fresh
    calibration's Gram had off-diagonal entries of 4 % of its diagonal). So did statistics
    without a fingerprint. rotate_model now marks the producers it rotated. The function is
    still preserved by the first rotation (float64: round-off)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), RMSNormTSRA(6, split=2), nn.AvgPool2d(2),
                      nn.Flatten(), nn.Linear(6 * 4 * 4, 10), TSRA(10, split=4),
                      nn.Linear(10, 3)).double().eval()
    for mod in (m[0], m[4]):
        nn.init.orthogonal_(mod.weight)
        nn.init.zeros_(mod.bias)
    x = torch.randn(16, 3, 8, 8, dtype=torch.float64)
    with use_backend("reference"):
        st = calibrate(m, [x], progress=False)
        y0 = m(x)
        twin = copy.deepcopy(m)
        rotate_model(m, st)
        assert rel_err(m(x), y0) <= 1e-10
        with pytest.raises(ValueError, match="already rotated with these statistics"):
            rotate_model(m, st)
        for s in st:  # statistics without a fingerprint
            s.fingerprint = None
        with pytest.raises(ValueError, match="already rotated with these statistics"):
            rotate_model(m, st)
        # other statistics (a calibration of the rotated model) may rotate it again
        rotate_model(m, calibrate(m, [x], progress=False))
        assert rel_err(m(x), y0) <= 1e-10
        # a prune that fails after its rotation puts the weights and the marks back
        from cobkern.pruning import FixedRatio, prune

        class Boom(RuntimeError):
            pass

        class Failing(FixedRatio):
            def plan(self, *args):
                raise Boom

        with pytest.raises(Boom):
            prune(twin, st, Failing(0.5), importance="l2")
        rotate_model(twin, st)  # not rotated, so not refused
        assert rel_err(twin(x), y0) <= 1e-10


def test_fingerprint_ignores_rotations_of_the_input_channels():
    """Rotating layer l rewrites the next producer's input columns (W_next Rᵀ) without
    changing layer l+1's activations: its statistics must still be accepted."""
    torch.manual_seed(0)
    m = small_net().eval()
    with use_backend("reference"):
        st = calibrate(m, batches(), progress=False)
        x = batches(1, seed=7)[0][0]
        y0 = m(x)
        rotate_model(m, st, layers=["0"])
        rotate_model(m, st, layers=["3"])  # '3' consumes '0': its input side was rotated
        assert rel_err(m(x), y0) <= LOGIT_RTOL


# ------------------------------------------------------- modules registered at two places
def test_discovery_refuses_a_tsra_module_used_twice():
    """One TSRA object at two places: calibration would sum both places' activations into
    the first layer's statistics and pruning would change both; the second place used to
    be invisible (named_children lists a module once)."""
    act = TSRA(6)
    m = nn.Sequential(nn.Linear(4, 6), act, nn.Linear(6, 6), act, nn.Linear(6, 2))
    with pytest.raises(ValueError, match=r"\['1', '3'\] are the same TSRA module"):
        find_cob_layers(m)
    # a shared stateless module is fine, and is seen at every place it runs
    pool = nn.AvgPool2d(2)
    ok = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), RMSNormTSRA(4), pool,
                       nn.Conv2d(4, 4, 3, padding=1), RMSNormTSRA(4), pool,
                       nn.Flatten(), nn.Linear(16, 5))
    assert [lay.name for lay in find_cob_layers(ok)] == ["0", "3"]
    relu = nn.ReLU()  # used once outside any chain, then again inside one
    bad = nn.Sequential(nn.Linear(4, 6), relu, nn.Linear(6, 6), TSRA(6), relu, nn.Linear(6, 2))
    with pytest.raises(ValueError, match=r"module '4' \(torch\.nn\.ReLU\)"):
        find_cob_layers(bad)


def test_select_layers_refuses_an_empty_list_and_a_string():
    m = small_net()
    with pytest.raises(ValueError, match=r"layers=\[\] selects none"):
        select_layers(m, [])
    with pytest.raises(TypeError, match="the string '0'"):
        select_layers(m, "0")
    with pytest.raises(ValueError, match="selects none"):
        calibrate(m, batches(), layers=[], progress=False)


def test_calibrate_restores_every_module_training_flag():
    m = small_net().train()
    m[6].eval()  # a dropout frozen on purpose during fine-tuning
    with use_backend("reference"):
        calibrate(m, batches(1), progress=False)
    assert m.training and not m[6].training
    assert all(mod.training for i, mod in enumerate(m) if i != 6)


# ------------------------------------------------------- mutation-testing gaps (issue: tests)
def test_calibrate_puts_a_training_model_in_eval_mode():
    """§4.1: calibration runs in eval mode. A model handed over in train mode (dropout active
    in front of the flatten → linear layer '8') must give exactly the statistics of the same
    model in eval mode: the same float64 reference sums of the same activations, so the
    comparison is exact up to 1e-12 relative (no round-off difference is expected at all)."""
    torch.manual_seed(0)
    m = small_net().double().eval()
    data = [(x.double(), y) for x, y in batches(2)]
    with use_backend("reference"):
        want = calibrate(m, data, progress=False)
        got = calibrate(m.train(), data, progress=False)
    assert m.training  # and the caller's mode is back afterwards
    for n in want.layers:
        for a, b in zip((got[n].gram_u, got[n].gram_v, got[n].sum_abs, got[n].sum_sq),
                        (want[n].gram_u, want[n].gram_v, want[n].sum_abs, want[n].sum_sq),
                        strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=0)


def test_discovery_refuses_a_relu_between_the_producer_and_the_tsra():
    """Every module of the chain must commute with the rotation, also the ones in front of
    the TSRA (conv → ReLU → TSRA → conv), not only those after it."""
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), RMSNormTSRA(8),
                      nn.Conv2d(8, 4, 1))
    with pytest.raises(ValueError, match=r"module '1' \(torch\.nn\.ReLU\)"):
        find_cob_layers(m)


def test_eigenvalues_of_a_rank_deficient_layer_are_clamped_at_zero():
    """Linear(2 → 16, bias) → TSRA: each 8-channel subspace reaches at most 2 + 1 directions,
    so 5 of its Gram eigenvalues are zero; float64 eigh returns them as ±1e-14 round-off.
    G is PSD, so they must come back as >= 0 (exactly: a negative λ has a NaN L2 score,
    sqrt(λ), which torch.sort ranks above every real score, so fixed-ratio pruning would keep
    the dead directions and cut live ones)."""
    from cobkern.pruning import FixedRatio, compute_importance

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(2, 16), TSRA(16), nn.Linear(16, 3)).double().eval()
    with use_backend("reference"):
        st = calibrate(m, [torch.randn(64, 2, dtype=torch.float64)], progress=False)
    e = st["0"].eigh()
    assert (e.values >= 0).all()
    assert (e.values_u[3:] <= 1e-12 * e.values_u[0]).all()  # the unreachable directions
    sc = compute_importance(st, "l2", cob=True)["0"]
    assert torch.isfinite(sc.scores).all()
    keep = FixedRatio((0.5, 0.5)).select(sc)
    assert keep.u.tolist() == [0, 1, 2, 3] and keep.v.tolist() == [0, 1, 2, 3]


# ------------------------------------------------------------ audit: loader and arguments
def test_calibrate_reads_no_batch_beyond_max_samples():
    """Once ``max_samples`` images are in, the loop stops without fetching another batch:
    an iterator handed in as the loader keeps its remaining batches (the old loop fetched
    one more and dropped it), and nothing is read when the share is already full."""
    m = small_net().eval()
    xs = [x for x, _ in batches(n_batches=5, n=4)]
    fetched = []

    def loader():
        for i, x in enumerate(xs):
            fetched.append(i)
            yield x

    it = loader()
    with use_backend("reference"):
        st = calibrate(m, it, max_samples=8, progress=False)  # exactly two batches
        assert st.num_images == 8 and fetched == [0, 1]
        assert torch.equal(next(it), xs[2])  # the caller's iterator lost nothing
        fetched.clear()
        st = calibrate(m, loader(), max_samples=6, progress=False)  # the 2nd batch is cut
    assert st.num_images == 6 and fetched == [0, 1]


@pytest.mark.parametrize("bad", [1e4, 12.0, True, "12"])
def test_calibrate_refuses_a_max_samples_that_is_not_an_int(bad):
    """``max_samples=1e4`` used to be accepted and to fail only when a batch had to be cut,
    mid-pass, with "slice indices must be integers"; ``True`` counted as one image. Refused
    up front now, before any batch is read; numpy ints still pass."""
    np = pytest.importorskip("numpy")
    m = small_net().eval()
    read = []

    def loader():
        for x, _ in batches(n_batches=3, n=5):
            read.append(1)
            yield x

    with pytest.raises(TypeError, match="max_samples must be an int"):
        calibrate(m, loader(), max_samples=bad, progress=False)
    assert read == []
    with use_backend("reference"):
        assert calibrate(m, loader(), max_samples=np.int64(12), progress=False).num_images == 12


def test_calibrate_refuses_distributed_true_without_a_process_group():
    """``distributed=True`` with no initialised process group used to run the whole pass
    and only then fail in the all-reduce ("Default process group has not been
    initialized"), losing the statistics; refused before any batch now."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        pytest.skip("a process group is initialised in this process")
    read = []

    def loader():
        for x, _ in batches(n_batches=3):
            read.append(1)
            yield x

    with pytest.raises(ValueError, match="distributed=True needs an initialised"):
        calibrate(small_net().eval(), loader(), progress=False, distributed=True)
    assert read == []


def test_calibrate_never_copies_a_batch_to_the_cpu_asynchronously(monkeypatch):
    """A batch is moved to the model's device with ``non_blocking=True`` only when that is
    an accelerator. Into CPU memory a non-blocking copy from a GPU lands in pinned memory
    *after* ``to`` returns (PyTorch's non_blocking / pin_memory notes), and the CPU forward
    would read it first: a GPU-side loader with a CPU model (or ``device="cpu"``) would be
    calibrated on partly copied images. The race needs a GPU; here every ``Tensor.to`` into
    the CPU that calibrate makes is recorded and must be blocking."""
    nonblocking = []
    real_to = torch.Tensor.to

    def spy(self, *args, **kwargs):
        dev = next((a for a in (*args, kwargs.get("device"))
                    if isinstance(a, (torch.device, str))), None)
        if dev is not None and torch.device(dev).type == "cpu":
            nonblocking.append(bool(kwargs.get("non_blocking", False)))
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", spy)
    with use_backend("reference"):
        calibrate(small_net().eval(), batches(2), progress=False, device="cpu")
    assert nonblocking and not any(nonblocking)


def _flip_a_bit_of_the_first_tensor(path) -> None:
    """Flip one bit inside the first tensor's bytes of a ``torch.save`` zip (not its
    headers: the file still opens, and torch does not check the zip's CRCs)."""
    import struct
    import zipfile

    raw = bytearray(path.read_bytes())
    info = next(i for i in zipfile.ZipFile(path).infolist() if "/data/" in i.filename)
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26:
                                                   info.header_offset + 30])
    raw[info.header_offset + 30 + name_len + extra_len + 6] ^= 0x40  # a float64 exponent bit
    path.write_bytes(bytes(raw))


def test_stats_load_refuses_a_file_whose_tensors_were_damaged(tmp_path):
    """A bit flipped inside a saved Gram matrix used to load silently as other numbers (a
    Gram entry off by ~1e2 here), to be rotated and pruned with; the checksum saved with
    the statistics catches it. A file without the checksum (an older one) still loads."""
    m = small_net().eval()
    with use_backend("reference"):
        st = calibrate(m, batches(1), progress=False, meta={"source": "test"})
    path = tmp_path / "s.pt"
    st.save(path)
    assert CalibrationStats.load(path).meta == {"source": "test"}  # intact: loads
    _flip_a_bit_of_the_first_tensor(path)
    with pytest.raises(ValueError, match=r"s\.pt: .*checksum.*damaged"):
        CalibrationStats.load(path)
    old = tmp_path / "old.pt"  # the format before the checksum
    torch.save({"format": "cobkern.calibration_stats/1", "num_images": st.num_images,
                "meta": {}, "layers": [s.to_dict() for s in st.layers.values()]}, old)
    back = CalibrationStats.load(old)
    assert torch.equal(back["0"].gram_u, st["0"].gram_u)


class _ScaledLinear(nn.Linear):
    """A Linear subclass whose forward scales its output: rebuilt as a plain Linear it
    would compute another function."""

    def forward(self, x):
        return 0.5 * super().forward(x)


@pytest.mark.parametrize("where", [0, 2])
def test_discovery_refuses_a_subclass_of_linear_or_conv(where):
    """A subclass's forward may use its weight (or state of its own) in ways a rotation or
    a cut does not preserve, and pruning rebuilt such a module as a plain one: the pruned
    model computed another function even when nothing was cut."""
    m = nn.Sequential(nn.Linear(4, 6), TSRA(6), nn.Linear(6, 2))
    m[where] = _ScaledLinear(m[where].in_features, m[where].out_features)
    with pytest.raises(ValueError, match=rf"'{where}' is a .*_ScaledLinear, a subclass of "
                                         r"nn.Linear"):
        find_cob_layers(m)
    conv = nn.Sequential(nn.LazyConv2d(4, 3), RMSNormTSRA(4), nn.Conv2d(4, 2, 1))
    with pytest.raises(ValueError, match=r"'0' is an uninitialized LazyConv2d; run one "
                                         r"forward pass"):
        find_cob_layers(conv)
    conv(torch.randn(1, 3, 6, 6))  # materialized: a plain Conv2d now
    assert [lay.name for lay in find_cob_layers(conv)] == ["0"]


@pytest.mark.parametrize("where", [0, 2])
def test_rotation_and_surgery_refuse_a_weight_pruned_with_torch_nn_utils_prune(where):
    """torch.nn.utils.prune recomputes weight = weight_orig * mask before every forward: a
    rotation written into weight was overwritten (the rotated model computed another
    function) and the mask kept cutting the original channels. Calibrating such a model is
    fine; rotating or cutting it is refused, before anything changes."""
    from torch.nn.utils import prune as torch_prune

    from cobkern.pruning import FixedRatio, prune

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 6), TSRA(6), nn.Linear(6, 2))
    torch_prune.l1_unstructured(m[where], "weight", amount=0.2)
    x = torch.randn(8, 4)
    with use_backend("reference"):
        st = calibrate(m, [x], progress=False)
        y0 = m(x)
        for call, who in ((lambda: rotate_model(m, st), "rotate_model"),
                          (lambda: prune(m, st, FixedRatio((0.5, 0.5))), "rotate_model"),
                          (lambda: prune(m, st, FixedRatio((0.5, 0.5)), cob=False),
                           "apply_keep_sets")):
            with pytest.raises(ValueError, match=rf"{who}: '{where}' \(Linear\) is pruned "
                                                 r"with torch.nn.utils.prune.*prune.remove"):
                call()
            assert torch.equal(m(x), y0)
        torch_prune.remove(m[where], "weight")  # made permanent: a plain weight
        rotate_model(m, st)  # the statistics still match: the same effective weight
        assert rel_err(m(x), y0) <= LOGIT_RTOL


class _WithEmptyContainers(nn.Module):
    """conv → (empty Sequential) → RMSNormTSRA → pool → conv, with an empty ModuleList and
    ModuleDict registered between them (e.g. optional taps left unused)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.pre = nn.Sequential()
        self.act = RMSNormTSRA(6)
        self.taps = nn.ModuleList()
        self.heads = nn.ModuleDict()
        self.pool = nn.AvgPool2d(2)
        self.out = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        return self.out(self.pool(self.act(self.pre(self.conv(x)))))


def test_discovery_skips_empty_containers():
    """An empty Sequential is the identity and an empty ModuleList / ModuleDict computes
    nothing: between a producer and its consumer they do not stop the rotation (they were
    refused as modules that do not commute with it)."""
    torch.manual_seed(0)
    m = _WithEmptyContainers().double().eval()
    assert [(lay.name, lay.consumer_name) for lay in find_cob_layers(m)] == [("conv", "out")]
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    with use_backend("reference"):
        y0 = m(x)
        rotate_model(m, calibrate(m, [x], progress=False))
        assert rel_err(m(x), y0) <= 1e-10  # float64, as the module docstring states
    # a non-empty one still counts
    with pytest.raises(ValueError, match=r"'2.0' \(torch\.nn\.ReLU\)"):
        find_cob_layers(nn.Sequential(nn.Linear(4, 6), TSRA(6), nn.Sequential(nn.ReLU()),
                                      nn.Linear(6, 2)))


@pytest.mark.parametrize("fused", [True, False])
def test_a_last_axis_tsra_between_two_linears_is_a_cob_layer(fused):
    """Between two Linear modules the activation is (N, C): dim=-1 is the channel axis, so
    the layer rotates (function kept) like dim=1; on a conv's (N, C, H, W) output dim=-1 is
    the width and stays refused, as does a Flatten between the linears."""
    torch.manual_seed(0)
    acts = [RMSNormTSRA(6, split=2, dim=-1)] if fused else [RMSNorm(6, dim=-1),
                                                          TSRA(6, split=2, dim=-1)]
    m = nn.Sequential(nn.Linear(4, 6), *acts, nn.Linear(6, 3)).double().eval()
    x = torch.randn(16, 4, dtype=torch.float64)
    with use_backend("reference"):
        y0 = m(x)
        rotate_model(m, calibrate(m, [x], progress=False))
        assert rel_err(m(x), y0) <= 1e-10  # float64, as the module docstring states
    assert [lay.name for lay in find_cob_layers(m)] == ["0"]
    conv = nn.Sequential(nn.Conv2d(3, 6, 1), TSRA(6, dim=-1), nn.Conv2d(6, 2, 1))
    with pytest.raises(ValueError, match=r"'1' acts on dim -1.*needs dim=1$"):
        find_cob_layers(conv)
    flat = nn.Sequential(nn.Linear(4, 6), TSRA(6, dim=-1), nn.Flatten(), nn.Linear(6, 2))
    with pytest.raises(ValueError, match=r"'1' acts on dim -1"):
        find_cob_layers(flat)


def test_a_misspelt_basis_is_refused():
    """Only "original" and "rotated" exist; any other string used to count as rotated
    wherever the code asked "original?" (pruning would skip the rotation, the baseline
    would be refused with a misleading message)."""
    m = small_net().eval()

    def never():
        raise AssertionError("the loader was read: the basis must be checked before the pass")
        yield

    with pytest.raises(ValueError, match=r"meta\['basis'\] must be one of .*'rotatd'"):
        calibrate(m, never(), meta={"basis": "rotatd"}, progress=False)
    with use_backend("reference"):
        st = calibrate(m, batches(1), meta={"basis": "rotated"}, progress=False)
    d = st["0"].to_dict()
    assert LayerStats.from_dict(d).basis == "rotated"
    with pytest.raises(ValueError, match=r"statistics for '0': basis must be one of .*'Rotated'"):
        LayerStats.from_dict({**d, "basis": "Rotated"})


def test_non_finite_activations_are_named_not_ranked():
    """NaN inputs (or weights) give NaN sums: calibrate names the layer, and statistics
    that hold NaN anyway (made by hand, a damaged model) are refused by the importance and
    eigen paths, which used to rank NaN scores or fail inside eigh without a word of why."""
    from cobkern.pruning import FixedRatio, compute_importance, prune

    torch.manual_seed(0)
    m = small_net().eval()
    bad = batches(2)
    bad[1][0][3, 0, 2, 2] = float("nan")
    with use_backend("reference"):
        with pytest.raises(ValueError, match=r"statistics for '0': gram_u, gram_v, sum_sq, "
                                             r"sum_abs hold non-finite values"):
            calibrate(m, bad, progress=False)
        st = calibrate(m, batches(2), progress=False)
    st["3"].gram_v[1, 1] = float("inf")
    st["3"].sum_sq[0] = float("nan")
    for cob in (True, False):
        with pytest.raises(ValueError, match=r"statistics for '3': gram_v, sum_sq hold "
                                             "non-finite"):
            compute_importance(st, cob=cob)
    with pytest.raises(ValueError, match=r"statistics for '3': gram_v, sum_sq hold non-finite"):
        st["3"].eigh()
    before = copy.deepcopy(m.state_dict())
    with pytest.raises(ValueError, match=r"statistics for '3'.*non-finite"):
        prune(m, st, FixedRatio((0.5, 0.5)))
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())
    # rotated statistics derived from the eigen-decomposition mark Σ|a| unknown with NaN
    with use_backend("reference"):
        derived = calibrate(m, batches(2), progress=False).rotated()
    assert torch.isnan(derived["0"].sum_abs).all()
    derived["0"].check_finite()


def _interrupt_the_second_rotate_input(monkeypatch) -> tuple[list, object]:
    """Make ``rotate_input`` raise ``KeyboardInterrupt`` on its second call (the first layer
    rotated, in and out); return the list of its calls and the real function."""
    from cobkern.cob import rotate as rotate_mod

    calls: list = []
    real = rotate_mod.rotate_input

    def interrupted(module, r, spatial=1):
        calls.append(module)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(module, r, spatial)

    monkeypatch.setattr(rotate_mod, "rotate_input", interrupted)
    return calls, real


def _assert_as_before(m: nn.Module, before: dict) -> None:
    """``m`` has the weights of ``before`` exactly, and no rotation mark."""
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not any(hasattr(mod, ROTATION_MARK) for mod in m.modules())


def test_prune_guards_its_rotation_once_and_still_puts_it_back(monkeypatch):
    """prune wrapped its rotation in a guard and rotate_model took another inside it: every
    rotated weight was copied twice (a model's worth of memory, for nothing). One guard,
    prune's, covers the rotation; an interrupt inside it still leaves the model as it was."""
    import cobkern.pruning as pruning_mod
    from cobkern.cob import rotate as rotate_mod
    from cobkern.pruning import FixedRatio, prune

    entered = []
    real_guard = rotate_mod.undone_on_error

    def counting(layers):
        entered.append(len(layers))
        return real_guard(layers)

    monkeypatch.setattr(rotate_mod, "undone_on_error", counting)
    monkeypatch.setattr(pruning_mod, "undone_on_error", counting)
    torch.manual_seed(0)
    m = small_net().double().eval()
    data = [x.double() for x, _ in batches()]
    with use_backend("reference"):
        st = calibrate(m, data, progress=False)
        before = copy.deepcopy(m.state_dict())
        calls, real = _interrupt_the_second_rotate_input(monkeypatch)
        with pytest.raises(KeyboardInterrupt):
            prune(m, st, FixedRatio((0.5, 0.5)))
        assert len(calls) == 2 and len(entered) == 1
        _assert_as_before(m, before)
        monkeypatch.setattr(rotate_mod, "rotate_input", real)
        entered.clear()
        prune(m, st, FixedRatio((0.5, 0.5)))
        assert len(entered) == 1
        entered.clear()
        m2 = small_net().double().eval()
        rotate_model(m2, calibrate(m2, data, progress=False))
        assert len(entered) == 1  # rotate_model on its own keeps its guard


def test_an_interrupted_rotation_leaves_the_model_as_it_was(monkeypatch):
    """rotate_model rewrites layer after layer; a KeyboardInterrupt (or any error) between
    two of them left the first layers rotated and the rest not — a model that neither the
    statistics nor a retry fits (the retry was refused: the first producer carried the
    mark). The rewritten weights and marks are now put back, and the retry rotates."""
    from cobkern.cob import rotate as rotate_mod

    torch.manual_seed(0)
    m = small_net().double().eval()
    data = [x.double() for x, _ in batches()]
    with use_backend("reference"):
        st = calibrate(m, data, progress=False)
        y0 = m(data[0])
        before = copy.deepcopy(m.state_dict())
        calls, real = _interrupt_the_second_rotate_input(monkeypatch)
        with pytest.raises(KeyboardInterrupt):
            rotate_model(m, st)
        assert len(calls) == 2  # the first layer had been rotated, in and out
        _assert_as_before(m, before)
        monkeypatch.setattr(rotate_mod, "rotate_input", real)
        rotate_model(m, st)
        assert rel_err(m(data[0]), y0) <= 1e-10  # float64 round-off


def test_derived_rotated_statistics_match_a_pass_through_the_rotated_model():
    """``rotate_model(...).stats`` (``LayerStats.rotated()``) stands in for a second
    calibration pass through the rotated model: ``prune`` ranks and thresholds the rotated
    channels by its ``sum_sq`` (importance's rotated-basis path). So its ``Σa'²`` must be the
    eigenvalues of U then of V, each in its own order, its Grams ``diag(λ)``, and its sample
    count the pass's — as a real pass through the rotated model gives. Layer ``"3"`` has
    split 2 of 6 (U smaller than V), so a U/V mix-up cannot hide behind equal sizes.
    Float64 model and sums: agreement to 1e-9 of each layer's largest eigenvalue (round-off
    is ~1e-13); the L2 scores from either statistics are the same numbers."""
    torch.manual_seed(0)
    m = small_net().double().eval()
    data = [(x.double(), y) for x, y in batches()]
    with use_backend("reference"):
        st = calibrate(m, data, progress=False)
        derived = rotate_model(m, st).stats
        real = calibrate(m, data, progress=False, meta={"basis": "rotated"})
    assert list(derived.layers) == list(real.layers) == ["0", "3", "8"]
    for name in real.layers:
        d, r = derived[name], real[name]
        tol = 1e-9 * r.sum_sq.max().item()
        assert d.count == r.count == st[name].count, name
        assert (d.sum_sq - r.sum_sq).abs().max().item() <= tol, name
        assert (d.gram_u - r.gram_u).abs().max().item() <= tol, name
        assert (d.gram_v - r.gram_v).abs().max().item() <= tol, name
    from cobkern.pruning import compute_importance

    from_original = compute_importance(st)                  # eigenvalues of the original sums
    from_derived = compute_importance(derived)              # Σa'² of the derived statistics
    for name in st.layers:
        assert torch.equal(from_original[name].u, from_derived[name].u), name
        assert torch.equal(from_original[name].v, from_derived[name].v), name
