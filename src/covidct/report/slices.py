"""``covidct predict``: per-slice label maps, lung masks and overlays for images or volumes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from covidct.engine.infer import SegPredictor
from covidct.engine.lesions import INSTANCE_SCORE
from covidct.errors import InputError
from covidct.io import classifier_input, read, to_model_input
from covidct.io.noise import smoothed, volume_noise_plan
from covidct.report.json_io import write_json
from covidct.report.notes import noise_note
from covidct.report.overlay import instances_rgb, overlay_rgb, save_png, with_legend


def predict_to_folder(paths: list[str | Path], outdir: str | Path, *, model_spec: str | Path | None = None,
                      lesion_model_spec: str | Path | None = None, lesion_score: float = INSTANCE_SCORE,
                      progress: bool = True, precision: str = "auto") -> dict[str, Any]:
    """For every slice of every input write ``<name>_labels.png`` (value = class index: 0 background,
    1 GGO, 2 consolidation, 3 effusion), ``<name>_lung.png`` (0/1) and ``<name>_overlay.png``; plus
    ``predictions.json`` with per-slice lesion pixel counts and, per input, the orientation check of HU volumes
    (:func:`~covidct.analysis.scan.orientation_check`) and their noise (:func:`covidct.io.noise.noise_plan`: a noisy
    scan's slices reach the models smoothed, as in ``analyze``). With ``lesion_model_spec`` the Mask R-CNN
    lesion model also runs: ``<name>_instances.png`` (masks and boxes with scores, GGO red,
    consolidation blue) and ``instances`` (class, score, box, area) per slice in the JSON, for the
    detections scoring at least ``lesion_score``. All inputs are read before anything is written, so a
    bad input leaves no partial output. ``precision``: of the segmentation network
    (:mod:`covidct.engine.precision`; recorded in the JSON)."""
    from covidct.models.registry import load_lesion_model, load_seg_model

    from covidct.analysis.scan import analyze_volume, model_turns

    volumes = [read(p, progress=progress) for p in paths]
    model, payload = load_seg_model(model_spec)
    # slices framed unlike the training slices get a lung-cropped pass
    predictor = SegPredictor(model, precision=precision)
    framed = SegPredictor(model, crop_to_lung=False, precision=precision)
    lesion_model, lesion_payload = load_lesion_model(lesion_model_spec) if lesion_model_spec else (None, None)
    outdir = Path(outdir)
    rows = []
    inputs = []
    total = sum(v.n_slices for v in volumes)
    bar = tqdm(total=total, desc="predict", unit="slice", disable=not progress)
    for vol in volumes:
        stem = vol.source.name.split(".")[0]
        # CT in Hounsfield units (DICOM, NIfTI): the lungs and lesions of `covidct analyze` (classical HU
        # lungs, each slice cropped to them like the training slices, lesions kept in the lungs)
        # (a slice above or below the lungs is a valid input here: it gets empty maps, not an error)
        scan = analyze_volume(vol, framed, progress=False, require_lungs=False) if vol.is_hu else None
        inputs.append({"input": str(vol.source), "kind": vol.kind, "n_slices": vol.n_slices,
                       "orientation_check": None if scan is None else scan.orientation_check,
                       # HU volumes: the noise index and the smoothing of a noisy scan's model inputs (io.noise)
                       "noise": None if scan is None else scan.noise})
        sigma = 0.0 if scan is None else scan.smoothing_sigma_px
        # the lesion model sees the slices in its training orientation, as the segmentation model does
        lesion_turns = model_turns(vol, lesion_model) if lesion_model is not None else 0
        for k in range(vol.n_slices):
            grey = to_model_input(vol.array[k], is_hu=vol.is_hu)
            if scan is not None:
                labels, lung = scan.lesions[k], scan.lungs[k] > 0
            else:
                pred = predictor.predict([grey])[0]
                labels, lung = pred.labels, pred.lung
            name = stem if vol.n_slices == 1 else f"{stem}_{k:04d}"
            save_png(labels, outdir / f"{name}_labels.png")
            if lung is not None:
                save_png(lung.astype(np.uint8), outdir / f"{name}_lung.png")
            save_png(with_legend(overlay_rgb(grey, labels, lung), title=name), outdir / f"{name}_overlay.png")
            row = {"input": str(vol.source), "slice": k, "name": name,
                   "pixels": {"ggo": int((labels == 1).sum()), "consolidation": int((labels == 2).sum()),
                              "effusion": int((labels == 3).sum()), "lung": None if lung is None else int(lung.sum())},
                   "lungs": "classical HU threshold" if scan is not None else "learned lung head",
                   # which network segmented it: the main one, or the lung-masked companion (slices black outside
                   # their lungs); HU slices go through the scan analysis
                   "network": "main" if scan is not None else pred.network}
            if lesion_model is not None:
                seen = to_model_input(smoothed(vol.array[k], sigma), is_hu=True) if sigma else grey   # as analyze's
                row["instances"] = _instances(lesion_model, seen, outdir / f"{name}_instances.png", lesion_score, name,
                                              lesion_turns, predictor.precision, shown=grey)
            rows.append(row)
            bar.update(1)
    bar.close()
    summary = {"model": Path(payload["path"]).name, "precision": predictor.precision, "inputs": inputs, "slices": rows,
               "notes": input_notes(volumes)}
    if lesion_payload is not None:
        summary["lesion_model"] = Path(lesion_payload["path"]).name
        summary["lesion_score_threshold"] = lesion_score
    write_json(summary, outdir / "predictions.json")
    return summary


def turn_boxes_back(boxes: np.ndarray, turns: int, shape: tuple[int, int]) -> np.ndarray:
    """``(x1, y1, x2, y2)`` boxes found on ``np.rot90(image, turns)`` mapped onto ``image`` of ``shape``
    (rows, columns): one counter-clockwise turn sends ``(x, y)`` to ``(y, W - x)``, so its inverse takes
    ``(x, y)`` back to ``(W - y, x)``."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4).copy()
    for t in range(turns % 4, 0, -1):
        width = shape[1] if t % 2 == 1 else shape[0]      # the width of the image before turn t
        x1, y1, x2, y2 = boxes.T.copy()
        boxes = np.stack([width - y2, x1, width - y1, x2], axis=1)
    return boxes


def _instances(model, grey: np.ndarray, path: Path, min_score: float, title: str,
               turns: int = 0, precision: str = "fp32", shown: np.ndarray | None = None) -> list[dict[str, Any]]:
    """Run the lesion Mask R-CNN on one slice (turned ``turns`` quarters on the way in, its masks and boxes
    turned back), draw its instances (on ``shown``, the slice as read, when the model saw it smoothed; else on
    ``grey``), return them for the JSON."""
    from covidct.engine.lesions import predict_instances

    out = predict_instances(model, [np.ascontiguousarray(np.rot90(grey, turns))], precision=precision)[0]
    keep = out["scores"] >= min_score
    masks = np.rot90((out["masks"][keep][:, 0] > 0.5).numpy(), -turns, axes=(1, 2))
    names = [model.config.classes[int(c)] for c in out["labels"][keep]]
    scores = [float(s) for s in out["scores"][keep]]
    boxes = turn_boxes_back(out["boxes"][keep].numpy(), turns, grey.shape)
    picture = instances_rgb(grey if shown is None else shown, masks, names, scores, boxes)
    save_png(with_legend(np.asarray(picture), names=("ggo", "consolidation"),
                         title=f"{title}: {len(names)} lesion instances, score >= {min_score:g}"), path)
    return [{"class": n, "score": round(s, 4), "box": [round(float(v), 1) for v in b], "area_px": int(m.sum())}
            for n, s, b, m in zip(names, scores, boxes, masks)]


def classify_paths(paths: list[str | Path], *, model_spec: str | Path | None = None,
                   progress: bool = True, precision: str = "auto") -> dict[str, Any]:
    """Class probabilities (calibrated) of every slice of every input with a slice classifier (a CNN,
    a Mask-Net classifier or an ensemble; default: the shipped default). All inputs are read first.
    ``precision``: of a triage model's lesion segmentation (classifiers run in float32). A noisy HU scan's slices
    reach the classifier smoothed, with a note (:mod:`covidct.io.noise`, as in ``analyze``)."""
    from covidct.analysis.triage import is_triage_model
    from covidct.engine.evaluate_cls import predict_probabilities
    from covidct.models.registry import load_cls_model

    volumes = [read(p, progress=progress) for p in paths]
    if model_spec is not None and is_triage_model(model_spec):
        return _classify_with_triage(volumes, model_spec, progress=progress, precision=precision)
    model, payload = load_cls_model(model_spec, fold_bn=True)
    classes = list(model.config.classes)
    temperature = float(payload.get("temperature", 1.0))
    rows, notes = [], input_notes(volumes)
    bar = tqdm(total=sum(v.n_slices for v in volumes), desc="classify", unit="slice", disable=not progress)
    batch = 16
    for vol in volumes:
        # a noisy HU scan's slices reach the classifier smoothed, as in analyze (covidct.io.noise)
        plan = volume_noise_plan(vol)
        if note := noise_note(plan):
            notes.append({"input": str(vol.source), "note": note})
        sigma = plan["sigma_px"] if plan else 0.0
        for start in range(0, vol.n_slices, batch):
            ks = range(start, min(vol.n_slices, start + batch))
            probs = predict_probabilities(model, [classifier_input(smoothed(vol.array[k], sigma), is_hu=vol.is_hu)
                                                  for k in ks], temperature=temperature, batch_size=batch)
            for k, p in zip(ks, probs):
                rows.append({"input": str(vol.source), "slice": k, "label": classes[int(np.argmax(p))],
                             "probabilities": {c: round(float(v), 6) for c, v in zip(classes, p)}})
            bar.update(len(ks))
    bar.close()
    return {"model": Path(payload["path"]).name, "classes": classes, "slices": rows, "notes": notes}


def input_notes(volumes: list) -> list[dict[str, str]]:
    """``{"input", "note"}`` for each input that is probably not a chest CT slice: a colour image
    (:func:`~covidct.report.notes.colour_note`)."""
    from covidct.report.notes import colour_note

    return [{"input": str(v.source), "note": note} for v in volumes
            if (note := colour_note(v.metadata.get("colour_share")))]


def _classify_with_triage(volumes: list, spec: str | Path, *, progress: bool, precision: str) -> dict[str, Any]:
    """:func:`classify_paths` with a CT triage model: 3-class probabilities of every slice of each
    volume (which needs a pixel spacing); each volume is analysed once for its lesions."""
    from covidct.analysis.triage import TRIAGE_CLASSES, classify_volume, load_triage

    for vol in volumes:
        if vol.spacing is None:
            raise InputError(vol.source, "a triage model needs CT with a pixel spacing (DICOM or NIfTI)")
    triage = load_triage(spec, precision=precision)
    rows = []
    for vol in tqdm(volumes, desc="triage", unit="scan", disable=not progress):
        for k, p in enumerate(classify_volume(triage, vol)):
            rows.append({"input": str(vol.source), "slice": k, "label": TRIAGE_CLASSES[int(np.argmax(p))],
                         "probabilities": {c: round(float(v), 6) for c, v in zip(TRIAGE_CLASSES, p)}})
    return {"model": triage.name, "precision": triage.precision, "classes": list(TRIAGE_CLASSES), "slices": rows,
            "notes": input_notes(volumes)}
