"""What AP does the lesion-instance definition allow? Instances = connected components of each class
(``covidct.models.lesions.instances_from_labels``, the same targets ``covidct evaluate lesions``
scores). This benchmark makes instances the same way from a *segmentation* model's predicted label
map (score = mean class probability inside the component) and scores them with the same COCO mask AP,
out of fold: each model of a ``train seg --folds K`` run scores only its own validation slices.
A semantic model that is good by Dice gives a reference for the Mask R-CNN's AP. Trains nothing.

    python benchmarks/lesion_instances.py --data $COVIDCT_DATA/covid-semiseg cv/f0.pt ... cv/f4.pt
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def main() -> int:
    import torch

    from covidct.engine.evaluate_seg import fold_validation_sets
    from covidct.engine.infer import SegPredictor
    from covidct.errors import CovidctError
    from covidct.io.window import to_model_input
    from covidct.metrics import InstanceAP
    from covidct.models.lesions import MASK_MODES, MIN_INSTANCE_AREA, instances_from_labels

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="the folder the folds were drawn from")
    ap.add_argument("models", nargs="+", help="one segmentation model file per fold")
    ap.add_argument("--mask-mode", action="append", choices=("both", "merge", "ggo"),
                    help="repeatable; default: both and merge")
    ap.add_argument("--min-area", type=int, action="append",
                    help=f"minimum instance area in pixels, repeatable; default {MIN_INSTANCE_AREA}")
    ap.add_argument("--network-classes", action="store_true", help="the network's own GGO / consolidation split "
                    "(no density rule; how the numbers before session 4 were made)")
    args = ap.parse_args()
    modes = args.mask_mode or ["both", "merge"]
    areas = args.min_area or [MIN_INSTANCE_AREA]
    try:
        preds = []  # (labels, predicted label map, class probabilities) of every out-of-fold slice
        for model, _, folder in fold_validation_sets(args.models, args.data):
            if modes != ["merge"]:   # binary infection masks hold no GGO / consolidation
                folder.require_types(f"mask modes {', '.join(modes)}")
            predictor = SegPredictor(model, density_classes=not args.network_classes)
            for s in folder:
                p = predictor.predict([to_model_input(s.image, is_hu=False)])[0]
                preds.append((s.labels, p.labels, p.probs))
    except CovidctError as exc:
        print(f"{os.path.basename(sys.argv[0])}: error: {exc}", file=sys.stderr)
        return 2
    print(f"{len(preds)} out-of-fold slices")
    print("| mask mode | min area (px) | AP50 | AP75 | mAP | per class AP50 |")
    print("|---|---|---|---|---|---|")
    for mode in modes:
        classes = MASK_MODES[mode][1:]
        for area in areas:
            meter = InstanceAP(classes)
            for truth, labels, probs in preds:
                labels = labels.copy()
                labels[labels == 3] = 0  # effusion is not a lesion instance
                inst = instances_from_labels(labels, mode, min_area=area)
                class_prob = {1: probs[1] + probs[2] if mode == "merge" else probs[1], 2: probs[2]}
                scores = [float(class_prob[c][m].mean()) for m, c in
                          zip(inst["masks"].numpy().astype(bool), inst["labels"].tolist())]
                inst["scores"] = torch.tensor(scores, dtype=torch.float32)
                meter.update(inst, instances_from_labels(truth, mode, min_area=area))
            r = meter.aggregate()
            per = ", ".join(f"{c} {r['per_class'][c]['ap50']}" for c in classes)
            print(f"| {mode} | {area} | {r['ap50']} | {r['ap75']} | {r['map']} | {per} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
