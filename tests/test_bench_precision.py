"""``benchmarks/precision.py``: how alike two lists of label maps are (float32 against bfloat16 predictions)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

_spec = importlib.util.spec_from_file_location("bench_precision", Path(__file__).parents[1] / "benchmarks" / "precision.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_label_agreement_counts_pixels_and_lesion_overlap():
    a = np.zeros((10, 10), np.uint8)
    a[2:6, 2:6] = 1                      # 16 lesion pixels
    b = a.copy()
    b[2:6, 5] = 2                        # same region, 4 pixels of another lesion type: still lesion
    c = a.copy()
    c[2:6, 2:4] = 0                      # half of the lesion gone
    empty = np.zeros((10, 10), np.uint8)
    res = bench.label_agreement([a, a, empty], [b, c, empty])
    assert res["pixel_agreement"] == pytest.approx((96 + 92 + 100) / 300, abs=1e-6)
    # lesion Dice per slice with lesion in either map: 1.0 (GGO vs consolidation are both lesion), 2*8/24
    assert res["lesion_dice_mean"] == pytest.approx((1.0 + 16 / 24) / 2, abs=1e-6)
    assert res["lesion_dice_min"] == pytest.approx(16 / 24, abs=1e-6) and res["slices_with_lesion"] == 2
    none = bench.label_agreement([empty], [empty])
    assert none["lesion_dice_mean"] is None and none["pixel_agreement"] == 1.0
