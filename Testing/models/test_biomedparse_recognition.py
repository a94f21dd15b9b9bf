"""Recognition ("segment everything"), the BiomedParse v2 post-processing rules (NMS, multi-class merge,
edge-query instance split) against upstream, detection boxes/centroids in LPS mm, ``Predictor.recognize``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import requests
from v2_helpers import ct_volume, make_v2_weights, v2_predictor

from textseg.detection import detect_objects
from textseg.errors import UsageError
from textseg.models.biomedparse.v2 import recognition as v2r
from textseg.volume import Volume

FIXTURES = Path(__file__).parents[1] / "fixtures"
POST = FIXTURES / "biomedparse_v2_post.npz"


@pytest.fixture(scope="module")
def post():
    return dict(np.load(POST))


def recognizer(compat, names=("a", "b"), **options):
    return v2r.V2Recognizer("CT", None, 0.5, compat, targets=list(names), **options)


# ---- v2 rules against upstream (inference.postprocess / merge_multiclass_masks / the notebook) ---------------
def test_nms_and_merge_equal_upstream(post):
    kept = v2r.postprocess(post["multi_prob"], post["multi_exist_prob"], compat=True)
    assert np.array_equal(kept, post["multi_kept"])  # bit-exact probabilities, zeroed where suppressed
    on = (kept.reshape(4, 4, -1).max(-1) > 0).astype(int).tolist()
    assert on == [[0, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 0], [0, 0, 0, 1]]  # the fixture exercises NMS
    assert np.array_equal(v2r.merge_multiclass(kept, post["multi_ids"]), post["multi_labels"])
    assert set(np.unique(post["multi_labels"])) == {0, 1, 2, 3, 5}
    # the default rules agree wherever upstream has no accident (no ties, several prompts)
    assert np.array_equal(v2r.postprocess(post["multi_prob"], post["multi_exist_prob"]), post["multi_kept"])
    rec = recognizer(False, names=("a", "b", "c", "d"))
    out = rec.slices(post["multi_prob"], post["multi_exist_prob"].astype(np.float64))
    assert np.array_equal(out.labels, v2r.merge_multiclass(post["multi_kept"]))
    win = np.where(out.labels > 0, post["multi_kept"].max(0), 0)
    assert np.array_equal(out.probability, win) and (out.probability[out.labels > 0] > 0.5).all()
    assert np.array_equal(np.isfinite(out.scores), post["multi_kept"].reshape(4, 4, -1).max(-1) > 0)


def test_single_prompt_threshold_upstream_strict_default_inclusive(post):
    prob, ex = post["single_prob"], post["single_exist_prob"]
    assert ex[0, 1] == np.float32(0.5)  # sigmoid(0) exactly
    assert np.array_equal(v2r.postprocess(prob, ex, compat=True), post["single_kept"])
    assert not post["single_kept"][0, 1].any() and post["single_kept"][0, 0].any()
    ours = v2r.postprocess(prob, ex)  # default: >= 0.5, the same rule as with several prompts
    assert np.array_equal(ours[0, 1], prob[0, 1]) and not ours[0, 2].any()


def test_instance_split_equals_upstream_notebook(post):
    rec = recognizer(True, instances=True)
    out = rec.slices(post["inst_mask_prob"], post["inst_exist_prob"].astype(np.float64), post["inst_edge_prob"])
    assert np.array_equal(out.labels, post["inst_labels"])
    assert np.array_equal(out.edges, post["inst_edge_labels"] > 0)
    inst = rec.instances(out.labels, out.edges)
    assert np.array_equal(inst[0] + inst[1], post["inst_instances"]) and post["inst_instances"].max() == 7
    assert np.array_equal(v2r.connected_components(post["inst_labels"]), post["inst_components"])  # skimage label


def test_components_and_expansion_equal_skimage(post):
    measure = pytest.importorskip("skimage.measure")
    segmentation = pytest.importorskip("skimage.segmentation")
    for v in (1, 2):
        binary = post["inst_labels"] == v
        assert np.array_equal(v2r.connected_components(binary.astype(np.uint8)), measure.label(binary, connectivity=1))
    rng = np.random.default_rng(1)
    seeds = (rng.random((6, 20, 20)) < 0.03) * rng.integers(1, 9, (6, 20, 20))
    for d in (1, 2, 3.5):
        assert np.array_equal(v2r.expand_labels(seeds, d), segmentation.expand_labels(seeds, d))


def test_default_instance_split_stays_inside_each_target(post):
    rec = recognizer(False, instances=["b"])
    out = rec.slices(post["inst_mask_prob"], post["inst_exist_prob"].astype(np.float64), post["inst_edge_prob"])
    inst = rec.instances(out.labels, out.edges)
    assert list(inst) == [1]  # only the target asked for
    region = out.labels == 2
    assert not inst[1][~region].any()
    assert sorted(np.unique(inst[1]).tolist()) == list(range(int(inst[1].max()) + 1))  # 1..n, no gaps
    # inside the target, instances are the notebook's (restricted to that target) up to numbering
    ref = post["inst_instances"] * region
    pairs = {(a, b) for a, b in zip(inst[1][region], ref[region]) if a and b}
    assert len(pairs) == len({a for a, _ in pairs}) == len({b for _, b in pairs}) == inst[1].max() == 4
    # every voxel inside the region but outside an interior and not within 1 voxel of one stays 0
    edge_only = region & out.edges
    assert (inst[1][edge_only] >= 0).all() and inst[1][region & ~out.edges].all()


def test_nms_ties_empty_masks_and_score_cutoff():
    m = np.zeros((4, 4, 4), bool)
    m[0, :2] = m[1, :2] = True  # identical masks, equal scores: the earlier prompt wins (stable order)
    m[3, 3] = True
    assert v2r.nms_keep(m, np.array([0.8, 0.8, 0.95, 0.6])) == [0, 3]  # 2 is empty: skipped
    assert v2r.nms_keep(m, np.array([0.8, 0.8, 0.95, 0.49])) == [0]  # 3 below the cutoff
    assert v2r.nms_keep(m, np.array([0.5, 0.4, 0.4, 0.4])) == [0]  # >= cutoff


def test_recognizer_options_are_checked():
    with pytest.raises(UsageError, match="Unknown recognition option"):
        recognizer(False, iou=0.3)
    with pytest.raises(UsageError, match="not among the targets"):
        recognizer(False, instances=["liver"])
    rec = v2r.V2Recognizer("MRI", "brain", 0.5, False)
    assert rec.names[0] == "spleen" and len(rec.names) == 43
    assert rec.prompts[0].text == "Visualization of the spleen in head MR imaging"


def test_recognizer_takes_one_target_name_as_a_string():
    """targets="liver" (e.g. JSON from a script) is one target, not five one-letter targets 'l', 'i', ...;
    instances likewise."""
    rec = v2r.V2Recognizer("CT", "abdomen", 0.5, False, targets="liver", instances="liver")
    assert rec.names == ["liver"] and rec.instance_targets == {"liver"} and rec.edges
    assert [p.text for p in rec.prompts] == ["Visualization of the liver in abdominal CT imaging"]
    with pytest.raises(UsageError, match="target names"):
        v2r.V2Recognizer("CT", None, 0.5, False, targets=[3])
    pytest.importorskip("torch")
    from textseg.models.biomedparse.v1.adapter import V1Recognizer

    v1 = V1Recognizer(["CT-Abdomen"], targets="liver")
    assert v1.names == ["liver"] and [p.text for p in v1.prompts] == ["liver"]
    # several image types fit (MRI without a site): the targets of all of them, not silently the first type's
    from textseg.models.biomedparse.v1.spec import BIOMED_OBJECTS, image_types_for

    mri = V1Recognizer(image_types_for("MRI"))
    assert mri.names[:13] == list(BIOMED_OBJECTS["MRI-Abdomen"]) and len(mri.names) == 13 + 3 + 2 + 2
    assert {"myocardium", "edema", "enhancing tumor"} <= set(mri.names)
    assert mri.info["image_type"] == "MRI-Abdomen + MRI-Cardiac + MRI-FLAIR-Brain + MRI-T1-Gd-Brain"
    one = V1Recognizer(image_types_for("MRI"), image_type="MRI-Cardiac")
    assert one.names == list(BIOMED_OBJECTS["MRI-Cardiac"]) and one.info["image_type"] == "MRI-Cardiac"
    with pytest.raises(UsageError, match="image_type= one of"):
        V1Recognizer(image_types_for("MRI"), image_type="MRI-Knee")


# ---- detection: boxes and centroids in LPS mm -----------------------------------------------------------------
def test_detection_on_a_flipped_volume_hand_computed():
    """direction diag(-1, 1, -1): x = 100 - 2 i, y = 50 + 3 j, z = -10 - 4 k."""
    vol = Volume(np.zeros((20, 5, 6), np.int16), spacing=(2.0, 3.0, 4.0), origin=(100.0, 50.0, -10.0),
                 direction=np.diag([-1.0, 1.0, -1.0]))
    mask = np.zeros(vol.shape, np.uint8)
    mask[0:2, 2, 1:4] = 1  # k 0..1, j 2, i 1..3
    (obj,) = detect_objects(vol, mask, "liver")
    assert obj == {"label": "liver", "voxel_count": 6, "bbox_min": [94.0, 56.0, -14.0],
                   "bbox_max": [98.0, 56.0, -10.0], "centroid": [96.0, 56.0, -12.0],
                   "index_min": [1, 2, 0], "index_max": [3, 2, 1]}
    mask[:] = 0
    mask[1:19, 0, 0] = 1  # spans several slabs of slices
    (obj,) = detect_objects(vol, mask, "x")
    assert obj["bbox_min"] == [100.0, 50.0, -82.0] and obj["bbox_max"] == [100.0, 50.0, -14.0]
    assert obj["centroid"] == [100.0, 50.0, -48.0] and obj["voxel_count"] == 18
    assert detect_objects(vol, np.zeros(vol.shape, np.uint8), "none") == []


def test_detection_on_an_oblique_volume_matches_voxel_positions():
    c, s = np.cos(np.radians(30)), np.sin(np.radians(30))
    direction = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]]) @ np.diag([1.0, -1.0, 1.0])
    vol = Volume(np.zeros((11, 7, 9), np.int16), spacing=(0.5, 2.0, 3.0), origin=(10.0, -20.0, 5.0),
                 direction=direction)
    rng = np.random.default_rng(0)
    inst = np.zeros(vol.shape, np.int32)
    inst[rng.random(vol.shape) < 0.15] = 1
    inst[2:9, 1:3, 4:8] = 2
    inst[10, 6, 8] = 4  # instance 3 absent: left out
    objs = detect_objects(vol, inst > 0, "cell", instances=inst)
    assert [o["label"] for o in objs] == ["cell 1", "cell 2", "cell 4"]
    for o in objs:
        k, j, i = np.nonzero(inst == o["instance"])
        pts = vol.index_to_physical(np.stack([i, j, k], 1))  # known physical positions of the voxel centres
        assert o["voxel_count"] == len(k)
        assert np.allclose(o["bbox_min"], pts.min(0), atol=1e-9) and np.allclose(o["bbox_max"], pts.max(0), atol=1e-9)
        assert np.allclose(o["centroid"], pts.mean(0), atol=1e-9)
        assert o["index_min"] == [int(i.min()), int(j.min()), int(k.min())]
    assert objs[2]["bbox_min"] == pytest.approx(list(vol.index_to_physical([[8, 6, 10]])[0]))


# ---- Predictor.recognize -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def v2_weights(tmp_path_factory):
    return make_v2_weights(tmp_path_factory.mktemp("v2rec"))


def spy_decodes(p):
    """Record the canonical-grid outputs the predictor hands to the recognizer, batch by batch."""
    calls = []
    real = p.adapter.decode_slices

    def spy(enc, prompts, ctx):
        outs = real(enc, prompts, ctx)
        calls.append((list(enc["indices"]), len(prompts), outs))
        return outs

    p.adapter.decode_slices = spy
    return calls


def expected_from(calls, rec, n_targets, shape):
    labels = np.zeros(shape, np.int32)
    edges = np.zeros(shape, bool)
    by_batch = {}
    for idx, _, outs in calls:
        by_batch.setdefault(tuple(idx), []).extend(outs)
    for idx, outs in by_batch.items():
        assert len(outs) == n_targets
        probs = np.stack([o.probability for o in outs])
        ex = np.stack([o.existence for o in outs]).astype(np.float64)
        ed = np.stack([o.edges for o in outs]) if rec.edges else None
        out = rec.slices(probs, ex, ed)
        labels[list(idx)] = out.labels
        if out.edges is not None:
            edges[list(idx)] = out.edges
    return labels, edges


def test_v2_recognize_through_the_predictor(v2_weights):
    from textseg.models.biomedparse.v2.recognition import V2Recognizer

    p = v2_predictor(v2_weights)
    vol = ct_volume()
    p.set_image(vol, "CT", "abdomen")
    calls = spy_decodes(p)
    names = ["liver", "spleen", "left kidney", "aorta"]
    out = p.recognize(targets=names, instances=["liver", "aorta"], existence_threshold=0.0)
    rec = V2Recognizer("CT", "abdomen", 0.5, False, targets=names, instances=["liver", "aorta"],
                       existence_threshold=0.0)
    assert all(o.edges is not None for _, _, outs in calls for o in outs)
    canon, _ = expected_from(calls, rec, 4, vol.canonical().shape)
    want = [n for t, n in enumerate(names) if (canon == t + 1).any()]
    assert [r.name for r in out] == want and len(want) >= 2  # named after the target, in vocabulary order
    assert out[0].prompt.text == "Visualization of the liver in abdominal CT imaging"
    total = np.zeros(vol.shape, int)
    for r in out:
        t = names.index(r.name)
        assert np.array_equal(r.mask, vol.to_input_grid((canon == t + 1).astype(np.uint8)))
        assert r.present and r.complete and r.existence is not None and 0 <= r.existence <= 1
        assert not r.probability_ready  # computed on first read from the run's shared label/probability maps
        assert (r.probability[r.mask > 0] > 0.5).all() and not r.probability[r.mask == 0].any()
        total += r.mask
        assert r.extra["recognition"]["rules"] == "biomedparse-v2"
        if r.name in ("liver", "aorta"):
            assert r.instances is not None and r.instances.shape == vol.shape
            assert not r.instances[r.mask == 0].any()
            assert [o["instance"] for o in r.objects] == sorted(set(np.unique(r.instances)) - {0})
        else:
            assert r.instances is None and len(r.objects) == 1
            assert r.objects[0] == detect_objects(vol, r.mask, r.name)[0]
    assert total.max() == 1  # one label per voxel


def test_v2_recognize_compat_equals_upstream_rules(v2_weights):
    from textseg.models.biomedparse.v2.recognition import V2Recognizer

    p = v2_predictor(v2_weights, compat_upstream=True)
    vol = Volume(ct_volume().array, spacing=(0.8, 0.9, 2.5))
    p.set_image(vol, "CT", "abdomen")
    calls = spy_decodes(p)
    names = ["liver", "spleen", "aorta"]
    out = p.recognize(targets=names, instances=True, existence_threshold=0.0)
    rec = V2Recognizer("CT", "abdomen", 0.5, True, targets=names, instances=True, existence_threshold=0.0)
    labels, edges = expected_from(calls, rec, 3, vol.shape)
    everything = v2r.split_instances_upstream(labels, edges.astype(np.int64), 1)
    for r in out:
        t = names.index(r.name)
        assert np.array_equal(r.mask, (labels == t + 1).astype(np.uint8))
        assert np.array_equal(r.instances, np.where(labels == t + 1, everything, 0))
        assert r.extra["recognition"]["compat_upstream"] is True


def test_recognize_errors(v2_weights, monkeypatch):
    from textseg.predictor import Predictor

    p = v2_predictor(v2_weights)
    with pytest.raises(UsageError, match="No image set"):
        p.recognize()
    p.set_image(ct_volume(), "CT", "abdomen")
    with pytest.raises(UsageError, match="Unknown recognition option"):
        p.recognize(image_type="CT")
    monkeypatch.setenv("TEXTSEG_SHOW_TEST_MODELS", "1")
    s = Predictor("synthetic-3d", device="cpu")
    s.set_image(Volume(np.zeros((4, 6, 6), np.int16)), "CT")
    with pytest.raises(UsageError, match="has no recognition.*predict\\(\\)"):
        s.recognize()


def test_recognize_cancel_keeps_completed_slices(v2_weights):
    from textseg.runcontrol import CancelToken

    p = v2_predictor(v2_weights)
    p.set_image(ct_volume(), "CT", "abdomen")
    full = {r.name: r for r in p.recognize(targets=["liver", "spleen"], existence_threshold=0.0)}
    token = CancelToken()
    seen = []

    def progress(f, stage):
        seen.append(stage)
        if stage.startswith("recognizing slices 2"):
            token.cancel()

    part = p.recognize(targets=["liver", "spleen"], existence_threshold=0.0, progress=progress, cancel=token)
    assert part and all(not r.complete and r.extra["slices_done"] == [0, 2] for r in part)
    for r in part:
        assert np.array_equal(r.mask[:2], full[r.name].mask[:2]) and not r.mask[2:].any()


# ---- v1 through the public API ---------------------------------------------------------------------------------
def test_v1_recognize_public_api_equals_the_wrapper(tmp_path):
    pytest.importorskip("torch")
    import test_biomedparse_v1 as t1

    from textseg.catalog import get_model
    from textseg.models.biomedparse.v1.adapter import recognize
    from textseg.models.biomedparse.v1.model import REDUCED
    from textseg.models.biomedparse.v1.spec import BIOMED_OBJECTS
    from textseg.predictor import Predictor

    oracle = dict(np.load(t1.ORACLE))
    t1.official_file(oracle, tmp_path / "biomedparse_v1.pt")
    params = [[2.0, 2.0]] * 4  # wide Beta: most targets pass, NMS and combine decide
    (tmp_path / "target_dist.json").write_text(json.dumps({"Pathology": {t: params
                                                                         for t in BIOMED_OBJECTS["Pathology"]}}))
    p = Predictor(get_model("biomedparse-v1"), device="cpu", weights_dir=tmp_path, config=REDUCED)
    p.set_image(t1.rgb_volume(oracle["image"], 1), "Pathology")
    a = p.recognize()
    b = recognize(p)
    assert [r.name for r in a] == [r.name for r in b] and a
    for x, y in zip(a, b):
        assert np.array_equal(x.mask, y.mask) and x.existence == y.existence and x.objects == y.objects
    assert max(sum(r.mask.astype(int) for r in a).ravel()) == 1
    with pytest.raises(UsageError, match="Unknown recognition option"):
        p.recognize(instances=True)


# ---- CLI --------------------------------------------------------------------------------------------------------
def test_cli_writes_detection_json_and_checks_recognize(tmp_path, monkeypatch, capsys):
    from textseg.cli import main
    from textseg.formats.images import write_image

    monkeypatch.setenv("TEXTSEG_SHOW_TEST_MODELS", "1")
    arr = np.full((6, 8, 10), -1000, np.int16)
    arr[1:5, 2:6, 1:9] = 400  # k 1..4, j 2..5, i 1..8
    img = tmp_path / "ct.nii.gz"
    write_image(Volume(arr, (1.0, 1.0, 2.0), origin=(-5.0, 7.0, 100.0)), img)
    out, objects = tmp_path / "ct.seg.nrrd", tmp_path / "ct.objects.json"
    rc = main(["-q", "segment", str(img), "-m", "synthetic-3d", "--modality", "CT", "-p", "bone", "--out", str(out),
               "--objects", str(objects)])
    assert rc == 0
    doc = json.loads(objects.read_text())
    assert doc["model"] == "synthetic-3d" and doc["space"] == "LPS" and doc["units"] == "mm"
    (seg,) = doc["segments"]
    assert seg["name"] == "bone"
    assert seg["objects"] == [{"label": "bone", "voxel_count": 128, "bbox_min": [-4.0, 9.0, 102.0],
                               "bbox_max": [3.0, 12.0, 108.0], "centroid": [-0.5, 10.5, 105.0],
                               "index_min": [1, 2, 1], "index_max": [8, 5, 4]}]
    assert main(["segment", str(img), "-m", "synthetic-3d", "--recognize", "--out", str(tmp_path / "r.seg.nrrd")]) == 2
    assert "has no recognition" in capsys.readouterr().err
    assert main(["segment", str(img), "-m", "biomedparse-v2", "--recognize", "-p", "liver",
                 "--out", str(tmp_path / "r.seg.nrrd")]) == 2
    assert "leave out --prompt" in capsys.readouterr().err


def test_cli_segment_one_recognize_writes_named_segments_and_objects(v2_weights, tmp_path):
    import argparse

    from textseg.cli.segment import segment_one
    from textseg.formats.images import write_image
    from textseg.formats.segments import read_seg_nrrd
    from textseg.runcontrol import CancelToken

    img = tmp_path / "ct.nii.gz"
    write_image(ct_volume(), img)
    out, objects = tmp_path / "ct.seg.nrrd", tmp_path / "ct.objects.json"
    args = argparse.Namespace(recognize=True, overwrite=False, quiet=True, modality="CT", site="abdomen", slices=None,
                              labelmap=None, dicom_seg=None, stats=None, objects=str(objects))
    p = v2_predictor(v2_weights)
    summary = segment_one(p, img, out, args, CancelToken())
    _, segs = read_seg_nrrd(out)
    doc = json.loads(objects.read_text())
    assert [s.name for s in segs] == list(summary["segments"]) == [s["name"] for s in doc["segments"]]
    assert len(segs) >= 2 and summary["complete"]
    assert all(s["objects"][0]["voxel_count"] == summary["segments"][s["name"]] for s in doc["segments"])
    assert segs[0].tags["textseg.recognition"] == "biomedparse-v2"


# ---- recognition on a server --------------------------------------------------------------------------------
def test_remote_recognize_equals_local(v2_weights):
    """RemotePredictor.recognize runs the same rules on the server: same targets, masks, scores and objects."""
    pytest.importorskip("fastapi")
    from textseg.errors import UsageError as Usage
    from textseg.models.biomedparse.v2.model import REDUCED
    from textseg.remote.client import RemotePredictor
    from textseg.remote.server import Settings, running_server

    options = {"targets": ["liver", "spleen", "left kidney", "aorta"], "instances": ["aorta"],
               "existence_threshold": 0.0}
    local = v2_predictor(v2_weights)
    local.set_image(ct_volume(), "CT", "abdomen")
    want = local.recognize(**options)
    assert len(want) >= 2
    s = Settings(port=0, devices=("cpu",), weights_dir=str(v2_weights),
                 adapter_options={"biomedparse-v2": {"config": REDUCED, "seed": 3, "batch_size": 2}})
    with running_server(s) as url:
        rp = RemotePredictor(url, "biomedparse-v2")
        rp.set_image(ct_volume(), "CT", "abdomen")
        got = rp.recognize(**options)
        with pytest.raises(Usage, match="Unknown recognition option"):
            rp.recognize(image_type="CT")
        r = requests.post(f"{url}/v1/jobs", json={"volume": rp._sha, "model": "biomedparse-v2", "modality": "CT",
                                                  "recognize": True, "prompts": ["liver"]}, timeout=10)
        assert r.status_code == 400 and "send no 'prompts'" in r.json()["message"]
    assert [g.name for g in got] == [w.name for w in want]
    for g, w in zip(got, want):
        assert np.array_equal(g.mask, w.mask) and g.existence == pytest.approx(w.existence)
        assert g.objects == w.objects and g.complete and g.provenance["recognition"] == "biomedparse-v2"


def worker_job(weights, folder):
    """A server worker's state (BiomedParse v2, tiny weights) and a 'recognize' job on ct_volume()."""
    from textseg.models.biomedparse.v2.model import REDUCED
    from textseg.remote.workers import WorkerState

    vol = ct_volume()
    np.save(folder / "v.npy", vol.array)
    geometry = {"spacing": list(vol.spacing), "origin": list(vol.origin), "direction": vol.direction.tolist()}
    state = WorkerState("cpu", {"biomedparse-v2": {"config": REDUCED, "seed": 3, "batch_size": 2}}, str(weights))
    job = {"volume": "abc", "volume_path": str(folder / "v.npy"), "geometry": geometry, "model": "biomedparse-v2",
           "modality": "CT", "site": "abdomen", "slices": None, "prompts": [],
           "recognize": {"targets": ["liver", "spleen"], "existence_threshold": 0.0}}
    return state, job


def test_server_worker_recognize_cancelled_before_any_slice_is_a_cancelled_job(v2_weights, tmp_path):
    """A recognize job cancelled before its first slice batch finished has no results: the job must end
    'cancelled' (meta['cancelled']), not 'done' with nothing found."""
    from textseg.remote.workers import was_cancelled
    from textseg.runcontrol import CancelToken

    state, job = worker_job(v2_weights, tmp_path)
    token = CancelToken()

    def progress(f, stage):
        if stage.startswith("recognizing slices"):
            token.cancel()

    meta = state.run(job, progress, token, tmp_path / "out")
    assert meta["results"] == [] and meta["cancelled"] is True
    assert was_cancelled(job, [], False) is False  # nothing found, no cancel: a finished job


def test_server_worker_recognize_on_an_unprepared_image_reports_progress(v2_weights, tmp_path):
    """A 'recognize' job on a worker that does not hold the image yet (another worker prepared it, or the image
    was evicted): preparing takes the first 30 % of the job's progress and recognition the rest, so the
    progress bar moves during recognition instead of sitting at 100 % from the start."""
    state, job = worker_job(v2_weights, tmp_path)
    seen = []
    results = state.execute(job, lambda f, stage: seen.append((round(f, 4), stage)), None)
    assert results and not state.image_reused
    starts = {}
    for f, stage in seen:
        if stage.startswith("recognizing slices"):
            starts.setdefault(stage, f)
    # slices 0-1, 2-3, 4 of 5 start at 0.3 + 0.7 * (0, 2/5, 4/5)
    assert starts == {"recognizing slices 0-1": 0.3, "recognizing slices 2-3": 0.58, "recognizing slices 4-4": 0.86}
    first = next(n for n, (_, stage) in enumerate(seen) if stage.startswith("recognizing"))
    assert seen[first - 1] == (0.3, "image ready")  # preparing the image: 0 .. 0.3
    assert seen[-1] == (1.0, "done")


def test_server_request_recognize_with_an_empty_options_object_is_a_recognition_job(v2_weights):
    """'recognize': {} (an object of recognition options, none given: the defaults) asks for recognition as
    'recognize': true does; it was taken as false, giving an image-only job with no results."""
    pytest.importorskip("fastapi")
    from textseg.remote.server import ApiError, Settings, _check_request

    s = Settings(port=0, devices=("cpu",), weights_dir=str(v2_weights))
    body = {"volume": "abc", "model": "biomedparse-v2", "modality": "CT"}
    assert _check_request({**body, "recognize": {}}, s)["recognize"] is True
    assert _check_request({**body, "recognize": {"targets": ["liver"]}}, s)["recognize"] == {"targets": ["liver"]}
    assert _check_request(body, s)["recognize"] is False
    with pytest.raises(ApiError, match="send no 'prompts'"):
        _check_request({**body, "recognize": {}, "prompts": ["liver"]}, s)


def test_cli_recognize_refuses_options_it_would_ignore(tmp_path, capsys):
    """--threshold and --keep-absent do nothing in recognition (the model family's rules decide): refused with
    a message rather than silently ignored."""
    from textseg.cli import main
    from textseg.formats.images import write_image

    img = tmp_path / "ct.nii.gz"
    write_image(ct_volume(), img)
    for extra in (["--threshold", "0.3"], ["--keep-absent"]):
        assert main(["segment", str(img), "-m", "biomedparse-v2", "--recognize", *extra,
                     "--out", str(tmp_path / "r.seg.nrrd")]) == 2
        assert "existence_threshold" in capsys.readouterr().err
    assert not (tmp_path / "r.seg.nrrd").exists()
