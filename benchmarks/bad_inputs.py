"""A sweep of odd and broken inputs through the command line: one error line or a clean result, never more.

Makes a battery of files in a temporary folder (damaged, empty, 4-D, NaN / infinite, unsigned CT numbers without
their intercept, colour and 16-bit images, DICOM whose header and pixels disagree, duplicated or mixed series, a
symlink loop, ...), runs `covidct info` on each and, with `--analyze`, `covidct analyze` too (each in its own
process, as a user would), and prints per input and command: the exit code, the seconds, the last stderr line,
and whether stderr held anything but that line and progress bars (a traceback or a library warning), or a
failed run left an output folder behind. The last line counts the violations; the exit code is 1 if any.

    python benchmarks/bad_inputs.py [--analyze] [--model M] [--json OUT]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def make_inputs(root: Path) -> dict[str, Path]:
    """Named odd inputs under ``root``."""
    import nibabel as nib
    import pydicom
    from PIL import Image

    from covidct.data.synthetic import phantom_hu, write_ct_series

    rng = np.random.default_rng(0)
    out: dict[str, Path] = {}

    def nifti(name: str, data: np.ndarray, affine=None) -> None:
        nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), root / name)
        out[name] = root / name

    def image(name: str, array: np.ndarray, mode: str | None = None) -> None:
        Image.fromarray(array, mode).save(root / name) if mode else Image.fromarray(array).save(root / name)
        out[name] = root / name

    hu = phantom_hu(6, 96)
    affine = np.diag([-0.8, -0.8, -2.0, 1.0])
    nifti("phantom.nii.gz", hu.transpose(2, 1, 0).astype(np.int16), affine)
    nifti("stored_numbers.nii.gz", (hu.astype(np.int32) + 1024).clip(0, None).astype(np.uint16).transpose(2, 1, 0),
          affine)
    nifti("4d.nii.gz", np.zeros((16, 16, 4, 2), np.int16))
    nan = np.full((64, 64, 8), -1000, np.float32)
    nan[10:20, 10:20] = np.nan
    nifti("nan_patch.nii.gz", nan)
    nifti("all_infinite.nii.gz", np.full((32, 32, 4), np.inf, np.float32))
    nifti("one_slice_air.nii.gz", np.full((64, 64, 1), -1000, np.int16))
    nifti("uint8_zeros.nii.gz", np.zeros((64, 64, 8), np.uint8))
    (root / "empty.nii.gz").write_bytes(b"")
    out["empty.nii.gz"] = root / "empty.nii.gz"
    (root / "text.nii.gz").write_text("hello")
    out["text.nii.gz"] = root / "text.nii.gz"
    whole = root / "whole.nii"
    nib.save(nib.Nifti1Image(np.full((64, 64, 8), -1000, np.int16), np.eye(4)), whole)
    (root / "truncated.nii").write_bytes(whole.read_bytes()[:1000])
    whole.unlink()
    out["truncated.nii"] = root / "truncated.nii"
    image("noise.png", rng.integers(0, 255, (128, 128), dtype=np.uint8))
    image("rgba.png", rng.integers(0, 255, (128, 128, 4), dtype=np.uint8), "RGBA")
    image("uint16.png", rng.integers(0, 65535, (128, 128), dtype=np.uint16))
    image("black.png", np.zeros((128, 128), np.uint8))
    image("float.tif", np.zeros((128, 128), np.float32), "F")
    image("tiny.png", np.zeros((3, 5), np.uint8))
    (root / "empty.png").write_bytes(b"")
    out["empty.png"] = root / "empty.png"
    (root / "truncated.png").write_bytes((root / "noise.png").read_bytes()[:200])
    out["truncated.png"] = root / "truncated.png"
    (root / "not_an_image.jpg").write_bytes(b"this is not an image" * 10)
    out["not_an_image.jpg"] = root / "not_an_image.jpg"
    mixed = root / "mixed_sizes"
    mixed.mkdir()
    Image.fromarray(rng.integers(0, 255, (128, 128), dtype=np.uint8)).save(mixed / "a.png")
    Image.fromarray(rng.integers(0, 255, (100, 140), dtype=np.uint8)).save(mixed / "b.png")
    out["mixed_sizes/"] = mixed
    series = write_ct_series(root / "series", hu)
    out["series/"] = root / "series"
    zeroed = root / "zeroed_intercept"
    zeroed.mkdir()
    for p in series:
        ds = pydicom.dcmread(p)
        ds.RescaleIntercept = 0
        ds.save_as(zeroed / p.name)
    out["zeroed_intercept/"] = zeroed
    dup = root / "duplicated"
    dup.mkdir()
    for i in range(3):
        shutil.copy(series[0], dup / f"{i}.dcm")
    out["duplicated/"] = dup
    ds = pydicom.dcmread(series[1])
    ds.Rows = 24
    ds.save_as(root / "rows_mismatch.dcm")
    out["rows_mismatch.dcm"] = root / "rows_mismatch.dcm"
    ds = pydicom.dcmread(series[1])
    ds.PixelSpacing = [0, 0]
    ds.save_as(root / "zero_spacing.dcm")
    out["zero_spacing.dcm"] = root / "zero_spacing.dcm"
    ds = pydicom.dcmread(series[1])
    del ds.PixelData
    ds.save_as(root / "no_pixels.dcm")
    out["no_pixels.dcm"] = root / "no_pixels.dcm"
    (root / "truncated.dcm").write_bytes(series[1].read_bytes()[:400])
    out["truncated.dcm"] = root / "truncated.dcm"
    (root / "no_images").mkdir()
    (root / "no_images" / "readme.txt").write_text("hi")
    out["no_images/"] = root / "no_images"
    (root / "empty_folder").mkdir()
    out["empty_folder/"] = root / "empty_folder"
    os.symlink(root / "loop", root / "loop")
    out["symlink_loop"] = root / "loop"
    out["missing.dcm"] = root / "missing.dcm"
    return out


def run(argv: list[str], output: Path | None) -> dict:
    """One command in its own process: exit code, seconds, last stderr line, and what should not be there."""
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "covidct.cli", *argv], capture_output=True, text=True, timeout=900)
    # progress bars (tqdm: "stage: 40%|████ | 2/5 ...", redrawn with carriage returns) are not messages
    lines = [ln for ln in res.stderr.replace("\r", "\n").splitlines() if ln.strip() and "|" not in ln]
    last = lines[-1] if lines else ""
    problems = []
    if res.returncode not in (0, 2):
        problems.append(f"exit code {res.returncode}")
    if "Traceback" in res.stderr:
        problems.append("traceback")
    extra = [ln for ln in lines[:-1] if not ln.startswith("note:")] if res.returncode else \
        [ln for ln in lines if not ln.startswith("note:")]
    if extra:
        problems.append(f"{len(extra)} other stderr line(s): {extra[0][:120]}")
    if res.returncode == 2 and output is not None and output.exists():
        problems.append("output left after a failure")
    return {"exit": res.returncode, "seconds": round(time.perf_counter() - t0, 1), "last_stderr": last,
            "problems": problems}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--analyze", action="store_true", help="also run covidct analyze on every input (slower)")
    ap.add_argument("--model", help="segmentation model for analyze (default: the shipped one)")
    ap.add_argument("--json", help="write every result here")
    args = ap.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "in").mkdir()
        inputs = make_inputs(Path(tmp) / "in")
        for name, path in inputs.items():
            before = path.read_bytes() if path.is_file() else None
            results[name] = {"info": run(["info", str(path)], None)}
            if args.analyze:
                out = Path(tmp) / "out" / name.strip("/")
                argv = ["analyze", str(path), "-o", str(out), "--no-viewer"] + (["--model", args.model] if args.model else [])
                results[name]["analyze"] = run(argv, out)
            if before is not None and path.read_bytes() != before:
                results[name]["info"]["problems"].append("input file changed")
            for command, r in results[name].items():
                flag = "  PROBLEM: " + "; ".join(r["problems"]) if r["problems"] else ""
                print(f"{name:<24}{command:<8} exit {r['exit']}  {r['seconds']:>5.1f} s  {r['last_stderr'][:150]}{flag}",
                      flush=True)
    bad = sum(bool(r["problems"]) for per in results.values() for r in per.values())
    print(f"{len(results)} inputs, {sum(len(v) for v in results.values())} runs, {bad} with problems")
    if args.json:
        from covidct.report.json_io import write_json

        write_json(results, args.json)
        print(f"wrote {args.json}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
