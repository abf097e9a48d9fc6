"""Lesion instance model (COVID-CT-Mask-Net stage 1): torchvision's Mask R-CNN, made cheap for a CPU.

Differences from torchvision's default ``maskrcnn_resnet50_fpn`` (each a field of
:class:`LesionModelConfig`, saved in the checkpoint): ResNet-18/34/50 FPN backbone or an
EfficientNet-Lite0/1/2 encoder (offline ImageNet weights) under a 128-channel FPN, optional
truncation of the last ResNet stage, anchors sized for lesions at the model's input size
(8-128 px instead of COCO's 32-512), a 128-d TwoMLPHead box head (the paper's), fewer RPN proposals and
RoI samples, and a fixed square input (default 320).

Mask modes: ``ggo`` (GGO only), ``merge`` (one "lesion" class = GGO ∪ consolidation) and ``both``
(GGO and consolidation). Instances are the 8-connected components of each class's mask with at
least :data:`MIN_INSTANCE_AREA` pixels (at the slice's own resolution).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from covidct.models.base import SavedConfig

MASK_MODES: dict[str, tuple[str, ...]] = {
    "ggo": ("background", "ggo"),
    "merge": ("background", "lesion"),
    "both": ("background", "ggo", "consolidation"),
}
MIN_INSTANCE_AREA = 16


@dataclass
class LesionModelConfig(SavedConfig):
    backbone: str = "efficientnet-lite0"
    truncate_last_stage: bool = False
    mask_mode: str = "both"
    input_size: int = 320
    anchor_sizes: tuple[int, ...] = (8, 16, 32, 64, 128)
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    box_head_dim: int = 128
    rpn_pre_nms_top_n_train: int = 1000
    rpn_post_nms_top_n_train: int = 500
    rpn_pre_nms_top_n_test: int = 300
    rpn_post_nms_top_n_test: int = 100
    rpn_batch_size_per_image: int = 128
    box_batch_size_per_image: int = 128
    box_detections_per_img: int = 50
    box_score_thresh: float = 0.05
    # orientation of the training slices (covidct.models.base.SLICE_ORIENTATIONS)
    slice_orientation: str = "anterior-left"

    @property
    def classes(self) -> tuple[str, ...]:
        return MASK_MODES[self.mask_mode]


class TimmFPNBackbone(nn.Module):
    """A timm features-only encoder (EfficientNet-Lite, offline ImageNet weights) under a torchvision
    FeaturePyramidNetwork with a max-pooled extra level: the interface Mask R-CNN expects."""

    def __init__(self, encoder: str, *, imagenet: bool, out_channels: int = 128, truncate_last_stage: bool = False,
                 encoder_weights: dict[str, torch.Tensor] | None = None) -> None:
        super().__init__()
        import timm
        from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool

        from covidct.models.encoders import copy_matching, imagenet_state_dict

        indices = (1, 2, 3) if truncate_last_stage else (1, 2, 3, 4)
        self.body = timm.create_model(f"tf_{encoder.replace('-', '_')}", pretrained=False, features_only=True,
                                      out_indices=indices)
        weights = encoder_weights if encoder_weights is not None else imagenet_state_dict(encoder) if imagenet else None
        if weights is not None and copy_matching(self.body, weights) == 0:
            raise ValueError(f"no tensor of the given encoder weights fits {encoder}")
        self.fpn = FeaturePyramidNetwork(self.body.feature_info.channels(), out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor):
        from collections import OrderedDict

        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(self.body(x))))


class LesionNet(nn.Module):
    """Mask R-CNN over grey ``[0, 1]`` slices ``(B, 1, H, W)`` (copied to 3 channels inside)."""

    def __init__(self, config: LesionModelConfig, net: nn.Module) -> None:
        super().__init__()
        self.config = config
        self.net = net

    def forward(self, images: list[torch.Tensor], targets: list[dict] | None = None):
        return self.net([im.expand(3, -1, -1) for im in images], targets)


def build_lesion_model(config: LesionModelConfig | None = None, *, imagenet: bool = False,
                       encoder_init: str | None = None) -> LesionNet:
    """Build the Mask R-CNN; ``imagenet=True`` starts an EfficientNet-Lite backbone from the offline
    ImageNet weights (ResNets have none here and start from random weights); ``encoder_init`` (a
    covidct segmentation checkpoint with the same encoder) starts it from that model's encoder."""
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead

    config = config or LesionModelConfig()
    if config.mask_mode not in MASK_MODES:
        raise ValueError(f"mask mode must be one of {sorted(MASK_MODES)}")
    returned = [1, 2, 3] if config.truncate_last_stage else [1, 2, 3, 4]
    if encoder_init and not config.backbone.startswith("efficientnet-lite"):
        raise ValueError("a segmentation-encoder start needs an EfficientNet-Lite backbone")
    if config.backbone in ("resnet18", "resnet34", "resnet50"):
        backbone = resnet_fpn_backbone(backbone_name=config.backbone, weights=None, trainable_layers=5,
                                       returned_layers=returned)
    elif config.backbone in ("efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2"):
        from covidct.models.encoders import seg_encoder_state_dict

        weights = seg_encoder_state_dict(encoder_init, config.backbone) if encoder_init else None
        backbone = TimmFPNBackbone(config.backbone, imagenet=imagenet, truncate_last_stage=config.truncate_last_stage,
                                   encoder_weights=weights)
    else:
        raise ValueError("backbone must be resnet18/34/50 or efficientnet-lite0/1/2")
    n_levels = len(returned) + 1  # + the pooled level
    sizes = tuple((s,) for s in config.anchor_sizes[:n_levels])
    if len(sizes) < n_levels:
        raise ValueError(f"need {n_levels} anchor sizes, got {len(config.anchor_sizes)}")
    anchors = AnchorGenerator(sizes=sizes, aspect_ratios=(tuple(config.aspect_ratios),) * n_levels)
    box_head = TwoMLPHead(backbone.out_channels * 7 * 7, config.box_head_dim)
    n_classes = len(config.classes)
    from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor

    net = MaskRCNN(
        backbone, num_classes=None, min_size=config.input_size, max_size=config.input_size,
        image_mean=[0.449] * 3, image_std=[0.226] * 3, rpn_anchor_generator=anchors,
        box_head=box_head, box_predictor=FastRCNNPredictor(config.box_head_dim, n_classes),
        rpn_pre_nms_top_n_train=config.rpn_pre_nms_top_n_train, rpn_post_nms_top_n_train=config.rpn_post_nms_top_n_train,
        rpn_pre_nms_top_n_test=config.rpn_pre_nms_top_n_test, rpn_post_nms_top_n_test=config.rpn_post_nms_top_n_test,
        rpn_batch_size_per_image=config.rpn_batch_size_per_image,
        box_batch_size_per_image=config.box_batch_size_per_image,
        box_detections_per_img=config.box_detections_per_img, box_score_thresh=config.box_score_thresh,
        mask_predictor=MaskRCNNPredictor(256, 256, n_classes),
    )
    return LesionNet(config, net)


def instances_from_labels(labels: np.ndarray, mask_mode: str, *, min_area: int = MIN_INSTANCE_AREA) -> dict:
    """Mask R-CNN targets from a label map (0 bg, 1 GGO, 2 consolidation, 3 effusion ignored):
    ``{"boxes" (N,4) float, "labels" (N,) int64, "masks" (N,H,W) uint8}``."""
    from skimage.measure import label as cc_label, regionprops

    if mask_mode == "merge":
        layers = [(1, np.isin(labels, (1, 2)))]
    elif mask_mode == "ggo":
        layers = [(1, labels == 1)]
    else:
        layers = [(1, labels == 1), (2, labels == 2)]
    boxes, classes, masks = [], [], []
    for cls_index, layer in layers:
        comp = cc_label(layer, connectivity=2)
        for region in regionprops(comp):
            if region.area < min_area:
                continue
            r0, c0, r1, c1 = region.bbox
            boxes.append([c0, r0, c1, r1])
            classes.append(cls_index)
            masks.append(comp == region.label)
    h, w = labels.shape
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(classes, dtype=torch.int64),
        "masks": torch.from_numpy(np.stack(masks).astype(np.uint8)) if masks else torch.zeros((0, h, w), dtype=torch.uint8),
    }
