"""Pieces every training loop shares: seeding, the CSV log, the learning-rate schedule."""

from __future__ import annotations

import csv
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def write_log(rows: list[dict[str, Any]], path: Path) -> None:
    """Write the per-epoch log as CSV, atomically."""
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def warmup_cosine(total_steps: int, warmup_steps: int, floor: float = 0.02):
    """LambdaLR factor: linear warm-up, then cosine decay to ``floor``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return floor + (1 - floor) * 0.5 * (1 + np.cos(np.pi * min(1.0, progress)))

    return factor
