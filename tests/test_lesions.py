"""Mask R-CNN lesion model: instance targets, a tiny training run, AP evaluation through the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

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
    js = tmp_path / "e.json"
    assert main(["evaluate", "lesions", "--model", str(tmp_path / "les.pt"), "--data", str(seg_folder), "--json", str(js)]) == 0
    out = json.loads(js.read_text())
    assert {"n_images", "ap50", "ap75", "map", "per_class", "images_per_second"} <= set(out)
    assert set(out["per_class"]) == {"ggo", "consolidation"}
    assert out["n_images"] == 6 and "Evaluation took" in capsys.readouterr().out


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
