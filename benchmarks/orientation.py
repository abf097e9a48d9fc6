"""Orientation: the anatomy against what a file states (benchmarks/RESULTS.md, "NIfTI variants a hospital or a
converter may write" and the orientation check).

    python benchmarks/orientation.py --scan $COVIDCT_DATA/covid-ct-md/cap001.nii.gz --variants out/orient \\
        [--dicom $COVIDCT_DATA/covid-ct-md/P001] [--analyze] [FILE ...]

* ``--variants DIR``: writes the NIfTI variants of ``--scan`` (a NIfTI) into DIR: 4-D, float64, scaled uint16,
  cropped columns, anisotropic rows, every 5th slice, 2 / 1 slices, windowed uint8, the RAS copy and one without
  orientation in its header (qform and sform codes 0).
* ``--dicom SERIES``: also a copy of a DICOM series with every file's ImageOrientationPatient set to prone (a wrong
  header; pixel data untouched).
* For every file (the variants, ``--scan``, ``--dicom`` and any FILE given): the spine votes of
  :func:`covidct.analysis.lungs.spine_posterior_votes` at 250 / 400 / 600 HU, the three verdicts of
  :func:`covidct.analysis.scan.orientation_check` (anterior-posterior; head-feet with its mediastinum width ratio;
  left-right with its liver-side ratio), and two head-feet cues that were measured and not adopted (central airway
  slices in the upper / lower half of the lungs; the lungs' solidity in their first / last sixth).
* ``--flips``: also each given file's volume (``--scan``, ``--dicom``, FILE; not the written variants) changed in memory, lungs segmented again: its slice, row and column axes
  each reversed (each should flip one verdict and only that one) and five partial scans (the head-end and feet-end
  halves and 65 %, the middle half: head-feet and left-right should be undetermined, never reversed), printing
  one line of verdicts per variant.
* ``--analyze``: also ``covidct analyze FILE`` on each (lung mL, opacity %, answer).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def write_variants(scan: Path, out: Path) -> list[Path]:
    """The NIfTI variants of ``scan`` (see the module docstring), written into ``out``."""
    import nibabel as nib

    src = nib.load(str(scan))
    a = np.asarray(src.dataobj)
    aff = src.affine
    out.mkdir(parents=True, exist_ok=True)
    written = []

    def save(name: str, img) -> None:
        nib.save(img, out / name)
        written.append(out / name)

    save("4d.nii.gz", nib.Nifti1Image(a[..., None], aff))
    f64 = nib.Nifti1Image(a.astype(np.float64), aff)
    f64.set_data_dtype(np.float64)
    save("f64.nii.gz", f64)
    u16 = nib.Nifti1Image((a.astype(np.int32) + 1024).clip(0).astype(np.uint16), aff)
    u16.header.set_slope_inter(1.0, -1024.0)
    save("scaled_u16.nii.gz", u16)
    save("nonsquare.nii.gz", nib.Nifti1Image(a[:, 20:a.shape[1] - 20, :], aff))
    aniso = aff.copy()
    aniso[:3, 1] *= 1.3
    save("aniso.nii.gz", nib.Nifti1Image(a, aniso))
    thick = aff.copy()
    thick[:3, 2] *= 5
    save("thick.nii.gz", nib.Nifti1Image(a[:, :, ::5], thick))
    mid = a.shape[2] // 2
    save("two_slices.nii.gz", nib.Nifti1Image(a[:, :, mid:mid + 2], aff))
    save("one_slice.nii.gz", nib.Nifti1Image(a[:, :, mid:mid + 1], aff))
    save("uint8_window.nii.gz", nib.Nifti1Image(((a.clip(-1000, 400) + 1000) / 1400 * 255).astype(np.uint8), aff))
    save("ras.nii.gz", nib.as_closest_canonical(src))
    bare = nib.Nifti1Image(a, None)
    bare.header.set_zooms(tuple(float(z) for z in src.header.get_zooms()[:3]))
    save("no_orientation.nii.gz", bare)
    return written


def write_prone_copy(series: Path, out: Path) -> Path:
    """``series`` with every file's ImageOrientationPatient set to prone (pixel data untouched)."""
    import pydicom

    out.mkdir(parents=True, exist_ok=True)
    for f in sorted(series.iterdir()):
        try:
            ds = pydicom.dcmread(str(f))
        except Exception:  # noqa: BLE001 - not DICOM: left out
            continue
        ds.ImageOrientationPatient = [-1, 0, 0, 0, -1, 0]
        ds.save_as(str(out / f.name))
    return out


def airway_halves(vol, lungs: np.ndarray) -> tuple[int, int]:
    """Slices with a central air component of 0.5-8 cm² outside the lung mask (HU < -900, within 15 % of the
    body's width from its middle column), in the upper and the lower half of the lungs' extent."""
    from scipy import ndimage

    from covidct.io.body import body_box

    px = vol.spacing[1] * vol.spacing[2]
    ks = np.flatnonzero((lungs > 0).any(axis=(1, 2)))
    z0, z1 = ks[0], ks[-1]
    upper = lower = 0
    for k in range(vol.n_slices):
        box = body_box(vol.array[k])
        if box is None:
            continue
        air = np.zeros(lungs[k].shape, bool)
        air[box] = (vol.array[k][box] < -900) & (lungs[k][box] == 0)
        air = ndimage.binary_opening(air)
        lab, n = ndimage.label(air)
        if n == 0:
            continue
        mid, half = (box[1].start + box[1].stop) / 2, (box[1].stop - box[1].start) / 2
        sizes = ndimage.sum(air, lab, range(1, n + 1)) * px
        coms = ndimage.center_of_mass(air, lab, range(1, n + 1))
        if any(50 <= s <= 800 and abs(c[1] - mid) < 0.3 * half and box[0].start + 5 < c[0] < box[0].stop - 5
               for s, c in zip(sizes, coms)):
            if (k - z0) / max(1, z1 - z0) < 0.5:
                upper += 1
            else:
                lower += 1
    return upper, lower


def solidity_ends(lungs: np.ndarray) -> tuple[float, float]:
    """Mean solidity (area / convex-hull area of each lung's largest piece, mean of the sides) over the first and
    the last sixth of the slices with lung."""
    from skimage.measure import label, regionprops

    from covidct.analysis.lungs import LEFT, RIGHT

    ks = np.flatnonzero((lungs > 0).any(axis=(1, 2)))
    values = np.full(lungs.shape[0], np.nan)
    for k in ks:
        per_side = [max(regionprops(label(lungs[k] == side)), key=lambda r: r.area).solidity
                    for side in (RIGHT, LEFT) if (lungs[k] == side).sum() >= 30]
        if per_side:
            values[k] = float(np.mean(per_side))
    q = max(3, len(ks) // 6)
    return float(np.nanmean(values[ks[:q]])), float(np.nanmean(values[ks[-q:]]))


def measure(path: Path, vol) -> dict:
    """The spine votes, the orientation check's verdicts and its time, and the two dropped head-feet cues of ``vol``
    (read from ``path``)."""
    from covidct.analysis.lungs import segment_lungs_hu, spine_posterior_votes
    from covidct.analysis.scan import orientation_check

    row: dict = {"file": str(path), "dtype": str(vol.array.dtype), "is_hu": vol.is_hu}
    if not vol.is_hu:
        return row
    lungs = segment_lungs_hu(vol.array, spacing=vol.spacing, affine=vol.affine).labels
    if not lungs.any():
        return row
    row["spine_votes"] = {str(t): spine_posterior_votes(vol.array, lungs, bone_hu=t) for t in (250, 400, 600)}
    t0 = time.perf_counter()
    check = orientation_check(vol, lungs)
    row["orientation_check_s"] = round(time.perf_counter() - t0, 3)   # the whole check, its spine votes included
    row["verdict"] = check["anterior_posterior"] if check else None
    if check:
        row.update({key: check[key] for key in ("head_feet", "mediastinum_width_ratio", "left_right",
                                                "liver_side_ratio")})
    if vol.n_slices >= 12:
        row["airway_upper_lower"] = airway_halves(vol, lungs)
        row["solidity_first_last"] = tuple(round(v, 3) for v in solidity_ends(lungs))
    return row


#: In-memory variants of ``--flips``: name -> the (slices, rows, columns) array it makes.
FLIPS = {
    "slices reversed": lambda a: a[::-1],
    "rows reversed": lambda a: a[:, ::-1],
    "columns reversed": lambda a: a[:, :, ::-1],
    "head-end half": lambda a: a[: len(a) // 2],
    "head-end 65 %": lambda a: a[: int(0.65 * len(a))],
    "feet-end half": lambda a: a[len(a) // 2:],
    "feet-end 65 %": lambda a: a[int(0.35 * len(a)):],
    "middle half": lambda a: a[len(a) // 4: 3 * len(a) // 4],
}


def flips(path: Path, vol) -> list[dict]:
    """The verdicts of :func:`covidct.analysis.scan.orientation_check` on each :data:`FLIPS` variant of ``vol`` (read
    from ``path``); variants of fewer than 2 slices are left out."""
    from covidct.analysis.lungs import segment_lungs_hu
    from covidct.analysis.scan import orientation_check

    stored, rows = vol.array, []
    for name, make in FLIPS.items():
        if len(make(stored)) < 2:
            continue
        vol.array = np.ascontiguousarray(make(stored))
        check = orientation_check(vol, segment_lungs_hu(vol.array, spacing=vol.spacing, affine=vol.affine).labels)
        rows.append({"file": str(path), "variant": name,
                     **{key: check[key] for key in ("anterior_posterior", "head_feet", "mediastinum_width_ratio",
                                                    "left_right", "liver_side_ratio")}})
    vol.array = stored
    return rows


def analyze(path: Path) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "covidct.cli", "analyze", str(path), "-o", tmp, "--no-viewer", "--json"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            return {"error": proc.stderr.strip().splitlines()[-1:]}
        rep = json.loads(proc.stdout)
    return {"lung_ml": rep["lung_volume_ml"], "opacity_pct": rep["percent_opacity"],
            "answer": rep["diagnosis"]["label"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="*", type=Path)
    ap.add_argument("--scan", type=Path, help="a NIfTI scan to make variants of (with --variants)")
    ap.add_argument("--variants", type=Path, help="folder for the variants")
    ap.add_argument("--dicom", type=Path, help="a DICOM series: measured, and a prone-header copy of it")
    ap.add_argument("--analyze", action="store_true", help="also run covidct analyze on each file")
    ap.add_argument("--flips", action="store_true",
                    help="also each file's axes reversed and partial scans, in memory (verdicts per variant)")
    args = ap.parse_args()
    files = list(args.files)
    originals = set(files) | {f for f in (args.scan, args.dicom) if f}
    if args.scan:
        from covidct.io.nifti import is_nifti

        if not (is_nifti(args.scan) and args.scan.is_file()):
            ap.error(f"--scan {args.scan}: not a NIfTI file")
        files.insert(0, args.scan)
        if args.variants:
            files += write_variants(args.scan, args.variants)
    if args.dicom:
        files.append(args.dicom)
        if args.variants:
            files.append(write_prone_copy(args.dicom, args.variants / "dicom_prone_header"))
    if not files:
        ap.error("give --scan, --dicom or files")
    from covidct.errors import CovidctError
    from covidct.io import read

    failed = 0
    for path in files:
        try:
            vol = read(path)
            row = measure(path, vol)
        except CovidctError as exc:   # one line per unreadable file; the others go on
            print(f"{os.path.basename(sys.argv[0])}: error: {exc}", file=sys.stderr)
            failed += 1
            continue
        if args.analyze:
            row.update(analyze(path))
        print(json.dumps(row))
        if args.flips and row.get("is_hu") and path in originals:
            for variant in flips(path, vol):
                print(json.dumps(variant))
    return 2 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
