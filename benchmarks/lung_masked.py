"""Which slices the segmentation predictor finds "black outside their lungs" (and so gives to the model's
lung-masked companion), per input.

For every slice of every input (a folder of images, searched recursively, with `lung/`, `masks/` and `masks4/`
skipped; or a CT scan: DICOM series folder or NIfTI file, every slice whole through the model window) the main
network's lung head gives the lung field, as in the predictor's first pass, and
`covidct.data.segmentation.lung_masked_shares` the share of the slice outside the widened lung and the share of
those pixels that are black. Prints, per input, the slices found lung-masked and the spread of that black share
(the rule: >= LUNG_MASKED_SHARE of the outside black, the outside >= LUNG_MASKED_MIN_OUTSIDE of the slice).

    python benchmarks/lung_masked.py $COVIDCT_DATA/covid-semiseg/images $COVIDCT_DATA/medseg-512/images \\
        $COVIDCT_DATA/ucsd-covid-ct $COVIDCT_DATA/covid-ct-md/P001 $COVIDCT_DATA/covid-ct-md/normal001 \\
        $COVIDCT_DATA/covid-ct-md/cap001.nii.gz [--model M] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

SKIP_DIRS = {"lung", "masks", "masks4"}


def slices_of(path: Path):
    """``(name, grey [0, 1])`` for every slice of ``path``."""
    from covidct.io import read, to_model_input
    from covidct.io.image import is_image, load_grey

    if path.is_dir() and not any(p.suffix.lower() == ".dcm" or p.suffix == "" for p in path.iterdir() if p.is_file()):
        for f in sorted(p for p in path.rglob("*") if p.is_file() and is_image(p)
                        and not SKIP_DIRS & set(p.relative_to(path).parts[:-1])):
            grey, _ = load_grey(f)
            yield str(f.relative_to(path)), to_model_input(grey, is_hu=False)
        return
    vol = read(path, progress=False)
    for k in range(vol.n_slices):
        yield f"{k}", to_model_input(vol.array[k], is_hu=vol.is_hu)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("inputs", nargs="+", type=Path)
    ap.add_argument("--model", default=None, help="segmentation model (default: the shipped one)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    from covidct.data.segmentation import LUNG_MASKED_MIN_OUTSIDE, LUNG_MASKED_SHARE, is_lung_masked, lung_masked_shares
    from covidct.engine.infer import SegPredictor
    from covidct.models.registry import load_seg_model

    model, payload = load_seg_model(args.model)
    first_pass = SegPredictor(model, crop_to_lung=False, density_classes=False, effusion_model=None,
                              lung_masked_model=None)
    print(f"model {Path(payload['path']).name}; rule: outside the widened lung >= {LUNG_MASKED_MIN_OUTSIDE:.0%} of "
          f"the slice and >= {LUNG_MASKED_SHARE:.0%} of it black")
    print(f"{'input':<60}{'slices':>8}{'lung-masked':>13}   black share outside the lung: min / median / max")
    out = {}
    for path in args.inputs:
        rows = []
        for name, grey in slices_of(path):
            lung = first_pass.predict([grey])[0].lung
            outside, black = lung_masked_shares(grey, lung) if lung.any() else (1.0, 0.0)
            rows.append({"slice": name, "outside_share": round(outside, 4), "black_share": round(black, 4),
                         "lung_masked": is_lung_masked(grey, lung)})
        shares = np.array([r["black_share"] for r in rows])
        found = [r["slice"] for r in rows if r["lung_masked"]]
        print(f"{str(path)[-59:]:<60}{len(rows):>8}{len(found):>13}   {shares.min():.3f} / {np.median(shares):.3f} / "
              f"{shares.max():.3f}")
        top = sorted(rows, key=lambda r: -r["black_share"])[:3]
        print("    highest: " + ", ".join(f"{r['slice']} {r['black_share']:.3f} (outside {r['outside_share']:.2f})"
                                          for r in top))
        out[str(path)] = {"n_slices": len(rows), "lung_masked": found, "slices": rows}
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
