"""`covidct analyze` on slice images without Hounsfield units, scored against their labels.

For every slice of a folder in the COVID-SemiSeg layout (`images/`, `masks/` or `masks4/`, optional `lung/`) the
slice is read as `covidct analyze` reads it (`covidct.io.read`), run through `analyze_volume` (learned lungs, lesions
restricted to them), and its lesion map is scored against the labels. Beside it, the same predictor's own output on
the slice (what `covidct evaluate seg` and `covidct predict` give) is scored, and the two lesion maps are compared.
Prints pooled Dice (infection, GGO, consolidation), the slices the lung-masked companion segmented in each, the
share of slices whose two maps agree pixel for pixel, and seconds per slice of each.

The shipped model trained on the open folders' slices: on them these are in-sample numbers, useful to compare two
ways of running one model, not as an estimate of accuracy on unseen slices. ``--lung-masked-folds F0 F1 ...``
(fold models of the lung-masked companion's recipe, ``covidct train seg --folds K --fold k``) scores out of fold
instead: each fold model stands in for the model's lung-masked companion on its own validation slices only
(``--id-column``: the manifest column of the folder holding the fold models' slice ids, as in
``benchmarks/segmentation_cv.py``); the main network is the model's own.

    python benchmarks/analyze_images.py $COVIDCT_DATA/medseg-512 $COVIDCT_DATA/covid-semiseg [--model M] [--json OUT]
    python benchmarks/analyze_images.py $COVIDCT_DATA/medseg-512 --id-column infnet_id --lung-masked-folds cv/f?.pt
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def score_folder(root: Path, predictors: list) -> dict:
    """Dice of `analyze_volume` and of the predictor alone on every slice of ``root``; ``predictors``:
    ``(predictor, folder)`` pairs, each predictor scoring only its folder's slices."""
    from covidct.analysis.scan import analyze_volume
    from covidct.io import read
    from covidct.io.window import to_model_input
    from covidct.metrics.segmentation import SegmentationMetrics

    scores = {"analyze": SegmentationMetrics(compute_hd95=False), "predict": SegmentationMetrics(compute_hd95=False)}
    seconds = {"analyze": 0.0, "predict": 0.0}
    routed: dict[str, list[str]] = {"analyze": [], "predict": []}
    same = 0
    work = [(predictor, folder[i]) for predictor, folder in predictors for i in range(len(folder))]
    for predictor, sample in work:
        t0 = time.perf_counter()
        result = analyze_volume(read(sample.image_path), predictor, progress=False, require_lungs=False)
        seconds["analyze"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        pred = predictor.predict([to_model_input(sample.image, is_hu=False)])[0]
        seconds["predict"] += time.perf_counter() - t0
        maps = {"analyze": result.lesions[0], "predict": pred.labels}
        if result.lung_masked_slices:
            routed["analyze"].append(sample.id)
        if pred.network == "lung_masked":
            routed["predict"].append(sample.id)
        same += bool(np.array_equal(np.isin(maps["analyze"], (1, 2)), np.isin(maps["predict"], (1, 2))))
        for how, labels in maps.items():
            for name, values in (("infection", (1, 2)), ("ggo", (1,)), ("consolidation", (2,))):
                scores[how].update(name, np.isin(labels, values), np.isin(sample.labels, values))
    n = len(work)
    out = {"folder": str(root), "n_slices": n, "same_infection_map": same}
    for how, metrics in scores.items():
        pooled = metrics.pooled()
        out[how] = {"dice": {k: round(v["dice"], 4) for k, v in pooled.items()},
                    "lung_masked_slices": len(routed[how]), "seconds_per_slice": round(seconds[how] / n, 4)}
    out["routed_differently"] = sorted(set(routed["analyze"]) ^ set(routed["predict"]))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--model", default=None, help="shipped name or file (default: the shipped seg model)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--lung-masked-folds", nargs="+", default=None, metavar="F",
                        help="fold models standing in for the lung-masked companion, each on its validation slices")
    parser.add_argument("--id-column", default=None, help="manifest.csv column holding the fold models' slice ids")
    args = parser.parse_args(argv)
    import torch

    from covidct.data.segmentation import SegFolder
    from covidct.engine.evaluate_seg import fold_validation_sets, manifest_id_map
    from covidct.engine.infer import SegPredictor
    from covidct.errors import CovidctError
    from covidct.models.registry import load_seg_model

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    try:
        main_model = load_seg_model(args.model)[0]
        rows = []
        for root in args.folders:
            if args.lung_masked_folds is None:
                predictors = [(SegPredictor(main_model), SegFolder(root))]
            else:
                id_map = manifest_id_map(root, args.id_column) if args.id_column else None
                predictors = [(SegPredictor(main_model, lung_masked_model=fold_model), folder)
                              for fold_model, _, folder in fold_validation_sets(args.lung_masked_folds, root,
                                                                                id_map=id_map)]
            rows.append(score_folder(root, predictors))
    except CovidctError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{'folder':<28} {'way':<8} {'infection':>9} {'GGO':>7} {'cons.':>7} {'routed':>7} {'s/slice':>8}  same map")
    for r in rows:
        for how in ("analyze", "predict"):
            d = r[how]["dice"]
            print(f"{Path(r['folder']).name:<28} {how:<8} {d['infection']:>9.4f} {d['ggo']:>7.4f} "
                  f"{d['consolidation']:>7.4f} {r[how]['lung_masked_slices']:>7} {r[how]['seconds_per_slice']:>8.3f}"
                  + (f"  {r['same_infection_map']}/{r['n_slices']}" if how == "analyze" else ""))
        if r["routed_differently"]:
            print(f"  routed by one way only: {', '.join(r['routed_differently'])}")
    if args.json:
        from covidct.io.atomic import write_bytes_atomic

        write_bytes_atomic(json.dumps({"folders": rows}, indent=2).encode(), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
