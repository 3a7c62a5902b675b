"""Published context: the paper's claims and VGG-16 / CIFAR-10 structured-pruning results.

Numbers as reported by their authors (CIFAR-10 test accuracy, %, of the unpruned baseline
and of the pruned, fine-tuned network; fraction of parameters and FLOPs removed). Their
baseline is the ~15 M-parameter VGG-16 with BatchNorm and a 512-wide classifier, ours the
paper's 33.6 M-parameter model with two 4096-wide hidden layers — whose classifier alone is
about 19 M parameters and is easy to prune — so the fractions are not directly comparable.
"""

from __future__ import annotations

__all__ = ["PUBLISHED", "PAPER_CLAIMS", "PUBLISHED_CAVEAT"]

#: (method, venue, baseline acc, pruned acc, % params removed, % FLOPs removed)
PUBLISHED: list[dict[str, object]] = [
    {"method": "L1-norm filter pruning (Li et al.)", "venue": "ICLR 2017", "baseline": 93.25,
     "pruned": 93.40, "params_pct": 64.0, "flops_pct": 34.2},
    {"method": "HRank (Lin et al.)", "venue": "CVPR 2020", "baseline": 93.96,
     "pruned": 93.43, "params_pct": 82.9, "flops_pct": 53.5},
    {"method": "HRank (Lin et al.)", "venue": "CVPR 2020", "baseline": 93.96,
     "pruned": 92.34, "params_pct": 82.1, "flops_pct": 65.3},
    {"method": "HRank (Lin et al.)", "venue": "CVPR 2020", "baseline": 93.96,
     "pruned": 91.23, "params_pct": 92.0, "flops_pct": 76.5},
    {"method": "CHIP (Sui et al.)", "venue": "NeurIPS 2021", "baseline": 93.96,
     "pruned": 93.86, "params_pct": 81.6, "flops_pct": 58.1},
    {"method": "CHIP (Sui et al.)", "venue": "NeurIPS 2021", "baseline": 93.96,
     "pruned": 93.18, "params_pct": 87.3, "flops_pct": 78.6},
]

PUBLISHED_CAVEAT = (
    "These results prune the standard CIFAR VGG-16 with BatchNorm (about 15 M parameters, a "
    "512-wide classifier), not the paper's 33.6 M-parameter TSRA model with two 4096-wide "
    "hidden layers (of which the classifier alone is about 19 M parameters, most of it "
    "removable): equal percentages do not mean equal difficulty. Numbers are as reported by "
    "their authors, after fine-tuning.")

#: The paper's headline claims (method.md §6), for the side-by-side.
PAPER_CLAIMS: dict[str, str] = {
    "gap": "TSRA model 4.52 points below the ReLU control",
    "fixed": "CoB beats the TSRA baseline at every ratio (fixed ratio, no fine-tuning)",
    "frontier": "reliable frontier moves from about 30% (baseline) to about 70% (CoB) of "
                "parameters pruned",
    "threshold": "threshold pruning + fine-tuning: 90–96% of parameters pruned for a 1–6 point "
                 "drop",
    "lossless": "the first classifier layer saturates at 2·(512+1) = 1026 of 4096 directions",
}
