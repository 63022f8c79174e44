"""The training process's heap settings (`rnmt.heap`)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

# Batches of tensors of changing sizes (as training batches are), allocated and freed
# again and again: the page faults of the last 50 rounds, per round.
ROUNDS = """
import random, resource, sys, torch
from rnmt.heap import keep_freed_memory
if sys.argv[1] == "kept":
    assert keep_freed_memory()
rng = random.Random(0)
def batch():
    held = [torch.ones(rng.randrange(1 << 16, 1 << 22)) for _ in range(8)]
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    batch()
start = faults()
for _ in range(50):
    batch()
print((faults() - start) / 50)
"""


def _faults_per_round(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", ROUNDS, mode], capture_output=True,
                         text=True, check=True)
    return float(out.stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc options")
def test_a_training_process_reuses_freed_memory_instead_of_faulting_in_fresh_pages():
    default, kept = _faults_per_round("default"), _faults_per_round("kept")
    # Measured: about 1,400 faults per round by default, about 12 with the settings.
    assert default > 300
    assert kept < default / 10
