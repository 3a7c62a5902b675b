"""The ``cobkern`` command line: :func:`cobkern.cli.main.main`."""
