"""What every covidct network shares: a config that saves itself into checkpoints, and input
normalisation inside the network."""

from __future__ import annotations

from dataclasses import asdict, fields
from typing import Any, TypeVar

import torch
from torch import nn


_C = TypeVar("_C", bound="SavedConfig")


#: The orientations a model's training slices can have (``slice_orientation`` in its config): the documented
#: slice layouts (COVID-SemiSeg, MedSeg arrays) show the anterior side at the left edge; radiological display
#: is anterior up; ``any``: trained in all eight orientations (``train seg --quarter-turns``).
SLICE_ORIENTATIONS: tuple[str, ...] = ("anterior-left", "anterior-up", "any")


def turns_from_anterior_up(slice_orientation: str) -> int:
    """``np.rot90`` turns that bring an anterior-up slice into a model's training orientation."""
    if slice_orientation not in SLICE_ORIENTATIONS:
        raise ValueError(f"slice orientation must be one of {', '.join(SLICE_ORIENTATIONS)}, not {slice_orientation!r}")
    return 1 if slice_orientation == "anterior-left" else 0


class SavedConfig:
    """Mixin for the config dataclasses stored in checkpoints: ``to_dict`` gives plain JSON-able values
    (tuples as lists); ``from_dict`` rebuilds the config, list values back to tuples, keys the class does
    not know (from another version) dropped, missing ones at their defaults."""

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls: type[_C], d: dict[str, Any]) -> _C:
        known = {f.name for f in fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in known})


class NormalizedNet(nn.Module):
    """``net((x - config.input_mean) / config.input_std)`` for grey ``[0, 1]`` input."""

    def __init__(self, config: Any, net: nn.Module) -> None:
        super().__init__()
        self.config = config
        self.net = net
        self.register_buffer("mean", torch.tensor(config.input_mean), persistent=False)
        self.register_buffer("std", torch.tensor(config.input_std), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)
