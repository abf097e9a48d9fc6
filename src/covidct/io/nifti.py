"""NIfTI reader and writer (``.nii``, ``.nii.gz``) that keep the affine.

A NIfTI array ``data[i, j, k]`` becomes ``Volume.array[k, j, i]`` (slices, rows, columns), so
that ``Volume.array[k]`` shows slice ``k`` in the usual DICOM row/column layout. The affine is kept
unchanged: it maps ``(i, j, k)`` to millimetres for both.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from covidct.errors import InputError
from covidct.io.atomic import atomic_output
from covidct.io.volume import Volume

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def is_nifti(path: str | Path) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def read_nifti(path: str | Path) -> Volume:
    """Read a 3-D NIfTI volume (HU assumed when the data are integers or span below -500)."""
    import nibabel as nib

    path = Path(path)
    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as exc:
        raise InputError(path, f"unreadable NIfTI file ({type(exc).__name__}: {exc})") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InputError(path, f"expected a 3-D NIfTI volume, got {data.ndim}-D data of shape {data.shape}")
    zooms = [float(z) for z in img.header.get_zooms()[:3]]
    array = np.ascontiguousarray(data.transpose(2, 1, 0))
    is_hu = bool(array.min() < -500.0)
    return Volume(
        array=array,
        kind="nifti",
        source=path,
        is_hu=is_hu,
        spacing=(zooms[2], zooms[1], zooms[0]),
        affine=np.asarray(img.affine, dtype=float),
        files=[str(path)] * array.shape[0],
        metadata={"modality": "CT" if is_hu else None, "orientation": "".join(nib.aff2axcodes(img.affine))},
    )


def write_nifti(array: np.ndarray, reference: Volume, path: str | Path, *, dtype=np.uint8) -> Path:
    """Write a ``(slices, rows, columns)`` array on ``reference``'s grid, atomically."""
    import nibabel as nib

    path = Path(path)
    if tuple(array.shape) != reference.shape:
        raise ValueError(f"array shape {array.shape} does not match the volume {reference.shape}")
    img = nib.Nifti1Image(np.asarray(array, dtype=dtype).transpose(2, 1, 0), reference.affine)
    img.set_qform(reference.affine, code=1)
    img.set_sform(reference.affine, code=1)
    with atomic_output(path) as tmp:
        nib.save(img, tmp)
    return path
