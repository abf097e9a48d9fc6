"""Slice inference for the segmentation network: resize to the model's input, run in batches,
bring the logits back to each slice's own size."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from covidct.data.segmentation import LESION_CLASSES
from covidct.models.segmentation import SegmentationNet


@dataclass
class SegPrediction:
    """One slice's result on its own grid: ``labels`` uint8 (values index
    :data:`~covidct.data.segmentation.LESION_CLASSES`), ``probs`` float32 ``(4, H, W)`` for
    background/GGO/consolidation/effusion (0 for classes the model lacks), ``lung_prob`` or ``None``."""

    labels: np.ndarray
    probs: np.ndarray
    lung_prob: np.ndarray | None

    @property
    def infection_prob(self) -> np.ndarray:
        return self.probs[1] + self.probs[2]

    @property
    def lung(self) -> np.ndarray | None:
        return None if self.lung_prob is None else self.lung_prob > 0.5


class SegPredictor:
    """Batched, gradient-free inference with a :class:`SegmentationNet`."""

    def __init__(self, model: SegmentationNet, *, batch_size: int = 8, device: str = "cpu", tta: bool = False) -> None:
        # channels-last runs the depthwise convolutions of EfficientNet-Lite ~1.5x faster on CPU
        self.model = model.eval().to(device).to(memory_format=torch.channels_last)
        self.device = device
        self.batch_size = batch_size
        self.tta = tta
        self.size = model.config.input_size
        names = model.config.lesion_classes
        self._value = np.array([LESION_CLASSES.index(n) for n in names], dtype=np.uint8)
        self._n_lesion = len(names)
        self.has_lung = model.config.lung_head

    @torch.inference_mode()
    def _logits(self, batch: torch.Tensor) -> torch.Tensor:
        out = self.model(batch)
        if self.tta:
            out = (out + torch.flip(self.model(torch.flip(batch, dims=[3])), dims=[3])) / 2
        return out

    def predict(self, images: Sequence[np.ndarray]) -> list[SegPrediction]:
        """Predict for 2-D float arrays in ``[0, 1]`` (any sizes)."""
        results: list[SegPrediction] = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start:start + self.batch_size]
            batch = torch.stack([
                F.interpolate(torch.as_tensor(np.asarray(im, np.float32))[None, None], size=(self.size, self.size),
                              mode="bilinear", align_corners=False)[0]
                for im in chunk
            ]).to(self.device).to(memory_format=torch.channels_last)
            logits = self._logits(batch)
            for im, lg in zip(chunk, logits):
                lg = F.interpolate(lg[None].float(), size=im.shape[-2:], mode="bilinear", align_corners=False)[0]
                results.append(self._decode(lg))
        return results

    def _decode(self, logits: torch.Tensor) -> SegPrediction:
        n = self._n_lesion
        h, w = logits.shape[-2:]
        probs = np.zeros((len(LESION_CLASSES), h, w), dtype=np.float32)
        if n:
            p = torch.softmax(logits[:n], dim=0).cpu().numpy()
            probs[self._value] = p
            labels = self._value[p.argmax(axis=0)]
        else:
            probs[0] = 1.0
            labels = np.zeros((h, w), np.uint8)
        lung = torch.sigmoid(logits[n]).cpu().numpy() if self.has_lung else None
        return SegPrediction(labels.astype(np.uint8), probs, lung)
