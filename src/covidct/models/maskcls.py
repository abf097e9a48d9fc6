"""COVID-CT-Mask-Net stage 2: the lesion Mask R-CNN becomes an image classifier.

The backbone, RPN and box head of a trained lesion model (its anchors and RoI settings included) rank
RoIs; the ``top_n`` highest-scoring detections give an ``N x 5`` tensor (box corners normalised by the
image size, and the score; zero-padded to ``N``), which a small module **S** (an MLP of width
``s_width``) turns into class logits, trained with per-class binary cross-entropy. Mask prediction is
skipped at this stage.

``roi_features`` adds to what S reads:
``label`` = the one-hot lesion class of each detection (GGO / consolidation for a ``both`` lesion model),
which the published ``N x 5`` tensor drops, as columns after its five (an ``N x (5 + classes)`` tensor);
``embedding`` = the box head's features of the kept detections, pooled over them (their score-weighted mean
and their maximum, ``2 x box_head_dim`` numbers) and appended to the flattened RoI tensor: what each region
looks like, not only where it is and how sure the detector is.
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
ROI_FEATURES = ("label", "embedding")


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
    def pooled_width(self) -> int:
        """Numbers after the flattened RoI tensor: the pooled box-head features with ``embedding``."""
        return 2 * LesionModelConfig.from_dict(self.lesion or {}).box_head_dim if "embedding" in self.roi_features else 0

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
        self.s = nn.Sequential(nn.Linear(config.top_n * config.roi_width + config.pooled_width, config.s_width),
                               nn.ReLU(inplace=True),
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
        """``(B, top_n * roi_width + pooled_width)`` from pooled RoI features: box head, box predictor and
        torchvision's post-processing (score threshold, NMS), the RoI rows flattened (then, with ``embedding``,
        the pooled box-head features of the kept detections); differentiable in the box head and predictor."""
        rh = self.lesion.net.roi_heads
        features = rh.box_head(torch.cat(pooled).float())
        logits, regression = rh.box_predictor(features)
        boxes, scores, labels = rh.postprocess_detections(logits, regression, proposals, image_sizes)
        n_lesion = len(self.config.lesion_classes)
        embed = "embedding" in self.config.roi_features
        if embed:  # which proposal each detection came from: its box is that proposal's decoded box, bit for bit
            decoded = rh.box_coder.decode(regression, proposals).split([len(p) for p in proposals])
            features = features.split([len(p) for p in proposals])
        rows = []
        for i, (b, s, lab, (h, w)) in enumerate(zip(boxes, scores, labels, image_sizes)):
            order = torch.argsort(s, descending=True)[: self.config.top_n]
            columns = [b[order] / b.new_tensor([w, h, w, h]), s[order, None]]
            if "label" in self.config.roi_features:  # torchvision's labels count from 1 (0 = background)
                columns.append(F.one_hot(lab[order] - 1, n_lesion).to(b.dtype))
            row = F.pad(torch.cat(columns, dim=1), (0, 0, 0, self.config.top_n - len(order))).flatten()
            if embed:
                source = _source_proposals(decoded[i], b[order], lab[order], (h, w))
                row = torch.cat([row, _pool_embeddings(features[i][source], s[order])])
            rows.append(row)
        return torch.stack(rows)

    @torch.no_grad()
    def s_input(self, x: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """What S reads for each ``(1, H, W)`` image (:meth:`detections_tensor`), in inference mode."""
        self.lesion.net.eval()
        return self.detections_tensor(*self.pooled_rois(x))

    def roi_tensor(self, x: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """``(B, top_n, roi_width)``: top RoI boxes (normalised), scores (and ``label`` columns) of each
        ``(1, H, W)`` image."""
        n = self.config.top_n * self.config.roi_width
        return self.s_input(x)[:, :n].reshape(-1, self.config.top_n, self.config.roi_width)

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
        return self.classify(self.s_input(x))


def _source_proposals(decoded: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor,
                      image_size: tuple[int, int]) -> torch.Tensor:
    """The proposal index of each detection: the row of ``decoded`` ``(P, classes, 4)``, clipped to the image as
    torchvision's post-processing clips it, whose box of the detection's class equals the detection's box."""
    from torchvision.ops import boxes as box_ops

    if not len(boxes):
        return torch.zeros(0, dtype=torch.long)
    clipped = box_ops.clip_boxes_to_image(decoded, image_size)             # (P, classes, 4)
    candidates = clipped[:, labels, :].transpose(0, 1)                        # (D, P, 4)
    return (candidates == boxes[:, None, :]).all(-1).float().argmax(1)


def _pool_embeddings(features: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """The score-weighted mean and the maximum of the detections' box-head features (zeros without any)."""
    if not len(features):
        return features.new_zeros(2 * features.shape[1])
    mean = (scores[:, None] * features).sum(0) / scores.sum().clamp_min(1e-6)
    return torch.cat([mean, features.max(0).values])


def build_maskcls_model(config: MaskClsConfig) -> MaskClsNet:
    return MaskClsNet(config, build_lesion_model(LesionModelConfig.from_dict(config.lesion or {})))
