"""A tiny synthetic CIFAR-like ImageFolder for the CLI tests: class ``k``'s images are noise
around one colour of its own, so a few training steps already beat chance."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_imagefolder(root: Path, n_train: int, n_test: int) -> None:
    """``root/{train,test}/class{k}/{i}.png`` for ten classes, ``n_train`` / ``n_test`` each."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        for k in range(10):
            d = root / split / f"class{k}"
            d.mkdir(parents=True)
            base = np.array([25 * k, 255 - 25 * k, (80 * k) % 256], dtype=np.float64)
            for i in range(n):
                img = base + rng.normal(0, 40, size=(32, 32, 3))
                Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(d / f"{i}.png")
