"""Image noise of a CT volume in Hounsfield units, and the in-plane smoothing that brings a noisy scan back to the
noise of the scans the pipeline was checked on.

A sharp (lung) reconstruction kernel or a low dose raises the pixel noise of the same anatomy several times; the
segmentation model, which learnt from smoother slices, then reads the grain in aerated lung as ground glass
(benchmarks/RESULTS.md, "Session 36": on the open COVID-CT-MD scans with a lung-kernel-like
sharpening, the CAP patient's burden 5.5 -> 8.9 % and its answer COVID-19, the pooled slice AUC 0.89 -> 0.84).

The noise measure, :func:`soft_tissue_sd`: the median local standard deviation (7 x 7 pixels) over soft tissue
(local mean 20-80 HU: muscle, heart, liver) on up to :data:`SAMPLE_SLICES` slices of the middle half of the scan.
It counts the tissue's own texture too, so it is an index, not the physical noise: the three open scans (Siemens
D40s kernel, 2 mm) read 22.8 / 20.0 / 25.3 HU (P001 / cap001 / normal001). The slices of a scan above
:data:`SMOOTH_ABOVE_HU` reach the models through the narrowest in-plane Gaussian (of :data:`SIGMAS_PX`, at most
:data:`MAX_SIGMA_MM`) that brings the index down to :data:`REFERENCE_HU`; the lungs are found, and the viewer and
overlays drawn, on the slices as read (the classical lung mask does not need it, and a wide Gaussian can cost it a
lung).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage

from covidct.io.volume import Volume

#: Noise index the slices of a noisy scan are brought to: cap001's (P001 22.8, normal001 25.3). 25 HU was measured
#: too and restored the sharpened scans less (benchmarks/RESULTS.md).
REFERENCE_HU = 20.0
#: Scans above this index (twice the open scans') are smoothed; mildly noisy variants (39-46 HU) lost slice AUC when
#: smoothed (benchmarks/RESULTS.md).
SMOOTH_ABOVE_HU = 50.0
#: Gaussian widths tried, in pixels, narrowest first (0.1 px apart).
SIGMAS_PX = tuple(round(0.3 + 0.1 * i, 1) for i in range(28))
#: Widest Gaussian (mm; FWHM 3.5 mm): wider ones blur small lesions and make blobs of white noise.
MAX_SIGMA_MM = 1.5
#: Soft tissue: local mean in this range (HU).
SOFT_TISSUE_HU = (20.0, 80.0)
LOCAL_WINDOW_PX = 7
#: Slices measured (evenly over the middle half of the scan) and the soft-tissue pixels one needs to count.
SAMPLE_SLICES = 12
MIN_TISSUE_PX = 500


def sample_slices(n_slices: int, count: int = SAMPLE_SLICES) -> list[int]:
    """Up to ``count`` slice indices spread evenly over the middle half of ``n_slices`` (all slices of a short scan)."""
    lo, hi = (n_slices // 4, max(n_slices // 4 + 1, 3 * n_slices // 4)) if n_slices >= 8 else (0, n_slices)
    return sorted(set(np.linspace(lo, hi - 1, min(count, hi - lo)).round().astype(int).tolist()))


def _slice_sd(hu: np.ndarray) -> float | None:
    """Median local standard deviation over the soft tissue of one HU slice; None with too little soft tissue."""
    hu = np.asarray(hu, np.float32)
    mean = ndimage.uniform_filter(hu, LOCAL_WINDOW_PX)
    sd = np.sqrt(np.maximum(ndimage.uniform_filter(hu * hu, LOCAL_WINDOW_PX) - mean * mean, 0.0))
    tissue = (mean > SOFT_TISSUE_HU[0]) & (mean < SOFT_TISSUE_HU[1])
    return float(np.median(sd[tissue])) if np.count_nonzero(tissue) >= MIN_TISSUE_PX else None


def soft_tissue_sd(slices: list[np.ndarray], sigma_px: float = 0.0) -> float | None:
    """The noise index of HU slices (module docstring), after a Gaussian of ``sigma_px`` when > 0; None when no
    slice holds enough soft tissue."""
    values = [_slice_sd(smoothed(s, sigma_px)) for s in slices]
    values = [v for v in values if v is not None]
    return round(float(np.median(values)), 2) if values else None


def smoothing_sigma(slices: list[np.ndarray], reference_hu: float = REFERENCE_HU,
                    max_sigma_px: float | None = None) -> tuple[float, float | None]:
    """``(sigma_px, index after it)``: the narrowest of :data:`SIGMAS_PX` (up to ``max_sigma_px``) that brings the
    slices' noise index to ``reference_hu`` or below (the widest when none does); the index falls as sigma grows,
    so by bisection."""
    sigmas = [s for s in SIGMAS_PX if max_sigma_px is None or s <= max_sigma_px] or [SIGMAS_PX[0]]
    lo, hi = 0, len(sigmas) - 1
    after = {hi: soft_tissue_sd(slices, sigmas[hi])}
    if after[hi] is not None and after[hi] > reference_hu:
        return sigmas[hi], after[hi]
    while lo < hi:
        mid = (lo + hi) // 2
        after[mid] = soft_tissue_sd(slices, sigmas[mid])
        if after[mid] is None or after[mid] <= reference_hu:
            hi = mid
        else:
            lo = mid + 1
    return sigmas[lo], after[lo]


def noise_plan(array: np.ndarray, *, pixel_mm: float | None = None, smooth: bool = True,
               reference_hu: float = REFERENCE_HU, smooth_above_hu: float = SMOOTH_ABOVE_HU) -> dict[str, Any]:
    """The noise index of a ``(slices, rows, columns)`` HU volume and, when it is above ``smooth_above_hu`` and
    ``smooth``, the in-plane Gaussian (:func:`smoothing_sigma`) its slices get on their way into the models
    (:func:`smoothed`; the volume itself is not changed). Returns what a report states: the index before and
    after, the sigma in pixels (0: not smoothed) and mm."""
    sample = [array[k] for k in sample_slices(array.shape[0])]
    before = soft_tissue_sd(sample)
    plan: dict[str, Any] = {"soft_tissue_sd_hu": before, "reference_sd_hu": reference_hu,
                            "smooth_above_sd_hu": smooth_above_hu, "smoothed": False, "sigma_px": 0.0,
                            "sigma_mm": None, "soft_tissue_sd_after_hu": before}
    if not smooth or before is None or before <= smooth_above_hu:
        return plan
    sigma, after = smoothing_sigma(sample, reference_hu, MAX_SIGMA_MM / pixel_mm if pixel_mm else None)
    plan.update(smoothed=True, sigma_px=sigma, soft_tissue_sd_after_hu=after,
                sigma_mm=round(sigma * pixel_mm, 3) if pixel_mm else None)
    return plan


def volume_noise_plan(vol: Volume, *, smooth: bool = True) -> dict[str, Any] | None:
    """:func:`noise_plan` of a volume (its in-plane pixel size, the geometric mean of row and column spacing, for the
    cap); None for inputs without HU. The one place every command that gives CT volumes to a model plans from."""
    if not vol.is_hu:
        return None
    pixel_mm = float(np.sqrt(vol.spacing[1] * vol.spacing[2])) if vol.spacing else None
    return noise_plan(vol.array, pixel_mm=pixel_mm, smooth=smooth)


def smoothed(hu: np.ndarray, sigma_px: float) -> np.ndarray:
    """One HU slice through the in-plane Gaussian of a :func:`noise_plan` (float32); the slice itself when 0."""
    return ndimage.gaussian_filter(np.asarray(hu, np.float32), sigma_px) if sigma_px > 0 else hu


def smoothed_box(hu: np.ndarray, box: tuple[slice, slice], sigma_px: float) -> np.ndarray:
    """``smoothed(hu, sigma_px)[box]`` computed on the box and the Gaussian's reach around it only (the same values:
    scipy truncates the kernel at 4 sigma)."""
    reach = int(np.ceil(4 * sigma_px)) + 1
    rows, cols = (slice(*part.indices(size)[:2]) for part, size in zip(box, hu.shape))   # open ends made explicit
    r0, c0 = max(rows.start - reach, 0), max(cols.start - reach, 0)
    part = smoothed(hu[r0:rows.stop + reach, c0:cols.stop + reach], sigma_px)
    return part[rows.start - r0:rows.stop - r0, cols.start - c0:cols.stop - c0]
