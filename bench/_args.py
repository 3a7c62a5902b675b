"""Argument checks shared by the benchmark scripts: a bad value is an ``argparse`` error
(usage line, exit status 2) before anything is measured, never a traceback after the first
row or a silent default (``--batch 0`` read as "not given")."""

from __future__ import annotations

import argparse
import math
import os

import torch


def _int_at_least(minimum: int):
    """An ``argparse`` type: an integer ``>= minimum``."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {v}")
        return v

    return parse


#: ``argparse`` types: an integer ``>= 1`` / ``>= 0``.
positive_int = _int_at_least(1)
non_negative_int = _int_at_least(0)


def positive_float(text: str) -> float:
    """``argparse`` type: a finite number ``> 0``."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text}")
    return v


def device(p: argparse.ArgumentParser, text: str) -> torch.device:
    """``--device``: ``auto`` (CUDA when there is one, else the CPU), ``cpu``, ``cuda`` or
    ``cuda:N`` of a device this machine has; anything else is ``p.error``."""
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        p.error(f"--device: expected auto, cpu, cuda or cuda:N, got {text!r}")
    if dev.type not in ("cpu", "cuda"):
        p.error(f"--device: expected auto, cpu, cuda or cuda:N, got {text!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            p.error(f"--device {text}: this machine has no CUDA device (use cpu or auto)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            p.error(f"--device {text}: this machine has {torch.cuda.device_count()} CUDA "
                    "device(s)")
    return dev


def out_dir(p: argparse.ArgumentParser, path: str) -> str:
    """``--out`` as a folder: refused if it exists as something else (``makedirs`` raised
    only after the first measurement)."""
    if os.path.exists(path) and not os.path.isdir(path):
        p.error(f"--out {path}: exists and is not a folder")
    return path
