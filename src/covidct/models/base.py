"""The wrapper every covidct network shares: its config, and input normalisation inside."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


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
