"""Training, evaluation and prediction of the segmentation model: tiny configs on generated
slices, and the shipped model on a few real ones."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from conftest import need_data
from covidct.cli import main
from covidct.engine.train_seg import SegTrainConfig, train_seg
from covidct.models import read_checkpoint
from covidct.models.registry import WEIGHTS_DIR

SEG_JSON_KEYS = {"n_images", "dice", "dice_mean_per_image", "iou", "rand_error", "images_per_second"}
CLASS_KEYS = {"infection", "ggo", "consolidation", "effusion", "lung"}


def _tiny(seg_folder, **kw) -> SegTrainConfig:
    return SegTrainConfig(data=[str(seg_folder)], encoder="resnet18", imagenet=False, input_size=48,
                          decoder_channels=(32, 16, 16, 8, 8), epochs=3, batch_size=2, warmup_epochs=1,
                          val_fraction=0.34, lr=3e-3, **kw)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from conftest import make_seg_folder

    root = tmp_path_factory.mktemp("train")
    folder = make_seg_folder(root / "data", n=6, size=48)
    out = root / "model.pt"
    result = train_seg(_tiny(folder), out, progress=False)
    return folder, out, result


def test_training_writes_model_log_curve(trained):
    folder, out, result = trained
    run = out.with_name("model_run")
    assert out.exists() and (run / "last.pt").exists() and (run / "curve.png").stat().st_size > 1000
    with open(run / "log.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    payload = read_checkpoint(out)
    assert payload["task"] == "seg" and payload["classes"][-1] == "lung"
    assert payload["train_config"]["epochs"] == 3 and payload["config"]["encoder"] == "resnet18"
    assert "validation" in payload["metrics"] and payload["input_size"] == 48
    config = json.loads((run / "config.json").read_text())
    assert config["n_train"] + config["n_val"] == 6


def test_resume_continues_from_last(trained, capsys):
    folder, out, _ = trained
    # the same config resumes from last.pt: all epochs done, so nothing is trained again
    train_seg(_tiny(folder), out, progress=False)
    assert "resuming from" in capsys.readouterr().out
    with open(out.with_name("model_run") / "log.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 3


def test_training_is_deterministic(tmp_path, seg_folder):
    a = train_seg(_tiny(seg_folder, seed=5), tmp_path / "a.pt", progress=False)
    b = train_seg(_tiny(seg_folder, seed=5), tmp_path / "b.pt", progress=False)
    assert a["validation"]["dice"] == b["validation"]["dice"]


def test_evaluate_seg_cli_json(trained, tmp_path, capsys):
    folder, out, _ = trained
    js = tmp_path / "eval.json"
    assert main(["evaluate", "seg", "--model", str(out), "--data", str(folder), "--json", str(js)]) == 0
    printed = capsys.readouterr().out
    assert "Evaluation took" in printed and "pooled" in printed
    res = json.loads(js.read_text())
    assert SEG_JSON_KEYS <= set(res) and res["n_images"] == 6
    assert set(res["dice"]) == CLASS_KEYS and set(res["dice_mean_per_image"]) == CLASS_KEYS
    assert res["dice"]["lung"] is not None and 0.0 <= res["dice"]["infection"] <= 1.0
    assert "not for diagnosis" in res["disclaimer"]


def test_evaluate_without_effusion_or_lung_labels_gives_null(trained, tmp_path, capsys):
    from conftest import make_seg_folder

    folder = make_seg_folder(tmp_path / "plain", n=3, masks4=False)
    for p in (folder / "lung").iterdir():
        p.unlink()
    (folder / "lung").rmdir()
    js = tmp_path / "e.json"
    assert main(["evaluate", "seg", "--model", str(trained[1]), "--data", str(folder), "--json", str(js)]) == 0
    res = json.loads(js.read_text())
    assert res["dice"]["effusion"] is None and res["dice"]["lung"] is None and res["n_images"] == 3


def test_predict_writes_maps_and_overlays(trained, tmp_path, capsys):
    folder, out, _ = trained
    images = sorted((folder / "images").iterdir())[:2]
    outdir = tmp_path / "pred"
    assert main(["predict", *map(str, images), "-o", str(outdir), "--model", str(out)]) == 0
    for img in images:
        labels = np.asarray(Image.open(outdir / f"{img.stem}_labels.png"))
        assert labels.shape == np.asarray(Image.open(img)).shape[:2] and labels.max() <= 3
        assert (outdir / f"{img.stem}_lung.png").exists()
        overlay = Image.open(outdir / f"{img.stem}_overlay.png")
        assert overlay.mode == "RGB" and overlay.width >= 320
    summary = json.loads((outdir / "predictions.json").read_text())
    assert len(summary["slices"]) == 2


def test_predict_bad_input_writes_nothing(trained, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    good = sorted((trained[0] / "images").iterdir())[0]
    outdir = tmp_path / "pred"
    assert main(["predict", str(good), str(bad), "-o", str(outdir), "--model", str(trained[1])]) == 2
    assert not outdir.exists()


def test_models_json_lists_shipped(capsys):
    assert main(["models", "--json"]) == 0
    models = json.loads(capsys.readouterr().out)["models"]
    shipped = sorted(p.stem for p in WEIGHTS_DIR.glob("*.pt"))
    assert sorted(m["name"] for m in models) == shipped
    for m in models:
        assert {"name", "task", "classes", "file", "input_size", "metrics"} <= set(m)
        assert m["task"] in ("seg", "lesions", "maskcls", "cls")


@pytest.mark.realdata
def test_shipped_model_on_real_slices(tmp_path):
    """Smoke test: the shipped model segments validation slices it did not train on."""
    import shutil

    src = need_data("covid-semiseg")
    payload = read_checkpoint(WEIGHTS_DIR / "seg-effl0-unet.pt")
    val_ids = payload["metrics"]["val_ids"][:4]
    dst = tmp_path / "few"
    for sub in ("images", "masks", "masks4", "lung"):
        (dst / sub).mkdir(parents=True)
        for i in val_ids:
            for f in (src / sub).glob(f"{i}.*"):
                shutil.copy(f, dst / sub / f.name)
    js = tmp_path / "e.json"
    assert main(["evaluate", "seg", "--data", str(dst), "--json", str(js)]) == 0
    res = json.loads(js.read_text())
    assert res["n_images"] == 4
    assert res["dice"]["infection"] > 0.5 and res["dice"]["lung"] > 0.8
