"""Every kind of bad input: one line on stderr naming the file, exit 2, no traceback, input untouched."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from conftest import phantom_hu, write_ct_series
from covidct.cli import main


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "covidct.cli", *args], capture_output=True, text=True, timeout=120)


def _bad_inputs(tmp_path):
    cases = {}
    cases["missing"] = (tmp_path / "nope.dcm", "no such file")
    (tmp_path / "empty").mkdir()
    cases["empty folder"] = (tmp_path / "empty", "empty")
    png = tmp_path / "trunc.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(png)
    png.write_bytes(png.read_bytes()[:200])
    cases["truncated png"] = (png, "truncated")
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"this is not an image at all" * 10)
    cases["corrupt image"] = (junk, "not an image")
    tiny = tmp_path / "tiny.png"
    Image.fromarray(np.zeros((3, 5), np.uint8)).save(tiny)
    cases["3x5-pixel image"] = (tiny, "5×3 pixels: too small for a CT slice")
    paths = write_ct_series(tmp_path / "ct", phantom_hu(1, 32))
    dcm = tmp_path / "trunc.dcm"
    dcm.write_bytes(paths[0].read_bytes()[:400])
    cases["truncated dicom"] = (dcm, "no pixel data nor image attributes (a truncated file, or not an image: CT Image")
    import pydicom

    ds = pydicom.dcmread(paths[0])
    del ds.PixelData
    nopix = tmp_path / "nopixels.dcm"
    ds.save_as(nopix)
    cases["no pixel data"] = (nopix, "no pixel data although its header describes an image (a truncated file?)")
    ds = pydicom.dcmread(paths[0])
    ds.Rows = 8   # the 32 x 32 pixels now read as 4 frames of 8 x 32 (pydicom warns about it)
    short = tmp_path / "rows.dcm"
    ds.save_as(short)
    cases["rows that do not match the pixel data"] = (short, "pixel data does not match its header: 8 rows")
    ds = pydicom.dcmread(paths[0])
    ds.PixelSpacing = [0, 0]
    zero = tmp_path / "zerospacing.dcm"
    ds.save_as(zero)
    cases["zero pixel spacing"] = (zero, "pixel spacing 0.0 × 0.0 is not two positive numbers")
    mr = write_ct_series(tmp_path / "mr", phantom_hu(1, 32), modality="MR")[0]
    cases["non-CT"] = (mr, "modality is MR")
    import nibabel as nib

    nii = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8), np.int16), np.eye(4)), nii)
    cases["2-D nifti"] = (nii, "3-D")
    nospacing = nib.Nifti1Image(np.full((16, 16, 4), -1000, np.int16), None)
    nospacing.header.set_zooms((0, 1, 1))   # no sform: nibabel would read the 0 as 1 mm
    nib.save(nospacing, tmp_path / "nospacing.nii.gz")
    cases["nifti without spacing"] = (tmp_path / "nospacing.nii.gz", "gives no voxel spacing")
    nib.save(nib.Nifti1Image(np.full((64, 64, 8), -1000, np.int16), np.eye(4)), tmp_path / "whole.nii")
    cut = tmp_path / "cut.nii"   # nibabel's reason for a short file spans two lines
    cut.write_bytes((tmp_path / "whole.nii").read_bytes()[:1000])
    cases["truncated nifti"] = (cut, "could the file be damaged")
    return cases


def test_bad_inputs_give_one_line_exit_2(tmp_path, capsys):
    for name, (path, reason) in _bad_inputs(tmp_path).items():
        before = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
        code = main(["info", str(path)])
        err = capsys.readouterr().err.strip()
        assert code == 2, name
        assert len(err.splitlines()) == 1, (name, err)
        assert str(path) in err and reason.lower() in err.lower(), (name, err)
        if before:
            assert hashlib.sha256(path.read_bytes()).hexdigest() == before


def test_subprocess_has_no_traceback(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    res = _run_cli("info", str(bad))
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    assert res.stderr.strip().startswith("covidct: error:") and str(bad) in res.stderr


def test_library_warnings_do_not_reach_stderr(tmp_path):
    """pydicom warns in several lines about pixel data that holds more frames than its header states; the
    command prints only its own one-line reason."""
    import pydicom

    ds = pydicom.dcmread(write_ct_series(tmp_path / "ct", phantom_hu(1, 32))[0])
    ds.Rows = 8
    ds.save_as(tmp_path / "rows.dcm")
    res = _run_cli("info", str(tmp_path / "rows.dcm"))
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [f"covidct: error: {tmp_path / 'rows.dcm'}: pixel data does not match "
                                               "its header: 8 rows × 32 columns declared, the data holds 4 such frames"]


def test_bad_confusion_matrix(capsys):
    assert main(["metrics", "--confusion", "1,2;3"]) == 2
    assert "square" in capsys.readouterr().err
    assert main(["metrics", "--confusion", "1,2;3,4", "--classes", "a,b,c"]) == 2


def test_missing_model_file(tmp_path, seg_folder, capsys):
    assert main(["evaluate", "seg", "--model", str(tmp_path / "none.pt"), "--data", str(seg_folder)]) == 2
    err = capsys.readouterr().err
    assert "none.pt" in err and len(err.strip().splitlines()) == 1
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a model")
    assert main(["evaluate", "seg", "--model", str(junk), "--data", str(seg_folder)]) == 2
    assert "junk.pt" in capsys.readouterr().err


def test_segmentation_data_that_is_missing_or_a_file_is_named_so(tmp_path, capsys):
    """``evaluate seg`` / ``evaluate lesions`` / ``train seg`` on a path that does not exist or is a file: one line
    saying that, not that a folder lacks images/."""
    missing, a_file = tmp_path / "nowhere", tmp_path / "slice.png"
    a_file.write_bytes(b"x")
    for data, reason in ((missing, "no such folder"), (a_file, "not a folder")):
        for argv in (["evaluate", "seg"], ["evaluate", "lesions"], ["train", "seg", "-o", str(tmp_path / "m.pt")]):
            assert main([*argv, "--data", str(data)]) == 2
            err = capsys.readouterr().err.strip()
            assert len(err.splitlines()) == 1 and err.startswith(f"covidct: error: {data}: {reason}"), (argv, err)
    assert not (tmp_path / "m.pt").exists()


def test_classification_csvs_with_missing_columns_or_bad_values(tmp_path, capsys):
    """A COVID-CT-MD-style folder whose CSVs lack a column or hold a non-number: one line naming the file."""
    (tmp_path / "patients.csv").write_text("patient_id,diagnosis,path\nP9,COVID-19,P9.nii.gz\n")
    (tmp_path / "P9.nii.gz").touch()   # listed scans must exist; this one is never read
    labels = tmp_path / "slice_labels.csv"
    labels.write_text("patient_id,slice_index\nP9,0\n")
    assert main(["evaluate", "cls", "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(labels) in err and "'infection'" in err
    labels.write_text("patient_id,slice_index,infection\nP9,0,1\nP9,one,1\n")
    assert main(["evaluate", "cls", "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(labels) in err and "line 3" in err


def test_a_listed_file_that_is_missing_fails_before_any_work(tmp_path, capsys):
    """split.csv naming a file that is not there: one line naming it, before a progress bar starts."""
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "split.csv").write_text("path,label\na.png,COVID\nb.png,NonCOVID\n")
    assert main(["evaluate", "cls", "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(tmp_path / "b.png") in err and "file not found" in err


def test_a_segmentation_folder_given_to_evaluate_cls_says_so(tmp_path, capsys, seg_folder):
    """Its images/ masks/ lung/ sub-folders are no classes: one line pointing at evaluate seg."""
    assert main(["evaluate", "cls", "--data", str(seg_folder)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(seg_folder) in err and "segmentation folder" in err
    assert "covidct evaluate seg" in err and "label 'images'" not in err


def test_segmentation_folder_with_a_wrong_size_mask_fails_before_any_work(tmp_path, capsys):
    for sub in ("images", "masks"):
        (tmp_path / sub).mkdir()
    for k in range(3):
        Image.fromarray(np.zeros((40, 48), np.uint8)).save(tmp_path / "images" / f"{k}.png")
        Image.fromarray(np.zeros((40, 48) if k != 2 else (48, 40), np.uint8)).save(tmp_path / "masks" / f"{k}.png")
    assert main(["evaluate", "seg", "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err                       # no progress bar started
    assert str(tmp_path / "masks" / "2.png") in err and "differs from its image" in err


def test_numeric_training_options_out_of_range_give_one_line_and_no_model(tmp_path, capsys, seg_folder):
    """An epoch count of 0, a 7-pixel input, a zero batch, a negative learning rate, N = 0 RoIs or one fold:
    one line naming the option, exit 2, nothing written (these used to train, or end in a multi-line error)."""
    out = tmp_path / "m.pt"
    cases = [
        (["train", "seg", "--data", str(seg_folder), "--epochs", "0"], "--epochs must be at least 1, got 0"),
        (["train", "seg", "--data", str(seg_folder), "--input-size", "7"], "--input-size must be at least 32, got 7"),
        (["train", "lesions", "--data", str(seg_folder), "--batch-size", "0"], "--batch-size must be at least 1"),
        (["train", "lesions", "--data", str(seg_folder), "--lr", "-1"], "--lr must be positive, got -1"),
        (["train", "cls", "--data", str(seg_folder), "--input-size", "0"], "--input-size must be at least 32"),
        (["train", "maskcls", "--data", str(seg_folder), "--top-n", "0"], "--top-n must be at least 1, got 0"),
        (["train", "seg", "--data", str(seg_folder), "--folds", "1", "--fold", "0"], "--folds must be 0 (no folds) or at least 2"),
        (["pretrain", "seg", "--data", str(seg_folder), "--epochs", "0"], "--epochs must be at least 1"),
    ]
    for args, reason in cases:
        assert main([*args, "-o", str(out)]) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and reason in err[0], (args, err)
        assert not out.exists() and not (tmp_path / "m_run").exists(), args


def test_unexpected_errors_stay_on_one_line(monkeypatch, capsys):
    """The last-resort handler folds a multi-line exception message (e.g. pydantic's) into one line."""
    import covidct.cli as cli

    def boom(args):
        raise ValueError("1 validation error for X\n  size\n    must be >= 1")

    monkeypatch.setattr(cli, "_cmd_info", boom)
    assert main(["info", "anything"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["covidct: error: ValueError: 1 validation error for X size must be >= 1 (run with --debug for details)"]


def test_analyze_device_that_is_not_here_is_one_line_before_any_work(tmp_path, capsys):
    """``--device`` is checked before the scan is read: an unknown name, or CUDA on a machine without it, is one
    line naming ``--device`` and the reason, exit 2, no output folder. ``cpu`` passes the same check."""
    import torch

    from covidct.engine.common import check_device

    write_ct_series(tmp_path / "s", phantom_hu(3, 32))
    assert check_device("cpu") == "cpu"
    cases = [("foo", "is not a device PyTorch knows")]
    if not torch.cuda.is_available():
        cases += [("cuda", "no CUDA device is available"), ("cuda:1", "no CUDA device is available")]
    for device, reason in cases:
        out = tmp_path / f"out_{device.replace(':', '_')}"
        assert main(["analyze", str(tmp_path / "s"), "-o", str(out), "--device", device]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [err[0]] and err[0].startswith("covidct: error: --device: ") and reason in err[0], err
        assert not out.exists()


def test_output_paths_that_cannot_be_written_are_one_line_before_any_work(tmp_path, capsys):
    """-o naming a file where a folder is written, a folder where a file is, a path below a file, --json naming
    a folder: one line naming the path, exit 2, before anything is read (the input here does not even exist)."""
    a_file, a_folder = tmp_path / "taken.txt", tmp_path / "folder"
    a_file.write_text("keep me")
    a_folder.mkdir()
    missing = str(tmp_path / "no-input.nii.gz")
    cases = [
        (["analyze", missing, "-o", str(a_file)], a_file, "names an existing file; give a folder"),
        (["predict", missing, "-o", str(a_file)], a_file, "names an existing file; give a folder"),
        (["analyze", missing, "-o", str(a_file / "out")], a_file, "is a file, so -o"),
        (["train", "seg", "--data", missing, "-o", str(a_folder)], a_folder, "names a folder; give a file name"),
        (["evaluate", "seg", "--data", missing, "--json", str(a_folder)], a_folder, "--json names a folder"),
        (["metrics", "--confusion", "1,2;3,4", "--plot", str(a_folder)], a_folder, "--plot names a folder"),
    ]
    for argv, named, reason in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"covidct: error: {named}: ") and reason in err[0], (argv, err)
    assert a_file.read_text() == "keep me" and not any(a_folder.iterdir())


def test_classifier_training_on_one_class_is_one_line_and_writes_nothing(tmp_path, capsys):
    """A folder holding a single class (or a validation split of a single class) cannot train or select a
    classifier: `train cls` and `train maskcls` say so before any work, and leave no model or run folder."""
    rng = np.random.default_rng(0)
    one = tmp_path / "one"
    (one / "COVID").mkdir(parents=True)
    for i in range(24):
        Image.fromarray(rng.integers(0, 255, (48, 48), dtype=np.uint8)).save(one / "COVID" / f"{i}.png")
    both = tmp_path / "both"
    rows = ["path,label,split"]
    for i in range(24):
        label = "COVID" if i % 2 else "NonCOVID"
        Image.fromarray(rng.integers(0, 255, (48, 48), dtype=np.uint8)).save(tmp_path / f"b{i}.png")
        split = "val" if i >= 20 and label == "COVID" else "train"   # validation: COVID only
        rows.append(f"{tmp_path / f'b{i}.png'},{label},{split}")
    both.mkdir()
    (both / "split.csv").write_text("\n".join(rows) + "\n")
    cases = [("cls", one, "no training image of class NonCOVID"),
             ("maskcls", one, "no training image of class NonCOVID"),
             ("cls", both, "every validation image is of class COVID")]
    for task, data, reason in cases:
        out = tmp_path / f"{task}.pt"
        assert main(["train", task, "--data", str(data), "-o", str(out), "--epochs", "1"]) == 2, (task, data)
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and str(data) in err[0] and reason in err[0], err
        assert not out.exists() and not (tmp_path / f"{task}_run").exists()


def test_a_start_model_of_another_kind_or_encoder_is_named_once(tmp_path, seg_folder, tiny_seg_model, capsys):
    """`--init` / `--encoder-init` naming a model of another task or encoder: one line, the file named once, what
    it is said, no model written."""
    cases = [["train", "lesions", "--data", str(seg_folder), "--backbone", "efficientnet-lite0", "--init",
              str(tiny_seg_model), "-o", str(tmp_path / "l.pt"), "--epochs", "1"],
             ["train", "seg", "--data", str(seg_folder), "--encoder", "efficientnet-lite0", "--encoder-init",
              str(tiny_seg_model), "-o", str(tmp_path / "s.pt"), "--epochs", "1", "--batch-size", "2"]]
    for argv in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].count(str(tiny_seg_model)) == 1, err
        assert "with encoder efficientnet-lite0 (it is a 'seg' model with encoder resnet18)" in err[0], err
        assert not Path(argv[argv.index("-o") + 1]).exists()
