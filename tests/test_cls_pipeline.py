"""Slice classifier: tiny training on generated images, evaluation through the CLI on several layouts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from covidct.cli import main
from covidct.engine.train_cls import ClsTrainConfig, fit_temperature, train_cls
from covidct.metrics import MEASURES
from covidct.models.classification import ClsModelConfig, build_cls_model
from covidct.models.registry import load_cls_model


def _make_split_folder(root: Path, n: int = 12, size: int = 40) -> Path:
    """COVID images carry a bright blob; NonCOVID do not. split.csv with train/val/test."""
    rng = np.random.default_rng(0)
    rows = ["path,label,split"]
    for i in range(n):
        for label in ("COVID", "NonCOVID"):
            img = rng.normal(60, 10, (size, size + 6))
            if label == "COVID":
                y, x = rng.integers(8, size - 8, 2)
                img[y - 5:y + 5, x - 5:x + 5] = 220
            sub = root / label
            sub.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).convert("RGB").save(sub / f"{i}.png")
            split = "train" if i < n - 4 else ("val" if i < n - 2 else "test")
            rows.append(f"{label}/{i}.png,{label},{split}")
    (root / "split.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture(scope="module")
def trained_cls(tmp_path_factory):
    root = tmp_path_factory.mktemp("cls")
    data = _make_split_folder(root / "data")
    cfg = ClsTrainConfig(data=str(data), encoder="resnet18", init="random", input_size=32, epochs=4, batch_size=8, lr=3e-3)
    result = train_cls(cfg, root / "cls.pt", progress=False)
    return data, root / "cls.pt", result


def test_train_cls_saves_self_describing_model(trained_cls):
    data, path, result = trained_cls
    model, payload = load_cls_model(path)
    assert payload["task"] == "cls" and payload["classes"] == ["NonCOVID", "COVID"]
    assert payload["temperature"] > 0 and payload["input_size"] == 32
    assert model.config.encoder == "resnet18"
    assert {"accuracy", "auc", "f1", "ece"} <= set(payload["metrics"]["validation_calibrated"])
    assert (path.with_name("cls_run") / "log.csv").exists()


def test_evaluate_cls_cli_json_and_plot(trained_cls, tmp_path, capsys):
    data, path, _ = trained_cls
    js, png = tmp_path / "e.json", tmp_path / "cm.png"
    assert main(["evaluate", "cls", "--model", str(path), "--data", str(data), "--split", "test",
                 "--json", str(js), "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "Evaluation took" in out and "overall accuracy" in out and "ROC AUC" in out
    res = json.loads(js.read_text())
    assert res["n_images"] == 4 and res["classes"] == ["NonCOVID", "COVID"]
    assert np.array(res["confusion"]).sum() == 4 and isinstance(res["auc"], float)
    assert set(res["per_class"]["COVID"]) == set(MEASURES) and "images_per_second" in res
    assert png.stat().st_size > 1000 and "not for diagnosis" in Image.open(png).text["Disclaimer"]


def test_evaluate_cls_ensemble_and_tta(trained_cls, tmp_path):
    from covidct.engine.evaluate_cls import evaluate_cls

    data, path, _ = trained_cls
    single = evaluate_cls(path, data, split="test", progress=False)
    # a model averaged with itself gives its own probabilities; mirrored images change them
    twice = evaluate_cls([path, path], data, split="test", progress=False)
    np.testing.assert_allclose(twice["_probabilities"], single["_probabilities"], atol=1e-6)
    assert twice["model"] == f"{path.name},{path.name}"
    flipped = evaluate_cls(path, data, split="test", progress=False, tta=True)
    assert flipped["tta"] and not np.allclose(flipped["_probabilities"], single["_probabilities"])
    np.testing.assert_allclose(flipped["_probabilities"].sum(axis=1), 1.0, atol=1e-5)
    assert main(["evaluate", "cls", "--model", str(path), "--model", str(path), "--tta", "--data", str(data),
                 "--split", "test", "--json", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["tta"] is True


def test_ensemble_model_file_is_the_mean_of_its_members(trained_cls, tmp_path, capsys):
    """`covidct ensemble` writes one model file that evaluates like `evaluate cls --model A --model B`,
    stores its validation scores and refuses a member that changed."""
    import shutil

    from covidct.engine.evaluate_cls import evaluate_cls
    from covidct.engine.train_cls import ClsTrainConfig, train_cls
    from covidct.models.registry import load_cls_model

    data, path, _ = trained_cls
    other = tmp_path / "other.pt"  # a second member with another input size
    train_cls(ClsTrainConfig(data=str(data), encoder="resnet18", init="random", input_size=40, epochs=1, batch_size=8,
                             seed=1), other, progress=False)
    member = tmp_path / "a.pt"
    shutil.copy(path, member)
    ens = tmp_path / "ens.pt"
    assert main(["ensemble", "--model", str(member), "--model", str(other), "--data", str(data), "-o", str(ens)]) == 0
    model, payload = load_cls_model(ens)
    assert model.config.input_size == 40 and payload["metrics"]["validation"]["n_images"] == 4
    assert payload["temperature"] > 0 and "ece" in payload["metrics"]["validation_calibrated"]
    assert payload["metrics"]["members"] == [str(member.resolve()), str(other.resolve())]
    as_file = evaluate_cls(ens, data, split="test", progress=False)
    as_list = evaluate_cls([member, other], data, split="test", progress=False)
    # undo the ensemble's own temperature to compare with the plain mean of the members
    sharpened = np.exp(np.log(as_list["_probabilities"]) / payload["temperature"])
    as_list["_probabilities"] = sharpened / sharpened.sum(axis=1, keepdims=True)
    # members see the ensemble's 40 px input resized to their own size: close to, not equal to, direct resizing
    np.testing.assert_allclose(as_file["_probabilities"], as_list["_probabilities"], atol=0.05)
    np.testing.assert_allclose(as_file["_probabilities"].sum(axis=1), 1.0, atol=1e-5)
    capsys.readouterr()
    shutil.copy(other, member)  # the member file changes after the ensemble was made
    assert main(["evaluate", "cls", "--model", str(ens), "--data", str(data), "--split", "test"]) == 2
    err = capsys.readouterr().err.strip()
    assert "changed since the ensemble was made" in err and len(err.splitlines()) == 1
    assert main(["ensemble", "--model", str(other), "-o", str(tmp_path / "one.pt")]) == 2
    # members must answer the same classes
    from covidct.models.checkpoint import read_checkpoint, save_checkpoint

    three = read_checkpoint(other)
    save_checkpoint(tmp_path / "three.pt", **{**{k: three[k] for k in ("task", "config", "state_dict", "input_size")},
                                             "classes": ["Control", "Common pneumonia", "COVID-19"]})
    capsys.readouterr()
    assert main(["ensemble", "--model", str(other), "--model", str(tmp_path / "three.pt"), "-o",
                 str(tmp_path / "mixed.pt")]) == 2
    err = capsys.readouterr().err.strip()
    assert "three.pt" in err and "differ" in err and not (tmp_path / "mixed.pt").exists()


def test_k_fold_training_and_out_of_fold_estimate(trained_cls, tmp_path, capsys):
    """`train cls --folds K --fold k` pools train + val (never test) into folds that hold every image
    out once; the out-of-fold estimate scores each image with the model that held it out, averages
    several recipes on the same folds, and refuses models whose folds do not fit the data."""
    import shutil

    from covidct.data.classification import load_records
    from covidct.engine.evaluate_cls import evaluate_out_of_fold, evaluate_records
    from covidct.errors import CovidctError
    from covidct.models.checkpoint import read_checkpoint

    data = tmp_path / "data"
    shutil.copytree(trained_cls[0], data)
    paths = [tmp_path / f"f{k}.pt" for k in range(2)]
    for k, path in enumerate(paths):
        assert main(["train", "cls", "--data", str(data), "--encoder", "resnet18", "--init", "random", "--input-size",
                     "32", "--epochs", "1", "--batch-size", "4", "--folds", "2", "--fold", str(k), "-o", str(path)]) == 0
    held = [read_checkpoint(p)["validation_files"] for p in paths]
    rows = [line.split(",") for line in (data / "split.csv").read_text().splitlines()[1:]]
    pool = sorted(r[0] for r in rows if r[2] != "test")
    assert sorted(held[0] + held[1]) == pool and not set(held[0]) & set(held[1])
    capsys.readouterr()
    one = evaluate_out_of_fold(paths, data, progress=False)
    assert one["n_images"] == len(pool) == 20 and one["models_per_image"] == 1
    # each image's probability is its own fold model's, with that model's temperature (rows sorted by path)
    model, payload = load_cls_model(paths[1])
    val = [r for r in load_records(data, classes=model.config.classes) if r.path.relative_to(data).as_posix() in held[1]]
    direct = evaluate_records(model, val, temperature=payload["temperature"], progress=False)["_probabilities"]
    rows_of_val = [pool.index(r.path.relative_to(data).as_posix()) for r in val]
    np.testing.assert_allclose(one["_probabilities"][rows_of_val], direct, atol=1e-6)
    two = evaluate_out_of_fold([*paths, *paths], data, progress=False)  # two recipes (here the same) averaged
    assert two["models_per_image"] == 2 and np.allclose(two["_probabilities"], one["_probabilities"], atol=1e-6)
    with pytest.raises(CovidctError, match="equally often"):
        evaluate_out_of_fold([*paths, paths[0]], data, progress=False)
    # the ensemble of the fold models, calibrated on their out-of-fold predictions (temperature + offsets)
    from covidct.engine.evaluate_cls import evaluate_cls

    ens = tmp_path / "ens.pt"
    assert main(["ensemble", "--model", str(paths[0]), "--model", str(paths[1]), "--data", str(data), "--out-of-fold",
                 "-o", str(ens)]) == 0
    model, payload = load_cls_model(ens)
    cv = payload["metrics"]["cross_validation"]
    assert cv["n_images"] == 20 and payload["metrics"]["cross_validation_uncalibrated"]["auc"] == pytest.approx(one["auc"])
    offsets = model.config.logit_offsets
    assert len(offsets) == 2 and offsets[0] == 0.0
    members = evaluate_cls([*paths], data, split="test", progress=False)["_probabilities"]  # plain mean
    logits = (np.log(members) + np.array(offsets)) / payload["temperature"]
    expected = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(evaluate_cls(ens, data, split="test", progress=False)["_probabilities"], expected, atol=0.05)
    assert main(["ensemble", "--model", str(paths[0]), "--model", str(paths[1]), "--out-of-fold", "-o", str(ens)]) == 2
    (data / "split.csv").write_text("\n".join(["path,label,split"] + [",".join(r) for r in rows[2:]]) + "\n")
    with pytest.raises(CovidctError, match="held-out images are not those"):
        evaluate_out_of_fold(paths, data, progress=False)
    assert main(["train", "cls", "--data", str(data), "--folds", "2", "--fold", "2", "-o", str(tmp_path / "x.pt")]) == 2
    assert "--fold in 0..1" in capsys.readouterr().err and not (tmp_path / "x.pt").exists()


def test_ensemble_of_fold_models_in_a_weights_subfolder(trained_cls, tmp_path, monkeypatch):
    """Fold models shipped in a sub-folder of the weights folder are named relative to it by the
    ensemble (so the package can move), resolve by that name, and are not listed as models."""
    import shutil

    from covidct.engine.evaluate_cls import save_ensemble
    from covidct.models import registry

    weights = tmp_path / "weights"
    (weights / "cv").mkdir(parents=True)
    for k in range(2):
        shutil.copy(trained_cls[1], weights / "cv" / f"m{k}.pt")
    monkeypatch.setattr(registry, "WEIGHTS_DIR", weights.resolve())
    save_ensemble([weights / "cv" / "m0.pt", "cv/m1"], weights / "ens.pt", progress=False)
    model, payload = registry.load_cls_model("ens")
    assert payload["metrics"]["members"] == ["cv/m0", "cv/m1"] and len(model.members) == 2
    assert [m["name"] for m in registry.list_models()] == ["ens"]


def test_classify_prints_and_writes_slice_probabilities(trained_cls, tmp_path, capsys):
    from covidct.engine.evaluate_cls import evaluate_cls

    data, path, _ = trained_cls
    images = [data / "COVID" / "10.png", data / "NonCOVID" / "10.png"]  # the test split
    js = tmp_path / "c.json"
    assert main(["classify", *map(str, images), "--model", str(path), "--json", str(js)]) == 0
    out = capsys.readouterr().out
    assert "research software" in out.lower() and out.count("[0]:") == 2
    res = json.loads(js.read_text())
    assert res["classes"] == ["NonCOVID", "COVID"] and len(res["slices"]) == 2 and res["notes"] == []
    # a colour picture is classified too, with a note that it is probably no CT slice
    photo = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(photo)
    assert main(["classify", str(photo), "--model", str(path), "--json", str(tmp_path / "p.json")]) == 0
    notes = json.loads((tmp_path / "p.json").read_text())["notes"]
    assert [n["input"] for n in notes] == [str(photo)] and "while CT slices are grey" in notes[0]["note"]
    assert f"note: {photo}: {notes[0]['note']}" in capsys.readouterr().out
    # the same calibrated probabilities as `evaluate cls` gives for these images
    from covidct.data.classification import load_records

    ref = evaluate_cls(path, data, split="test", progress=False)
    order = [str(r.path) for r in load_records(data, split="test")]
    for row in res["slices"]:
        assert row["probabilities"]["COVID"] == pytest.approx(ref["_probabilities"][order.index(row["input"])][1], abs=1e-5)
        assert row["label"] == max(row["probabilities"], key=row["probabilities"].get)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    assert main(["classify", str(bad), "--model", str(path), "--json", str(tmp_path / "d.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert "bad.png" in err and len(err.splitlines()) == 1 and not (tmp_path / "d.json").exists()


def test_evaluate_cls_folder_per_class_and_covidx(trained_cls, tmp_path, capsys):
    _, path, _ = trained_cls
    rng = np.random.default_rng(1)
    for name in ("NCP_1_1_0001.png", "Normal_2_1_0001.png", "CP_3_1_0001.png"):
        Image.fromarray(rng.integers(0, 255, (30, 30), dtype=np.uint8)).save(tmp_path / name)
    js = tmp_path / "x.json"
    assert main(["evaluate", "cls", "--model", str(path), "--data", str(tmp_path), "--json", str(js)]) == 0
    res = json.loads(js.read_text())
    assert res["n_images"] == 3  # COVIDx-CT names mapped onto the binary classes
    assert np.array(res["confusion"]).sum(axis=1).tolist() == [2, 1]


def test_init_from_segmentation_encoder(tmp_path, capsys):
    from covidct.models import SegModelConfig, build_seg_model, save_checkpoint

    seg = build_seg_model(SegModelConfig(encoder="resnet18", decoder_channels=(16, 16, 8, 8, 8), input_size=32))
    seg_path = save_checkpoint(tmp_path / "seg.pt", task="seg", config=seg.config.to_dict(), state_dict=seg.state_dict())
    cls = build_cls_model(ClsModelConfig(encoder="resnet18", input_size=32), init=str(seg_path))
    torch.testing.assert_close(cls.net.layer1[0].conv1.weight, seg.net.encoder.layer1[0].conv1.weight)
    from covidct.errors import InputError

    with pytest.raises(InputError, match="it is a 'seg' model with encoder resnet18"):
        build_cls_model(ClsModelConfig(encoder="resnet34"), init=str(seg_path))
    # train cls --init: the start named in the classifier's checkpoint with its checksum
    from covidct.models.checkpoint import file_sha256, read_checkpoint

    data = _make_split_folder(tmp_path / "data", n=8, size=32)
    out = tmp_path / "c.pt"
    assert main(["train", "cls", "--data", str(data), "--encoder", "resnet18", "--init", str(seg_path),
                 "--input-size", "32", "--epochs", "1", "--batch-size", "4", "-o", str(out)]) == 0
    payload = read_checkpoint(out)
    assert payload["starts"] == {"init": {"name": str(seg_path.resolve()), "sha256": file_sha256(seg_path)}}
    # a classifier started from ImageNet or at random has no start file
    assert main(["train", "cls", "--data", str(data), "--encoder", "resnet18", "--init", "random",
                 "--input-size", "32", "--epochs", "1", "--batch-size", "4", "-o", str(tmp_path / "r.pt")]) == 0
    assert read_checkpoint(tmp_path / "r.pt")["starts"] == {}
    # an --init that is no segmentation model: one error line before any image is loaded, nothing written
    capsys.readouterr()
    assert main(["train", "cls", "--data", str(data), "--encoder", "resnet18", "--init", str(tmp_path / "r.pt"),
                 "--input-size", "32", "--epochs", "1", "--batch-size", "4", "-o", str(tmp_path / "bad.pt")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and "r.pt" in err and "it is a 'cls' model" in err and "load" not in err
    assert not (tmp_path / "bad.pt").exists() and not (tmp_path / "bad_run").exists()


def test_temperature_and_offsets_undo_a_scale_and_a_shift():
    from covidct.engine.train_cls import fit_temperature_and_bias

    rng = np.random.default_rng(0)
    y = torch.as_tensor(rng.integers(0, 2, 4000))
    true_logit = torch.as_tensor(rng.normal(0, 1.5, 4000)).float()
    y = (torch.rand(4000, generator=torch.Generator().manual_seed(1)) < torch.sigmoid(true_logit)).long()
    seen = 3.0 * true_logit - 2.0  # over-confident and shifted towards class 0
    t, c = fit_temperature_and_bias(torch.stack([torch.zeros(4000), seen], dim=1), y)
    assert t == pytest.approx(3.0, rel=0.15) and c[0] == 0.0 and c[1] == pytest.approx(2.0, abs=0.4)


def test_temperature_scaling_softens_overconfidence():
    torch.manual_seed(0)
    labels = torch.randint(0, 2, (200,))
    logits = torch.randn(200, 2) * 8  # confident and mostly wrong-ish: should get T > 1
    assert fit_temperature(logits, labels) > 1.5


def test_explain_and_weak_masks(trained_cls, tmp_path, capsys, seg_folder):
    data, path, _ = trained_cls
    img = data / "COVID" / "0.png"
    out = tmp_path / "cam.png"
    assert main(["explain", str(img), "-o", str(out), "--model", str(path)]) == 0
    assert Image.open(out).mode == "RGB" and "COVID" in capsys.readouterr().out
    assert main(["explain", str(img), "-o", str(out), "--model", str(path), "--class", "Flu"]) == 2
    js = tmp_path / "w.json"
    assert main(["evaluate", "cam", "--model", str(path), "--data", str(seg_folder), "--json", str(js)]) == 0
    res = json.loads(js.read_text())
    assert res["n_images"] == 6 and 0.0 <= res["dice"]["infection"] <= 1.0
    assert main(["evaluate", "cam", "--model", str(path), "--data", str(seg_folder), "--threshold", "0", "--density",
                 "--json", str(js)]) == 0
    prior = json.loads(js.read_text())
    assert prior["density"] is True and prior["n_images"] == 6 and 0.0 <= prior["dice"]["infection"] <= 1.0


def test_weak_mask_density_refinement_keeps_only_pixels_denser_than_aerated_lung():
    from covidct.engine.explain import GGO_FLOOR, cam_to_mask
    from covidct.io.window import PRESETS

    assert GGO_FLOOR * PRESETS["model"].width + PRESETS["model"].low == pytest.approx(-700.0)
    image = np.full((60, 60), 0.2, np.float32)        # aerated lung (about -860 HU)
    image[10:30, 10:30] = 0.45                         # ground glass (about -490 HU)
    cam = np.ones((60, 60), np.float32)                # the CAM covers everything
    lung = np.zeros((60, 60), bool)
    lung[5:55, 5:55] = True
    mask = cam_to_mask(cam, threshold=0.5, region=lung, image01=image)
    assert mask[14:26, 14:26].all() and not mask[40:50, 40:50].any() and not mask[0:4, :].any()
    assert cam_to_mask(cam, threshold=0.5, region=lung).sum() == lung.sum()   # without the image: CAM and lung only


def _square_detector(seed: int, size: int) -> tuple[torch.nn.Module, np.ndarray]:
    """A random ResNet-18 classifier whose class 1 is "the features of a bright top-left square" (its
    linear head: those features minus a blank image's), and a 64 x 64 image with that square."""
    torch.manual_seed(seed)
    model = build_cls_model(ClsModelConfig(encoder="resnet18", input_size=size)).eval()
    img = np.zeros((64, 64), np.float32)
    img[4:24, 4:24] = 1.0
    with torch.no_grad():
        feats = [model.net.forward_features(torch.nn.functional.interpolate(torch.as_tensor(a)[None, None], size=(size, size),
                                                                            mode="bilinear")).mean(dim=(2, 3))[0]
                 for a in (img, np.zeros_like(img))]
        fc = model.net.fc
        fc.weight.zero_(); fc.bias.zero_()
        fc.weight[1] = feats[0] - feats[1]
    return model, img


def test_cam_is_high_where_the_evidence_is():
    """A classifier whose positive class is the bright square's features gets its CAM on the square."""
    from covidct.engine.explain import class_activation_map, cam_to_mask

    model, img = _square_detector(0, 64)
    cam, probs = class_activation_map(model, img, class_index=1)
    assert cam.shape == img.shape and cam.max() == pytest.approx(1.0)
    mask = cam_to_mask(cam, threshold=0.5)
    assert mask[:32, :32].sum() > mask[32:, 32:].sum()


def test_expected_calibration_error():
    from covidct.engine.evaluate_cls import expected_calibration_error

    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.2, 0.8], [0.2, 0.8]])
    # bin 0.9: accuracy 1/2 vs confidence 0.9; bin 0.8: accuracy 1 vs 0.8 -> 0.5*0.4 + 0.5*0.2
    assert expected_calibration_error(probs, np.array([0, 1, 1, 1])) == pytest.approx(0.3, abs=1e-6)


@pytest.mark.realdata
def test_shipped_classifier_on_real_validation_images(tmp_path):
    """Smoke test: the shipped default classifier loads by name alone and scores real UCSD images
    (not an estimate: the default k-fold ensemble trained on every train and val image)."""
    import shutil

    from conftest import need_data

    src = need_data("ucsd-covid-ct")
    rows = [line.split(",") for line in (src / "split.csv").read_text().splitlines()[1:]]
    picked = [r for r in rows if r[2] == "val" and r[1] == "COVID"][:6] + [r for r in rows if r[2] == "val" and r[1] == "NonCOVID"][:6]
    lines = ["path,label,split"]
    for path, label, split, *_ in picked:
        (tmp_path / Path(path).parent).mkdir(parents=True, exist_ok=True)
        shutil.copy(src / path, tmp_path / path)
        lines.append(f"{path},{label},{split}")
    (tmp_path / "split.csv").write_text("\n".join(lines) + "\n")
    model, payload = load_cls_model()  # the shipped default, no hyper-parameter by hand
    assert payload["task"] == "cls" and payload["temperature"] > 0
    js = tmp_path / "e.json"
    assert main(["evaluate", "cls", "--data", str(tmp_path), "--json", str(js)]) == 0
    res = json.loads(js.read_text())
    assert res["n_images"] == 12 and res["auc"] > 0.5


def test_train_cls_with_fewer_images_than_a_batch_is_one_line(tmp_path, capsys):
    data = _make_split_folder(tmp_path / "small", n=6, size=32)  # 4 training images
    out = tmp_path / "c.pt"
    assert main(["train", "cls", "--data", str(data), "--encoder", "resnet18", "--init", "random", "--input-size", "32",
                 "--epochs", "1", "--batch-size", "8", "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "do not fill one batch" in err and len(err.splitlines()) == 1
    assert not out.exists() and not (tmp_path / "c_run").exists()


def test_ensemble_tta_averages_each_member_over_the_mirror_image():
    """An ensemble with ``tta`` returns the log of the mean over members and over (input, mirrored input)
    of the calibrated member probabilities, plus its class offsets once."""
    from covidct.models.ensemble import ClassifierEnsemble, EnsembleConfig

    torch.manual_seed(0)
    members = [(build_cls_model(ClsModelConfig(encoder="resnet18", input_size=32)).eval(), t) for t in (1.0, 2.0)]
    cfg = dict(members=("a", "b"), checksums=("", ""), classes=("NonCOVID", "COVID"), input_size=32,
               logit_offsets=(0.0, -0.5))
    x = torch.rand(3, 1, 32, 32)
    with torch.no_grad():
        out = ClassifierEnsemble(EnsembleConfig(**cfg, tta=True), members)(x)
        plain = ClassifierEnsemble(EnsembleConfig(**cfg), members)(x)
        by_hand = torch.stack([torch.softmax(m(v) / t, dim=1) for m, t in members
                               for v in (x, torch.flip(x, dims=[3]))]).mean(dim=0)
    torch.testing.assert_close(out, torch.log(by_hand) + torch.tensor([0.0, -0.5]))
    assert not torch.allclose(out, plain)                    # the mirror image does change the answer


def test_ensemble_cam_is_the_mean_of_its_cnn_members_maps(trained_cls, tmp_path, capsys, seg_folder):
    """An ensemble's activation map is the mean of its CNN members' maps (with its mirror TTA, each member's
    map is the mean over the image and the mirror image, mirrored back); `explain` and `evaluate cam` take it."""
    from covidct.engine.explain import class_activation_map
    from covidct.models.ensemble import ClassifierEnsemble, EnsembleConfig

    nets = [_square_detector(seed, size)[0] for seed, size in ((0, 64), (1, 48))]
    cfg = dict(members=("a", "b"), checksums=("", ""), classes=("NonCOVID", "COVID"), input_size=64)
    image = _square_detector(0, 64)[1]                         # the square off-centre: the mirror image differs
    single = [class_activation_map(n, image, method="gradcam++")[0] for n in nets]
    mirrored = [class_activation_map(n, np.ascontiguousarray(image[:, ::-1]), method="gradcam++")[0][:, ::-1] for n in nets]
    for tta, maps in ((False, single), (True, [(a + b) / 2 for a, b in zip(single, mirrored)])):
        ensemble = ClassifierEnsemble(EnsembleConfig(**cfg, tta=tta), [(n, 1.0) for n in nets])
        cam, probs = class_activation_map(ensemble, image, method="gradcam++")
        want = np.mean(maps, axis=0)
        np.testing.assert_allclose(cam, want / want.max(), atol=1e-5)
        with torch.no_grad():
            x = torch.nn.functional.interpolate(torch.as_tensor(image)[None, None], size=(64, 64), mode="bilinear")
            np.testing.assert_allclose(probs, torch.softmax(ensemble(x), dim=1)[0].numpy(), atol=1e-6)
    assert not np.allclose(single[0], mirrored[0], atol=1e-3)  # the mirror term does change the map
    assert all(m.max() == pytest.approx(1.0) for m in single)   # both members do draw a map

    data, path, _ = trained_cls
    ens = tmp_path / "ens.pt"
    assert main(["ensemble", "--model", str(path), "--model", str(path), "-o", str(ens)]) == 0
    out = tmp_path / "cam.png"
    capsys.readouterr()
    assert main(["explain", str(data / "COVID" / "0.png"), "-o", str(out), "--model", str(ens)]) == 0
    assert "mean of 2 CNN members' maps" in capsys.readouterr().out and Image.open(out).mode == "RGB"
    js = tmp_path / "w.json"
    assert main(["evaluate", "cam", "--model", str(ens), "--data", str(seg_folder), "--json", str(js)]) == 0
    assert json.loads(js.read_text())["n_images"] == 6


def test_calibration_of_nearly_constant_logits_stays_finite():
    """Tiny ensembles give out-of-fold logits that differ by thousandths (all near log 0.5). Fitting them asks
    for a temperature near 0; the unbounded torch LBFGS fit stepped past what float32 holds (6 of these 20
    draws raised "value cannot be converted to type float without overflow")."""
    from covidct.engine.train_cls import fit_temperature_and_bias

    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        d = 0.002 * torch.randn(20, generator=g)
        labels = (d + 0.001 * torch.randn(20, generator=g) > 0).long()
        logits = torch.stack([-0.6931 - d, -0.6931 + d], dim=1)
        t, c = fit_temperature_and_bias(logits, labels)
        assert np.isfinite(t) and t > 0 and all(np.isfinite(c)) and c[0] == 0.0
        probs = torch.softmax((logits + torch.tensor(c)) / t, dim=1)
        # calibrated at least as well as the raw logits (T = 1, c = 0 is inside the searched range)
        nll = torch.nn.functional.nll_loss(probs.log(), labels)
        assert nll <= torch.nn.functional.cross_entropy(logits, labels) + 1e-6
        assert 0.05 <= fit_temperature(logits, labels) <= 20.0
