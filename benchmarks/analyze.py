"""Scan-level benchmark on a COVID-CT-MD-layout folder (patients.csv + slice_labels.csv + series).

For every patient: ``covidct analyze`` end to end in a child process (wall time; peak RSS of the largest
process so far, from ``getrusage``; peak summed RSS of the child and its helper processes, sampled from
/proc every 50 ms), lesion burden, severity, and the slice-level AUC of ``slices[].infection_probability``
against ``slice_labels.csv`` (all patients pooled, and per patient where both classes occur).

    python benchmarks/analyze.py --data ../shared/data/covid-ct-md [--model NAME|FILE] [--out out/bench-analyze]

Where ``slice_labels.csv`` has COVID-CT-MD's lobe labels (``lobe_LLL, lobe_LUL, lobe_RLL, lobe_RML, lobe_RUL``),
it also checks the lung sides against them: the slice-level AUC of ``slices[].left_lesion_area_mm2`` for "a left
lobe is infected" and of ``right_lesion_area_mm2`` for "a right lobe is", beside the same with the sides swapped
(what a left-right mix-up would give), and the left share of the lesion area on slices where only one side is
labelled.

``--z-sigma-mm S`` (repeatable) also prints the AUCs of a variant that was tried and not adopted: each
slice's lesion area smoothed along the scan axis (Gaussian, S mm) before ``A / (A + 1 cm²)``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def _tree_rss_kb(pid: int) -> int:
    """Resident memory of a process and all its descendants (kB, from /proc; 0 once it is gone)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as fh:
                total += next((int(line.split()[1]) for line in fh if line.startswith("VmRSS:")), 0)
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as fh:
                    todo += [int(c) for c in fh.read().split()]
        except (OSError, ValueError):
            continue
    return total


def _run_sampling_memory(cmd: list[str]) -> tuple[subprocess.Popen, str, float]:
    """Run ``cmd``; return the process, its stderr and the peak summed RSS (MB) of it and its helper
    processes (``covidct analyze`` reads the scan in one), sampled every 50 ms."""
    import threading

    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.05):
            peak[0] = max(peak[0], _tree_rss_kb(proc.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, err = proc.communicate()
    done.set()
    sampler.join()
    return proc, err, peak[0] / 1024.0


LOBE_COLUMNS = ("lobe_LLL", "lobe_LUL", "lobe_RLL", "lobe_RML", "lobe_RUL")   # left lobes first


def _auc(y: list[int], score: list[float]) -> float | None:
    """ROC AUC to 4 decimals, ``None`` unless both classes occur."""
    from covidct.metrics import roc_auc

    return round(roc_auc(y, score), 4) if 0 < sum(y) < len(y) else None


def _side_agreement(rows: list) -> dict:
    """Per-slice lesion area of each lung side against the lobe labels of that side (and of the other)."""
    left_lab = [lab[0] for lab, _, _ in rows]
    right_lab = [lab[1] for lab, _, _ in rows]
    left = [a for _, a, _ in rows]
    right = [a for _, _, a in rows]

    def share(want: tuple[int, int]):
        chosen = [(a, b) for lab, a, b in rows if tuple(lab) == want]
        with_area = [a / (a + b) for a, b in chosen if a + b > 0]
        return (round(float(np.mean(with_area)), 3) if with_area else None), f"{len(chosen)} slices, {len(with_area)} with lesions"

    only_left, n_left = share((1, 0))
    only_right, n_right = share((0, 1))
    return {"auc_left": _auc(left_lab, left), "auc_right": _auc(right_lab, right),
            "auc_left_vs_right_lobes": _auc(right_lab, left), "auc_right_vs_left_lobes": _auc(left_lab, right),
            "left_share_only_left": only_left, "n_only_left": n_left,
            "left_share_only_right": only_right, "n_only_right": n_right}


def main() -> int:
    from covidct.metrics import roc_auc
    from covidct.report.notes import report_notes, reversed_axes

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--model")
    ap.add_argument("--window", help="HU window into the model (covidct analyze --window); default: model")
    ap.add_argument("--precision", choices=("auto", "fp32", "bf16"),
                    help="segmentation network's arithmetic (covidct analyze --precision); default: auto")
    ap.add_argument("--slice-orientation", choices=("training", "working"),
                    help="covidct analyze --slice-orientation; default: training")
    ap.add_argument("--out", default="out/bench-analyze")
    ap.add_argument("--json")
    ap.add_argument("--z-sigma-mm", type=float, action="append", default=[],
                    help="also score slice probabilities from lesion areas smoothed along z (Gaussian sigma, mm)")
    args = ap.parse_args()
    data = Path(args.data)
    with open(data / "patients.csv", newline="") as fh:
        patients = list(csv.DictReader(fh))
    with open(data / "slice_labels.csv", newline="") as fh:
        labels: dict[str, dict[int, int]] = {}
        lobes: dict[str, dict[int, tuple[int, int]]] = {}   # slice -> (a left lobe infected, a right lobe infected)
        for r in csv.DictReader(fh):
            labels.setdefault(r["patient_id"], {})[int(r["slice_index"])] = int(r["infection"])
            if all(r.get(c) not in (None, "") for c in LOBE_COLUMNS):
                lobes.setdefault(r["patient_id"], {})[int(r["slice_index"])] = (
                    int(any(int(r[c]) for c in LOBE_COLUMNS[:2])), int(any(int(r[c]) for c in LOBE_COLUMNS[2:])))
    rows, all_y, all_p = [], [], []
    notes: dict[str, list[str]] = {}
    by_patient: dict[str, tuple[list[int], list[float]]] = {}
    areas: dict[str, tuple[list[float], float]] = {}   # lesion area per slice (mm²), slice spacing (mm)
    sides: dict[str, list] = {}   # per slice: ((left lobe label, right lobe label), left area, right area)
    for p in patients:
        out = Path(args.out) / p["patient_id"]
        cmd = [sys.executable, "-m", "covidct.cli", "analyze", str(data / p["path"]), "-o", str(out)]
        if args.model:
            cmd += ["--model", args.model]
        if args.window:
            cmd += [f"--window={args.window}"]
        if args.precision:
            cmd += ["--precision", args.precision]
        if args.slice_orientation:
            cmd += ["--slice-orientation", args.slice_orientation]
        t0 = time.perf_counter()
        proc, err, tree_mb = _run_sampling_memory(cmd)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            print(f"{p['patient_id']}: analyze failed: {err.strip().splitlines()[-1] if err.strip() else proc.returncode}")
            continue
        rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0
        rep = json.loads((out / "report.json").read_text())
        by_index = labels.get(p["patient_id"], {})  # a Normal patient may have no slice labels
        lobe_by_index = lobes.get(p["patient_id"], {})
        if str(p["path"]).lower().endswith((".nii", ".nii.gz")):  # labels name the file's slices k
            import nibabel as nib

            from covidct.io.nifti import working_slice_of_file

            header = nib.load(data / p["path"])  # the header only; the voxels are not read
            by_index = {working_slice_of_file(header.affine, header.shape[2], k): v for k, v in by_index.items()}
            lobe_by_index = {working_slice_of_file(header.affine, header.shape[2], k): v
                             for k, v in lobe_by_index.items()}
        if any(any(v) for v in lobe_by_index.values()):
            sides[p["patient_id"]] = [(lobe_by_index.get(s["index"], (0, 0)), s.get("left_lesion_area_mm2", 0.0),
                                       s.get("right_lesion_area_mm2", 0.0)) for s in rep["slices"]]
        y = [by_index.get(s["index"], 0) for s in rep["slices"]]
        pr = [s["infection_probability"] for s in rep["slices"]]
        all_y += y
        all_p += pr
        by_patient[p["patient_id"]] = (y, pr)
        areas[p["patient_id"]] = ([s["lesion_area_mm2"] for s in rep["slices"]], float(rep["input"]["spacing_mm"][0]))
        rows.append({
            "patient": p["patient_id"], "diagnosis": p["diagnosis"], "shape": rep["input"]["shape"],
            "seconds": round(wall, 1), "peak_rss_mb_so_far": round(rss_mb),
            "peak_tree_rss_mb": round(tree_mb), "lung_ml": rep["lung_volume_ml"],
            "ggo_pct": rep["lesions"]["ggo"]["percent_of_lung"], "cons_pct": rep["lesions"]["consolidation"]["percent_of_lung"],
            "total_pct": rep["lesions"]["total"]["percent_of_lung"], "effusion_ml": rep["lesions"]["effusion"]["volume_ml"],
            "severity": rep["severity_score"], "answer": rep["diagnosis"]["label"],
            "p_covid19": rep["diagnosis"]["probabilities"].get("COVID-19"), "inside_s": rep["seconds"],
            "slice_auc": _auc(y, pr),
            # anatomy vs the file's orientation (covidct.analysis.scan.orientation_check): the axes it calls
            # reversed, "as stored" when none, None when not checked; the report's notes say more
            "orientation": None if (axes := reversed_axes(rep)) is None else "+".join(axes) or "as stored",
            # the soft-tissue noise index (covidct.io.noise), the Gaussian the models' slices got (px; 0: none) and
            # the seconds the measurement took; None for reports from before session 36
            "noise_hu": (rep["input"].get("noise") or {}).get("soft_tissue_sd_hu"),
            "smoothing_px": (rep["input"].get("noise") or {}).get("sigma_px"),
            "noise_s": (rep.get("timings") or {}).get("noise_s"),
            # the segmentation network's arithmetic (--precision; reports before it was recorded: fp32)
            "precision": next((m.get("precision", "fp32") for m in rep.get("models") or [] if m.get("task") == "seg"),
                              None),
        })
        notes[p["patient_id"]] = report_notes(rep)
    keys = list(rows[0]) if rows else []
    print(" | ".join(keys))
    for r in rows:
        print(" | ".join(str(r[k]) for k in keys))
    for pid, said in notes.items():
        for note in said:
            print(f"{pid}: note: {note}")
    pooled = roc_auc(all_y, all_p)
    print(f"slice-level infection AUC, all patients pooled: {pooled:.4f} ({sum(all_y)} positive / {len(all_y)} slices)")
    # which pair of patients limits the pooled number (a positive of one ranked against a negative of another)
    from itertools import combinations

    for a, b in combinations(by_patient, 2):
        y = by_patient[a][0] + by_patient[b][0]
        if 0 < sum(y) < len(y):
            print(f"  pooled over {a} + {b}: {roc_auc(y, by_patient[a][1] + by_patient[b][1]):.4f}")
    side_check = {pid: _side_agreement(rows_) for pid, rows_ in sides.items()}
    if len(sides) > 1:
        side_check["pooled"] = _side_agreement([r for rows_ in sides.values() for r in rows_])
    for pid, c in side_check.items():
        print(f"lung sides vs lobe labels, {pid}: AUC left area / left lobes {c['auc_left']}, right area / right lobes "
              f"{c['auc_right']} (sides swapped: {c['auc_left_vs_right_lobes']} / {c['auc_right_vs_left_lobes']}); "
              f"left share of the lesion area where only the left side is labelled {c['left_share_only_left']} "
              f"({c['n_only_left']}), only the right {c['left_share_only_right']} ({c['n_only_right']})")
    for sigma_mm in args.z_sigma_mm:
        from scipy.ndimage import gaussian_filter1d

        from covidct.analysis.scan import AREA_SCALE_MM2

        smooth = {}
        for pid, (a, dz) in areas.items():
            sa = gaussian_filter1d(np.asarray(a, float), sigma_mm / dz, mode="constant")
            smooth[pid] = list(sa / (sa + AREA_SCALE_MM2))
        per = ", ".join(f"{pid} {roc_auc(by_patient[pid][0], pr):.4f}" for pid, pr in smooth.items()
                        if 0 < sum(by_patient[pid][0]) < len(pr))
        ys = [v for pid in smooth for v in by_patient[pid][0]]
        print(f"z-smoothed areas (sigma {sigma_mm:g} mm): pooled AUC {roc_auc(ys, [v for pr in smooth.values() for v in pr]):.4f}"
              f"; {per}")
    # the patient answers against the diagnoses (3-class triage answers only)
    from covidct.data.classification import THREE_CLASSES, canonical_label
    from covidct.metrics import classification_report, confusion_matrix

    answered = [r for r in rows if r["answer"] in THREE_CLASSES]
    patient_accuracy = None
    if answered:
        truth = [THREE_CLASSES.index(canonical_label(r["diagnosis"], THREE_CLASSES)) for r in answered]
        said = [THREE_CLASSES.index(r["answer"]) for r in answered]
        rep = classification_report(confusion_matrix(truth, said, len(THREE_CLASSES)), THREE_CLASSES)
        patient_accuracy = rep.overall_accuracy
        print(f"\npatient answers ({len(answered)} scans):\n{rep.confusion_text()}\naccuracy {patient_accuracy:.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"patients": rows, "pooled_slice_auc": pooled,
                                               "patient_accuracy": patient_accuracy, "notes": notes,
                                               "sides_vs_lobe_labels": side_check}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
