"""Memory allocator settings for commands that stream large tensors (`medmerge merge`).

A streaming merge allocates and frees a few tensors of 1–190 MB for every weight of the model. By
default each one costs fresh pages from the kernel, one 4 KiB page fault at a time, and in a virtual
machine each first touch may also fault on the host:

- glibc serves blocks over its dynamic mmap threshold with a new mmap, and hands memory freed at the
  top of its heap back to the kernel (trim), so the next tensor faults its pages in again;
- torch's CPU allocator does not ask for transparent huge pages unless `THP_MEM_ALLOC_ENABLE=1`.

`tune_for_streaming()` keeps freed blocks of up to 32 MiB (glibc's largest mmap threshold) in the heap
for reuse, trims only above 4 GiB free, and lets torch back blocks of 2 MiB or more with huge pages.
The peak resident memory is unchanged (the same tensors are alive at the peak); the merge of two 360M
experts took 2.1–2.5 s instead of 3.7 s (task arithmetic) and 7.9–8.8 s instead of 13.7–16.8 s
(karcher), measured side by side on 2 cores. Call it before torch is imported; the settings apply to
this process only. `MEDMERGE_ALLOCATOR=default` leaves both allocators as they are.

Weights files are read through memory maps (medmerge.merge.tensors), not these allocators.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc refuses a larger one (half its heap size on 64-bit)
TRIM_THRESHOLD = 4 << 30


def tune_for_streaming() -> bool:
    """Apply the settings above to this process; False where they do not apply (not glibc, torch already
    imported, or MEDMERGE_ALLOCATOR=default)."""
    if os.environ.get("MEDMERGE_ALLOCATOR", "") == "default" or "torch" in sys.modules:
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: leave their allocator alone
        return False
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # read by torch at its first allocation
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
