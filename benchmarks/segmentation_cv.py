"""Cross-validation estimate for a segmentation recipe: pools the out-of-fold predictions of k
models trained with ``covidct train seg --folds K --fold k`` (each scores only the slices its
checkpoint names as validation), so every training slice is scored once by a model that never
saw it. Trains nothing.

    for k in 0 1 2 3 4; do covidct train seg --data $D --folds 5 --fold $k -o cv/f$k.pt [recipe]; done
    python benchmarks/segmentation_cv.py --data $D cv/f0.pt cv/f1.pt cv/f2.pt cv/f3.pt cv/f4.pt [--json OUT]

The same slices in another frame (MedSeg's full 512² slices of the COVID-SemiSeg crops), each scored by
the fold model that did not train on it: ``--data $COVIDCT_DATA/medseg-512 --id-column infnet_id`` (the
manifest column that holds the COVID-SemiSeg id). ``--no-crop`` turns off the second, lung-cropped pass.

``--average-with M0,M1,...`` (repeatable): another recipe's fold models, one per fold in the same order; each
slice is then scored by the mean of the fold models' probabilities (an ensemble estimate, tried and not
adopted; see benchmarks/RESULTS.md).

``--effusion E0,E1,...``: an effusion recipe's fold models (same folds, same order), each run beside its
fold's model as the effusion companion (:class:`~covidct.engine.infer.SegPredictor`), which is how a
model file with an attached effusion model (``covidct attach``) predicts.

``--lung-masked-of MAIN``: each fold model runs as MAIN's lung-masked companion (``covidct attach --lung-masked``):
MAIN's first pass decides which slices are black outside their lungs and gives their lung boxes, the fold model
segments those (with MAIN's effusion companion), MAIN the rest; ``lung_masked_images`` counts the slices routed.
``--record-in`` then records a routed estimate: keep it off the companion's own file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def main() -> int:
    from covidct.engine.evaluate_seg import evaluate_out_of_fold, format_table, manifest_id_map
    from covidct.errors import CovidctError

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="the folder the folds were drawn from")
    ap.add_argument("models", nargs="+", help="one model file per fold")
    ap.add_argument("--json")
    ap.add_argument("--id-column", help="manifest.csv column of --data holding the fold models' slice ids")
    ap.add_argument("--split", help="only the slices of this manifest.csv split of --data (e.g. train)")
    ap.add_argument("--no-crop", action="store_true", help="one pass on the whole slice (no lung-cropped pass)")
    ap.add_argument("--network-classes", action="store_true", help="the network's own GGO / consolidation split "
                    "(no density rule)")
    ap.add_argument("--tta", action="store_true", help="average each model with its left-right mirrored pass")
    ap.add_argument("--average-with", action="append", default=[], metavar="M0,M1,...",
                    help="another recipe's fold models (same folds, same order) to average probabilities with")
    ap.add_argument("--effusion", metavar="E0,E1,...", help="an effusion recipe's fold models (same folds, same "
                    "order), each the effusion companion of its fold's model")
    ap.add_argument("--lung-masked-of", metavar="MAIN", help="each fold model stands in for MAIN's lung-masked "
                    "companion: MAIN's first pass picks the slices black outside their lungs and their lung boxes, "
                    "the fold model segments those, MAIN the others (how a file with an attached lung-masked model "
                    "predicts)")
    ap.add_argument("--record-in", metavar="MODEL", help="also store the estimate in this model's metrics "
                    "(`cross_validation`), e.g. the --fold all model trained with the same recipe")
    args = ap.parse_args()
    try:
        id_map = manifest_id_map(args.data, args.id_column) if args.id_column else None
        if args.average_with and (args.effusion or args.lung_masked_of or args.split):
            raise CovidctError(None, "--effusion / --lung-masked-of / --split and --average-with do not combine")
        if args.average_with:
            result = _ensemble_out_of_fold([args.models] + [g.split(",") for g in args.average_with], args.data,
                                           id_map=id_map, crop_to_lung=not args.no_crop,
                                           density_classes=not args.network_classes, tta=args.tta)
        else:
            result = evaluate_out_of_fold(args.models, args.data, id_map=id_map, crop_to_lung=not args.no_crop,
                                          density_classes=not args.network_classes, tta=args.tta,
                                          effusion_specs=args.effusion.split(",") if args.effusion else None,
                                          lung_masked_of=args.lung_masked_of, split=args.split)
    except CovidctError as exc:
        print(f"{os.path.basename(sys.argv[0])}: error: {exc}", file=sys.stderr)
        return 2
    print(format_table(result))
    summary = {k: v for k, v in result.items() if k != "details"}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(summary, fh, indent=2)
    if args.record_in:
        from pathlib import Path

        from covidct.models.checkpoint import record_metrics

        summary["data"] = Path(args.data).resolve().name  # which slices the estimate is on
        summary["fold_models"] = [Path(m).name for m in args.models]
        if args.effusion:
            summary["effusion_fold_models"] = [Path(m).name for m in args.effusion.split(",")]
        record_metrics(args.record_in, cross_validation=summary)
        print(f"recorded the estimate in {args.record_in}")
    return 0


class _MeanPredictor:
    """Several fold-k predictors as one: the mean of their probabilities, then the density split, as
    :class:`~covidct.engine.infer.SegPredictor` does for one network (scored by the same loop)."""

    def __init__(self, predictors: list, *, density_classes: bool) -> None:
        self.predictors, self.density_classes = predictors, density_classes
        self.predicts_effusion = any(p.predicts_effusion for p in predictors)   # read by the scoring loop

    def predict(self, images: list) -> list:
        import numpy as np

        from covidct.engine.infer import SegPrediction, split_by_density

        out = []
        for image, preds in zip(images, zip(*(p.predict(images) for p in self.predictors))):
            probs = np.mean([r.probs for r in preds], axis=0)
            lung = None if preds[0].lung_prob is None else np.mean([r.lung_prob for r in preds], axis=0)
            labels = probs.argmax(axis=0).astype(np.uint8)
            if self.density_classes:
                split_by_density(labels, np.asarray(image, np.float32))
            out.append(SegPrediction(labels, probs, lung))
        return out


def _ensemble_out_of_fold(recipes: list[list[str]], data: str, *, id_map, crop_to_lung: bool,
                          density_classes: bool, tta: bool) -> dict:
    """Out-of-fold estimate of per-fold ensembles: fold k's slices scored by the mean probabilities of
    every recipe's fold-k model."""
    from covidct.engine.evaluate_seg import _score_folder, _summary, fold_validation_sets
    from covidct.engine.infer import SegPredictor
    from covidct.errors import CovidctError
    from covidct.metrics.segmentation import SegmentationMetrics

    sets = [fold_validation_sets(r, data, id_map=id_map) for r in recipes]
    if len({len(s) for s in sets}) != 1:
        raise CovidctError(None, "every --average-with needs one model per fold, as many as the positional models")
    metrics, n, seconds = SegmentationMetrics(), 0, 0.0
    for k, (_, _, folder) in enumerate(sets[0]):
        if any(other[k][2].ids != folder.ids for other in sets[1:]):
            raise CovidctError(None, f"fold {k}: the models do not hold out the same slices")
        members = [SegPredictor(s[k][0], crop_to_lung=crop_to_lung, density_classes=False, tta=tta) for s in sets]
        seconds += _score_folder(metrics, _MeanPredictor(members, density_classes=density_classes), folder,
                                 progress=True)
        n += len(folder)
    return _summary(metrics, n, seconds)


if __name__ == "__main__":
    sys.exit(main())
