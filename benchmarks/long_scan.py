"""Multi-frame and long scans made from a DICOM series, and what reading and analysing them costs in memory.

    python benchmarks/long_scan.py make $COVIDCT_DATA/covid-ct-md/P001 -o p001_mf.dcm [--rle p001_mf_rle.dcm]
    python benchmarks/long_scan.py make $COVIDCT_DATA/covid-ct-md/P001 -o p444_mf.dcm --repeat 3 --nifti p444.nii.gz
    python benchmarks/long_scan.py measure p001_mf.dcm p444_mf.dcm p444.nii.gz [--analyze out/long]

``make``: the series' slices decompressed and written as one Legacy Converted Enhanced CT file (highdicom),
``--repeat N``: the slices N times, each copy shifted along z below the previous one (a longer scan);
``--rle``: also an RLE Lossless copy; ``--nifti``: the same volume as one int16 NIfTI (covidct's reader, its affine).
``measure``: for each file, in a child process, the peak RSS of ``covidct.io.read`` above the peak after the
imports, and the read time; with ``--analyze DIR``, also ``covidct analyze`` end to end (wall time and the peak
summed RSS of it and its reading helper, sampled every 50 ms as in ``benchmarks/analyze.py``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

_READ_PEAK = """
import json, resource, sys, time
import numpy as np
import highdicom  # noqa: F401  (imported before the baseline, as the reader imports it)
from covidct.io import read
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
t = time.perf_counter()
vol = read(sys.argv[1])
seconds = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"shape": list(vol.array.shape), "dtype": str(vol.array.dtype), "read_s": round(seconds, 2),
                  "read_peak_above_imports_mb": round(peak - base), "voxel_sum": int(np.asarray(vol.array, np.int64).sum())}))
"""


def make(args: argparse.Namespace) -> None:
    import highdicom
    import pydicom
    from highdicom.legacy import LegacyConvertedEnhancedCTImage

    frames = []
    for f in sorted(Path(args.series).glob("*.dcm")):
        ds = pydicom.dcmread(f)
        ds.decompress()
        frames.append(ds)
    if args.repeat > 1:
        z = sorted(float(ds.ImagePositionPatient[2]) for ds in frames)   # file names do not give the order
        gap = float(sorted(b - a for a, b in zip(z, z[1:]))[len(z) // 2 - 1]) if len(z) > 1 else 1.0   # median gap
        span = z[-1] - z[0] + gap
        base = list(frames)
        for k in range(1, args.repeat):
            for ds in base:
                extra = copy.deepcopy(ds)
                position = [float(v) for v in extra.ImagePositionPatient]
                position[2] -= k * span
                extra.ImagePositionPatient, extra.SOPInstanceUID = position, highdicom.UID()
                frames.append(extra)
    image = LegacyConvertedEnhancedCTImage(legacy_datasets=frames, series_instance_uid=highdicom.UID(), series_number=99,
                                           sop_instance_uid=highdicom.UID(), instance_number=1)
    image.save_as(args.output)
    print(f"{args.output}: {len(frames)} frames")
    if args.rle:
        from pydicom.uid import RLELossless

        ds = pydicom.dcmread(args.output)
        ds.compress(RLELossless)
        ds.save_as(args.rle)
        print(f"{args.rle}: RLE Lossless copy")
    if args.nifti:
        import nibabel as nib
        import numpy as np

        from covidct.io import read

        vol = read(args.output)   # (slices, rows, columns) in the working orientation; NIfTI wants (i, j, k)
        nib.save(nib.Nifti1Image(np.ascontiguousarray(vol.array.transpose(2, 1, 0)), vol.affine), args.nifti)
        print(f"{args.nifti}: the same volume as NIfTI")


def measure(args: argparse.Namespace) -> None:
    from analyze import _run_sampling_memory

    for path in args.paths:
        out = json.loads(subprocess.run([sys.executable, "-c", _READ_PEAK, path], capture_output=True, text=True,
                                        check=True).stdout)
        if args.analyze:
            t = time.perf_counter()
            proc, err, tree_mb = _run_sampling_memory([sys.executable, "-m", "covidct.cli", "analyze", path, "-o",
                                                       str(Path(args.analyze) / Path(path).name.split(".")[0])])
            out.update({"analyze_rc": proc.returncode, "analyze_wall_s": round(time.perf_counter() - t, 1),
                        "analyze_tree_peak_mb": round(tree_mb)})
        print(path, json.dumps(out))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="step", required=True)
    m = sub.add_parser("make")
    m.add_argument("series")
    m.add_argument("-o", "--output", required=True)
    m.add_argument("--repeat", type=int, default=1)
    m.add_argument("--rle")
    m.add_argument("--nifti")
    m.set_defaults(func=make)
    s = sub.add_parser("measure")
    s.add_argument("paths", nargs="+")
    s.add_argument("--analyze")
    s.set_defaults(func=measure)
    args = ap.parse_args()
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
