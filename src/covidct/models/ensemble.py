"""A classifier ensemble as one model: the mean of its members' calibrated class probabilities.

The checkpoint holds no weights of its own: it names its members (shipped names or files) with the
sha256 of each file, so loading it rebuilds every member from its own checkpoint (architecture,
input size and temperature included) and refuses a member whose file has changed. Each member sees
the input resized to its own input size.

:class:`ClassifierEnsemble` keeps every member in memory (many images: evaluation, ``classify``);
:class:`StreamedEnsemble` computes the same probabilities with one member in memory at a time, each
member file read again on every call (a few images per call: the CT triage of ``covidct analyze``, whose
20-member classifier held whole raised that command's peak memory by 0.19–0.27 GB).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

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
            xi = resized(x, member.config.input_size)
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
        return mean_log_probability(probs, self.config.logit_offsets)


class StreamedEnsemble(nn.Module):
    """The ensemble of ``config`` computed member by member: each forward pass loads a member from its
    file (checksum and classes checked, BatchNorms folded with ``fold_bn``), takes its calibrated
    probabilities and drops it before the next, so memory holds one member (and one Mask-Net front
    shared by the Mask-Net members of the pass) instead of all of them. Same result as
    :class:`ClassifierEnsemble` run through :func:`covidct.engine.evaluate_cls.predict_probabilities`
    (members channels-last); every call reads every member file again. ``progress``: each forward pass
    shows a bar over the members (``desc`` names it)."""

    weights_from_members = True

    def __init__(self, config: EnsembleConfig, *, fold_bn: bool = False) -> None:
        super().__init__()
        self.config, self.fold_bn = config, fold_bn
        self.progress, self.desc = False, "classifier"
        # a member file that changed is an error now, before the caller's work, not in the middle of it
        for spec, checksum in zip(config.members, config.checksums):
            check_member_file(spec, checksum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        views = [x, torch.flip(x, dims=[3])] if self.config.tta else [x]
        probs: list[list[torch.Tensor]] = [[] for _ in views]
        leaders: list[tuple[nn.Module, list[tuple]]] = []  # Mask-Net members whose front this pass reuses
        members = list(zip(self.config.members, self.config.checksums))
        # the previous plain CNN member, unfolded: the next member with the same architecture (the folds of one
        # recipe follow each other) takes its tensors instead of a new build; memory still holds one member
        spare: nn.Module | None = None
        for spec, checksum in tqdm(members, desc=self.desc, unit="model", disable=not self.progress):
            with torch.inference_mode(False):  # a normal module, also when called under inference mode
                member, t = load_member(spec, checksum, self.config.classes, reuse=spare)
                spare = None
                if self.fold_bn:
                    from covidct.models.fusion import fold_for_inference

                    member = fold_for_inference(member, inplace=True)
                member.eval().to(memory_format=torch.channels_last)
            with torch.no_grad():
                if hasattr(member, "pooled_rois"):
                    lead = next((fr for m, fr in leaders if _same_front(m, member)), None)
                    if lead is None:
                        lead = [member.pooled_rois(resized(v, member.config.input_size)) for v in views]
                        leaders.append((member, lead))
                    logits = [member.classify(member.detections_tensor(*front)) for front in lead]
                else:
                    logits = [member(resized(v, member.config.input_size)) for v in views]
                    spare = None if self.fold_bn else member
            for out, lg in zip(probs, logits):
                out.append(torch.softmax(lg / t, dim=1))
            del member
        logs = [mean_log_probability(p, self.config.logit_offsets) for p in probs]
        # as ClassifierEnsemble.forward: the log of the mean of the two mean probabilities
        return logs[0] if len(logs) == 1 else torch.logaddexp(logs[0], logs[1]) - math.log(2.0)


def resized(x: torch.Tensor, size: int) -> torch.Tensor:
    """``x`` at a member's square input size (antialiased bilinear), unchanged when it already is."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def mean_log_probability(probs: list[torch.Tensor], logit_offsets: tuple[float, ...] = ()) -> torch.Tensor:
    """The log of the mean of the members' probabilities, plus the ensemble's class offsets."""
    log_mean = torch.log(torch.stack(probs).mean(dim=0).clamp_min(1e-12))
    if logit_offsets:
        log_mean = log_mean + log_mean.new_tensor(logit_offsets)
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


def check_member_file(spec: str, checksum: str) -> Path:
    """A member's file, refused (:class:`~covidct.errors.CovidctError`) when it changed since the ensemble was made."""
    from covidct.errors import CovidctError
    from covidct.models.checkpoint import file_sha256
    from covidct.models.registry import resolve_model

    path = resolve_model(spec, task="cls")
    if file_sha256(path) != checksum:
        raise CovidctError(path, "this ensemble member's file changed since the ensemble was made")
    return path


def load_member(spec: str, checksum: str, classes: tuple[str, ...], *,
                reuse: nn.Module | None = None) -> tuple[nn.Module, float]:
    """``(network, temperature)`` of one member, its file checked against ``checksum`` and its classes
    against the ensemble's; ``reuse``: a network no longer needed, refilled when it has the member's architecture
    (:func:`covidct.models.registry.load_model`)."""
    from covidct.errors import CovidctError
    from covidct.models.registry import load_cls_model

    path = check_member_file(spec, checksum)
    model, payload = load_cls_model(path, reuse=reuse)
    if tuple(model.config.classes) != tuple(classes):
        raise CovidctError(path, f"member classes {list(model.config.classes)} differ from the ensemble's")
    return model, float(payload.get("temperature", 1.0))


def build_ensemble(config: EnsembleConfig) -> ClassifierEnsemble:
    """Load every member (registry names or files) and check its file against the stored sha256."""
    return ClassifierEnsemble(config, [load_member(spec, checksum, config.classes)
                                       for spec, checksum in zip(config.members, config.checksums)])
