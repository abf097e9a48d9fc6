"""Overlay pictures: lesions in colour (GGO red, consolidation blue, effusion green), the lung
outline in yellow, a legend and the disclaimer line."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from covidct.data.segmentation import LESION_CLASSES, LESION_COLOURS
from covidct.io.atomic import atomic_output
from covidct.io.image import png_info

FOOTER = "covidct - research software, not for diagnosis"


def overlay_rgb(grey01: np.ndarray, labels: np.ndarray, lung: np.ndarray | None = None, *, alpha: float = 0.45) -> np.ndarray:
    """``(H, W, 3)`` uint8: the grey slice with lesion colours blended in and the lung outlined."""
    from skimage.segmentation import find_boundaries

    base = np.repeat((np.clip(grey01, 0, 1) * 255).astype(np.float32)[..., None], 3, axis=2)
    for value, name in enumerate(LESION_CLASSES):
        if value == 0:
            continue
        m = labels == value
        if m.any():
            base[m] = (1 - alpha) * base[m] + alpha * np.array(LESION_COLOURS[name], np.float32)
    if lung is not None and lung.any():
        base[find_boundaries(lung.astype(bool), mode="inner")] = LESION_COLOURS["lung"]
    return base.astype(np.uint8)


def with_legend(rgb: np.ndarray, *, names: tuple[str, ...] = ("ggo", "consolidation", "effusion", "lung"),
                title: str | None = None, min_width: int = 320) -> Image.Image:
    """Add a legend strip (and optional title) under an overlay; small slices are upscaled."""
    im = Image.fromarray(rgb)
    if im.width < min_width:
        scale = min_width / im.width
        im = im.resize((min_width, max(1, round(im.height * scale))), Image.NEAREST)
    strip = 18 * (2 + (1 if title else 0))
    canvas = Image.new("RGB", (im.width, im.height + strip), (0, 0, 0))
    canvas.paste(im, (0, 0))
    draw = ImageDraw.Draw(canvas)
    y = im.height + 3
    x = 4
    labels = {"ggo": "GGO", "consolidation": "consolidation", "effusion": "effusion", "lung": "lung outline",
              "lesion": "lesion"}
    for name in names:   # a merged "lesion" class is drawn in the GGO colour
        draw.rectangle([x, y + 2, x + 10, y + 12], fill=tuple(LESION_COLOURS.get(name, LESION_COLOURS["ggo"])))
        draw.text((x + 14, y), labels[name], fill=(255, 255, 255))
        x += 20 + 7 * len(labels[name])
    y += 18
    if title:
        draw.text((4, y), title, fill=(255, 255, 255))
        y += 18
    draw.text((4, y), FOOTER, fill=(200, 200, 200))
    return canvas


def save_png(image: Image.Image | np.ndarray, path: str | Path) -> Path:
    """Write a PNG atomically, the disclaimer in its text chunks (:func:`covidct.io.image.png_info`)."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    with atomic_output(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=png_info())
    return Path(path)


def heatmap_rgb(grey01: np.ndarray, heat01: np.ndarray, *, alpha: float = 0.45) -> np.ndarray:
    """The grey slice with a jet-coloured heat map blended in (``(H, W, 3)`` uint8)."""
    from matplotlib import colormaps

    base = np.repeat(np.clip(grey01, 0, 1)[..., None], 3, axis=2)
    colour = colormaps["jet"](np.clip(heat01, 0, 1))[..., :3]
    weight = alpha * np.clip(heat01, 0, 1)[..., None]
    return ((1 - weight) * base * 255 + weight * colour * 255).astype(np.uint8)


def instances_rgb(grey01: np.ndarray, masks: np.ndarray, labels: list[str], scores: list[float],
                  boxes: np.ndarray, *, alpha: float = 0.45) -> Image.Image:
    """Lesion instances on the grey slice (torchvision's ``draw_segmentation_masks`` and
    ``draw_bounding_boxes``): the masks of each class blended once in the class colour (GGO red,
    consolidation blue; a merged "lesion" class in red), each box outlined in its colour with its
    score (no ``scores``: boxes without labels, e.g. ground truth). ``masks`` ``(N, H, W)`` bool (or none: boxes
    only), ``boxes`` ``(N, 4)`` x0, y0, x1, y1."""
    import torch
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

    def colour(name: str) -> tuple[int, int, int]:
        return tuple(int(v) for v in LESION_COLOURS.get(name, LESION_COLOURS["ggo"]))

    grey8 = torch.from_numpy((np.clip(grey01, 0, 1) * 255).astype(np.uint8))
    img = grey8.expand(3, -1, -1).contiguous()
    masks = np.asarray(masks, bool).reshape(-1, *grey8.shape)
    mask_labels = labels[:len(masks)]  # no masks given: boxes only
    names = list(dict.fromkeys(mask_labels))  # one union per class: overlapping instances do not pile up to opaque
    if names:
        unions = torch.from_numpy(np.stack([masks[[lab == n for lab in mask_labels]].any(axis=0) for n in names]))
        img = draw_segmentation_masks(img, unions, alpha=alpha, colors=[colour(n) for n in names])
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    if len(boxes):
        img = draw_bounding_boxes(img, torch.from_numpy(boxes), labels=[f"{s:.2f}" for s in scores] if scores else None,
                                  colors=[colour(n) for n in labels])
    return Image.fromarray(img.permute(1, 2, 0).numpy())


def instances_comparison(grey01: np.ndarray, truth: dict, prediction: dict, class_names: Sequence[str], *,
                         min_score: float, title: str = "") -> Image.Image:
    """Ground-truth instances (left) beside the predicted ones scoring at least ``min_score`` (right), each drawn
    by :func:`instances_rgb` (GGO red, consolidation blue; truth boxes without a score), a legend and a title
    under them. ``truth``: ``{"masks" (N, H, W), "labels", "boxes"}`` as
    :func:`covidct.models.lesions.instances_from_labels`; ``prediction``: a Mask R-CNN output (``masks``
    ``(M, 1, H, W)`` probabilities)."""
    keep = np.asarray(prediction["scores"]) >= min_score
    pred_masks = np.asarray(prediction["masks"])[keep][:, 0] > 0.5
    pred_names = [class_names[int(c)] for c in np.asarray(prediction["labels"])[keep]]
    pred_scores = [float(v) for v in np.asarray(prediction["scores"])[keep]]
    truth_names = [class_names[int(c)] for c in np.asarray(truth["labels"])]
    left = instances_rgb(grey01, np.asarray(truth["masks"], bool), truth_names, [], np.asarray(truth["boxes"]))
    right = instances_rgb(grey01, pred_masks, pred_names, pred_scores, np.asarray(prediction["boxes"])[keep])
    names = tuple(n for n in ("ggo", "consolidation", "lesion") if n in class_names)
    caption = f"truth: {len(truth_names)} instances | predicted: {len(pred_names)} scoring >= {min_score:g}"
    return _side_by_side(np.asarray(left), np.asarray(right), names=names, caption=caption, title=title)


def _side_by_side(left: np.ndarray, right: np.ndarray, *, caption: str, title: str = "",
                  names: tuple[str, ...] = ("ggo", "consolidation", "effusion", "lung")) -> Image.Image:
    """Two pictures of one slice with a white bar between them, the legend of ``names`` and a title under them
    (at least 640 px wide)."""
    pair = np.concatenate([left, np.full((left.shape[0], 4, 3), 255, np.uint8), right], axis=1)
    return with_legend(pair, names=names, title=f"{title}: {caption}" if title else caption, min_width=640)


def labels_comparison(grey01: np.ndarray, truth: np.ndarray, predicted: np.ndarray, *, truth_lung: np.ndarray | None = None,
                      predicted_lung: np.ndarray | None = None, title: str = "") -> Image.Image:
    """The true label map (left) beside the predicted one (right), each drawn by :func:`overlay_rgb` (GGO red,
    consolidation blue, effusion green, lung outline yellow when given), a legend and a title under them."""
    return _side_by_side(overlay_rgb(grey01, truth, truth_lung), overlay_rgb(grey01, predicted, predicted_lung),
                         caption="truth | predicted", title=title)
