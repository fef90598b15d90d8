"""Hugging Face libraries without the network: when every task is local, lm-eval,
``datasets`` and ``transformers`` run offline, and the environment is restored after."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from typing import Any, Iterator

_OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
_OFFLINE_CONSTANTS = (("huggingface_hub.constants", "HF_HUB_OFFLINE"), ("datasets.config", "HF_DATASETS_OFFLINE"), ("datasets.config", "HF_HUB_OFFLINE"))
_offline_lock = threading.Lock()
_offline_depth = 0
_offline_saved: list[tuple[Any, str, Any]] = []


@contextlib.contextmanager
def offline(enabled: bool = True) -> Iterator[None]:
    """Hugging Face libraries make no network call inside this block (when ``enabled``).

    They read these variables when first imported, so modules already imported get the
    same setting through their constants; everything is restored when the last of
    several concurrent blocks (a sweep's threads) ends."""
    global _offline_depth
    if not enabled:
        yield
        return
    with _offline_lock:
        if _offline_depth == 0:
            _offline_saved.clear()
            _offline_saved.extend((os.environ, key, os.environ.get(key)) for key in _OFFLINE_ENV)
            os.environ.update(_OFFLINE_ENV)
            for module_name, attribute in _OFFLINE_CONSTANTS:
                module = sys.modules.get(module_name)
                if module is not None and isinstance(getattr(module, attribute, None), bool):
                    _offline_saved.append((module, attribute, getattr(module, attribute)))
                    setattr(module, attribute, True)
        _offline_depth += 1
    try:
        yield
    finally:
        with _offline_lock:
            _offline_depth -= 1
            if _offline_depth == 0:
                for target, key, value in _offline_saved:
                    if target is os.environ:
                        if value is None:
                            os.environ.pop(key, None)
                        else:
                            os.environ[key] = value
                    else:
                        setattr(target, key, value)
                _offline_saved.clear()
