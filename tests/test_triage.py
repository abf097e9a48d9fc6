"""3-class CT triage (covidct.analysis.triage): probability pieces, the fitted shift, the scan rule,
and fitting / evaluating / analysing with tiny models on generated volumes."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import need_data, phantom_hu, write_nifti
from covidct.analysis import triage as triage_mod
from covidct.analysis.triage import (TRIAGE_CLASSES, covid_given_lesion, fit_covid_shift, scan_answer, three_class,
                                     top_lesion_slices)
from covidct.cli import main


def test_covid_given_lesion_and_three_class_probabilities():
    p = np.array([0.01, 0.2, 0.5, 0.9])
    q0 = covid_given_lesion(p, 0.0)
    assert np.allclose(q0, p, atol=1e-6)
    q = covid_given_lesion(p, 2.0)
    assert (q > p).all() and np.all(np.diff(q) > 0)                      # a shift keeps the ranking
    assert covid_given_lesion([0.5], 2.0)[0] == pytest.approx(1 / (1 + np.exp(-2.0)))
    probs = three_class(np.array([0.0, 0.5, 1.0]), np.array([0.3, 0.8, 0.1]))
    assert np.allclose(probs.sum(axis=1), 1.0)
    assert probs[0].tolist() == [1.0, 0.0, 0.0]                           # no lesion: Control
    assert probs[1] == pytest.approx([0.5, 0.1, 0.4]) and probs[2] == pytest.approx([0.0, 0.9, 0.1])


def test_fit_covid_shift_recovers_a_known_shift():
    rng = np.random.default_rng(0)
    covid = rng.random(400) < 0.3                                         # unbalanced on purpose
    logit = np.where(covid, 1.0, -1.0) + rng.normal(0, 1.0, 400) - 3.0  # a classifier 3 logits too low
    p = 1 / (1 + np.exp(-logit))
    assert fit_covid_shift(p, covid) == pytest.approx(3.0, abs=0.35)
    with pytest.raises(Exception, match="both"):
        fit_covid_shift(p[covid], covid[covid])


def _slices(areas: list[float]) -> list[dict]:
    return [{"index": k, "lesion_area_mm2": a, "infection_probability": a / (a + 100.0)} for k, a in enumerate(areas)]


def test_scan_answer_rule():
    slices = _slices([0, 50, 400, 0, 900, 10, 300, 200, 0])
    assert top_lesion_slices(slices, 3) == [2, 4, 6]
    q = {k: 0.9 for k in range(9)}
    covid = scan_answer(slices, q, percent_opacity=4.0, top_k=3)
    assert covid["label"] == "COVID-19" and covid["slices_used"] == [2, 4, 6]
    assert sum(covid["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert covid["probabilities"]["COVID-19"] > covid["probabilities"]["Common pneumonia"]
    q = {k: 0.2 for k in range(9)}
    assert scan_answer(slices, q, percent_opacity=4.0, top_k=3)["label"] == "Common pneumonia"
    assert scan_answer(slices, q, percent_opacity=0.4, top_k=3)["label"] == "Control"  # under 1 % of lung
    none = scan_answer(_slices([0, 0]), {}, percent_opacity=0.0)
    assert none["label"] == "Control" and none["probabilities"]["Control"] == 1.0


def test_slices_take_the_scan_q_or_their_own():
    from covidct.analysis.triage import VolumeScores

    g = np.array([0.0, 0.8, 0.8, 0.8, 0.2])
    scores = VolumeScores(g=g, p={1: 0.9, 2: 0.2, 3: 0.9}, top=[1, 2, 3], percent_opacity=3.0)
    assert scores.scan_q(0.0) == pytest.approx((0.9 + 0.2 + 0.9) / 3)
    scan = scores.probabilities(range(5), 0.0)
    assert scan.argmax(axis=1).tolist() == [0, 2, 2, 2, 0]          # one patient, one kind of pneumonia
    assert np.allclose(scan[1:, 2] / g[1:], scores.scan_q(0.0)) and np.allclose(scan.sum(axis=1), 1.0)
    own = scores.probabilities(range(5), 0.0, context="slice")
    assert own.argmax(axis=1).tolist() == [0, 2, 1, 2, 0]           # slice 2's own q calls it Common pneumonia
    assert own[4].tolist() == pytest.approx([0.8, 0.1, 0.1])         # no own q: undecided between the two
    assert scores.scan_q(-10.0) < 0.01 and scores.probabilities([1], -10.0).argmax() == 1   # the shift moves q
    low = VolumeScores(g=g, p={1: 0.9, 2: 0.2, 3: 0.9}, top=[1, 2, 3], percent_opacity=0.5)
    assert low.scan_q(0.0) == scores.scan_q(0.0)                      # under 1 % the slices still get the scan's q
    assert VolumeScores(g=np.zeros(3), p={}, top=[], percent_opacity=0.0).scan_q(3.0) == 0.5   # no lesions
    with pytest.raises(Exception, match="slice context"):
        scores.probabilities([1], 0.0, context="patient")


def test_score_volume_classifies_the_top_slices_only(monkeypatch):
    from covidct.analysis.triage import TriageConfig, score_volume

    calls = []
    cfg = TriageConfig(classifier="c", classifier_sha256="", seg_model="s", seg_model_sha256="", covid_logit_shift=0.0,
                       top_k=2)
    sigmas = []
    triage = SimpleNamespace(config=cfg, covid_probability=lambda vol, ks, window, progress=False, sigma_px=0.0:
                             sigmas.append(sigma_px) or calls.append(list(ks)) or np.full(len(ks), 0.7))
    vol = SimpleNamespace(spacing=(1.0, 1.0), source="v.nii.gz", n_slices=5)
    result = SimpleNamespace(slices=_slices([0, 50, 400, 900, 10]), burden={"percent_opacity": 2.0},
                             smoothing_sigma_px=0.0)
    top = score_volume(triage, vol, result=result)
    assert calls == [[2, 3]] and top.p == {2: 0.7, 3: 0.7} and top.top == [2, 3]
    result.smoothing_sigma_px = 1.3                                    # a noisy scan: its slices smoothed alike
    score_volume(triage, vol, result=result)
    assert sigmas == [0.0, 1.3]
    result.smoothing_sigma_px = 0.0
    assert sorted(score_volume(triage, vol, result=result, classify="lesions").p) == [1, 2, 3, 4]
    result.burden["percent_opacity"] = 0.2                             # under 1 %: the top slices still get a q
    assert score_volume(triage, vol, result=result).p == {2: 0.7, 3: 0.7} and calls[-1] == [2, 3]
    result.slices = _slices([0, 0, 0, 0, 0])                           # no lesions: nothing to classify
    assert score_volume(triage, vol, result=result).p == {} and calls[-1] == []
    with pytest.raises(Exception, match="pixel spacing"):
        score_volume(triage, SimpleNamespace(spacing=None, source="x.png"), result=result)


def _ct_md_folder(root: Path) -> Path:
    """COVID-CT-MD layout: a COVID-19, a CAP and a Normal patient as small NIfTI phantoms."""
    root.mkdir(parents=True)
    rows = ["patient_id,slice_index,infection"]
    for i, (pid, diagnosis) in enumerate((("P1", "COVID-19"), ("C1", "CAP"), ("N1", "Normal"))):
        write_nifti(root / f"{pid}.nii.gz", phantom_hu(6, 64, seed=i), spacing=(5.0, 3.0, 3.0))
        rows += [f"{pid},{k},{int(diagnosis != 'Normal' and k in (2, 3, 4))}" for k in range(6)]
    (root / "patients.csv").write_text("patient_id,diagnosis,path\nP1,COVID-19,P1.nii.gz\nC1,CAP,C1.nii.gz\n"
                                       "N1,Normal,N1.nii.gz\n")
    (root / "slice_labels.csv").write_text("\n".join(rows) + "\n")
    return root


def _labelled_lesions(monkeypatch) -> None:
    """Stand-in lesion stage: a 4 cm² lesion on slices 2-4 of the pneumonia patients (their labelled
    slices), none elsewhere, so the test controls which slices pass the gate."""
    def fake_analyze(vol, predictor, *, progress=True, batch_size=8, window="model"):
        sick = not Path(str(vol.source)).name.startswith("N1")
        areas = [400.0 if sick and k in (2, 3, 4) else 0.0 for k in range(vol.n_slices)]
        return SimpleNamespace(slices=_slices(areas), burden={"percent_opacity": 3.0 if sick else 0.0},
                               smoothing_sigma_px=0.0)

    monkeypatch.setattr(triage_mod, "analyze_volume", fake_analyze)


def test_fit_and_evaluate_triage(tmp_path, tiny_seg_model, tiny_cls_model, monkeypatch, capsys):
    data = _ct_md_folder(tmp_path / "ctmd")
    _labelled_lesions(monkeypatch)
    out = tmp_path / "triage.pt"
    assert main(["train", "triage", "--data", str(data), "--classifier", str(tiny_cls_model), "--model",
                 str(tiny_seg_model), "-o", str(out)]) == 0
    fitted = json.loads(capsys.readouterr().out)
    assert fitted["fit"]["slices"] == 6 and fitted["fit"]["covid_slices"] == 3      # P1 and C1, slices 2-4
    assert fitted["fit"]["patients"] == ["C1", "P1"] and "in-sample" in fitted["note"]
    cfg = torch.load(out, weights_only=True)["config"]
    assert cfg["covid_logit_shift"] == pytest.approx(fitted["fit"]["covid_logit_shift"])
    assert cfg["classifier"] == str(tiny_cls_model.resolve())

    js = tmp_path / "eval.json"
    assert main(["evaluate", "cls", "--model", str(out), "--data", str(data), "--json", str(js),
                 "--precision", "fp32"]) == 0
    text = capsys.readouterr().out
    assert "3-class CT triage" in text and "COVID-19 sensitivity" in text
    assert "fitted on C1, P1: in-sample" in text
    res = json.loads(js.read_text())
    assert res["classes"] == list(TRIAGE_CLASSES) and res["n_images"] == 3 + 3 + 6 and res["precision"] == "fp32"
    cm = np.array(res["confusion"])
    # every unlabelled Normal slice has no lesion: Control; every gated slice is one of the pneumonias
    assert cm[0].tolist() == [6, 0, 0] and cm[1:, 0].sum() == 0 and cm.sum() == 12
    assert set(res["auc"]) == set(TRIAGE_CLASSES) and res["ct_slice_targets"]["control_not_covid"] == 1.0
    assert res["in_sample_patients"] == ["C1", "P1"]

    # the fitted classifier file changes: the triage model refuses it
    torch.save({**torch.load(tiny_cls_model, weights_only=True), "temperature": 2.0}, tiny_cls_model)
    assert main(["evaluate", "cls", "--model", str(out), "--data", str(data)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "changed since the triage model" in err


def test_classify_with_a_triage_model(tmp_path, tiny_seg_model, tiny_cls_model, monkeypatch, capsys):
    data = _ct_md_folder(tmp_path / "ctmd")
    _labelled_lesions(monkeypatch)
    assert main(["train", "triage", "--data", str(data), "--classifier", str(tiny_cls_model), "--model",
                 str(tiny_seg_model), "-o", str(tmp_path / "t.pt")]) == 0
    capsys.readouterr()
    js = tmp_path / "c.json"
    assert main(["classify", str(data / "P1.nii.gz"), "--model", str(tmp_path / "t.pt"), "--json", str(js),
                 "--precision", "bf16"]) == 0
    res = json.loads(js.read_text())
    assert res["classes"] == list(TRIAGE_CLASSES) and len(res["slices"]) == 6 and res["precision"] == "bf16"
    labels = [r["label"] for r in res["slices"]]
    assert [labels[k] for k in (0, 1, 5)] == ["Control"] * 3 and all(labels[k] != "Control" for k in (2, 3, 4))
    from PIL import Image

    Image.fromarray(np.zeros((20, 20), np.uint8)).save(tmp_path / "x.png")
    capsys.readouterr()
    assert main(["classify", str(tmp_path / "x.png"), "--model", str(tmp_path / "t.pt")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "x.png" in err and "pixel spacing" in err


def test_triage_needs_volumes(tmp_path):
    from PIL import Image

    (tmp_path / "COVID").mkdir()
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(tmp_path / "COVID" / "a.png")
    with pytest.raises(Exception, match="needs CT volumes"):
        triage_mod._record_scores(SimpleNamespace(), triage_mod.load_records(tmp_path, classes=TRIAGE_CLASSES),
                                  classify="top", progress=False)


def test_analyze_gives_the_triage_answer(tmp_path, tiny_seg_model, tiny_cls_model, monkeypatch, capsys):
    data = _ct_md_folder(tmp_path / "ctmd")
    with monkeypatch.context() as m:
        _labelled_lesions(m)
        assert main(["train", "triage", "--data", str(data), "--classifier", str(tiny_cls_model), "--model",
                     str(tiny_seg_model), "-o", str(tmp_path / "t.pt")]) == 0
    out = tmp_path / "out"
    assert main(["analyze", str(data / "P1.nii.gz"), "-o", str(out), "--model", str(tiny_seg_model),
                 "--classifier", "none", "--triage", str(tmp_path / "t.pt"), "--no-viewer"]) == 0
    report = json.loads((out / "report.json").read_text())
    d = report["diagnosis"]
    assert d["label"] in TRIAGE_CLASSES and d["lesion_finding"] in ("lesions present", "no lesions found")
    assert sum(d["probabilities"][c] for c in TRIAGE_CLASSES) == pytest.approx(1.0, abs=1e-5)
    assert (d["label"] == "Control") == (report["percent_opacity"] < 1.0)
    assert d["triage"]["model"] == "t" and "triage" in {m["task"] for m in report["models"]}
    assert "C1, P1 (6 slices" in d["note"]                              # what its shift was fitted on
    q = d["triage"]["covid_given_lesions"]
    for row in report["slices"]:   # every slice: its own g and the scan's q
        assert row["triage_probabilities"]["COVID-19"] == pytest.approx(row["infection_probability"] * q, abs=2e-6)
    assert d["label"] in (out / "report.html").read_text()
    # without a triage model the lesion-only answer stays
    assert main(["analyze", str(data / "P1.nii.gz"), "-o", str(tmp_path / "out2"), "--model", str(tiny_seg_model),
                 "--classifier", "none", "--triage", "none", "--no-viewer"]) == 0
    d2 = json.loads((tmp_path / "out2" / "report.json").read_text())["diagnosis"]
    assert d2["label"] in ("lesions present", "no lesions found") and "triage" not in d2


@pytest.mark.realdata
def test_shipped_triage_on_real_slices():
    """The shipped triage model loads by name with nothing passed by hand, and its classifier ranks a
    labelled COVID-19 slice of P001 above a CAP slice of cap001 after the CT shift."""
    from covidct.io import read
    from covidct.io.nifti import working_slice

    need_data("covid-ct-md")
    t = triage_mod.load_triage()
    assert t.config.classes == TRIAGE_CLASSES and t.config.covid_logit_shift > 0
    p001 = read(need_data("covid-ct-md", "P001"))
    cap = read(need_data("covid-ct-md", "cap001.nii.gz"))
    q_covid = covid_given_lesion(t.covid_probability(p001, [60]), t.config.covid_logit_shift)[0]
    q_cap = covid_given_lesion(t.covid_probability(cap, [working_slice(cap, 100)]), t.config.covid_logit_shift)[0]
    assert 0 <= q_cap < q_covid <= 1
    # analyze's triage streams its 20-member classifier (one member in memory at a time): the same numbers
    from covidct.models.ensemble import StreamedEnsemble
    from covidct.report.scan_report import ScanModels

    streamed = ScanModels().triage()
    assert isinstance(streamed.classifier, StreamedEnsemble)
    np.testing.assert_array_equal(streamed.covid_probability(p001, [60, 80]), t.covid_probability(p001, [60, 80]))


def test_triage_checks_slice_indices_and_reports_missing_classes(tmp_path, tiny_seg_model, tiny_cls_model,
                                                                  monkeypatch, capsys):
    data = _ct_md_folder(tmp_path / "ctmd")
    _labelled_lesions(monkeypatch)
    assert main(["train", "triage", "--data", str(data), "--classifier", str(tiny_cls_model), "--model",
                 str(tiny_seg_model), "-o", str(tmp_path / "t.pt")]) == 0
    # only the COVID-19 patient: no Control slices, so no Control figures
    (data / "patients.csv").write_text("patient_id,diagnosis,path\nP1,COVID-19,P1.nii.gz\n")
    (data / "slice_labels.csv").write_text("patient_id,slice_index,infection\nP1,2,1\nP1,3,1\n")
    capsys.readouterr()
    js = tmp_path / "e.json"
    assert main(["evaluate", "cls", "--model", str(tmp_path / "t.pt"), "--data", str(data), "--json", str(js)]) == 0
    targets = json.loads(js.read_text())["ct_slice_targets"]
    assert targets["control_not_covid"] is None and targets["covid_sensitivity"] in (0.0, 0.5, 1.0)
    assert "called Control n/a" in capsys.readouterr().out
    # a labelled slice the scan does not have: one line naming the scan
    (data / "slice_labels.csv").write_text("patient_id,slice_index,infection\nP1,2,1\nP1,9,1\n")
    assert main(["evaluate", "cls", "--model", str(tmp_path / "t.pt"), "--data", str(data)]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]   # after the progress bar: one line, no traceback
    assert last.startswith("covidct: error: ") and "P1.nii.gz" in last and "slice 9 outside" in last
