"""Classical lung segmentation for HU volumes (scikit-image / SciPy).

Steps, per the usual threshold pipeline:

1. air: ``HU < -320``;
2. outside air removed slice by slice (air components touching the slice border);
3. 3-D components kept when at least ``min_volume_ml`` and a quarter of the largest one (drops
   stomach and bowel gas and noise);
4. trachea and main bronchi removed: the 3-D component of very low density (``HU < -950``) inside
   the mask that reaches the top lung slices, if it is small (airway-sized, < 250 mL), dilated by 1 voxel;
5. holes filled slice by slice (vessels, nodules);
6. left / right split: the two largest 3-D components when they separate; otherwise the slice-wise
   split at the column between the two lungs. Patient side comes from the affine.

Labels: 0 outside, 1 right lung, 2 left lung.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from tqdm import tqdm

RIGHT, LEFT = 1, 2
#: Slices processed together by the whole-volume counting steps (here, in :mod:`covidct.analysis.severity` and
#: :mod:`covidct.analysis.scan`): it bounds their temporary memory on long scans (benchmarks/RESULTS.md).
SLICE_CHUNK = 16


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """3-D connected components of ``mask`` (``ndimage.label``), in 16-bit labels while they suffice (32 bits
    past 65,535 components): half the memory of the default labels on a long scan."""
    try:
        return ndimage.label(mask, output=np.uint16)
    except RuntimeError:   # more components than 16 bits can number
        return ndimage.label(mask)


def component_sizes(labels: np.ndarray, n: int, chunk: int = SLICE_CHUNK) -> np.ndarray:
    """Voxels of each label 0..n, counted ``chunk`` slices at a time (``np.bincount`` takes an 8-byte copy of
    its input: 4-8 times a whole label volume at once)."""
    sizes = np.zeros(n + 1, np.int64)
    for z in range(0, labels.shape[0], chunk):
        sizes += np.bincount(labels[z:z + chunk].ravel(), minlength=n + 1)
    return sizes


def _lookup(labels: np.ndarray, chosen: np.ndarray, n: int) -> np.ndarray:
    """Boolean mask of the voxels whose label is in ``chosen`` (a table lookup: no sort, no temporary)."""
    table = np.zeros(n + 1, bool)
    table[chosen] = True
    return table[labels]


@dataclass
class LungResult:
    labels: np.ndarray  # (slices, rows, cols) uint8: 0 outside, 1 right, 2 left
    volume_ml: float | None
    airway_removed_ml: float | None

    @property
    def mask(self) -> np.ndarray:
        return self.labels > 0


def _clear_border_2d(air: np.ndarray) -> np.ndarray:
    from skimage.segmentation import clear_border

    out = np.zeros_like(air)
    for k in range(air.shape[0]):
        out[k] = clear_border(air[k])
    return out


def _column_increases_to_left(affine: np.ndarray) -> bool:
    """True when column index i runs towards the patient's left (RAS x decreasing)."""
    return bool(affine[0, 0] < 0) if abs(affine[0, 0]) >= abs(affine[1, 0]) else bool(affine[1, 0] > 0)


def segment_lungs_hu(hu: np.ndarray, *, spacing: tuple[float, float, float] | None = None,
                     affine: np.ndarray | None = None, threshold: float = -320.0,
                     min_volume_ml: float = 50.0, max_size: int = 320, progress: bool = False) -> LungResult:
    """Lung labels (1 right, 2 left) of a ``(slices, rows, cols)`` HU volume.

    Slices larger than ``max_size`` are processed at an integer in-plane step (512² -> 256²) and
    the labels brought back by nearest neighbour: 4x less work, boundaries within one source pixel
    pair. ``progress``: a bar over the five steps (air outside the body, components, airways, holes,
    sides)."""
    step = max(1, int(np.ceil(max(hu.shape[1:]) / max_size)))
    if step > 1:
        sp = spacing or (1.0, 1.0, 1.0)
        small = segment_lungs_hu(hu[:, ::step, ::step], spacing=(sp[0], sp[1] * step, sp[2] * step), affine=affine,
                                 threshold=threshold, min_volume_ml=min_volume_ml, max_size=max_size,
                                 progress=progress)
        # nearest-neighbour upsampling written straight into the full-size array (np.repeat twice would add two
        # more label volumes at the peak)
        n, rows, cols = small.labels.shape
        full = np.empty((n, rows * step, cols * step), np.uint8)
        full.reshape(n, rows, step, cols, step)[...] = small.labels[:, :, None, :, None]
        labels = np.ascontiguousarray(full[:, :hu.shape[1], :hu.shape[2]])
        del full
        voxel_ml = float(np.prod(sp)) / 1000.0
        lung_voxels = sum(int(np.count_nonzero(labels[z:z + SLICE_CHUNK])) for z in range(0, n, SLICE_CHUNK))
        return LungResult(labels, float(lung_voxels * voxel_ml), small.airway_removed_ml)
    spacing = spacing or (1.0, 1.0, 1.0)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    with tqdm(total=5, desc="lungs", unit="step", disable=not progress) as bar:
        air = hu < threshold
        inside = _clear_border_2d(air)
        bar.update()
        del air
        lab, n = label_components(inside)
        del inside
        if n == 0:   # no air inside the body: no lungs (the stage is done)
            bar.update(bar.total - bar.n)
            return LungResult(np.zeros(hu.shape, np.uint8), 0.0, 0.0)
        sizes = component_sizes(lab, n)[1:]
        min_vox = max(1, int(min_volume_ml / voxel_ml)) if hu.shape[0] > 1 else max(1, int(0.005 * hu[0].size))
        # lungs are the large components; stomach / bowel gas is far smaller than either lung
        keep = np.flatnonzero((sizes >= min_vox) & (sizes >= 0.25 * sizes.max())) + 1
        if keep.size == 0:
            keep = np.array([int(np.argmax(sizes)) + 1])
        mask = _lookup(lab, keep, n)
        del lab
        bar.update()
        airway_ml = 0.0
        if hu.shape[0] > 3:
            mask, airway_ml = _remove_airways(mask, hu, voxel_ml)
        bar.update()
        for k in range(mask.shape[0]):
            if mask[k].any():
                mask[k] = ndimage.binary_fill_holes(mask[k])
        bar.update()
        labels = _split_sides(mask, affine if affine is not None else np.eye(4))
        bar.update()
    return LungResult(labels, float(mask.sum() * voxel_ml), airway_ml)


def _remove_airways(mask: np.ndarray, hu: np.ndarray, voxel_ml: float) -> tuple[np.ndarray, float]:
    dark = mask & (hu < -950)
    lab, n = label_components(dark)
    del dark
    if n == 0:
        return mask, 0.0
    slices_with_lung = np.flatnonzero(mask.any(axis=(1, 2)))
    top = slices_with_lung[: max(2, len(slices_with_lung) // 20)]
    touching = np.unique(lab[top][lab[top] > 0])
    removed = np.zeros_like(mask)
    for comp in touching:
        comp_mask = lab == comp
        if comp_mask.sum() * voxel_ml < 250.0:
            removed |= comp_mask
    if not removed.any():
        return mask, 0.0
    removed = ndimage.binary_dilation(removed, iterations=1) & mask
    kept = mask & ~removed
    # the airway wall (partial-volume pixels between -950 and the air threshold) is left as a thin
    # ring that hole filling would turn back into a full trachea: drop, slice by slice, the leftover
    # pieces that touch the removed airway and are smaller than it there
    for k in np.flatnonzero(removed.any(axis=(1, 2))):
        pieces, m = ndimage.label(kept[k])
        if m == 0:
            continue
        touching_ids = np.unique(pieces[ndimage.binary_dilation(removed[k]) & (pieces > 0)])
        area = np.bincount(pieces.ravel(), minlength=m + 1)
        small = [i for i in touching_ids if area[i] < removed[k].sum()]
        if small:
            ring = np.isin(pieces, small)
            kept[k] &= ~ring
            removed[k] |= ring
    return kept, float(removed.sum() * voxel_ml)


def _split_sides(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    labels = np.zeros(mask.shape, np.uint8)
    if not mask.any():
        return labels
    to_left = _column_increases_to_left(affine)
    lab, n = label_components(mask)
    sizes = component_sizes(lab, n)[1:]
    order = np.argsort(sizes)[::-1] + 1
    two = n >= 2 and sizes[order[1] - 1] > 0.25 * sizes[order[0] - 1]
    if two:
        a, b = lab == order[0], lab == order[1]
        del lab
        ca, cb = (_mean_column(m) for m in (a, b))
        small_i, large_i = (a, b) if ca < cb else (b, a)
        labels[small_i] = RIGHT if to_left else LEFT
        labels[large_i] = LEFT if to_left else RIGHT
        rest = mask & ~(a | b)
        del a, b, small_i, large_i
    else:
        del lab
        rest = mask
    if rest.any():  # one joined component (or leftovers): split at the mid column of each slice
        cols = np.flatnonzero(mask.any(axis=(0, 1)))
        mid = 0.5 * (cols.min() + cols.max())
        for k in np.flatnonzero(rest.any(axis=(1, 2))):
            profile = mask[k].sum(axis=0).astype(float)
            lo, hi = int(mid - 0.15 * mask.shape[2]), int(mid + 0.15 * mask.shape[2])
            lo, hi = max(lo, 0), min(hi, mask.shape[2] - 1)
            split = lo + int(np.argmin(profile[lo:hi + 1])) if hi > lo else int(mid)
            side = np.zeros(mask.shape[2], bool)
            side[split:] = True  # columns beyond the split
            far, near = (LEFT, RIGHT) if to_left else (RIGHT, LEFT)
            labels[k][rest[k] & side[None, :]] = far
            labels[k][rest[k] & ~side[None, :]] = near
    return labels


def _mean_column(mask: np.ndarray) -> float:
    """Mean column index of a 3-D mask's voxels, from its column profile (no index array per voxel)."""
    profile = mask.sum(axis=(0, 1), dtype=np.int64)
    return float((profile * np.arange(profile.size)).sum() / profile.sum())


#: Dense bone (cortex) in HU: above what contrast-filled vessels usually reach in the mediastinum.
BONE_HU = 400.0
#: Bone pixels a slice needs between its lungs to vote in :func:`spine_posterior_votes`.
MIN_BONE_PIXELS = 20


def spine_posterior_votes(hu: np.ndarray, labels: np.ndarray, *, bone_hu: float = BONE_HU,
                          min_bone_pixels: int = MIN_BONE_PIXELS) -> tuple[int, int]:
    """Where the spine lies, slice by slice: ``(posterior, voting)`` slices. A slice votes when both lungs are in it
    and it holds at least ``min_bone_pixels`` of dense bone (``>= bone_hu``) in the mediastinal band (the columns
    between the two lungs' centres); it votes posterior when more of that bone lies below the lungs' centre row
    (higher row index: posterior in the working orientation) than above it. The vertebral body and its arch
    outweigh the sternum in every chest slice, so a correctly oriented chest CT votes posterior almost
    everywhere (measured: 93.8-98.6 % of the open COVID-CT-MD scans' slices; benchmarks/RESULTS.md) and one
    stored upside down almost nowhere. One slice at a time: no whole-volume temporaries."""
    posterior = voting = 0
    for k in range(labels.shape[0]):
        right, left = labels[k] == RIGHT, labels[k] == LEFT
        if not right.any() or not left.any():
            continue
        row_centre = int(ndimage.center_of_mass(labels[k] > 0)[0])
        c1, c2 = ndimage.center_of_mass(right)[1], ndimage.center_of_mass(left)[1]
        a, b = int(round(min(c1, c2))), int(round(max(c1, c2)))
        per_row = (hu[k][:, a:b] >= bone_hu).sum(axis=1)
        front, back = int(per_row[:row_centre].sum()), int(per_row[row_centre:].sum())
        if front + back >= min_bone_pixels:
            voting += 1
            posterior += back > front
    return posterior, voting


def mediastinum_widths(labels: np.ndarray) -> np.ndarray:
    """Per slice, the widest gap in pixels between the two lungs on one row: from the right lung's medial edge
    (its largest column) to the left lung's (its smallest), over the rows holding both; NaN on slices without
    such a row. The gap is the mediastinum: narrow at the apices (trachea, great vessels), widest at the heart
    above the diaphragm. Sides are positional (right lung at the low columns, as the working orientation and
    :func:`segment_lungs_hu` have it). One slice at a time."""
    widths = np.full(labels.shape[0], np.nan)
    for k in range(labels.shape[0]):
        right, left = labels[k] == RIGHT, labels[k] == LEFT
        rows = right.any(axis=1) & left.any(axis=1)
        if not rows.any():
            continue
        right, left = right[rows], left[rows]
        right_edge = right.shape[1] - 1 - np.argmax(right[:, ::-1], axis=1)
        left_edge = np.argmax(left, axis=1)
        widths[k] = float((left_edge - right_edge).max())
    return widths


#: Soft tissue in HU for the liver-side cue (liver, spleen, muscle, blood; fat and lung fall outside).
SOFT_TISSUE_HU = (30.0, 200.0)


def soft_tissue_sides(hu: np.ndarray, labels: np.ndarray, slices: np.ndarray) -> tuple[int, int]:
    """Soft-tissue pixels (:data:`SOFT_TISSUE_HU`, outside the lungs, within the rows the lungs span) on the
    patient's right and left of the midline between the two lungs, summed over ``slices``. Near the lung bases the
    liver, the largest solid organ, lies under the right lung, so the right count is the larger; the midline is
    the column halfway between the two lungs' centres over those slices. ``(0, 0)`` when either lung is absent."""
    columns = np.arange(labels.shape[2])
    sums = np.zeros(2)
    counts = np.zeros(2)
    for k in slices:
        for i, side in enumerate((RIGHT, LEFT)):
            profile = (labels[k] == side).sum(axis=0)
            sums[i] += float((profile * columns).sum())
            counts[i] += float(profile.sum())
    if not counts.all():
        return 0, 0
    midline = int(round((sums[0] / counts[0] + sums[1] / counts[1]) / 2))
    right = left = 0
    for k in slices:
        rows = np.flatnonzero(labels[k].any(axis=1))
        band = slice(int(rows[0]), int(rows[-1]) + 1) if rows.size else slice(0, 0)
        values, lung = hu[k][band], labels[k][band]
        soft = (values >= SOFT_TISSUE_HU[0]) & (values <= SOFT_TISSUE_HU[1]) & (lung == 0)
        right += int(soft[:, :midline].sum())
        left += int(soft[:, midline:].sum())
    return right, left


def zone_index(labels: np.ndarray) -> np.ndarray:
    """Upper / middle / lower zone (0, 1, 2) of each lung voxel: thirds of each lung's
    cranio-caudal extent (slice 0 = head); -1 outside."""
    zones = np.full(labels.shape, -1, np.int8)
    for side in (RIGHT, LEFT):
        ks = np.flatnonzero([(labels[k] == side).any() for k in range(labels.shape[0])])
        if ks.size == 0:
            continue
        cuts = np.linspace(ks.min(), ks.max() + 1, 4)
        for z in range(3):
            sl = slice(int(round(cuts[z])), int(round(cuts[z + 1])))
            part = labels[sl] == side
            zones[sl][part] = z
    return zones
