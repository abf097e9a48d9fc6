"""NIfTI reader and writer (``.nii``, ``.nii.gz``) that keep the affine.

Volumes are brought to one working orientation first, whatever order the file stores its axes in:
voxel axes ``(i, j, k)`` pointing to the patient's left, posterior and inferior (axis codes L, P, I,
the layout of DICOM axial slices read head to feet). The array ``data[i, j, k]`` of that grid becomes
``Volume.array[k, j, i]`` (slices, rows, columns), so ``Volume.array[0]`` is the head end and every slice
shows anterior up with the patient's right on the image's left, as radiologists read CT — for a NIfTI
written RAS-first (e.g. by dcm2niix) as for one written in DICOM order. ``Volume.affine`` maps that
working grid to millimetres; :func:`write_nifti` maps every mask back to the file's own grid, so an
output has exactly the input's shape and affine.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from covidct import SHORT_DISCLAIMER
from covidct.errors import InputError
from covidct.io.atomic import atomic_output
from covidct.io.orientation import from_working, ornt_to_working, to_working
from covidct.io.volume import Volume, compact_hu, fill_non_finite, shift_stored_ct

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def is_nifti(path: str | Path) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def _spacing_missing(path: Path) -> bool:
    """Whether a NIfTI-1 header has a zero voxel size that nothing else replaces (no sform): nibabel
    would silently read it as 1 mm."""
    import nibabel as nib
    from nibabel.openers import ImageOpener

    try:
        with ImageOpener(str(path)) as fh:
            header = nib.Nifti1Header.from_fileobj(fh, check=False)
    except Exception:  # noqa: BLE001 - not NIfTI-1 (e.g. NIfTI-2) or unreadable: nib.load decides
        return False
    return int(header["sform_code"]) == 0 and bool(np.any(np.asarray(header["pixdim"][1:4]) == 0))


def _voxels(proxy) -> np.ndarray:
    """The voxel values of a NIfTI image: int16 as stored when the file holds int16 without scaling (CT as
    converters write it: no float32 copy, half the memory), else float32 with the header's slope and intercept
    applied."""
    stored = np.dtype(getattr(proxy, "dtype", np.float32))
    slope, inter = float(getattr(proxy, "slope", 1.0)), float(getattr(proxy, "inter", 0.0))
    if stored == np.int16 and slope == 1.0 and inter == 0.0:
        return np.asarray(proxy.get_unscaled(), dtype=np.int16)
    return np.asarray(proxy, dtype=np.float32)


def read_nifti(path: str | Path) -> Volume:
    """Read a 3-D NIfTI volume (HU when the data span below -500; CT numbers saved without their rescale
    intercept are shifted into HU, :func:`~covidct.io.volume.shift_stored_ct`, and
    ``metadata["stored_value_offset"]`` says so). NaN / infinite
    voxels (outside a resampled volume's field of view) take the lowest finite value (:func:`fill_non_finite`);
    ``metadata["non_finite_voxels"]`` counts them."""
    import nibabel as nib

    from nibabel.imageglobals import LoggingOutputSuppressor

    path = Path(path)
    if _spacing_missing(path):
        raise InputError(path, "its header gives no voxel spacing (pixdim 0 and no sform), so volumes in mL "
                               "cannot be measured; set the spacing in the header first")
    try:
        with LoggingOutputSuppressor():   # nibabel's header fixes are logged; ours is one error line or none
            img = nib.load(str(path))
            data = _voxels(img.dataobj)
    except Exception as exc:
        raise InputError(path, f"unreadable NIfTI file ({type(exc).__name__}: {exc})") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InputError(path, f"expected a 3-D NIfTI volume, got {data.ndim}-D data of shape {data.shape}")
    source_affine = np.asarray(img.affine, dtype=float)
    # qform and sform codes 0: the header states no orientation and nibabel falls back to ANALYZE's axes
    in_header = any(int(img.header.get(code, 0) or 0) > 0 for code in ("qform_code", "sform_code"))
    array, affine = to_working(data.transpose(2, 1, 0), source_affine)
    array = np.ascontiguousarray(array)
    non_finite = fill_non_finite(array, path)
    zooms = [float(z) for z in np.sqrt((affine[:3, :3] ** 2).sum(axis=0))]
    shifted: dict = {}
    array = shift_stored_ct(array, shifted)   # CT numbers saved without their rescale intercept: air at 0, not -1000
    is_hu = bool(array.min() < -500.0)
    if not is_hu and array.dtype != np.float32:   # not HU: images are float32 everywhere
        array = array.astype(np.float32)
    return Volume(
        array=compact_hu(array) if is_hu else array,
        kind="nifti",
        source=path,
        is_hu=is_hu,
        spacing=(zooms[2], zooms[1], zooms[0]),
        affine=affine,
        files=[str(path)] * array.shape[0],
        metadata={"modality": "CT" if is_hu else None, "orientation": "".join(nib.aff2axcodes(source_affine)),
                  "orientation_in_header": in_header,
                  "source_affine": source_affine.tolist(), "source_shape": [int(n) for n in img.shape[:3]],
                  **({"non_finite_voxels": non_finite} if non_finite else {}),
                  **shifted},
    )


def working_slice(volume: Volume, file_k: int) -> int:
    """Index in ``volume.array`` of slice ``k`` as the file stores it (NIfTI ``data[:, :, k]``; other
    kinds keep their order): labels given per file slice, as in COVID-CT-MD's ``slice_labels.csv``."""
    source = volume.metadata.get("source_affine") if volume.kind == "nifti" else None
    if source is None:
        return int(file_k)
    return working_slice_of_file(np.asarray(source, dtype=float), volume.n_slices, file_k, source=volume.source)


def working_slice_of_file(affine: np.ndarray, n_slices: int, file_k: int, *, source: str | Path | None = None) -> int:
    """:func:`working_slice` from a NIfTI header alone (its affine and slice count), without reading the voxels."""
    axis, flip = ornt_to_working(affine)[2]
    if int(axis) != 2:
        raise InputError(source, "its third axis is not the slice axis, so slice indices of the file "
                                 "do not name axial slices")
    return int(file_k) if flip > 0 else int(n_slices) - 1 - int(file_k)


def write_nifti(array: np.ndarray, reference: Volume, path: str | Path, *, dtype=np.uint8) -> Path:
    """Write a ``(slices, rows, columns)`` array on ``reference``'s grid, atomically (the header's
    description says research software, not for diagnosis)."""
    import nibabel as nib

    path = Path(path)
    if tuple(array.shape) != reference.shape:
        raise ValueError(f"array shape {array.shape} does not match the volume {reference.shape}")
    array, affine = np.asarray(array, dtype=dtype), reference.affine
    source = reference.metadata.get("source_affine") if reference.kind == "nifti" else None
    if source is not None:  # back to the file's own axis order (see the module docstring)
        affine = np.asarray(source, dtype=float)
        array = from_working(array, affine)
    img = nib.Nifti1Image(array.transpose(2, 1, 0), affine)
    img.header["descrip"] = SHORT_DISCLAIMER.encode("ascii")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    with atomic_output(path) as tmp:
        nib.save(img, tmp)
    return path
