"""Image-classification sets as lists of :class:`ClsRecord`, from four layouts.

* ``split.csv`` with columns ``path,label[,split][,patient|source_paper]`` (UCSD COVID-CT style); paths
  relative to the CSV. Images without a patient or source are grouped by their numbered names
  (:func:`numbered_name_groups`) so that splits keep panels of one figure and runs of one case together.
* COVID-CT-MD: ``patients.csv`` + ``slice_labels.csv`` + DICOM series folders / NIfTI volumes.
  Following the COVIDx-CT convention, COVID-19 and CAP patients contribute their infection-labelled
  slices, Normal patients all slices.
* COVIDx-CT file names ``[class]_[patientID]_[scan]_[slice].png`` with class ``NCP`` (COVID-19),
  ``CP`` (common pneumonia) or ``Normal``.
* One sub-folder per class (the folder name is the label).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from covidct.data.tables import read_table
from covidct.errors import InputError, require_folder
from covidct.io.image import list_images

#: The three classes of COVID-CT-Mask-Net / COVIDx-CT, in index order.
THREE_CLASSES: tuple[str, ...] = ("Control", "Common pneumonia", "COVID-19")
BINARY_CLASSES: tuple[str, ...] = ("NonCOVID", "COVID")

# label spellings, compared lower-case with "_" / " " read as "-" and a "ct-" prefix (UCSD's CT_COVID) dropped
_ALIASES = {
    "normal": "Control", "control": "Control", "healthy": "Control",
    "noncovid": "NonCOVID", "non-covid": "NonCOVID", "not-covid": "NonCOVID", "negative": "NonCOVID",
    "cp": "Common pneumonia", "cap": "Common pneumonia", "common-pneumonia": "Common pneumonia",
    "pneumonia": "Common pneumonia", "bacterial": "Common pneumonia", "bacterial-pneumonia": "Common pneumonia",
    "viral-pneumonia": "Common pneumonia", "other-pneumonia": "Common pneumonia",
    "ncp": "COVID-19", "covid-19": "COVID-19", "covid19": "COVID-19",
    "covid": "COVID", "positive": "COVID",
}


def _alias(label: str) -> str | None:
    key = re.sub(r"[\s_]+", "-", label.strip().lower())
    key = key[3:] if key.startswith("ct-") else key
    return _ALIASES.get(key)
COVIDX_NAME = re.compile(r"^(NCP|CP|Normal)_([^_]+)_([^_]+)_(.+)\.(png|jpe?g|bmp|tiff?)$", re.IGNORECASE)


def relative_name(record: ClsRecord, root: Path) -> str:
    """A record as ``path`` relative to the data folder (``#k`` appended for a volume slice)."""
    try:
        name = record.path.relative_to(root).as_posix()
    except ValueError:
        name = record.path.as_posix()
    return name if record.slice_index is None else f"{name}#{record.slice_index}"


def canonical_label(label: str, classes: tuple[str, ...] | list[str]) -> str:
    """Map a label spelling onto one of ``classes`` (e.g. ``CAP`` -> ``Common pneumonia``)."""
    if label in classes:
        return label
    alias = _alias(label)
    if alias in classes:
        return alias
    # Binary task over a 3-class source: a known class that is not COVID is NonCOVID (an unknown label is an error)
    if tuple(classes) == BINARY_CLASSES and alias is not None:
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
    root = require_folder(root)
    if (root / "split.csv").exists():
        return "split-csv"
    if (root / "patients.csv").exists() and (root / "slice_labels.csv").exists():
        return "covid-ct-md"
    files = list_images(root)
    if files and any(COVIDX_NAME.match(p.name) for p in files):
        return "covidx"
    if (root / "images").is_dir() and ((root / "masks").is_dir() or (root / "masks4").is_dir()):
        # its sub-folders would otherwise read as classes named "images", "masks", ...
        raise InputError(root, "is a segmentation folder (images/ + masks/), not a classification layout: "
                               "use covidct evaluate seg or evaluate lesions")
    if any(p.is_dir() and list_images(p) for p in root.iterdir()):
        return "folder-per-class"
    raise InputError(root, "no known classification layout (split.csv, patients.csv + slice_labels.csv, "
                           "COVIDx-CT names, or one folder per class)")


LEADING_NUMBER = re.compile(r"^(\d+)(?:%\d+)?\.[A-Za-z]+$")


def numbered_name_groups(names: list[str]) -> list[str | None]:
    """A source group per file name for sets that name images by number (UCSD NonCOVID): names
    with one leading number (``25.png``, ``25%0.jpg``, ``25%3.jpg``: panels of one figure) and runs
    of consecutive numbers (``1058.png`` … ``1062.png``: slices of one case) form one group, as
    the official UCSD split keeps them; other names get ``None`` (a group of their own). When one
    run would hold more than half of the numbered names, the numbers are a plain index
    (``1.png`` … ``500.png``) and only names sharing their leading number are grouped."""
    numbers = [int(m.group(1)) if (m := LEADING_NUMBER.match(Path(n).name)) else None for n in names]
    start: dict[int, int] = {}
    for n in sorted({n for n in numbers if n is not None}):
        start[n] = start[n - 1] if n - 1 in start else n
    numbered = [n for n in numbers if n is not None]
    run_sizes = Counter(start[n] for n in numbered)
    if numbered and max(run_sizes.values()) > len(numbered) / 2:
        start = {n: n for n in start}
    return [None if n is None else f"run-{start[n]}" for n in numbers]


def load_split_csv(root: Path) -> list[ClsRecord]:
    rows = read_table(root / "split.csv", ("path", "label"))
    # numbered names are grouped per label and folder (COVID and NonCOVID numbers are unrelated)
    unsourced: dict[tuple[str, str], list[int]] = {}
    for i, r in enumerate(rows):
        if not (r.get("patient") or r.get("source_paper")):
            unsourced.setdefault((r["label"], str(Path(r["path"]).parent)), []).append(i)
    derived: dict[int, str] = {}
    for (label, folder), idx in unsourced.items():
        for i, g in zip(idx, numbered_name_groups([rows[i]["path"] for i in idx])):
            if g is not None:
                derived[i] = f"{label}/{folder}/{g}"
    out = []
    for i, r in enumerate(rows):
        patient = r.get("patient") or r.get("source_paper") or derived.get(i)
        out.append(ClsRecord(root / r["path"], r["label"], r.get("split") or None, patient))
    return out


def load_covid_ct_md(root: Path) -> list[ClsRecord]:
    patients = {r["patient_id"]: r for r in read_table(root / "patients.csv", ("patient_id", "diagnosis", "path"))}
    for pid, p in patients.items():   # before any work: a listed scan that is not there is a mistake, not a skip
        if not (p["path"] or "").strip() or not (root / p["path"]).exists():
            raise InputError(root / "patients.csv", f"patient {pid}: its scan {p['path']!r} is not in {root}")
    out = []
    labels = root / "slice_labels.csv"
    rows = read_table(labels, ("patient_id", "slice_index", "infection")) if labels.is_file() else []
    for line, r in enumerate(rows, start=2):
        p = patients.get(r["patient_id"])
        if p is None:
            raise InputError(labels, f"patient {r['patient_id']} is not in patients.csv")
        diagnosis = r.get("diagnosis") or p["diagnosis"]
        try:
            normal = canonical_label(diagnosis, THREE_CLASSES) == "Control"
            infected, index = int(r["infection"]), int(r["slice_index"])
        except ValueError as exc:
            raise InputError(labels, f"line {line}: {exc}") from None
        if not normal and infected != 1:
            continue
        out.append(ClsRecord(root / p["path"], diagnosis, None, r["patient_id"], index))
    # Normal patients need no slice labels (COVID-CT-MD distributes none for them): all their slices
    listed = {r["patient_id"] for r in rows}
    for pid, p in patients.items():
        try:
            normal = canonical_label(p["diagnosis"], THREE_CLASSES) == "Control"
        except ValueError as exc:
            raise InputError(root / "patients.csv", f"patient {pid}: {exc}") from None
        if normal and pid not in listed:
            out += [ClsRecord(root / p["path"], p["diagnosis"], None, pid, k)
                    for k in range(_slice_count(root, p))]
    return out


def _slice_count(root: Path, patient: dict[str, str]) -> int:
    """Slices of a patient's scan: ``n_slices`` of ``patients.csv`` when given, else read from the scan."""
    if (patient.get("n_slices") or "").strip():
        try:
            return int(patient["n_slices"])
        except ValueError:
            raise InputError(root / "patients.csv", f"patient {patient['patient_id']}: n_slices "
                                                    f"{patient['n_slices']!r} is not a number") from None
    from covidct.io import read

    return read(root / patient["path"]).n_slices


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


def load_records(root: str | Path, *, split: str | None = None, classes: tuple[str, ...] | list[str] | None = None,
                 require_files: bool = True) -> list[ClsRecord]:
    """All records of a classification folder (any layout above), optionally one split, with
    labels mapped onto ``classes``. ``require_files``: a listed file (image, scan) that is not there is an
    error now, before any work starts; ``False`` only reads the lists."""
    root = Path(root)
    records = _LOADERS[detect_layout(root)](root)
    if split is not None:
        records = [r for r in records if r.split == split]
    if not records:
        raise InputError(root, f"no labelled images found{f' in split {split!r}' if split else ''}")
    if require_files:
        missing = next((r.path for r in records if not r.path.exists()), None)
        if missing is not None:
            raise InputError(missing, f"file not found (listed in {root})")
    if classes is not None:
        try:
            records = [ClsRecord(r.path, canonical_label(r.label, classes), r.split, r.patient, r.slice_index) for r in records]
        except ValueError as exc:
            raise InputError(root, str(exc)) from None
    return records


class RecordImages:
    """Loads the grey ``[0, 1]`` image of a :class:`ClsRecord`; volumes are read once and cached, and a noisy HU
    volume's slices come smoothed as ``analyze`` gives them to its models (:func:`covidct.io.noise.noise_plan`)."""

    def __init__(self, max_volumes: int = 2) -> None:
        self._volumes: dict[Path, object] = {}
        self.max_volumes = max_volumes

    def __call__(self, record: ClsRecord):
        from covidct.io import classifier_input, read, to_model_input
        from covidct.io.image import load_grey
        from covidct.io.nifti import working_slice
        from covidct.io.noise import smoothed, volume_noise_plan

        if record.slice_index is None:
            arr, _ = load_grey(record.path)
            return to_model_input(arr, is_hu=False)
        cached = self._volumes.get(record.path)
        if cached is None:
            if len(self._volumes) >= self.max_volumes:
                self._volumes.pop(next(iter(self._volumes)))
            vol = read(record.path)
            sigma = (volume_noise_plan(vol) or {}).get("sigma_px", 0.0)
            cached = self._volumes[record.path] = (vol, sigma)
        vol, sigma = cached
        if not 0 <= record.slice_index < vol.n_slices:
            raise InputError(record.path, f"slice {record.slice_index} outside the volume's {vol.n_slices} slices")
        return classifier_input(smoothed(vol.array[working_slice(vol, record.slice_index)], sigma), is_hu=vol.is_hu)
