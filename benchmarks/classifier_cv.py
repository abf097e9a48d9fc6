"""Cross-validation estimate for slice-classifier recipes: pools the out-of-fold predictions of k
models trained with ``covidct train cls --folds K --fold k`` (train + val pooled into K
source-grouped folds; each model scores only the images its fold held out, with its own
temperature). Given the fold models of several recipes (same K and --seed), every image gets the
mean of its held-out models: the out-of-fold estimate of their ensemble. Trains nothing.
(`covidct ensemble --model ... --data D --out-of-fold` computes the same estimate, calibrates the
ensemble on it and stores both in the ensemble file.)

    for k in 0 1 2 3 4; do covidct train cls --data $D --folds 5 --fold $k -o cv/a$k.pt [recipe]; done
    python benchmarks/classifier_cv.py --data $D cv/a0.pt cv/a1.pt cv/a2.pt cv/a3.pt cv/a4.pt [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def nested_calibration(result: dict, shuffles: int) -> list[dict]:
    """Platt calibration (temperature + class offsets) fitted on 4/5 of the out-of-fold scores and
    applied to the remaining 1/5, for ``shuffles`` stratified 5-fold cuts."""
    import numpy as np
    import torch

    from covidct.engine.evaluate_cls import score_probabilities, summarize
    from covidct.engine.train_cls import fit_temperature_and_bias

    logits = torch.log(torch.as_tensor(result["_probabilities"]).clamp_min(1e-8)).float()
    labels = np.asarray(result["_labels"])
    rows = []
    for shuffle in range(shuffles):
        rng = np.random.default_rng(shuffle)
        part = np.empty(len(labels), int)
        for c in np.unique(labels):  # stratified: each class dealt round-robin after a shuffle
            idx = rng.permutation(np.flatnonzero(labels == c))
            part[idx] = np.arange(len(idx)) % 5
        calibrated = np.zeros_like(result["_probabilities"])
        for k in range(5):
            fit, held = part != k, part == k
            t, c = fit_temperature_and_bias(logits[fit], torch.as_tensor(labels[fit]))
            calibrated[held] = torch.softmax((logits[held] + torch.tensor(c)) / t, dim=1).numpy()
        s = summarize(score_probabilities(calibrated, labels, result["classes"]))
        rows.append({"shuffle": shuffle, "accuracy": s["accuracy"], "f1": s["f1"]})
    return rows


def main() -> int:
    from covidct.engine.evaluate_cls import evaluate_out_of_fold, summarize
    from covidct.errors import CovidctError

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="the folder the folds were drawn from")
    ap.add_argument("models", nargs="+", help="fold model files (one recipe or several on the same folds)")
    ap.add_argument("--json")
    ap.add_argument("--tta", action="store_true", help="each image averaged with its left-right mirror image")
    ap.add_argument("--nested-calibration", type=int, default=0, metavar="SHUFFLES",
                    help="also check the Platt calibration of `ensemble --out-of-fold` out of sample: fit it on "
                    "4/5 of the out-of-fold scores, apply it to the rest (stratified 5-fold, this many shuffles)")
    args = ap.parse_args()
    try:
        result = evaluate_out_of_fold(args.models, args.data, tta=args.tta)
    except CovidctError as exc:
        print(f"{os.path.basename(sys.argv[0])}: error: {exc}", file=sys.stderr)
        return 2
    print(result["_report"].confusion_text())
    summary = {"n_images": result["n_images"], "models": result["models"],
               "models_per_image": result["models_per_image"], **summarize(result)}
    print(f"\nout of fold: {summary['n_images']} images, {summary['models_per_image']} model(s) per image")
    print(f"accuracy {summary['accuracy']:.4f}  AUC {summary['auc']}  F1 {summary['f1']}  ECE {summary['ece']:.4f}")
    if args.nested_calibration:
        summary["nested_calibration"] = nested_calibration(result, args.nested_calibration)
        for row in summary["nested_calibration"]:
            print(f"calibration fitted on 4/5, applied to 1/5 (shuffle {row['shuffle']}): accuracy {row['accuracy']:.4f}"
                  f"  F1 {row['f1']}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(summary, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
