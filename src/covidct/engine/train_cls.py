"""``covidct train cls``: slice classifier (binary or 3-class) on CPU.

Validation: the folder's own ``val`` split when it has one (UCSD ``split.csv``), else a seeded
patient-grouped share of the training records. With ``folds=K`` the training and validation
records are pooled (never a ``test`` split) and cut into K patient-grouped folds stratified by class
(``covidct.data.splits.group_kfold``, seeded by ``seed``: use one seed for all folds); fold ``fold``
validates, so K runs see every image once out of fold and their models form a K-fold ensemble.
The best epoch (validation AUC, ties by accuracy) is kept; then a temperature is fitted on the
validation logits (calibration) and stored in the checkpoint with the validation accuracy, F1, AUC
and ECE before and after scaling. Launched by ``torchrun`` it trains data-parallel (the global batch
split over the ranks; rank 0 validates and writes).
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from covidct.data.classification import (BINARY_CLASSES, THREE_CLASSES, ClsRecord, RecordImages, load_records,
                                         relative_name)
from covidct.data.cls_transforms import cls_train_transform
from covidct.data.splits import group_kfold, group_split
from covidct.engine.common import (Distributed, seed_everything, train_one_epoch, warmup_cosine, write_log,
                                   write_run_config)
from covidct.engine.evaluate_cls import evaluate_records, mean_auc, summarize
from covidct.errors import CovidctError
from covidct.models.checkpoint import save_checkpoint
from covidct.models.registry import model_references
from covidct.models.classification import ClsModelConfig, build_cls_model


@dataclass
class ClsTrainConfig:
    data: str
    n_classes: int = 2
    encoder: str = "efficientnet-lite0"
    init: str = "imagenet"  # random | imagenet | path to a covidct segmentation checkpoint
    input_size: int = 224
    epochs: int = 30
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-4
    label_smoothing: float = 0.05
    val_fraction: float = 0.2
    folds: int = 0  # >= 2: k-fold over train + val pooled, ``fold`` validates
    fold: int = 0
    seed: int = 0
    half: bool = True

    @property
    def classes(self) -> tuple[str, ...]:
        if self.n_classes == 2:
            return BINARY_CLASSES
        if self.n_classes == 3:
            return THREE_CLASSES
        raise CovidctError(None, "--classes must be 2 or 3")


def split_records(records: list[ClsRecord], cfg: ClsTrainConfig) -> tuple[list[ClsRecord], list[ClsRecord]]:
    """(train, val) records of a training run: see the module docstring."""
    if cfg.folds:
        if cfg.folds < 2 or not 0 <= cfg.fold < cfg.folds:
            raise CovidctError(None, f"--folds must be at least 2 and --fold in 0..{max(cfg.folds, 2) - 1}")
        pool = [r for r in records if r.split in (None, "train", "val")]
        return group_kfold(pool, [r.patient for r in pool], n_folds=cfg.folds, fold=cfg.fold, seed=cfg.seed,
                           strata=[r.label for r in pool])
    if any(r.split == "val" for r in records):
        return [r for r in records if r.split == "train"], [r for r in records if r.split == "val"]
    train_pool = [r for r in records if r.split in (None, "train")]
    return group_split(train_pool, [r.patient for r in train_pool], val_fraction=cfg.val_fraction, seed=cfg.seed)


def check_class_coverage(train: list[ClsRecord], val: list[ClsRecord], classes: Sequence[str], data: Any) -> None:
    """Refuse a split a classifier cannot learn or be selected on: every class among the training records, at
    least two classes among the validation records (the AUC that picks the epoch needs both kinds)."""
    have = {r.label for r in train}
    missing = [c for c in classes if c not in have]
    if missing:
        raise CovidctError(data, f"no training image of class {', '.join(missing)}: a classifier of "
                                 f"{', '.join(classes)} needs images of every class")
    in_val = sorted({r.label for r in val})
    if len(in_val) < 2:
        raise CovidctError(data, f"every validation image is of class {in_val[0]}: choosing the epoch needs at "
                                 f"least two classes there (more images, a larger --val-fraction or a val split)")


class _Images(torch.utils.data.Dataset):
    def __init__(self, images: list[np.ndarray], labels: list[int], transform) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        img = self.transform(image=self.images[i])["image"]
        return torch.from_numpy(np.ascontiguousarray(img, np.float32))[None], self.labels[i]


#: Search range of the calibration fit (:func:`fit_temperature_and_bias`): temperature and class offsets.
CALIBRATION_TEMPERATURE_RANGE = (0.01, 100.0)
CALIBRATION_OFFSET_RANGE = (-20.0, 20.0)


def fit_temperature_and_bias(logits: torch.Tensor, labels: torch.Tensor, *,
                             offsets: bool = True) -> tuple[float, list[float]]:
    """Temperature ``T`` and class offsets ``c`` (``c[0] = 0``) minimising the NLL of
    ``softmax((logits + c) / T)``: Platt scaling for two classes, vector scaling beyond; ``offsets=False``
    fits T alone (temperature scaling). With offsets it corrects a shift between the classes as well as the
    scale (ensembles, on out-of-fold predictions).

    SciPy's bounded L-BFGS-B on ``log T`` and ``c`` in float64, within :data:`CALIBRATION_TEMPERATURE_RANGE`
    and :data:`CALIBRATION_OFFSET_RANGE`: logits that differ by thousandths (tiny ensembles) or separable
    classes have their NLL minimum at ``T`` -> 0, where an unbounded search (``torch.optim.LBFGS``, used
    before) stepped past what float32 holds and raised."""
    from scipy.optimize import minimize

    z = logits.detach().double()
    y = torch.as_tensor(labels).long()
    n_shift = z.shape[1] - 1 if offsets else 0

    def nll_and_grad(x: np.ndarray) -> tuple[float, np.ndarray]:
        p = torch.tensor(x, dtype=torch.float64, requires_grad=True)
        shift = torch.cat([torch.zeros(1, dtype=torch.float64), p[1:] if offsets else torch.zeros(z.shape[1] - 1,
                                                                                                  dtype=torch.float64)])
        loss = F.cross_entropy((z + shift) / p[0].exp(), y)
        loss.backward()
        return float(loss.detach()), p.grad.numpy().copy()

    lo, hi = (float(np.log(v)) for v in CALIBRATION_TEMPERATURE_RANGE)
    res = minimize(nll_and_grad, np.zeros(1 + n_shift), jac=True, method="L-BFGS-B",
                   bounds=[(lo, hi)] + [CALIBRATION_OFFSET_RANGE] * n_shift)
    return float(np.exp(res.x[0])), [0.0, *(float(v) for v in res.x[1:])] if offsets else [0.0] * z.shape[1]


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Temperature minimising the validation NLL (temperature scaling), kept within 0.05–20."""
    return float(np.clip(fit_temperature_and_bias(logits, labels, offsets=False)[0], 0.05, 20.0))


def train_cls(cfg: ClsTrainConfig, output: str | Path, *, progress: bool = True) -> dict[str, Any]:
    output = Path(output)
    run_dir = output.with_name(output.stem + "_run")
    dist = Distributed()  # torchrun: one process per rank, gradients averaged (DDP, gloo)
    if dist.active:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.local_world_size))
    if cfg.batch_size % dist.world_size:
        raise CovidctError(None, f"--batch-size {cfg.batch_size} must be divisible by the {dist.world_size} ranks")
    progress = progress and dist.is_main
    seed_everything(cfg.seed)
    classes = cfg.classes
    records = load_records(cfg.data, classes=classes)
    train, val = split_records(records, cfg)
    if not train or not val:
        raise CovidctError(cfg.data, "need both training and validation records")
    check_class_coverage(train, val, classes, cfg.data)
    if len(train) // dist.world_size < cfg.batch_size // dist.world_size:
        raise CovidctError(cfg.data, f"{len(train)} training images do not fill one batch (--batch-size {cfg.batch_size})")
    # built before the images load, so that an --init file that does not fit is one error line at once
    mcfg = ClsModelConfig(encoder=cfg.encoder, classes=classes, input_size=cfg.input_size)
    # channels-last from the start: evaluation converts to it, and DDP needs the layout fixed before wrapping
    model = build_cls_model(mcfg, init=cfg.init).to(memory_format=torch.channels_last)
    loader = RecordImages()
    images = [loader(r) for r in tqdm(train, desc="load", unit="image", disable=not progress)]
    labels = [classes.index(r.label) for r in train]
    counts = np.bincount(labels, minlength=len(classes)).astype(float)
    weights = torch.tensor(counts.sum() / (len(classes) * np.maximum(counts, 1)), dtype=torch.float32)
    ds = _Images(images, labels, cls_train_transform(cfg.input_size, seed=cfg.seed + 1000 * dist.rank))
    sampler = dist.sampler(ds, seed=cfg.seed)
    dl = torch.utils.data.DataLoader(ds, batch_size=cfg.batch_size // dist.world_size, shuffle=sampler is None,
                                     sampler=sampler, drop_last=True,
                                     generator=torch.Generator().manual_seed(cfg.seed) if sampler is None else None)
    trained = dist.wrap(model)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = max(1, len(dl)) * cfg.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(steps, max(1, len(dl))))
    if dist.is_main:
        write_run_config(run_dir, train=asdict(cfg), model=mcfg.to_dict(), n_train=len(train), n_val=len(val),
                         world_size=dist.world_size)
    best_key, best_state, log_rows, elapsed = (-1.0, -1.0), None, [], 0.0
    bar = tqdm(range(cfg.epochs), desc="train cls", unit="epoch", disable=not progress)
    for epoch in bar:
        t0 = time.time()
        train_loss = train_one_epoch(
            trained, dl, lambda b: F.cross_entropy(trained(b[0]), b[1], weight=weights, label_smoothing=cfg.label_smoothing),
            opt, sched, dist=dist, sampler=sampler, epoch=epoch)
        if not dist.is_main:  # rank 0 validates and selects; the others wait for it
            dist.barrier()
            continue
        res = evaluate_records(model, val, progress=False)
        auc = mean_auc(res["auc"])
        elapsed += time.time() - t0
        log_rows.append({"epoch": epoch, "train_loss": train_loss, "val_accuracy": res["overall_accuracy"],
                         "val_auc": auc, "seconds": round(elapsed, 1)})
        key = (auc, res["overall_accuracy"])
        if key > best_key:
            best_key, best_state, best_epoch = key, {k: v.clone() for k, v in model.state_dict().items()}, epoch
        bar.set_postfix(loss=f"{log_rows[-1]['train_loss']:.3f}", auc=f"{auc:.3f}", acc=f"{res['overall_accuracy']:.3f}")
        write_log(log_rows, run_dir / "log.csv")
        dist.barrier()
    dist.close()
    if not dist.is_main:
        return {"output": str(output), "rank": dist.rank}
    model.load_state_dict(best_state)
    before = evaluate_records(model, val, progress=False)
    logits = torch.log(torch.as_tensor(before["_probabilities"]).clamp_min(1e-8))
    temperature = fit_temperature(logits, torch.as_tensor(before["_labels"]))
    after = evaluate_records(model, val, temperature=temperature, progress=False)
    metrics = {"validation": summarize(before), "validation_calibrated": summarize(after), "epoch": best_epoch,
               "train_seconds": round(elapsed, 1), "n_train": len(train), "n_val": len(val),
               "world_size": dist.world_size}
    save_checkpoint(output, task="cls", config=mcfg.to_dict(), state_dict=model.state_dict(), half=cfg.half,
                    classes=list(classes), input_size=cfg.input_size, temperature=temperature,
                    normalization="grey [0,1] (HU: model window L-420/W1480; 8-bit /255), resized to input_size; (x-0.449)/0.226 inside",
                    train_config=asdict(cfg), metrics=metrics,
                    starts=model_references(init=None if cfg.init in ("imagenet", "random") else cfg.init),
                    validation_files=[relative_name(r, Path(cfg.data)) for r in val])
    return {"output": str(output), "temperature": temperature, **metrics}
