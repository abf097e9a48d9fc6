"""What `covidct analyze` makes of images that are not chest CT, beside images that are.

Images without Hounsfield units get their lungs from the segmentation model's lung head, which has only ever
seen CT. This runs the scan analysis (`analysis.scan.analyze_volume`, as `covidct analyze` does on an image) on

* every image of the given folders (chest CT: any layout; `lung/` and mask folders are skipped), and
* non-CT images made here: the sample pictures bundled with scikit-image (photographs, microscopy, text,
  textures, a head phantom; none is downloaded) and four synthetic ones (noise, a smooth random field, a
  gradient, flat grey),

and prints, per group, how many images get lungs, how many get "lesions present", and how many the report's
input notes flag: the lung-share note (`analysis.scan.lung_share_note`: the lung mask covering more than
`MAX_PLAUSIBLE_LUNG_SHARE` of the image) and the colour note (`report.notes.colour_note`: more than
`MAX_CT_COLOUR_SHARE` of the pixels coloured), with the distribution of both shares; and, per non-CT image,
its numbers.

    python benchmarks/non_ct_images.py $COVIDCT_DATA/ucsd-covid-ct $COVIDCT_DATA/covid-semiseg/images \\
        $COVIDCT_DATA/medseg-512/images [--model M] [--json OUT]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

SKIP_DIRS = {"lung", "masks", "masks4"}
SKIMAGE_SAMPLES = ("astronaut", "brick", "camera", "cat", "cell", "checkerboard", "clock", "coffee", "coins",
                   "colorwheel", "grass", "gravel", "horse", "hubble_deep_field", "immunohistochemistry", "logo",
                   "microaneurysms", "moon", "page", "retina", "rocket", "shepp_logan_phantom", "text")


def non_ct_images(seed: int = 0) -> dict[str, np.ndarray]:
    """Named 8-bit images that are not chest CT (grey or colour)."""
    import skimage.data
    from scipy import ndimage

    out = {}
    for name in SKIMAGE_SAMPLES:
        a = np.asarray(getattr(skimage.data, name)())
        if a.dtype == bool:
            a = a.astype(np.uint8) * 255
        elif a.dtype != np.uint8:
            a = (255 * (a - a.min()) / (np.ptp(a) or 1)).astype(np.uint8)
        out[name] = a[..., :3] if a.ndim == 3 else a
    rng = np.random.default_rng(seed)
    out["noise"] = rng.integers(0, 256, (256, 256), dtype=np.uint8)
    field = ndimage.gaussian_filter(rng.random((256, 256)), 8)
    out["smooth_field"] = (255 * (field - field.min()) / np.ptp(field)).astype(np.uint8)
    out["gradient"] = np.tile(np.linspace(0, 255, 256).astype(np.uint8), (256, 1))
    out["flat_grey"] = np.full((256, 256), 128, np.uint8)
    return out


def analyse(path: Path, predictor) -> dict:
    """Lung share, lesion share and answer of one image file, or the reason it was refused."""
    from covidct.analysis.scan import analyze_volume, lung_share_note
    from covidct.errors import CovidctError
    from covidct.io import read
    from covidct.report.notes import colour_note

    try:
        vol = read(path)
        result = analyze_volume(vol, predictor, progress=False)
    except CovidctError as exc:
        return {"refused": exc.reason}
    lung = result.lungs[0] > 0
    share = vol.metadata.get("colour_share")
    by = [name for name, note in (("lung share", lung_share_note(result.lungs)), ("colour", colour_note(share)))
          if note]
    return {"refused": None, "lung_share": round(float(lung.mean()), 4), "colour_share": share,
            "lesion_percent_of_lung": result.burden["percent_opacity"], "answer": result.diagnosis["label"],
            "flagged_by": by, "flagged": bool(by)}


def summary(rows: list[dict]) -> str:
    taken = [r for r in rows if not r["refused"]]
    shares = np.array([r["lung_share"] for r in taken]) if taken else np.zeros(1)
    return (f"{len(rows)} images: {len(rows) - len(taken)} refused (no lungs), {len(taken)} analysed, "
            f"{sum(r['answer'] == 'lesions present' for r in taken)} 'lesions present', "
            f"{sum(r['flagged'] for r in taken)} flagged (lung share {sum('lung share' in r['flagged_by'] for r in taken)}, "
            f"colour {sum('colour' in r['flagged_by'] for r in taken)}); lung share of the image min / median / 99th "
            f"pct / max {shares.min():.3f} / {np.median(shares):.3f} / {np.percentile(shares, 99):.3f} / "
            f"{shares.max():.3f}; colour share max {max(r['colour_share'] for r in taken) if taken else 0:.3f}")


def main() -> int:
    import tempfile

    from PIL import Image

    from covidct.analysis.scan import MAX_PLAUSIBLE_LUNG_SHARE
    from covidct.engine.infer import SegPredictor
    from covidct.io import is_image
    from covidct.models.registry import load_seg_model
    from covidct.report.json_io import write_json

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="*", help="folders of chest CT images (searched recursively)")
    ap.add_argument("--model", help="segmentation model (default: the shipped one)")
    ap.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    ap.add_argument("--json", help="write every image's numbers here")
    args = ap.parse_args()
    for folder in map(Path, args.folders):
        if not folder.is_dir():
            print(f"non_ct_images.py: error: {folder}: no such folder", file=sys.stderr)
            return 2
    model, payload = load_seg_model(args.model)
    predictor = SegPredictor(model, precision=args.precision)
    print(f"model {Path(payload['path']).name}, precision {predictor.precision}, "
          f"MAX_PLAUSIBLE_LUNG_SHARE {MAX_PLAUSIBLE_LUNG_SHARE}")
    results: dict[str, dict[str, dict]] = {}
    for folder in map(Path, args.folders):
        paths = sorted(p for p in folder.rglob("*") if is_image(p) and not SKIP_DIRS & set(p.relative_to(folder).parts))
        t0 = time.perf_counter()
        results[str(folder)] = {str(p.relative_to(folder)): analyse(p, predictor) for p in paths}
        print(f"CT {folder} ({time.perf_counter() - t0:.0f} s): {summary(list(results[str(folder)].values()))}")
    with tempfile.TemporaryDirectory() as tmp:
        non = {}
        for name, image in non_ct_images().items():
            Image.fromarray(image).save(Path(tmp) / f"{name}.png")
            non[name] = analyse(Path(tmp) / f"{name}.png", predictor)
    results["non-CT"] = non
    print(f"non-CT: {summary(list(non.values()))}")
    print(f"{'non-CT image':<22}{'lung share':>11}{'colour share':>13}{'lesion % of lung':>18}  answer / refusal")
    for name, r in non.items():
        if r["refused"]:
            print(f"{name:<22}{'-':>11}{'-':>13}{'-':>18}  refused: {r['refused']}")
        else:
            print(f"{name:<22}{r['lung_share']:>11.3f}{r['colour_share']:>13.3f}{r['lesion_percent_of_lung']:>18.2f}  "
                  f"{r['answer']}{'  [flagged: ' + ', '.join(r['flagged_by']) + ']' if r['flagged'] else ''}")
    if args.json:
        write_json(results, args.json)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
