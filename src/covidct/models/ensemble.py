"""A classifier ensemble as one model: the mean of its members' calibrated class probabilities.

The checkpoint holds no weights of its own: it names its members (shipped names or files) with the
sha256 of each file, so loading it rebuilds every member from its own checkpoint (architecture,
input size and temperature included) and refuses a member whose file has changed. Each member sees
the input resized to its own input size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from covidct.models.base import SavedConfig


@dataclass
class EnsembleConfig(SavedConfig):
    members: tuple[str, ...]
    checksums: tuple[str, ...]
    classes: tuple[str, ...]
    input_size: int  # the largest member input size: what the ensemble is fed
    # added to the log mean probability before the ensemble's temperature (Platt / vector scaling
    # fitted on out-of-fold predictions); empty: none
    logit_offsets: tuple[float, ...] = ()
    # each member's probabilities averaged with those of the left-right mirrored input (test-time
    # augmentation, as ``evaluate cls --tta``); its calibration was fitted that way
    tta: bool = False


class ClassifierEnsemble(nn.Module):
    """``forward`` returns the log of the mean calibrated probability (so its softmax is that mean),
    plus the configured class offsets, if any; with ``config.tta`` the mean also runs over the
    left-right mirrored input."""

    weights_from_members = True  # the registry loads no state dict into it

    def __init__(self, config: EnsembleConfig, members: list[tuple[nn.Module, float]]) -> None:
        super().__init__()
        self.config = config
        self.members = nn.ModuleList(m for m, _ in members)
        self.temperatures = [float(t) for _, t in members]
        # Mask-Net members whose backbone and RPN are identical (stage 2 trained S and the RoI heads
        # only) share one pass through them: member index -> index of the member whose pass it reuses
        self.shared_front: dict[int, int] = {}
        leaders: list[int] = []
        for i, m in enumerate(self.members):
            if not hasattr(m, "pooled_rois"):
                continue
            lead = next((j for j in leaders if _same_front(self.members[j], m)), None)
            if lead is None:
                leaders.append(i)
            else:
                self.shared_front[i] = lead
                # equal tensors: keep one copy in memory
                m.lesion.net.backbone = self.members[lead].lesion.net.backbone
                m.lesion.net.rpn = self.members[lead].lesion.net.rpn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.config.tta:
            return self._log_mean(x)
        # log of the mean of the two mean probabilities; the class offsets (in both terms) stay added once
        return torch.logaddexp(self._log_mean(x), self._log_mean(torch.flip(x, dims=[3]))) - math.log(2.0)

    def _log_mean(self, x: torch.Tensor) -> torch.Tensor:
        probs = []
        fronts: dict[int, tuple] = {}
        sharing = set(self.shared_front) | set(self.shared_front.values())
        for i, (member, t) in enumerate(zip(self.members, self.temperatures)):
            size = member.config.input_size
            xi = x if x.shape[-1] == size and x.shape[-2] == size else F.interpolate(
                x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
            if i in sharing:
                lead = self.shared_front.get(i, i)
                if lead not in fronts:
                    with torch.no_grad():
                        fronts[lead] = member.pooled_rois(xi)
                with torch.no_grad():
                    logits = member.classify(member.detections_tensor(*fronts[lead]))
            else:
                logits = member(xi)
            probs.append(torch.softmax(logits / t, dim=1))
        log_mean = torch.log(torch.stack(probs).mean(dim=0).clamp_min(1e-12))
        if self.config.logit_offsets:
            log_mean = log_mean + log_mean.new_tensor(self.config.logit_offsets)
        return log_mean


def _same_front(a: nn.Module, b: nn.Module) -> bool:
    """Whether two Mask-Net classifiers compute the same RoI proposals and pooled features: same
    lesion-network settings and input size, equal backbone and RPN tensors."""
    if a.config.input_size != b.config.input_size or a.config.lesion != b.config.lesion:
        return False
    na, nb = a.lesion.net, b.lesion.net
    for part_a, part_b in ((na.backbone, nb.backbone), (na.rpn, nb.rpn)):
        sa, sb = part_a.state_dict(), part_b.state_dict()
        if sa.keys() != sb.keys() or not all(torch.equal(sa[k], sb[k]) for k in sa):
            return False
    return True


def build_ensemble(config: EnsembleConfig) -> ClassifierEnsemble:
    """Load every member (registry names or files) and check its file against the stored sha256."""
    from covidct.errors import CovidctError
    from covidct.models.checkpoint import file_sha256
    from covidct.models.registry import load_cls_model

    members = []
    for spec, checksum in zip(config.members, config.checksums):
        model, payload = load_cls_model(spec)
        if file_sha256(payload["path"]) != checksum:
            raise CovidctError(payload["path"], "this ensemble member's file changed since the ensemble was made")
        if tuple(model.config.classes) != tuple(config.classes):
            raise CovidctError(payload["path"], f"member classes {list(model.config.classes)} differ from the ensemble's")
        members.append((model, float(payload.get("temperature", 1.0))))
    return ClassifierEnsemble(config, members)
