"""``python -m cobkern``: the ``cobkern`` command line."""

import sys

from cobkern.cli.main import main

sys.exit(main())
