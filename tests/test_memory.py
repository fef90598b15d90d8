"""The allocator settings a merging process runs with: a freed large buffer is reused
without faulting its pages in again, and handed back to the kernel when asked."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="the settings are glibc's"
)

PROBE = """
import json, resource, sys, torch
from orchestrator.memory import keep_freed_memory, return_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else False
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def resident():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()
size = 256 << 20
buffer = torch.ones(size, dtype=torch.uint8)  # touched: every page faulted in
del buffer
before = faults()
buffer = torch.ones(size // 2, dtype=torch.uint8)  # the next, smaller tensor
again = faults() - before
del buffer
held = resident()
return_freed_memory()
print(json.dumps({"kept": kept, "faults_again": again, "pages": size // 2 // resource.getpagesize(), "returned": held - resident()}))
"""


def probe(mode: str) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE, mode], cwd=ROOT, capture_output=True, text=True, timeout=120, check=True)
    return json.loads(done.stdout)


def test_a_freed_buffer_is_reused_without_faulting_its_pages_again_and_returned_on_request() -> None:
    plain, kept = probe("plain"), probe("keep")
    assert kept["kept"] is True
    # glibc's default unmaps the freed 256 MiB block: the next tensor's pages are faulted in afresh
    assert plain["faults_again"] > plain["pages"] // 2, plain
    assert kept["faults_again"] < kept["pages"] // 20, kept
    # what was kept goes back when asked (most of the 256 MiB)
    assert kept["returned"] > (256 << 20) // 2, kept
