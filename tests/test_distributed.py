"""Data-parallel training with torch.distributed (gloo on CPU), as torchrun launches it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_step(rank: int, world: int, port: int, out_dir: str, manual: bool = False) -> None:
    os.environ.update({"WORLD_SIZE": str(world), "RANK": str(rank), "LOCAL_WORLD_SIZE": str(world),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    from covidct.engine.common import Distributed

    dist = Distributed()
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    ddp = model if manual else dist.wrap(model)
    x = dist.shard(list(torch.arange(12, dtype=torch.float32).reshape(4, 3)))  # each rank: its half
    loss = ddp(torch.stack(x)).pow(2).mean()
    loss.backward()
    if manual:  # the loops that do not run through one forward() average by hand
        dist.average_gradients(model.parameters())
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    torch.save({"weight": model.weight.detach(), "mean_loss": dist.mean(float(loss.detach()))}, f"{out_dir}/rank{rank}.pt")
    dist.close()
    # what this test checks is written; leave without interpreter finalisation. A spawned rank once aborted with
    # "terminate called without an active exception" (SIGABRT; a CI run, session 33; not reproduced in 70 local
    # runs), the message of a C++ thread destroyed while joinable, most likely gloo's at exit. A real run's exit is
    # covered by test_torchrun_trains_segmentation_on_two_ranks.
    os._exit(0)


@pytest.mark.parametrize("manual", [False, True], ids=["ddp", "average_gradients"])
def test_ddp_averages_gradients_like_one_full_batch(tmp_path, manual):
    torch.multiprocessing.spawn(_rank_step, args=(2, _free_port(), str(tmp_path), manual), nprocs=2, join=True)
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    torch.manual_seed(0)
    single = torch.nn.Linear(3, 1)
    x = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    full = single(x).pow(2).mean()
    full.backward()
    torch.optim.SGD(single.parameters(), lr=0.1).step()
    torch.testing.assert_close(r0["weight"], r1["weight"])  # the ranks stay identical
    torch.testing.assert_close(r0["weight"], single.weight.detach())  # = one step on the whole batch
    assert r0["mean_loss"] == pytest.approx(float(full.detach()), rel=1e-5) == pytest.approx(r1["mean_loss"], rel=1e-5)


def test_distributed_is_a_no_op_without_torchrun(monkeypatch):
    from covidct.engine.common import Distributed

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    d = Distributed()
    model = torch.nn.Linear(2, 1)
    assert not d.active and d.world_size == 1 and d.is_main and d.wrap(model) is model
    assert d.sampler([1, 2, 3], seed=0) is None and d.mean(2.5) == 2.5 and d.shard([1, 2, 3]) == [1, 2, 3]


def test_torchrun_trains_segmentation_on_two_ranks(tmp_path):
    from conftest import make_seg_folder

    from covidct.models import read_checkpoint

    data = make_seg_folder(tmp_path / "data", n=10, size=48)
    out = tmp_path / "ddp.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
           "-m", "covidct.cli", "train", "seg", "--data", str(data), "--encoder", "resnet18", "--random-init",
           "--input-size", "48", "--decoder-channels", "32,16,16,8,8", "--epochs", "2", "--batch-size", "4",
           "--val-fraction", "0.2", "-o", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    payload = read_checkpoint(out)
    assert payload["metrics"]["world_size"] == 2 and payload["metrics"]["n_val"] > 0
    log = (tmp_path / "ddp_run" / "log.csv").read_text().splitlines()
    assert len(log) == 3 and all(np.isfinite(float(row.split(",")[1])) for row in log[1:])
    # an odd split of the batch over the ranks is refused in one line
    bad = subprocess.run(cmd[:-2] + ["--batch-size", "3", "-o", str(tmp_path / "odd.pt")], env=env,
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "divisible by the 2 ranks" in bad.stderr and not (tmp_path / "odd.pt").exists()


def test_torchrun_trains_a_classifier_on_two_ranks(tmp_path):
    from test_cls_pipeline import _make_split_folder

    from covidct.models import read_checkpoint

    data = _make_split_folder(tmp_path / "cls", n=12, size=40)
    out = tmp_path / "cls.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
           "-m", "covidct.cli", "train", "cls", "--data", str(data), "--encoder", "resnet18", "--init", "random",
           "--input-size", "32", "--epochs", "2", "--batch-size", "8", "-o", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    payload = read_checkpoint(out)
    assert payload["metrics"]["world_size"] == 2 and payload["temperature"] > 0
    log = (tmp_path / "cls_run" / "log.csv").read_text().splitlines()
    assert len(log) == 3 and all(np.isfinite(float(row.split(",")[1])) for row in log[1:])


def test_torchrun_trains_the_lesion_model_on_two_ranks(tmp_path):
    """Mask R-CNN under DDP; rank 0 alone validates (its AP metric must not wait for the other rank)."""
    from conftest import make_seg_folder

    from covidct.models import read_checkpoint

    data = make_seg_folder(tmp_path / "data", n=10, size=64)
    out = tmp_path / "les.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
           "-m", "covidct.cli", "train", "lesions", "--data", str(data), "--backbone", "resnet18",
           "--truncate-last-stage", "--input-size", "64", "--epochs", "2", "--batch-size", "4", "-o", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count('"world_size": 2') == 1  # one summary, from rank 0
    payload = read_checkpoint(out)
    assert payload["metrics"]["world_size"] == 2 and payload["anchors"]["sizes"]
    log = (tmp_path / "les_run" / "log.csv").read_text().splitlines()
    assert len(log) == 3 and all(np.isfinite(float(row.split(",")[1])) for row in log[1:])


def test_torchrun_trains_the_mask_net_classifier_on_two_ranks(tmp_path):
    """Stage 2 (S + RoI heads) with each rank caching its half of the training images."""
    from test_cls_pipeline import _make_split_folder

    from covidct.models import read_checkpoint, save_checkpoint
    from covidct.models.lesions import LesionModelConfig, build_lesion_model

    cfg = LesionModelConfig(backbone="efficientnet-lite0", input_size=64, anchor_sizes=(4, 8, 16, 32, 64),
                            rpn_post_nms_top_n_test=20, box_score_thresh=0.0)
    les = save_checkpoint(tmp_path / "les.pt", task="lesions", config=cfg.to_dict(),
                          state_dict=build_lesion_model(cfg).state_dict(), classes=list(cfg.classes), input_size=64,
                          anchors={"sizes": list(cfg.anchor_sizes), "aspect_ratios": list(cfg.aspect_ratios)})
    data = _make_split_folder(tmp_path / "cls", n=8, size=40)
    out = tmp_path / "mc.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
           "-m", "covidct.cli", "train", "maskcls", "--data", str(data), "--lesion-model", str(les), "--train", "s+roi",
           "--top-n", "8", "--s-width", "16", "--epochs", "2", "--batch-size", "4", "-o", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    payload = read_checkpoint(out)
    m = payload["metrics"]
    assert m["world_size"] == 2 and m["n_train"] == 8 and payload["temperature"] > 0
    assert proc.stdout.count('"world_size": 2') == 1
