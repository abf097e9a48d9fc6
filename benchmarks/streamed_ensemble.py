"""A streamed classifier ensemble (what ``analyze``'s triage runs on a few slices per scan) with and without
refilling the previous member's network: seconds per call, alternating, and whether the probabilities agree.

    python benchmarks/streamed_ensemble.py ../shared/data/covid-ct-md/P001 [--model cls-cv5-ucsd]
        [--slices 60,70,80,90,100] [--rounds 4] [--json OUT]

"built" switches the refill off (every member network built from its config, as before 2026-12-06);
"refilled" is the shipped behaviour (:func:`covidct.models.registry.load_model` ``reuse``). The first round
warms up caches and is printed but best ignored.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("scan", help="CT scan (DICOM series, NIfTI)")
    ap.add_argument("--model", default="cls-cv5-ucsd", help="ensemble classifier (default: the triage's)")
    ap.add_argument("--slices", default="60,70,80,90,100", help="comma-separated slice indices")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--json")
    args = ap.parse_args()

    from covidct.engine.evaluate_cls import predict_probabilities
    from covidct.io import read
    from covidct.io.body import classifier_input
    from covidct.models import registry
    from covidct.runtime import keep_freed_memory

    keep_freed_memory()   # as the covidct command line does
    vol = read(args.scan, progress=False)
    images = [classifier_input(vol.array[int(k)], is_hu=vol.is_hu, window="model") for k in args.slices.split(",")]
    model, payload = registry.load_cls_model(args.model, stream_members=True)
    temperature = float(payload.get("temperature", 1.0))
    refill = registry._same_cls_architecture
    seconds: dict[str, list[float]] = {"built": [], "refilled": []}
    probs: dict[str, np.ndarray] = {}
    try:
        for _ in range(args.rounds):
            for mode in seconds:
                registry._same_cls_architecture = refill if mode == "refilled" else (lambda *a, **k: False)
                t0 = time.perf_counter()
                probs[mode] = predict_probabilities(model, images, temperature=temperature)
                seconds[mode].append(round(time.perf_counter() - t0, 3))
    finally:
        registry._same_cls_architecture = refill
    identical = bool(np.array_equal(probs["built"], probs["refilled"]))
    for mode, s in seconds.items():
        print(f"{mode:>9}: {' / '.join(f'{v:.2f}' for v in s)} s per call ({len(images)} slices)")
    print(f"probabilities identical: {identical}")
    if args.json:
        from covidct.report.json_io import write_json

        write_json({"model": args.model, "slices": args.slices, "seconds": seconds, "identical": identical}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
