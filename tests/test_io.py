"""Readers on generated data and on the real COVID-CT-MD files."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from PIL import Image

from conftest import need_data, phantom_hu, write_ct_series, write_nifti
from covidct.errors import InputError
from covidct.io import apply_window, get_window, read, read_dicom_series, to_model_input, write_nifti as write_on_grid


def test_dicom_series_sorted_head_to_feet_and_in_hu(tmp_path):
    hu = phantom_hu(5, 32)
    write_ct_series(tmp_path / "s", hu, slope=2.0, intercept=-2048.0)
    vol = read(tmp_path / "s")
    assert vol.kind == "dicom-series" and vol.is_hu
    assert vol.shape == (5, 32, 32)
    assert vol.spacing == pytest.approx((2.0, 0.7, 0.7))
    # file names were shuffled; slice order must follow position (head first), values in HU
    np.testing.assert_allclose(vol.array, hu, atol=1.01)
    # affine: k steps 2 mm towards the feet (RAS z decreases), i/j flip sign from LPS to RAS
    assert vol.affine[2, 2] == pytest.approx(-2.0)
    assert vol.affine[0, 0] == pytest.approx(-0.7)


def test_whole_number_hu_volumes_are_held_in_16_bits_with_the_same_values(tmp_path):
    """CT as scanners store it (integers, slope 1, an integer intercept) is held as int16, half the memory of
    float32, with the same values; a fractional slope, values beyond int16 and images keep float32."""
    import nibabel as nib

    from covidct.io.volume import compact_hu

    hu = np.round(phantom_hu(5, 32))
    write_ct_series(tmp_path / "int", hu, slope=1.0, intercept=-1024.0)
    write_ct_series(tmp_path / "frac", hu + 0.5, slope=0.5, intercept=-1024.0)
    dicom_int, dicom_frac = read(tmp_path / "int"), read(tmp_path / "frac")
    assert dicom_int.array.dtype == np.int16 and dicom_frac.array.dtype == np.float32
    np.testing.assert_allclose(dicom_frac.array, hu + 0.5, atol=0.5)   # half-HU steps kept
    assert not np.array_equal(dicom_frac.array, np.rint(dicom_frac.array))
    np.testing.assert_array_equal(dicom_int.array, hu.astype(np.int16))
    # DICOM slices are decoded straight into int16; one slice with a fractional intercept (or one beyond int16's
    # range) turns the volume into float32 with every slice decoded before it kept exactly
    import pydicom

    for name, intercept, stored_max in (("half", -1023.5, None), ("wide", 0.0, 40000)):
        paths = write_ct_series(tmp_path / name, hu, slope=1.0, intercept=-1024.0, shuffle_names=False)
        odd = pydicom.dcmread(paths[2])
        raw = odd.pixel_array.astype(np.uint16)
        if stored_max:
            raw[0, 0] = stored_max
            odd.PixelData = raw.tobytes()
        odd.RescaleIntercept = intercept
        odd.save_as(paths[2])
        mixed = read(tmp_path / name).array
        expected = hu.astype(np.float32).copy()
        expected[2] = raw.astype(np.float32) + intercept
        assert mixed.dtype == np.float32
        np.testing.assert_array_equal(mixed, expected)
    affine = np.diag([-0.7, -0.7, -2.0, 1.0])
    for name, data, dtype in (("f64", hu, np.float64), ("u16", hu + 1024, np.uint16), ("i16", hu, np.int16)):
        img = nib.Nifti1Image(data.transpose(2, 1, 0).astype(dtype), affine)
        if name == "u16":
            img.header.set_slope_inter(1.0, -1024.0)
        nib.save(img, tmp_path / f"{name}.nii.gz")
        vol = read(tmp_path / f"{name}.nii.gz")
        assert vol.array.dtype == np.int16
        np.testing.assert_array_equal(vol.array, hu.astype(np.int16))
    # an int16 NIfTI that is not HU (a windowed export) is an image: float32 like every image
    grey_nii = nib.Nifti1Image(np.full((8, 8, 2), 77, np.int16), affine)
    nib.save(grey_nii, tmp_path / "grey16.nii.gz")
    grey_vol = read(tmp_path / "grey16.nii.gz")
    assert not grey_vol.is_hu and grey_vol.array.dtype == np.float32 and float(grey_vol.array.max()) == 77.0
    # the helper alone: 40 slices (more than one chunk), a fraction in the last chunk or one value out of range
    whole = np.round(np.random.default_rng(0).normal(0, 500, (40, 8, 8))).astype(np.float32)
    packed = compact_hu(whole)
    assert packed.dtype == np.int16 and np.array_equal(packed, whole) and packed.nbytes == whole.nbytes // 2
    for spoil in (0.25, 40000.0):
        spoiled = whole.copy()
        spoiled[-1, -1, -1] = spoil
        assert compact_hu(spoiled) is spoiled
    grey = np.full((1, 32, 32), 77.0, np.float32)
    Image.fromarray(grey[0].astype(np.uint8)).save(tmp_path / "g.png")
    assert read(tmp_path / "g.png").array.dtype == np.float32   # not HU: as read


@pytest.mark.parametrize("syntax, name", [(True, "RLE"), ("1.2.840.10008.1.2.4.90", "JPEG 2000"), ("1.2.840.10008.1.2.4.80", "JPEG-LS")])
def test_dicom_compressed_series_decodes(tmp_path, syntax, name):
    hu = phantom_hu(3, 32)
    write_ct_series(tmp_path / "c", hu, compress=syntax)
    vol = read(tmp_path / "c")
    assert name in vol.metadata["transfer_syntax"]
    np.testing.assert_allclose(vol.array, hu, atol=1.01)


def test_single_dicom_file(tmp_path):
    paths = write_ct_series(tmp_path / "s", phantom_hu(2, 32))
    vol = read(paths[0])
    assert vol.kind == "dicom" and vol.shape == (1, 32, 32)
    assert vol.summary()["hu_min"] < -900


def test_series_with_non_dicom_files_counts_skipped(tmp_path):
    write_ct_series(tmp_path / "s", phantom_hu(3, 32))
    (tmp_path / "s" / "notes.txt").write_text("hello")
    vol = read(tmp_path / "s")
    assert vol.n_skipped == 1 and vol.n_files == 3


def _strip(paths, *keywords):
    import pydicom

    for path in paths:
        ds = pydicom.dcmread(path)
        for keyword in keywords:
            if keyword in ds:
                delattr(ds, keyword)
        ds.save_as(path)


def test_series_without_positions_or_spacing(tmp_path):
    """No ImagePositionPatient: ordered by InstanceNumber and spaced by the header's slice gap (and said so);
    no slice gap either, or no PixelSpacing: one error naming the file, not a silent 1 mm."""
    hu = phantom_hu(5, 32)
    _strip(write_ct_series(tmp_path / "nopos", hu), "ImagePositionPatient")
    vol = read(tmp_path / "nopos")
    np.testing.assert_allclose(vol.array, hu, atol=1.01)
    assert vol.spacing == pytest.approx((2.0, 0.7, 0.7)) and vol.affine[2, 2] == pytest.approx(-2.0)
    assert "5 of 5 slices without ImagePositionPatient" in vol.metadata["slice_positions"]
    _strip(write_ct_series(tmp_path / "nogap", hu), "ImagePositionPatient", "SliceThickness", "SpacingBetweenSlices")
    with pytest.raises(InputError, match="the slice gap is unknown"):
        read(tmp_path / "nogap")
    paths = write_ct_series(tmp_path / "nopix", hu)
    _strip(paths, "PixelSpacing")
    with pytest.raises(InputError, match="no PixelSpacing"):
        read(tmp_path / "nopix")
    with pytest.raises(InputError, match="no PixelSpacing"):
        read(paths[0])


def test_mixed_series_rejected(tmp_path):
    write_ct_series(tmp_path / "m", phantom_hu(2, 32), series_uid="1.2.3")
    write_ct_series(tmp_path / "m" / "other", phantom_hu(2, 32), series_uid="1.2.4")
    with pytest.raises(InputError, match="2 DICOM series"):
        read(tmp_path / "m")
    assert read_dicom_series(tmp_path / "m", series_uid="1.2.4").shape == (2, 32, 32)
    write_ct_series(tmp_path / "sizes", phantom_hu(2, 32), series_uid="1.2.5")
    write_ct_series(tmp_path / "sizes" / "b", phantom_hu(2, 40), series_uid="1.2.5")
    with pytest.raises(InputError, match="different sizes"):
        read(tmp_path / "sizes")


def test_nifti_keeps_affine_and_layout(tmp_path):
    hu = phantom_hu(4, 24)
    affine = write_nifti(tmp_path / "v.nii.gz", hu)
    vol = read(tmp_path / "v.nii.gz")
    assert vol.kind == "nifti" and vol.is_hu and vol.shape == (4, 24, 24)
    np.testing.assert_allclose(vol.affine, affine)
    assert vol.spacing == pytest.approx((2.0, 0.8, 0.8))
    np.testing.assert_array_equal(vol.array, hu.astype(np.int16))
    # writing a mask back lands on the same grid
    out = write_on_grid((vol.array > -500).astype(np.uint8), vol, tmp_path / "mask.nii.gz")
    back = read(out)
    np.testing.assert_allclose(back.affine, affine)
    assert back.shape == vol.shape


@pytest.mark.parametrize("mode", ["L", "LA", "RGB", "RGBA", "I;16", "P"])
def test_image_modes_read_as_grey(tmp_path, mode):
    grey = np.tile(np.arange(0, 250, 10, dtype=np.uint8), (16, 1))
    if mode == "I;16":
        im = Image.fromarray(grey.astype(np.uint16) * 200)
    elif mode == "P":
        im = Image.fromarray(grey).convert("P")
    else:
        im = Image.fromarray(grey).convert(mode)
    path = tmp_path / f"x_{mode.replace(';', '')}.png"
    im.save(path)
    vol = read(path)
    assert vol.kind == "image" and vol.shape == (1, 16, 25) and not vol.is_hu
    row = vol.array[0, 0]
    assert np.all(np.diff(row) > 0), "grey ramp must stay increasing"
    scale = 200 if mode == "I;16" else 1
    assert row[-1] == pytest.approx(240 * scale, rel=0.02)


def test_image_opened_by_content_not_extension(tmp_path):
    Image.fromarray(np.full((20, 24), 77, np.uint8)).save(tmp_path / "fake.png", format="JPEG")
    assert read(tmp_path / "fake.png").array.mean() == pytest.approx(77, abs=2)


def test_windowing():
    assert get_window("lung").low == -1350 and get_window("lung").high == 150
    assert get_window("40,400").width == 400
    w = apply_window(np.array([-2000.0, -600.0, 500.0]), "lung")
    np.testing.assert_allclose(w, [0.0, 0.5, 1.0])
    # HU volumes reach the models through the window matched to the training slices:
    # healthy lung (-850 HU) and chest-wall muscle (+25 HU) land where the 8-bit slices have them
    np.testing.assert_allclose(to_model_input(np.array([-850.0, 25.0]), is_hu=True), [0.21, 0.81], atol=0.01)
    np.testing.assert_allclose(to_model_input(np.array([0.0, 255.0]), is_hu=False), [0.0, 1.0])
    # a grey image outside 0..255 is stretched between its percentiles and stays float32 (albumentations'
    # OpenCV arithmetic refuses a float64 image beside float32 noise)
    stretched = to_model_input(np.linspace(-10.0, 300.0, 1000, dtype=np.float32), is_hu=False)
    assert stretched.dtype == np.float32 and stretched.min() == 0.0 and stretched.max() == 1.0
    with pytest.raises(ValueError):
        get_window("soft")
    assert get_window("=-600,1500") == get_window("-600,1500") == get_window("lung")   # "--window =L,W" typed
    with pytest.raises(ValueError, match="width must be positive"):
        get_window("=-600,0")


@pytest.mark.realdata
def test_real_p001_jpeg_lossless_series():
    folder = need_data("covid-ct-md", "P001")
    vol = read(folder)
    assert vol.shape == (148, 512, 512)
    assert "JPEG Lossless" in vol.metadata["transfer_syntax"]
    corner = vol.array[:, :20, :20]
    assert -1100 < np.median(corner) < -900  # air
    assert vol.spacing == pytest.approx((2.0, 0.748047, 0.748047), abs=1e-5)
    # slice order = the dataset's label order (instance number 1..148, head -> feet)
    with open(need_data("covid-ct-md", "slice_labels.csv"), newline="") as fh:
        files = [r["file"].split("/")[-1] for r in csv.DictReader(fh) if r["patient_id"] == "P001"]
    assert [f.split("/")[-1] for f in vol.files] == files


@pytest.mark.realdata
def test_real_cap001_nifti_spacing():
    vol = read(need_data("covid-ct-md", "cap001.nii.gz"))
    assert vol.shape == (168, 256, 256)
    assert vol.spacing == pytest.approx((2.0, 1.17969, 1.17969), abs=1e-4)
    assert vol.is_hu and vol.array.min() <= -1000


def test_body_box_frames_the_body_and_leaves_the_table_out():
    from covidct.io import body_box, classifier_input

    hu = phantom_hu(1, 128)[0]                 # body ellipse (rows 11..117, cols 5..123) in air
    hu[122:125, 10:118] = 200.0                # the table: a thin dense strip below the body, an air gap between
    rows, cols = body_box(hu)
    assert rows.start <= 12 and 116 <= rows.stop < 122 and cols.start <= 6 and cols.stop >= 122
    crop = classifier_input(hu, is_hu=True)
    assert crop.shape == (rows.stop - rows.start, cols.stop - cols.start) and 0.0 <= crop.min() <= crop.max() <= 1.0
    # the same body at half the resolution in a field of view twice as wide: the same framing
    wide = np.full((256, 256), -1000.0, np.float32)
    wide[64:192, 64:192] = hu
    r2, c2 = body_box(wide[::2, ::2])
    assert abs((r2.stop - r2.start) / (c2.stop - c2.start) - (rows.stop - rows.start) / (cols.stop - cols.start)) < 0.05
    assert body_box(np.full((32, 32), -1000.0)) is None
    image = np.random.default_rng(0).integers(0, 255, (40, 50)).astype(np.uint8)
    assert classifier_input(image, is_hu=False).shape == (40, 50)   # images keep their own framing


def test_body_box_of_a_large_slice_matches_the_full_resolution_search():
    from scipy import ndimage

    from covidct.io import body_box

    big = ndimage.zoom(phantom_hu(1, 128)[0], 4, order=0)   # 512 x 512
    rows, cols = body_box(big)
    tissue = big > -500
    r = np.flatnonzero(tissue.any(axis=1))
    c = np.flatnonzero(tissue.any(axis=0))
    assert abs(rows.start - r[0]) <= 16 and abs(rows.stop - r[-1]) <= 16 and abs(cols.start - c[0]) <= 16
    assert rows.start <= r[0] and rows.stop > r[-1] and cols.start <= c[0] and cols.stop > c[-1]


def test_nifti_stored_feet_first_is_read_head_first_and_file_slices_map(tmp_path):
    import nibabel as nib

    from covidct.data.classification import ClsRecord, RecordImages
    from covidct.io.nifti import working_slice, working_slice_of_file

    hu = phantom_hu(4, 24)
    hu[0, 0, 0] = 500.0                      # mark the head slice
    affine = np.diag([-0.8, -0.8, 2.0, 1.0])  # k towards the head (L, P, S): slice k = 3 - head index
    nib.save(nib.Nifti1Image(hu[::-1].transpose(2, 1, 0).astype(np.int16), affine), tmp_path / "fs.nii.gz")
    vol = read(tmp_path / "fs.nii.gz")
    np.testing.assert_array_equal(vol.array, hu.astype(np.int16))   # head first, as the working orientation
    assert vol.affine[2, 2] == pytest.approx(-2.0) and vol.metadata["orientation"] == "LPS"
    assert [working_slice(vol, k) for k in range(4)] == [3, 2, 1, 0]
    assert working_slice_of_file(nib.load(tmp_path / "fs.nii.gz").affine, 4, 3) == 0
    # a label given for the file's slice k = 3 (the head) reaches the head slice
    from covidct.io import classifier_input

    head = classifier_input(hu.astype(np.int16)[0].astype(np.float32), is_hu=True)
    np.testing.assert_array_equal(RecordImages()(ClsRecord(tmp_path / "fs.nii.gz", "COVID", slice_index=3)), head)
    back = read(write_on_grid((vol.array > -500).astype(np.uint8), vol, tmp_path / "m.nii.gz"))
    assert nib.load(tmp_path / "m.nii.gz").affine[2, 2] == pytest.approx(2.0)
    np.testing.assert_array_equal(back.array, (hu > -500).astype(np.uint8))


def test_prone_series_is_read_in_the_working_orientation(tmp_path):
    """A prone scan stores every slice rotated by 180 degrees (ImageOrientationPatient -1,0,0,0,-1,0): read,
    it gives the same array and affine as the supine storage of the same voxels."""
    hu = phantom_hu(3, 40)
    hu[:, 5, 30] = 900.0                     # an asymmetric mark (anterior, patient's left)
    write_ct_series(tmp_path / "supine", hu)
    write_ct_series(tmp_path / "prone", hu, prone=True)
    import pydicom

    stored = [pydicom.dcmread(sorted((tmp_path / d).iterdir())[0]).pixel_array for d in ("supine", "prone")]
    np.testing.assert_array_equal(stored[1], stored[0][::-1, ::-1])   # stored rotated, as a prone scanner does
    supine, prone = read(tmp_path / "supine"), read(tmp_path / "prone")
    assert supine.metadata["orientation"] == "LPI" and prone.metadata["orientation"] == "RAI"
    np.testing.assert_array_equal(prone.array, supine.array)
    np.testing.assert_allclose(prone.affine, supine.affine, atol=1e-6)
    assert prone.spacing == supine.spacing


@pytest.mark.parametrize("stored", ["supine", "prone", "coronal"])
def test_dicom_seg_lands_on_the_source_images(tmp_path, stored):
    """A label map on the working grid, written as DICOM SEG and read back per source image, covers the
    same pixels of each stored slice as the structure it was drawn from (a prone series is stored flipped,
    a coronal one resliced)."""
    import highdicom as hd
    import pydicom

    from covidct.io.dicom_seg import LUNG_SEGMENTS, write_dicom_seg

    hu = phantom_hu(6, 48).astype(np.float32)
    hu[2:4, 5:12, 30:40] = 1000                                   # an off-centre dense block
    files = write_ct_series(tmp_path / "s", hu, spacing=(5.0, 3.0, 3.0), prone=stored == "prone",
                            coronal=stored == "coronal")
    vol = read(tmp_path / "s")
    assert ("source_affine" in vol.metadata) == (stored != "supine")  # only a reoriented series records its stored grid
    labels = (vol.array > 500).astype(np.uint8) * 2               # "consolidation" where the block is
    lungs = (vol.array < -500).astype(np.uint8)                   # "right lung", and "left" from column 24 on
    lungs[..., 24:] *= 2
    before = {f: f.read_bytes() for f in files}
    seg = hd.seg.segread(write_dicom_seg(labels, vol, tmp_path / "l.seg.dcm", series_uid="1.2.3.4"))
    assert [d.SegmentLabel for d in seg.SegmentSequence] == ["Consolidation"]   # empty segments left out
    assert seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeValue == "95436008"
    lung_seg = hd.seg.segread(write_dicom_seg(lungs, vol, tmp_path / "lungs.seg.dcm", segments=LUNG_SEGMENTS,
                                              organ=True, series_uid="1.2.3.4", instance_number=2))
    assert [d.SegmentLabel for d in lung_seg.SegmentSequence] == ["Right lung", "Left lung"]
    assert lung_seg.SegmentSequence[0].SegmentedPropertyCategoryCodeSequence[0].CodeMeaning == "Organ"
    assert seg.SeriesInstanceUID == lung_seg.SeriesInstanceUID == "1.2.3.4" and lung_seg.InstanceNumber == 2
    assert seg.FrameOfReferenceUID == lung_seg.FrameOfReferenceUID
    for f in files:
        ds = pydicom.dcmread(f)
        stored = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        got = seg.get_pixels_by_source_instance(source_sop_instance_uids=[ds.SOPInstanceUID], segment_numbers=[1],
                                                assert_missing_frames_are_empty=True)[0].astype(bool)
        assert (got[..., 0] == (stored > 500)).all()
        got = lung_seg.get_pixels_by_source_instance(source_sop_instance_uids=[ds.SOPInstanceUID],
                                                     segment_numbers=[1, 2], assert_missing_frames_are_empty=True)[0]
        assert ((got[..., 0] > 0) | (got[..., 1] > 0) == (stored < -500)).all()
        assert not ((got[..., 0] > 0) & (got[..., 1] > 0)).any()      # the sides do not overlap
    assert all(f.read_bytes() == b for f, b in before.items())    # the source files are untouched
    assert write_dicom_seg(np.zeros_like(labels), vol, tmp_path / "none.seg.dcm") is None
    assert not (tmp_path / "none.seg.dcm").exists()


@pytest.mark.parametrize("prone", [False, True])
def test_enhanced_multiframe_ct_reads_like_its_series(tmp_path, prone):
    """One multi-frame file (Legacy Converted Enhanced CT) holding a series: read as a file or as the folder
    that holds it, it gives the series' array, affine and spacing (the frames stored in reverse order)."""
    from covidct.data.synthetic import write_enhanced_ct

    hu = phantom_hu(5, 40)[:, :, :36]
    hu[:, 5, 30] = 900.0
    write_ct_series(tmp_path / "series", hu, spacing=(2.5, 0.7, 0.8), prone=prone)
    path = write_enhanced_ct(tmp_path / "enhanced" / "ct.dcm", hu, spacing=(2.5, 0.7, 0.8), prone=prone, feet_first=True)
    series = read(tmp_path / "series")
    for vol in (read(path), read(tmp_path / "enhanced")):
        assert vol.kind == "dicom" and vol.metadata["frames"] == 5 and vol.files == [str(path)] * 5
        np.testing.assert_array_equal(vol.array, series.array)
        np.testing.assert_allclose(vol.affine, series.affine, atol=1e-6)
        assert vol.spacing == pytest.approx(series.spacing)
        assert vol.metadata["orientation"] == series.metadata["orientation"]
        assert vol.array.dtype == np.int16   # whole HU held in 16 bits, as a series is


def test_multiframe_stack_is_int16_until_a_chunk_needs_float(monkeypatch):
    """Frames are converted a few slices at a time: int16 while every value fits, float32 from the first chunk
    that does not (the slices before it copied over exactly); non-CT frames stay float32."""
    from types import SimpleNamespace

    from covidct.io import dicom

    monkeypatch.setattr(dicom, "_MULTIFRAME_CHUNK", 2)

    class Frames:
        def __init__(self, stack):
            self.stack = stack

        def get_volume(self, *, slice_start, slice_end, as_indices, dtype):
            assert as_indices
            return SimpleNamespace(array=self.stack[slice_start:slice_end].astype(dtype))

    whole = np.arange(5 * 3 * 4, dtype=np.float32).reshape(5, 3, 4) - 1000
    out = dicom._multiframe_stack(Frames(whole), whole.shape, as_hu=True)
    assert out.dtype == np.int16 and np.array_equal(out, whole)
    halves = whole.copy()
    halves[3, 1, 2] = 0.5                               # in the second chunk: slices 0-1 were int16 already
    out = dicom._multiframe_stack(Frames(halves), halves.shape, as_hu=True)
    assert out.dtype == np.float32 and np.array_equal(out, halves)
    out = dicom._multiframe_stack(Frames(whole), whole.shape, as_hu=False)
    assert out.dtype == np.float32 and np.array_equal(out, whole)
    with pytest.raises(ValueError, match="single-channel"):
        dicom._multiframe_stack(Frames(whole), (5, 3, 4, 3), as_hu=True)


def test_head_to_feet_turns_a_feet_first_stack_round():
    from covidct.io.dicom import head_to_feet

    stack = np.arange(4 * 3 * 2, dtype=np.float32).reshape(4, 3, 2)
    lps = np.array([[0, 0, 0.8, -100], [0, 0.7, 0, -120], [-2.5, 0, 0, 0], [0, 0, 0, 1]], float)  # slices to the feet
    feet_first = lps.copy()
    feet_first[:3, 3] += lps[:3, 0] * 3
    feet_first[:3, 0] *= -1
    a, affine_a = head_to_feet(stack, lps)
    b, affine_b = head_to_feet(stack[::-1], feet_first)
    np.testing.assert_array_equal(a, stack)
    np.testing.assert_array_equal(b, stack)
    np.testing.assert_allclose(affine_a, affine_b)
    assert affine_a[2, 2] == pytest.approx(-2.5) and affine_a[0, 0] == pytest.approx(-0.8)


def test_multiframe_frames_that_are_no_volume_are_one_error_line(tmp_path, capsys):
    import pydicom

    from covidct.cli import main
    from covidct.data.synthetic import write_enhanced_ct

    path = write_enhanced_ct(tmp_path / "ct.dcm", phantom_hu(4, 32))
    ds = pydicom.dcmread(path)
    frames = ds.PerFrameFunctionalGroupsSequence
    frames[1].PlanePositionSequence[0].ImagePositionPatient = list(frames[2].PlanePositionSequence[0].ImagePositionPatient)
    ds.save_as(path)
    before = path.read_bytes()
    with pytest.raises(InputError, match="do not form one regular volume"):
        read(path)
    assert main(["info", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(path) in err and "regular volume" in err
    assert path.read_bytes() == before


def test_a_series_split_over_several_multiframe_files_is_one_error_line(tmp_path):
    import pydicom

    from covidct.data.synthetic import write_enhanced_ct

    first = write_enhanced_ct(tmp_path / "ct" / "a.dcm", phantom_hu(3, 32))
    second = write_enhanced_ct(tmp_path / "ct" / "b.dcm", phantom_hu(3, 32))
    ds = pydicom.dcmread(second)
    ds.SeriesInstanceUID = pydicom.dcmread(first, stop_before_pixels=True).SeriesInstanceUID
    ds.save_as(second)
    with pytest.raises(InputError, match="2 multi-frame files"):
        read(tmp_path / "ct")
    assert read(first).shape == (3, 32, 32)   # each file alone reads


def test_a_missing_slice_is_reported_and_the_grid_keeps_the_median_gap(tmp_path):
    import pydicom

    paths = write_ct_series(tmp_path / "s", phantom_hu(6, 32))
    regular = read(tmp_path / "s")
    assert "uneven_slice_gaps" not in regular.metadata
    gone = next(p for p in paths if int(pydicom.dcmread(p, stop_before_pixels=True).InstanceNumber) == 4)
    gone.unlink()                                            # slice 3 (0-based) lost in transfer
    vol = read(tmp_path / "s")
    assert vol.shape[0] == 5 and vol.spacing[0] == pytest.approx(2.0)
    assert vol.metadata["uneven_slice_gaps"] == {"median_mm": 2.0, "min_mm": 2.0, "max_mm": 4.0, "after_slices": [2]}
    np.testing.assert_allclose(vol.affine, regular.affine)   # steps of the median gap from the first slice


def test_a_coronal_series_is_resliced_to_the_axial_working_grid(tmp_path):
    """The same voxels stored as coronal images read to the axial series' array, affine and spacing; a study
    holding both takes the axial series by default even when the coronal one has more files."""
    hu = phantom_hu(5, 40)[:, :, :36]
    hu[:, 5, 30] = 900.0
    write_ct_series(tmp_path / "study" / "axial", hu, spacing=(2.5, 0.7, 0.8), series_uid="1.2.840.10")
    write_ct_series(tmp_path / "study" / "coronal", hu, spacing=(2.5, 0.7, 0.8), series_uid="1.2.840.20", coronal=True)
    axial, coronal = read(tmp_path / "study" / "axial"), read(tmp_path / "study" / "coronal")
    assert coronal.metadata["resliced_from"] == "coronal" and "resliced_from" not in axial.metadata
    np.testing.assert_array_equal(coronal.array, axial.array)
    np.testing.assert_allclose(coronal.affine, axial.affine, atol=1e-6)
    assert coronal.spacing == pytest.approx(axial.spacing) and coronal.n_files == 40
    with pytest.raises(InputError, match=r"holds 2 DICOM series, pass one: 1\.2\.840\.10 \(5 files, axial\), "
                       r"1\.2\.840\.20 \(40 files, coronal\)"):
        read(tmp_path / "study")
    chosen = read(tmp_path / "study", largest_series=True)      # 40 coronal files against 5 axial ones
    assert chosen.metadata["series_uid"] == "1.2.840.10"
    assert [(r["plane"], r["n_files"]) for r in chosen.metadata["series_available"]] == [("axial", 5), ("coronal", 40)]


def test_a_localizer_filed_under_the_series_is_skipped_and_counted(tmp_path):
    import pydicom

    hu = phantom_hu(4, 32)
    write_ct_series(tmp_path / "s", hu, series_uid="1.2.840.30")
    write_ct_series(tmp_path / "scout", phantom_hu(1, 48)[:, :, :40], series_uid="1.2.840.30", coronal=True)
    scout = next((tmp_path / "scout").iterdir())
    ds = pydicom.dcmread(scout)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.save_as(tmp_path / "s" / "scout.dcm")
    vol = read(tmp_path / "s")
    assert vol.shape == (4, 32, 32) and vol.n_skipped == 1 and vol.metadata["localizers_skipped"] == 1
    np.testing.assert_allclose(vol.array, hu, atol=1.01)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]          # not marked as a localizer: a mixed series, refused
    ds.save_as(tmp_path / "s" / "scout.dcm")
    with pytest.raises(InputError, match="mixed series"):
        read(tmp_path / "s")


@pytest.mark.parametrize("prone", [False, True])
def test_dicom_seg_lands_on_the_frames_of_a_multiframe_source(tmp_path, prone):
    """A DICOM SEG of a label map read from a multi-frame file (frames stored feet first) covers, frame by
    frame, the pixels of the structure it was drawn from."""
    import highdicom as hd
    import pydicom

    from covidct.data.synthetic import write_enhanced_ct
    from covidct.io.dicom_seg import write_dicom_seg

    hu = phantom_hu(6, 48).astype(np.float32)
    hu[1:3, 5:12, 30:40] = 1000                                  # an off-centre dense block in the upper slices
    path = write_enhanced_ct(tmp_path / "ct.dcm", hu, spacing=(5.0, 3.0, 3.0), prone=prone, feet_first=True)
    vol = read(path)
    assert vol.metadata["source_frames"] == [6, 5, 4, 3, 2, 1]   # slice 0 (head) is the last frame
    before = path.read_bytes()
    seg = hd.seg.segread(write_dicom_seg((vol.array > 500).astype(np.uint8) * 2, vol, tmp_path / "l.seg.dcm"))
    source = pydicom.dcmread(path)
    stored = source.pixel_array * float(source.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence[0]
                                        .RescaleSlope) + float(source.SharedFunctionalGroupsSequence[0]
                                                               .PixelValueTransformationSequence[0].RescaleIntercept)
    got = seg.get_pixels_by_source_frame(source_sop_instance_uid=source.SOPInstanceUID,
                                         source_frame_numbers=list(range(1, 7)), assert_missing_frames_are_empty=True)
    np.testing.assert_array_equal(got[..., 0].astype(bool), stored > 500)
    per_frame = got[..., 0].reshape(6, -1).sum(1)
    assert list(per_frame > 0) == [False, False, False, True, True, False]   # slices 1-2 are frames 5-4
    assert path.read_bytes() == before


def test_info_lists_the_series_of_a_study_and_describes_one(tmp_path, capsys):
    import json

    from covidct.cli import main

    hu = phantom_hu(4, 32)
    write_ct_series(tmp_path / "study" / "ax", hu, series_uid="1.2.840.40")
    write_ct_series(tmp_path / "study" / "cor", hu, series_uid="1.2.840.50", coronal=True)
    from covidct.data.synthetic import write_enhanced_ct

    write_enhanced_ct(tmp_path / "study" / "enh" / "ct.dcm", phantom_hu(6, 32))   # 6 frames in one file
    assert main(["info", str(tmp_path / "study"), "--json"]) == 0
    study = json.loads(capsys.readouterr().out)
    assert study["kind"] == "dicom-study"
    assert [(r["n_images"], r["n_files"], r["plane"]) for r in study["series"]] == [
        (6, 1, "axial"), (4, 4, "axial"), (32, 32, "coronal")]                 # axial first, then by images
    assert study["series"][1]["series_uid"] == "1.2.840.40"
    assert study["series"][2]["folder"] == str(tmp_path / "study" / "cor")
    assert main(["info", str(tmp_path / "study"), "--series", "1.2.840.50", "--json"]) == 0
    one = json.loads(capsys.readouterr().out)
    assert one["kind"] == "dicom-series" and one["shape"] == [4, 32, 32] and one["files_read"] == 32
    assert main(["info", str(tmp_path / "study" / "ax")]) == 0            # one series: described as before
    assert "dicom-series" in capsys.readouterr().out


def test_a_zip_archive_reads_like_what_it_holds(tmp_path, capsys):
    import zipfile

    from covidct.cli import main

    hu = phantom_hu(4, 32)
    write_ct_series(tmp_path / "export" / "DICOM" / "S1", hu)
    archive = tmp_path / "study.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in sorted((tmp_path / "export").rglob("*.dcm")):
            zf.write(f, f.relative_to(tmp_path / "export"))
    before = archive.read_bytes()
    vol = read(archive)
    assert vol.kind == "dicom-series" and vol.source == archive
    np.testing.assert_array_equal(vol.array, read(tmp_path / "export").array)
    assert archive.read_bytes() == before
    # one NIfTI inside: read as that file
    write_nifti(tmp_path / "v.nii.gz", hu)
    with zipfile.ZipFile(tmp_path / "one.zip", "w") as zf:
        zf.write(tmp_path / "v.nii.gz", "v.nii.gz")
    assert read(tmp_path / "one.zip").kind == "nifti"
    # not a zip, or an empty one: one error line naming the file
    (tmp_path / "bad.zip").write_bytes(b"PK\x03\x04 not really")
    zipfile.ZipFile(tmp_path / "empty.zip", "w").close()
    for name, reason in (("bad.zip", "not a readable zip archive"), ("empty.zip", "holds no files")):
        assert main(["info", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and name in err and reason in err


def test_a_zipped_study_is_listed_and_its_errors_name_the_archive(tmp_path, capsys):
    import json
    import zipfile

    from covidct.cli import main

    hu = phantom_hu(4, 32)
    write_ct_series(tmp_path / "x" / "A", hu, series_uid="1.2.840.60")
    write_ct_series(tmp_path / "x" / "B", hu, series_uid="1.2.840.70", coronal=True)
    archive = tmp_path / "study.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in sorted((tmp_path / "x").rglob("*.dcm")):
            zf.write(f, f.relative_to(tmp_path / "x"))
    assert main(["info", str(archive), "--json"]) == 0
    study = json.loads(capsys.readouterr().out)
    assert [(r["series_uid"], r["folder"]) for r in study["series"]] == [
        ("1.2.840.60", str(archive / "A")), ("1.2.840.70", str(archive / "B"))]
    assert read(archive, largest_series=True).metadata["series_uid"] == "1.2.840.60"
    with pytest.raises(InputError, match="holds 2 DICOM series") as raised:
        read(archive)
    assert raised.value.path == str(archive)
    with zipfile.ZipFile(tmp_path / "broken.zip", "w") as zf:            # one truncated DICOM file inside
        zf.writestr("CT/IM1.dcm", (tmp_path / "x" / "A").joinpath(sorted(p.name for p in (tmp_path / "x" / "A").iterdir())[0])
                    .read_bytes()[:400])
    with pytest.raises(InputError) as raised:
        read(tmp_path / "broken.zip")
    assert raised.value.path == str(tmp_path / "broken.zip") and raised.value.reason.startswith("CT/IM1.dcm: ")


def test_read_ahead_gives_the_volume_read_gives(tmp_path):
    from covidct.io.read_ahead import ReadAhead

    write_ct_series(tmp_path / "s", phantom_hu(4, 32))
    with ReadAhead(tmp_path / "s", largest_series=True) as pending:
        assert pending.in_background
        vol = pending.result()
    ref = read(tmp_path / "s", largest_series=True)
    np.testing.assert_array_equal(vol.array, ref.array)
    np.testing.assert_array_equal(vol.affine, ref.affine)
    assert (vol.kind, vol.spacing, vol.is_hu, vol.source) == (ref.kind, ref.spacing, ref.is_hu, ref.source)
    assert vol.metadata["transfer_syntax"] == ref.metadata["transfer_syntax"]


def test_read_ahead_input_errors_are_the_readers(tmp_path):
    from covidct.io.read_ahead import ReadAhead

    with pytest.raises(InputError, match="no such file"):   # at once, before any process starts
        ReadAhead(tmp_path / "missing.nii.gz")
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"\x1f\x8b" + b"not really gzip" * 10)
    with pytest.raises(InputError) as expected:
        read(bad)
    pending = ReadAhead(bad)
    assert pending.in_background
    with pytest.raises(InputError) as got:
        pending.result()
    assert (got.value.path, got.value.reason) == (expected.value.path, expected.value.reason)


def _wait_for_the_helper(pending, seconds: float = 60.0) -> None:
    import time

    deadline = time.monotonic() + seconds
    while not pending._conn.poll(0.1):
        assert time.monotonic() < deadline, "the read-ahead helper did not answer"


def test_read_ahead_raises_a_failed_read_before_it_is_asked_for(tmp_path):
    """raise_if_failed: the helper's input error at once, without waiting (analyze then loads no model); a read
    that went well is kept for result(), which gives the volume read() gives."""
    from covidct.io.read_ahead import ReadAhead

    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"\x1f\x8b" + b"not really gzip" * 10)
    pending = ReadAhead(bad)
    pending.raise_if_failed()                      # nothing yet or already failed: never blocks
    _wait_for_the_helper(pending)
    with pytest.raises(InputError, match="unreadable NIfTI"):
        pending.raise_if_failed()
    assert not pending.in_background
    write_nifti(tmp_path / "v.nii.gz", phantom_hu(3, 32))
    with ReadAhead(tmp_path / "v.nii.gz") as pending:
        _wait_for_the_helper(pending)
        pending.raise_if_failed()
        pending.raise_if_failed()                  # twice: the header stays kept
        np.testing.assert_array_equal(pending.result().array, read(tmp_path / "v.nii.gz").array)


def test_read_ahead_reads_here_when_its_helper_dies_or_for_a_zip(tmp_path):
    import zipfile

    from covidct.io.read_ahead import ReadAhead

    hu = phantom_hu(3, 32)
    write_nifti(tmp_path / "v.nii.gz", hu)
    pending = ReadAhead(tmp_path / "v.nii.gz")
    pending._process.kill()                       # the helper is gone before it could answer
    np.testing.assert_allclose(pending.result().array, hu, atol=1.01)
    assert not pending.in_background
    with zipfile.ZipFile(tmp_path / "v.zip", "w") as z:
        z.write(tmp_path / "v.nii.gz", "v.nii.gz")
    pending = ReadAhead(tmp_path / "v.zip")       # unpacked folders live as long as their process
    assert not pending.in_background
    np.testing.assert_allclose(pending.result().array, hu, atol=1.01)


def test_a_truncated_compressed_slice_is_refused_not_decoded_half(tmp_path, capfd):
    """JPEG-family decoders fill what is missing of a truncated codestream with a constant; the reader
    refuses the slice instead (its end-of-image marker is missing), and ``analyze`` says so in one line."""
    import pydicom
    from pydicom.encaps import encapsulate, generate_fragments

    from covidct.cli import main

    paths = write_ct_series(tmp_path / "s", phantom_hu(4, 32), compress="1.2.840.10008.1.2.4.80")
    assert read(tmp_path / "s").shape == (4, 32, 32)
    ds = pydicom.dcmread(paths[2])
    stream = b"".join(f for f in generate_fragments(ds.PixelData) if f)
    assert stream.rstrip(b"\x00").endswith(b"\xff\xd9")              # whole codestreams end with the marker
    ds.PixelData = encapsulate([stream[: len(stream) // 2]])
    ds.save_as(paths[2])
    before = paths[2].read_bytes()
    with pytest.raises(InputError, match="end-of-image marker") as info:
        read(tmp_path / "s")
    assert info.value.path == str(paths[2])
    capfd.readouterr()
    assert main(["analyze", str(tmp_path / "s"), "-o", str(tmp_path / "out")]) == 2
    err = capfd.readouterr().err
    lines = [line.rsplit("\r", 1)[-1] for line in err.strip().split("\n")]   # what a terminal shows
    assert lines == [f"covidct: error: {paths[2]}: compressed pixel data ends before its end-of-image marker "
                     "(a truncated or damaged file)"]
    assert not (tmp_path / "out").exists() and paths[2].read_bytes() == before


def test_a_command_that_fails_while_the_scan_is_read_ahead_prints_only_its_error(tmp_path, capfd):
    """The helper is stopped; its progress bar clears its line and it leaves nothing behind (no
    multiprocessing warning), so the error line stands alone in a terminal."""
    from covidct.cli import main

    write_ct_series(tmp_path / "s", phantom_hu(40, 128))
    capfd.readouterr()
    assert main(["analyze", str(tmp_path / "s"), "-o", str(tmp_path / "out"), "--model", str(tmp_path / "none.pt")]) == 2
    err = capfd.readouterr().err
    shown = [line.rsplit("\r", 1)[-1].strip() for line in err.strip().split("\n")]   # what a terminal shows
    # the read may have finished first (its bar then stands complete); a bar stopped half-way is cleared
    shown = [line for line in shown if line and not line.startswith("reading: 100%")]
    assert len(shown) == 1 and shown[0].startswith(f"covidct: error: {tmp_path / 'none.pt'}: no such model file")
    assert "Warning" not in err and not (tmp_path / "out").exists()


def test_a_compressed_slice_file_cut_short_is_named_not_skipped(tmp_path, capsys):
    """A file cut short inside its encapsulated pixel data parses as an empty dataset (pydicom only warns):
    it used to be skipped like a non-DICOM file, leaving a gap in the series; now the series' read names it."""
    from covidct.cli import main

    paths = write_ct_series(tmp_path / "s", phantom_hu(5, 32), compress="1.2.840.10008.1.2.4.80")
    whole = paths[2].read_bytes()
    paths[2].write_bytes(whole[: len(whole) - 40])
    for target in (tmp_path / "s", paths[2]):
        with pytest.raises(InputError, match="truncated DICOM file") as info:
            read(target)
        assert info.value.path == str(paths[2])
        assert main(["info", str(target)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(paths[2]) in err and "ends inside its pixel data" in err


def test_fill_non_finite_sets_lowest_finite_value_in_place():
    from covidct.io.volume import fill_non_finite

    a = np.array([[[-900.0, np.nan], [40.0, np.inf]], [[-np.inf, -1010.0], [np.nan, 0.0]]], np.float32)
    assert fill_non_finite(a, "x.nii") == 4
    np.testing.assert_array_equal(a, [[[-900, -1010], [40, -1010]], [[-1010, -1010], [-1010, 0]]])
    assert fill_non_finite(a, "x.nii") == 0            # nothing left to fill
    with pytest.raises(InputError, match="x.nii: holds no finite values"):
        fill_non_finite(np.full((2, 3, 3), np.nan, np.float32), "x.nii")


def test_float_tiff_with_nan_reads_finite(tmp_path):
    a = np.linspace(10, 200, 32 * 32, dtype=np.float32).reshape(32, 32)
    a[0] = np.nan
    Image.fromarray(a, "F").save(tmp_path / "f.tif")
    vol = read(tmp_path / "f.tif")
    assert np.isfinite(vol.array).all()
    np.testing.assert_array_equal(vol.array[0, 0], np.full(32, a[1:].min()))
    np.testing.assert_array_equal(vol.array[0, 1:], a[1:])
    with pytest.raises(InputError, match="holds no finite values"):
        Image.fromarray(np.full((32, 32), np.nan, np.float32), "F").save(tmp_path / "g.tif")
        read(tmp_path / "g.tif")
