"""``covidct train maskcls``: COVID-CT-Mask-Net stage 2 on a trained lesion model.

What is trained: **S only** (``--train s``; the lesion network stays as trained — torchvision's
ResNet-FPN uses frozen batch norm, so "S + BN" is the same thing here). The RoI tensors of every
image are computed once (no augmentation), then S trains for many epochs in seconds. Validation: the
folder's ``val`` split or a patient-grouped share; best epoch by validation AUC; temperature fitted on
validation logits.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from covidct.data.classification import BINARY_CLASSES, THREE_CLASSES, RecordImages, load_records
from covidct.engine.common import seed_everything
from covidct.engine.train_cls import ClsTrainConfig, fit_temperature, split_records
from covidct.metrics import classification_report, confusion_matrix, roc_auc, roc_auc_per_class
from covidct.models.checkpoint import save_checkpoint
from covidct.models.maskcls import MaskClsConfig, MaskClsNet


@dataclass
class MaskClsTrainConfig:
    data: str
    lesion_model: str | None = None
    n_classes: int = 2
    top_n: int = 32
    s_width: int = 128
    epochs: int = 300
    lr: float = 1e-3
    weight_decay: float = 1e-4
    val_fraction: float = 0.2
    seed: int = 0


def _rois(model: MaskClsNet, records, progress: bool, desc: str) -> torch.Tensor:
    loader = RecordImages()
    out = []
    for r in tqdm(records, desc=desc, unit="image", disable=not progress):
        out.append(model.roi_tensor([torch.from_numpy(loader(r))[None]]))
    return torch.cat(out)


def _scores(logits: torch.Tensor, y: torch.Tensor, classes) -> dict[str, Any]:
    p = torch.softmax(logits, 1).numpy()
    rep = classification_report(confusion_matrix(y.numpy(), p.argmax(1), len(classes)), classes)
    auc = roc_auc(y.numpy() == 1, p[:, 1]) if len(classes) == 2 else float(np.nanmean(list(roc_auc_per_class(y.numpy(), p, classes).values())))
    return {"accuracy": rep.overall_accuracy, "auc": auc, "f1": {c: rep.per_class[c]["f1"] for c in classes}}


def train_maskcls(cfg: MaskClsTrainConfig, output: str | Path, *, progress: bool = True) -> dict[str, Any]:
    from covidct.models.registry import load_lesion_model

    seed_everything(cfg.seed)
    classes = BINARY_CLASSES if cfg.n_classes == 2 else THREE_CLASSES
    lesion, lesion_payload = load_lesion_model(cfg.lesion_model)
    mcfg = MaskClsConfig(classes=classes, top_n=cfg.top_n, s_width=cfg.s_width, lesion=lesion.config.to_dict())
    model = MaskClsNet(mcfg, lesion)
    records = load_records(cfg.data, classes=classes)
    train, val = split_records(records, ClsTrainConfig(data=cfg.data, val_fraction=cfg.val_fraction, seed=cfg.seed))
    t0 = time.time()
    x_train, x_val = _rois(model, train, progress, "RoIs train"), _rois(model, val, progress, "RoIs val")
    y_train = torch.tensor([classes.index(r.label) for r in train])
    y_val = torch.tensor([classes.index(r.label) for r in val])
    roi_seconds = time.time() - t0
    opt = torch.optim.AdamW(model.s.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    target = F.one_hot(y_train, len(classes)).float()
    best, best_state, best_epoch = (-1.0, -1.0), None, 0
    for epoch in range(cfg.epochs):
        model.s.train()
        loss = F.binary_cross_entropy_with_logits(model.classify(x_train), target)  # per-class BCE
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.s.eval()
        with torch.no_grad():
            sc = _scores(model.classify(x_val), y_val, classes)
        key = (sc["auc"], sc["accuracy"])
        if key > best:
            best, best_epoch = key, epoch
            best_state = {k: v.clone() for k, v in model.s.state_dict().items()}
    model.s.load_state_dict(best_state)
    with torch.no_grad():
        val_logits = model.classify(x_val)
    temperature = fit_temperature(val_logits, y_val)
    metrics = {"validation": _scores(val_logits, y_val, classes), "epoch": best_epoch, "n_train": len(train),
               "n_val": len(val), "roi_seconds": round(roi_seconds, 1), "trained": "S only"}
    save_checkpoint(output, task="maskcls", config=mcfg.to_dict(), state_dict=model.state_dict(), half=True,
                    classes=list(classes), input_size=mcfg.input_size, temperature=temperature,
                    anchors={"sizes": list(lesion.config.anchor_sizes), "aspect_ratios": list(lesion.config.aspect_ratios)},
                    lesion_model=Path(lesion_payload["path"]).name, train_config=asdict(cfg), metrics=metrics)
    return {"output": str(output), "temperature": temperature, **metrics}
