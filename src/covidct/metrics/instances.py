"""Lesion-instance metric: COCO-style mask AP, accumulated slice by slice (torchmetrics underneath)."""

from __future__ import annotations

from typing import Any

import numpy as np


class InstanceAP:
    """COCO-style mask AP (AP50, AP75, mAP@[.5:.95]) per class and overall, accumulated slice by slice
    (``update`` / ``aggregate`` / ``reset``); torchmetrics ``MeanAveragePrecision`` underneath.
    ``classes`` are the foreground names, label ``i + 1`` for ``classes[i]``."""

    def __init__(self, classes: list[str] | tuple[str, ...]) -> None:
        self.classes = list(classes)
        self.reset()

    def reset(self) -> None:
        from torchmetrics.detection import MeanAveragePrecision

        # sync_on_compute=False: the metric is local to this process (under torchrun only rank 0
        # validates; torchmetrics' default all-gather would wait for ranks that never come)
        self.meters = {name: MeanAveragePrecision(iou_type="segm", iou_thresholds=thr, class_metrics=True,
                                                  sync_on_compute=False)
                       for name, thr in (("ap50", [0.5]), ("ap75", [0.75]), ("map", None))}
        self.n_images = 0

    def update(self, pred: dict, target: dict) -> None:
        """``pred``: ``masks`` (N, H, W) bool, ``scores``, ``labels``; ``target``: ``masks``, ``labels``."""
        p = {"masks": pred["masks"].bool(), "scores": pred["scores"], "labels": pred["labels"]}
        t = {"masks": target["masks"].bool(), "labels": target["labels"]}
        for m in self.meters.values():
            m.update([p], [t])
        self.n_images += 1

    def aggregate(self) -> dict[str, Any]:
        out: dict[str, Any] = {"n_images": self.n_images, "per_class": {c: {} for c in self.classes}}
        for name, m in self.meters.items():
            r = m.compute()
            out[name] = _nan_none(float(r["map"]))
            ids = r["classes"].tolist() if r["classes"].ndim else [int(r["classes"])]
            per = r["map_per_class"].tolist() if r["map_per_class"].ndim else [float(r["map_per_class"])]
            for cid, v in zip(ids, per):
                if 1 <= cid <= len(self.classes):
                    out["per_class"][self.classes[cid - 1]][name] = _nan_none(v)
        for c in self.classes:
            for name in self.meters:
                out["per_class"][c].setdefault(name, None)
        return out


def _nan_none(v: float) -> float | None:
    return None if v is None or np.isnan(v) or v < 0 else round(float(v), 6)
