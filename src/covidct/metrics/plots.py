"""Figures for metrics (matplotlib, Agg backend, written atomically)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np


def save_figure(fig, path: str | Path, **kwargs) -> Path:
    """Save a matplotlib figure atomically (temporary file + rename); a PNG carries the disclaimer in
    its text chunks."""
    from covidct import IMAGE_METADATA
    from covidct.io.atomic import atomic_output

    path = Path(path)
    fmt = path.suffix.lstrip(".").lower() or "png"
    if fmt == "png":
        kwargs.setdefault("metadata", IMAGE_METADATA)
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format=fmt, **kwargs)
    return path


def plot_confusion(confusion: np.ndarray, classes: Sequence[str], path: str | Path, *, title: str = "") -> Path:
    """Confusion-matrix PNG: counts with row-normalised shading and percentages."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(confusion)
    rows = cm.sum(axis=1, keepdims=True).astype(float)
    norm = np.divide(cm, rows, out=np.zeros_like(cm, dtype=float), where=rows > 0)
    n = len(classes)
    fig, ax = plt.subplots(figsize=(1.6 * n + 2.5, 1.4 * n + 2))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{cm[i, j]}\n{100 * norm[i, j]:.1f}%", ha="center", va="center",
                    color="white" if norm[i, j] > 0.5 else "black", fontsize=10)
    ax.set_xticks(range(n), classes, rotation=20, ha="right")
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or "Confusion matrix (row-normalised)")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    try:
        return save_figure(fig, path, dpi=120)
    finally:
        plt.close(fig)
