"""Reports of an experiment directory: summary.json, CSV tables, PNG figures, report.md.

:func:`build_report` reads only the files the experiment steps wrote (``OUT/config.json``,
``OUT/metrics.jsonl``, ``OUT/calibration.pt``, ``OUT/train*/final.json``), so re-running it
never recomputes anything.
"""

from .analysis import curve, dedupe, reliable_frontier, select
from .build import build_report, summarize
from .published import PAPER_CLAIMS, PUBLISHED, PUBLISHED_CAVEAT

__all__ = ["build_report", "summarize", "reliable_frontier", "curve", "select", "dedupe",
           "PUBLISHED", "PAPER_CLAIMS", "PUBLISHED_CAVEAT"]
