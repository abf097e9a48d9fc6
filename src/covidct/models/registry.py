"""Shipped models (``covidct/weights/*.pt``) and loading by name or path."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

from covidct.errors import CovidctError
from covidct.models.checkpoint import read_checkpoint

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
#: Default shipped model per task; ``cam``: the classifier whose activation maps ``covidct explain`` /
#: ``evaluate cam`` use (the default classifier: the mean of its CNN members' maps, measured more
#: lesion-shaped than any single classifier's; benchmarks/RESULTS.md); ``scan_cls``: the one fast
#: classifier ``covidct analyze`` runs on every slice with lesions; ``triage``: the 3-class CT triage
#: (:mod:`covidct.analysis.triage`) of ``analyze`` and of ``evaluate cls`` on CT volumes.
DEFAULTS: dict[str, str] = {"seg": "seg-effl0-unet", "cls": "cls-cv5-ucsd-tta", "lesions": "lesions-effl0-maskrcnn",
                            "cam": "cls-cv5-ucsd-tta", "scan_cls": "cls-effl0-seginit",
                            "triage": "triage-ct"}


def shipped_files() -> list[Path]:
    return sorted(WEIGHTS_DIR.glob("*.pt")) if WEIGHTS_DIR.is_dir() else []


def resolve_model(spec: str | Path | None, *, task: str) -> Path:
    """A shipped model name, a file path, or ``None`` for the task's default."""
    if spec is None:
        if task not in DEFAULTS:
            raise CovidctError(None, f"no shipped default model for task {task!r}; pass --model")
        spec = DEFAULTS[task]
    path = Path(spec)
    if path.suffix == ".pt" and path.exists():
        return path
    shipped = WEIGHTS_DIR / f"{spec}.pt"
    if shipped.exists():
        return shipped
    if path.exists():
        return path
    names = ", ".join(p.stem for p in shipped_files()) or "none"
    raise CovidctError(spec, f"no such model file or shipped model (shipped: {names})")


def model_entry(path: Path, payload: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``covidct models --json`` entry of one checkpoint."""
    payload = payload or read_checkpoint(path)
    # a CT triage model classifies slices (3 classes): listed as a classifier, its kind said beside
    triage = payload["task"] == "triage"
    return {
        "name": path.stem,
        "task": "cls" if triage else payload["task"],
        **({"kind": "ct-triage"} if triage else {}),
        "classes": list(payload.get("classes", [])),
        "file": str(path),
        "input_size": payload.get("input_size"),
        "metrics": payload.get("metrics", {}),
        # slice models: the orientation of their training slices, into which analyze / predict turn CT slices
        **({"slice_orientation": payload["config"].get("slice_orientation", "anterior-left")}
           if payload["task"] in ("seg", "lesions") else {}),
        # networks stored inside the file and run beside it (seg: an effusion model; covidct attach)
        **({"companions": {role: {"arch": c["config"].get("arch"), "classes": list(c.get("classes", [])),
                                  "input_size": c.get("input_size"), "metrics": c.get("metrics", {})}
                           for role, c in payload["companions"].items()}} if payload.get("companions") else {}),
    }


def list_models() -> list[dict[str, Any]]:
    return [model_entry(p) for p in shipped_files()]


def _builders() -> dict[str, Any]:
    """task -> function(config dict) -> network."""
    from covidct.models.classification import ClsModelConfig, build_cls_model
    from covidct.models.ensemble import EnsembleConfig, build_ensemble
    from covidct.models.lesions import LesionModelConfig, build_lesion_model
    from covidct.models.maskcls import MaskClsConfig, build_maskcls_model
    from covidct.models.segmentation import SegModelConfig, build_seg_model

    return {
        "seg": lambda c: build_seg_model(SegModelConfig.from_dict(c)),
        "cls": lambda c: (build_ensemble(EnsembleConfig.from_dict(c)) if "members" in c
                          else build_cls_model(ClsModelConfig.from_dict(c))),
        "lesions": lambda c: build_lesion_model(LesionModelConfig.from_dict(c)),
        "maskcls": lambda c: build_maskcls_model(MaskClsConfig.from_dict(c)),
    }


TASK_NAMES = {"seg": "segmentation model", "cls": "classifier", "lesions": "lesion (Mask R-CNN) model",
              "maskcls": "Mask-Net classifier", "triage": "CT triage model"}


def load_model(spec: str | Path | None, *, task: str, accept: tuple[str, ...] | None = None,
               reuse: Any = None):
    """``(network in eval mode, checkpoint dict)`` from a shipped name, a file, or ``None`` (the
    task's shipped default). The network is rebuilt from the checkpoint alone; ``accept`` lists the
    checkpoint tasks that may stand in for ``task``. ``reuse``: a network the caller no longer needs; when the
    checkpoint describes the same architecture (a ``cls`` network of an equal config), its tensors are
    overwritten with the checkpoint's instead of building a new one (the same result, without the build)."""
    path = resolve_model(spec, task=task)
    payload = read_checkpoint(path)
    accept = accept or (task,)
    if payload["task"] not in accept:
        raise CovidctError(path, f"is a {payload['task']!r} model, not a {TASK_NAMES[task]}")
    model = _rebuild(path, payload["task"], payload["config"], _full_state(path, payload), "it describes", reuse)
    if payload["task"] == "seg" and payload.get("companions"):
        # networks stored inside the file (see covidct.models.checkpoint), rebuilt the same way
        model.companions = {role: _rebuild(path, "seg", extra["config"], extra["state_dict"], f"of its {role} companion")
                            for role, extra in payload["companions"].items()}
    payload["path"] = str(path)
    return model, payload


def _rebuild(path: Path, task: str, config: dict[str, Any], state: dict[str, Any], what: str, reuse: Any = None):
    """A network of ``task`` from its config and (fp16 or fp32) state dict, in eval mode (``reuse`` instead of
    a new one when it fits, :func:`load_model`); a config it cannot build or weights that do not fit are one
    ``CovidctError`` naming ``path``."""
    try:
        model = reuse if _same_cls_architecture(reuse, task, config) else _builders()[task](config)
    except ValueError as exc:  # e.g. a setting this version does not know (a file of a newer covidct)
        raise CovidctError(path, f"the architecture {what} cannot be built here: {exc}") from None
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}
    try:
        if not getattr(model, "weights_from_members", False):  # an ensemble loads its members' own files
            model.load_state_dict(state)
    except RuntimeError as exc:
        raise CovidctError(path, f"weights do not fit the architecture {what} ({str(exc).splitlines()[0]})") from None
    return model.eval()


def _same_cls_architecture(net: Any, task: str, config: dict[str, Any]) -> bool:
    """Whether ``net`` is a plain classifier (not an ensemble or a Mask-Net classifier) built from a config
    equal to ``config``: loading a state dict into it gives the network ``config`` would build."""
    from covidct.models.classification import ClassificationNet, ClsModelConfig

    if net is None or task != "cls" or "members" in config or type(net) is not ClassificationNet:
        return False
    return ClsModelConfig.from_dict(config) == net.config


def model_name(path: str | Path) -> str:
    """How one model file names another: the shipped name (path under the weights folder, no
    ``.pt``; fold models of a shipped ensemble sit in sub-folders) or the absolute path."""
    path = Path(path).resolve()
    return path.relative_to(WEIGHTS_DIR).with_suffix("").as_posix() if path.is_relative_to(WEIGHTS_DIR) else str(path)


def base_model_reference(path: Path) -> dict[str, str]:
    """How a checkpoint names the model it was built on (:func:`model_name`) and its checksum."""
    from covidct.models.checkpoint import file_sha256

    return {"name": model_name(path), "sha256": file_sha256(path)}


def model_references(**files: str | Path | None) -> dict[str, dict[str, str]]:
    """:func:`base_model_reference` of each named start file that is given (``init=..., encoder_init=...``): a
    checkpoint's ``starts``, which name a shipped start the way ``--model`` takes it (a path of one machine
    would not) and any start by its checksum."""
    return {role: base_model_reference(Path(f)) for role, f in files.items() if f}


def _full_state(path: Path, payload: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint's state dict, completed from its ``base_model`` when it stores only a difference."""
    base = payload.get("base_model")
    if not base:
        return payload["state_dict"]
    try:
        base_path = resolve_model(base["name"], task=payload["task"])
    except CovidctError:
        raise CovidctError(path, f"needs its base model {base['name']!r}, which is not here") from None
    stat = base_path.stat()
    sha256, base_state = _base_checkpoint(str(base_path.resolve()), stat.st_mtime_ns, stat.st_size)
    if sha256 != base["sha256"]:
        raise CovidctError(path, f"its base model {base_path} changed since this model was trained on it")
    prefix = base.get("prefix", "")
    return {**{prefix + k: v for k, v in base_state.items()}, **payload["state_dict"]}


@lru_cache(maxsize=2)
def _base_checkpoint(path: str, mtime_ns: int, size: int) -> tuple[str, dict[str, Any]]:
    """sha256 and state dict of a base model file, read once for the several models built on it (the
    five Mask-Net members of an ensemble); a changed file (mtime or size) is read again."""
    from covidct.models.checkpoint import file_sha256

    return file_sha256(path), read_checkpoint(path)["state_dict"]


def load_seg_model(spec: str | Path | None = None):
    """``(SegmentationNet, checkpoint dict)``."""
    return load_model(spec, task="seg")


def load_cls_model(spec: str | Path | None = None, *, fold_bn: bool = False, stream_members: bool = False,
                   reuse: Any = None):
    """``(classifier, checkpoint dict)`` for ``cls`` and ``maskcls`` checkpoints; the calibration
    ``temperature`` is in the dict. ``fold_bn``: for inference only, BatchNorms folded into their
    convolutions (:mod:`covidct.models.fusion`; faster on CPU, see benchmarks/RESULTS.md; not for training).
    ``stream_members``: an ensemble comes as a :class:`~covidct.models.ensemble.StreamedEnsemble`, which
    holds one member in memory at a time and reads the members again on every call (for few images).
    ``reuse``: as in :func:`load_model` (an unfolded network)."""
    if stream_members:
        from covidct.models.ensemble import EnsembleConfig, StreamedEnsemble

        path = resolve_model(spec, task="cls")
        payload = read_checkpoint(path)
        if payload["task"] == "cls" and "members" in payload["config"]:
            payload["path"] = str(path)
            return StreamedEnsemble(EnsembleConfig.from_dict(payload["config"]), fold_bn=fold_bn).eval(), payload
    model, payload = load_model(spec, task="cls", accept=("cls", "maskcls"), reuse=reuse)
    if fold_bn:
        from covidct.models.fusion import fold_for_inference

        model = fold_for_inference(model, inplace=True)
    return model, payload


def load_lesion_model(spec: str | Path | None = None):
    """``(LesionNet, checkpoint dict)``: anchors, RoI settings and classes come from the file."""
    return load_model(spec, task="lesions")
