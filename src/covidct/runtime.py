"""Process-wide settings that the command line applies to its own process (a library caller keeps
its own): glibc's allocator told to keep freed memory for reuse.

By default glibc hands every freed block above a dynamic threshold back to the kernel and maps it again
on the next allocation, so the activations of each batch are paged in afresh: ``covidct analyze`` on a
148-slice series took 2.3 M minor page faults and 6.6 s of system time. With a fixed 32 MiB mmap
threshold and no trimming: 0.74 M faults, 2.7 s, 22.8 -> 19.6 s wall, peak RSS unchanged (1.69 / 1.73 GB;
``benchmarks/RESULTS.md``, scan-level analysis). :func:`release_freed_memory` hands the kept heap back
when a later step needs large fresh blocks instead (the DICOM SEG writer of ``analyze --dicom-seg``).

:func:`drop_unused_gpu_libraries`: the PyTorch build that runs here is a CUDA build, whose ``import torch``
loads its GPU libraries (cuBLAS, NVRTC, nvJitLink, ``libtorch_cuda``, …) and leaves about 0.27 GB of their
pages resident. On a machine without a usable GPU nothing calls them: the command line asks the kernel to drop
those pages from its process (``madvise(MADV_PAGEOUT)``; clean file pages are simply let go and read again
from the file if ever touched, so nothing changes but the resident memory).
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


#: Parts of the file names of the shared libraries a CUDA build of PyTorch loads for the GPU alone.
GPU_LIBRARY_MARKERS = ("/nvidia/", "libtorch_cuda", "libc10_cuda", "libcudnn", "libcublas", "libcusparse", "libcufft",
                       "libcurand", "libcusolver", "libnccl", "libnvrtc", "libnvJitLink", "libcudart", "libcupti",
                       "libnvshmem", "libnvToolsExt")
_MADV_PAGEOUT = 21   # Linux 5.4+


def gpu_library_mappings(maps_text: str) -> list[tuple[int, int, str]]:
    """``(start, end, path)`` of the memory mappings in a ``/proc/PID/maps`` text that belong to GPU libraries."""
    out = []
    for line in maps_text.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) < 6 or not any(marker in fields[5] for marker in GPU_LIBRARY_MARKERS):
            continue
        start, end = (int(v, 16) for v in fields[0].split("-"))
        out.append((start, end, fields[5].strip()))
    return out


def drop_unused_gpu_libraries() -> int:
    """Ask the kernel to drop this process's resident pages of PyTorch's GPU libraries when no GPU is usable
    (``torch`` imported, ``torch.cuda.is_available()`` false); the number of bytes of mappings so advised (0
    where that does not apply: torch not imported, a GPU present, not Linux, no ``madvise``)."""
    torch = sys.modules.get("torch")
    if torch is None or not sys.platform.startswith("linux") or torch.cuda.is_available():
        return 0
    madvise = _glibc_function("madvise", (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int), ctypes.c_int)
    try:
        with open("/proc/self/maps") as fh:
            mappings = gpu_library_mappings(fh.read())
    except OSError:
        return 0
    if madvise is None:
        return 0
    return sum(end - start for start, end, _ in mappings if madvise(start, end - start, _MADV_PAGEOUT) == 0)
