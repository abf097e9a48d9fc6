"""COVID-CT-Mask-Net stage 2: the lesion Mask R-CNN becomes an image classifier.

The backbone, RPN and box head of a trained lesion model (its anchors and RoI settings included) rank
RoIs; the ``top_n`` highest-scoring detections give an ``N x 5`` tensor (box corners normalised by the
image size, and the score; zero-padded to ``N``), which a small module **S** (an MLP of width
``s_width``) turns into class logits, trained with per-class binary cross-entropy. Mask prediction is
skipped at this stage.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from covidct.models.lesions import LesionModelConfig, LesionNet, build_lesion_model


@dataclass
class MaskClsConfig:
    classes: tuple[str, ...] = ("NonCOVID", "COVID")
    top_n: int = 32
    s_width: int = 128
    lesion: dict | None = None  # LesionModelConfig fields

    @property
    def input_size(self) -> int:
        return LesionModelConfig.from_dict(self.lesion or {}).input_size

    def to_dict(self) -> dict:
        d = asdict(self)
        d["classes"] = list(self.classes)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "MaskClsConfig":
        d = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        d["classes"] = tuple(d.get("classes", ("NonCOVID", "COVID")))
        return cls(**d)


class MaskClsNet(nn.Module):
    def __init__(self, config: MaskClsConfig, lesion: LesionNet) -> None:
        super().__init__()
        self.config = config
        self.lesion = lesion
        n = len(config.classes)
        self.s = nn.Sequential(nn.Linear(config.top_n * 5, config.s_width), nn.ReLU(inplace=True),
                               nn.Linear(config.s_width, config.s_width), nn.ReLU(inplace=True),
                               nn.Linear(config.s_width, n))

    @torch.no_grad()
    def roi_tensor(self, x: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """``(B, top_n, 5)``: top RoI boxes (normalised) and scores of each ``(1, H, W)`` image."""
        net = self.lesion.net
        net.eval()
        images, _ = net.transform([im.expand(3, -1, -1) for im in x])
        feats = net.backbone(images.tensors)
        proposals, _ = net.rpn(images, feats)
        rh = net.roi_heads
        box_feats = rh.box_head(rh.box_roi_pool(feats, proposals, images.image_sizes))
        logits, regression = rh.box_predictor(box_feats)
        boxes, scores, _ = rh.postprocess_detections(logits, regression, proposals, images.image_sizes)
        out = images.tensors.new_zeros((len(boxes), self.config.top_n, 5))
        for i, (b, s, (h, w)) in enumerate(zip(boxes, scores, images.image_sizes)):
            order = torch.argsort(s, descending=True)[: self.config.top_n]
            k = len(order)
            scale = b.new_tensor([w, h, w, h])
            out[i, :k, :4] = b[order] / scale
            out[i, :k, 4] = s[order]
        return out

    def classify(self, rois: torch.Tensor) -> torch.Tensor:
        return self.s(rois.flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.roi_tensor(x))


def build_maskcls_model(config: MaskClsConfig) -> MaskClsNet:
    return MaskClsNet(config, build_lesion_model(LesionModelConfig.from_dict(config.lesion or {})))
