"""``benchmarks/analyze.py``'s check of the lung sides against per-slice lobe labels."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("bench_analyze", Path(__file__).parents[1] / "benchmarks" / "analyze.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_side_agreement_scores_each_side_and_what_a_swap_would_give():
    # per slice: ((left lobe infected, right lobe infected), left lesion area, right lesion area)
    rows = [((0, 0), 0.0, 0.0), ((1, 0), 50.0, 0.0), ((1, 0), 30.0, 10.0), ((0, 1), 0.0, 80.0),
            ((0, 1), 5.0, 45.0), ((1, 1), 20.0, 20.0), ((1, 0), 0.0, 0.0)]
    c = bench._side_agreement(rows)
    assert c["auc_left"] == pytest.approx(10 / 12, abs=1e-4) and c["auc_right"] == 1.0   # a labelled slice without lesions ranks low
    assert c["auc_left_vs_right_lobes"] < 0.5 and c["auc_right_vs_left_lobes"] < 0.5
    # left share over the labelled-left-only slices with lesions: (1.0 + 0.75) / 2; the slice without lesions
    # is counted but not averaged
    assert c["left_share_only_left"] == pytest.approx(0.875) and c["n_only_left"] == "3 slices, 2 with lesions"
    assert c["left_share_only_right"] == pytest.approx(0.05) and c["n_only_right"] == "2 slices, 2 with lesions"
    swapped = bench._side_agreement([(lab, b, a) for lab, a, b in rows])    # sides mixed up
    assert swapped["auc_left"] < 0.5 and swapped["left_share_only_left"] == pytest.approx(0.125)
    none = bench._side_agreement([((1, 1), 3.0, 4.0), ((1, 1), 0.0, 1.0)])  # one class only: no AUC
    assert none["auc_left"] is None and none["left_share_only_left"] is None
