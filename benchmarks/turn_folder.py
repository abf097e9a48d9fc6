"""Write a copy of a segmentation folder (COVID-SemiSeg layout) with every image and label map turned by
quarter turns (``np.rot90``; -1: clockwise), to measure how a model trained on one orientation scores on
another. JPG images are written as PNG (the decoded pixels, no second lossy encoding); manifest.csv is
copied with its ``image`` paths renamed to match. Trains and predicts nothing.

    python benchmarks/turn_folder.py --data $COVIDCT_DATA/medseg-512 --turns -1 -o out/medseg-up
    python benchmarks/segmentation_cv.py --data out/medseg-up --id-column infnet_id cv/f0.pt ... cv/f4.pt
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np
from PIL import Image

SUBFOLDERS = ("images", "masks", "masks4", "lung")


def turn_folder(src: Path, dst: Path, turns: int) -> int:
    """Turned copies of every file of ``src``'s subfolders in ``dst``; returns the number of images."""
    renamed: dict[str, str] = {}
    n = 0
    for sub in SUBFOLDERS:
        if not (src / sub).is_dir():
            continue
        (dst / sub).mkdir(parents=True, exist_ok=True)
        for path in sorted((src / sub).iterdir()):
            with Image.open(path) as im:
                turned = Image.fromarray(np.ascontiguousarray(np.rot90(np.asarray(im), turns)))
            name = path.name if path.suffix.lower() == ".png" else path.stem + ".png"
            renamed[f"{sub}/{path.name}"] = f"{sub}/{name}"
            turned.save(dst / sub / name)
            n += sub == "images"
    manifest = src / "manifest.csv"
    if manifest.exists():
        with open(manifest, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
        with open(dst / "manifest.csv", "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else [])
            writer.writeheader()
            for r in rows:
                writer.writerow({k: renamed.get(v, v) if isinstance(v, str) else v for k, v in r.items()})
    return n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, type=Path)
    ap.add_argument("--turns", type=int, required=True, help="np.rot90 quarter turns (1: counter-clockwise)")
    ap.add_argument("-o", "--output", required=True, type=Path)
    args = ap.parse_args()
    if not (args.data / "images").is_dir():
        print(f"turn_folder.py: error: {args.data}: no images/ subfolder", file=sys.stderr)
        return 2
    try:
        n = turn_folder(args.data, args.output, args.turns)
    except OSError as exc:   # an unreadable image: one line naming it
        print(f"turn_folder.py: error: {getattr(exc, 'filename', None) or args.data}: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {n} images turned {args.turns} quarter(s) to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
