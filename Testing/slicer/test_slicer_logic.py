"""The Slicer module's Logic with the REAL Slicer core (PyPI slicer-core): real MRML scene, volume
nodes read by Slicer's own reader, vtkMRMLSegmentationNode, .seg.nrrd written by Slicer.
No fake slicer module: skipped with a reason when slicer-core is not installed."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, shared_file

slicer_core = pytest.importorskip("slicer_core",
                                  reason="needs the real Slicer core: pip install slicer-core (test extra)")
import slicer  # noqa: E402  (the real package from slicer-core)

from BiomedParseSlicerLib import checks, headless, mrml, runner, stats  # noqa: E402
from BiomedParseSlicerLib.logic import BiomedParseSlicerLogic  # noqa: E402
from textseg.errors import OutputExistsError, UsageError  # noqa: E402
from textseg.formats.images import read_volume  # noqa: E402
from textseg.formats.segments import Segment  # noqa: E402
from textseg.predictor import Predictor  # noqa: E402

PROMPTS = ["bone left", "bone", "soft tissue superior"]


def _write_variant(src: Path, dst: Path, kind: str) -> Path:
    """The same CT stored flipped along i (same physical image) or with a 25-degree oblique direction."""
    import SimpleITK as sitk

    img = sitk.ReadImage(str(src))
    if kind == "flipped":
        out = sitk.Flip(img, [True, False, True])  # keeps physical positions: a re-stored copy
    else:
        out = sitk.Image(img)
        a = np.deg2rad(25)
        rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
        out.SetDirection(tuple((rot @ np.array(img.GetDirection()).reshape(3, 3)).ravel()))
    sitk.WriteImage(out, str(dst))
    return dst


@pytest.fixture(scope="module")
def ct_path():
    return shared_file("totalsegmentator-examples", "example_ct_sm.nii.gz")


@pytest.fixture
def app():
    return headless.create()


@pytest.fixture
def logic(app):
    return BiomedParseSlicerLogic(scene=app.scene)


@pytest.fixture(scope="module")
def predictor():
    return Predictor("synthetic-3d", device="cpu")


def test_lib_imports_headless_without_faking_slicer():
    """Every module of the Lib imports with slicer-core alone: no Qt, nothing faked (a fresh process: other
    tests load PyQt5)."""
    import subprocess

    code = (f"import sys; sys.path[:0] = [{str(ROOT / 'BiomedParseSlicer')!r}]\n"
            "import slicer, slicer_core, BiomedParseSlicerLib, importlib\n"
            "for name in BiomedParseSlicerLib.MODULES: importlib.import_module('BiomedParseSlicerLib.' + name)\n"
            "print(sorted(m for m in ('qt', 'ctk', 'PyQt5', 'PySide6') if m in sys.modules),\n"
            "      hasattr(slicer, 'ScriptedLoadableModule'), slicer.vtkMRMLScene is slicer_core.vtkMRMLScene)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.split() == ["[]", "False", "True"], out.stdout + out.stderr[-2000:]


def test_parameter_node_and_default_input_volume(app, logic):
    """The Logic's parameter node is the scene's one singleton vtkMRMLScriptedModuleNode of the module (as
    ScriptedLoadableModuleLogic makes it); the default input is the first scalar or vector volume, never a label map."""
    node = logic.getParameterNode()
    assert node.IsA("vtkMRMLScriptedModuleNode") and node.GetAttribute("ModuleName") == "BiomedParseSlicer"
    assert node.GetSingletonTag() == "BiomedParseSlicer" and node.GetScene() is app.scene
    assert BiomedParseSlicerLogic(scene=app.scene).getParameterNode() is node
    assert logic.defaultInputVolume() is None
    app.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
    rgb = app.scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "photo")
    assert logic.defaultInputVolume() is rgb
    app.scene.Clear(0)
    assert logic.getParameterNode().GetScene() is app.scene


def test_reload_reimports_the_lib():
    """Slicer's Reload re-imports only the module file; the Widget's onReload reloads the Lib first (in a process
    of its own: reloaded classes would not compare equal to the ones other tests imported)."""
    import subprocess

    code = (f"import sys; sys.path[:0] = [{str(ROOT / 'BiomedParseSlicer')!r}]\n"
            "import BiomedParseSlicerLib\nfrom BiomedParseSlicerLib import controller, logic, panel\n"
            "before = controller.PanelController, logic.BiomedParseSlicerLogic\n"
            "BiomedParseSlicerLib.reload()\n"
            "print(controller.PanelController is not before[0], logic.BiomedParseSlicerLogic is not before[1],\n"
            "      panel.Inputs is controller.Inputs)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.split() == ["True", "True", "True"], out.stderr[-2000:]


def test_client_only_segments_through_the_local_server_without_torch(tmp_path, monkeypatch):
    """Client-only mode: the module, its Logic and the remote client run in a process where torch
    cannot be imported; the engine's real server (its own process, started as the GUI starts it)
    does the inference. The segments equal the engine's own masks."""
    import subprocess

    pytest.importorskip("fastapi", reason="the engine's server needs the server extra")
    monkeypatch.setenv("TEXTSEG_SHOW_TEST_MODELS", "1")  # the hidden synthetic model, for tests
    server = runner.LocalServer(device="cpu", log_path=tmp_path / "server.log")
    server.start(timeout=120)
    try:
        code = (
            "import sys; sys.modules['torch'] = None\n"  # any 'import torch' now raises ImportError
            f"sys.path[:0] = [{str(ROOT / 'BiomedParseSlicer')!r}]\nimport numpy as np\nfrom BiomedParseSlicerLib "
            f"import checks, headless, mrml, runner\nfrom BiomedParseSlicerLib.logic import "
            f"BiomedParseSlicerLogic\napp = headless.create(); logic = BiomedParseSlicerLogic(scene=app.scene)\nnode = "
            f"mrml.volume_node_from_volume(app.scene, checks.phantom())\np = runner.make_predictor('synthetic-3d', "
            f"'remote', url={server.url!r})\nseg = logic.segment(node, logic.markupPrompts('bone left\\nbone', "
            f"'synthetic-3d'), 'synthetic-3d', predictor=p)\nmasks = {{seg.GetSegmentation().GetSegment(s).GetName(): "
            f"mrml.segment_mask(seg, s, node) for s in "
            f"logic.lastSegmentIDs}}\nnp.savez({str(tmp_path / 'masks.npz')!r}, **masks)\nprint(type(p).__name__, "
            f"sys.modules['torch'])\n"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    finally:
        server.stop()
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["RemotePredictor", "None"]  # torch was never imported by the client
    expected = checks.engine_masks(checks.phantom(), ["bone left", "bone"])
    got = np.load(tmp_path / "masks.npz")
    assert sorted(got.files) == sorted(expected) and all(expected[k].any() for k in expected)
    for name, mask in expected.items():
        np.testing.assert_array_equal(got[name], mask)


def test_prompt_history_most_recent_first_unique_bounded():
    history = BiomedParseSlicerLogic.updatedHistory("liver\nspleen\nleft  kidney", ["Spleen", "aorta", ""])
    assert history.split("\n") == ["Spleen", "aorta", "liver", "left kidney"]
    many = BiomedParseSlicerLogic.updatedHistory(history, [f"t{n}" for n in range(40)])
    assert many.split("\n") == [f"t{n}" for n in range(30)]
    words = BiomedParseSlicerLogic.completionWords("deepbet", ["Brain", "my lesion"])
    assert words == ["brain", "my lesion"]  # deepbet's vocabulary first, then history, each once
    from textseg.catalog import get_model

    v1 = BiomedParseSlicerLogic.completionWords("biomedparse-v1")
    assert len(v1) > 20 and "liver" in [w.lower() for w in v1] and v1 == list(get_model("biomedparse-v1").vocabulary)


@pytest.mark.parametrize("variant", ["original", "flipped", "oblique"])
def test_geometry_round_trip(app, logic, predictor, ct_path, tmp_path, variant):
    path = ct_path if variant == "original" else _write_variant(ct_path, tmp_path / f"{variant}.nii.gz", variant)
    node = app.load_volume(path)
    reference = read_volume(path)  # SimpleITK, independent of Slicer's reader
    volume = logic.volumeFromNode(node)
    assert volume.same_grid(reference, tol=1e-4) and np.array_equal(volume.array, reference.array)
    expected = checks.engine_masks(reference, PROMPTS)
    seg = logic.segment(node, PROMPTS, "synthetic-3d", modality="CT", predictor=predictor)
    assert [seg.GetSegmentation().GetSegment(s).GetName() for s in logic.lastSegmentIDs] == PROMPTS
    checks.check_geometry(seg, logic.lastSegmentIDs, node, expected, reference)
    assert all(expected[p].any() for p in PROMPTS)
    checks.check_seg_nrrd(seg, tmp_path / "out.seg.nrrd", reference, expected)


def test_flipped_copy_gives_the_same_physical_segment(app, logic, predictor, ct_path, tmp_path):
    """'bone left' depends on orientation: the re-stored copy must give the same RAS voxels."""
    centres = {}
    for variant in ("original", "flipped"):
        path = ct_path if variant == "original" else _write_variant(ct_path, tmp_path / "f.nii.gz", variant)
        node = app.load_volume(path)
        seg = logic.segment(node, ["bone left"], "synthetic-3d", modality="CT", predictor=predictor)
        centres[variant] = checks.segment_centres_ras(seg, logic.lastSegmentIDs[0])
    assert len(centres["original"]) > 1000
    np.testing.assert_allclose(centres["flipped"], centres["original"], atol=1e-3)
    # patient left is RAS x < 0 side of the body centre: every voxel lies left of the image centre
    node = app.load_volume(ct_path)
    b = [0.0] * 6
    node.GetRASBounds(b)
    assert (centres["original"][:, 0] <= (b[0] + b[1]) / 2 + 1.5).all()


def test_parent_transform_linear_is_applied_nonlinear_refused(app, logic, predictor, ct_path):
    node = app.load_volume(ct_path)
    transform = app.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    m = np.eye(4)
    m[:3, :3] = [[0, -1, 0], [1, 0, 0], [0, 0, 1]]  # 90 degrees about S
    m[:3, 3] = (5, -7, 11)
    transform.SetMatrixTransformToParent(mrml.numpy_to_matrix(m))
    node.SetAndObserveTransformNodeID(transform.GetID())
    volume = logic.volumeFromNode(node)
    np.testing.assert_allclose(volume.ijk_to_ras, m @ mrml.ijk_to_ras(node), atol=1e-9)
    seg = logic.segment(node, ["bone"], "synthetic-3d", modality="CT", predictor=predictor)
    assert seg.GetParentTransformNode() is transform  # segments stay on the volume's own grid
    expected = checks.engine_masks(volume, ["bone"])
    np.testing.assert_array_equal(mrml.segment_mask(seg, logic.lastSegmentIDs[0], node), expected["bone"])

    grid = app.scene.AddNewNodeByClass("vtkMRMLGridTransformNode")
    transform.SetAndObserveTransformNodeID(grid.GetID())
    grid.SetAndObserveTransformToParent(slicer.vtkOrientedGridTransform())
    with pytest.raises(UsageError, match="Harden"):
        logic.volumeFromNode(node)


def test_existing_segments_preserved_and_rerun_replaces_only_its_own(app, logic, predictor, ct_path):
    node = app.load_volume(ct_path)
    seg = mrml.prepare_segmentation_node(app.scene, node)
    drawn = np.zeros(node.GetImageData().GetDimensions()[::-1], np.uint8)
    drawn[10:20, 30:60, 40:80] = 1
    user_id = seg.GetSegmentation().AddEmptySegment("", "bone", (0.1, 0.2, 0.3))  # a user's segment, same name
    mrml.set_segment_mask(seg, user_id, drawn, node)
    logic.segment(node, ["bone", "air"], "synthetic-3d", modality="CT", segmentationNode=seg, predictor=predictor)
    first_ids = list(logic.lastSegmentIDs)
    assert len(mrml.segment_ids(seg)) == 3 and user_id not in first_ids
    before = checks.segment_state(seg, node)
    assert logic.existingSegmentsFor(seg, ["bone"]) == [first_ids[0]]  # the user's 'bone' is not a match

    logic.segment(node, ["bone left"], "synthetic-3d", modality="CT", segmentationNode=seg, predictor=predictor,
                  replace=True)  # a different prompt: added, nothing replaced
    assert len(mrml.segment_ids(seg)) == 4
    checks.check_preserved(before, checks.segment_state(seg, node))

    before = checks.segment_state(seg, node)
    bone_again = Predictor("synthetic-3d", device="cpu")
    logic.segment(node, ["BONE"], "synthetic-3d", modality="CT", segmentationNode=seg, predictor=bone_again,
                  replace=True)
    assert logic.lastSegmentIDs == [first_ids[0]] and len(mrml.segment_ids(seg)) == 4
    checks.check_preserved(before, checks.segment_state(seg, node), changed=[first_ids[0]])
    np.testing.assert_array_equal(mrml.segment_mask(seg, user_id, node), drawn)

    logic.segment(node, ["bone"], "synthetic-3d", modality="CT", segmentationNode=seg, predictor=predictor,
                  replace=False)
    assert len(mrml.segment_ids(seg)) == 5  # without replace: added beside


def test_replacing_a_segment_drops_the_earlier_runs_tags(app, logic, predictor):
    """A re-run that replaces a segment leaves no tag of the earlier run that the new result does not have:
    a partial (cancelled) segment replaced by a complete result is no longer marked partial, and a segment
    replaced by an empty result (target absent now) keeps no stale detection boxes."""
    import dataclasses

    node = mrml.volume_node_from_volume(app.scene, checks.phantom(), "phantom")
    seg = mrml.prepare_segmentation_node(app.scene, node)
    predictor.set_image(logic.volumeFromNode(node), "CT")
    (r,) = predictor.predict(["bone"])
    assert r.voxel_count > 0 and r.objects
    logic.addResults(node, [dataclasses.replace(r, complete=False)], seg)
    (sid,) = logic.lastSegmentIDs
    s = seg.GetSegmentation().GetSegment(sid)
    assert (s.GetName(), mrml.get_tag(s, "textseg.complete")) == ("bone (partial)", "false")

    logic.addResults(node, [r], seg, replace=True)
    assert logic.lastSegmentIDs == [sid]
    assert (s.GetName(), mrml.get_tag(s, "textseg.complete")) == ("bone", "")
    assert json.loads(mrml.get_tag(s, "textseg.objects")) == r.objects

    absent = dataclasses.replace(r, mask=np.zeros_like(r.mask), objects=[], present=False)
    logic.addResults(node, [absent], seg, replace=True)
    assert logic.lastSegmentIDs == [sid] and not mrml.segment_mask(seg, sid, node).any()
    assert mrml.get_tag(s, "textseg.objects") == ""  # no boxes of a mask that is gone


def test_results_for_a_segmentation_removed_meanwhile_go_to_a_new_node(app, logic, predictor):
    """The user deletes the output segmentation while a (long) run is going: its results go into a new
    segmentation node in the scene, not into the removed node where nobody can see them."""
    node = mrml.volume_node_from_volume(app.scene, checks.phantom(), "phantom")
    seg = mrml.prepare_segmentation_node(app.scene, node)
    predictor.set_image(logic.volumeFromNode(node), "CT")
    results = predictor.predict(["bone"])
    app.scene.RemoveNode(seg)
    out = logic.addResults(node, results, seg)
    assert out is not seg and out.GetScene() is app.scene
    (sid,) = logic.lastSegmentIDs
    np.testing.assert_array_equal(mrml.segment_mask(out, sid, node), results[0].mask)


def test_segment_everything_adds_one_named_segment_per_target_and_keeps_the_others(app, logic, tmp_path):
    """Logic.recognize ("Segment everything") with BiomedParse v2 (tiny random weights): one segment per target
    found, named after it, mask equal to the engine's, detection objects in a tag; the user's segment stays;
    a re-run with replace=True replaces only those segments."""
    import v2_helpers as tr

    weights = tr.make_v2_weights(tmp_path)
    volume = tr.ct_volume()
    node = mrml.volume_node_from_volume(app.scene, volume, "ct")
    seg = mrml.prepare_segmentation_node(app.scene, node)
    drawn = np.zeros(volume.shape, np.uint8)
    drawn[1:3, 4:9, 5:12] = 1
    user_id = seg.GetSegmentation().AddEmptySegment("", "my lesion", (0.1, 0.2, 0.3))
    mrml.set_segment_mask(seg, user_id, drawn, node)
    options = {"targets": ["liver", "spleen", "left kidney", "aorta"], "existence_threshold": 0.0}
    engine = tr.v2_predictor(weights)
    engine.set_image(volume, "CT", "abdomen")
    want = engine.recognize(**options)
    assert len(want) >= 2

    logic.recognize(node, "biomedparse-v2", "CT", "abdomen", segmentationNode=seg, predictor=tr.v2_predictor(weights),
                    **options)
    ids = list(logic.lastSegmentIDs)
    assert [seg.GetSegmentation().GetSegment(i).GetName() for i in ids] == [w.name for w in want]
    for sid, w in zip(ids, want):
        np.testing.assert_array_equal(mrml.segment_mask(seg, sid, node), w.mask)
        s = seg.GetSegmentation().GetSegment(sid)
        assert json.loads(mrml.get_tag(s, "textseg.objects")) == w.objects
        assert mrml.get_tag(s, "textseg.recognition") == "biomedparse-v2"
    np.testing.assert_array_equal(mrml.segment_mask(seg, user_id, node), drawn)

    before = checks.segment_state(seg, node)
    assert logic.existingSegmentsFor(seg, [w.prompt for w in want]) == ids
    logic.recognize(node, "biomedparse-v2", "CT", "abdomen", segmentationNode=seg, predictor=tr.v2_predictor(weights),
                    replace=True, **options)
    assert logic.lastSegmentIDs == ids and len(mrml.segment_ids(seg)) == len(ids) + 1
    checks.check_preserved(before, checks.segment_state(seg, node), changed=ids)
    with pytest.raises(UsageError, match="has no recognition"):
        logic.recognize(node, "synthetic-3d", "CT", predictor=Predictor("synthetic-3d", device="cpu"))


def test_segment_everything_cancelled_or_empty_is_said_so_and_adds_no_node(app, logic, tmp_path):
    """A "Segment everything" cancelled before any slice was recognized raises Cancelled (the panel logs
    "Cancelled."), not "recognized none of its targets"; one that finds nothing says so. Neither leaves an empty
    segmentation node behind (recognizeVolume, which the panel's worker thread runs, raises as Logic.recognize)."""
    import v2_helpers as tr

    from textseg.errors import Cancelled
    from textseg.runcontrol import CancelToken

    weights = tr.make_v2_weights(tmp_path)
    node = mrml.volume_node_from_volume(app.scene, tr.ct_volume(), "ct")
    nodes = app.scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")
    token = CancelToken()

    def progress(f, stage=""):
        if stage.startswith("recognizing slices"):
            token.cancel()

    with pytest.raises(Cancelled, match="nothing added"):
        logic.recognize(node, "biomedparse-v2", "CT", "abdomen", predictor=tr.v2_predictor(weights), progress=progress,
                        cancel=token, targets=["liver"], existence_threshold=0.0)
    token = CancelToken()
    with pytest.raises(Cancelled, match="nothing added"):
        logic.recognizeVolume(tr.ct_volume(), "biomedparse-v2", "CT", "abdomen", tr.v2_predictor(weights), progress,
                              token, targets=["liver"], existence_threshold=0.0)
    with pytest.raises(UsageError, match="recognized none of its targets.*modality"):
        logic.recognizeVolume(tr.ct_volume(), "biomedparse-v2", "CT", "abdomen", tr.v2_predictor(weights),
                              targets=["liver"], existence_threshold=1.1)
    assert app.scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == nodes


def test_terminology_colour_and_provenance(app, logic, predictor, ct_path, tmp_path):
    node = app.load_volume(ct_path)
    seg = logic.segment(node, ["bone", "air"], "synthetic-3d", modality="CT", predictor=predictor)
    for sid, prompt in zip(logic.lastSegmentIDs, ["bone", "air"]):
        checks.check_provenance(seg, sid, "synthetic-3d", prompt)
    s = seg.GetSegmentation().GetSegment(logic.lastSegmentIDs[0])
    assert mrml.get_tag(s, "textseg.modality") == "CT" and json.loads(mrml.get_tag(s, "textseg.threshold")) == 0.5
    colours = {tuple(seg.GetSegmentation().GetSegment(i).GetColor()) for i in logic.lastSegmentIDs}
    assert len(colours) == 2  # distinct, fixed colours

    # colour and terminology provided by the engine (textseg.terminology) are what Slicer stores
    term = ("Segmentation category and type - 3D Slicer General Anatomy list~SCT^123037004^Anatomical Structure"
            "~SCT^10200004^Liver~^^~Anatomic codes - DICOM master list~^^~^^")
    mask = mrml.segment_mask(seg, logic.lastSegmentIDs[0], node)
    sid = mrml.add_segment(seg, Segment("liver", mask, (0.87, 0.51, 0.40), term, {"textseg.model": "m"}), node, 5)
    s = seg.GetSegmentation().GetSegment(sid)
    assert s.GetTerminology() == term and np.allclose(s.GetColor(), (0.87, 0.51, 0.40))
    slicerio_term = {"contextName": "c", "category": ["SCT", "123037004", "Anatomical Structure"],
                     "type": ["SCT", "10200004", "Liver"]}
    assert mrml.terminology_string(slicerio_term).startswith("c~SCT^123037004^Anatomical Structure~SCT^10200004^Liver")
    storage = seg.CreateDefaultStorageNode()
    storage.SetFileName(str(tmp_path / "t.seg.nrrd"))
    assert storage.WriteData(seg)
    from textseg.formats.segments import read_seg_nrrd

    read = {s.name: s for s in read_seg_nrrd(tmp_path / "t.seg.nrrd")[1]}
    assert read["liver"].terminology["type"] == ["SCT", "10200004", "Liver"]
    assert read["bone"].tags["textseg.model"] == "synthetic-3d"


def test_statistics_table_and_csv_equal_segment_statistics(app, logic, predictor, ct_path, tmp_path):
    node = app.load_volume(ct_path)
    logic.keepModelOutput = False  # SegmentStatistics' columns alone (confidence columns: test_slicer_review.py)
    seg = logic.segment(node, ["bone", "air", "nothing"], "synthetic-3d", modality="CT", predictor=predictor)
    # a user edit after the run is included: erase a block from 'bone'
    bone = mrml.segment_mask(seg, logic.lastSegmentIDs[0], node)
    bone[:, :, :40] = 0
    mrml.set_segment_mask(seg, logic.lastSegmentIDs[0], bone, node)
    csv_path = tmp_path / "stats.csv"
    table = logic.statistics(seg, node, csvPath=csv_path)
    checks.check_statistics(table, seg, node)
    t = table.GetTable()
    assert [t.GetColumnName(c) for c in range(t.GetNumberOfColumns())] == stats.headers()
    assert t.GetNumberOfRows() == 3 and t.GetColumn(1).GetValue(0) == int(bone.sum())
    assert t.GetColumn(1).GetValue(2) == 0  # 'nothing': empty segment, zero voxels
    ct = read_volume(ct_path).array
    assert abs(t.GetColumn(8).GetValue(0) - float(np.median(ct[bone > 0]))) < 1e-9
    rows = list(csv.reader(open(csv_path)))
    assert rows[0] == stats.headers()
    assert rows[1][0] == "bone" and int(rows[1][1]) == int(bone.sum()) and rows[3][4] == ""
    assert float(rows[1][2]) == pytest.approx(bone.sum() * 27.0)  # 3 mm isotropic voxels
    with pytest.raises(OutputExistsError):
        logic.statistics(seg, node, table, csvPath=csv_path)  # never overwrites silently
    assert table.GetNumberOfColumns() == len(stats.COLUMNS)


# What Slicer's SegmentStatistics.exportToTable gives with the Labelmap plugin's voxel_count/volume_mm3/
# volume_cm3 and the Scalar Volume plugin's min/max/mean/stdev/median enabled, read from Slicer's
# Modules/Scripted/SegmentStatistics/SegmentStatisticsPlugins/{Labelmap,ScalarVolume}SegmentStatisticsPlugin.py
# (getMeasurementInfo name/title/units; identical in v5.8.0 d20ee94c, v5.10.0 a2b6d082 and main 583e9b37)
# and SegmentStatistics.py (plugin order Labelmap, Scalar Volume; keys in each plugin's order; units
# label = the volume's VoxelValueUnits code meaning). The module's self-test compares against the real
# exportToTable inside Slicer (checks.check_segment_statistics_branch).
SEGMENT_STATISTICS_TABLE = [  # (column name, column title, unit label)
    ("Segment", "Segment", ""),
    ("Voxel count", "Voxel count", ""),
    ("Volume mm3", "Volume", "mm3"),
    ("Volume cm3", "Volume", "cm3"),
    ("Minimum", "Minimum", "Hounsfield unit"),
    ("Maximum", "Maximum", "Hounsfield unit"),
    ("Mean", "Mean", "Hounsfield unit"),
    ("Standard deviation", "Standard Deviation", "Hounsfield unit"),
    ("Median", "Median", "Hounsfield unit"),
]


def test_engine_statistics_table_has_segment_statistics_columns_and_units(app, logic, predictor, ct_path, tmp_path):
    assert stats.slicer_statistics(None, None) is None  # slicer-core: no SegmentStatistics, the engine path runs
    node = app.load_volume(ct_path)
    units = slicer.vtkCodedEntry()
    units.SetValueSchemeMeaning("[hnsf'U]", "UCUM", "Hounsfield unit")  # what Slicer's DICOM reader sets for CT
    node.SetVoxelValueUnits(units)
    logic.keepModelOutput = False  # SegmentStatistics' columns alone (confidence columns: test_slicer_review.py)
    seg = logic.segment(node, ["bone", "air"], "synthetic-3d", modality="CT", predictor=predictor)
    table = logic.statistics(seg, node, csvPath=tmp_path / "s.csv")
    t = table.GetTable()
    got = [(t.GetColumnName(c), table.GetColumnTitle(t.GetColumnName(c)), table.GetColumnUnitLabel(t.GetColumnName(c)))
           for c in range(t.GetNumberOfColumns())]
    assert got == SEGMENT_STATISTICS_TABLE
    assert [t.GetColumn(c).GetClassName() for c in range(3)] == ["vtkStringArray", "vtkLongArray", "vtkDoubleArray"]
    assert next(csv.reader(open(tmp_path / "s.csv"))) == [name for name, _t, _u in SEGMENT_STATISTICS_TABLE]
    node.SetVoxelValueUnits(None)  # no unit known (e.g. NIfTI): intensity columns unlabelled, as in Slicer
    table = logic.statistics(seg, node, table)
    assert [table.GetColumnUnitLabel(n) for n, _t, _u in SEGMENT_STATISTICS_TABLE] == ["", "", "mm3", "cm3"] + [""] * 5


def test_segment_in_worker_thread_with_progress_and_cancel(app, logic, ct_path):
    node = app.load_volume(ct_path)
    volume = logic.volumeFromNode(node)
    slow = Predictor("synthetic-3d", device="cpu", delay=0.3)
    task = runner.BackgroundTask(lambda progress, cancel: logic.predict(
        volume, ["bone", "air", "fat"], "synthetic-3d", "CT", None, slow, progress, cancel)).start()
    seen = []
    while not task.done:
        snap = task.poll()
        seen.append(snap.fraction)
        if snap.fraction > 0.7 and not task.cancel_token.cancelled:
            task.cancel()  # after the first prompt finished
        task.wait(0.02)
    assert task.error is None and 1 <= len(task.result) < 3  # finished prompts are kept
    assert seen == sorted(seen) and max(seen) > 0.5
    seg = logic.addResults(node, task.result)
    assert len(mrml.segment_ids(seg)) == len(task.result)


def test_module_self_test_checks_on_phantom(app, logic, tmp_path):
    """The checks BiomedParseSlicerTest runs inside Slicer, here on the real slicer-core."""
    checks.run_phantom_checks(logic, app.scene, tmp_path)


def test_local_server_lifecycle(tmp_path):
    script = tmp_path / "serve.py"
    script.write_text(
        "import http.server, sys, textseg\nprint('engine at', textseg.__file__, flush=True)\nclass "
        "H(http.server.BaseHTTPRequestHandler):\n    def do_GET(self):\n        self.send_response(200 if self.path == "
        "'/health' else 404); self.end_headers(); self.wfile.write(b'ok')\nhttp.server.HTTPServer(('127.0.0.1', "
        "int(sys.argv[1])), H).serve_forever()\n")
    port = runner.free_port()
    # -S: no site-packages (no editable install), so textseg must come from PYTHONPATH (engine_environment)
    server = runner.LocalServer([sys.executable, "-S", str(script), str(port)], port=port, log_path=tmp_path / "log")
    assert server.start(timeout=30) == f"http://127.0.0.1:{port}" and server.running
    assert f"engine at {ROOT / 'BiomedParseSlicer' / 'textseg' / '__init__.py'}" in server.log_tail()
    server.stop()
    assert not server.running
    assert runner.engine_environment("cpu")["CUDA_VISIBLE_DEVICES"] == ""
    assert runner.engine_environment("cuda:1")["CUDA_VISIBLE_DEVICES"] == "1"
    for device, worker in (("auto", "auto"), ("cpu", "cpu"), ("mps", "mps"), ("cuda", "cuda"), ("cuda:1", "cuda")):
        command = runner.LocalServer(device=device).command  # the panel's device reaches the server's one worker
        assert command[command.index("--devices") + 1] == worker and command[1:4] == ["-m", "textseg", "serve"]
    broken = runner.LocalServer([sys.executable, "-c", "raise SystemExit('no engine here')"], log_path=tmp_path / "l2")
    with pytest.raises(Exception, match="stopped at start-up(.|\n)*no engine here"):
        broken.start(timeout=30)


def test_bad_inputs_give_clear_errors(app, logic):
    empty = app.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    with pytest.raises(Exception, match="has no voxels"):
        logic.volumeFromNode(empty)
    with pytest.raises(UsageError, match="Select an input volume"):
        logic.volumeFromNode(None)


@pytest.mark.slow
def test_deepbet_real_run(app, logic):
    t1 = shared_file("mni152", "MNI152_T1.nii.gz")
    pytest.importorskip("deepbet")
    node = app.load_volume(t1)
    seg = logic.segment(node, ["brain"], "deepbet", modality="MRI", predictor=Predictor("deepbet", device="cpu"))
    got = mrml.segment_mask(seg, logic.lastSegmentIDs[0], node)
    truth_node = app.load_volume(shared_file("mni152", "MNI152_mask.nii.gz"))  # same reader: same voxel order
    truth = mrml.array_from_node(truth_node) > 0
    dice = 2 * np.logical_and(got, truth).sum() / (got.sum() + truth.sum())
    assert dice > 0.94, dice  # the engine alone scores 0.952 on this pair
    assert mrml.get_tag(seg.GetSegmentation().GetSegment(logic.lastSegmentIDs[0]), "textseg.model") == "deepbet"


def test_geometry_when_slicer_stores_the_file_flipped(app, logic, predictor):
    """Slicer's reader stores MNI152 with k reversed relative to SimpleITK: the segments must still
    sit on the engine's voxels in RAS."""
    t1 = shared_file("mni152", "MNI152_T1.nii.gz")
    node = app.load_volume(t1)
    reference = read_volume(t1)
    assert not np.allclose(mrml.ijk_to_ras(node), reference.ijk_to_ras)  # the premise of this test
    prompts = ["3000..9000 left", "3000..9000 superior"]
    expected = checks.engine_masks(reference, prompts, modality="MRI")
    seg = logic.segment(node, prompts, "synthetic-3d", modality="MRI", predictor=predictor)
    checks.check_geometry(seg, logic.lastSegmentIDs, node, expected, reference)
    assert all(m.sum() > 10000 for m in expected.values())


def test_markups_become_lps_box_and_point_prompts(app, logic, predictor, ct_path):
    node = app.load_volume(ct_path)
    reference = read_volume(ct_path)
    b = [0.0] * 6
    node.GetRASBounds(b)
    centre = np.round([(b[0] + b[1]) / 2, (b[2] + b[3]) / 2, (b[4] + b[5]) / 2])
    roi = app.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode")
    roi.SetCenter(*centre)  # RAS, inside the image
    roi.SetSize(120.0, 90.0, 45.0)
    box = mrml.roi_box_lps(roi)
    lo, hi = centre - (60.0, 45.0, 22.5), centre + (60.0, 45.0, 22.5)  # the ROI in RAS
    flip = np.array([-1.0, -1.0, 1.0])
    np.testing.assert_allclose(box, [np.minimum(lo * flip, hi * flip), np.maximum(lo * flip, hi * flip)])
    points = app.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
    points.AddControlPoint(1.5, -2.5, 3.0)
    assert mrml.fiducial_points_lps(points) == ((-1.5, 2.5, 3.0),)
    from textseg.prompts import Prompt

    prompt = Prompt("bone", box)
    expected = checks.engine_masks(reference, [prompt])
    seg = logic.segment(node, [prompt], "synthetic-3d", modality="CT", predictor=predictor)
    checks.check_geometry(seg, logic.lastSegmentIDs, node, expected, reference)
    inside = checks.segment_centres_ras(seg, logic.lastSegmentIDs[0])
    assert 0 < len(inside) < int(checks.engine_masks(reference, ["bone"])["bone"].sum())
    assert ((inside >= lo - 1.5) & (inside <= hi + 1.5)).all()  # within half a 3 mm voxel


def test_box_prompt_from_roi_on_flipped_volume_under_transform_gives_exact_voxels(app, logic, predictor, ct_path,
                                                                                  tmp_path):
    """An ROI drawn in world coordinates around a block of voxels of a flipped CT that sits under a
    rotating parent transform: the segment is exactly the thresholded voxels of that block (computed
    here with numpy from the node's own grid, independently of the engine)."""
    node = app.load_volume(_write_variant(ct_path, tmp_path / "flipped.nii.gz", "flipped"))
    transform = app.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    m = np.eye(4)
    m[:3, :3] = [[0, -1, 0], [1, 0, 0], [0, 0, 1]]  # 90 degrees about S: voxel axes stay axis-aligned in world
    m[:3, 3] = (5, -7, 11)
    transform.SetMatrixTransformToParent(mrml.numpy_to_matrix(m))
    node.SetAndObserveTransformNodeID(transform.GetID())
    ct = mrml.array_from_node(node)
    bone = (ct >= 200) & (ct <= 3000)
    k, j, i = np.argwhere(bone).mean(0).round().astype(int)
    block = np.zeros_like(bone)
    block[k - 6:k + 5, j - 9:j + 9, i - 12:i + 7] = True  # asymmetric, so a flip or swap would show
    corners = np.array([[i - 12, j - 9, k - 6, 1], [i + 6, j + 8, k + 4, 1]], float) @ (m @ mrml.ijk_to_ras(node)).T
    lo, hi = corners[:, :3].min(0) - 0.75, corners[:, :3].max(0) + 0.75  # a quarter 3 mm voxel beyond the centres
    roi = app.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode")  # in world coordinates, no transform
    roi.SetCenter(*((lo + hi) / 2))
    roi.SetSize(*(hi - lo))
    prompts = logic.markupPrompts("bone\n", "synthetic-3d", roi)
    assert len(prompts) == 1 and prompts[0].kinds == ("text", "box")
    np.testing.assert_allclose(prompts[0].box, [np.minimum(lo * [-1, -1, 1], hi * [-1, -1, 1]),
                                                np.maximum(lo * [-1, -1, 1], hi * [-1, -1, 1])], atol=1e-9)
    seg = logic.segment(node, prompts, "synthetic-3d", modality="CT", predictor=predictor)
    got = mrml.segment_mask(seg, logic.lastSegmentIDs[0], node)
    want = bone & block
    assert 100 < want.sum() < bone.sum()
    np.testing.assert_array_equal(got, want)
    tag = json.loads(mrml.get_tag(seg.GetSegmentation().GetSegment(logic.lastSegmentIDs[0]), mrml.PROMPT_TAG))
    assert tag["text"] == "bone" and np.allclose(tag["box"], prompts[0].box)  # the box is part of the provenance

    points = app.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
    points.AddControlPoint(1.5, -2.5, 3.0)
    points.SetAndObserveTransformNodeID(transform.GetID())  # a point list under the same transform: world positions
    (p,) = logic.markupPrompts(["", ""], "synthetic-3d", None, points)  # no text: one point-only prompt
    world_ras = (m @ [1.5, -2.5, 3.0, 1.0])[:3]  # (7.5, -5.5, 14)
    assert p.kinds == ("point",) and np.allclose(p.points, [world_ras * [-1, -1, 1]]) and p.point_labels == (1,)
    with pytest.raises(UsageError, match="takes text prompts, not box"):
        logic.markupPrompts(["brain"], "deepbet", roi)  # deepbet takes text only
    grid = app.scene.AddNewNodeByClass("vtkMRMLGridTransformNode")
    grid.SetAndObserveTransformToParent(slicer.vtkOrientedGridTransform())
    roi.SetAndObserveTransformNodeID(grid.GetID())
    with pytest.raises(UsageError, match="non-linear transform.*Harden"):
        logic.markupPrompts(["bone"], "synthetic-3d", roi)
    empty = app.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "unplaced")
    with pytest.raises(UsageError, match="no extent"):
        mrml.roi_box_lps(empty)


def test_modality_guess(app, logic, ct_path):
    assert logic.guessModality(app.load_volume(ct_path))[:2] == ("CT", None)  # NIfTI: from intensities
    assert logic.guessModality(app.load_volume(shared_file("mni152", "MNI152_T1.nii.gz")))[0] == "MRI"


def test_rgb_vector_volume_keeps_channels(app, logic):
    from vtkmodules.util.numpy_support import numpy_to_vtk
    from vtkmodules.vtkCommonDataModel import vtkImageData

    rgb = np.random.default_rng(0).integers(0, 255, (1, 6, 8, 3), dtype=np.uint8)  # one 2D RGB slice
    image = vtkImageData()
    image.SetDimensions(8, 6, 1)
    image.GetPointData().SetScalars(numpy_to_vtk(rgb.reshape(-1, 3), deep=True))
    node = app.scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "photo")
    node.SetAndObserveImageData(image)
    node.SetSpacing(0.5, 0.25, 1.0)
    volume = logic.volumeFromNode(node)
    assert volume.is_rgb and volume.is_2d and np.array_equal(volume.array, rgb)
    np.testing.assert_allclose(volume.spacing, (0.5, 0.25, 1.0))
    label = app.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
    with pytest.raises(UsageError, match="label map"):
        logic.volumeFromNode(label)


def test_slicer_terminology_gives_snomed_codes_and_standard_colours(ct_path, predictor):
    """With Slicer's terminology files (Slicer's Modules/Loadable/Terminologies/Resources, not in the
    slicer-core wheel; ../shared/data/slicer-terminologies, or SLICER_TERMINOLOGIES_DIR): segments get SNOMED codes
    and Slicer's standard colours."""
    import os

    name = "SegmentationCategoryTypeModifier-SlicerGeneralAnatomy.term.json"
    folder = os.environ.get("SLICER_TERMINOLOGIES_DIR") or shared_file("slicer-terminologies", name).parent
    assert Path(folder, name).is_file(), f"{folder} has no {name}"
    app = headless.create(folder)
    logic = BiomedParseSlicerLogic(scene=app.scene, terminologyLogic=app.logics["Terminologies"])
    node = app.load_volume(ct_path)
    seg = logic.segment(node, ["bone"], "synthetic-3d", modality="CT", predictor=predictor)
    bone = seg.GetSegmentation().GetSegment(logic.lastSegmentIDs[0])
    assert "SCT^272673000^Bone" in bone.GetTerminology()
    np.testing.assert_allclose(bone.GetColor(), np.array([241, 214, 145]) / 255)
    mask = mrml.segment_mask(seg, logic.lastSegmentIDs[0], node)
    sid = mrml.add_segment(seg, Segment("left kidney", mask), node, 1, terminology_logic=app.logics["Terminologies"])
    kidney = seg.GetSegmentation().GetSegment(sid)
    assert "SCT^64033007^Kidney~SCT^7771000^Left" in kidney.GetTerminology()
    np.testing.assert_allclose(kidney.GetColor(), np.array([185, 102, 83]) / 255)
    sid = mrml.add_segment(seg, Segment("my lesion", mask), node, 3, terminology_logic=app.logics["Terminologies"])
    assert seg.GetSegmentation().GetSegment(sid).GetColor() == pytest.approx(mrml.PALETTE[3])  # unknown: palette


class _SegmentStatisticsLogic:
    """Slicer's SegmentStatisticsLogic as far as parameter nodes go (Slicer v5.10.0
    Modules/Scripted/SegmentStatistics/SegmentStatistics.py lines 385-431, ScriptedLoadableModule.py lines
    310-330, SegmentStatisticsPluginBase.setDefaultParameters): the constructor calls reset(), which finds the
    Segment Statistics module's own parameter node in the scene (the first vtkMRMLScriptedModuleNode whose
    ModuleName is "SegmentStatistics") or adds one, and fills its unset parameters with defaults;
    setParameterNode() switches to another node. The module itself is absent from slicer-core."""

    scene = None

    class LabelmapSegmentStatisticsPlugin:
        keys = ("voxel_count", "volume_mm3", "volume_cm3", "surface_mm2")

        def toLongKey(self, key):
            return f"{type(self).__name__}.{key}"

    class ScalarVolumeSegmentStatisticsPlugin(LabelmapSegmentStatisticsPlugin):
        keys = ("voxel_count", "volume_mm3", "volume_cm3", "min", "max", "mean", "median", "stdev")

    def __init__(self):
        self.plugins = [self.LabelmapSegmentStatisticsPlugin(), self.ScalarVolumeSegmentStatisticsPlugin()]
        self.parameterNode = None
        self.statistics = {}
        self.getParameterNode()  # reset()

    def getParameterNode(self):
        if not self.parameterNode:
            nodes = [n for n in self.scene.GetNodesByClass("vtkMRMLScriptedModuleNode")
                     if n.GetAttribute("ModuleName") == "SegmentStatistics"]
            if not nodes:
                node = self.scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode", "SegmentStatistics")
                node.SetAttribute("ModuleName", "SegmentStatistics")
                nodes = [node]
            self.setParameterNode(nodes[0])
        return self.parameterNode

    def setParameterNode(self, node):
        for plugin in self.plugins:
            for key in [plugin.toLongKey(k) for k in plugin.keys] + [type(plugin).__name__]:
                if not node.GetParameter(key + ".enabled"):
                    node.SetParameter(key + ".enabled", "True")
        if not node.GetParameter("visibleSegmentsOnly"):
            node.SetParameter("visibleSegmentsOnly", "True")
        self.parameterNode = node

    def computeStatistics(self):
        params = self.getParameterNode()
        seg, vol = (self.scene.GetNodeByID(params.GetParameter(k)) for k in ("Segmentation", "ScalarVolume"))
        rows = stats.engine_statistics(seg, vol)
        ids = mrml.segment_ids(seg)
        self.statistics = {"SegmentIDs": ids}
        for sid, row in zip(ids, rows):
            self.statistics[sid, "Segment"] = row["segment"]
            for key, long_key in stats._SLICER_KEYS.items():
                if params.GetParameter(long_key + ".enabled") == "True":
                    self.statistics[sid, long_key] = row.get(key)

    def getStatistics(self):
        return self.statistics


def test_statistics_leave_segment_statistics_own_parameter_node_alone(app, logic, predictor, monkeypatch):
    """Inside Slicer the Statistics button runs Segment Statistics' logic: it must compute on a private parameter
    node. The module's own node (the user's measurement choices in the Segment Statistics module) keeps its
    parameters, stays in the scene, and no node is left behind when there was none."""
    import types

    _SegmentStatisticsLogic.scene = app.scene
    monkeypatch.setitem(sys.modules, "SegmentStatistics",
                        types.SimpleNamespace(SegmentStatisticsLogic=_SegmentStatisticsLogic))
    node = mrml.volume_node_from_volume(app.scene, checks.phantom(), "phantom")
    seg = logic.segment(node, ["bone", "soft tissue"], "synthetic-3d", modality="CT", predictor=predictor)

    def module_nodes():
        return [n for n in app.scene.GetNodesByClass("vtkMRMLScriptedModuleNode")
                if n.GetAttribute("ModuleName") == "SegmentStatistics"]

    rows = stats.slicer_statistics(seg, node)
    assert [r["segment"] for r in rows] == ["bone", "soft tissue"] and rows[0]["voxel_count"] > 0
    assert module_nodes() == []  # none before, none after
    users = app.scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode", "SegmentStatistics")
    users.SetAttribute("ModuleName", "SegmentStatistics")
    users.SetParameter("LabelmapSegmentStatisticsPlugin.surface_mm2.enabled", "True")
    users.SetParameter("ScalarVolumeSegmentStatisticsPlugin.enabled", "False")
    users.SetParameter("visibleSegmentsOnly", "True")
    _SegmentStatisticsLogic().getParameterNode()  # as the module's GUI leaves it: every default filled in
    before = {k: users.GetParameter(k) for k in users.GetParameterNames()}
    table = logic.statistics(seg, node)
    checks.check_statistics(table, seg, node)  # every measurement of the table, whatever the user's node says
    assert module_nodes() == [users] and users.GetScene() is app.scene
    assert {k: users.GetParameter(k) for k in users.GetParameterNames()} == before
