"""covidct compare: a follow-up analysis against an earlier one."""

from __future__ import annotations

import json

import pytest

from covidct.cli import main
from covidct.errors import InputError
from covidct.report.compare import compare, compare_reports, load_report
from covidct.report.json_io import write_json


def _report(*, lung_ml=5000.0, ggo=(100.0, 2.0), cons=(25.0, 0.5), score=6, uid="1.2.3", gap=2.0,
            seg_sha="abc", label="COVID-19", zone_pct=3.0, precision: str | None = None) -> dict:
    total = (ggo[0] + cons[0], ggo[1] + cons[1])
    return {
        "input": {"kind": "dicom-series", "series_uid": uid, "spacing_mm": [gap, 0.7, 0.7]},
        "lung_volume_ml": lung_ml,
        "lesions": {"ggo": {"volume_ml": ggo[0], "percent_of_lung": ggo[1]},
                    "consolidation": {"volume_ml": cons[0], "percent_of_lung": cons[1]},
                    "effusion": {"volume_ml": 0.0, "percent_of_lung": 0.0},
                    "total": {"volume_ml": total[0], "percent_of_lung": total[1]}},
        "percent_opacity": total[1], "percent_high_opacity": cons[1], "severity_score": score,
        "severity_score_max": 30, "zones": {"right_lower": {"percent_involved": zone_pct, "score": 1}},
        "diagnosis": {"label": label},
        "models": [{"name": "seg", "task": "seg", "sha256": seg_sha, **({"precision": precision} if precision else {})}],
    }


def test_changes_are_after_minus_before_and_comparable_scans_carry_no_note():
    result = compare_reports(_report(), _report(ggo=(40.0, 0.8), cons=(5.0, 0.1), score=3, uid="1.2.4",
                                                label="Control", zone_pct=0.5))
    m = result["measures"]
    assert m["ggo_volume_ml"] == {"before": 100.0, "after": 40.0, "change": -60.0}
    assert m["total_percent_of_lung"]["change"] == pytest.approx(-1.6)      # percentage points
    assert m["severity_score"]["change"] == -3 and m["lung_volume_ml"]["change"] == 0.0
    assert result["zones"]["right_lower"]["change"] == pytest.approx(-2.5)
    assert result["answer"] == {"before": "COVID-19", "after": "Control"} and result["notes"] == []


def test_notes_say_when_the_numbers_compare_less_well():
    base = _report()
    cases = {
        "different segmentation models": _report(uid="9", seg_sha="other"),
        "different precisions (fp32 before, bf16 after)": _report(uid="9", precision="bf16"),
        "same series": _report(),
        "lung volumes differ by 40%": _report(uid="9", lung_ml=3000.0),
        "slice gaps differ (2.00 vs 5.00 mm)": _report(uid="9", gap=5.0),
    }
    coarse = _report(uid="9")
    coarse["input"]["spacing_mm"] = [2.0, 1.4, 1.4]
    cases["pixel sizes differ (0.70 vs 1.40 mm)"] = coarse
    masked = _report(uid="9")
    masked["lesions"]["effusion"]["assessable"] = False
    cases["pleural effusion could not be assessed after"] = masked
    sharp = _report(uid="9")
    sharp["input"].update(convolution_kernel="B70f", noise={"soft_tissue_sd_hu": 80.0, "smoothed": True})
    cases["reconstructed differently (kernels B30f vs B70f; noise index 22 vs 80 HU; the slices after reached the "
          "models smoothed)"] = sharp
    other_kernel = _report(uid="9")
    other_kernel["input"].update(convolution_kernel="B31f", noise={"soft_tissue_sd_hu": 22.0, "smoothed": False})
    cases["reconstructed differently (kernels B30f vs B31f; noise index 22 vs 22 HU)"] = other_kernel
    base["input"].update(convolution_kernel="B30f", noise={"soft_tissue_sd_hu": 22.0, "smoothed": False})
    for words, later in cases.items():
        if "convolution_kernel" not in later["input"]:   # a report without them (images, older reports): no note
            later["input"].update(convolution_kernel="B30f", noise={"soft_tissue_sd_hu": 22.0, "smoothed": False})
        notes = compare_reports(base, later)["notes"]
        assert len(notes) == 1 and words in notes[0], (words, notes)
    # a report from before precisions were recorded ran in float32: no note against an fp32 one
    assert compare_reports(base, _report(uid="9", precision="fp32"))["notes"] == []
    # nothing known of one scan's reconstruction (an older report, an image): no note
    assert compare_reports(base, _report(uid="9"))["notes"] == []


def test_compare_cli_prints_the_table_and_writes_json(tmp_path, capsys):
    (tmp_path / "t0").mkdir()
    write_json(_report(), tmp_path / "t0" / "report.json")
    write_json(_report(ggo=(150.0, 3.0), uid="1.2.4"), tmp_path / "t1.json")
    out = tmp_path / "cmp.json"
    assert main(["compare", str(tmp_path / "t0"), str(tmp_path / "t1.json"), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "ggo_volume_ml" in printed and "+50.00" in printed and "not for diagnosis" in printed
    saved = json.loads(out.read_text())
    assert saved["measures"]["ggo_percent_of_lung"]["change"] == 1.0 and "disclaimer" in saved
    assert saved == {**compare(tmp_path / "t0", tmp_path / "t1.json"), "disclaimer": saved["disclaimer"]}


def test_compare_refuses_what_is_not_a_report_in_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "other.json").write_text(json.dumps({"n_images": 3}))
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(InputError):
        load_report(tmp_path / "empty")
    for bad, reason in (("empty", "no report.json here"), ("other.json", "not a covidct analyze report"),
                        ("broken.json", "not a readable JSON report")):
        assert main(["compare", str(tmp_path / bad), str(tmp_path / bad)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and bad in err[0] and reason in err[0], err
