"""``covidct predict``: per-slice label maps, lung masks and overlays for images or volumes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from covidct.engine.infer import SegPredictor
from covidct.io import read, to_model_input
from covidct.report.json_io import write_json
from covidct.report.overlay import overlay_rgb, save_png, with_legend


def predict_to_folder(paths: list[str | Path], outdir: str | Path, *, model_spec: str | Path | None = None,
                      progress: bool = True) -> dict[str, Any]:
    """For every slice of every input write ``<name>_labels.png`` (value = class index: 0 background,
    1 GGO, 2 consolidation, 3 effusion), ``<name>_lung.png`` (0/1) and ``<name>_overlay.png``; plus
    ``predictions.json`` with per-slice lesion pixel counts. All inputs are read before anything is
    written, so a bad input leaves no partial output."""
    from covidct.models.registry import load_seg_model

    volumes = [read(p) for p in paths]
    model, payload = load_seg_model(model_spec)
    predictor = SegPredictor(model)
    outdir = Path(outdir)
    rows = []
    total = sum(v.n_slices for v in volumes)
    bar = tqdm(total=total, desc="predict", unit="slice", disable=not progress)
    for vol in volumes:
        stem = vol.source.name.split(".")[0]
        for k in range(vol.n_slices):
            grey = to_model_input(vol.array[k], is_hu=vol.is_hu)
            pred = predictor.predict([grey])[0]
            name = stem if vol.n_slices == 1 else f"{stem}_{k:04d}"
            save_png(pred.labels, outdir / f"{name}_labels.png")
            if pred.lung_prob is not None:
                save_png(pred.lung.astype(np.uint8), outdir / f"{name}_lung.png")
            save_png(with_legend(overlay_rgb(grey, pred.labels, pred.lung), title=name), outdir / f"{name}_overlay.png")
            lung_px = int(pred.lung.sum()) if pred.lung is not None else None
            rows.append({"input": str(vol.source), "slice": k, "name": name,
                         "pixels": {"ggo": int((pred.labels == 1).sum()), "consolidation": int((pred.labels == 2).sum()),
                                    "effusion": int((pred.labels == 3).sum()), "lung": lung_px}})
            bar.update(1)
    bar.close()
    summary = {"model": Path(payload["path"]).name, "slices": rows}
    write_json(summary, outdir / "predictions.json")
    return summary
