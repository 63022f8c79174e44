"""The training process's heap settings (`rnmt.heap`)."""

from __future__ import annotations

import ctypes
import platform
import subprocess
import sys

import pytest

# In a fresh process: free a tensor of 20 MB and print how much free memory glibc keeps at
# the top of its heap afterwards (mallinfo2's keepcost, in MB).
FREE_AND_LOOK = """
import ctypes, sys, torch
from rnmt.heap import keep_freed_memory
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "kept":
    assert keep_freed_memory()
block = torch.ones(20 << 18)  # float32: 20 MB
del block
print(libc.mallinfo2().keepcost / (1 << 20))
"""


def _kept_after_free(mode: str) -> float:
    return float(subprocess.run([sys.executable, "-c", FREE_AND_LOOK, mode],
                                capture_output=True, text=True, check=True).stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc"
                    or not hasattr(ctypes.CDLL(None), "mallinfo2"),
                    reason="glibc's malloc options (mallinfo2: glibc 2.33 or newer)")
def test_a_training_process_keeps_the_memory_it_frees_for_the_next_batch():
    # By default the block goes back to the kernel when freed (the next batch would fault
    # its pages in again); with the training settings it stays at the top of the heap.
    assert _kept_after_free("default") < 5
    assert _kept_after_free("kept") >= 20
