"""VGG-16 TSRA / ReLU models, derived configs and model files."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import cobkern
from cobkern.models import (
    VGG,
    ModelFileError,
    build_model,
    init_relu_weights,
    load_model,
    model_config,
    save_model,
    vgg16_relu,
    vgg16_tsra,
)
from cobkern.models.io import safetensors_available
from cobkern.nn import TSRA, RMSNorm, RMSNormTSRA


def _n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_parameter_counts_match_the_paper() -> None:
    # method.md §2: 33,638,218 for the TSRA model; the ReLU control adds BatchNorm's
    # weight and bias (2 × 4224 channels).
    assert _n_params(vgg16_tsra()) == 33_638_218
    assert _n_params(vgg16_tsra(fused=False)) == 33_638_218
    assert _n_params(vgg16_relu()) == 33_638_218 + 2 * 4224


def test_structure_follows_the_contract() -> None:
    m = vgg16_tsra(width=0.25)
    assert isinstance(m.features, nn.Sequential) and isinstance(m.classifier, nn.Sequential)
    kinds = [type(x) for x in m.features]
    assert kinds.count(nn.Conv2d) == 13 and kinds.count(RMSNormTSRA) == 13
    assert kinds.count(nn.AvgPool2d) == 5 and nn.MaxPool2d not in kinds
    for i, layer in enumerate(m.features):
        if isinstance(layer, nn.Conv2d):
            assert layer.kernel_size == (3, 3) and layer.padding == (1, 1)
            assert layer.bias is not None
            assert isinstance(m.features[i + 1], RMSNormTSRA)
            assert m.features[i + 1].split == layer.out_channels // 2
    cls = [type(x) for x in m.classifier]
    assert cls == [nn.Flatten, nn.Linear, TSRA, nn.Dropout, nn.Linear, TSRA, nn.Dropout,
                   nn.Linear]
    assert m.classifier[1].in_features == 128 and m.classifier[1].out_features == 1024

    unfused = vgg16_tsra(width=0.25, fused=False)
    kinds = [type(x) for x in unfused.features]
    assert kinds.count(RMSNorm) == 13 and kinds.count(TSRA) == 13

    r = vgg16_relu(width=0.25)
    kinds = [type(x) for x in r.features]
    assert kinds.count(nn.BatchNorm2d) == 13 and kinds.count(nn.MaxPool2d) == 5
    assert [type(x) for x in r.classifier].count(nn.ReLU) == 2


def test_relu_init_is_kaiming_fan_out_with_zero_bias() -> None:
    r = vgg16_relu(width=0.25)
    for m in r.modules():
        if isinstance(m, nn.Conv2d):
            assert torch.count_nonzero(m.bias) == 0
            fan_out = m.weight.shape[0] * m.weight[0, 0].numel()
            bound = (6.0 / fan_out) ** 0.5  # kaiming_uniform, gain sqrt(2)
            assert m.weight.abs().max() <= bound + 1e-6
            # Uniform(-b, b) has std b/sqrt(3); with >= 1000 draws the sample std is
            # within 10% of it.
            if m.weight.numel() >= 1000:
                assert abs(m.weight.std().item() / (bound / 3**0.5) - 1) < 0.1


def test_relu_linear_layers_keep_the_pytorch_default() -> None:
    """Kaiming fan_out on the classifier gave the 10-logit layer weights of std sqrt(2/10)
    and the paper's ReLU recipe diverged to NaN; the linear layers keep ``nn.Linear``'s
    default (weights and biases uniform in ±1/sqrt(fan_in))."""
    r = vgg16_relu(width=0.25)
    linears = [m for m in r.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 3
    for m in linears:
        bound = 1.0 / m.in_features ** 0.5
        assert m.weight.abs().max() <= bound + 1e-6
        assert m.bias.abs().max() <= bound + 1e-6 and torch.count_nonzero(m.bias) > 0
    literal = vgg16_relu(width=0.25)
    init_relu_weights(literal, linear=True)
    last = [m for m in literal.modules() if isinstance(m, nn.Linear)][-1]
    assert torch.count_nonzero(last.bias) == 0
    assert last.weight.abs().max() > bound * 10  # sqrt(6/10) against 1/sqrt(1024)


def test_relu_initial_logits_are_of_order_one() -> None:
    """What the init is for: at full width the first logits had a standard deviation of
    ~26 (loss ~38) with Kaiming fan_out in the classifier, and SGD at lr 0.1 diverged.
    With PyTorch's default in the linear layers they are O(1); the bound 2 leaves a wide
    margin over the 0.25 measured (seeded, 64 random images, train mode; 28 with fan_out)."""
    torch.manual_seed(0)
    r = vgg16_relu().train()
    with torch.no_grad():
        logits = r(torch.randn(64, 3, 32, 32))
    assert logits.std().item() < 2.0
    init_relu_weights(r, linear=True)
    with torch.no_grad():
        assert r(torch.randn(64, 3, 32, 32)).std().item() > 10.0


def test_fused_and_unfused_compute_the_same_function() -> None:
    torch.manual_seed(0)
    fused = vgg16_tsra(width=0.125).eval()
    unfused = vgg16_tsra(width=0.125, fused=False).eval()
    # RMSNorm and TSRA have no parameters: copying the convs and linears copies the model.
    conv_f = [m for m in fused.features if isinstance(m, nn.Conv2d)]
    conv_u = [m for m in unfused.features if isinstance(m, nn.Conv2d)]
    for a, b in zip(conv_f, conv_u, strict=True):
        b.load_state_dict(a.state_dict())
    unfused.classifier.load_state_dict(fused.classifier.state_dict())
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad(), cobkern.use_backend("reference"):
        # float32, 16 layers: fused vs two-step rounding differs by a few ulps per layer.
        torch.testing.assert_close(fused(x), unfused(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend_name", ["reference", "triton"])
def test_fusing_conv_bias_computes_the_same_function(backend_name) -> None:
    """``VGG.fuse_conv_bias``: every conv runs without its bias and the RMSNorm→TSRA kernel
    adds it; logits and every parameter's gradient (the conv biases' included) match the
    plain forward to 1e-4 relative (float32 through 16 layers, the bias added at another
    point: a few ulps per layer). The switch is not part of the state dict."""
    from cobkern.models import forward_fusing_conv_bias

    torch.manual_seed(0)
    m = vgg16_tsra(width=0.0625)
    for p in m.parameters():  # non-zero biases (PyTorch's default init has them already)
        assert p.abs().sum() > 0
    x = torch.randn(3, 3, 32, 32)
    grads = {}
    with cobkern.use_backend(backend_name):
        for fused in (False, True):
            m.fuse_conv_bias = fused
            m.zero_grad()
            torch.manual_seed(1)  # the same dropout masks
            out = m(x)
            out.square().sum().backward()
            grads[fused] = (out.detach(), [p.grad.clone() for p in m.parameters()])
    assert "fuse_conv_bias" not in str(list(m.state_dict()))
    torch.testing.assert_close(grads[True][0], grads[False][0], rtol=1e-4, atol=1e-5)
    for a, b in zip(grads[True][1], grads[False][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * b.abs().max())
    # convs followed by something else (BatchNorm in the ReLU model) run as they are
    relu = vgg16_relu(width=0.0625).eval()
    with torch.no_grad():
        torch.testing.assert_close(forward_fusing_conv_bias(relu.features, x), relu.features(x))


def _fused_pairs(m: VGG, x: torch.Tensor) -> list[bool]:
    """For each RMSNormTSRA of ``m.features``, whether the forward pass fused its
    convolution's bias into it (a fused activation is called with ``(conv output, bias)``)."""
    acts = [a for a in m.features if isinstance(a, RMSNormTSRA)]
    seen: dict[int, bool] = {}
    handles = [a.register_forward_hook(
        lambda mod, inputs, _out, i=i: seen.__setitem__(i, len(inputs) == 2))
        for i, a in enumerate(acts)]
    try:
        with torch.no_grad():
            m(x)
    finally:
        for h in handles:
            h.remove()
    return [seen[i] for i in range(len(acts))]


def test_fusing_conv_bias_keeps_convolutions_with_hooks_unfused() -> None:
    """A convolution with a pre-forward hook (``torch.nn.utils.prune``'s, which recomputes
    ``weight = weight_orig * weight_mask`` before each call) or a forward hook runs as it
    is under ``fuse_conv_bias``: skipping it would compute with a stale ``weight``. The
    other pairs still fuse. Logits within 1e-4 relative of the unfused pass (float32 over
    16 layers, the bias added at another point: a few ulps per layer)."""
    from torch.nn.utils import prune

    torch.manual_seed(0)
    m = vgg16_tsra(width=0.0625).eval()
    prune.l1_unstructured(m.features[0], "weight", amount=0.5)
    with torch.no_grad():
        m.features[0].weight_orig.mul_(2.0)  # `weight` is stale until the pre-hook runs
    calls = []
    m.features[2].register_forward_hook(lambda *_: calls.append(1))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), cobkern.use_backend("reference"):
        want = m(x)
        m.fuse_conv_bias = True
        got = m(x)
        fused = _fused_pairs(m, x)
    assert fused[:2] == [False, False] and all(fused[2:])
    assert len(calls) == 3  # the hooked convolution ran in every pass
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_fusing_conv_bias_steps_aside_for_hooks_and_compiled_features() -> None:
    """``VGG.fuse_conv_bias`` runs ``features`` as it is when it has hooks of its own, when
    a global module hook is registered (either would be skipped), and when it is not a plain
    ``nn.Sequential`` (a ``torch.compile`` wrapper is not iterable) or was compiled in
    place (its layers one by one would bypass the compiled graph)."""
    torch.manual_seed(0)
    m = vgg16_tsra(width=0.0625).eval()
    m.fuse_conv_bias = True
    x = torch.randn(2, 3, 32, 32)
    n = sum(isinstance(a, RMSNormTSRA) for a in m.features)
    assert _fused_pairs(m, x) == [True] * n
    calls = []
    h = m.features.register_forward_hook(lambda *_: calls.append(1))
    assert _fused_pairs(m, x) == [False] * n and calls == [1]
    h.remove()
    h = nn.modules.module.register_module_forward_pre_hook(lambda *_: None)
    try:
        assert _fused_pairs(m, x) == [False] * n
    finally:
        h.remove()
    plain = m.features
    m.features = torch.compile(plain, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(m(x), m.classifier(plain(x)))  # no TypeError
    m.features = plain
    plain.compile(backend="eager")
    assert _fused_pairs(m, x) == [False] * n


def test_forward_backward_default_backend() -> None:
    # "auto" backend: Triton interpreter on CPU under the test conftest, kernels on CUDA.
    m = vgg16_tsra(width=0.0625)
    x = torch.randn(2, 3, 32, 32)
    y = m(x)
    assert y.shape == (2, 10) and y.dtype == torch.float32
    y.square().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())


def test_channels_last_and_bf16_autocast() -> None:
    torch.manual_seed(0)
    m = vgg16_tsra(width=0.125).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad(), cobkern.use_backend("reference"):
        ref = m(x)
        m_cl = m.to(memory_format=torch.channels_last)
        out_cl = m_cl(x.to(memory_format=torch.channels_last))
        # Same math in another memory layout; conv accumulation order may differ.
        torch.testing.assert_close(out_cl, ref, rtol=1e-4, atol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out_bf = m(x)
    assert torch.isfinite(out_bf).all()
    # bf16 keeps ~8 bits of mantissa; after 16 layers the logits agree to a few percent.
    err = (out_bf.float() - ref).norm() / ref.norm()
    assert err < 0.1, err


def test_torch_compile_fullgraph() -> None:
    # fullgraph=True raises on any graph break; aot_eager also runs the ops' fake
    # kernels and autograd formula without needing a C++ compiler.
    torch.manual_seed(0)
    m = vgg16_tsra(width=0.0625)
    x = torch.randn(2, 3, 32, 32)
    with cobkern.use_backend("reference"):
        torch._dynamo.reset()
        cm = torch.compile(m, backend="aot_eager", fullgraph=True)
        cm(x).sum().backward()  # training mode (dropout) compiles and differentiates
        m.eval()  # dropout is random in training mode: compare outputs in eval mode
        ref = m(x)
        out = cm(x)
    # aot_eager runs the same eager kernels, only traced: equal up to float reassociation.
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())


def _prune_like(m: VGG) -> VGG:
    """Shrink some layers in place the way the pruning code does, with odd splits."""
    feats = m.features
    convs = [i for i, x in enumerate(feats) if isinstance(x, nn.Conv2d)]
    # Shrink conv #1's output from 8 to 5 channels, split 3/2, keep original norm size.
    i, j = convs[1], convs[2]
    old, nxt = feats[i], feats[j]
    new = nn.Conv2d(old.in_channels, 5, 3, padding=1)
    new.weight.data = old.weight.data[:5].clone()
    new.bias.data = old.bias.data[:5].clone()
    feats[i] = new
    act = feats[i + 1]
    act.num_channels, act.split, act.norm_size = 5, 3, 8
    new_next = nn.Conv2d(5, nxt.out_channels, 3, padding=1)
    new_next.weight.data = nxt.weight.data[:, :5].clone()
    new_next.bias.data = nxt.bias.data.clone()
    feats[j] = new_next
    # Classifier hidden layer 1: 512w -> 7 features, split 2.
    cls = m.classifier
    l1, l2 = cls[1], cls[4]
    n1 = nn.Linear(l1.in_features, 7)
    n1.weight.data, n1.bias.data = l1.weight.data[:7].clone(), l1.bias.data[:7].clone()
    n2 = nn.Linear(7, l2.out_features)
    n2.weight.data, n2.bias.data = l2.weight.data[:, :7].clone(), l2.bias.data.clone()
    cls[1], cls[4] = n1, n2
    cls[2].num_channels, cls[2].split = 7, 2
    cls[5].split = 5
    return m


def test_pruned_model_round_trips_through_its_file(tmp_path) -> None:
    torch.manual_seed(0)
    m = _prune_like(vgg16_tsra(width=0.125)).eval()
    cfg = model_config(m)
    assert cfg["arch"] == "tsra" and cfg["fused"] is True and cfg["num_classes"] == 10
    act = cfg["features"][3]
    assert act["type"] == "RMSNormTSRA"
    assert (act["num_channels"], act["split"], act["norm_size"]) == (5, 3, 8)
    assert cfg["classifier"][2]["split"] == 2 and cfg["classifier"][5]["split"] == 5
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad(), cobkern.use_backend("reference"):
        ref = m(x)
        paths = [tmp_path / "m.pt"]
        if safetensors_available():
            paths.append(tmp_path / "m.safetensors")
        for p in paths:
            save_model(m, p, extra={"accuracy": 0.5})
            m2 = load_model(p).eval()
            assert model_config(m2) == cfg
            # Same weights, same architecture, same op order: bit-identical.
            assert torch.equal(m2(x), ref)
        rebuilt = build_model(cfg)
        assert model_config(rebuilt) == cfg
    assert sorted(x.name for x in tmp_path.iterdir()) == sorted(x.name for x in paths)


def test_relu_and_unfused_configs_round_trip(tmp_path) -> None:
    for m in (vgg16_relu(width=0.0625), vgg16_tsra(width=0.0625, fused=False)):
        m.eval()
        cfg = model_config(m)
        save_model(m, tmp_path / "x.pt")
        m2 = load_model(tmp_path / "x.pt").eval()
        assert model_config(m2) == cfg
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad(), cobkern.use_backend("reference"):
            assert torch.equal(m(x), m2(x))
    assert model_config(vgg16_relu(width=0.0625))["arch"] == "relu"
    assert model_config(vgg16_tsra(width=0.0625, fused=False))["fused"] is False


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_16_bit_model_loads_in_its_dtype(tmp_path, suffix: str, dtype) -> None:
    """The weights come back in the dtype they were saved in (they used to be copied into
    a float32 model: twice the memory, another numeric path), as trainable parameters."""
    if suffix == ".safetensors" and not safetensors_available():
        pytest.skip("safetensors is not installed")
    m = vgg16_tsra(width=0.0625).to(dtype)
    save_model(m, tmp_path / f"m{suffix}")
    m2 = load_model(tmp_path / f"m{suffix}")
    assert {p.dtype for p in m2.parameters()} == {dtype}
    assert all(isinstance(p, nn.Parameter) and p.requires_grad for p in m2.parameters())
    for a, b in zip(m.state_dict().values(), m2.state_dict().values(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_a_device_this_machine_lacks_is_named_not_blamed_on_the_file(tmp_path, suffix) -> None:
    """``load_model(path, "cuda")`` without a GPU said "cannot read torch model file", as
    for a damaged file; the device is the problem, and named before the file is read."""
    if suffix == ".safetensors" and not safetensors_available():
        pytest.skip("safetensors is not installed")
    path = tmp_path / f"m{suffix}"
    save_model(vgg16_tsra(width=0.0625), path)
    for device in ("cuda", torch.device("cuda", 0)):
        with pytest.raises(ValueError, match=r"cannot load a model onto cuda(:0)?: "):
            load_model(path, device)
    with pytest.raises(ValueError, match=r"map_location must be a device .* got 'gpu'"):
        load_model(path, "gpu")
    assert load_model(path, torch.device("cpu")).features[0].weight.device.type == "cpu"


def test_bad_model_files_give_clear_errors(tmp_path) -> None:
    import pytest

    with pytest.raises(FileNotFoundError, match="model file not found"):
        load_model(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ModelFileError, match="cannot read"):
        load_model(bad)
    if safetensors_available():
        bad = tmp_path / "bad.safetensors"
        bad.write_bytes(b"\x00" * 16)
        with pytest.raises(ModelFileError):
            load_model(bad)
    with pytest.raises(ModelFileError, match="not a cobkern model config"):
        build_model({"format": "something-else"})
    with pytest.raises(ModelFileError, match="unknown layer type"):
        build_model({"format": "cobkern.vgg", "version": 1, "features": [{"type": "Foo"}],
                     "classifier": []})


def test_malformed_model_configs_are_model_file_errors() -> None:
    import pytest

    good = model_config(vgg16_tsra(width=0.0625))
    tsra = dict(good["classifier"][2], gain=3)
    cases = {
        "version": dict(good, version="1"),
        "version ": dict(good, version=True),
        "newer": dict(good, version=2),
        "no 'features'": {k: v for k, v in good.items() if k != "features"},
        "'classifier' must be a list": dict(good, classifier={"type": "Linear"}),
        r"classifier\[0\] is not a layer spec": dict(good, classifier=["Linear"]),
        r"features\[1\] is not a layer spec": dict(good, features=[good["features"][0], {}]),
        "invalid TSRA": dict(good, classifier=[*good["classifier"][:2], tsra,
                                               *good["classifier"][3:]]),
        "invalid Linear": dict(good, classifier=[{"type": "Linear", "in_features": -1,
                                                  "out_features": 2, "bias": True}]),
        "invalid Conv2d": dict(good, features=[dict(good["features"][0], in_channels="3")]),
        "no Linear layer": dict(good, classifier=[{"type": "Flatten", "start_dim": 1,
                                                   "end_dim": -1}]),
    }
    for msg, cfg in cases.items():
        with pytest.raises(ModelFileError, match=msg):
            build_model(cfg)
    with pytest.raises(ModelFileError, match="must be a dict"):
        from cobkern.models.io import build_layer

        build_layer(["Linear"])  # type: ignore[arg-type]
    assert model_config(build_model(good)) == good  # valid configs are unchanged


def test_a_file_that_is_not_a_model_is_a_one_line_error(tmp_path) -> None:
    import pytest

    bad = tmp_path / "config.json"
    bad.write_text('{"experiment": {}}')
    with pytest.raises(ModelFileError) as e:
        load_model(bad)
    msg = str(e.value)
    assert str(bad) in msg and "not a cobkern model file (not a torch file)" in msg
    assert "weights_only" not in msg and "\n" not in msg


def test_model_files_get_the_permissions_of_other_outputs(tmp_path) -> None:
    """0o666 less the umask, like any file opened for writing (safetensors makes 0o600)."""
    import os

    import pytest

    if os.name == "nt":
        pytest.skip("POSIX permissions")
    names = ["m.pt"] + (["m.safetensors"] if safetensors_available() else [])
    old = os.umask(0o022)
    try:
        for name in names:
            save_model(vgg16_tsra(width=0.0625), tmp_path / name)
            assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name
        os.umask(0o027)
        save_model(vgg16_tsra(width=0.0625), tmp_path / names[-1])
        assert (tmp_path / names[-1]).stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(old)


@pytest.mark.parametrize("key", ["split", "norm_size", "num_channels", "tsra_eps", "a_v"])
def test_a_layer_spec_without_a_key_is_refused_not_defaulted(tmp_path, key):
    """cobkern's modules have no parameters: their split, normaliser and constants live only
    in the config. A spec without ``split`` loaded with ``C // 2`` and one without
    ``norm_size`` with ``C`` — another function, silently, exactly for pruned layers."""
    from cobkern.models.io import ModelFileError, build_layer, layer_spec

    spec = layer_spec(RMSNormTSRA(8, split=6, norm_size=16))
    assert repr(build_layer(spec)) == repr(RMSNormTSRA(8, split=6, norm_size=16))
    del spec[key]
    with pytest.raises(ModelFileError, match=rf"missing \['{key}'\]"):
        build_layer(spec)


def test_weights_that_are_not_a_dict_are_a_model_file_error(tmp_path):
    from cobkern.models.io import ModelFileError

    path = tmp_path / "m.pt"
    save_model(vgg16_tsra(width=1 / 16), path)
    blob = torch.load(path, weights_only=True)
    blob["state_dict"] = "x"
    torch.save(blob, path)
    with pytest.raises(ModelFileError, match="the weights must be a dict of tensors, got str"):
        load_model(path)


def test_classifier_dropout_is_one_half_in_both_models() -> None:
    """method.md §2: Dropout .5 after each hidden linear layer, TSRA model and control."""
    for m in (vgg16_tsra(width=0.0625), vgg16_tsra(width=0.0625, fused=False),
              vgg16_relu(width=0.0625)):
        drops = [x for x in m.classifier if isinstance(x, nn.Dropout)]
        assert [d.p for d in drops] == [0.5, 0.5]
        assert not any(isinstance(x, nn.Dropout) for x in m.features)


def test_scaled_width_rounds_to_nearest_and_keeps_two_channels() -> None:
    from cobkern.models import scaled_width

    assert scaled_width(64, 0.37) == 24  # 23.68
    assert scaled_width(64, 0.36) == 23  # 23.04
    assert scaled_width(4096, 1.0) == 4096
    assert scaled_width(64, 0.001) == 2  # TSRA needs two non-empty subspaces
    m = vgg16_tsra(width=0.37)
    assert [c.out_channels for c in m.features if isinstance(c, nn.Conv2d)][:3] == [24, 24, 47]
    assert m.classifier[1].out_features == 1516  # round(4096 * 0.37) = round(1515.52)


def test_pruned_unfused_model_round_trips_through_its_file(tmp_path) -> None:
    """The unfused model keeps a pruned RMSNorm's norm_size and TSRA's split apart, and a
    non-default dropout rate survives the file too."""
    torch.manual_seed(0)
    m = vgg16_tsra(width=0.125, fused=False)
    norm, act = m.features[1], m.features[2]
    assert isinstance(norm, RMSNorm) and isinstance(act, TSRA)
    norm.norm_size = 16  # 8 channels kept of 16: normalise as over the original 16
    act.split = 5
    m.classifier[3].p = 0.25
    m.eval()
    cfg = model_config(m)
    assert cfg["features"][1]["norm_size"] == 16 and cfg["features"][2]["split"] == 5
    assert cfg["classifier"][3]["p"] == 0.25
    save_model(m, tmp_path / "m.pt")
    m2 = load_model(tmp_path / "m.pt")
    assert model_config(m2) == cfg
    assert (m2.features[1].norm_size, m2.features[2].split, m2.classifier[3].p) == \
        (16, 5, 0.25)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), cobkern.use_backend("reference"):
        assert torch.equal(m2.eval()(x), m(x))  # same weights and op order: bit-identical


def test_weights_missing_or_extra_tensors_are_refused(tmp_path) -> None:
    path = tmp_path / "m.pt"
    save_model(vgg16_tsra(width=1 / 16), path)
    blob = torch.load(path, weights_only=True)
    del blob["state_dict"]["features.0.bias"]
    torch.save(blob, path)
    with pytest.raises(ModelFileError, match="do not match the checksum"):
        load_model(path)
    del blob["sha256"]  # a hand-made file (or one from before checksums): the keys tell
    torch.save(blob, path)
    with pytest.raises(ModelFileError, match="features.0.bias"):
        load_model(path)
    blob["state_dict"]["features.0.bias"] = torch.zeros(4)
    blob["state_dict"]["features.99.weight"] = torch.zeros(4)
    torch.save(blob, path)
    with pytest.raises(ModelFileError, match="features.99.weight"):
        load_model(path)


def test_save_model_writes_through_the_atomic_writer(tmp_path, monkeypatch) -> None:
    import cobkern._atomic
    import cobkern.models.io as io

    written = []
    real = cobkern._atomic.atomic_path

    def spy(path):
        written.append(path.name)
        return real(path)

    monkeypatch.setattr(io, "atomic_path", spy)
    names = ["m.pt"] + (["m.safetensors"] if safetensors_available() else [])
    for name in names:
        save_model(vgg16_tsra(width=1 / 16), tmp_path / name)
    assert written == names
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)


@pytest.mark.parametrize("how", ["prune", "parametrize"])
def test_save_model_refuses_a_reparametrized_weight(tmp_path, how) -> None:
    """A model carrying torch.nn.utils.prune masks (or a parametrization) saved fine, but its
    state held weight_orig / weight_mask where load_model expects weight: the file never
    loaded ("Missing key(s) ... weight"). Refused before anything is written, naming the
    module and the call that makes the change permanent; after it, the round trip works."""
    from torch.nn.utils import parametrize, prune

    model = vgg16_tsra(width=0.0625).eval()
    conv = model.features[0]
    if how == "prune":
        prune.l1_unstructured(conv, "weight", amount=0.5)
    else:
        class Scale(nn.Module):
            def forward(self, w):
                return 2 * w

        parametrize.register_parametrization(conv, "weight", Scale())
    path = tmp_path / "m.pt"
    fix = "prune.remove" if how == "prune" else "remove_parametrizations"
    with pytest.raises(ValueError, match=r"'features.0' \((Parametrized)?Conv2d\) has a "
                                         r"reparametrized weight.*" + fix):
        save_model(model, path)
    assert not path.exists()
    if how == "prune":
        prune.remove(conv, "weight")
    else:
        parametrize.remove_parametrizations(conv, "weight")
    save_model(model, path)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(load_model(path).eval()(x), model(x), rtol=0, atol=0)


def test_a_model_file_is_read_by_its_content_not_its_suffix(tmp_path) -> None:
    """The suffix alone chose the reader: a cobkern safetensors file renamed *.pt was "not
    a torch file", a torch file renamed *.safetensors a "header too large" error. Both
    formats announce themselves in their first bytes; the weights load bit-identically."""
    if not safetensors_available():
        pytest.skip("needs the safetensors package")
    import shutil

    model = vgg16_tsra(width=0.0625).eval()
    save_model(model, tmp_path / "a.safetensors")
    save_model(model, tmp_path / "b.pt")
    shutil.copy(tmp_path / "a.safetensors", tmp_path / "a.pt")
    shutil.copy(tmp_path / "b.pt", tmp_path / "b.safetensors")
    x = torch.randn(2, 3, 32, 32)
    want = model(x)
    for name in ("a.pt", "b.safetensors", "b.bin"):
        if name == "b.bin":
            shutil.copy(tmp_path / "b.pt", tmp_path / name)
        torch.testing.assert_close(load_model(tmp_path / name).eval()(x), want, rtol=0, atol=0)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_a_damaged_model_file_is_refused_by_its_checksum(tmp_path, suffix: str) -> None:
    """16 flipped bytes in the middle of a model file (the weights' payload) loaded without
    a word as other weights. Files record the SHA-256 of their weights now, and reading
    checks it; a file without one (written before) still loads."""
    if suffix == ".safetensors" and not safetensors_available():
        pytest.skip("safetensors is not installed")
    p = tmp_path / f"m{suffix}"
    save_model(vgg16_tsra(width=0.0625), p)
    load_model(p)
    b = bytearray(p.read_bytes())
    for i in range(len(b) // 2, len(b) // 2 + 16):
        b[i] ^= 0xFF
    p.write_bytes(bytes(b))
    with pytest.raises(ModelFileError, match="do not match the checksum"):
        load_model(p)
    if suffix == ".pt":  # a file of an earlier version, without the digest, loads unchecked
        m = vgg16_tsra(width=0.0625)
        torch.save({"format": "cobkern.vgg", "config": model_config(m),
                    "state_dict": m.state_dict(), "extra": {}}, p)
        assert torch.equal(load_model(p).classifier[-1].bias, m.classifier[-1].bias)
