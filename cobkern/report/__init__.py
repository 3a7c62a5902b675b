"""Reports of an experiment directory: summary.json, CSV tables, PNG figures, report.md.

:func:`build_report` reads only the files the experiment steps wrote (``OUT/config.json``,
``OUT/metrics.jsonl``, ``OUT/calibration.pt``, ``OUT/train*/final.json``), so re-running it
never recomputes anything. Modules: :mod:`.analysis` (curves, the reliable frontier),
:mod:`.summary` (the numbers), :mod:`.figures` (PNG plots), :mod:`.markdown` (the page),
:mod:`.build` (reads the run directory, writes everything), :mod:`.published` (the
paper's claims and published results, for context).
"""

from .analysis import curve, dedupe, reliable_frontier, select
from .build import build_report
from .published import PAPER_CLAIMS, PUBLISHED, PUBLISHED_CAVEAT
from .summary import summarize

__all__ = ["build_report", "summarize", "reliable_frontier", "curve", "select", "dedupe",
           "PUBLISHED", "PAPER_CLAIMS", "PUBLISHED_CAVEAT"]
