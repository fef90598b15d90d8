"""Where mergefleet keeps what it can compute again: ``$XDG_CACHE_HOME/mergefleet/<kind>``
(``~/.cache/mergefleet/<kind>`` when the variable is unset). Every cache has a setting
that overrides it (``fleet.eval.cache_dir``, ``fleet.storage.cache_dir``, a scratch
directory); this is only the default."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(kind: str) -> Path:
    """The default directory of one cache (``eval``: scores; ``converted``: pickle checkpoints
    converted to safetensors). It is read from the environment when called, not at import."""
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "mergefleet" / kind
