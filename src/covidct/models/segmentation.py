"""Lesion + lung segmentation network: one face over smp's U-Net / FPN and the encoder registry.

The network returns ``len(lesion_classes)`` softmax logits (background, GGO, consolidation,
effusion) followed, when ``lung_head`` is on, by one sigmoid logit for the lung field. Input is
``(B, 1, H, W)`` in ``[0, 1]`` (see :mod:`covidct.io.window`); the network normalises it itself.
"""

from __future__ import annotations

from dataclasses import dataclass

from covidct.models.base import NormalizedNet, SavedConfig
from covidct.models.encoders import (
    IMAGENET_GREY_MEAN, IMAGENET_GREY_STD, OFFLINE_IMAGENET, copy_matching, encoder_state_dict, load_imagenet_encoder,
    smp_encoder_name,
)

ARCHITECTURES = ("unet", "unetplusplus", "fpn")


@dataclass
class SegModelConfig(SavedConfig):
    """Everything needed to rebuild a segmentation network (saved in every checkpoint)."""

    arch: str = "unet"
    encoder: str = "efficientnet-lite0"
    decoder_channels: tuple[int, ...] = (96, 48, 24, 16, 8)
    lesion_classes: tuple[str, ...] = ("background", "ggo", "consolidation", "effusion")
    lung_head: bool = True
    # FPN decoder only: pyramid and segmentation-head channels (smp's defaults 256 / 128)
    fpn_channels: tuple[int, int] = (256, 128)
    input_size: int = 320
    in_channels: int = 1
    input_mean: float = IMAGENET_GREY_MEAN
    input_std: float = IMAGENET_GREY_STD
    # orientation of the training slices (covidct.models.base.SLICE_ORIENTATIONS); checkpoints from before it
    # was recorded were all trained on the anterior-left COVID-SemiSeg / MedSeg slices
    slice_orientation: str = "anterior-left"


class SegmentationNet(NormalizedNet):
    """smp decoder + encoder with built-in input normalisation. ``companions`` (role -> network, not
    part of the state dict) holds the networks its checkpoint carries beside it, e.g. ``"effusion"``."""

    def __init__(self, config: SegModelConfig, net) -> None:
        super().__init__(config, net)
        self.companions: dict[str, SegmentationNet] = {}

    @property
    def n_lesion_classes(self) -> int:
        return len(self.config.lesion_classes)


def build_seg_model(config: SegModelConfig | None = None, *, imagenet: bool = False, encoder_init: str | None = None,
                    **overrides) -> SegmentationNet:
    """Build the network; ``imagenet=True`` initialises the encoder from offline ImageNet weights,
    ``encoder_init`` (a covidct segmentation or classification model file with the same encoder) from
    that model's encoder instead of ImageNet's."""
    import segmentation_models_pytorch as smp

    config = config or SegModelConfig()
    if overrides:
        config = SegModelConfig.from_dict({**config.to_dict(), **overrides})
    if config.arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {config.arch!r}; choose one of {ARCHITECTURES}")
    n_out = len(config.lesion_classes) + (1 if config.lung_head else 0)
    encoder_name = smp_encoder_name(config.encoder)
    if config.arch in ("unet", "unetplusplus"):   # UNet++: nested, densely connected skip paths
        face = smp.Unet if config.arch == "unet" else smp.UnetPlusPlus
        net = face(encoder_name=encoder_name, encoder_weights=None, in_channels=config.in_channels,
                   classes=n_out, decoder_channels=tuple(config.decoder_channels))
    else:
        pyramid, segmentation = config.fpn_channels
        if segmentation % 32:
            raise ValueError(f"FPN segmentation channels must be a multiple of 32 (its GroupNorm), not {segmentation}")
        net = smp.FPN(encoder_name=encoder_name, encoder_weights=None, in_channels=config.in_channels, classes=n_out,
                      decoder_pyramid_channels=int(pyramid), decoder_segmentation_channels=int(segmentation))
    if imagenet and not encoder_init:
        if config.encoder not in OFFLINE_IMAGENET:
            raise ValueError(f"no offline ImageNet weights for encoder {config.encoder}; "
                             f"use one of {sorted(OFFLINE_IMAGENET)} or random init")
        load_imagenet_encoder(net.encoder, config.encoder, config.in_channels)
    if encoder_init:
        weights = encoder_state_dict(encoder_init, config.encoder)
        target = getattr(net.encoder, "model", net.encoder)  # timm-universal encoders nest the timm model
        copied = copy_matching(target, weights)
        if copied < len(weights):
            raise ValueError(f"{encoder_init}: only {copied} of its {len(weights)} encoder tensors fit {config.encoder}")
    return SegmentationNet(config, net)
