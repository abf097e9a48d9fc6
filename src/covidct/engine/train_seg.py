"""``covidct train seg``: lesion (+ lung) segmentation training on CPU.

Validation comes from the first ``--data`` folder: a seeded share of its slices, or with
``folds > 0`` fold ``fold`` of a seeded k-fold split (grouped by source slice either way); slices
of other folders that share a source slice with the validation set are left out of training.
The best epoch by mean pooled validation Dice (infection, GGO, consolidation; lung for
``--labels lung``) is written to ``-o FILE``, or with ``select = "last"`` the last epoch (an
unbiased cross-validation estimate of a fixed-length recipe). With ``fold = "all"`` there is no
validation (nnU-Net's "fold all"): every slice trains and the last epoch is written.
``<FILE stem>_run/`` keeps ``last.pt`` (resume), ``log.csv``, ``curve.png`` and ``config.json``.
Launched by ``torchrun`` it trains data-parallel (:class:`~covidct.engine.common.Distributed`): the
global ``batch_size`` is split over the ranks and rank 0 validates and writes.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from covidct.data.segmentation import LESION_CLASSES, SegFolder, SegSample, crop_to_lung
from covidct.data.splits import group_kfold, group_split
from covidct.data.transforms import PASTED_LABELS, paste_lesions, seg_train_transform
from covidct.engine.common import (Distributed, seed_everything, train_one_epoch, warmup_cosine, write_log,
                                   write_run_config)
from covidct.engine.evaluate_seg import evaluate_folder
from covidct.engine.infer import SegPredictor
from covidct.errors import CovidctError
from covidct.io.window import to_model_input
from covidct.metrics.plots import save_figure
from covidct.models.checkpoint import save_checkpoint
from covidct.models.registry import model_references
from covidct.models.segmentation import SegModelConfig, build_seg_model

LABEL_SETS: dict[str, tuple[str, ...]] = {
    "masks": ("background", "ggo", "consolidation"),
    "masks4": ("background", "ggo", "consolidation", "effusion"),
    # pleural effusion alone (from masks4 / a masks/ that uses label 3): the companion model of
    # a lesion model that does not learn it (see covidct.engine.infer)
    "effusion": ("background", "effusion"),
    "lung": (),
}


def label_lut(lesion_classes: tuple[str, ...]) -> np.ndarray:
    """Stored label value (:data:`LESION_CLASSES`) -> the network's class index; classes the network
    lacks become background."""
    return np.array([lesion_classes.index(n) if n in lesion_classes else 0 for n in LESION_CLASSES], np.uint8)


@dataclass
class SegTrainConfig:
    """Training settings (saved in the checkpoint and ``config.json``)."""

    data: list[str]
    labels: str = "masks4"
    lung_head: bool = True
    arch: str = "unet"
    encoder: str = "efficientnet-lite0"
    decoder_channels: tuple[int, ...] = (96, 48, 24, 16, 8)
    fpn_channels: tuple[int, int] = (256, 128)
    input_size: int = 320
    imagenet: bool = True
    # a covidct seg / cls model file whose encoder starts this one (after ImageNet); "" = none
    encoder_init: str = ""
    # a covidct seg-pretrain file (``covidct pretrain seg``): every tensor but the output head; "" = none
    init: str = ""
    epochs: int = 120
    batch_size: int = 8
    lr: float = 2e-3
    encoder_lr_scale: float = 1.0
    weight_decay: float = 1e-4
    warmup_epochs: int = 3
    val_fraction: float = 0.2
    folds: int = 0
    fold: int | str = 0
    select: str = "best"
    class_weighting: str = "none"
    # weight of a soft Dice term on the infection region (GGO + consolidation probabilities summed
    # against their union; nnU-Net's region-based training), beside the per-class terms; 0 = off
    infection_dice_weight: float = 0.0
    # the overlap term beside the cross-entropy on the lesion classes: "dice" (soft Dice on the foreground
    # classes) or "lovasz" (Lovász-softmax on the classes present in the batch, a Jaccard surrogate)
    loss: str = "dice"
    # share of training slices that first receive another slice's GGO / consolidation (lesion copy-paste); 0 = off
    copy_paste: float = 0.0
    # also transpose half the slices: all eight orientations (the model's slice orientation is then "any")
    quarter_turns: bool = False
    # training slices framed wider than their lungs (MedSeg 512² frames) cut to their reference lung box,
    # as the predictor's second pass cuts them at inference (:func:`~covidct.data.segmentation.crop_to_lung`)
    lung_crop: bool = False
    # the orientation of the training slices (anterior-left: the documented layouts; anterior-up)
    data_orientation: str = "anterior-left"
    seed: int = 0
    lung_weight: float = 0.5
    elastic: bool = True
    threads: int = 0
    half: bool = True
    # learning curves: train on this many of the training slices (a seeded draw from the first folder's
    # training slices; the validation slices are unchanged); 0 = all
    train_limit: int = 0
    # stochastic weight averaging: the model is the mean of the weights after each of the last N epochs,
    # its BatchNorm statistics recomputed on the (augmented) training slices; 0 = off
    swa_epochs: int = 0

    def model_config(self) -> SegModelConfig:
        return SegModelConfig(arch=self.arch, encoder=self.encoder, decoder_channels=tuple(self.decoder_channels),
                              fpn_channels=tuple(self.fpn_channels),
                              lesion_classes=LABEL_SETS[self.labels], lung_head=self.lung_head or self.labels == "lung",
                              input_size=self.input_size,
                              slice_orientation="any" if self.quarter_turns else self.data_orientation)


def split_seg_folders(data: list[str], *, val_fraction: float, seed: int, folds: int = 0,
                      fold: int | str = 0) -> tuple[list[SegSample], list[SegSample]]:
    """(train, val) samples; see the module docstring for how validation is drawn."""
    folders = [SegFolder(d) for d in data]
    for f in folders:
        f.require_types("training")
    first = folders[0]
    indices = list(range(len(first)))
    if fold == "all":
        idx_train, idx_val = indices, []
    elif folds:
        idx_train, idx_val = group_kfold(indices, first.groups, n_folds=folds, fold=int(fold), seed=seed)
    else:
        idx_train, idx_val = group_split(indices, first.groups, val_fraction=val_fraction, seed=seed)
    val_groups = {first.groups[i] for i in idx_val}
    train = [first[i] for i in idx_train]
    val = [first[i] for i in idx_val]
    for folder in folders[1:]:
        train += [folder[i] for i in range(len(folder)) if folder.groups[i] not in val_groups]
    return train, val


def load_training_data(cfg: SegTrainConfig) -> tuple[list[SegSample], list[SegSample]]:
    if cfg.labels not in LABEL_SETS:
        raise CovidctError(None, f"--labels must be one of {sorted(LABEL_SETS)}")
    if cfg.class_weighting not in ("none", "sqrt-inverse"):
        raise CovidctError(None, "--class-weighting must be 'none' or 'sqrt-inverse'")
    if cfg.infection_dice_weight < 0:
        raise CovidctError(None, "--infection-dice-weight must be 0 or more")
    if cfg.loss not in SEG_LOSSES:
        raise CovidctError(None, f"--loss must be one of {', '.join(SEG_LOSSES)}")
    if cfg.data_orientation not in ("anterior-left", "anterior-up"):
        raise CovidctError(None, "--data-orientation must be 'anterior-left' or 'anterior-up'")
    if not 0 <= cfg.copy_paste <= 1:
        raise CovidctError(None, "--copy-paste must be between 0 and 1")
    if cfg.select not in ("best", "last"):
        raise CovidctError(None, "--select must be 'best' or 'last'")
    if cfg.fold != "all" and cfg.folds and not 0 <= int(cfg.fold) < cfg.folds:
        raise CovidctError(None, f"--fold must be 'all' or 0..{cfg.folds - 1}")
    train, val = split_seg_folders(cfg.data, val_fraction=cfg.val_fraction, seed=cfg.seed, folds=cfg.folds,
                                   fold=cfg.fold)
    if cfg.train_limit:   # (slices of the first folder, repeated or not, are drawn once by id)
        root = Path(cfg.data[0]).resolve()
        first = sorted({s.id for s in train if s.image_path.resolve().parent.parent == root})
        if not 0 < cfg.train_limit <= len(first):
            raise CovidctError(cfg.data[0], f"--train-limit must be 1..{len(first)} (its training slices)")
        keep = set(random.Random(cfg.seed).sample(first, cfg.train_limit))
        train = [s for s in train if s.image_path.resolve().parent.parent != root or s.id in keep]
    if cfg.lung_crop:
        train = [crop_to_lung(s) for s in train]
    if cfg.labels == "effusion" and not all(s.has_effusion for s in train + val):
        raise CovidctError(cfg.data[0], "--labels effusion needs pleural effusion labels (masks4/, or label 3 in masks/)")
    need_lung = cfg.lung_head or cfg.labels == "lung"
    if need_lung and any(s.lung is None for s in train):
        raise CovidctError(cfg.data[0], "lung head requested but some slices have no lung/ mask (use --no-lung-head)")
    return train, val


class _Augmented(torch.utils.data.Dataset):
    """Training slices through the augmentation; with ``copy_paste`` > 0 that share of them first
    receives the GGO / consolidation of another training slice (:func:`paste_lesions`)."""

    def __init__(self, samples: list[SegSample], transform, lesion_classes: tuple[str, ...], *,
                 copy_paste: float = 0.0, seed: int = 0) -> None:
        self.samples = samples
        self.transform = transform
        self.lut = label_lut(lesion_classes)
        self.copy_paste = copy_paste
        self.rng = np.random.default_rng(seed)
        self.donors = [j for j, s in enumerate(samples) if np.isin(s.labels, PASTED_LABELS).sum() >= 16]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        s = self.samples[i]
        image, raw_labels = s.image, s.labels
        if self.copy_paste:
            donors = [j for j in self.donors if j != i]
            if donors and self.rng.random() < self.copy_paste:
                d = self.samples[donors[self.rng.integers(len(donors))]]
                image, raw_labels = paste_lesions(image, raw_labels, s.lung, d.image, d.labels, d.lung, rng=self.rng)
        labels = self.lut[raw_labels]
        lung = s.lung if s.lung is not None else np.zeros_like(labels)
        out = self.transform(image=to_model_input(image, is_hu=False), masks=[labels, lung])
        img = torch.from_numpy(np.ascontiguousarray(out["image"], dtype=np.float32))[None]
        lab, lng = out["masks"]
        return img, torch.from_numpy(np.asarray(lab, np.int64)), torch.from_numpy(np.asarray(lng, np.float32)), float(s.has_effusion)


def soft_dice_loss(probs: torch.Tensor, onehot: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - Dice over the batch, per channel, averaged (channels absent from the batch still count
    through ``eps``)."""
    dims = (0, 2, 3)
    inter = (probs * onehot).sum(dims)
    den = probs.sum(dims) + onehot.sum(dims)
    return 1.0 - ((2 * inter + eps) / (den + eps)).mean()


def class_weights(samples: list[SegSample], lesion_classes: tuple[str, ...]) -> torch.Tensor:
    """Cross-entropy weights ``f_c^-1/2 / sum_c sqrt(f_c)`` from the pixel frequencies ``f_c`` of the
    training label maps: rare classes (consolidation, effusion) count more, and the mean weight per
    pixel stays 1 so the loss scale is unchanged. Classes absent from the data get weight 0."""
    n_lesion, lut = len(lesion_classes), label_lut(lesion_classes)
    counts = np.zeros(n_lesion, np.float64)
    for s in samples:
        counts += np.bincount(lut[s.labels.ravel()], minlength=n_lesion)  # as _Augmented
    freq = counts / counts.sum()
    w = np.where(freq > 0, 1.0 / np.sqrt(np.maximum(freq, 1e-12)), 0.0) / np.sqrt(freq).sum()
    return torch.tensor(w, dtype=torch.float32)


SEG_LOSSES = ("dice", "lovasz")


def lovasz_softmax_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Lovász-softmax (Berman et al. 2018) over the whole batch, averaged over the classes present
    in it (background included): segmentation_models_pytorch's implementation."""
    from segmentation_models_pytorch.losses import LovaszLoss

    return LovaszLoss("multiclass", per_image=False)(logits, labels)


def seg_loss(logits: torch.Tensor, labels: torch.Tensor, lung: torch.Tensor, n_lesion: int, lung_head: bool,
             lung_weight: float, ce_weight: torch.Tensor | None = None,
             infection: tuple[list[int], float] | None = None, overlap: str = "dice") -> torch.Tensor:
    """Cross-entropy (optionally class-weighted) + an overlap term on the lesion classes (``overlap``:
    soft Dice on the foreground classes, or Lovász-softmax), BCE + Dice on the lung;
    ``infection = (class indices, weight)`` adds ``weight`` x the soft Dice loss of those classes'
    summed probability against their union."""
    loss = logits.new_zeros(())
    if n_lesion:
        lesion = logits[:, :n_lesion]
        loss = loss + F.cross_entropy(lesion, labels, weight=ce_weight)
        probs = torch.softmax(lesion, dim=1)
        onehot = F.one_hot(labels.clamp(max=n_lesion - 1), n_lesion).permute(0, 3, 1, 2).float()
        if overlap == "lovasz":
            loss = loss + lovasz_softmax_loss(lesion, labels)
        else:
            loss = loss + soft_dice_loss(probs[:, 1:], onehot[:, 1:])
        if infection is not None and infection[1] > 0:
            idx, weight = infection
            loss = loss + weight * soft_dice_loss(probs[:, idx].sum(1, keepdim=True),
                                                  onehot[:, idx].sum(1, keepdim=True))
    if lung_head:
        lg = logits[:, n_lesion]
        loss = loss + lung_weight * (F.binary_cross_entropy_with_logits(lg, lung)
                                     + soft_dice_loss(torch.sigmoid(lg)[:, None], lung[:, None]))
    return loss


def selection_score(result: dict[str, Any], labels: str) -> float:
    d = result["dice"]
    keys = {"lung": ("lung",), "effusion": ("effusion",)}.get(labels, ("infection", "ggo", "consolidation"))
    vals = [d[k] for k in keys if d.get(k) is not None]
    return float(np.mean(vals)) if vals else 0.0


def plot_curves(log_rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    swa = [r for r in log_rows if r["epoch"] == "swa"]   # the weight average, drawn after the last epoch
    log_rows = [r for r in log_rows if r["epoch"] != "swa"]
    ep = [r["epoch"] for r in log_rows]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    a1.plot(ep, [r["train_loss"] for r in log_rows])
    a1.set_xlabel("epoch"); a1.set_ylabel("training loss"); a1.set_yscale("log")
    for key in ("val_dice_infection", "val_dice_ggo", "val_dice_consolidation", "val_dice_lung"):
        vals = [r.get(key) for r in log_rows]
        if any(v not in (None, "") for v in vals):
            line, = a2.plot(ep, [np.nan if v in (None, "") else v for v in vals], label=key.replace("val_dice_", ""))
            if swa and swa[0].get(key) not in (None, ""):
                a2.plot([len(ep)], [swa[0][key]], "*", color=line.get_color(), markersize=9)
    a2.set_xlabel("epoch"); a2.set_ylabel("validation Dice (pooled)"); a2.set_ylim(0, 1)
    if a2.lines:
        a2.legend()
    else:  # fold "all": nothing to validate on
        a2.text(0.5, 0.5, "no validation split", ha="center", va="center", transform=a2.transAxes)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    plt.close(fig)


def train_seg(cfg: SegTrainConfig, output: str | Path, *, resume: bool = True, progress: bool = True) -> dict[str, Any]:
    """Train, select on validation, write the best model to ``output``; returns its metrics."""
    output = Path(output)
    run_dir = output.with_name(output.stem + "_run")
    dist = Distributed()  # torchrun: one process per rank, gradients averaged (DDP, gloo)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    elif dist.active:  # the node's cores shared among its ranks
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.local_world_size))
    if cfg.batch_size % dist.world_size:
        raise CovidctError(None, f"--batch-size {cfg.batch_size} must be divisible by the {dist.world_size} ranks")
    progress = progress and dist.is_main
    if cfg.swa_epochs and (cfg.select != "last" and cfg.fold != "all" or not 0 < cfg.swa_epochs <= cfg.epochs):
        raise CovidctError(None, "--swa-epochs needs --select last and at most --epochs epochs")
    seed_everything(cfg.seed)
    train, val = load_training_data(cfg)
    if len(train) // dist.world_size < cfg.batch_size // dist.world_size:
        raise CovidctError(cfg.data[0], f"{len(train)} training slices{' over ' + str(dist.world_size) + ' ranks' if dist.active else ''}"
                           f" are fewer than one batch (--batch-size {cfg.batch_size})")
    mcfg = cfg.model_config()
    try:
        model = build_seg_model(mcfg, imagenet=cfg.imagenet, encoder_init=cfg.encoder_init or None)
    except ValueError as exc:   # an encoder without offline weights (a wrong --encoder-init file is an InputError)
        raise CovidctError(None, str(exc)) from None
    if cfg.init:
        from covidct.engine.pretrain_seg import init_from_pretrained

        init_from_pretrained(model, cfg.init)
    model = model.to(memory_format=torch.channels_last)
    encoder_params = list(model.net.encoder.parameters())
    encoder_ids = {id(p) for p in encoder_params}
    other_params = [p for p in model.parameters() if id(p) not in encoder_ids]
    opt = torch.optim.AdamW([{"params": encoder_params, "lr": cfg.lr * cfg.encoder_lr_scale},
                             {"params": other_params, "lr": cfg.lr}], weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, len(train) // cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    warm = cfg.warmup_epochs * steps_per_epoch

    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(total, warm))
    swa_start = cfg.epochs - cfg.swa_epochs
    averaged = torch.optim.swa_utils.AveragedModel(model) if cfg.swa_epochs else None
    if dist.is_main:
        write_run_config(run_dir, train=asdict(cfg), model=mcfg.to_dict(), n_train=len(train), n_val=len(val),
                         val_ids=[s.id for s in val], world_size=dist.world_size)
    start_epoch, best, best_result, log_rows, elapsed = 0, -1.0, None, [], 0.0
    last = run_dir / "last.pt"
    if resume and last.exists():
        state = torch.load(last, map_location="cpu", weights_only=False)
        if state["train_config"] == asdict(cfg):
            model.load_state_dict(state["model"]); opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            if averaged is not None:
                averaged.load_state_dict(state["averaged"])
            start_epoch, best, best_result = state["epoch"] + 1, state["best"], state["best_result"]
            log_rows, elapsed = state["log"], state["elapsed"]
            torch.set_rng_state(state["torch_rng"]); np.random.set_state(state["numpy_rng"]); random.setstate(state["py_rng"])
            if dist.is_main:
                print(f"resuming from {last} at epoch {start_epoch}")
    # every rank augments with its own seed and reads its own share of each shuffled epoch
    augment_seed = cfg.seed + start_epoch + 1000 * dist.rank
    ds = _Augmented(train, seg_train_transform(cfg.input_size, elastic=cfg.elastic, quarter_turns=cfg.quarter_turns,
                                               seed=augment_seed), mcfg.lesion_classes,
                    copy_paste=cfg.copy_paste, seed=augment_seed)
    sampler = dist.sampler(ds, seed=cfg.seed + start_epoch)
    gen = torch.Generator().manual_seed(cfg.seed + start_epoch)
    loader = torch.utils.data.DataLoader(ds, batch_size=cfg.batch_size // dist.world_size, shuffle=sampler is None,
                                         sampler=sampler, drop_last=True, generator=gen if sampler is None else None)
    trained = dist.wrap(model)

    def save_last(epoch: int) -> None:
        """Everything a resume needs, written atomically, and the CSV log."""
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                    "epoch": epoch, "best": best, "best_result": best_result, "log": log_rows, "elapsed": elapsed,
                    "train_config": asdict(cfg), "torch_rng": torch.get_rng_state(),
                    "numpy_rng": np.random.get_state(), "py_rng": random.getstate(),
                    "averaged": averaged.state_dict() if averaged is not None else None}, last.with_suffix(".tmp"))
        os.replace(last.with_suffix(".tmp"), last)
        write_log(log_rows, run_dir / "log.csv")
    n_lesion = len(mcfg.lesion_classes)
    ce_weight = None
    if cfg.class_weighting == "sqrt-inverse" and n_lesion:
        ce_weight = class_weights(train, mcfg.lesion_classes)
        if dist.is_main:
            print("cross-entropy class weights: " + ", ".join(
            f"{c} {w:.2f}" for c, w in zip(mcfg.lesion_classes, ce_weight.tolist())))
    infection = ([i for i, c in enumerate(mcfg.lesion_classes) if c in ("ggo", "consolidation")],
                 cfg.infection_dice_weight)
    bar = tqdm(range(start_epoch, cfg.epochs), desc="train seg", unit="epoch", disable=not progress,
               initial=start_epoch, total=cfg.epochs)
    for epoch in bar:
        t0 = time.time()
        train_loss = train_one_epoch(
            trained, loader, lambda b: seg_loss(trained(b[0].to(memory_format=torch.channels_last)), b[1], b[2], n_lesion,
                                                mcfg.lung_head, cfg.lung_weight, ce_weight, infection,
                                                cfg.loss),
            opt, sched, dist=dist, sampler=sampler, epoch=epoch)
        if averaged is not None and epoch >= swa_start:
            averaged.update_parameters(model)
        model.eval()
        if not dist.is_main:  # rank 0 validates, selects and writes; the others wait for it
            dist.barrier()
            continue
        result, val_score = _validate(model, val, cfg.labels)
        score = val_score if cfg.select == "best" and val else float(epoch)
        elapsed += time.time() - t0
        row = _log_row(epoch, result, val_score, elapsed, train_loss=train_loss, lr=opt.param_groups[1]["lr"])
        log_rows.append(row)
        if score > best:
            best, best_result = score, result
            _save_model(output, model, mcfg, cfg, best_result, epoch, elapsed, len(train), [s.id for s in val],
                        world_size=dist.world_size)
        bar.set_postfix(loss=f"{row['train_loss']:.3f}", val=f"{val_score:.3f}" if val else "-")
        save_last(epoch)
        dist.barrier()
    if averaged is not None and dist.is_main and not any(r["epoch"] == "swa" for r in log_rows):
        # stochastic weight averaging: BatchNorm statistics of the mean weights over one pass of the training
        # slices, then validated and written as the model; last.pt records it, so a resume does not redo it
        t0 = time.time()
        torch.optim.swa_utils.update_bn(((img.to(memory_format=torch.channels_last),) for img, *_ in loader),
                                        averaged.module)
        best_result, val_score = _validate(averaged.module, val, cfg.labels)
        elapsed += time.time() - t0
        log_rows.append(_log_row("swa", best_result, val_score, elapsed))
        _save_model(output, averaged.module, mcfg, cfg, best_result, cfg.epochs - 1, elapsed, len(train),
                    [s.id for s in val], world_size=dist.world_size)
        save_last(cfg.epochs - 1)
    if log_rows and dist.is_main:
        plot_curves(log_rows, run_dir / "curve.png")
    dist.close()
    return {"selected_epoch_score": best if cfg.select == "best" and val else None, "validation": best_result, "seconds": round(elapsed, 1), "output": str(output),
            "run_dir": str(run_dir)}


def _validate(model, val: list[SegSample], labels: str) -> tuple[dict | None, float | str]:
    """Pooled validation metrics (without per-image details) and the selection score; ``(None, "")``
    without a validation split (fold "all")."""
    if not val:
        return None, ""
    result = evaluate_folder(SegPredictor(model), _SampleList(val), progress=False, compute_hd95=False)
    return {k: v for k, v in result.items() if k != "details"}, selection_score(result, labels)


def _log_row(epoch: int | str, result: dict | None, val_score: float | str, elapsed: float, *,
             train_loss: float | str = "", lr: float | str = "") -> dict[str, Any]:
    return {"epoch": epoch, "train_loss": train_loss, "lr": lr,
            **{f"val_dice_{k}": ("" if v is None else v) for k, v in (result or {"dice": {}})["dice"].items()},
            "val_score": val_score, "seconds": round(elapsed, 1)}


def _save_model(output: Path, model, mcfg: SegModelConfig, cfg: SegTrainConfig, result: dict, epoch: int,
                elapsed: float, n_train: int, val_ids: list[str], *, world_size: int = 1) -> None:
    from covidct.data.segmentation import LESION_COLOURS

    classes = list(mcfg.lesion_classes) + (["lung"] if mcfg.lung_head else [])
    save_checkpoint(
        output, task="seg", config=mcfg.to_dict(), state_dict=model.state_dict(), half=cfg.half,
        classes=classes, colours={k: list(v) for k, v in LESION_COLOURS.items() if k in classes},
        input_size=mcfg.input_size,
        normalization="grey [0,1]: HU through the model window (L-420/W1480), 8-bit images /255; "
                      "then (x-0.449)/0.226 inside the network",
        train_config={**asdict(cfg), "decoder_channels": list(cfg.decoder_channels), "fpn_channels": list(cfg.fpn_channels)},
        starts=model_references(init=cfg.init, encoder_init=cfg.encoder_init),
        metrics={"validation": result, "epoch": epoch, "train_seconds": round(elapsed, 1),
                 "n_train": n_train, "n_val": len(val_ids), "val_ids": val_ids, "world_size": world_size},
    )


class _SampleList:
    """A list of samples with the SegFolder interface the evaluator uses."""

    def __init__(self, samples: list[SegSample]) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> SegSample:
        return self.samples[i]
