"""Self-describing checkpoints: a model file rebuilds its network with no argument by hand.

A checkpoint is a ``torch.save``-d dict::

    {"format": "covidct-checkpoint", "format_version": 1, "task": "seg" | ...,
     "config": {...architecture...}, "state_dict": {...}, "classes": [...], "colours": {...},
     "input_size": int, "normalization": str, "train_config": {...}, "metrics": {...},
     "versions": {...}, "created": iso-time}

A model built on another checkpoint (the Mask-Net classifier on its lesion model) may store only the
tensors that differ from it, with ``"base_model": {"name", "sha256", "prefix"}``: loading fills in the
rest from that file (shipped name or path) after checking its checksum (:func:`delta_state`).

A segmentation checkpoint may carry **companions**: ``"companions": {"effusion": {<a whole seg
checkpoint dict>}, "lung_masked": {...}}`` — networks stored inside the file that the predictor runs
besides the main one: ``effusion`` on the same input (the pleural-effusion model beside a lesion model that
does not learn effusion), ``lung_masked`` instead of the main one on slices blacked out outside their lungs
(a model trained on such slices; :func:`attach_companion`, :class:`covidct.engine.infer.SegPredictor`).

It loads with ``weights_only=True`` (plain types and tensors only).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import platform
from pathlib import Path
from typing import Any

import torch

from covidct.errors import CovidctError
from covidct.io.atomic import atomic_output

FORMAT = "covidct-checkpoint"
FORMAT_VERSION = 1


def package_versions() -> dict[str, str]:
    import covidct

    out = {"covidct": covidct.__version__, "torch": str(torch.__version__), "python": platform.python_version()}
    for name in ("torchvision", "segmentation_models_pytorch", "timm", "albumentations", "numpy"):
        try:
            out[name] = str(__import__(name).__version__)
        except Exception:  # noqa: BLE001 - optional packages
            pass
    return out


def save_checkpoint(path: str | Path, *, task: str, config: dict, state_dict: dict[str, torch.Tensor],
                    half: bool = False, **fields: Any) -> Path:
    """Write a checkpoint atomically; ``half=True`` stores floating tensors as fp16."""
    path = Path(path)
    if half:
        state_dict = {k: (v.half() if v.is_floating_point() else v) for k, v in state_dict.items()}
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "task": task,
        "config": config,
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in state_dict.items()},
        "versions": package_versions(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **fields,
    }
    return _save_atomic(payload, path)


def delta_state(state_dict: dict[str, torch.Tensor], base_state: dict[str, torch.Tensor], *,
                prefix: str) -> dict[str, torch.Tensor]:
    """The entries of ``state_dict`` that differ from ``base_state`` (whose keys appear under
    ``prefix`` in ``state_dict``), compared as stored: in fp16 for floating tensors."""
    def stored(t: torch.Tensor) -> torch.Tensor:
        return t.detach().cpu().half() if t.is_floating_point() else t.detach().cpu()

    out = {}
    for k, v in state_dict.items():
        b = base_state.get(k[len(prefix):]) if k.startswith(prefix) else None
        if b is None or b.shape != v.shape or not torch.equal(stored(v), stored(b)):
            out[k] = v
    return out


def _save_atomic(payload: dict[str, Any], path: Path) -> Path:
    with atomic_output(path) as tmp:
        torch.save(payload, tmp)
    return path


def record_metrics(path: str | Path, **metrics: Any) -> Path:
    """Add entries to a checkpoint's ``metrics`` (e.g. a cross-validation estimate measured after
    training), rewriting the file atomically; weights and settings are unchanged."""
    path = Path(path)
    payload = read_checkpoint(path)
    payload["metrics"] = {**(payload.get("metrics") or {}), **metrics}
    return _save_atomic(payload, path)


#: Companion roles a segmentation checkpoint may carry.
COMPANION_ROLES = ("effusion", "lung_masked")


def attach_companion(path: str | Path, companion: str | Path, *, role: str = "effusion",
                     output: str | Path | None = None) -> Path:
    """Store the seg checkpoint ``companion`` inside the seg checkpoint ``path`` under ``role``
    (:func:`attach_companions` with one role)."""
    return attach_companions(path, {role: companion}, output=output)


def attach_companions(path: str | Path, companions: dict[str, str | Path], *,
                      output: str | Path | None = None) -> Path:
    """Store each seg checkpoint of ``companions`` (role -> file) inside the seg checkpoint ``path`` under
    its role and write the result to ``output`` (default: rewrite ``path``) atomically, once, after every
    companion passed its checks; weights and settings of the main model are unchanged. The effusion
    companion must predict effusion; the lung-masked one must have the main model's lesion classes and a
    lung head, and the main model a lung head (it decides which slices go to it). A companion's own companions are not kept (it runs alone), except that when a file carries a
    companion in the role asked for (a file made by this function, e.g. the shipped ``seg-effl0-unet``),
    that network is taken: it is the one that decides the role in that file."""
    payload = read_checkpoint(path)
    if payload["task"] != "seg":
        raise CovidctError(path, f"is a {payload['task']!r} model, not a segmentation model")
    stored = dict(payload.get("companions") or {})
    for role, companion in companions.items():
        if role not in COMPANION_ROLES:
            raise CovidctError(None, f"unknown companion role {role!r}; choose one of {COMPANION_ROLES}")
        extra = read_checkpoint(companion)
        if extra["task"] != "seg":
            raise CovidctError(companion, f"is a {extra['task']!r} model, not a segmentation model")
        extra = (extra.get("companions") or {}).get(role) or extra
        classes = extra["config"].get("lesion_classes") or []
        if role == "effusion" and "effusion" not in classes:
            raise CovidctError(companion, "does not predict effusion")
        if role == "lung_masked" and not payload["config"].get("lung_head", True):
            raise CovidctError(path, "has no lung head, so it cannot tell which slices are black outside their "
                                     "lungs: a lung-masked companion needs a main model with one")
        if role == "lung_masked" and (classes != (payload["config"].get("lesion_classes") or [])
                                      or not extra["config"].get("lung_head", True)):
            raise CovidctError(companion, "cannot stand in for the main model: it needs the same lesion "
                                          "classes and a lung head")
        extra.pop("companions", None)
        stored[role] = extra
    payload["companions"] = stored
    return _save_atomic(payload, Path(output or path))


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint dict (on the CPU); ``CovidctError`` if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise CovidctError(path, "model file not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise CovidctError(path, f"not a readable model file ({type(exc).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CovidctError(path, "not a covidct checkpoint")
    if payload.get("format_version", 0) > FORMAT_VERSION:
        raise CovidctError(path, f"checkpoint format {payload['format_version']} is newer than this covidct")
    return payload


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
