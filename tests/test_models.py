"""Networks, offline ImageNet weights, self-describing checkpoints."""

from __future__ import annotations

import pytest
import torch

from covidct.errors import CovidctError
from covidct.models import SegModelConfig, build_seg_model, read_checkpoint, save_checkpoint
from covidct.models.checkpoint import record_metrics
from covidct.models.encoders import imagenet_state_dict
from covidct.models.registry import load_seg_model

TINY = SegModelConfig(encoder="resnet18", decoder_channels=(32, 16, 16, 8, 8), input_size=64)


def test_forward_shape_lesions_plus_lung():
    net = build_seg_model(TINY).eval()
    with torch.inference_mode():
        out = net(torch.rand(2, 1, 64, 64))
    assert out.shape == (2, 5, 64, 64)
    net = build_seg_model(TINY, lesion_classes=("background", "ggo", "consolidation"), lung_head=False, arch="fpn")
    with torch.inference_mode():
        assert net.eval()(torch.rand(1, 1, 64, 64)).shape == (1, 3, 64, 64)
    with pytest.raises(ValueError, match="unknown encoder"):
        build_seg_model(TINY, encoder="vgg99")


def test_fpn_channels_are_built_and_rebuilt_from_the_checkpoint(tmp_path):
    net = build_seg_model(TINY, arch="fpn", fpn_channels=(24, 32))
    head = net.net.segmentation_head[0]
    assert head.in_channels == 32
    assert net.net.decoder.p5.out_channels == 24
    path = save_checkpoint(tmp_path / "fpn.pt", task="seg", config=net.config.to_dict(), state_dict=net.state_dict())
    loaded, _ = load_seg_model(path)
    assert loaded.config.fpn_channels == (24, 32) and loaded.net.segmentation_head[0].in_channels == 32
    # a checkpoint written before the option existed rebuilds smp's default FPN (256 / 128)
    old = {k: v for k, v in build_seg_model(TINY, arch="fpn").config.to_dict().items() if k != "fpn_channels"}
    assert build_seg_model(SegModelConfig.from_dict(old)).net.segmentation_head[0].in_channels == 128
    with pytest.raises(ValueError, match="multiple of 32"):
        build_seg_model(TINY, arch="fpn", fpn_channels=(24, 12))


def test_unetplusplus_is_built_and_rebuilt_from_the_checkpoint(tmp_path):
    """``arch="unetplusplus"``: smp's UNet++ (nested skip paths) over the same encoder, rebuilt from its file."""
    import segmentation_models_pytorch as smp

    net = build_seg_model(TINY, arch="unetplusplus").eval()
    assert isinstance(net.net, smp.UnetPlusPlus)
    with torch.inference_mode():
        out = net(torch.rand(1, 1, 64, 64))
    assert out.shape == (1, 5, 64, 64)
    path = save_checkpoint(tmp_path / "upp.pt", task="seg", config=net.config.to_dict(), state_dict=net.state_dict())
    loaded, _ = load_seg_model(path)
    assert isinstance(loaded.net, smp.UnetPlusPlus)
    with torch.inference_mode():
        torch.testing.assert_close(loaded.eval()(torch.ones(1, 1, 64, 64)), net(torch.ones(1, 1, 64, 64)))


def test_offline_imagenet_weights_load_into_encoder():
    weights = imagenet_state_dict("efficientnet-lite0")
    net = build_seg_model(SegModelConfig(encoder="efficientnet-lite0", input_size=64), imagenet=True)
    stem = net.net.encoder.model.conv_stem.weight
    assert stem.shape[1] == 1
    torch.testing.assert_close(stem, weights["conv_stem.weight"].sum(dim=1, keepdim=True))
    block = net.net.encoder.model.blocks[1][0].conv_pw.weight
    torch.testing.assert_close(block, weights["blocks.1.0.conv_pw.weight"])
    with pytest.raises(ValueError, match="no offline ImageNet"):
        build_seg_model(TINY, imagenet=True)


def test_checkpoint_rebuilds_without_hyperparameters(tmp_path):
    net = build_seg_model(TINY).eval()
    path = save_checkpoint(tmp_path / "m.pt", task="seg", config=TINY.to_dict(), state_dict=net.state_dict(), half=True,
                           classes=["background", "ggo", "consolidation", "effusion", "lung"], input_size=64,
                           metrics={"validation": {"dice": {"infection": 0.5}}})
    payload = read_checkpoint(path)
    assert payload["versions"]["torch"] == torch.__version__
    assert payload["state_dict"]["net.segmentation_head.0.weight"].dtype == torch.float16
    loaded, meta = load_seg_model(path)
    assert loaded.config == TINY and meta["input_size"] == 64
    x = torch.rand(1, 1, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x), net(x), atol=2e-2, rtol=1e-2)
    record_metrics(path, cross_validation={"dice": {"infection": 0.7}})
    again = read_checkpoint(path)
    assert again["metrics"]["validation"] == {"dice": {"infection": 0.5}}
    assert again["metrics"]["cross_validation"]["dice"]["infection"] == 0.7
    torch.testing.assert_close(again["state_dict"]["net.segmentation_head.0.weight"],
                               payload["state_dict"]["net.segmentation_head.0.weight"])
    save_checkpoint(tmp_path / "c.pt", task="cls", config={}, state_dict={})
    with pytest.raises(CovidctError, match="not a segmentation model"):
        load_seg_model(tmp_path / "c.pt")


def test_every_saved_config_survives_json_and_other_versions():
    """Each config dataclass stored in checkpoints: JSON round trip gives the same config (tuples back),
    keys from another version are dropped and missing ones take their defaults."""
    import json

    from covidct.analysis.triage import TriageConfig
    from covidct.models.classification import ClsModelConfig
    from covidct.models.ensemble import EnsembleConfig
    from covidct.models.lesions import LesionModelConfig
    from covidct.models.maskcls import MaskClsConfig

    configs = [SegModelConfig(decoder_channels=(32, 16, 8, 8, 4), lesion_classes=("background", "ggo")),
               ClsModelConfig(classes=("Control", "Common pneumonia", "COVID-19")),
               EnsembleConfig(members=("a.pt", "b.pt"), checksums=("1", "2"), classes=("NonCOVID", "COVID"),
                              input_size=224, logit_offsets=(0.0, 0.5), tta=True),
               LesionModelConfig(anchor_sizes=(4, 8, 16, 32, 64), mask_mode="merge"),
               MaskClsConfig(top_n=16, lesion=LesionModelConfig().to_dict()),
               TriageConfig(classifier="c", classifier_sha256="x", seg_model="s", seg_model_sha256="y",
                            covid_logit_shift=2.5)]
    for cfg in configs:
        d = json.loads(json.dumps(cfg.to_dict()))
        assert type(cfg).from_dict(d) == cfg
        assert type(cfg).from_dict({**d, "added_in_a_later_version": 1}) == cfg
    assert SegModelConfig.from_dict({"encoder": "resnet18"}) == SegModelConfig(encoder="resnet18")


def test_command_line_choices_match_the_library():
    """Options whose choices the CLI writes out (to stay free of a torch import at start) offer exactly what
    the library accepts, in every sub-command that has them."""
    import argparse

    from covidct.cli import build_parser
    from covidct.engine.precision import PRECISIONS
    from covidct.models.maskcls import ROI_FEATURES

    expected = {"--precision": tuple(PRECISIONS), "--roi-features": tuple(ROI_FEATURES)}
    found: dict[str, list[tuple]] = {k: [] for k in expected}

    def walk(parser: argparse.ArgumentParser) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    walk(sub)
            for flag in set(action.option_strings) & set(expected):
                found[flag].append(tuple(action.choices))

    walk(build_parser())
    for flag, choices in found.items():
        assert choices and all(c == expected[flag] for c in choices), flag


@pytest.mark.parametrize("key, value, reason", [("encoder", "efficientnet-lite9", "unknown encoder 'efficientnet-lite9'"),
                                                ("arch", "segformer9", "unknown architecture 'segformer9'")])
def test_a_file_whose_architecture_cannot_be_built_is_one_error_naming_it(tmp_path, key, value, reason):
    """A checkpoint from a newer covidct (a setting this version does not know): a CovidctError naming the file."""
    net = build_seg_model(TINY)
    config = {**TINY.to_dict(), key: value}
    path = save_checkpoint(tmp_path / "newer.pt", task="seg", config=config, state_dict=net.state_dict())
    with pytest.raises(CovidctError, match=reason) as info:
        load_seg_model(path)
    assert "newer.pt" in str(info.value) and "\n" not in str(info.value)
