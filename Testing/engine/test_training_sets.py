"""Corrections exported for fine-tuning (issue 17 item 5): the nnU-Net v2 raw dataset and the MONAI datalist of
textseg.formats.training_sets, read back by separate readers (nibabel, SimpleITK, MONAI) and checked against the
rules of nnU-Net's documentation/dataset_format.md; resuming, refusing and cancelling."""

from __future__ import annotations

import json
import os
import re
import threading

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from conftest import shared_file
from scipy import ndimage

from textseg.errors import InputError, OutputExistsError
from textseg.formats.images import read_volume
from textseg.formats.segments import Segment, write_seg_nrrd
from textseg.formats.training_sets import TrainingCase, export_nnunet, label_map
from textseg.volume import LPS_TO_RAS, Volume

RAD = ("pyradiomics-examples",)
LABELS = ["lesion", "rim"]


@pytest.fixture(autouse=True)
def _read_here(monkeypatch):
    monkeypatch.setenv("TEXTSEG_READ_IN_PROCESS", "1")  # the isolated reader's child process is not under test


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Two real MRI cases (breast1, brain1): the lesion and a 'rim' (the lesion dilated by one voxel, minus it)
    saved as corrected .seg.nrrd files on the image grid; expected label arrays computed here."""
    folder = tmp_path_factory.mktemp("cohort")
    cases, expected = [], {}
    for name in ("breast1", "brain1"):
        image = shared_file(*RAD, f"{name}_image.nrrd")
        lab = read_volume(shared_file(*RAD, f"{name}_label.nrrd"), isolate=False)
        lesion = lab.array > 0
        rim = ndimage.binary_dilation(lesion) & ~lesion
        ref = Volume(np.zeros(lab.shape, np.uint8), lab.spacing, lab.origin, lab.direction)
        seg = write_seg_nrrd(folder / f"{name}.seg.nrrd", ref, [Segment("lesion", lesion.astype(np.uint8)),
                                                                Segment("rim", rim.astype(np.uint8)),
                                                                Segment("note", rim.astype(np.uint8))])
        cases.append(TrainingCase(image, seg, case_id=name))
        expected[name] = lesion.astype(np.uint8) + 2 * rim.astype(np.uint8)
    return cases, expected


def _identifiers(folder, ending):
    """nnU-Net's get_identifiers_from_splitted_dataset_folder: every file with the ending, minus _XXXX+ending."""
    return sorted({f[: -(len(ending) + 5)] for f in os.listdir(folder) if f.endswith(ending)})


def test_nnunet_dataset_read_back_by_nibabel_sitk_and_monai(tmp_path, cohort):
    cases, expected = cohort
    seen = []
    res = export_nnunet(cases, tmp_path, 7, "Corrected", LABELS, "MRI", progress=lambda f, s: seen.append((f, s)))
    root = tmp_path / "Dataset007_Corrected"
    assert res.dataset_dir == root and res.written == ["breast1", "brain1"] and not res.skipped
    assert seen[-1][0] == 1.0 and len(seen) == 2
    # dataset.json: the documented keys and rules
    ds = json.loads((root / "dataset.json").read_text())
    assert ds["channel_names"] == {"0": "MRI"}
    assert ds["labels"] == {"background": 0, "lesion": 1, "rim": 2}
    assert sorted(ds["labels"].values()) == list(range(len(ds["labels"])))  # consecutive from background 0
    assert ds["file_ending"] == ".nii.gz" and ds["numTraining"] == 2
    ids = _identifiers(root / "imagesTr", ".nii.gz")
    assert ids == ["brain1", "breast1"]
    assert sorted(os.listdir(root / "imagesTr")) == ["brain1_0000.nii.gz", "breast1_0000.nii.gz"]
    assert sorted(os.listdir(root / "labelsTr")) == ["brain1.nii.gz", "breast1.nii.gz"]
    assert not (root / ".textseg-tmp").exists()
    assert res.records["breast1"]["ignored_segments"] == ["note"]
    for case in cases:
        cid = case.case_id
        src = read_volume(case.image, isolate=False)
        img_path, lab_path = root / "imagesTr" / f"{cid}_0000.nii.gz", root / "labelsTr" / f"{cid}.nii.gz"
        # SimpleITK: identical voxels and geometry, image and label on one grid
        img, lab = sitk.ReadImage(str(img_path)), sitk.ReadImage(str(lab_path))
        assert np.array_equal(sitk.GetArrayFromImage(img), src.array)
        assert sitk.GetArrayFromImage(img).dtype == src.array.dtype
        labels = sitk.GetArrayFromImage(lab)
        assert labels.dtype == np.uint8 and np.array_equal(labels, expected[cid])
        assert set(np.unique(labels)) <= {0, 1, 2}
        for g in (img, lab):
            assert np.allclose(g.GetSpacing(), src.spacing, atol=1e-6)
            assert np.allclose(g.GetOrigin(), src.origin, atol=1e-4)
            assert np.allclose(np.reshape(g.GetDirection(), (3, 3)), src.direction, atol=1e-6)
        # nibabel: (i, j, k) arrays, RAS affines identical between image and label, equal to the source's
        ni, nl = nib.load(str(img_path)), nib.load(str(lab_path))
        assert np.array_equal(np.asanyarray(ni.dataobj), src.array.transpose(2, 1, 0))
        assert np.array_equal(np.asanyarray(nl.dataobj), expected[cid].transpose(2, 1, 0))
        assert np.array_equal(ni.affine, nl.affine)
        assert np.allclose(ni.affine, LPS_TO_RAS @ src.ijk_to_lps, atol=1e-4)
    # MONAI reads the datalist
    data = pytest.importorskip("monai.data")
    items = data.load_decathlon_datalist(str(root / "datalist.json"))
    assert [(os.path.basename(x["image"]), os.path.basename(x["label"])) for x in items] == [
        ("brain1_0000.nii.gz", "brain1.nii.gz"), ("breast1_0000.nii.gz", "breast1.nii.gz")]
    assert all(os.path.isfile(x["image"]) and os.path.isfile(x["label"]) for x in items)


def test_rerun_skips_verified_cases_and_finishes_a_half_written_one(tmp_path, cohort):
    cases, expected = cohort
    full = export_nnunet(cases, tmp_path / "a", 8, "Full", LABELS, "MRI").dataset_dir
    before = {p: os.stat(p).st_mtime_ns for p in full.rglob("*.nii.gz")}
    again = export_nnunet(cases, tmp_path / "a", 8, "Full", LABELS, "MRI")
    assert again.skipped == ["breast1", "brain1"] and not again.written
    assert {p: os.stat(p).st_mtime_ns for p in full.rglob("*.nii.gz")} == before  # nothing rewritten

    # a run that crashed half-way through case 2: its label written, its image and its record not
    root = export_nnunet(cases, tmp_path / "b", 8, "Full", LABELS, "MRI").dataset_dir
    (root / "imagesTr" / "brain1_0000.nii.gz").unlink()
    manifest = json.loads((root / "textseg_export.json").read_text())
    del manifest["cases"]["brain1"]
    (root / "textseg_export.json").write_text(json.dumps(manifest))
    label = root / "labelsTr" / "brain1.nii.gz"
    inode = os.stat(label).st_ino
    done = export_nnunet(cases, tmp_path / "b", 8, "Full", LABELS, "MRI")
    assert done.skipped == ["breast1"] and done.written == ["brain1"]
    assert os.stat(label).st_ino == inode  # the identical label found there was kept, not rewritten
    assert (root / "imagesTr" / "brain1_0000.nii.gz").read_bytes() == (full / "imagesTr" /
                                                                       "brain1_0000.nii.gz").read_bytes()
    assert json.loads((root / "dataset.json").read_text())["numTraining"] == 2


def test_cancel_between_cases_leaves_complete_cases_and_consistent_json(tmp_path, cohort):
    cases, _ = cohort
    token = threading.Event()
    res = export_nnunet(cases, tmp_path, 9, "Cancelled", LABELS, "CT", progress=lambda f, s: token.set(),
                        cancel=token)
    root = res.dataset_dir
    assert res.cancelled and res.written == ["breast1"]
    ds = json.loads((root / "dataset.json").read_text())
    assert ds["numTraining"] == 1 == len(_identifiers(root / "imagesTr", ".nii.gz"))
    assert os.listdir(root / "labelsTr") == ["breast1.nii.gz"]
    assert [x["label"] for x in json.loads((root / "datalist.json").read_text())["training"]] == [
        "labelsTr/breast1.nii.gz"]
    assert not (root / ".textseg-tmp").exists()
    res = export_nnunet(cases, tmp_path, 9, "Cancelled", LABELS, "CT")
    assert res.skipped == ["breast1"] and res.written == ["brain1"]
    assert json.loads((root / "dataset.json").read_text())["numTraining"] == 2


def test_never_overwrites_a_different_file_unless_asked(tmp_path, cohort):
    cases, expected = cohort
    root = export_nnunet(cases[:1], tmp_path, 10, "Keep", LABELS, "MRI").dataset_dir
    label = root / "labelsTr" / "breast1.nii.gz"
    img = sitk.ReadImage(str(label))
    arr = sitk.GetArrayFromImage(img)
    arr[arr == 2] = 0  # someone's own edit of the exported label
    edited = sitk.GetImageFromArray(arr)
    edited.CopyInformation(img)
    sitk.WriteImage(edited, str(label), useCompression=True)
    edited_bytes = label.read_bytes()
    with pytest.raises(OutputExistsError, match="breast1.nii.gz exists and differs"):
        export_nnunet(cases[:1], tmp_path, 10, "Keep", LABELS, "MRI")
    assert label.read_bytes() == edited_bytes
    res = export_nnunet(cases[:1], tmp_path, 10, "Keep", LABELS, "MRI", overwrite=True)
    assert res.written == ["breast1"]
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(label))), expected["breast1"])
    # the dataset's labels cannot change under its cases; nor can its id be taken twice
    with pytest.raises(InputError, match="labels .* cannot change"):
        export_nnunet(cases[:1], tmp_path, 10, "Keep", ["lesion"], "MRI")
    with pytest.raises(InputError, match="already has Dataset010_Keep"):
        export_nnunet(cases[:1], tmp_path, 10, "Other", LABELS, "MRI")


def test_overlap_is_refused_by_name_and_count_or_later_label_wins():
    a = np.zeros((2, 4, 4), np.uint8)
    b = np.zeros_like(a)
    a[0, :2] = 1  # 8 voxels
    b[0, 1:3] = 1  # 8 voxels, 4 shared
    segs = [Segment("liver", a), Segment("tumor", b)]
    with pytest.raises(InputError, match="'liver' and 'tumor' overlap in 4 voxels") as e:
        label_map(segs, ["liver", "tumor"])
    assert "\n" not in str(e.value)
    out, rec = label_map(segs, ["liver", "tumor"], overlap="later-wins")
    assert (out == 1).sum() == 4 and (out == 2).sum() == 8 and rec["overlaps"] == {"liver / tumor": 4}
    out, rec = label_map(segs, ["tumor", "liver"], overlap="later-wins")
    assert (out == 2).sum() == 8 and (out == 1).sum() == 4
    out, rec = label_map([Segment("liver", a)], ["liver", "spleen"])
    assert rec["labels_present"] == ["liver"] and out.max() == 1


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"dataset_id": 1000}, "1 to 999"),
    ({"dataset_name": "my data"}, "dataset name"),
    ({"labels": ["lesion", "lesion"]}, "distinct"),
    ({"labels": ["background"]}, "background"),
    ({"channel_name": ""}, "channel name"),
    ({"file_ending": ".png"}, "file ending"),
    ({"overlap": "merge"}, "overlap rule"),
])
def test_bad_requests_get_one_clear_line(tmp_path, cohort, kwargs, message):
    cases, _ = cohort
    args = {"dataset_id": 11, "dataset_name": "Bad", "labels": LABELS, "channel_name": "MRI", **kwargs}
    with pytest.raises(InputError, match=message) as e:
        export_nnunet(cases, tmp_path, **args)
    assert "\n" not in str(e.value) and not (tmp_path / "Dataset011_Bad").exists()


def test_case_ids_and_grids_checked(tmp_path, cohort):
    cases, _ = cohort
    with pytest.raises(InputError, match="two cases have the id 'breast1'"):
        export_nnunet([cases[0], cases[0]], tmp_path, 12, "Ids", LABELS, "MRI")
    with pytest.raises(InputError, match="channel suffix"):
        export_nnunet([TrainingCase(cases[0].image, cases[0].segmentation, "case_0001")], tmp_path, 12, "Ids",
                      LABELS, "MRI")
    # default id from the image's file name
    res = export_nnunet([TrainingCase(cases[0].image, cases[0].segmentation)], tmp_path, 12, "Ids", LABELS, "MRI")
    assert res.written == ["breast1_image"]
    # a segmentation on another grid (here: the other case's) is refused before anything is written
    with pytest.raises(InputError, match="another voxel grid"):
        export_nnunet([TrainingCase(cases[0].image, cases[1].segmentation, "mixed")], tmp_path, 12, "Ids", LABELS,
                      "MRI")
    assert not (tmp_path / "Dataset012_Ids" / "labelsTr" / "mixed.nii.gz").exists()
    assert re.fullmatch(r"[0-9a-f]{64}", next(iter(res.records["breast1_image"]["files"].values())))


def test_label_map_input_with_its_labels_json(tmp_path):
    """A real CT and TotalSegmentator's 117-class label map as the 'corrected' segmentation: three labels kept."""
    ts = ("totalsegmentator-examples",)
    ct, seg = shared_file(*ts, "example_ct_sm.nii.gz"), shared_file(*ts, "example_seg.nii.gz")
    names = shared_file(*ts, "example_seg_labels.json")
    res = export_nnunet([TrainingCase(ct, seg, "ts01", labels_file=names)], tmp_path, 13, "Abdomen",
                        ["liver", "spleen", "kidney_left"], "CT")
    source = sitk.GetArrayFromImage(sitk.ReadImage(str(seg)))
    expected = np.select([source == 5, source == 1, source == 3], [1, 2, 3], 0).astype(np.uint8)
    out = sitk.ReadImage(str(res.dataset_dir / "labelsTr" / "ts01.nii.gz"))
    assert np.array_equal(sitk.GetArrayFromImage(out), expected) and expected.max() == 3
    image = sitk.ReadImage(str(res.dataset_dir / "imagesTr" / "ts01_0000.nii.gz"))
    assert np.array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(sitk.ReadImage(str(ct))))
    assert image.GetOrigin() == out.GetOrigin() and image.GetDirection() == out.GetDirection()
    record = res.records["ts01"]
    assert record["labels_present"] == ["liver", "spleen", "kidney_left"]
    assert len(record["ignored_segments"]) == len(np.unique(source)) - 1 - 3 and record["overlaps"] == {}


def test_a_case_whose_segments_are_none_of_the_labels_is_refused(tmp_path, capsys):
    """TotalSegmentator's label map without its labels JSON has segments 'label_1'...: exporting 'liver' from it
    wrote an all-background label file and exit 0. Refused; an empty segment named as a label is still a case."""
    from textseg.cli import main

    ts = ("totalsegmentator-examples",)
    ct, seg = shared_file(*ts, "example_ct_sm.nii.gz"), shared_file(*ts, "example_seg.nii.gz")
    with pytest.raises(InputError, match=r"none of its segments \('label_1', .* and \d+ more\) is among") as e:
        export_nnunet([TrainingCase(ct, seg, "ts01")], tmp_path, 14, "NoJson", ["liver"], "CT")
    assert "\n" not in str(e.value) and "labels JSON" in str(e.value)
    assert not (tmp_path / "Dataset014_NoJson" / "labelsTr" / "ts01.nii.gz").exists()
    capsys.readouterr()
    assert main(["-q", "corrections", "export", "--nnunet", str(tmp_path), "--dataset-id", "14", "--name", "NoJson",
                 "--labels", "liver", "--channel", "CT", "--case", str(ct), str(seg)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    # a segment named as a label but empty: a case without the structure, exported as background
    grid = read_volume(ct, isolate=False)
    empty = (Volume(np.zeros(grid.shape, np.uint8), grid.spacing, grid.origin, grid.direction),
             [Segment("liver", np.zeros(grid.shape, np.uint8))])
    res = export_nnunet([TrainingCase(ct, empty, "neg01")], tmp_path, 14, "NoJson", ["liver"], "CT")
    assert res.written == ["neg01"] and res.records["neg01"]["labels_present"] == []


def test_case_ids_a_user_can_act_on(tmp_path, cohort, capsys):
    """An image named only with non-Latin letters gave "case id '': use letters, digits..." without saying which
    image or how to give an id; an id Windows cannot use as a file name (CON, nul, COM1) made labelsTr/CON.nii.gz,
    which cannot be copied to a Windows machine."""
    from textseg.cli import main

    cases, _ = cohort
    folder = tmp_path / "cases"
    folder.mkdir()
    seg = cases[0].segmentation
    for name in ("肝臓.nrrd", "CON.nrrd"):
        (folder / name).write_bytes(open(cases[0].image, "rb").read())
        with pytest.raises(InputError, match=r"case_id column") as e:
            export_nnunet([TrainingCase(folder / name, seg)], tmp_path, 15, "Ids", LABELS, "MRI")
        assert name in str(e.value) and "\n" not in str(e.value)
    for cid in ("nul", "COM1", "lpt9", "Aux"):
        with pytest.raises(InputError, match="Windows"):
            export_nnunet([TrainingCase(cases[0].image, seg, cid)], tmp_path, 15, "Ids", LABELS, "MRI")
    assert not (tmp_path / "Dataset015_Ids").exists()
    capsys.readouterr()
    assert main(["-q", "corrections", "export", "--nnunet", str(tmp_path), "--dataset-id", "15", "--name", "Ids",
                 "--labels", "lesion", "--channel", "MRI", "--case", str(folder / "肝臓.nrrd"), str(seg)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "肝臓.nrrd" in err and err.count("\n") == 1
    # a CSV gives the ids
    (tmp_path / "cases.csv").write_text(f"image,segmentation,case_id\n{folder / '肝臓.nrrd'},{seg},liver01\n"
                                        f"{folder / 'CON.nrrd'},{seg},con01\n", encoding="utf-8")
    assert main(["-q", "corrections", "export", "--nnunet", str(tmp_path), "--dataset-id", "15", "--name", "Ids",
                 "--labels", "lesion", "rim", "--channel", "MRI", "--cohort", str(tmp_path / "cases.csv")]) == 0
    assert sorted(os.listdir(tmp_path / "Dataset015_Ids" / "labelsTr")) == ["con01.nii.gz", "liver01.nii.gz"]
