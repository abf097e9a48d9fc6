"""Process-wide settings that the command line applies to its own process (a library caller keeps
its own): glibc's allocator told to keep freed memory for reuse.

By default glibc hands every freed block above a dynamic threshold back to the kernel and maps it again
on the next allocation, so the activations of each batch are paged in afresh: ``covidct analyze`` on a
148-slice series took 2.3 M minor page faults and 6.6 s of system time. With a fixed 32 MiB mmap
threshold and no trimming: 0.74 M faults, 2.7 s, 22.8 -> 19.6 s wall, peak RSS unchanged (1.69 / 1.73 GB;
``benchmarks/RESULTS.md``, scan-level analysis). :func:`release_freed_memory` hands the kept heap back
when a later step needs large fresh blocks instead (the DICOM SEG writer of ``analyze --dicom-seg``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: Blocks up to this size come from the heap and are reused (glibc's maximum: 32 MiB on 64-bit).
MMAP_THRESHOLD = 32 * 1024 * 1024
#: Free memory at the top of the heap is returned to the kernel only above this.
TRIM_THRESHOLD = 2**31 - 1


def _glibc_function(name: str, argtypes: tuple, restype):
    """The C library's function ``name`` with its signature set, or None where it does not exist (not
    Linux, no loadable libc, not glibc)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None
    function.argtypes, function.restype = argtypes, restype
    return function


def keep_freed_memory() -> bool:
    """Tune glibc ``malloc`` (``mallopt``) to reuse freed memory; False where that does not apply
    (not Linux, not glibc) or the call fails."""
    mallopt = _glibc_function("mallopt", (ctypes.c_int, ctypes.c_int), ctypes.c_int)
    if mallopt is None:
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def release_freed_memory() -> bool:
    """Hand the heap's free pages back to the kernel now (glibc ``malloc_trim(0)``): after the
    inference stages, before a step that needs large fresh blocks (the DICOM SEG writer); False where
    that does not apply or nothing was released."""
    malloc_trim = _glibc_function("malloc_trim", (ctypes.c_size_t,), ctypes.c_int)
    return malloc_trim is not None and bool(malloc_trim(0))
