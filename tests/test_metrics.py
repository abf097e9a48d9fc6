"""Metrics: the published COVID-CT-Mask-Net table, AUC, bootstrap, segmentation measures."""

from __future__ import annotations

import json

import numpy as np
import pytest

from covidct.cli import main
from covidct.metrics import (
    MEASURES, SegmentationMetrics, bootstrap_ci, classification_report, confusion_matrix, dice_score,
    hausdorff95, parse_confusion, rand_error, roc_auc,
)

CM = "423,8,0;10,336,5;0,11,207"
CLASSES = ["Control", "Common pneumonia", "COVID-19"]


def test_published_table_to_six_decimals():
    rep = classification_report(parse_confusion(CM), CLASSES)
    expected = {
        "accuracy": (0.982000, 0.966000, 0.984000, 0.977333),
        "f1": (0.979167, 0.951841, 0.962791, 0.966000),
        "specificity": (0.982425, 0.970724, 0.993606, 0.983000),
    }
    for measure, values in expected.items():
        got = [rep.per_class[c][measure] for c in CLASSES] + [rep.micro[measure]]
        assert [round(v, 6) for v in got] == list(values), measure
    assert round(rep.overall_accuracy, 4) == 0.9660
    assert set(rep.micro) == set(MEASURES) and len(MEASURES) == 13
    np.testing.assert_allclose(rep.normalized_confusion().sum(axis=1), 1.0)


def test_measure_identities():
    rep = classification_report(np.array([[5, 1], [2, 7]]), ["a", "b"])
    a = rep.per_class["a"]
    assert a["sensitivity"] == pytest.approx(5 / 6)
    assert a["false_negative_rate"] == pytest.approx(1 - a["sensitivity"])
    assert a["false_positive_rate"] == pytest.approx(2 / 9)
    assert a["negative_predictive_value"] == pytest.approx(7 / 8)
    assert a["false_discovery_rate"] == pytest.approx(2 / 7)


def test_confusion_matrix_from_labels():
    cm = confusion_matrix([0, 0, 1, 2, 2], [0, 1, 1, 2, 0], 3)
    assert cm.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 1]]


def test_cli_metrics_json_and_plot(tmp_path, capsys):
    plot = tmp_path / "cm.png"
    assert main(["metrics", "--confusion", CM, "--classes", ",".join(CLASSES), "--json", "--plot", str(plot)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["overall_accuracy"] == pytest.approx(0.966)
    assert out["per_class"]["COVID-19"]["f1"] == pytest.approx(0.962791, abs=1e-6)
    assert out["micro"]["accuracy"] == pytest.approx(0.977333, abs=1e-6)
    assert set(out["per_class"]["Control"]) == set(MEASURES)
    assert plot.stat().st_size > 1000


def test_roc_auc_and_bootstrap():
    assert roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert roc_auc([0, 1], [0.5, 0.5]) == pytest.approx(0.5)
    assert np.isnan(roc_auc([1, 1], [0.2, 0.3]))
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    s = y * 0.6 + rng.random(200) * 0.8
    est, lo, hi = bootstrap_ci(roc_auc, y, s, n_resamples=300)
    assert lo < est < hi and 0.5 < lo and hi <= 1.0


def test_dice_iou_pooled_vs_per_image():
    m = SegmentationMetrics()
    a = np.zeros((10, 10), bool); a[:5] = True          # 50 px
    b = np.zeros((10, 10), bool); b[:5, :5] = True      # 25 px inside a
    m.update("x", b, a, image_id="1")                   # dice 2*25/75
    empty = np.zeros((10, 10), bool)
    m.update("x", empty, empty, image_id="2")           # both empty: left out of per-image Dice
    agg = m.aggregate()
    assert agg["pooled"]["x"]["dice"] == pytest.approx(50 / 75)
    assert agg["mean_per_image"]["x"]["dice"] == pytest.approx(50 / 75)
    assert agg["pooled"]["x"]["iou"] == pytest.approx(25 / 50)
    assert agg["pooled"]["x"]["specificity"] == pytest.approx(1.0)
    assert agg["pooled"]["x"]["mae"] == pytest.approx(25 / 200)
    assert agg["n_images"] == 2
    m.reset()
    assert m.aggregate()["n_images"] == 0
    assert np.isnan(dice_score(empty, empty))


def test_hd95_and_rand_error():
    a = np.zeros((40, 40), bool); a[10:20, 10:20] = True
    b = np.zeros((40, 40), bool); b[10:20, 13:23] = True
    assert hausdorff95(a, a) == 0.0
    assert hausdorff95(a, b) == pytest.approx(3.0, abs=0.01)
    assert hausdorff95(a, b, spacing=(0.5, 0.5)) == pytest.approx(1.5, abs=0.01)
    assert np.isnan(hausdorff95(a, np.zeros_like(a)))
    assert rand_error(a.astype(int), a.astype(int)) == pytest.approx(0.0)
    assert 0.0 < rand_error(b.astype(int), a.astype(int)) < 1.0


def test_instance_ap_accumulates_and_resets():
    import torch

    from covidct.metrics import InstanceAP

    masks = torch.zeros((2, 20, 20), dtype=torch.bool)
    masks[0, 2:8, 2:8] = True
    masks[1, 12:18, 12:18] = True
    truth = {"masks": masks, "labels": torch.tensor([1, 2])}
    ap = InstanceAP(["ggo", "consolidation"])
    ap.update({"masks": masks, "scores": torch.tensor([0.9, 0.8]), "labels": torch.tensor([1, 2])}, truth)
    perfect = ap.aggregate()
    assert perfect["n_images"] == 1 and perfect["ap50"] == pytest.approx(1.0) and perfect["map"] == pytest.approx(1.0)
    assert perfect["per_class"]["consolidation"]["ap75"] == pytest.approx(1.0)
    ap.reset()
    shifted = masks.roll(3, dims=2)  # IoU 0.33 with the truth: a miss at IoU 0.5
    ap.update({"masks": shifted, "scores": torch.tensor([0.9, 0.8]), "labels": torch.tensor([1, 2])}, truth)
    missed = ap.aggregate()
    assert missed["n_images"] == 1 and missed["ap50"] == pytest.approx(0.0)
