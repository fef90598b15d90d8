"""One way to hash a JSON-shaped value: the same value gives the same digest in every
process and on every machine (keys sorted, default separators), so plan ids, recipe
hashes, cache keys and fingerprints are stable across runs and versions of mergefleet."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def stable_hash(value: Any, *, length: int = 64) -> str:
    """The sha256 (hex, first ``length`` digits) of ``value`` as canonical JSON.

    Objects JSON does not know (a ``Path``) are hashed as their ``str``.
    """
    text = json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]
