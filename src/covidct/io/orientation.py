"""One working orientation for every CT volume: voxel axes ``(i, j, k)`` = (column, row, slice) pointing
to the patient's left, posterior and inferior (axis codes L, P, I) — the layout of a supine axial DICOM
series read head to feet, as radiologists view it. Readers bring volumes to it (NIfTI in any axis
order; DICOM series whose rows or columns run the other way, e.g. prone scans), so that sides, zones,
the slice classifiers and slice indices mean the same for every input."""

from __future__ import annotations

import numpy as np

#: Axis codes of the working orientation (nibabel convention: the direction each voxel axis points to).
WORKING_AXCODES = ("L", "P", "I")


def ornt_to_working(affine: np.ndarray) -> np.ndarray:
    """nibabel orientation transform (one ``[new axis, flip]`` row per voxel axis i, j, k) from the grid of
    ``affine`` to the working orientation."""
    import nibabel as nib

    return nib.orientations.ornt_transform(nib.orientations.io_orientation(affine),
                                           nib.orientations.axcodes2ornt(WORKING_AXCODES))


def is_identity(ornt: np.ndarray) -> bool:
    return bool(np.array_equal(ornt[:, 0], np.arange(3)) and np.all(ornt[:, 1] == 1))


def reorient_kji(array_kji: np.ndarray, affine: np.ndarray, ornt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Apply ``ornt`` to a ``(slices, rows, columns)`` array and its voxel-to-mm ``affine``."""
    import nibabel as nib

    shape_ijk = array_kji.shape[::-1]
    data = nib.orientations.apply_orientation(array_kji.transpose(2, 1, 0), ornt)
    return (np.ascontiguousarray(data.transpose(2, 1, 0)),
            affine @ nib.orientations.inv_ornt_aff(ornt, shape_ijk))


def to_working(array_kji: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A ``(slices, rows, columns)`` array and its affine in the working orientation (unchanged when
    they already are)."""
    ornt = ornt_to_working(affine)
    return (array_kji, affine) if is_identity(ornt) else reorient_kji(array_kji, affine, ornt)


def from_working(array_kji: np.ndarray, source_affine: np.ndarray) -> np.ndarray:
    """The inverse of :func:`to_working` for an array on the working grid: back to the grid of
    ``source_affine`` (same voxels in the same places, the source's axis order)."""
    import nibabel as nib

    if is_identity(ornt_to_working(source_affine)):
        return array_kji
    back = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt(WORKING_AXCODES),
                                           nib.orientations.io_orientation(source_affine))
    return np.ascontiguousarray(nib.orientations.apply_orientation(array_kji.transpose(2, 1, 0), back).transpose(2, 1, 0))
