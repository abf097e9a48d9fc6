"""Reconstructions unlike the open scans': the noise index of HU volumes, the smoothing a noisy scan's slices get on
their way into the models, the choice among reconstructions of one scan, and thick slices."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import need_data, phantom_hu, write_ct_series, write_nifti
from covidct.cli import main
from covidct.io import read
from covidct.io.noise import (MAX_SIGMA_MM, REFERENCE_HU, SMOOTH_ABOVE_HU, noise_plan, sample_slices, smoothed,
                              smoothed_box, soft_tissue_sd)


def _tissue_slices(sd: float, n: int = 4, size: int = 128, seed: int = 0) -> np.ndarray:
    """Slices of 40 HU soft tissue in air with white noise of ``sd`` HU."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    body = np.hypot(yy - size / 2, xx - size / 2) < 0.45 * size
    base = np.where(body, 40.0, -1000.0).astype(np.float32)
    return np.stack([base + rng.normal(0, sd, base.shape).astype(np.float32) for _ in range(n)])


@pytest.mark.parametrize("sd", [10.0, 40.0, 90.0])
def test_soft_tissue_index_reads_the_noise_of_white_noise(sd):
    index = soft_tissue_sd(list(_tissue_slices(sd)))
    assert index == pytest.approx(sd, rel=0.1)
    # a Gaussian lowers it; wider lowers it more
    assert soft_tissue_sd(list(_tissue_slices(sd)), 1.0) < 0.5 * index
    assert soft_tissue_sd(list(_tissue_slices(sd)), 2.0) < soft_tissue_sd(list(_tissue_slices(sd)), 1.0)


def test_no_soft_tissue_no_index():
    air = np.full((3, 64, 64), -1000.0, np.float32)
    assert soft_tissue_sd(list(air)) is None
    plan = noise_plan(air, pixel_mm=0.7)
    assert plan["soft_tissue_sd_hu"] is None and not plan["smoothed"] and plan["sigma_px"] == 0


def test_sample_slices_spread_over_the_middle_half():
    assert sample_slices(148) == sorted(set(sample_slices(148)))
    assert len(sample_slices(148)) == 12 and min(sample_slices(148)) == 37 and max(sample_slices(148)) == 110
    assert sample_slices(5) == [0, 1, 2, 3, 4] and sample_slices(1) == [0]


def test_a_quiet_scan_is_measured_and_left_alone():
    vol = _tissue_slices(15.0)
    before = vol.copy()
    plan = noise_plan(vol, pixel_mm=0.7)
    assert plan["soft_tissue_sd_hu"] == pytest.approx(15.0, rel=0.1) and plan["soft_tissue_sd_hu"] < SMOOTH_ABOVE_HU
    assert not plan["smoothed"] and plan["sigma_px"] == 0 and plan["sigma_mm"] is None
    assert np.array_equal(vol, before)


def test_a_noisy_scan_gets_the_narrowest_gaussian_that_reaches_the_reference():
    vol = _tissue_slices(90.0).astype(np.int16)
    before = vol.copy()
    plan = noise_plan(vol, pixel_mm=0.5)
    assert plan["smoothed"] and plan["soft_tissue_sd_hu"] > SMOOTH_ABOVE_HU
    assert plan["soft_tissue_sd_after_hu"] <= REFERENCE_HU
    narrower = round(plan["sigma_px"] - 0.1, 1)
    assert soft_tissue_sd(list(vol[sample_slices(len(vol))]), narrower) > REFERENCE_HU   # the narrowest one
    assert plan["sigma_mm"] == pytest.approx(plan["sigma_px"] * 0.5, abs=1e-3)
    assert np.array_equal(vol, before)            # the plan does not touch the volume
    # without smoothing: measured, not planned
    off = noise_plan(vol, pixel_mm=0.5, smooth=False)
    assert not off["smoothed"] and off["soft_tissue_sd_hu"] == plan["soft_tissue_sd_hu"]


def test_the_gaussian_is_capped_in_millimetres():
    vol = _tissue_slices(200.0)
    plan = noise_plan(vol, pixel_mm=2.0)          # the cap: 1.5 mm = 0.75 px
    assert plan["smoothed"] and plan["sigma_px"] <= MAX_SIGMA_MM / 2.0
    assert plan["soft_tissue_sd_after_hu"] > REFERENCE_HU   # not reached: said as it is


def test_smoothed_box_equals_the_box_of_the_smoothed_slice():
    hu = np.random.default_rng(3).normal(0, 60, (90, 70)).astype(np.int16)
    for box in [(slice(0, 90), slice(0, 70)), (slice(5, 30), slice(40, 70)), (slice(60, 89), slice(1, 9)),
                (slice(None), slice(10, None))]:
        for sigma in (0.4, 1.3, 2.9):
            assert np.array_equal(smoothed_box(hu, box, sigma), smoothed(hu, sigma)[box])
    assert smoothed(hu, 0.0) is hu


def _noisy_phantom(extra_sd: float) -> np.ndarray:
    hu = phantom_hu(6, 96)
    return hu + np.random.default_rng(5).normal(0, extra_sd, hu.shape).astype(np.float32)


class _RecordingPredictor:
    """Stands in for the segmentation predictor: records what it is given, finds nothing."""

    has_lung = True

    def __init__(self) -> None:
        self.images: list[np.ndarray] = []

    def predict(self, images, *, pixel_mm=None):
        from covidct.engine.infer import SegPrediction

        self.images += [np.array(im) for im in images]
        return [SegPrediction(labels=np.zeros(im.shape, np.uint8), probs=np.zeros((4, *im.shape), np.float32),
                              lung_prob=np.ones(im.shape, np.float32)) for im in images]


def test_the_models_see_a_noisy_scan_smoothed_and_the_scan_stays_as_read(tmp_path):
    from covidct.analysis.scan import analyze_volume

    write_nifti(tmp_path / "v.nii.gz", _noisy_phantom(90.0), spacing=(5.0, 0.7, 0.7))
    runs = {}
    for denoise in (True, False):
        vol = read(tmp_path / "v.nii.gz")
        as_read = np.array(vol.array)
        predictor = _RecordingPredictor()
        result = analyze_volume(vol, predictor, progress=False, denoise=denoise, require_lungs=False)
        assert np.array_equal(vol.array, as_read)           # lungs, viewer and overlays use the slices as read
        runs[denoise] = (result, predictor.images)
    on, off = runs[True][0], runs[False][0]
    assert on.noise["smoothed"] and on.smoothing_sigma_px > 0 and not off.noise["smoothed"]
    assert on.noise["soft_tissue_sd_hu"] == off.noise["soft_tissue_sd_hu"] > SMOOTH_ABOVE_HU
    assert np.array_equal(on.lungs, off.lungs)              # the lungs come from the slices as read
    # the same crops, smoother: neighbouring pixels differ less
    rough = [float(np.abs(np.diff(im, axis=1)).mean()) for im in runs[False][1]]
    smooth = [float(np.abs(np.diff(im, axis=1)).mean()) for im in runs[True][1]]
    assert len(rough) == len(smooth) > 0 and all(s < 0.6 * r for s, r in zip(smooth, rough))


def test_analyze_reports_the_noise_the_kernel_and_what_was_done(tmp_path, tiny_seg_model, capsys):
    write_ct_series(tmp_path / "sharp", _noisy_phantom(90.0), spacing=(5.0, 3.0, 3.0), kernel="B70f")
    write_ct_series(tmp_path / "soft", phantom_hu(6, 96), spacing=(5.0, 3.0, 3.0), kernel="B30f")
    reports, printed = {}, {}
    for name, series, extra in (("auto", "sharp", []), ("none", "sharp", ["--denoise", "none"]), ("soft", "soft", [])):
        out = tmp_path / name
        assert main(["analyze", str(tmp_path / series), "-o", str(out), "--model", str(tiny_seg_model), "--triage",
                     "none", "--classifier", "none", "--no-viewer", *extra]) == 0
        reports[name] = json.loads((out / "report.json").read_text())
        printed[name] = capsys.readouterr().out
    auto, none, soft = (reports[k]["input"] for k in ("auto", "none", "soft"))
    assert auto["convolution_kernel"] == "B70f" and soft["convolution_kernel"] == "B30f"
    assert auto["noise"]["smoothed"] and auto["noise"]["sigma_mm"] == pytest.approx(3.0 * auto["noise"]["sigma_px"])
    assert not none["noise"]["smoothed"] and none["noise"]["soft_tissue_sd_hu"] == auto["noise"]["soft_tissue_sd_hu"]
    assert not soft["noise"]["smoothed"] and soft["noise"]["soft_tissue_sd_hu"] < SMOOTH_ABOVE_HU
    assert "reached the models smoothed in-plane" in printed["auto"]
    assert "not smoothed (--denoise none), so ground glass is likely overstated" in printed["none"]
    assert "noisier" not in printed["soft"]
    assert "reached the models smoothed" in (tmp_path / "auto" / "report.html").read_text()
    # a batch's summary: each scan's index and the Gaussian its slices got
    assert main(["analyze", str(tmp_path / "sharp"), str(tmp_path / "soft"), "-o", str(tmp_path / "batch"), "--model",
                 str(tiny_seg_model), "--triage", "none", "--classifier", "none", "--no-viewer"]) == 0
    rows = {r["name"]: r for r in json.loads((tmp_path / "batch" / "summary.json").read_text())["scans"]}
    assert rows["sharp"]["noise_index_hu"] == auto["noise"]["soft_tissue_sd_hu"]
    assert rows["sharp"]["noise_smoothing_sigma_mm"] == auto["noise"]["sigma_mm"] > 0
    assert rows["soft"]["noise_index_hu"] == soft["noise"]["soft_tissue_sd_hu"]
    assert rows["soft"]["noise_smoothing_sigma_mm"] == 0.0
    assert "noise_index_hu" in (tmp_path / "batch" / "summary.csv").read_text().splitlines()[0]


def test_real_scan_is_left_alone_and_its_sharpened_copy_is_smoothed():
    """cap001 as stored (a medium kernel) is under the bound; the same scan through a lung-kernel-like high-boost
    filter (benchmarks/resave_ctmd.py --sharpen all=3) is over it and gets a Gaussian within the cap."""
    from scipy.ndimage import gaussian_filter

    vol = read(need_data("covid-ct-md", "cap001.nii.gz"))
    pixel_mm = vol.spacing[1]
    plan = noise_plan(vol.array, pixel_mm=pixel_mm)
    assert plan["soft_tissue_sd_hu"] < SMOOTH_ABOVE_HU / 2 and not plan["smoothed"]
    hu = np.asarray(vol.array, np.float32)
    sharp = hu + 3.0 * (hu - gaussian_filter(hu, (0, 0.75 / pixel_mm, 0.75 / pixel_mm)))
    plan = noise_plan(sharp, pixel_mm=pixel_mm)
    assert plan["smoothed"] and plan["soft_tissue_sd_hu"] > SMOOTH_ABOVE_HU
    assert 0 < plan["sigma_mm"] <= MAX_SIGMA_MM and plan["soft_tissue_sd_after_hu"] <= REFERENCE_HU


def test_predict_on_a_noisy_volume_says_so_and_smooths_the_lesion_models_input(tmp_path, tiny_seg_model, capsys,
                                                                                 monkeypatch):
    from types import SimpleNamespace

    import covidct.models.registry as registry
    import covidct.report.slices as slices

    seen = []
    monkeypatch.setattr(registry, "load_lesion_model", lambda spec: (SimpleNamespace(config=SimpleNamespace()),
                                                                     {"path": "stub.pt"}))
    monkeypatch.setattr(slices, "_instances", lambda model, grey, path, *a, shown=None, **k:
                        seen.append((grey, grey if shown is None else shown)) or [])
    write_nifti(tmp_path / "v.nii.gz", _noisy_phantom(90.0), spacing=(5.0, 0.7, 0.7))
    assert main(["predict", str(tmp_path / "v.nii.gz"), "-o", str(tmp_path / "out"), "--model", str(tiny_seg_model),
                 "--lesion-model", "stub"]) == 0
    assert "reached the models smoothed in-plane" in capsys.readouterr().out
    noise = json.loads((tmp_path / "out" / "predictions.json").read_text())["inputs"][0]["noise"]
    assert noise["smoothed"] and noise["soft_tissue_sd_hu"] > SMOOTH_ABOVE_HU
    # the Mask R-CNN got each slice smoothed; its picture is drawn on the slice as read
    assert len(seen) == 6
    for model_input, picture in seen:
        assert np.abs(np.diff(model_input, axis=1)).mean() < 0.6 * np.abs(np.diff(picture, axis=1)).mean()


@pytest.mark.parametrize("noisy_first", [True, False])
def test_of_two_reconstructions_of_one_scan_the_smoother_is_taken(tmp_path, tiny_seg_model, capsys, noisy_first):
    """A study folder with the same scan in a lung kernel and a soft-tissue kernel (as many images each): the
    least noisy series is analysed, whichever comes first, and the note says why."""
    quiet, noisy = phantom_hu(6, 96), _noisy_phantom(90.0)
    pairs = [("1.2.826.0.1.3680043.8.498.1", noisy, "B70f"), ("1.2.826.0.1.3680043.8.498.2", quiet, "B30f")]
    for i, (uid, hu, kernel) in enumerate(pairs if noisy_first else pairs[::-1]):   # folders read in name order
        write_ct_series(tmp_path / "study" / f"{i}_{kernel}", hu, spacing=(5.0, 0.7, 0.7), series_uid=uid,
                        kernel=kernel)
    vol = read(tmp_path / "study", largest_series=True)
    assert vol.metadata["series_uid"] == pairs[1][0] and vol.metadata["convolution_kernel"] == "B30f"
    index = vol.metadata["series_choice"]["noise_index_hu"]
    assert index[pairs[0][0]] > SMOOTH_ABOVE_HU > REFERENCE_HU > index[pairs[1][0]]
    assert {r["kernel"] for r in vol.metadata["series_available"]} == {"B70f", "B30f"}
    out = tmp_path / "out"
    assert main(["analyze", str(tmp_path / "study"), "-o", str(out), "--model", str(tiny_seg_model), "--triage", "none",
                 "--classifier", "none", "--no-viewer"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["input"]["series_chosen"] == pairs[1][0] and not report["input"]["noise"]["smoothed"]
    assert "lowest soft-tissue noise index was taken" in capsys.readouterr().out
    # a series of another size is no twin: the largest is taken as before, without a comparison
    write_ct_series(tmp_path / "study" / "thin2", np.concatenate([_noisy_phantom(90.0)] * 2), spacing=(2.5, 0.7, 0.7),
                    series_uid="1.2.826.0.1.3680043.8.498.3", kernel="B70f")
    vol = read(tmp_path / "study", largest_series=True)
    assert vol.metadata["series_uid"] == "1.2.826.0.1.3680043.8.498.3" and "series_choice" not in vol.metadata


def test_a_twin_series_with_a_broken_slice_is_not_taken_and_not_an_error(tmp_path, monkeypatch):
    """A twin whose middle slices cannot be decoded is not measured and not taken; the other is read."""
    import covidct.io.dicom as dicom
    from covidct.errors import InputError

    write_ct_series(tmp_path / "study" / "0_sharp", _noisy_phantom(90.0), spacing=(5.0, 0.7, 0.7),
                    series_uid="1.2.826.0.1.3680043.8.498.1")
    soft = write_ct_series(tmp_path / "study" / "1_soft", phantom_hu(6, 96), spacing=(5.0, 0.7, 0.7),
                           series_uid="1.2.826.0.1.3680043.8.498.2")
    decode = dicom._pixels_hu

    def failing(path, ds=None):
        if ds is None and Path(path) in soft:   # the twins' measurement reads files afresh
            raise InputError(path, "cannot decode pixel data")
        return decode(path, ds)

    monkeypatch.setattr(dicom, "_pixels_hu", failing)
    vol = read(tmp_path / "study", largest_series=True)
    assert vol.metadata["series_uid"] == "1.2.826.0.1.3680043.8.498.1"
    assert vol.metadata["series_choice"]["noise_index_hu"]["1.2.826.0.1.3680043.8.498.2"] is None


def test_thick_slices_get_a_note(tmp_path, tiny_seg_model, capsys):
    from covidct.report.notes import THICK_SLICE_MM, report_notes

    def notes(kind: str, gap: float) -> list[str]:
        return report_notes({"input": {"kind": kind, "spacing_mm": [gap, 0.7, 0.7]}})

    assert any("10 mm apart" in n for n in notes("nifti", 10.0))
    assert any("mm apart" in n for n in notes("dicom-series", THICK_SLICE_MM + 0.5))
    assert not any("mm apart" in n for n in notes("nifti", THICK_SLICE_MM) + notes("dicom-series", 2.0))
    assert not any("mm apart" in n for n in report_notes({"input": {"kind": "image", "spacing_mm": None}}))
    write_nifti(tmp_path / "thick.nii.gz", phantom_hu(6, 96), spacing=(10.0, 3.0, 3.0))
    assert main(["analyze", str(tmp_path / "thick.nii.gz"), "-o", str(tmp_path / "out"), "--model", str(tiny_seg_model),
                 "--triage", "none", "--classifier", "none", "--no-viewer"]) == 0
    assert "note: the slices are 10 mm apart" in capsys.readouterr().out


def test_classify_smooths_a_noisy_volume_for_the_classifier_and_says_so(tmp_path, tiny_cls_model, capsys,
                                                                        monkeypatch):
    import covidct.report.slices as slices

    model = tiny_cls_model
    given, real = [], slices.classifier_input
    monkeypatch.setattr(slices, "classifier_input", lambda hu, **k: given.append(np.array(hu)) or real(hu, **k))
    write_nifti(tmp_path / "noisy.nii.gz", _noisy_phantom(90.0), spacing=(5.0, 0.7, 0.7))
    write_nifti(tmp_path / "quiet.nii.gz", phantom_hu(6, 96), spacing=(5.0, 0.7, 0.7))
    out = tmp_path / "c.json"
    assert main(["classify", str(tmp_path / "noisy.nii.gz"), str(tmp_path / "quiet.nii.gz"), "--model", str(model),
                 "--json", str(out)]) == 0
    notes = json.loads(out.read_text())["notes"]
    assert [n["input"] for n in notes] == [str(tmp_path / "noisy.nii.gz")]
    assert "reached the models smoothed" in notes[0]["note"] and "reached the models smoothed" in capsys.readouterr().out
    noisy, quiet = given[:6], given[6:]
    as_read = read(tmp_path / "noisy.nii.gz").array
    assert all(np.abs(np.diff(g, axis=1)).mean() < 0.6 * np.abs(np.diff(a, axis=1)).mean() for g, a in zip(noisy, as_read))
    assert all(np.array_equal(g, a) for g, a in zip(quiet, read(tmp_path / "quiet.nii.gz").array))


def test_evaluation_records_of_a_noisy_volume_come_smoothed(tmp_path):
    """``evaluate cls`` with a slice classifier on CT volumes reads their slices as analyze's models see them."""
    from covidct.data.classification import ClsRecord, RecordImages
    from covidct.io import classifier_input

    write_nifti(tmp_path / "noisy.nii.gz", _noisy_phantom(90.0), spacing=(5.0, 0.7, 0.7))
    write_nifti(tmp_path / "quiet.nii.gz", phantom_hu(6, 96), spacing=(5.0, 0.7, 0.7))
    images = RecordImages()
    for name, smoother in (("noisy", True), ("quiet", False)):
        vol = read(tmp_path / f"{name}.nii.gz")
        for k in range(vol.n_slices):
            got = images(ClsRecord(tmp_path / f"{name}.nii.gz", "COVID", slice_index=k))
            raw = classifier_input(vol.array[k], is_hu=True)
            if smoother:
                assert np.abs(np.diff(got, axis=1)).mean() < 0.6 * np.abs(np.diff(raw, axis=1)).mean()
            else:
                assert np.array_equal(got, raw)
