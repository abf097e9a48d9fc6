"""Readers for what hospitals and public sets have: DICOM (series or file), NIfTI, images, zip archives of them."""

from __future__ import annotations

from pathlib import Path

from covidct.errors import InputError
from covidct.io.archive import is_zip, member_name, unpacked
from covidct.io.body import body_box, classifier_input, mask_box
from covidct.io.dicom import read_dicom_file, read_dicom_series, scan_series
from covidct.io.image import is_image, list_images, load_grey, load_label_map, read_image, read_image_folder
from covidct.io.nifti import is_nifti, read_nifti, write_nifti
from covidct.io.volume import KINDS, Volume
from covidct.io.window import PRESETS, Window, apply_window, get_window, to_model_input

__all__ = [
    "KINDS", "PRESETS", "Volume", "Window", "apply_window", "body_box", "classifier_input", "describe", "get_window",
    "is_image", "is_nifti", "mask_box",
    "list_images", "load_grey", "load_label_map", "read", "read_dicom_file", "read_dicom_series",
    "read_image", "read_image_folder", "read_nifti", "scan_series", "to_model_input", "write_nifti",
]


def _looks_dicom(path: Path) -> bool:
    if path.suffix.lower() in (".dcm", ".dicom", ".ima"):
        return True
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def read(path: str | Path, *, series_uid: str | None = None, require_ct: bool = True,
         largest_series: bool = False, progress: bool = False) -> Volume:
    """Read any supported input, deciding by what it is.

    * folder with DICOM files -> :func:`read_dicom_series`; folder of images -> :func:`read_image_folder`
    * ``.nii`` / ``.nii.gz`` -> :func:`read_nifti`
    * DICOM file (by extension or ``DICM`` preamble) -> :func:`read_dicom_file`
    * ``.zip`` -> unpacked (:mod:`covidct.io.archive`), then the folder or the one file it holds as above
    * anything else -> :func:`read_image` (decoded by content)

    ``progress``: a bar over the slices of a DICOM series as they are decoded.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(path, "no such file or folder")
    if is_zip(path):
        inner = unpacked(path)
        try:
            volume = read(inner, series_uid=series_uid, require_ct=require_ct, largest_series=largest_series,
                          progress=progress)
        except InputError as exc:  # name the archive (and the member at fault), not the temporary folder
            member = member_name(path, exc.path) if exc.path else None
            raise InputError(path, exc.reason if member is None else f"{member}: {exc.reason}") from None
        volume.source = path
        return volume
    if path.is_dir():
        if not any(p.is_file() for p in path.rglob("*")):
            raise InputError(path, "folder is empty")
        if list_images(path) and not any(_looks_dicom(p) for p in path.iterdir() if p.is_file()):
            return read_image_folder(path)
        return read_dicom_series(path, series_uid=series_uid, require_ct=require_ct, largest_series=largest_series,
                                 progress=progress)
    if path.stat().st_size == 0:
        raise InputError(path, "file is empty")
    if is_nifti(path):
        return read_nifti(path)
    if _looks_dicom(path):
        return read_dicom_file(path, require_ct=require_ct)
    return read_image(path)


def describe(path: str | Path, *, series_uid: str | None = None) -> dict:
    """What ``covidct info`` prints: a volume's :meth:`Volume.summary`, or for a folder (or zip archive)
    holding several DICOM series without ``series_uid``, the study: ``{"path", "kind": "dicom-study",
    "series": [...]}`` in the order ``analyze`` chooses (:func:`covidct.io.dicom.list_series`; inside an
    archive each ``folder`` is the member folder under the archive's name)."""
    from covidct.io.dicom import list_series

    path = Path(path)
    folder = unpacked(path) if is_zip(path) else path
    if folder.is_dir() and not series_uid:
        try:
            series = list_series(folder)
        except InputError:  # no DICOM here (a folder of images, an empty folder): read() says what it is
            series = []
        if len(series) > 1:
            return {"path": str(path), "kind": "dicom-study",
                    "series": [{**row, "folder": str(path / Path(row["folder"]).relative_to(folder))} for row in series]}
    return read(path, series_uid=series_uid).summary()
