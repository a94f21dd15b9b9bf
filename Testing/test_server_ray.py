"""`textseg serve --ray`: the same HTTP API with the workers as a Ray Serve deployment, run in
Ray Serve's local testing mode (in-process, no cluster). Skipped without ray[serve]."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("ray")
pytest.importorskip("ray.serve")
pytest.importorskip("fastapi")

from textseg.client import RemotePredictor  # noqa: E402
from textseg.models.base import CancelToken  # noqa: E402
from textseg.predictor import Predictor  # noqa: E402
from textseg.server import Settings, running_server  # noqa: E402
from textseg.volume import Volume  # noqa: E402


def _phantom():
    arr = np.full((6, 8, 10), -1000, np.int16)
    arr[1:5, 2:6, 1:9] = 400
    return Volume(arr, (1.0, 1.0, 2.0), (5.0, -3.0, 7.0), np.diag([-1.0, 1.0, 1.0]))


@pytest.fixture(scope="module")
def ray_server():
    s = Settings(port=0, ray=True, ray_options={"local_testing": True, "replicas": 1}, devices=("cpu",),
                 show_test_models=True, adapter_options={"synthetic-3d": {"delay": 0.6}})
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
