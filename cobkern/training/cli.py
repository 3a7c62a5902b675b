"""Command line: ``python -m cobkern.training --preset quick --out runs/quick``.

Settings resolve in this order (later wins): the preset (``--preset``, ``--arch``), a JSON
config file (``--config``; it may name ``"preset"`` and ``"arch"`` itself), then individual
flags (``--lr 3e-4``, ``--no-compile``, ...; one per :class:`TrainConfig` field).

Under ``torchrun --nproc_per_node=N -m cobkern.training ...`` the same command trains with
DistributedDataParallel. Errors in the input (missing data, corrupt cache, bad checkpoint,
unknown preset or setting) print one ``error:`` line and exit with status 2; ``--debug``
shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, fields

from cobkern.cli.main import DefaultsHelpFormatter
from cobkern.data import DataError
from cobkern.models import ModelFileError

from .checkpoint import CheckpointError
from .config import ConfigError, TrainConfig, apply_overrides, get_preset, load_config_file
from .trainer import train

__all__ = ["main", "build_parser", "resolve_config"]

_USER_ERRORS = (ConfigError, DataError, CheckpointError, ModelFileError, FileNotFoundError)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (one flag per :class:`TrainConfig` field)."""
    p = argparse.ArgumentParser(
        prog="python -m cobkern.training",
        description="Train VGG-16 (TSRA or ReLU) on CIFAR-10.",
        formatter_class=DefaultsHelpFormatter)
    p.add_argument("--preset", default=None,
                   help="paper | fast | quick (default: quick, or the config file's preset)")
    p.add_argument("--arch", default=None, choices=["tsra", "relu"],
                   help="model family (default: the --config file's arch, else tsra)")
    p.add_argument("--config", default=None, help="JSON file of settings")
    p.add_argument("--out", default=None, help="run directory (default: runs/<preset>-<arch>)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved settings as JSON and exit")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    g = p.add_argument_group("settings (override the preset and config file)")
    for f in fields(TrainConfig):
        if f.name == "arch":
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = f.type if isinstance(f.type, str) else f.type.__name__
        if kind.startswith("bool"):
            g.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                           default=None)
        else:
            g.add_argument(flag, dest=f.name, default=None, metavar=kind.split(" ")[0].upper())
    return p


def resolve_config(args: argparse.Namespace) -> TrainConfig:
    """Preset, then config file, then flags."""
    file_values = load_config_file(args.config) if args.config else {}
    preset = args.preset or file_values.pop("preset", None) or "quick"
    file_values.pop("preset", None)
    arch = args.arch or file_values.pop("arch", None) or "tsra"
    file_values.pop("arch", None)
    config = get_preset(preset, arch)
    config = apply_overrides(config, file_values)
    flags = {f.name: getattr(args, f.name) for f in fields(TrainConfig)
             if f.name != "arch" and getattr(args, f.name, None) is not None}
    config = apply_overrides(config, flags)
    args.preset, args.arch = preset, arch
    return config


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 2 bad input, 130 interrupted)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = resolve_config(args)
        if args.print_config:
            print(json.dumps(asdict(config), indent=1))
            return 0
        out = args.out or f"runs/{args.preset}-{args.arch}"
        result = train(config, out, resume=args.resume)
    except _USER_ERRORS as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted; continue with --resume (from the last checkpoint)",
              file=sys.stderr)
        return 130
    if result.get("world_size", 1) == 1 or _is_rank0():
        acc = result["test_accuracy"]
        print(f"done: {result['steps']} steps, test accuracy {acc:.4f}, "
              f"{result['elapsed_s']:.0f} s, model {result['model_path']}")
    return 0


def _is_rank0() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"
