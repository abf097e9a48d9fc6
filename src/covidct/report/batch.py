"""``covidct analyze`` on several scans: each into its own subfolder of one output folder, the models
loaded once, and a ``summary.csv`` / ``summary.json`` with one row per scan (``covidct serve`` shows the
folder as an index of the scans). A scan that cannot be read is reported and skipped; the others go on.

A folder holding several DICOM series is one scan (the largest axial series, as for a single ``analyze``), or
with ``series="all"`` one scan per series."""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from covidct import DISCLAIMER
from covidct.errors import CovidctError
from covidct.io.atomic import write_bytes_atomic
from covidct.report.json_io import write_json
from covidct.report.notes import effusion_assessable, report_notes, reversed_axes
from covidct.report.scan_report import ScanModels, analyze

#: Columns of ``summary.csv`` (the same keys in ``summary.json``'s ``scans``).
SUMMARY_COLUMNS = ("name", "input", "series_uid", "status", "answer", "p_covid19", "lung_volume_ml", "ggo_percent",
                   "consolidation_percent", "effusion_percent", "effusion_assessable", "total_percent", "severity_score",
                   "orientation_reversed", "noise_index_hu", "noise_smoothing_sigma_mm", "seconds", "error", "notes")
#: How ``summary.csv`` joins a scan's notes (``summary.json`` keeps them as a list).
NOTES_SEPARATOR = " | "


@dataclass(frozen=True)
class ScanJob:
    """One scan to analyse: an input path, the DICOM series to take (``None``: the only or the largest),
    and the name of its output subfolder."""

    path: Path
    series_uid: str | None
    name: str


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii", ".dcm"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)] or name
    return path.stem if path.is_file() else name


def scan_jobs(paths: Sequence[str | Path], *, series: str | None = None) -> list[ScanJob]:
    """The scans to analyse, with unique output names: one per path, or with ``series="all"`` one per
    DICOM CT series of a folder that holds several (``<folder>-s1``, ``-s2``, ...: axial first, then by size;
    series of other modalities, e.g. a DICOM SEG, are left out when there is a CT series); ``series``
    otherwise names one SeriesInstanceUID for every path."""
    from covidct.io.archive import is_zip, unpacked
    from covidct.io.dicom import list_series

    jobs: list[ScanJob] = []
    taken: set[str] = set()

    def unique(name: str) -> str:
        out, k = name, 2
        while out in taken:
            out, k = f"{name}-{k}", k + 1
        taken.add(out)
        return out

    for raw in paths:
        path = Path(raw)
        # (folder to read, series): a series in a subfolder of its own is read from there, so each read
        # scans only its own headers
        targets: list[tuple[Path, str | None]] = [(path, None if series == "all" else series)]
        zipped = is_zip(path)
        if series == "all" and (path.is_dir() or zipped):
            try:
                found = list_series(unpacked(path) if zipped else path)
            except CovidctError:
                found = []   # a folder of images, or no DICOM: analysed (or refused) as one input
            # the CT series; segmentations, structure sets, reports and other modalities beside them are not scans
            found = [s for s in found if s["modality"] in ("CT", None)] or found
            if len(found) > 1:  # a zipped study's series are read from the archive (its name in the report)
                targets = [(path if zipped else s["folder"], s["series_uid"]) for s in found]
        for i, (where, uid) in enumerate(targets):
            name = _stem(path) + (f"-s{i + 1}" if len(targets) > 1 else "")
            jobs.append(ScanJob(where, uid, unique(name)))
    return jobs


def _row(job: ScanJob, report: dict[str, Any] | None, error: str | None, seconds: float) -> dict[str, Any]:
    row: dict[str, Any] = {k: None for k in SUMMARY_COLUMNS}
    row.update(name=job.name, input=str(job.path), series_uid=job.series_uid, seconds=round(seconds, 2))
    if report is None:
        row.update(status="error", error=error)
        return row
    les = report["lesions"]
    row.update(status="ok", answer=report["diagnosis"]["label"],
               p_covid19=report["diagnosis"]["probabilities"].get("COVID-19"),
               lung_volume_ml=report["lung_volume_ml"], ggo_percent=les["ggo"]["percent_of_lung"],
               consolidation_percent=les["consolidation"]["percent_of_lung"],
               effusion_percent=les["effusion"]["percent_of_lung"],
               effusion_assessable=effusion_assessable(report),   # False: its 0 % effusion was not measured
               total_percent=les["total"]["percent_of_lung"],
               severity_score=report["severity_score"], notes=report_notes(report),
               # the axes the anatomy says the file states the wrong way round, joined by "+"; "none"; None: not checked
               orientation_reversed=None if (axes := reversed_axes(report)) is None else "+".join(axes) or "none",
               series_uid=job.series_uid or report["input"].get("series_uid"))
    # HU inputs: the soft-tissue noise index and the Gaussian the models' slices got (0: none); None for images
    noise = report["input"].get("noise")
    if noise:
        row.update(noise_index_hu=noise["soft_tissue_sd_hu"],
                   noise_smoothing_sigma_mm=noise["sigma_mm"] if noise["smoothed"] else 0.0)
    return row


def write_summary(rows: list[dict[str, Any]], outdir: Path) -> None:
    """``summary.csv`` and ``summary.json`` in ``outdir``, each written atomically."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(SUMMARY_COLUMNS), lineterminator="\n")
    writer.writeheader()
    writer.writerows({**r, "notes": NOTES_SEPARATOR.join(r["notes"] or [])} for r in rows)
    write_bytes_atomic(buf.getvalue().encode("utf-8"), outdir / "summary.csv")
    write_json({"scans": rows, "n_scans": len(rows), "n_failed": sum(r["status"] != "ok" for r in rows),
                "disclaimer": DISCLAIMER}, outdir / "summary.json")


def analyze_many(jobs: Sequence[ScanJob], outdir: str | Path, *, models: ScanModels,
                 on_scan: Callable[[int, ScanJob, dict[str, Any]], None] | None = None,
                 **analyze_kwargs: Any) -> list[dict[str, Any]]:
    """Analyse every job into ``outdir/<job.name>/`` with the same ``models`` (loaded once), write the
    summary after each scan (so an interrupted batch keeps what is done) and return its rows.
    ``on_scan(i, job, row)`` is called after each scan (progress, error lines); a scan whose input or
    analysis fails with a :class:`~covidct.errors.CovidctError` gets an ``error`` row, the rest go on."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for i, job in enumerate(jobs):
        t0 = time.perf_counter()
        try:
            report = analyze(job.path, outdir / job.name, series_uid=job.series_uid, models=models, **analyze_kwargs)
            row = _row(job, report, None, time.perf_counter() - t0)
        except CovidctError as exc:
            row = _row(job, None, str(exc), time.perf_counter() - t0)
        rows.append(row)
        write_summary(rows, outdir)
        if on_scan is not None:
            on_scan(i, job, row)
    return rows
