"""Image-classification sets as lists of :class:`ClsRecord`, from four layouts.

* ``split.csv`` with columns ``path,label[,split]`` (UCSD COVID-CT style); paths relative to the CSV.
* COVID-CT-MD: ``patients.csv`` + ``slice_labels.csv`` + DICOM series folders / NIfTI volumes.
  Following the COVIDx-CT convention, COVID-19 and CAP patients contribute their infection-labelled
  slices, Normal patients all slices.
* COVIDx-CT file names ``[class]_[patientID]_[scan]_[slice].png`` with class ``NCP`` (COVID-19),
  ``CP`` (common pneumonia) or ``Normal``.
* One sub-folder per class (the folder name is the label).
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

from covidct.errors import InputError
from covidct.io.image import list_images

#: The three classes of COVID-CT-Mask-Net / COVIDx-CT, in index order.
THREE_CLASSES: tuple[str, ...] = ("Control", "Common pneumonia", "COVID-19")
BINARY_CLASSES: tuple[str, ...] = ("NonCOVID", "COVID")

_ALIASES = {
    "normal": "Control", "control": "Control", "noncovid": "NonCOVID", "non-covid": "NonCOVID",
    "cp": "Common pneumonia", "cap": "Common pneumonia", "common pneumonia": "Common pneumonia",
    "pneumonia": "Common pneumonia", "ncp": "COVID-19", "covid-19": "COVID-19", "covid19": "COVID-19",
    "covid": "COVID",
}
COVIDX_NAME = re.compile(r"^(NCP|CP|Normal)_([^_]+)_([^_]+)_(.+)\.(png|jpe?g|bmp|tiff?)$", re.IGNORECASE)


def canonical_label(label: str, classes: tuple[str, ...] | list[str]) -> str:
    """Map a label spelling onto one of ``classes`` (e.g. ``CAP`` -> ``Common pneumonia``)."""
    if label in classes:
        return label
    alias = _ALIASES.get(label.strip().lower())
    if alias in classes:
        return alias
    # Binary task over a 3-class source: anything not COVID is NonCOVID.
    if tuple(classes) == BINARY_CLASSES:
        return "COVID" if alias in ("COVID", "COVID-19") else "NonCOVID"
    if tuple(classes) == THREE_CLASSES and alias == "COVID":
        return "COVID-19"
    raise ValueError(f"label {label!r} is not one of {list(classes)}")


@dataclass(frozen=True)
class ClsRecord:
    """One labelled image: a file, or slice ``slice_index`` of a volume file/folder."""

    path: Path
    label: str
    split: str | None = None
    patient: str | None = None
    slice_index: int | None = None


def detect_layout(root: str | Path) -> str:
    """``split-csv``, ``covid-ct-md``, ``covidx``, or ``folder-per-class``."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(root, "no such folder")
    if (root / "split.csv").exists():
        return "split-csv"
    if (root / "patients.csv").exists() and (root / "slice_labels.csv").exists():
        return "covid-ct-md"
    files = list_images(root)
    if files and any(COVIDX_NAME.match(p.name) for p in files):
        return "covidx"
    if any(p.is_dir() and list_images(p) for p in root.iterdir()):
        return "folder-per-class"
    raise InputError(root, "no known classification layout (split.csv, patients.csv + slice_labels.csv, "
                           "COVIDx-CT names, or one folder per class)")


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def load_split_csv(root: Path) -> list[ClsRecord]:
    rows = _read_csv(root / "split.csv")
    if not rows or "path" not in rows[0] or "label" not in rows[0]:
        raise InputError(root / "split.csv", "needs 'path' and 'label' columns")
    out = []
    for r in rows:
        patient = r.get("patient") or r.get("source_paper") or None
        out.append(ClsRecord(root / r["path"], r["label"], r.get("split") or None, patient))
    return out


def load_covid_ct_md(root: Path) -> list[ClsRecord]:
    patients = {r["patient_id"]: r for r in _read_csv(root / "patients.csv")}
    out = []
    for r in _read_csv(root / "slice_labels.csv"):
        p = patients.get(r["patient_id"])
        if p is None:
            raise InputError(root / "slice_labels.csv", f"patient {r['patient_id']} is not in patients.csv")
        diagnosis = r.get("diagnosis") or p["diagnosis"]
        normal = canonical_label(diagnosis, THREE_CLASSES) == "Control"
        if not normal and int(r["infection"]) != 1:
            continue
        out.append(ClsRecord(root / p["path"], diagnosis, None, r["patient_id"], int(r["slice_index"])))
    return out


def load_covidx(root: Path) -> list[ClsRecord]:
    out = []
    for p in list_images(root):
        m = COVIDX_NAME.match(p.name)
        if m:
            out.append(ClsRecord(p, m.group(1), None, m.group(2)))
    return out


def load_folder_per_class(root: Path) -> list[ClsRecord]:
    out = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        for p in list_images(sub):
            out.append(ClsRecord(p, sub.name, None, None))
    return out


_LOADERS = {
    "split-csv": load_split_csv,
    "covid-ct-md": load_covid_ct_md,
    "covidx": load_covidx,
    "folder-per-class": load_folder_per_class,
}


def load_records(root: str | Path, *, split: str | None = None, classes: tuple[str, ...] | list[str] | None = None) -> list[ClsRecord]:
    """All records of a classification folder (any layout above), optionally one split, with
    labels mapped onto ``classes``."""
    root = Path(root)
    records = _LOADERS[detect_layout(root)](root)
    if split is not None:
        records = [r for r in records if r.split == split]
    if not records:
        raise InputError(root, f"no labelled images found{f' in split {split!r}' if split else ''}")
    if classes is not None:
        try:
            records = [ClsRecord(r.path, canonical_label(r.label, classes), r.split, r.patient, r.slice_index) for r in records]
        except ValueError as exc:
            raise InputError(root, str(exc)) from None
    return records


class RecordImages:
    """Loads the grey ``[0, 1]`` image of a :class:`ClsRecord`; volumes are read once and cached."""

    def __init__(self, max_volumes: int = 2) -> None:
        self._volumes: dict[Path, object] = {}
        self.max_volumes = max_volumes

    def __call__(self, record: ClsRecord):
        from covidct.io import classifier_input, read, to_model_input
        from covidct.io.image import load_grey
        from covidct.io.nifti import working_slice

        if record.slice_index is None:
            arr, _ = load_grey(record.path)
            return to_model_input(arr, is_hu=False)
        vol = self._volumes.get(record.path)
        if vol is None:
            if len(self._volumes) >= self.max_volumes:
                self._volumes.pop(next(iter(self._volumes)))
            vol = self._volumes[record.path] = read(record.path)
        if not 0 <= record.slice_index < vol.n_slices:
            raise InputError(record.path, f"slice {record.slice_index} outside the volume's {vol.n_slices} slices")
        return classifier_input(vol.array[working_slice(vol, record.slice_index)], is_hu=vol.is_hu)
