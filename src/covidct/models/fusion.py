"""Inference copies of networks with each batch normalisation folded into the convolution before it.

In evaluation mode a BatchNorm is a fixed per-channel scale and shift, which the convolution that feeds
it can absorb (``torch.nn.utils.fusion.fuse_conv_bn_weights``); the BatchNorm then leaves the graph.
Measured on this CPU (``benchmarks/segmentation.py --no-fold``): the EfficientNet-Lite0 U-Net runs about
30 % faster folded under glibc's default allocator, 0-10 % faster under the command line's
(:mod:`covidct.runtime`), which removes most of what the BatchNorms' fresh outputs cost. torch.fx's
``fuse`` cannot trace these networks (data-dependent control flow), hence the hooks.

The pairs are found by running the network once with hooks (a BatchNorm is folded when, in every call,
its input is the output of the same convolution and both ran equally often), so any architecture
built of modules works, and the folded copy is checked against the original on that input: if the
outputs differ beyond the tolerance the original is returned unchanged.
"""

from __future__ import annotations

import copy
import weakref
from collections import Counter

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights
from torch.utils._pytree import tree_leaves

#: Outputs of the folded copy may differ from the original's by ``ATOL + RTOL * max |original|``.
ATOL, RTOL = 1e-4, 1e-3


def _is_batchnorm(m: nn.Module) -> bool:
    from torchvision.ops import FrozenBatchNorm2d

    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return m.track_running_stats and m.running_mean is not None
    return isinstance(m, FrozenBatchNorm2d)


def _remainder(bn: nn.Module) -> nn.Module:
    """What is left of a folded BatchNorm: timm's ``BatchNormAct2d`` keeps its dropout and activation."""
    parts = [getattr(bn, name) for name in ("drop", "act") if isinstance(getattr(bn, name, None), nn.Module)]
    return nn.Sequential(*parts) if parts else nn.Identity()


def _find_pairs(model: nn.Module, example: torch.Tensor) -> tuple[list[tuple[nn.Conv2d, nn.Module]], list]:
    """The foldable (conv, BatchNorm) pairs of ``model``, and its outputs on ``example``."""
    produced_by: dict[int, tuple[weakref.ref, nn.Module]] = {}   # id(output) -> (the output, its conv)
    calls: Counter = Counter()
    source: dict[nn.Module, nn.Module | None] = {}

    def after_conv(m: nn.Module, args, out) -> None:
        calls[m] += 1
        produced_by[id(out)] = (weakref.ref(out), m)   # weak: an id is trusted only while its tensor lives

    def before_bn(m: nn.Module, args) -> None:
        calls[m] += 1
        ref, src = produced_by.get(id(args[0]), (None, None)) if args else (None, None)
        src = src if ref is not None and ref() is args[0] else None
        source[m] = src if source.get(m, src) is src else None   # None: inconsistent between calls

    hooks = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(after_conv))
        elif _is_batchnorm(m):
            hooks.append(m.register_forward_pre_hook(before_bn))
    try:
        with torch.inference_mode():
            outputs = tree_leaves(model(example))
    finally:
        for h in hooks:
            h.remove()
    fed = Counter(src for src in source.values() if src is not None)
    pairs = [(src, bn) for bn, src in source.items() if src is not None and fed[src] == 1 and calls[src] == calls[bn]]
    return pairs, outputs


def _close(want: list, got: list) -> bool:
    if len(want) != len(got):
        return False
    for a, b in zip(want, got):
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            if a.shape != b.shape or (a - b).abs().max() > ATOL + RTOL * a.abs().max():
                return False
    return True


def fold_batchnorm(model: nn.Module, example: torch.Tensor, *, inplace: bool = False,
                   share: tuple[object, ...] = ()) -> nn.Module:
    """``model`` in evaluation mode with its conv -> BatchNorm pairs folded (see the module docstring),
    as a copy unless ``inplace``; ``example`` is an input it accepts. Returns the network unfolded
    (but in evaluation mode) when the check fails. ``share``: objects the copy refers to instead of
    copying them (e.g. a dict of companion networks the folded forward never runs)."""
    target = (model if inplace else copy.deepcopy(model, {id(obj): obj for obj in share})).eval()
    pairs, want = _find_pairs(target, example)
    if not pairs:
        return target
    saved = [(conv, conv.weight, conv.bias) for conv, _ in pairs]
    with torch.no_grad():
        for conv, bn in pairs:
            conv.weight, conv.bias = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var,
                                                          bn.eps, bn.weight, bn.bias)
    replacement = {id(bn): _remainder(bn) for _, bn in pairs}
    swapped = []   # (parent, attribute, the BatchNorm it held)
    for parent in list(target.modules()):
        for name, child in list(parent.named_children()):
            if id(child) in replacement:
                setattr(parent, name, replacement[id(child)])
                swapped.append((parent, name, child))
    with torch.inference_mode():
        got = tree_leaves(target(example))
    if not _close(want, got):   # a pattern the hooks cannot see (e.g. a second use of a conv output): undo
        for conv, weight, bias in saved:
            conv.weight, conv.bias = weight, bias
        for parent, name, bn in swapped:
            setattr(parent, name, bn)
    return target


def fold_for_inference(model: nn.Module, *, inplace: bool = False, share: tuple[object, ...] = ()) -> nn.Module:
    """:func:`fold_batchnorm` with an example input built from ``model.config`` (``input_size``,
    ``in_channels``, default 1 channel)."""
    size = int(model.config.input_size)
    example = torch.rand(1, int(getattr(model.config, "in_channels", 1)), size, size)
    return fold_batchnorm(model, example, inplace=inplace, share=share)
