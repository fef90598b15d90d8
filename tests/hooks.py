"""Hooks the tests hand to shards running in other processes (so: importable, picklable)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class HoldShard:
    """A ``PauseHook`` that holds shard ``index`` once ``after`` of its tensors are written
    (its file still open, under its temporary name) and writes this process's pid to
    ``flag``: the test kills the process there, mid-shard, every time."""

    index: int
    after: int
    flag: str
    timeout_s: float = 300.0

    def __call__(self, index: int, written: int) -> None:
        if index != self.index or written != self.after:
            return
        announced = Path(f"{self.flag}.partial")
        announced.write_text(str(os.getpid()))
        announced.replace(self.flag)  # the flag appears with the whole pid in it
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            time.sleep(0.1)
        raise TimeoutError(f"shard {index} was held {self.timeout_s:.0f} s and nobody killed it")
