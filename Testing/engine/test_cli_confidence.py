"""The CLI keeps the model's answer: `segment --probabilities`, `rethreshold`, confidence in statistics.

The deepbet run on the MNI152 head (a real model with real, soft probabilities) is made once per module;
the cohort and error paths use the synthetic test model on real scans."""

from __future__ import annotations

import csv
import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import shared_file

from textseg.analysis.confidence import MaskFingerprint, confidence, to_uint8
from textseg.cli import main
from textseg.formats.segments import read_seg_nrrd, write_seg_nrrd


def _read(path):
    img = sitk.ReadImage(str(path))
    return img, sitk.GetArrayFromImage(img)


@pytest.fixture(scope="module")
def brain_run(tmp_path_factory):
    """`textseg segment MNI152 --prompt brain --probabilities maps --stats`, with the results' float maps."""
    pytest.importorskip("deepbet")
    import textseg.predictor as predictor_module

    t1 = shared_file("mni152", "MNI152_T1.nii.gz")
    work = tmp_path_factory.mktemp("brain")
    captured = {}
    original = predictor_module.Predictor.predict

    def predict(self, *args, **kwargs):
        results = original(self, *args, **kwargs)
        captured["maps"] = {r.name: to_uint8(r.probability) for r in results}
        captured["existence"] = {r.name: r.existence for r in results}
        return results

    mp = pytest.MonkeyPatch()
    mp.setattr(predictor_module.Predictor, "predict", predict)
    try:
        rc = main(["-q", "segment", str(t1), "--prompt", "brain", "--out", str(work / "brain.seg.nrrd"),
                   "--probabilities", str(work / "maps"), "--stats", str(work / "brain.csv")])
    finally:
        mp.undo()
    assert rc == 0
    return {"t1": t1, "dir": work, "seg": work / "brain.seg.nrrd", "map": work / "maps" / "brain.nrrd", **captured}


def _copy(run, tmp_path):
    """A private copy of the run's segmentation and map (the tests change them)."""
    shutil.copy(run["seg"], tmp_path / "brain.seg.nrrd")
    (tmp_path / "maps").mkdir()
    shutil.copy(run["map"], tmp_path / "maps" / "brain.nrrd")
    return tmp_path / "brain.seg.nrrd"


def test_probability_file_has_the_input_grid_and_the_results_map(brain_run):
    t1, _ = _read(brain_run["t1"])
    img, q = _read(brain_run["map"])
    assert img.GetPixelID() == sitk.sitkUInt8
    assert img.GetSize() == t1.GetSize()
    assert img.GetSpacing() == pytest.approx(t1.GetSpacing(), abs=1e-6)
    assert img.GetOrigin() == pytest.approx(t1.GetOrigin(), abs=1e-5)
    assert img.GetDirection() == pytest.approx(t1.GetDirection(), abs=1e-6)
    assert np.array_equal(q, brain_run["maps"]["brain"])
    assert len(np.unique(q)) > 100  # a real soft map, not a 0/1 mask


def test_segment_tags_carry_fingerprint_threshold_confidence_and_map(brain_run):
    _, segs = read_seg_nrrd(brain_run["seg"])
    tags = segs[0].tags
    mask = segs[0].mask > 0
    assert MaskFingerprint.from_tags(tags) == MaskFingerprint.of(mask)
    assert tags["textseg.probability_file"] == "maps/brain.nrrd"
    assert json.loads(tags["textseg.threshold"]) == 0.5 == json.loads(tags["textseg.original_threshold"])
    q = brain_run["maps"]["brain"]
    conf = confidence(q, mask, 0.5, brain_run["existence"]["brain"])
    assert json.loads(tags["textseg.confidence.mean"]) == round(conf["mean"], 6)
    assert json.loads(tags["textseg.confidence.near_threshold"]) == round(conf["near_threshold"], 6)
    assert json.loads(tags["textseg.confidence.band"]) == 0.1
    # the statistics written beside it have the same confidence
    row = next(csv.DictReader(open(brain_run["dir"] / "brain.csv")))
    assert float(row["confidence_mean"]) == pytest.approx(conf["mean"], rel=1e-12)
    assert float(row["confidence_near_threshold"]) == pytest.approx(conf["near_threshold"], rel=1e-12)
    assert int(row["voxel_count"]) == int(mask.sum())


def test_rethreshold_gives_exact_voxel_counts_and_updates_tags(brain_run, tmp_path):
    seg = _copy(brain_run, tmp_path)
    q = brain_run["maps"]["brain"].astype(np.float64) / 255  # independent of the library: the float rule
    for t in (0.3, 0.8):
        out = tmp_path / f"t{t}.seg.nrrd"
        assert main(["-q", "rethreshold", str(seg), "--segment", "brain", "--threshold", str(t),
                     "--out", str(out)]) == 0
        _, segs = read_seg_nrrd(out)
        mask = segs[0].mask > 0
        assert int(mask.sum()) == int((q >= t).sum())
        assert np.array_equal(mask, q >= t)
        tags = segs[0].tags
        assert json.loads(tags["textseg.threshold"]) == t
        assert json.loads(tags["textseg.original_threshold"]) == 0.5
        assert MaskFingerprint.from_tags(tags) == MaskFingerprint.of(mask)
        assert json.loads(tags["textseg.confidence.mean"]) == pytest.approx(q[mask].mean(), abs=1e-6)
    # the input is never overwritten unless asked
    before = seg.read_bytes()
    assert main(["-q", "rethreshold", str(seg), "--segment", "brain", "--threshold", "0.4"]) == 2
    assert main(["-q", "rethreshold", str(seg), "--segment", "brain", "--threshold", "0.4",
                 "--out", str(tmp_path / "t0.3.seg.nrrd")]) == 1
    assert seg.read_bytes() == before
    assert main(["-q", "rethreshold", str(seg), "--segment", "brain", "--threshold", "0.4", "--overwrite"]) == 0
    _, segs = read_seg_nrrd(seg)
    assert int(segs[0].mask.sum()) == int((q >= 0.4).sum())


def test_hand_edit_is_refused_without_replace(brain_run, tmp_path, capsys):
    seg = _copy(brain_run, tmp_path)
    ref, segs = read_seg_nrrd(seg)
    k, j, i = np.argwhere(segs[0].mask > 0)[0]
    segs[0].mask[k, j, i] = 0  # one voxel erased by hand
    write_seg_nrrd(seg, ref, segs, overwrite=True)
    edited = seg.read_bytes()
    out = tmp_path / "new.seg.nrrd"
    capsys.readouterr()
    assert main(["-q", "rethreshold", str(seg), "--segment", "brain", "--threshold", "0.3", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "edited" in err and "--replace" in err and err.count("\n") == 1
    assert not out.exists() and seg.read_bytes() == edited
    assert main(["-q", "rethreshold", str(seg), "--segment", "brain", "--threshold", "0.3", "--out", str(out),
                 "--replace", "--uncertain"]) == 0
    _, new = read_seg_nrrd(out)
    q = brain_run["maps"]["brain"].astype(np.float64) / 255
    assert [s.name for s in new] == ["brain", "brain uncertain"]
    assert int(new[0].mask.sum()) == int((q >= 0.3).sum())
    assert int(new[1].mask.sum()) == int((np.abs(q - 0.3) <= 0.1 + 1e-9).sum())


def test_rethreshold_refuses_bad_input_with_one_line(brain_run, tmp_path, capsys):
    seg = _copy(brain_run, tmp_path)
    cases = [
        (["--segment", "liver", "--threshold", "0.3"], "no segment 'liver'"),
        (["--segment", "brain", "--threshold", "1.5"], "outside 0..1"),
        (["--segment", "brain", "--threshold", "0.3", "--probabilities", str(tmp_path / "nowhere")], "not in"),
    ]
    for extra, words in cases:
        assert main(["-q", "rethreshold", str(seg), *extra, "--out", str(tmp_path / "x.seg.nrrd")]) in (1, 2)
        err = capsys.readouterr().err
        assert words in err and err.startswith("error: ") and err.count("\n") == 1, err
    # a map on another grid (spacing changed) is refused
    img = sitk.ReadImage(str(tmp_path / "maps" / "brain.nrrd"))
    img.SetSpacing((2.0, 2.0, 2.0))
    other = tmp_path / "other"
    other.mkdir()
    sitk.WriteImage(img, str(other / "brain.nrrd"))
    assert main(["-q", "rethreshold", str(seg), "--segment", "brain", "--threshold", "0.3", "--probabilities",
                 str(other), "--out", str(tmp_path / "x.seg.nrrd")]) == 1
    assert "another grid" in capsys.readouterr().err
    assert not (tmp_path / "x.seg.nrrd").exists()


def test_segment_without_fingerprint_needs_replace(brain_run, tmp_path, capsys):
    """A segment the engine did not fingerprint (made elsewhere, or renamed tags) could hide a hand edit."""
    seg = _copy(brain_run, tmp_path)
    ref, segs = read_seg_nrrd(seg)
    for key in ("textseg.mask_sha256", "textseg.mask_voxels"):
        del segs[0].tags[key]
    write_seg_nrrd(seg, ref, segs, overwrite=True)
    out = tmp_path / "new.seg.nrrd"
    assert main(["-q", "rethreshold", str(seg), "-s", "brain", "-t", "0.3", "--out", str(out)]) == 2
    assert "no fingerprint" in capsys.readouterr().err and not out.exists()
    assert main(["-q", "rethreshold", str(seg), "-s", "brain", "-t", "0.3", "--out", str(out), "--replace"]) == 0
    _, new = read_seg_nrrd(out)
    assert MaskFingerprint.from_tags(new[0].tags) == MaskFingerprint.of(new[0].mask > 0)


def test_stats_command_adds_confidence_from_the_kept_map(brain_run, tmp_path):
    out = tmp_path / "stats.json"
    assert main(["-q", "stats", str(brain_run["t1"]), str(brain_run["seg"]), "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    row = doc["segments"][0]
    _, segs = read_seg_nrrd(brain_run["seg"])
    conf = confidence(brain_run["maps"]["brain"], segs[0].mask > 0, 0.5, brain_run["existence"]["brain"])
    assert row["confidence_mean"] == conf["mean"] and row["confidence_near_threshold"] == conf["near_threshold"]
    assert row["threshold"] == 0.5 and "confidence_mean" in doc["columns"]


@pytest.fixture
def test_models(monkeypatch):
    monkeypatch.setenv("TEXTSEG_SHOW_TEST_MODELS", "1")


def test_cohort_gets_one_map_folder_per_case(tmp_path, test_models, capsys):
    cohort = tmp_path / "cohort"
    cohort.mkdir()
    for name in ("brain1", "breast1"):
        shutil.copy(shared_file("pyradiomics-examples", f"{name}_image.nrrd"), cohort / f"{name}.nrrd")
    out, maps = tmp_path / "out", tmp_path / "maps"
    args = ["-q", "segment", str(cohort), "-m", "synthetic-3d", "--modality", "MRI", "-p", "100..400",
            "-p", "100..400 left", "--out", str(out), "--probabilities", str(maps), "--probability-format", ".nii.gz",
            "--labelmap", str(tmp_path / "derived" / "labels")]
    assert main(args) == 0
    for name in ("brain1", "breast1"):
        img, arr = _read(cohort / f"{name}.nrrd")
        for prompt, stem in (("100..400", "100..400"), ("100..400 left", "100..400_left")):
            m_img, q = _read(maps / name / f"{stem}.nii.gz")
            assert m_img.GetSize() == img.GetSize() and m_img.GetSpacing() == pytest.approx(img.GetSpacing())
            _, segs = read_seg_nrrd(out / f"{name}.seg.nrrd")
            seg = next(s for s in segs if s.name == prompt)
            assert np.array_equal(q == 255, seg.mask > 0) and set(np.unique(q)) <= {0, 255}
            assert seg.tags["textseg.probability_file"] == f"../maps/{name}/{stem}.nii.gz"
    # the label map in its own folder refers to the same maps: `textseg stats` on it finds them
    stats = tmp_path / "brain1.csv"
    assert main(["-q", "stats", str(cohort / "brain1.nrrd"), str(tmp_path / "derived" / "labels" / "brain1.nii.gz"),
                 "--out", str(stats)]) == 0
    rows = list(csv.DictReader(stats.open()))
    assert [(r["segment"], r["confidence_mean"], r["confidence_near_threshold"]) for r in rows] == [
        ("100..400", "1.0", "0.0"), ("100..400 left", "1.0", "0.0")]  # a 0/1 map: sure everywhere
    # maps are never overwritten: a single run into the same folder is refused before inference
    single = cohort / "brain1.nrrd"
    assert main(["-q", "segment", str(single), "-m", "synthetic-3d", "--modality", "MRI", "-p", "100..400",
                 "--out", str(tmp_path / "b.seg.nrrd"), "--probabilities", str(maps / "brain1"),
                 "--probability-format", ".nii.gz"]) == 1
    assert "already exists" in capsys.readouterr().err and not (tmp_path / "b.seg.nrrd").exists()
    assert main(["-q", "segment", str(single), "-m", "synthetic-3d", "-p", "100..400", "--out",
                 str(tmp_path / "c.seg.nrrd"), "--probabilities", str(maps), "--probability-format", ".png"]) == 1
    assert "probability maps are written as" in capsys.readouterr().err


def test_rethreshold_to_another_folder_keeps_the_map_reachable(brain_run, tmp_path, capsys):
    """The map tag is relative to the segmentation: a result written elsewhere must point at the same map, so
    that it can be re-thresholded again and its statistics get the confidence columns."""
    seg = _copy(brain_run, tmp_path)
    out = tmp_path / "review" / "round 1" / "brain.seg.nrrd"
    assert main(["-q", "rethreshold", str(seg), "-s", "brain", "-t", "0.3", "--out", str(out)]) == 0
    _, segs = read_seg_nrrd(out)
    assert segs[0].tags["textseg.probability_file"] == "../../maps/brain.nrrd"
    again = tmp_path / "review" / "round 2.seg.nrrd"
    assert main(["-q", "rethreshold", str(out), "-s", "brain", "-t", "0.6", "--out", str(again)]) == 0
    q = brain_run["maps"]["brain"].astype(np.float64) / 255
    assert np.array_equal(read_seg_nrrd(again)[1][0].mask > 0, q >= 0.6)
    assert read_seg_nrrd(again)[1][0].tags["textseg.probability_file"] == "../maps/brain.nrrd"
    # a map moved and found with --probabilities: the result points at where it is now
    moved = tmp_path / "moved maps"
    shutil.move(str(tmp_path / "maps"), moved)
    third = tmp_path / "third.seg.nrrd"
    assert main(["-q", "rethreshold", str(again), "-s", "brain", "-t", "0.5", "--probabilities", str(moved),
                 "--out", str(third)]) == 0
    assert read_seg_nrrd(third)[1][0].tags["textseg.probability_file"] == "moved maps/brain.nrrd"
    stats = tmp_path / "third.csv"
    assert main(["-q", "stats", str(brain_run["t1"]), str(third), "--out", str(stats)]) == 0
    row = next(csv.DictReader(open(stats)))
    assert float(row["confidence_mean"]) == pytest.approx(q[q >= 0.5].mean(), abs=1e-9)


def test_rethreshold_refuses_a_segment_name_that_appears_twice(brain_run, tmp_path, capsys):
    seg = _copy(brain_run, tmp_path)
    ref, segs = read_seg_nrrd(seg)
    write_seg_nrrd(seg, ref, [segs[0], replace(segs[0], mask=np.zeros_like(segs[0].mask), tags={})], overwrite=True)
    out = tmp_path / "new.seg.nrrd"
    capsys.readouterr()
    assert main(["-q", "rethreshold", str(seg), "-s", "brain", "-t", "0.3", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "2 segments named 'brain'" in err and err.count("\n") == 1
    assert not out.exists()


def test_stats_refuses_a_probabilities_folder_without_the_maps(brain_run, tmp_path, capsys):
    """--probabilities asks for the confidence columns: a folder that is not there, or holds none of the maps, is
    an error, not a table silently without them."""
    empty = tmp_path / "empty"
    empty.mkdir()
    for folder, words in ((tmp_path / "nowhere", "no such folder"), (empty, "holds no probability map")):
        out = tmp_path / "stats.csv"
        capsys.readouterr()
        assert main(["-q", "stats", str(brain_run["t1"]), str(brain_run["seg"]), "--probabilities", str(folder),
                     "--out", str(out)]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and words in err and err.count("\n") == 1, err
        assert not out.exists()
    shutil.copy(brain_run["map"], empty / "brain.nrrd")
    assert main(["-q", "stats", str(brain_run["t1"]), str(brain_run["seg"]), "--probabilities", str(empty),
                 "--out", str(tmp_path / "stats.csv")]) == 0
    assert "confidence_mean" in next(csv.DictReader(open(tmp_path / "stats.csv")))


def test_maps_in_a_folder_with_non_ascii_letters(tmp_path, test_models, capsys):
    """The map tag holds the folder's name: 'ö' in it crashed the .seg.nrrd writer (an ASCII NRRD header) after
    inference, with the maps written and no segmentation. Non-ASCII tag characters now go as UTF-8 %XX."""
    image = shared_file("pyradiomics-examples", "breast1_image.nrrd")
    work = tmp_path / "Prüfung 1"
    seg, maps = work / "Fall ü.seg.nrrd", work / "Karten ö"
    assert main(["-q", "segment", str(image), "-m", "synthetic-3d", "--modality", "MRI", "-p", "100..400",
                 "--out", str(seg), "--probabilities", str(maps)]) == 0, capsys.readouterr().err
    _, segs = read_seg_nrrd(seg)
    assert segs[0].tags["textseg.probability_file"] == "Karten ö/100..400.nrrd"
    header = seg.read_bytes().split(b"\n\n", 1)[0]
    assert b"Karten %C3%B6/100..400.nrrd" in header and header.isascii()
    out = work / "neu.seg.nrrd"
    assert main(["-q", "rethreshold", str(seg), "-s", "100..400", "-t", "0.3", "--out", str(out)]) == 0
    assert read_seg_nrrd(out)[1][0].tags["textseg.probability_file"] == "Karten ö/100..400.nrrd"
    # the other escapes still round-trip (and '%' itself)
    ref, segs = read_seg_nrrd(seg)
    segs[0].tags["textseg.note"] = "50% | a\nb ü"
    write_seg_nrrd(seg, ref, segs, overwrite=True)
    assert read_seg_nrrd(seg)[1][0].tags["textseg.note"] == "50% | a\nb ü"


def test_an_output_folder_that_cannot_be_made_is_one_error_line(brain_run, tmp_path, capsys):
    """OSError (here: the output's folder is a file; a read-only folder or a full disk alike) gave a traceback."""
    seg = _copy(brain_run, tmp_path)
    (tmp_path / "results").write_text("a file where a folder should be")
    res = tmp_path / "results"
    for argv in (["rethreshold", str(seg), "-s", "brain", "-t", "0.3", "--out", str(res / "x.seg.nrrd")],
                 ["stats", str(brain_run["t1"]), str(seg), "--out", str(res / "x.csv")],
                 ["corrections", "compare", str(seg), str(seg), "--out", str(res / "x.csv")]):
        capsys.readouterr()
        assert main(["-q", *argv]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
        assert str(tmp_path / "results") in err


def test_segment_renamed_with_non_ascii_letters_in_slicer(brain_run, tmp_path, capsys):
    """Slicer writes segment names (and tags) into the .seg.nrrd header as UTF-8. pynrrd read them dropping the
    bytes ('Hirn geprüft' -> 'Hirn geprft') and could not write them at all (a traceback)."""
    seg = _copy(brain_run, tmp_path)
    ref, segs = read_seg_nrrd(seg)
    write_seg_nrrd(seg, ref, [replace(segs[0], name="Hirn-PLACEHOLDER", tags={**segs[0].tags, "Note": "PLACEHOLDER"})],
                   overwrite=True)
    data = seg.read_bytes()
    end = data.index(b"\n\n")  # as Slicer saves it: the header's values in UTF-8
    seg.write_bytes(data[:end].replace(b"PLACEHOLDER", "geprüft 脑".encode()) + data[end:])
    _, segs = read_seg_nrrd(seg)
    assert segs[0].name == "Hirn-geprüft 脑" and segs[0].tags["Note"] == "geprüft 脑"
    out = tmp_path / "neu.seg.nrrd"
    assert main(["-q", "rethreshold", str(seg), "-s", "Hirn-geprüft 脑", "-t", "0.3", "--out", str(out)]) == 0, \
        capsys.readouterr().err
    img = sitk.ReadImage(str(out))  # another reader of the written header: ITK keeps the bytes, Slicer reads UTF-8
    assert img.GetMetaData("Segment0_Name") == "Hirn-geprüft 脑"
    _, new = read_seg_nrrd(out)
    q = brain_run["maps"]["brain"].astype(np.float64) / 255
    assert new[0].name == "Hirn-geprüft 脑" and new[0].tags["Note"] == "geprüft 脑"
    assert np.array_equal(new[0].mask > 0, q >= 0.3)


def test_segmentation_saved_cropped_to_its_segments(brain_run, tmp_path, capsys):
    """Slicer can save a .seg.nrrd cropped to its segments' extent: the same lattice as the map, another extent.
    rethreshold and stats refused it ("the map is on another grid ... give the map written with this
    segmentation", which it is); now the segments are placed onto the map's grid exactly."""
    from textseg.volume import Volume, mask_bounds

    seg = _copy(brain_run, tmp_path)
    ref, segs = read_seg_nrrd(seg)
    full = segs[0].mask > 0
    lo, hi = mask_bounds(full)
    box = tuple(slice(int(a), int(b) + 1) for a, b in zip(lo, hi))
    ijk = np.array([lo[2], lo[1], lo[0]], float)
    origin = tuple(np.asarray(ref.origin) + np.asarray(ref.direction) @ (ijk * np.asarray(ref.spacing)))
    cropped = Volume(np.zeros(full[box].shape, np.uint8), ref.spacing, origin, ref.direction)
    write_seg_nrrd(seg, cropped, [replace(segs[0], mask=segs[0].mask[box].copy())], overwrite=True)
    assert read_seg_nrrd(seg)[0].shape != ref.shape
    q = brain_run["maps"]["brain"].astype(np.float64) / 255
    out = tmp_path / "t0.2.seg.nrrd"
    capsys.readouterr()
    assert main(["-q", "rethreshold", str(seg), "-s", "brain", "-t", "0.2", "--out", str(out)]) == 0, \
        capsys.readouterr().err  # unedited: its fingerprint (of the full grid) still matches
    grid, new = read_seg_nrrd(out)
    assert grid.same_grid(ref) and np.array_equal(new[0].mask > 0, q >= 0.2)
    assert (q >= 0.2).sum() > (q[box] >= 0.2).sum()  # the new mask needed room outside the cropped extent
    stats = tmp_path / "cropped.json"
    assert main(["-q", "stats", str(brain_run["t1"]), str(seg), "--out", str(stats)]) == 0, capsys.readouterr().err
    row = json.loads(stats.read_text())["segments"][0]
    conf = confidence(brain_run["maps"]["brain"], full, 0.5, brain_run["existence"]["brain"])
    assert row["confidence_mean"] == conf["mean"] and row["voxel_count"] == int(full.sum())
