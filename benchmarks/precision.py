"""Float32 against bfloat16 inference of a segmentation model (``SegPredictor(precision=...)``): what the faster
arithmetic costs in accuracy and what it saves in time, on this machine, in one run.

    python benchmarks/precision.py [--model NAME|FILE] --data ../shared/data/covid-semiseg
        [--data ../shared/data/medseg-512] [--scan ../shared/data/covid-ct-md/P001] [--repeat 3] [--json OUT]

For each ``--data`` folder (COVID-SemiSeg layout): pooled Dice per class in float32 and in bfloat16, the share of
pixels whose label is the same in both, and the lesion Dice between the two label maps (mean and lowest per
slice). For each ``--scan`` (DICOM / NIfTI CT): the slices cropped to their HU lungs as ``covidct analyze`` does,
timed through the predictor ``--repeat`` times per precision (alternating; the network's share timed apart).
The scan-level effect (burdens, slice AUC, wall time) is ``benchmarks/analyze.py --precision fp32|bf16``.
Without native bfloat16 (no AVX512-BF16 / AMX) it still runs, and says that bfloat16 is emulated here.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np

PRECISIONS = ("fp32", "bf16")


def label_agreement(a: list[np.ndarray], b: list[np.ndarray]) -> dict[str, float]:
    """Pixel agreement of two lists of label maps, and the per-slice Dice of their lesion (GGO +
    consolidation) regions, over slices where either has lesion."""
    same = float(np.mean([(x == y).mean() for x, y in zip(a, b)])) if a else float("nan")
    dice = []
    for x, y in zip(a, b):
        lx, ly = np.isin(x, (1, 2)), np.isin(y, (1, 2))
        total = int(lx.sum() + ly.sum())
        if total:
            dice.append(2.0 * float((lx & ly).sum()) / total)
    return {"pixel_agreement": round(same, 6),
            "lesion_dice_mean": round(float(np.mean(dice)), 6) if dice else None,
            "lesion_dice_min": round(float(np.min(dice)), 6) if dice else None,
            "slices_with_lesion": len(dice)}


def folder_rows(model, data: str) -> dict:
    from covidct.data.segmentation import SegFolder
    from covidct.engine.evaluate_seg import evaluate_folder
    from covidct.engine.infer import SegPredictor

    folder = SegFolder(data)
    out, maps = {"data": data, "n_images": len(folder)}, {}
    for p in PRECISIONS:
        got: list[np.ndarray] = []
        result = evaluate_folder(SegPredictor(model, precision=p), folder, progress=False, compute_hd95=False,
                                 on_prediction=lambda sample, pred: got.append(pred.labels.copy()))
        out[p] = {"dice": result["dice"], "images_per_second": result["images_per_second"]}
        maps[p] = got
    out["fp32_vs_bf16"] = label_agreement(maps["fp32"], maps["bf16"])
    return out


def scan_crops(model, path: str) -> tuple[list[np.ndarray], float]:
    """The model inputs ``covidct analyze`` gives the segmentation network for a CT scan (its lung crops,
    :func:`covidct.analysis.scan.lung_crop_input`), and the scan's pixel size in mm."""
    from covidct.analysis.lungs import segment_lungs_hu
    from covidct.analysis.scan import lung_crop_input, model_turns
    from covidct.io import read
    from covidct.io.body import mask_box

    vol = read(path, progress=False)
    lungs = segment_lungs_hu(vol.array, spacing=vol.spacing, affine=vol.affine, progress=False).labels
    turns = model_turns(vol, model)
    crops = [lung_crop_input(vol, k, mask_box(lungs[k] > 0), turns=turns) for k in range(vol.n_slices) if lungs[k].any()]
    return crops, float(np.sqrt(vol.spacing[1] * vol.spacing[2]))


def scan_speed(model, path: str, repeat: int, batch_size: int = 8) -> dict:
    """Seconds through the predictor (and in the networks alone) for the scan's lung crops, per precision."""
    from covidct.engine.infer import SegPredictor

    crops, pixel_mm = scan_crops(model, path)
    predictors = {p: SegPredictor(model, crop_to_lung=False, precision=p, batch_size=batch_size) for p in PRECISIONS}
    times: dict[str, dict[str, list[float]]] = {p: {"predict_s": [], "network_s": []} for p in PRECISIONS}
    for _ in range(repeat):
        for p, predictor in predictors.items():
            spent = [0.0]
            run = predictor._logits

            def timed(*args, **kwargs):
                t = time.perf_counter()
                out = run(*args, **kwargs)
                spent[0] += time.perf_counter() - t
                return out

            predictor._logits = timed
            t0 = time.perf_counter()
            for start in range(0, len(crops), batch_size):   # as analyze: a batch at a time, results dropped
                predictor.predict(crops[start:start + batch_size], pixel_mm=pixel_mm)
            times[p]["predict_s"].append(round(time.perf_counter() - t0, 3))
            times[p]["network_s"].append(round(spent[0], 3))
            del predictor._logits
    best = {p: {k: min(v) for k, v in times[p].items()} for p in PRECISIONS}
    return {"scan": path, "slices": len(crops), "runs": times, "best": best,
            "speed_up_network": round(best["fp32"]["network_s"] / best["bf16"]["network_s"], 2),
            "speed_up_predict": round(best["fp32"]["predict_s"] / best["bf16"]["predict_s"], 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="segmentation model (default: the shipped one)")
    ap.add_argument("--data", action="append", default=[], help="COVID-SemiSeg-layout folder (repeatable)")
    ap.add_argument("--scan", action="append", default=[], help="CT scan to time (repeatable)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args()
    if not args.data and not args.scan:
        ap.error("give --data and/or --scan")

    import torch

    from covidct.engine.precision import native_bf16
    from covidct.models.registry import load_seg_model
    from covidct.runtime import keep_freed_memory

    keep_freed_memory()   # as the command line runs
    model, payload = load_seg_model(args.model)
    native = native_bf16("cpu")
    print(f"model {os.path.basename(payload['path'])}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"bfloat16 {'native' if native else 'EMULATED (no AVX512-BF16 / AMX): slow here'}")
    report: dict = {"model": os.path.basename(payload["path"]), "native_bf16": native, "folders": [], "scans": []}
    for data in args.data:
        row = folder_rows(model, data)
        report["folders"].append(row)
        print(f"\n{data} ({row['n_images']} slices): pooled Dice")
        keys = list(row["fp32"]["dice"])
        print("precision | " + " | ".join(keys) + " | images/s")
        for p in PRECISIONS:
            d = row[p]["dice"]
            print(f"{p} | " + " | ".join("–" if d[k] is None else f"{d[k]:.4f}" for k in keys)
                  + f" | {row[p]['images_per_second']}")
        a = row["fp32_vs_bf16"]
        print(f"fp32 vs bf16 labels: pixel agreement {a['pixel_agreement']:.5f}; lesion Dice between them mean "
              f"{a['lesion_dice_mean']} (lowest {a['lesion_dice_min']}, {a['slices_with_lesion']} slices with lesion)")
    for scan in args.scan:
        row = scan_speed(model, scan, args.repeat)
        report["scans"].append(row)
        b = row["best"]
        print(f"\n{scan} ({row['slices']} lung slices, best of {args.repeat}): predictor fp32 {b['fp32']['predict_s']} s"
              f" / bf16 {b['bf16']['predict_s']} s ({row['speed_up_predict']}x); networks alone "
              f"{b['fp32']['network_s']} / {b['bf16']['network_s']} s ({row['speed_up_network']}x)")
    if args.json:
        from covidct.report.json_io import write_json

        write_json(report, args.json)   # atomic, with the disclaimer
    return 0


if __name__ == "__main__":
    sys.exit(main())
