"""Scan-level analysis: lungs -> lesions slice by slice -> burden, severity, slice scores.

Lesion model input: each HU slice is cropped to the bounding box of its lungs (plus a 3 % margin) —
the framing of the COVID-SemiSeg training slices — windowed (the ``model`` window of
:mod:`covidct.io.window`) and resized to the model's input size, so the in-plane resolution of the source does not matter (a 256² NIfTI at
1.18 mm and a 512² series at 0.75 mm give the same framing). Predictions are pasted back on the
input grid. Slices without HU get one run of the segmentation predictor on the whole slice, which gives
both their lungs (its lung head) and their lesions (cut to its own lung box, :mod:`covidct.engine.infer`): the
slice is segmented as ``covidct predict`` and ``covidct evaluate seg`` segment it, and the decision to
give it to the lung-masked companion is made once, on the whole slice. GGO/consolidation are kept inside each lung closed with a 10 mm disk (holes filled),
effusion within 15 mm of it; 3-D lesion components under 0.1 mL are dropped (volumes with spacing only).

Slices of a volume in the working orientation (DICOM, NIfTI: anterior up, :mod:`covidct.io.orientation`)
reach the segmentation model turned (``np.rot90``) into the orientation of its training slices, which its
checkpoint records (``slice_orientation``; the COVID-SemiSeg / MedSeg arrays have the anterior side at the
left edge: a quarter turn), and the labels are turned back. The augmentation flips slices but never turns
them (unless ``train seg --quarter-turns``: orientation "any", no turn), and the same fold models score
lower on the same labelled slices turned anterior-up (out of fold, infection Dice: 0.7755 -> 0.7675 on the
COVID-SemiSeg crops, 0.732 -> 0.709 on the MedSeg frames; ``benchmarks/RESULTS.md``). Images and folders of
images have no known orientation and go as they are.

Per-slice infection probability: ``A / (A + 100 mm²)`` with ``A`` the predicted GGO +
consolidation area of the slice (a 1 cm² lesion gives 0.5, 10 cm² 0.91); fixed a priori, not fitted,
and strictly increasing in ``A`` at the 6 decimals of the report (the earlier ``1 - exp(-A / 100 mm²)``
rounded every slice above 14 cm² to 1.0, so large lesions could no longer be ranked). The
patient-level answer: ``lesions present`` when GGO + consolidation cover at least 1 % of the lung
(a normal scan's burden is expected below 1 %); the mean of the 5 highest slice probabilities is
reported beside it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage
from tqdm import tqdm

from covidct.analysis.lungs import (LEFT, RIGHT, SLICE_CHUNK, component_sizes, label_components, mediastinum_widths,
                                    segment_lungs_hu, soft_tissue_sides, spine_posterior_votes, zone_index)
from covidct.analysis.severity import lesion_burden
from covidct.engine.infer import SegPredictor
from covidct.errors import InputError
from covidct.io.volume import Volume
from covidct.io.body import classifier_input, mask_box
from covidct.io.noise import smoothed, smoothed_box, volume_noise_plan
from covidct.io.window import Window, to_model_input
from covidct.models.base import turns_from_anterior_up

#: Lesion area of a slice at which its infection probability is 0.5.
AREA_SCALE_MM2 = 100.0
#: Lesions are kept inside each lung closed with a disk of this radius (see ``_lesion_region``).
CLOSING_MM = 10.0
#: Patient-level rule: lesion burden at or above this share of the lung counts as "lesions present".
#: Set a priori from the project's acceptance bound for a normal scan (< 1 % of lung).
MIN_BURDEN_PERCENT = 1.0
#: Lesion components smaller than this (about a 6 mm sphere, below what a radiologist reports as an
#: opacity) are dropped as noise. Fixed a priori.
MIN_LESION_ML = 0.1
TOP_K = 5
#: Lung volume above which the mask is called implausible: adult total lung capacity is about 4-8 L, and even
#: hyperinflated (emphysematous) lungs stay under 10 L; more means the mask took air that is not lung.
MAX_PLAUSIBLE_LUNG_ML = 10_000.0
#: Share of a slice above which the lung mask is called implausible: a chest CT slice holds the chest wall and the
#: mediastinum around its lungs (even in tightly cropped figures the lungs cover at most 84 % of the 645 CT images
#: measured, while textures and noise get masks of 90-100 %; benchmarks/non_ct_images.py).
MAX_PLAUSIBLE_LUNG_SHARE = 0.9
#: Volume kinds read into the working orientation (the others' orientation is unknown).
ORIENTED_KINDS = ("dicom-series", "dicom", "nifti")
#: Lung of at least this area on a scan's first or last slice: the scan may not hold the whole lungs.
COVERAGE_EDGE_MM2 = 100.0
#: Orientation check (:func:`orientation_check`): the spine is called posterior when at least this share of the
#: voting slices puts it there, anterior (the volume upside down) at or below ``1 -`` it; in between undetermined.
SPINE_VOTE_SHARE = 0.7
#: Fewer voting slices than this: the check says nothing.
MIN_SPINE_VOTES = 5
#: Head-feet check: the widest mediastinum (:func:`~covidct.analysis.lungs.mediastinum_widths`, the 90th percentile
#: over the slices) of the feet-end half of the lung slices over that of the head-end half at or above this: as
#: stored; at or below its inverse: reversed (benchmarks/RESULTS.md has the open scans' ratios).
MEDIASTINUM_WIDTH_RATIO = 1.3
MEDIASTINUM_WIDTH_PERCENTILE = 90
#: Slices with both lungs that each half needs for the head-feet check.
MIN_HALF_SLICES = 10
#: Left-right check: soft tissue right / left of the midline (:func:`~covidct.analysis.lungs.soft_tissue_sides`)
#: over the feet-end :data:`LIVER_SHARE` of the lung slices at or above this: as stored (the liver on the right);
#: at or below its inverse: reversed.
LIVER_SIDE_RATIO = 1.3
LIVER_SHARE = 0.25
#: The head-feet and left-right checks need the whole lungs in the scan: its first and last slices each hold less
#: lung than this share of the largest lung slice (a scan that starts or stops mid-chest ends on a near-full lung
#: slice, and its mediastinum widths and soft tissue no longer follow the rule).
LUNG_END_SHARE = 0.25
#: The array axis (slices, rows, columns) of each axis the orientation check tests.
ARRAY_AXIS = {"head_feet": 0, "anterior_posterior": 1, "left_right": 2}


@dataclass
class ScanResult:
    lesions: np.ndarray          # (slices, rows, cols) uint8: 0 none, 1 GGO, 2 consolidation, 3 effusion
    lungs: np.ndarray            # (slices, rows, cols) uint8: 0 outside, 1 right, 2 left
    burden: dict
    slices: list[dict]
    diagnosis: dict
    lung_method: str
    timings: dict = field(default_factory=dict)
    lung_coverage: dict | None = None   # see :func:`lung_coverage`
    lung_volume_note: str | None = None   # see :func:`lung_volume_note`
    orientation_check: dict | None = None   # see :func:`orientation_check`
    lung_share_note: str | None = None   # see :func:`lung_share_note`
    # slices whose lesions the lung-masked companion segmented (found black outside the lungs: the whole slice
    # for non-HU inputs, the lung box for HU ones, where this never happens on a windowed CT slice)
    lung_masked_slices: list[int] = field(default_factory=list)
    # axes turned back before the analysis because the anatomy called them reversed (``reorient``; names of
    # :data:`ARRAY_AXIS`): ``lesions``, ``lungs`` and ``slices`` are of the turned volume, :meth:`as_stored` maps back
    reoriented: list[str] = field(default_factory=list)
    # HU volumes: the noise index, and the in-plane smoothing of the slices the models see (:func:`volume_noise_plan`)
    noise: dict | None = None

    @property
    def smoothing_sigma_px(self) -> float:
        """The Gaussian (pixels) a noisy scan's slices pass on their way into any model; 0 for none."""
        return float((self.noise or {}).get("sigma_px") or 0.0)

    def as_stored(self, array: np.ndarray) -> np.ndarray:
        """A ``(slices, rows, columns)`` array of the analysis (``lesions``, ``lungs``) on the volume's grid as read,
        before :attr:`reoriented` turned it (unchanged when nothing was)."""
        return turned(array, self.reoriented)

    def effusion_assessable(self) -> bool:
        """Whether pleural effusion could be seen: not when every slice holding lung is a lung-masked rendering,
        whose pleural space is black (its effusion of 0 is then not measured, not absent)."""
        lung_slices = np.flatnonzero(self.lungs.reshape(len(self.lungs), -1).any(axis=1))
        return bool(set(lung_slices.tolist()) - set(self.lung_masked_slices))


def _lesion_region(lung2d: np.ndarray, radius_px: int) -> np.ndarray:
    """Where lesions may lie on a slice, labelled by side: each lung closed with a disk of
    ``radius_px`` (so dense lesions at the lung edge, which the air threshold leaves out, are inside)
    and its holes filled. A convex hull would be too generous at the lung bases, where the
    crescent-shaped lung wraps around the liver and stomach."""
    out = np.zeros(lung2d.shape, np.uint8)
    for side in (RIGHT, LEFT):
        m = lung2d == side
        box = mask_box(m, margin=0.0)
        if box is None:
            continue
        pad = radius_px + 1
        crop = np.pad(m[box], pad)
        # closing with a disk as two Euclidean distance transforms (much faster than a large footprint)
        dilated = ndimage.distance_transform_edt(~crop) <= radius_px
        closed = ndimage.distance_transform_edt(dilated) > radius_px
        closed = ndimage.binary_fill_holes(closed | crop)[pad:-pad, pad:-pad]
        region = out[box]
        region[closed & (region == 0)] = side
    return out


def lung_coverage(lungs: np.ndarray, pixel_mm2: float) -> dict:
    """Which slices hold lung, and whether the lungs run off the scan: lung of at least
    :data:`COVERAGE_EDGE_MM2` on the first (head) or last (feet) slice means the scan may not hold the
    apices or the bases, and volumes and percentages are of the part it holds (``note`` says so)."""
    area = (lungs > 0).sum(axis=(1, 2)) * pixel_mm2
    present = np.flatnonzero(area)
    cut = {"head": bool(area[0] >= COVERAGE_EDGE_MM2), "feet": bool(area[-1] >= COVERAGE_EDGE_MM2)}
    note = None
    if cut["head"] or cut["feet"]:
        ends = [f"the {name} slice ({a / 100:.1f} cm² of lung)"
                for name, a, c in (("head-end", area[0], cut["head"]), ("feet-end", area[-1], cut["feet"])) if c]
        part = " and ".join(p for p, c in (("apices", cut["head"]), ("bases", cut["feet"])) if c)
        note = (f"the lungs reach {' and '.join(ends)}: the scan may not hold all of the lung {part}; volumes and "
                f"percentages are of the part it holds")
    return {"first_slice": int(present[0]), "last_slice": int(present[-1]),
            "lung_mm2_on_first_slice": round(float(area[0]), 1), "lung_mm2_on_last_slice": round(float(area[-1]), 1),
            "cut_at_head": cut["head"], "cut_at_feet": cut["feet"], "note": note}


def lung_volume_note(volume_ml: float | None) -> str | None:
    """A warning when the lung mask is larger than lungs can be (:data:`MAX_PLAUSIBLE_LUNG_ML`): then it holds
    air outside the lungs (e.g. outside air closed in by padding around a circular field of view that is not
    below air, or a wrong voxel size in the header), and every percentage of lung is too small."""
    if volume_ml is None or volume_ml <= MAX_PLAUSIBLE_LUNG_ML:
        return None
    return (f"the lung mask measures {volume_ml / 1000:.1f} L, more than lungs hold (under "
            f"{MAX_PLAUSIBLE_LUNG_ML / 1000:.0f} L): it may include air outside the lungs (padding around the field of "
            f"view?) or the voxel size may be wrong; check lungs.nii.gz before using the percentages")


def lung_share_note(lungs: np.ndarray) -> str | None:
    """A warning when the lung mask covers more of a slice than lungs can (:data:`MAX_PLAUSIBLE_LUNG_SHARE`): the
    input is then probably not a chest CT slice (a photograph, a texture, noise), and its lesion numbers mean
    nothing."""
    if lungs.size == 0:
        return None
    shares = np.count_nonzero(lungs.reshape(lungs.shape[0], -1), axis=1) / float(lungs[0].size)
    k = int(np.argmax(shares))
    if shares[k] <= MAX_PLAUSIBLE_LUNG_SHARE:
        return None
    where = f" (slice {k})" if lungs.shape[0] > 1 else ""
    return (f"the lung mask covers {100 * shares[k]:.0f} % of the image{where}, more than lungs can: a chest CT "
            f"slice holds the chest wall and mediastinum around them; this input may not be a chest CT, and its "
            f"lesion numbers are then meaningless")


def orientation_check(vol: Volume, lungs: np.ndarray) -> dict | None:
    """Does the anatomy agree with the orientation the file states? A volume whose header is wrong or missing (a
    NIfTI with qform and sform codes 0 is read with ANALYZE's default axes; slices stacked in the wrong order) can
    arrive upside down, head first from the feet, or mirrored, and then zones, sides or the models' view of each
    slice are wrong. Three anatomical checks in the working orientation, each ``"as stored" | "reversed" |
    "undetermined"``:

    - ``anterior_posterior``: the spine lies behind the lungs on most slices
      (:func:`~covidct.analysis.lungs.spine_posterior_votes`, :data:`SPINE_VOTE_SHARE`);
    - ``head_feet``: the mediastinum is wider at the feet end of the lungs (the heart) than at the head end
      (trachea, great vessels): ``mediastinum_width_ratio``, feet half over head half (:data:`MEDIASTINUM_WIDTH_RATIO`,
      the widest slices of each half: :data:`MEDIASTINUM_WIDTH_PERCENTILE`);
    - ``left_right``: near the lung bases the liver puts more soft tissue on the patient's right than on the left:
      ``liver_side_ratio``, right over left (:data:`LIVER_SIDE_RATIO`); only when head and feet are known.

    The last two need the whole lungs in the scan (:data:`LUNG_END_SHARE`), else they are undetermined: on the lower
    half of a chest alone the mediastinum narrows towards the feet below the heart.

    Also ``spine_posterior_slices``, ``voting_slices``, ``orientation_in_header`` and ``note`` (one sentence per
    reversed axis, else None). None for inputs without HU or without a known orientation (images)."""
    if not vol.is_hu or vol.kind not in ORIENTED_KINDS:
        return None
    posterior, voting = spine_posterior_votes(vol.array, lungs)
    share = posterior / voting if voting else None
    anterior_posterior = "undetermined"
    if voting >= MIN_SPINE_VOTES and share is not None:
        anterior_posterior = _verdict(share, SPINE_VOTE_SHARE, 1.0 - SPINE_VOTE_SHARE)
    areas = np.array([np.count_nonzero(lungs[k]) for k in range(len(lungs))])   # lung pixels per slice
    width_ratio = _mediastinum_width_ratio(lungs, areas) if holds_whole_lungs(areas) else None
    head_feet = "undetermined" if width_ratio is None else _verdict(width_ratio, MEDIASTINUM_WIDTH_RATIO,
                                                                    1.0 / MEDIASTINUM_WIDTH_RATIO)
    liver_ratio = _liver_side_ratio(vol, lungs, areas, head_feet)
    left_right = "undetermined" if liver_ratio is None else _verdict(liver_ratio, LIVER_SIDE_RATIO, 1.0 / LIVER_SIDE_RATIO)
    in_header = vol.metadata.get("orientation_in_header", True)
    check = {"spine_posterior_slices": posterior, "voting_slices": voting, "anterior_posterior": anterior_posterior,
             "mediastinum_width_ratio": None if width_ratio is None else round(width_ratio, 3), "head_feet": head_feet,
             "liver_side_ratio": None if liver_ratio is None else round(liver_ratio, 3), "left_right": left_right,
             "orientation_in_header": bool(in_header)}
    return {**check, "note": orientation_note(check)}


def orientation_note(check: dict, *, turned_back: bool = False) -> str | None:
    """The note of an :func:`orientation_check` result: a sentence per reversed axis (one for both in-plane axes: a
    half turn), each with its likely cause and what it did to the analysis; ``turned_back``: the analysis turned
    them back (``analyze_volume(reorient=True)``), so the consequences are replaced by that. None when no axis is
    reversed."""
    ap, hf, lr = (check[axis] == "reversed" for axis in ("anterior_posterior", "head_feet", "left_right"))
    posterior, voting = check["spine_posterior_slices"], check["voting_slices"]
    why = ("its NIfTI header gives no orientation (qform and sform codes 0), so the axes were read as ANALYZE's "
           "default" if not check["orientation_in_header"] else "the orientation stored in the file is probably wrong")
    fixed = "; the analysis turned it back (--reorient anatomy)"
    notes = []
    if ap and lr:   # both in-plane axes: a half turn
        notes.append(f"the spine lies in front of the lungs on {voting - posterior} of {voting} slices and near the "
                     f"lung bases {1 / check['liver_side_ratio']:.1f} times more soft tissue lies on the patient's left "
                     f"than on the right, where the liver should be: the slices are upside down and turned by 180° "
                     f"(anterior and posterior, left and right swapped, as a prone scan read as supine); {why}" +
                     (fixed if turned_back else ". The models saw the slices turned and the right and left lung "
                      "figures are swapped: fix the orientation in the file and run again"))
    elif ap:
        notes.append(f"the spine lies in front of the lungs on {voting - posterior} of {voting} slices: the volume is "
                     f"upside down (anterior and posterior swapped); {why}" +
                     (fixed if turned_back else ". The models saw the slices mirrored and the zones or sides may be "
                      "swapped too: fix the orientation in the file and run again"))
    if hf:
        notes.append(f"the mediastinum is {1 / check['mediastinum_width_ratio']:.1f} times wider at the head end of "
                     f"the lungs than at the feet end, where the heart should make it widest: head and feet seem "
                     f"swapped; {why}" +
                     (fixed if turned_back else ". Upper and lower zones are then swapped and the trachea may be "
                      "counted as lung: fix the orientation in the file and run again"))
    if lr and not ap:
        notes.append(f"near the lung bases {1 / check['liver_side_ratio']:.1f} times more soft tissue lies on the "
                     f"patient's left than on the right, where the liver should be: left and right seem swapped (or "
                     f"the patient has situs inversus); {why}" +
                     (fixed if turned_back else ". The models saw the slices mirrored and the right and left lung "
                      "figures are swapped: fix the orientation in the file and run again"))
    return ". ".join(n if i == 0 else n[0].upper() + n[1:] for i, n in enumerate(notes)) or None


def turned(array: np.ndarray, axes: list[str]) -> np.ndarray:
    """A ``(slices, rows, columns)`` array with the named axes (:data:`ARRAY_AXIS`) reversed; its own inverse.
    The array itself when ``axes`` is empty."""
    if not axes:
        return array
    return np.ascontiguousarray(np.flip(array, axis=tuple(ARRAY_AXIS[name] for name in axes)))


def _verdict(value: float, as_stored_at: float, reversed_at: float) -> str:
    return "as stored" if value >= as_stored_at else "reversed" if value <= reversed_at else "undetermined"


def holds_whole_lungs(areas: np.ndarray) -> bool:
    """Whether, by the lung pixels of each slice (``areas``), the first and last slices each hold less lung than
    :data:`LUNG_END_SHARE` of the largest lung slice."""
    return bool(areas.size and areas.max() > 0 and max(areas[0], areas[-1]) < LUNG_END_SHARE * areas.max())


def _mediastinum_width_ratio(lungs: np.ndarray, areas: np.ndarray) -> float | None:
    """The widest mediastinum (:data:`MEDIASTINUM_WIDTH_PERCENTILE`) of the feet-end half of the lung slices over
    that of the head-end half; None when either half has fewer than :data:`MIN_HALF_SLICES` slices with both lungs.
    ``areas``: lung pixels per slice."""
    present = np.flatnonzero(areas)
    if present.size < 2 * MIN_HALF_SLICES:
        return None
    widths = mediastinum_widths(lungs)
    middle = (present[0] + present[-1]) / 2.0
    index = np.arange(len(lungs))
    head, feet = widths[(index < middle) & ~np.isnan(widths)], widths[(index >= middle) & ~np.isnan(widths)]
    if min(head.size, feet.size) < MIN_HALF_SLICES:
        return None
    head_width, feet_width = (float(np.percentile(w, MEDIASTINUM_WIDTH_PERCENTILE)) for w in (head, feet))
    return feet_width / head_width if head_width > 0 and feet_width > 0 else None


def _liver_side_ratio(vol: Volume, lungs: np.ndarray, areas: np.ndarray, head_feet: str) -> float | None:
    """Soft tissue right over left in the :data:`LIVER_SHARE` of the lung slices at the feet end (the head end of
    the array when ``head_feet`` is reversed); None when head and feet are undetermined or a side has no soft
    tissue. ``areas``: lung pixels per slice."""
    if head_feet == "undetermined":
        return None
    present = np.flatnonzero(areas)
    n = max(1, int(round(LIVER_SHARE * present.size)))
    slices = present[-n:] if head_feet == "as stored" else present[:n]
    right, left = soft_tissue_sides(vol.array, lungs, slices)
    return float(right / left) if right and left else None


def slice_infection_probability(area_mm2: np.ndarray) -> np.ndarray:
    """``A / (A + AREA_SCALE_MM2)``: 0 without lesion, 0.5 at 1 cm², strictly increasing."""
    area_mm2 = np.asarray(area_mm2, np.float64)
    return area_mm2 / (area_mm2 + AREA_SCALE_MM2)


def lung_crop_input(vol: Volume, k: int, box: tuple[slice, slice], *, turns: int,
                    window: str | Window = "model", sigma_px: float = 0.0) -> np.ndarray:
    """What the segmentation model sees of slice ``k``: its lung box, windowed into ``[0, 1]`` and turned
    ``turns`` quarters into the model's training orientation (:func:`model_turns`); a noisy scan's slice first
    through the Gaussian of its noise plan (``sigma_px``, :func:`covidct.io.noise.smoothed_box`)."""
    hu = smoothed_box(vol.array[k], box, sigma_px) if sigma_px else vol.array[k][box]
    return np.ascontiguousarray(np.rot90(to_model_input(hu, is_hu=vol.is_hu, window=window), turns))


def _slice_pixel_mm2(vol: Volume) -> float:
    return float(vol.spacing[1] * vol.spacing[2]) if vol.spacing else 1.0


def analyze_volume(vol: Volume, predictor: SegPredictor, *, progress: bool = True, batch_size: int = 8,
                   window: str | Window = "model", slice_orientation: str = "training",
                   require_lungs: bool = True, reorient: bool = False, denoise: bool = True) -> ScanResult:
    """Run the whole scan-level analysis on one volume; HU slices reach the model through ``window``.
    ``slice_orientation``: ``"training"`` turns the slices of an oriented volume into the orientation of the
    segmentation model's training slices (module docstring), ``"working"`` gives them as read (anterior up).
    ``require_lungs``: a volume in which no lungs are found is an :class:`InputError` (a scan-level answer
    would be "Control" for lungs never seen); ``False`` for per-slice outputs (``covidct predict``).
    ``reorient``: the axes :func:`orientation_check` calls reversed are turned back in ``vol.array`` itself (the
    caller's volume changes; its affine, files and metadata stay those of the file) and the lungs found again, so
    that the models, zones, sides and slice indices see the anatomy the right way round; the result's
    :attr:`ScanResult.reoriented` names them and :meth:`ScanResult.as_stored` maps its arrays back.
    ``denoise``: the slices of a HU volume much noisier than the scans the pipeline was checked on (a sharp kernel,
    a low dose) reach the segmentation model smoothed in-plane (:func:`covidct.io.noise.noise_plan`; the index is
    measured either way, :attr:`ScanResult.noise`); ``vol.array`` and the lungs are not smoothed."""
    turns = model_turns(vol, predictor, slice_orientation)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    n = vol.n_slices
    px_mm = _slice_pixel_mm2(vol)
    pixel_mm = float(np.sqrt(px_mm)) if vol.spacing else None   # the density split smooths in mm
    routed: list[int] = []   # slices whose lesions the lung-masked companion segmented (engine.infer)
    noise = volume_noise_plan(vol, smooth=denoise)
    sigma = float(noise["sigma_px"]) if noise else 0.0
    if noise is not None:
        timings["noise_s"] = round(time.perf_counter() - t0, 2)
        t0 = time.perf_counter()
    if vol.is_hu:
        lung_res = segment_lungs_hu(vol.array, spacing=vol.spacing, affine=vol.affine, progress=progress)
        lungs = lung_res.labels
        lesions = np.zeros(vol.shape, np.uint8)
        lung_method = "classical HU threshold (scikit-image/SciPy)"
    else:   # one predictor run per slice: lungs and (unrestricted) lesions
        lungs, lesions, routed = _learned_lungs_and_lesions(vol, predictor, progress=progress, turns=turns,
                                                            batch_size=batch_size, pixel_mm=pixel_mm)
        lung_method = "learned lung head of the segmentation model"
    timings["lungs_s"] = round(time.perf_counter() - t0, 2)   # non-HU: the one predictor run (lesions too)
    if require_lungs and not lungs.any():   # nothing to measure or answer for: not "Control"
        lowest = float(vol.array.min())
        hint = (f"; it holds no air in Hounsfield units (its lowest value is {lowest:g}, air is below -900)"
                if vol.is_hu and lowest > -900 else "")
        raise InputError(vol.source, f"no lungs found in it (is it a chest CT?){hint}, so there is nothing to analyse")
    orientation = orientation_check(vol, lungs)
    reoriented = [axis for axis in ARRAY_AXIS if orientation and orientation[axis] == "reversed"] if reorient else []
    if reoriented:   # the trachea is removed from the head end and the sides split by column: find the lungs again
        orientation = {**orientation, "note": orientation_note(orientation, turned_back=True)}
        t1 = time.perf_counter()
        vol.array = turned(vol.array, reoriented)
        lungs = segment_lungs_hu(vol.array, spacing=vol.spacing, affine=vol.affine, progress=progress).labels
        timings["lungs_s"] = round(timings["lungs_s"] + time.perf_counter() - t1, 2)

    t0 = time.perf_counter()
    eff_margin = max(1, int(round(15.0 / np.sqrt(px_mm)))) if vol.spacing else 15
    close_px = max(1, int(round(CLOSING_MM / np.sqrt(px_mm)))) if vol.spacing else 10
    if vol.is_hu:
        todo = [k for k in range(n) if lungs[k].any()]
        bar = tqdm(total=len(todo), desc="lesions", unit="slice", disable=not progress)
        for start in range(0, len(todo), batch_size):
            ks = todo[start:start + batch_size]
            boxes = [mask_box(lungs[k] > 0) for k in ks]
            crops = [lung_crop_input(vol, k, b, turns=turns, window=window, sigma_px=sigma) for k, b in zip(ks, boxes)]
            for k, b, pred in zip(ks, boxes, predictor.predict(crops, pixel_mm=pixel_mm)):
                if pred.network == "lung_masked":
                    routed.append(k)
                lesions[k][b] = np.rot90(pred.labels, -turns)
                _keep_near_lungs(lesions[k], lungs[k], close_px=close_px, effusion_px=eff_margin)
            bar.update(len(ks))
        bar.close()
    else:
        routed = [k for k in routed if lungs[k].any()]
        for k in range(n):
            _keep_near_lungs(lesions[k], lungs[k], close_px=close_px, effusion_px=eff_margin)
    _drop_small_lesions(lesions, lungs, vol.voxel_volume_ml())
    timings["lesions_s"] = round(time.perf_counter() - t0, 2)

    zones = zone_index(lungs)
    burden = lesion_burden(lesions, lungs, zones, voxel_ml=vol.voxel_volume_ml(), hu=vol.array if vol.is_hu else None)
    lung_px, ggo_px, cons_px, right_px, left_px = _per_slice_counts(lesions, lungs)
    infected_px = ggo_px + cons_px
    areas = infected_px * px_mm
    probs = slice_infection_probability(areas)

    def pct(px: int, k: int) -> float:
        return round(100.0 * float(px) / lung_px[k], 4) if lung_px[k] else 0.0

    slices = [{"index": int(k), "infection_probability": round(float(probs[k]), 6),
               "lesion_percent": pct(infected_px[k], k), "ggo_percent": pct(ggo_px[k], k),
               "consolidation_percent": pct(cons_px[k], k),
               "lesion_area_mm2": round(float(areas[k]), 2),
               "right_lesion_area_mm2": round(float(right_px[k] * px_mm), 2),
               "left_lesion_area_mm2": round(float(left_px[k] * px_mm), 2)} for k in range(n)]
    top = np.sort(probs)[::-1][:TOP_K]
    p_patient = float(top.mean()) if top.size else 0.0
    present = burden["percent_opacity"] >= MIN_BURDEN_PERCENT
    diagnosis = {
        "label": "lesions present" if present else "no lesions found",
        "probabilities": {"lesions_present": round(p_patient, 6)},
        "rule": f"lesions present when GGO + consolidation cover >= {MIN_BURDEN_PERCENT:g} % of the lung; the "
                f"probability is the mean of the {TOP_K} highest slice infection probabilities (not calibrated)",
        "note": "segmentation-based; the 3-class answer (Control / Common pneumonia / COVID-19) comes from a CT "
                "triage model (covidct analyze --triage, for volumes with a pixel spacing)",
    }
    # head and feet are known only for volumes in the working orientation with a pixel size
    coverage = lung_coverage(lungs, px_mm) if vol.kind in ORIENTED_KINDS and vol.spacing and n > 1 and lungs.any() \
        else None
    return ScanResult(lesions, lungs, burden, slices, diagnosis, lung_method, timings, coverage,
                      lung_volume_note(burden["lung_volume_ml"]), orientation, lung_share_note(lungs), routed,
                      reoriented, noise)


def _per_slice_counts(lesions: np.ndarray, lungs: np.ndarray, chunk: int = SLICE_CHUNK) -> tuple[np.ndarray, ...]:
    """Lung, GGO-in-lung, consolidation-in-lung, and GGO + consolidation in the right and in the left lung:
    pixels of every slice, a few slices at a time (whole-volume boolean temporaries would add several hundred
    MB at the peak of a long scan)."""
    n = lesions.shape[0]
    lung_px, ggo_px, cons_px, right_px, left_px = (np.zeros(n, np.int64) for _ in range(5))
    for start in range(0, n, chunk):
        part = slice(start, start + chunk)
        in_lung = lungs[part] > 0
        ggo, cons = lesions[part] == 1, lesions[part] == 2
        lung_px[part] = in_lung.sum(axis=(1, 2))
        ggo_px[part] = (ggo & in_lung).sum(axis=(1, 2))
        cons_px[part] = (cons & in_lung).sum(axis=(1, 2))
        infected = ggo | cons
        right_px[part] = (infected & (lungs[part] == RIGHT)).sum(axis=(1, 2))
        left_px[part] = (infected & (lungs[part] == LEFT)).sum(axis=(1, 2))
    return lung_px, ggo_px, cons_px, right_px, left_px


def model_turns(vol: Volume, model, slice_orientation: str = "training") -> int:
    """``np.rot90`` turns that bring ``vol``'s slices into the orientation ``model`` (a network with a
    ``config``, or a predictor holding one as ``model``) was trained on: from its checkpoint for volumes in the
    working orientation (DICOM, NIfTI), 0 for images (orientation unknown) or ``slice_orientation="working"``."""
    if slice_orientation not in ("training", "working"):
        raise ValueError(f"slice_orientation must be 'training' or 'working', not {slice_orientation!r}")
    if slice_orientation == "working" or vol.kind not in ORIENTED_KINDS:
        return 0
    # the network itself, or a predictor's network and its effusion companion (which runs on the same input):
    # the first that was not trained in every orientation decides
    nets = [model] if hasattr(model, "config") else [getattr(model, "model", None), getattr(model, "effusion", None)]
    orientations = [getattr(getattr(n, "config", None), "slice_orientation", "anterior-left")
                    for n in nets if n is not None] or ["anterior-left"]     # (models from before it was recorded)
    oriented = [o for o in orientations if o != "any"]
    return turns_from_anterior_up(oriented[0]) if oriented else 0


def classify_slices(vol: Volume, model, *, temperature: float = 1.0, indices: Sequence[int] | None = None,
                    window: str | Window = "model", batch_size: int = 16, progress: bool = True,
                    sigma_px: float = 0.0) -> dict[int, dict[str, float]]:
    """Per-slice class probabilities of a slice classifier (each slice cropped to the body and windowed,
    :func:`~covidct.io.body.classifier_input`; through the Gaussian of a noisy scan's plan, ``sigma_px``) for
    slices ``indices`` (all when None)."""
    from covidct.engine.evaluate_cls import predict_probabilities

    ks = list(range(vol.n_slices)) if indices is None else [int(k) for k in indices]
    names = list(model.config.classes)
    out: dict[int, dict[str, float]] = {}
    for start in tqdm(range(0, len(ks), batch_size), desc="classifier", unit="batch", disable=not progress):
        chunk = ks[start:start + batch_size]
        probs = predict_probabilities(model, [classifier_input(smoothed(vol.array[k], sigma_px), is_hu=vol.is_hu,
                                                               window=window)
                                              for k in chunk], temperature=temperature, batch_size=batch_size)
        for k, p in zip(chunk, probs):
            out[k] = {c: round(float(v), 6) for c, v in zip(names, p)}
    return out


def _drop_small_lesions(lesions: np.ndarray, lungs: np.ndarray, voxel_ml: float | None) -> None:
    """Remove 3-D lesion components under :data:`MIN_LESION_ML` (in place); they go back to lung."""
    if voxel_ml is None:
        return
    # label inside the lesions' bounding box only (the components are the same, the work much smaller), in
    # 16-bit labels while they suffice (a long scan's peak memory is set here; benchmarks/RESULTS.md)
    extents = [np.flatnonzero(lesions.any(axis=tuple(a for a in range(3) if a != ax))) for ax in range(3)]
    if extents[0].size == 0:
        return
    box = tuple(slice(int(e[0]), int(e[-1]) + 1) for e in extents)
    lab, n = label_components(lesions[box] > 0)
    sizes = component_sizes(lab, n)
    small = sizes * voxel_ml < MIN_LESION_ML
    small[0] = False
    sub = lesions[box]
    for z in range(0, lab.shape[0], SLICE_CHUNK):
        sub[z:z + SLICE_CHUNK][small[lab[z:z + SLICE_CHUNK]]] = 0


def _learned_lungs_and_lesions(vol: Volume, predictor: SegPredictor, *, progress: bool, turns: int = 0,
                               batch_size: int = 8, pixel_mm: float | None = None
                               ) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Lungs and lesions of non-HU slices from one predictor run per whole slice (each slice turned ``turns``
    quarters on the way in and back on the way out): the lungs from the lung head, holes filled, split into
    sides at the middle column; the lesion labels as predicted (not yet restricted to the lungs); and the
    slices the lung-masked companion segmented."""
    if not predictor.has_lung:
        raise ValueError("input has no Hounsfield units and the model has no lung head")
    lungs = np.zeros(vol.shape, np.uint8)
    lesions = np.zeros(vol.shape, np.uint8)
    routed: list[int] = []
    bar = tqdm(total=vol.n_slices, desc="lungs and lesions", unit="slice", disable=not progress)
    for start in range(0, vol.n_slices, batch_size):
        ks = range(start, min(vol.n_slices, start + batch_size))
        turned = [np.ascontiguousarray(np.rot90(to_model_input(vol.array[k], is_hu=False), turns)) for k in ks]
        for k, pred in zip(ks, predictor.predict(turned, pixel_mm=pixel_mm)):
            if pred.network == "lung_masked":
                routed.append(k)
            lesions[k] = np.rot90(pred.labels, -turns)
            lung = ndimage.binary_fill_holes(np.rot90(pred.lung, -turns))
            if not lung.any():
                continue
            cols = np.flatnonzero(lung.any(axis=0))
            mid = (cols[0] + cols[-1]) // 2
            lungs[k][:, :mid][lung[:, :mid]] = RIGHT
            lungs[k][:, mid:][lung[:, mid:]] = LEFT
        bar.update(len(ks))
    bar.close()
    return lungs, lesions, routed


def _keep_near_lungs(labels: np.ndarray, lung2d: np.ndarray, *, close_px: int, effusion_px: int) -> None:
    """Restrict one slice's lesion ``labels`` (in place) to where they may lie: GGO / consolidation inside the
    lung region (:func:`_lesion_region`), effusion within ``effusion_px`` of it; then the lung (``lung2d``, in
    place) takes in the GGO / consolidation its region encloses."""
    if not labels.any():   # nothing to restrict (most slices of most scans)
        return
    if not lung2d.any():   # no lung, no lesion
        labels[:] = 0
        return
    region = _lesion_region(lung2d, close_px)
    keep = np.isin(labels, (1, 2)) & (region > 0)
    if (labels == 3).any():
        near = ndimage.distance_transform_edt(region == 0) <= effusion_px
        keep |= (labels == 3) & near
    labels[~keep] = 0
    grow = np.isin(labels, (1, 2)) & (lung2d == 0)
    lung2d[grow] = region[grow]
