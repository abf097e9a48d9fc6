"""DICOM Segmentation (SEG) objects of covidct's label maps on a DICOM series, written with highdicom:
a PACS or viewer (OHIF, 3D Slicer, ...) shows them over the original images. One SEG per label map
(lesions; lungs), so that no two segments of one object overlap: binary segments coded with SNOMED CT,
each holding only the frames where it is present. The label map goes to highdicom as it is (one byte a
voxel): P001's two SEGs add about 0.1 GB to the run's memory, where one SEG of four overlapping
segments (lesions and lung together) needed a 4-D stack and highdicom's overlap check, 0.6 GB."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from covidct import __version__
from covidct.errors import InputError
from covidct.io.atomic import atomic_output
from covidct.io.orientation import from_working
from covidct.io.volume import Volume

#: ``(label value, name, SNOMED CT code, meaning)`` of the lesion segments (``lesions.nii.gz`` values).
LESION_SEGMENTS: tuple[tuple[int, str, str, str], ...] = (
    (1, "GGO", "1217294009", "Ground glass opacity"),
    (2, "Consolidation", "95436008", "Lung consolidation"),
    (3, "Pleural effusion", "60046008", "Pleural effusion"),
)
#: The same for the lungs (``lungs.nii.gz`` values: 1 right, 2 left).
LUNG_SEGMENTS: tuple[tuple[int, str, str, str], ...] = (
    (1, "Right lung", "3341006", "Right lung structure"),
    (2, "Left lung", "44029006", "Left lung structure"),
)
#: Patient and study attributes the SEG copies from its source images (empty when an anonymised series lacks them).
_COPIED_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                 "ReferringPhysicianName", "StudyID", "AccessionNumber")


def _source_layout(labels: np.ndarray, vol: Volume) -> tuple[np.ndarray, list[str]]:
    """``labels`` (working grid) on the series' grid as stored, and the file of each of its slices."""
    source = vol.metadata.get("source_affine")
    if source is None:
        return labels, list(vol.files)
    return from_working(labels, np.asarray(source, dtype=float)), list(vol.metadata["source_files"])


def can_write_dicom_seg(vol: Volume) -> bool:
    """``vol`` was read from DICOM images a SEG can reference: a series, or a multi-frame file whose frames
    pair one to one with its slices."""
    return vol.kind == "dicom-series" or (vol.kind == "dicom" and "source_frames" in vol.metadata)


def write_dicom_seg(labels: np.ndarray, vol: Volume, path: str | Path, *,
                    segments: Sequence[tuple[int, str, str, str]] = LESION_SEGMENTS, organ: bool = False,
                    description: str = "covidct lesions (research software, not for diagnosis)",
                    series_uid: str | None = None, instance_number: int = 1) -> Path | None:
    """Write a DICOM SEG of the label map ``labels`` (working grid; the ``segments`` name its values) for
    the DICOM images ``vol`` was read from, atomically; ``None`` (nothing written) when no segment has a
    voxel. ``organ``: the segments are anatomy (SNOMED CT category "Organ"), else morphologically abnormal
    structures. SEGs given the same ``series_uid`` form one SEG series (a PACS shows them together)."""
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    if not can_write_dicom_seg(vol):
        raise InputError(vol.source, "a DICOM SEG needs a DICOM series or a multi-frame DICOM volume as input")
    category = codes.SCT.Organ if organ else codes.SCT.MorphologicallyAbnormalStructure
    present = np.bincount(np.asarray(labels, dtype=np.uint8).ravel(), minlength=256) > 0
    written = [seg for seg in segments if present[seg[0]]]
    if not written:
        return None
    # SEG segment numbers run 1..n over the segments written: label values mapped onto them, any other value to 0
    lut = np.zeros(256, dtype=np.uint8)
    for number, (value, *_) in enumerate(written, start=1):
        lut[value] = number
    source_labels, files = _source_layout(labels, vol)
    pixels = lut[source_labels]
    frames = vol.metadata.get("source_frames") if vol.kind == "dicom" else None
    if frames is not None:  # one multi-frame source: the SEG's frames in the source's frame order
        in_frame_order = np.empty_like(pixels)
        in_frame_order[np.asarray(frames) - 1] = pixels
        pixels, files = in_frame_order, files[:1]
    descriptions = [hd.seg.SegmentDescription(
        segment_number=number, segment_label=name, segmented_property_category=category,
        segmented_property_type=hd.sr.CodedConcept(value=code, scheme_designator="SCT", meaning=meaning),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name="covidct", version=__version__, family=codes.cid7162.ArtificialIntelligence))
        for number, (_, name, code, meaning) in enumerate(written, start=1)]
    try:
        sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    except Exception as exc:  # the series changed on disk since it was read
        raise InputError(vol.source, f"cannot re-read its DICOM headers ({type(exc).__name__}: {exc})") from None
    # one frame of reference for a series that names none, the same for every SEG written on it
    frame_of_reference = pydicom.uid.generate_uid(entropy_srcs=["covidct", str(sources[0].get("SeriesInstanceUID", ""))])
    for ds in sources:  # anonymised series lack patient / study attributes a SEG copies: empty (type 2) values
        for keyword in _COPIED_TYPE2:
            if keyword not in ds:
                setattr(ds, keyword, "")
        if "FrameOfReferenceUID" not in ds:   # required by the SEG; one shared by the whole series
            ds.FrameOfReferenceUID = frame_of_reference
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=pixels, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=series_uid or hd.UID(), series_number=9901,
        sop_instance_uid=hd.UID(), instance_number=instance_number, manufacturer="covidct",
        manufacturer_model_name="covidct", software_versions=__version__, device_serial_number="none",
        series_description=description[:64])
    with atomic_output(path) as tmp:
        seg.save_as(tmp)
    return Path(path)
