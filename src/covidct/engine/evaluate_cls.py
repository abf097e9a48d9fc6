"""``covidct evaluate cls``: a slice classifier on any classification layout."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from covidct.data.classification import ClsRecord, RecordImages, load_records
from covidct.data.cls_transforms import cls_eval_transform
from covidct.errors import CovidctError
from covidct.metrics import classification_report, confusion_matrix, roc_auc, roc_auc_per_class
from covidct.models.classification import ClassificationNet


def predict_probabilities(model: ClassificationNet, images: Sequence[np.ndarray], *, temperature: float = 1.0,
                          batch_size: int = 16, tta: bool = False) -> np.ndarray:
    """``(N, C)`` calibrated class probabilities for grey ``[0, 1]`` images of any size;
    ``tta`` averages them with those of the left-right mirrored images."""
    tf = cls_eval_transform(model.config.input_size)
    out = []
    # channels-last: faster depthwise convolutions on CPU (converted outside inference mode, so
    # the parameters stay usable for training)
    model.eval().to(memory_format=torch.channels_last)
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            out.append(_batch_probabilities(model, tf, images[start:start + batch_size], temperature, tta))
    return np.concatenate(out) if out else np.zeros((0, len(model.config.classes)))


def _batch_probabilities(model, tf, images: Sequence[np.ndarray], temperature: float, tta: bool) -> np.ndarray:
    batch = torch.stack([torch.from_numpy(tf(image=np.asarray(im, np.float32))["image"])[None]
                         for im in images]).to(memory_format=torch.channels_last)
    probs = torch.softmax(model(batch) / temperature, dim=1)
    if tta:
        probs = (probs + torch.softmax(model(torch.flip(batch, dims=[3])) / temperature, dim=1)) / 2
    return probs.numpy()


def ensemble_probabilities(members: Sequence[tuple[torch.nn.Module, float]], images: Sequence[np.ndarray], *,
                           batch_size: int = 16, tta: bool = False) -> np.ndarray:
    """Mean of the calibrated probabilities of several ``(model, temperature)`` members."""
    return np.mean([predict_probabilities(m, images, temperature=t, batch_size=batch_size, tta=tta)
                    for m, t in members], axis=0)


def evaluate_records(model: ClassificationNet, records: list[ClsRecord], *, temperature: float = 1.0,
                     progress: bool = True, batch_size: int = 16, tta: bool = False,
                     ensemble: Sequence[tuple[torch.nn.Module, float]] = ()) -> dict[str, Any]:
    """Score ``model`` (averaged with the ``ensemble`` members, if any) on ``records``."""
    classes = list(model.config.classes)
    members = [(model, temperature), *ensemble]
    for m, _ in ensemble:
        if list(m.config.classes) != classes:
            raise CovidctError(None, f"ensemble members disagree on classes: {classes} vs {list(m.config.classes)}")
    loader = RecordImages()
    probs, model_seconds = [], 0.0
    bar = tqdm(total=len(records), desc="evaluate cls", unit="image", disable=not progress)
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        images = [loader(r) for r in chunk]
        t0 = time.perf_counter()
        probs.append(ensemble_probabilities(members, images, batch_size=batch_size, tta=tta))
        model_seconds += time.perf_counter() - t0
        bar.update(len(chunk))
    bar.close()
    result = score_probabilities(np.concatenate(probs), np.array([classes.index(r.label) for r in records]), classes)
    result["images_per_second"] = round(len(records) / model_seconds, 2) if model_seconds else None
    return result


def score_probabilities(p: np.ndarray, y: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """The evaluation of ``(N, C)`` class probabilities against labels ``y``: confusion matrix, the
    per-class table, ROC AUC (binary: float; else per class) and ECE."""
    classes = list(classes)
    rep = classification_report(confusion_matrix(y, p.argmax(axis=1), len(classes)), classes)
    auc: float | dict[str, float]
    auc = roc_auc(y == 1, p[:, 1]) if len(classes) == 2 else roc_auc_per_class(y, p, classes)
    return {
        "n_images": len(y),
        "classes": classes,
        "confusion": rep.confusion.tolist(),
        "overall_accuracy": rep.overall_accuracy,
        "per_class": rep.per_class,
        "micro": rep.micro,
        "auc": auc,
        "ece": expected_calibration_error(p, y),
        "_report": rep,
        "_probabilities": p,
        "_labels": y,
    }


def mean_auc(auc: float | dict[str, float]) -> float:
    """One number for model selection: the binary AUC, or the mean of the per-class AUCs."""
    return auc if isinstance(auc, float) else float(np.nanmean(list(auc.values())))


def summarize(res: dict[str, Any]) -> dict[str, Any]:
    """The short form of an :func:`evaluate_records` result stored in checkpoints' metrics."""
    auc = res["auc"]
    return {"accuracy": round(res["overall_accuracy"], 6),
            "auc": round(auc, 6) if isinstance(auc, float) else {k: round(v, 6) for k, v in auc.items()},
            "f1": {c: round(v["f1"], 6) for c, v in res["per_class"].items()}, "ece": round(res["ece"], 6)}


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = 10) -> float:
    """ECE of the top-class confidence over ``n_bins`` equal-width bins (torchmetrics)."""
    from torchmetrics.functional.classification import multiclass_calibration_error

    return float(multiclass_calibration_error(torch.as_tensor(probs, dtype=torch.float32), torch.as_tensor(labels),
                                              num_classes=probs.shape[1], n_bins=n_bins, norm="l1"))


def evaluate_cls(model_spec: str | Path | None | Sequence[str | Path], data: str | Path, *, split: str | None = None,
                 progress: bool = True, tta: bool = False) -> dict[str, Any]:
    """``covidct evaluate cls``: one model, or the mean of several (a list of specs)."""
    from covidct.models.registry import load_cls_model

    specs = list(model_spec) if isinstance(model_spec, (list, tuple)) else [model_spec]
    loaded = [load_cls_model(spec, fold_bn=True) for spec in specs]
    members = [(m, float(p.get("temperature", 1.0))) for m, p in loaded]
    model, temperature = members[0]
    records = load_records(data, split=split, classes=model.config.classes)
    result = evaluate_records(model, records, temperature=temperature, progress=progress, tta=tta,
                              ensemble=members[1:])
    result["model"] = ",".join(Path(p["path"]).name for _, p in loaded)
    result["tta"] = tta
    return result


def save_ensemble(model_specs: Sequence[str | Path], output: str | Path, *, data: str | Path | None = None,
                  split: str = "val", out_of_fold: bool = False, tta: bool = False,
                  progress: bool = True) -> dict[str, Any]:
    """Write a classifier ensemble (the mean of the members' calibrated probabilities) as one model
    file naming its members and their checksums; with ``data``, score it on that folder's ``split``,
    fit a temperature for the mean there, and store both as its validation metrics. With
    ``out_of_fold`` the members are k-fold models of ``data`` (``train cls --folds``): the estimate is
    their out-of-fold prediction (:func:`evaluate_out_of_fold`, stored as ``cross_validation``), on
    which a temperature and class offsets are fitted (Platt scaling). ``tta``: the ensemble averages
    every member over the input and its left-right mirror image (scored and calibrated that way)."""
    from covidct.models.checkpoint import file_sha256, read_checkpoint, save_checkpoint
    from covidct.models.ensemble import EnsembleConfig, build_ensemble
    from covidct.models.registry import model_name, resolve_model

    if len(model_specs) < 2:
        raise CovidctError(None, "an ensemble needs at least two --model")
    paths = [resolve_model(spec, task="cls") for spec in model_specs]
    names = [model_name(p) for p in paths]
    headers = [read_checkpoint(p) for p in paths]  # sizes and classes
    config = EnsembleConfig(members=tuple(names), checksums=tuple(file_sha256(p) for p in paths),
                            classes=tuple(headers[0].get("classes", ())),
                            input_size=max(int(h["input_size"]) for h in headers), tta=tta)
    for path, header in zip(paths, headers):
        if tuple(header.get("classes", ())) != config.classes:
            raise CovidctError(path, f"member classes {list(header.get('classes', ()))} differ from "
                                     f"{list(config.classes)}")
    metrics: dict[str, Any] = {"members": names, "tta": tta}
    temperature = 1.0
    if data is not None and out_of_fold:
        from covidct.engine.train_cls import fit_temperature_and_bias

        res = evaluate_out_of_fold(paths, data, progress=progress, tta=tta)
        logits = torch.log(torch.as_tensor(res["_probabilities"]).clamp_min(1e-8))
        temperature, offsets = fit_temperature_and_bias(logits, torch.as_tensor(res["_labels"]))
        calibrated = torch.softmax((logits + torch.tensor(offsets)) / temperature, dim=1).numpy()
        after = score_probabilities(calibrated, res["_labels"], config.classes)
        config = dataclasses.replace(config, logit_offsets=tuple(offsets))
        metrics["cross_validation_uncalibrated"] = {"data": str(data), "n_images": res["n_images"],
                                                    "models_per_image": res["models_per_image"], **summarize(res)}
        metrics["cross_validation"] = {"n_images": res["n_images"], **summarize(after)}
    if data is not None and not out_of_fold:
        from covidct.engine.train_cls import fit_temperature

        model = build_ensemble(config)  # (out of fold, the members were loaded one by one above)

        records = load_records(data, split=split, classes=config.classes)
        res = evaluate_records(model, records, progress=progress)
        # the mean of calibrated members is under-confident: one more temperature on the same split
        logits = torch.log(torch.as_tensor(res["_probabilities"]).clamp_min(1e-8))
        temperature = fit_temperature(logits, torch.as_tensor(res["_labels"]))
        after = evaluate_records(model, records, temperature=temperature, progress=False)
        metrics["validation"] = {"data": str(data), "split": split, "n_images": res["n_images"], **summarize(res)}
        metrics["validation_calibrated"] = summarize(after)
    save_checkpoint(output, task="cls", config=config.to_dict(), state_dict={}, classes=list(config.classes),
                    input_size=config.input_size, temperature=temperature,
                    normalization="each member's own (grey [0,1]; the ensemble input is resized to each member's size)",
                    metrics=metrics)
    return {"output": str(output), **metrics}


def evaluate_out_of_fold(model_specs: Sequence[str | Path], data: str | Path, *,
                         progress: bool = True, tta: bool = False) -> dict[str, Any]:
    """Cross-validation estimate of k-fold classifiers (``covidct train cls --folds K --fold k``): each
    model scores only the images its own fold held out (re-derived from its stored training settings
    on ``data`` and checked against the file list it stored), with its own temperature. Models of
    several recipes trained on the same folds are averaged per image (the out-of-fold estimate of
    their ensemble); every image must be held out by the same number of models."""
    from dataclasses import fields

    from covidct.data.classification import relative_name
    from covidct.engine.train_cls import ClsTrainConfig, split_records
    from covidct.models.registry import load_cls_model

    sums: dict[tuple[str, int | None], np.ndarray] = {}
    counts: dict[tuple[str, int | None], int] = {}
    labels: dict[tuple[str, int | None], str] = {}
    classes: list[str] | None = None
    names = []
    for spec in model_specs:
        model, payload = load_cls_model(spec, fold_bn=True)
        tc = payload.get("train_config") or {}
        if not tc.get("folds"):
            raise CovidctError(payload["path"], "not a k-fold model (train it with --folds K --fold k)")
        known = {f.name for f in fields(ClsTrainConfig)}
        cfg = ClsTrainConfig(**{**{k: v for k, v in tc.items() if k in known}, "data": str(data)})
        if classes is None:
            classes = list(model.config.classes)
        elif list(model.config.classes) != classes:
            raise CovidctError(payload["path"], f"classes {list(model.config.classes)} differ from {classes}")
        _, val = split_records(load_records(data, classes=classes), cfg)
        stored = payload.get("validation_files")
        if stored is not None and sorted(stored) != sorted(relative_name(r, Path(data)) for r in val):
            raise CovidctError(payload["path"], f"its held-out images are not those of fold {cfg.fold} of {data}")
        res = evaluate_records(model, val, temperature=float(payload.get("temperature", 1.0)), progress=progress,
                               tta=tta)
        for r, p in zip(val, res["_probabilities"]):
            key = (r.path.as_posix(), r.slice_index)
            sums[key] = sums.get(key, 0.0) + p
            counts[key] = counts.get(key, 0) + 1
            labels[key] = r.label
        names.append(Path(payload["path"]).name)
    if len(set(counts.values())) != 1:
        raise CovidctError(data, "the models do not hold out every image equally often (mixed folds?)")
    keys = sorted(sums, key=lambda k: (k[0], -1 if k[1] is None else k[1]))
    p = np.stack([sums[k] / counts[k] for k in keys])
    result = score_probabilities(p, np.array([classes.index(labels[k]) for k in keys]), classes)
    result["models"] = names
    result["models_per_image"] = next(iter(counts.values()))
    return result
