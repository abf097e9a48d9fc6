"""Slice classifiers (binary COVID / NonCOVID or 3-class Control / Common pneumonia / COVID-19) on timm
backbones, one grey input channel. Encoders: the same names as segmentation (``resnet18``,
``efficientnet-lite0`` ...); initialisation from offline ImageNet weights, or from the encoder of a
trained covidct segmentation model (same encoder name)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from covidct.errors import InputError
from covidct.models.base import NormalizedNet, SavedConfig
from covidct.models.encoders import (
    IMAGENET_GREY_MEAN, IMAGENET_GREY_STD, OFFLINE_IMAGENET, copy_matching, imagenet_state_dict, seg_encoder_state_dict,
)

TIMM_NAMES: dict[str, str] = {
    "resnet18": "resnet18", "resnet34": "resnet34", "resnet50": "resnet50",
    "efficientnet-b0": "efficientnet_b0", "efficientnet-b1": "efficientnet_b1",
    "efficientnet-b2": "efficientnet_b2", "efficientnet-b3": "efficientnet_b3",
    "efficientnet-lite0": "tf_efficientnet_lite0", "efficientnet-lite1": "tf_efficientnet_lite1",
    "efficientnet-lite2": "tf_efficientnet_lite2",
}


@dataclass
class ClsModelConfig(SavedConfig):
    """Everything needed to rebuild a classifier (saved in its checkpoint)."""

    encoder: str = "efficientnet-lite0"
    classes: tuple[str, ...] = ("NonCOVID", "COVID")
    input_size: int = 224
    dropout: float = 0.2
    input_mean: float = IMAGENET_GREY_MEAN
    input_std: float = IMAGENET_GREY_STD


class ClassificationNet(NormalizedNet):
    """timm backbone with built-in input normalisation; returns class logits."""


def build_cls_model(config: ClsModelConfig | None = None, *, init: str = "random") -> ClassificationNet:
    """``init``: ``random``, ``imagenet`` (offline weights), or a path to a covidct segmentation
    checkpoint whose encoder is the same network."""
    import timm

    config = config or ClsModelConfig()
    if config.encoder not in TIMM_NAMES:
        raise ValueError(f"unknown encoder {config.encoder!r}; choose one of {sorted(TIMM_NAMES)}")
    net = timm.create_model(TIMM_NAMES[config.encoder], pretrained=False, num_classes=len(config.classes),
                            in_chans=1, drop_rate=config.dropout)
    # timm's EfficientNet head init scales with 1/sqrt(n_classes): with 2 classes the first logits
    # are several units large and the first epochs fight a huge loss. Start the head small.
    head = net.get_classifier()
    nn.init.normal_(head.weight, std=0.01)
    nn.init.zeros_(head.bias)
    if init == "imagenet":
        if config.encoder not in OFFLINE_IMAGENET:
            raise ValueError(f"no offline ImageNet weights for {config.encoder}")
        copy_matching(net, imagenet_state_dict(config.encoder))
    elif init != "random":
        if copy_matching(net, seg_encoder_state_dict(init, config.encoder)) == 0:
            raise InputError(init, f"no encoder tensor fits {config.encoder}")
    return ClassificationNet(config, net)
