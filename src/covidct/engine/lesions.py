"""``covidct train lesions`` / ``covidct evaluate lesions``: the Mask R-CNN lesion model.

Training uses the segmentation split (same validation slices as ``train seg``), the same
albumentations pipeline on image + label map, then instances from the augmented label map. The
best epoch by validation mask AP50 is kept. Evaluation: COCO-style AP50, AP75 and mAP@[.5:.95] on
masks (torchmetrics ``MeanAveragePrecision``, pycocotools backend), per class and overall.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from covidct.data.segmentation import SegFolder, SegSample
from covidct.data.transforms import seg_train_transform
from covidct.engine.common import (Distributed, seed_everything, train_one_epoch, warmup_cosine, write_log,
                                   write_run_config)
from covidct.engine.precision import autocast, resolve_precision
from covidct.engine.train_seg import split_seg_folders
from covidct.errors import CovidctError
from covidct.io.window import to_model_input
from covidct.metrics.instances import InstanceAP
from covidct.models.checkpoint import save_checkpoint
from covidct.models.registry import model_references
from covidct.models.lesions import LesionModelConfig, LesionNet, build_lesion_model, instances_from_labels


INSTANCE_SCORE = 0.3  #: detections kept when instances are drawn, listed or merged into a lesion region


@dataclass
class LesionTrainConfig:
    data: list[str]
    model: dict = field(default_factory=dict)  # LesionModelConfig fields
    epochs: int = 40
    batch_size: int = 4
    lr: float = 1e-3
    weight_decay: float = 1e-4
    val_fraction: float = 0.2
    seed: int = 0
    imagenet: bool = True
    encoder_init: str | None = None  # a covidct segmentation checkpoint with the same encoder
    half: bool = True


def _targets_for(sample_labels: np.ndarray, mask_mode: str) -> dict:
    return instances_from_labels(sample_labels, mask_mode)


def predict_instances(model: LesionNet, images01: list[np.ndarray], *, precision: str = "fp32") -> list[dict]:
    """Instances (``boxes``, ``labels``, ``scores``, ``masks``; floating ones float32) of grey ``[0, 1]`` slices.
    The network runs channels-last (0.346 -> 0.291-0.298 s per 512² slice in ``benchmarks/masknet.py``),
    converted outside inference mode so that its parameters stay trainable; ``precision`` ``"bf16"`` (or
    ``"auto"`` where native) under autocast (:mod:`covidct.engine.precision`)."""
    precision = resolve_precision(precision)
    model.eval().to(memory_format=torch.channels_last)
    with torch.inference_mode(), autocast(precision):
        outs = model([torch.from_numpy(np.asarray(im, np.float32))[None] for im in images01])
    return [{k: (v.float() if v.is_floating_point() else v).cpu() for k, v in o.items()} for o in outs]


def evaluate_instances(model: LesionNet, samples, *, progress: bool = True,
                       on_prediction: Callable[[SegSample, dict, dict, tuple[str, ...]], None] | None = None,
                       precision: str = "fp32") -> dict[str, Any]:
    """AP on masks, overall and per class, plus images/s; and ``infection_dice``: the pooled Dice of
    the union of the instances scoring at least :data:`INSTANCE_SCORE` against GGO ∪ consolidation
    (how well the instances cover the lesions as a region, whatever their partition into instances).
    ``on_prediction(sample, prediction, truth, class_names)`` is called for every slice (e.g. to draw it; not
    timed); ``precision`` as in :func:`predict_instances` (the one used is in the result)."""
    precision = resolve_precision(precision)
    if model.config.mask_mode != "merge" and hasattr(samples, "require_types"):
        # binary infection masks (a SegFolder's) hold lesions of one class: only a merge model fits them
        samples.require_types(f"a lesion model of mask mode {model.config.mask_mode!r}")
    ap = InstanceAP(model.config.classes[1:])
    seconds, overlap, total = 0.0, 0, 0
    for i in tqdm(range(len(samples)), desc="evaluate lesions", unit="slice", disable=not progress):
        s = samples[i]
        t0 = time.perf_counter()
        pred = predict_instances(model, [to_model_input(s.image, is_hu=False)], precision=precision)[0]
        seconds += time.perf_counter() - t0
        masks = pred["masks"][:, 0] > 0.5
        truth_instances = _targets_for(s.labels, model.config.mask_mode)
        ap.update({"masks": masks, "scores": pred["scores"], "labels": pred["labels"]}, truth_instances)
        if on_prediction is not None:
            on_prediction(s, pred, truth_instances, tuple(model.config.classes))
        union = masks[pred["scores"] >= INSTANCE_SCORE].any(dim=0).numpy() if len(masks) else np.zeros(s.labels.shape, bool)
        truth = np.isin(s.labels, (1, 2)) if model.config.mask_mode != "ggo" else s.labels == 1
        overlap += int((union & truth).sum())
        total += int(union.sum() + truth.sum())
    out = ap.aggregate()
    out["infection_dice"] = round(2 * overlap / total, 6) if total else None
    out["instance_score_threshold"] = INSTANCE_SCORE
    out["images_per_second"] = round(len(samples) / seconds, 3) if seconds else None
    out["precision"] = precision
    return out


class _Instances(torch.utils.data.Dataset):
    def __init__(self, samples: list[SegSample], transform, mask_mode: str) -> None:
        self.samples, self.transform, self.mask_mode = samples, transform, mask_mode

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        s = self.samples[i]
        out = self.transform(image=to_model_input(s.image, is_hu=False), mask=s.labels)
        img = torch.from_numpy(np.ascontiguousarray(out["image"], np.float32))[None]
        return img, _targets_for(np.asarray(out["mask"]), self.mask_mode)


def train_lesions(cfg: LesionTrainConfig, output: str | Path, *, progress: bool = True) -> dict[str, Any]:
    """Train, select by validation AP50, write the best model to ``output``.

    Launched by ``torchrun`` it trains data-parallel (:class:`~covidct.engine.common.Distributed`):
    every rank reads its share of each shuffled epoch with its own augmentation seed, gradients are
    averaged over the ranks, rank 0 validates and writes; ``--batch-size`` is the global batch."""
    output = Path(output)
    run_dir = output.with_name(output.stem + "_run")
    dist = Distributed()
    if dist.active:  # the node's cores shared among its ranks
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.local_world_size))
    if cfg.batch_size % dist.world_size:
        raise CovidctError(None, f"--batch-size {cfg.batch_size} must be divisible by the {dist.world_size} ranks")
    progress = progress and dist.is_main
    seed_everything(cfg.seed)
    mcfg = LesionModelConfig.from_dict(cfg.model)
    train, val = split_seg_folders(cfg.data, val_fraction=cfg.val_fraction, seed=cfg.seed)
    if len(train) // dist.world_size < cfg.batch_size // dist.world_size:
        raise CovidctError(cfg.data[0], f"{len(train)} training slices{' over ' + str(dist.world_size) + ' ranks' if dist.active else ''}"
                           f" are fewer than one batch (--batch-size {cfg.batch_size})")
    try:
        model = build_lesion_model(mcfg, imagenet=cfg.imagenet, encoder_init=cfg.encoder_init)
    except ValueError as exc:
        raise CovidctError(cfg.encoder_init, str(exc)) from None
    starts = model_references(encoder_init=cfg.encoder_init)
    ds = _Instances(train, seg_train_transform(mcfg.input_size, seed=cfg.seed + 1000 * dist.rank), mcfg.mask_mode)
    sampler = dist.sampler(ds, seed=cfg.seed)
    dl = torch.utils.data.DataLoader(ds, batch_size=cfg.batch_size // dist.world_size, shuffle=sampler is None,
                                     sampler=sampler, drop_last=True, collate_fn=_collate,
                                     generator=torch.Generator().manual_seed(cfg.seed) if sampler is None else None)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(cfg.epochs * len(dl), 2 * len(dl)))
    trained = dist.wrap(model)
    if dist.is_main:
        write_run_config(run_dir, train=asdict(cfg), model=mcfg.to_dict(), n_train=len(train), n_val=len(val),
                         world_size=dist.world_size)
    best, best_result, log_rows, elapsed = -1.0, None, [], 0.0
    bar = tqdm(range(cfg.epochs), desc="train lesions", unit="epoch", disable=not progress)
    for epoch in bar:
        t0 = time.time()
        train_loss = train_one_epoch(trained, dl, lambda batch: sum(trained(list(batch[0]), list(batch[1])).values()),
                                     opt, sched, dist=dist, sampler=sampler, epoch=epoch, clip_params=params)
        if not dist.is_main:  # rank 0 validates, selects and writes; the others wait for it
            dist.barrier()
            continue
        result = evaluate_instances(model, val, progress=False)
        elapsed += time.time() - t0
        score = result["ap50"] or 0.0
        log_rows.append({"epoch": epoch, "train_loss": train_loss, "val_ap50": score,
                         "val_ap75": result["ap75"], "val_map": result["map"], "seconds": round(elapsed, 1)})
        if score > best:
            best, best_result = score, result
            save_checkpoint(output, task="lesions", config=mcfg.to_dict(), state_dict=model.state_dict(), half=cfg.half,
                            classes=list(mcfg.classes), input_size=mcfg.input_size,
                            anchors={"sizes": list(mcfg.anchor_sizes), "aspect_ratios": list(mcfg.aspect_ratios)},
                            normalization="grey [0,1] (HU: model window L-420/W1480; 8-bit /255), copied to 3 channels, (x-0.449)/0.226",
                            train_config=asdict(cfg), starts=starts,
                            metrics={"validation": result, "epoch": epoch, "train_seconds": round(elapsed, 1),
                                     "n_train": len(train), "val_ids": [s.id for s in val],
                                     "world_size": dist.world_size})
        bar.set_postfix(loss=f"{train_loss:.3f}", ap50=f"{score:.3f}", best=f"{best:.3f}")
        write_log(log_rows, run_dir / "log.csv")
        dist.barrier()
    dist.close()
    return {"best_ap50": best, "validation": best_result, "seconds": round(elapsed, 1), "output": str(output),
            "world_size": dist.world_size}


def _collate(batch):
    """Detection batches stay lists: (images, targets)."""
    return tuple(zip(*batch))


def evaluate_lesions(model_spec: str | Path | None, data: str | Path, *, split: str | None = None,
                     progress: bool = True,
                     on_prediction: Callable[[SegSample, dict, dict, tuple[str, ...]], None] | None = None,
                     precision: str = "auto") -> dict[str, Any]:
    """:func:`evaluate_instances` of a lesion model (shipped name or file) on a COVID-SemiSeg-layout folder;
    ``on_prediction(sample, prediction, truth, class_names)`` sees every slice; ``precision`` as in
    :func:`predict_instances`."""
    from covidct.models.registry import load_lesion_model

    model, payload = load_lesion_model(model_spec)
    folder = SegFolder(data, split=split)
    result = evaluate_instances(model, folder, progress=progress, on_prediction=on_prediction, precision=precision)
    result["model"] = Path(payload["path"]).name
    result["images_without_mask"] = folder.images_without_mask
    return result
