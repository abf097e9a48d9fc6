"""Mask R-CNN speed, side by side in one run: torchvision's default ``maskrcnn_resnet50_fpn``
(random weights, 800-1333 resize as shipped, and at 512) against covidct's lesion model, on 512x512
slices, inference mode, 2 threads; optionally the AP of a trained lesion model on a folder.

    python benchmarks/masknet.py [--model NAME|FILE] [--data ../shared/data/covid-semiseg] [--n 8]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch


def timed(fn, images, repeats: int) -> float:
    with torch.inference_mode():
        fn(images[:1])
        t0 = time.perf_counter()
        for _ in range(repeats):
            for im in images:
                fn([im])
    return (time.perf_counter() - t0) / (repeats * len(images))


def main() -> int:
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    from covidct.models.lesions import LesionModelConfig, build_lesion_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="trained lesion model (shipped name or file); default: an untrained default config")
    ap.add_argument("--data", help="COVID-SemiSeg-layout folder to report AP on")
    ap.add_argument("--n", type=int, default=6, help="slices per timing")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    grey = [torch.rand(1, 512, 512) for _ in range(args.n)]
    rgb = [g.expand(3, -1, -1) for g in grey]

    rows = []
    ref = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None).eval()
    rows.append(("torchvision maskrcnn_resnet50_fpn (default 800px)", sum(p.numel() for p in ref.parameters()), timed(ref, rgb, 1)))
    ref512 = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, min_size=512, max_size=512).eval()
    rows.append(("torchvision maskrcnn_resnet50_fpn at 512", sum(p.numel() for p in ref512.parameters()), timed(ref512, rgb, 1)))
    if args.model:
        from covidct.models.registry import load_lesion_model

        ours, _ = load_lesion_model(args.model)
    else:
        ours = build_lesion_model(LesionModelConfig()).eval()
    rows.append((f"covidct lesions ({ours.config.backbone}, {ours.config.input_size}px)",
                 sum(p.numel() for p in ours.parameters()), timed(ours, grey, 2)))
    base = rows[0][2]
    print(f"{'model':<52}{'params (M)':>11}{'s/slice':>10}{'slices/s':>10}{'speed-up':>10}")
    for name, params, sec in rows:
        print(f"{name:<52}{params / 1e6:>11.2f}{sec:>10.3f}{1 / sec:>10.2f}{base / sec:>9.1f}x")
    if args.data and args.model:
        from covidct.engine.lesions import evaluate_lesions

        r = evaluate_lesions(args.model, args.data, progress=False)
        print(f"AP on {args.data}: AP50 {r['ap50']}, AP75 {r['ap75']}, mAP {r['map']}; per class {r['per_class']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
