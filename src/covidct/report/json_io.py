"""Atomic JSON output with the disclaimer attached."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from covidct import DISCLAIMER


def _clean(obj: Any) -> Any:
    """NaN/inf -> None so that the file is strict JSON."""
    if isinstance(obj, float):
        return None if math.isnan(obj) or math.isinf(obj) else obj
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def to_json(obj: dict[str, Any], *, disclaimer: bool = True) -> str:
    data = {**obj, "disclaimer": DISCLAIMER} if disclaimer else obj
    return json.dumps(_clean(data), indent=2)


def write_json(obj: dict[str, Any], path: str | Path, *, disclaimer: bool = True) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(to_json(obj, disclaimer=disclaimer) + "\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
