"""Training, evaluation and prediction of the segmentation model: tiny configs on generated
slices, and the shipped model on a few real ones."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import need_data
from covidct.cli import main
from covidct.engine.train_seg import SegTrainConfig, selection_score, train_seg
from covidct.errors import CovidctError
from covidct.models import read_checkpoint
from covidct.models.checkpoint import file_sha256
from covidct.models.registry import DEFAULTS, WEIGHTS_DIR

SEG_JSON_KEYS = {"n_images", "dice", "dice_mean_per_image", "iou", "rand_error", "images_per_second"}
CLASS_KEYS = {"infection", "ggo", "consolidation", "effusion", "lung"}


def _tiny(seg_folder, **kw) -> SegTrainConfig:
    settings = dict(encoder="resnet18", imagenet=False, input_size=48, decoder_channels=(32, 16, 16, 8, 8), epochs=3,
                    batch_size=2, warmup_epochs=1, val_fraction=0.34, lr=3e-3)
    return SegTrainConfig(data=[str(seg_folder)], **{**settings, **kw})


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


def test_fold_all_trains_on_every_slice_and_keeps_last_epoch(tmp_path, seg_folder):
    out = tmp_path / "all.pt"
    result = train_seg(_tiny(seg_folder, folds=5, fold="all", epochs=2), out, progress=False)
    assert result["validation"] is None
    payload = read_checkpoint(out)
    assert payload["metrics"]["epoch"] == 1 and payload["metrics"]["n_val"] == 0
    config = json.loads(out.with_name("all_run").joinpath("config.json").read_text())
    assert config["n_val"] == 0 and config["n_train"] == len(list((seg_folder / "images").iterdir()))


def test_swa_writes_the_weight_average_with_recomputed_batchnorm(tmp_path, seg_folder):
    out = tmp_path / "swa.pt"
    result = train_seg(_tiny(seg_folder, epochs=3, swa_epochs=2, select="last"), out, progress=False)
    run = tmp_path / "swa_run"
    with open(run / "log.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["epoch"] for r in rows] == ["0", "1", "2", "swa"]
    assert float(rows[-1]["val_score"]) == pytest.approx(selection_score(result["validation"], "masks4"))
    shipped = read_checkpoint(out)
    last = torch.load(run / "last.pt", map_location="cpu", weights_only=False)
    assert shipped["train_config"]["swa_epochs"] == 2 and last["averaged"]["n_averaged"].item() == 2
    # the averaged weights and their recomputed BatchNorm statistics, not the last epoch's
    key = next(k for k in shipped["state_dict"] if k.endswith("running_mean"))
    assert not torch.allclose(shipped["state_dict"][key].float(), last["model"][key].float(), atol=1e-3)
    weight = next(k for k in last["averaged"] if k.startswith("module.") and k.endswith("weight"))
    torch.testing.assert_close(shipped["state_dict"][weight[len("module."):]].float(),
                               last["averaged"][weight].float(), atol=2e-3, rtol=2e-3)   # fp16 file
    # resuming a finished run trains nothing and averages nothing again (the model file is not rewritten)
    written = out.stat().st_mtime_ns
    train_seg(_tiny(seg_folder, epochs=3, swa_epochs=2, select="last"), out, progress=False)
    with open(run / "log.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 4
    assert out.stat().st_mtime_ns == written
    with pytest.raises(CovidctError, match="--swa-epochs"):
        train_seg(_tiny(seg_folder, swa_epochs=2), tmp_path / "best.pt", progress=False)   # --select best


def test_class_weights_favour_rare_classes_and_keep_the_loss_scale():
    from covidct.data.segmentation import SegSample
    from covidct.engine.train_seg import class_weights

    labels = np.zeros((10, 10), np.uint8)
    labels[:2] = 1          # 20 % GGO
    labels[2, :5] = 2       # 5 % consolidation; no effusion
    sample = SegSample(id="a", image_path=None, image=np.zeros((10, 10), np.float32), labels=labels, lung=None,
                       has_effusion=False)
    w = class_weights([sample], ("background", "ggo", "consolidation", "effusion")).numpy()
    freq = np.array([0.75, 0.20, 0.05, 0.0])
    assert w[3] == 0.0 and w[2] > w[1] > w[0]
    np.testing.assert_allclose((w * freq).sum(), 1.0, rtol=1e-6)
    # with masks (3 classes) effusion pixels count as background, as in training
    labels[9, :] = 3
    w3 = class_weights([sample], ("background", "ggo", "consolidation")).numpy()
    np.testing.assert_allclose((w3 * np.array([0.75, 0.20, 0.05])).sum(), 1.0, rtol=1e-6)
    # the effusion-only label set: GGO and consolidation are background, effusion (10 %) its class 1
    we = class_weights([sample], ("background", "effusion")).numpy()
    assert we[1] > we[0]
    np.testing.assert_allclose((we * np.array([0.90, 0.10])).sum(), 1.0, rtol=1e-6)

def test_infection_dice_term_scores_the_union_not_the_type():
    from covidct.engine.train_seg import seg_loss

    labels = torch.zeros((1, 8, 8), dtype=torch.long)
    labels[0, :4] = 1                                          # GGO on the top half
    lung = torch.zeros((1, 8, 8))

    def loss_for(predicted: int, weight: float) -> float:
        logits = torch.full((1, 3, 8, 8), -20.0)
        logits[:, 0] = 20.0                                    # background...
        logits[0, 0, :4], logits[0, predicted, :4] = -20.0, 20.0   # ...but `predicted` on the lesion
        return float(seg_loss(logits, labels, lung, 3, False, 0.5, infection=([1, 2], weight)))

    # the right type: the union term adds nothing; the wrong type: per-class terms pay, the union still does not
    assert loss_for(1, 1.0) == pytest.approx(loss_for(1, 0.0), abs=1e-3)
    assert loss_for(2, 1.0) == pytest.approx(loss_for(2, 0.0), abs=1e-3)
    assert loss_for(2, 0.0) > loss_for(1, 0.0) + 0.5
    # a missed lesion (all background): the union term is weight x (1 - eps / (32 lesion pixels + eps)), eps = 1
    logits = torch.full((1, 3, 8, 8), -20.0)
    logits[:, 0] = 20.0
    base = float(seg_loss(logits, labels, lung, 3, False, 0.5))
    assert float(seg_loss(logits, labels, lung, 3, False, 0.5, infection=([1, 2], 2.0))) == pytest.approx(
        base + 2.0 * (1 - 1 / 33), abs=1e-3)



def test_lovasz_overlap_term_follows_the_jaccard_error():
    from covidct.engine.train_seg import seg_loss

    labels = torch.zeros((1, 8, 8), dtype=torch.long)
    labels[0, :4] = 1                                          # GGO on the top half
    lung = torch.zeros((1, 8, 8))

    def logits_for(rows: int) -> torch.Tensor:                 # GGO predicted on the first `rows` rows
        logits = torch.full((1, 3, 8, 8), -20.0)
        logits[:, 0] = 20.0
        logits[0, 0, :rows], logits[0, 1, :rows] = -20.0, 20.0
        return logits

    def overlap(rows: int, kind: str) -> float:                # the loss minus its cross-entropy
        logits = logits_for(rows)
        ce = float(torch.nn.functional.cross_entropy(logits, labels))
        return float(seg_loss(logits, labels, lung, 3, False, 0.5, overlap=kind)) - ce

    # a perfect map costs nothing; half the lesion missed: GGO Jaccard 1/2, background Jaccard 32/48,
    # so the Lovász-softmax term (mean over the two present classes) is (1/2 + 1/3) / 2
    assert overlap(4, "lovasz") == pytest.approx(0.0, abs=1e-4)
    assert overlap(2, "lovasz") == pytest.approx((1 / 2 + 1 / 3) / 2, abs=1e-3)
    # the soft Dice term on the same miss (GGO Dice 2/3; consolidation absent: eps / eps = 1)
    assert overlap(2, "dice") == pytest.approx((1 - (2 * 16 + 1) / (48 + 1)) / 2, abs=1e-3)


def test_out_of_fold_pools_each_slice_once(tmp_path, seg_folder):
    from covidct.engine.evaluate_seg import evaluate_out_of_fold
    from covidct.errors import CovidctError

    models = []
    for fold in range(2):
        out = tmp_path / f"f{fold}.pt"
        train_seg(_tiny(seg_folder, folds=2, fold=fold, epochs=1), out, progress=False)
        models.append(out)
    result = evaluate_out_of_fold(models, seg_folder, progress=False, compute_hd95=False)
    assert result["n_images"] == len(list((seg_folder / "images").iterdir()))
    assert 0.0 <= result["dice"]["infection"] <= 1.0
    with pytest.raises(CovidctError, match="overlap"):
        evaluate_out_of_fold([models[0], models[0]], seg_folder, progress=False)
    # only the slices of one manifest split (the folder's last two are "test")
    train_only = evaluate_out_of_fold(models, seg_folder, progress=False, compute_hd95=False, split="train")
    assert train_only["n_images"] == result["n_images"] - 2
    # an effusion recipe's fold models pair with the models fold by fold, never across folds
    paired = evaluate_out_of_fold(models, seg_folder, progress=False, compute_hd95=False, effusion_specs=models)
    assert paired["n_images"] == result["n_images"] and paired["dice"]["effusion"] is not None
    with pytest.raises(CovidctError, match="same slices"):
        evaluate_out_of_fold(models, seg_folder, progress=False, effusion_specs=models[::-1])


def test_manifest_id_map_translates_fold_ids_and_names_a_missing_manifest_or_column(tmp_path):
    from covidct.engine.evaluate_seg import manifest_id_map
    from covidct.errors import CovidctError

    (tmp_path / "manifest.csv").write_text("image,infnet_id\nimages/001.png,0\nimages/023.png,\nimages/002.png,1\n")
    assert manifest_id_map(tmp_path, "infnet_id") == {"0": "001", "1": "002"}   # rows without an id are left out
    with pytest.raises(CovidctError, match="needs the column"):
        manifest_id_map(tmp_path, "crop_id")
    with pytest.raises(CovidctError, match="manifest.csv: not found"):
        manifest_id_map(tmp_path / "nowhere", "infnet_id")


def test_out_of_fold_through_a_main_models_lung_masked_routing(tmp_path, seg_folder, monkeypatch):
    """``lung_masked_of``: the fold models stand in for a main model's lung-masked companion; they segment
    only the slices the main model routes, the main model the rest (its own result when none is routed)."""
    import covidct.engine.infer as infer
    from covidct.data.segmentation import SegFolder
    from covidct.engine.evaluate_seg import evaluate_folder, evaluate_out_of_fold
    from covidct.engine.infer import SegPredictor
    from covidct.models.registry import load_seg_model

    models = []
    for fold in range(2):
        out = tmp_path / f"f{fold}.pt"
        train_seg(_tiny(seg_folder, folds=2, fold=fold, epochs=1), out, progress=False)
        models.append(out)
    main_path = tmp_path / "main.pt"
    train_seg(_tiny(seg_folder, epochs=1, seed=3), main_path, progress=False)
    n = len(list((seg_folder / "images").iterdir()))
    for routed in (False, True):
        monkeypatch.setattr(infer, "is_lung_masked", lambda image, lung, routed=routed: routed)
        result = evaluate_out_of_fold(models, seg_folder, progress=False, compute_hd95=False, lung_masked_of=main_path)
        assert result["n_images"] == n and result["lung_masked_images"] == (n if routed else 0)
        if not routed:   # nothing routed: the main model's own evaluation
            alone = evaluate_folder(SegPredictor(load_seg_model(main_path)[0]), SegFolder(seg_folder), progress=False,
                                    compute_hd95=False)
            assert result["dice"] == alone["dice"]
    assert "lung_masked_images" not in evaluate_out_of_fold(models, seg_folder, progress=False, compute_hd95=False)


def test_kfold_training_validates_on_its_fold(tmp_path, seg_folder, capsys):
    assert main(["train", "seg", "--data", str(seg_folder), "--encoder", "resnet18", "--random-init",
                 "--input-size", "48", "--decoder-channels", "32,16,16,8,8", "--epochs", "1", "--batch-size", "2",
                 "--folds", "3", "--fold", "1", "--loss", "lovasz", "-o", str(tmp_path / "f1.pt")]) == 0
    config = json.loads((tmp_path / "f1_run" / "config.json").read_text())
    n = len(list((seg_folder / "images").iterdir()))
    assert config["train"]["loss"] == "lovasz"
    assert config["train"]["fold"] == 1 and 1 <= config["n_val"] < n and config["n_train"] + config["n_val"] == n
    capsys.readouterr()
    assert main(["train", "seg", "--data", str(seg_folder), "--folds", "3", "--fold", "x", "-o",
                 str(tmp_path / "bad.pt")]) == 2
    assert "--fold" in capsys.readouterr().err


def test_evaluate_seg_cli_json(trained, tmp_path, capsys):
    folder, out, _ = trained
    js = tmp_path / "eval.json"
    assert main(["evaluate", "seg", "--model", str(out), "--data", str(folder), "--json", str(js),
                 "--precision", "fp32"]) == 0
    printed = capsys.readouterr().out
    assert "Evaluation took" in printed and "pooled" in printed
    res = json.loads(js.read_text())
    assert SEG_JSON_KEYS <= set(res) and res["n_images"] == 6 and res["precision"] == "fp32"
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
    # --overlays: truth | prediction for each slice, the same scores; a file where the folder should be: one line
    pics = tmp_path / "pics"
    assert main(["evaluate", "seg", "--model", str(trained[1]), "--data", str(folder), "--json", str(tmp_path / "e2.json"),
                 "--overlays", str(pics)]) == 0
    assert json.loads((tmp_path / "e2.json").read_text())["dice"] == res["dice"]
    assert sorted(p.stem for p in pics.glob("*.png")) == sorted(p.stem for p in (folder / "images").iterdir())
    assert "not for diagnosis" in Image.open(next(pics.glob("*.png"))).text["Disclaimer"]
    capsys.readouterr()
    assert main(["evaluate", "seg", "--model", str(trained[1]), "--data", str(folder), "--overlays", str(js)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(js) in err[0] and "folder" in err[0]
    # an image without a label map of its name is left out, and the command says so (stderr and JSON)
    assert json.loads((tmp_path / "e2.json").read_text())["images_without_mask"] == []
    Image.fromarray(np.zeros((48, 48), np.uint8)).save(folder / "images" / "extra.png")
    assert main(["evaluate", "seg", "--model", str(trained[1]), "--data", str(folder), "--json", str(js)]) == 0
    res = json.loads(js.read_text())
    assert res["n_images"] == 3 and res["images_without_mask"] == ["extra"]
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"note: {folder}: 1 image(s) without a label map of the same name were not evaluated (extra)")


def test_labels_comparison_draws_truth_beside_prediction():
    from covidct.data.segmentation import LESION_COLOURS
    from covidct.report.overlay import labels_comparison

    grey = np.full((64, 64), 0.5, np.float32)
    truth, predicted = np.zeros((64, 64), np.uint8), np.zeros((64, 64), np.uint8)
    truth[5:20, 5:20] = 1          # GGO, found
    truth[40:60, 40:60] = 2        # consolidation, missed
    predicted[5:20, 5:20] = 1
    predicted[40:60, 5:20] = 3     # effusion, not in the truth
    pic = np.asarray(labels_comparison(grey, truth, predicted, title="7"))
    scale = 640 / (64 + 4 + 64)
    assert pic.shape[1] == 640

    def at(row, col):
        return pic[int((row + 0.5) * scale), int((col + 0.5) * scale)].astype(int)

    def tinted(rgb, name):
        return np.abs(rgb - (0.55 * 127 + 0.45 * np.array(LESION_COLOURS[name]))).max() <= 2

    assert tinted(at(12, 12), "ggo") and tinted(at(50, 50), "consolidation")              # truth, left
    assert tinted(at(12, 68 + 12), "ggo") and tinted(at(50, 68 + 12), "effusion")         # prediction, right
    assert np.abs(at(50, 68 + 50) - 127).max() <= 1 and np.abs(at(50, 12) - 127).max() <= 1


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
        for kind in ("labels", "lung", "overlay"):   # every image says what it is not for
            assert "not for diagnosis" in Image.open(outdir / f"{img.stem}_{kind}.png").text["Disclaimer"]
    summary = json.loads((outdir / "predictions.json").read_text())
    assert len(summary["slices"]) == 2 and summary["notes"] == []
    assert [r["network"] for r in summary["slices"]] == ["main", "main"]   # the model has no lung-masked companion
    # a colour picture is segmented too, with a note that it is probably no CT slice
    photo = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(photo)
    capsys.readouterr()
    assert main(["predict", str(photo), "-o", str(tmp_path / "pred2"), "--model", str(out)]) == 0
    notes = json.loads((tmp_path / "pred2" / "predictions.json").read_text())["notes"]
    assert [n["input"] for n in notes] == [str(photo)] and "while CT slices are grey" in notes[0]["note"]
    assert f"note: {photo}: {notes[0]['note']}" in capsys.readouterr().out


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
        # every shipped slice model was trained on the COVID-SemiSeg orientation (anterior at the left)
        assert m.get("slice_orientation") == ("anterior-left" if m["task"] in ("seg", "lesions") else None)
    assert {"seg", "lesions", "maskcls", "cls"} <= {m["task"] for m in models}
    assert main(["models"]) == 0
    text = capsys.readouterr().out
    assert "validation (instances): ap50" in text and "cross-validation (Dice): infection" in text
    # the networks inside the shipped seg file, each with its own estimate (on the data it was scored on)
    seg = next(m for m in models if m["name"] == DEFAULTS["seg"])
    assert set(seg["companions"]) == {"effusion", "lung_masked"}
    assert seg["companions"]["lung_masked"]["metrics"]["cross_validation"]["data"] == "medseg-512"
    assert "+ lung_masked companion: unet" in text and "cross-validation (Dice, medseg-512): infection" in text


@pytest.mark.realdata
def test_shipped_model_on_real_slices(tmp_path):
    """Smoke test: the shipped model loads by default and segments real slices sensibly (its own
    validation slices when it has them; a model trained with --fold all has seen every slice, so
    this is no accuracy estimate: that is the cross-validation in its metrics)."""
    import shutil

    src = need_data("covid-semiseg")
    payload = read_checkpoint(WEIGHTS_DIR / f"{DEFAULTS['seg']}.pt")   # the shipped default
    val_ids = (payload["metrics"].get("val_ids") or sorted(p.stem for p in (src / "masks").glob("*.png")))[:4]
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
    # two of these four slices (1, 10) hold pleural effusion: the file's effusion companion finds it
    assert res["dice"]["effusion"] > 0.3
    assert res["lung_masked_images"] == 0    # crops show the body around the lungs


def test_shipped_model_gives_lung_masked_frames_to_its_companion(tmp_path):
    """MedSeg's 512² frames are black outside their lungs: the shipped model's lung head finds that, and its
    lung-masked companion segments them (the crops of the same slices stay with the main network, above)."""
    import shutil

    src = need_data("medseg-512")
    dst = tmp_path / "frames"
    for sub in ("images", "masks", "lung"):
        (dst / sub).mkdir(parents=True)
        for name in ("017.png", "041.png", "056.png"):
            shutil.copy(src / sub / name, dst / sub / name)
    js = tmp_path / "e.json"
    assert main(["evaluate", "seg", "--data", str(dst), "--json", str(js)]) == 0
    res = json.loads(js.read_text())
    assert res["n_images"] == 3 and res["lung_masked_images"] == 3
    assert res["dice"]["infection"] > 0.5 and res["dice"]["lung"] > 0.9
    crop = need_data("covid-semiseg", "images") / "16.jpg"    # the crop of frame 017
    # frame 033: its labelled effusion is black in the image; the effusion network, which marked effusion on it
    # when it still ran on lung-masked slices, no longer runs there
    assert main(["predict", str(dst / "images" / "017.png"), str(crop), str(src / "images" / "033.png"),
                 "-o", str(tmp_path / "pred")]) == 0
    rows = json.loads((tmp_path / "pred" / "predictions.json").read_text())["slices"]
    assert [r["network"] for r in rows] == ["lung_masked", "main", "lung_masked"]
    assert rows[2]["pixels"]["effusion"] == 0 and rows[2]["pixels"]["ggo"] + rows[2]["pixels"]["consolidation"] > 0


def test_too_few_training_slices_for_a_batch_is_one_line_and_writes_nothing(tmp_path, seg_folder, capsys):
    out = tmp_path / "m.pt"
    assert main(["train", "seg", "--data", str(seg_folder), "--encoder", "resnet18", "--random-init", "--input-size", "48",
                 "--epochs", "1", "--batch-size", "64", "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "fewer than one batch" in err and len(err.splitlines()) == 1
    assert not out.exists() and not (tmp_path / "m_run").exists()


class _ThresholdNet(torch.nn.Module):
    """A stand-in network whose outputs follow the grey values: lung where > 0.5, GGO where > 0.9."""

    def __init__(self) -> None:
        super().__init__()
        from types import SimpleNamespace

        self.config = SimpleNamespace(input_size=32, lesion_classes=("background", "ggo", "consolidation"), lung_head=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.zeros_like(x), (x - 0.9) * 40, torch.full_like(x, -10.0), (x - 0.5) * 40], dim=1)


def test_predictor_segments_a_small_lung_field_again_at_full_resolution():
    """A lung field filling a small part of the slice gets a second pass on its box: a lesion too small
    to survive the whole slice's downsizing is found; outside the box nothing is labelled."""
    from covidct.engine.infer import SegPredictor

    image = np.zeros((200, 200), np.float32)
    image[60:120, 70:130] = 0.7          # the lungs: 60 x 60 of 200 x 200
    image[91:96, 97:102] = 1.0           # a 5-pixel lesion, between the first pass's sampling points
    one = SegPredictor(_ThresholdNet(), crop_to_lung=False, density_classes=False).predict([image])[0]
    two = SegPredictor(_ThresholdNet(), density_classes=False).predict([image])[0]
    assert one.labels[93, 99] == 0 and two.labels[93, 99] == 1
    assert two.labels.shape == image.shape and not two.labels[:50].any() and two.lung[90, 75]
    assert two.probs[0, 0, 0] == 1.0 and np.allclose(two.probs.sum(axis=0), 1.0, atol=1e-5)
    # a slice framed like the training slices (lungs fill it) is left to the first pass
    framed = np.full((64, 64), 0.7, np.float32)
    framed[20:40, 20:40] = 1.0
    a = SegPredictor(_ThresholdNet(), crop_to_lung=False, density_classes=False).predict([framed])[0]
    b = SegPredictor(_ThresholdNet(), density_classes=False).predict([framed])[0]
    assert np.array_equal(a.labels, b.labels) and np.array_equal(a.probs, b.probs)


def test_predict_on_ct_uses_the_hu_lungs(tiny_seg_model, tmp_path, capsys):
    from conftest import phantom_hu, write_ct_series

    write_ct_series(tmp_path / "s", phantom_hu(3, 96), spacing=(5.0, 3.0, 3.0))
    one = sorted((tmp_path / "s").iterdir())[1]
    outdir = tmp_path / "pred"
    assert main(["predict", str(one), "-o", str(outdir), "--model", str(tiny_seg_model)]) == 0
    row = json.loads((outdir / "predictions.json").read_text())["slices"][0]
    assert row["lungs"] == "classical HU threshold" and row["pixels"]["lung"] > 500
    lung = np.asarray(Image.open(outdir / f"{row['name']}_lung.png"))
    labels = np.asarray(Image.open(outdir / f"{row['name']}_labels.png"))
    assert lung.shape == labels.shape == (96, 96)
    assert not np.isin(labels, (1, 2))[lung == 0].any()  # GGO / consolidation only in the lungs (as in analyze)
    # a slice above the lungs (soft tissue and air only) is still predicted: empty maps, where analyze would refuse
    neck = np.full((1, 96, 96), 40.0, np.float32)
    neck[:, :6] = -1000.0
    write_ct_series(tmp_path / "neck", neck, spacing=(5.0, 3.0, 3.0))
    neck_file = next((tmp_path / "neck").iterdir())
    assert main(["predict", str(neck_file), "-o", str(tmp_path / "pred_neck"), "--model", str(tiny_seg_model)]) == 0
    row = json.loads((tmp_path / "pred_neck" / "predictions.json").read_text())["slices"][0]
    assert row["pixels"]["lung"] == 0 and row["pixels"]["ggo"] == row["pixels"]["consolidation"] == 0


def test_lesion_class_follows_the_density_of_the_lesion():
    """The network says where the lesions are; the smoothed density says GGO or consolidation."""
    from covidct.engine.infer import CONSOLIDATION_LEVEL, SegPredictor, split_by_density

    image = np.full((80, 80), 0.2, np.float32)      # healthy lung
    image[10:30, 10:30] = 0.4                       # hazy: GGO
    image[40:70, 40:70] = 0.8                       # dense: consolidation
    labels = np.zeros((80, 80), np.uint8)
    labels[10:30, 10:30] = 2                        # the network called the hazy patch consolidation
    labels[40:70, 40:70] = 1                        # and the dense one GGO
    labels[0:3, 75:80] = 3                          # effusion is left alone
    out = split_by_density(labels.copy(), image)
    assert (out[12:28, 12:28] == 1).all() and (out[42:68, 42:68] == 2).all()
    assert (out[0:3, 75:80] == 3).all() and not out[35, 5] and 0.4 < CONSOLIDATION_LEVEL < 0.8
    # filtering only around the lesions gives what filtering the whole slice gives
    from scipy import ndimage

    rng = np.random.default_rng(0)
    noisy = ndimage.gaussian_filter(rng.random((120, 140)), 2).astype(np.float32) * 2 - 0.5
    blobs = np.zeros((120, 140), np.uint8)
    blobs[30:50, 90:120] = 1
    blobs[100:118, 5:20] = 2
    dense_all = ndimage.gaussian_filter(noisy, 3.0) >= CONSOLIDATION_LEVEL
    expected = np.where(blobs > 0, np.where(dense_all, 2, 1), 0)
    assert np.array_equal(split_by_density(blobs.copy(), noisy), expected)

    class Dense(_ThresholdNet):                     # GGO wherever the input is above 0.3
        def forward(self, x):
            return torch.cat([torch.zeros_like(x), (x - 0.3) * 40, torch.full_like(x, -10.0), (x + 1) * 40], dim=1)

    on = SegPredictor(Dense(), crop_to_lung=False).predict([image])[0]
    off = SegPredictor(Dense(), crop_to_lung=False, density_classes=False).predict([image])[0]
    assert off.labels[55, 55] == 1 and on.labels[55, 55] == 2 and on.labels[20, 20] == off.labels[20, 20] == 1
    # a slice of known pixel size is smoothed over DENSITY_SIGMA_MM (the same anatomy at any resolution):
    # 3 pixels at the training slices' ~0.75 mm, 1.5 pixels at 1.5 mm
    from covidct.engine.infer import DENSITY_SIGMA_MM, DENSITY_SIGMA_PX

    striped = np.full((80, 80), 0.45, np.float32)   # hazy everywhere, with thin dense stripes
    striped[:, 10:70:8] = 1.0
    assert DENSITY_SIGMA_MM == pytest.approx(DENSITY_SIGMA_PX * 0.75)
    for pixel_mm in (0.75, 1.5):
        got = SegPredictor(Dense(), crop_to_lung=False).predict([striped], pixel_mm=pixel_mm)[0].labels
        want = split_by_density(np.ones((80, 80), np.uint8), striped, sigma_px=DENSITY_SIGMA_MM / pixel_mm)
        np.testing.assert_array_equal(got, want)
    coarse = SegPredictor(Dense(), crop_to_lung=False).predict([striped], pixel_mm=1.5)[0].labels
    fine = SegPredictor(Dense(), crop_to_lung=False).predict([striped])[0].labels
    assert (coarse == 2).sum() > (fine == 2).sum()   # less smoothing keeps more of the stripes dense


def test_pseudo_labels_are_lung_box_crops_labelled_like_the_teacher(tmp_path, capsys):
    from covidct.data.segmentation import SegFolder
    from covidct.engine.infer import SegPredictor
    from covidct.engine.pseudolabel import write_pseudo_labels
    from covidct.errors import CovidctError

    src = tmp_path / "unlabelled"
    src.mkdir()
    image = np.zeros((200, 200), np.uint8)
    image[60:140, 50:150] = 178          # the lungs (0.7): 80 x 100 px
    image[90:110, 90:110] = 255          # a lesion (GGO for the stand-in teacher): 400 px
    Image.fromarray(image).save(src / "a.png")
    Image.fromarray(np.zeros((200, 200), np.uint8)).save(src / "no_lungs.png")
    teacher = SegPredictor(_ThresholdNet(), crop_to_lung=False, density_classes=False)
    from covidct.data.classification import ClsRecord

    sources = [("a.png", ClsRecord(src / "a.png", "COVID")), ("no_lungs.png", ClsRecord(src / "no_lungs.png", "NonCOVID"))]
    out = tmp_path / "pseudo"
    summary = write_pseudo_labels(teacher, sources, out, info={"source": str(src)}, progress=False)
    assert summary["n_written"] == 1 and summary["n_skipped"] == 1
    sample = SegFolder(out)[0]
    h, w = sample.image.shape
    assert 80 <= h <= 92 and 100 <= w <= 112          # the lung box (+3 % per side), not the whole slice
    assert 250 < (sample.labels == 1).sum() < 600 and 0.7 < sample.lung.mean() < 0.9
    with open(out / "manifest.csv") as fh:
        row = next(csv.DictReader(fh))
    assert row["source"] == "a.png" and row["source_label"] == "COVID" and float(row["lesion_percent_of_lung"]) > 2
    assert "not for diagnosis" in Image.open(out / row["masks4"]).text["Disclaimer"]
    with pytest.raises(CovidctError, match="not empty"):
        write_pseudo_labels(teacher, sources, out, info={}, progress=False)
    # nothing found: an error, and no folder (not even a temporary one) is left behind
    with pytest.raises(CovidctError, match="none of its 1 slices"):
        write_pseudo_labels(teacher, sources[1:], tmp_path / "none", info={"source": str(src)}, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pseudo", "unlabelled"]
    assert main(["pseudolabel", "--data", str(tmp_path / "missing"), "-o", str(tmp_path / "x")]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_repeat_first_repeats_the_labelled_training_slices(tmp_path, seg_folder):
    from conftest import make_seg_folder

    extra = make_seg_folder(tmp_path / "extra", n=3, seed=1)
    assert main(["train", "seg", "--data", str(seg_folder), "--data", str(extra), "--repeat-first", "3",
                 "--warmup-epochs", "0.5", "--encoder", "resnet18", "--random-init", "--input-size", "48",
                 "--decoder-channels", "32,16,16,8,8", "--epochs", "1", "--batch-size", "2", "--folds", "3",
                 "--fold", "0", "-o", str(tmp_path / "m.pt")]) == 0
    config = json.loads((tmp_path / "m_run" / "config.json").read_text())
    n = len(list((seg_folder / "images").iterdir()))
    n_extra = 3 - sum(1 for i in config["val_ids"] if int(i) < 3)  # the extra folder shares slice ids 0-2
    assert config["train"]["data"][:3] == [str(seg_folder)] * 3 and config["train"]["warmup_epochs"] == 0.5
    assert config["n_train"] == 3 * (n - config["n_val"]) + n_extra


def test_effusion_label_set_trains_a_binary_effusion_model(tmp_path, seg_folder):
    from conftest import make_seg_folder
    from covidct.data.segmentation import SegFolder
    from covidct.data.transforms import seg_train_transform
    from covidct.engine.train_seg import LABEL_SETS, _Augmented

    sample = SegFolder(seg_folder)[0]
    assert (sample.labels == 3).any() and (sample.labels == 1).any()
    ds = _Augmented([sample], seg_train_transform(48, elastic=False, seed=0), LABEL_SETS["effusion"])
    ds.transform = lambda image, masks: {"image": image, "masks": masks}   # no augmentation: compare pixels
    _, labels, _, _ = ds[0]
    np.testing.assert_array_equal(labels.numpy(), (sample.labels == 3).astype(np.int64))
    out = tmp_path / "eff.pt"
    train_seg(_tiny(seg_folder, labels="effusion", lung_head=False, epochs=1), out, progress=False)
    payload = read_checkpoint(out)
    assert payload["classes"] == ["background", "effusion"]
    assert payload["metrics"]["validation"]["dice"]["effusion"] is not None
    no_effusion = make_seg_folder(tmp_path / "plain", masks4=False)
    with pytest.raises(CovidctError, match="effusion labels"):
        train_seg(_tiny(no_effusion, labels="effusion", lung_head=False, epochs=1), tmp_path / "x.pt", progress=False)


def _bias_effusion(net, value: float) -> None:
    """Make a seg network's effusion logit ``value`` everywhere above the others (its last conv's bias)."""
    head = net.net.segmentation_head[0]
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[net.config.lesion_classes.index("effusion")] = value


def test_effusion_companion_travels_in_the_checkpoint_and_decides_effusion(tmp_path):
    from covidct.engine.infer import SegPredictor
    from covidct.models import SegModelConfig, build_seg_model, save_checkpoint
    from covidct.models.checkpoint import attach_companion
    from covidct.models.registry import load_seg_model

    torch.manual_seed(0)
    main_cfg = SegModelConfig(encoder="resnet18", decoder_channels=(16, 16, 8, 8, 8), input_size=32,
                              lesion_classes=("background", "ggo", "consolidation"))
    main_net = build_seg_model(main_cfg)
    main_path = save_checkpoint(tmp_path / "main.pt", task="seg", config=main_cfg.to_dict(),
                                state_dict=main_net.state_dict(), classes=[*main_cfg.lesion_classes, "lung"])
    eff_cfg = SegModelConfig(encoder="resnet18", decoder_channels=(16, 16, 8, 8, 8), input_size=48,
                             lesion_classes=("background", "effusion"), lung_head=False)
    images = [np.random.default_rng(i).random((40 + 8 * i, 44)).astype(np.float32) for i in range(3)]
    alone = [p.labels for p in SegPredictor(load_seg_model(main_path)[0], crop_to_lung=False).predict(images)]
    for value, expect_all_effusion in ((-30.0, False), (30.0, True)):
        eff_net = build_seg_model(eff_cfg)
        _bias_effusion(eff_net, value)
        eff_path = save_checkpoint(tmp_path / "eff.pt", task="seg", config=eff_cfg.to_dict(), state_dict=eff_net.state_dict())
        both = attach_companion(main_path, eff_path, output=tmp_path / "both.pt")
        model, _ = load_seg_model(both)
        assert set(model.companions) == {"effusion"}
        predictor = SegPredictor(model, crop_to_lung=False)
        assert predictor.predicts_effusion and not SegPredictor(model, effusion_model=None).predicts_effusion
        # the folded copy of the main network refers to the companions instead of copying them
        assert predictor.model is not model and predictor.model.companions is model.companions
        for pred, own in zip(predictor.predict(images), alone):
            np.testing.assert_allclose(pred.probs.sum(axis=0), 1.0, atol=1e-5)
            if expect_all_effusion:
                assert (pred.labels == 3).all() and pred.probs[3].min() > 0.99
            else:   # effusion ruled out everywhere: the main network's labels, unchanged
                np.testing.assert_array_equal(pred.labels, own)
    with pytest.raises(CovidctError, match="does not predict effusion"):
        attach_companion(main_path, main_path, output=tmp_path / "bad.pt")
    assert not (tmp_path / "bad.pt").exists()


def test_attach_cli_stores_the_companion_and_lists_it(tiny_seg_model, tmp_path, capsys):
    from covidct.models.registry import model_entry

    out = tmp_path / "with_effusion.pt"
    assert main(["attach", "--model", str(tiny_seg_model), "--effusion", str(tiny_seg_model), "-o", str(out)]) == 0
    entry = model_entry(out)
    assert entry["companions"]["effusion"]["classes"] == read_checkpoint(tiny_seg_model)["classes"]
    assert "companions" not in model_entry(tiny_seg_model)     # the input file is unchanged
    capsys.readouterr()
    assert main(["attach", "--model", str(tiny_seg_model), "--effusion", str(tmp_path / "missing.pt"),
                 "-o", str(tmp_path / "x.pt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing.pt" in err[0] and not (tmp_path / "x.pt").exists()


def test_attach_takes_the_companion_a_file_carries(tiny_seg_model, tmp_path):
    """``attach --effusion FILE`` with a FILE that carries an effusion companion stores that companion (the
    network deciding effusion in FILE), not FILE's main network: the shipped pair's companion can be moved
    onto a retrained main network unchanged."""
    from covidct.models import SegModelConfig, build_seg_model, save_checkpoint

    torch.manual_seed(1)
    cfg = SegModelConfig(encoder="resnet18", decoder_channels=(32, 16, 16, 8, 8), input_size=64)
    other = save_checkpoint(tmp_path / "other.pt", task="seg", config=cfg.to_dict(),
                            state_dict=build_seg_model(cfg).state_dict(), classes=[*cfg.lesion_classes, "lung"],
                            input_size=64)
    pair = tmp_path / "pair.pt"                   # main: other, companion: tiny
    assert main(["attach", "--model", str(other), "--effusion", str(tiny_seg_model), "-o", str(pair)]) == 0
    moved = tmp_path / "moved.pt"                 # main: tiny, companion taken from the pair
    assert main(["attach", "--model", str(tiny_seg_model), "--effusion", str(pair), "-o", str(moved)]) == 0
    companion = read_checkpoint(moved)["companions"]["effusion"]
    tiny, other_state = read_checkpoint(tiny_seg_model)["state_dict"], read_checkpoint(other)["state_dict"]
    differs = [k for k in tiny if not torch.equal(tiny[k], other_state[k])]
    assert differs and all(torch.equal(companion["state_dict"][k], tiny[k]) for k in differs)
    assert "companions" not in companion


def _phantom_slice(size: int = 96) -> tuple[np.ndarray, np.ndarray]:
    """A CT-like slice in [0, 1] (grey body, bright rim, two dark lungs) and its lung mask."""
    yy, xx = np.mgrid[:size, :size] / size
    body = ((yy - 0.5) / 0.45) ** 2 + ((xx - 0.5) / 0.48) ** 2 < 1
    lung = (((yy - 0.5) / 0.3) ** 2 + ((xx - 0.3) / 0.14) ** 2 < 1) | (((yy - 0.5) / 0.3) ** 2 + ((xx - 0.7) / 0.14) ** 2 < 1)
    image = np.where(body, 0.8, 0.1).astype(np.float32)
    image[lung] = 0.2 + 0.1 * np.random.default_rng(0).random(int(lung.sum()))
    return image, lung


def test_is_lung_masked_tells_slices_black_outside_their_lungs():
    from scipy import ndimage

    from covidct.data.segmentation import is_lung_masked

    image, lung = _phantom_slice()
    assert not is_lung_masked(image, lung)                              # a framed CT slice: body around the lungs
    masked = ndimage.gaussian_filter(np.where(lung, image, 0.0), 1.5)   # MedSeg's way: blacked out, then blurred
    masked[masked < 1 / 255] = 0.0                                      # 8-bit black
    assert is_lung_masked(masked, lung)
    assert is_lung_masked(masked, ndimage.binary_erosion(lung, iterations=3))   # a lung head that misses the edge
    mediastinal = np.where(lung, 0.0, image)                            # lungs black, body grey (mediastinal window)
    assert not is_lung_masked(mediastinal, lung)
    assert not is_lung_masked(mediastinal, ~lung)                       # ... even when the lung head marks the body
    assert not is_lung_masked(masked, None) and not is_lung_masked(masked, np.zeros_like(lung))
    # a lung field filling the slice leaves too little outside to tell
    filling = np.zeros_like(lung)
    filling[8:-8, 8:-8] = True
    assert not is_lung_masked(np.where(filling, masked, 0.0), filling)


def _biased_seg_net(cfg, *, lesion: str, lung_logit: float):
    """A seg network whose output is the same everywhere: ``lesion`` (a class name) and the lung logit."""
    from covidct.models import build_seg_model

    net = build_seg_model(cfg)
    head = net.net.segmentation_head[0]
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[cfg.lesion_classes.index(lesion)] = 10.0
        if cfg.lung_head:
            head.bias[len(cfg.lesion_classes)] = lung_logit
    return net


def test_lung_masked_companion_segments_the_slices_black_outside_their_lungs(tmp_path, monkeypatch, capsys):
    """A slice found black outside its lungs goes to the lung-masked companion instead of the main network,
    without the effusion companion; the others are the main pair's as before. ``attach``
    stores both roles."""
    import covidct.engine.infer as infer
    from covidct.engine.infer import SegPredictor
    from covidct.models import SegModelConfig, save_checkpoint
    from covidct.models.registry import load_seg_model, model_entry

    classes = ("background", "ggo", "consolidation", "effusion")
    cfg = SegModelConfig(encoder="resnet18", decoder_channels=(16, 16, 8, 8, 8), input_size=32, lesion_classes=classes)
    files = {}
    for name, lesion in (("main", "ggo"), ("masked", "consolidation"), ("eff", "effusion")):
        net = _biased_seg_net(cfg, lesion=lesion, lung_logit=10.0)
        files[name] = save_checkpoint(tmp_path / f"{name}.pt", task="seg", config=cfg.to_dict(),
                                      state_dict=net.state_dict(), classes=[*classes, "lung"])
    both = tmp_path / "both.pt"
    assert main(["attach", "--model", str(files["main"]), "--effusion", str(files["eff"]),
                 "--lung-masked", str(files["masked"]), "-o", str(both)]) == 0
    assert "lung-masked model masked.pt" in capsys.readouterr().out
    assert set(model_entry(both)["companions"]) == {"effusion", "lung_masked"}
    model, _ = load_seg_model(both)
    images = [np.full((40, 48), v, np.float32) for v in (0.5, 0.0, 0.7)]
    # the decision itself is tested above; here: slices whose every pixel is black count as lung-masked
    monkeypatch.setattr(infer, "is_lung_masked", lambda image, lung: bool(lung.any() and image.max() == 0))
    for kwargs in ({}, {"crop_to_lung": False}):
        preds = SegPredictor(model, density_classes=False, effusion_model=None, **kwargs).predict(images)
        assert [p.network for p in preds] == ["main", "lung_masked", "main"]
        assert (preds[0].labels == 1).all() and (preds[2].labels == 1).all()   # the main network: GGO
        assert (preds[1].labels == 2).all() and preds[1].lung.all()           # the lung-masked one: consolidation
        # with the effusion companion (everywhere effusion here): effusion on the slices the main network
        # segments; a routed slice is black outside its lungs, where effusion lies, so the companion does not run
        preds = SegPredictor(model, density_classes=False, **kwargs).predict(images)
        assert [p.network for p in preds] == ["main", "lung_masked", "main"]
        assert (preds[0].labels == 3).all() and (preds[2].labels == 3).all()
        assert (preds[1].labels == 2).all() and preds[1].probs[3].max() < 0.01
    alone = SegPredictor(model, density_classes=False, effusion_model=None, lung_masked_model=None).predict(images)
    assert [p.network for p in alone] == ["main"] * 3 and (alone[1].labels == 1).all()
    # a companion that cannot stand in for the main network is refused in one line, nothing written
    small = SegModelConfig(encoder="resnet18", decoder_channels=(16, 16, 8, 8, 8), input_size=32,
                           lesion_classes=("background", "ggo", "consolidation"))
    odd = save_checkpoint(tmp_path / "odd.pt", task="seg", config=small.to_dict(),
                          state_dict=_biased_seg_net(small, lesion="ggo", lung_logit=1.0).state_dict())
    for extra in (["--lung-masked", str(odd)], []):
        assert main(["attach", "--model", str(files["main"]), *extra, "-o", str(tmp_path / "bad.pt")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and not (tmp_path / "bad.pt").exists()
    main(["attach", "--model", str(files["main"]), "--effusion", str(files["eff"]), "--lung-masked", str(odd),
          "-o", str(tmp_path / "bad.pt")])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "odd.pt" in err[0] and "same lesion classes" in err[0]
    assert not (tmp_path / "bad.pt").exists()    # the effusion companion, which passed, was not written either
    # a main model without a lung head could never route a slice: refused, naming it
    headless = SegModelConfig(encoder="resnet18", decoder_channels=(16, 16, 8, 8, 8), input_size=32,
                              lesion_classes=classes, lung_head=False)
    blind = save_checkpoint(tmp_path / "blind.pt", task="seg", config=headless.to_dict(),
                            state_dict=_biased_seg_net(headless, lesion="ggo", lung_logit=1.0).state_dict())
    assert main(["attach", "--model", str(blind), "--lung-masked", str(files["masked"]), "-o",
                 str(tmp_path / "bad.pt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "blind.pt" in err[0] and "no lung head" in err[0] and not (tmp_path / "bad.pt").exists()


def test_encoder_starts_from_a_classifier_and_a_wrong_one_is_one_line(tmp_path, seg_folder, capsys):
    from covidct.models import SegModelConfig, build_seg_model, save_checkpoint
    from covidct.models.classification import ClsModelConfig, build_cls_model

    torch.manual_seed(0)
    cls = build_cls_model(ClsModelConfig(encoder="resnet18", input_size=48))
    cls_path = save_checkpoint(tmp_path / "cls.pt", task="cls", config=cls.config.to_dict(), state_dict=cls.state_dict())
    seg = build_seg_model(SegModelConfig(encoder="resnet18", decoder_channels=(16, 16, 8, 8, 8), input_size=48),
                          encoder_init=str(cls_path))
    for name in ("conv1.weight", "layer3.1.conv2.weight", "layer4.0.bn1.running_var"):
        torch.testing.assert_close(seg.net.encoder.state_dict()[name], cls.net.state_dict()[name])
    plain = build_seg_model(SegModelConfig(encoder="resnet18", decoder_channels=(16, 16, 8, 8, 8), input_size=48))
    assert not torch.equal(plain.net.encoder.conv1.weight, seg.net.encoder.conv1.weight)
    # the training config records the start; a model with another encoder is refused in one line
    _start_is_recorded_and_a_misfit_refused(tmp_path, seg_folder, capsys, "encoder_init", cls_path,
                                            ["--encoder", "resnet34"], "encoder resnet34")


def test_corruption_keeps_shape_and_range_and_changes_the_image():
    from covidct.engine.pretrain_seg import PretrainConfig, corrupt

    x = np.tile(np.linspace(0, 1, 64, dtype=np.float32), (64, 1))
    rng = np.random.default_rng(0)
    always = PretrainConfig(data=[], p_intensity=1.0, p_shuffle=1.0, p_paint=1.0)
    outs = [corrupt(x, rng, always) for _ in range(5)]
    assert all(o.shape == x.shape and o.dtype == np.float32 and 0 <= o.min() and o.max() <= 1 for o in outs)
    assert all(np.abs(o - x).mean() > 0.01 for o in outs)
    never = PretrainConfig(data=[], p_intensity=0.0, p_shuffle=0.0, p_paint=0.0)
    np.testing.assert_array_equal(corrupt(x, rng, never), x)


def test_pretrained_network_starts_segmentation_training(tmp_path, seg_folder, capsys):
    pre = tmp_path / "pre.pt"
    assert main(["pretrain", "seg", "--data", str(seg_folder / "images"), "--encoder", "resnet18", "--random-init",
                 "--decoder-channels", "32,16,16,8,8", "--input-size", "48", "--epochs", "2", "--batch-size", "2",
                 "-o", str(pre)]) == 0
    assert "pretrained on 6 images" in capsys.readouterr().out
    payload = read_checkpoint(pre)
    assert payload["task"] == "seg-pretrain" and payload["metrics"]["n_images"] == 6
    from covidct.engine.pretrain_seg import init_from_pretrained
    from covidct.models import SegModelConfig, build_seg_model

    seg = build_seg_model(SegModelConfig(encoder="resnet18", decoder_channels=(32, 16, 16, 8, 8), input_size=48))
    copied = init_from_pretrained(seg, pre)
    state = seg.state_dict()
    assert copied == len([k for k in state if not k.startswith("net.segmentation_head.")])
    for key in ("net.encoder.layer2.0.conv1.weight", "net.decoder.blocks.4.conv2.0.weight"):
        torch.testing.assert_close(state[key], payload["state_dict"][key].float())
    # training from it records the start; a network with other decoder channels is refused in one line
    _start_is_recorded_and_a_misfit_refused(tmp_path, seg_folder, capsys, "init", pre, ["--encoder", "resnet18"],
                                            "decoder_channels")


def test_trained_model_starts_fine_tuning(tmp_path, trained, capsys):
    """``--init`` with a trained segmentation model: a network of its classes starts as that model (head
    included: the same outputs), one of other classes gets all but the head; a misfit is one error line."""
    from covidct.engine.pretrain_seg import init_from_pretrained
    from covidct.models import SegModelConfig, build_seg_model, load_seg_model

    folder, source_path, _ = trained
    source, payload = load_seg_model(source_path)
    same = build_seg_model(SegModelConfig.from_dict(payload["config"]))
    assert init_from_pretrained(same, source_path) == len(same.state_dict())
    x = torch.rand(2, 1, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(same.eval()(x), source.eval()(x))
    classes = tuple(payload["config"]["lesion_classes"])
    other = build_seg_model(SegModelConfig.from_dict({**payload["config"], "lesion_classes": classes[:-1]}))
    head = [k for k in other.state_dict() if k.startswith("net.segmentation_head.")]
    assert head and init_from_pretrained(other, source_path) == len(other.state_dict()) - len(head)
    _start_is_recorded_and_a_misfit_refused(tmp_path, folder, capsys, "init", source_path, ["--encoder", "resnet18"],
                                            "decoder_channels")


def _start_is_recorded_and_a_misfit_refused(tmp_path, seg_folder, capsys, field: str, start, misfit_args: list[str],
                                            reason: str) -> None:
    """Training from ``start`` (config ``field``) records it; ``train seg`` with ``misfit_args`` (a network it does
    not fit) is one error line naming it and ``reason``, and leaves no model or run folder."""
    out = tmp_path / "m.pt"
    train_seg(_tiny(seg_folder, epochs=1, **{field: str(start)}), out, progress=False)
    payload = read_checkpoint(out)
    assert payload["train_config"][field] == str(start)
    # and names it with its checksum (a shipped start by its shipped name: test_models_name_shipped_starts)
    assert payload["starts"] == {field: {"name": str(Path(start).resolve()), "sha256": file_sha256(start)}}
    bad = tmp_path / "bad.pt"
    assert main(["train", "seg", "--data", str(seg_folder), *misfit_args, "--random-init", "--input-size", "48",
                 "--epochs", "1", "--batch-size", "2", f"--{field.replace('_', '-')}", str(start), "-o", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert str(start) in err and reason in err and len(err.splitlines()) == 1
    assert not bad.exists() and not (tmp_path / "bad_run").exists()


def test_pretrain_under_torchrun_is_refused_in_one_line(tmp_path, seg_folder, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    out = tmp_path / "pre.pt"
    assert main(["pretrain", "seg", "--data", str(seg_folder / "images"), "--encoder", "resnet18", "--random-init",
                 "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "without torchrun" in err and len(err.splitlines()) == 1 and not out.exists()


def test_train_limit_draws_fewer_training_slices_and_keeps_the_validation(tmp_path):
    """Learning curves: ``--train-limit N`` trains on a seeded draw of N training slices of the first folder;
    the validation fold, the other folders and the draw for another seed are as they should be."""
    from conftest import make_seg_folder

    from covidct.engine.train_seg import SegTrainConfig, load_training_data
    from covidct.errors import CovidctError

    first, other = make_seg_folder(tmp_path / "a", n=10), make_seg_folder(tmp_path / "b", n=3, seed=1)
    base = dict(data=[str(first), str(other)], folds=5, fold=1)
    full_train, full_val = load_training_data(SegTrainConfig(**base))
    train, val = load_training_data(SegTrainConfig(**base, train_limit=3))
    assert [s.id for s in val] == [s.id for s in full_val]
    from_first = [s for s in train if s.image_path.parent.parent == first]
    assert len(from_first) == 3 and {s.id for s in from_first} <= {s.id for s in full_train}
    assert len(train) - 3 == len(full_train) - sum(s.image_path.parent.parent == first for s in full_train)
    again, _ = load_training_data(SegTrainConfig(**base, train_limit=3))
    assert [s.id for s in again] == [s.id for s in train]                 # seeded
    with pytest.raises(CovidctError, match="--train-limit must be 1..8"):
        load_training_data(SegTrainConfig(**base, train_limit=9))


def test_lung_crop_cuts_wide_frames_to_their_lung_box_like_the_second_pass(tmp_path):
    """``--lung-crop``: training slices framed wider than their lungs (MedSeg 512² frames) are cut to their
    reference lung box (+3 % per side), the box the predictor's second pass takes; slices framed like the
    crops, the validation slices and a slice without lungs stay as they are."""
    from pathlib import Path

    from conftest import make_seg_folder
    from PIL import Image

    from covidct.data.segmentation import SegSample, crop_to_lung, lung_crop_box
    from covidct.engine.train_seg import SegTrainConfig, load_training_data

    crops = make_seg_folder(tmp_path / "crops", n=5)
    frames = tmp_path / "frames"                 # each crop pasted into a 3x larger black frame at (30, 50)
    for sub in ("images", "masks", "masks4", "lung"):
        (frames / sub).mkdir(parents=True)
        for p in sorted((crops / sub).iterdir()):
            a = np.asarray(Image.open(p))
            big = np.zeros((3 * a.shape[0], 3 * a.shape[1]), a.dtype)
            big[30:30 + a.shape[0], 50:50 + a.shape[1]] = a
            Image.fromarray(big).save(frames / sub / p.name)
    (frames / "manifest.csv").write_text((crops / "manifest.csv").read_text())
    base = dict(data=[str(crops), str(frames)], folds=5, fold=0)
    plain_train, plain_val = load_training_data(SegTrainConfig(**base))
    train, val = load_training_data(SegTrainConfig(**base, lung_crop=True))
    assert [s.image.shape for s in val] == [s.image.shape for s in plain_val]
    for before, after in zip(plain_train, train):
        assert before.id == after.id
        if before.image_path.parent.parent == crops:              # lungs fill the crop: unchanged
            assert np.array_equal(after.image, before.image) and after.labels.shape == before.labels.shape
            continue
        box = lung_crop_box(before.lung)
        rows = np.flatnonzero(before.lung.any(axis=1))
        h = before.lung.shape[0]
        assert box[0].start == rows[0] - (int(0.03 * h) + 1) and after.image.shape == before.image[box].shape
        assert after.image.shape[0] < h / 2
        for name in ("image", "labels", "lung"):                   # image and label maps cut alike
            assert np.array_equal(getattr(after, name), getattr(before, name)[box])
        assert after.labels.sum() == before.labels.sum()           # no lesion pixel lost
    no_lung = SegSample("x", Path("x.png"), np.zeros((64, 64), np.float32), np.zeros((64, 64), np.uint8), None, False)
    assert crop_to_lung(no_lung) is no_lung


def test_binary_infection_masks_are_scored_as_infection_only(tmp_path, seg_folder, tiny_seg_model, capsys):
    """A masks/ folder of 0 / 255 files (Inf-Net's binary LungInfection GT) is read as infection without a type:
    `evaluate seg` scores infection exactly as on the class-index masks it came from, GGO / consolidation are
    null and a note says why; training refuses it in one line, leaving no output (lesion models: test_lesions)."""
    from conftest import binary_mask_copy
    from covidct.data.segmentation import SegFolder

    binary = binary_mask_copy(seg_folder, tmp_path / "binary")
    folder = SegFolder(binary)
    assert folder.binary and not SegFolder(seg_folder).binary
    sample = folder[0]
    assert not sample.has_types and set(np.unique(sample.labels)) <= {0, 1}
    typed = SegFolder(seg_folder)[0]
    np.testing.assert_array_equal(sample.labels, np.isin(typed.labels, (1, 2)).astype(np.uint8))

    outs = {}
    for name, data in (("typed", seg_folder), ("binary", binary)):
        js = tmp_path / f"{name}.json"
        assert main(["evaluate", "seg", "--model", str(tiny_seg_model), "--data", str(data), "--json", str(js),
                     "--precision", "fp32"]) == 0
        outs[name] = json.loads(js.read_text())
    printed = capsys.readouterr().out
    assert printed.count("holds binary infection masks") == 1
    typed_res, bin_res = outs["typed"], outs["binary"]
    assert bin_res["binary_masks"] is True and typed_res["binary_masks"] is False
    assert bin_res["dice"]["ggo"] is None and bin_res["dice"]["consolidation"] is None
    assert typed_res["dice"]["ggo"] is not None
    assert bin_res["dice"]["infection"] == typed_res["dice"]["infection"] > 0
    assert bin_res["rand_error"] == typed_res["rand_error"]
    assert bin_res["dice"]["lung"] == typed_res["dice"]["lung"]

    out = tmp_path / "m.pt"
    assert main(["train", "seg", "--data", str(binary), "--encoder", "resnet18", "--random-init", "--input-size", "48",
                 "--epochs", "1", "--batch-size", "2", "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(binary / "masks") in err and "binary infection masks" in err
    assert not out.exists() and not (tmp_path / "m_run").exists()
