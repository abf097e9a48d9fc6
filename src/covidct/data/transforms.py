"""albumentations pipelines shared by training and inference.

Images enter as float32 ``[0, 1]`` (``covidct.io.window.to_model_input``); label maps and the
lung mask travel as ``masks`` and are resampled with nearest neighbour.
"""

from __future__ import annotations

import albumentations as A
import cv2
import numpy as np


def seg_train_transform(size: int, *, elastic: bool = True, quarter_turns: bool = False,
                        seed: int | None = None) -> A.Compose:
    """Corona-Net's augmentation: random crop with scale shift, rotation, elastic deformation,
    flips, and intensity jitter; ends at ``size x size``. ``quarter_turns`` adds a transposition half of
    the time, so that with the two flips a slice is seen in all eight orientations (the training slices
    all have the anterior side at the left; without it a model never sees anterior-up slices).
    ``seed`` makes the draws repeatable."""
    steps = [
        A.RandomResizedCrop(size=(size, size), scale=(0.45, 1.0), ratio=(0.75, 1.333), p=1.0),
        A.Affine(scale=(0.85, 1.15), translate_percent=(-0.05, 0.05), rotate=(-25, 25),
                 border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=0, p=0.7),
        A.HorizontalFlip(p=0.5),
        A.VerticalFlip(p=0.5),
        A.RandomBrightnessContrast(brightness_limit=0.15, contrast_limit=0.2, p=0.6),
        A.RandomGamma(gamma_limit=(75, 135), p=0.4),
        A.GaussianBlur(blur_limit=(3, 5), p=0.15),
        A.GaussNoise(std_range=(0.01, 0.04), p=0.2),
    ]
    if quarter_turns:
        steps.insert(4, A.Transpose(p=0.5))
    if elastic:
        steps.insert(2, A.ElasticTransform(alpha=40, sigma=7, border_mode=cv2.BORDER_CONSTANT, p=0.25))
    return A.Compose(steps, seed=seed)


def seg_eval_transform(size: int) -> A.Compose:
    return A.Compose([A.Resize(size, size, interpolation=cv2.INTER_LINEAR)])


#: Label values that :func:`paste_lesions` carries over (GGO, consolidation; pleural effusion lies
#: outside the lung field and is not pasted).
PASTED_LABELS: tuple[int, ...] = (1, 2)


def paste_lesions(image: np.ndarray, labels: np.ndarray, lung: np.ndarray | None, donor_image: np.ndarray,
                  donor_labels: np.ndarray, donor_lung: np.ndarray | None, *, rng: np.random.Generator,
                  min_pixels: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Lesion copy-paste: the GGO and consolidation of a donor slice (resized to the recipient,
    mirrored left-right half of the time) laid into the recipient's lung field, their pixels
    blended in over a 1-pixel soft edge and shifted by the difference of the two slices'
    healthy-lung medians (so a pasted lesion keeps its contrast to the lung around it), and
    their labels written over the recipient's. Returns new arrays; the inputs are not changed.
    Without enough pasted pixels (fewer than ``min_pixels``) the recipient comes back as it was."""
    h, w = labels.shape
    if donor_labels.shape != (h, w):
        donor_image = cv2.resize(donor_image, (w, h), interpolation=cv2.INTER_LINEAR)
        donor_labels = cv2.resize(donor_labels, (w, h), interpolation=cv2.INTER_NEAREST)
        if donor_lung is not None:
            donor_lung = cv2.resize(donor_lung, (w, h), interpolation=cv2.INTER_NEAREST)
    if rng.random() < 0.5:
        donor_image, donor_labels = donor_image[:, ::-1], donor_labels[:, ::-1]
        donor_lung = donor_lung[:, ::-1] if donor_lung is not None else None
    paste = np.isin(donor_labels, PASTED_LABELS)
    if lung is not None:
        paste &= lung > 0
    if paste.sum() < min_pixels:
        return image, labels
    offset = 0.0
    if lung is not None and donor_lung is not None:
        own, theirs = (lung > 0) & (labels == 0), (donor_lung > 0) & (donor_labels == 0)
        if own.any() and theirs.any():
            offset = float(np.median(image[own]) - np.median(donor_image[theirs]))
    alpha = cv2.GaussianBlur(paste.astype(np.float32), (0, 0), sigmaX=1.0)
    alpha = np.where(paste, np.maximum(alpha, 0.5), alpha)
    lo, hi = float(image.min()), float(image.max())
    moved = np.clip(donor_image.astype(np.float32) + offset, lo, hi)
    out_image = np.clip(image * (1 - alpha) + moved * alpha, lo, hi).astype(image.dtype)
    out_labels = np.where(paste, donor_labels, labels).astype(labels.dtype)
    return out_image, out_labels
