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


def main() -> int:
    from covidct.engine.evaluate_cls import evaluate_out_of_fold, summarize
    from covidct.errors import CovidctError

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="the folder the folds were drawn from")
    ap.add_argument("models", nargs="+", help="fold model files (one recipe or several on the same folds)")
    ap.add_argument("--json")
    args = ap.parse_args()
    try:
        result = evaluate_out_of_fold(args.models, args.data)
    except CovidctError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(result["_report"].confusion_text())
    summary = {"n_images": result["n_images"], "models": result["models"],
               "models_per_image": result["models_per_image"], **summarize(result)}
    print(f"\nout of fold: {summary['n_images']} images, {summary['models_per_image']} model(s) per image")
    print(f"accuracy {summary['accuracy']:.4f}  AUC {summary['auc']}  F1 {summary['f1']}  ECE {summary['ece']:.4f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(summary, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
