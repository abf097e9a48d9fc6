"""The notes of a scan report: what a reader should know before using its numbers. Plain functions of the
report dictionary, without the analysis stack, so ``covidct serve`` can show them without loading PyTorch."""

from __future__ import annotations


def non_finite_note(count: int) -> str:
    return (f"{count} voxels were NaN or infinite (outside the field of view?): read as the lowest value of the "
            f"volume, i.e. outside the body")


#: Images with more coloured pixels than this share get a note: CT slices are grey. Figures of CT in papers carry
#: coloured arrows, labels or overlays (of 645 CT images at most 21 %, the 99th percentile 1.3 %), photographs
#: 40-89 % (benchmarks/non_ct_images.py).
MAX_CT_COLOUR_SHARE = 0.3


def colour_note(share: float | None) -> str | None:
    """The note for an image with more coloured pixels than :data:`MAX_CT_COLOUR_SHARE`, else None."""
    if share is None or share <= MAX_CT_COLOUR_SHARE:
        return None
    return (f"{100 * share:.0f} % of the image's pixels are coloured, while CT slices are grey: this input may not "
            f"be a chest CT, and its lesion numbers are then meaningless")


def noise_note(info: dict | None) -> str | None:
    """What a reader must know about the noise (``input.noise`` of a report, :func:`covidct.io.noise.noise_plan`):
    a scan smoothed, or one noisier than the bound left as it is (``--denoise none``); None otherwise."""
    if not info or info.get("soft_tissue_sd_hu") is None or info["soft_tissue_sd_hu"] <= info["smooth_above_sd_hu"]:
        return None
    head = (f"the scan is much noisier than those the models were checked on (soft-tissue noise index "
            f"{info['soft_tissue_sd_hu']:.0f} HU, they {info['reference_sd_hu']:.0f} HU or less: a sharp (lung) "
            f"reconstruction kernel or a low dose?)")
    if info["smoothed"]:
        mm = f", {info['sigma_mm']:g} mm" if info.get("sigma_mm") else ""
        return (f"{head}: its slices reached the models smoothed in-plane (Gaussian sigma {info['sigma_px']:g} "
                f"px{mm}; index {info['soft_tissue_sd_after_hu']:.0f} HU after; the lungs, overlays and viewer use the "
                f"slices as read). A soft-tissue kernel series of the same scan, if there is one, is the better input "
                f"(--denoise none turns the smoothing off)")
    return f"{head}: not smoothed (--denoise none), so ground glass is likely overstated"


#: Slice gaps above this (mm) get a note: averaged into 10 mm slabs the open scans read 0.9-2.3 percentage points more
#: burden (the normal one 0.92 % instead of 0.04 %); into 6 mm slabs within 0.22 (benchmarks/RESULTS.md, session 36).
THICK_SLICE_MM = 6.0


def thick_slice_note(spacing_mm: list[float] | None) -> str | None:
    """The note for a volume whose slices are more than :data:`THICK_SLICE_MM` apart, else None."""
    if not spacing_mm or spacing_mm[0] <= THICK_SLICE_MM:
        return None
    return (f"the slices are {spacing_mm[0]:g} mm apart: in thick slices vessels and fissures blur into haze that the "
            f"models read as ground glass, so the burden is likely overstated (the open scans averaged into 10 mm "
            f"slabs read 0.9-2.3 percentage points more, the normal one 0.92 % instead of 0.04 %); a thinner "
            f"reconstruction of the scan, if there is one, is the better input")


def effusion_assessable(report: dict) -> bool:
    """Whether the report's pleural effusion was measured: ``lesions.effusion.assessable`` (false when every slice
    holding lung is lung-masked, black outside the lungs, so its 0 means "not measured"); true for a report from
    before the key existed."""
    return bool(((report.get("lesions") or {}).get("effusion") or {}).get("assessable", True))


#: The axes the orientation check tests (``input.orientation_check``: ``covidct.analysis.scan.orientation_check``).
ORIENTATION_AXES = ("anterior_posterior", "head_feet", "left_right")


def reversed_axes(report: dict) -> list[str] | None:
    """The axes of :data:`ORIENTATION_AXES` the report's orientation check calls reversed (``[]``: none); None when
    the input was not checked (no HU or no known orientation). A report from before an axis was checked lacks it."""
    check = (report.get("input") or {}).get("orientation_check")
    if not check:
        return None
    return [axis for axis in ORIENTATION_AXES if check.get(axis) == "reversed"]


def orientation_summary(report: dict) -> str | None:
    """One line on the report's orientation check, every axis with its verdict and measure (the HTML report's
    "orientation check" row); None when the input was not checked."""
    check = (report.get("input") or {}).get("orientation_check")
    if not check:
        return None
    votes = f"spine behind the lungs on {check['spine_posterior_slices']} of {check['voting_slices']} voting slices"
    parts = [f"anterior–posterior {check['anterior_posterior']} ({votes})"]
    if "head_feet" in check:   # reports from before session 35 checked anterior-posterior only
        width, liver = check["mediastinum_width_ratio"], check["liver_side_ratio"]
        parts.append(f"head–feet {check['head_feet']}" + ("" if width is None else
                     f" (mediastinum {width:.2f} × as wide in the feet half as in the head half)"))
        parts.append(f"left–right {check['left_right']}" + ("" if liver is None else
                     f" (soft tissue near the lung bases right / left {liver:.2f})"))
    turned = (report.get("input") or {}).get("reoriented")
    return "; ".join(parts) + (f"; turned back: {', '.join(a.replace('_', '–') for a in turned)}" if turned else "")


def report_notes(report: dict) -> list[str]:
    """Everything a reader of ``report`` should know before using its numbers, one sentence each (printed as
    ``note: ...`` by the command line, rows of the HTML report, the ``notes`` column of a batch's summary): which
    series was taken, uneven slice gaps, slices without positions, a colour image, CT numbers without their
    intercept, NaN voxels, an axis stated the wrong way round (and turned back), a noisy scan (smoothed or not),
    thick slices, lungs that run off the scan, a lung mask implausibly large (in volume, or in its share of a slice),
    slices segmented by the network for lung-masked slices."""
    inp = report["input"]
    notes = []
    if inp.get("series_chosen"):
        choice = inp.get("series_choice")
        why = "" if not choice else (
            f"; {choice['rule']} ({', '.join(f'{uid}: {v} HU' for uid, v in choice['noise_index_hu'].items())})")
        notes.append(f"folder holds {len(inp['series_available'])} series: analysed the largest axial CT one, "
                     f"{inp['series_chosen']}{why} (choose with --series)")
    gaps = inp.get("uneven_slice_gaps")
    if gaps:
        notes.append(f"uneven slice gaps ({gaps['min_mm']}-{gaps['max_mm']} mm, after slices {gaps['after_slices']}; "
                     f"a missing file?): volumes use the median gap, {gaps['median_mm']} mm")
    if inp.get("slice_positions"):
        notes.append(inp["slice_positions"])
    if colour := colour_note(inp.get("colour_share")):
        notes.append(colour)
    if inp.get("stored_value_offset"):
        notes.append(f"the file holds CT numbers without their rescale intercept (no value below 0, air at 0): they "
                     f"were read as Hounsfield units by adding {inp['stored_value_offset']}")
    if inp.get("non_finite_voxels"):
        notes.append(non_finite_note(inp["non_finite_voxels"]))
    if (inp.get("orientation_check") or {}).get("note"):
        notes.append(inp["orientation_check"]["note"])
    if inp.get("reoriented"):
        notes.append(f"analysed with {' and '.join(a.replace('_', '-') for a in inp['reoriented'])} turned back as "
                     f"the anatomy says (--reorient anatomy): slice indices, zones, sides, overlays and the viewer are "
                     f"of the turned volume; lesions.nii.gz and lungs.nii.gz are on the file's own grid. The file "
                     f"itself is unchanged: fix its orientation for other tools")
    if noise := noise_note(inp.get("noise")):
        notes.append(noise)
    if thick := thick_slice_note(inp.get("spacing_mm")):   # images have no spacing
        notes.append(thick)
    if (report.get("lung_coverage") or {}).get("note"):
        notes.append(report["lung_coverage"]["note"])
    if report.get("lung_volume_note"):
        notes.append(report["lung_volume_note"])
    if report.get("lung_share_note"):
        notes.append(report["lung_share_note"])
    if report.get("lung_masked_slices"):
        n = len(report["lung_masked_slices"])
        notes.append(f"{n} slice{'s are' if n > 1 else ' is'} black outside the lungs (a lung-masked rendering): "
                     f"segmented by the model's network for such slices, trained on MedSeg's lung-masked frames; "
                     f"pleural effusion, which lies outside the lungs, cannot be seen on them")
    return notes
