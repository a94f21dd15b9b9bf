"""`textseg serve --ray`: the same HTTP API with the workers as a Ray Serve deployment, run in
Ray Serve's local testing mode (in-process, no cluster). Skipped without ray[serve]."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("ray")
pytest.importorskip("ray.serve")
pytest.importorskip("fastapi")

from textseg.predictor import Predictor  # noqa: E402
from textseg.remote.client import RemotePredictor  # noqa: E402
from textseg.remote.server import Settings, running_server  # noqa: E402
from textseg.runcontrol import CancelToken  # noqa: E402
from textseg.volume import Volume  # noqa: E402

SLOW_2D = {"synthetic-2d": {"delay": 0.5, "batch_size": 2}}  # as test_server.SLOW_2D


def _phantom():
    arr = np.full((6, 8, 10), -1000, np.int16)
    arr[1:5, 2:6, 1:9] = 400
    return Volume(arr, (1.0, 1.0, 2.0), (5.0, -3.0, 7.0), np.diag([-1.0, 1.0, 1.0]))


@pytest.fixture(scope="module")
def ray_server():
    s = Settings(port=0, ray=True, ray_options={"local_testing": True, "replicas": 1}, devices=("cpu",),
                 show_test_models=True, adapter_options={"synthetic-3d": {"delay": 0.6}, **SLOW_2D})
    with running_server(s) as url:
        yield url


def test_ray_round_trip_and_cancel(ray_server):
    v = _phantom()
    rp = RemotePredictor(ray_server, "synthetic-3d")
    assert rp.server["workers"] == 1
    rp.set_image(v, "CT")
    remote = rp.predict(["bone left", "nothing"])
    lp = Predictor("synthetic-3d", device="cpu")
    lp.set_image(v, "CT")
    local = lp.predict(["bone left", "nothing", "air"])
    for a, b in zip(remote, local):
        np.testing.assert_array_equal(a.mask, b.mask)
        assert (a.existence, a.present, a.message) == (b.existence, b.present, b.message)
    assert remote[0].voxel_count == 4 * 4 * 4 and remote[0].provenance["device"] == "cpu"
    # cancel while the third prompt runs: the two completed ones come back
    token = CancelToken()
    stages = []

    def progress(frac, stage):
        stages.append(stage)
        if "'air'" in stage:
            token.cancel()

    kept = rp.predict(["bone left", "nothing", "air", "fat"], progress=progress, cancel=token)
    assert [r.prompt.text for r in kept] == ["bone left", "nothing"]
    np.testing.assert_array_equal(kept[0].mask, local[0].mask)
    assert any("kept 2 of 4" in m for m in rp.messages)


def test_ray_cancel_keeps_partial_2d_results(ray_server):
    """The partial results a 2D model returns after the cancel are streamed back (cooperative cancel)."""
    import test_server

    test_server.check_cancel_keeps_partial_2d_results(ray_server)


# ---- recognition ("segment everything") through the Ray deployment -------------------------------------------
@pytest.fixture(scope="module")
def ray_v2_server(tmp_path_factory):
    pytest.importorskip("torch")
    import v2_helpers as tr

    from textseg.models.biomedparse.v2.model import REDUCED

    weights = tr.make_v2_weights(tmp_path_factory.mktemp("rayv2"))
    s = Settings(port=0, ray=True, ray_options={"local_testing": True, "replicas": 1}, devices=("cpu",),
                 weights_dir=str(weights),
                 adapter_options={"biomedparse-v2": {"config": REDUCED, "seed": 3, "batch_size": 2}})
    with running_server(s) as url:
        yield url, weights


V2_OPTIONS = {"targets": ["liver", "spleen", "left kidney", "aorta"], "existence_threshold": 0.0}


def _local_v2(weights):
    import v2_helpers as tr

    local = tr.v2_predictor(weights)
    local.set_image(tr.ct_volume(), "CT", "abdomen")
    want = local.recognize(**V2_OPTIONS)
    assert len(want) >= 2
    return want


def test_ray_recognize_equals_local(ray_v2_server):
    """A 'recognize' job on the Ray backend: same targets, masks, scores and objects as the local Predictor."""
    import v2_helpers as tr

    url, weights = ray_v2_server
    want = _local_v2(weights)
    rp = RemotePredictor(url, "biomedparse-v2")
    rp.set_image(tr.ct_volume(), "CT", "abdomen")
    got = rp.recognize(**V2_OPTIONS)
    assert [g.name for g in got] == [w.name for w in want]
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g.mask, w.mask)
        assert g.objects == w.objects and g.complete and g.existence == pytest.approx(w.existence)


def test_ray_recognize_cancel_keeps_completed_slices(ray_v2_server, monkeypatch):
    """A cancel after two slices keeps the targets found in them, marked incomplete (as the local Predictor and
    the worker-process backend do): the DELETE sets the replica's CancelToken and the stream goes on to the
    results the recognition returns after the cancel."""
    import time

    import v2_helpers as tr

    from textseg.models.biomedparse.v2.adapter import BiomedParseV2Adapter

    url, weights = ray_v2_server
    want = _local_v2(weights)
    options = V2_OPTIONS
    rp = RemotePredictor(url, "biomedparse-v2")
    rp.set_image(tr.ct_volume(), "CT", "abdomen")

    real = BiomedParseV2Adapter.decode_slices

    def slow(self, enc, prompts, ctx):  # local testing mode: the replica runs in this process
        time.sleep(0.4)
        return real(self, enc, prompts, ctx)

    monkeypatch.setattr(BiomedParseV2Adapter, "decode_slices", slow)
    token = CancelToken()

    def progress(frac, stage):
        if stage.startswith("recognizing slices 2"):
            token.cancel()

    part = rp.recognize(progress=progress, cancel=token, **options)
    assert part, "the targets found in the completed slices were lost"
    by_name = {w.name: w for w in want}
    for r in part:
        assert not r.complete and r.extra["slices_done"][0] == 0
        done = r.extra["slices_done"][1]
        assert 2 <= done < 5
        np.testing.assert_array_equal(r.mask[:done], by_name[r.name].mask[:done])
        assert not r.mask[done:].any()


# ---- the fallback: a replica that does not stop after the cancel ------------------------------------------------
def test_ray_cancel_falls_back_to_cancelling_the_request(monkeypatch):
    """A replica that ignores the cancel (stuck, or its cancel() never arrives): after cancel_timeout the Ray
    request itself is cancelled; the prompts streamed before are kept and the job's messages say why."""
    import time

    import textseg.remote.ray_backend as sr

    monkeypatch.setattr(sr, "_cancel", lambda tokens, job_id: True)  # acknowledged, but the token is never set
    s = Settings(port=0, ray=True, ray_options={"local_testing": True, "replicas": 1, "cancel_timeout": 0.3},
                 devices=("cpu",), show_test_models=True, adapter_options={"synthetic-3d": {"delay": 1.5}})
    v = _phantom()
    with running_server(s) as url:
        rp = RemotePredictor(url, "synthetic-3d")
        rp.set_image(v, "CT")
        token = CancelToken()

        def progress(frac, stage):
            if "'nothing'" in stage:
                token.cancel()

        t0 = time.monotonic()
        kept = rp.predict(["bone left", "nothing", "air"], progress=progress, cancel=token)
        assert time.monotonic() - t0 < 3.5  # the deaf replica would take 4.5 s for all three
        assert [r.prompt.text for r in kept] == ["bone left"]
        assert kept[0].voxel_count == 4 * 4 * 4
        assert any("did not stop within 0.3 s of the cancel" in m for m in rp.messages)
        assert any("kept 1 of 3" in m for m in rp.messages)
        again = rp.predict(["bone left"])  # the replica serves the next job (after the stuck one has stopped)
        np.testing.assert_array_equal(again[0].mask, kept[0].mask)


# ---- a replica that stops answering (issue 14, item 7) --------------------------------------------------------
SILENCE = {"calls": [], "release": None, "real": None}  # module level: Ray pickles the patched function by reference


def _silent_once(state, job, token, lock, beat=5.0):
    """The first job after set_image's: the replica starts, then says nothing more (no beat, no progress)."""
    SILENCE["calls"].append(job["id"])
    if len(SILENCE["calls"]) == 2:
        yield ("progress", 0.0, "starting")
        SILENCE["release"].wait(30)
        return
    yield from SILENCE["real"](state, job, token, lock, beat)


def test_ray_silent_replica_fails_its_job_and_the_server_goes_on(monkeypatch):
    """A replica whose stream goes silent (stopped, lost node): after heartbeat_timeout the request is cancelled
    and the job fails saying so, instead of running forever; the dispatcher pings the replica before it sends it
    the next job. (Local testing mode runs the replica in this process: the silence is a run that never yields.)"""
    import threading
    import time

    import textseg.remote.ray_backend as sr
    from textseg.errors import ServerError

    SILENCE.update(calls=[], release=threading.Event(), real=sr._iter_job)
    monkeypatch.setattr(sr, "_iter_job", _silent_once)
    s = Settings(port=0, ray=True, ray_options={"local_testing": True, "replicas": 1}, devices=("cpu",),
                 show_test_models=True, heartbeat_timeout=2.0)
    v = _phantom()
    try:
        with running_server(s) as url:
            rp = RemotePredictor(url, "synthetic-3d", timeout=20)
            rp.set_image(v, "CT")
            t0 = time.monotonic()
            with pytest.raises(ServerError, match=r"stopped responding \(no heartbeat for 2 s\)"):
                rp.predict(["bone left"])
            assert time.monotonic() - t0 < 8
            SILENCE["release"].set()
            again = rp.predict(["bone left"])  # the next job runs (with heartbeats: no false alarm)
            assert again[0].voxel_count == 4 * 4 * 4 and len(SILENCE["calls"]) == 3
    finally:
        SILENCE["release"].set()
