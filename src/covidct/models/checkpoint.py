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
checkpoint dict>}}`` — a second network, stored inside the file, that the predictor runs beside the main
one on the same input (the pleural-effusion model beside a lesion model that does not learn effusion;
:func:`attach_companion`, :class:`covidct.engine.infer.SegPredictor`).

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
COMPANION_ROLES = ("effusion",)


def attach_companion(path: str | Path, companion: str | Path, *, role: str = "effusion",
                     output: str | Path | None = None) -> Path:
    """Store the seg checkpoint ``companion`` inside the seg checkpoint ``path`` under ``role`` and write
    the result to ``output`` (default: rewrite ``path``) atomically; weights and settings of the main
    model are unchanged. The effusion companion must predict effusion. When ``companion`` itself carries a
    companion in ``role`` (a file made by this function, e.g. the shipped ``seg-effl0-unet``), that network is
    taken: it is the one that decides ``role`` in that file."""
    if role not in COMPANION_ROLES:
        raise CovidctError(None, f"unknown companion role {role!r}; choose one of {COMPANION_ROLES}")
    payload, extra = read_checkpoint(path), read_checkpoint(companion)
    for p, pl in ((path, payload), (companion, extra)):
        if pl["task"] != "seg":
            raise CovidctError(p, f"is a {pl['task']!r} model, not a segmentation model")
    carried = (extra.get("companions") or {}).get(role)
    if carried is not None:
        extra = carried
    if role not in (extra["config"].get("lesion_classes") or []):
        raise CovidctError(companion, f"does not predict {role}")
    extra.pop("companions", None)
    payload["companions"] = {**(payload.get("companions") or {}), role: extra}
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
