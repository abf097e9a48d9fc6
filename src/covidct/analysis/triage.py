"""Three-class CT triage of slices and scans (Control / Common pneumonia / COVID-19): the lesion
model decides *whether* a slice or scan holds pneumonia, a binary slice classifier *which* one.

Why two stages: the slice classifiers learnt on UCSD figure crops rank real CT slices well (the
20-member ``cls-cv5-ucsd``: COVID-19 vs CAP slices of the open COVID-CT-MD patients AUC 0.99) but
their threshold does not carry over (median COVID probability 0.21 on the COVID-19 patient's infected
slices), and they rank Normal slices worse (AUC 0.92) than the lesion model does (0.98).

* Slice: ``g`` = the slice infection probability of :mod:`covidct.analysis.scan` (``A / (A + 1 cm²)``,
  ``A`` the GGO + consolidation area in the lungs; fixed a priori), ``q = sigmoid(logit(p) + shift)``
  with ``p`` the classifier's COVID probability and ``shift`` fitted on CT (:func:`fit_covid_shift`).
  Probabilities: Control ``1 - g``, Common pneumonia ``g (1 - q)``, COVID-19 ``g q``.
* Scan: Control when the lesion burden ``b`` (GGO + consolidation, % of lung) is under 1 % (the rule of
  ``analyze``); else COVID-19 when the mean ``q`` of the :data:`TOP_K` slices with the largest lesion
  area is at least 0.5, else Common pneumonia. Probabilities: as for a slice, with ``g = b / (b + 1 %)``
  (0.5 at the threshold) and that mean ``q``.
* Slices of a scan (``analyze``, ``classify`` and ``evaluate cls`` on volumes alike): each slice keeps its
  own ``g`` and takes the scan's ``q`` (the mean over those 5 slices; one patient, one kind of pneumonia),
  so the classifier runs on 5 slices a scan (under the 1 % threshold too: the answer is Control, yet its
  slices with lesions still need a ``q``). ``context="slice"`` (``evaluate cls --slice-context slice``)
  gives each slice with lesions its own ``q`` instead; fitting the shift always uses every gated slice.
  On the open COVID-CT-MD patients (in-sample for the shift) the scan's ``q`` calls 73 of the 80 COVID-19
  slices COVID-19 against 65 with each slice's own ``q`` (``benchmarks/RESULTS.md``).

A triage model file (task ``triage``) holds no weights: it names its classifier and segmentation
model with their checksums, and stores the fitted shift, the data it was fitted on and the scores.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from covidct.analysis.scan import MIN_BURDEN_PERCENT, ScanResult, analyze_volume
from covidct.data.classification import THREE_CLASSES, ClsRecord, load_records
from covidct.errors import CovidctError, InputError
from covidct.io import classifier_input, read
from covidct.io.noise import smoothed
from covidct.io.nifti import working_slice
from covidct.io.window import Window
from covidct.models.base import SavedConfig

#: Slices with the largest lesion area whose COVID-19 probability decides a scan's answer.
TOP_K = 5
#: A slice takes part in fitting the shift when its infection probability reaches this (a 1 cm² lesion).
GATE = 0.5
TRIAGE_CLASSES: tuple[str, ...] = THREE_CLASSES
#: Which ``q`` a slice of a scan takes: the scan's (default) or its own (see the module docstring).
SLICE_CONTEXTS: tuple[str, ...] = ("scan", "slice")


@dataclass
class TriageConfig(SavedConfig):
    classifier: str             # shipped name or file of a binary NonCOVID / COVID slice classifier
    classifier_sha256: str
    seg_model: str              # the segmentation model whose lesions give ``g``
    seg_model_sha256: str
    covid_logit_shift: float    # added to the classifier's COVID logit on CT
    top_k: int = TOP_K
    min_burden_percent: float = MIN_BURDEN_PERCENT
    classes: tuple[str, ...] = TRIAGE_CLASSES
    window: str = "model"       # the HU window of the classifier's input when the shift was fitted


def covid_given_lesion(p_covid: np.ndarray, shift: float) -> np.ndarray:
    """``sigmoid(logit(p) + shift)``: the classifier's COVID probability moved to CT."""
    p = np.clip(np.asarray(p_covid, np.float64), 1e-7, 1 - 1e-7)
    return 1.0 / (1.0 + np.exp(-(np.log(p) - np.log1p(-p) + shift)))


def three_class(g: np.ndarray, q: np.ndarray) -> np.ndarray:
    """``(N, 3)`` probabilities in :data:`TRIAGE_CLASSES` order from lesion probability ``g`` and
    COVID-given-lesion probability ``q``."""
    g, q = np.asarray(g, np.float64), np.asarray(q, np.float64)
    return np.stack([1.0 - g, g * (1.0 - q), g * q], axis=1)


def fit_covid_shift(p_covid: np.ndarray, is_covid: np.ndarray) -> float:
    """The logit shift that minimises the class-balanced log loss of ``q`` (one parameter: the
    classifier's ranking is kept, only its threshold moves)."""
    from scipy.optimize import minimize_scalar

    t = np.asarray(is_covid, bool)
    if t.all() or not t.any():
        raise CovidctError(None, "fitting the COVID-19 shift needs slices of both COVID-19 and other pneumonia")
    p = np.clip(np.asarray(p_covid, np.float64), 1e-7, 1 - 1e-7)
    x = np.log(p) - np.log1p(-p)
    w = np.where(t, 0.5 / t.mean(), 0.5 / (1 - t.mean()))

    def loss(b: float) -> float:
        z = x + b
        return float(np.sum(w * np.where(t, np.logaddexp(0, -z), np.logaddexp(0, z))))

    return float(minimize_scalar(loss, bounds=(-20, 20), method="bounded").x)


def scan_answer(slices: Sequence[dict], q: dict[int, float], percent_opacity: float, *,
                top_k: int = TOP_K, min_burden_percent: float = MIN_BURDEN_PERCENT,
                top: Sequence[int] | None = None) -> dict[str, Any]:
    """The scan's label and 3-class probabilities (see the module docstring); ``q`` holds the
    COVID-given-lesion probability of (at least) the ``top_k`` slices with the largest lesion area
    (``top``: those slices when the caller already has them)."""
    top = top_lesion_slices(slices, top_k) if top is None else list(top)
    g = percent_opacity / (percent_opacity + min_burden_percent)   # 0.5 at the threshold, like a slice's 1 cm²
    qm = float(np.mean([q[k] for k in top])) if top else 0.5
    probs = dict(zip(TRIAGE_CLASSES, (round(v, 6) for v in three_class([g], [qm])[0])))
    if percent_opacity < min_burden_percent:
        label = TRIAGE_CLASSES[0]
    else:
        label = TRIAGE_CLASSES[2] if qm >= 0.5 else TRIAGE_CLASSES[1]
    return {"label": label, "probabilities": probs, "covid_given_lesions": round(qm, 6),
            "slices_used": top}


def top_lesion_slices(slices: Sequence[dict], top_k: int = TOP_K) -> list[int]:
    """Indices of the ``top_k`` slices with the largest lesion area (slices with lesions only)."""
    order = sorted((s for s in slices if s["lesion_area_mm2"] > 0), key=lambda s: -s["lesion_area_mm2"])
    return sorted(int(s["index"]) for s in order[:top_k])


class Triage:
    """A triage model ready to run: its config, classifier (with temperature) and segmentation
    predictor, each checked against the checksum the config stores. ``precision``: of the segmentation
    predictor (:mod:`covidct.engine.precision`); the classifier runs in float32, as it was calibrated."""

    def __init__(self, config: TriageConfig, *, name: str, device: str = "cpu", path: Path | None = None,
                 fit: dict | None = None, fold_bn: bool = False, stream_classifier: bool = False,
                 precision: str = "fp32") -> None:
        from covidct.engine.precision import resolve_precision
        from covidct.models.checkpoint import file_sha256
        from covidct.models.registry import resolve_model

        self.config, self.name, self.device = config, name, device
        self.precision = resolve_precision(precision, device)
        self.path, self.fit = path, fit or {}   # the model file and what its shift was fitted on
        # fold the classifier's BatchNorms (covidct.models.fusion): for the 20-member ensemble folding
        # costs ~0.9 s and saves ~0.04 s a slice, so it pays off from ~20 slices on (evaluation, fitting)
        self._paths = {}
        for task, spec, sha in (("cls", config.classifier, config.classifier_sha256),
                                ("seg", config.seg_model, config.seg_model_sha256)):
            self._paths[task] = path = resolve_model(spec, task=task)
            if file_sha256(path) != sha:
                raise CovidctError(path, f"changed since the triage model {name} was fitted on it")
        self._classifier = self._predictor = None
        self.temperature = 1.0
        self.fold_bn = fold_bn
        # an ensemble classifier held one member at a time (analyze: 5 slices a scan, 0.19–0.27 GB less at the peak)
        self.stream_classifier = stream_classifier

    @property
    def classifier(self):
        """The slice classifier, loaded on first use (a scan without lesions does not need it)."""
        if self._classifier is None:
            from covidct.models.registry import load_cls_model

            model, payload = load_cls_model(self._paths["cls"], fold_bn=self.fold_bn,
                                            stream_members=self.stream_classifier)
            if list(model.config.classes) != ["NonCOVID", "COVID"]:
                raise CovidctError(payload["path"], "triage needs a binary NonCOVID / COVID slice classifier")
            self._classifier, self.temperature = model, float(payload.get("temperature", 1.0))
        return self._classifier

    @property
    def predictor(self):
        """The segmentation model's predictor, loaded on first use (``analyze`` brings its own)."""
        if self._predictor is None:
            from covidct.engine.infer import SegPredictor
            from covidct.models.registry import load_seg_model

            model = load_seg_model(self._paths["seg"])[0]
            self._predictor = SegPredictor(model, device=self.device, crop_to_lung=False, precision=self.precision)
        return self._predictor

    def covid_probability(self, vol, indices: Sequence[int], *, window: str | Window = "model",
                          progress: bool = False, sigma_px: float = 0.0) -> np.ndarray:
        """The classifier's own COVID probability (before the shift) of slices ``indices`` of ``vol`` (a noisy
        scan's slices through the Gaussian of its noise plan, ``sigma_px``: :mod:`covidct.io.noise`);
        ``progress``: a streamed ensemble shows a bar over its members."""
        from covidct.engine.evaluate_cls import predict_probabilities

        if not indices:
            return np.zeros(0)
        model = self.classifier
        images = [classifier_input(smoothed(vol.array[k], sigma_px), is_hu=vol.is_hu, window=window) for k in indices]
        shows_members = hasattr(model, "progress")
        if shows_members:
            model.progress, model.desc = progress, "triage"
        try:
            return predict_probabilities(model, images, temperature=self.temperature)[:, 1]
        finally:
            if shows_members:
                model.progress = False


def is_triage_model(spec: str | Path) -> bool:
    """Whether a ``--model`` (shipped name or file) is a triage model rather than a classifier."""
    from covidct.models.checkpoint import read_checkpoint
    from covidct.models.registry import resolve_model

    return read_checkpoint(resolve_model(spec, task="cls"))["task"] == "triage"


def check_triage_model(spec: str | Path | None) -> Path:
    """The file of a triage model (shipped name, file, or ``None`` for the default); one error line if it is a
    model of another kind. Reads only the small triage file, not the models it names."""
    from covidct.models.checkpoint import read_checkpoint
    from covidct.models.registry import resolve_model

    path = resolve_model(spec, task="triage")
    task = read_checkpoint(path)["task"]
    if task != "triage":
        raise CovidctError(path, f"is a {task!r} model, not a triage model")
    return path


def load_triage(spec: str | Path | None = None, *, device: str = "cpu", fold_bn: bool = False,
                stream_classifier: bool = False, precision: str = "fp32") -> Triage:
    """A shipped triage model by name, a file, or ``None`` for the default; ``fold_bn`` as in
    :func:`covidct.models.registry.load_cls_model` (for many slices); ``stream_classifier``: an ensemble
    classifier is held one member at a time (``stream_members`` there; for a few slices per call);
    ``precision`` of its segmentation predictor (:class:`Triage`)."""
    from covidct.models.checkpoint import read_checkpoint

    path = check_triage_model(spec)
    payload = read_checkpoint(path)   # a few kB: the models it names are loaded by Triage
    return Triage(TriageConfig.from_dict(payload["config"]), name=path.stem, device=device, path=path,
                  fit=(payload.get("metrics") or {}).get("fit"), fold_bn=fold_bn, stream_classifier=stream_classifier,
                  precision=precision)


@dataclass
class VolumeScores:
    """One analysed volume: every slice's lesion probability ``g``, the classifier's own COVID
    probability of the slices it ran on (``p``, slice index -> probability, before the shift), the
    :data:`TOP_K` slices with the largest lesion area and the lesion burden (% of lung)."""

    g: np.ndarray
    p: dict[int, float]
    top: list[int]
    percent_opacity: float

    def covid_given_lesion(self, shift: float) -> dict[int, float]:
        """``q`` of every slice the classifier ran on."""
        ks = sorted(self.p)
        return dict(zip(ks, covid_given_lesion([self.p[k] for k in ks], shift).tolist())) if ks else {}

    def scan_q(self, shift: float) -> float:
        """The scan's ``q``: the mean over its top slices (0.5, undecided, for a scan without lesions)."""
        if not self.top:
            return 0.5
        q = self.covid_given_lesion(shift)
        return float(np.mean([q[k] for k in self.top]))

    def probabilities(self, indices: Sequence[int], shift: float, *, context: str = "scan") -> np.ndarray:
        """``(len(indices), 3)`` triage probabilities of slices ``indices``: their own ``g``; the scan's
        ``q`` (``context="scan"``) or each slice's own (``"slice"``; 0.5 where the classifier did not run)."""
        ks = [int(k) for k in indices]
        if context == "scan":
            q = np.full(len(ks), self.scan_q(shift))
        elif context == "slice":
            own = self.covid_given_lesion(shift)
            q = np.array([own.get(k, 0.5) for k in ks])
        else:
            raise CovidctError(None, f"slice context must be one of {', '.join(SLICE_CONTEXTS)}, not {context!r}")
        return three_class(self.g[ks], q)


def score_volume(triage: Triage, vol, *, classify: str = "top", window: str | Window = "model",
                 result: ScanResult | None = None, progress: bool = False) -> VolumeScores:
    """Analyse a volume with a pixel spacing once (lungs, lesions; HU slices through ``window``; or take
    ``analyze``'s ``result``) and run the classifier (through the window its shift was fitted with) on
    ``classify="top"``: the :data:`TOP_K` largest-lesion slices (what the scan's ``q`` needs; also under the
    burden threshold, where the scan's answer is Control but its slices with lesions still need a ``q``);
    ``"lesions"``: every slice with lesions (``g > 0``; lesion-free slices are Control whatever it says)."""
    if vol.spacing is None:
        raise InputError(vol.source, "triage needs the pixel spacing (lesion areas in mm²)")
    if result is None:
        result = analyze_volume(vol, triage.predictor, progress=False, window=window)
    g = np.array([s["infection_probability"] for s in result.slices], np.float64)
    top = top_lesion_slices(result.slices, triage.config.top_k)
    burden = float(result.burden["percent_opacity"])
    if classify == "lesions":
        run = np.flatnonzero(g > 0).tolist()
    elif classify == "top":
        run = top
    else:
        raise ValueError(f"classify must be 'top' or 'lesions', not {classify!r}")
    p = triage.covid_probability(vol, run, window=triage.config.window, progress=progress,
                                 sigma_px=result.smoothing_sigma_px)
    return VolumeScores(g=g, p=dict(zip(run, p.tolist())), top=top, percent_opacity=burden)


def _record_scores(triage: Triage, records: list[ClsRecord], *, classify: str,
                   progress: bool) -> tuple[list[tuple[list[int], list[int], VolumeScores]], float]:
    """Every record's volume read and scored once (:func:`score_volume`): ``(record rows, their working
    slice indices, the volume's scores)`` per volume, and the seconds spent in the models."""
    by_volume: dict[Path, list[int]] = {}
    for i, r in enumerate(records):
        if r.slice_index is None:
            raise InputError(r.path, "triage needs CT volumes (DICOM series or NIfTI with slice labels), not images")
        by_volume.setdefault(r.path, []).append(i)
    seconds, out = 0.0, []
    for path, rows in tqdm(by_volume.items(), desc="triage scans", unit="scan", disable=not progress):
        vol = read(path)
        for i in rows:
            if not 0 <= records[i].slice_index < vol.n_slices:
                raise InputError(path, f"slice {records[i].slice_index} outside the volume's {vol.n_slices} slices")
        t0 = time.perf_counter()
        scores = score_volume(triage, vol, classify=classify)
        seconds += time.perf_counter() - t0
        out.append((rows, [working_slice(vol, records[i].slice_index) for i in rows], scores))
    return out, seconds


def record_probabilities(groups: list[tuple[list[int], list[int], VolumeScores]], n: int, shift: float, *,
                         context: str = "scan") -> np.ndarray:
    """``(n, 3)`` triage probabilities of the records scored by :func:`_record_scores`."""
    probs = np.zeros((n, 3))
    for rows, ks, scores in groups:
        probs[rows] = scores.probabilities(ks, shift, context=context)
    return probs


def record_arrays(groups: list[tuple[list[int], list[int], VolumeScores]], n: int) -> tuple[np.ndarray, np.ndarray]:
    """Per record: lesion probability ``g`` and the classifier's own COVID probability (NaN where it did not run)."""
    g, p = np.zeros(n), np.full(n, np.nan)
    for rows, ks, scores in groups:
        g[rows] = scores.g[ks]
        p[rows] = [scores.p.get(k, np.nan) for k in ks]
    return g, p


def classify_volume(triage: Triage, vol, *, window: str | Window = "model") -> np.ndarray:
    """``(slices, 3)`` triage probabilities of every slice of a volume (``covidct classify``), the scan's ``q``."""
    scores = score_volume(triage, vol, window=window)
    return scores.probabilities(range(vol.n_slices), triage.config.covid_logit_shift)


def evaluate_triage(spec: str | Path | None, data: str | Path, *, context: str = "scan",
                    classify_all: bool = False, progress: bool = True, precision: str = "auto") -> dict[str, Any]:
    """``covidct evaluate cls`` with a triage model: 3-class slice probabilities of every labelled
    slice of a COVID-CT-MD-layout folder (``context`` as in :meth:`VolumeScores.probabilities`), scored
    like any classifier. ``classify_all`` runs the classifier on every slice with lesions even for the
    scan context (for the benchmark's looks at single slices). ``precision``: of the lesion segmentation,
    as in ``analyze`` (the one used is in the result)."""
    from covidct.engine.evaluate_cls import score_probabilities

    if context not in SLICE_CONTEXTS:
        raise CovidctError(None, f"slice context must be one of {', '.join(SLICE_CONTEXTS)}, not {context!r}")
    records = load_records(data, classes=TRIAGE_CLASSES)
    triage = load_triage(spec, fold_bn=True, precision=precision)
    classify = "lesions" if classify_all or context == "slice" else "top"
    groups, seconds = _record_scores(triage, records, classify=classify, progress=progress)
    cfg = triage.config
    probs = record_probabilities(groups, len(records), cfg.covid_logit_shift, context=context)
    result = score_probabilities(probs, np.array([TRIAGE_CLASSES.index(r.label) for r in records]), TRIAGE_CLASSES)
    result["images_per_second"] = round(len(records) / seconds, 2) if seconds else None
    result["model"] = triage.name
    result["tta"] = False
    result["precision"] = triage.precision
    result["slice_context"] = context
    result["ct_slice_targets"] = ct_slice_targets(result)
    # patients whose slices fitted the shift are scored in-sample: say so
    result["in_sample_patients"] = sorted({r.patient for r in records} & set(triage.fit.get("patients", [])))
    result["_groups"], result["_records"] = groups, records
    return result


def ct_slice_targets(result: dict[str, Any]) -> dict[str, float | None]:
    """Issue 4's slice-level figures from a 3-class result: COVID-19 sensitivity, and the share of
    Control slices not called COVID-19 ("Normal specificity") or called Control (None without such slices)."""
    cm = np.asarray(result["confusion"], np.float64)

    def share(part: float, whole: float) -> float | None:
        return round(float(part / whole), 6) if whole else None

    return {"covid_sensitivity": share(cm[2, 2], cm[2].sum()),
            "control_not_covid": share(cm[0].sum() - cm[0, 2], cm[0].sum()),
            "control_called_control": share(cm[0, 0], cm[0].sum())}


def fit_triage(data: str | Path, output: str | Path, *, classifier: str | Path | None = None,
               seg_model: str | Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Fit a triage model's COVID-19 shift on the infection-labelled slices of the COVID-19 and
    common-pneumonia patients of ``data`` (COVID-CT-MD layout) whose lesion probability reaches
    :data:`GATE`, and write it to ``output``."""
    from covidct.engine.evaluate_cls import score_probabilities, summarize
    from covidct.models.checkpoint import file_sha256, save_checkpoint
    from covidct.models.registry import model_name, resolve_model

    cls_path = resolve_model(classifier, task="cls")
    seg_path = resolve_model(seg_model, task="seg")
    config = TriageConfig(classifier=model_name(cls_path), classifier_sha256=file_sha256(cls_path),
                          seg_model=model_name(seg_path), seg_model_sha256=file_sha256(seg_path),
                          covid_logit_shift=0.0)
    records = load_records(data, classes=TRIAGE_CLASSES)
    triage = Triage(config, name=Path(output).stem, fold_bn=True)
    groups, _ = _record_scores(triage, records, classify="lesions", progress=progress)
    g, p = record_arrays(groups, len(records))
    y = np.array([TRIAGE_CLASSES.index(r.label) for r in records])
    fit = (g >= GATE) & (y > 0)
    shift = fit_covid_shift(p[fit], y[fit] == 2)
    config.covid_logit_shift = round(shift, 6)
    in_sample = score_probabilities(record_probabilities(groups, len(records), shift), y, TRIAGE_CLASSES)

    metrics = {"fit": {"data": str(data), "slices": int(fit.sum()), "covid_slices": int((y[fit] == 2).sum()),
                       "patients": sorted({r.patient for r, f in zip(records, fit) if f}),
                       "covid_logit_shift": round(shift, 6)},
               "in_sample": {"n_images": len(records), **summarize(in_sample), **ct_slice_targets(in_sample)},
               "note": "in-sample: fitted and scored on the same patients; not an estimate for unseen patients"}
    save_checkpoint(output, task="triage", config=config.to_dict(), state_dict={}, classes=list(TRIAGE_CLASSES),
                    input_size=None, metrics=metrics)
    return {"output": str(output), **metrics}


def triage_scan(triage: Triage, vol, result: ScanResult, *, progress: bool = False) -> dict[str, Any]:
    """The scan-level 3-class answer for an analysed volume (``analyze``), and 3-class probabilities of
    every slice (``slice_probabilities``: the slice's own ``g`` and the scan's ``q`` — one patient, one
    kind of pneumonia). The classifier runs on the :data:`TOP_K` slices with the largest lesion area only
    (their own ``q`` is reported too), also when the burden is under the threshold: the answer is then
    Control, but the scan's slices with lesions are still split between the two pneumonias by its ``q``."""
    cfg = triage.config
    scores = score_volume(triage, vol, classify="top", result=result, progress=progress)
    q = scores.covid_given_lesion(cfg.covid_logit_shift)
    answer = scan_answer(result.slices, q, scores.percent_opacity, top_k=cfg.top_k,
                         min_burden_percent=cfg.min_burden_percent, top=scores.top)
    answer["model"] = triage.name
    answer["slice_covid_given_lesion"] = {str(k): round(v, 6) for k, v in q.items()}
    answer["slice_probabilities"] = [
        dict(zip(TRIAGE_CLASSES, (round(float(v), 6) for v in row)))
        for row in scores.probabilities(range(len(result.slices)), cfg.covid_logit_shift)]
    return answer
