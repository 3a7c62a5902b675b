"""Per-device launch tables for the TSRA kernels, measured on the GPU they describe.

The TSRA launchers choose a tile with a fixed heuristic (``cobkern.kernels.tsra``:
:data:`~cobkern.kernels.tsra.TILE_BYTES`, :data:`~cobkern.kernels.tsra.BYTES_PER_THREAD`,
at least four warps). The fastest tile depends on the GPU, so a *tuning table* may override
it for the problems it was measured on. A table is the output of ``bench/gpu_diag.py``'s tile
sweep (CUDA-graph replay of every candidate at the VGG-16 shapes): for each problem whose
fastest candidate beat the heuristic's launch, the winning launch. The same idea as vLLM's
per-device MoE configs, at the scale of one activation.

Which table applies (first match):

1. ``COBKERN_TSRA_TUNING=off`` — none: the heuristic everywhere.
2. ``COBKERN_TSRA_TUNING=/path/table.json`` — that table, on every device (also on CPU
   tensors under ``TRITON_INTERPRET=1``, which is how the tests exercise it).
3. The shipped table named after the CUDA device, ``cobkern/ops/tuning_tables/<name>.json``
   with ``<name>`` = :func:`table_name` of ``torch.cuda.get_device_name`` (for example
   ``NVIDIA_H200.json``), if there is one.

Which entry applies: the same direction, element size (2 for bf16/fp16, 4 for fp32),
layout (channel-major or channels-last), channel count ``C`` and ``split`` as the launch —
the row geometry of a program's tile and its channel masks, which decide its registers —
and, for channels-last and 2-D inputs, the measured ``P`` nearest to the launch's within a
factor of two (``P`` counts every position of the batch, so this is another batch size of
the same layer; ties go to the smaller). Channel-major (NCHW) inputs need the exact ``P``:
there ``P`` is one image's ``H·W`` whatever the batch, so another ``P`` is another layer
shape (and small maps compile a ``SMALL_P`` specialisation of their own). Anything else keeps the
heuristic, which the AOT suite checks at pruned widths and unbalanced splits: a tile
measured spill-free at C = 512 can spill at a pruned C = 385, whose masked rows cost
registers (sm_90 AOT: a 1-warp fp32 forward of 64 elements per thread, 255 registers and a
16-byte spill). The chunked kernels (``C`` above
:data:`~cobkern.kernels.tsra.MAX_TILE_CHANNELS`) are never overridden.

The op: an entry with ``"rmsnorm": true`` was measured on RMSNorm→TSRA and serves only its
launches, ``false`` only plain TSRA's; an entry without the field (the tables written
before the sweep timed RMSNorm→TSRA) serves both. Where entries of both kinds match, the one
measured on the launch's own op wins. The two ops load and store the same bytes, but on
the H200 of 2026-11-27 the bf16 NCHW backward at 1024×64×32×32 took 0.129 ms for
RMSNorm→TSRA against 0.098 ms for TSRA with the same (TSRA-tuned) tile, so each is tuned
on its own.

Lookups are cached per (device, table setting, problem): a launch pays one cache hit, and
a table file is read once per process and setting (a bad one fails the first launch with an
error naming the file and entry). A table changes only which tile computes the same
function; results agree with the heuristic launch to float32 rounding (the order of the
channel reductions differs), and a given table is deterministic.

File format (JSON; ``…`` stands for the measured values)::

    {"format": "cobkern-tsra-tuning/1",
     "device": "NVIDIA H200", "torch": …, "triton": …, "date": …,
     "entries": [{"direction": "backward", "itemsize": 2, "channels_last": false,
                  "C": 64, "split": 32, "P": 1024,
                  "tile_elems": 1024, "elems_per_thread": 32, "num_warps": 1, "vec_p": 2,
                  "rmsnorm": true, "ms": …, "default_ms": …}]}

``ms`` / ``default_ms`` (the winner's and the heuristic's kernel time) are a record and are
not used for the lookup; ``rmsnorm`` is optional (absent: either op); so is
``programs_per_sm`` (backward entries only; absent or ``0``: one program per tile, else the
streaming backward kernel with that many programs per multiprocessor,
:func:`cobkern.kernels.tsra.specialization`); the other entry fields are required.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import torch

__all__ = ["ENV_VAR", "FORMAT", "TABLE_DIR", "TuningEntry", "TuningTable", "launch_tuning",
           "load_table", "table_for_device", "table_name"]

#: Environment variable: ``off``, or the path of a table to use on every device.
ENV_VAR = "COBKERN_TSRA_TUNING"

# ``os.environ.get`` of an unset variable costs ~0.6 µs (a KeyError raised and caught inside
# the mapping), and every eager launch reads this one; CPython's environ keeps its encoded
# copy in ``_data``, a plain dict read in ~0.03 µs. ``os.environ`` writes go through it, so
# it is always current; where it is missing (another Python), the public read is used.
_ENV_DATA = getattr(os.environ, "_data", None)
try:
    _ENV_KEY = os.environ.encodekey(ENV_VAR)  # type: ignore[attr-defined]
    _ENV_DECODE = os.environ.decodevalue  # type: ignore[attr-defined]
except AttributeError:
    _ENV_DATA = None


def env_setting() -> str | None:
    """The value of :data:`ENV_VAR` in the environment now (``None`` when unset), as
    ``os.environ.get`` returns it — read cheaply, since every eager launch asks."""
    if isinstance(_ENV_DATA, dict):
        value = _ENV_DATA.get(_ENV_KEY)
        return None if value is None else _ENV_DECODE(value)
    return os.environ.get(ENV_VAR)
#: The ``format`` field of a version-1 table.
FORMAT = "cobkern-tsra-tuning/1"
#: Folder of the shipped per-device tables.
TABLE_DIR = Path(__file__).with_name("tuning_tables")

_DIRECTIONS = ("forward", "backward")
_WARPS = (1, 2, 4, 8, 16, 32)
_EMPTY: Mapping[str, int] = MappingProxyType({})


def table_name(device_name: str) -> str:
    """File stem of the table for a device name: runs of non-alphanumerics become ``_``.

    >>> table_name("NVIDIA H100 80GB HBM3")
    'NVIDIA_H100_80GB_HBM3'
    """
    return re.sub(r"[^0-9A-Za-z]+", "_", device_name).strip("_")


def _pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


@dataclass(frozen=True)
class TuningEntry:
    """One measured problem and its fastest launch.

    Attributes:
        direction: ``"forward"`` or ``"backward"``.
        itemsize: bytes per element of the activations (2: bf16/fp16, 4: fp32).
        channels_last: ``True`` for channels-last / row-major 2-D inputs (reduction axis
            contiguous), ``False`` for channel-major (NCHW).
        C, P: channels and positions per row of the kernels' ``(B, C, P)`` view
            (``cobkern.ops._checks.ChannelGeometry``).
        split: size of the first subspace.
        tuning: the launcher overrides: ``tile_elems``, ``elems_per_thread``, ``num_warps``
            and ``vec_p`` (``0``: uncapped position vectors), and ``programs_per_sm`` where
            the entry streams (backward only; absent: one program per tile).
        rmsnorm: the op it was measured on — ``True`` RMSNorm→TSRA, ``False`` TSRA —
            and serves; ``None``: either (module docstring).
    """

    direction: str
    itemsize: int
    channels_last: bool
    C: int
    split: int
    P: int
    tuning: Mapping[str, int]
    rmsnorm: bool | None = None


@dataclass(frozen=True)
class TuningTable:
    """A validated tuning table (see the module docstring); build with :func:`load_table`."""

    source: str
    device: str
    entries: tuple[TuningEntry, ...]

    def lookup(self, direction: str, itemsize: int, channels_last: bool, C: int, split: int,
               P: int, rmsnorm: bool = False) -> Mapping[str, int]:
        """The overrides for one launch (``rmsnorm``: of RMSNorm→TSRA), or an empty mapping
        (keep the heuristic)."""
        from cobkern.kernels.tsra import MAX_TILE_CHANNELS

        if C > MAX_TILE_CHANNELS:
            return _EMPTY
        best, best_key = _EMPTY, None
        for e in self.entries:
            if (e.direction, e.itemsize, e.channels_last, e.C, e.split) != (
                    direction, itemsize, channels_last, C, split):
                continue
            if e.rmsnorm is not None and e.rmsnorm != rmsnorm:  # measured on the other op
                continue
            # channel-major: P is one image's map (the batch is B), so another P is another
            # layer shape — and possibly another SMALL_P specialisation: exact match only
            dp = abs(math.log2(P / e.P))
            serves = dp <= 1 if channels_last else P == e.P
            key = (e.rmsnorm is None, dp, e.P)  # the launch's own op first
            if serves and (best_key is None or key < best_key):
                best, best_key = e.tuning, key
        return best


def _entry(source: str, i: int, raw: object) -> TuningEntry:
    where = f"{source}: entry {i}"
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected an object, got {type(raw).__name__}")
    missing = [k for k in ("direction", "itemsize", "channels_last", "C", "split", "P",
                           "tile_elems",
                           "elems_per_thread", "num_warps", "vec_p") if k not in raw]
    if missing:
        raise ValueError(f"{where}: missing field(s) {missing}")

    def integer(name: str, ok, need: str) -> int:
        v = raw[name]
        if isinstance(v, bool) or not isinstance(v, int) or not ok(v):
            raise ValueError(f"{where}: {name} must be {need}, got {v!r}")
        return v

    if raw["direction"] not in _DIRECTIONS:
        raise ValueError(f"{where}: direction must be one of {_DIRECTIONS}, "
                         f"got {raw['direction']!r}")
    if not isinstance(raw["channels_last"], bool):
        raise ValueError(f"{where}: channels_last must be true or false, "
                         f"got {raw['channels_last']!r}")
    rmsnorm = raw.get("rmsnorm")
    if rmsnorm is not None and not isinstance(rmsnorm, bool):
        raise ValueError(f"{where}: rmsnorm must be true, false or absent, got {rmsnorm!r}")
    tuning = {
        "tile_elems": integer("tile_elems", lambda v: _pow2(v) and v >= 32,
                              "a power of two >= 32"),
        "elems_per_thread": integer("elems_per_thread", _pow2, "a power of two"),
        "num_warps": integer("num_warps", lambda v: v in _WARPS, f"one of {_WARPS}"),
        "vec_p": integer("vec_p", lambda v: v == 0 or (_pow2(v) and v <= 16),
                         "0 or a power of two <= 16"),
    }
    if raw.get("programs_per_sm", 0) != 0:
        tuning["programs_per_sm"] = integer("programs_per_sm", lambda v: 0 <= v <= 64,
                                            "an int in [0, 64]")
        if raw["direction"] != "backward":
            raise ValueError(f"{where}: programs_per_sm (the streaming kernel) is a backward "
                             f"option, got it on a {raw['direction']} entry")
        from cobkern.kernels.tsra import MAX_TILE_CHANNELS, SPLIT_ALIGN

        c, sp = raw.get("C"), raw.get("split")
        if isinstance(c, int) and isinstance(sp, int) and (
                c > MAX_TILE_CHANNELS or (raw["channels_last"] and sp % SPLIT_ALIGN)):
            # the launcher takes the tile or chunked kernel there: the entry loaded, then its
            # first launch failed naming neither the file nor the entry
            raise ValueError(f"{where}: programs_per_sm (the streaming kernel) needs the split "
                             f"kernels: C <= {MAX_TILE_CHANNELS} and, channels-last, a split "
                             f"that is a multiple of {SPLIT_ALIGN}; got C={c}, split={sp}")
    return TuningEntry(
        direction=raw["direction"],
        itemsize=integer("itemsize", lambda v: v in (2, 4), "2 or 4"),
        channels_last=raw["channels_last"],
        C=integer("C", lambda v: v >= 2, "an int >= 2"),
        split=integer("split", lambda v: 1 <= v < raw["C"], "in [1, C)"),
        P=integer("P", lambda v: v >= 1, "an int >= 1"),
        tuning=MappingProxyType(tuning),
        rmsnorm=rmsnorm,
    )


def load_table(path: str | os.PathLike) -> TuningTable:
    """Read and validate a tuning table; errors name the file and the offending entry.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not JSON, another ``format``, a malformed entry, or two entries for
            the same problem.
    """
    source = os.fspath(path)
    try:
        with open(source) as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{source}: not a JSON tuning table ({e})") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        got = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
        raise ValueError(f"{source}: expected a tuning table with \"format\": \"{FORMAT}\" "
                         f"(written by bench/gpu_diag.py), got {got!r}")
    if not isinstance(raw.get("entries"), list):
        raise ValueError(f"{source}: \"entries\" must be a list")
    entries = tuple(_entry(source, i, e) for i, e in enumerate(raw["entries"]))
    seen: dict[tuple, int] = {}
    for i, e in enumerate(entries):
        key = (e.direction, e.itemsize, e.channels_last, e.C, e.split, e.P, e.rmsnorm)
        if key in seen:
            raise ValueError(f"{source}: entries {seen[key]} and {i} both describe {key}")
        seen[key] = i
    return TuningTable(source=source, device=str(raw.get("device", "")), entries=entries)


@functools.lru_cache(maxsize=64)
def _table(device_type: str, device_index: int | None, setting: str | None) -> TuningTable | None:
    if setting is not None and setting.strip().lower() == "off":
        return None
    if setting:
        return load_table(setting)
    if device_type != "cuda":
        return None
    path = TABLE_DIR / f"{table_name(torch.cuda.get_device_name(device_index))}.json"
    return load_table(path) if path.is_file() else None


def table_for_device(device: torch.device | str) -> TuningTable | None:
    """The table that launches on ``device`` use now (module docstring), or ``None``."""
    device = torch.device(device)
    return _table(device.type, device.index, env_setting())


@functools.lru_cache(maxsize=4096)
def _lookup(device_type: str, device_index: int | None, setting: str | None, direction: str,
            itemsize: int, channels_last: bool, C: int, split: int,
            P: int, rmsnorm: bool) -> Mapping[str, int]:
    table = _table(device_type, device_index, setting)
    return (table.lookup(direction, itemsize, channels_last, C, split, P, rmsnorm) if table
            else _EMPTY)


#: :func:`launch_tuning`'s default ``setting``: the environment's value at the call.
FROM_ENV = object()


def launch_tuning(device: torch.device, direction: str, itemsize: int, channels_last: bool,
                  C: int, split: int, P: int, setting: str | None | object = FROM_ENV,
                  rmsnorm: bool = False) -> Mapping[str, int]:
    """Launcher overrides for one TSRA launch on ``device`` (empty: the heuristic).

    Args:
        device: the activations' device.
        direction: ``"forward"`` or ``"backward"``.
        itemsize: bytes per activation element.
        channels_last: the geometry's ``channels_contig``.
        C, split, P: the geometry's channels, the split, and positions per row.
        setting: the :data:`ENV_VAR` value to apply (``None``: unset); by default the
            environment's now.
        rmsnorm: the launch is RMSNorm→TSRA's (``False``: plain TSRA's).

    Returns:
        A read-only mapping of ``tile_elems``, ``elems_per_thread``, ``num_warps``,
        ``vec_p`` (and ``programs_per_sm`` for a streaming entry) — or an empty one.
        Cached; do not mutate.
    """
    if setting is FROM_ENV:
        setting = env_setting()
    return _lookup(device.type, device.index, setting, direction, min(max(itemsize, 2), 4),
                   channels_last, C, split, P, bool(rmsnorm))
