"""Self-supervised pretraining of the whole segmentation network on unlabelled slices.

Models Genesis' idea (Zhou et al., MICCAI 2019): corrupt an image — a random monotone intensity
curve, locally shuffled pixels, and in-painting (boxes replaced by noise) or out-painting (all but a
few boxes replaced) — and train the network to restore the original. The U-Net's encoder *and
decoder* learn CT anatomy from images without labels; ``covidct train seg --init FILE`` then starts
from every tensor but the output head. The checkpoint has task ``seg-pretrain`` and the network's
configuration (encoder, decoder, input size), so ``--init`` can check that the two networks fit. ``--init`` also
takes a trained segmentation model (:func:`init_from_pretrained`: fine-tuning, its output head included when
the classes match).

Images come from any classification folder layout (labels ignored; one split with ``split``) or a
plain folder of images, loaded as the classifiers load them (grey ``[0, 1]``; CT through the model
window).

It runs in one process (under ``torchrun`` it refuses to start: each rank would train and write alone).
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import albumentations as A
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from covidct.data.transforms import seg_train_transform
from covidct.engine.common import Distributed, seed_everything, train_one_epoch, warmup_cosine, write_log
from covidct.errors import CovidctError
from covidct.models.checkpoint import save_checkpoint
from covidct.models.segmentation import SegModelConfig, build_seg_model

TASK = "seg-pretrain"


@dataclass
class PretrainConfig:
    """Pretraining settings (saved in the checkpoint)."""

    data: list[str]
    split: str | None = None
    encoder: str = "efficientnet-lite0"
    decoder_channels: tuple[int, ...] = (96, 48, 24, 16, 8)
    input_size: int = 320
    imagenet: bool = True
    epochs: int = 15
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    seed: int = 0
    threads: int = 0
    # corruption probabilities (Models Genesis' defaults)
    p_intensity: float = 0.9
    p_shuffle: float = 0.5
    p_paint: float = 0.9
    p_inpaint: float = 0.8  # of the painted images: in-painting, else out-painting

    def model_config(self) -> SegModelConfig:
        return SegModelConfig(encoder=self.encoder, decoder_channels=tuple(self.decoder_channels),
                              lesion_classes=("image",), lung_head=False, input_size=self.input_size)


def _intensity_curve(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random monotone cubic Bézier curve through (0, 0) and (1, 1), applied to the grey values
    (inverted half the time)."""
    p1, p2 = rng.random(2), rng.random(2)
    t = np.linspace(0, 1, 256)
    xs = 3 * (1 - t) ** 2 * t * p1[0] + 3 * (1 - t) * t ** 2 * p2[0] + t ** 3
    ys = 3 * (1 - t) ** 2 * t * p1[1] + 3 * (1 - t) * t ** 2 * p2[1] + t ** 3
    order = np.argsort(xs)
    ys = ys[order] if rng.random() < 0.5 else 1 - ys[order]
    return np.interp(x, xs[order], ys).astype(np.float32)


def _shuffle_pixels(x: np.ndarray, rng: np.random.Generator, n_blocks: int = 1000, max_side: int = 8) -> np.ndarray:
    """Shuffle the pixels inside many small random windows (local texture destroyed, shape kept)."""
    out = x.copy()
    h, w = x.shape
    for _ in range(n_blocks):
        bh, bw = rng.integers(1, max_side + 1, 2)
        y0, x0 = rng.integers(0, h - bh + 1), rng.integers(0, w - bw + 1)
        block = out[y0:y0 + bh, x0:x0 + bw].ravel().copy()
        rng.shuffle(block)
        out[y0:y0 + bh, x0:x0 + bw] = block.reshape(bh, bw)
    return out


def _paint(x: np.ndarray, rng: np.random.Generator, inpaint: bool) -> np.ndarray:
    """In-painting: 1–5 boxes (1/6–1/3 of the side) filled with uniform noise (albumentations'
    CoarseDropout). Out-painting: the image replaced by noise except 1–5 boxes (3/7–4/7 of the side)
    that keep their pixels."""
    if inpaint:
        holes = A.CoarseDropout(num_holes_range=(1, 5), hole_height_range=(1 / 6, 1 / 3),
                                hole_width_range=(1 / 6, 1 / 3), fill="random", p=1.0)
        holes.set_random_seed(int(rng.integers(2 ** 31)))
        return holes(image=x)["image"]
    h, w = x.shape
    out = rng.random(x.shape, dtype=np.float32)
    for _ in range(int(rng.integers(1, 6))):
        bh, bw = int(h * rng.uniform(3 / 7, 4 / 7)), int(w * rng.uniform(3 / 7, 4 / 7))
        y0, x0 = rng.integers(0, h - bh + 1), rng.integers(0, w - bw + 1)
        out[y0:y0 + bh, x0:x0 + bw] = x[y0:y0 + bh, x0:x0 + bw]
    return out


def corrupt(x: np.ndarray, rng: np.random.Generator, cfg: PretrainConfig) -> np.ndarray:
    """Models Genesis' corruption of a grey ``[0, 1]`` image (the network is trained to undo it)."""
    y = x
    if rng.random() < cfg.p_intensity:
        y = _intensity_curve(y, rng)
    if rng.random() < cfg.p_shuffle:
        y = _shuffle_pixels(y, rng)
    if rng.random() < cfg.p_paint:
        y = _paint(y, rng, inpaint=rng.random() < cfg.p_inpaint)
    return y


class _Restoration(torch.utils.data.Dataset):
    """(corrupted, original) pairs of augmented views of the images."""

    def __init__(self, images: list[np.ndarray], cfg: PretrainConfig, seed: int) -> None:
        self.images = images
        self.cfg = cfg
        self.transform = seg_train_transform(cfg.input_size, seed=seed)
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        x = np.clip(self.transform(image=self.images[i])["image"], 0, 1).astype(np.float32)
        y = corrupt(x, self.rng, self.cfg)
        return torch.from_numpy(np.ascontiguousarray(y))[None], torch.from_numpy(np.ascontiguousarray(x))[None]


def load_unlabelled_images(data: list[str], split: str | None, *, progress: bool = True) -> list[np.ndarray]:
    """Grey ``[0, 1]`` images of every slice of the folders (labels ignored)."""
    from covidct.data.classification import RecordImages
    from covidct.engine.pseudolabel import slice_sources

    sources = [rec for d in data for _, rec in slice_sources(Path(d), split)]
    load = RecordImages()
    return [np.asarray(load(r), np.float32) for r in tqdm(sources, desc="read images", unit="image", disable=not progress)]


def pretrain_seg(cfg: PretrainConfig, output: str | Path, *, progress: bool = True) -> dict[str, Any]:
    """Train the network to restore corrupted images; writes a ``seg-pretrain`` checkpoint."""
    output = Path(output)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise CovidctError(None, "pretrain seg runs in one process; start it without torchrun")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    images = load_unlabelled_images(cfg.data, cfg.split, progress=progress)
    if len(images) < cfg.batch_size:
        raise CovidctError(cfg.data[0], f"{len(images)} images are fewer than one batch (--batch-size {cfg.batch_size})")
    mcfg = cfg.model_config()
    model = build_seg_model(mcfg, imagenet=cfg.imagenet).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = len(images) // cfg.batch_size
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(cfg.epochs * steps, int(cfg.warmup_epochs * steps)))
    loader = torch.utils.data.DataLoader(_Restoration(images, cfg, cfg.seed), batch_size=cfg.batch_size, shuffle=True,
                                         drop_last=True, generator=torch.Generator().manual_seed(cfg.seed))

    def loss_of(batch) -> torch.Tensor:
        corrupted, original = batch
        return F.mse_loss(torch.sigmoid(model(corrupted.to(memory_format=torch.channels_last))), original)

    rows, t0, dist = [], time.time(), Distributed()  # inactive: one process
    for epoch in tqdm(range(cfg.epochs), desc="pretrain seg", unit="epoch", disable=not progress):
        loss = train_one_epoch(model, loader, loss_of, opt, sched, dist=dist)
        rows.append({"epoch": epoch, "train_mse": loss, "lr": opt.param_groups[0]["lr"],
                     "seconds": round(time.time() - t0, 1)})
    model.eval()
    output.parent.mkdir(parents=True, exist_ok=True)
    write_log(rows, output.with_name(output.stem + "_log.csv"))
    save_checkpoint(output, task=TASK, config=mcfg.to_dict(), state_dict=model.state_dict(), half=False,
                    train_config={**asdict(cfg), "decoder_channels": list(cfg.decoder_channels)},
                    metrics={"train_mse": rows[-1]["train_mse"], "n_images": len(images),
                             "train_seconds": rows[-1]["seconds"]})
    return {"output": str(output), "n_images": len(images), "train_mse": rows[-1]["train_mse"],
            "seconds": rows[-1]["seconds"]}


def init_from_pretrained(model: torch.nn.Module, path: str | Path) -> int:
    """Copy the tensors of a ``seg-pretrain`` checkpoint, or of a trained covidct segmentation model (``seg``:
    fine-tuning), into ``model`` (a :class:`~covidct.models.segmentation.SegmentationNet`). Architecture, encoder,
    decoder channels and input channels must match (the input size need not). The output head is not copied from a
    pretrained network, and from a segmentation model only when its classes and lung head are ``model``'s.
    Returns the number of tensors copied."""
    from covidct.models.checkpoint import read_checkpoint
    from covidct.models.encoders import copy_matching

    payload = read_checkpoint(path)
    if payload["task"] not in (TASK, "seg"):
        raise CovidctError(path, f"not a pretrained network or segmentation model (task {payload['task']!r})")
    mine, theirs = model.config.to_dict(), payload["config"]
    shape_keys = ("arch", "encoder", "decoder_channels", "in_channels") + (("fpn_channels",) if mine["arch"] == "fpn" else ())
    for key in shape_keys:
        if list(np.atleast_1d(mine[key])) != list(np.atleast_1d(theirs.get(key))):
            raise CovidctError(path, f"its {key} {theirs.get(key)} does not fit this network's {mine[key]}")
    same_head = payload["task"] == "seg" and all(
        list(np.atleast_1d(mine[k])) == list(np.atleast_1d(theirs[k])) for k in ("lesion_classes", "lung_head"))
    body = {k: v.float() for k, v in payload["state_dict"].items()
            if same_head or not k.startswith("net.segmentation_head.")}
    return copy_matching(model, body)
