"""albumentations pipelines for slice classification (images float32 ``[0, 1]``)."""

from __future__ import annotations

import albumentations as A
import cv2


def cls_train_transform(size: int, *, seed: int | None = None) -> A.Compose:
    return A.Compose([
        A.RandomResizedCrop(size=(size, size), scale=(0.6, 1.0), ratio=(0.8, 1.25), p=1.0),
        A.Affine(rotate=(-15, 15), scale=(0.9, 1.1), border_mode=cv2.BORDER_CONSTANT, fill=0, p=0.6),
        A.HorizontalFlip(p=0.5),
        A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.25, p=0.7),
        A.RandomGamma(gamma_limit=(70, 140), p=0.4),
        A.GaussianBlur(blur_limit=(3, 5), p=0.15),
        A.GaussNoise(std_range=(0.01, 0.05), p=0.2),
        A.CoarseDropout(num_holes_range=(1, 4), hole_height_range=(0.05, 0.15), hole_width_range=(0.05, 0.15), p=0.3),
    ], seed=seed)


def cls_eval_transform(size: int) -> A.Compose:
    return A.Compose([A.Resize(size, size, interpolation=cv2.INTER_AREA)])
