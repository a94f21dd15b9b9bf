"""`textseg corrections compare|export` end to end on real scans and lesion masks (pyradiomics examples)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import shared_file
from scipy import ndimage

from textseg.analysis.corrections import compare_segmentations
from textseg.cli import main
from textseg.cli.common import cancel_on_ctrl_c
from textseg.formats.images import read_volume
from textseg.formats.segments import Segment, write_seg_nrrd

RAD = ("pyradiomics-examples",)


@pytest.fixture(autouse=True)
def _read_here(monkeypatch):
    monkeypatch.setenv("TEXTSEG_READ_IN_PROCESS", "1")  # the isolated reader's child process is not under test


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """Per case (brain1, breast1): the image, the model's output (the lesion) and a corrected one (lesion dilated
    by one voxel in-plane, its first slice erased, plus a 'rim' segment), as .seg.nrrd files."""
    folder = tmp_path_factory.mktemp("pairs")
    out = {}
    for name in ("brain1", "breast1"):
        image = folder / f"{name}.nrrd"
        shutil.copy(shared_file(*RAD, f"{name}_image.nrrd"), image)
        lab = read_volume(shared_file(*RAD, f"{name}_label.nrrd"), isolate=False)
        lesion = lab.array > 0
        corrected = ndimage.binary_dilation(lesion, np.ones((1, 3, 3), bool))
        corrected[np.flatnonzero(corrected.any((1, 2)))[0]] = False
        rim = ndimage.binary_dilation(corrected) & ~corrected
        grid = lab.with_array(np.zeros(lab.shape, np.uint8))
        ai = folder / f"{name}_ai.seg.nrrd"
        write_seg_nrrd(ai, grid, [Segment("lesion", lesion.astype(np.uint8))])
        seg = folder / f"{name}.seg.nrrd"
        write_seg_nrrd(seg, grid, [Segment("lesion", corrected.astype(np.uint8)), Segment("rim", rim.astype(np.uint8))])
        out[name] = {"image": image, "ai": ai, "seg": seg, "lesion": corrected, "rim": rim}
    return folder, out


def test_compare_writes_what_compare_segmentations_gives(pairs, tmp_path, capsys):
    _, cases = pairs
    c = cases["brain1"]
    expected = compare_segmentations(c["ai"], c["seg"], slice_axis="j")
    out = tmp_path / "table.json"
    assert main(["-q", "corrections", "compare", str(c["ai"]), str(c["seg"]), "--slice-axis", "j",
                 "--out", str(out)]) == 0
    assert json.loads(out.read_text()) == expected
    assert [r["matched_by"] for r in expected] == ["name", "only in B"]
    assert expected[0]["voxels_added"] > 0 and expected[0]["voxels_removed"] > 0
    csv_out = tmp_path / "table.csv"
    assert main(["-q", "corrections", "compare", str(c["ai"]), str(c["seg"]), "--out", str(csv_out)]) == 0
    rows = list(csv.DictReader(csv_out.open()))
    default = compare_segmentations(c["ai"], c["seg"])
    assert float(rows[0]["dice"]) == default[0]["dice"] and float(rows[0]["hd95_mm"]) == default[0]["hd95_mm"]
    assert int(rows[0]["slices_touched"]) == default[0]["slices_touched"]
    # stdout table without --out; an existing table is not overwritten
    capsys.readouterr()
    assert main(["-q", "corrections", "compare", str(c["ai"]), str(c["seg"])]) == 0
    printed = list(csv.DictReader(capsys.readouterr().out.splitlines()))
    assert printed[0]["segment_a"] == "lesion" and float(printed[0]["dice"]) == pytest.approx(default[0]["dice"])
    before = out.read_text()
    assert main(["-q", "corrections", "compare", str(c["ai"]), str(c["seg"]), "--out", str(out)]) == 1
    assert "already exists" in capsys.readouterr().err and out.read_text() == before


def test_compare_says_when_nothing_was_paired(pairs, tmp_path, capsys):
    """A label map without its labels JSON names its labels label_1, ...: nothing pairs with 'lesion' and the
    table holds only 'only in A/B' rows. That exited 0 without a word; now a note says how to pair them."""
    _, cases = pairs
    label_map = shared_file(*RAD, "brain1_label.nrrd")
    capsys.readouterr()
    assert main(["-q", "corrections", "compare", str(cases["brain1"]["ai"]), str(label_map)]) == 0
    out, err = capsys.readouterr()
    assert [r["matched_by"] for r in csv.DictReader(out.splitlines())] == ["only in A", "only in B"]
    assert err.startswith("note: no segment of A matched one of B") and "--labels-b" in err and err.count("\n") == 1
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"1": "lesion"}))
    assert main(["-q", "corrections", "compare", str(cases["brain1"]["ai"]), str(label_map), "--labels-b",
                 str(labels)]) == 0
    out, err = capsys.readouterr()
    rows = list(csv.DictReader(out.splitlines()))
    assert [r["matched_by"] for r in rows] == ["name"] and float(rows[0]["dice"]) == 1.0 and err == ""


def test_compare_bad_input_is_one_line(pairs, tmp_path, capsys):
    _, cases = pairs
    brain, breast = cases["brain1"], cases["breast1"]
    for argv, words in (
        ([str(brain["ai"]), str(tmp_path / "missing.seg.nrrd")], "no such file"),
        ([str(brain["ai"]), str(breast["seg"])], "grid"),
        ([str(brain["ai"]), str(brain["seg"]), "--out", str(tmp_path / "t.txt")], ".csv or .json"),
    ):
        rc = main(["-q", "corrections", "compare", *argv])
        err = capsys.readouterr().err
        assert rc in (1, 2) and err.startswith("error: ") and err.count("\n") == 1 and words in err, err
    assert main(["corrections"]) == 2


def test_export_cases_read_back_and_resume(pairs, tmp_path, capsys):
    _, cases = pairs
    out = tmp_path / "raw"
    argv = ["-q", "corrections", "export", "--nnunet", str(out), "--dataset-id", "7", "--name", "Lesions",
            "--labels", "lesion", "rim", "--channel", "MRI"]
    for c in cases.values():
        argv += ["--case", str(c["image"]), str(c["seg"])]
    assert main(argv) == 0
    root = out / "Dataset007_Lesions"
    ds = json.loads((root / "dataset.json").read_text())
    assert ds["labels"] == {"background": 0, "lesion": 1, "rim": 2} and ds["numTraining"] == 2
    assert ds["channel_names"] == {"0": "MRI"} and ds["file_ending"] == ".nii.gz"
    for name, c in cases.items():
        img = sitk.ReadImage(str(root / "imagesTr" / f"{name}_0000.nii.gz"))
        lab = sitk.ReadImage(str(root / "labelsTr" / f"{name}.nii.gz"))
        src = sitk.ReadImage(str(c["image"]))
        assert np.array_equal(sitk.GetArrayFromImage(img), sitk.GetArrayFromImage(src))
        expected = c["lesion"].astype(np.uint8) + 2 * c["rim"].astype(np.uint8)
        assert np.array_equal(sitk.GetArrayFromImage(lab), expected)
        for get in ("GetSpacing", "GetOrigin", "GetDirection"):
            assert getattr(lab, get)() == getattr(img, get)()
            assert getattr(img, get)() == pytest.approx(getattr(src, get)(), abs=1e-5)
    datalist = json.loads((root / "datalist.json").read_text())
    assert sorted(d["label"] for d in datalist["training"]) == ["labelsTr/brain1.nii.gz", "labelsTr/breast1.nii.gz"]
    stamp = {p: p.stat().st_mtime_ns for p in (root / "labelsTr").iterdir()}
    capsys.readouterr()
    assert main(argv[1:]) == 0  # resumed: both cases verified, nothing rewritten
    assert "0 case(s) written, 2 already complete" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in (root / "labelsTr").iterdir()} == stamp
    # the same dataset with other labels is refused: a dataset's labels cannot change under its cases
    bad = [a if a != "rim" else "edge" for a in argv]
    assert main(bad) == 1
    assert "error: " in capsys.readouterr().err


def test_export_cohort_folder_and_csv(pairs, tmp_path, capsys):
    folder, cases = pairs
    images = tmp_path / "images"
    images.mkdir()
    for name, c in cases.items():
        shutil.copy(c["image"], images / f"{name}.nrrd")
    # the folder holds no corrected segmentations: say so, and where to point
    assert main(["-q", "corrections", "export", "--nnunet", str(tmp_path / "a"), "--dataset-id", "8", "--name",
                 "L", "--labels", "lesion", "--channel", "MRI", "--cohort", str(images)]) == 1
    assert "--segmentations" in capsys.readouterr().err
    assert main(["-q", "corrections", "export", "--nnunet", str(tmp_path / "a"), "--dataset-id", "8", "--name",
                 "L", "--labels", "lesion", "--channel", "MRI", "--cohort", str(images),
                 "--segmentations", str(folder)]) == 0
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "a" / "Dataset008_L" / "labelsTr" / "brain1.nii.gz")))
    assert np.array_equal(labels, cases["brain1"]["lesion"].astype(np.uint8))  # rim is not among --labels
    table = tmp_path / "cases.csv"
    table.write_text("image,segmentation,case_id\n" + "".join(
        f"{os.path.relpath(c['image'], tmp_path)},{os.path.relpath(c['seg'], tmp_path)},case_{n}\n"
        for n, c in enumerate(cases.values())))
    assert main(["-q", "corrections", "export", "--nnunet", str(tmp_path / "b"), "--dataset-id", "9", "--name",
                 "L", "--labels", "lesion", "--channel", "MRI", "--cohort", str(table)]) == 0
    assert sorted(p.name for p in (tmp_path / "b" / "Dataset009_L" / "imagesTr").iterdir()) == [
        "case_0_0000.nii.gz", "case_1_0000.nii.gz"]
    table.write_text("image,segmentation\nnope.nrrd,nope.seg.nrrd\n")
    assert main(["-q", "corrections", "export", "--nnunet", str(tmp_path / "c"), "--dataset-id", "9", "--name",
                 "L", "--labels", "lesion", "--channel", "MRI", "--cohort", str(table)]) == 1
    err = capsys.readouterr().err
    assert "line 2" in err and err.count("\n") == 1
    assert main(["-q", "corrections", "export", "--nnunet", str(tmp_path / "c"), "--dataset-id", "9", "--name",
                 "L", "--labels", "lesion", "--channel", "MRI"]) == 2
    assert "--case" in capsys.readouterr().err


def test_export_cancelled_by_ctrl_c_keeps_complete_cases(pairs, tmp_path, capsys, monkeypatch):
    """Ctrl-C during the first case: that case completes, the export stops (exit 130) and a rerun finishes."""
    import textseg.formats.training_sets as ts

    _, cases = pairs
    original = ts._export_case
    calls = []

    def interrupted(*args, **kwargs):
        if not calls:
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C sends, handled by cancel_on_ctrl_c
        calls.append(args[2])
        return original(*args, **kwargs)

    monkeypatch.setattr(ts, "_export_case", interrupted)
    argv = ["-q", "corrections", "export", "--nnunet", str(tmp_path), "--dataset-id", "5", "--name", "C",
            "--labels", "lesion", "--channel", "MRI"]
    for c in cases.values():
        argv += ["--case", str(c["image"]), str(c["seg"])]
    assert main(argv) == 130
    assert "run the same command again" in capsys.readouterr().err
    root = tmp_path / "Dataset005_C"
    assert json.loads((root / "dataset.json").read_text())["numTraining"] == 1
    assert main(argv) == 0 and calls == ["brain1", "breast1"]
    assert json.loads((root / "dataset.json").read_text())["numTraining"] == 2


def test_second_ctrl_c_aborts():
    class Token:
        cancelled = False

        def cancel(self):
            self.cancelled = True

    token = Token()
    with pytest.raises(KeyboardInterrupt), cancel_on_ctrl_c(token):
        os.kill(os.getpid(), signal.SIGINT)
        assert token.cancelled
        os.kill(os.getpid(), signal.SIGINT)


def test_dicom_seg_read_back_in_the_other_slice_order(tmp_path, capsys, monkeypatch):
    """The DICOM SEG of a run on a real CT series reads back with its slice axis reversed (the same voxels,
    direction k = -z, origin at the other end). compare, export and stats refused it as "another voxel grid"
    against the run's own .seg.nrrd; it is now re-indexed exactly (axes flipped/reordered, no resampling)."""
    pytest.importorskip("highdicom")
    monkeypatch.setenv("TEXTSEG_SHOW_TEST_MODELS", "1")
    from textseg.formats.segment_files import read_segments

    series = shared_file("totalsegmentator-examples", "example_ct_dicom")
    seg, dcm = tmp_path / "ct.seg.nrrd", tmp_path / "ct_seg.dcm"
    assert main(["-q", "segment", str(series), "-m", "synthetic-3d", "--modality", "CT", "-p", "bone",
                 "--out", str(seg), "--dicom-seg", str(dcm), "--probabilities", str(tmp_path / "maps")]) == 0
    grid_d, segs_d = read_segments(dcm)
    grid_s, segs_s = read_segments(seg)
    assert not grid_d.same_grid(grid_s)  # the case under test: the same voxels in the opposite slice order
    ref, s = read_segments(seg)
    bone = np.asarray(s[0].mask) > 0
    edited = bone.copy()
    edited[5] = False  # a slice erased by hand
    write_seg_nrrd(tmp_path / "fixed.seg.nrrd", ref, [Segment("bone", edited.astype(np.uint8))])
    out = tmp_path / "cmp.json"
    capsys.readouterr()
    assert main(["-q", "corrections", "compare", str(dcm), str(tmp_path / "fixed.seg.nrrd"), "--out", str(out)]) == 0, \
        capsys.readouterr().err
    row = json.loads(out.read_text())[0]
    removed = int(bone[5].sum())
    assert row["voxels_removed"] == removed > 0 and row["voxels_added"] == 0 and row["slices_touched"] == 1
    assert row["dice"] == pytest.approx(2 * edited.sum() / (bone.sum() + edited.sum()), rel=1e-12)
    # export: the DICOM SEG as the corrected segmentation of the series: the label is the .seg.nrrd's mask
    assert main(["-q", "corrections", "export", "--nnunet", str(tmp_path / "nn"), "--dataset-id", "21", "--name",
                 "Dcm", "--labels", "bone", "--channel", "CT", "--case", str(series), str(dcm)]) == 0
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "nn" / "Dataset021_Dcm" / "labelsTr" /
                                                       "example_ct_dicom.nii.gz")))
    assert np.array_equal(label == 1, bone)
    # stats of the DICOM SEG with the kept maps: the confidence columns
    stats = tmp_path / "s.csv"
    assert main(["-q", "stats", str(series), str(dcm), "--probabilities", str(tmp_path / "maps"),
                 "--out", str(stats)]) == 0
    assert next(csv.DictReader(open(stats)))["confidence_mean"] == "1.0"
