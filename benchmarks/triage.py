"""The CT triage model on a COVID-CT-MD-layout folder, in four parts:

1. its two stages alone: the lesion probability ``g`` (Control vs COVID-19 slices) and its binary
   classifier's own COVID probability (``covidct evaluate cls --model <classifier>``: COVID-19 vs CAP and
   vs Control slices, medians per class);
2. its 3-class slice scores, each slice with its scan's COVID-19 probability (as ``covidct evaluate cls
   --model <triage>``) and with its own (``--slice-context slice``);
3. the COVID-19 slices it misses (their lesion areas and own COVID probabilities);
4. how stable its one fitted number (the COVID-19 logit shift) is: refitted on one half of every
   patient's labelled slices (by slice position) and scored on the other half, both ways, both contexts.

    python benchmarks/triage.py --data $COVIDCT_DATA/covid-ct-md [--model triage-ct]

With the open patients part 4 is a within-patient check (the shipped shift was fitted on all of them):
it shows whether the shift depends on which slices it sees, not how it carries over to other patients.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from covidct.analysis.scan import AREA_SCALE_MM2  # noqa: E402
from covidct.analysis.triage import (GATE, TRIAGE_CLASSES, covid_given_lesion, ct_slice_targets,  # noqa: E402
                                     evaluate_triage, fit_covid_shift, load_triage, record_arrays, record_probabilities)
from covidct.engine.evaluate_cls import evaluate_cls, score_probabilities  # noqa: E402
from covidct.metrics import roc_auc  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--model", default=None, help="triage model (default: the shipped one)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    res = evaluate_triage(args.model, args.data, classify_all=True)   # own q of every slice with lesions too
    seconds = time.perf_counter() - t0
    groups, records = res["_groups"], res["_records"]
    g, p = record_arrays(groups, len(records))
    shift = load_triage(args.model).config.covid_logit_shift
    y = np.array([TRIAGE_CLASSES.index(r.label) for r in records])
    control, cap, covid = (y == 0), (y == 1), (y == 2)

    print("1. the two stages alone")
    for k, cls in enumerate(TRIAGE_CLASSES):
        m = y == k
        if m.any():
            print(f"  {cls}: {int(m.sum())} slices; lesions found on {np.mean(g[m] > 0):.3f}, "
                  f">= {AREA_SCALE_MM2 / 100:g} cm² (g >= {GATE}) on {np.mean(g[m] >= GATE):.3f}")
    if covid.any() and control.any():
        print(f"  lesion probability g, COVID-19 vs Control slices: AUC {roc_auc(y[covid | control] == 2, g[covid | control]):.4f}")
    classifier = load_triage(args.model).config.classifier
    binary = evaluate_cls(classifier, args.data)["_probabilities"][:, 1]   # same records, same order
    for name, other in (("CAP", cap), ("Control", control)):
        if covid.any() and other.any():
            m = covid | other
            print(f"  classifier {classifier} alone, COVID-19 vs {name} slices: AUC {roc_auc(y[m] == 2, binary[m]):.4f}")
    if covid.any() and not covid.all():
        from sklearn.metrics import roc_curve

        fpr, tpr, _ = roc_curve(covid, binary)
        print(f"  classifier alone, COVID-19 vs all other slices: AUC {roc_auc(covid, binary):.4f}; best sensitivity at "
              f"specificity >= 0.95 (read off the ROC, not a shipped threshold) {tpr[fpr <= 0.05 + 1e-9].max():.4f}")
    print("  its COVID probability, median: " + ", ".join(f"{cls} {np.median(binary[y == k]):.4f}"
                                                         for k, cls in enumerate(TRIAGE_CLASSES) if (y == k).any()))

    print(f"\n2. {res['model']}: {res['n_images']} labelled slices in {seconds:.1f} s (classifier on every slice "
          "with lesions)")
    own = score_probabilities(record_probabilities(groups, len(records), shift, context="slice"), y, TRIAGE_CLASSES)
    for name, r in (("scan's q (default)", res), ("slice's own q", own)):
        print(f"  each slice with its {name}:")
        print(r["_report"].confusion_text())
        print(f"  accuracy {r['overall_accuracy']:.4f}; " + ", ".join(
            f"{k} {'n/a' if v is None else f'{v:.4f}'}" for k, v in ct_slice_targets(r).items()))

    pred = res["_probabilities"].argmax(axis=1)
    q = covid_given_lesion(np.nan_to_num(p, nan=0.5), shift)
    area = AREA_SCALE_MM2 * g / np.maximum(1 - g, 1e-9) / 100.0   # cm², from g = A / (A + 1 cm²)
    print("\n3. COVID-19 slices not called COVID-19 (scan's q)")
    for k, cls in ((0, "Control"), (1, "Common pneumonia")):
        m = covid & (pred == k)
        if m.any():
            print(f"  called {cls}: {int(m.sum())}; lesion area (cm²) " + " ".join(f"{a:.2f}" for a in np.sort(area[m]))
                  + "; COVID-19 probability q " + " ".join(f"{v:.2f}" if a > 0 else "-"   # no lesion: not classified
                                                             for v, a in sorted(zip(q[m], area[m]), key=lambda t: t[1])))
    patients = np.array([r.patient for r in records])
    index = np.array([r.slice_index for r in records])
    first = np.zeros(len(y), bool)
    for pt in np.unique(patients):
        rows = np.flatnonzero(patients == pt)
        first[rows] = index[rows] < np.median(index[rows])
    print("\n4. split-half check (fit the shift on one half of each patient's labelled slices, score the other):")
    for name, fit_half in (("first", first), ("second", ~first)):
        fit = fit_half & (g >= GATE) & (y > 0)
        if len(set(y[fit])) < 2:
            print(f"  fit on the {name} halves: not both pneumonias among its gated slices; skipped")
            continue
        half_shift = fit_covid_shift(p[fit], y[fit] == 2)
        held = ~fit_half
        for context in ("scan", "slice"):
            pred = record_probabilities(groups, len(records), half_shift, context=context).argmax(axis=1)
            parts = []
            for k, cls in enumerate(TRIAGE_CLASSES):
                m = held & (y == k)
                if m.any():
                    parts.append(f"{cls} recall {np.mean(pred[m] == k):.3f} (n={int(m.sum())})")
            control = held & (y == 0)
            extra = f", Control not called COVID-19 {np.mean(pred[control] != 2):.3f}" if control.any() else ""
            print(f"  fit on the {name} halves: shift {half_shift:+.3f}; other halves, {context}'s q: "
                  + ", ".join(parts) + extra)


if __name__ == "__main__":
    main()
