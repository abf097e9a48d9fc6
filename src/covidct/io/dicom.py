"""DICOM readers: a single file or a folder holding one series, and multi-frame (enhanced) images.

Slices are ordered head -> feet: by descending position along the slice normal
(``ImagePositionPatient`` projected on ``row x column`` direction); ``InstanceNumber`` is used
when positions are missing. Stored values go through the modality LUT
(``RescaleSlope``/``RescaleIntercept``) to Hounsfield units. Compressed transfer syntaxes
(JPEG Lossless, JPEG 2000, RLE, ...) decode through pylibjpeg's plugins or GDCM if installed.
A multi-frame file (Enhanced CT, Legacy Converted Enhanced CT: one file holding the whole series) is
read through highdicom, which takes each frame's position, orientation and rescale from its
functional groups.
"""

from __future__ import annotations

import os
import threading
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from covidct.errors import InputError
from covidct.io.volume import Volume, compact_hu, fill_non_finite, shift_stored_ct, store_slices

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _pydicom():
    import pydicom  # local: keeps `import covidct` light

    return pydicom


def read_header(path: Path) -> Any:
    """The dataset of a DICOM file, its pixel data deferred (read from the file only when used);
    ``InputError`` if it is not DICOM. A file cut short inside compressed pixel data parses as an empty
    dataset (pydicom only warns): its header is read without the pixels and marked ``covidct_damaged``,
    so that it stays in its series and reading that series names it (:func:`_pixels_hu`) instead of
    leaving a silent gap."""
    import warnings

    pydicom = _pydicom()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)   # "End of file reached before delimiter": see below
            ds = pydicom.dcmread(str(path), defer_size="64 KB")
            if len(ds) == 0:
                header = pydicom.dcmread(str(path), stop_before_pixels=True)
                if len(header):
                    header.covidct_damaged = "truncated DICOM file: it ends inside its pixel data"
                    return header
        return ds
    except pydicom.errors.InvalidDicomError:
        raise InputError(path, "not a DICOM file (no DICM preamble)") from None
    except Exception as exc:  # truncated files raise many kinds of errors
        raise InputError(path, f"unreadable DICOM file ({type(exc).__name__}: {exc})") from None


def _check_ct(ds: Any, path: Path, require_ct: bool) -> None:
    modality = str(getattr(ds, "Modality", "") or "")
    if require_ct and modality and modality != "CT":
        raise InputError(path, f"modality is {modality}, not CT")


#: Transfer syntaxes whose frames are JPEG, JPEG-LS, JPEG 2000 or HTJ2K codestreams: each ends with the
#: marker FFD9 (end of image / end of codestream), which a truncated stream lacks.
_CODESTREAMS_ENDING_FFD9 = frozenset(f"1.2.840.10008.1.2.4.{n}" for n in (50, 51, 57, 70, 80, 81, 90, 91, 92, 93,
                                                                          201, 202, 203))


def _check_codestream_end(path: Path, ds: Any) -> None:
    """A single-frame JPEG-family image whose compressed stream stops before its end marker is refused:
    the decoders fill the missing part of such a slice with a constant instead of failing."""
    syntax = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", ""))
    if syntax not in _CODESTREAMS_ENDING_FFD9 or "PixelData" not in ds or _n_frames(ds) > 1:
        return
    from pydicom.encaps import generate_fragments

    try:
        last = b""
        for fragment in generate_fragments(ds.PixelData):
            last = fragment or last
    except Exception as exc:  # noqa: BLE001 - malformed encapsulation: say so
        raise InputError(path, f"malformed compressed pixel data ({type(exc).__name__}: {exc})") from None
    if not last.rstrip(b"\x00").endswith(b"\xff\xd9"):
        raise InputError(path, "compressed pixel data ends before its end-of-image marker (a truncated or "
                               "damaged file)")


def _pixels_hu(path: Path, ds: Any | None = None) -> tuple[np.ndarray, Any]:
    """Decode one file's pixels (from ``ds`` when already parsed) and apply the modality LUT
    (-> HU for CT)."""
    pydicom = _pydicom()
    from pydicom.pixels import apply_modality_lut

    if ds is None:
        try:
            ds = pydicom.dcmread(str(path))
        except Exception as exc:
            raise InputError(path, f"unreadable DICOM file ({type(exc).__name__}: {exc})") from None
    if getattr(ds, "covidct_damaged", None):
        raise InputError(path, ds.covidct_damaged)
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        if "Rows" in ds:
            why = " although its header describes an image (a truncated file?)"
        else:
            sop = getattr(getattr(ds, "SOPClassUID", None), "name", None)
            why = f" nor image attributes (a truncated file, or not an image{': ' + sop if sop else ''})"
        raise InputError(path, f"DICOM file has no pixel data{why}")
    _check_codestream_end(path, ds)
    import warnings

    try:
        with warnings.catch_warnings():
            # pydicom warns (several lines on stderr) when the pixel data holds more frames than the header
            # declares; the shape check below names that in one line instead
            warnings.simplefilter("ignore", UserWarning)
            raw = ds.pixel_array
    except Exception as exc:
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(syntax, "name", syntax)
        raise InputError(path, f"cannot decode pixel data (transfer syntax {name}): {exc}") from None
    if raw.ndim != 2:
        samples = int(getattr(ds, "SamplesPerPixel", 1) or 1)
        if samples > 1:
            raise InputError(path, f"a colour image ({samples} samples per pixel, "
                                   f"{getattr(ds, 'PhotometricInterpretation', '?')}), not a CT slice")
        if _n_frames(ds) == 1:
            raise InputError(path, f"pixel data does not match its header: {ds.Rows} rows × {ds.Columns} columns "
                                   f"declared, the data holds {raw.shape[0]} such frames")
        raise InputError(path, f"expected a single-frame 2-D image, got pixel array of shape {raw.shape}")
    hu = np.asarray(apply_modality_lut(raw, ds), dtype=np.float32)
    return hu, ds


def _release_pixels(ds: Any) -> None:
    """Drop the pixel data a dataset loaded (its header stays usable); pydicom forgets the decoded
    array it cached with it."""
    for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
        if keyword in ds:
            del ds[keyword]


def _orientation(ds: Any) -> Any:
    """``ImageOrientationPatient`` of a single-frame image, or of a multi-frame one's functional groups
    (shared, else the first frame's); ``None`` when absent."""
    iop = getattr(ds, "ImageOrientationPatient", None)
    for groups in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        if iop is not None:
            break
        try:
            iop = getattr(ds, groups)[0].PlaneOrientationSequence[0].ImageOrientationPatient
        except (AttributeError, IndexError, KeyError):
            iop = None
    return iop


def _direction(ds: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    iop = _orientation(ds)
    if iop is None or len(iop) != 6:
        row, col = np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])
    else:
        row, col = np.array(iop[:3], dtype=float), np.array(iop[3:], dtype=float)
    return row, col, np.cross(row, col)


def _pixel_spacing(ds: Any, path: Path) -> tuple[float, float]:
    """(row, column) spacing in mm from ``PixelSpacing`` (else ``ImagerPixelSpacing``); without either
    there is nothing to measure millimetres or millilitres with, so the file is refused."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        ps = getattr(ds, keyword, None)
        if ps is not None and len(ps) == 2 and all(float(v) > 0 for v in ps):
            return float(ps[0]), float(ps[1])
    stated = getattr(ds, "PixelSpacing", None) or getattr(ds, "ImagerPixelSpacing", None)
    if stated is not None:   # a MultiValue of decimal strings, or one value
        from pydicom.multival import MultiValue

        shown = " × ".join(map(str, stated)) if isinstance(stated, MultiValue) else str(stated)
        raise InputError(path, f"pixel spacing {shown} is not two positive numbers, so areas and volumes "
                               "cannot be measured")
    raise InputError(path, "no PixelSpacing (nor ImagerPixelSpacing) in it, so areas and volumes cannot be measured")


def _slice_thickness(ds: Any) -> float | None:
    """The slice gap a header states without positions: ``SpacingBetweenSlices``, else ``SliceThickness``."""
    for keyword in ("SpacingBetweenSlices", "SliceThickness"):
        value = getattr(ds, keyword, None)
        try:
            if value is not None and float(value) > 0:
                return float(value)
        except (TypeError, ValueError):
            continue
    return None


def _metadata(ds: Any) -> dict[str, Any]:
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    return {
        "modality": str(getattr(ds, "Modality", "") or "") or None,
        "series_uid": str(getattr(ds, "SeriesInstanceUID", "") or "") or None,
        "series_description": str(getattr(ds, "SeriesDescription", "") or "") or None,
        "transfer_syntax": getattr(syntax, "name", None) if syntax else None,
        "manufacturer": str(getattr(ds, "Manufacturer", "") or "") or None,
        # the reconstruction kernel (e.g. Siemens "D40s" / "B70f", GE "STANDARD" / "LUNG"): sharp ones are noisy
        "convolution_kernel": _text(getattr(ds, "ConvolutionKernel", None)),
    }


def _text(value: Any) -> str | None:
    """A DICOM text value, a multi-valued one joined with backslashes as stored; None when absent or empty."""
    from pydicom.multival import MultiValue

    if value is None:
        return None
    if isinstance(value, (list, tuple, MultiValue)):
        value = "\\".join(str(v) for v in value)
    return str(value).strip() or None


def uneven_gaps(gaps: np.ndarray, tolerance: float = 0.1) -> dict[str, Any] | None:
    """``None`` when the distances between neighbouring slices agree with their median to within
    ``tolerance`` of it, else what a report says about them: median, smallest, largest, and the
    (0-based, head -> feet) slices after which a gap deviates (a missing file, two stacks in one series)."""
    median = float(np.median(gaps))
    off = np.flatnonzero(np.abs(gaps - median) > tolerance * median + 1e-3)
    if off.size == 0:
        return None
    return {"median_mm": round(median, 4), "min_mm": round(float(gaps.min()), 4), "max_mm": round(float(gaps.max()), 4),
            "after_slices": [int(k) for k in off[:20]]}


def _affine(first: Any, positions: list[np.ndarray], spacing_rc: tuple[float, float], *,
            step: float | None = None) -> np.ndarray:
    """RAS affine of ``(column, row, slice)`` indices from the first slice's orientation and the positions;
    ``step``: the slice axis takes this length (mm) along the first-to-last direction (uneven gaps: the
    median) instead of the mean gap."""
    row, col, normal = _direction(first)
    affine = np.eye(4)
    affine[:3, 0] = row * spacing_rc[1]  # i runs along a row (column index)
    affine[:3, 1] = col * spacing_rc[0]  # j runs down a column (row index)
    if len(positions) > 1:
        affine[:3, 2] = (positions[-1] - positions[0]) / (len(positions) - 1)
        if step is not None:
            affine[:3, 2] *= step / float(np.linalg.norm(affine[:3, 2]))
    else:
        affine[:3, 2] = normal * (_slice_thickness(first) or 1.0)
    affine[:3, 3] = positions[0]
    return _LPS_TO_RAS @ affine


def _n_frames(ds: Any) -> int:
    try:
        return int(getattr(ds, "NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        return 1


def head_to_feet(array: np.ndarray, lps_affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A ``(slices, rows, columns)`` stack with highdicom's affine (LPS, of slice / row / column indices)
    -> the same stack with slices head -> feet as :func:`read_dicom_series` orders them (descending
    position along ``row x column``), and covidct's affine (RAS, of column / row / slice indices)."""
    affine = np.eye(4)
    affine[:3, 0], affine[:3, 1], affine[:3, 2] = lps_affine[:3, 2], lps_affine[:3, 1], lps_affine[:3, 0]
    affine[:3, 3] = lps_affine[:3, 3]
    if float(np.dot(affine[:3, 2], np.cross(affine[:3, 0], affine[:3, 1]))) > 0:  # feet -> head: turn round
        array = array[::-1]
        affine[:3, 3] += affine[:3, 2] * (array.shape[0] - 1)
        affine[:3, 2] *= -1
    return array, _LPS_TO_RAS @ affine


def _frame_of_each_slice(ds: Any, affine: np.ndarray, n_slices: int) -> list[int] | None:
    """The (1-based) frame number of each slice of a stack read from the multi-frame ``ds`` with the RAS
    ``affine`` of its ``(column, row, slice)`` indices, from each frame's ``ImagePositionPatient``; ``None``
    unless frames and slices pair one to one."""
    try:
        positions = [np.array(item.PlanePositionSequence[0].ImagePositionPatient, dtype=float)
                     for item in ds.PerFrameFunctionalGroupsSequence]
    except (AttributeError, IndexError):
        return None
    inverse = np.linalg.inv(affine)
    ks = [int(round(float((inverse @ np.append(_LPS_TO_RAS[:3, :3] @ p, 1.0))[2]))) for p in positions]
    if sorted(ks) != list(range(n_slices)):
        return None
    frames = [0] * n_slices
    for number, k in enumerate(ks, start=1):
        frames[k] = number
    return frames


def read_dicom_multiframe(path: str | Path, *, require_ct: bool = True, header: Any | None = None) -> Volume:
    """Read a multi-frame DICOM image (e.g. Enhanced CT) that holds a regularly spaced stack of parallel
    slices as a ``(slices, rows, columns)`` HU volume, slices head -> feet, in the working orientation
    of :func:`read_dicom_series`. Frame geometry and rescale come from the functional groups
    (``highdicom.Image.get_volume``); frames that do not form one regular volume (several phases,
    uneven gaps, tiles) are an ``InputError``. The frames are converted a few slices at a time into one
    int16 volume (float32 only if the values need it), as a series is: no whole-volume float copy."""
    import highdicom

    path = Path(path)
    header = header if header is not None else read_header(path)
    _check_ct(header, path, require_ct)
    try:   # frames read from the file as they are needed: the pixel data are not held in memory as well
        image = highdicom.imread(str(path), lazy_frame_retrieval=True)
    except Exception:
        try:
            image = highdicom.imread(str(path))
        except Exception as exc:
            raise InputError(path, f"unreadable multi-frame DICOM ({type(exc).__name__}: {exc})") from None
    n_frames = _n_frames(header)
    meta = _metadata(header)
    try:
        geometry = image.get_volume_geometry()
        if geometry is None:
            raise ValueError("their positions are not one regular stack of parallel slices")
        array = _multiframe_stack(image, geometry.spatial_shape, as_hu=meta["modality"] in (None, "CT"))
    except InputError:
        raise
    except Exception as exc:
        raise InputError(path, f"the {n_frames} frames do not form one regular volume: {exc}") from None
    array, affine = head_to_feet(array, np.asarray(geometry.affine, dtype=float))
    spacing_rc = tuple(float(v) for v in geometry.pixel_spacing)
    meta["frames"] = n_frames
    frames = _frame_of_each_slice(image, affine, array.shape[0])
    if frames is not None:  # to write results back onto the source frames (DICOM SEG)
        meta["source_frames"] = frames
    return _working_volume(np.ascontiguousarray(array), affine, (float(geometry.spacing_between_slices), *spacing_rc),
                           [str(path)] * array.shape[0], meta, kind="dicom", source=path)


_MULTIFRAME_CHUNK = 16   # slices converted at a time


def _multiframe_stack(image: Any, shape: tuple[int, ...], *, as_hu: bool) -> np.ndarray:
    """The frames of ``image`` (a ``highdicom.Image``) as one ``shape`` stack in highdicom's slice order:
    int16 when ``as_hu`` and every value fits, else float32 (switched, with the slices so far copied, at the
    first chunk that does not fit)."""
    if len(shape) != 3:
        raise ValueError(f"expected single-channel frames, got a volume of shape {tuple(shape)}")
    out = np.empty(tuple(shape), np.int16 if as_hu else np.float32)
    for start in range(0, shape[0], _MULTIFRAME_CHUNK):
        end = min(start + _MULTIFRAME_CHUNK, shape[0])
        chunk = np.asarray(image.get_volume(slice_start=start, slice_end=end, as_indices=True, dtype=np.float32).array)
        if chunk.shape != (end - start, *shape[1:]):
            raise ValueError(f"expected single-channel frames, got slices of shape {chunk.shape[1:]}")
        out = store_slices(out, slice(start, end), chunk)
    return out


def read_dicom_file(path: str | Path, *, require_ct: bool = True) -> Volume:
    """Read one DICOM file: a single-frame image as a one-slice volume in HU, a multi-frame one
    through :func:`read_dicom_multiframe`."""
    path = Path(path)
    header = read_header(path)
    if getattr(header, "covidct_damaged", None):
        raise InputError(path, header.covidct_damaged)
    if _n_frames(header) > 1:
        return read_dicom_multiframe(path, require_ct=require_ct, header=header)
    _check_ct(header, path, require_ct)
    hu, ds = _pixels_hu(path)
    spacing_rc = _pixel_spacing(ds, path)
    thickness = _slice_thickness(ds) or 1.0   # one slice: only its own volume in mL depends on it
    pos = np.array(getattr(ds, "ImagePositionPatient", [0.0, 0.0, 0.0]), dtype=float)
    meta = _metadata(ds)
    array, is_hu = _volume_values(hu[None], path, meta)
    return Volume(
        array=array,
        kind="dicom",
        source=path,
        is_hu=is_hu,
        spacing=(thickness, *spacing_rc),
        affine=_affine(ds, [pos], spacing_rc),
        files=[str(path)],
        metadata=meta,
    )


def scan_series(folder: str | Path) -> tuple[dict[str, list[tuple[Path, Any]]], int]:
    """Group the DICOM files below ``folder`` by SeriesInstanceUID.

    Returns ``({series_uid: [(path, header), ...]}, n_skipped)``; files that are not DICOM are
    skipped and counted.
    """
    folder = Path(folder)
    series: dict[str, list[tuple[Path, Any]]] = defaultdict(list)
    skipped = 0
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            ds = read_header(path)
        except InputError:
            skipped += 1
            continue
        if "ImagePositionPatient" not in ds and "InstanceNumber" not in ds and "Rows" not in ds:
            skipped += 1  # DICOMDIR, structured reports, ...
            continue
        series[str(getattr(ds, "SeriesInstanceUID", "") or "unknown")].append((path, ds))
    return dict(series), skipped


def _is_localizer(ds: Any) -> bool:
    """``ImageType`` says LOCALIZER (a scout / topogram image)."""
    return "LOCALIZER" in [str(v).upper() for v in (getattr(ds, "ImageType", None) or [])]


def image_plane(ds: Any) -> str:
    """``axial``, ``coronal`` or ``sagittal``: the patient axis the slice normal is closest to
    (``oblique`` when none is within 45 degrees; ``unknown`` without ``ImageOrientationPatient``)."""
    if _orientation(ds) is None:
        return "unknown"
    return _plane(_direction(ds)[2])


def _plane(normal: np.ndarray) -> str:
    normal = np.abs(normal) / max(float(np.linalg.norm(normal)), 1e-12)
    if normal.max() < np.sqrt(0.5):
        return "oblique"
    return ("sagittal", "coronal", "axial")[int(np.argmax(normal))]


def _series_list(groups: dict[str, list[tuple[Path, Any]]]) -> list[dict[str, Any]]:
    """``[{"series_uid", "n_files", "n_images", "description", "plane", "modality"}, ...]``: CT series first
    (a study export also holds segmentations, structure sets, reports, other modalities: a DICOM SEG of the
    lungs has more frames than the CT has slices), then axial ones (the plane covidct's models read; a coronal
    reformat often has more files than the axial series it was made from), then by number of images (frames
    of multi-frame files counted)."""
    rows = [{"series_uid": uid, "n_files": len(items), "n_images": sum(_n_frames(ds) for _, ds in items),
             "description": str(getattr(items[0][1], "SeriesDescription", "") or ""),
             "plane": image_plane(items[0][1]),
             "modality": str(getattr(items[0][1], "Modality", "") or "") or None,
             "kernel": _text(getattr(items[0][1], "ConvolutionKernel", None))} for uid, items in groups.items()]
    return sorted(rows, key=lambda r: (r["modality"] not in ("CT", None), r["plane"] not in ("axial", "unknown"),
                                       -r["n_images"]))


#: Middle slices of each twin series decoded to compare their noise (:func:`_least_noisy_twin`).
TWIN_SLICES = 3


def _least_noisy_twin(groups: dict[str, list[tuple[Path, Any]]],
                      available: list[dict[str, Any]]) -> tuple[str, dict[str, Any] | None]:
    """The series ``largest_series`` takes: the first of ``available``, unless other series of the same modality
    and plane have as many images (single-frame files): one scan reconstructed with several kernels, say a
    soft-tissue and a lung kernel. Then the one with the lowest noise index (:func:`covidct.io.noise.soft_tissue_sd`
    on :data:`TWIN_SLICES` middle slices of each): the smoother reconstruction, the input the models were checked
    on. Returns its UID and what was compared (None without twins)."""
    from covidct.io.noise import soft_tissue_sd

    top = available[0]
    twins = [r for r in available if (r["n_images"], r["plane"], r["modality"]) ==
             (top["n_images"], top["plane"], top["modality"]) and r["n_files"] == r["n_images"]]
    if len(twins) < 2 or top["modality"] not in ("CT", None):
        return top["series_uid"], None
    index: dict[str, float | None] = {}
    for row in twins:
        items = sorted((it for it in groups[row["series_uid"]] if not _is_localizer(it[1])),
                       key=lambda it: float(getattr(it[1], "InstanceNumber", 0) or 0))
        middle = items[max(0, len(items) // 2 - TWIN_SLICES // 2):][:TWIN_SLICES]
        # each file read afresh: the headers in ``groups`` keep their pixel data for the series' own reading; a
        # twin whose slices cannot be decoded is not measured (and not taken unless no twin is)
        try:
            index[row["series_uid"]] = soft_tissue_sd([_pixels_hu(path)[0] for path, _ in middle])
        except InputError:
            index[row["series_uid"]] = None
    measured = {uid: v for uid, v in index.items() if v is not None}
    chosen = min(measured, key=measured.get) if measured else top["series_uid"]
    return chosen, {"rule": f"{len(twins)} series have {top['n_images']} images (one scan, several "
                            f"reconstructions?): the one with the lowest soft-tissue noise index was taken",
                    "noise_index_hu": index}


def list_series(folder: str | Path) -> list[dict[str, Any]]:
    """The DICOM series below ``folder`` (headers only), in :func:`_series_list`'s order, each with
    ``folder``: the narrowest folder that holds all its files and no file of another series (reading the
    series from there scans only its own headers), else ``folder`` itself."""
    groups, _ = scan_series(folder)
    if not groups:
        raise InputError(folder, "no DICOM files found")
    out = _series_list(groups)
    for row in out:
        own = [p for p, _ in groups[row["series_uid"]]]
        home = Path(os.path.commonpath(own))
        home = home.parent if home.is_file() else home
        others = (p for uid, items in groups.items() if uid != row["series_uid"] for p, _ in items)
        row["folder"] = Path(folder) if any(home in p.parents for p in others) else home
    return out


def _sort_key_factory(normal: np.ndarray):
    """Head -> feet: descending position along the slice normal, InstanceNumber breaking ties (every slice
    has an ImagePositionPatient here; a series without them is ordered by InstanceNumber alone)."""
    def key(item: tuple[Path, Any]) -> tuple[float, float]:
        _, ds = item
        position = float(np.dot(np.array(ds.ImagePositionPatient, dtype=float), normal))
        instance = float(getattr(ds, "InstanceNumber", 0) or 0)
        return (-position, instance)

    return key


def read_dicom_series(
    folder: str | Path, *, series_uid: str | None = None, require_ct: bool = True, largest_series: bool = False,
    progress: bool = False,
) -> Volume:
    """Read a folder holding one DICOM series into a ``(slices, rows, columns)`` HU volume.

    A folder with several series needs ``series_uid``, or ``largest_series=True`` to take the axial one
    with the most images (``metadata["series_available"]`` then lists them all); mixed sizes or
    orientations inside one series are rejected. ``progress``: a bar over the slices as they are decoded.
    """
    folder = Path(folder)
    groups, skipped = scan_series(folder)
    if not groups:
        raise InputError(folder, "no DICOM files found")
    available = _series_list(groups)
    twin_choice = None
    if series_uid is None and largest_series:
        series_uid, twin_choice = _least_noisy_twin(groups, available)
    if series_uid is None:
        if len(groups) > 1:
            sizes = ", ".join(f"{r['series_uid']} ({r['n_files']} files, {r['plane']})" for r in available)
            raise InputError(folder, f"folder holds {len(groups)} DICOM series, pass one: {sizes}")
        series_uid = next(iter(groups))
    if series_uid not in groups:
        raise InputError(folder, f"no series with SeriesInstanceUID {series_uid}")
    items = groups[series_uid]
    first = items[0][1]
    if len(items) == 1 and _n_frames(first) > 1:  # the whole series in one multi-frame file
        volume = read_dicom_multiframe(items[0][0], require_ct=require_ct, header=first)
        volume.source, volume.n_skipped = folder, skipped
        if len(groups) > 1:
            volume.metadata["series_available"] = available
        return volume
    if any(_n_frames(ds) > 1 for _, ds in items):
        raise InputError(folder, f"series {series_uid} holds {len(items)} multi-frame files; read one file at a time")
    # scout / localizer images that a scanner filed under the CT series are not slices of the volume
    slices = [item for item in items if not _is_localizer(item[1])]
    n_localizers = len(items) - len(slices) if slices else 0
    if n_localizers:
        items, skipped, first = slices, skipped + n_localizers, slices[0][1]
    _check_ct(first, items[0][0], require_ct)
    _, _, normal = _direction(first)
    shapes = {(int(getattr(ds, "Rows", 0)), int(getattr(ds, "Columns", 0))) for _, ds in items}
    if len(shapes) > 1:
        raise InputError(folder, f"mixed series: slices of different sizes {sorted(shapes)}")
    orientations = {tuple(round(float(v), 4) for v in getattr(ds, "ImageOrientationPatient", []) or []) for _, ds in items}
    if len(orientations) > 1:
        raise InputError(folder, "mixed series: slices with different ImageOrientationPatient")
    first_path = items[0][0]
    spacing_rc = _pixel_spacing(first, first_path)
    missing = sum("ImagePositionPatient" not in ds for _, ds in items)
    items = sorted(items, key=(lambda item: float(getattr(item[1], "InstanceNumber", 0) or 0)) if missing
                   else _sort_key_factory(normal))
    if missing and len(items) > 1:
        # no positions: InstanceNumber gives the order, the header's slice gap the distance
        gap = _slice_thickness(first)
        if gap is None:
            raise InputError(folder, f"{missing} of {len(items)} slices have no ImagePositionPatient and no "
                                     "SpacingBetweenSlices / SliceThickness is given, so the slice gap is unknown")
        positions = [-normal * gap * i for i in range(len(items))]   # head -> feet, as the sort key orders
        slice_positions_note = (f"{missing} of {len(items)} slices without ImagePositionPatient: ordered by "
                                f"InstanceNumber, {gap:g} mm apart (from the header's slice gap)")
    else:
        positions = [np.array(getattr(ds, "ImagePositionPatient", [0, 0, 0]), dtype=float) for _, ds in items]
        slice_positions_note = None
    gaps = np.abs(np.diff([float(np.dot(p, normal)) for p in positions]))
    if len(positions) > 1:
        if np.any(gaps < 1e-3):
            raise InputError(folder, "mixed series: two slices share one position (duplicate or multi-phase series)")
    # decoding (JPEG Lossless etc.) runs in C outside the GIL: threads use the machine's cores
    # (P001, 148 JPEG-Lossless slices on 2 cores: 3.1 s -> 2.2 s); the first bad file in series order raises
    # each slice goes straight into one preallocated volume, and its dataset lets go of the pixel data it
    # loaded (compressed bytes and the decoded array): one copy of the volume in memory. CT is held as int16
    # (HU as stored: whole numbers); the first slice that int16 cannot hold exactly (a fractional rescale,
    # values out of range, NaN) turns the volume into float32, the slices decoded so far copied over.
    rows, cols = shapes.pop()
    meta = _metadata(first)
    is_hu = meta["modality"] in (None, "CT")
    holder = [np.empty((len(items), rows, cols), np.int16 if is_hu else np.float32)]
    lock = threading.Lock()

    def decode(i: int) -> None:
        path, ds = items[i]
        hu = _pixels_hu(path, ds)[0]
        _release_pixels(ds)
        with lock:   # a copy of one slice; the switch to float32 must not race a write
            holder[0] = store_slices(holder[0], i, hu)

    bar = tqdm(total=len(items), desc="reading", unit="slice", disable=not progress)
    try:
        with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
            try:
                for _ in pool.map(decode, range(len(items))):
                    bar.update()
            except BaseException:
                pool.shutdown(wait=False, cancel_futures=True)   # no more slices after a bad one (or a stop)
                raise
    except BaseException:
        bar.leave = False   # a bad slice or a stop: the bar clears itself and the error line stands alone
        raise
    finally:
        bar.close()
    volume = holder.pop()
    if slice_positions_note:
        meta["slice_positions"] = slice_positions_note
    if n_localizers:
        meta["localizers_skipped"] = n_localizers
    if len(positions) > 1:
        slice_spacing = float(np.median(gaps))
        uneven = uneven_gaps(gaps)
        if uneven:
            meta["uneven_slice_gaps"] = uneven
    else:
        slice_spacing = _slice_thickness(first) or 1.0
    if len(groups) > 1:
        meta["series_available"] = available
    if twin_choice:
        meta["series_choice"] = twin_choice
    affine = _affine(first, positions, spacing_rc, step=slice_spacing if "uneven_slice_gaps" in meta else None)
    return _working_volume(volume, affine, (slice_spacing, *spacing_rc), [str(p) for p, _ in items], meta,
                           kind="dicom-series", source=folder, n_skipped=skipped)


def _note_non_finite(array: np.ndarray, source: Path, meta: dict[str, Any]) -> None:
    """NaN / infinite voxels (float pixel data) read as the lowest finite value, counted in ``meta``."""
    count = fill_non_finite(array, source)
    if count:
        meta["non_finite_voxels"] = count


def _working_volume(array: np.ndarray, affine: np.ndarray, spacing: tuple[float, float, float], files: list[str],
                    meta: dict[str, Any], *, kind: str, source: Path, n_skipped: int = 0) -> Volume:
    """The :class:`Volume` of a stack read as stored (slices head -> feet), in the working orientation."""
    array, affine, spacing, files = _to_working_orientation(array, affine, spacing, files, meta)
    array, is_hu = _volume_values(array, source, meta)
    return Volume(array=array, kind=kind, source=source, is_hu=is_hu,
                  spacing=spacing, affine=affine, files=files, n_skipped=n_skipped, metadata=meta)


def _volume_values(array: np.ndarray, source: Path, meta: dict[str, Any]) -> tuple[np.ndarray, bool]:
    """The values of every DICOM volume (one file, a series, a multi-frame file) as a :class:`Volume` holds
    them, and whether they are HU: non-finite voxels filled; CT shifted into HU if its intercept was lost
    (stored numbers, air at 0: :func:`~covidct.io.volume.shift_stored_ct`) and stored compactly."""
    _note_non_finite(array, source, meta)
    is_hu = meta["modality"] in (None, "CT")
    return (compact_hu(shift_stored_ct(array, meta)) if is_hu else array), is_hu


def _to_working_orientation(array: np.ndarray, affine: np.ndarray, spacing: tuple[float, float, float],
                            files: list[str], meta: dict[str, Any]):
    """A series in any plane and direction is brought to the working orientation
    (:mod:`covidct.io.orientation`) as NIfTI volumes are: an axial series whose rows or columns run otherwise
    (a prone scan) is flipped / transposed in-plane; a coronal or sagittal series is resliced into axial
    slices by permuting its axes (no interpolation: its in-plane grid becomes the axial slices' rows or
    columns and the slice gap). Returns ``(array, affine, spacing (slice, row, column), files)``; a
    resliced series lists its files in stored order."""
    import nibabel as nib

    from covidct.io.orientation import is_identity, ornt_to_working, reorient_kji

    meta["orientation"] = "".join(nib.aff2axcodes(affine))
    ornt = ornt_to_working(affine)
    if is_identity(ornt):
        return array, affine, spacing, files
    # the grid as stored, to write results back onto the source images (DICOM SEG)
    meta["source_affine"], meta["source_files"] = affine.tolist(), list(files)
    array, affine = reorient_kji(array, affine, ornt)
    # voxel axis a of the source (i, j, k) becomes axis ornt[a, 0]; spacing is (k, j, i)
    by_new_axis = {int(ornt[a, 0]): spacing[2 - a] for a in range(3)}
    spacing = (by_new_axis[2], by_new_axis[1], by_new_axis[0])
    if int(ornt[2, 0]) == 2:
        files = files[::-1] if ornt[2, 1] < 0 else files
    else:
        meta["resliced_from"] = _plane(np.asarray(meta["source_affine"])[:3, 2])
    return array, affine, spacing, files
