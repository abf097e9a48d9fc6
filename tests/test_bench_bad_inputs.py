"""``benchmarks/bad_inputs.py``: the battery of odd inputs it makes, and how it judges one command's run."""

from __future__ import annotations

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("bench_bad_inputs",
                                               Path(__file__).parents[1] / "benchmarks" / "bad_inputs.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_inputs_are_made_and_judged(tmp_path):
    inputs = bench.make_inputs(tmp_path)
    assert len(inputs) >= 30 and all(p.exists() or p.is_symlink() or name == "missing.dcm"
                                     for name, p in inputs.items())
    good = bench.run(["info", str(inputs["phantom.nii.gz"])], None)
    assert good["exit"] == 0 and good["problems"] == []
    bad = bench.run(["info", str(inputs["rows_mismatch.dcm"])], None)
    assert bad["exit"] == 2 and bad["problems"] == [] and "pixel data does not match its header" in bad["last_stderr"]
    # a failed run that leaves its output folder behind is a problem
    (tmp_path / "left").mkdir()
    left = bench.run(["info", str(inputs["empty.png"])], tmp_path / "left")
    assert left["problems"] == ["output left after a failure"]
    # a traceback (here asked for with --debug) and its exit code are problems
    loud = bench.run(["--debug", "info", str(inputs["empty.png"])], None)
    assert loud["exit"] == 1 and loud["problems"][:2] == ["exit code 1", "traceback"]
