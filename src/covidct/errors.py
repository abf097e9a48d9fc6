"""Errors that the CLI turns into one clear line (``covidct: <path>: <reason>``)."""

from __future__ import annotations

from pathlib import Path


class CovidctError(Exception):
    """A user-facing failure: bad input, missing file, unusable model file.

    ``path`` names the file or folder at fault, ``reason`` says what is wrong with it.
    """

    def __init__(self, path: str | Path | None, reason: str) -> None:
        self.path = None if path is None else str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}" if self.path else reason)


class InputError(CovidctError):
    """An input file or folder cannot be read or is not what the command needs."""


def require_folder(path: str | Path, *, hint: str = "") -> Path:
    """``path`` as a Path if it is a folder; else one ``InputError`` naming it: "no such folder", or
    "not a folder" (followed by `` (hint)``) when it is something else."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "no such folder")
    if not path.is_dir():
        raise InputError(path, f"not a folder ({hint})" if hint else "not a folder")
    return path
