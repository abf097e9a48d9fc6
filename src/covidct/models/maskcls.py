"""COVID-CT-Mask-Net stage 2: the lesion Mask R-CNN becomes an image classifier.

The backbone, RPN and box head of a trained lesion model (its anchors and RoI settings included) rank
RoIs; the ``top_n`` highest-scoring detections give an ``N x 5`` tensor (box corners normalised by the
image size, and the score; zero-padded to ``N``), which a small module **S** (an MLP of width
``s_width``) turns into class logits, trained with per-class binary cross-entropy. Mask prediction is
skipped at this stage.

``roi_features`` adds columns after the five of each RoI (an ``N x (5 + extra)`` tensor):
``label`` = the one-hot lesion class of the detection (GGO / consolidation for a ``both`` lesion model),
which the published ``N x 5`` tensor drops.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from covidct.models.base import SavedConfig
from covidct.models.lesions import LesionModelConfig, LesionNet, build_lesion_model


TRAIN_CHOICES = ("s", "s+bn", "s+roi")
#: Columns that may follow each RoI's box corners and score in S's input (``MaskClsConfig.roi_features``).
ROI_FEATURES = ("label",)


@dataclass
class MaskClsConfig(SavedConfig):
    classes: tuple[str, ...] = ("NonCOVID", "COVID")
    top_n: int = 32
    s_width: int = 128
    lesion: dict | None = None  # LesionModelConfig fields
    roi_features: tuple[str, ...] = ()  # extra columns per RoI, from ROI_FEATURES; () = the published N x 5

    def __post_init__(self) -> None:
        unknown = [f for f in self.roi_features if f not in ROI_FEATURES]
        if unknown:
            raise ValueError(f"unknown RoI feature(s) {', '.join(unknown)}; known: {', '.join(ROI_FEATURES)}")

    @property
    def input_size(self) -> int:
        return LesionModelConfig.from_dict(self.lesion or {}).input_size

    @property
    def lesion_classes(self) -> tuple[str, ...]:
        """The lesion model's classes without the background."""
        return LesionModelConfig.from_dict(self.lesion or {}).classes[1:]

    @property
    def roi_width(self) -> int:
        """Columns per RoI: box corners (4), score, then the ``roi_features`` columns."""
        return 5 + (len(self.lesion_classes) if "label" in self.roi_features else 0)


class MaskClsNet(nn.Module):
    def __init__(self, config: MaskClsConfig, lesion: LesionNet) -> None:
        super().__init__()
        self.config = config
        self.lesion = lesion
        n = len(config.classes)
        self.s = nn.Sequential(nn.Linear(config.top_n * config.roi_width, config.s_width), nn.ReLU(inplace=True),
                               nn.Linear(config.s_width, config.s_width), nn.ReLU(inplace=True),
                               nn.Linear(config.s_width, n))

    def pooled_rois(self, x: torch.Tensor | list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor], list[tuple[int, int]]]:
        """Backbone, RPN and RoI pooling of ``(1, H, W)`` images (the lesion network's inference path):
        per image the pooled box features ``(P, C, 7, 7)``, its ``P`` proposals and the resized image size.
        Runs with gradients when they are enabled (batch-norm affine training)."""
        net = self.lesion.net
        images, _ = net.transform([im.expand(3, -1, -1) for im in x])
        feats = net.backbone(images.tensors)
        proposals, _ = net.rpn(images, feats)
        pooled = net.roi_heads.box_roi_pool(feats, proposals, images.image_sizes)
        return list(pooled.split([len(p) for p in proposals])), proposals, list(images.image_sizes)

    def detections_tensor(self, pooled: list[torch.Tensor], proposals: list[torch.Tensor],
                          image_sizes: list[tuple[int, int]]) -> torch.Tensor:
        """``(B, top_n, roi_width)`` from pooled RoI features: box head, box predictor and torchvision's
        post-processing (score threshold, NMS); differentiable in the box head and predictor."""
        rh = self.lesion.net.roi_heads
        logits, regression = rh.box_predictor(rh.box_head(torch.cat(pooled).float()))
        boxes, scores, labels = rh.postprocess_detections(logits, regression, proposals, image_sizes)
        n_lesion = len(self.config.lesion_classes)
        rows = []
        for b, s, lab, (h, w) in zip(boxes, scores, labels, image_sizes):
            order = torch.argsort(s, descending=True)[: self.config.top_n]
            columns = [b[order] / b.new_tensor([w, h, w, h]), s[order, None]]
            if "label" in self.config.roi_features:  # torchvision's labels count from 1 (0 = background)
                columns.append(F.one_hot(lab[order] - 1, n_lesion).to(b.dtype))
            rows_i = torch.cat(columns, dim=1)
            rows.append(F.pad(rows_i, (0, 0, 0, self.config.top_n - len(order))))
        return torch.stack(rows)

    @torch.no_grad()
    def roi_tensor(self, x: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """``(B, top_n, roi_width)``: top RoI boxes (normalised), scores (and ``roi_features``) of each
        ``(1, H, W)`` image."""
        self.lesion.net.eval()
        return self.detections_tensor(*self.pooled_rois(x))

    def stage2_parameters(self, train: str) -> list[nn.Parameter]:
        """The parameters stage 2 trains: ``s`` (S only), ``s+bn`` (S and the backbone's batch-norm
        affine parameters; running statistics stay fixed) or ``s+roi`` (S, box head and box predictor)."""
        if train not in TRAIN_CHOICES:
            raise ValueError(f"train must be one of {TRAIN_CHOICES}")
        params = list(self.s.parameters())
        if train == "s+bn":
            bn = [p for m in self.lesion.net.backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                  for p in (m.weight, m.bias) if p is not None]
            if not bn:
                raise ValueError("this backbone's batch norm is frozen (torchvision ResNet): s+bn would train S only")
            params += bn
        elif train == "s+roi":
            rh = self.lesion.net.roi_heads
            params += list(rh.box_head.parameters()) + list(rh.box_predictor.parameters())
        return params

    def classify(self, rois: torch.Tensor) -> torch.Tensor:
        return self.s(rois.flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.roi_tensor(x))


def build_maskcls_model(config: MaskClsConfig) -> MaskClsNet:
    return MaskClsNet(config, build_lesion_model(LesionModelConfig.from_dict(config.lesion or {})))
