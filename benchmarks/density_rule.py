"""How the GGO / consolidation split of ``SegPredictor`` (``split_by_density``) was chosen, and its honest
estimate: nested cross-validation over the out-of-fold predictions of the k fold models.

Each fold model predicts its own validation slices with the network's own classes; for every
(level, sigma) of a small grid the lesion pixels are relabelled by density; the pair with the best mean
GGO / consolidation Dice on the other folds is applied to the held-out fold; all folds pooled. Also prints
the grid on all folds (what the shipped constants were chosen from).

    python benchmarks/density_rule.py --data $COVIDCT_DATA/covid-semiseg cv/f0.pt cv/f1.pt cv/f2.pt cv/f3.pt cv/f4.pt
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np

LEVELS = (0.45, 0.5, 0.55, 0.6)
SIGMAS = (0.0, 1.0, 2.0, 3.0)


def _dice(rows, relabel) -> dict[str, float]:
    acc = {1: [0, 0], 2: [0, 0]}
    for img, gt, lab in rows:
        out = relabel(img, lab.copy())
        for c in (1, 2):
            p, g = out == c, gt == c
            acc[c][0] += 2 * int((p & g).sum())
            acc[c][1] += int(p.sum() + g.sum())
    return {"ggo": acc[1][0] / acc[1][1], "consolidation": acc[2][0] / acc[2][1]}


def main() -> int:
    from covidct.engine.evaluate_seg import fold_validation_sets
    from covidct.engine.infer import SegPredictor, split_by_density
    from covidct.errors import CovidctError
    from covidct.io.window import to_model_input

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("models", nargs="+", help="one model file per fold (trained with --folds K --fold k)")
    args = ap.parse_args()
    try:
        sets = fold_validation_sets(args.models, args.data)
    except CovidctError as exc:
        print(f"{os.path.basename(sys.argv[0])}: error: {exc}", file=sys.stderr)
        return 2
    folds = []
    for model, _, folder in sets:
        predictor = SegPredictor(model, density_classes=False)
        rows = []
        for s in folder:
            img = to_model_input(s.image, is_hu=False)
            lab = predictor.predict([img])[0].labels
            rows.append((img, np.where(s.labels == 3, 0, s.labels), np.where(lab == 3, 0, lab)))
        folds.append(rows)

    def rule(level, sigma):
        return lambda img, lab: split_by_density(lab, img, level=level, sigma_px=sigma)

    every = [r for f in folds for r in f]
    base = _dice(every, lambda img, lab: lab)
    print(f"network's own classes: GGO {base['ggo']:.4f}, consolidation {base['consolidation']:.4f}")
    grid = [(lv, sg) for lv in LEVELS for sg in SIGMAS]
    print("level sigma   GGO    consolidation   (all folds)")
    for lv, sg in grid:
        d = _dice(every, rule(lv, sg))
        print(f"{lv:5.2f} {sg:5.1f}  {d['ggo']:.4f}  {d['consolidation']:.4f}")
    chosen, held = [], []
    for k in range(len(folds)):
        train = [r for j, f in enumerate(folds) if j != k for r in f]
        best = max(grid, key=lambda g: np.mean(list(_dice(train, rule(*g)).values())))
        chosen.append(best)
        held += [(img, gt, split_by_density(lab.copy(), img, level=best[0], sigma_px=best[1])) for img, gt, lab in folds[k]]
    nested = _dice(held, lambda img, lab: lab)
    print(f"nested (chosen on the other folds: {chosen}): GGO {nested['ggo']:.4f}, consolidation {nested['consolidation']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
