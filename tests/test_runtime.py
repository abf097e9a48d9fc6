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
