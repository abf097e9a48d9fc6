"""Where the data live: one setting, ``COVIDCT_DATA`` (default ``../shared/data``)."""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "COVIDCT_DATA"


def data_root() -> Path:
    """The data folder: ``$COVIDCT_DATA`` if set, else ``../shared/data`` from the working
    directory, else ``../shared/data`` beside the source checkout."""
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    candidates = [Path.cwd() / ".." / "shared" / "data", Path(__file__).resolve().parents[3] / ".." / "shared" / "data"]
    for cand in candidates:
        if cand.is_dir():
            return cand.resolve()
    return candidates[0]
