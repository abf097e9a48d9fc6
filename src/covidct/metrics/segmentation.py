"""Segmentation measures with MONAI-style accumulate / aggregate / reset.

Per class (a binary mask per image): Dice, IoU, sensitivity, specificity, MAE and the 95th-percentile
Hausdorff distance; per label map: the adapted Rand error (scikit-image). Two aggregations:

* **pooled** (dataset level): TP/FP/FN/TN summed over all images before dividing — the number the
  COVID-SemiSeg / Inf-Net literature calls "Dice" for a test set;
* **mean per image**: each image scored alone, then averaged. An image where the class is absent
  from both prediction and reference has no defined Dice/IoU/sensitivity/HD95 and is **left out**
  of those means (its specificity and MAE still count); an image with the class in only one of
  the two scores Dice 0.

MAE is the mean absolute difference between the predicted probability (or 0/1 mask when no
probability is given) and the reference mask. HD95 is in pixels unless ``spacing`` is given.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np


def dice_score(pred: np.ndarray, target: np.ndarray) -> float:
    """Dice of two boolean masks; ``nan`` when both are empty."""
    p, t = np.asarray(pred, bool), np.asarray(target, bool)
    den = p.sum() + t.sum()
    return float(2.0 * np.logical_and(p, t).sum() / den) if den else float("nan")


def _surface(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def hausdorff95(pred: np.ndarray, target: np.ndarray, spacing: tuple[float, ...] | None = None) -> float:
    """95th percentile of the symmetric surface distances; ``nan`` if either mask is empty."""
    from scipy import ndimage

    p, t = np.asarray(pred, bool), np.asarray(target, bool)
    if not p.any() or not t.any():
        return float("nan")
    sp, st = _surface(p), _surface(t)
    dt_t = ndimage.distance_transform_edt(~st, sampling=spacing)
    dt_p = ndimage.distance_transform_edt(~sp, sampling=spacing)
    distances = np.concatenate([dt_t[sp], dt_p[st]])
    return float(np.percentile(distances, 95))


def rand_error(pred_labels: np.ndarray, true_labels: np.ndarray) -> float:
    """Adapted Rand error (scikit-image; reference background 0 ignored); ``nan`` when the
    reference has no foreground."""
    from skimage.metrics import adapted_rand_error

    t = np.asarray(true_labels)
    if not t.any():
        return float("nan")
    err, _, _ = adapted_rand_error(t.astype(np.int64), np.asarray(pred_labels).astype(np.int64))
    return float(err)


class SegmentationMetrics:
    """Accumulates per-class counts and per-image scores over a dataset."""

    def __init__(self, *, compute_hd95: bool = True, spacing: tuple[float, ...] | None = None) -> None:
        self.compute_hd95 = compute_hd95
        self.spacing = spacing
        self.reset()

    def reset(self) -> None:
        self._counts: dict[str, np.ndarray] = defaultdict(lambda: np.zeros(4, dtype=np.int64))
        self._abs_err: dict[str, float] = defaultdict(float)
        self._pixels: dict[str, int] = defaultdict(int)
        self._per_image: dict[str, list[dict[str, float]]] = defaultdict(list)
        self._rand: list[float] = []
        self._images: set[str] = set()

    def update(self, name: str, pred: np.ndarray, target: np.ndarray, *, prob: np.ndarray | None = None,
               image_id: str | None = None) -> None:
        """Add one image's binary prediction (and optional probability map) for class ``name``."""
        p, t = np.asarray(pred, bool), np.asarray(target, bool)
        if p.shape != t.shape:
            raise ValueError(f"prediction {p.shape} and reference {t.shape} differ in shape")
        tp = int(np.logical_and(p, t).sum())
        fp = int(np.logical_and(p, ~t).sum())
        fn = int(np.logical_and(~p, t).sum())
        tn = int(p.size - tp - fp - fn)
        self._counts[name] += (tp, fp, fn, tn)
        est = p.astype(np.float32) if prob is None else np.asarray(prob, np.float32)
        abs_err = float(np.abs(est - t.astype(np.float32)).sum())
        self._abs_err[name] += abs_err
        self._pixels[name] += p.size
        both_empty = tp + fp + fn == 0
        nan = float("nan")
        self._per_image[name].append({
            "dice": nan if both_empty else 2 * tp / (2 * tp + fp + fn),
            "iou": nan if both_empty else tp / (tp + fp + fn),
            "sensitivity": tp / (tp + fn) if tp + fn else nan,
            "specificity": tn / (tn + fp) if tn + fp else nan,
            "mae": abs_err / p.size,
            "hd95": hausdorff95(p, t, self.spacing) if self.compute_hd95 else nan,
        })
        if image_id is not None:
            self._images.add(image_id)

    def update_labels(self, pred_labels: np.ndarray, true_labels: np.ndarray) -> None:
        """Add one image's label maps for the adapted Rand error."""
        self._rand.append(rand_error(pred_labels, true_labels))

    @property
    def classes(self) -> list[str]:
        return list(self._counts)

    def pooled(self) -> dict[str, dict[str, float]]:
        out = {}
        for name, (tp, fp, fn, tn) in self._counts.items():
            nan = float("nan")
            out[name] = {
                "dice": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else nan,
                "iou": tp / (tp + fp + fn) if tp + fp + fn else nan,
                "sensitivity": tp / (tp + fn) if tp + fn else nan,
                "specificity": tn / (tn + fp) if tn + fp else nan,
                "mae": self._abs_err[name] / self._pixels[name] if self._pixels[name] else nan,
            }
        return out

    def mean_per_image(self) -> dict[str, dict[str, float]]:
        out = {}
        for name, rows in self._per_image.items():
            out[name] = {}
            for key in rows[0]:
                vals = np.array([r[key] for r in rows], dtype=float)
                vals = vals[~np.isnan(vals)]
                out[name][key] = float(vals.mean()) if vals.size else float("nan")
        return out

    def aggregate(self) -> dict:
        """``{"pooled": {...}, "mean_per_image": {...}, "rand_error": float, "n_images": int}``."""
        rand = np.array(self._rand, dtype=float)
        rand = rand[~np.isnan(rand)]
        n_images = len(self._images) or max((len(v) for v in self._per_image.values()), default=0)
        return {
            "pooled": self.pooled(),
            "mean_per_image": self.mean_per_image(),
            "rand_error": float(rand.mean()) if rand.size else float("nan"),
            "n_images": n_images,
        }
