"""Dataset layouts, patient-level splits, the data-root setting."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import need_data
from covidct.data import (
    BINARY_CLASSES, THREE_CLASSES, SegFolder, canonical_label, data_root, detect_layout, group_kfold, group_split, load_records,
)
from covidct.errors import InputError


def test_seg_folder(seg_folder):
    f = SegFolder(seg_folder)
    assert len(f) == 6 and f.has_masks4 and f.has_effusion and f.has_lung
    s = f[0]
    assert s.image.shape == s.labels.shape == s.lung.shape
    assert set(np.unique(s.labels)) <= {0, 1, 2, 3} and 3 in s.labels
    assert len(SegFolder(seg_folder, split="test")) == 2
    assert f.groups == [f"infnet:{i}" for i in f.ids]
    assert SegFolder(seg_folder, ids=f.ids[:2]).ids == f.ids[:2]
    with pytest.raises(InputError, match="no image with id nope"):
        SegFolder(seg_folder, ids=[f.ids[0], "nope"])
    with pytest.raises(InputError, match="no slice in split 'validation' \\(its splits: test, train\\)"):
        SegFolder(seg_folder, split="validation")


def test_seg_folder_without_masks4_has_no_effusion(tmp_path):
    from conftest import make_seg_folder

    f = SegFolder(make_seg_folder(tmp_path / "s", masks4=False))
    assert not f.has_effusion and all(3 not in f[i].labels for i in range(len(f)))
    with pytest.raises(InputError, match="no images/"):
        SegFolder(tmp_path)


def _img(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(path)


def test_layouts(tmp_path):
    # COVIDx-CT names
    for name in ("NCP_96_1328_0032.png", "CP_12_3_0001.png", "Normal_5_1_0010.png", "Normal_5_1_0011.png"):
        _img(tmp_path / "covidx" / name)
    recs = load_records(tmp_path / "covidx", classes=THREE_CLASSES)
    assert detect_layout(tmp_path / "covidx") == "covidx"
    assert sorted(r.label for r in recs) == ["COVID-19", "Common pneumonia", "Control", "Control"]
    assert {r.patient for r in recs} == {"96", "12", "5"}
    # folder per class, mapped to binary
    for cls in ("COVID", "NonCOVID"):
        _img(tmp_path / "fpc" / cls / "a.png")
    recs = load_records(tmp_path / "fpc", classes=BINARY_CLASSES)
    assert detect_layout(tmp_path / "fpc") == "folder-per-class" and sorted(r.label for r in recs) == ["COVID", "NonCOVID"]
    # split.csv
    _img(tmp_path / "csv" / "x" / "1.png")
    _img(tmp_path / "csv" / "x" / "2.png")
    (tmp_path / "csv" / "split.csv").write_text("path,label,split\nx/1.png,COVID,train\nx/2.png,NonCOVID,test\n")
    assert [r.label for r in load_records(tmp_path / "csv", split="test")] == ["NonCOVID"]
    with pytest.raises(InputError):
        load_records(tmp_path / "csv" / "x" / "none")
    assert canonical_label("CAP", THREE_CLASSES) == "Common pneumonia"
    assert canonical_label("Normal", BINARY_CLASSES) == "NonCOVID"


def test_group_split_keeps_patients_together():
    items = list(range(100))
    groups = [i // 7 for i in items]
    train, val = group_split(items, groups, val_fraction=0.25, seed=3)
    assert len(train) + len(val) == 100 and 20 <= len(val) <= 32
    assert not {i // 7 for i in train} & {i // 7 for i in val}
    assert group_split(items, groups, val_fraction=0.25, seed=3) == (train, val)


def test_group_kfold_validates_every_item_once():
    items = list(range(50))
    groups = [i // 3 for i in items]
    seen: list[int] = []
    for fold in range(5):
        train, val = group_kfold(items, groups, n_folds=5, fold=fold, seed=1)
        assert sorted(train + val) == items and 8 <= len(val) <= 12
        assert not {i // 3 for i in train} & {i // 3 for i in val}
        seen += val
    assert sorted(seen) == items
    with pytest.raises(ValueError):
        group_kfold(items, groups, n_folds=5, fold=5)


def test_group_kfold_stratified_keeps_each_class_share_and_big_groups_whole():
    # 40 "NonCOVID" items with one group of 12, 20 "COVID" items in pairs
    labels = ["N"] * 40 + ["C"] * 20
    groups = ["big"] * 12 + [f"n{i}" for i in range(28)] + [f"c{i // 2}" for i in range(20)]
    items = list(range(60))
    seen: list[int] = []
    for fold in range(4):
        train, val = group_kfold(items, groups, n_folds=4, fold=fold, seed=0, strata=labels)
        assert sum(labels[i] == "C" for i in val) in (4, 6)  # 20 COVID in pairs over 4 folds
        assert sum(labels[i] == "N" for i in val) in (9, 10, 12)  # the big group is one fold's share
        assert not {groups[i] for i in train} & {groups[i] for i in val}
        seen += val
    assert sorted(seen) == items


def test_numbered_names_are_grouped_like_the_official_ucsd_split(tmp_path):
    from covidct.data.classification import numbered_name_groups

    names = ["N/25.png", "N/25%0.jpg", "N/26%3.jpg", "N/28.png", "N/1058.png", "N/1059.png", "N/1061.png", "N/a.png"]
    assert numbered_name_groups(names) == ["run-25", "run-25", "run-25", "run-28", "run-1058", "run-1058",
                                           "run-1061", None]
    # numbers that are a plain index (one run holding most names): only shared leading numbers group
    assert numbered_name_groups([f"{i}.png" for i in range(6)] + ["3%1.png"]) == [
        "run-0", "run-1", "run-2", "run-3", "run-4", "run-5", "run-3"]
    (tmp_path / "split.csv").write_text("path,label,split,source_paper\nC/1.png,COVID,train,doi:x\n"
                                        "C/2.png,COVID,train,\nN/1.png,NonCOVID,train,\nN/2.png,NonCOVID,val,\n")
    rec = load_records(tmp_path, require_files=False)
    # a source column wins; numbering groups only within one label and folder
    assert [r.patient for r in rec] == ["doi:x", "COVID/C/run-2", "NonCOVID/N/run-1", "NonCOVID/N/run-2"]


def test_data_root_setting(monkeypatch, tmp_path):
    monkeypatch.setenv("COVIDCT_DATA", str(tmp_path))
    assert data_root() == tmp_path


@pytest.mark.realdata
def test_real_layouts():
    ucsd = load_records(need_data("ucsd-covid-ct"), classes=BINARY_CLASSES)
    assert len(ucsd) == 543 and sum(r.label == "COVID" for r in ucsd) == 251
    assert {r.split for r in ucsd} == {"train", "val"}
    md = load_records(need_data("covid-ct-md"), classes=THREE_CLASSES)
    counts = {c: sum(r.label == c for r in md) for c in THREE_CLASSES}
    assert counts == {"Control": 154, "Common pneumonia": 30, "COVID-19": 80}
    semiseg = SegFolder(need_data("covid-semiseg"))
    assert len(semiseg) == 50 and semiseg.has_effusion
    medseg = SegFolder(need_data("medseg-512"))
    assert len(medseg) == 52 and medseg.has_effusion
    assert set(semiseg.groups) <= set(medseg.groups)


def test_covid_ct_md_normal_patients_need_no_slice_labels(tmp_path):
    """COVID-CT-MD distributes no slice labels for Normal patients: a Normal patient without rows in
    slice_labels.csv contributes all its slices (``n_slices`` of patients.csv, else counted in the scan)."""
    from conftest import phantom_hu, write_nifti

    write_nifti(tmp_path / "N2.nii.gz", phantom_hu(5, 32))
    (tmp_path / "patients.csv").write_text("patient_id,diagnosis,path,n_slices\nP1,COVID-19,P1.nii.gz,4\n"
                                           "N1,Normal,N1.nii.gz,3\nN2,Normal,N2.nii.gz,\n")
    (tmp_path / "slice_labels.csv").write_text("patient_id,slice_index,infection\nP1,0,0\nP1,1,1\nP1,2,1\nP1,3,0\n")
    (tmp_path / "P1.nii.gz").touch()   # P1 and N1 are listed only: their files need not be read
    (tmp_path / "N1.nii.gz").touch()
    recs = load_records(tmp_path, classes=THREE_CLASSES)
    assert [(r.patient, r.slice_index, r.label) for r in recs] == [
        ("P1", 1, "COVID-19"), ("P1", 2, "COVID-19"), ("N1", 0, "Control"), ("N1", 1, "Control"),
        ("N1", 2, "Control"), *[("N2", k, "Control") for k in range(5)]]
    (tmp_path / "patients.csv").write_text("patient_id,diagnosis,path,n_slices\nP1,COVID-19,P1.nii.gz,4\n"
                                           "N1,Normal,N1.nii.gz,three\n")
    with pytest.raises(InputError, match="n_slices"):
        load_records(tmp_path, classes=THREE_CLASSES)
    # a listed scan that is not in the folder is an error (it used to be skipped when it had no labelled slices)
    (tmp_path / "patients.csv").write_text("patient_id,diagnosis,path,n_slices\nP1,COVID-19,P1.nii.gz,4\n"
                                           "P9,CAP,P9.nii.gz,4\n")
    with pytest.raises(InputError, match="patient P9: its scan 'P9.nii.gz' is not in"):
        load_records(tmp_path, classes=THREE_CLASSES)


def test_label_spellings_map_onto_classes_and_unknown_labels_are_refused():
    """UCSD's own folder names (CT_COVID / CT_NonCOVID) and other common spellings map onto the classes;
    an unknown label is an error, never silently NonCOVID."""
    assert canonical_label("CT_COVID", BINARY_CLASSES) == "COVID"
    assert canonical_label("CT_NonCOVID", BINARY_CLASSES) == "NonCOVID"
    assert canonical_label("covid 19", THREE_CLASSES) == "COVID-19"
    assert canonical_label("Bacterial pneumonia", BINARY_CLASSES) == "NonCOVID"
    assert canonical_label("Bacterial_Pneumonia", THREE_CLASSES) == "Common pneumonia"
    with pytest.raises(ValueError, match="not one of"):
        canonical_label("lung cancer", BINARY_CLASSES)


def test_paste_lesions_lays_donor_lesions_into_the_recipient_lung():
    from covidct.data.transforms import paste_lesions

    rng = np.random.default_rng(0)
    image = np.full((40, 40), 200.0, np.float32)
    lung = np.zeros((40, 40), np.uint8)
    lung[5:35, 5:20] = 1
    image[lung > 0] = 50.0                       # recipient's healthy lung at 50
    labels = np.zeros((40, 40), np.uint8)
    donor_image = np.full((20, 20), 200.0, np.float32)   # half the size: resized to the recipient
    donor_lung = np.ones((20, 20), np.uint8)
    donor_image[:] = 30.0                        # donor's healthy lung at 30
    donor_labels = np.zeros((20, 20), np.uint8)
    donor_labels[5:15, 5:15] = 2                 # a consolidation square (recipient rows/cols 10..29)
    donor_image[donor_labels == 2] = 130.0       # 100 above its lung
    donor_labels[0:2, 0:2] = 3                   # effusion is never pasted
    before = image.copy(), labels.copy()
    for _ in range(2):                           # both mirror draws (the square is symmetric)
        out_image, out_labels = paste_lesions(image, labels, lung, donor_image, donor_labels, donor_lung, rng=rng)
        pasted = out_labels == 2
        # only inside the recipient's lung field: rows 10..29, columns 10..19
        assert pasted[10:30, 10:20].all() and pasted.sum() == 200 and not (out_labels == 3).any()
        # the lesion keeps its contrast to the lung around it: 50 + 100
        assert np.allclose(out_image[14:26, 13:17], 150.0, atol=0.1)
        assert np.allclose(out_image[:, 25:], 200.0) and out_image.max() <= 200.0
    np.testing.assert_array_equal(image, before[0]); np.testing.assert_array_equal(labels, before[1])
    # nothing to paste inside the lung: the recipient comes back unchanged
    far = np.zeros((20, 20), np.uint8); far[0:3, 17:20] = 1
    same_image, same_labels = paste_lesions(image, labels, lung, donor_image, far, donor_lung, rng=rng)
    assert same_image is image and same_labels is labels


def test_copy_paste_reaches_the_training_batches(seg_folder):
    from covidct.data.segmentation import SegFolder
    from covidct.data.transforms import seg_eval_transform
    from covidct.engine.train_seg import _Augmented

    samples = [SegFolder(seg_folder)[i] for i in range(len(SegFolder(seg_folder)))]
    classes = ("background", "ggo", "consolidation")
    plain = _Augmented(samples, seg_eval_transform(32), classes)
    pasted = _Augmented(samples, seg_eval_transform(32), classes, copy_paste=1.0, seed=0)
    assert len(pasted.donors) >= 2
    lesion_plain = sum(int((plain[i][1] > 0).sum()) for i in range(len(samples)))
    lesion_pasted = sum(int((pasted[i][1] > 0).sum()) for i in range(len(samples)))
    assert lesion_pasted > lesion_plain


@pytest.mark.parametrize("quarter_turns", [False, True])
def test_quarter_turns_show_the_training_slices_in_other_orientations(quarter_turns):
    """Flips and ±25° rotations keep a horizontal bar within ~35° of horizontal (scale and shear aside);
    with quarter turns some draws stand it upright, as an anterior-up slice would be."""
    from covidct.data.transforms import seg_train_transform

    image = np.zeros((96, 96), np.float32)
    labels = np.zeros((96, 96), np.uint8)
    labels[44:52, 8:88] = 1
    image[labels > 0] = 1.0
    transform = seg_train_transform(64, elastic=False, quarter_turns=quarter_turns, seed=0)
    upright = 0
    for _ in range(40):
        out = transform(image=image, masks=[labels])["masks"][0]
        rows, cols = np.nonzero(out)
        if rows.size < 20:
            continue
        cov = np.cov(np.stack([rows, cols]).astype(float))
        evals, evecs = np.linalg.eigh(cov)
        axis = evecs[:, -1]                     # principal axis (row, col)
        upright += abs(axis[0]) > np.cos(np.radians(40))   # within 40 degrees of vertical
    assert (upright > 5) if quarter_turns else (upright == 0)


@pytest.mark.parametrize("delimiter", [",", ";", "\t"])
def test_tables_saved_by_spreadsheets_read_alike(tmp_path, delimiter):
    """split.csv with a byte-order mark, CRLF line endings, spaces around the header names and any of the
    three usual separators reads as the plain file does; a missing column is still named."""
    from covidct.data.tables import read_table

    folder = tmp_path / "d"
    folder.mkdir()
    for i in range(4):
        Image.fromarray(np.full((32, 32), 40 * i, np.uint8)).save(folder / f"{i}.png")
    lines = [f"path{delimiter} label"] + [f"{i}.png{delimiter}{'COVID' if i % 2 else 'NonCOVID'}" for i in range(4)]
    (folder / "split.csv").write_bytes(("\ufeff" + "\r\n".join(lines) + "\r\n").encode("utf-8"))
    recs = load_records(folder, classes=BINARY_CLASSES)
    assert [(r.path.name, r.label) for r in recs] == [("0.png", "NonCOVID"), ("1.png", "COVID"),
                                                      ("2.png", "NonCOVID"), ("3.png", "COVID")]
    with pytest.raises(InputError, match="needs the column\\(s\\) 'split'"):
        read_table(folder / "split.csv", ("path", "split"))
