"""CIFAR-10 sources, the decode cache, subsets and the device loader (tiny synthetic data)."""

from __future__ import annotations

import hashlib
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cobkern.data import (
    CacheError,
    DataError,
    DeviceLoader,
    ImageSet,
    calibration_set,
    default_archive_path,
    load_cifar10,
    normalize,
    subset,
)

CLASSES = ["cat", "dog", "frog"]


def _images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def _make_folder(root: Path, per_class: int = 4) -> dict[str, np.ndarray]:
    """PNG ImageFolder tree (lossless, so pixels can be compared exactly)."""
    arrays = {}
    for split, seed in (("train", 1), ("test", 2)):
        imgs = _images(per_class * len(CLASSES), seed)
        arrays[split] = imgs
        for k, cls in enumerate(CLASSES):
            d = root / split / cls
            d.mkdir(parents=True)
            for j in range(per_class):
                Image.fromarray(imgs[k * per_class + j]).save(d / f"{j:04d}.png")
    return arrays


def test_imagefolder_source_decodes_caches_and_detects_corruption(tmp_path) -> None:
    arrays = _make_folder(tmp_path / "tree")
    cache = tmp_path / "cache"
    train, test = load_cifar10("imagefolder", tmp_path / "tree", cache_dir=cache)
    assert train.classes == CLASSES and test.classes == CLASSES
    assert train.images.dtype == torch.uint8 and train.images.shape == (12, 32, 32, 3)
    assert torch.equal(train.images, torch.from_numpy(arrays["train"]))
    assert torch.equal(test.images, torch.from_numpy(arrays["test"]))
    assert train.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    npz = list(cache.glob("*.npz"))
    assert len(npz) == 1 and len(list(cache.glob("*.json"))) == 1
    assert not list(cache.glob(".*tmp*"))  # no leftovers from the atomic write

    # "auto" recognises the tree and now reads the cache (same content).
    train2, _ = load_cifar10("auto", tmp_path / "tree", cache_dir=cache)
    assert torch.equal(train2.images, train.images)

    # A flipped byte in the cache is caught by the checksum, with a clear message.
    raw = bytearray(npz[0].read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    npz[0].write_bytes(bytes(raw))
    with pytest.raises(CacheError, match="corrupt"):
        load_cifar10("imagefolder", tmp_path / "tree", cache_dir=cache)
    train3, _ = load_cifar10("imagefolder", tmp_path / "tree", cache_dir=cache,
                             rebuild_cache=True)
    assert torch.equal(train3.images, train.images)


def test_archive_source(tmp_path) -> None:
    arrays = _make_folder(tmp_path / "cifar10-jpeg")
    archive = tmp_path / "tiny.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(tmp_path / "cifar10-jpeg", arcname="cifar10-jpeg")
    train, test = load_cifar10("shipped", archive, cache_dir=tmp_path / "c")
    assert len(train) == 12 and len(test) == 12 and train.classes == CLASSES
    assert torch.equal(train.images, torch.from_numpy(arrays["train"]))
    # "auto" with a file root is the archive reader.
    train2, _ = load_cifar10("auto", archive, cache_dir=tmp_path / "c")
    assert torch.equal(train2.labels, train.labels)

    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(DataError, match="cannot read archive"):
        load_cifar10("shipped", bad, cache_dir=tmp_path / "c")


def test_torchvision_layout_from_a_local_root(tmp_path) -> None:
    # The official python pickles, written by hand: (N, 3072) rows in CHW order.
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    expect = {}
    for name, seed in [(f"data_batch_{i}", i) for i in range(1, 6)] + [("test_batch", 9)]:
        imgs = _images(3, seed)
        expect[name] = imgs
        rows = imgs.transpose(0, 3, 1, 2).reshape(3, -1)
        with open(folder / name, "wb") as f:
            pickle.dump({"data": rows, "labels": [seed % 10, 1, 2]}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    train, test = load_cifar10("torchvision", tmp_path)
    assert len(train) == 15 and len(test) == 3 and train.classes[3] == "c3"
    want = np.concatenate([expect[f"data_batch_{i}"] for i in range(1, 6)])
    assert torch.equal(train.images, torch.from_numpy(want))
    assert torch.equal(test.images, torch.from_numpy(expect["test_batch"]))
    assert train.labels[:3].tolist() == [1, 1, 2]
    assert load_cifar10("auto", tmp_path)[1].labels.tolist() == [9, 1, 2]
    with pytest.raises(DataError, match="download"):  # never downloads unless asked
        load_cifar10("torchvision", tmp_path / "empty")


def test_bad_sources_raise_clear_errors(tmp_path) -> None:
    with pytest.raises(DataError, match="unknown data source"):
        load_cifar10("imagenet")
    with pytest.raises(DataError, match="not found"):
        load_cifar10("shipped", tmp_path / "nope.tar.gz")
    with pytest.raises(DataError, match="does not exist"):
        load_cifar10("auto", tmp_path / "nope")
    (tmp_path / "only" / "train" / "a").mkdir(parents=True)
    Image.fromarray(_images(1, 0)[0]).save(tmp_path / "only" / "train" / "a" / "x.png")
    with pytest.raises(DataError, match="need both"):
        load_cifar10("imagefolder", tmp_path / "only", cache_dir=tmp_path / "c")
    assert not (tmp_path / "c").exists()  # nothing written for bad input


def test_shipped_archive_matches_its_recorded_checksum() -> None:
    path = default_archive_path()
    if not path.is_file():
        pytest.skip("shipped archive not present")
    h = hashlib.sha256(path.read_bytes()).hexdigest()
    assert h == "42fe47b5e11e99a8fe29e13b5f2536777fa36d84618a59c32c5c9e8650ad96ae"


def _toy(n: int = 40) -> ImageSet:
    g = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8, generator=g)
    return ImageSet(imgs, torch.arange(n) % 10)


def test_subset_and_calibration_set_are_seeded() -> None:
    data = _toy(100)
    a, b, c = subset(data, 30, seed=1), subset(data, 30, seed=1), subset(data, 30, seed=2)
    assert torch.equal(a.images, b.images) and not torch.equal(a.images, c.images)
    assert len(a) == 30
    # Distinct images, original order: labels are arange(n) % 10 of sorted indices.
    assert subset(data, 100, seed=0) is data
    cal = calibration_set(data, n=50, seed=0)
    assert len(cal) == 50 and torch.equal(cal.images, data.subset(50, 0).images)


def test_plain_loader_is_normalised_in_order() -> None:
    data = _toy(10)
    loader = DeviceLoader.from_imageset(data, 4, augment=False, shuffle=False, drop_last=False)
    xs, ys = zip(*loader, strict=True)
    assert [len(y) for y in ys] == [4, 4, 2]
    x = torch.cat(xs)
    assert x.dtype == torch.float32 and x.shape == (10, 3, 32, 32) and xs[0].is_contiguous()
    torch.testing.assert_close(x, normalize(data.images), rtol=0, atol=1e-6)
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
    std = torch.tensor([0.247, 0.243, 0.261]).view(1, 3, 1, 1)
    want = (data.images.permute(0, 3, 1, 2).float() / 255 - mean) / std
    # Folded scale/shift vs textbook formula: float32 rounding only.
    torch.testing.assert_close(x, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(torch.cat(ys), data.labels)


def test_augmentation_is_a_padded_crop_with_optional_flip() -> None:
    data = _toy(16)
    loader = DeviceLoader.from_imageset(data, 16, augment=True, shuffle=False, drop_last=True,
                                        seed=3)
    x, _ = next(iter(loader))
    base = normalize(data.images)
    zero = normalize(torch.zeros(1, 1, 1, 3, dtype=torch.uint8))  # a zero-padded pixel
    padded = zero.expand(16, 3, 40, 40).clone()
    padded[:, :, 4:36, 4:36] = base
    flips = 0
    for i in range(16):
        hits = [(oy, ox, f) for oy in range(9) for ox in range(9) for f in (0, 1)
                if torch.equal(x[i], (lambda c: c.flip(-1) if f else c)(
                    padded[i, :, oy:oy + 32, ox:ox + 32]))]
        assert hits, f"sample {i} is not a crop/flip of its image"
        flips += hits[0][2]
    assert 0 < flips < 16  # both branches of the coin occur for this seed


def test_loader_is_deterministic_and_resumable() -> None:
    data = _toy(40)
    kw = dict(augment=True, shuffle=True, drop_last=True, seed=7)
    a = DeviceLoader.from_imageset(data, 8, **kw)
    full = [b for _ in range(2) for b in a]  # two epochs, 5 batches each
    assert len(full) == 10
    assert not torch.equal(full[0][1], full[5][1])  # a new permutation each epoch

    b = DeviceLoader.from_imageset(data, 8, **kw)
    it = iter(b)
    for _ in range(3):
        next(it)
    state = b.state_dict()
    assert state["epoch"] == 0 and state["batch"] == 3
    c = DeviceLoader.from_imageset(data, 8, **kw)
    c.load_state_dict(state)
    rest = list(c) + list(c)  # the end of epoch 0, then epoch 1
    for (x1, y1), (x2, y2) in zip(full[3:], rest, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    with pytest.raises(DataError, match="batch size changed"):
        DeviceLoader.from_imageset(data, 4, **kw).load_state_dict(state)


def test_ranks_split_the_global_batch() -> None:
    data = _toy(40)
    kw = dict(augment=True, shuffle=True, drop_last=True, seed=5)
    one = list(DeviceLoader.from_imageset(data, 8, **kw))
    r0 = list(DeviceLoader.from_imageset(data, 4, rank=0, world_size=2, **kw))
    r1 = list(DeviceLoader.from_imageset(data, 4, rank=1, world_size=2, **kw))
    assert len(one) == len(r0) == len(r1) == 5
    for (x, y), (x0, y0), (x1, y1) in zip(one, r0, r1, strict=True):
        assert torch.equal(x, torch.cat([x0, x1])) and torch.equal(y, torch.cat([y0, y1]))


def test_channels_last_output() -> None:
    data = _toy(8)
    loader = DeviceLoader.from_imageset(data, 8, augment=False, shuffle=False, drop_last=False,
                                        channels_last=True)
    x, _ = next(iter(loader))
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(x, normalize(data.images))


def test_loader_rejects_bad_input() -> None:
    with pytest.raises(DataError, match="uint8"):
        DeviceLoader(torch.zeros(4, 3, 32, 32), torch.zeros(4, dtype=torch.long), 2,
                     augment=False, shuffle=False, drop_last=False)
    with pytest.raises(DataError, match="no full batch"):
        DeviceLoader.from_imageset(_toy(4), 8, augment=False, shuffle=False, drop_last=True)


def test_loader_names_an_empty_set_a_negative_seed_and_a_negative_position() -> None:
    """An empty set blamed drop_last=True even with drop_last=False; a negative seed (which
    calibration_set and torch accept) and a negative resumed batch were accepted and failed
    at the first batch with numpy's bare 'expected non-negative integer'."""
    empty = ImageSet(torch.zeros(0, 32, 32, 3, dtype=torch.uint8),
                     torch.zeros(0, dtype=torch.long))
    with pytest.raises(DataError, match="no images to load"):
        DeviceLoader.from_imageset(empty, 8, augment=False, shuffle=False, drop_last=False)
    with pytest.raises(DataError, match="seed must be an int >= 0"):
        DeviceLoader.from_imageset(_toy(8), 4, augment=True, shuffle=True, drop_last=False,
                                   seed=-1)
    loader = DeviceLoader.from_imageset(_toy(8), 4, augment=True, shuffle=True,
                                        drop_last=False)
    with pytest.raises(DataError, match="batch=-3; both must be >= 0"):
        loader.load_state_dict({**loader.state_dict(), "batch": -3})


def test_labels_and_positions_out_of_range_are_named() -> None:
    """Labels without a class (7 of 3 classes, -1) were accepted by ImageSet; float labels
    were truncated by the loader (1.7 → 1); a resumed batch past the epoch's end (a state
    saved with drop_last=False loaded into a drop_last=True loader) skipped an epoch."""
    images = torch.zeros(4, 32, 32, 3, dtype=torch.uint8)
    for bad, shown in (([0, 1, 2, 7], "from 0 to 7"), ([-1, 0, 1, 2], "from -1 to 2")):
        with pytest.raises(DataError, match=rf"labels must be in \[0, 3\) for 3 classes, "
                                            rf"got labels {shown}"):
            ImageSet(images, torch.tensor(bad), list(CLASSES))
    assert len(ImageSet(images, torch.tensor([0, 1, 2, 2]), list(CLASSES))) == 4
    for dtype in (torch.float32, torch.bool):
        with pytest.raises(DataError, match=f"integer labels, got {dtype}"):
            DeviceLoader(images, torch.tensor([0.9, 1.7, 2.2, 3.99]).to(dtype), 2,
                         augment=False, shuffle=False, drop_last=False)
    loader = DeviceLoader(torch.zeros(5, 32, 32, 3, dtype=torch.uint8),
                          torch.tensor([0, 1, 2, 0, 1], dtype=torch.int32), 2, augment=False,
                          shuffle=False, drop_last=True)
    assert loader.labels.dtype == torch.int64 and len(loader) == 2
    loader.load_state_dict({"epoch": 0, "batch": 2})  # the epoch just ended: fine
    with pytest.raises(DataError, match=r"batch=3, but an epoch of this loader has 2 batches "
                                        r"\(drop_last=True\)"):
        loader.load_state_dict({"epoch": 0, "batch": 3})


@pytest.mark.parametrize("bad", [torch.rand(2, 32, 32, 3), torch.zeros(2, 3, 32, 32,
                                                                      dtype=torch.uint8)])
def test_normalize_names_images_it_cannot_take(bad) -> None:
    """Float images in [0, 1] came out as if they were 0..255 (about -1.98 for 0.5);
    NCHW images failed with a broadcast error naming no argument."""
    with pytest.raises(DataError, match=r"normalize expects uint8 NHWC images \(N, H, W, 3\)"):
        normalize(bad)




def _cache_files(cache: Path) -> tuple[Path, Path]:
    (npz,) = cache.glob("*.npz")
    return npz, npz.with_suffix(".json")


def test_corrupt_cache_message_names_the_files_to_delete(tmp_path) -> None:
    _make_folder(tmp_path / "tree")
    cache = tmp_path / "cache"
    load_cifar10("imagefolder", tmp_path / "tree", cache_dir=cache)
    npz, meta = _cache_files(cache)
    raw = bytearray(npz.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    npz.write_bytes(bytes(raw))
    with pytest.raises(CacheError, match="corrupt") as e:
        load_cifar10("imagefolder", tmp_path / "tree", cache_dir=cache)
    # no command defines --rebuild-cache: the message says which files to delete
    assert "--rebuild-cache" not in str(e.value)
    assert f"delete {npz} and {meta}" in str(e.value)
    npz.unlink()
    meta.unlink()  # what the message says: the next load decodes the source again
    assert len(load_cifar10("imagefolder", tmp_path / "tree", cache_dir=cache)[0]) == 12


@pytest.mark.parametrize(("edit", "why"), [
    (lambda m: {k: v for k, v in m.items() if k != "classes"}, "classes"),
    (lambda m: [m], "JSON list"),
    (lambda m: {**m, "classes": "cat dog frog"}, "classes"),
    (lambda m: {**m, "classes": ["cat", "dog"]}, "does not match"),  # labels 0..2
    (lambda m: {**m, "classes": ["cat", 1, "frog"]}, "classes"),
    (lambda m: {**m, "version": 99}, "version 99"),
    (lambda m: {k: v for k, v in m.items() if k != "version"}, "version None"),
    (lambda m: {k: v for k, v in m.items() if k != "sha256"}, "sha256"),
    (lambda m: {**m, "sha256": 5}, "sha256"),
    (lambda m: {**m, "n_train": "12"}, "n_train"),
    (lambda m: {**m, "n_test": 11}, "does not match"),
    (lambda m: None, "NoneType"),
])
def test_damaged_cache_sidecar_is_a_cache_error(tmp_path, edit, why) -> None:
    import json

    _make_folder(tmp_path / "tree")
    cache = tmp_path / "cache"
    load_cifar10("imagefolder", tmp_path / "tree", cache_dir=cache)
    _, meta = _cache_files(cache)
    meta.write_text(json.dumps(edit(json.loads(meta.read_text()))))
    with pytest.raises(CacheError, match=why):
        load_cifar10("imagefolder", tmp_path / "tree", cache_dir=cache)
    meta.write_text("{not json")
    with pytest.raises(CacheError, match="damaged cache metadata"):
        load_cifar10("imagefolder", tmp_path / "tree", cache_dir=cache)
    # rebuild_cache=True decodes again and rewrites a valid sidecar
    load_cifar10("imagefolder", tmp_path / "tree", cache_dir=cache, rebuild_cache=True)
    assert len(load_cifar10("imagefolder", tmp_path / "tree", cache_dir=cache)[1]) == 12


def test_a_missing_shipped_archive_says_how_to_point_at_one(tmp_path, monkeypatch) -> None:
    """Installed from a wheel there is no ``data/`` beside the package: the message told
    users to "pass --data-root", which no ``cobkern`` command took. It names the ways that
    exist (and the ``cobkern run --data-root`` option now exists)."""
    from cobkern.data import sources

    monkeypatch.delenv("COBKERN_DATA", raising=False)
    monkeypatch.setattr(sources, "_REPO", tmp_path / "site-packages")
    with pytest.raises(DataError) as e:
        load_cifar10()
    msg = str(e.value)
    assert str(tmp_path / "site-packages" / "data" / "cifar10-jpeg.tar.gz") in msg
    for way in ("COBKERN_DATA=PATH", "cobkern run --data-root PATH",
                "cobkern train --set data_root=PATH", "load_cifar10(root=PATH)"):
        assert way in msg
    monkeypatch.setenv("COBKERN_DATA", str(tmp_path / "gone.tar.gz"))
    with pytest.raises(DataError, match=r"gone.tar.gz \(the COBKERN_DATA environment"):
        load_cifar10()


def test_imagefolder_without_a_root_names_the_option() -> None:
    with pytest.raises(DataError, match=r"'imagefolder' needs a root folder \(--data-root\)"):
        load_cifar10("imagefolder")


def test_an_empty_class_folder_is_named_in_a_warning(tmp_path) -> None:
    _make_folder(tmp_path / "tree")
    (tmp_path / "tree" / "train" / "bee").mkdir()  # sorts first: every label shifts
    with pytest.warns(UserWarning, match=r"train/bee holds no images"):
        train, _ = load_cifar10("imagefolder", tmp_path / "tree", cache_dir=tmp_path / "c")
    assert train.classes == CLASSES


def _crop_params(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(oy, ox, flipped)`` of every augmented sample of :func:`_ramp` images, read back
    from the pixel values (channel 0 holds the column, channel 1 the row)."""
    std = torch.tensor([0.247, 0.243, 0.261]).view(1, 3, 1, 1)
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
    raw = ((x * std + mean) * 255).round().long()
    # Output pixel (16, 16) and its right neighbour lie inside the image for any offset in
    # [0, 8] (the image sits at 4..35 of the 40×40 padded one).
    row = (raw[:, 1, 16, 16] - 10) // 7
    c0, c1 = (raw[:, 0, 16, 16] - 10) // 7, (raw[:, 0, 16, 17] - 10) // 7
    flipped = c1 < c0
    oy = row - 16 + 4
    ox = torch.where(flipped, c0 - 11, c0 - 16 + 4)
    return oy, ox, flipped


def _ramp(n: int) -> ImageSet:
    """Identical images: channel 0 = 10 + 7·column, channel 1 = 10 + 7·row (never 0, the
    padding value)."""
    ar = torch.arange(32) * 7 + 10
    img = torch.stack([ar.view(1, 32).expand(32, 32), ar.view(32, 1).expand(32, 32),
                       torch.full((32, 32), 50)], -1).to(torch.uint8)
    return ImageSet(img.expand(n, 32, 32, 3).contiguous(), torch.zeros(n, dtype=torch.long))


def test_augmentation_uses_all_nine_offsets_and_a_fair_coin() -> None:
    """method.md §3: random 32×32 crop of the image zero-padded by 4 (offsets 0..8 on each
    axis, uniform) and a horizontal flip with p = 0.5, over 4096 samples."""
    n = 4096
    loader = DeviceLoader.from_imageset(_ramp(n), n, augment=True, shuffle=False,
                                        drop_last=True, seed=11)
    x, _ = next(iter(loader))
    oy, ox, flipped = _crop_params(x)
    # The read-back parameters reproduce every sample exactly (checks _crop_params itself).
    base = normalize(_ramp(1).images)
    zero = normalize(torch.zeros(1, 1, 1, 3, dtype=torch.uint8))
    padded = zero.expand(1, 3, 40, 40).clone()
    padded[:, :, 4:36, 4:36] = base
    for i in range(0, n, 97):
        crop = padded[0, :, oy[i]:oy[i] + 32, ox[i]:ox[i] + 32]
        assert torch.equal(x[i], crop.flip(-1) if flipped[i] else crop), i
    # Binomial sampling error: the flip rate's std is 0.008 and each offset's frequency
    # (1/9) has std 0.005 for 4096 samples; the bounds are 5 and 6 std wide.
    assert abs(flipped.float().mean().item() - 0.5) < 0.04
    for off in (oy, ox):
        freq = torch.bincount(off, minlength=9).float() / n
        assert freq.numel() == 9 and off.min() == 0
        assert (freq - 1 / 9).abs().max() < 0.03, freq


def test_augmentation_differs_between_batches_and_epochs() -> None:
    """Crops and flips are drawn from (seed, epoch, batch): identical images get different
    augmentations in every batch of an epoch and in every epoch."""
    loader = DeviceLoader.from_imageset(_ramp(32), 8, augment=True, shuffle=False,
                                        drop_last=True, seed=2)
    xs = [x for _ in range(2) for x, _ in loader]  # 2 epochs × 4 batches of the same images
    assert len(xs) == 8
    for i in range(8):
        for j in range(i):
            assert not torch.equal(xs[i], xs[j]), (i, j)


def test_subset_keeps_the_original_order_without_repeats() -> None:
    data = _toy(100)
    # label = index in the full set (one class per image)
    data = ImageSet(data.images, torch.arange(100), [str(i) for i in range(100)])
    for seed in range(3):
        idx = subset(data, 40, seed=seed).labels
        assert idx.unique().numel() == 40
        assert torch.equal(idx, idx.sort().values)
        assert torch.equal(subset(data, 40, seed=seed).images, data.images[idx])


def test_calibration_set_follows_its_seed_and_is_not_augmented() -> None:
    data = ImageSet(_toy(100).images, torch.arange(100), [str(i) for i in range(100)])
    a, b = calibration_set(data, n=30, seed=1), calibration_set(data, n=30, seed=2)
    assert torch.equal(a.labels, subset(data, 30, seed=1).labels)
    assert not torch.equal(a.labels, b.labels)
    # the raw training images themselves (no crop, flip or normalisation)
    assert a.images.dtype == torch.uint8 and torch.equal(a.images, data.images[a.labels])


def test_cifar_module_still_exports_the_names_that_moved_out_of_it() -> None:
    """``cobkern.data.cifar`` was split into imageset/sources/cache; its old imports work."""
    import cobkern.data
    import cobkern.data.cifar as cifar

    assert set(cifar.__all__) <= set(cobkern.data.__all__)
    for name in cifar.__all__:
        assert getattr(cifar, name) is getattr(cobkern.data, name), name
    assert issubclass(cifar.CacheError, cifar.DataError)


# ------------------------------------------------------------------- archive and tree edge cases
def _tar(folder: Path, archive: Path, mode: str, reverse: bool = False) -> None:
    """Pack ``folder``'s files (as ``cifar10-jpeg/...``), in name order or reversed."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    with tarfile.open(archive, mode) as tf:
        for p in reversed(files) if reverse else files:
            tf.add(p, arcname=f"cifar10-jpeg/{p.relative_to(folder)}")


def test_an_archive_not_packed_in_name_order_decodes_the_same(tmp_path) -> None:
    """Members are read in archive order (a gzip stream read backwards is decompressed
    again from the start each time: quadratic) and sorted by name afterwards."""
    arrays = _make_folder(tmp_path / "tree")
    _tar(tmp_path / "tree", tmp_path / "sorted.tar.gz", "w:gz")
    _tar(tmp_path / "tree", tmp_path / "reversed.tar.gz", "w:gz", reverse=True)
    a, _ = load_cifar10("shipped", tmp_path / "sorted.tar.gz", cache_dir=tmp_path / "c")
    b, b_test = load_cifar10("shipped", tmp_path / "reversed.tar.gz", cache_dir=tmp_path / "c")
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert torch.equal(b.images, torch.from_numpy(arrays["train"]))
    assert torch.equal(b_test.images, torch.from_numpy(arrays["test"]))


def test_a_truncated_plain_tar_is_an_error_not_a_smaller_dataset(tmp_path) -> None:
    """A plain ``.tar`` cut at a member header used to end the member list without a word
    (tarfile stops there), loading — and caching — part of the data."""
    _make_folder(tmp_path / "tree")
    whole = tmp_path / "whole.tar"
    _tar(tmp_path / "tree", whole, "w")
    with tarfile.open(whole) as tf:
        cut = tf.getmembers()[10].offset  # the 11th member's header
    cut_file = tmp_path / "cut.tar"
    cut_file.write_bytes(whole.read_bytes()[:cut])
    with pytest.raises(DataError, match="truncated or damaged"):
        load_cifar10("shipped", cut_file, cache_dir=tmp_path / "c")
    train, test = load_cifar10("shipped", whole, cache_dir=tmp_path / "c")
    assert len(train) == len(test) == 12


def test_a_file_name_that_is_not_utf8_loads(tmp_path) -> None:
    """A name from a Windows zip (Latin-1 byte 0xE9) used to crash the cache key."""
    _make_folder(tmp_path / "tree")
    odd = tmp_path / "tree" / "train" / "cat" / os.fsdecode(b"caf\xe9.png")
    Image.fromarray(_images(1, 7)[0]).save(odd)
    train, _ = load_cifar10("imagefolder", tmp_path / "tree", cache_dir=tmp_path / "c")
    assert len(train) == 13


def test_two_trees_with_the_same_names_sizes_and_times_do_not_share_a_cache(tmp_path) -> None:
    """Uncompressed images have one size whatever their pixels, and reproducible packs set
    one modification time: the cache key includes the tree's own path."""
    for name, value in (("a", 10), ("b", 200)):
        for split in ("train", "test"):
            d = tmp_path / name / split / "cat"
            d.mkdir(parents=True)
            Image.fromarray(np.full((32, 32, 3), value, np.uint8)).save(d / "0.bmp")
            os.utime(d / "0.bmp", ns=(1_000_000_000, 1_000_000_000))
    a, _ = load_cifar10("imagefolder", tmp_path / "a", cache_dir=tmp_path / "c")
    b, _ = load_cifar10("imagefolder", tmp_path / "b", cache_dir=tmp_path / "c")
    assert int(a.images.float().mean()) == 10 and int(b.images.float().mean()) == 200


@pytest.mark.parametrize("packed", [False, True])
def test_val_stands_for_test_only_where_there_is_no_test(tmp_path, packed: bool) -> None:
    """train/val/test: the validation images are not test data (left out, with a warning);
    train/val: val is the test split."""
    _make_folder(tmp_path / "tree")
    extra = tmp_path / "tree" / "val" / "cat"
    extra.mkdir(parents=True)
    Image.fromarray(_images(1, 5)[0]).save(extra / "0.png")

    def load(folder: Path):
        if not packed:
            return load_cifar10("imagefolder", folder, cache_dir=tmp_path / "c")
        archive = tmp_path / f"{folder.name}.tar.gz"
        _tar(folder, archive, "w:gz")
        return load_cifar10("shipped", archive, cache_dir=tmp_path / "c")

    with pytest.warns(UserWarning, match="both test/ and val/"):
        _, test = load(tmp_path / "tree")
    assert len(test) == 12
    import shutil

    shutil.rmtree(tmp_path / "tree" / "test")
    (tmp_path / "tree").rename(tmp_path / "no-test")
    _, test = load(tmp_path / "no-test")
    assert len(test) == 1


def test_archive_members_stored_as_links_are_images_too(tmp_path) -> None:
    """tar stores a file's second name (a tree deduplicated with ``cp -l``) as a hard-link
    member, and may hold symlinks: they were skipped without a word, so the archive gave a
    smaller dataset than the same tree read as a folder. A link to nothing is an error."""
    arrays = _make_folder(tmp_path / "tree")
    first = tmp_path / "tree" / "train" / "cat" / "0000.png"
    os.link(first, tmp_path / "tree" / "train" / "dog" / "0009.png")
    os.symlink("../cat/0001.png", tmp_path / "tree" / "train" / "frog" / "0009.png")
    archive = tmp_path / "links.tar"
    with tarfile.open(archive, "w") as tf:  # add() stores the second name as a hard link
        tf.add(tmp_path / "tree", arcname="cifar10-jpeg")
        kinds = sorted(m.type for m in tf.getmembers() if m.islnk() or m.issym())
    assert kinds == [tarfile.LNKTYPE, tarfile.SYMTYPE]
    packed, _ = load_cifar10("shipped", archive, cache_dir=tmp_path / "c1")
    folder, _ = load_cifar10("imagefolder", tmp_path / "tree", cache_dir=tmp_path / "c2")
    assert len(packed) == len(folder) == 14
    assert torch.equal(packed.images, folder.images)
    assert torch.equal(packed.labels, folder.labels)
    assert torch.equal(packed.images[8], torch.from_numpy(arrays["train"][0]))  # dog/0009
    assert torch.equal(packed.images[13], torch.from_numpy(arrays["train"][1]))  # frog/0009

    dangling = tmp_path / "dangling.tar"
    with tarfile.open(dangling, "w") as tf:
        tf.add(tmp_path / "tree" / "test", arcname="cifar10-jpeg/test")
        tf.add(tmp_path / "tree" / "train" / "cat", arcname="cifar10-jpeg/train/cat")
        link = tarfile.TarInfo("cifar10-jpeg/train/dog/0000.png")
        link.type, link.linkname = tarfile.SYMTYPE, "../nowhere/0000.png"
        tf.addfile(link)
    with pytest.raises(DataError, match=r"dog/0000.png is a link to '../nowhere/0000.png', "
                                        "which is not a file in the archive"):
        load_cifar10("shipped", dangling, cache_dir=tmp_path / "c3")


def test_16_bit_grey_images_are_scaled_and_32_bit_ones_refused(tmp_path) -> None:
    """Pillow's ``convert("RGB")`` clips a 16-bit grey image (mode ``I;16``) at 255: a
    50 % grey decoded white. It is now scaled (v·255/65535, rounded); 32-bit integer or
    float pixels, whose range is not known, are named instead of clipped (or blackened)."""
    for split in ("train", "test"):
        for cls, v in (("dark", 4096), ("grey", 32768), ("white", 65535)):
            d = tmp_path / "tree" / split / cls
            d.mkdir(parents=True)
            Image.fromarray(np.full((32, 32), v, np.uint16)).save(d / "a.png")
    assert Image.open(tmp_path / "tree" / "train" / "grey" / "a.png").mode.startswith("I;16")
    train, _ = load_cifar10("imagefolder", tmp_path / "tree", cache_dir=tmp_path / "c")
    assert train.classes == ["dark", "grey", "white"]
    assert train.images[:, 0, 0].tolist() == [[16] * 3, [128] * 3, [255] * 3]
    bad = tmp_path / "tree" / "train" / "grey" / "b.tif"
    Image.fromarray(np.full((32, 32), 0.5, np.float32)).save(bad)
    with pytest.raises(DataError, match=r"b\.tif.*32-bit floats \(mode F\)"):
        load_cifar10("imagefolder", tmp_path / "tree", cache_dir=tmp_path / "c")


def test_a_tree_loads_in_one_order_as_a_folder_and_as_an_archive(tmp_path) -> None:
    """The archive sorted its members by full name, where "cat-big/" comes before "cat/"
    ("-" < "/"); the folder walks each level in name order. The same tree gave two image
    orders — another data fingerprint (a resume across them refused), other shuffles and
    subsets. Both now order by path component."""
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls in ("cat", "cat-big"):
            d = tmp_path / "tree" / split / cls
            d.mkdir(parents=True)
            for i in range(2):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
                    d / f"{i}.png")
    _tar(tmp_path / "tree", tmp_path / "tree.tar.gz", "w:gz")
    f, f_test = load_cifar10("imagefolder", tmp_path / "tree", cache_dir=tmp_path / "c")
    a, a_test = load_cifar10("shipped", tmp_path / "tree.tar.gz", cache_dir=tmp_path / "c")
    assert f.labels.tolist() == a.labels.tolist() == [0, 0, 1, 1]
    assert torch.equal(f.images, a.images) and torch.equal(f_test.images, a_test.images)


@pytest.mark.parametrize("content, words", [
    ({"fine_label_names": ["a"]}, "holds no 'data' entry"),
    ([1, 2, 3], "holds no 'data' entry"),
    ({"data": np.zeros((3, 1024), np.uint8), "labels": [0] * 3}, r"rows of 3072.*\(3, 1024\)"),
    ({"data": np.zeros((3, 3072), np.uint8), "labels": [0] * 2}, "3 images but 2 labels"),
    ({"data": np.zeros((3, 3072), np.uint8)}, "3 images but no labels"),
], ids=["no-data", "a-list", "grey-rows", "short-labels", "no-labels"])
def test_a_torchvision_batch_file_with_other_content_is_named(tmp_path, content, words) -> None:
    """Batch files that unpickle but are no CIFAR-10 batch raised KeyError / ValueError /
    TypeError without the file's name (a traceback from the CLI)."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    good = {"data": np.zeros((3, 3072), np.uint8), "labels": [0, 1, 2]}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as f:
            pickle.dump(content if name == "data_batch_3" else good, f)
    with pytest.raises(DataError, match=f"data_batch_3.*{words}"):
        load_cifar10("torchvision", tmp_path)


def test_a_file_replaced_with_its_size_and_mtime_kept_is_decoded_again(tmp_path) -> None:
    """The folder cache was keyed by path, size and mtime: a file replaced by one of the
    same size with its time restored (cp -p, rsync -a, tar x of a reproducible pack) loaded
    the old pixels from the cache. The change time is in the key now."""
    for split in ("train", "test"):
        d = tmp_path / "tree" / split / "cat"
        d.mkdir(parents=True)
        Image.fromarray(np.full((32, 32, 3), 10, np.uint8)).save(d / "0.bmp")
    f = tmp_path / "tree" / "train" / "cat" / "0.bmp"
    first, _ = load_cifar10("imagefolder", tmp_path / "tree", cache_dir=tmp_path / "c")
    st = f.stat()
    Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(f)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert f.stat().st_size == st.st_size and f.stat().st_mtime_ns == st.st_mtime_ns
    again, _ = load_cifar10("imagefolder", tmp_path / "tree", cache_dir=tmp_path / "c")
    assert int(first.images.float().mean()) == 10 and int(again.images.float().mean()) == 200


def test_decoding_shows_progress_and_a_cache_read_does_not(tmp_path, capsys) -> None:
    """Decoding the shipped archive (~6 s) or a large ImageFolder tree printed nothing; a
    bar counts the decoded images now (``progress=False`` turns it off)."""
    _make_folder(tmp_path / "tree")
    _tar(tmp_path / "tree", tmp_path / "tree.tar.gz", "w:gz")
    for source, root in (("imagefolder", tmp_path / "tree"),
                         ("shipped", tmp_path / "tree.tar.gz")):
        load_cifar10(source, root, cache_dir=tmp_path / "c")
        err = capsys.readouterr().err
        # 24 images (12 per split): a known total for a folder, a count for the archive
        assert "decode tree" in err
        assert ("24/24" if source == "imagefolder" else "24img") in err.replace(" ", ""), err
        load_cifar10(source, root, cache_dir=tmp_path / "c")  # from the cache
        assert "decode" not in capsys.readouterr().err
        load_cifar10(source, root, cache_dir=tmp_path / "c", rebuild_cache=True, progress=False)
        assert "decode" not in capsys.readouterr().err


@pytest.mark.parametrize("source", ["auto", "shipped", "torchvision"])
def test_torchvisions_packed_archive_as_the_root_says_to_extract_it(tmp_path, source) -> None:
    """``cifar-10-python.tar.gz`` itself as the root: "need both a train/ and a test/ split"
    (read as an image archive) or "pass download=True" (torchvision) — neither said that
    the file only needs extracting."""
    import io

    tgz = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(tgz, "w:gz") as tf:
        for n in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            blob = pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 1]})
            info = tarfile.TarInfo(f"cifar-10-batches-py/{n}")
            info.size = len(blob)
            tf.addfile(info, io.BytesIO(blob))
    with pytest.raises(DataError, match=r"still packed: extract it \(tar xzf cifar-10-python"):
        load_cifar10(source, tgz, cache_dir=tmp_path / "c", progress=False)
