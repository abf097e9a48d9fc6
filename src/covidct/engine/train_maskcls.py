"""``covidct train maskcls``: COVID-CT-Mask-Net stage 2 on a trained lesion model.

What is trained (``--train``), the rest of the lesion network staying as trained and in inference
mode (batch-norm running statistics fixed):

* ``s``: the classification module S only. The RoI tensors of every image are computed once (no
  augmentation), then S trains full-batch for many epochs in seconds.
* ``s+bn``: S and the backbone's batch-norm affine parameters (the published code's choice). Every
  step runs the whole network with gradients; torchvision's ResNet-FPN has frozen batch norm, so this
  needs an EfficientNet-Lite backbone.
* ``s+roi``: S, the box head and the box predictor. The pooled RoI features are computed once; every
  step re-runs box head, predictor and torchvision's post-processing (score threshold, NMS), so the
  gradient of the class loss reaches the RoI scores and boxes.

Validation: the folder's ``val`` split or a patient-grouped share; best epoch by validation AUC (ties by
accuracy); temperature fitted on validation logits.

Launched by ``torchrun``, every rank caches and trains on its equal share of the training images
(``--batch-size`` is the global batch), gradients are averaged over the ranks after every backward
pass (:meth:`~covidct.engine.common.Distributed.average_gradients`), rank 0 validates and writes.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from covidct.data.classification import BINARY_CLASSES, THREE_CLASSES, RecordImages, load_records, relative_name
from covidct.data.cls_transforms import cls_eval_transform
from covidct.engine.common import Distributed, seed_everything
from covidct.engine.evaluate_cls import mean_auc, score_probabilities, summarize
from covidct.engine.train_cls import ClsTrainConfig, check_class_coverage, fit_temperature, split_records
from covidct.errors import CovidctError
from covidct.models.checkpoint import delta_state, save_checkpoint
from covidct.models.maskcls import TRAIN_CHOICES, MaskClsConfig, MaskClsNet

DEFAULT_EPOCHS = {"s": 300, "s+bn": 15, "s+roi": 40}


@dataclass
class MaskClsTrainConfig:
    data: str
    lesion_model: str | None = None
    n_classes: int = 2
    top_n: int = 32
    s_width: int = 128
    train: str = "s"  # s | s+bn | s+roi
    roi_features: tuple[str, ...] = ()  # extra columns per RoI (models.maskcls.ROI_FEATURES); () = N x 5
    epochs: int | None = None  # None: DEFAULT_EPOCHS[train]
    batch_size: int = 16  # images per step for s+bn / s+roi (s trains full-batch)
    lr: float = 1e-3  # for S; the lesion network's parameters get lr / 10
    weight_decay: float = 1e-4
    val_fraction: float = 0.2
    folds: int = 0  # >= 2: k-fold over train + val pooled, ``fold`` validates (as ``train cls``)
    fold: int = 0
    seed: int = 0

    @property
    def n_epochs(self) -> int:
        return self.epochs if self.epochs is not None else DEFAULT_EPOCHS[self.train]


def _scores(logits: torch.Tensor, y: torch.Tensor, classes) -> dict[str, Any]:
    """Validation summary (accuracy, AUC, F1, ECE) of S's logits, scored like ``evaluate cls``."""
    return summarize(score_probabilities(torch.softmax(logits, 1).numpy(), y.numpy(), classes))


class _Trainer:
    """One stage-2 recipe: ``logits(indices, split)`` of S for some images, from what the recipe caches
    (RoI tensors for ``s``, pooled RoI features for ``s+roi``, nothing for ``s+bn``)."""

    def __init__(self, model: MaskClsNet, train: str, images: dict[str, list[np.ndarray]], progress: bool) -> None:
        self.model, self.train = model, train
        self.images = images
        self.cache: dict[str, Any] = {}
        with torch.no_grad():
            for split, ims in images.items():
                if not ims:  # e.g. the validation images on ranks other than 0
                    continue
                if train == "s":
                    self.cache[split] = torch.cat([model.s_input([_tensor(im)]) for im in
                                                   tqdm(ims, desc=f"RoIs {split}", unit="image", disable=not progress)])
                elif train == "s+roi":
                    rows = [model.pooled_rois([_tensor(im)]) for im in
                            tqdm(ims, desc=f"RoI features {split}", unit="image", disable=not progress)]
                    self.cache[split] = [(r[0][0].half(), r[1][0], r[2][0]) for r in rows]

    def logits(self, idx: list[int], split: str) -> torch.Tensor:
        m = self.model
        if self.train == "s":
            return m.classify(self.cache[split][idx])
        if self.train == "s+roi":
            rows = [self.cache[split][i] for i in idx]
            return m.classify(m.detections_tensor([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]))
        return m.classify(m.detections_tensor(*m.pooled_rois([_tensor(self.images[split][i]) for i in idx])))

    def all_logits(self, split: str, batch: int = 32) -> torch.Tensor:
        n = len(self.images[split])
        with torch.no_grad():
            return torch.cat([self.logits(list(range(a, min(n, a + batch))), split) for a in range(0, n, batch)])


def _tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, np.float32))[None]


def train_maskcls(cfg: MaskClsTrainConfig, output: str | Path, *, progress: bool = True) -> dict[str, Any]:
    from covidct.models.registry import base_model_reference, load_lesion_model

    if cfg.train not in TRAIN_CHOICES:
        raise CovidctError(None, f"--train must be one of {', '.join(TRAIN_CHOICES)}")
    dist = Distributed()
    if dist.active:  # the node's cores shared among its ranks
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.local_world_size))
    if cfg.train != "s" and cfg.batch_size % dist.world_size:
        raise CovidctError(None, f"--batch-size {cfg.batch_size} must be divisible by the {dist.world_size} ranks")
    progress = progress and dist.is_main
    seed_everything(cfg.seed)
    classes = BINARY_CLASSES if cfg.n_classes == 2 else THREE_CLASSES
    lesion, lesion_payload = load_lesion_model(cfg.lesion_model)
    try:
        mcfg = MaskClsConfig(classes=classes, top_n=cfg.top_n, s_width=cfg.s_width, lesion=lesion.config.to_dict(),
                             roi_features=tuple(cfg.roi_features))
    except ValueError as exc:
        raise CovidctError(None, f"--roi-features: {exc}") from None
    model = MaskClsNet(mcfg, lesion).eval()  # inference mode throughout: fixed BN statistics, test-time RPN
    try:
        trainable = model.stage2_parameters(cfg.train)
    except ValueError as exc:
        raise CovidctError(cfg.lesion_model, str(exc)) from None
    for p in model.parameters():
        p.requires_grad_(False)
    for p in trainable:
        p.requires_grad_(True)
    records = load_records(cfg.data, classes=classes)
    train, val = split_records(records, ClsTrainConfig(data=cfg.data, val_fraction=cfg.val_fraction, seed=cfg.seed,
                                                            folds=cfg.folds, fold=cfg.fold))
    if not train or not val:
        raise CovidctError(cfg.data, "need both training and validation records")
    check_class_coverage(train, val, classes, cfg.data)
    n_train = len(train)
    train = dist.shard(train)  # this rank's share (all of it in one process)
    # the exact preprocessing of `covidct evaluate cls` / `predict_probabilities` (square resize to the
    # input size), so the RoIs seen in training are the RoIs seen at inference
    loader, resize = RecordImages(), cls_eval_transform(mcfg.input_size)

    def load(r) -> np.ndarray:
        return resize(image=np.asarray(loader(r), np.float32))["image"]

    t0 = time.time()
    images = {"train": [load(r) for r in tqdm(train, desc="load", unit="image", disable=not progress)],
              "val": [load(r) for r in val] if dist.is_main else []}
    trainer = _Trainer(model, cfg.train, images, progress)
    cache_seconds = time.time() - t0
    y_train = torch.tensor([classes.index(r.label) for r in train])
    y_val = torch.tensor([classes.index(r.label) for r in val])
    s_ids = {id(p) for p in model.s.parameters()}
    groups = [{"params": [p for p in trainable if id(p) in s_ids], "lr": cfg.lr},
              {"params": [p for p in trainable if id(p) not in s_ids], "lr": cfg.lr / 10}]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=cfg.weight_decay)
    target = F.one_hot(y_train, len(classes)).float()
    gen = torch.Generator().manual_seed(cfg.seed)  # the same order on every rank: the steps line up
    local_batch = cfg.batch_size // dist.world_size
    best, best_state, best_epoch = (-1.0, -1.0), None, 0
    t0 = time.time()
    bar = tqdm(range(cfg.n_epochs), desc=f"train maskcls ({cfg.train})", unit="epoch", disable=not progress)
    for epoch in bar:
        order = torch.randperm(len(train), generator=gen).tolist()
        steps = [order] if cfg.train == "s" else [order[a:a + local_batch] for a in range(0, len(order), local_batch)]
        for idx in steps:
            loss = F.binary_cross_entropy_with_logits(trainer.logits(idx, "train"), target[idx])  # per-class BCE
            opt.zero_grad()
            loss.backward()
            dist.average_gradients(trainable)
            opt.step()
        if not dist.is_main:  # rank 0 validates and keeps the best parameters
            continue
        sc = _scores(trainer.all_logits("val"), y_val, classes)
        key = (mean_auc(sc["auc"]), sc["accuracy"])
        if key > best:
            best, best_epoch = key, epoch
            best_state = {id(p): p.detach().clone() for p in trainable}
        bar.set_postfix(auc=f"{key[0]:.3f}", acc=f"{sc['accuracy']:.3f}", best=f"{best[0]:.3f}")
    train_seconds = time.time() - t0
    if not dist.is_main:
        dist.barrier()
        dist.close()
        return {"output": str(output), "world_size": dist.world_size}
    with torch.no_grad():
        for p in trainable:
            p.copy_(best_state[id(p)])
    val_logits = trainer.all_logits("val")
    temperature = fit_temperature(val_logits, y_val)
    metrics = {"validation": _scores(val_logits, y_val, classes), "epoch": best_epoch, "n_train": n_train,
               "n_val": len(val), "cache_seconds": round(cache_seconds, 1), "train_seconds": round(train_seconds, 1),
               "trained": {"s": "S only", "s+bn": "S + backbone batch-norm affine",
                           "s+roi": "S + RoI box head and predictor"}[cfg.train], "world_size": dist.world_size}
    # only what stage 2 changed is stored; the rest comes from the lesion model file (checked by sha256)
    base = {**base_model_reference(Path(lesion_payload["path"])), "prefix": "lesion."}
    state = delta_state(model.state_dict(), lesion_payload["state_dict"], prefix="lesion.")  # as read at load
    save_checkpoint(output, task="maskcls", config=mcfg.to_dict(), state_dict=state, half=True, base_model=base,
                    classes=list(classes), input_size=mcfg.input_size, temperature=temperature,
                    anchors={"sizes": list(lesion.config.anchor_sizes), "aspect_ratios": list(lesion.config.aspect_ratios)},
                    lesion_model=Path(lesion_payload["path"]).name, train_config=asdict(cfg), metrics=metrics,
                    validation_files=[relative_name(r, Path(cfg.data)) for r in val])
    dist.barrier()
    dist.close()
    return {"output": str(output), "temperature": temperature, **metrics}
