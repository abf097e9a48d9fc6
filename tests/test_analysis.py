"""Scan-level analysis on generated volumes: lungs, burden, severity, outputs on the input grid."""

from __future__ import annotations

import csv
import dataclasses
import json
import re
import os

import nibabel as nib
import numpy as np
import pytest

from conftest import need_data, phantom_hu, write_ct_series, write_nifti
from covidct.analysis.lungs import LEFT, RIGHT, segment_lungs_hu, zone_index
from covidct.analysis.severity import involvement_score, lesion_burden
from covidct.cli import main
from covidct.io import read
from covidct.models.registry import DEFAULTS


def test_classical_lungs_on_phantom_with_sides(tmp_path):
    write_ct_series(tmp_path / "s", phantom_hu(8, 96), spacing=(5.0, 3.0, 3.0))
    vol = read(tmp_path / "s")
    res = segment_lungs_hu(vol.array, spacing=vol.spacing, affine=vol.affine)
    right, left = res.labels == RIGHT, res.labels == LEFT
    assert right.any() and left.any()
    # DICOM columns run towards the patient's left: the right lung is on the low-column side
    assert np.nonzero(right)[2].mean() < np.nonzero(left)[2].mean()
    # the body (soft tissue) and outside air are not lung
    assert not res.labels[:, 0, :].any() and not res.labels[:, 48, 48].any()
    expected_ml = 2 * np.pi * (0.28 * 96) * (0.12 * 96) * 9.0 * 8 * 5.0 / 1000
    assert res.volume_ml == pytest.approx(expected_ml, rel=0.15)
    zones = zone_index(res.labels)
    assert set(np.unique(zones[res.labels > 0])) == {0, 1, 2}


def test_trachea_and_its_wall_are_not_lung():
    hu = phantom_hu(20, 96)
    yy, xx = np.mgrid[:96, :96]
    lungs0 = (hu[0] > -900) & (hu[0] < -700)
    for k in range(4):  # above the lungs: soft tissue where the lungs are lower down
        hu[k][lungs0] = 40.0
    r = np.hypot(yy - 48, xx - 48)
    for k in range(6):  # trachea: air core with a 1-pixel wall of partial-volume values
        hu[k][r < 6] = -700.0
        hu[k][r < 5] = -1000.0
    hu[4:6, 46:51, 40:57] = -1000.0  # main bronchi into both lungs
    res = segment_lungs_hu(hu, spacing=(5.0, 3.0, 3.0))
    assert not res.labels[:4].any()  # nothing above the lungs (the wall ring once came back as "lung")
    assert res.labels[10].any() and res.airway_removed_ml > 0


def test_small_gas_pocket_is_not_lung():
    hu = phantom_hu(8, 96)
    hu[:, 80:86, 44:52] = -1000  # a gas pocket inside the body, below the lungs
    res = segment_lungs_hu(hu, spacing=(5.0, 3.0, 3.0))
    assert not res.labels[:, 80:86, 44:52].any()


def test_large_slices_get_the_half_size_labels_upsampled_exactly():
    """A 512² volume is segmented at 256² and brought back by nearest neighbour (written in place, not by
    np.repeat): the same labels and volume as repeating the half-size result by hand."""
    hu = np.repeat(np.repeat(phantom_hu(6, 256), 2, axis=1), 2, axis=2)
    full = segment_lungs_hu(hu, spacing=(5.0, 1.5, 1.5))
    half = segment_lungs_hu(hu[:, ::2, ::2], spacing=(5.0, 3.0, 3.0))
    expected = np.repeat(np.repeat(half.labels, 2, axis=1), 2, axis=2)
    assert full.labels.shape == hu.shape and full.labels.dtype == np.uint8 and full.labels.flags.c_contiguous
    assert (full.labels == RIGHT).any() and (full.labels == LEFT).any()
    assert np.array_equal(full.labels, expected)
    assert full.volume_ml == pytest.approx(float((expected > 0).sum()) * 5.0 * 1.5 * 1.5 / 1000)


def test_component_labels_and_sizes_counted_in_chunks():
    from scipy import ndimage

    from covidct.analysis.lungs import component_sizes, label_components

    rng = np.random.default_rng(0)
    mask = ndimage.gaussian_filter(rng.random((40, 50, 50)), 1.0) > 0.55
    lab, n = label_components(mask)
    ref, n_ref = ndimage.label(mask)
    assert lab.dtype == np.uint16 and n == n_ref > 10 and np.array_equal(lab, ref)
    assert np.array_equal(component_sizes(lab, n, chunk=3), np.bincount(ref.ravel(), minlength=n + 1))
    speckle = np.zeros((1, 600, 600), bool)
    speckle[0, ::2, ::2] = True                      # 90,000 components: past 16-bit labels
    lab, n = label_components(speckle)
    assert n == 90_000 and lab.dtype == np.int32 and int(lab.max()) == n

def test_severity_bins_and_burden():
    assert [involvement_score(p) for p in (0, 3, 5, 10, 30, 60, 80)] == [0, 1, 1, 2, 3, 4, 5]
    sides = np.zeros((3, 10, 20), np.uint8)
    sides[:, :, :10] = RIGHT
    sides[:, :, 10:] = LEFT
    lesions = np.zeros_like(sides)
    lesions[0, :5, :10] = 1  # half of the right upper zone: GGO
    lesions[2, :, 15:] = 2   # half of the left lower zone: consolidation
    lesions[1, 9, 0:2] = 3   # effusion: measured on its own, not as lung involvement
    hu = np.full(sides.shape, -800.0)
    hu[2, :, 15:] = 20.0
    b = lesion_burden(lesions, sides, zone_index(sides), voxel_ml=0.5, hu=hu)
    assert b["lung_volume_ml"] == pytest.approx(300.0)
    assert b["lesions"]["ggo"]["volume_ml"] == pytest.approx(25.0) and b["lesions"]["effusion"]["voxels"] == 2
    assert b["sides"]["left"]["consolidation"] == pytest.approx(100 * 50 / 300, abs=1e-3)
    assert b["lesions"]["total"]["percent_of_lung"] == pytest.approx(100 * 100 / 600, abs=1e-3)
    assert b["percent_high_opacity"] == pytest.approx(100 * 50 / 600, abs=1e-3)
    assert b["zones"]["right_upper"]["score"] == 3 and b["zones"]["left_lower"]["score"] == 3
    assert b["severity_score"] == 6


def test_burden_counted_a_few_slices_at_a_time_matches_whole_volume_counts():
    """``lesion_burden`` counts in chunks of slices (bounded memory); every number must be the plain
    whole-volume count."""
    rng = np.random.default_rng(5)
    sides = rng.integers(0, 3, (40, 24, 24)).astype(np.uint8)      # more slices than one chunk
    lesions = rng.integers(0, 4, sides.shape).astype(np.uint8)
    hu = rng.uniform(-1000, 100, sides.shape).astype(np.float32)
    zones = zone_index(sides)
    b = lesion_burden(lesions, sides, zones, voxel_ml=1.0, hu=hu)
    lung = sides > 0
    assert b["lung_voxels"] == int(lung.sum())
    for name, value in (("ggo", 1), ("consolidation", 2)):
        assert b["lesions"][name]["voxels"] == int(((lesions == value) & lung).sum())
    assert b["lesions"]["effusion"]["voxels"] == int((lesions == 3).sum())
    infected = np.isin(lesions, (1, 2)) & lung
    assert b["percent_high_opacity"] == pytest.approx(100 * int((infected & (hu > -200)).sum()) / int(lung.sum()),
                                                      abs=1e-4)
    for side, name in ((RIGHT, "right"), (LEFT, "left")):
        for z, zone in enumerate(("upper", "middle", "lower")):
            here = (sides == side) & (zones == z)
            assert b["zones"][f"{name}_{zone}"]["percent_involved"] == pytest.approx(
                100 * int((infected & here).sum()) / int(here.sum()), abs=1e-4)


def _check_outputs(out, vol, report):
    for name in ("lesions.nii.gz", "lungs.nii.gz"):
        img = nib.load(out / name)
        assert b"not for diagnosis" in img.header["descrip"].tobytes()
        if vol.kind == "nifti":  # the file's own grid, whatever the working orientation
            assert list(img.shape) == vol.metadata["source_shape"]
            np.testing.assert_allclose(img.affine, vol.metadata["source_affine"], atol=1e-4)
        else:
            assert img.shape == (vol.shape[2], vol.shape[1], vol.shape[0])
            np.testing.assert_allclose(img.affine, vol.affine, atol=1e-4)
    for key in ("input", "lung_volume_ml", "lesions", "percent_opacity", "percent_high_opacity", "severity_score",
                "diagnosis", "slices", "models", "seconds"):
        assert key in report
    assert set(report["lesions"]) >= {"ggo", "consolidation", "effusion", "total"}
    assert len(report["slices"]) == vol.n_slices
    assert {"index", "infection_probability", "lesion_percent", "ggo_percent", "consolidation_percent"} <= set(report["slices"][0])
    for s in report["slices"]:  # the two types make up the lesions (rounded to 4 decimals each)
        assert s["ggo_percent"] + s["consolidation_percent"] == pytest.approx(s["lesion_percent"], abs=2e-4)
    assert report["models"][0]["sha256"] and "label" in report["diagnosis"]
    html = (out / "report.html").read_text()
    assert html.index("not for diagnosis") < html.index("<h1>") and "data:image/png;base64," in html
    assert list((out / "overlays").glob("*.png"))
    viewer = (out / "viewer.html").read_text()
    assert viewer.index("not for diagnosis") < viewer.index("<h1>") and 'href="viewer.html"' in html
    data = _viewer_data(viewer)
    assert len(data["frames"]) == vol.n_slices
    # CT in HU can also be looked at in the mediastinal window (effusion, consolidation); images cannot
    assert data["windows"] == (["lung", "mediastinum"] if vol.is_hu else ["lung"])
    assert all(set(f["win"]) == set(data["windows"][1:]) for f in data["frames"])
    umask = os.umask(0)
    os.umask(umask)
    assert (out / "report.json").stat().st_mode & 0o777 == 0o666 & ~umask  # not a temporary file's 0600


def _viewer_data(page: str) -> dict:
    start = page.index('<script id="data" type="application/json">') + len('<script id="data" type="application/json">')
    return json.loads(page[start:page.index("</script>", start)])


def test_viewer_embeds_every_slice_with_its_overlay():
    import base64
    import io

    from PIL import Image

    from covidct.data.segmentation import LESION_COLOURS
    from covidct.report.viewer import viewer_html

    lesions = np.zeros((3, 40, 60), np.uint8)
    lungs = np.zeros_like(lesions)
    lungs[1:, 5:35, 5:55] = 1
    lesions[1, 10:20, 10:30] = 1   # GGO
    lesions[2, 10:20, 30:50] = 2   # consolidation
    slices = [{"index": k, "infection_probability": p, "lesion_percent": q}
              for k, p, q in ((0, 0.0, 0.0), (1, 0.7, 13.0), (2, 0.9, 17.0))]
    slices[2]["triage_probabilities"] = {"Control": 0.1, "Common pneumonia": 0.3, "COVID-19": 0.6}
    page = viewer_html(lambda k: np.full((40, 60), k / 2.0), lesions, lungs, slices, spacing=(5.0, 1.0, 0.5),
                       extra_windows={"dark": lambda k: np.zeros((40, 60))})
    data = _viewer_data(page)
    assert data["windows"] == ["lung", "dark"] and '<select id="win">' in page
    dark = np.asarray(Image.open(io.BytesIO(base64.b64decode(data["frames"][2]["win"]["dark"]))))
    assert dark.shape == (80, 60) and float(dark.max()) < 3        # the other window's picture of the same slice
    assert len(data["frames"]) == 3 and data["start"] == 2           # opens on the most affected slice
    assert data["frames"][0]["ov"] == ""                            # nothing to draw: no overlay
    assert (data["width"], data["height"]) == (60, 80)              # rows are 1 mm, columns 0.5 mm: square mm
    ov = np.asarray(Image.open(io.BytesIO(base64.b64decode(data["frames"][1]["ov"]))).convert("RGBA"))
    assert ov.shape == (80, 60, 4)
    assert tuple(ov[30, 20, :3]) == tuple(LESION_COLOURS["ggo"]) and ov[30, 20, 3] == 255
    assert ov[1, 1, 3] == 0                                          # outside: transparent
    ov2 = np.asarray(Image.open(io.BytesIO(base64.b64decode(data["frames"][2]["ov"]))).convert("RGBA"))
    assert tuple(ov2[30, 40, :3]) == tuple(LESION_COLOURS["consolidation"])
    ct = np.asarray(Image.open(io.BytesIO(base64.b64decode(data["frames"][2]["ct"]))))
    assert abs(float(ct.mean()) - 255) < 3 and data["info"][1]["p"] == 0.7
    assert data["info"][2]["tri"]["COVID-19"] == 0.6 and data["info"][0]["tri"] is None   # shown per slice
    assert "http://" not in page and "https://" not in page         # self-contained: nothing fetched


def test_analyze_dicom_series_outputs_on_input_grid(tmp_path, tiny_seg_model, capfd):
    write_ct_series(tmp_path / "s", phantom_hu(6, 96), spacing=(5.0, 3.0, 3.0))
    vol = read(tmp_path / "s")
    out = tmp_path / "out"
    assert main(["analyze", str(tmp_path / "s"), "-o", str(out), "--model", str(tiny_seg_model)]) == 0
    report = json.loads((out / "report.json").read_text())
    printed, bars = capfd.readouterr()   # file-descriptor level: the scan is read in a helper process
    # a progress bar per stage, each run to its end (the reading one from the helper process)
    n_files = 2 + len(list((out / "overlays").glob("*.png"))) + 1 + 2   # NIfTIs, overlays, viewer, JSON + HTML
    for stage, total in (("reading", "6/6"), ("lungs", "5/5"), ("lesions", ""), ("triage", "20/20"),
                         ("writing", f"{n_files}/{n_files}")):
        assert re.search(rf"{stage}: 100%[^\r\n]*{total}", bars), stage
    assert f"answer: {report['diagnosis']['label']} (Control " in printed and "p(lesions present)" in printed
    _check_outputs(out, vol, report)
    # the phantom's lungs run through every slice: the report says the scan may not hold them whole
    cov = report["lung_coverage"]
    assert cov["cut_at_head"] and cov["cut_at_feet"] and (cov["first_slice"], cov["last_slice"]) == (0, 5)
    assert "apices and bases" in cov["note"] and f"note: {cov['note']}" in printed
    assert "may not hold all of the lung apices and bases" in (out / "report.html").read_text()
    assert report["lung_volume_ml"] > 100 and report["input"]["kind"] == "dicom-series"
    lungs = nib.load(out / "lungs.nii.gz").get_fdata().transpose(2, 1, 0)
    assert set(np.unique(lungs)) == {0, 1, 2}
    assert report["input"]["model_window"] == {"level": -420.0, "width": 1480.0}
    # the triage: a 3-class answer and 3-class probabilities on every slice; no slice classifier by default
    assert report["diagnosis"]["label"] in ("Control", "Common pneumonia", "COVID-19")
    assert all(abs(sum(s["triage_probabilities"].values()) - 1.0) < 1e-5 for s in report["slices"])
    assert "classifier" not in report["diagnosis"] and [m["task"] for m in report["models"]] == ["seg", "triage"]
    # without the triage the fast slice classifier reports on every slice with lesions
    out2 = tmp_path / "out2"
    assert main(["analyze", str(tmp_path / "s"), "-o", str(out2), "--model", str(tiny_seg_model), "--triage", "none",
                 "--no-viewer"]) == 0
    report = json.loads((out2 / "report.json").read_text())
    cls_block = report["diagnosis"]["classifier"]
    assert cls_block["model"] == DEFAULTS["scan_cls"] and [m["task"] for m in report["models"]] == ["seg", "cls"]
    classified = [s for s in report["slices"] if "class_probabilities" in s]
    assert [s["index"] for s in classified] == [s["index"] for s in report["slices"] if s["lesion_area_mm2"] > 0]
    assert all(abs(sum(s["class_probabilities"].values()) - 1.0) < 1e-4 for s in classified)
    assert report["diagnosis"]["label"] in ("lesions present", "no lesions found")
    assert "slice classifier" in (out2 / "report.html").read_text()


def test_analyze_window_option(tmp_path, tiny_seg_model, capsys):
    write_nifti(tmp_path / "v.nii.gz", phantom_hu(3, 64), spacing=(5.0, 3.0, 3.0))
    out = tmp_path / "out"
    assert main(["analyze", str(tmp_path / "v.nii.gz"), "-o", str(out), "--model", str(tiny_seg_model),
                 "--window=-600,1500", "--classifier", "none", "--precision", "bf16"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["input"]["model_window"] == {"level": -600.0, "width": 1500.0}
    assert report["models"][0]["precision"] == "bf16" and "(bf16)" in (out / "report.html").read_text()
    assert "classifier" not in report["diagnosis"] and [m["task"] for m in report["models"]] == ["seg", "triage"]
    capsys.readouterr()
    assert main(["analyze", str(tmp_path / "v.nii.gz"), "-o", str(tmp_path / "bad"), "--model", str(tiny_seg_model),
                 "--window", "wide"]) == 2
    assert "--window" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_analyze_nifti_keeps_affine(tmp_path, tiny_seg_model):
    write_nifti(tmp_path / "v.nii.gz", phantom_hu(5, 80), spacing=(5.0, 3.0, 3.0))
    vol = read(tmp_path / "v.nii.gz")
    out = tmp_path / "out"
    assert main(["analyze", str(tmp_path / "v.nii.gz"), "-o", str(out), "--model", str(tiny_seg_model)]) == 0
    _check_outputs(out, vol, json.loads((out / "report.json").read_text()))


def test_analyze_nifti_with_nan_outside_the_field_of_view(tmp_path, tiny_seg_model, capsys):
    """A resampled float NIfTI marks the corners outside its circular field of view NaN: they are read as the
    volume's lowest value (outside the body), so lungs and burden are those of the same scan without them (NaN
    passes no air threshold: left as it was, the ring closed in the outside air and no lungs were found), the
    report counts them and the input file is not changed."""
    hu = phantom_hu(5, 80)
    yy, xx = np.mgrid[:80, :80]
    ring = (yy - 40) ** 2 + (xx - 40) ** 2 > 39 ** 2
    with_nan = hu.copy()
    with_nan[:, ring] = np.nan
    with_nan[2, 0, 0] = np.inf
    affine = np.diag([-3.0, -3.0, -5.0, 1.0])
    reports = {}
    for name, arr in (("plain", hu), ("nan", with_nan)):
        path = tmp_path / f"{name}.nii"
        img = nib.Nifti1Image(arr.transpose(2, 1, 0), affine)
        img.set_data_dtype(np.float32)
        nib.save(img, path)
        before = path.read_bytes()
        vol = read(path)
        assert np.isfinite(vol.array).all() and vol.is_hu
        out = tmp_path / f"out_{name}"
        assert main(["analyze", str(path), "-o", str(out), "--model", str(tiny_seg_model), "--classifier",
                     "none"]) == 0
        assert path.read_bytes() == before
        assert ("voxels were NaN or infinite" in capsys.readouterr().out) == (name == "nan")
        reports[name] = json.loads((out / "report.json").read_text())
        _check_outputs(out, vol, reports[name])
    assert reports["nan"]["input"]["non_finite_voxels"] == 5 * int(ring.sum())
    assert reports["plain"]["input"]["non_finite_voxels"] == 0
    assert vol.array[2, 0, 0] == pytest.approx(float(np.nanmin(hu)))
    assert reports["nan"]["lung_volume_ml"] == pytest.approx(reports["plain"]["lung_volume_ml"], rel=1e-3)
    assert reports["nan"]["lung_volume_ml"] > 0
    assert reports["nan"]["percent_opacity"] == pytest.approx(reports["plain"]["percent_opacity"], abs=0.05)
    assert "NaN or infinite" in (tmp_path / "out_nan" / "report.html").read_text()
    assert reports["nan"]["lung_volume_note"] is None


def test_implausibly_large_lung_mask_is_flagged(tmp_path, tiny_seg_model, capsys):
    """The same phantom at everyday voxel sizes and at voxels so large that its lungs would hold about 12 L:
    only the second gets the note, in report.json, the HTML report and the printed summary."""
    from covidct.analysis.scan import MAX_PLAUSIBLE_LUNG_ML, lung_volume_note

    assert lung_volume_note(None) is None and lung_volume_note(MAX_PLAUSIBLE_LUNG_ML) is None
    assert "12.5 L" in lung_volume_note(12_500.0)
    volumes = {}
    for name, spacing in (("normal", (5.0, 3.0, 3.0)), ("huge", (40.0, 6.0, 6.0))):
        write_nifti(tmp_path / f"{name}.nii.gz", phantom_hu(6, 80), spacing=spacing)
        out = tmp_path / f"out_{name}"
        capsys.readouterr()
        assert main(["analyze", str(tmp_path / f"{name}.nii.gz"), "-o", str(out), "--model", str(tiny_seg_model),
                     "--classifier", "none"]) == 0
        printed = capsys.readouterr().out
        report = json.loads((out / "report.json").read_text())
        volumes[name] = report["lung_volume_ml"]
        note = report["lung_volume_note"]
        if name == "normal":
            assert note is None and "more than lungs hold" not in printed
        else:
            assert note and "more than lungs hold" in note
            assert f"note: {note}" in printed
            assert "more than lungs hold" in (out / "report.html").read_text()
    assert volumes["normal"] < MAX_PLAUSIBLE_LUNG_ML < volumes["huge"]


def test_nifti_without_a_finite_voxel_is_one_error_line(tmp_path, capsys):
    path = tmp_path / "empty.nii.gz"
    nib.save(nib.Nifti1Image(np.full((16, 16, 3), np.nan, np.float32), np.eye(4)), path)
    out = tmp_path / "out"
    assert main(["analyze", str(path), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"covidct: error: {path}: holds no finite values (every voxel is NaN or infinite)"]
    assert not out.exists()


def test_nifti_in_any_axis_order_is_read_alike_and_answered_on_its_own_grid(tmp_path, tiny_seg_model):
    """The same scan stored in DICOM order (L, P, I) and as RAS with the axes permuted (as some converters
    write it) is read to the same working array; each output lies on its own file's grid and holds the
    same labels at the same places in millimetres."""
    hu = phantom_hu(6, 64)
    lpi = tmp_path / "lpi.nii.gz"
    affine = np.diag([-0.9, -0.9, -4.0, 1.0])
    affine[:3, 3] = [30.0, 40.0, -20.0]
    nib.save(nib.Nifti1Image(hu.transpose(2, 1, 0).astype(np.int16), affine), lpi)
    ras_img = nib.as_closest_canonical(nib.load(lpi))                      # R, A, S: all three axes flipped
    swapped = ras_img.as_reoriented(np.array([[1, 1], [0, 1], [2, 1]]))   # and i <-> j exchanged
    ras = tmp_path / "ras.nii.gz"
    nib.save(swapped, ras)
    assert nib.aff2axcodes(swapped.affine) == ("A", "R", "S")
    a, b = read(lpi), read(ras)
    assert np.array_equal(a.array, b.array) and np.allclose(a.affine, b.affine) and a.spacing == b.spacing
    assert b.metadata["orientation"] == "ARS"
    outs = {}
    for name, path in (("lpi", lpi), ("ras", ras)):
        out = tmp_path / f"out_{name}"
        assert main(["analyze", str(path), "-o", str(out), "--model", str(tiny_seg_model), "--classifier",
                     "none"]) == 0
        report = json.loads((out / "report.json").read_text())
        _check_outputs(out, read(path), report)
        assert report["input"]["orientation"] == {"lpi": "LPI", "ras": "ARS"}[name]
        outs[name] = nib.load(out / "lungs.nii.gz")
    lungs_lpi = np.asarray(outs["lpi"].dataobj)
    assert lungs_lpi.any()
    back = nib.orientations.apply_orientation(np.asarray(outs["ras"].dataobj), nib.orientations.ornt_transform(
        nib.io_orientation(outs["ras"].affine), nib.io_orientation(outs["lpi"].affine)))
    assert np.array_equal(back, lungs_lpi)


def test_analyze_image_uses_learned_lungs(tmp_path, tiny_seg_model):
    from PIL import Image

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (70, 60), dtype=np.uint8)).save(tmp_path / "x.png")
    out = tmp_path / "out"
    assert main(["analyze", str(tmp_path / "x.png"), "-o", str(out), "--model", str(tiny_seg_model)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["input"]["kind"] == "image" and report["lung_volume_ml"] is None
    assert "learned" in report["lung_method"]
    assert _viewer_data((out / "viewer.html").read_text())["windows"] == ["lung"]   # no HU: no mediastinal window


class _ScriptedPredictor:
    """Stands in for a SegPredictor with a lung head: a fixed lung (two discs), lesions inside one of them and one
    outside both (which analyze must drop), the slice "routed" to the lung-masked network; counts its calls."""

    has_lung = True

    def __init__(self, shape: tuple[int, int]) -> None:
        from covidct.engine.infer import SegPrediction

        yy, xx = np.mgrid[:shape[0], :shape[1]]
        lung = ((yy - 40) ** 2 + (xx - 30) ** 2 < 15 ** 2) | ((yy - 40) ** 2 + (xx - 90) ** 2 < 15 ** 2)
        labels = np.zeros(shape, np.uint8)
        labels[35:45, 25:35] = 1            # GGO in the right-hand (image left) lung
        labels[38:42, 88:92] = 2            # consolidation in the other
        labels[70:76, 55:65] = 1            # outside both lungs, below them
        probs = np.zeros((4, *shape), np.float32)
        self.prediction = SegPrediction(labels, probs, lung.astype(np.float32), network="lung_masked")
        self.calls: list[int] = []

    def predict(self, images, *, pixel_mm=None):
        import copy

        self.calls.append(len(images))
        return [copy.deepcopy(self.prediction) for _ in images]


def test_analyze_segments_an_image_once_and_keeps_its_lesions_in_the_lungs(tmp_path):
    """A slice without Hounsfield units goes through the predictor once (lungs and lesions from one run, the
    lung-masked decision made on the whole slice and reported); lesions outside the lungs are dropped, those in
    them kept as predicted."""
    from PIL import Image

    from covidct.analysis.scan import analyze_volume

    Image.fromarray(np.full((90, 120), 60, np.uint8)).save(tmp_path / "x.png")
    predictor = _ScriptedPredictor((90, 120))
    result = analyze_volume(read(tmp_path / "x.png"), predictor, progress=False)
    assert predictor.calls == [1]
    assert result.lung_masked_slices == [0]
    assert not result.effusion_assessable()     # its only lung slice is lung-masked: effusion cannot be seen
    two = np.stack([result.lungs[0], result.lungs[0]])
    assert dataclasses.replace(result, lungs=two).effusion_assessable()          # slice 1 is not lung-masked
    assert not dataclasses.replace(result, lungs=two, lung_masked_slices=[0, 1]).effusion_assessable()
    lung_then_none = np.stack([result.lungs[0], np.zeros_like(result.lungs[0])])   # slice 1 holds no lung
    assert dataclasses.replace(result, lungs=lung_then_none, lung_masked_slices=[1]).effusion_assessable()
    assert not dataclasses.replace(result, lungs=lung_then_none, lung_masked_slices=[0]).effusion_assessable()
    expected = predictor.prediction.labels.copy()
    expected[70:76, 55:65] = 0
    assert np.array_equal(result.lesions[0], expected)
    assert set(np.unique(result.lungs[0])) == {0, RIGHT, LEFT}
    assert result.slices[0]["lesion_percent"] > 0


def test_lung_mask_covering_the_image_is_flagged(tmp_path, capsys):
    """Noise is no chest CT: the shipped model's lung head marks nearly all of it, and the report says that the
    input may not be a chest CT (report.json, the HTML report, the printed notes); a real CT slice gets no note."""
    from PIL import Image

    from covidct.analysis.scan import MAX_PLAUSIBLE_LUNG_SHARE, lung_share_note

    lungs = np.zeros((3, 10, 10), np.uint8)
    lungs[1, :, :9] = 1                               # 90 %: still plausible
    assert lung_share_note(lungs) is None
    lungs[2, :, :] = 2
    assert "covers 100 % of the image (slice 2)" in lung_share_note(lungs)
    assert MAX_PLAUSIBLE_LUNG_SHARE == 0.9
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (256, 256), dtype=np.uint8)).save(tmp_path / "noise.png")
    out = tmp_path / "noise"
    assert main(["analyze", str(tmp_path / "noise.png"), "-o", str(out), "--classifier", "none", "--no-viewer"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert "may not be a chest CT" in report["lung_share_note"]
    assert f"note: {report['lung_share_note']}" in capsys.readouterr().out
    assert "may not be a chest CT" in (out / "report.html").read_text()
    slice_png = sorted((need_data("covid-semiseg", "images")).iterdir())[0]
    assert main(["analyze", str(slice_png), "-o", str(tmp_path / "ct"), "--classifier", "none", "--no-viewer"]) == 0
    report = json.loads((tmp_path / "ct" / "report.json").read_text())
    assert report["lung_share_note"] is None and report["lung_masked_slices"] == []
    assert report["lesions"]["effusion"]["assessable"] is True


def test_analyze_says_which_slices_went_to_the_lung_masked_network(tmp_path, capsys):
    """A MedSeg frame (black outside its lungs) is segmented by the shipped model's lung-masked companion, and
    the report says so (report.json, its notes); a slice with the body around its lungs is not."""
    for name in ("017", "023"):   # 023: routed on its whole frame, not on its lung box (decided once, whole)
        frame = need_data("medseg-512", "images") / f"{name}.png"
        out = tmp_path / name
        capsys.readouterr()
        assert main(["analyze", str(frame), "-o", str(out), "--classifier", "none", "--no-viewer"]) == 0
        report = json.loads((out / "report.json").read_text())
        assert report["lung_masked_slices"] == [0], name
        assert report["lesions"]["effusion"]["assessable"] is False, name    # its pleural space is black
        assert "note: 1 slice is black outside the lungs" in capsys.readouterr().out
        page = (out / "report.html").read_text()
        assert "black outside the lungs" in page and "not assessable (lung-masked slices)" in page
    # several inputs: summary.csv / summary.json say per scan whether its effusion could be measured
    crop = sorted(need_data("covid-semiseg", "images").iterdir())[0]
    assert main(["analyze", str(need_data("medseg-512", "images") / "017.png"), str(crop), "-o", str(tmp_path / "both"),
                 "--classifier", "none", "--no-viewer"]) == 0
    with open(tmp_path / "both" / "summary.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["name"], r["effusion_assessable"]) for r in rows] == [("017", "False"), (crop.stem, "True")]
    scans = json.loads((tmp_path / "both" / "summary.json").read_text())["scans"]
    assert [s["effusion_assessable"] for s in scans] == [False, True]
    assert [s["orientation_reversed"] for s in scans] == [None, None]   # images: no orientation to check


def test_colour_image_is_flagged(tmp_path, tiny_seg_model, capsys):
    """CT slices are grey: a grey slice with a red arrow drawn on it gets no note, a colour picture does (in
    report.json's input.colour_share, the printed notes and the HTML report); DICOM / NIfTI carry no share."""
    from PIL import Image

    from covidct.io.image import colour_share
    from covidct.report.notes import MAX_CT_COLOUR_SHARE

    grey = np.random.default_rng(0).integers(0, 255, (80, 80), dtype=np.uint8)
    arrow = np.repeat(grey[..., None], 3, axis=2)
    arrow[10:14, 10:40] = (255, 0, 0)                     # 1.9 % of the pixels
    colour = np.random.default_rng(1).integers(0, 255, (80, 80, 3), dtype=np.uint8)
    assert colour_share(arrow.astype(np.float32)) == pytest.approx(120 / 6400)
    assert colour_share(np.repeat(grey[..., None], 3, axis=2)) == 0.0
    shares = {}
    for name, image in (("arrow", arrow), ("photo", colour)):
        Image.fromarray(image).save(tmp_path / f"{name}.png")
        out = tmp_path / name
        capsys.readouterr()
        assert main(["analyze", str(tmp_path / f"{name}.png"), "-o", str(out), "--model", str(tiny_seg_model),
                     "--no-viewer"]) == 0
        printed = capsys.readouterr().out
        shares[name] = json.loads((out / "report.json").read_text())["input"]["colour_share"]
        flagged = "pixels are coloured, while CT slices are grey" in printed
        assert flagged == (name == "photo") == ("while CT slices are grey" in (out / "report.html").read_text())
    assert shares["arrow"] < MAX_CT_COLOUR_SHARE < shares["photo"]
    write_nifti(tmp_path / "ct.nii.gz", phantom_hu(4, 64))
    assert main(["analyze", str(tmp_path / "ct.nii.gz"), "-o", str(tmp_path / "ct"), "--model", str(tiny_seg_model),
                 "--classifier", "none", "--triage", "none", "--no-viewer"]) == 0
    assert json.loads((tmp_path / "ct" / "report.json").read_text())["input"]["colour_share"] is None


def test_ct_numbers_without_their_intercept_are_read_as_hu(tmp_path, tiny_seg_model, capsys):
    """A NIfTI holding stored CT numbers (HU + 1024, unsigned, no scl_inter) reads as the same HU volume with a
    note, and analyses as the HU file does; HU files and 8-bit volumes are left as they are."""
    import nibabel as nib

    from covidct.io.volume import stored_ct_offset

    hu = phantom_hu(6, 80)
    affine = write_nifti(tmp_path / "hu.nii.gz", hu)
    stored = (hu.astype(np.int32) + 1024).clip(0, None).astype(np.uint16)
    nib.save(nib.Nifti1Image(stored.transpose(2, 1, 0), affine), tmp_path / "stored.nii.gz")
    assert stored_ct_offset(stored) == -1024 and stored_ct_offset(hu) is None
    assert stored_ct_offset(np.clip(stored // 8, 0, 255).astype(np.uint8)) is None      # 8-bit: no soft tissue at ~1024
    assert stored_ct_offset(np.full((8, 8, 8), 1000, np.uint16)) is None                # no air
    a, b = read(tmp_path / "hu.nii.gz"), read(tmp_path / "stored.nii.gz")
    assert b.is_hu and b.metadata["stored_value_offset"] == -1024 and "stored_value_offset" not in a.metadata
    assert np.array_equal(a.array, b.array)
    reports = {}
    for name in ("hu", "stored"):
        capsys.readouterr()
        assert main(["analyze", str(tmp_path / f"{name}.nii.gz"), "-o", str(tmp_path / name), "--model",
                     str(tiny_seg_model), "--classifier", "none", "--triage", "none", "--no-viewer"]) == 0
        printed = capsys.readouterr().out
        assert ("without their rescale intercept" in printed) == (name == "stored")
        reports[name] = json.loads((tmp_path / name / "report.json").read_text())
    assert reports["stored"]["input"]["stored_value_offset"] == -1024
    assert reports["hu"]["input"]["stored_value_offset"] is None
    for key in ("lung_volume_ml", "percent_opacity", "severity_score"):
        assert reports["stored"][key] == reports["hu"][key], key


def test_dicom_with_a_zeroed_intercept_is_read_as_hu_and_ct_without_air_says_so(tmp_path, tiny_seg_model, capsys):
    """A DICOM series whose RescaleIntercept was zeroed (stored numbers, air at 0) reads as the original series in
    HU with a note; a series without any air finds no lungs, and the error line says that it holds no air."""
    import pydicom

    hu = phantom_hu(3, 48)
    write_ct_series(tmp_path / "ct", hu)
    for path in write_ct_series(tmp_path / "zeroed", hu):
        ds = pydicom.dcmread(path)
        ds.RescaleIntercept = 0
        ds.save_as(path)
    a, b = read(tmp_path / "ct"), read(tmp_path / "zeroed")
    assert np.array_equal(a.array, b.array) and b.metadata["stored_value_offset"] == -1024
    assert "stored_value_offset" not in a.metadata
    one = write_ct_series(tmp_path / "one", hu[:1])[0]
    ds = pydicom.dcmread(one)
    ds.RescaleIntercept = 0
    ds.save_as(one)
    assert np.array_equal(read(one).array, a.array[:1])                   # a single file too
    write_ct_series(tmp_path / "soft", np.full((3, 48, 48), 40.0, np.float32))
    assert main(["analyze", str(tmp_path / "soft"), "-o", str(tmp_path / "out"), "--model", str(tiny_seg_model)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]   # after the lung stage's progress bar
    assert err.startswith(f"covidct: error: {tmp_path / 'soft'}: no lungs found") and \
        "it holds no air in Hounsfield units (its lowest value is 40" in err, err
    assert not (tmp_path / "out").exists()


def test_analyze_triage_option_checked_on_any_input(tmp_path, tiny_seg_model, capsys):
    """--triage naming a model of another kind is one error line also for an image (where the triage would not
    run); a right one given for an image gets a note that it was not used."""
    from PIL import Image

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(tmp_path / "x.png")
    assert main(["analyze", str(tmp_path / "x.png"), "-o", str(tmp_path / "a"), "--model", str(tiny_seg_model),
                 "--triage", str(tiny_seg_model)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == f"covidct: error: {tiny_seg_model}: is a 'seg' model, not a triage model"
    assert not (tmp_path / "a").exists()
    assert main(["analyze", str(tmp_path / "x.png"), "-o", str(tmp_path / "b"), "--model", str(tiny_seg_model),
                 "--triage", "triage-ct", "--no-viewer"]) == 0
    assert "note: --triage was not used: the CT triage needs a pixel spacing" in capsys.readouterr().out


def test_analysis_into_a_used_folder_leaves_nothing_of_the_earlier_one(tmp_path, tiny_seg_model):
    """A second analysis into the same folder: the first one's viewer, DICOM SEGs and overlay pictures that the
    second does not write are removed (covidct serve would open a stale viewer), other files are kept, and the
    report links the viewer only when it was written."""
    write_ct_series(tmp_path / "ct", phantom_hu(6, 64))
    out = tmp_path / "out"
    assert main(["analyze", str(tmp_path / "ct"), "-o", str(out), "--model", str(tiny_seg_model), "--classifier",
                 "none", "--triage", "none", "--dicom-seg"]) == 0
    (out / "overlays" / "slice_0999.png").write_bytes(b"stale")   # as if a longer scan had been analysed here
    (out / "notes.txt").write_text("mine")                        # not covidct's: kept
    first = {p.name for p in out.iterdir()}
    assert {"viewer.html", "lungs.seg.dcm"} <= first and 'href="viewer.html"' in (out / "report.html").read_text()
    write_nifti(tmp_path / "v.nii.gz", phantom_hu(4, 64))
    assert main(["analyze", str(tmp_path / "v.nii.gz"), "-o", str(out), "--model", str(tiny_seg_model), "--classifier",
                 "none", "--triage", "none", "--no-viewer"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["input"]["kind"] == "nifti"
    assert not (out / "viewer.html").exists() and not list(out.glob("*.seg.dcm"))
    assert (out / "notes.txt").read_text() == "mine"
    shown = sorted(p.name for p in (out / "overlays").iterdir())
    assert shown and "slice_0999.png" not in shown and len(shown) <= 8
    assert 'href="viewer.html"' not in (out / "report.html").read_text()


def test_analyze_bad_input_leaves_no_output(tmp_path, tiny_seg_model, capsys):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    assert main(["analyze", str(tmp_path / "empty"), "-o", str(out), "--model", str(tiny_seg_model)]) == 2
    assert not out.exists()
    assert "empty" in capsys.readouterr().err


def test_a_scan_without_lungs_is_an_error_not_a_control(tmp_path, tiny_seg_model, capsys):
    """A CT with no lungs in it (a head or abdomen scan, soft tissue only) gets no answer at all: one error
    line and no output, rather than "Control" for lungs it never saw."""
    hu = np.full((6, 64, 64), 40.0, np.float32)       # soft tissue
    hu[:, :4], hu[:, -4:] = -1000.0, -1000.0           # air outside the body
    write_nifti(tmp_path / "abdomen.nii.gz", hu, spacing=(5.0, 3.0, 3.0))
    out = tmp_path / "out"
    assert main(["analyze", str(tmp_path / "abdomen.nii.gz"), "-o", str(out), "--model", str(tiny_seg_model)]) == 2
    err = capsys.readouterr().err.strip().split("\n")
    # the lung stage ran to its end (its progress bar), then one error line
    bars = [line for line in err if re.match(r"^\r?lungs: ", line)]
    assert len(bars) == 1 and "lungs: 100%" in bars[0]
    rest = [line for line in err if line not in bars]
    assert len(rest) == 1 and rest[0].startswith("covidct: error:") and "abdomen.nii.gz" in rest[0]
    assert "no lungs found" in rest[0]
    assert not out.exists()


@pytest.mark.realdata
def test_shipped_models_analyze_a_real_pneumonia_scan(tmp_path, capsys):
    """End to end with the shipped models on a real scan (cap001: CAP, 256² NIfTI): lungs of an adult's
    size, lesions found where the radiologists labelled pneumonia, a pneumonia answer, outputs on the input grid."""
    import csv

    path = need_data("covid-ct-md", "cap001.nii.gz")
    out = tmp_path / "cap"
    assert main(["analyze", str(path), "-o", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    vol = read(path)
    _check_outputs(out, vol, report)
    assert 3000 < report["lung_volume_ml"] < 9000 and report["lesions"]["total"]["percent_of_lung"] > 1.0
    assert report["diagnosis"]["label"] in ("Common pneumonia", "COVID-19")
    with open(need_data("covid-ct-md", "slice_labels.csv"), newline="") as fh:
        infected = {int(r["slice_index"]) for r in csv.DictReader(fh) if r["patient_id"] == "cap001" and r["infection"] == "1"}
    from covidct.io.nifti import working_slice

    infected = {working_slice(vol, k) for k in infected}
    from covidct.metrics import roc_auc

    truth = [s["index"] in infected for s in report["slices"]]
    assert roc_auc(truth, [s["infection_probability"] for s in report["slices"]]) > 0.8   # 0.93 when written
    assert report["lung_coverage"]["first_slice"] < min(infected) <= max(infected) < report["lung_coverage"]["last_slice"]


@pytest.mark.realdata
def test_real_normal_lungs():
    vol = read(need_data("covid-ct-md", "cap001.nii.gz"))
    res = segment_lungs_hu(vol.array, spacing=vol.spacing, affine=vol.affine)
    assert 2500 < res.volume_ml < 9000
    r, l = (res.labels == RIGHT).sum(), (res.labels == LEFT).sum()
    assert 0.5 < r / l < 2.0


def _phantom_with_spine(n_slices: int = 8, size: int = 96) -> np.ndarray:
    """The chest phantom with a vertebra (dense bone, 700 HU) below the lungs and a small sternum above them:
    anterior up, as the working orientation has it."""
    hu = phantom_hu(n_slices, size)
    yy, xx = np.mgrid[:size, :size]
    vertebra = np.hypot(yy - 0.78 * size, xx - 0.5 * size) < 0.06 * size
    sternum = (np.abs(yy - 0.16 * size) < 0.02 * size) & (np.abs(xx - 0.5 * size) < 0.03 * size)
    hu[:, vertebra | sternum] = 700.0
    return hu


def test_spine_votes_say_which_side_is_posterior():
    from covidct.analysis.lungs import spine_posterior_votes

    hu = _phantom_with_spine()
    res = segment_lungs_hu(hu, spacing=(5.0, 3.0, 3.0))
    assert spine_posterior_votes(hu, res.labels) == (8, 8)
    flipped = np.ascontiguousarray(hu[:, ::-1])   # upside down: the spine above the lungs
    assert spine_posterior_votes(flipped, np.ascontiguousarray(res.labels[:, ::-1])) == (0, 8)
    # no dense bone between the lungs (the plain phantom): no slice votes
    assert spine_posterior_votes(phantom_hu(8, 96), res.labels) == (0, 0)


def test_a_volume_upside_down_is_flagged_and_why(tmp_path, tiny_seg_model, capsys):
    """The same phantom as a NIfTI in the working orientation, with the posterior axis stated as anterior in its
    header (a wrong header) and with no orientation at all (qform and sform codes 0: nibabel reads ANALYZE's
    default axes, L A S, so it arrives upside down): only the last two get the note, in report.json, the HTML
    report and the printed summary, each with its cause; a volume without dense bone is left undetermined."""
    from covidct.analysis.scan import orientation_check

    hu = _phantom_with_spine(8, 80)
    data = hu.transpose(2, 1, 0).astype(np.int16)
    right_way = np.diag([-3.0, -3.0, -5.0, 1.0])
    wrong_way = np.diag([-3.0, 3.0, -5.0, 1.0])    # row index said to run anterior
    nib.save(nib.Nifti1Image(data, right_way), tmp_path / "as_stored.nii.gz")
    nib.save(nib.Nifti1Image(data, wrong_way), tmp_path / "wrong_header.nii.gz")
    bare = nib.Nifti1Image(data, None)
    bare.header.set_zooms((3.0, 3.0, 5.0))
    nib.save(bare, tmp_path / "no_orientation.nii.gz")
    expected = {"as_stored": ("as stored", True), "wrong_header": ("reversed", True),
                "no_orientation": ("reversed", False)}
    for name, (verdict, in_header) in expected.items():
        path = tmp_path / f"{name}.nii.gz"
        assert read(path).summary()["orientation_in_header"] is in_header
        out = tmp_path / f"out_{name}"
        capsys.readouterr()
        assert main(["analyze", str(path), "-o", str(out), "--model", str(tiny_seg_model), "--classifier",
                     "none"]) == 0
        printed = capsys.readouterr().out
        check = json.loads((out / "report.json").read_text())["input"]["orientation_check"]
        assert (check["anterior_posterior"], check["orientation_in_header"]) == (verdict, in_header)
        assert check["voting_slices"] == 8
        html_text = (out / "report.html").read_text() + (out / "viewer.html").read_text()
        assert ("upside down" in (out / "viewer.html").read_text()) == (verdict == "reversed")
        if verdict == "as stored":
            assert check["note"] is None and "upside down" not in printed and "upside down" not in html_text
        else:
            assert check["spine_posterior_slices"] == 0 and "upside down" in check["note"]
            assert ("gives no orientation" in check["note"]) == (not in_header)
            assert ("probably wrong" in check["note"]) == in_header
            assert f"note: {check['note']}" in printed and "upside down" in html_text
        # `covidct predict` on the same volume: the check per input in predictions.json, the note printed
        pred = tmp_path / f"pred_{name}"
        assert main(["predict", str(path), "-o", str(pred), "--model", str(tiny_seg_model)]) == 0
        item = json.loads((pred / "predictions.json").read_text())["inputs"][0]
        assert item["input"] == str(path) and item["orientation_check"] == check
        assert ("upside down" in capsys.readouterr().out) == (verdict == "reversed")
    plain = read(tmp_path / "as_stored.nii.gz")
    plain.array[:] = phantom_hu(8, 80)   # no bone
    lungs = segment_lungs_hu(plain.array, spacing=plain.spacing, affine=plain.affine).labels
    assert orientation_check(plain, lungs)["anterior_posterior"] == "undetermined"
    plain.is_hu = False
    assert orientation_check(plain, lungs) is None


def _phantom_with_anatomy(n_slices: int = 30, size: int = 96) -> np.ndarray:
    """A whole chest in the working orientation (slice 0 at the head, anterior up, the patient's right at the low
    columns): two lungs tapering to nothing at the apices and the bases, a mediastinum widening from the head
    (2 x 5 % of the width) to the feet (2 x 19 %, the heart), a vertebra behind, and near the bases a liver under
    the right lung three times the size of a spleen under the left; the body is fat (-100 HU)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    c = size / 2
    body = ((yy - c) / (0.42 * size)) ** 2 + ((xx - c) / (0.46 * size)) ** 2 < 1
    vertebra = np.hypot(yy - 0.8 * size, xx - c) < 0.06 * size
    hu = np.full((n_slices, size, size), -1000.0, np.float32)
    for k in range(n_slices):
        t = k / (n_slices - 1)
        taper = np.sin(np.pi * (k + 0.5) / n_slices)
        medial, half_width = (0.05 + 0.14 * t) * size, 0.1 * size * taper
        sl = np.where(body, -100.0, -1000.0)
        for side in (-1, 1):   # half ellipses, their flat medial border at the mediastinum
            lung = ((yy - c) / (0.28 * size * taper)) ** 2 + ((xx - c - side * medial) / (2 * half_width)) ** 2 < 1
            sl[lung & (side * (xx - c) >= medial)] = -850.0
        sl[vertebra] = 700.0
        if t >= 0.7:
            sl[np.hypot(yy - 0.45 * size, xx - 0.2 * size) < 0.12 * size] = 60.0   # liver (right)
            sl[np.hypot(yy - 0.45 * size, xx - 0.8 * size) < 0.07 * size] = 60.0   # spleen (left)
        hu[k] = sl + rng.normal(0, 10, (size, size))
    return hu


def test_head_feet_and_left_right_checks_flag_each_swapped_axis(tmp_path):
    """The anatomical phantom as a NIfTI stated in the working orientation is as stored on all three axes; the same
    voxels with the slice axis, or the column axis, stated the other way round in the header arrive with that axis
    reversed, and only that check says so, with its own note (rows and columns both: one note for the half turn); a scan that stops mid-chest (the feet half alone, where
    the mediastinum narrows towards the feet below the heart) is undetermined rather than called reversed."""
    from covidct.analysis.scan import orientation_check

    hu = _phantom_with_anatomy()
    data = hu.transpose(2, 1, 0).astype(np.int16)
    affines = {"as_stored": np.diag([-3.0, -3.0, -5.0, 1.0]),
               "head_feet": np.diag([-3.0, -3.0, 5.0, 1.0]),   # slice index said to run towards the head
               "left_right": np.diag([3.0, -3.0, -5.0, 1.0]),   # column index said to run towards the right
               "half_turn": np.diag([3.0, 3.0, -5.0, 1.0])}     # rows and columns both: a prone scan read as supine
    verdicts = {}
    for name, affine in affines.items():
        nib.save(nib.Nifti1Image(data, affine), tmp_path / f"{name}.nii.gz")
        vol = read(tmp_path / f"{name}.nii.gz")
        check = orientation_check(vol, segment_lungs_hu(vol.array, spacing=vol.spacing, affine=vol.affine).labels)
        verdicts[name] = (check["anterior_posterior"], check["head_feet"], check["left_right"])
        if name == "as_stored":
            assert check["note"] is None
            assert check["mediastinum_width_ratio"] > 1.3 and check["liver_side_ratio"] > 1.3
        elif name == "head_feet":
            assert "head and feet seem swapped" in check["note"] and "left and right" not in check["note"]
            assert check["mediastinum_width_ratio"] < 1 / 1.3
        elif name == "left_right":
            assert "left and right seem swapped" in check["note"] and "head and feet" not in check["note"]
            assert check["liver_side_ratio"] < 1 / 1.3
        else:   # one sentence for the two in-plane axes
            assert "turned by 180°" in check["note"] and "seem swapped" not in check["note"]
    assert verdicts == {"as_stored": ("as stored", "as stored", "as stored"),
                        "head_feet": ("as stored", "reversed", "as stored"),
                        "left_right": ("as stored", "as stored", "reversed"),
                        "half_turn": ("reversed", "as stored", "reversed")}
    vol = read(tmp_path / "as_stored.nii.gz")
    vol.array = np.ascontiguousarray(vol.array[15:])
    check = orientation_check(vol, segment_lungs_hu(vol.array, spacing=vol.spacing, affine=vol.affine).labels)
    assert (check["head_feet"], check["left_right"], check["mediastinum_width_ratio"]) == ("undetermined",) * 2 + (None,)


def test_a_swapped_head_feet_axis_reaches_the_report_and_the_batch_summary(tmp_path, tiny_seg_model, capsys):
    """Two scans in one command, the phantom stated rightly and with its slice axis stated feet first: only the second
    gets the note (report.json, report.html, printed under its line) and ``head_feet`` in ``orientation_reversed``."""
    data = _phantom_with_anatomy().transpose(2, 1, 0).astype(np.int16)
    for name, affine in (("right", np.diag([-3.0, -3.0, -5.0, 1.0])), ("feet_first", np.diag([-3.0, -3.0, 5.0, 1.0]))):
        nib.save(nib.Nifti1Image(data, affine), tmp_path / f"{name}.nii.gz")
    out = tmp_path / "out"
    assert main(["analyze", str(tmp_path / "right.nii.gz"), str(tmp_path / "feet_first.nii.gz"), "-o", str(out),
                 "--model", str(tiny_seg_model), "--classifier", "none", "--no-viewer"]) == 0
    printed = capsys.readouterr().out
    check = json.loads((out / "feet_first" / "report.json").read_text())["input"]["orientation_check"]
    assert check["head_feet"] == "reversed" and "probably wrong" in check["note"]
    assert check["note"] in printed and printed.count("head and feet seem swapped") == 1
    assert "head and feet seem swapped" in (out / "feet_first" / "report.html").read_text()
    right_page = (out / "right" / "report.html").read_text()
    assert "seem swapped" not in right_page
    # every axis's verdict and measure in the report's orientation row
    row = re.search(r"<td>orientation check</td><td>([^<]*)</td>", right_page).group(1)
    assert ("anterior–posterior as stored" in row and "head–feet as stored (mediastinum" in row
            and "left–right as stored (soft tissue" in row), row
    assert "head–feet reversed (mediastinum" in (out / "feet_first" / "report.html").read_text()
    with open(out / "summary.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["name"], r["orientation_reversed"]) for r in rows] == [("right", "none"), ("feet_first", "head_feet")]
    scans = json.loads((out / "summary.json").read_text())["scans"]
    assert [s["orientation_reversed"] for s in scans] == ["none", "head_feet"]


def test_reorient_anatomy_turns_a_mirrored_scan_back_and_writes_on_its_grid(tmp_path, tiny_seg_model, capsys):
    """The phantom, and the same voxels with the column axis stated the other way round (a mirrored header): with
    ``--reorient anatomy`` the second is analysed turned back, so its label maps (on its own grid, the same voxels)
    equal the first's value for value, its report names the axis and says so; without it the right and left lungs
    come out swapped."""
    data = _phantom_with_anatomy().transpose(2, 1, 0).astype(np.int16)
    for name, affine in (("right", np.diag([-3.0, -3.0, -5.0, 1.0])), ("mirrored", np.diag([3.0, -3.0, -5.0, 1.0]))):
        nib.save(nib.Nifti1Image(data, affine), tmp_path / f"{name}.nii.gz")
    common = ["--model", str(tiny_seg_model), "--classifier", "none", "--triage", "none", "--no-viewer"]
    out = tmp_path / "turned"
    assert main(["analyze", str(tmp_path / "right.nii.gz"), str(tmp_path / "mirrored.nii.gz"), "-o", str(out),
                 "--reorient", "anatomy", *common]) == 0
    assert "left-right turned back" in capsys.readouterr().out
    reports = {name: json.loads((out / name / "report.json").read_text()) for name in ("right", "mirrored")}
    assert reports["right"]["input"]["reoriented"] == [] and reports["mirrored"]["input"]["reoriented"] == ["left_right"]
    check = reports["mirrored"]["input"]["orientation_check"]
    assert check["left_right"] == "reversed"   # the file as stored; its note says what was done, not what went wrong
    assert check["note"].endswith("the analysis turned it back (--reorient anatomy)") and "run again" not in check["note"]

    def labels(folder, name):
        return np.asarray(nib.load(folder / f"{name}.nii.gz").dataobj)

    for name in ("lesions", "lungs"):
        assert np.array_equal(labels(out / "right", name), labels(out / "mirrored", name)), name
    right_lungs = labels(out / "right", "lungs")
    assert set(np.unique(right_lungs)) == {0, 1, 2}
    assert reports["mirrored"]["lesions"] == reports["right"]["lesions"]
    # without --reorient: the same voxels, the lungs' sides swapped
    assert main(["analyze", str(tmp_path / "mirrored.nii.gz"), "-o", str(tmp_path / "plain"), *common]) == 0
    plain = json.loads((tmp_path / "plain" / "report.json").read_text())
    assert plain["input"]["reoriented"] == [] and "turned back" not in capsys.readouterr().out
    assert "left and right seem swapped" in plain["input"]["orientation_check"]["note"]
    assert plain["input"]["orientation_check"]["note"].endswith("fix the orientation in the file and run again")
    assert np.array_equal(labels(tmp_path / "plain", "lungs"), np.where(right_lungs > 0, 3 - right_lungs, 0))


@pytest.mark.realdata
def test_real_scan_stored_the_right_way_up_and_upside_down():
    """cap001 as stored votes spine-posterior on nearly every slice (141 of 143 when written); the same voxels
    with the row axis stated the other way round in the affine vote the other way. Its head-feet and left-right
    checks agree with the file, and each flips with its axis."""
    from covidct.analysis.scan import orientation_check

    path = need_data("covid-ct-md", "cap001.nii.gz")
    vol = read(path)
    lungs = segment_lungs_hu(vol.array, spacing=vol.spacing, affine=vol.affine).labels
    check = orientation_check(vol, lungs)
    assert check["anterior_posterior"] == "as stored" and check["note"] is None
    assert check["spine_posterior_slices"] >= 0.9 * check["voting_slices"] > 100
    # head-feet and left-right: as stored (ratios 1.83 and 2.51 when written); each axis reversed is called reversed
    assert (check["head_feet"], check["left_right"]) == ("as stored", "as stored")
    stored = vol.array
    for axis, key in ((0, "head_feet"), (2, "left_right")):
        vol.array = np.ascontiguousarray(np.flip(stored, axis=axis))
        check = orientation_check(vol, segment_lungs_hu(vol.array, spacing=vol.spacing, affine=vol.affine).labels)
        assert check[key] == "reversed" and check["anterior_posterior"] == "as stored", key
    vol.array = stored
    flipped = vol.array[:, ::-1]
    vol.array = np.ascontiguousarray(flipped)
    check = orientation_check(vol, np.ascontiguousarray(lungs[:, ::-1]))
    assert check["anterior_posterior"] == "reversed" and check["spine_posterior_slices"] <= 0.1 * check["voting_slices"]


@pytest.mark.realdata
def test_real_scan_without_orientation_turned_back_equals_the_original(tmp_path, capsys):
    """cap001 written without orientation (read with ANALYZE's default axes: upside down and feet first) and analysed
    with --reorient anatomy: both axes turned back, and its lesion and lung maps equal cap001's voxel for voxel."""
    src = nib.load(need_data("covid-ct-md", "cap001.nii.gz"))
    bare = nib.Nifti1Image(np.asarray(src.dataobj), None)
    bare.header.set_zooms(tuple(float(z) for z in src.header.get_zooms()[:3]))
    nib.save(bare, tmp_path / "bare.nii.gz")
    out = tmp_path / "out"
    assert main(["analyze", str(need_data("covid-ct-md", "cap001.nii.gz")), str(tmp_path / "bare.nii.gz"), "-o",
                 str(out), "--reorient", "anatomy", "--classifier", "none", "--triage", "none", "--no-viewer"]) == 0
    report = json.loads((out / "bare" / "report.json").read_text())
    assert sorted(report["input"]["reoriented"]) == ["anterior_posterior", "head_feet"]
    assert json.loads((out / "cap001" / "report.json").read_text())["input"]["reoriented"] == []
    for name in ("lesions", "lungs"):
        original, turned = (np.asarray(nib.load(out / d / f"{name}.nii.gz").dataobj) for d in ("cap001", "bare"))
        assert original.any() and np.array_equal(original, turned), name


def test_analyze_folder_with_two_series_takes_the_largest(tmp_path, tiny_seg_model, capsys):
    write_ct_series(tmp_path / "study" / "a", phantom_hu(6, 80), spacing=(5.0, 3.0, 3.0), series_uid="1.2.840.1")
    write_ct_series(tmp_path / "study" / "b", phantom_hu(3, 80), spacing=(5.0, 3.0, 3.0), series_uid="1.2.840.2")
    out = tmp_path / "out"
    assert main(["analyze", str(tmp_path / "study"), "-o", str(out), "--model", str(tiny_seg_model)]) == 0
    assert "analysed the largest axial CT one, 1.2.840.1" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["input"]["series_chosen"] == "1.2.840.1" and report["input"]["shape"][0] == 6
    assert [s["n_files"] for s in report["input"]["series_available"]] == [6, 3]
    assert "folder holds 2 series: analysed the largest axial CT one, 1.2.840.1" in (out / "report.html").read_text()
    # a DICOM SEG in the study (here our own, of the lungs) has more frames than the CT has slices: still the CT
    assert main(["analyze", str(tmp_path / "study" / "a"), "-o", str(tmp_path / "seg"), "--model", str(tiny_seg_model),
                 "--dicom-seg", "--no-viewer"]) == 0
    (tmp_path / "study" / "b" / "lungs.seg.dcm").write_bytes((tmp_path / "seg" / "lungs.seg.dcm").read_bytes())
    assert main(["analyze", str(tmp_path / "study"), "-o", str(tmp_path / "out2"), "--model", str(tiny_seg_model),
                 "--no-viewer"]) == 0
    report = json.loads((tmp_path / "out2" / "report.json").read_text())
    seg_row = [s for s in report["input"]["series_available"] if s["modality"] == "SEG"]
    assert report["input"]["series_chosen"] == "1.2.840.1" and seg_row and seg_row[0]["n_images"] > 6
    assert [s["modality"] for s in report["input"]["series_available"]] == ["CT", "CT", "SEG"]
    from covidct.report.batch import scan_jobs

    assert len(scan_jobs([tmp_path / "study"], series="all")) == 2   # --series all: the CT series only


def test_analyze_says_when_slice_gaps_are_uneven(tmp_path, tiny_seg_model, capsys):
    import pydicom

    paths = write_ct_series(tmp_path / "s", phantom_hu(6, 80), spacing=(5.0, 3.0, 3.0))
    next(p for p in paths if int(pydicom.dcmread(p, stop_before_pixels=True).InstanceNumber) == 3).unlink()
    out = tmp_path / "out"
    assert main(["analyze", str(tmp_path / "s"), "-o", str(out), "--model", str(tiny_seg_model)]) == 0
    assert "note: uneven slice gaps (5.0-10.0 mm, after slices [1]" in capsys.readouterr().out
    gaps = json.loads((out / "report.json").read_text())["input"]["uneven_slice_gaps"]
    assert gaps == {"median_mm": 5.0, "min_mm": 5.0, "max_mm": 10.0, "after_slices": [1]}
    assert "uneven slice gaps (5.0-10.0 mm" in (out / "report.html").read_text()


def test_analyze_says_when_slices_have_no_positions(tmp_path, tiny_seg_model, capsys):
    import pydicom

    for path in write_ct_series(tmp_path / "s", phantom_hu(6, 80), spacing=(5.0, 3.0, 3.0)):
        ds = pydicom.dcmread(path)
        del ds.ImagePositionPatient
        ds.save_as(path)
    out = tmp_path / "out"
    assert main(["analyze", str(tmp_path / "s"), "-o", str(out), "--model", str(tiny_seg_model)]) == 0
    note = "6 of 6 slices without ImagePositionPatient: ordered by InstanceNumber, 5 mm apart"
    assert f"note: {note}" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert note in report["input"]["slice_positions"] and report["input"]["spacing_mm"] == [5.0, 3.0, 3.0]
    assert note in (out / "report.html").read_text()


def test_lesion_region_does_not_fill_a_crescent():
    """At the lung bases the lung wraps around the diaphragm dome: the region where lesions may lie
    must hug the lung (closing), not fill the crescent's hollow (as a convex hull would)."""
    from covidct.analysis.scan import _lesion_region

    yy, xx = np.mgrid[:200, :200]
    outer = (yy - 150) ** 2 + (xx - 100) ** 2 < 90 ** 2
    inner = (yy - 160) ** 2 + (xx - 100) ** 2 < 75 ** 2
    crescent = (outer & ~inner & (yy < 170)).astype(np.uint8) * RIGHT
    region = _lesion_region(crescent, radius_px=8)
    assert region[crescent > 0].all()
    assert not region[150, 100]                 # the hollow (abdomen) stays out
    notch = crescent.copy()
    notch[70:74, 95:105] = 0                    # a dense lesion cut out of the air mask
    assert _lesion_region(notch, radius_px=8)[72, 100] == RIGHT


def test_lung_coverage_says_when_the_lungs_run_off_the_scan():
    from covidct.analysis.scan import COVERAGE_EDGE_MM2, lung_coverage

    lungs = np.zeros((6, 20, 20), np.uint8)
    lungs[1:5, 5:15, 5:15] = 1                        # apex to base inside the scan
    lungs[0, 5:7, 5:7] = 1                            # a sliver on the first slice: 4 mm², under the bound
    cov = lung_coverage(lungs, pixel_mm2=1.0)
    assert (cov["first_slice"], cov["last_slice"]) == (0, 4) and cov["lung_mm2_on_first_slice"] == 4.0
    assert not cov["cut_at_head"] and not cov["cut_at_feet"] and cov["note"] is None and COVERAGE_EDGE_MM2 > 4
    lungs[5, 5:15, 5:15] = 2                          # 100 mm² on the last slice: the bases run off the scan
    cov = lung_coverage(lungs, pixel_mm2=1.0)
    assert cov["cut_at_feet"] and not cov["cut_at_head"]
    assert "feet-end slice (1.0 cm² of lung)" in cov["note"] and "lung bases" in cov["note"] and "apices" not in cov["note"]


def test_slice_infection_probability_keeps_large_lesions_ranked():
    from covidct.analysis.scan import slice_infection_probability

    areas = np.array([0.0, 50.0, 100.0, 1500.0, 3000.0, 20000.0])
    p = slice_infection_probability(areas)
    assert p[0] == 0.0 and p[2] == pytest.approx(0.5)
    # still strictly increasing after the report's rounding to 6 decimals, far beyond 14 cm²
    assert np.all(np.diff(np.round(p, 6)) > 0) and p[-1] < 1.0


def test_small_lesion_components_are_dropped_in_3d():
    from scipy import ndimage

    from covidct.analysis.scan import MIN_LESION_ML, _drop_small_lesions

    rng = np.random.default_rng(3)
    lesions = (ndimage.gaussian_filter(rng.random((30, 80, 80)), 1.5) > 0.56).astype(np.uint8)
    lesions[lesions > 0] = rng.integers(1, 4, int((lesions > 0).sum()))
    voxel_ml = 0.004                      # 0.1 mL = 25 voxels
    lab, n = ndimage.label(lesions > 0)
    sizes = np.bincount(lab.ravel())
    expected = lesions.copy()
    expected[(sizes * voxel_ml < MIN_LESION_ML)[lab] & (lab > 0)] = 0
    assert 0 < int((expected > 0).sum()) < int((lesions > 0).sum())  # some components go, some stay
    _drop_small_lesions(lesions, None, voxel_ml)
    assert np.array_equal(lesions, expected)
    # more components than 16-bit labels hold (labelled again in 32 bits): every isolated voxel goes
    speckle = np.zeros((1, 600, 600), np.uint8)
    speckle[0, ::2, ::2] = 1                        # 90,000 one-voxel components
    speckle[0, :44, :44] = 0
    speckle[0, :40, :40] = 2                        # and one large one, apart from them, that stays
    _drop_small_lesions(speckle, None, voxel_ml)
    assert int((speckle > 0).sum()) == 40 * 40 and (speckle[0, :40, :40] == 2).all()


def test_analyze_several_scans_and_every_series(tmp_path, tiny_seg_model, capsys, monkeypatch):
    """Several inputs: one subfolder each, the models loaded once, a summary row per scan; a bad input
    is one error line and the others go on (exit 2); ``--series all`` analyses each series of a folder."""
    import csv

    import covidct.models.registry as registry

    write_ct_series(tmp_path / "study" / "a", phantom_hu(6, 80), spacing=(5.0, 3.0, 3.0), series_uid="1.2.840.1")
    write_ct_series(tmp_path / "study" / "b", phantom_hu(3, 80), spacing=(5.0, 3.0, 3.0), series_uid="1.2.840.2")
    write_nifti(tmp_path / "v.nii.gz", phantom_hu(4, 64, seed=1), spacing=(5.0, 3.0, 3.0))
    (tmp_path / "other").mkdir()
    write_nifti(tmp_path / "other" / "v.nii.gz", phantom_hu(4, 64, seed=2), spacing=(5.0, 3.0, 3.0))
    loads = []
    real = registry.load_seg_model
    monkeypatch.setattr(registry, "load_seg_model", lambda spec: loads.append(spec) or real(spec))
    out = tmp_path / "out"
    args = ["--model", str(tiny_seg_model), "--triage", "none", "--classifier", "none", "--no-viewer"]
    code = main(["analyze", str(tmp_path / "v.nii.gz"), str(tmp_path / "missing.nii.gz"),
                 str(tmp_path / "other" / "v.nii.gz"), str(tmp_path / "study"), "--series", "all", "-o", str(out), *args])
    captured = capsys.readouterr()
    assert code == 2 and len(loads) == 1                             # one bad input; the model loaded once
    err = [line for line in captured.err.splitlines() if line.startswith("covidct: error:")]
    assert len(err) == 1 and str(tmp_path / "missing.nii.gz") in err[0] and "no such file" in err[0]
    with open(out / "summary.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["name"] for r in rows] == ["v", "missing", "v-2", "study-s1", "study-s2"]   # unique names
    assert [r["status"] for r in rows] == ["ok", "error", "ok", "ok", "ok"]
    assert [r["series_uid"] for r in rows[3:]] == ["1.2.840.1", "1.2.840.2"]
    # each series read from its own subfolder (only its headers scanned); one nested in another's folder is not
    assert [r["input"] for r in rows[3:]] == [str(tmp_path / "study" / "a"), str(tmp_path / "study" / "b")]
    from covidct.io.dicom import list_series

    write_ct_series(tmp_path / "mixed", phantom_hu(3, 32), spacing=(5.0, 3.0, 3.0), series_uid="1.2.840.3")
    write_ct_series(tmp_path / "mixed" / "sub", phantom_hu(2, 32), spacing=(5.0, 3.0, 3.0), series_uid="1.2.840.4")
    assert [(s["series_uid"], s["folder"]) for s in list_series(tmp_path / "mixed")] == [
        ("1.2.840.3", tmp_path / "mixed"), ("1.2.840.4", tmp_path / "mixed" / "sub")]
    for r in rows:
        assert (out / r["name"] / "report.json").exists() == (r["status"] == "ok")   # nothing for the failed one
    study2 = json.loads((out / "study-s2" / "report.json").read_text())
    assert study2["input"]["shape"][0] == 3 and study2["input"]["series_uid"] == "1.2.840.2"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_scans"] == 5 and summary["n_failed"] == 1 and "not for diagnosis" in summary["disclaimer"]
    one = json.loads((out / "v" / "report.json").read_text())
    assert float(rows[0]["total_percent"]) == pytest.approx(one["lesions"]["total"]["percent_of_lung"])
    assert "[5/5] study-s2" in captured.out and "1 failed" in captured.out
    # each scan's notes (here: the phantoms' lungs reach both ends of the scan) in the summary, printed under
    # the scan's line and on the start page of `covidct serve`
    from covidct.report.notes import report_notes
    from covidct.serve import index_page

    assert one["lung_coverage"]["note"] and report_notes(one)[-1] == one["lung_coverage"]["note"]
    assert summary["scans"][0]["notes"] == report_notes(one)
    assert rows[0]["notes"] == " | ".join(report_notes(one)) and rows[1]["notes"] == ""
    assert f"    note: {one['lung_coverage']['note']}" in captured.out
    import html as html_lib

    assert html_lib.escape(one["lung_coverage"]["note"]) in index_page(out)


def test_analyze_writes_a_dicom_seg_for_dicom_series_only(tmp_path, tiny_seg_model, capsys):
    write_ct_series(tmp_path / "s", phantom_hu(4, 64), spacing=(5.0, 3.0, 3.0))
    args = ["--model", str(tiny_seg_model), "--triage", "none", "--classifier", "none", "--no-viewer", "--dicom-seg"]
    assert main(["analyze", str(tmp_path / "s"), "-o", str(tmp_path / "out"), *args]) == 0
    assert "lungs.seg.dcm" in capsys.readouterr().out
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["dicom_seg"]["lungs_file"] == "lungs.seg.dcm"
    import highdicom as hd

    seg = hd.seg.segread(tmp_path / "out" / "lungs.seg.dcm")
    assert [d.SegmentLabel for d in seg.SegmentSequence] == ["Right lung", "Left lung"]   # the phantom has lungs
    assert len(seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence) == 4
    assert seg.SeriesInstanceUID == report["dicom_seg"]["series_uid"]
    lesion_file = report["dicom_seg"]["file"]       # the untrained tiny model may or may not mark a lesion
    assert (tmp_path / "out" / "lesions.seg.dcm").exists() == (lesion_file == "lesions.seg.dcm")
    assert lesion_file or report["dicom_seg"]["note"] == "lesions.seg.dcm not written: no lesion voxel"
    write_nifti(tmp_path / "v.nii.gz", phantom_hu(4, 64), spacing=(5.0, 3.0, 3.0))
    assert main(["analyze", str(tmp_path / "v.nii.gz"), "-o", str(tmp_path / "out2"), *args]) == 0
    assert "not a DICOM series" in capsys.readouterr().out and not (tmp_path / "out2" / "lesions.seg.dcm").exists()


def test_analyze_a_coronal_series_like_its_axial_twin(tmp_path, tiny_seg_model):
    """The same voxels stored as coronal images: resliced on reading, analysed like the axial series (same lung
    volume, burden and lesion map on the same world grid)."""
    import nibabel as nib

    hu = phantom_hu(6, 80)
    write_ct_series(tmp_path / "axial", hu, spacing=(5.0, 3.0, 3.0))
    write_ct_series(tmp_path / "coronal", hu, spacing=(5.0, 3.0, 3.0), coronal=True)
    reports = {}
    for name in ("axial", "coronal"):
        assert main(["analyze", str(tmp_path / name), "-o", str(tmp_path / f"out_{name}"), "--model", str(tiny_seg_model),
                     "--no-viewer"]) == 0
        reports[name] = json.loads((tmp_path / f"out_{name}" / "report.json").read_text())
    for key in ("lung_volume_ml", "lesions", "percent_opacity", "severity_score"):
        assert reports["coronal"][key] == reports["axial"][key]
    assert reports["coronal"]["input"]["shape"] == [6, 80, 80] and reports["coronal"]["input"]["files_read"] == 80
    maps = [nib.load(tmp_path / f"out_{name}" / "lesions.nii.gz") for name in ("axial", "coronal")]
    np.testing.assert_array_equal(maps[0].get_fdata(), maps[1].get_fdata())
    np.testing.assert_allclose(maps[0].affine, maps[1].affine, atol=1e-6)


def test_every_series_of_a_zipped_study_becomes_a_job_read_from_the_archive(tmp_path):
    import zipfile

    from covidct.report.batch import scan_jobs

    write_ct_series(tmp_path / "x" / "A", phantom_hu(3, 32), series_uid="1.2.840.80")
    write_ct_series(tmp_path / "x" / "B", phantom_hu(5, 32), series_uid="1.2.840.90")
    archive = tmp_path / "study.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in sorted((tmp_path / "x").rglob("*.dcm")):
            zf.write(f, f.relative_to(tmp_path / "x"))
    jobs = scan_jobs([archive], series="all")
    assert [(j.path, j.series_uid, j.name) for j in jobs] == [
        (archive, "1.2.840.90", "study-s1"), (archive, "1.2.840.80", "study-s2")]   # the larger series first
    assert read(jobs[1].path, series_uid=jobs[1].series_uid).shape == (3, 32, 32)


class _LeftHalfGGO:
    """A stand-in segmentation predictor: GGO on the left half of every image it is given (so the result
    shows which way the slice was turned on its way in)."""

    has_lung = True
    pixel_mm: float | None = None      # the pixel size the last call was given

    def predict(self, images, *, pixel_mm=None):
        from covidct.engine.infer import SegPrediction

        self.pixel_mm = pixel_mm
        out = []
        for im in images:
            labels = np.zeros(im.shape, np.uint8)
            labels[:, : im.shape[1] // 2] = 1
            out.append(SegPrediction(labels=labels, probs=np.zeros((4, *im.shape), np.float32),
                                     lung_prob=np.ones(im.shape, np.float32)))
        return out


@pytest.mark.parametrize("orientation", ["training", "working"])
def test_volume_slices_reach_the_model_in_the_training_orientation(tmp_path, orientation):
    """The training slices have the anterior side at the left edge: an oriented volume's slices (anterior
    up) are turned a quarter on the way in and the labels back, so the model's 'left' lands anterior
    (the top rows); with --slice-orientation working the model's left stays the patient's right."""
    from covidct.analysis.scan import analyze_volume

    hu = phantom_hu(4, 64)
    write_nifti(tmp_path / "v.nii.gz", hu, spacing=(5.0, 3.0, 3.0))
    vol = read(tmp_path / "v.nii.gz")
    predictor = _LeftHalfGGO()
    result = analyze_volume(vol, predictor, progress=False, slice_orientation=orientation)
    assert predictor.pixel_mm == pytest.approx(3.0)   # the density split smooths in mm on a scan
    k = int(np.argmax((result.lesions > 0).sum(axis=(1, 2))))
    rows, cols = np.nonzero(result.lesions[k])
    lung_rows, lung_cols = np.nonzero(result.lungs[k])
    if orientation == "training":    # the anterior part of the lungs: rows above their middle
        assert rows.max() <= (lung_rows.min() + lung_rows.max()) // 2 + 1
        assert cols.min() <= lung_cols.min() + 1 and cols.max() >= lung_cols.max() - 1
    else:                            # the image's left part of the lungs
        assert cols.max() <= (lung_cols.min() + lung_cols.max()) // 2 + 1
        assert rows.min() <= lung_rows.min() + 1 and rows.max() >= lung_rows.max() - 1
    with pytest.raises(ValueError, match="slice_orientation"):
        analyze_volume(vol, _LeftHalfGGO(), progress=False, slice_orientation="sideways")
    # each slice's lesion area split by lung side: in the working orientation the image's left half is the
    # patient's right lung (radiological view); turned, the anterior half holds lesions in both lungs
    with_lesions = [s for s in result.slices if s["lesion_area_mm2"] > 0]
    assert with_lesions
    for s in result.slices:
        assert s["right_lesion_area_mm2"] + s["left_lesion_area_mm2"] == pytest.approx(s["lesion_area_mm2"], abs=0.02)
    if orientation == "working":
        assert all(s["left_lesion_area_mm2"] == 0 for s in result.slices)
    else:
        assert all(s["left_lesion_area_mm2"] > 0 and s["right_lesion_area_mm2"] > 0 for s in with_lesions)


@pytest.mark.parametrize("trained_on", ["anterior-up", "any"])
def test_a_model_trained_anterior_up_or_in_every_orientation_gets_slices_as_read(tmp_path, trained_on):
    """The turn comes from the model's checkpoint (``slice_orientation``), not from a constant."""
    from types import SimpleNamespace

    from covidct.analysis.scan import analyze_volume, model_turns
    from covidct.engine.train_seg import SegTrainConfig

    write_nifti(tmp_path / "v.nii.gz", phantom_hu(4, 64), spacing=(5.0, 3.0, 3.0))
    vol = read(tmp_path / "v.nii.gz")
    predictor = _LeftHalfGGO()
    predictor.model = SimpleNamespace(config=SimpleNamespace(slice_orientation=trained_on))
    assert model_turns(vol, predictor) == 0 and model_turns(vol, _LeftHalfGGO()) == 1
    # an orientation-free main network beside an anterior-left effusion companion: turned for the companion
    paired = _LeftHalfGGO()
    paired.model = SimpleNamespace(config=SimpleNamespace(slice_orientation="any"))
    paired.effusion = SimpleNamespace(config=SimpleNamespace(slice_orientation="anterior-left"))
    assert model_turns(vol, paired) == 1
    assert model_turns(vol, paired, "working") == 0
    turned_as_read = analyze_volume(vol, predictor, progress=False)
    as_read = analyze_volume(vol, _LeftHalfGGO(), progress=False, slice_orientation="working")
    np.testing.assert_array_equal(turned_as_read.lesions, as_read.lesions)
    # the trainer records what it trained on
    cfg = SegTrainConfig(data=["x"], quarter_turns=trained_on == "any",
                         data_orientation="anterior-up" if trained_on == "anterior-up" else "anterior-left")
    assert cfg.model_config().slice_orientation == trained_on
    assert SegTrainConfig(data=["x"]).model_config().slice_orientation == "anterior-left"


def test_images_of_unknown_orientation_reach_the_model_as_they_are(tmp_path):
    from PIL import Image

    from covidct.analysis.scan import analyze_volume

    (tmp_path / "slices").mkdir()
    for i in range(2):
        Image.fromarray(np.full((40, 48), 90 + i, np.uint8)).save(tmp_path / "slices" / f"{i}.png")
    vol = read(tmp_path / "slices")
    assert vol.kind == "image-folder"
    predictor = _LeftHalfGGO()
    result = analyze_volume(vol, predictor, progress=False)           # slice_orientation "training"
    assert predictor.pixel_mm is None                                   # no pixel size: pixels of the slice
    cols = np.nonzero(result.lesions[0])[1]
    assert cols.size and cols.max() < 24                                # the image's left half, not turned


@pytest.mark.parametrize("turns", [0, 1, 2, 3, -1])
def test_boxes_found_on_a_turned_slice_map_back_onto_it(turns):
    from covidct.report.slices import turn_boxes_back

    mask = np.zeros((30, 50), bool)
    mask[4:11, 20:44] = True                      # box (x1, y1, x2, y2) = (20, 4, 44, 11)
    turned = np.rot90(mask, turns)
    rows, cols = np.nonzero(turned)
    box_on_turned = [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]
    np.testing.assert_allclose(turn_boxes_back(np.array([box_on_turned]), turns, mask.shape), [[20, 4, 44, 11]])


def test_viewer_page_script_moves_through_slices_and_windows(tmp_path):
    """The viewer's JavaScript run in jsdom (installed by scripts/install.sh): arrow keys move through the
    slices, the window menu and the key ``w`` switch the picture to the same slice in another window, the
    overlay check box hides the overlay; no script errors."""
    import shutil
    import subprocess
    from pathlib import Path

    from covidct.report.viewer import write_viewer

    modules = Path(__file__).resolve().parents[1] / ".venv" / "js" / "node_modules"
    if shutil.which("node") is None or not (modules / "jsdom").is_dir():
        pytest.skip("node or jsdom missing (scripts/install.sh installs jsdom when npm is available)")
    lesions = np.zeros((4, 40, 60), np.uint8)
    lesions[1:, 10:20, 10:30] = 1
    lungs = np.ones_like(lesions)
    slices = [{"index": k, "infection_probability": 0.2 * k, "lesion_percent": [0, 5, 9, 3][k]} for k in range(4)]
    page = tmp_path / "viewer.html"
    write_viewer(page, lambda k: np.full((40, 60), 0.2 + 0.2 * k), lesions, lungs, slices,
                 extra_windows={"mediastinum": lambda k: np.full((40, 60), 0.05 + 0.1 * k)})
    run = subprocess.run(["node", str(Path(__file__).parent / "js" / "viewer_check.js"), str(page)],
                         capture_output=True, text=True, timeout=60, env={**os.environ, "NODE_PATH": str(modules)})
    assert run.returncode == 0, run.stderr
    steps = json.loads(run.stdout)
    assert steps["options"] == ["lung", "mediastinum"] and not steps["disabled"] and steps["errors"] == []
    assert (steps["start"]["slice"], steps["start"]["window"]) == (2, "lung")        # the most affected slice
    assert (steps["down"]["slice"], steps["down"]["window"]) == (3, "lung")
    assert (steps["w"]["slice"], steps["w"]["window"]) == (3, "mediastinum")          # same slice, other window
    assert (steps["up"]["slice"], steps["up"]["window"]) == (2, "mediastinum")        # the window stays
    assert steps["w_again"]["window"] == "lung" and steps["select_last"]["window"] == "mediastinum"
    assert steps["slider0"]["slice"] == 0 and steps["slider0"]["where"].startswith("1 / 4")
    assert steps["start"]["overlay"] == "block" and steps["hidden"]["overlay"] == "none"
