"""Measure the HU window of the 8-bit training slices: fit a line from HU to [0, 1] so that the
5th..95th intensity percentiles around the lungs of the COVID-SemiSeg slices match those of the
same region in each HU scan (lung field dilated by about 15 training pixels; no labels used).
This is where the ``model`` window of ``covidct.io.window`` comes from.

    python benchmarks/window_fit.py --slices $COVIDCT_DATA/covid-semiseg \\
        $COVIDCT_DATA/covid-ct-md/normal001 $COVIDCT_DATA/covid-ct-md/P001 $COVIDCT_DATA/covid-ct-md/cap001.nii.gz
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
from scipy import ndimage

QUANTILES = np.arange(5, 96, 5)


def main() -> int:
    from covidct.analysis.lungs import segment_lungs_hu
    from covidct.data.segmentation import SegFolder
    from covidct.io import read

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slices", required=True, help="COVID-SemiSeg-layout folder (8-bit slices with lung/ masks)")
    ap.add_argument("scans", nargs="+", help="HU scans (DICOM series, NIfTI)")
    args = ap.parse_args()
    folder = SegFolder(args.slices)
    values = []
    for i in range(len(folder)):
        s = folder[i]
        region = ndimage.binary_dilation(s.lung > 0, iterations=15)
        values.append(s.image[region] / 255.0)
    train_q = np.percentile(np.concatenate(values), QUANTILES)
    print("training-slice percentiles 5..95:", " ".join(f"{v:.2f}" for v in train_q))
    for path in args.scans:
        vol = read(path)
        lungs = segment_lungs_hu(vol.array, spacing=vol.spacing, affine=vol.affine).labels > 0
        px = vol.spacing[1] if vol.spacing else 0.7
        iterations = max(1, int(round(15 * 0.7 / px)))  # ~15 px of a ~0.7 mm training pixel
        hu = [vol.array[k][ndimage.binary_dilation(lungs[k], iterations=iterations)]
              for k in range(0, vol.n_slices, 3) if lungs[k].sum() >= 500]
        scan_q = np.percentile(np.concatenate(hu), QUANTILES)
        slope, intercept = np.polyfit(scan_q, train_q, 1)
        width = 1.0 / slope
        level = -intercept / slope + width / 2
        resid = np.abs(np.polyval([slope, intercept], scan_q) - train_q).max()
        print(f"{path}: level {level:.0f} HU, width {width:.0f} HU (max residual {resid:.3f})")
    return 0


if __name__ == "__main__":
    from covidct.errors import CovidctError

    try:
        sys.exit(main())
    except CovidctError as exc:
        print(f"{os.path.basename(sys.argv[0])}: error: {exc}", file=sys.stderr)
        sys.exit(2)
