"""The CT triage model on a COVID-CT-MD-layout folder: its 3-class slice scores, and how stable its one
fitted number (the COVID-19 logit shift) is — refitted on one half of every patient's labelled slices
(by slice position) and scored on the other half, both ways.

    python benchmarks/triage.py --data $COVIDCT_DATA/covid-ct-md [--model triage-ct]

With the open patients this is a within-patient check (the shipped shift was fitted on all of them):
it shows whether the shift depends on which slices it sees, not how it carries over to other patients.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from covidct.analysis.triage import (GATE, TRIAGE_CLASSES, covid_given_lesion, evaluate_triage,  # noqa: E402
                                     fit_covid_shift, three_class)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--model", default=None, help="triage model (default: the shipped one)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    res = evaluate_triage(args.model, args.data)
    print(f"{res['model']}: {res['n_images']} labelled slices in {time.perf_counter() - t0:.1f} s")
    print(res["_report"].confusion_text())
    print(f"accuracy {res['overall_accuracy']:.4f}; " + ", ".join(f"{k} {v:.4f}" for k, v in res["ct_slice_targets"].items()))
    g, p, records = res["_lesion_probability"], res["_covid_probability"], res["_records"]
    y = np.array([TRIAGE_CLASSES.index(r.label) for r in records])
    patients = np.array([r.patient for r in records])
    index = np.array([r.slice_index for r in records])
    first = np.zeros(len(y), bool)
    for pt in np.unique(patients):
        rows = np.flatnonzero(patients == pt)
        first[rows] = index[rows] < np.median(index[rows])
    print("\nsplit-half check (fit the shift on one half of each patient's labelled slices, score the other):")
    for name, fit_half in (("first", first), ("second", ~first)):
        fit = fit_half & (g >= GATE) & (y > 0)
        if len(set(y[fit])) < 2:
            print(f"  fit on the {name} halves: not both pneumonias among its gated slices; skipped")
            continue
        shift = fit_covid_shift(p[fit], y[fit] == 2)
        pred = three_class(g, covid_given_lesion(p, shift)).argmax(axis=1)
        held = ~fit_half
        parts = []
        for k, cls in enumerate(TRIAGE_CLASSES):
            m = held & (y == k)
            if m.any():
                parts.append(f"{cls} recall {np.mean(pred[m] == k):.3f} (n={int(m.sum())})")
        control = held & (y == 0)
        extra = f", Control not called COVID-19 {np.mean(pred[control] != 2):.3f}" if control.any() else ""
        print(f"  fit on the {name} halves: shift {shift:+.3f}; other halves: " + ", ".join(parts) + extra)


if __name__ == "__main__":
    main()
