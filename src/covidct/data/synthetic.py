"""Synthetic CT: a chest-like HU phantom and a writer for DICOM series, used by the demo when no
real data are present and by the tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def phantom_hu(n_slices: int = 6, size: int = 64, seed: int = 0) -> np.ndarray:
    """A chest-like HU phantom: air outside, soft-tissue body, two air-filled lungs with a
    denser lesion in one of them."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    c = size / 2
    body = ((yy - c) / (0.42 * size)) ** 2 + ((xx - c) / (0.46 * size)) ** 2 < 1
    left = ((yy - c) / (0.28 * size)) ** 2 + ((xx - 0.32 * size) / (0.12 * size)) ** 2 < 1
    right = ((yy - c) / (0.28 * size)) ** 2 + ((xx - 0.68 * size) / (0.12 * size)) ** 2 < 1
    lesion = ((yy - c) / (0.08 * size)) ** 2 + ((xx - 0.68 * size) / (0.06 * size)) ** 2 < 1
    vol = np.full((n_slices, size, size), -1000.0)
    for k in range(n_slices):
        sl = np.where(body, 40.0, -1000.0)
        sl[left | right] = -850.0
        if k >= n_slices // 2:
            sl[lesion] = -300.0
        vol[k] = sl + rng.normal(0, 10, (size, size))
    return np.clip(vol, -1024, None).astype(np.float32)


def write_ct_series(folder: Path, hu: np.ndarray, *, spacing=(2.0, 0.7, 0.7), series_uid: str | None = None,
                    modality: str = "CT", shuffle_names: bool = True, compress: bool | str = False,
                    slope: float = 1.0, intercept: float = -1024.0, prone: bool = False,
                    coronal: bool = False, kernel: str | None = None) -> list[Path]:
    """Write ``hu`` (slices, rows, cols; slice 0 = head) as one DICOM file per slice; ``compress``: True
    for RLE Lossless, or a transfer syntax UID pydicom can encode (e.g. JPEG 2000 Lossless).
    ``prone``: stored as a prone scan shows it (``ImageOrientationPatient`` [-1, 0, 0, 0, -1, 0]: rows and
    columns reversed), the same voxels in the same places in millimetres. ``coronal``: the same voxels
    stored as coronal images (one per row of ``hu``, front to back; ``ImageOrientationPatient``
    [1, 0, 0, 0, 0, -1]). ``kernel``: a ``ConvolutionKernel`` to state."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, RLELossless, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    study_uid = generate_uid()
    paths = []
    images = np.transpose(hu, (1, 0, 2)) if coronal else hu   # coronal image j: rows = hu's slices, columns = i
    n = images.shape[0]
    order = np.random.default_rng(1).permutation(n) if shuffle_names else np.arange(n)
    for k in range(n):
        stored = np.round((images[k] - intercept) / slope).astype(np.uint16)
        if prone:
            stored = np.ascontiguousarray(stored[::-1, ::-1])
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.Modality = modality
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.PatientID = "PHANTOM"
        ds.InstanceNumber = k + 1
        if kernel is not None:
            ds.ConvolutionKernel = kernel
        if coronal:  # pixel (r, c) of image k lies at (-100 + c dx, -120 + k dy, -r dz) like hu[r, k, c]
            ds.ImagePositionPatient = [-100.0, -120.0 + float(k) * spacing[1], 0.0]
            ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
        elif prone:  # the first stored pixel is the supine image's last one
            rows, cols = hu.shape[1:]
            ds.ImagePositionPatient = [-100.0 + (cols - 1) * spacing[2], -120.0 + (rows - 1) * spacing[1],
                                       -float(k) * spacing[0]]
            ds.ImageOrientationPatient = [-1, 0, 0, 0, -1, 0]
        else:
            ds.ImagePositionPatient = [-100.0, -120.0, -float(k) * spacing[0]]
            ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [spacing[0], spacing[2]] if coronal else [spacing[1], spacing[2]]
        ds.SliceThickness = spacing[1] if coronal else spacing[0]
        ds.SliceLocation = -120.0 + float(k) * spacing[1] if coronal else -float(k) * spacing[0]
        ds.Rows, ds.Columns = images.shape[1:]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.RescaleSlope = slope
        ds.RescaleIntercept = intercept
        ds.PixelData = stored.tobytes()
        if compress:
            ds.compress(RLELossless if compress is True else compress, stored)
        path = folder / f"IM{order[k]:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths



def write_enhanced_ct(path: Path, hu: np.ndarray, *, feet_first: bool = False, **series_options) -> Path:
    """Write ``hu`` as one multi-frame DICOM file at ``path`` (Legacy Converted Enhanced CT, built by
    highdicom from the single-frame series :func:`write_ct_series` writes with ``series_options``; frame 1
    is the head-most slice, or with ``feet_first`` the lowest)."""
    import tempfile

    import highdicom
    import pydicom

    with tempfile.TemporaryDirectory() as tmp:
        frames = [pydicom.dcmread(p) for p in write_ct_series(Path(tmp), hu, **series_options)]
    # attributes the enhanced image requires that the single-frame phantom leaves out
    required = {"PatientName": "Phantom^CT", "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"], "PatientBirthDate": "", "PatientSex": "O", "StudyDate": "20200101",
                "StudyTime": "000000", "StudyID": "1", "AccessionNumber": "", "ReferringPhysicianName": "",
                "Manufacturer": "covidct", "SeriesNumber": 1, "AcquisitionNumber": 1, "ContentDate": "20200101",
                "ContentTime": "000000", "KVP": 120, "PatientPosition": "HFS",
                "FrameOfReferenceUID": highdicom.UID(), "PositionReferenceIndicator": ""}
    for ds in frames:
        for keyword, value in required.items():
            setattr(ds, keyword, value)
    image = highdicom.legacy.LegacyConvertedEnhancedCTImage(
        frames, series_instance_uid=highdicom.UID(), series_number=1, sop_instance_uid=highdicom.UID(),
        instance_number=1)
    if feet_first:  # the frames (pixels and their functional groups) in reverse order
        pixels = np.ascontiguousarray(image.pixel_array[::-1])
        image.PerFrameFunctionalGroupsSequence = list(image.PerFrameFunctionalGroupsSequence)[::-1]
        image.PixelData = pixels.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save_as(path)
    return path
