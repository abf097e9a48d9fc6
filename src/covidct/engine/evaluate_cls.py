"""``covidct evaluate cls``: a slice classifier on any classification layout."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from covidct.data.classification import ClsRecord, RecordImages, load_records
from covidct.data.cls_transforms import cls_eval_transform
from covidct.metrics import classification_report, confusion_matrix, roc_auc, roc_auc_per_class
from covidct.models.classification import ClassificationNet


@torch.inference_mode()
def predict_probabilities(model: ClassificationNet, images: Sequence[np.ndarray], *, temperature: float = 1.0,
                          batch_size: int = 16) -> np.ndarray:
    """``(N, C)`` calibrated class probabilities for grey ``[0, 1]`` images of any size."""
    tf = cls_eval_transform(model.config.input_size)
    out = []
    model.eval()
    for start in range(0, len(images), batch_size):
        batch = torch.stack([torch.from_numpy(tf(image=np.asarray(im, np.float32))["image"])[None]
                             for im in images[start:start + batch_size]])
        out.append(torch.softmax(model(batch) / temperature, dim=1).numpy())
    return np.concatenate(out) if out else np.zeros((0, len(model.config.classes)))


def evaluate_records(model: ClassificationNet, records: list[ClsRecord], *, temperature: float = 1.0,
                     progress: bool = True, batch_size: int = 16) -> dict[str, Any]:
    classes = list(model.config.classes)
    loader = RecordImages()
    probs, model_seconds = [], 0.0
    bar = tqdm(total=len(records), desc="evaluate cls", unit="image", disable=not progress)
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        images = [loader(r) for r in chunk]
        t0 = time.perf_counter()
        probs.append(predict_probabilities(model, images, temperature=temperature, batch_size=batch_size))
        model_seconds += time.perf_counter() - t0
        bar.update(len(chunk))
    bar.close()
    p = np.concatenate(probs)
    y = np.array([classes.index(r.label) for r in records])
    pred = p.argmax(axis=1)
    rep = classification_report(confusion_matrix(y, pred, len(classes)), classes)
    auc: float | dict[str, float]
    auc = roc_auc(y == 1, p[:, 1]) if len(classes) == 2 else roc_auc_per_class(y, p, classes)
    return {
        "n_images": len(records),
        "classes": classes,
        "confusion": rep.confusion.tolist(),
        "overall_accuracy": rep.overall_accuracy,
        "per_class": rep.per_class,
        "micro": rep.micro,
        "auc": auc,
        "images_per_second": round(len(records) / model_seconds, 2) if model_seconds else None,
        "ece": expected_calibration_error(p, y),
        "_report": rep,
        "_probabilities": p,
        "_labels": y,
    }


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = 10) -> float:
    """ECE of the top-class confidence over ``n_bins`` equal-width bins (torchmetrics)."""
    from torchmetrics.functional.classification import multiclass_calibration_error

    return float(multiclass_calibration_error(torch.as_tensor(probs, dtype=torch.float32), torch.as_tensor(labels),
                                              num_classes=probs.shape[1], n_bins=n_bins, norm="l1"))


def evaluate_cls(model_spec: str | Path | None, data: str | Path, *, split: str | None = None,
                 progress: bool = True) -> dict[str, Any]:
    from covidct.models.registry import load_cls_model

    model, payload = load_cls_model(model_spec)
    records = load_records(data, split=split, classes=model.config.classes)
    result = evaluate_records(model, records, temperature=float(payload.get("temperature", 1.0)), progress=progress)
    result["model"] = Path(payload["path"]).name
    return result
