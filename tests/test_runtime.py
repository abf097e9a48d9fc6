"""Process-wide settings of the command line: the allocator, the GPU libraries of a CUDA build on a CPU."""

from __future__ import annotations

import platform
import sys

import pytest

from covidct import runtime


def test_keep_freed_memory_applies_on_glibc() -> None:
    on_glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert runtime.keep_freed_memory() is on_glibc


def test_keep_freed_memory_is_a_no_op_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime.sys, "platform", "darwin")
    assert runtime.keep_freed_memory() is False


def test_keep_freed_memory_without_a_loadable_libc(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args, **kwargs):
        raise OSError("no libc")

    monkeypatch.setattr(runtime.ctypes, "CDLL", fail)
    monkeypatch.setattr(runtime.sys, "platform", "linux")
    assert runtime.keep_freed_memory() is False


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS")) / 1024


@pytest.mark.skipif(not (sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"), reason="glibc only")
def test_release_freed_memory_hands_the_kept_heap_back() -> None:
    import numpy as np

    assert runtime.keep_freed_memory()
    blocks = [np.ones(1 << 20, np.uint8) for _ in range(300)]   # 300 MB of heap blocks (under the mmap threshold)
    del blocks                                                  # freed, but kept by the process
    kept = _rss_mb()
    assert runtime.release_freed_memory() is True
    assert _rss_mb() < kept - 200


def test_release_freed_memory_is_a_no_op_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime.sys, "platform", "darwin")
    assert runtime.release_freed_memory() is False


MAPS = """\
7f0000000000-7f0000100000 r--p 00000000 08:01 11 /venv/lib/python3.11/site-packages/torch/lib/libtorch_cpu.so
7f0000100000-7f0000300000 r-xp 00100000 08:01 12 /venv/lib/python3.11/site-packages/torch/lib/libtorch_cuda.so
7f0000300000-7f0000400000 r--p 00000000 08:01 13 /venv/lib/python3.11/site-packages/nvidia/cu13/lib/libcublasLt.so.13
7f0000400000-7f0000401000 rw-p 00000000 00:00 0
7f0000401000-7f0000402000 r--p 00000000 08:01 14 /usr/lib/x86_64-linux-gnu/libc.so.6
"""


def test_gpu_library_mappings_are_the_cuda_libraries_only() -> None:
    found = runtime.gpu_library_mappings(MAPS)
    assert [(hex(a), hex(b), p.rsplit("/", 1)[1]) for a, b, p in found] == [
        ("0x7f0000100000", "0x7f0000300000", "libtorch_cuda.so"),
        ("0x7f0000300000", "0x7f0000400000", "libcublasLt.so.13")]


def test_gpu_libraries_are_kept_with_a_gpu_or_without_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert runtime.drop_unused_gpu_libraries() == 0
    monkeypatch.delitem(runtime.sys.modules, "torch")
    assert runtime.drop_unused_gpu_libraries() == 0


def test_gpu_library_pages_leave_a_cpu_process() -> None:
    """In a fresh process with this machine's PyTorch: where it has GPU libraries and no GPU, their resident
    pages fall when the call advises them, and the process still computes."""
    import subprocess

    code = """
import json, torch, torchvision
from covidct import runtime

def resident_kb():
    total, on = 0, False
    with open("/proc/self/smaps") as fh:
        for line in fh:
            head = line.split()
            if "-" in head[0] and len(head) >= 5:
                on = len(head) >= 6 and any(m in head[5] for m in runtime.GPU_LIBRARY_MARKERS)
            elif on and head[0] == "Rss:":
                total += int(head[1])
    return total

before = resident_kb()
advised = runtime.drop_unused_gpu_libraries()
after = resident_kb()
y = torch.nn.functional.conv2d(torch.ones(1, 1, 8, 8), torch.ones(1, 1, 3, 3), padding=1)
print(json.dumps({"before": before, "after": after, "advised": advised, "cuda": torch.cuda.is_available(),
                  "sum": float(y.sum())}))
"""
    import json

    out = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert out["sum"] == 36 * 9 + 24 * 6 + 4 * 4   # 3x3 of ones on 8x8 ones, zero padding: inside, edges, corners
    if out["cuda"] or out["before"] == 0:
        pytest.skip("no GPU libraries resident (a CPU build of PyTorch) or a usable GPU")
    assert out["advised"] > 0 and out["after"] < out["before"]
