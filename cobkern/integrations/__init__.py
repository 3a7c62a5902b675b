"""Integrations with third-party libraries.

* :mod:`cobkern.integrations.torch_pruning` — register cobkern's :class:`~cobkern.nn.TSRA`,
  :class:`~cobkern.nn.RMSNorm` and :class:`~cobkern.nn.RMSNormTSRA` with
  `Torch-Pruning <https://github.com/VainF/Torch-Pruning>`_ (``pip install torch-pruning``),
  so any of its criteria can prune TSRA networks. Imported on demand: cobkern itself does not
  depend on Torch-Pruning.
"""

__all__ = ["torch_pruning"]
