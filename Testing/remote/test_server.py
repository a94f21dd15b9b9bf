"""The inference server and RemotePredictor against real uvicorn servers on 127.0.0.1.

Two servers (module scope): ``fast`` (one cpu worker, API key) for round trips and request
checking; ``slow`` (two cpu workers, synthetic adapter delayed 2 s per prompt, queue of 1,
1 s session expiry, 1 MiB upload limit) for cancel, expiry, queue-full and worker crashes.
"""

from __future__ import annotations

import gzip
import inspect
import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import requests
from conftest import shared_file

from textseg.analysis.confidence import ModelAnswer, confidence, rethreshold, to_uint8
from textseg.errors import AuthError, InputError, OutputExistsError, ServerError, UsageError
from textseg.formats.segments import read_seg_nrrd
from textseg.predictor import Predictor
from textseg.remote import wire
from textseg.remote.wire import API_HEADER, sha256, volume_to_nrrd
from textseg.runcontrol import CancelToken
from textseg.volume import Volume

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
from textseg.remote.client import RemotePredictor  # noqa: E402
from textseg.remote.server import Settings, create_app, running_server  # noqa: E402

KEY = "test-key-7f3a-Qw9ZpL2x"
CT_PROMPTS = ["bone", "air left", "fat superior", "nothing",
              {"text": "soft tissue", "box": [[57.9, -101.3, 124.3], [-62.0, -221.3, 154.3]]}]


class CountingSession(requests.Session):
    """A requests session that counts requests by method (to see uploads happen or not)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def request(self, method, url, *a, **kw):
        self.calls.append((method, url.split("/v1/")[-1]))
        return super().request(method, url, *a, **kw)

    def count(self, method, prefix):
        return sum(1 for m, u in self.calls if m == method and u.startswith(prefix))


@pytest.fixture(scope="module")
def fast_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("server-work")


@pytest.fixture(scope="module")
def fast(fast_dir):
    s = Settings(port=0, api_key=KEY, devices=("cpu",), show_test_models=True, max_upload_bytes=64 << 20,
                 work_dir=str(fast_dir))
    with running_server(s) as url:
        yield url


SLOW_2D = {"synthetic-2d": {"delay": 0.5, "batch_size": 2}}  # 0.5 s per batch of 2 slices


@pytest.fixture(scope="module")
def slow():
    # session_ttl is long here: on a loaded machine a 1 s TTL expired images between a test's upload and its jobs
    s = Settings(port=0, devices=("cpu", "cpu"), show_test_models=True, queue_size=1, session_ttl=60.0,
                 max_upload_bytes=1 << 20, header_timeout=1.0, body_timeout=1.0, min_body_rate=2048,
                 adapter_options={"synthetic-3d": {"delay": 2.0}, **SLOW_2D})
    with running_server(s) as url:
        yield url


def _phantom():
    arr = np.full((6, 8, 10), -1000, np.int16)
    arr[1:5, 2:6, 1:9] = 400
    return Volume(arr, (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), np.eye(3))


def _ct():
    from textseg.formats.images import read_volume

    return read_volume(shared_file("totalsegmentator-examples", "example_ct_sm.nii.gz"))


def _assert_same(remote, local, prob_atol=0.0):
    assert [r.prompt for r in remote] == [r.prompt for r in local]
    for a, b in zip(remote, local):
        np.testing.assert_array_equal(a.mask, b.mask)
        assert a.mask.dtype == b.mask.dtype == np.uint8
        np.testing.assert_allclose(a.probability, b.probability, rtol=0, atol=prob_atol)
        assert (a.existence, a.present, a.message, a.extra) == (b.existence, b.present, b.message, b.extra)
        drop = ("time", "seconds")
        assert {k: v for k, v in a.provenance.items() if k not in drop} == \
            {k: v for k, v in b.provenance.items() if k not in drop}


def _job_state(url, jid, headers=None):
    return requests.get(f"{url}/v1/jobs/{jid}", headers=headers, timeout=10).json()


# ---- contract ------------------------------------------------------------------------------------
def test_remote_predictor_has_the_local_signatures():
    for name in ("set_image", "predict", "reset_image", "check_prompts", "recognize"):
        assert inspect.signature(getattr(RemotePredictor, name)) == inspect.signature(getattr(Predictor, name)), name


def test_round_trip_on_real_ct_equals_local_predictor(fast, tmp_path):
    ct = _ct()
    session = CountingSession()
    rp = RemotePredictor(fast, "synthetic-3d", api_key=KEY, session=session)
    assert rp.spec.id == "synthetic-3d" and rp.spec.dims == 3 and "box" in rp.spec.prompt_kinds
    seen = []
    rp.set_image(ct, "CT", site="abdomen", progress=lambda f, s: seen.append((f, s)))
    remote = rp.predict(CT_PROMPTS, progress=lambda f, s: seen.append((f, s)))
    lp = Predictor("synthetic-3d", device="cpu")
    lp.set_image(ct, "CT", site="abdomen")
    local = lp.predict(CT_PROMPTS)
    _assert_same(remote, local)
    assert [r.voxel_count for r in remote] == [r.voxel_count for r in local]
    assert remote[0].voxel_count > 1000 and remote[3].voxel_count == 0 and not remote[3].present
    assert 0 < remote[4].voxel_count < remote[4].mask.size
    assert seen[0] == (0.0, "uploading image") and seen[-1][0] == 1.0
    assert all(0.0 <= f <= 1.0 for f, _ in seen)
    assert session.count("PUT", "volumes/") == 1
    # the worker's Predictor kept the image prepared by set_image: predict did not encode it again
    assert rp.http.get(f"{fast}/v1/jobs/{rp.last_job}", timeout=10).json()["image_reused"] is True
    # the job's .seg.nrrd (written on the server by textseg.formats.segments): same masks, names, provenance tags
    path = rp.download_seg_nrrd(rp.last_job, tmp_path / "remote.seg.nrrd")
    ref, segments = read_seg_nrrd(path)
    assert ref.same_grid(ct) and [s.name for s in segments] == [r.name for r in local]
    for seg, r in zip(segments, local):
        np.testing.assert_array_equal(seg.mask, r.mask)
        assert seg.tags["textseg.model"] == "synthetic-3d" and \
            json.loads(seg.tags["textseg.prompt"]) == r.prompt.to_dict()
    with pytest.raises(OutputExistsError):
        rp.download_seg_nrrd(rp.last_job, path)
    # the same image again: HEAD finds it, nothing is uploaded a second time
    rp.set_image(ct, "CT", site="abdomen")
    assert session.count("PUT", "volumes/") == 1 and session.count("HEAD", "volumes/") == 2
    assert rp.predict("bone\nair")[0].voxel_count == local[0].voxel_count


@pytest.fixture(scope="module")
def mni_brain():
    """deepbet (the real model, graded probability maps) on the MNI152 T1 head, run locally once."""
    from textseg.formats.images import read_volume

    mri = read_volume(shared_file("mni152", "MNI152_T1.nii.gz"))
    lp = Predictor("deepbet", device="cpu")
    lp.set_image(mri, "MRI")
    return mri, lp.predict(["brain"])


@pytest.mark.slow
def test_deepbet_round_trip_on_mni152_equals_local(fast, mni_brain):
    mri, local = mni_brain
    rp = RemotePredictor(fast, "deepbet", api_key=KEY, probabilities="float32")
    rp.set_image(mri, "MRI")
    remote = rp.predict(["brain"])
    _assert_same(remote, local, prob_atol=1e-5)
    assert remote[0].voxel_count > 1_000_000  # an adult brain at 1 mm: well over a litre
    # default transfer: uint8-quantized probabilities, same mask; the image is not encoded again
    rq = RemotePredictor(fast, "deepbet", api_key=KEY)
    rq.set_image(mri, "MRI")
    q = rq.predict(["brain"])[0]
    assert rq.http.get(f"{fast}/v1/jobs/{rq.last_job}", timeout=10).json()["image_reused"] is True
    np.testing.assert_array_equal(q.mask, local[0].mask)
    assert np.abs(q.probability - local[0].probability).max() <= 1 / 510 + 1e-6


# ---- the model's answer: uint8 maps as they travel, re-threshold on the server (issue 17) ----------------------
THRESHOLDS = (0.05, 0.3, 0.5, 0.7, 0.9, 0.0, 1.0)


@pytest.fixture(scope="module")
def brain(fast, mni_brain):
    """deepbet on the MNI152 head on the server (probabilities uint8, the default), beside the local run."""
    mri, (local,) = mni_brain
    rp = RemotePredictor(fast, "deepbet", api_key=KEY)
    rp.set_image(mri, "MRI")
    (remote,) = rp.predict(["brain"])
    return mri, local, rp, remote


@pytest.mark.slow
def test_remote_rethreshold_equals_local_rethreshold(brain):
    _, local, rp, remote = brain
    q = to_uint8(local.probability)  # what the engine keeps locally
    answer = ModelAnswer.from_result(local)
    counts = {}
    for t in THRESHOLDS:
        (r,) = rp.rethreshold(t)
        expected = rethreshold(q, t)
        assert r.mask.dtype == bool and r.mask.shape == local.mask.shape
        np.testing.assert_array_equal(r.mask, expected, err_msg=f"threshold {t}")
        np.testing.assert_array_equal(r.mask, answer.mask_at(t))
        assert r.confidence == confidence(q, expected, t, local.existence)  # exact: integer histogram
        assert (r.index, r.name, r.threshold) == (0, "brain", t)
        counts[t] = int(expected.sum())
    # graded maps: each threshold its own mask; the run's threshold gives the run's mask
    assert counts[0.0] > counts[0.05] > counts[0.3] > counts[0.5] > counts[0.7] > counts[0.9] > counts[1.0]
    assert counts[0.5] == local.voxel_count == remote.voxel_count
    # nothing was run again: the job is the same, still done, and no new job appeared
    jobs = rp.http.get(f"{rp.url}/v1/jobs", timeout=10).json()["jobs"]
    assert jobs[-1]["id"] == rp.last_job and jobs[-1]["state"] == wire.DONE


@pytest.mark.slow
def test_uint8_maps_come_back_as_they_travelled(brain):
    """The decode path that keeps uint8: the server's map is the local map's to_uint8, bit for bit, and the
    float32 map a predict returns is exactly its dequantization."""
    _, local, rp, remote = brain
    q = to_uint8(local.probability)
    (answer,) = rp.model_answers()
    assert answer.probability.dtype == np.uint8
    np.testing.assert_array_equal(answer.probability, q)
    np.testing.assert_array_equal(to_uint8(remote.probability), q)
    np.testing.assert_array_equal(answer.original_mask(), local.mask.astype(bool))
    assert answer.threshold == local.provenance["threshold"] and answer.existence == local.existence
    assert answer.tags() == ModelAnswer.from_result(local).tags()


@pytest.mark.slow
def test_rethreshold_over_plain_http(brain):
    """The endpoint as curl sees it: JSON in, JSON out (masks base64 of their packed bits), segments by name."""
    _, local, rp, _ = brain
    url = f"{rp.url}/v1/jobs/{rp.last_job}/rethreshold"
    headers = {"Authorization": f"Bearer {KEY}", wire.CLIENT_HEADER: rp.http.headers[wire.CLIENT_HEADER]}
    r = requests.post(url, json={"threshold": 0.7, "segments": ["brain"], "band": 0.2}, headers=headers, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["shape"] == list(local.mask.shape) and body["threshold"] == 0.7 and body["band"] == 0.2
    (seg,) = body["results"]
    q = to_uint8(local.probability)
    mask = wire.mask_from_text(seg["mask"], body["shape"])
    np.testing.assert_array_equal(mask, rethreshold(q, 0.7))
    assert seg["voxel_count"] == int(mask.sum()) and seg["confidence"] == confidence(q, mask, 0.7, local.existence,
                                                                                      band=0.2)
    bad = [({"threshold": 1.5}, 400, "outside 0..1"), ({"segments": [0]}, 400, "needs 'threshold'"),
           ({"threshold": 0.5, "segments": ["liver"]}, 400, "no segment 'liver'"),
           ({"threshold": 0.5, "segments": [3]}, 400, "indices 0..0"),
           ({"threshold": 0.5, "path": "/etc/passwd"}, 400, "Unknown re-threshold field"),
           ({"threshold": 0.5, "band": "wide"}, 400, "Band 'wide' is not a number")]
    for payload, status, text in bad:
        r = requests.post(url, json=payload, headers=headers, timeout=60)
        assert r.status_code == status and text in r.json()["message"], (payload, r.text)
        assert "Traceback" not in r.text


def test_rethreshold_of_a_job_that_kept_no_maps_is_409(fast):
    rp = RemotePredictor(fast, "synthetic-3d", api_key=KEY, probabilities="none")
    rp.set_image(_phantom(), "CT")
    rp.predict(["bone"])
    r = rp.http.post(f"{fast}/v1/jobs/{rp.last_job}/rethreshold", json={"threshold": 0.5}, timeout=10)
    assert r.status_code == 409 and r.json()["error"] == "no_probabilities"
    assert "kept no probability maps" in r.json()["message"] and "'uint8'" in r.json()["message"]
    with pytest.raises(UsageError, match="kept no probability maps"):
        rp.rethreshold(0.5)
    with pytest.raises(UsageError, match="kept no probability maps"):
        rp.model_answers()


def test_rethreshold_of_another_clients_job_is_404(fast):
    """A job belongs to the client that made it (key + client token): any other gets 404, as for no job at all."""
    mine = RemotePredictor(fast, "synthetic-3d", api_key=KEY, client_token="alice-token-0123456789")
    mine.set_image(_phantom(), "CT")
    (bone,) = mine.predict(["bone"])
    (own,) = mine.rethreshold(0.5)
    np.testing.assert_array_equal(own.mask, bone.mask.astype(bool))
    other = RemotePredictor(fast, "synthetic-3d", api_key=KEY, client_token="mallory-token-987654321")
    for jid in (mine.last_job, "0" * 32):
        r = other.http.post(f"{fast}/v1/jobs/{jid}/rethreshold", json={"threshold": 0.5}, timeout=10)
        assert r.status_code == 404 and r.json()["error"] == "job_not_found", r.text
    with pytest.raises(UsageError, match="No job"):
        other.rethreshold(0.5, job_id=mine.last_job)
    with pytest.raises(UsageError, match="No job yet"):
        RemotePredictor(fast, "synthetic-3d", api_key=KEY).rethreshold(0.5)


def test_rethreshold_takes_only_json_numbers_and_each_segment_once(fast):
    """What a hostile or buggy client sends gets one JSON 400 (never a 500, never a value taken as it comes):
    a threshold or band that is a string, true or an integer too large for a float, a band the reply would
    echo unchecked when no segment is asked for, and one segment asked for many times (a full mask each)."""
    rp = RemotePredictor(fast, "synthetic-3d", api_key=KEY, client_token="rethreshold-fuzz-0123456789")
    rp.set_image(_phantom(), "CT")
    rp.predict(["bone", "air"])
    url = f"{fast}/v1/jobs/{rp.last_job}/rethreshold"
    huge = "1" + "0" * 400  # a JSON number Python reads as an int that no float holds
    many = ", ".join(["0"] * 5000)
    bad = [(f'{{"threshold": {huge}}}', "outside 0..1"), (f'{{"threshold": 0.5, "band": {huge}}}', "outside 0..1"),
           ('{"threshold": "0.5"}', "Threshold '0.5' is not a number"), ('{"threshold": true}', "is not a number"),
           ('{"threshold": NaN}', "outside 0..1"), ('{"threshold": 0.5, "band": "0.1"}', "Band '0.1' is not a number"),
           ('{"threshold": 0.5, "band": "wide", "segments": []}', "Band 'wide' is not a number"),
           ('{"threshold": 0.5, "band": -Infinity, "segments": []}', "Band -inf is outside 0..1"),
           (f'{{"threshold": 0.5, "segments": [{many}]}}', "Segment 0 is asked for twice"),
           ('{"threshold": 0.5, "segments": ["bone", 0]}', "Segment 0 is asked for twice")]
    for body, text in bad:
        r = rp.http.post(url, data=body, headers={"Content-Type": "application/json"}, timeout=30)
        assert r.status_code == 400 and r.json()["error"] == "invalid_request", (body[:60], r.text)
        assert text in r.json()["message"] and len(r.json()["message"]) < 200, (body[:60], r.text)
    r = rp.http.post(url, json={"threshold": 0, "band": 1, "segments": ["air", 0]}, timeout=30)
    assert r.status_code == 200, r.text
    out = r.json()
    assert (out["threshold"], out["band"]) == (0.0, 1.0) and type(out["band"]) is float
    assert [(s["index"], s["name"]) for s in out["results"]] == [(1, "air"), (0, "bone")]


def test_client_checks_what_it_sends_and_names_what_was_refused(fast):
    """RemotePredictor turns a NaN or infinite threshold or band into a UsageError (requests refuses NaN in
    JSON with its own exception), sends numpy scalars as the numbers they are, and a 413 of a re-threshold is
    not called an image that is too large."""
    rp = RemotePredictor(fast, "synthetic-3d", api_key=KEY, client_token="client-checks-0123456789")
    rp.set_image(_phantom(), "CT")
    bone, air = rp.predict(["bone", "air"])
    for kw in ({"threshold": float("nan")}, {"threshold": float("inf")}, {"threshold": 0.5, "band": float("nan")}):
        with pytest.raises(UsageError, match="outside 0..1"):
            rp.rethreshold(**kw)
    with pytest.raises(UsageError, match="outside 0..1"):
        rp.predict(["bone"], threshold=float("nan"))
    (got,) = rp.rethreshold(np.float32(0.5), segments=[np.int64(1)], band=np.float64(0.2))
    assert (got.index, got.name, got.threshold, got.confidence["band"]) == (1, "air", 0.5, 0.2)
    np.testing.assert_array_equal(got.mask, air.mask.astype(bool))
    with pytest.raises(InputError, match="^The request is too large .*re-threshold request's JSON is larger"):
        rp.rethreshold(0.5, segments=["bone"] * 10000)


def test_without_probabilities_the_mask_stands_for_them(fast):
    """probabilities="none" (what the Slicer module asks for): exact masks, no float copy per result."""
    v = _phantom()
    rp = RemotePredictor(fast, "synthetic-3d", api_key=KEY, probabilities="none")
    rp.set_image(v, "CT")
    lp = Predictor("synthetic-3d", device="cpu")
    lp.set_image(v, "CT")
    for a, b in zip(rp.predict(["bone", "air"]), lp.predict(["bone", "air"])):
        np.testing.assert_array_equal(a.mask, b.mask)
        assert a.probability is a.mask and a.voxel_count == b.voxel_count > 0


def test_slice_wise_model_with_slice_range(fast):
    v = _phantom()
    rp = RemotePredictor(fast, "synthetic-2d", api_key=KEY, probabilities="float32")
    rp.set_image(v, "CT", slices=(2, 4))
    remote = rp.predict(["bone", "bone left"], keep_absent=True)
    lp = Predictor("synthetic-2d", device="cpu")
    lp.set_image(v, "CT", slices=(2, 4))
    _assert_same(remote, lp.predict(["bone", "bone left"], keep_absent=True))
    assert remote[0].voxel_count == 2 * 4 * 8 and remote[0].extra["slice_existence"] == [1.0, 1.0]
    with pytest.raises(UsageError, match="outside the image's 0:6 slices"):
        rp.set_image(v, "CT", slices=(4, 9))
    # an RGB image (pathology) travels as a vector NRRD
    rgb = np.zeros((1, 8, 10, 3), np.uint8)
    rgb[0, 2:5, 3:9] = (200, 120, 90)  # mean 136.7
    photo = Volume(rgb, (0.25, 0.25, 1.0))
    rp.set_image(photo, "Pathology")
    remote = rp.predict(["100..150"])
    lp.set_image(photo, "Pathology")
    _assert_same(remote, lp.predict(["100..150"]))
    assert remote[0].voxel_count == 3 * 6


def test_set_image_errors_come_from_the_server(fast):
    rp = RemotePredictor(fast, "deepbet", api_key=KEY)
    with pytest.raises(UsageError, match="does not support CT"):
        rp.set_image(_phantom(), "CT")
    with pytest.raises(UsageError, match="set_image"):
        RemotePredictor(fast, "synthetic-3d", api_key=KEY).predict(["bone"])
    with pytest.raises(UsageError, match="does not offer model 'no-such-model'"):
        RemotePredictor(fast, "no-such-model", api_key=KEY)


# ---- security and bad requests ---------------------------------------------------------------------
def test_api_key_is_required_and_checked(fast):
    assert requests.get(f"{fast}/v1/health", timeout=5).json()["auth"] is True  # health is public
    r = requests.get(f"{fast}/v1/models", timeout=5)
    assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer" and "API key" in r.json()["message"]
    r = requests.get(f"{fast}/v1/models", headers={"Authorization": "Bearer wrong"}, timeout=5)
    assert r.status_code == 403 and r.json()["error"] == "forbidden"
    with pytest.raises(AuthError, match="needs an API key"):
        RemotePredictor(fast, "synthetic-3d", api_key="")
    with pytest.raises(AuthError, match="refused the API key"):
        RemotePredictor(fast, "synthetic-3d", api_key="wrong")
    models = requests.get(f"{fast}/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=5).json()["models"]
    deepbet = next(m for m in models if m["id"] == "deepbet")
    assert deepbet["ready"] is True and deepbet["modalities"] == ["MRI"]


def test_version_mismatch_gets_a_clear_message(fast, monkeypatch):
    r = requests.get(f"{fast}/v1/health", headers={API_HEADER: "99"}, timeout=5)
    assert r.status_code == 426 and "speaks API 1" in r.json()["message"] and "API 99" in r.json()["message"]
    import textseg.remote.client as client

    monkeypatch.setattr(client, "client_headers", lambda: {API_HEADER: "99", "X-Textseg-Version": "9.0"})
    with pytest.raises(ServerError, match=r"your client speaks API 99 \(textseg 9.0\). Install a matching textseg"):
        RemotePredictor(fast, "synthetic-3d", api_key=KEY)


def test_malformed_uploads_are_rejected_and_server_keeps_serving(fast):
    h = {"Authorization": f"Bearer {KEY}"}
    garbage = b"this is not an image" * 100
    cases = [
        (garbage, sha256(garbage), {}, 400, "not a readable NRRD"),
        (garbage, "0" * 64, {}, 400, "sha256"),
        (b"\x1f\x8b\x08garbage", sha256(b""), {"Content-Encoding": "gzip"}, 400, "gzip"),
        (garbage, "not-a-hash", {}, 400, "64 hex"),
    ]
    four_d = volume_to_nrrd(Volume(np.zeros((2, 3, 4), np.int16))).replace(b"dimension: 3", b"dimension: 2", 1)
    cases.append((four_d, sha256(four_d), {}, 400, "NRRD"))
    for body, sha, extra, status, words in cases:
        r = requests.put(f"{fast}/v1/volumes/{sha}", data=body, headers={**h, **extra}, timeout=10)
        assert r.status_code == status, (words, r.text)
        assert words in r.json()["message"] and "Traceback" not in r.text
    for bad, words in [({"volume": "0" * 64, "model": "synthetic-3d", "path": "/etc/passwd"}, "Unknown job field"),
                       ({"volume": "0" * 64, "model": "synthetic-3d", "prompts": [{"text": "x", "file": "/tmp/a"}]},
                        "Unknown prompt fields"),
                       ({"volume": "0" * 64, "model": "synthetic-3d"}, "upload it again"),
                       ({"volume": "0" * 64, "model": "synthetic-3d", "prompts": "bone"}, "must be a list")]:
        r = requests.post(f"{fast}/v1/jobs", json=bad, headers=h, timeout=10)
        assert 400 <= r.status_code < 500 and words in r.json()["message"], r.text
    r = requests.post(f"{fast}/v1/jobs", data=b"{not json", headers={**h, "Content-Type": "application/json"},
                      timeout=10)
    assert r.status_code == 400 and r.json()["error"] == "invalid_request"
    assert requests.get(f"{fast}/v1/jobs/nope", headers=h, timeout=5).status_code == 404
    rp = RemotePredictor(fast, "synthetic-3d", api_key=KEY)  # still serving
    rp.set_image(_phantom(), "CT")
    assert rp.predict(["bone"])[0].voxel_count == 4 * 4 * 8


def test_job_options_are_checked_before_anything_runs(fast):
    """A job's threshold is a JSON number in 0..1 and keep_absent a boolean: NaN (which Python's JSON reads)
    would make every voxel above 0 a mask voxel, 5 an empty result, an integer too large for a float a failed
    job, and the string "false" would keep absent targets. Each is a 400 before the job is made."""
    h = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    job = '{"volume": "%s", "model": "synthetic-3d", "prompts": ["bone"], ' % ("0" * 64)
    cases = [('"threshold": NaN', "'threshold' must be a number between 0 and 1"),
             ('"threshold": Infinity', "'threshold' must be"), ('"threshold": 5', "'threshold' must be"),
             ('"threshold": -0.5', "'threshold' must be"), ('"threshold": true', "'threshold' must be"),
             ('"threshold": 1' + "0" * 400, "'threshold' must be"), ('"threshold": "0.5"', "'threshold' must be"),
             ('"keep_absent": "false"', "'keep_absent' must be true or false"), ('"keep_absent": 0', "'keep_absent'"),
             ('"slices": [true, 3]', "'slices' must be [first, stop]"),
             ('"probabilities": "float16"', "'probabilities' must be one of uint8, float32, none")]
    for field, words in cases:
        r = requests.post(f"{fast}/v1/jobs", data=job + field + "}", headers=h, timeout=10)
        assert r.status_code == 400 and r.json()["error"] == "invalid_request", (field[:40], r.text)
        assert words in r.json()["message"], (field[:40], r.text)
    for field in ('"threshold": 0', '"threshold": 1', '"threshold": null', '"keep_absent": null'):  # all valid
        r = requests.post(f"{fast}/v1/jobs", data=job + field + "}", headers=h, timeout=10)
        assert r.status_code == 404 and r.json()["error"] == "volume_not_found", (field, r.text)


def test_hidden_models_are_not_offered_by_default(monkeypatch):
    from fastapi.testclient import TestClient

    monkeypatch.delenv("TEXTSEG_SHOW_TEST_MODELS", raising=False)
    client = TestClient(create_app(Settings(devices=("cpu",))),
                        base_url="http://127.0.0.1")  # no lifespan: requests only
    ids = [m["id"] for m in client.get("/v1/models").json()["models"]]
    assert "deepbet" in ids and not any(i.startswith("synthetic") for i in ids)
    r = client.post("/v1/jobs", json={"volume": "0" * 64, "model": "synthetic-3d", "prompts": ["bone"]})
    assert r.status_code == 404 and r.json()["error"] == "unknown_model"


def test_client_imports_without_torch_or_fastapi():
    import subprocess
    import sys

    code = ("import sys; sys.path.insert(0, sys.argv[1]); import textseg.remote.client; "
            "print(sorted(m for m in ('torch', 'fastapi', 'uvicorn', 'starlette', 'SimpleITK') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, str(Path(__file__).resolve().parents[2] / "BiomedParseSlicer")],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_serve_options(tmp_path):
    import argparse

    from textseg.cli.serve import add_parser, settings_from_args

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    key = tmp_path / "key"
    key.write_text("s3cret\n")
    args = parser.parse_args(["serve", "--devices", "cpu", "--workers", "3", "--api-key-file", str(key), "--queue-size",
                              "5",
                              "--session-ttl", "60", "--max-upload-mb", "1.5", "--preload", "deepbet, synthetic-3d"])
    s = settings_from_args(args)
    assert s.devices == ("cpu", "cpu", "cpu") and s.api_key == "s3cret" and s.queue_size == 5
    assert s.session_ttl == 60 and s.max_upload_bytes == int(1.5 * 2**20) and s.preload == ("deepbet", "synthetic-3d")
    with pytest.raises(UsageError, match="--api-key-file"):
        settings_from_args(parser.parse_args(["serve", "--api-key-file", str(tmp_path / "missing")]))
    keys = tmp_path / "keys"
    keys.write_text("# clients\nws1  Ab3dEf6hIj9kLm2n  \nops  Zy8xWv5uTs2rQp0o admin # operators\n")
    s = settings_from_args(parser.parse_args(["serve", "--keys-file", str(keys), "--heartbeat-timeout", "30",
                                              "--cancel-timeout", "5", "--job-timeout", "0", "--body-timeout", "10",
                                              "--header-timeout", "7",
                                              "--max-results", "7", "--max-results-mb", "2",
                                              "--max-upload-mb", "1", "--max-images-mb", "3"]))
    assert [(k.name, k.admin) for k in s.keys] == [("ws1", False), ("ops", True)] and s.api_key is None
    assert "Ab3d" not in repr(s.keys)  # keys never reach a log through a repr
    assert (s.heartbeat_timeout, s.cancel_timeout, s.job_timeout, s.body_timeout) == (30, 5, 0, 10)
    assert s.header_timeout == 7
    assert s.max_results_per_client == 7 and s.max_result_bytes_per_client == 2 << 20
    assert s.max_upload_bytes == 1 << 20 and s.max_volume_bytes_per_client == 3 << 20
    with pytest.raises(UsageError, match=r"--max-images-mb \(1\) must be at least --max-upload-mb \(2\)"):
        settings_from_args(parser.parse_args(["serve", "--max-upload-mb", "2", "--max-images-mb", "1"]))
    for text, words in [("ws1 short\n", "too weak"), ("ws1 Ab3dEf6hIj9kLm2n\nws1 Zy8xWv5uTs2rQp0o\n", "unique"),
                        ("ws1 Ab3dEf6hIj9kLm2n root\n", "NAME KEY"), ("# nothing\n", "no keys")]:
        keys.write_text(text)
        with pytest.raises(UsageError, match=words):
            settings_from_args(parser.parse_args(["serve", "--keys-file", str(keys)]))
    keys.write_text("ws1  Ab3dEf6hIj9kLm2n\n")
    with pytest.raises(UsageError, match="not both"):
        settings_from_args(parser.parse_args(["serve", "--keys-file", str(keys), "--api-key", "Zy8xWv5uTs2rQp0oXX"]))


def test_non_loopback_without_key_is_refused():
    from textseg.cli.serve import main

    with pytest.raises(UsageError, match="needs an API key"):
        create_app(Settings(host="0.0.0.0", devices=("cpu",)))
    assert main(["serve", "--host", "0.0.0.0", "--port", "1", "--devices", "cpu"]) == 2


def test_unreachable_server_and_5xx_are_clear_errors():
    import http.server
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    t0 = time.monotonic()
    with pytest.raises(ServerError, match=f"Cannot reach the textseg server at http://127.0.0.1:{port}.*Is it running"):
        RemotePredictor(f"http://127.0.0.1:{port}", "synthetic-3d")
    assert time.monotonic() - t0 < 5
    hits = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # a proxy in front of a dead server: 503 (retried), then 500
            hits.append(self.path)
            status = 503 if len(hits) == 1 else 500
            body = b'{"error": "internal", "message": "Internal server error (reference ab12)."}'
            self.send_response(status)
            self.send_header("Retry-After", "0")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    httpd = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        with pytest.raises(ServerError, match=r"failed \(500\): Internal server error \(reference ab12\)"):
            RemotePredictor(f"http://127.0.0.1:{httpd.server_port}", "synthetic-3d")
        assert hits == ["/v1/health", "/v1/health"]
    finally:
        httpd.shutdown()


def test_internal_errors_are_json_without_traceback(fast, fast_dir, tmp_path):
    rp = RemotePredictor(fast, "synthetic-3d", api_key=KEY)
    rp.set_image(_phantom(), "CT")
    rp.predict(["bone"])
    arrays = fast_dir / "jobs" / rp.last_job / "arrays.npz"
    arrays.write_bytes(b"damaged")  # a broken disk: building the seg.nrrd fails inside the server
    r = rp.http.get(f"{fast}/v1/jobs/{rp.last_job}/result", timeout=10)
    assert r.status_code == 500 and r.json()["error"] == "internal" and "reference" in r.json()["message"]
    assert "Traceback" not in r.text and str(fast_dir) not in r.text
    with pytest.raises(ServerError, match=r"failed \(500\): Internal server error \(reference"):
        rp.download_seg_nrrd(rp.last_job, tmp_path / "x.seg.nrrd")
    assert not (tmp_path / "x.seg.nrrd").exists()
    arrays.unlink()  # an administrator cleaned the disk
    r = rp.http.get(f"{fast}/v1/jobs/{rp.last_job}/arrays", timeout=10)
    assert r.status_code == 404 and r.json()["error"] == "result_missing"
    assert rp.predict(["air"])[0].voxel_count > 0  # still serving


# ---- jobs: cancel, expiry, limits, queue, crashes ---------------------------------------------------------
def test_cancel_mid_job_keeps_completed_prompts(slow):
    v = _phantom()
    rp = RemotePredictor(slow, "synthetic-3d")
    rp.set_image(v, "CT")
    token = CancelToken()
    stages = []

    def progress(frac, stage):
        stages.append(stage)
        if "'fat'" in stage:  # the third prompt has started: the first two are complete
            token.cancel()

    results = rp.predict(["bone", "air", "fat", "soft tissue"], progress=progress, cancel=token)
    assert [r.prompt.text for r in results] == ["bone", "air"]
    assert not any("'soft tissue'" in s for s in stages)  # the server stopped inside 'fat' (no wall-clock bound)
    lp = Predictor("synthetic-3d", device="cpu")
    lp.set_image(v, "CT")
    _assert_same(results, lp.predict(["bone", "air"]))
    assert any("kept 2 of 4" in m for m in rp.messages)


def check_cancel_keeps_partial_2d_results(url):
    """A slice-wise model cancelled part-way: every prompt's result over the slices done, marked incomplete, as
    the local Predictor; the job ends 'cancelled' (not 'done'). Shared with test_server_ray."""
    v = _phantom()
    rp = RemotePredictor(url, "synthetic-2d")
    rp.set_image(v, "CT")
    token = CancelToken()

    def progress(frac, stage):
        if stage.startswith("slices 2"):  # slices 0-1 are done
            token.cancel()

    part = rp.predict(["bone", "air"], progress=progress, cancel=token)
    lp = Predictor("synthetic-2d", device="cpu", batch_size=2)
    lp.set_image(v, "CT")
    want = lp.predict(["bone", "air"])
    assert [r.prompt.text for r in part] == ["bone", "air"]
    for r, w in zip(part, want):
        first, done = r.extra["slices_done"]
        assert not r.complete and first == 0 and 2 <= done < 6
        np.testing.assert_array_equal(r.mask[:done], w.mask[:done])
        assert not r.mask[done:].any() and w.mask[done:].any()
    job = rp.http.get(f"{url}/v1/jobs/{rp.last_job}", timeout=10).json()
    assert job["state"] == "cancelled" and job["results"] == 2
    assert job["stage"] == "cancelled: kept 0 of 2 completed prompt(s) and 2 partial result(s)"
    assert rp.messages[-1] == "Cancelled: kept 0 of 2 completed prompt(s) and 2 partial result(s)."
    # the maps a cancelled job kept re-threshold as a finished job's (the run's threshold: the run's masks)
    again = rp.rethreshold(part[0].provenance["threshold"])
    assert [a.name for a in again] == ["bone", "air"]
    for r, a in zip(part, again):
        np.testing.assert_array_equal(a.mask, r.mask.astype(bool))


def test_cancel_mid_job_keeps_partial_2d_results(slow):
    check_cancel_keeps_partial_2d_results(slow)


@pytest.fixture(scope="module")
def short_ttl():
    with running_server(Settings(port=0, devices=("cpu",), show_test_models=True, session_ttl=1.0)) as url:
        yield url


def test_expired_session_is_uploaded_again_transparently(short_ttl):
    slow = short_ttl
    v = _phantom()
    v.array[0, 0, 0] = 7  # an image no other test uploads
    session = CountingSession()
    rp = RemotePredictor(slow, "synthetic-3d", session=session)
    rp.set_image(v, "CT")
    assert session.count("PUT", "volumes/") == 1
    sha = sha256(volume_to_nrrd(v))
    deadline = time.monotonic() + 10
    while rp.http.head(f"{slow}/v1/volumes/{sha}", timeout=5).status_code == 200:
        assert time.monotonic() < deadline, "the volume did not expire"
        time.sleep(0.2)
    r = rp.predict(["bone"])[0]
    assert r.voxel_count == 4 * 4 * 8 and session.count("PUT", "volumes/") == 2


def test_oversized_upload_is_413_and_server_keeps_serving(slow):
    big = Volume(np.zeros((40, 64, 256), np.int16))  # 1.25 MiB > the 1 MiB limit
    body = volume_to_nrrd(big)
    r = requests.put(f"{slow}/v1/volumes/{sha256(body)}", data=body, timeout=10)
    assert r.status_code == 413 and "--max-upload-mb" in r.json()["message"]
    r = requests.put(f"{slow}/v1/volumes/{sha256(body)}", data=gzip.compress(body),
                     headers={"Content-Encoding": "gzip"}, timeout=10)
    assert r.status_code == 413  # the limit applies to the decoded size (no gzip bombs)
    rp = RemotePredictor(slow, "synthetic-3d")
    with pytest.raises(InputError, match="larger than the server accepts"):
        rp.set_image(big, "CT")
    rp.set_image(_phantom(), "CT")
    assert rp.spec.id == "synthetic-3d"


def _upload(url, v):
    body = volume_to_nrrd(v)
    requests.put(f"{url}/v1/volumes/{sha256(body)}", data=body, timeout=10).raise_for_status()
    return sha256(body)


def _submit(url, sha, prompts):
    return requests.post(f"{url}/v1/jobs",
                         json={"volume": sha, "model": "synthetic-3d", "modality": "CT", "prompts": prompts},
                         timeout=10)


def _wait(url, jid, states, timeout=20.0):
    deadline = time.monotonic() + timeout
    while True:
        j = _job_state(url, jid)
        if j["state"] in states:
            return j
        assert time.monotonic() < deadline, j
        time.sleep(0.05)


def _idle(url, timeout=60.0):
    """Wait until earlier tests' jobs on this module's server have ended: no worker busy, nothing queued."""
    deadline = time.monotonic() + timeout
    while True:
        health = requests.get(f"{url}/v1/health", timeout=5).json()
        busy = [w for w in requests.get(f"{url}/v1/workers", timeout=5).json()["workers"] if w.get("busy")]
        if not busy and health["queue"]["waiting"] == 0 and health["status"] == "ok":
            return
        assert time.monotonic() < deadline, (health, busy)
        time.sleep(0.1)


def test_queue_full_gives_429_and_client_honours_retry_after(slow):
    _idle(slow)  # the test fills both workers and the queue itself: start from an idle server
    v = _phantom()
    sha = _upload(slow, v)
    rp = RemotePredictor(slow, "synthetic-3d", retries=8)
    rp.set_image(v, "CT")
    running = [_submit(slow, sha, ["bone"]).json()["id"] for _ in range(2)]  # both workers busy for 2 s
    for jid in running:
        _wait(slow, jid, ("running",))
    queued = _submit(slow, sha, ["air"])
    assert queued.status_code == 202
    r = _submit(slow, sha, ["fat"])
    assert r.status_code == 429 and r.json()["error"] == "queue_full"
    retry_after = int(r.headers["Retry-After"])
    assert 1 <= retry_after <= 60
    t0 = time.monotonic()
    res = rp.predict(["bone"])  # gets 429, waits Retry-After, then runs
    assert time.monotonic() - t0 >= retry_after
    assert res[0].voxel_count == 4 * 4 * 8
    for jid in running + [queued.json()["id"]]:
        assert _wait(slow, jid, ("done", "failed", "cancelled"))["state"] == "done"


def test_worker_crash_fails_only_that_job(slow):
    sha = _upload(slow, _phantom())
    doomed = _submit(slow, sha, ["bone", "air", "fat"]).json()["id"]
    _wait(slow, doomed, ("running",))
    other = _submit(slow, sha, ["bone"]).json()["id"]
    _wait(slow, other, ("running",))
    workers = requests.get(f"{slow}/v1/workers", timeout=5).json()["workers"]
    victim = next(w for w in workers if w["job"] == doomed)
    os.kill(victim["pid"], signal.SIGSEGV)  # a real crash of the worker process
    failed = _wait(slow, doomed, ("done", "failed", "cancelled"))
    assert failed["state"] == "failed" and failed["error"]["type"] == "ServerError"
    assert "SIGSEGV" in failed["error"]["message"] and "restarted the worker" in failed["error"]["message"]
    assert _wait(slow, other, ("done", "failed", "cancelled"))["state"] == "done"
    # the dead worker is replaced and the server keeps serving
    deadline = time.monotonic() + 60
    while True:
        w = requests.get(f"{slow}/v1/workers", timeout=5).json()["workers"][victim["index"]]
        if w["ready"] and w["alive"] and w["pid"] != victim["pid"]:
            break
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert w["restarts"] == 1
    rp = RemotePredictor(slow, "synthetic-3d")
    rp.set_image(_phantom(), "CT")
    with pytest.raises(ServerError, match="died"):
        # the client raises the job's failure reason (run one, crash it)
        box = {}
        t = threading.Thread(target=lambda: box.setdefault("r", _kill_running(slow, dict(rp.http.headers))))
        t.start()
        try:
            rp.predict(["bone", "air", "fat"])
        finally:
            t.join()


def _kill_running(url, headers):
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for w in requests.get(f"{url}/v1/workers", headers=headers, timeout=5).json()["workers"]:
            if w["job"] and _job_state(url, w["job"], headers)["state"] == "running":
                time.sleep(0.3)
                os.kill(w["pid"], signal.SIGKILL)
                return w["pid"]
        time.sleep(0.05)


def test_cli_segment_on_a_server_equals_local(fast, tmp_path, monkeypatch):
    """`textseg segment --server URL` writes the same segments as the local run."""
    from textseg.cli import main
    from textseg.formats.segments import read_seg_nrrd

    monkeypatch.setenv("TEXTSEG_SHOW_TEST_MODELS", "1")
    ct = shared_file("totalsegmentator-examples", "example_ct_sm.nii.gz")
    common = ["-q", "segment", str(ct), "-m", "synthetic-3d", "--modality", "CT", "-p", "bone", "-p", "air left"]
    assert main(common + ["--out", str(tmp_path / "local.seg.nrrd")]) == 0
    assert main(common + ["--server", fast, "--api-key", KEY, "--out", str(tmp_path / "remote.seg.nrrd")]) == 0
    (_, local), (_, remote) = read_seg_nrrd(tmp_path / "local.seg.nrrd"), read_seg_nrrd(tmp_path / "remote.seg.nrrd")
    assert [s.name for s in remote] == ["bone", "air left"]
    for a, b in zip(local, remote):
        np.testing.assert_array_equal(a.mask, b.mask)
        assert a.terminology == b.terminology and a.tags["textseg.model"] == b.tags["textseg.model"]
    assert main(common + ["--server", fast, "--api-key", "wrong", "--out", str(tmp_path / "x.seg.nrrd")]) == 1


def test_result_seg_nrrd_keeps_partial_mark_and_detection_objects(tmp_path):
    """The job's .seg.nrrd (GET /v1/jobs/{id}/result) is written from result.json: a partial (cancelled) result
    is named and tagged as partial and detection objects are in the textseg.objects tag, exactly as the .seg.nrrd
    the CLI writes locally from the same results (formats.segments.segments_from_results)."""
    import dataclasses
    import types

    from textseg.formats.segments import segments_from_results
    from textseg.remote.server import seg_nrrd_path
    from textseg.remote.workers import write_outputs

    v = _phantom()
    lp = Predictor("synthetic-3d", device="cpu")
    lp.set_image(v, "CT")
    bone, air = lp.predict(["bone", "air"])
    assert bone.objects and air.objects
    results = [dataclasses.replace(bone, complete=False), air]
    meta = write_outputs(tmp_path, v.shape, results, "none")
    g = {"spacing": list(v.spacing), "origin": list(v.origin), "direction": v.direction.tolist()}
    job = types.SimpleNamespace(dir=tmp_path, meta=meta, volume=types.SimpleNamespace(geometry=g))
    _, segs = read_seg_nrrd(seg_nrrd_path(job))
    want = segments_from_results(results)
    assert [s.name for s in segs] == [w.name for w in want] == ["bone (partial)", "air"]
    assert segs[0].tags["textseg.complete"] == "false" and "textseg.complete" not in segs[1].tags
    for s, r in zip(segs, results):
        assert json.loads(s.tags["textseg.objects"]) == r.objects
        np.testing.assert_array_equal(s.mask, r.mask)


# ---- hostile input (issue 14) --------------------------------------------------------------------------------
def _nrrd(sizes=(4, 3, 2), ntype="int16", encoding="raw", extra=(), data=b""):
    """A hand-written NRRD (header + attached data)."""
    lines = ["NRRD0004", f"type: {ntype}", f"dimension: {len(sizes)}", "space: left-posterior-superior",
             "sizes: " + " ".join(map(str, sizes)), "space directions: (1,0,0) (0,1,0) (0,0,1)",
             f"encoding: {encoding}", "endian: little", *extra]
    return ("\n".join(lines) + "\n\n").encode() + data


def _put(url, body, headers=None):
    return requests.put(f"{url}/v1/volumes/{sha256(body)}", data=body, headers=headers or {}, timeout=20)


def test_uploads_cannot_name_files_on_the_server(slow, tmp_path):
    """`data file:` (any spelling or form) would make pynrrd read a server file as the image: refused before any
    file is touched, with the same answer whether the file exists or not (no existence/size oracle)."""
    secret = tmp_path / "secret.raw"
    secret.write_bytes(bytes(range(48)))  # exactly 4x3x2 int16: pynrrd would read it as the image
    answers = set()
    for field in (f"data file: {secret}", f"datafile: {secret}", f"data file: {tmp_path}/secret.%d.raw 0 0 1 2",
                  f"data file: {tmp_path / 'missing.raw'}", "data file: LIST", "data file: /dev/zero"):
        for enc in ("raw", "gzip"):
            r = _put(slow, _nrrd(encoding=enc, extra=[field]))
            assert r.status_code == 400, (field, r.status_code, r.text)
            assert "self-contained" in r.json()["message"] and str(tmp_path) not in r.text
            answers.add(r.json()["message"])
    assert len(answers) == 1
    # line/byte skips are refused too; a self-contained NRRD with the same voxels is fine
    r = _put(slow, _nrrd(extra=["byte skip: -1"], data=bytes(range(48))))
    assert r.status_code == 400 and "self-contained" in r.json()["message"]
    r = _put(slow, _nrrd(data=bytes(range(48))))
    assert r.status_code == 201 and r.json()["shape"] == [2, 3, 4]


def test_nrrd_internal_compression_counts_against_the_upload_limit(slow):
    """The 1 MiB limit holds for the voxels however they are encoded: declared sizes are checked before anything
    is decoded, and decompression stops at the declared size."""
    import bz2
    import zlib

    zeros = bytes(4 << 20)  # 4 MiB of voxels > the 1 MiB limit, a few kB compressed
    for enc, packed in (("gzip", gzip.compress(zeros)), ("bzip2", bz2.compress(zeros))):
        body = _nrrd((256, 256, 64), "uint8", enc, data=packed)
        assert len(body) < 20_000
        r = _put(slow, body)
        assert r.status_code == 413 and "--max-upload-mb" in r.json()["message"], (enc, r.text)
    # declares 4096^3 (64 GiB) with 30 bytes of data: refused from the header alone
    r = _put(slow, _nrrd((4096, 4096, 4096), "uint8", "gzip", data=gzip.compress(b"x")))
    assert r.status_code == 413 and "declares" in r.json()["message"]
    # declares 64x64x64 uint8 (256 KiB, allowed) but its gzip stream holds 4 MiB: decoding stops at the declared size
    r = _put(slow, _nrrd((64, 64, 64), "uint8", "gzip", data=gzip.compress(zeros)))
    assert r.status_code == 400 and "more data than its header declares" in r.json()["message"]
    # a zlib (not gzip) stream or truncated data: one clear line
    r = _put(slow, _nrrd((64, 64, 64), "uint8", "gzip", data=zlib.compress(bytes(64 ** 3))[:100]))
    assert r.status_code == 400 and "Traceback" not in r.text
    # the same voxels, self-contained and within the limit, are accepted in every encoding
    small = bytes(range(256)) * 4  # 16x16x4 uint8
    for enc, packed in (("raw", small), ("gzip", gzip.compress(small)), ("bzip2", bz2.compress(small))):
        r = _put(slow, _nrrd((16, 16, 4), "uint8", enc, data=packed))
        assert r.status_code == 201 and r.json()["shape"] == [4, 16, 16], (enc, r.text)


def test_keyless_clients_are_separated_by_their_client_token(slow):
    """On a server without keys (loopback), each client (RemotePredictor: one random token per process, or its
    client_token) sees only its own jobs and volumes."""
    from textseg.remote.wire import CLIENT_HEADER

    a, b = {CLIENT_HEADER: "client-a-" + "x" * 24}, {CLIENT_HEADER: "client-b-" + "y" * 24}
    v = _phantom()
    v.array[0, 0, 1] = 5
    body = volume_to_nrrd(v)
    sha = sha256(body)
    assert requests.put(f"{slow}/v1/volumes/{sha}", data=body, headers=a, timeout=10).status_code == 201
    r = requests.post(f"{slow}/v1/jobs",
                      json={"volume": sha, "model": "synthetic-3d", "modality": "CT", "prompts": ["bone"]},
                      headers=a, timeout=10)
    jid = r.json()["id"]
    assert requests.head(f"{slow}/v1/volumes/{sha}", headers=b, timeout=5).status_code == 404
    assert requests.get(f"{slow}/v1/jobs/{jid}", headers=b, timeout=5).status_code == 404
    assert requests.delete(f"{slow}/v1/jobs/{jid}", headers=b, timeout=5).status_code == 404
    assert jid not in requests.get(f"{slow}/v1/workers", headers=b, timeout=5).text
    r = requests.post(f"{slow}/v1/jobs",
                      json={"volume": sha, "model": "synthetic-3d", "modality": "CT", "prompts": ["air"]},
                      headers=b, timeout=10)
    assert r.status_code == 404 and r.json()["error"] == "volume_not_found"
    assert requests.get(f"{slow}/v1/jobs/{jid}", headers=a, timeout=5).status_code == 200
    r = requests.get(f"{slow}/v1/jobs", headers={CLIENT_HEADER: "short"}, timeout=5)
    assert r.status_code == 400 and CLIENT_HEADER in r.json()["message"]
    # RemotePredictor sends a token of its own; two predictors of one process share it (no second upload)
    session = CountingSession()
    one, two = RemotePredictor(slow, "synthetic-3d", session=session), RemotePredictor(slow, "synthetic-3d",
                                                                                       session=session)
    one.set_image(v, "CT")
    two.set_image(v, "CT")
    assert session.count("PUT", "volumes/") == 1
    assert two.predict(["bone"])[0].voxel_count == 4 * 4 * 8
    assert one.http.get(f"{slow}/v1/jobs/{two.last_job}", timeout=5).status_code == 200
    other = RemotePredictor(slow, "synthetic-3d", client_token="another-client-" + "z" * 20)
    assert other.http.get(f"{slow}/v1/jobs/{two.last_job}", timeout=5).status_code == 404


def test_browsers_cannot_use_a_keyless_server(slow):
    """CSRF (a web page POSTing text/plain) and DNS rebinding (a page served under another host name) are refused;
    the textseg client and curl are not affected."""
    sha = _upload(slow, _phantom())
    job = json.dumps({"volume": sha, "model": "synthetic-3d", "modality": "CT", "prompts": ["bone"]})
    r = requests.post(f"{slow}/v1/jobs", data=job,
                      headers={"Content-Type": "text/plain", "Origin": "http://evil.example"}, timeout=5)
    assert r.status_code == 403 and "browser" in r.json()["message"]
    r = requests.post(f"{slow}/v1/jobs", data=job, headers={"Content-Type": "text/plain"}, timeout=5)
    assert r.status_code == 415 and "application/json" in r.json()["message"]
    port = slow.rsplit(":", 1)[1]
    for host in ("evil.example", f"evil.example:{port}", f"rebind.127.0.0.1.nip.io:{port}"):
        r = requests.get(f"{slow}/v1/models", headers={"Host": host}, timeout=5)
        assert r.status_code == 403 and "Host" in r.json()["message"], host
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", f"127.1:{port}", "localhost"):
        assert requests.get(f"{slow}/v1/models", headers={"Host": host}, timeout=5).status_code == 200, host
    assert requests.post(f"{slow}/v1/jobs", data=job, headers={"Content-Type": "application/json"},
                         timeout=5).status_code == 202


def _raw(url, data: bytes, wait: float):
    """Send raw bytes; return (seconds until the server answered or closed, what it sent)."""
    import socket

    host, port = url.split("//")[1].split(":")
    t0 = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=wait) as s:
        s.sendall(data)
        try:
            got = s.recv(65536)
        except socket.timeout:
            return None, b""
    return time.monotonic() - t0, got


def _closed_within(url, first: bytes, dribble: bytes, wait: float) -> Optional[float]:
    """Connect, send ``first``, then ``dribble`` every 0.3 s; seconds until the server closed the connection
    (None: still open after ``wait``)."""
    import socket

    host, port = url.split("//")[1].split(":")
    t0 = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=wait) as s:
        s.settimeout(0.3)
        try:
            if first:
                s.sendall(first)
            while time.monotonic() - t0 < wait:
                try:
                    if s.recv(65536) == b"":
                        return time.monotonic() - t0
                except socket.timeout:
                    if dribble:
                        s.sendall(dribble)
        except OSError:  # reset by the server while sending
            return time.monotonic() - t0
    return None


def _check_header_deadline(url):
    host = url.split("//")[1]
    took = _closed_within(url, b"", b"", wait=8)  # connects and sends nothing
    assert took is not None and took < 5, took
    took = _closed_within(url, f"GET /v1/health HTTP/1.1\r\nHost: {host}\r\n".encode(), b"X-a: b\r\n", wait=8)
    assert took is not None and took < 5, took  # slow loris on headers: a header line every 0.3 s
    # what real clients do still works: headers in two parts within the deadline, a keep-alive pause after a response
    t, got = _raw(url, f"GET /v1/health HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode(), wait=5)
    assert got.startswith(b"HTTP/1.1 200"), got[:80]
    with requests.Session() as session:
        assert session.get(f"{url}/v1/health", timeout=5).status_code == 200
        time.sleep(1.5)  # longer than the header deadline, shorter than uvicorn's keep-alive
        assert session.get(f"{url}/v1/health", timeout=5).status_code == 200


def test_request_headers_have_a_deadline(slow):
    """header_timeout=1 s (uvicorn has none): a connection that sends nothing, or dribbles its headers, is
    closed; keep-alive clients are not affected. Both of uvicorn's HTTP implementations: the one installed
    ("auto", here httptools) through the fixture, and h11 below."""
    _check_header_deadline(slow)


def test_request_headers_have_a_deadline_on_h11(monkeypatch):
    from uvicorn.protocols.http.h11_impl import H11Protocol

    from textseg.remote import server

    monkeypatch.setattr(server, "_http_base", lambda: H11Protocol)
    s = Settings(port=0, devices=("cpu",), show_test_models=True, header_timeout=1.0)
    with running_server(s) as url:
        _check_header_deadline(url)


def test_request_bodies_are_bounded_in_time_size_and_depth(slow):
    """body_timeout=1 s: a declared but unsent body and a slow-loris upload end in 408 and a closed connection;
    JSON is limited in size and nesting; prompts in number and length, never echoed whole."""
    host = slow.split("//")[1]
    head = f"PUT /v1/volumes/{'ab' * 32} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 100000\r\n\r\n".encode()
    took, got = _raw(slow, head, wait=6)
    assert took is not None and took < 4 and got.startswith(b"HTTP/1.1 408"), (took, got[:80])
    # slow loris: a byte every 0.3 s never trips the 1 s idle timeout, but the rate floor (2 KiB/s) does
    import socket

    hostname, port = host.split(":")
    t0 = time.monotonic()
    with socket.create_connection((hostname, int(port)), timeout=6) as s:
        s.sendall(head)
        s.settimeout(0.3)
        got = b""
        while time.monotonic() - t0 < 6 and not got:
            try:
                s.sendall(b"x")
                got = s.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                break
    assert got.startswith(b"HTTP/1.1 408") and time.monotonic() - t0 < 5, got[:80]
    # JSON: size, nesting, prompts
    sha = _upload(slow, _phantom())
    base = {"volume": sha, "model": "synthetic-3d", "modality": "CT"}
    r = requests.post(f"{slow}/v1/jobs", json={**base, "site": "x" * (2 << 20)}, timeout=10)
    assert r.status_code == 413 and "JSON" in r.json()["message"]
    deep = ("[" * 100_000 + "]" * 100_000).encode()
    r = requests.post(f"{slow}/v1/jobs", data=deep, headers={"Content-Type": "application/json"}, timeout=10)
    assert r.status_code == 400 and "nested" in r.json()["message"]
    r = requests.post(f"{slow}/v1/jobs", json={**base, "prompts": ["bone"] * 1001}, timeout=10)
    assert r.status_code == 400 and "1000 prompts" in r.json()["message"]
    huge = "bone " + "z" * 600_000
    r = requests.post(f"{slow}/v1/jobs", json={**base, "prompts": [huge]}, timeout=10)
    assert r.status_code == 400 and "characters" in r.json()["message"] and len(r.text) < 1000
    r = requests.post(f"{slow}/v1/jobs", json={**base, "prompts": [{"text": "bone", "points": [[1, 2, 3]] * 5000}]},
                      timeout=10)
    assert r.status_code == 400 and len(r.text) < 1000
    assert requests.get(f"{slow}/v1/health", timeout=5).json()["status"] == "ok"  # still serving


def test_weak_keys_refused_and_loopback_detected_properly(tmp_path):
    from textseg.cli.serve import main
    from textseg.remote.server import is_loopback

    for weak in (" ", "a", "secret", "aaaaaaaaaaaaaaaaaaaaaaaa"):
        with pytest.raises(UsageError, match="too weak"):
            create_app(Settings(host="0.0.0.0", api_key=weak, devices=("cpu",)))
    key = tmp_path / "key"
    key.write_text(" \n")
    assert main(["serve", "--host", "0.0.0.0", "--port", "1", "--devices", "cpu", "--api-key-file", str(key)]) == 2
    assert main(["serve", "--host", "0.0.0.0", "--port", "1", "--devices", "cpu", "--api-key", "a"]) == 2
    for host in ("127.0.0.1", "127.1", "127.0.0.2", "::1", "[::1]", "localhost", "::ffff:127.0.0.1", "0x7f.1"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "::", "10.0.0.1", "8.8.8.8", "127.0.0.1.example.invalid"):
        assert not is_loopback(host), host
    create_app(Settings(host="127.1", devices=("cpu",)))  # a loopback address needs no key


def test_a_busy_server_is_a_server_error_after_its_retry_after_budget():
    """429 until the client's busy budget runs out: Retry-After honoured, then ServerError (exit 1) saying the
    server is busy, not UsageError (exit 2, "bad usage")."""
    import http.server

    hits = []

    class Busy(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(time.monotonic())
            body = b'{"error": "queue_full", "message": "The server\'s queue is full (16 jobs waiting)."}'
            self.send_response(429)
            self.send_header("Retry-After", "1")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    httpd = http.server.HTTPServer(("127.0.0.1", 0), Busy)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        t0 = time.monotonic()
        with pytest.raises(ServerError, match="busy") as err:
            RemotePredictor(f"http://127.0.0.1:{httpd.server_port}", "synthetic-3d", busy_timeout=2.5)
        assert err.value.exit_code == 1 and "queue is full" in str(err.value)
        # busy_timeout 2.5 s with Retry-After 1 s: exactly three tries, then it gives up (the count bounds the
        # wait; a wall-clock upper bound only measured how loaded the test machine was)
        assert time.monotonic() - t0 >= 2.0 and len(hits) == 3
        assert all(b - a >= 0.95 for a, b in zip(hits, hits[1:]))  # Retry-After: 1 honoured
    finally:
        httpd.shutdown()
