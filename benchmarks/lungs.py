"""Classical lung masks at full in-plane resolution against the 2-pixel-step default
(``segment_lungs_hu(max_size=320)``): time, Dice between the two, lung volumes.

    python benchmarks/lungs.py ../shared/data/covid-ct-md/P001 ../shared/data/covid-ct-md/normal001
"""

from __future__ import annotations

import sys
import time


from covidct.analysis.lungs import segment_lungs_hu
from covidct.io import read
from covidct.metrics import dice_score


def main() -> int:
    print(f"{'scan':<48}{'full s':>8}{'step s':>8}{'full mL':>10}{'step mL':>10}{'Dice':>8}")
    for path in sys.argv[1:]:
        vol = read(path)
        t0 = time.perf_counter()
        full = segment_lungs_hu(vol.array, spacing=vol.spacing, affine=vol.affine, max_size=100_000)
        t1 = time.perf_counter()
        fast = segment_lungs_hu(vol.array, spacing=vol.spacing, affine=vol.affine)
        t2 = time.perf_counter()
        print(f"{path:<48}{t1 - t0:>8.2f}{t2 - t1:>8.2f}{full.volume_ml:>10.1f}{fast.volume_ml:>10.1f}"
              f"{dice_score(full.mask, fast.mask):>8.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
