"""Lesion burden and a zone-based severity score.

Zones: each lung (right, left) cut into upper / middle / lower thirds of its cranio-caudal extent
-> 6 zones. We have no lobe segmentation, so the score is **zone-based**, not the lobar CT
severity score: each zone scores 0-5 by the share of it that is involved (0: none, 1: <5 %,
2: 5-25 %, 3: 25-50 %, 4: 50-75 %, 5: >75 %), summed to 0-30.

Percentage of opacity (PO) = lesion (GGO + consolidation) volume / lung volume; percentage of
high opacity (PHO) = lesion voxels above ``HIGH_OPACITY_HU`` (-200 HU) / lung volume (HU inputs only).
"""

from __future__ import annotations

import numpy as np

from covidct.analysis.lungs import LEFT, RIGHT, SLICE_CHUNK

HIGH_OPACITY_HU = -200.0
ZONE_NAMES = ("upper", "middle", "lower")
SIDE_NAMES = {RIGHT: "right", LEFT: "left"}
BINS = (0.0, 5.0, 25.0, 50.0, 75.0)


def involvement_score(percent: float) -> int:
    """0-5 bin of a zone's involvement percentage."""
    if percent <= 0.0:
        return 0
    return 1 + sum(percent > b for b in BINS[1:])


def _ml(n_voxels: int, voxel_ml: float | None) -> float | None:
    return None if voxel_ml is None else round(n_voxels * voxel_ml, 3)


def _pct(part: int, whole: int) -> float:
    return round(100.0 * part / whole, 4) if whole else 0.0


def lesion_burden(lesions: np.ndarray, lung_sides: np.ndarray, zones: np.ndarray, *, voxel_ml: float | None,
                  hu: np.ndarray | None = None) -> dict:
    """Volumes and shares per lesion type, per side and zone, PO/PHO and the zone severity score.

    ``lesions``: 0 none, 1 GGO, 2 consolidation, 3 effusion; ``lung_sides``: 0 outside, 1 right,
    2 left, already including the GGO/consolidation it encloses (effusion lies outside the lung and
    is measured on its own)."""
    # count (side, zone, type) of the lung voxels with bincount, a few slices at a time: gathering every lung
    # voxel of a long scan at once took 8-byte indices and codes for each (454 MB for 296 slices of 512²)
    counts = np.zeros(2 * 4 * 3, np.int64)
    n_high = n_effusion = 0
    for start in range(0, lung_sides.shape[0], SLICE_CHUNK):
        part = slice(start, start + SLICE_CHUNK)
        in_lung = lung_sides[part] > 0
        side = lung_sides[part][in_lung].astype(np.intp) - 1            # 0 right, 1 left
        zone = zones[part][in_lung].astype(np.intp) + 1                 # 0 no zone, 1-3 upper/middle/lower
        les = lesions[part][in_lung]
        kind = np.where(np.isin(les, (1, 2)), les, 0).astype(np.intp)  # 0 lung, 1 GGO, 2 consolidation
        counts += np.bincount((side * 4 + zone) * 3 + kind, minlength=counts.size)
        n_effusion += int(np.count_nonzero(lesions[part] == 3))
        if hu is not None:
            n_high += int(np.count_nonzero(hu[part][in_lung][kind > 0] > HIGH_OPACITY_HU))
    counts = counts.reshape(2, 4, 3)
    n_lung = int(counts.sum())
    n_by_type = {"ggo": int(counts[..., 1].sum()), "consolidation": int(counts[..., 2].sum()),
                 "effusion": n_effusion}
    n_by_type["total"] = n_by_type["ggo"] + n_by_type["consolidation"]
    out: dict = {"lung_volume_ml": _ml(n_lung, voxel_ml), "lung_voxels": n_lung, "lesions": {}}
    for name, n in n_by_type.items():
        out["lesions"][name] = {"volume_ml": _ml(n, voxel_ml), "voxels": n, "percent_of_lung": _pct(n, n_lung)}
    out["percent_opacity"] = _pct(n_by_type["total"], n_lung)
    out["percent_high_opacity"] = _pct(n_high, n_lung) if hu is not None else None
    per_zone = {}
    score = 0
    for side_label, side_name in SIDE_NAMES.items():
        c = counts[side_label - 1]
        n_side = int(c.sum())
        out.setdefault("sides", {})[side_name] = {
            "lung_volume_ml": _ml(n_side, voxel_ml),
            "ggo": _pct(int(c[:, 1].sum()), n_side), "consolidation": _pct(int(c[:, 2].sum()), n_side),
            "total": _pct(int(c[:, 1:].sum()), n_side),
        }
        for z, zone_name in enumerate(ZONE_NAMES):
            cz = c[z + 1]
            n_zone = int(cz.sum())
            pct = _pct(int(cz[1:].sum()), n_zone)
            s = involvement_score(pct)
            score += s
            per_zone[f"{side_name}_{zone_name}"] = {
                "percent_involved": pct, "score": s,
                "ggo_percent": _pct(int(cz[1]), n_zone), "consolidation_percent": _pct(int(cz[2]), n_zone),
            }
    out["zones"] = per_zone
    out["severity_score"] = score
    out["severity_score_max"] = 30
    out["severity_method"] = "zone-based: 6 zones (left/right x upper/middle/lower thirds), 0-5 each"
    return out
