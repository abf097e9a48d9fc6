"""The body on a CT slice, to frame whole-slice classifiers like their training images.

The slice classifiers are trained on UCSD COVID-CT images, which are cropped to the body. A CT slice
shows the body inside a larger field of view (table, air) whose size depends on the scanner setting
and the in-plane resolution (COVID-CT-MD: 383 mm at 0.75 mm, 302 mm at 1.18 mm). Cropping each HU slice
to its body box makes the framing the same at any resolution. Measured on the open COVID-CT-MD slices
(``benchmarks/RESULTS.md``): COVID-vs-rest AUC 0.725 -> 0.810 for the default ensemble, 0.658 -> 0.787
for the Mask-Net classifier.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from covidct.io.window import Window, to_model_input

def mask_box(mask2d: np.ndarray, *, margin: float = 0.03, pad: int | None = None) -> tuple[slice, slice] | None:
    """The bounding box of ``mask2d`` widened on every side by ``pad`` pixels, or by ``margin`` of the
    slice size (+1 pixel) when ``pad`` is None; clipped to the slice. None for an empty mask."""
    rows = np.flatnonzero(mask2d.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask2d.any(axis=0))
    h, w = mask2d.shape
    mr, mc = (pad, pad) if pad is not None else (int(margin * h) + 1, int(margin * w) + 1)
    return (slice(max(0, int(rows[0]) - mr), min(h, int(rows[-1]) + 1 + mr)),
            slice(max(0, int(cols[0]) - mc), min(w, int(cols[-1]) + 1 + mc)))


#: Voxels above this HU are tissue (the lungs are holes in it, filled by taking the bounding box).
BODY_HU = -500.0


def body_box(hu2d: np.ndarray, *, threshold: float = BODY_HU, margin: float = 0.02) -> tuple[slice, slice] | None:
    """The bounding box (+ ``margin`` of the slice size per side) of the largest tissue component
    after a 2-pixel opening, which cuts the table and cables off; None without tissue. Slices above
    256 pixels are searched at an integer step (512² at 256²), the box mapped back."""
    hu2d = np.asarray(hu2d)
    step = max(1, -(-max(hu2d.shape) // 256))
    if step > 1:
        box = body_box(hu2d[::step, ::step], threshold=threshold, margin=margin)
        if box is None:
            return None
        h, w = hu2d.shape
        return (slice(box[0].start * step, min(h, box[0].stop * step)), slice(box[1].start * step, min(w, box[1].stop * step)))
    tissue = ndimage.binary_opening(hu2d > threshold, iterations=2)
    lab, n = ndimage.label(tissue)
    if n == 0:
        return None
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return mask_box(lab == int(sizes.argmax()), margin=margin)


def classifier_input(slice2d: np.ndarray, *, is_hu: bool, window: str | Window = "model") -> np.ndarray:
    """A slice as a whole-slice classifier sees it: HU slices cropped to the body, then windowed
    (:func:`~covidct.io.window.to_model_input`); images (already framed by whoever cropped them) as they are."""
    if is_hu:
        box = body_box(slice2d)
        if box is not None:
            slice2d = slice2d[box]
    return to_model_input(slice2d, is_hu=is_hu, window=window)
