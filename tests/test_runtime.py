"""Process-wide allocator settings of the command line."""

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
