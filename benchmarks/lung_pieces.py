"""Stray pieces in the learned lung mask (images without Hounsfield units).

For every image of a folder (any layout; ``lung/`` and mask folders are skipped), the shipped segmentation
model's lung head (probability > 0.5) is cut into 8-connected pieces; pieces under ``--fraction`` of the
largest piece are counted, split by where their centre lies: inside the box of the large pieces (grown by
``--margin`` of its size: fragments of real lung, as on MedSeg frames) or outside it (specks at figure
corners and labels). Both with the lung-cropped second pass of ``covidct predict`` / ``evaluate seg`` and
without it (``covidct analyze`` on images).

    python benchmarks/lung_pieces.py ../shared/data/ucsd-covid-ct ../shared/data/medseg-512 [--model M]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def small_pieces(mask: np.ndarray, fraction: float, margin: float) -> tuple[int, int, int]:
    """Pixels in small pieces inside / outside the large pieces' box, and the mask's area."""
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
    if n <= 1:
        return 0, 0, int(mask.sum())
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    large = sizes >= fraction * sizes.max()
    rows = np.flatnonzero(large[labels].any(axis=1))
    cols = np.flatnonzero(large[labels].any(axis=0))
    h, w = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
    inside = outside = 0
    for k in np.flatnonzero(~large & (sizes > 0)):
        cy, cx = ndimage.center_of_mass(labels == k)
        near = rows[0] - margin * h <= cy <= rows[-1] + margin * h and cols[0] - margin * w <= cx <= cols[-1] + margin * w
        inside, outside = inside + sizes[k] * near, outside + sizes[k] * (not near)
    return int(inside), int(outside), int(sizes.sum())


def main() -> int:
    from covidct.engine.infer import SegPredictor
    from covidct.io import is_image, load_grey, to_model_input
    from covidct.models.registry import load_seg_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="+")
    ap.add_argument("--model")
    ap.add_argument("--fraction", type=float, default=0.1)
    ap.add_argument("--margin", type=float, default=0.1)
    args = ap.parse_args()
    for folder in map(Path, args.folders):
        if not folder.is_dir():
            print(f"lung_pieces.py: error: {folder}: no such folder", file=sys.stderr)
            return 2
    model, _ = load_seg_model(args.model)
    print("folder | second pass | images | with small pieces inside / outside the lung box | their pixels inside / "
          "outside | share of the marked lung area")
    for folder in map(Path, args.folders):
        files = sorted(p for p in folder.rglob("*") if p.is_file() and is_image(p)
                       and not {"lung", "masks", "masks4"} & set(p.relative_to(folder).parts))
        for crop in (True, False):
            predictor = SegPredictor(model, crop_to_lung=crop)
            n_in = n_out = px_in = px_out = area = 0
            for f in files:
                lung_prob = predictor.predict([to_model_input(load_grey(f)[0], is_hu=False)])[0].lung_prob
                i, o, a = small_pieces(lung_prob > 0.5, args.fraction, args.margin)
                n_in, n_out, px_in, px_out, area = n_in + (i > 0), n_out + (o > 0), px_in + i, px_out + o, area + a
            print(f"{folder.name} | {'yes' if crop else 'no'} | {len(files)} | {n_in} / {n_out} | {px_in} / {px_out} | "
                  f"{(px_in + px_out) / max(area, 1):.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
