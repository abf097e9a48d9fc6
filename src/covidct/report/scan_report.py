"""``covidct analyze``: scan-level outputs (NIfTI label maps, overlays, report.json, report.html)."""

from __future__ import annotations

import base64
import html
import io
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from covidct import DISCLAIMER, __version__
from covidct.analysis.scan import ScanResult, analyze_volume, classify_slices, model_turns
from covidct.engine.infer import SegPredictor
from covidct.io import Volume, get_window, read, to_model_input, write_nifti
from covidct.models.registry import DEFAULTS
from covidct.io.atomic import write_bytes_atomic
from covidct.report.json_io import write_json
from covidct.report.notes import orientation_summary, report_notes
from covidct.report.overlay import overlay_rgb, save_png, with_legend
from covidct.report.viewer import write_viewer

N_OVERLAYS = 6


def _png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _slice_chart(slices: list[dict]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    idx = [s["index"] for s in slices]
    fig, ax = plt.subplots(figsize=(8, 2.6))
    ax.plot(idx, [s["infection_probability"] for s in slices], label="infection probability")
    ax2 = ax.twinx()
    ax2.fill_between(idx, [s["lesion_percent"] for s in slices], color="tab:red", alpha=0.25, label="lesion % of lung")
    ax.set_xlabel("slice (0 = head)"); ax.set_ylabel("probability"); ax2.set_ylabel("lesion % of lung")
    ax.set_ylim(0, 1.02)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def build_report(vol: Volume, result: ScanResult, models: list[dict], seconds: float) -> dict[str, Any]:
    b = result.burden
    return {
        "input": {"path": str(vol.source), "kind": vol.kind, "shape": list(vol.shape),
                  "spacing_mm": None if vol.spacing is None else [round(float(s), 6) for s in vol.spacing],
                  "is_hu": vol.is_hu, "files_read": vol.n_files, "series_uid": vol.metadata.get("series_uid"),
                  # axis codes of the input as stored; shape, spacing and slices[].index are in the working
                  # orientation (L, P, I: slice 0 at the head), the NIfTI outputs on the input's own grid
                  "orientation": vol.metadata.get("orientation"),
                  # DICOM series whose slice gaps differ (a missing file?): volumes use the median gap
                  "uneven_slice_gaps": vol.metadata.get("uneven_slice_gaps"),
                  # DICOM series without ImagePositionPatient: how the slices were ordered and spaced
                  "slice_positions": vol.metadata.get("slice_positions"),
                  # NaN / infinite voxels (outside a resampled volume's field of view), read as the lowest value
                  "non_finite_voxels": vol.metadata.get("non_finite_voxels", 0),
                  # images: share of coloured pixels (io.image.colour_share; of the most coloured slice of a
                  # folder); None for DICOM / NIfTI
                  "colour_share": vol.metadata.get("colour_share"),
                  # CT numbers saved without their rescale intercept (NIfTI, DICOM), shifted by this into HU
                  # (io.volume.shift_stored_ct); None when the file held HU
                  "stored_value_offset": vol.metadata.get("stored_value_offset"),
                  # does the anatomy agree with the stated orientation (the spine posterior to the lungs)?
                  # analysis.scan.orientation_check; None for inputs without HU or orientation
                  "orientation_check": result.orientation_check,
                  # axes turned back before the analysis (analyze --reorient anatomy): slices, zones, sides and
                  # overlays are of the turned volume; lesions.nii.gz / lungs.nii.gz stay on the file's own grid
                  "reoriented": result.reoriented,
                  # HU inputs: noise index (soft-tissue local SD) before / after, and any in-plane smoothing that
                  # brought a sharp-kernel or low-dose scan to the noise the models were checked on (io.noise)
                  "noise": result.noise,
                  # DICOM ConvolutionKernel (None for other inputs or when the header has none)
                  "convolution_kernel": vol.metadata.get("convolution_kernel")},
        "lung_volume_ml": b["lung_volume_ml"],
        "lung_method": result.lung_method,
        # slices holding lung; cut_at_head / cut_at_feet: the lungs run off the scan (volumes
        # and percentages are then of the part it holds); None for inputs without orientation or spacing
        "lung_coverage": result.lung_coverage,
        # a lung mask larger than lungs can be (analysis.scan.lung_volume_note); None when plausible
        "lung_volume_note": result.lung_volume_note,
        # a lung mask covering more of a slice than lungs can (analysis.scan.lung_share_note): probably no chest
        # CT; None when plausible
        "lung_share_note": result.lung_share_note,
        # slices found black outside their lungs (a lung-masked rendering), segmented by the model's
        # lung-masked companion network instead of the main one (engine.infer); [] for every other input
        "lung_masked_slices": result.lung_masked_slices,
        "lesions": {k: {"volume_ml": v["volume_ml"], "percent_of_lung": v["percent_of_lung"], "voxels": v["voxels"],
                        # effusion: False when every slice holding lung is lung-masked (its 0 means not measured)
                        **({"assessable": result.effusion_assessable()} if k == "effusion" else {})}
                    for k, v in b["lesions"].items()},
        "percent_opacity": b["percent_opacity"],
        "percent_high_opacity": b["percent_high_opacity"],
        "severity_score": b["severity_score"],
        "severity_score_max": b["severity_score_max"],
        "severity_method": b["severity_method"],
        "sides": b.get("sides", {}),
        "zones": b["zones"],
        "most_affected_slice": int(np.argmax([s["lesion_percent"] for s in result.slices])) if result.slices else None,
        "diagnosis": result.diagnosis,
        "slices": result.slices,
        "models": models,
        "covidct_version": __version__,
        "timings": result.timings,
        "seconds": round(seconds, 2),
    }


def _html(report: dict, overlays: list[tuple[int, bytes]], chart: bytes, *, viewer: bool = True) -> str:
    def img(data: bytes, alt: str) -> str:
        return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'

    def ml(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.1f}"

    les = report["lesions"]
    rows = "".join(f"<tr><td>{html.escape(name)}</td><td>{ml(v['volume_ml'])}</td><td>{v['percent_of_lung']:.2f}</td></tr>"
                   if v.get("assessable", True) else
                   f'<tr><td>{html.escape(name)}</td><td colspan="2">not assessable (lung-masked slices)</td></tr>'
                   for name, v in les.items())
    zones = "".join(f"<tr><td>{html.escape(z)}</td><td>{v['percent_involved']:.2f}</td><td>{v['score']}</td></tr>"
                    for z, v in report["zones"].items())
    inp = report["input"]
    orientation = orientation_summary(report)
    figs = "".join(f"<figure>{img(data, f'slice {k}')}<figcaption>slice {k}</figcaption></figure>" for k, data in overlays)
    lung_ml = report["lung_volume_ml"]
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>covidct report</title>
<style>
body{{font-family:sans-serif;margin:1.5em;max-width:1100px}} .warn{{background:#fff3cd;border:1px solid #c9a100;padding:.7em;font-weight:bold}}
table{{border-collapse:collapse;margin:.5em 0}} td,th{{border:1px solid #bbb;padding:.25em .6em;text-align:right}} td:first-child{{text-align:left}}
figure{{display:inline-block;margin:.3em}} figure img{{max-width:340px}} .kv td{{text-align:left}}
</style></head><body>
<p class="warn">{html.escape(DISCLAIMER)}</p>
<h1>covidct scan report</h1>
<table class="kv">
<tr><td>input</td><td>{html.escape(inp['path'])} ({html.escape(inp['kind'])}, {inp['shape']}, spacing {inp['spacing_mm']} mm)</td></tr>
{"" if orientation is None else f'<tr><td>orientation check</td><td>{html.escape(orientation)}</td></tr>'}
{"".join(f'<tr><td>note</td><td class="note">{html.escape(r)}</td></tr>' for r in report_notes(report))}
<tr><td>lung volume</td><td>{'n/a' if lung_ml is None else f'{lung_ml:.0f} mL'} ({html.escape(report['lung_method'])})</td></tr>
<tr><td>percentage of opacity</td><td>{report['percent_opacity']:.2f} %</td></tr>
<tr><td>percentage of high opacity</td><td>{'n/a' if report['percent_high_opacity'] is None else f"{report['percent_high_opacity']:.2f} %"}</td></tr>
<tr><td>severity score</td><td>{report['severity_score']} / {report['severity_score_max']} ({html.escape(report['severity_method'])})</td></tr>
<tr><td>answer</td><td><b>{html.escape(report['diagnosis']['label'])}</b> ({html.escape(_probability_text(report['diagnosis']['probabilities']))}; {html.escape(report['diagnosis']['rule'])})</td></tr>
{_classifier_row(report['diagnosis'].get('classifier'))}
</table>
<h2>Lesions</h2><table><tr><th>type</th><th>volume (mL)</th><th>% of lung</th></tr>{rows}</table>
<h2>Zones</h2><table><tr><th>zone</th><th>% involved</th><th>score (0-5)</th></tr>{zones}</table>
<h2>Slices</h2>{img(chart, 'slice chart')}
{'<p>Every slice with its overlay: <a href="viewer.html">viewer.html</a> (written beside this report).</p>' if viewer else ''}
<h2>Most affected slices</h2><p>GGO red, consolidation blue, effusion green, lung outline yellow.</p>{figs}
<p><small>covidct {html.escape(report['covidct_version'])}; models: {html.escape(', '.join(m['name'] + (f" ({m['precision']})" if m.get('precision') else '') for m in report['models']))}; {report['seconds']} s</small></p>
</body></html>
"""


def _probability_text(probs: dict[str, float]) -> str:
    return ", ".join(f"{'p(lesions present)' if k == 'lesions_present' else k} {v:.3f}" for k, v in probs.items())


def _classifier_row(block: dict | None) -> str:
    if not block:
        return ""
    means = block.get("mean_probabilities_lesion_slices") or {}
    text = ", ".join(f"{html.escape(c)} {p:.2f}" for c, p in means.items())
    return (f"<tr><td>slice classifier</td><td>{html.escape(block['model'])}: mean {text} "
            f"({html.escape(block['note'])})</td></tr>")


#: The slice classifier whose probabilities ``analyze`` reports by default.
DEFAULT_CLASSIFIER = DEFAULTS["scan_cls"]


class ScanModels:
    """The models of ``analyze``, each loaded on first use and kept: a batch of scans
    (:func:`covidct.report.batch.analyze_many`) loads them once. ``model_spec``: segmentation model;
    ``classifier_spec`` / ``triage_spec`` as in :func:`analyze`; ``precision`` of the segmentation model
    (:mod:`covidct.engine.precision`; the classifiers run in float32, the precision they were calibrated in)."""

    def __init__(self, model_spec: str | Path | None = None, *, device: str = "cpu",
                 classifier_spec: str | Path | None = "auto", triage_spec: str | Path | None = DEFAULTS["triage"],
                 precision: str = "auto") -> None:
        from covidct.engine.common import check_device
        from covidct.engine.precision import resolve_precision

        self.model_spec, self.device = model_spec, check_device(device)
        self.precision = resolve_precision(precision, self.device)
        self.classifier_spec, self.triage_spec = classifier_spec, triage_spec
        if triage_spec:   # a model of another kind fails here, also for inputs the triage would not run on
            from covidct.analysis.triage import check_triage_model

            check_triage_model(triage_spec)
        self._predictor = self._triage = None
        self._classifiers: dict[str, tuple[Any, dict, dict]] = {}
        self.seg_entry: dict[str, str] = {}

    @property
    def predictor(self) -> SegPredictor:
        """The segmentation predictor (slices reach it already cropped to their HU lungs: one pass)."""
        if self._predictor is None:
            from covidct.models.checkpoint import file_sha256
            from covidct.models.registry import load_seg_model

            model, payload = load_seg_model(self.model_spec)
            self.seg_entry = {"name": Path(payload["path"]).stem, "task": "seg", "sha256": file_sha256(payload["path"]),
                              "precision": self.precision}
            self._predictor = SegPredictor(model, device=self.device, crop_to_lung=False, precision=self.precision)
        return self._predictor

    def classifier(self, spec: str | Path) -> tuple[Any, dict, dict]:
        """``(model, checkpoint, models-list entry)`` of a slice classifier (BatchNorms folded)."""
        key = str(spec)
        if key not in self._classifiers:
            from covidct.models.checkpoint import file_sha256
            from covidct.models.registry import load_cls_model

            model, payload = load_cls_model(spec, fold_bn=True)
            entry = {"name": Path(payload["path"]).stem, "task": "cls", "sha256": file_sha256(payload["path"])}
            self._classifiers[key] = (model, payload, entry)
        return self._classifiers[key]

    def triage(self):
        """The triage model. Its classifier runs on 5 slices a scan, so an ensemble classifier is streamed
        (one member in memory at a time, read again for each scan: the 20 members of the default would
        otherwise raise the scan's peak memory by 0.19–0.27 GB; benchmarks/RESULTS.md)."""
        if self._triage is None:
            from covidct.analysis.triage import load_triage

            self._triage = load_triage(self.triage_spec, stream_classifier=True)
        return self._triage


def _add_classifier(result: ScanResult, vol: Volume, loaded: tuple[Any, dict, dict], models: list[dict], *, window,
                    progress: bool) -> None:
    """Per-slice probabilities of the slice classifier, on the slices with lesions (the others are
    Control for the triage whatever a classifier says), into ``result.slices``; their mean into
    ``result.diagnosis["classifier"]``."""
    model, payload, entry = loaded
    models.append(entry)
    t0 = time.perf_counter()
    with_lesions = [s["index"] for s in result.slices if s["lesion_area_mm2"] > 0]
    per_slice = classify_slices(vol, model, temperature=float(payload.get("temperature", 1.0)), indices=with_lesions,
                                window=window, progress=progress, sigma_px=result.smoothing_sigma_px)
    result.timings["classifier_s"] = round(time.perf_counter() - t0, 2)
    for k, probs in per_slice.items():
        result.slices[k]["class_probabilities"] = probs
    names = list(model.config.classes)
    rows = list(per_slice.values())
    result.diagnosis["classifier"] = {
        "model": Path(payload["path"]).stem,
        "mean_probabilities_lesion_slices": ({c: round(float(np.mean([r[c] for r in rows])), 6) for c in names}
                                             if rows else None),
        "note": "slice classifier on whole windowed slices with lesions; reported beside the answer, not used for "
                "it (its external validation on COVID-CT-MD is weak: see benchmarks/RESULTS.md)",
    }


def _add_triage(result: ScanResult, vol: Volume, triage, models: list[dict], *, progress: bool = False) -> None:
    """The 3-class answer of a triage model becomes ``result.diagnosis``'s label and probabilities; the
    lesion-only answer stays as ``lesion_finding``."""
    from covidct.analysis.triage import triage_scan
    from covidct.models.checkpoint import file_sha256

    t0 = time.perf_counter()
    answer = triage_scan(triage, vol, result, progress=progress)
    models.append({"name": triage.name, "task": "triage", "sha256": file_sha256(triage.path),
                   "classifier": triage.config.classifier})
    d = result.diagnosis
    d["lesion_finding"] = d["label"]
    d["label"] = answer.pop("label")
    d["probabilities"] = {**d["probabilities"], **answer.pop("probabilities")}
    d["rule"] = (f"Control when GGO + consolidation cover < {triage.config.min_burden_percent:g} % of the lung; "
                 f"else COVID-19 when the mean COVID-19 probability (classifier {triage.config.classifier}, shifted "
                 f"for CT by {triage.config.covid_logit_shift:+.3f} logits) of the {triage.config.top_k} slices "
                 "with the largest lesion area is >= 0.5, else Common pneumonia")
    fitted_on = ", ".join(triage.fit.get("patients", [])) or "unknown patients"
    d["note"] = (f"3-class triage: its one fitted number (the shift) comes from {fitted_on} "
                 f"({triage.fit.get('slices', '?')} slices; see the model card); research software, not for diagnosis")
    for row, probs in zip(result.slices, answer.pop("slice_probabilities")):
        row["triage_probabilities"] = probs
    d["triage"] = answer
    result.timings["triage_s"] = round(time.perf_counter() - t0, 2)


def _write_dicom_seg(result: ScanResult, vol: Volume, outdir: Path) -> dict[str, Any]:
    """``lesions.seg.dcm`` and ``lungs.seg.dcm`` (one SEG series) for a DICOM input; what was written (or
    why not) for the report."""
    import highdicom as hd

    from covidct.io.dicom_seg import LUNG_SEGMENTS, can_write_dicom_seg, write_dicom_seg
    from covidct.runtime import release_freed_memory

    if not can_write_dicom_seg(vol):
        return {"file": None, "lungs_file": None,
                "note": f"not written: the input is a {vol.kind}, not a DICOM series or multi-frame volume"}
    t0 = time.perf_counter()
    # the SEGs' arrays are fresh mappings: first return the heap the inference left free (the command line
    # keeps it, covidct.runtime), so that the two do not add up
    release_freed_memory()
    series = hd.UID()
    lesions = write_dicom_seg(result.as_stored(result.lesions), vol, outdir / "lesions.seg.dcm", series_uid=series)
    lungs = write_dicom_seg(result.as_stored(result.lungs), vol, outdir / "lungs.seg.dcm", segments=LUNG_SEGMENTS,
                            organ=True, description="covidct lungs (research software, not for diagnosis)", series_uid=series,
                            instance_number=2)
    result.timings["dicom_seg_s"] = round(time.perf_counter() - t0, 2)
    out: dict[str, Any] = {"file": lesions.name if lesions else None, "lungs_file": lungs.name if lungs else None,
                           "series_uid": str(series),
                           "segments": "lesions.seg.dcm: GGO, consolidation, pleural effusion (those present); "
                                       "lungs.seg.dcm: right lung, left lung; SNOMED CT"}
    if lesions is None:
        out["note"] = "lesions.seg.dcm not written: no lesion voxel"
    return out


def analyze(path: str | Path, outdir: str | Path, *, model_spec: str | Path | None = None, progress: bool = True,
            device: str = "cpu", series_uid: str | None = None, window: str = "model",
            classifier_spec: str | Path | None = "auto", viewer: bool = True,
            triage_spec: str | Path | None = DEFAULTS["triage"], models: ScanModels | None = None,
            dicom_seg: bool = False, slice_orientation: str = "training",
            reader: Callable[[], Volume] | None = None, precision: str = "auto",
            reorient: bool = False, denoise: bool = True) -> dict[str, Any]:
    """Analyse one scan and write every output into ``outdir``; returns the report dict. HU slices
    reach the model through ``window`` (a preset of :mod:`covidct.io.window` or ``"L,W"``).
    ``triage_spec`` (``None``: none) gives the 3-class patient answer and every slice's 3-class
    probabilities (:mod:`covidct.analysis.triage`) for volumes with a pixel spacing.
    ``classifier_spec`` (a shipped name or file; ``None`` for none; ``"auto"``: the fast slice
    classifier only when the triage does not run) adds the class probabilities of a slice classifier
    on the slices with lesions; they are reported, not used for the patient label.
    ``viewer`` writes ``viewer.html`` (every slice with its overlay, :mod:`covidct.report.viewer`).
    ``models``: already loaded models to use (and keep) instead of the three specs (a batch of scans).
    ``dicom_seg``: also ``lesions.seg.dcm`` and ``lungs.seg.dcm``, DICOM Segmentations of the lesions and the
    lungs referencing the source images (DICOM inputs; :mod:`covidct.io.dicom_seg`). ``slice_orientation``:
    ``"training"`` turns the slices of a DICOM / NIfTI volume into the segmentation training slices'
    orientation on their way into the model (:mod:`covidct.analysis.scan`), ``"working"`` gives them as read.
    ``reader``: gives the volume of ``path`` (instead of reading it here), e.g. the ``result`` of a
    :class:`covidct.io.read_ahead.ReadAhead` started earlier; the segmentation model is loaded before it is
    called, so that the two overlap. ``precision``: of the segmentation model, ``"auto"`` (bfloat16 where the
    processor computes it natively), ``"fp32"`` or ``"bf16"`` (:mod:`covidct.engine.precision`; recorded in
    the report's ``models`` entry). ``reorient``: turn back the axes the anatomy calls reversed before the
    analysis (:func:`covidct.analysis.scan.analyze_volume`); the label maps are written on the file's grid.
    ``denoise``: smooth a HU scan much noisier than those the pipeline was checked on (:mod:`covidct.io.noise`;
    ``input.noise`` of the report says what was measured and done)."""
    if models is None:
        models = ScanModels(model_spec, device=device, classifier_spec=classifier_spec, triage_spec=triage_spec,
                            precision=precision)
    t0 = time.perf_counter()
    # a folder of several series: take the one with the most slices (one header scan), and say so
    hu_window = get_window(window)
    if reader is not None:
        models.predictor   # load the segmentation model while the scan is read elsewhere
        vol = reader()
    else:
        vol = read(path, series_uid=series_uid, largest_series=True, progress=progress)
    series_note = None
    if "series_available" in vol.metadata and series_uid is None:
        series_note = {"series_chosen": vol.metadata["series_uid"], "series_available": vol.metadata["series_available"],
                       # several series of the largest size: which noise indices decided (io.dicom)
                       "series_choice": vol.metadata.get("series_choice")}
    result = analyze_volume(vol, models.predictor, progress=progress, window=hu_window,
                            slice_orientation=slice_orientation, reorient=reorient, denoise=denoise)
    used = [models.seg_entry]
    triage_runs = bool(models.triage_spec) and vol.spacing is not None
    classifier_spec = models.classifier_spec
    if classifier_spec == "auto":  # the triage gives every slice class probabilities; else the fast classifier
        classifier_spec = None if triage_runs else DEFAULT_CLASSIFIER
    if classifier_spec:
        _add_classifier(result, vol, models.classifier(classifier_spec), used, window=hu_window, progress=progress)
    if triage_runs:
        _add_triage(result, vol, models.triage(), used, progress=progress)
    report = build_report(vol, result, used, time.perf_counter() - t0)
    if vol.is_hu:
        report["input"]["model_window"] = {"level": hu_window.level, "width": hu_window.width}
    turns = model_turns(vol, models.predictor, slice_orientation)
    report["input"]["model_slice_orientation"] = (f"turned {turns} quarter(s) counter-clockwise into the model's "
                                                  f"training orientation" if turns else "as read")
    if series_note:
        report["input"].update(series_note)

    outdir = Path(outdir)
    (outdir / "overlays").mkdir(parents=True, exist_ok=True)
    order = np.argsort([-s["lesion_percent"] for s in result.slices])[:N_OVERLAYS]
    order = [int(k) for k in order if result.slices[k]["lesion_percent"] > 0] or [vol.n_slices // 2]
    n_files = 2 + (1 if dicom_seg else 0) + len(order) + (1 if viewer else 0) + 2
    with tqdm(total=n_files, desc="writing", unit="file", disable=not progress) as bar:
        write_nifti(result.as_stored(result.lesions), vol, outdir / "lesions.nii.gz")
        write_nifti(result.as_stored(result.lungs), vol, outdir / "lungs.nii.gz")
        bar.update(2)
        if dicom_seg:
            report["dicom_seg"] = _write_dicom_seg(result, vol, outdir)
            bar.update()
        overlays = []
        for k in sorted(order):
            grey = to_model_input(vol.array[k], is_hu=vol.is_hu, window="lung")  # display: the usual lung window
            pic = with_legend(overlay_rgb(grey, result.lesions[k], result.lungs[k] > 0),
                              title=f"slice {k}: lesions {result.slices[k]['lesion_percent']:.1f}% of lung")
            save_png(pic, outdir / "overlays" / f"slice_{k:04d}.png")
            overlays.append((k, _png_bytes(pic)))
            bar.update()
        if viewer:
            t1 = time.perf_counter()
            write_viewer(outdir / "viewer.html",
                         lambda k: to_model_input(vol.array[k], is_hu=vol.is_hu, window="lung"), result.lesions,
                         result.lungs, result.slices, spacing=vol.spacing,
                         title=f"covidct viewer: {Path(str(vol.source)).name}", notes=report_notes(report),
                         extra_windows={"mediastinum": lambda k: to_model_input(vol.array[k], is_hu=True,
                                                                                window="mediastinum")}
                         if vol.is_hu else None)
            report["timings"]["viewer_s"] = round(time.perf_counter() - t1, 2)
            bar.update()
        report["seconds"] = round(time.perf_counter() - t0, 2)
        write_json(report, outdir / "report.json")
        write_bytes_atomic(_html(report, overlays, _slice_chart(result.slices), viewer=viewer).encode("utf-8"),
                           outdir / "report.html")
        bar.update(2)
    seg = report.get("dicom_seg") or {}
    remove_stale_outputs(outdir, overlays=[f"slice_{k:04d}.png" for k, _ in overlays],
                         written=({"viewer.html"} if viewer else set()) | {seg[k] for k in ("file", "lungs_file")
                                                                           if seg.get(k)})
    return report


#: Files of an earlier analysis in the same folder that this one may not rewrite (``overlays/slice_*.png`` too).
OPTIONAL_OUTPUTS = ("viewer.html", "lesions.seg.dcm", "lungs.seg.dcm")


def remove_stale_outputs(outdir: Path, *, overlays: list[str], written: set[str]) -> list[Path]:
    """Delete what an earlier analysis left in ``outdir`` and this one did not write: its viewer, DICOM SEGs and
    overlay pictures would otherwise sit beside this report as if they were its own (``covidct serve`` opens
    the viewer). Only covidct's own output names are touched. Returns the removed paths."""
    stale = [outdir / name for name in OPTIONAL_OUTPUTS if name not in written]
    keep = set(overlays)
    stale += [p for p in sorted((outdir / "overlays").glob("slice_*.png")) if p.name not in keep]
    removed = []
    for path in stale:
        if path.is_file():
            path.unlink()
            removed.append(path)
    return removed
