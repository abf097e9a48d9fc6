"""``covidct evaluate seg``: a segmentation model on any folder in the COVID-SemiSeg layout."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from covidct.data.segmentation import SegFolder, SegSample
from covidct.engine.infer import SegPrediction, SegPredictor
from covidct.errors import CovidctError
from covidct.io.window import to_model_input
from covidct.metrics.segmentation import SegmentationMetrics

SEG_KEYS = ("infection", "ggo", "consolidation", "effusion", "lung")


def score_sample(metrics: SegmentationMetrics, sample: SegSample, pred: SegPrediction, *,
                 has_effusion_head: bool) -> None:
    """Add one slice to ``metrics`` under the keys of :data:`SEG_KEYS` that it has labels for."""
    gt, pl = sample.labels, pred.labels
    metrics.update("infection", np.isin(pl, (1, 2)), np.isin(gt, (1, 2)), prob=pred.infection_prob, image_id=sample.id)
    if sample.has_types:   # a binary infection mask says nothing of GGO / consolidation
        metrics.update("ggo", pl == 1, gt == 1, prob=pred.probs[1])
        metrics.update("consolidation", pl == 2, gt == 2, prob=pred.probs[2])
    if sample.has_effusion and has_effusion_head:
        metrics.update("effusion", pl == 3, gt == 3, prob=pred.probs[3])
    if sample.lung is not None and pred.lung_prob is not None:
        metrics.update("lung", pred.lung, sample.lung.astype(bool), prob=pred.lung_prob)
    metrics.update_labels(np.isin(pl, (1, 2)).astype(np.uint8), np.isin(gt, (1, 2)).astype(np.uint8))


#: Called with every evaluated slice and its prediction (e.g. to draw them; not timed).
OnSegPrediction = Callable[[SegSample, SegPrediction], None]


def _score_folder(metrics: SegmentationMetrics, predictor: SegPredictor, folder, *, progress: bool,
                  on_prediction: OnSegPrediction | None = None) -> float:
    """Add every slice of ``folder`` to ``metrics``; returns the seconds spent in the model."""
    has_eff = predictor.predicts_effusion
    model_seconds = 0.0
    for i in tqdm(range(len(folder)), desc="evaluate seg", unit="slice", disable=not progress):
        sample = folder[i]
        t0 = time.perf_counter()
        pred = predictor.predict([to_model_input(sample.image, is_hu=False)])[0]
        model_seconds += time.perf_counter() - t0
        score_sample(metrics, sample, pred, has_effusion_head=has_eff)
        if on_prediction is not None:
            on_prediction(sample, pred)
    return model_seconds


class _RoutedCount:
    """An ``on_prediction`` that counts the slices the lung-masked companion segmented and passes every
    slice on to ``then``."""

    def __init__(self, then: OnSegPrediction | None = None) -> None:
        self.n, self.then = 0, then

    def __call__(self, sample: SegSample, prediction: SegPrediction) -> None:
        self.n += prediction.network == "lung_masked"
        if self.then is not None:
            self.then(sample, prediction)


def evaluate_folder(predictor: SegPredictor, folder: SegFolder, *, progress: bool = True,
                    compute_hd95: bool = True, on_prediction: OnSegPrediction | None = None) -> dict[str, Any]:
    """Score ``predictor`` on every slice; returns the ``covidct evaluate seg`` JSON object plus
    a ``details`` block (all measures pooled and per image). ``on_prediction(sample, prediction)`` sees
    every slice."""
    metrics = SegmentationMetrics(compute_hd95=compute_hd95)
    model_seconds = _score_folder(metrics, predictor, folder, progress=progress, on_prediction=on_prediction)
    return _summary(metrics, len(folder), model_seconds)


def manifest_id_map(data: str | Path, column: str) -> dict[str, str]:
    """``{value of column: slice id}`` from ``data``'s ``manifest.csv``: the ``id_map`` of
    :func:`fold_validation_sets` for fold models whose slice ids are that column (e.g. MedSeg's ``infnet_id``)."""
    from covidct.data.tables import read_table

    manifest = Path(data) / "manifest.csv"
    if not manifest.is_file():
        raise CovidctError(manifest, f"not found: the slice ids of column {column!r} are read from it")
    return {r[column]: Path(r["image"]).stem for r in read_table(manifest, ("image", column)) if r[column]}


def fold_validation_sets(model_specs: list[str | Path], data: str | Path, *,
                         id_map: dict[str, str] | None = None,
                         split: str | None = None) -> list[tuple[Any, dict, SegFolder]]:
    """``(model, checkpoint, its validation slices of data)`` for each fold model (trained with
    ``--folds K --fold k``): every slice is scored by the one model that did not train on it. The
    folds must not overlap. ``id_map`` translates the checkpoints' ids to ``data``'s ids (the same
    slices in another folder, e.g. MedSeg's 512² frames of the COVID-SemiSeg crops); ids it lacks are skipped.
    ``split``: only the slices of this manifest split (e.g. MedSeg's ``train`` frames, without its ``extra``)."""
    from covidct.models.registry import load_seg_model

    in_split = set(SegFolder(data, split=split).ids) if split is not None else None
    seen: set[str] = set()
    out = []
    for spec in model_specs:
        model, payload = load_seg_model(spec)
        ids = [str(i) for i in (payload.get("metrics") or {}).get("val_ids") or []]
        if not ids:
            raise CovidctError(spec, "the checkpoint names no validation slices (trained with --fold all?)")
        if seen & set(ids):
            raise CovidctError(spec, f"validation slices overlap another model's: {sorted(seen & set(ids))[:5]}")
        seen |= set(ids)
        if id_map is not None:
            ids = [id_map[i] for i in ids if i in id_map]
        if in_split is not None:
            ids = [i for i in ids if i in in_split]
        out.append((model, payload, SegFolder(data, ids=ids)))
    return out


def evaluate_out_of_fold(model_specs: list[str | Path], data: str | Path, *, progress: bool = True,
                         compute_hd95: bool = True, id_map: dict[str, str] | None = None,
                         crop_to_lung: bool = True, density_classes: bool = True,
                         tta: bool = False, effusion_specs: list[str | Path] | None = None,
                         lung_masked_of: str | Path | None = None, split: str | None = None) -> dict[str, Any]:
    """Cross-validation estimate: each fold model scores only its own validation slices
    (:func:`fold_validation_sets`), all pooled into one result. ``effusion_specs``: an effusion
    recipe's fold models, one per fold in the same order, each run as its fold's effusion companion.
    ``lung_masked_of``: a main model (file or name) whose lung-masked companion each fold model stands in for:
    the main model's first pass decides which slices are lung-masked and gives their lung boxes, the fold model
    segments those (with no effusion network: :mod:`covidct.engine.infer`), the main model the others (beside the
    main model's effusion companion, or the fold's ``effusion_specs``); ``lung_masked_images`` in the result counts the slices the fold models segmented.
    ``split``: only the slices of this manifest split (:func:`fold_validation_sets`)."""
    from covidct.models.registry import load_seg_model

    metrics = SegmentationMetrics(compute_hd95=compute_hd95)
    n, model_seconds = 0, 0.0
    main = load_seg_model(lung_masked_of)[0] if lung_masked_of is not None else None
    routed = _RoutedCount()
    folds = fold_validation_sets(model_specs, data, id_map=id_map, split=split)
    companions: list = [None] * len(folds)
    if effusion_specs is not None:
        eff_folds = fold_validation_sets(effusion_specs, data, id_map=id_map, split=split)
        if len(eff_folds) != len(folds) or any(e[2].ids != f[2].ids for e, f in zip(eff_folds, folds)):
            raise CovidctError(None, "the effusion models must hold out the same slices as the models, fold by fold")
        companions = [e[0] for e in eff_folds]
    for (model, _, folder), effusion in zip(folds, companions):
        effusion = effusion if effusion is not None else "companion"
        if main is not None:
            if not main.config.lung_head:
                raise CovidctError(lung_masked_of, "has no lung head: it cannot tell lung-masked slices")
            predictor = SegPredictor(main, crop_to_lung=crop_to_lung, density_classes=density_classes, tta=tta,
                                     effusion_model=effusion, lung_masked_model=model)
        else:
            predictor = SegPredictor(model, crop_to_lung=crop_to_lung, density_classes=density_classes, tta=tta,
                                     effusion_model=effusion)
        model_seconds += _score_folder(metrics, predictor, folder, progress=progress, on_prediction=routed)
        n += len(folder)
    return {**_summary(metrics, n, model_seconds), **({"lung_masked_images": routed.n} if main is not None else {})}


def _summary(metrics: SegmentationMetrics, n_images: int, model_seconds: float) -> dict[str, Any]:
    agg = metrics.aggregate()

    def pick(block: dict, measure: str) -> dict[str, float | None]:
        return {k: (None if k not in block or np.isnan(block[k][measure]) else round(float(block[k][measure]), 6)) for k in SEG_KEYS}

    return {
        "n_images": n_images,
        "dice": pick(agg["pooled"], "dice"),
        "dice_mean_per_image": pick(agg["mean_per_image"], "dice"),
        "iou": pick(agg["pooled"], "iou"),
        "rand_error": None if np.isnan(agg["rand_error"]) else round(agg["rand_error"], 6),
        "images_per_second": round(n_images / model_seconds, 3) if model_seconds else None,
        "details": {"pooled": agg["pooled"], "mean_per_image": agg["mean_per_image"]},
    }


def evaluate_seg(model_spec: str | Path | None, data: str | Path, *, split: str | None = None,
                 progress: bool = True, tta: bool = False, density_classes: bool = True,
                 on_prediction: OnSegPrediction | None = None, precision: str = "auto") -> dict[str, Any]:
    """``covidct evaluate seg``; ``density_classes=False`` scores the network's own GGO / consolidation split;
    ``lung_masked_images`` in the result counts the slices the lung-masked companion segmented;
    ``on_prediction(sample, prediction)`` sees every slice; ``precision`` as in
    :class:`~covidct.engine.infer.SegPredictor` (the one used is in the result)."""
    from covidct.models.registry import load_seg_model

    model, payload = load_seg_model(model_spec)
    folder = SegFolder(data, split=split)
    predictor = SegPredictor(model, tta=tta, density_classes=density_classes, precision=precision)
    routed = _RoutedCount(on_prediction)
    result = evaluate_folder(predictor, folder, progress=progress, on_prediction=routed)
    result["model"] = Path(payload["path"]).name
    # slices found black outside their lungs and segmented by the model's lung-masked companion (None: it has none)
    result["lung_masked_images"] = routed.n if predictor.lung_masked is not None else None
    result["images_without_mask"] = folder.images_without_mask
    # binary infection masks (0 / 255): GGO and consolidation are not scored (null)
    result["binary_masks"] = folder.binary
    result["precision"] = predictor.precision
    result["data"] = str(data)
    return result


def format_table(result: dict[str, Any]) -> str:
    """The printed table: per class pooled and mean-per-image measures."""
    d = result["details"]
    cols = ("dice", "iou", "sensitivity", "specificity", "mae", "hd95")
    lines = [f"{'class':<15}{'aggregation':<15}" + "".join(f"{c:>12}" for c in cols)]
    for name in SEG_KEYS:
        if name not in d["pooled"]:
            continue
        for agg in ("pooled", "mean_per_image"):
            row = d[agg][name]
            lines.append(f"{name:<15}{agg:<15}" + "".join(
                f"{row.get(c, float('nan')):>12.4f}" if c in row else f"{'-':>12}" for c in cols))
    lines.append(f"rand error (infection, mean per image): {result['rand_error']}")
    lines.append(f"{result['n_images']} images, {result['images_per_second']} images/s")
    if result.get("lung_masked_images"):
        lines.append(f"{result['lung_masked_images']} of them black outside their lungs: segmented by the "
                     "model's lung-masked companion (pleural effusion, outside the lungs, cannot be seen on them)")
    return "\n".join(lines)
