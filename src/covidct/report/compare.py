"""``covidct compare``: two analyses of one patient (a follow-up scan against an earlier one).

Reads the ``report.json`` of two ``covidct analyze`` outputs and gives, for every burden measure, the value
before, after and the change: lung volume, each lesion type's volume and share of the lung, the percentages
of opacity and high opacity, the zone-based severity score, and each zone's involvement. Percentages change in
percentage points. Notes say when the two numbers are less comparable than they look: different segmentation
models, the same series twice, a lung volume that differs by more than a fifth (another depth of breath: compare
shares of the lung, not mL), slice gaps or pixel sizes that differ by more than a quarter (the same scan at half
its in-plane resolution measured 1.71 % instead of 1.85 % of lung: benchmarks/RESULTS.md). Plain dictionaries,
no PyTorch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from covidct.errors import InputError
from covidct.report.notes import effusion_assessable

#: Lesion types of a report, in the order they are printed.
LESION_TYPES = ("ggo", "consolidation", "effusion", "total")
#: Lung volumes differing by more than this share are flagged (mL change then mixes disease and breath).
LUNG_VOLUME_TOLERANCE = 0.2
#: Slice gaps or pixel sizes differing by more than this share are flagged (partial-volume effects differ).
SPACING_TOLERANCE = 0.25
#: Noise indices (``input.noise``, covidct.io.noise) differing by more than this factor are flagged: another
#: reconstruction kernel or dose (the open scans read 20-25 HU; sharpened like a lung kernel, 52-122 HU).
NOISE_RATIO = 1.5


def load_report(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """``(report.json path, report)`` of an analysis folder or a report.json file; an :class:`InputError` naming
    the path when there is none or it is not a scan report."""
    path = Path(path)
    file = path / "report.json" if path.is_dir() else path
    if not file.is_file():
        raise InputError(path, "no report.json here (give a covidct analyze output folder or its report.json)")
    try:
        report = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(file, f"not a readable JSON report ({type(exc).__name__})") from None
    missing = [k for k in ("input", "lesions", "severity_score") if not isinstance(report, dict) or k not in report]
    if missing:
        raise InputError(file, f"not a covidct analyze report (no {', '.join(missing)})")
    return file, report


def _change(before: float | None, after: float | None, digits: int) -> dict[str, float | None]:
    change = None if before is None or after is None else round(after - before, digits)
    return {"before": before, "after": after, "change": change}


def _seg_model(report: dict) -> tuple[str | None, str]:
    """The segmentation model's sha256 and the precision it ran in (reports before precisions were recorded:
    float32, the only one then)."""
    seg = [m for m in report.get("models") or [] if m.get("task") == "seg"]
    return (seg[0].get("sha256"), seg[0].get("precision", "fp32")) if seg else (None, "fp32")


def compare_reports(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Every burden measure before, after and its change, per zone too, with the notes on comparability."""
    measures: dict[str, dict[str, float | None]] = {
        "lung_volume_ml": _change(before.get("lung_volume_ml"), after.get("lung_volume_ml"), 3)}
    for name in LESION_TYPES:
        b, a = before["lesions"].get(name) or {}, after["lesions"].get(name) or {}
        measures[f"{name}_volume_ml"] = _change(b.get("volume_ml"), a.get("volume_ml"), 3)
        measures[f"{name}_percent_of_lung"] = _change(b.get("percent_of_lung"), a.get("percent_of_lung"), 4)
    for key in ("percent_opacity", "percent_high_opacity", "severity_score"):
        measures[key] = _change(before.get(key), after.get(key), 4)
    zones = {name: _change((before.get("zones") or {}).get(name, {}).get("percent_involved"),
                           (after.get("zones") or {}).get(name, {}).get("percent_involved"), 4)
             for name in dict.fromkeys([*(before.get("zones") or {}), *(after.get("zones") or {})])}
    notes = []
    (model_b, prec_b), (model_a, prec_a) = _seg_model(before), _seg_model(after)
    if model_b != model_a:
        notes.append("the two analyses used different segmentation models: part of any change may be the models'")
    elif prec_b != prec_a:
        notes.append(f"the segmentation model ran in different precisions ({prec_b} before, {prec_a} after): on the "
                     "open scans that alone moves burdens by up to 0.1 percentage points (benchmarks/RESULTS.md)")
    uid_b, uid_a = before["input"].get("series_uid"), after["input"].get("series_uid")
    if uid_b and uid_b == uid_a:
        notes.append(f"both reports are of the same series ({uid_b}): this is no follow-up")
    vol_b, vol_a = before.get("lung_volume_ml"), after.get("lung_volume_ml")
    if vol_b and vol_a and abs(vol_a - vol_b) > LUNG_VOLUME_TOLERANCE * max(vol_a, vol_b):
        notes.append(f"the lung volumes differ by {abs(vol_a - vol_b) / max(vol_a, vol_b):.0%} (another depth of "
                     "breath, or lungs cut off): compare the shares of the lung, not the mL")
    spacings = [r["input"].get("spacing_mm") or [None, None] for r in (before, after)]
    for axis, what in ((0, "slice gaps"), (1, "pixel sizes")):
        size_b, size_a = spacings[0][axis], spacings[1][axis]
        if size_b and size_a and abs(size_a - size_b) > SPACING_TOLERANCE * max(size_a, size_b):
            notes.append(f"{what} differ ({size_b:.2f} vs {size_a:.2f} mm): lesions are measured differently at "
                         "another resolution (P001 at half its resolution: total burden 1.85 -> 1.71 %)")
    if note := _reconstruction_note(before["input"], after["input"]):
        notes.append(note)
    if before.get("lung_volume_ml") is None or after.get("lung_volume_ml") is None:
        notes.append("a report without lung volume (an image without HU): only shares of the lung compare")
    unseen = [k for k, r in (("before", before), ("after", after)) if not effusion_assessable(r)]
    if unseen:
        notes.append(f"pleural effusion could not be assessed {' or '.join(unseen)} (lung-masked slices, black "
                     "outside the lungs): its change is not measured")
    label = {k: (r.get("diagnosis") or {}).get("label") for k, r in (("before", before), ("after", after))}
    return {"measures": measures, "zones": zones, "answer": label,
            "severity_score_max": after.get("severity_score_max") or before.get("severity_score_max"),
            "notes": notes}


def _reconstruction_note(before: dict[str, Any], after: dict[str, Any]) -> str | None:
    """A note when the two inputs (``report["input"]``) were reconstructed differently: other kernels in their DICOM
    headers, or noise indices more than :data:`NOISE_RATIO` apart; None when they agree or nothing says."""
    kernels = [i.get("convolution_kernel") for i in (before, after)]
    noise = [i.get("noise") or {} for i in (before, after)]
    index = [n.get("soft_tissue_sd_hu") for n in noise]
    other_kernel = all(kernels) and kernels[0] != kernels[1]
    noisier = all(index) and max(index) > NOISE_RATIO * min(index)
    if not (other_kernel or noisier):
        return None
    said = [f"kernels {kernels[0]} vs {kernels[1]}"] if other_kernel else []
    if all(index):
        said.append(f"noise index {index[0]:.0f} vs {index[1]:.0f} HU")
    smoothed = [w for w, n in zip(("before", "after"), noise) if n.get("smoothed")]
    if smoothed:
        said.append(f"the slices {' and '.join(smoothed)} reached the models smoothed")
    return (f"the scans were reconstructed differently ({'; '.join(said)}): ground glass reads differently through "
            f"another kernel or dose (the open scans sharpened like a lung kernel: burdens within 0.21 percentage "
            f"points once smoothed, up to 7.4 higher unsmoothed; benchmarks/RESULTS.md, session 36)")


def compare(before: str | Path, after: str | Path) -> dict[str, Any]:
    """:func:`compare_reports` of two analysis folders (or report.json files), with their paths."""
    file_b, report_b = load_report(before)
    file_a, report_a = load_report(after)
    return {"before": str(file_b), "after": str(file_a), **compare_reports(report_b, report_a)}


def format_comparison(result: dict[str, Any]) -> str:
    """The printed table: measure, before, after, change (percentages in percentage points)."""
    def cell(value: float | None, signed: bool = False) -> str:
        if value is None:
            return f"{'-':>11}"
        return f"{value:>+11.2f}" if signed else f"{value:>11.2f}"

    lines = [f"{'measure':<28}{'before':>11}{'after':>11}{'change':>11}"]
    for name, row in [*result["measures"].items(), *((f"zone {z} %", r) for z, r in result["zones"].items())]:
        lines.append(f"{name:<28}{cell(row['before'])}{cell(row['after'])}{cell(row['change'], signed=True)}")
    lines.append(f"answer: {result['answer']['before']} -> {result['answer']['after']}")
    lines += [f"note: {n}" for n in result["notes"]]
    return "\n".join(lines)
