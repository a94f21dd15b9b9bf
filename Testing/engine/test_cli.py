"""The textseg CLI end to end (subprocess where it matters): outputs, exit codes, cohort resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, shared_file

from textseg.cli import main
from textseg.formats.images import write_image
from textseg.formats.segments import read_seg_nrrd
from textseg.volume import Volume


def _phantom_file(path: Path, value=400) -> Path:
    arr = np.full((6, 8, 10), -1000, np.int16)
    arr[1:5, 2:6, 1:9] = value
    write_image(Volume(arr, (1.0, 1.0, 2.0)), path)
    return path


@pytest.fixture
def test_models(monkeypatch):
    monkeypatch.setenv("TEXTSEG_SHOW_TEST_MODELS", "1")


def test_segment_writes_one_segment_per_prompt(tmp_path, test_models, capsys):
    img = _phantom_file(tmp_path / "ct.nii.gz")
    out = tmp_path / "ct.seg.nrrd"
    rc = main(["-q", "segment", str(img), "-m", "synthetic-3d", "--modality", "CT", "-p", "bone", "-p", "bone left",
               "--out", str(out)])
    assert rc == 0
    ref, segs = read_seg_nrrd(out)
    assert [s.name for s in segs] == ["bone", "bone left"]
    assert [int(s.mask.sum()) for s in segs] == [128, 64]
    assert json.loads(segs[0].tags["textseg.prompt"]) == {"text": "bone"}
    assert segs[0].tags["textseg.model"] == "synthetic-3d"


def test_an_output_that_cannot_be_written_is_refused_before_inference(tmp_path, test_models, capsys, monkeypatch):
    """An output (segmentation or probability map) under a path whose folder is a file was found only when
    writing, after the model had run: minutes lost per image. Now one line (exit 2) before anything runs."""
    from textseg.predictor import Predictor

    runs = []
    real = Predictor.set_image
    monkeypatch.setattr(Predictor, "set_image", lambda self, *a, **k: (runs.append(1), real(self, *a, **k))[1])
    img = _phantom_file(tmp_path / "ct.nii.gz")
    blocker = tmp_path / "results"
    blocker.write_text("a file where a folder should be")
    for extra in (["--out", str(blocker / "sub" / "ct.seg.nrrd")],
                  ["--out", str(tmp_path / "ct.seg.nrrd"), "--probabilities", str(blocker / "maps")]):
        capsys.readouterr()
        assert main(["-q", "segment", str(img), "-m", "synthetic-3d", "-p", "bone", *extra]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{blocker} is a file, not a folder" in err, err
    assert runs == [] and not (tmp_path / "ct.seg.nrrd").exists()


def test_exit_codes_and_messages(tmp_path, test_models, capsys):
    img = _phantom_file(tmp_path / "ct.nii.gz")
    out = tmp_path / "ct.seg.nrrd"
    out.write_text("precious")
    assert main(["segment", str(img), "-m", "synthetic-3d", "-p", "bone", "--out", str(out)]) == 1
    assert "already exists" in capsys.readouterr().err and out.read_text() == "precious"
    assert main(["segment", str(img), "-m", "no-such", "-p", "x", "--out", str(tmp_path / "a.seg.nrrd")]) == 2
    assert "Unknown model" in capsys.readouterr().err
    assert main(["segment", str(tmp_path / "missing.nii.gz"), "-m", "synthetic-3d", "-p", "x", "--out",
                 str(tmp_path / "b.seg.nrrd")]) == 2
    assert main(["segment", str(img), "-m", "synthetic-3d", "--out", str(tmp_path / "c.seg.nrrd")]) == 2
    assert "--prompt" in capsys.readouterr().err
    bad = tmp_path / "bad.nii.gz"
    bad.write_text("not an image")
    assert main(["segment", str(bad), "-m", "synthetic-3d", "-p", "bone", "--out", str(tmp_path / "d.seg.nrrd")]) == 1
    assert "bad.nii.gz" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["segment"])
    assert exc.value.code == 2


def test_cohort_resumes_where_it_stopped(tmp_path, test_models):
    cohort = tmp_path / "cohort"
    cohort.mkdir()
    for name in ("a", "b", "c"):
        _phantom_file(cohort / f"{name}.nii.gz")
    (cohort / "notes.txt").write_text("not a case")
    out = tmp_path / "out"
    out.mkdir()
    # case b was done earlier: it must be skipped, not overwritten
    (out / "b.seg.nrrd").write_text("earlier result")
    rc = main(["-q", "segment", str(cohort), "-m", "synthetic-3d", "-p", "bone", "--out", str(out)])
    assert rc == 0
    assert (out / "b.seg.nrrd").read_text() == "earlier result"
    assert sorted(p.name for p in out.glob("*.seg.nrrd")) == ["a.seg.nrrd", "b.seg.nrrd", "c.seg.nrrd"]
    manifest = json.loads((out / "cohort.json").read_text())
    assert {k: v["status"] for k, v in manifest["cases"].items()} == {"a.nii.gz": "done", "b.nii.gz": "done",
                                                                      "c.nii.gz": "done"}


def test_cohort_writes_one_objects_and_stats_file_per_case(tmp_path, test_models, capsys):
    """In cohort mode --objects/--stats name folders: one file per case (<case>.objects.json, <case>.csv), made
    if missing. They were written without an extension (objects) or refused for every case after its .seg.nrrd
    was written (stats), and a file path made every case write the same file (the second case failed, or with
    --overwrite replaced the first case's objects)."""
    cohort = tmp_path / "cohort"
    cohort.mkdir()
    _phantom_file(cohort / "a.nii.gz")
    _phantom_file(cohort / "b.nii.gz", value=0)  # soft tissue, no bone
    out, objs, stats = tmp_path / "out", tmp_path / "objects", tmp_path / "stats"
    rc = main(["-q", "segment", str(cohort), "-m", "synthetic-3d", "-p", "soft tissue", "--out", str(out),
               "--objects", str(objs), "--stats", str(stats)])
    assert rc == 0
    assert sorted(p.name for p in objs.iterdir()) == ["a.objects.json", "b.objects.json"]
    assert sorted(p.name for p in stats.iterdir()) == ["a.csv", "b.csv"]
    a, b = (json.loads((objs / f"{n}.objects.json").read_text()) for n in "ab")
    assert a["image"].endswith("a.nii.gz") and b["image"].endswith("b.nii.gz")
    assert a["segments"][0]["objects"] == []  # each case its own objects: a has no soft tissue, b has the box
    assert [o["voxel_count"] for o in b["segments"][0]["objects"]] == [128]
    assert (stats / "b.csv").read_text().splitlines()[1].startswith("soft tissue,128,")
    single = tmp_path / "one.objects.json"
    single.write_text("precious")
    capsys.readouterr()
    assert main(["-q", "segment", str(cohort), "-m", "synthetic-3d", "-p", "bone", "--out", str(tmp_path / "out2"),
                 "--objects", str(single), "--overwrite"]) == 2
    assert "names a folder" in capsys.readouterr().err and single.read_text() == "precious"


def test_module_entry_point_runs_deepbet(tmp_path):
    """`python -m textseg segment` on the MNI152 head: the README's main job."""
    pytest.importorskip("deepbet")
    t1 = shared_file("mni152", "MNI152_T1.nii.gz")
    out = tmp_path / "brain.seg.nrrd"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "BiomedParseSlicer")}
    proc = subprocess.run([sys.executable, "-m", "textseg", "segment", str(t1), "--prompt", "brain", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    _, segs = read_seg_nrrd(out)
    assert segs[0].name == "brain" and segs[0].mask.sum() > 1_000_000


def test_stats_command_on_the_real_labelmap(tmp_path):
    """`textseg stats` on the TotalSegmentator CT and its 117-class labelmap (liver = label 5)."""
    import csv

    import SimpleITK as sitk

    ct = shared_file("totalsegmentator-examples", "example_ct_sm.nii.gz")
    seg = shared_file("totalsegmentator-examples", "example_seg.nii.gz")
    labels = shared_file("totalsegmentator-examples", "example_seg_labels.json")
    out = tmp_path / "stats.csv"
    assert main(["-q", "stats", str(ct), str(seg), "--labels", str(labels), "--out", str(out)]) == 0
    rows = {r["segment"]: r for r in csv.DictReader(out.open())}
    lab = sitk.GetArrayFromImage(sitk.ReadImage(str(seg)))
    img = sitk.GetArrayFromImage(sitk.ReadImage(str(ct))).astype(float)
    liver = lab == 5
    assert int(rows["liver"]["voxel_count"]) == int(liver.sum())
    assert float(rows["liver"]["volume_mm3"]) == pytest.approx(liver.sum() * 27.0)
    assert float(rows["liver"]["mean"]) == pytest.approx(img[liver].mean(), rel=1e-6)
    assert main(["-q", "stats", str(ct), str(seg), "--labels", str(labels), "--out", str(out)]) == 1  # exists
