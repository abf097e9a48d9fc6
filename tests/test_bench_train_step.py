"""``benchmarks/seg_train_step.py``: training-step time of the segmentation U-Net in float32 and bfloat16 autocast."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("bench_train_step",
                                               Path(__file__).parents[1] / "benchmarks" / "seg_train_step.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_both_precisions_are_timed_in_every_round(capsys):
    assert bench.main(["--batch-size", "2", "--input-size", "32", "--steps", "1", "--repeat", "2", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    for precision in ("fp32", "bf16"):
        line = re.search(rf"^  {precision}: (.*) s per step$", out, flags=re.M)
        assert line, out
        times = [float(t) for t in line.group(1).split(" / ")]
        assert len(times) == 2 and all(t > 0 for t in times)


def test_bad_settings_are_one_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(["--steps", "0"])
    assert exc.value.code == 2 and "at least 1" in capsys.readouterr().err
