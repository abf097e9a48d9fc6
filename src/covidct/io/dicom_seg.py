"""DICOM Segmentation (SEG) objects of covidct's label maps on a DICOM series, written with highdicom:
a PACS or viewer (OHIF, 3D Slicer, ...) shows them over the original images. Binary segments, coded
with SNOMED CT; each segment holds only the frames where it is present."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from covidct import __version__
from covidct.errors import InputError
from covidct.io.atomic import atomic_output
from covidct.io.orientation import from_working
from covidct.io.volume import Volume

#: ``(label value, name, SNOMED CT code, meaning)`` of the lesion segments.
LESION_SEGMENTS: tuple[tuple[int, str, str, str], ...] = (
    (1, "GGO", "1217294009", "Ground glass opacity"),
    (2, "Consolidation", "95436008", "Lung consolidation"),
    (3, "Pleural effusion", "60046008", "Pleural effusion"),
)
LUNG_SEGMENT = ("Lung", "39607008", "Lung structure")
#: Patient and study attributes the SEG copies from its source images (empty when an anonymised series lacks them).
_COPIED_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                 "ReferringPhysicianName", "StudyID", "AccessionNumber")


def _source_layout(masks: list[np.ndarray], vol: Volume) -> tuple[np.ndarray, list[str]]:
    """``(slices, rows, columns, segments)``: the ``masks`` (working grid) on the series' grid as stored,
    and the file of each of its slices."""
    source = vol.metadata.get("source_affine")
    if source is None:
        return np.stack(masks, axis=-1).astype(np.uint8), list(vol.files)
    affine = np.asarray(source, dtype=float)
    return (np.stack([from_working(m, affine) for m in masks], axis=-1).astype(np.uint8),
            list(vol.metadata["source_files"]))


def can_write_dicom_seg(vol: Volume) -> bool:
    """``vol`` was read from DICOM images a SEG can reference: a series, or a multi-frame file whose frames
    pair one to one with its slices."""
    return vol.kind == "dicom-series" or (vol.kind == "dicom" and "source_frames" in vol.metadata)


def write_dicom_seg(labels: np.ndarray, vol: Volume, path: str | Path, *, lung: np.ndarray | None = None,
                    segments: Sequence[tuple[int, str, str, str]] = LESION_SEGMENTS,
                    description: str = "covidct lesions (research software, not for diagnosis)") -> Path | None:
    """Write a DICOM SEG of ``labels`` (and ``lung > 0`` as a last segment) for the DICOM series ``vol``
    was read from, atomically; ``None`` (nothing written) when no segment has a voxel."""
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    if not can_write_dicom_seg(vol):
        raise InputError(vol.source, "a DICOM SEG needs a DICOM series or a multi-frame DICOM volume as input")
    frames = vol.metadata.get("source_frames") if vol.kind == "dicom" else None
    masks, descriptions = [], []

    def add(mask: np.ndarray, name: str, code: str, meaning: str, category) -> None:
        if not mask.any():
            return
        masks.append(mask)
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=len(masks), segment_label=name, segmented_property_category=category,
            segmented_property_type=hd.sr.CodedConcept(value=code, scheme_designator="SCT", meaning=meaning),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=hd.AlgorithmIdentificationSequence(
                name="covidct", version=__version__, family=codes.cid7162.ArtificialIntelligence)))

    for value, name, code, meaning in segments:
        add(labels == value, name, code, meaning, codes.SCT.MorphologicallyAbnormalStructure)
    if lung is not None:
        add(lung > 0, *LUNG_SEGMENT, codes.SCT.Organ)
    if not masks:
        return None
    stacked, files = _source_layout(masks, vol)
    if frames is not None:  # one multi-frame source: the SEG's frames in the source's frame order
        in_frame_order = np.empty_like(stacked)
        in_frame_order[np.asarray(frames) - 1] = stacked
        stacked, files = in_frame_order, files[:1]
    try:
        sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    except Exception as exc:  # the series changed on disk since it was read
        raise InputError(vol.source, f"cannot re-read its DICOM headers ({type(exc).__name__}: {exc})") from None
    frame_of_reference = hd.UID()
    for ds in sources:  # anonymised series lack patient / study attributes a SEG copies: empty (type 2) values
        for keyword in _COPIED_TYPE2:
            if keyword not in ds:
                setattr(ds, keyword, "")
        if "FrameOfReferenceUID" not in ds:   # required by the SEG; one shared by the whole series
            ds.FrameOfReferenceUID = frame_of_reference
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=stacked, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=9901,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="covidct", manufacturer_model_name="covidct",
        software_versions=__version__, device_serial_number="none", series_description=description[:64])
    with atomic_output(path) as tmp:
        seg.save_as(tmp)
    return Path(path)
