"""Pseudo-labels: a trained segmentation model (the teacher) labels unlabelled slices, written as a
folder in the COVID-SemiSeg layout that ``covidct train seg --data`` reads beside the labelled one
(self-training, as Semi-Inf-Net did with unlabelled COVID-19 CT figures).

Each slice is segmented in two passes: the lung head finds the lungs on the whole image, then the
image is cropped to the lung box (+3 % per side) — the framing of the labelled COVID-SemiSeg crops —
and segmented again. The crop, its label maps (``masks4``: the teacher's own classes, no density
rule, since the intensity window of such images is unknown; ``masks``: the same without effusion) and
its lung mask are written. Slices whose lungs cover less than ``min_lung_fraction`` of the crop are
skipped (not a chest slice through the lungs, or the teacher failed on it).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from covidct.errors import CovidctError, InputError, require_folder
from covidct.io.body import mask_box
from covidct.io.image import png_info

if TYPE_CHECKING:
    from covidct.data.classification import ClsRecord
    from covidct.engine.infer import SegPredictor

#: Smallest share of the lung-box crop the teacher's lung must cover for a slice to be kept.
MIN_LUNG_FRACTION = 0.15
#: Images smaller than this (pixels, either side) are skipped.
MIN_SIDE_PX = 48


def slice_sources(data: Path, split: str | None) -> list[tuple[str, ClsRecord]]:
    """``(name, record)`` for every slice of a classification folder (any layout of
    :func:`~covidct.data.classification.load_records`; only split ``split`` when the layout has splits)
    or of a plain folder of images (records without a label)."""
    from covidct.data.classification import ClsRecord, load_records
    from covidct.io.image import list_images

    require_folder(data)
    try:
        records = load_records(data)
    except InputError:
        files = list_images(data)
        if not files:
            raise InputError(data, "no images and no known classification layout") from None
        return [(p.relative_to(data).as_posix(), ClsRecord(p, "")) for p in files]
    if split and any(r.split is not None for r in records):
        records = [r for r in records if r.split == split]
        if not records:
            raise InputError(data, f"no images in split {split!r}")
    out = []
    for r in records:
        rel = r.path.relative_to(data).as_posix() if r.path.is_relative_to(data) else str(r.path)
        out.append((rel if r.slice_index is None else f"{rel}#{r.slice_index}", r))
    return out


def pseudo_label(model_spec: str | Path | None, data: str | Path, output: str | Path, *, split: str | None = "train",
                 min_lung_fraction: float | None = None, progress: bool = True) -> dict[str, Any]:
    """Write the teacher's labels for the slices of ``data`` (split ``split`` when it has splits) to the
    new folder ``output``; the folder appears whole or not at all. Returns a summary."""
    from covidct.engine.infer import SegPredictor
    from covidct.models.checkpoint import file_sha256
    from covidct.models.registry import load_seg_model, resolve_model

    data, output = Path(data), Path(output)
    _check_new_folder(output)
    teacher_path = resolve_model(model_spec, task="seg")
    model, _ = load_seg_model(teacher_path)
    if not model.config.lung_head:
        raise CovidctError(teacher_path, "the teacher needs a lung head (to crop each slice to its lungs)")
    if "ggo" not in model.config.lesion_classes:
        raise CovidctError(teacher_path, f"the teacher segments {list(model.config.lesion_classes)}; pseudo-labels "
                                         "need GGO / consolidation")
    sources = slice_sources(data, split if split else None)
    predictor = SegPredictor(model, crop_to_lung=False, density_classes=False)
    info = {"source": str(data), "split": split, "teacher": teacher_path.stem, "teacher_sha256": file_sha256(teacher_path)}
    return write_pseudo_labels(predictor, sources, output, info=info, progress=progress,
                               min_lung_fraction=MIN_LUNG_FRACTION if min_lung_fraction is None else min_lung_fraction)


def _check_new_folder(output: Path) -> None:
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise CovidctError(output, "exists and is not empty; pick a new output folder")


def write_pseudo_labels(predictor: SegPredictor, sources: list[tuple[str, ClsRecord]], output: str | Path, *,
                        info: dict[str, Any], min_lung_fraction: float = MIN_LUNG_FRACTION,
                        progress: bool = True) -> dict[str, Any]:
    """The core of :func:`pseudo_label`: ``predictor`` (a :class:`~covidct.engine.infer.SegPredictor`
    without its own second pass or density rule) labels ``sources`` (``(name, record)``), each slice
    loaded as the classifiers load it (:class:`~covidct.data.classification.RecordImages`)."""
    from covidct.data.classification import RecordImages

    output = Path(output)
    _check_new_folder(output)
    load_record = RecordImages()
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.tmp-"))
    rows, skipped = [], 0
    try:
        for sub in ("images", "masks", "masks4", "lung"):
            (tmp / sub).mkdir()
        for k, (name, record) in enumerate(tqdm(sources, desc="pseudo-label", unit="slice", disable=not progress)):
            image = np.asarray(load_record(record), np.float32)
            box = mask_box(predictor.predict([image])[0].lung > 0.5) if min(image.shape) >= MIN_SIDE_PX else None
            crop = image[box] if box is not None else None
            if crop is None or min(crop.shape) < MIN_SIDE_PX:
                skipped += 1
                continue
            pred = predictor.predict([crop])[0]
            lung = pred.lung > 0.5
            if lung.mean() < min_lung_fraction:
                skipped += 1
                continue
            sid = f"p{k:05d}"
            for sub, array in (("images", (np.clip(crop, 0, 1) * 255).round().astype(np.uint8)),
                               ("masks4", pred.labels),
                               ("masks", np.where(pred.labels == 3, 0, pred.labels).astype(np.uint8)),
                               ("lung", lung.astype(np.uint8))):
                Image.fromarray(array).save(tmp / sub / f"{sid}.png", pnginfo=png_info())
            lesion = np.isin(pred.labels, (1, 2)) & lung
            rows.append({"image": f"images/{sid}.png", "mask": f"masks/{sid}.png", "masks4": f"masks4/{sid}.png",
                         "lung": f"lung/{sid}.png", "split": "train", "source": name, "source_label": record.label,
                         "lesion_percent_of_lung": round(100.0 * lesion.sum() / max(1, lung.sum()), 3),
                         "lung_fraction": round(float(lung.mean()), 4)})
        if not rows:
            raise CovidctError(info.get("source"), f"the teacher found lungs on none of its {len(sources)} slices; "
                                                   "nothing written")
        with open(tmp / "manifest.csv", "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        summary = {**info, "n_sources": len(sources), "n_written": len(rows), "n_skipped": skipped,
                   "min_lung_fraction": min_lung_fraction,
                   "labels": "the teacher's own classes (masks4 with effusion, masks without); two passes, the "
                             "second on the lung box (+3 %)",
                   "note": "pseudo-labels are model output, not ground truth; research software, not for diagnosis"}
        (tmp / "pseudo_labels.json").write_text(json.dumps(summary, indent=2))
        os.chmod(tmp, 0o755)
        if output.exists():
            output.rmdir()
        os.replace(tmp, output)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return {**summary, "output": str(output)}
