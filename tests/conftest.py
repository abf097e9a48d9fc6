"""Shared fixtures: generated CT series, volumes, images and segmentation folders."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from covidct.data.paths import data_root  # noqa: E402
from covidct.data.synthetic import phantom_hu, write_ct_series  # noqa: E402,F401

DATA = data_root()


def write_nifti(path: Path, hu_kji: np.ndarray, spacing=(2.0, 0.8, 0.8)) -> np.ndarray:
    """Write a (slices, rows, cols) array, slice 0 = head, as NIfTI ``data[i, j, k]`` in DICOM order
    (axis codes L, P, I: covidct's working orientation); returns the affine."""
    import nibabel as nib

    affine = np.diag([-spacing[2], -spacing[1], -spacing[0], 1.0])
    affine[:3, 3] = [10.0, 20.0, -30.0]
    nib.save(nib.Nifti1Image(hu_kji.transpose(2, 1, 0).astype(np.int16), affine), path)
    return affine


def binary_mask_copy(folder: Path, root: Path) -> Path:
    """A copy of a COVID-SemiSeg-layout folder whose masks/ are binary infection masks (0 / 255; no masks4/),
    like Inf-Net's LungInfection ground truth."""
    import shutil

    from PIL import Image

    shutil.copytree(folder, root)
    shutil.rmtree(root / "masks4", ignore_errors=True)
    for png in (root / "masks").glob("*.png"):
        Image.fromarray(((np.asarray(Image.open(png)) > 0) * 255).astype(np.uint8)).save(png)
    return root


def make_seg_folder(root: Path, n: int = 6, size: int = 48, seed: int = 0, masks4: bool = True) -> Path:
    """A COVID-SemiSeg-layout folder with blob lesions that a tiny model can learn."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for sub in ("images", "masks", "lung") + (("masks4",) if masks4 else ()):
        (root / sub).mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[:size, :size]
    rows = ["image,mask,split,infnet_id"]
    for i in range(n):
        h, w = size + (i % 3) * 4, size
        yy, xx = np.mgrid[:h, :w]
        lung = (((yy - h / 2) / (0.4 * h)) ** 2 + ((xx - w / 2) / (0.4 * w)) ** 2) < 1
        img = np.where(lung, 40, 150).astype(np.float32)
        labels = np.zeros((h, w), np.uint8)
        cy, cx = rng.integers(h // 3, 2 * h // 3), rng.integers(w // 3, 2 * w // 3)
        ggo = ((yy - cy) ** 2 + (xx - cx) ** 2) < (0.12 * w) ** 2
        labels[ggo & lung] = 1
        img[ggo & lung] = 110
        con = ((yy - cy) ** 2 + (xx - cx) ** 2) < (0.05 * w) ** 2
        labels[con & lung] = 2
        img[con & lung] = 220
        masks4_labels = labels.copy()
        if i % 2 == 0:
            eff = lung & (yy > 0.8 * h)
            masks4_labels[eff & (labels == 0)] = 3
        img = np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(root / "images" / f"{i}.jpg" if i % 2 else root / "images" / f"{i}.png")
        Image.fromarray(labels).save(root / "masks" / f"{i}.png")
        Image.fromarray(lung.astype(np.uint8)).save(root / "lung" / f"{i}.png")
        if masks4:
            Image.fromarray(masks4_labels).save(root / "masks4" / f"{i}.png")
        rows.append(f"images/{i}.{'jpg' if i % 2 else 'png'},masks/{i}.png,{'train' if i < n - 2 else 'test'},{i}")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture
def seg_folder(tmp_path: Path) -> Path:
    return make_seg_folder(tmp_path / "seg")


def need_data(*parts: str) -> Path:
    path = DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not found at {path} (set COVIDCT_DATA)")
    return path


@pytest.fixture(scope="session")
def tiny_seg_model(tmp_path_factory) -> Path:
    """An untrained tiny segmentation model file (for pipeline plumbing tests)."""
    import torch

    from covidct.models import SegModelConfig, build_seg_model, save_checkpoint

    torch.manual_seed(0)
    cfg = SegModelConfig(encoder="resnet18", decoder_channels=(32, 16, 16, 8, 8), input_size=64)
    net = build_seg_model(cfg)
    path = tmp_path_factory.mktemp("models") / "tiny.pt"
    return save_checkpoint(path, task="seg", config=cfg.to_dict(), state_dict=net.state_dict(),
                           classes=[*cfg.lesion_classes, "lung"], input_size=64)


@pytest.fixture
def tiny_cls_model(tmp_path) -> Path:
    """An untrained tiny slice classifier file (ResNet-18 at 32², temperature 1), written afresh for each test."""
    import torch

    from covidct.models import save_checkpoint
    from covidct.models.classification import ClsModelConfig, build_cls_model

    torch.manual_seed(0)
    cfg = ClsModelConfig(encoder="resnet18", input_size=32)
    net = build_cls_model(cfg)
    return save_checkpoint(tmp_path / "tiny_cls.pt", task="cls", config=cfg.to_dict(), state_dict=net.state_dict(),
                           classes=list(cfg.classes), input_size=32, temperature=1.0)
