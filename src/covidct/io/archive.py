"""Zip archives (a PACS, CD or TCIA export): unpacked once into a temporary folder that lives until the
process ends (a DICOM SEG written later re-reads the source headers from there), then read like the
folder or the single file they hold."""

from __future__ import annotations

import atexit
import shutil
import tempfile
import zipfile
from pathlib import Path

from covidct.errors import InputError

_UNPACKED: dict[Path, Path] = {}


def is_zip(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() == ".zip"


def unpacked(path: Path) -> Path:
    """The folder ``path``'s members were unpacked into (once per process), or the one file it holds."""
    path = Path(path).resolve()
    if path not in _UNPACKED:
        try:
            with zipfile.ZipFile(path) as archive:
                if not any(not m.is_dir() for m in archive.infolist()):
                    raise InputError(path, "zip archive holds no files")
                target = Path(tempfile.mkdtemp(prefix="covidct-zip-"))
                atexit.register(shutil.rmtree, target, True)
                archive.extractall(target)  # member names with '..' or a leading '/' stay inside target
        except zipfile.BadZipFile as exc:
            raise InputError(path, f"not a readable zip archive ({exc})") from None
        except (OSError, RuntimeError, NotImplementedError) as exc:  # truncated, encrypted, unknown compression
            raise InputError(path, f"cannot unpack the zip archive ({type(exc).__name__}: {exc})") from None
        _UNPACKED[path] = target
    root = _UNPACKED[path]
    files = [p for p in root.rglob("*") if p.is_file()]
    return files[0] if len(files) == 1 else root


def member_name(archive: Path, unpacked_path: str | Path) -> str | None:
    """The name inside ``archive`` (already unpacked) of an unpacked file or folder; ``None`` for the
    archive's root or a path outside it."""
    root = _UNPACKED.get(Path(archive).resolve())
    if root is None or not Path(unpacked_path).is_relative_to(root) or Path(unpacked_path) == root:
        return None
    return Path(unpacked_path).relative_to(root).as_posix()
