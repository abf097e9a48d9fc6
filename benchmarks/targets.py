"""Every numeric target of issues 3-6 on folders you give, in one run: the shipped models, the evaluation
commands and benchmarks that measure each target, and one table of target, measured value and verdict.
Meant for data the models have never seen (a test split, other patients); each folder is optional.

    python benchmarks/targets.py --seg SEG_DIR [--seg-split test] --ucsd UCSD_DIR [--ucsd-split test] \\
        --ctmd CTMD_DIR [--out out/targets] [--no-speed] [--precision auto|fp32|bf16]

* ``--seg``: COVID-SemiSeg layout (``images/``, ``masks/``, optional ``masks4/``, ``lung/``): segmentation
  Dice and 512² speed (``benchmarks/segmentation.py``), lesion AP50 (``covidct evaluate lesions``), the
  Mask R-CNN speed-up (``benchmarks/masknet.py``).
* ``--ucsd``: a binary classification folder (``split.csv``, COVIDx-CT names or a folder per class):
  ``covidct evaluate cls`` with the default classifier.
* ``--ctmd``: COVID-CT-MD layout (``patients.csv``, ``slice_labels.csv``, DICOM series / NIfTI volumes):
  ``covidct evaluate cls`` (the CT triage's slice targets) and ``benchmarks/analyze.py`` (burdens, slice AUC,
  time, memory). The triage's one fitted number came from the open COVID-CT-MD patients: on them its numbers
  are in-sample (``evaluate cls`` says so).

Each step's JSON goes to ``--out``; ``targets.json`` there holds the table. A step that fails is reported and the
others go on; the exit status is 0 when every step ran (met or not), 2 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

HERE = Path(__file__).resolve().parent


def _run(step: str, cmd: list[str], json_out: Path, failures: list[str]) -> dict | None:
    """Run one command (its progress bars on stderr), return the JSON it wrote, or None on failure."""
    print(f"\n== {step}: {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    print(proc.stdout.rstrip()[-4000:])
    print(f"({time.perf_counter() - t0:.0f} s)")
    if proc.returncode != 0 or not json_out.exists():
        failures.append(f"{step} (exit {proc.returncode})")
        return None
    return json.loads(json_out.read_text())


def _row(issue: int, what: str, target: str, value: Any, met: bool | None) -> dict[str, Any]:
    return {"issue": issue, "what": what, "target": target,
            "measured": round(value, 4) if isinstance(value, float) else value,
            "met": None if met is None or value is None else bool(met)}


def seg_rows(bench: dict | None, lesions: dict | None, masknet: dict | None) -> list[dict]:
    """Issue 3 (Dice, speed) and issue 4 (AP50, Mask R-CNN speed-up) from the steps' JSON."""
    rows = []
    if bench:   # benchmarks/segmentation.py's JSON, or covidct evaluate seg's (no speed)
        dice = bench["evaluation"]["dice"] if "evaluation" in bench else bench["dice"]
        for name, bound in (("infection", 0.82), ("ggo", 0.70), ("consolidation", 0.62)):
            v = dice.get(name)
            rows.append(_row(3, f"{name} Dice (pooled)", f">= {bound}", v, v is not None and v >= bound))
        speed = bench.get("speed", {}).get("shipped", {}).get("slices_per_second")
        if speed is not None:
            rows.append(_row(3, "segmentation slices/s at 512² (one pass, 2 threads)", ">= 10", speed, speed >= 10))
    if lesions:
        v = lesions.get("ap50")
        rows.append(_row(4, "lesion mask AP50", ">= 0.60", v, v is not None and v >= 0.60))
    if masknet:
        ours = [t for t in masknet["timings"] if t["model"].startswith("covidct")]
        v = ours[0]["speedup_vs_default"] if ours else None
        rows.append(_row(4, "Mask R-CNN speed-up vs torchvision's default R50-FPN (512² slices)", ">= 5x", v,
                         v is not None and v >= 5))
    return rows


def ucsd_rows(res: dict | None) -> list[dict]:
    """Issue 4 (accuracy, AUC) and issue 5 (accuracy, COVID F1, AUC) on a binary folder."""
    if not res:
        return []
    acc, auc = res.get("overall_accuracy"), res.get("auc")
    covid = next((c for c in res.get("classes", []) if c.lower().startswith("covid")), None)
    f1 = res["per_class"][covid]["f1"] if covid else None
    return [_row(4, "binary accuracy", ">= 0.80", acc, acc is not None and acc >= 0.80),
            _row(4, "binary ROC AUC", ">= 0.88", auc, isinstance(auc, float) and auc >= 0.88),
            _row(5, "binary accuracy", ">= 0.86", acc, acc is not None and acc >= 0.86),
            _row(5, "COVID F1", ">= 0.85", f1, f1 is not None and f1 >= 0.85),
            _row(5, "binary ROC AUC", ">= 0.94", auc, isinstance(auc, float) and auc >= 0.94)]


def ctmd_rows(triage: dict | None, scans: dict | None) -> list[dict]:
    """Issue 4 (CT slice targets of the triage) and issue 6 (burdens, slice AUC, time, memory)."""
    from covidct.data.classification import THREE_CLASSES, canonical_label

    rows = []
    if triage:
        t = triage.get("ct_slice_targets") or {}
        sens, spec = t.get("covid_sensitivity"), t.get("control_not_covid")
        note = " (in-sample for " + ", ".join(triage["in_sample_patients"]) + ")" if triage.get("in_sample_patients") else ""
        rows.append(_row(4, "COVID-19 slice sensitivity" + note, ">= 0.90", sens, sens is not None and sens >= 0.90))
        rows.append(_row(4, "Normal slices not called COVID-19" + note, ">= 0.95", spec, spec is not None and spec >= 0.95))
    if scans:
        by_class: dict[str, list[float]] = {}
        for p in scans["patients"]:
            by_class.setdefault(canonical_label(p["diagnosis"], THREE_CLASSES), []).append(p["total_pct"])
        normal, cap, covid = (by_class.get(c) for c in THREE_CLASSES)
        if normal:
            rows.append(_row(6, "lesion burden of Normal scans (max, % of lung)", "< 1", max(normal), max(normal) < 1.0))
        if normal and cap and covid:
            order = f"COVID-19 {min(covid):.2f}, CAP {max(cap):.2f}, Normal {max(normal):.2f}"
            rows.append(_row(6, "burden order (min COVID-19 > max CAP > max Normal, %)", "holds", order,
                             min(covid) > max(cap) > max(normal)))
        auc = scans.get("pooled_slice_auc")
        rows.append(_row(6, "infected-slice AUC, all scans pooled", ">= 0.90", None if auc is None else round(auc, 4),
                         auc is not None and auc >= 0.90))
        # the time target is for a 150-slice 512² series: each scan's wall time scaled to 150 slices
        per150 = [p["seconds"] * 150 / p["shape"][0] for p in scans["patients"] if p["shape"][1] >= 512]
        if per150:
            rows.append(_row(6, "end-to-end seconds per 150 slices of 512² (max over 512² scans)", "<= 30",
                             round(max(per150), 1), max(per150) <= 30))
        # the larger of the largest single process (exact) and the sampled sum with the read-ahead helper
        rss = max((max(p["peak_rss_mb_so_far"], p.get("peak_tree_rss_mb", 0)) for p in scans["patients"]),
                  default=None)
        rows.append(_row(6, "peak RSS of analyze (MB)", "<= 2048", rss, rss is not None and rss <= 2048))
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [f"{'issue':<6}{'what':<72}{'target':<10}{'measured':<40}met"]
    for r in rows:
        met = "-" if r["met"] is None else ("yes" if r["met"] else "NO")
        lines.append(f"{r['issue']:<6}{r['what']:<72}{r['target']:<10}{str(r['measured']):<40}{met}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seg", type=Path, help="COVID-SemiSeg-layout folder (segmentation and lesion targets)")
    ap.add_argument("--seg-split", help="only this split of --seg's manifest.csv")
    ap.add_argument("--ucsd", type=Path, help="binary classification folder (UCSD COVID-CT layout or another)")
    ap.add_argument("--ucsd-split", help="only this split of --ucsd (e.g. test)")
    ap.add_argument("--ctmd", type=Path, help="COVID-CT-MD-layout folder (CT triage and scan targets)")
    ap.add_argument("--out", type=Path, default=Path("out/targets"))
    ap.add_argument("--no-speed", action="store_true", help="leave out the two speed benchmarks")
    ap.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                    help="passed to every step (the segmentation networks' and the Mask R-CNN's arithmetic; "
                    "classifiers run in float32); default auto, as covidct's commands")
    args = ap.parse_args()
    if not (args.seg or args.ucsd or args.ctmd):
        ap.error("give at least one of --seg, --ucsd, --ctmd")
    for folder in (args.seg, args.ucsd, args.ctmd):
        if folder is not None and not folder.is_dir():
            print(f"{os.path.basename(sys.argv[0])}: error: {folder}: no such folder", file=sys.stderr)
            return 2
    args.out.mkdir(parents=True, exist_ok=True)
    py, cli = sys.executable, [sys.executable, "-m", "covidct.cli"]
    prec = ["--precision", args.precision]
    failures: list[str] = []
    rows: list[dict] = []
    if args.seg:
        split = ["--split", args.seg_split] if args.seg_split else []
        seg_cmd = ([*cli, "evaluate", "seg"] if args.no_speed else [py, str(HERE / "segmentation.py")])
        bench = _run("segmentation (issue 3)", [*seg_cmd, "--data", str(args.seg), *split, *prec,
                                                "--json", str(args.out / "segmentation.json")],
                     args.out / "segmentation.json", failures)
        lesions = _run("lesion instances (issue 4)", [*cli, "evaluate", "lesions", "--data", str(args.seg), *split, *prec,
                                                      "--json", str(args.out / "lesions.json")],
                       args.out / "lesions.json", failures)
        masknet = None if args.no_speed else _run(
            "Mask R-CNN speed (issue 4)", [py, str(HERE / "masknet.py"), "--model", "lesions-effl0-maskrcnn", "--data",
                                           str(args.seg), *prec, "--json", str(args.out / "masknet.json")],
            args.out / "masknet.json", failures)
        rows += seg_rows(bench, lesions, masknet)
    if args.ucsd:
        split = ["--split", args.ucsd_split] if args.ucsd_split else []
        rows += ucsd_rows(_run("binary classifier (issues 4, 5)", [*cli, "evaluate", "cls", "--data", str(args.ucsd),
                                                                  *split, "--json", str(args.out / "ucsd.json")],
                               args.out / "ucsd.json", failures))
    if args.ctmd:
        triage = _run("CT triage (issue 4)", [*cli, "evaluate", "cls", "--data", str(args.ctmd), *prec,
                                              "--json", str(args.out / "ctmd_triage.json")],
                      args.out / "ctmd_triage.json", failures)
        scans = _run("scan analysis (issue 6)", [py, str(HERE / "analyze.py"), "--data", str(args.ctmd), *prec, "--out",
                                                 str(args.out / "scans"), "--json", str(args.out / "scans.json")],
                     args.out / "scans.json", failures)
        rows += ctmd_rows(triage, scans)
    print("\n" + format_table(rows))
    if failures:
        print("steps that failed: " + "; ".join(failures))
    from covidct.report.json_io import write_json

    write_json({"targets": rows, "failed_steps": failures}, args.out / "targets.json")   # atomic, with the disclaimer
    print(f"wrote {args.out / 'targets.json'}")
    return 2 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
