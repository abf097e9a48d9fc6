"""``benchmarks/non_ct_images.py``: the non-CT pictures it makes, and one run end to end with a tiny model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

BENCH = Path(__file__).parents[1] / "benchmarks" / "non_ct_images.py"


def test_non_ct_images_are_grey_or_colour_uint8_and_include_the_synthetic_ones():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_non_ct", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    images = bench.non_ct_images()
    assert len(images) == len(bench.SKIMAGE_SAMPLES) + 4
    assert all(a.dtype == np.uint8 and (a.ndim == 2 or a.shape[2] == 3) for a in images.values())
    assert np.ptp(images["noise"]) > 200 and np.ptp(images["flat_grey"]) == 0


def test_benchmark_runs_on_a_folder_and_writes_every_image(tmp_path, tiny_seg_model):
    ct = tmp_path / "ct"
    ct.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8)).save(ct / f"{i}.png")
    (ct / "masks").mkdir()                                  # label folders are skipped
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(ct / "masks" / "0.png")
    out = tmp_path / "r.json"
    res = subprocess.run([sys.executable, str(BENCH), str(ct), "--model", str(tiny_seg_model), "--precision", "fp32",
                          "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    result = json.loads(out.read_text())
    assert sorted(result[str(ct)]) == ["0.png", "1.png"]
    assert len(result["non-CT"]) == 27
    for r in result["non-CT"].values():
        assert r["refused"] or (0.0 <= r["lung_share"] <= 1.0 and r["flagged"] == bool(r["flagged_by"]))
    assert "non-CT: 27 images" in res.stdout
    assert subprocess.run([sys.executable, str(BENCH), str(tmp_path / "nope")], capture_output=True,
                          text=True).returncode == 2
