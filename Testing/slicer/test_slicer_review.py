"""Review on the REAL Slicer core (slicer-core): the model's answer kept with the segmentation in the scene (saved
and reloaded with it), re-threshold without re-running (a hand edit is never overwritten without replace),
confidence in the statistics table, "Compare with AI output", the uncertain band, and "Export for training".

The maps are graded probabilities made from the real CT (a logistic of the Hounsfield value), so thresholds
other than the run's give other masks; expected voxel counts are computed here with numpy from the quantization
rule (docs/confidence.md), independently of the code under test."""

from __future__ import annotations

import csv
import json
import threading
import zipfile

import numpy as np
import pytest
from conftest import shared_file

slicer_core = pytest.importorskip("slicer_core",
                                  reason="needs the real Slicer core: pip install slicer-core (test extra)")
import slicer  # noqa: E402

from BiomedParseSlicerLib import answers, checks, headless, mrml, stats  # noqa: E402
from BiomedParseSlicerLib.logic import BiomedParseSlicerLogic  # noqa: E402
from textseg.errors import UsageError  # noqa: E402
from textseg.formats.images import read_volume  # noqa: E402
from textseg.predictor import PromptResult  # noqa: E402
from textseg.prompts import Prompt  # noqa: E402


def q_of(p: np.ndarray) -> np.ndarray:
    """The quantization rule, written out: floor(clip(float32(p) * 255, 0, 255) + 0.5)."""
    return np.floor(np.clip(p.astype(np.float32) * np.float32(255), 0, 255) + np.float32(0.5)).astype(np.uint8)


def results_for(ct: np.ndarray):
    """'bone': p = logistic((HU - 250) / 60), mask p >= 0.35 (a run at threshold 0.35); 'soft tissue': a
    recognition-like mask (the map's mask cut to the upper half), so the original is not the map's threshold."""
    bone_p = (1.0 / (1.0 + np.exp(-(ct.astype(np.float64) - 250.0) / 60.0))).astype(np.float32)
    soft_p = (1.0 / (1.0 + np.exp(-(50.0 - np.abs(ct.astype(np.float64) - 40.0)) / 15.0))).astype(np.float32)
    soft_mask = (soft_p >= 0.5)
    soft_mask[: ct.shape[0] // 2] = False
    out = []
    for text, p, mask, t, e in (("bone", bone_p, bone_p >= 0.35, 0.35, 0.97), ("soft tissue", soft_p, soft_mask,
                                                                               0.5, None)):
        prov = {"model": "synthetic-3d", "prompt": json.dumps({"text": text}), "threshold": t, "existence": e,
                "modality": "CT"}
        out.append(PromptResult(Prompt(text), p, mask.astype(np.uint8), e, True, prov))
    return out


@pytest.fixture(scope="module")
def ct_path():
    return shared_file("totalsegmentator-examples", "example_ct_sm.nii.gz")


@pytest.fixture
def app():
    return headless.create()


@pytest.fixture
def logic(app):
    return BiomedParseSlicerLogic(scene=app.scene)


@pytest.fixture
def run(app, logic, ct_path):
    node = app.load_volume(ct_path)
    ct = mrml.array_from_node(node)
    results = results_for(ct)
    seg = logic.addResults(node, results)
    return node, seg, results, list(logic.lastSegmentIDs)


def segment_tags(segment) -> dict:
    """The review tags of a segment."""
    out = {}
    for key in ("textseg.threshold", "textseg.existence", "textseg.original_threshold", "textseg.mask_sha256",
                "textseg.mask_voxels", "textseg.confidence.mean", "textseg.confidence.near_threshold",
                "textseg.confidence.band"):
        out[key] = mrml.get_tag(segment, key)
    return out


def test_model_output_kept_hidden_referenced_and_tagged(app, logic, run):
    node, seg, results, ids = run
    kept = answers.answer_nodes(seg)
    assert sorted(kept) == sorted(ids) and seg.GetNumberOfNodeReferences(answers.ROLE) == 2
    for sid, result in zip(ids, results):
        mapnode = kept[sid]
        assert mapnode.GetHideFromEditors() and mapnode.GetImageData().GetScalarTypeAsString() == "unsigned char"
        assert np.array_equal(mrml.array_from_node(mapnode), q_of(np.asarray(result.probability)))
        assert np.allclose(mrml.ijk_to_ras(mapnode), mrml.ijk_to_ras(node))
        answer = logic.modelAnswer(seg, sid)
        assert np.array_equal(answer.original_mask(), result.mask > 0)
        assert np.array_equal(mrml.segment_mask(seg, sid, node), result.mask)
        tags = segment_tags(seg.GetSegmentation().GetSegment(sid))
        assert tags["textseg.mask_voxels"] == str(int(result.mask.sum()))
        assert tags["textseg.original_threshold"] == json.dumps(result.provenance["threshold"])
    # bone at 0.35 keeps a few exceptions at most; the cut soft-tissue mask is kept bit-packed
    bone, soft = logic.modelAnswer(seg, ids[0]), logic.modelAnswer(seg, ids[1])
    assert bone.original_packed is None and soft.original_packed is not None


def test_answers_survive_a_saved_and_reloaded_scene(app, logic, run, tmp_path):
    """Save the scene as a Slicer data bundle (.mrb), open it in a fresh scene: maps, original masks and tags are
    identical, the references and the hidden flag survive."""
    node, seg, results, ids = run
    before = {sid: (logic.modelAnswer(seg, sid), segment_tags(seg.GetSegmentation().GetSegment(sid)),
                    mrml.segment_mask(seg, sid, node)) for sid in ids}
    mrb = tmp_path / "review.mrb"
    assert app.scene.WriteToMRB(str(mrb))  # what File > Save (scene bundle) does
    with zipfile.ZipFile(mrb) as z:
        saved = sorted(n for n in z.namelist() if n.endswith(".nrrd"))
    assert len(saved) == 4 and sum("example_ct_sm segmentation - " in n for n in saved) == 2, saved

    app2 = headless.create()
    logic2 = BiomedParseSlicerLogic(scene=app2.scene)
    logic2.watchScene()  # as the panel does at setup: a scene opened later is watched too
    assert app2.scene.ReadFromMRB(str(mrb))
    seg2 = app2.scene.GetFirstNodeByClass("vtkMRMLSegmentationNode")
    node2 = next(n for n in app2.scene.GetNodesByClass("vtkMRMLScalarVolumeNode")
                 if n.GetAttribute(answers.ANSWER_ATTRIBUTE) is None)
    assert logic2.reviewSegmentIds(seg2) == ids
    for sid in ids:
        answer, tags, mask = before[sid]
        again = logic2.modelAnswer(seg2, sid)
        assert again.probability.dtype == np.uint8 and np.array_equal(again.probability, answer.probability)
        assert np.array_equal(again.original_mask(), answer.original_mask())
        assert (again.threshold, again.existence, again.fingerprint, again.dropped) == \
            (answer.threshold, answer.existence, answer.fingerprint, answer.dropped)
        assert segment_tags(seg2.GetSegmentation().GetSegment(sid)) == tags
        assert np.array_equal(mrml.segment_mask(seg2, sid, node2), mask)
        assert answers.answer_node(seg2, sid).GetHideFromEditors()
    assert not logic2.editedSinceModel(seg2, ids[0])
    seg2.GetSegmentation().RemoveSegment(ids[1])  # deleted in the Segment Editor: its map goes with it
    maps = [n for n in app2.scene.GetNodesByClass("vtkMRMLScalarVolumeNode")
            if n.GetAttribute(answers.ANSWER_ATTRIBUTE) is not None]
    assert [n.GetAttribute(answers.SEGMENT_ATTRIBUTE) for n in maps] == [ids[0]]


def test_answers_survive_a_scene_saved_as_files(app, logic, run, tmp_path):
    """Scene + files: the Save dialog writes the nodes it lists (not the hidden maps), then the scene is committed;
    Slicer (5.12+, the slicer-core wheel) writes hidden storable nodes into '<scene>_Private/' itself (5.10: only
    its Save Data dialog does, into 'Private/')."""
    node, seg, results, ids = run
    for n in list(app.scene.GetNodesByClass("vtkMRMLStorableNode")):
        if n.GetHideFromEditors():
            continue
        n.GetStorageNode() or n.AddDefaultStorageNode()
        storage = n.GetStorageNode()
        storage.SetFileName(str(tmp_path / (n.GetName() + (".seg.nrrd" if n.IsA("vtkMRMLSegmentationNode")
                                                             else ".nrrd"))))
        assert storage.WriteData(n)
    app.scene.SetURL(str(tmp_path / "review.mrml"))
    assert app.scene.Commit()
    assert len(list((tmp_path / "review_Private").glob("*.nrrd"))) == 2
    app2 = headless.create()
    app2.scene.SetURL(str(tmp_path / "review.mrml"))
    assert app2.scene.Connect()
    logic2 = BiomedParseSlicerLogic(scene=app2.scene)
    seg2 = app2.scene.GetFirstNodeByClass("vtkMRMLSegmentationNode")
    assert logic2.reviewSegmentIds(seg2) == ids
    for sid in ids:
        again, answer = logic2.modelAnswer(seg2, sid), logic.modelAnswer(seg, sid)
        assert np.array_equal(again.probability, answer.probability)
        assert np.array_equal(again.original_mask(), answer.original_mask())
    # a scene an older Slicer saved as files has the references but no map data: one clear line, no crash
    answers.answer_node(seg2, ids[0]).SetAndObserveImageData(None)
    with pytest.raises(UsageError, match="missing from this scene.*Run the model again"):
        logic2.rethreshold(seg2, ids[0], 0.5)
    node2 = next(n for n in app2.scene.GetNodesByClass("vtkMRMLScalarVolumeNode") if not n.GetHideFromEditors())
    t = logic2.statistics(seg2, node2).GetTable()
    assert np.isnan(t.GetColumnByName("Mean probability").GetValue(0))
    assert t.GetColumnByName("Mean probability").GetValue(1) > 0


def test_rethreshold_rebuilds_from_the_map_and_updates_tags(app, logic, run):
    node, seg, results, ids = run
    q = q_of(np.asarray(results[0].probability))
    conf = logic.rethreshold(seg, ids[0], 0.6)
    expected = q.astype(np.float32) / np.float32(255) >= 0.6  # the threshold rule on the dequantized map
    got = mrml.segment_mask(seg, ids[0], node)
    assert np.array_equal(got, expected) and got.sum() < results[0].mask.sum()
    tags = segment_tags(seg.GetSegmentation().GetSegment(ids[0]))
    assert tags["textseg.threshold"] == "0.6" and tags["textseg.mask_voxels"] == str(int(expected.sum()))
    assert tags["textseg.original_threshold"] == "0.35"  # the run's, unchanged
    assert conf["voxel_count"] == int(expected.sum())
    assert conf["mean"] == pytest.approx(q[expected].astype(np.float64).mean() / 255, abs=1e-12)
    # back to the run's threshold gives the original mask exactly; no edit in between, so no refusal
    logic.rethreshold(seg, ids[0], 0.35)
    assert np.array_equal(mrml.segment_mask(seg, ids[0], node), results[0].mask)
    with pytest.raises(UsageError, match="outside 0..1"):
        logic.rethreshold(seg, ids[0], 1.5)


def test_hand_edit_is_never_overwritten_without_replace(app, logic, run):
    """Paint a block into the segment as the Segment Editor's Paint effect does (merge into the segment's
    labelmap): re-thresholding is refused and the edit stays, voxel for voxel; with replace it is discarded."""
    node, seg, results, ids = run
    painted = np.zeros(results[0].mask.shape, np.uint8)
    painted[5:8, 10:20, 10:20] = 1
    image = mrml.oriented_image(painted, mrml.ijk_to_ras(node))
    logic_cls = slicer.vtkSlicerSegmentationsModuleLogic
    assert logic_cls.SetBinaryLabelmapToSegment(image, seg, ids[0], logic_cls.MODE_MERGE_MAX, image.GetExtent())
    edited = mrml.segment_mask(seg, ids[0], node)
    assert edited.sum() > results[0].mask.sum()
    assert logic.editedSinceModel(seg, ids[0]) and not logic.editedSinceModel(seg, ids[1])
    with pytest.raises(UsageError, match="edited by hand.*Replace my edits"):
        logic.rethreshold(seg, ids[0], 0.5)
    assert np.array_equal(mrml.segment_mask(seg, ids[0], node), edited)
    assert mrml.get_tag(seg.GetSegmentation().GetSegment(ids[0]), "textseg.threshold") == "0.35"
    logic.rethreshold(seg, ids[0], 0.5, replace=True)
    q = q_of(np.asarray(results[0].probability))
    assert np.array_equal(mrml.segment_mask(seg, ids[0], node), q >= 128)  # 0.5 -> level 128
    assert not logic.editedSinceModel(seg, ids[0])  # the engine wrote it: re-thresholds freely again


def test_statistics_add_confidence_columns_from_the_kept_maps(app, logic, run, tmp_path):
    node, seg, results, ids = run
    other = seg.GetSegmentation().AddEmptySegment("", "drawn by hand")
    table = logic.statistics(seg, node, csvPath=tmp_path / "s.csv")
    t = table.GetTable()
    names = [t.GetColumnName(c) for c in range(t.GetNumberOfColumns())]
    assert names == stats.headers() + ["Existence", "Threshold", "Mean probability", "Near-threshold fraction",
                                       "Band"]
    q = q_of(np.asarray(results[0].probability))
    m = results[0].mask > 0
    near = np.abs(q[m].astype(np.float64) - 255 * 0.35) <= 255 * 0.1 + 1e-6
    col = {n: t.GetColumn(c) for c, n in enumerate(names)}
    assert col["Existence"].GetValue(0) == pytest.approx(0.97)
    assert col["Threshold"].GetValue(0) == pytest.approx(0.35)
    assert col["Mean probability"].GetValue(0) == pytest.approx(q[m].astype(np.float64).mean() / 255, abs=1e-12)
    assert col["Near-threshold fraction"].GetValue(0) == pytest.approx(near.mean(), abs=1e-12)
    assert np.isnan(col["Existence"].GetValue(1))  # soft tissue: the model had no existence score
    assert np.isnan(col["Mean probability"].GetValue(2)) and mrml.segment_ids(seg)[2] == other
    rows = list(csv.reader(open(tmp_path / "s.csv")))
    assert rows[0] == names and rows[3][-1] == ""


def test_compare_with_model_output_measures_the_edit(app, logic, run):
    node, seg, results, ids = run
    original = results[0].mask > 0
    edited = original.copy()
    erased_slices = [k for k in range(original.shape[0]) if original[k].any()][:3]
    edited[erased_slices] = False  # erase three slices, as the Segment Editor's Erase would
    mrml.set_segment_mask(seg, ids[0], edited, node)
    table = logic.compareWithModelOutput(seg)
    again = logic.compareWithModelOutput(seg)  # a second press: a second table, with a name of its own
    assert table.GetName() != again.GetName() and again.GetName().startswith(table.GetName())
    t = table.GetTable()
    names = [t.GetColumnName(c) for c in range(t.GetNumberOfColumns())]
    assert names[:2] == ["Segment", "Dice"] and "HD95 mm" in names and "Slices touched" in names
    rows = logic.modelOutputComparison(seg)
    bone, soft = rows
    voxel_ml = float(np.prod(node.GetSpacing())) / 1000
    removed = int(original.sum() - edited.sum())
    assert bone["segment"] == "bone" and bone["voxels_removed"] == removed and bone["voxels_added"] == 0
    assert bone["dice"] == pytest.approx(2 * edited.sum() / (original.sum() + edited.sum()))
    assert bone["removed_ml"] == pytest.approx(removed * voxel_ml) and bone["slices_touched"] == 3
    assert soft["dice"] == 1.0 and soft["slices_touched"] == 0 and soft["hd95_mm"] == 0.0
    col = {n: t.GetColumn(c) for c, n in enumerate(names)}
    assert col["Voxels removed"].GetValue(0) == removed and col["Dice"].GetValue(1) == 1.0
    with pytest.raises(UsageError, match="No model output"):
        logic.compareWithModelOutput(seg, [seg.GetSegmentation().AddEmptySegment("", "hand")])


def test_uncertain_segment_holds_the_band_and_is_replaced_not_repeated(app, logic, run):
    node, seg, results, ids = run
    q = q_of(np.asarray(results[0].probability))
    uid = logic.addUncertainSegment(seg, ids[0])
    band = np.abs(q.astype(np.float64) - 255 * 0.35) <= 255 * 0.1 + 1e-6
    assert np.array_equal(mrml.segment_mask(seg, uid, node), band)
    assert logic.isReviewSegment(seg, uid) and uid not in logic.reviewSegmentIds(seg)
    assert logic.addUncertainSegment(seg, ids[0], band=0.05) == uid
    assert len(mrml.segment_ids(seg)) == 3


def test_maps_go_with_their_segment_and_segmentation(app, logic, run):
    node, seg, results, ids = run
    scene = app.scene
    count = lambda: sum(n.GetAttribute(answers.ANSWER_ATTRIBUTE) is not None  # noqa: E731
                        for n in scene.GetNodesByClass("vtkMRMLScalarVolumeNode"))
    assert count() == 2
    seg.GetSegmentation().RemoveSegment(ids[0])
    assert count() == 1 and logic.reviewSegmentIds(seg) == [ids[1]]
    scene.RemoveNode(seg)
    assert count() == 0 and scene.GetNodesByClass("vtkMRMLVolumeArchetypeStorageNode").GetNumberOfItems() <= 1


def test_keep_model_output_off_and_budget(app, logic, ct_path):
    node = app.load_volume(ct_path)
    results = results_for(mrml.array_from_node(node))
    logic.keepModelOutput = False
    seg = logic.addResults(node, results)
    assert logic.reviewSegmentIds(seg) == [] and seg.GetNumberOfNodeReferences(answers.ROLE) == 0
    logic.keepModelOutput = True
    voxels_mb = results[0].mask.size / 2**20
    logic.keepModelOutputBudgetMB = voxels_mb * 1.5  # room for one map
    seg = logic.addResults(node, results)
    assert len(logic.reviewSegmentIds(seg)) == 1 and "soft tissue" in logic.lastMessages[0]


def test_rerun_with_replace_replaces_the_kept_answer(app, logic, run):
    node, seg, results, ids = run
    old = answers.answer_node(seg, ids[0]).GetID()
    logic.addResults(node, results[:1], seg, replace=True)
    assert logic.lastSegmentIDs == ids[:1]
    assert answers.answer_node(seg, ids[0]).GetID() != old and app.scene.GetNodeByID(old) is None
    assert seg.GetNumberOfNodeReferences(answers.ROLE) == 2


def test_export_for_training_writes_the_corrected_segments(app, logic, run, ct_path, tmp_path):
    import SimpleITK as sitk

    node, seg, results, ids = run
    corrected = results[0].mask > 0
    corrected[:, :, :20] = False
    mrml.set_segment_mask(seg, ids[0], corrected, node)
    uid = logic.addUncertainSegment(seg, ids[0])  # review segments are left out
    seen = []
    out = logic.exportForTraining(node, seg, tmp_path, 501, "Corrected", progress=lambda f, s: seen.append(f))
    assert out.written == ["example_ct_sm"] and seen == [1.0]
    root = tmp_path / "Dataset501_Corrected"
    ds = json.loads((root / "dataset.json").read_text())
    assert ds["labels"] == {"background": 0, "bone": 1, "soft tissue": 2} and ds["channel_names"] == {"0": "CT"}
    label = sitk.ReadImage(str(root / "labelsTr" / "example_ct_sm.nii.gz"))
    lab = sitk.GetArrayFromImage(label)
    soft = results[1].mask > 0
    assert not (corrected & soft).any() and np.array_equal(lab == 1, corrected)
    assert int((lab == 2).sum()) == int(soft.sum()) and uid not in ids
    image = read_volume(root / "imagesTr" / "example_ct_sm_0000.nii.gz")
    ref = read_volume(ct_path)
    assert np.array_equal(image.array, ref.array) and image.same_grid(ref, tol=1e-4)
    stop = threading.Event()
    stop.set()
    again = logic.exportForTraining(node, seg, tmp_path, 502, "Cancelled", cancel=stop)
    assert again.cancelled and again.written == []


# ---- the panel's Review policy (Qt-free controller) on the same real scene ---------------------------------
def test_review_controller_slider_refusal_compare_and_export(app, logic, run, tmp_path):
    import time

    from BiomedParseSlicerLib.controller import Inputs, PanelController

    node, seg, results, ids = run
    asked, answers_given = [], [False, True]
    ctl = PanelController(logic, replace_edits=lambda text: asked.append(text) or answers_given.pop(0))
    inputs = Inputs(volume=node, segmentation=seg, modality="CT", review_segment="", review_threshold=0.5)
    view = ctl.review_refresh(inputs)
    assert view.review_rows == [(ids[0], "bone"), (ids[1], "soft tissue")] and view.review_segment == ids[0]
    assert view.review_threshold == 0.35 and view.review_confidence.startswith("existence 0.97, mean probability")
    inputs.review_segment, inputs.review_threshold = ids[0], 0.6
    assert ctl.view(inputs).review_enabled
    ctl.review_threshold_moved(inputs)
    view = ctl.review_threshold_changed(inputs)
    q = q_of(np.asarray(results[0].probability))
    assert view.error is None and np.array_equal(mrml.segment_mask(seg, ids[0], node), q >= 153)  # 0.6 -> 153
    assert any("re-thresholded at 0.6" in line for line in view.log) and not asked
    # a hand edit: the user is asked; "Keep my edits" leaves it and moves the slider back to 0.6
    edited = mrml.segment_mask(seg, ids[0], node)
    edited[:, :, :30] = 0
    mrml.set_segment_mask(seg, ids[0], edited, node)
    inputs.review_threshold = 0.4
    ctl.review_threshold_moved(inputs)
    view = ctl.review_threshold_changed(inputs)
    assert len(asked) == 1 and "edited by hand" in asked[0] and view.review_threshold == 0.6
    assert np.array_equal(mrml.segment_mask(seg, ids[0], node), edited) and view.error is None
    ctl.review_threshold_moved(inputs)  # moved to 0.4 again
    view = ctl.review_threshold_changed(inputs)  # "Replace my edits"
    assert len(asked) == 2 and np.array_equal(mrml.segment_mask(seg, ids[0], node), q >= 102)  # 0.4 -> 102
    view = ctl.compare_with_ai(inputs)
    assert view.table is not None and view.table.GetNumberOfRows() == 2
    view = ctl.review_uncertain(inputs)
    assert len(mrml.segment_ids(seg)) == 3 and ctl.review_refresh(inputs).review_rows[-1][1] == "soft tissue"
    inputs.dataset_id, inputs.dataset_name = 7, "Reviewed"
    view = ctl.export_training(inputs, str(tmp_path))
    assert view.polling and not view.export_training_enabled
    for _ in range(600):
        view = ctl.poll(inputs)
        if not view.polling:
            break
        time.sleep(0.05)
    assert view.error is None and any("Exported for training" in line for line in view.log), view.log
    assert (tmp_path / "Dataset007_Reviewed" / "labelsTr" / "example_ct_sm.nii.gz").exists()
    ctl.shutdown()


@pytest.mark.parametrize("keep, expected", [(True, "uint8"), (False, "none")])
def test_servers_send_uint8_maps_when_the_output_is_kept(app, logic, monkeypatch, keep, expected):
    """Through a server (the panel's usual path) the maps must travel for Review to keep them: uint8 when 'Keep
    model output for review' is on (a mask standing for the map would make re-thresholding meaningless),
    nothing otherwise. The client is recorded instead of connecting."""
    pytest.importorskip("requests", reason="the remote client needs requests")
    import textseg.remote.client as client
    from BiomedParseSlicerLib.controller import Inputs, PanelController
    from textseg.catalog import get_model

    made = []
    monkeypatch.setattr(client, "RemotePredictor", lambda *args, **kw: made.append(kw) or kw)
    ctl = PanelController(logic)
    inputs = Inputs(remote=True, server_url="http://gpu:8000", keep_model_output=keep)
    ctl._predictor_factory(inputs, get_model("synthetic-3d"))(None, None)
    assert [kw["probabilities"] for kw in made] == [expected]


def test_module_self_test_review_checks(app, logic, tmp_path):
    """The Review checks BiomedParseSlicerTest runs inside Slicer, here on slicer-core."""
    checks.run_review_checks(logic, app.scene, tmp_path)


def test_a_result_without_a_usable_map_is_kept_out_with_a_message(app, logic, ct_path):
    node = app.load_volume(ct_path)
    results = results_for(mrml.array_from_node(node))
    results[1].probability = np.zeros((2, 2, 2), np.float32)  # not on the volume's grid
    seg = logic.addResults(node, results)
    assert logic.reviewSegmentIds(seg) == logic.lastSegmentIDs[:1] and len(mrml.segment_ids(seg)) == 2
    assert logic.lastMessages and "'soft tissue' not kept for review" in logic.lastMessages[0]


# ---- audit against the Slicer sources (5.10 / 5.12) ------------------------------------------------------
def _node_event_log(scene, event):
    """(class name, ID, HideFromEditors) of every node ``event`` (NodeAddedEvent / NodeRemovedEvent) reports."""
    from vtkmodules.util.misc import calldata_type
    from vtkmodules.vtkCommonCore import VTK_OBJECT

    seen = []

    @calldata_type(VTK_OBJECT)
    def on_event(_caller, _event, node):
        seen.append((node.GetClassName(), node.GetID(), bool(node.GetHideFromEditors())))

    scene.AddObserver(event, on_event)
    return seen


def test_map_nodes_are_hidden_when_the_scene_adds_them(app, logic, ct_path):
    """Slicer's Subject Hierarchy adds a node to the Data module's tree when the scene announces it unless it is
    hidden *then* (qSlicerSubjectHierarchyPluginLogic: 'The HideFromEditors flag is not considered to work
    dynamically'): a map must be hidden before AddNode, not after."""
    node = app.load_volume(ct_path)
    added = _node_event_log(app.scene, app.scene.NodeAddedEvent)
    seg = logic.addResults(node, results_for(mrml.array_from_node(node)))
    maps = [a for a in added if a[0] == "vtkMRMLScalarVolumeNode"]
    assert len(maps) == 2 and all(hidden for _c, _i, hidden in maps), added
    assert sorted(i for _c, i, _h in maps) == sorted(n.GetID() for n in answers.answer_nodes(seg).values())


def test_removing_a_segmentation_removes_each_map_once(app, logic, run):
    """Removing a map node raises NodeRemovedEvent, which prunes again: a node must never be removed twice (MRML
    removes it again and announces it to every observer; vtkMRMLScene::RemoveNode: 'The caller should make sure
    the node isn't already removed')."""
    node, seg, results, ids = run
    logic.watchScene()
    maps = {n.GetID() for n in answers.answer_nodes(seg).values()}
    removed = _node_event_log(app.scene, app.scene.NodeRemovedEvent)
    app.scene.RemoveNode(seg)
    removed_ids = [i for _c, i, _h in removed]
    assert sorted(removed_ids) == sorted(set(removed_ids)), removed_ids
    assert maps <= set(removed_ids) and len(removed_ids) == 5  # the segmentation, 2 maps, their 2 storage nodes


def test_the_default_input_volume_is_never_a_hidden_map(app, logic, run, ct_path):
    """The input selector never shows hidden nodes; the default input (a scene whose volume was removed, the
    segmentation kept) must not be a map either, but the next visible volume."""
    node, seg, results, ids = run
    app.scene.RemoveNode(node)
    assert logic.defaultInputVolume() is None
    other = app.load_volume(ct_path, "second")
    assert logic.defaultInputVolume() is other


def test_a_slider_move_re_thresholds_only_the_segment_it_was_made_for(app, logic, run):
    """The Widget re-thresholds 300 ms after the slider's last move. Choosing another segment meanwhile shows that
    segment's threshold on the slider (signals blocked); when the timer then fires, the segment now shown was not
    moved: no 'Replace my edits' question about it (answered 'Replace' here, as a user who thinks it is about the
    move would), its hand edit kept."""
    from BiomedParseSlicerLib.controller import Inputs, PanelController

    node, seg, results, ids = run
    asked = []
    ctl = PanelController(logic, replace_edits=lambda text: asked.append(text) or True)
    soft = mrml.segment_mask(seg, ids[1], node)
    soft[:, :, :40] = 0  # edited by hand in the Segment Editor
    mrml.set_segment_mask(seg, ids[1], soft, node)
    bone = mrml.segment_mask(seg, ids[0], node)
    moved = ctl.review_threshold_moved  # the Widget's slider handler
    inputs = Inputs(volume=node, segmentation=seg, review_segment=ids[0], review_threshold=0.6)
    moved(inputs)  # 'bone' at 0.6 ...
    inputs.review_segment = ids[1]  # ... then 'soft tissue' chosen before the slider rests
    inputs.review_threshold = ctl.review_refresh(inputs).review_threshold
    assert inputs.review_threshold == 0.5
    view = ctl.review_threshold_changed(inputs)  # the timer fires
    assert view.error is None and not asked
    assert np.array_equal(mrml.segment_mask(seg, ids[1], node), soft)
    assert np.array_equal(mrml.segment_mask(seg, ids[0], node), bone)
    assert not any("re-thresholded" in line for line in view.log)
    # a move of the segment shown is applied, once (after 'Replace my edits')
    inputs.review_threshold = 0.6
    moved(inputs)
    view = ctl.review_threshold_changed(inputs)
    q = q_of(np.asarray(results[1].probability))
    assert np.array_equal(mrml.segment_mask(seg, ids[1], node), q >= 153) and view.error is None
    assert len(asked) == 1 and "'soft tissue' was edited by hand" in asked[0]
    assert any("'soft tissue' re-thresholded at 0.6" in line for line in view.log)
    view = ctl.review_threshold_changed(inputs)
    assert not any("re-thresholded" in line for line in view.log)


def test_a_slider_move_on_a_segment_deleted_meanwhile_is_one_line(app, logic, run):
    """The segment is deleted (Segment Editor) while Review still lists it, then the slider rests: one line saying
    so and a refreshed list, never an AttributeError in the user's face."""
    from BiomedParseSlicerLib.controller import Inputs, PanelController

    node, seg, results, ids = run
    ctl = PanelController(logic)
    inputs = Inputs(volume=node, segmentation=seg, review_segment=ids[0], review_threshold=0.6)
    ctl.review_threshold_moved(inputs)
    seg.GetSegmentation().RemoveSegment(ids[0])
    view = ctl.review_threshold_changed(inputs)
    text = " ".join([view.error or "", *view.log])
    assert "Error" not in text and "NoneType" not in text, text
    assert "no longer exists" in text
    assert view.review_rows == [(ids[1], "soft tissue")] and view.review_segment == ids[1]


def test_observers_added_once_per_segmentation_and_removed_by_cleanup(app, logic, ct_path):
    """A second run into the same segmentation, after VTK dropped the node's Python wrapper (inside Slicer every
    node comes to Python as a wrapper made on demand), must not observe the node twice; the Widget's cleanup (module
    reload, application exit: slicer.util.reloadScriptedModule calls it) removes every observer the Logic added, so
    no stale Logic keeps pruning with the old code."""
    import gc

    from slicer import vtkSegmentation

    node = app.load_volume(ct_path)
    results = results_for(mrml.array_from_node(node))
    seg_id = logic.addResults(node, results).GetID()
    gc.collect()
    seg = app.scene.GetNodeByID(seg_id)
    logic.addResults(node, results, seg)
    scene_tags = list(logic._sceneObservers)
    logic.cleanup()
    assert not seg.HasObserver(vtkSegmentation.SegmentRemoved)
    assert scene_tags and all(app.scene.GetCommand(tag) is None for tag in scene_tags)
    seg.GetSegmentation().RemoveSegment(logic.lastSegmentIDs[0])  # nothing observes it any more: the map stays
    assert len(answers.answer_nodes(seg)) == 4


def test_a_segmentation_leaving_the_scene_is_no_longer_observed(app, logic, run):
    """The Logic lets go of a segmentation removed from the scene or closed with it (its observer goes too)."""
    from slicer import vtkSegmentation

    node, seg, results, ids = run
    app.scene.Clear(0)
    assert seg.GetScene() is None and not seg.HasObserver(vtkSegmentation.SegmentRemoved)


def test_statistics_after_compare_leave_the_comparison_table_alone(app, logic, run):
    """Both buttons show a table; only Statistics' table is kept as the statistics table (the parameter node's
    statisticsTable, which the next Statistics refills). The Widget keeps ``view.statistics_table``: a Statistics
    click after 'Compare with AI output' must not overwrite the comparison."""
    from BiomedParseSlicerLib.controller import Inputs, PanelController

    node, seg, results, ids = run
    ctl = PanelController(logic)
    inputs = Inputs(volume=node, segmentation=seg, review_segment=ids[0])

    def widget_shows(view):  # BiomedParseSlicerWidget._show: the table it keeps in the parameter node
        if view.statistics_table is not None:
            inputs.statistics_table = view.statistics_table

    view = ctl.statistics(inputs)
    widget_shows(view)
    first = view.table
    assert view.statistics_table is first and first.GetTable().GetColumnByName("Voxel count") is not None
    view = ctl.compare_with_ai(inputs)
    widget_shows(view)
    comparison = view.table
    assert comparison is not first and view.statistics_table is None
    view = ctl.statistics(inputs)
    widget_shows(view)
    assert view.table is first and inputs.statistics_table is first
    assert comparison.GetTable().GetColumnByName("Dice") is not None
    assert comparison.GetTable().GetColumnByName("Voxel count") is None


def test_statistics_leave_review_segments_out(app, logic, run, tmp_path):
    """addUncertainSegment's contract: statistics (table and CSV), like training exports, leave review segments
    out; a segment drawn by hand stays in."""
    node, seg, results, ids = run
    logic.addUncertainSegment(seg, ids[0])
    drawn = seg.GetSegmentation().AddEmptySegment("", "drawn by hand")
    assert len(mrml.segment_ids(seg)) == 4
    t = logic.statistics(seg, node, csvPath=tmp_path / "s.csv").GetTable()
    names = [t.GetColumnByName("Segment").GetValue(r) for r in range(t.GetNumberOfRows())]
    assert names == ["bone", "soft tissue", "drawn by hand"] and drawn in mrml.segment_ids(seg)
    assert [r[0] for r in csv.reader(open(tmp_path / "s.csv"))][1:] == names
    assert t.GetColumnByName("Threshold").GetValue(0) == pytest.approx(0.35)
    assert np.isnan(t.GetColumnByName("Threshold").GetValue(2))


def test_maps_removed_with_their_segments_are_freed(app, logic, run):
    """vtkMRMLScene::GetNodesByClass returns a collection the caller must delete ('You are responsible for deleting
    the returned collection'; Python's wrapper keeps that reference, which slicer.util.getNodesByClass drops with
    UnRegister). A collection left over holds every node in it: the maps (1 byte per voxel) of deleted segments
    stayed in memory for the whole session."""
    import gc

    from vtkmodules.vtkCommonCore import vtkWeakReference

    node, seg, results, ids = run
    logic.watchScene()
    weak = []
    for map_node in answers.answer_nodes(seg).values():
        weak.append(vtkWeakReference())
        weak[-1].Set(map_node)
    del map_node
    # what happens meanwhile in a session: the panel's default input, another node removed (a prune sweep),
    # statistics (the Segment Statistics parameter nodes are looked up), a scene import
    assert logic.defaultInputVolume() is node
    app.scene.RemoveNode(app.scene.AddNewNodeByClass("vtkMRMLTableNode"))
    logic.statistics(seg, node)
    logic._onSceneImported()
    seg.GetSegmentation().RemoveSegment(ids[0])
    app.scene.RemoveNode(seg)
    gc.collect()
    assert [w.Get() is None for w in weak] == [True, True]
