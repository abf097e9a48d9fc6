"""Re-save a COVID-CT-MD-layout folder as a folder the models have never seen: every scan as a NIfTI
volume, chosen scans resampled in-plane to another matrix size and / or stored in RAS axis order, with
``slice_labels.csv`` rewritten to the new files' slice order. For checking that the evaluation
commands do not depend on the layout, resolution or axis order of the open data.

    python benchmarks/resave_ctmd.py --data $COVIDCT_DATA/covid-ct-md -o SIM \\
        --size P001=384 --size normal001=320 --ras P001
    python benchmarks/resave_ctmd.py --data $COVIDCT_DATA/covid-ct-md -o POOLED --pool P001=2 --pool normal001=2

``--pool ID=F`` makes a scan the way the data README says cap001 was made: in-plane F×F mean pooling
(512² -> 256² for F = 2), rounded to int16, the affine shifted by the pooling's half voxel.

Reconstructions unlike the open scans' (a medium-smooth kernel, Siemens D40s, 2 mm), for checking what noise and
edge enhancement do to the burden (benchmarks/RESULTS.md, "Sharp kernels and noise"); ``ID`` may be ``all``:
* ``--sharpen ID=A``: a sharper kernel simulated in the image domain, ``x + A (x - G(x))`` with G an in-plane
  Gaussian of ``--sharpen-sigma-mm`` (default 0.75 mm): edges and the scan's own noise raised, as a lung kernel
  (e.g. B70f) does to the same raw data.
* ``--noise ID=S``: Gaussian noise of S HU standard deviation, correlated over about a pixel (white noise through
  a 0.7-pixel Gaussian, scaled back to S), as a lower dose adds; seeded (``--seed``).
    python benchmarks/resave_ctmd.py --data $COVIDCT_DATA/covid-ct-md -o SHARP --sharpen all=2
* ``--slab ID=N``: a thicker reconstruction, each N neighbouring slices averaged into one (N x the gap; slices left
  over at the feet end dropped); a slab is labelled infected (and each lobe) when any of its slices is.
    python benchmarks/resave_ctmd.py --data $COVIDCT_DATA/covid-ct-md -o SLAB3 --slab all=3
    covidct evaluate cls --data SIM;  python benchmarks/analyze.py --data SIM

(The RESULTS entry "Other layouts and resolutions" used exactly these options, with the patients renamed
P002 / normal002 / cap002 by hand.)
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import sys
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> int:
    import nibabel as nib
    from scipy.ndimage import gaussian_filter, zoom

    from covidct.errors import CovidctError
    from covidct.io import read
    from covidct.io.nifti import working_slice, working_slice_of_file

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, type=Path)
    ap.add_argument("-o", "--output", required=True, type=Path, help="new folder (must not exist)")
    ap.add_argument("--size", action="append", default=[], metavar="ID=N", help="resample this patient's slices to N×N")
    ap.add_argument("--pool", action="append", default=[], metavar="ID=F",
                    help="mean-pool this patient's slices F×F in-plane (cap001's making; data README)")
    ap.add_argument("--ras", action="append", default=[], metavar="ID", help="store this patient's volume in RAS order")
    ap.add_argument("--sharpen", action="append", default=[], metavar="ID=A",
                    help="high-boost filter x + A (x - G(x)): a sharper reconstruction kernel (ID may be 'all')")
    ap.add_argument("--sharpen-sigma-mm", type=float, default=0.75, help="width of G (default 0.75 mm)")
    ap.add_argument("--noise", action="append", default=[], metavar="ID=S",
                    help="add correlated Gaussian noise of S HU standard deviation (ID may be 'all')")
    ap.add_argument("--seed", type=int, default=0, help="noise seed")
    ap.add_argument("--slab", action="append", default=[], metavar="ID=N",
                    help="average each N neighbouring slices into one: a thicker reconstruction (ID may be 'all')")
    args = ap.parse_args()
    if args.output.exists():
        print(f"{os.path.basename(sys.argv[0])}: error: {args.output} exists", file=sys.stderr)
        return 2
    try:
        sizes = {k: int(v) for k, v in (s.split("=", 1) for s in args.size)}
        pools = {k: int(v) for k, v in (s.split("=", 1) for s in args.pool)}
        sharpen = {k: float(v) for k, v in (s.split("=", 1) for s in args.sharpen)}
        noise = {k: float(v) for k, v in (s.split("=", 1) for s in args.noise)}
        slabs = {k: int(v) for k, v in (s.split("=", 1) for s in args.slab)}
    except ValueError:
        print(f"{os.path.basename(sys.argv[0])}: error: --size, --pool, --sharpen, --noise and --slab take ID=N (e.g. "
              f"P001=384, P001=2, all=2, all=40), not {args.size + args.pool + args.sharpen + args.noise + args.slab}",
              file=sys.stderr)
        return 2
    with open(args.data / "patients.csv", newline="") as fh:
        patients = list(csv.DictReader(fh))
    with open(args.data / "slice_labels.csv", newline="") as fh:
        labels = list(csv.DictReader(fh))
    final, args.output = args.output, args.output.with_name(args.output.name + ".partial")
    shutil.rmtree(args.output, ignore_errors=True)
    args.output.mkdir(parents=True)   # written here, renamed to the real name when complete
    new_index: dict[tuple[str, int], int | None] = {}
    for p in patients:
        pid = p["patient_id"]
        try:
            vol = read(args.data / p["path"])
        except CovidctError as exc:
            print(f"{os.path.basename(sys.argv[0])}: error: {exc}", file=sys.stderr)
            shutil.rmtree(args.output, ignore_errors=True)
            return 2
        array, affine = np.asarray(vol.array, np.float32), np.asarray(vol.affine, float).copy()
        if pid in sizes:
            f = sizes[pid] / array.shape[1]
            array = zoom(array, (1, f, sizes[pid] / array.shape[2]), order=1)
            affine[:3, 1] /= f
            affine[:3, 0] /= sizes[pid] / vol.array.shape[2]
        if pid in pools:
            from skimage.measure import block_reduce

            f = pools[pid]
            array = block_reduce(array, (1, f, f), np.mean)
            affine[:3, 3] += (f - 1) / 2 * (affine[:3, 0] + affine[:3, 1])   # centre of the pooled block
            affine[:3, :2] *= f
        slab = slabs.get(pid, slabs.get("all", 1))
        if slab > 1:
            kept = array.shape[0] // slab
            array = array[:kept * slab].reshape(kept, slab, *array.shape[1:]).mean(axis=1)
            affine[:3, 3] += (slab - 1) / 2 * affine[:3, 2]                 # the centre of the first slab
            affine[:3, 2] *= slab
        pixel_mm = np.linalg.norm(affine[:3, :2], axis=0)          # column, row spacing
        amount = sharpen.get(pid, sharpen.get("all"))
        if amount:
            array = array + amount * (array - gaussian_filter(array, (0, *(args.sharpen_sigma_mm / pixel_mm[::-1]))))
        sd = noise.get(pid, noise.get("all"))
        if sd:
            rng = np.random.default_rng([args.seed, sum(map(ord, pid))])
            grain = gaussian_filter(rng.standard_normal(array.shape, np.float32), (0, 0.7, 0.7))
            array = array + grain * (sd / grain.std())
        stored = np.round(array).clip(-32768, 32767).astype(np.int16)   # sharpening can overshoot int16
        img = nib.Nifti1Image(stored.transpose(2, 1, 0), affine)  # i, j, k = L, P, I
        if pid in args.ras:
            img = nib.as_closest_canonical(img)
        img.set_qform(img.affine, code=1)
        img.set_sform(img.affine, code=1)
        name = f"{pid}.nii.gz"
        nib.save(img, args.output / name)
        n = array.shape[0]
        flipped = working_slice_of_file(img.affine, n, 0) != 0
        for r in labels:
            if r["patient_id"] == pid:
                w = working_slice(vol, int(r["slice_index"])) // slab   # the labelled slice (its slab), head = 0
                new_index[(pid, int(r["slice_index"]))] = None if w >= n else n - 1 - w if flipped else w
        p.update({"path": name, "format": "nifti"})
        print(f"{pid}: {nib.aff2axcodes(img.affine)} {img.shape}")
    with open(args.output / "patients.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(patients[0]))
        w.writeheader()
        w.writerows(patients)
    with open(args.output / "slice_labels.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(labels[0]))
        w.writeheader()
        merged: dict[tuple[str, int], dict[str, str]] = {}   # the labelled slices of one slab are one row
        for r in labels:
            k = new_index[(r["patient_id"], int(r["slice_index"]))]
            if k is None:   # a slice left over at the feet end of a slab reconstruction
                continue
            row = merged.setdefault((r["patient_id"], k), {**r, "slice_index": str(k)})
            for column in ("infection", "infection_v0", *(c for c in r if c.startswith("lobe_"))):
                if column in r and r[column] not in ("", None):
                    row[column] = str(max(int(row[column]), int(r[column])))
            if "file" in row:
                row["file"] = f"{r['patient_id']}.nii.gz"
        w.writerows(merged.values())
    args.output.rename(final)
    return 0


if __name__ == "__main__":
    sys.exit(main())
