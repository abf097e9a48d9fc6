"""JSON output (atomic) with the disclaimer attached."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from covidct import DISCLAIMER
from covidct.io.atomic import write_bytes_atomic


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
    return write_bytes_atomic((to_json(obj, disclaimer=disclaimer) + "\n").encode("utf-8"), path)
