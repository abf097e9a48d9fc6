"""Mask R-CNN lesion model: instance targets, a tiny training run, AP evaluation through the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from covidct.cli import main
from covidct.engine.lesions import LesionTrainConfig, train_lesions
from covidct.models.lesions import LesionModelConfig, build_lesion_model, instances_from_labels
from covidct.models.registry import load_lesion_model

TINY = {"backbone": "resnet18", "truncate_last_stage": True, "input_size": 64, "anchor_sizes": [4, 8, 16, 32],
        "rpn_pre_nms_top_n_train": 100, "rpn_post_nms_top_n_train": 50, "rpn_pre_nms_top_n_test": 50,
        "rpn_post_nms_top_n_test": 20, "box_batch_size_per_image": 32, "rpn_batch_size_per_image": 32}


def test_instances_by_mask_mode():
    labels = np.zeros((40, 40), np.uint8)
    labels[2:10, 2:10] = 1
    labels[20:30, 20:30] = 1
    labels[10:14, 2:10] = 2   # touches the first GGO blob
    labels[35:37, 35:37] = 1  # 4 px: below the minimum area
    both = instances_from_labels(labels, "both")
    assert both["labels"].tolist() == [1, 1, 2]
    assert both["boxes"][0].tolist() == [2, 2, 10, 10] and both["masks"].shape == (3, 40, 40)
    merged = instances_from_labels(labels, "merge")
    assert merged["labels"].tolist() == [1, 1] and int(merged["masks"][0].sum()) == 64 + 32
    assert instances_from_labels(labels, "ggo")["labels"].tolist() == [1, 1]
    assert instances_from_labels(np.zeros((8, 8), np.uint8), "both")["boxes"].shape == (0, 4)


def test_model_config_controls_heads():
    m = build_lesion_model(LesionModelConfig.from_dict({**TINY, "mask_mode": "merge"}))
    assert m.net.roi_heads.box_predictor.cls_score.out_features == 2
    assert m.net.roi_heads.box_head.fc7.out_features == 128
    assert m.net.rpn.anchor_generator.sizes == ((4,), (8,), (16,), (32,))
    m.eval()
    with torch.inference_mode():
        out = m([torch.rand(1, 50, 60)])
    assert out[0]["masks"].shape[-2:] == (50, 60)


def test_train_and_evaluate_lesions(tmp_path, seg_folder, capsys):
    cfg = LesionTrainConfig(data=[str(seg_folder)], model=TINY, epochs=2, batch_size=2, val_fraction=0.34)
    res = train_lesions(cfg, tmp_path / "les.pt", progress=False)
    assert (tmp_path / "les.pt").exists() and res["validation"] is not None
    model, payload = load_lesion_model(tmp_path / "les.pt")
    assert payload["anchors"]["sizes"] == [4, 8, 16, 32] and model.config.truncate_last_stage
    assert payload["classes"] == ["background", "ggo", "consolidation"]
    assert payload["starts"] == {}  # from ImageNet / at random: no start file to name
    js = tmp_path / "e.json"
    assert main(["evaluate", "lesions", "--model", str(tmp_path / "les.pt"), "--data", str(seg_folder), "--json", str(js),
                 "--precision", "fp32"]) == 0
    out = json.loads(js.read_text())
    assert {"n_images", "ap50", "ap75", "map", "per_class", "images_per_second"} <= set(out)
    assert out["precision"] == "fp32"
    assert set(out["per_class"]) == {"ggo", "consolidation"}
    printed = capsys.readouterr().out
    assert out["n_images"] == 6 and "Evaluation took" in printed and f"wrote {js}" in printed
    # --overlays: one picture per evaluated slice, the same numbers; a file in the folder's place is one error line
    pics = tmp_path / "pics"
    assert main(["evaluate", "lesions", "--model", str(tmp_path / "les.pt"), "--data", str(seg_folder), "--json",
                 str(tmp_path / "e2.json"), "--overlays", str(pics), "--precision", "fp32"]) == 0
    assert json.loads((tmp_path / "e2.json").read_text())["ap50"] == out["ap50"]
    assert sorted(p.stem for p in pics.glob("*.png")) == sorted(p.stem for p in (seg_folder / "images").iterdir())
    assert "not for diagnosis" in Image.open(next(pics.glob("*.png"))).text["Disclaimer"]
    # binary infection masks (0 / 255) hold no lesion type: a GGO + consolidation model is refused in one line
    from conftest import binary_mask_copy

    binary = binary_mask_copy(seg_folder, tmp_path / "binary")
    capsys.readouterr()
    assert main(["evaluate", "lesions", "--model", str(tmp_path / "les.pt"), "--data", str(binary), "--json",
                 str(tmp_path / "b.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "binary infection masks" in err and "'both'" in err
    assert not (tmp_path / "b.json").exists()
    (tmp_path / "taken").write_text("x")
    capsys.readouterr()
    assert main(["evaluate", "lesions", "--model", str(tmp_path / "les.pt"), "--data", str(seg_folder),
                 "--overlays", str(tmp_path / "taken")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "taken" in err[0] and "folder" in err[0]
    assert out["images_without_mask"] == []
    Image.fromarray(np.zeros((48, 48), np.uint8)).save(seg_folder / "images" / "extra.png")
    assert main(["evaluate", "lesions", "--model", str(tmp_path / "les.pt"), "--data", str(seg_folder), "--json",
                 str(js), "--precision", "fp32"]) == 0
    out = json.loads(js.read_text())
    assert out["n_images"] == 6 and out["images_without_mask"] == ["extra"]
    assert "1 image(s) without a label map" in capsys.readouterr().err


def test_predict_instances_in_bfloat16_returns_float32() -> None:
    """Under bfloat16 autocast the Mask R-CNN's floating outputs come back as float32, boxes inside the image
    and scores sorted as in float32; the model's own parameters stay float32."""
    from covidct.engine.lesions import predict_instances

    torch.manual_seed(0)
    m = build_lesion_model(LesionModelConfig.from_dict(TINY))
    image = np.random.default_rng(0).random((50, 60), dtype=np.float32)
    ref, low = (predict_instances(m, [image], precision=p)[0] for p in ("fp32", "bf16"))
    assert len(low["scores"]) > 0 and len(ref["scores"]) > 0
    for key in ("boxes", "scores", "masks"):
        assert low[key].dtype == torch.float32 == ref[key].dtype
    assert bool((low["scores"][:-1] >= low["scores"][1:]).all()) and low["masks"].shape[-2:] == (50, 60)
    assert float(low["boxes"][:, 2].max()) <= 60 and float(low["boxes"][:, 3].max()) <= 50
    assert {p.dtype for p in m.parameters()} == {torch.float32}


def test_instances_comparison_draws_truth_beside_confident_predictions():
    """Left: the true instances in their class colours; right: only the predictions scoring at least
    ``min_score``; a legend and the counts under them."""
    from covidct.data.segmentation import LESION_COLOURS
    from covidct.report.overlay import instances_comparison

    grey = np.full((64, 64), 0.5, np.float32)
    truth_masks = np.zeros((2, 64, 64), np.uint8)
    truth_masks[0, 5:20, 5:20] = 1      # GGO
    truth_masks[1, 40:60, 40:60] = 1    # consolidation
    truth = {"masks": torch.from_numpy(truth_masks), "labels": torch.tensor([1, 2]),
             "boxes": torch.tensor([[5, 5, 20, 20], [40, 40, 60, 60]], dtype=torch.float32)}
    pred_masks = torch.zeros((2, 1, 64, 64))
    pred_masks[0, 0, 5:20, 40:60] = 0.9   # a confident GGO up right
    pred_masks[1, 0, 40:60, 5:20] = 0.9   # an unsure consolidation down left: not drawn
    prediction = {"masks": pred_masks, "labels": torch.tensor([1, 2]), "scores": torch.tensor([0.8, 0.1]),
                  "boxes": torch.tensor([[40, 5, 60, 20], [5, 40, 20, 60]], dtype=torch.float32)}
    pic = np.asarray(instances_comparison(grey, truth, prediction, ("background", "ggo", "consolidation"),
                                          min_score=0.3, title="slice 7"))
    scale = 640 / (64 + 4 + 64)             # the pair is upscaled to 640 px
    assert pic.shape[1] == 640

    def colour_at(row, col):                # a pixel of the 64 x 64 panels, left (col) or right (68 + col)
        return pic[int((row + 0.5) * scale), int((col + 0.5) * scale)].astype(int)

    def tinted(rgb, name):                  # grey 127 blended towards the class colour
        target = np.array(LESION_COLOURS[name])
        return np.abs(rgb - (0.55 * 127 + 0.45 * target)).max() <= 3

    assert tinted(colour_at(12, 12), "ggo") and tinted(colour_at(50, 50), "consolidation")         # truth
    assert tinted(colour_at(17, 68 + 55), "ggo")                        # predicted GGO (below its score text)
    assert np.abs(colour_at(50, 68 + 12) - 127).max() <= 1                                         # score 0.1: not drawn
    assert np.abs(colour_at(50, 68 + 50) - 127).max() <= 1                                         # nothing predicted


def test_train_lesions_cli_sets_the_training_cost_settings(tmp_path, seg_folder, capsys):
    """The training-time cost settings (box head width, proposals, sampled anchors and RoIs) reach the model
    and its checkpoint; a value below 1 is one error line and no file."""
    out = tmp_path / "les.pt"
    base = ["train", "lesions", "--data", str(seg_folder), "--backbone", "resnet18", "--truncate-last-stage",
            "--input-size", "64", "--epochs", "1", "--batch-size", "2"]
    assert main([*base, "--box-head-dim", "24", "--rpn-pre-nms-top-n-train", "60", "--rpn-post-nms-top-n-train", "30",
                 "--rpn-batch-size-per-image", "16", "--box-batch-size-per-image", "8", "-o", str(out)]) == 0
    model, payload = load_lesion_model(out)
    assert model.net.roi_heads.box_head.fc7.out_features == 24
    assert model.net.roi_heads.fg_bg_sampler.batch_size_per_image == 8
    assert model.net.rpn.fg_bg_sampler.batch_size_per_image == 16
    assert model.net.rpn._pre_nms_top_n["training"] == 60 and model.net.rpn._post_nms_top_n["training"] == 30
    assert payload["config"]["box_head_dim"] == 24
    # unset options keep the cheap defaults of LesionModelConfig
    default = tmp_path / "default.pt"
    assert main([*base, "-o", str(default)]) == 0
    assert load_lesion_model(default)[0].config.box_head_dim == LesionModelConfig().box_head_dim == 128
    capsys.readouterr()
    with pytest.raises(SystemExit):   # the defaults the help names are the model's
        main(["train", "lesions", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    cheap = LesionModelConfig()
    for flag in ("box_head_dim", "rpn_pre_nms_top_n_train", "rpn_post_nms_top_n_train", "rpn_batch_size_per_image",
                 "box_batch_size_per_image"):
        option = "--" + flag.replace("_", "-")
        assert f"(default {getattr(cheap, flag)};" in help_text.split(option, 2)[2].split("--")[0], option
    bad = tmp_path / "bad.pt"
    assert main([*base, "--box-batch-size-per-image", "0", "-o", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--box-batch-size-per-image must be at least 1" in err[0] and not bad.exists()


def test_maskcls_trains_s_and_evaluates_through_evaluate_cls(tmp_path, seg_folder, capsys):
    from test_cls_pipeline import _make_split_folder

    cfg = LesionTrainConfig(data=[str(seg_folder)], model=TINY, epochs=1, batch_size=2, val_fraction=0.34)
    train_lesions(cfg, tmp_path / "les.pt", progress=False)
    data = _make_split_folder(tmp_path / "cls", n=6, size=40)
    out = tmp_path / "mc.pt"
    assert main(["train", "maskcls", "--data", str(data), "--lesion-model", str(tmp_path / "les.pt"),
                 "--top-n", "8", "--s-width", "16", "--epochs", "20", "-o", str(out)]) == 0
    from covidct.models.registry import load_cls_model

    model, payload = load_cls_model(out)
    assert payload["task"] == "maskcls" and model.config.top_n == 8 and payload["anchors"]["sizes"] == [4, 8, 16, 32]
    rois = model.roi_tensor([torch.rand(1, 40, 46)])
    assert rois.shape == (1, 8, 5) and float(rois[..., :4].max()) <= 1.0
    js = tmp_path / "e.json"
    assert main(["evaluate", "cls", "--model", str(out), "--data", str(data), "--split", "test", "--json", str(js)]) == 0
    assert json.loads(js.read_text())["n_images"] == 4
    # training saw the RoIs that evaluation sees: re-evaluating the validation split reproduces the stored scores
    assert main(["evaluate", "cls", "--model", str(out), "--data", str(data), "--split", "val", "--json", str(js)]) == 0
    again = json.loads(js.read_text())
    assert again["overall_accuracy"] == pytest.approx(payload["metrics"]["validation"]["accuracy"])
    assert again["auc"] == pytest.approx(payload["metrics"]["validation"]["auc"])
    # explain shows what S reads: the RoI boxes on the image's own grid, and the class probabilities
    from covidct.engine.explain import maskcls_evidence

    image = np.random.default_rng(1).random((40, 70)).astype(np.float32)
    boxes, scores, probs = maskcls_evidence(model, image, temperature=payload["temperature"])
    assert len(boxes) == len(scores) <= 8 and probs.sum() == pytest.approx(1.0, abs=1e-5)
    assert np.all(boxes[:, [0, 2]] <= 70.01) and np.all(boxes[:, [1, 3]] <= 40.01) and np.all(scores >= 0.05)
    png = tmp_path / "x.png"
    assert main(["explain", str(data / "COVID" / "0.png"), "--model", str(out), "-o", str(png)]) == 0
    assert png.exists() and "RoIs read by S" in capsys.readouterr().out
    # weak masks need a heat map: a Mask-Net classifier (and an ensemble of them only) has none
    assert main(["evaluate", "cam", "--model", str(out), "--data", str(data)]) == 2
    assert "need a CNN classifier" in capsys.readouterr().err
    # k-fold stage 2 (as `train cls --folds`): two folds hold out the 8 train + val images once each
    from covidct.engine.evaluate_cls import evaluate_out_of_fold

    folds = [tmp_path / f"mc{k}.pt" for k in range(2)]
    for k, path in enumerate(folds):
        assert main(["train", "maskcls", "--data", str(data), "--lesion-model", str(tmp_path / "les.pt"), "--top-n", "8",
                     "--s-width", "16", "--epochs", "5", "--folds", "2", "--fold", str(k), "-o", str(path)]) == 0
    oof = evaluate_out_of_fold(folds, data, progress=False)
    assert oof["n_images"] == 8 and oof["models_per_image"] == 1 and oof["_probabilities"].shape == (8, 2)
    # S only changed: the file stores S and takes the rest from the lesion model, checked by its sha256
    from covidct.models.checkpoint import read_checkpoint, record_metrics

    stored = read_checkpoint(out)
    assert set(stored["state_dict"]) == {k for k in model.state_dict() if k.startswith("s.")}
    assert stored["base_model"]["prefix"] == "lesion." and len(stored["base_model"]["sha256"]) == 64
    record_metrics(tmp_path / "les.pt", note="changed")  # same weights, another file
    capsys.readouterr()
    assert main(["evaluate", "cls", "--model", str(out), "--data", str(data), "--split", "test"]) == 2
    err = capsys.readouterr().err.strip()
    assert "base model" in err and "changed" in err and len(err.splitlines()) == 1


def test_a_merge_model_scores_binary_infection_masks_as_their_class_index_masks(tmp_path, seg_folder):
    """A one-class (``merge``) lesion model needs no lesion type: on binary 0 / 255 masks it gets exactly the AP of
    the class-index masks they came from."""
    from conftest import binary_mask_copy
    from covidct.models import save_checkpoint

    torch.manual_seed(0)
    cfg = LesionModelConfig.from_dict({**TINY, "mask_mode": "merge", "box_score_thresh": 0.0})
    path = save_checkpoint(tmp_path / "merge.pt", task="lesions", config=cfg.to_dict(),
                           state_dict=build_lesion_model(cfg).state_dict(), classes=list(cfg.classes),
                           input_size=cfg.input_size,
                           anchors={"sizes": list(cfg.anchor_sizes), "aspect_ratios": list(cfg.aspect_ratios)})
    binary = binary_mask_copy(seg_folder, tmp_path / "binary")
    outs = []
    for data in (seg_folder, binary):
        js = tmp_path / f"{data.name}.json"
        assert main(["evaluate", "lesions", "--model", str(path), "--data", str(data), "--json", str(js),
                     "--precision", "fp32"]) == 0
        outs.append(json.loads(js.read_text()))
    assert outs[0]["n_images"] == outs[1]["n_images"] == 6
    keys = ("ap50", "ap75", "map", "per_class", "infection_dice")   # the region Dice scores the same truth union
    assert {k: outs[0][k] for k in keys} == {k: outs[1][k] for k in keys}
    assert outs[1]["infection_dice"] > 0


def test_efficientnet_backbone_starts_from_our_segmentation_encoder(tmp_path):
    from covidct.models import SegModelConfig, build_seg_model, save_checkpoint

    seg = build_seg_model(SegModelConfig(encoder="efficientnet-lite0", input_size=64))
    path = save_checkpoint(tmp_path / "seg.pt", task="seg", config=seg.config.to_dict(), state_dict=seg.state_dict())
    cfg = LesionModelConfig(backbone="efficientnet-lite0", input_size=64, anchor_sizes=(4, 8, 16, 32, 64))
    m = build_lesion_model(cfg, encoder_init=str(path))
    body, enc = m.net.backbone.body, seg.net.encoder.model
    torch.testing.assert_close(body.blocks[2][0].conv_pw.weight, enc.blocks[2][0].conv_pw.weight)
    # the grey stem spread over the three copied channels: same response to a grey image
    torch.testing.assert_close(body.conv_stem.weight.sum(dim=1, keepdim=True), enc.conv_stem.weight)
    with pytest.raises(ValueError, match="EfficientNet-Lite"):
        build_lesion_model(LesionModelConfig.from_dict(TINY), encoder_init=str(path))


def test_efficientnet_backbone_starts_from_imagenet():
    from covidct.models.encoders import imagenet_state_dict

    m = build_lesion_model(LesionModelConfig(backbone="efficientnet-lite0", input_size=64, anchor_sizes=(4, 8, 16, 32, 64)),
                           imagenet=True)
    body = m.net.backbone.body
    torch.testing.assert_close(body.conv_stem.weight, imagenet_state_dict("efficientnet-lite0")["conv_stem.weight"])
    assert m.net.backbone.out_channels == 128
    m.eval()
    with torch.inference_mode():
        out = m([torch.rand(1, 64, 64)])
    assert set(out[0]) == {"boxes", "labels", "scores", "masks"}


@pytest.mark.parametrize("train", ["s+roi", "s+bn"])
def test_maskcls_stage2_trains_only_what_was_chosen(tmp_path, train):
    """s+roi moves S, box head and predictor; s+bn moves S and the backbone's batch-norm affine
    parameters; everything else keeps the lesion model's weights."""
    from test_cls_pipeline import _make_split_folder

    from covidct.engine.train_maskcls import MaskClsTrainConfig, train_maskcls
    from covidct.models import save_checkpoint
    from covidct.models.registry import load_cls_model

    cfg = LesionModelConfig(backbone="efficientnet-lite0", input_size=64, anchor_sizes=(4, 8, 16, 32, 64),
                            rpn_post_nms_top_n_test=20, box_score_thresh=0.0)
    lesion = build_lesion_model(cfg)
    les_path = save_checkpoint(tmp_path / "les.pt", task="lesions", config=cfg.to_dict(), state_dict=lesion.state_dict(),
                               classes=list(cfg.classes), input_size=64,
                               anchors={"sizes": list(cfg.anchor_sizes), "aspect_ratios": list(cfg.aspect_ratios)})
    data = _make_split_folder(tmp_path / "cls", n=6, size=40)
    res = train_maskcls(MaskClsTrainConfig(data=str(data), lesion_model=str(les_path), top_n=8, s_width=16, train=train,
                                           epochs=2, batch_size=4, lr=1e-2), tmp_path / "mc.pt", progress=False)
    assert res["trained"].startswith("S + ") and res["n_train"] == 4 and res["n_val"] == 4
    model, payload = load_cls_model(tmp_path / "mc.pt")
    assert payload["train_config"]["train"] == train
    before = lesion.state_dict()  # what stage 2 left unchanged is read from the lesion file itself
    after = {k.removeprefix("lesion."): v for k, v in model.state_dict().items() if k.startswith("lesion.")}

    def moved(pattern: str) -> bool:
        keys = [k for k in before if pattern in k and before[k].is_floating_point()]
        assert keys, pattern
        return any(not torch.equal(before[k], after[k].float()) for k in keys)

    assert moved("roi_heads.box_head.") == (train == "s+roi")
    assert moved("roi_heads.box_predictor.") == (train == "s+roi")
    assert moved("backbone.body.bn1.weight") == (train == "s+bn")
    assert not moved("backbone.body.conv_stem.weight") and not moved("backbone.body.bn1.running_mean")
    assert not moved("rpn.") and not moved("roi_heads.mask_")


def test_maskcls_label_columns_carry_each_rois_lesion_class(tmp_path, capsys):
    """--roi-features label: every kept RoI row gets the one-hot lesion class torchvision's detector gives
    that box (padding rows stay zero); S is sized for it, and the file rebuilds it without options."""
    from test_cls_pipeline import _make_split_folder

    from covidct.models import save_checkpoint
    from covidct.models.maskcls import MaskClsConfig, MaskClsNet
    from covidct.models.registry import load_cls_model

    cfg = LesionModelConfig(backbone="efficientnet-lite0", input_size=64, anchor_sizes=(4, 8, 16, 32, 64),
                            rpn_post_nms_top_n_test=20, box_score_thresh=0.0)
    torch.manual_seed(0)
    lesion = build_lesion_model(cfg).eval()
    model = MaskClsNet(MaskClsConfig(top_n=8, s_width=16, lesion=cfg.to_dict(), roi_features=("label",)), lesion)
    assert model.config.roi_width == 7 and model.s[0].in_features == 8 * 7
    x = torch.rand(1, 64, 64)
    rois = model.roi_tensor([x])[0]
    with torch.inference_mode():
        det = lesion.net([x.expand(3, -1, -1)])[0]
    kept = rois[:, 4] > 0
    assert 0 < int(kept.sum()) <= 8 and torch.all(rois[~kept] == 0)
    assert torch.all(rois[kept, 5:].sum(1) == 1)
    for row in rois[kept]:  # the same detection in torchvision's own output: same class
        j = int(torch.argmin((det["scores"] - row[4]).abs() + (det["boxes"] / 64 - row[:4]).abs().sum(1)))
        assert float((det["scores"][j] - row[4]).abs()) < 1e-5
        assert int(torch.argmax(row[5:])) + 1 == int(det["labels"][j])
    with pytest.raises(ValueError, match="unknown RoI feature"):
        MaskClsConfig(lesion=cfg.to_dict(), roi_features=("colour",))
    les_path = save_checkpoint(tmp_path / "les.pt", task="lesions", config=cfg.to_dict(), state_dict=lesion.state_dict(),
                               classes=list(cfg.classes), input_size=64,
                               anchors={"sizes": list(cfg.anchor_sizes), "aspect_ratios": list(cfg.aspect_ratios)})
    data = _make_split_folder(tmp_path / "cls", n=6, size=40)
    out = tmp_path / "mc.pt"
    assert main(["train", "maskcls", "--data", str(data), "--lesion-model", str(les_path), "--top-n", "8", "--s-width",
                 "16", "--epochs", "3", "--roi-features", "label", "-o", str(out)]) == 0
    loaded, payload = load_cls_model(out)
    assert loaded.config.roi_features == ("label",) and list(payload["train_config"]["roi_features"]) == ["label"]
    assert loaded.roi_tensor([x]).shape == (1, 8, 7)
    # a file asking for a column this version does not know: one line naming the file, no traceback
    stored = torch.load(out, weights_only=False)
    stored["config"]["roi_features"] = ["label", "colour"]
    torch.save(stored, tmp_path / "newer.pt")
    capsys.readouterr()
    assert main(["classify", str(data / "COVID" / "0.png"), "--model", str(tmp_path / "newer.pt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "newer.pt" in err[0] and "unknown RoI feature(s) colour" in err[0]


def test_maskcls_embedding_pools_the_box_head_features_of_the_kept_detections(tmp_path):
    """``roi_features=("embedding",)``: S reads the published RoI rows unchanged, then the score-weighted mean and
    the maximum of the box-head features of exactly the proposals the kept detections came from (each such
    proposal's class score is the detection's score); a file trained with it rebuilds S without options."""
    import torch.nn.functional as F

    from covidct.models.maskcls import MaskClsConfig, MaskClsNet, _source_proposals

    cfg = LesionModelConfig(backbone="efficientnet-lite0", input_size=64, anchor_sizes=(4, 8, 16, 32, 64),
                            rpn_post_nms_top_n_test=20, box_score_thresh=0.0, box_head_dim=16)
    torch.manual_seed(0)
    lesion = build_lesion_model(cfg).eval()
    plain = MaskClsNet(MaskClsConfig(top_n=8, s_width=16, lesion=cfg.to_dict()), lesion)
    model = MaskClsNet(MaskClsConfig(top_n=8, s_width=16, lesion=cfg.to_dict(), roi_features=("embedding",)), lesion)
    assert model.config.roi_width == 5 and model.config.pooled_width == 32 and model.s[0].in_features == 8 * 5 + 32
    x = torch.rand(1, 64, 64)
    s_in = model.s_input([x])[0]
    assert s_in.shape == (8 * 5 + 32,)
    torch.testing.assert_close(model.roi_tensor([x]), plain.roi_tensor([x]))   # the RoI rows as published
    with torch.no_grad():
        pooled, proposals, sizes = model.pooled_rois([x])
        rh = lesion.net.roi_heads
        feats = rh.box_head(pooled[0])
        logits, regression = rh.box_predictor(feats)
        boxes, scores, labels = rh.postprocess_detections(logits, regression, proposals, sizes)
        order = torch.argsort(scores[0], descending=True)[:8]
        b, sc, lab = boxes[0][order], scores[0][order], labels[0][order]
        assert len(b) > 1
        source = _source_proposals(rh.box_coder.decode(regression, proposals), b, lab, sizes[0])
        # independent of the box match: the source proposal's own class score is the detection's score
        torch.testing.assert_close(F.softmax(logits[source], -1)[torch.arange(len(lab)), lab], sc)
        kept = feats[source]
    torch.testing.assert_close(s_in[40:56], (sc[:, None] * kept).sum(0) / sc.sum())
    torch.testing.assert_close(s_in[56:], kept.max(0).values)


def test_maskcls_s_plus_bn_refuses_a_frozen_batch_norm_backbone(tmp_path, seg_folder, capsys):
    from test_cls_pipeline import _make_split_folder

    train_lesions(LesionTrainConfig(data=[str(seg_folder)], model=TINY, epochs=1, batch_size=2, val_fraction=0.34),
                  tmp_path / "les.pt", progress=False)
    data = _make_split_folder(tmp_path / "cls", n=6, size=40)
    code = main(["train", "maskcls", "--data", str(data), "--lesion-model", str(tmp_path / "les.pt"), "--train", "s+bn",
                 "-o", str(tmp_path / "mc.pt")])
    err = capsys.readouterr().err.strip()
    assert code != 0 and "frozen" in err and len(err.splitlines()) == 1 and not (tmp_path / "mc.pt").exists()


def test_instances_overlay_colours_masks_and_boxes():
    from covidct.report.overlay import instances_rgb

    grey = np.full((40, 50), 0.5, np.float32)
    masks = np.zeros((2, 40, 50), bool)
    masks[0, 5:10, 5:10] = True
    masks[1, 20:30, 30:40] = True
    im = np.asarray(instances_rgb(grey, masks, ["ggo", "consolidation"], [0.9, 0.4],
                                  np.array([[4, 4, 11, 11], [29, 19, 41, 31]], np.float32)))
    assert im.shape == (40, 50, 3)
    r, g, b = im[7, 7].astype(int)
    assert r > g and r > b  # GGO red
    r, g, b = im[25, 35].astype(int)
    assert b > r and b > g  # consolidation blue
    assert tuple(im[4, 8]) == (255, 0, 0) and tuple(im[31, 35]) == (0, 90, 255)  # box outlines
    assert tuple(im[0, 45]) == (127, 127, 127)  # untouched background
    # two overlapping GGO instances blend once, like one
    twice = np.asarray(instances_rgb(grey, np.stack([masks[0], masks[0]]), ["ggo", "ggo"], [0.9, 0.8],
                                     np.zeros((0, 4), np.float32)))
    assert tuple(twice[7, 7]) == tuple(im[7, 7])


def test_predict_with_lesion_model_writes_instances(tmp_path, capsys):
    from PIL import Image

    from covidct.models import SegModelConfig, build_seg_model, save_checkpoint

    seg = build_seg_model(SegModelConfig(encoder="resnet18", input_size=64))
    seg_path = save_checkpoint(tmp_path / "seg.pt", task="seg", config=seg.config.to_dict(), state_dict=seg.state_dict())
    cfg = LesionModelConfig.from_dict({**TINY, "box_score_thresh": 0.0})
    lesion = build_lesion_model(cfg)
    les_path = save_checkpoint(tmp_path / "les.pt", task="lesions", config=cfg.to_dict(), state_dict=lesion.state_dict(),
                               classes=list(cfg.classes), input_size=cfg.input_size)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 56), dtype=np.uint8)).save(tmp_path / "s.png")
    out = tmp_path / "out"
    assert main(["predict", str(tmp_path / "s.png"), "-o", str(out), "--model", str(seg_path),
                 "--lesion-model", str(les_path), "--lesion-score", "0"]) == 0
    assert "wrote 4 files for 1 slices" in capsys.readouterr().out
    summary = json.loads((out / "predictions.json").read_text())
    inst = summary["slices"][0]["instances"]
    assert summary["lesion_model"] == "les.pt" and 0 < len(inst) <= cfg.box_detections_per_img
    assert all(i["class"] in ("ggo", "consolidation") and 0 <= i["box"][0] <= i["box"][2] <= 56 for i in inst)
    assert Image.open(out / "s_instances.png").width >= 56
    # a CT volume's slices reach the lesion model turned like the segmentation model's (anterior left), and its
    # boxes come back onto the slice: inside a 40-row x 64-column slice, not the turned 64 x 40 one
    from conftest import phantom_hu, write_nifti

    write_nifti(tmp_path / "v.nii.gz", phantom_hu(2, 64)[:, 12:52, :], spacing=(5.0, 3.0, 3.0))
    assert main(["predict", str(tmp_path / "v.nii.gz"), "-o", str(tmp_path / "out_v"), "--model", str(seg_path),
                 "--lesion-model", str(les_path), "--lesion-score", "0"]) == 0
    boxes = [i["box"] for row in json.loads((tmp_path / "out_v" / "predictions.json").read_text())["slices"]
             for i in row["instances"]]
    assert boxes and all(0 <= x1 <= x2 <= 64 and 0 <= y1 <= y2 <= 40 for x1, y1, x2, y2 in boxes)
    assert main(["predict", str(tmp_path / "s.png"), "-o", str(out), "--lesion-score", "2"]) == 2
    assert "--lesion-score" in capsys.readouterr().err


@pytest.mark.realdata
def test_shipped_lesion_model_on_real_validation_slices(tmp_path, capsys):
    """Smoke test: the default lesion model loads with no hyper-parameter and its instances cover the
    lesions of slices it never trained on (its own validation slices)."""
    import shutil

    from conftest import need_data

    from covidct.models.checkpoint import read_checkpoint
    from covidct.models.registry import resolve_model

    src = need_data("covid-semiseg")
    payload = read_checkpoint(resolve_model(None, task="lesions"))
    ids = payload["metrics"]["val_ids"][:3]
    assert payload["anchors"]["sizes"] and payload["classes"] == ["background", "ggo", "consolidation"]
    for sub in ("images", "masks"):
        (tmp_path / "few" / sub).mkdir(parents=True)
        for i in ids:
            for f in (src / sub).glob(f"{i}.*"):
                shutil.copy(f, tmp_path / "few" / sub / f.name)
    js = tmp_path / "e.json"
    assert main(["evaluate", "lesions", "--data", str(tmp_path / "few"), "--json", str(js), "--overlays",
                 str(tmp_path / "pics")]) == 0
    res = json.loads(js.read_text())
    assert res["n_images"] == 3 and res["ap50"] is not None and res["infection_dice"] > 0.5
    assert len(list((tmp_path / "pics").glob("*.png"))) == 3
    assert "lesion region Dice" in capsys.readouterr().out


def test_ensemble_shares_one_backbone_pass_between_mask_net_members():
    """Mask-Net members with the same backbone and RPN (stage 2 trained S / RoI heads only) share one
    pass through them; a member with another backbone does not; the probabilities are unchanged."""
    from covidct.models.ensemble import ClassifierEnsemble, EnsembleConfig
    from covidct.models.maskcls import MaskClsConfig, MaskClsNet

    torch.manual_seed(0)
    lesion_cfg = LesionModelConfig.from_dict(TINY)
    base = build_lesion_model(lesion_cfg)
    cfg = MaskClsConfig(top_n=8, s_width=16, lesion=lesion_cfg.to_dict())
    members = []
    for k in range(3):
        m = MaskClsNet(cfg, build_lesion_model(lesion_cfg))
        m.lesion.load_state_dict(base.state_dict())
        if k == 1:   # S + RoI heads trained: still the same front
            torch.nn.init.normal_(m.lesion.net.roi_heads.box_head.fc6.weight, std=0.05)
        members.append((m.eval(), 1.0))
    other = MaskClsNet(cfg, build_lesion_model(lesion_cfg)).eval()   # its own random backbone
    members.append((other, 1.0))
    ens = ClassifierEnsemble(EnsembleConfig(members=("a", "b", "c", "d"), checksums=("",) * 4,
                                            classes=("NonCOVID", "COVID"), input_size=64), members).eval()
    assert ens.shared_front == {1: 0, 2: 0}
    x = torch.rand(3, 1, 64, 64)
    with torch.inference_mode():
        shared = ens(x)
        ens.shared_front = {}
        alone = ens(x)
    torch.testing.assert_close(shared, alone)


def test_streamed_ensemble_equals_the_loaded_one_and_checks_members_first(tmp_path):
    """An ensemble streamed member by member (``load_cls_model(..., stream_members=True)``, what the CT
    triage of ``analyze`` uses) gives the probabilities of the ensemble held in memory, bit for bit: Mask-Net
    members sharing a front, one with its own, a CNN at another input size, temperatures, mirror TTA and
    class offsets; it holds no member between calls; a member file changed since the ensemble was made
    is refused when it is loaded, before any image."""
    from covidct.engine.evaluate_cls import predict_probabilities
    from covidct.errors import CovidctError
    from covidct.models.checkpoint import file_sha256, save_checkpoint
    from covidct.models.classification import ClsModelConfig, build_cls_model
    from covidct.models.ensemble import ClassifierEnsemble, EnsembleConfig, StreamedEnsemble
    from covidct.models.maskcls import MaskClsConfig, MaskClsNet
    from covidct.models.registry import load_cls_model

    torch.manual_seed(0)
    lesion_cfg = LesionModelConfig.from_dict(TINY)
    base = build_lesion_model(lesion_cfg)
    cfg = MaskClsConfig(top_n=8, s_width=16, lesion=lesion_cfg.to_dict())
    files = []
    for k, temperature in enumerate((1.0, 1.5, 0.8)):
        m = MaskClsNet(cfg, build_lesion_model(lesion_cfg))
        if k < 2:   # the first two share backbone and RPN; the third has its own
            m.lesion.load_state_dict(base.state_dict())
        files.append(save_checkpoint(tmp_path / f"mask{k}.pt", task="maskcls", config=cfg.to_dict(),
                                     state_dict=m.state_dict(), classes=["NonCOVID", "COVID"], input_size=64,
                                     temperature=temperature))
    cnn_cfg = ClsModelConfig(encoder="resnet18", input_size=48)
    files.append(save_checkpoint(tmp_path / "cnn.pt", task="cls", config=cnn_cfg.to_dict(),
                                 state_dict=build_cls_model(cnn_cfg).state_dict(), classes=["NonCOVID", "COVID"],
                                 input_size=48, temperature=2.0))
    config = EnsembleConfig(members=tuple(str(f) for f in files), checksums=tuple(file_sha256(f) for f in files),
                            classes=("NonCOVID", "COVID"), input_size=64, logit_offsets=(0.0, -0.3), tta=True)
    ens_file = save_checkpoint(tmp_path / "ens.pt", task="cls", config=config.to_dict(), state_dict={},
                               classes=["NonCOVID", "COVID"], input_size=64, temperature=1.2)

    loaded, payload = load_cls_model(ens_file)
    streamed, streamed_payload = load_cls_model(ens_file, stream_members=True)
    assert isinstance(loaded, ClassifierEnsemble) and loaded.shared_front == {1: 0}
    assert isinstance(streamed, StreamedEnsemble) and streamed_payload["temperature"] == payload["temperature"]
    images = [np.random.default_rng(i).random((70, 60)).astype(np.float32) for i in range(3)]
    want = predict_probabilities(loaded, images, temperature=payload["temperature"])
    got = predict_probabilities(streamed, images, temperature=payload["temperature"])
    np.testing.assert_array_equal(got, want)
    assert not any(True for _ in streamed.parameters())   # nothing kept between calls
    assert not np.allclose(want[:, 1], want[0, 1])          # the images do get different answers

    cnn_cfg2 = ClsModelConfig(encoder="resnet18", input_size=40)
    save_checkpoint(files[-1], task="cls", config=cnn_cfg2.to_dict(), state_dict=build_cls_model(cnn_cfg2).state_dict(),
                    classes=["NonCOVID", "COVID"], input_size=40)
    with pytest.raises(CovidctError, match="changed since the ensemble was made"):
        load_cls_model(ens_file, stream_members=True)


def test_streamed_ensemble_refills_a_member_of_the_same_architecture(tmp_path, monkeypatch):
    """Streamed CNN members of one architecture (the folds of a recipe) reuse the previous member's network
    instead of building a new one — only a member of another architecture is built — and the probabilities
    stay those of the ensemble held in memory, bit for bit."""
    from covidct.engine.evaluate_cls import predict_probabilities
    from covidct.models import classification
    from covidct.models.checkpoint import file_sha256, save_checkpoint
    from covidct.models.classification import ClsModelConfig, build_cls_model
    from covidct.models.ensemble import EnsembleConfig
    from covidct.models.registry import load_cls_model

    torch.manual_seed(0)
    a, b = ClsModelConfig(encoder="resnet18", input_size=48), ClsModelConfig(encoder="resnet18", input_size=40)
    files = []
    for k, cfg in enumerate((a, a, b, a)):
        net = build_cls_model(cfg)
        with torch.no_grad():   # distinct BatchNorm statistics too: a refilled network must take them over
            for m in net.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.2, 0.2)
                    m.running_var.uniform_(0.5, 1.5)
        files.append(save_checkpoint(tmp_path / f"m{k}.pt", task="cls", config=cfg.to_dict(), state_dict=net.state_dict(),
                                     classes=["NonCOVID", "COVID"], input_size=cfg.input_size, temperature=1.0 + k / 4))
    config = EnsembleConfig(members=tuple(str(f) for f in files), checksums=tuple(file_sha256(f) for f in files),
                            classes=("NonCOVID", "COVID"), input_size=48)
    ens_file = save_checkpoint(tmp_path / "ens.pt", task="cls", config=config.to_dict(), state_dict={},
                               classes=["NonCOVID", "COVID"], input_size=48)
    images = [np.random.default_rng(i).random((50, 45)).astype(np.float32) for i in range(3)]
    loaded, _ = load_cls_model(ens_file)
    want = predict_probabilities(loaded, images)
    built = []
    real_build = classification.build_cls_model
    monkeypatch.setattr(classification, "build_cls_model", lambda cfg: built.append(cfg.input_size) or real_build(cfg))
    streamed, _ = load_cls_model(ens_file, stream_members=True)
    got = predict_probabilities(streamed, images)
    np.testing.assert_array_equal(got, want)
    assert built == [48, 40, 48]   # members 1 and 2 share a build; 3 has another input size, 4 follows it
