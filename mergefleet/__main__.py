"""``python -m mergefleet``: the same command line as the ``mergefleet`` script."""

from mergefleet.cli import run

run()
