"""``python -m mergefleet``: the same command line as the ``mergefleet`` script."""

import sys

from mergefleet.cli import main

sys.exit(main())
