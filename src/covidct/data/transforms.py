"""albumentations pipelines shared by training and inference.

Images enter as float32 ``[0, 1]`` (``covidct.io.window.to_model_input``); label maps and the
lung mask travel as ``masks`` and are resampled with nearest neighbour.
"""

from __future__ import annotations

import cv2
import albumentations as A


def seg_train_transform(size: int, *, elastic: bool = True, seed: int | None = None) -> A.Compose:
    """Corona-Net's augmentation: random crop with scale shift, rotation, elastic deformation,
    flips, and intensity jitter; ends at ``size x size``. ``seed`` makes the draws repeatable."""
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
    if elastic:
        steps.insert(2, A.ElasticTransform(alpha=40, sigma=7, border_mode=cv2.BORDER_CONSTANT, p=0.25))
    return A.Compose(steps, seed=seed)


def seg_eval_transform(size: int) -> A.Compose:
    return A.Compose([A.Resize(size, size, interpolation=cv2.INTER_LINEAR)])
