"""Pieces every training loop shares: seeding, the run's config and CSV log, the learning-rate
schedule, one epoch of optimizer steps, data-parallel training."""

from __future__ import annotations

import csv
import json
import os
import random
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch


def check_device(spec: str) -> str:
    """``spec`` when PyTorch can run here on that device, else a :class:`~covidct.errors.CovidctError` naming
    ``--device`` and the reason (an unknown name, no CUDA device, a CUDA index beyond the devices present)."""
    from covidct.errors import CovidctError

    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise CovidctError("--device", f"{spec!r} is not a device PyTorch knows (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cpu":
        return spec
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CovidctError("--device", f"{spec}: no CUDA device is available on this machine "
                                           "(torch.cuda.is_available() is False); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CovidctError("--device", f"{spec}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return spec
    try:   # any other backend (mps, xpu, ...): can a tensor live there?
        torch.empty(1, device=device)
    except Exception as exc:   # PyTorch's messages run to paragraphs: their first sentence
        first = str(exc).splitlines()[0].split(". ")[0] if str(exc) else type(exc).__name__
        raise CovidctError("--device", f"{spec}: not usable here ({first}); use --device cpu") from None
    return spec


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def write_log(rows: list[dict[str, Any]], path: Path) -> None:
    """Write the per-epoch log as CSV, atomically."""
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def write_run_config(run_dir: Path, **fields: Any) -> None:
    """Create the run folder and write ``config.json`` (the settings beside the model, as nnU-Net keeps its plan)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(fields, indent=2))


def train_one_epoch(trained: torch.nn.Module, batches: Iterable, loss_of: Callable[[Any], torch.Tensor],
                    opt: torch.optim.Optimizer, sched: Any, *, dist: "Distributed", sampler: Any = None,
                    epoch: int = 0, clip_params: Iterable[torch.Tensor] | None = None,
                    clip_norm: float = 10.0) -> float:
    """One pass over ``batches`` in training mode: for each, ``loss_of(batch)``, backward, gradient norm
    clipped to ``clip_norm`` when ``clip_params`` are given, optimizer and schedule step. Returns the mean
    loss over the batches and the ranks."""
    trained.train()
    if sampler is not None:
        sampler.set_epoch(epoch)
    clip = list(clip_params) if clip_params is not None else None
    losses = []
    for batch in batches:
        loss = loss_of(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(clip, clip_norm)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    return dist.mean(float(np.mean(losses)))


def warmup_cosine(total_steps: int, warmup_steps: int, floor: float = 0.02):
    """LambdaLR factor: linear warm-up, then cosine decay to ``floor``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return floor + (1 - floor) * 0.5 * (1 + np.cos(np.pi * min(1.0, progress)))

    return factor


class Distributed:
    """Data-parallel training with PyTorch's own engine (``torch.distributed``, gloo on CPU).

    Active when launched by ``torchrun`` (``WORLD_SIZE`` > 1 in the environment): one process per
    rank, on one machine (``--nproc-per-node``) or several (``--nnodes``, ``--rdzv-endpoint``).
    Otherwise every method is a no-op and ``world_size`` is 1."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        self.active = self.world_size > 1
        if self.active and not dist.is_initialized():
            dist.init_process_group(backend="gloo")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model to train: ``DistributedDataParallel`` (gradients averaged over ranks) when active."""
        if not self.active:
            return model
        return torch.nn.parallel.DistributedDataParallel(model)

    def sampler(self, dataset, *, seed: int):
        """Each rank's share of the shuffled dataset (``set_epoch`` every epoch), or ``None``."""
        if not self.active:
            return None
        from torch.utils.data.distributed import DistributedSampler

        return DistributedSampler(dataset, num_replicas=self.world_size, rank=self.rank, shuffle=True, seed=seed,
                                  drop_last=True)

    def mean(self, value: float) -> float:
        """The mean of a number over the ranks."""
        if not self.active:
            return value
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t.item()) / self.world_size

    def average_gradients(self, params) -> None:
        """Average the gradients of ``params`` over the ranks: what DDP does, for training loops that
        do not run through one ``forward`` (call it between ``backward`` and the optimizer step)."""
        if not self.active:
            return
        import torch.distributed as dist

        params = [p for p in params if p.requires_grad]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        dist.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for p in params:
            n = p.grad.numel()
            p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
            offset += n

    def shard(self, items: list) -> list:
        """This rank's equal share of ``items`` (every ``world_size``-th, the remainder dropped)."""
        if not self.active:
            return list(items)
        n = len(items) // self.world_size
        return list(items[self.rank::self.world_size][:n])

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.active:
            import torch.distributed as dist

            if dist.is_initialized():
                # all ranks leave together: a rank that tears gloo down while its peer is still
                # connected can abort the peer ("terminate called without an active exception")
                dist.barrier()
                dist.destroy_process_group()
