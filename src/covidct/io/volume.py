"""The one object every reader returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from covidct.errors import InputError

#: Kinds of input a reader can report.
KINDS = ("dicom-series", "dicom", "nifti", "image", "image-folder")


@dataclass
class Volume:
    """A CT volume or a stack of 2-D slices.

    Attributes:
        array: ``(slices, rows, columns)``. Hounsfield units when ``is_hu``, else the stored grey values
            (8-bit images: 0..255). float32, or int16 for HU volumes whose every value is a whole number in
            int16's range (CT as scanners store it: integers, slope 1, an integer intercept), which halves the
            memory of the largest array of a scan-level analysis (:func:`compact_hu`); convert a slice with
            ``np.asarray(vol.array[k], np.float32)`` before arithmetic that could leave that range.
        kind: one of :data:`KINDS`.
        source: the file or folder read.
        is_hu: whether ``array`` holds Hounsfield units.
        spacing: ``(slice, row, column)`` spacing in mm, or ``None`` when the source has none
            (plain images).
        affine: 4x4 NIfTI-style (RAS) matrix mapping voxel index ``(column i, row j, slice k)``
            to millimetres. Identity for images. ``array[k, j, i]`` is voxel ``(i, j, k)``.
        files: the file behind each slice, in slice order (a NIfTI, multi-frame DICOM or image file repeats;
            a coronal or sagittal DICOM series resliced to axial lists its files in stored order).
        n_skipped: files in a folder that were not read (not DICOM / not an image).
        metadata: source metadata (modality, series UID, window, ...).
    """

    array: np.ndarray
    kind: str
    source: Path
    is_hu: bool
    spacing: tuple[float, float, float] | None
    affine: np.ndarray = field(default_factory=lambda: np.eye(4))
    files: list[str] = field(default_factory=list)
    n_skipped: int = 0
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(slices, rows, columns)``."""
        return tuple(int(s) for s in self.array.shape)  # type: ignore[return-value]

    @property
    def n_slices(self) -> int:
        return int(self.array.shape[0])

    @property
    def n_files(self) -> int:
        return len(set(self.files))

    def voxel_volume_ml(self) -> float | None:
        """Volume of one voxel in millilitres, or ``None`` without spacing."""
        if self.spacing is None:
            return None
        return float(np.prod(self.spacing)) / 1000.0

    def summary(self) -> dict[str, Any]:
        """A JSON-ready description (what ``covidct info`` prints)."""
        out: dict[str, Any] = {
            "path": str(self.source),
            "kind": self.kind,
            "shape": list(self.shape),
            "spacing_mm": None if self.spacing is None else [round(float(s), 6) for s in self.spacing],
            "is_hu": self.is_hu,
            "hu_min": float(self.array.min()) if self.is_hu else None,
            "hu_max": float(self.array.max()) if self.is_hu else None,
            "value_min": float(self.array.min()),
            "value_max": float(self.array.max()),
            "modality": self.metadata.get("modality"),
            "files_read": self.n_files,
            "files_skipped": self.n_skipped,
        }
        for key in ("series_uid", "transfer_syntax", "image_mode", "colour_share", "non_finite_voxels",
                    "stored_value_offset", "orientation_in_header"):
            if key in self.metadata:
                out[key] = self.metadata[key]
        return out


def fill_non_finite(array: np.ndarray, source: str | Path) -> int:
    """Set the NaN and infinite voxels of ``array`` (in place) to its lowest finite value and return how many
    there were. Resampled float volumes mark voxels outside the field of view as NaN; left as they are they
    would pass every comparison as "not air", so the air outside the body would be closed in and taken for lung
    (a scan with a NaN ring measured twice its lung volume). The lowest value is what DICOM padding reads as:
    outside. A volume without a single finite voxel is an :class:`~covidct.errors.InputError`."""
    if np.isfinite(array.min()) and np.isfinite(array.max()):   # the common case: no pass over a mask
        return 0
    finite_min = None
    for plane in array:   # a slice at a time: no whole-volume boolean temporaries
        ok = np.isfinite(plane)
        if ok.any():
            m = float(plane[ok].min())
            finite_min = m if finite_min is None else min(finite_min, m)
    if finite_min is None:
        raise InputError(source, "holds no finite values (every voxel is NaN or infinite)")
    count = 0
    for plane in array:
        bad = ~np.isfinite(plane)
        count += int(bad.sum())
        plane[bad] = finite_min
    return count


#: Slices a time that :func:`compact_hu` checks and converts (bounds its temporaries).
_COMPACT_CHUNK = 16


def fits_int16(values: np.ndarray) -> bool:
    """Whether every value of ``values`` is a whole number within int16's range (so int16 holds it exactly);
    NaN and infinities do not fit."""
    if values.dtype == np.int16 or values.size == 0:
        return True
    info = np.iinfo(np.int16)
    low, high = values.min(), values.max()
    if not (low >= info.min and high <= info.max):   # also False for NaN
        return False
    return values.dtype.kind in "iub" or bool(np.array_equal(values, np.rint(values)))


def store_slices(volume: np.ndarray, index, values: np.ndarray) -> np.ndarray:
    """``volume[index] = values`` for a volume filled part by part (the DICOM readers): an int16 volume becomes
    float32 (the parts stored so far copied over) when ``values`` do not fit int16 exactly; returns the volume
    written to, which the caller keeps."""
    if volume.dtype == np.int16 and not fits_int16(values):
        volume = volume.astype(np.float32)
    volume[index] = values
    return volume


#: CT values are stored as unsigned numbers plus a rescale intercept of this (-1024 HU); a file that keeps the stored
#: numbers and loses the intercept has air at 0 instead of -1000 HU.
STORED_CT_INTERCEPT = -1024


def stored_ct_offset(array: np.ndarray) -> int | None:
    """:data:`STORED_CT_INTERCEPT` when ``array`` looks like CT stored without its rescale intercept, else None.

    Hounsfield units of a chest CT always hold air below -900 HU (outside the body, lungs, airways). Values that
    are all >= 0, reach 1024, and hold air where stored CT numbers put it (0-124, i.e. -1024..-900 HU; at least 5 %
    of the voxels) and soft tissue (924-1124, -100..+100 HU; at least 2 %) are stored numbers. Checked on every
    4th voxel along each axis; an 8-bit (0-255) volume, already in HU or without the two peaks gets None."""
    sample = array[::4, ::4, ::4] if array.ndim == 3 else array[::4, ::4]
    if sample.size == 0 or float(array.min()) < 0 or float(array.max()) < -STORED_CT_INTERCEPT:
        return None
    air = np.count_nonzero(sample <= 124) / sample.size
    soft = np.count_nonzero((sample >= 924) & (sample <= 1124)) / sample.size
    return STORED_CT_INTERCEPT if air >= 0.05 and soft >= 0.02 else None


def shift_stored_ct(array: np.ndarray, meta: dict) -> np.ndarray:
    """``array`` in HU: CT numbers stored without their rescale intercept (:func:`stored_ct_offset`) are shifted
    (in place where the dtype allows: int16 / float; unsigned or other integers are converted first) and
    ``meta["stored_value_offset"]`` records the shift; any other array is returned as it is."""
    offset = stored_ct_offset(array)
    if offset is None:
        return array
    if array.dtype != np.int16 and array.dtype.kind != "f":
        array = array.astype(np.int16) if float(array.max()) <= np.iinfo(np.int16).max else array.astype(np.float32)
    array += np.asarray(offset, array.dtype)
    meta["stored_value_offset"] = offset
    return array


def compact_hu(array: np.ndarray) -> np.ndarray:
    """``array`` as int16 when every value is a whole number within int16's range — the same values in half the
    memory of float32 — else ``array`` itself. Checked and converted a few slices at a time (no whole-volume
    float temporaries); the float array is released by the caller dropping it."""
    if array.dtype == np.int16 or array.dtype.kind != "f" or array.size == 0:
        return array
    info = np.iinfo(np.int16)
    if float(array.min()) < info.min or float(array.max()) > info.max:
        return array
    for z in range(0, array.shape[0], _COMPACT_CHUNK):
        if not fits_int16(array[z:z + _COMPACT_CHUNK]):
            return array
    out = np.empty(array.shape, np.int16)
    for z in range(0, array.shape[0], _COMPACT_CHUNK):
        out[z:z + _COMPACT_CHUNK] = array[z:z + _COMPACT_CHUNK]
    return out
