"""The verdicts of ``benchmarks/targets.py`` (the issues' numeric targets on any data) from the JSON its
steps write: each bound, the burden order across diagnoses, the time per 150 slices, in-sample notes."""

from __future__ import annotations

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("targets", Path(__file__).parents[1] / "benchmarks" / "targets.py")
targets = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(targets)


def _by_what(rows):
    return {(r["issue"], r["what"].split(" (")[0]): r for r in rows}


def test_segmentation_and_lesion_targets():
    bench = {"evaluation": {"dice": {"infection": 0.83, "ggo": 0.69, "consolidation": 0.62}},
             "speed": {"shipped": {"slices_per_second": 9.5}}}
    masknet = {"timings": [{"model": "torchvision maskrcnn_resnet50_fpn (default 800px)", "speedup_vs_default": 1.0},
                           {"model": "covidct lesions (efficientnet-lite0, <= 50 detections)", "speedup_vs_default": 8.8}]}
    rows = _by_what(targets.seg_rows(bench, {"ap50": 0.61}, masknet))
    assert rows[(3, "infection Dice")]["met"] and not rows[(3, "ggo Dice")]["met"]
    assert rows[(3, "consolidation Dice")]["met"]                       # the bound itself counts as met
    assert rows[(3, "segmentation slices/s at 512²")]["met"] is False
    assert rows[(4, "lesion mask AP50")]["met"] and rows[(4, "Mask R-CNN speed-up vs torchvision's default R50-FPN")]["measured"] == 8.8
    # covidct evaluate seg's JSON (no speed step): Dice rows, no speed row
    rows = targets.seg_rows({"dice": {"infection": 0.5, "ggo": None, "consolidation": 0.7}}, None, None)
    assert [r["met"] for r in rows] == [False, None, True]


def test_binary_classifier_targets_of_issues_4_and_5():
    res = {"classes": ["NonCOVID", "COVID"], "overall_accuracy": 0.85, "auc": 0.95,
           "per_class": {"NonCOVID": {"f1": 0.84}, "COVID": {"f1": 0.86}}}
    rows = targets.ucsd_rows(res)
    assert [(r["issue"], r["met"]) for r in rows] == [(4, True), (4, True), (5, False), (5, True), (5, True)]
    assert targets.ucsd_rows(None) == []


def test_scan_targets_need_the_burden_order_and_scale_time_to_150_slices():
    scans = {"pooled_slice_auc": 0.9012, "patients": [
        {"diagnosis": "COVID-19", "total_pct": 1.9, "seconds": 20.0, "shape": [148, 512, 512], "peak_rss_mb_so_far": 1700},
        {"diagnosis": "CAP", "total_pct": 5.4, "seconds": 12.0, "shape": [168, 256, 256], "peak_rss_mb_so_far": 1750},
        {"diagnosis": "Normal", "total_pct": 0.04, "seconds": 24.0, "shape": [100, 512, 512], "peak_rss_mb_so_far": 1800}]}
    triage = {"ct_slice_targets": {"covid_sensitivity": 0.875, "control_not_covid": 1.0}, "in_sample_patients": ["P001"]}
    rows = _by_what(targets.ctmd_rows(triage, scans))
    assert rows[(6, "lesion burden of Normal scans")]["met"]
    order = rows[(6, "burden order")]
    assert order["met"] is False and order["measured"] == "COVID-19 1.90, CAP 5.40, Normal 0.04"
    assert rows[(6, "infected-slice AUC, all scans pooled")]["met"]
    # 512² scans only, scaled to 150 slices: the Normal scan's 24 s for 100 slices is 36 s for 150
    time_row = rows[(6, "end-to-end seconds per 150 slices of 512²")]
    assert time_row["measured"] == 36.0 and time_row["met"] is False
    assert rows[(6, "peak RSS of analyze")]["measured"] == 1800 and rows[(6, "peak RSS of analyze")]["met"]
    assert not rows[(4, "COVID-19 slice sensitivity")]["met"] and "in-sample for P001" in \
        next(r["what"] for r in targets.ctmd_rows(triage, None) if r["what"].startswith("COVID-19"))
    scans["patients"][1]["total_pct"] = 1.0                               # CAP under COVID-19: the order holds
    assert _by_what(targets.ctmd_rows(None, scans))[(6, "burden order")]["met"]
    assert "issue" in targets.format_table(targets.ctmd_rows(triage, scans)).splitlines()[0]
