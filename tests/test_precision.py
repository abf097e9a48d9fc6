"""Inference precision: float32, or bfloat16 where the processor computes it natively."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from covidct.engine.precision import inference_dtype, native_bf16, resolve_precision


def test_resolve_precision_auto_follows_the_processor(monkeypatch) -> None:
    assert resolve_precision("fp32") == "fp32" and resolve_precision("bf16") == "bf16"
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": True, "amx_bf16": False})
    assert native_bf16("cpu") and resolve_precision("auto", "cpu") == "bf16"
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": False, "amx_bf16": True})
    assert resolve_precision("auto") == "bf16"
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx2": True})
    assert not native_bf16("cpu") and resolve_precision("auto", "cpu") == "fp32"
    # a GPU is never given bfloat16 by "auto"; an explicit choice is kept
    assert not native_bf16("cuda") and resolve_precision("auto", "cuda") == "fp32"
    assert resolve_precision("bf16", "cuda") == "bf16"
    assert inference_dtype("bf16") == torch.bfloat16 and inference_dtype("fp32") == torch.float32
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("fp16")


def _net():
    from covidct.models import SegModelConfig, build_seg_model

    torch.manual_seed(0)
    return build_seg_model(SegModelConfig(encoder="resnet18", decoder_channels=(32, 16, 16, 8, 8), input_size=64))


@pytest.mark.parametrize("fold_bn", [True, False])
def test_bf16_predictor_runs_a_bfloat16_copy_and_agrees_with_float32(fold_bn: bool) -> None:
    """The bfloat16 predictor's networks are bfloat16 copies (the caller's stays float32, folded or not); its
    outputs come back as float32 and match the float32 predictor's up to bfloat16 rounding."""
    from covidct.engine.infer import SegPredictor

    net = _net()
    images = [np.random.default_rng(k).random((80, 72), dtype=np.float32) for k in range(3)]
    ref = SegPredictor(net, fold_bn=fold_bn, crop_to_lung=False, density_classes=False, precision="fp32")
    low = SegPredictor(net, fold_bn=fold_bn, crop_to_lung=False, density_classes=False, precision="bf16")
    assert low.precision == "bf16" and ref.precision == "fp32"
    assert {p.dtype for p in low.model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in net.parameters()} == {torch.float32} and low.model is not net
    for a, b in zip(ref.predict(images), low.predict(images)):
        assert b.probs.dtype == np.float32 and b.lung_prob.dtype == np.float32
        np.testing.assert_allclose(b.probs, a.probs, atol=0.05)
        np.testing.assert_allclose(b.lung_prob, a.lung_prob, atol=0.05)
        assert np.abs(b.probs - a.probs).max() > 0   # bfloat16 really ran
        assert (a.labels == b.labels).mean() > 0.9


def test_bf16_predictor_keeps_the_companion_of_the_caller() -> None:
    """An effusion companion runs in the predictor's precision; the main network's copy still shares the
    caller's companion dict (not a float32 or bfloat16 copy of it)."""
    from covidct.engine.infer import SegPredictor
    from covidct.models import SegModelConfig, build_seg_model

    net = _net()
    torch.manual_seed(1)
    eff = build_seg_model(SegModelConfig(encoder="resnet18", decoder_channels=(32, 16, 16, 8, 8), input_size=64,
                                         lesion_classes=("background", "effusion"), lung_head=False))
    net.companions = {"effusion": eff}
    low = SegPredictor(net, fold_bn=False, crop_to_lung=False, precision="bf16")
    assert low.model.companions is net.companions
    assert {p.dtype for p in low.effusion.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in eff.parameters()} == {torch.float32}
    out = low.predict([np.random.default_rng(0).random((70, 70), dtype=np.float32)])[0]
    assert out.labels.shape == (70, 70) and out.probs.dtype == np.float32


def test_cli_notes_an_emulated_bf16_once(monkeypatch, capsys) -> None:
    """``--precision bf16`` on a processor without native bfloat16 runs, with one note on stderr; with native
    bfloat16 (or another precision) there is no note."""
    import argparse

    from covidct import cli

    args = argparse.Namespace(precision="bf16", device="cpu")
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx2": True})
    cli._precision_note(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "emulated" in err[0] and "--precision bf16" in err[0]
    cli._precision_note(argparse.Namespace(precision="auto", device="cpu"))
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": True})
    cli._precision_note(args)
    assert capsys.readouterr().err == ""
