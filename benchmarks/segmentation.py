"""Segmentation benchmark: evaluates (trains nothing) the shipped model on a folder in the
COVID-SemiSeg layout, then measures slices/s and peak memory at 512x512 on this CPU for the shipped
model and for a plain reference U-Net (ResNet-34 encoder, smp default decoder, 512 input), in one run.

    python benchmarks/segmentation.py --data ../shared/data/covid-semiseg --model-val [--model NAME|FILE]
        [--frames ../shared/data/medseg-512]

A model file with a companion network (the effusion model of ``covidct attach``) is timed with it, and
once more without it (``shipped without its companions``). ``--frames`` also times the shipped model on real full 512² frames, where the lungs fill part of the slice
and the predictor runs its second, lung-cropped pass (``SegPredictor(crop_to_lung=True)``, the default);
the random-slice rows time one pass. The MedSeg frames are black outside the lungs: a model with a ``lung_masked``
companion gives them to it (first pass of the main network, then the companion on the lung box; no effusion network on
them), and the row
``shipped, frames, main network only`` times the same frames without that companion (the main network's two passes).

``--model-val`` keeps only the slices the model's checkpoint lists as its validation slices (the others
are training slices); ``--ids`` picks slices by id; ``--split`` by manifest split.

Speed runs as the command line does: BatchNorms folded (``SegPredictor``'s default), glibc keeping
freed memory and ``--precision auto`` (bfloat16 where the processor computes it natively); ``--no-fold``,
``--default-allocator`` and ``--precision fp32`` leave each out, to measure what each adds.

Prints the evaluation table and a speed table; ``--json OUT`` writes everything.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np
import torch


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def speed(predictor, n: int = 48, size: int = 512, batch: int = 8, slices: list | None = None) -> dict:
    """Slices/s for ``n`` random 512x512 slices (or the given ones) through the full predictor (resize
    in and out, softmax, argmax)."""
    rng = np.random.default_rng(0)
    slices = slices or [rng.random((size, size), dtype=np.float32) for _ in range(n)]
    predictor.batch_size = batch
    predictor.predict(slices[:batch])  # warm-up
    t0 = time.perf_counter()
    predictor.predict(slices)
    dt = time.perf_counter() - t0
    return {"slices_per_second": round(n / dt, 2), "seconds": round(dt, 2)}


def main() -> int:
    from covidct.data.segmentation import SegFolder
    from covidct.engine.evaluate_seg import evaluate_folder, format_table
    from covidct.engine.infer import SegPredictor
    from covidct.models import SegModelConfig, build_seg_model
    from covidct.models.registry import load_seg_model
    from covidct.runtime import keep_freed_memory

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--model")
    ap.add_argument("--split")
    ap.add_argument("--ids", help="comma-separated slice ids")
    ap.add_argument("--model-val", action="store_true", help="only the model's own validation slices")
    ap.add_argument("--frames", help="a folder of full 512x512 slices (COVID-SemiSeg layout, e.g. medseg-512) to time "
                    "the two-pass (lung-cropped) prediction on")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json")
    ap.add_argument("--no-fold", action="store_true", help="time the networks with their BatchNorms (not folded)")
    ap.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                    help="arithmetic of every timed and evaluated network, as covidct's --precision (default auto: "
                    "bfloat16 where native)")
    ap.add_argument("--default-allocator", action="store_true",
                    help="leave glibc malloc as it is (the covidct command line keeps freed memory for reuse)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not args.default_allocator:
        keep_freed_memory()   # as the covidct command line does

    model, payload = load_seg_model(args.model)
    shipped = SegPredictor(model, precision=args.precision)
    ids = args.ids.split(",") if args.ids else None
    if args.model_val:
        ids = [str(i) for i in payload["metrics"].get("val_ids") or []]
        if not ids:
            print(f"{payload['path']}: the model names no validation slices (trained with --fold all on every slice); "
                  "its cross-validation estimate is metrics.cross_validation (benchmarks/segmentation_cv.py)",
                  file=sys.stderr)
            return 2
    folder = SegFolder(args.data, split=args.split, ids=ids)
    result = evaluate_folder(shipped, folder, progress=False)
    print(f"== {payload['path']} on {args.data} ({len(folder)} slices)")
    print(format_table(result))

    rss0 = peak_rss_mb()
    fold = not args.no_fold
    prec = shipped.precision
    shipped = SegPredictor(model, fold_bn=fold, precision=prec)
    one_pass = SegPredictor(model, crop_to_lung=False, fold_bn=fold, precision=prec)
    # a companion network stored in the file (the effusion model) runs beside the main one: counted in
    nets = [model, *model.companions.values()]
    params_m = round(sum(p.numel() for net in nets for p in net.parameters()) / 1e6, 2)
    rows = {"shipped": {**speed(one_pass), "params_m": params_m, "input_size": model.config.input_size}}
    rows["shipped"]["peak_rss_mb"] = round(peak_rss_mb(), 1)
    if model.companions:
        rows["shipped without its companions"] = {
            **speed(SegPredictor(model, crop_to_lung=False, fold_bn=fold, effusion_model=None, lung_masked_model=None,
                                 precision=prec)),
            "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
            "input_size": model.config.input_size, "peak_rss_mb": round(peak_rss_mb(), 1)}
    if args.frames:
        from covidct.io.window import to_model_input

        frames = SegFolder(args.frames)
        real = [to_model_input(frames[i].image, is_hu=False) for i in range(min(48, len(frames)))]
        rows["shipped, two passes (real 512² frames)"] = {
            **speed(shipped, slices=real), "params_m": rows["shipped"]["params_m"],
            "input_size": model.config.input_size, "peak_rss_mb": round(peak_rss_mb(), 1)}
        if "lung_masked" in model.companions:   # the frames are lung-masked: the same slices without the companion
            main_only = SegPredictor(model, fold_bn=fold, lung_masked_model=None, precision=prec)
            rows["shipped, frames, main network only"] = {
                **speed(main_only, slices=real), "params_m": rows["shipped"]["params_m"],
                "input_size": model.config.input_size, "peak_rss_mb": round(peak_rss_mb(), 1)}
    reference = build_seg_model(SegModelConfig(encoder="resnet34", decoder_channels=(256, 128, 64, 32, 16), input_size=512))
    ref = SegPredictor(reference, crop_to_lung=False, fold_bn=fold, precision=prec)
    rows["reference_unet_resnet34_512"] = {**speed(ref), "params_m": round(sum(p.numel() for p in reference.parameters()) / 1e6, 2),
                                           "input_size": 512, "peak_rss_mb": round(peak_rss_mb(), 1)}
    allocator = "default glibc allocator" if args.default_allocator else "freed memory kept, as the CLI"
    folding = "BatchNorms folded" if fold else "BatchNorms not folded"
    print(f"\n== speed at 512x512, {args.threads} threads, {prec}, {folding}, {allocator} (peak RSS before speed runs "
          f"{rss0:.0f} MB)")
    print(f"{'model':<42}{'slices/s':>10}{'params (M)':>12}{'input':>8}{'peak RSS MB':>13}")
    for name, r in rows.items():
        print(f"{name:<42}{r['slices_per_second']:>10}{r['params_m']:>12}{r['input_size']:>8}{r['peak_rss_mb']:>13}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"evaluation": {k: v for k, v in result.items() if k != "details"}, "speed": rows,
                       "precision": prec}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
