"""One contract, two implementations: the same tests run against the local ``Predictor`` and a ``RemotePredictor``
talking to a real uvicorn server on 127.0.0.1 (one cpu worker), both with the weight-free synthetic models.

What is asserted is what ``PredictorProtocol`` (textseg/predictor/contract.py) says: the same signatures, results
on exactly the input grid whatever its orientation, box prompts in LPS mm, slice ranges in canonical slices,
clear errors for what the model cannot do, the image forgotten by ``reset_image``, progress within 0..1, and a
cancel that keeps the completed prompts and ends ``messages`` with the "kept N of M" summary."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

from textseg.errors import UsageError
from textseg.predictor import Predictor, PredictorProtocol
from textseg.prompts import Prompt
from textseg.runcontrol import CancelToken
from textseg.volume import Volume

CONTRACT = ("set_image", "check_prompts", "predict", "recognize", "reset_image")


def _phantom() -> Volume:
    """A 'bone' block stored right-to-left (direction column 0 points right), so the input grid is not the
    canonical one: i runs 9 -> 0 in LPS x. Spacing (1, 1, 2): voxel (i, j, k) is at LPS (9 - i, j, 2k) mm."""
    arr = np.full((6, 8, 10), -1000, np.int16)
    arr[1:5, 2:6, 1:9] = 400
    return Volume(arr, (1.0, 1.0, 2.0), (9.0, 0.0, 0.0), np.diag([-1.0, 1.0, 1.0]))


@pytest.fixture(scope="module")
def server_url(tmp_path_factory):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from textseg.remote.server import Settings, running_server

    # a little model time per prompt, so that a cancel reaches the job before it ends
    s = Settings(port=0, devices=("cpu",), show_test_models=True, work_dir=str(tmp_path_factory.mktemp("protocol")),
                 adapter_options={"synthetic-3d": {"delay": 0.2}})
    with running_server(s) as url:
        yield url


@pytest.fixture(params=["local", "remote"])
def make(request):
    """make(model) -> a predictor of the parametrized kind."""
    if request.param == "local":
        return lambda model: Predictor(model, device="cpu", batch_size=2)
    url = request.getfixturevalue("server_url")
    from textseg.remote.client import RemotePredictor

    return lambda model: RemotePredictor(url, model)


def test_both_implement_the_protocol_with_the_same_signatures(server_url):
    from textseg.remote.client import RemotePredictor

    local, remote = Predictor("synthetic-3d", device="cpu"), RemotePredictor(server_url, "synthetic-3d")
    for p in (local, remote):
        assert isinstance(p, PredictorProtocol)
        assert p.spec.id == "synthetic-3d" and p.spec.dims == 3 and isinstance(p.messages, list)
        for name in CONTRACT:
            want = inspect.signature(getattr(PredictorProtocol, name))
            got = inspect.signature(getattr(type(p), name))
            assert [(q.name, q.kind, q.default) for q in got.parameters.values()] == \
                   [(q.name, q.kind, q.default) for q in want.parameters.values()], (type(p).__name__, name)


@pytest.mark.parametrize("model", ["synthetic-3d", "synthetic-2d"])
def test_results_on_the_input_grid_with_sides_and_boxes_in_lps(make, model):
    p = make(model)
    v = _phantom()
    p.set_image(v, "CT")
    seen = []
    bone, left, box = p.predict(["bone", "bone left", Prompt("bone", box=((5, 2, 2), (8, 5, 6)))],
                                progress=lambda f, stage: seen.append(f))
    for r in (bone, left, box):
        assert r.mask.shape == v.shape and r.mask.dtype == np.uint8
        assert r.probability.shape == v.shape and r.probability.dtype == np.float32
        assert r.complete and r.provenance["model"] == model
    assert bone.voxel_count == 4 * 4 * 8 and bone.name == "bone"
    # left = high LPS x = low i on this right-to-left grid: i 1..4 of the block (x 5..8)
    assert left.voxel_count == 4 * 4 * 4 and left.mask[:, :, :5].sum() == left.voxel_count
    # LPS box x 5..8, y 2..5, z 2..6 mm = i 1..4, j 2..5, k 1..3
    assert box.voxel_count == 4 * 4 * 3 and box.mask[1:4, 2:6, 1:5].all()
    np.testing.assert_array_equal(bone.probability > 0.5, bone.mask.astype(bool))
    assert seen and all(0.0 <= f <= 1.0 for f in seen)


def test_slice_range_counts_canonical_slices(make):
    p = make("synthetic-2d")
    p.set_image(_phantom(), "CT", slices=(2, 4))
    (bone,) = p.predict(["bone"])
    assert bone.voxel_count == 2 * 4 * 8 and bone.mask[2:4].sum() == bone.voxel_count


def test_absent_target_is_dropped_with_a_message(make):
    p = make("synthetic-3d")
    p.set_image(_phantom(), "CT")
    (r,) = p.predict(["nothing"])
    assert not r.present and r.voxel_count == 0 and "not in this image" in r.message
    (kept,) = p.predict(["nothing"], keep_absent=True)
    assert not kept.present and "kept as asked" in kept.message
    (half,) = p.predict(["-1000..400"], threshold=0.5)  # every voxel of the phantom
    assert half.voxel_count == 6 * 8 * 10


def test_what_the_model_cannot_do_is_a_clear_usage_error(make):
    p = make("synthetic-3d")
    with pytest.raises(UsageError, match="set_image"):
        p.predict(["bone"])
    with pytest.raises(UsageError, match="Unknown modality"):
        p.set_image(_phantom(), "Sonar")
    with pytest.raises(UsageError, match="slice range"):
        p.set_image(_phantom(), "CT", slices=(0, 2))
    with pytest.raises(UsageError, match="box"):
        p.check_prompts([{"text": "bone", "box": [[0, 0], [1, 1]]}])
    assert [q.text for q in p.check_prompts("bone\n\nfat\n")] == ["bone", "fat"]
    p.set_image(_phantom(), "CT")
    with pytest.raises(UsageError, match="no recognition"):
        p.recognize()
    for bad in (float("nan"), 1.5, -0.1, "half"):  # the same check both sides, before anything runs
        with pytest.raises(UsageError, match="Threshold .* give a probability between 0 and 1"):
            p.predict(["bone"], threshold=bad)
    p.reset_image()
    with pytest.raises(UsageError, match="set_image"):
        p.predict(["bone"])


def test_cancel_keeps_completed_prompts_and_says_so(make):
    p = make("synthetic-3d")
    p.set_image(_phantom(), "CT")
    token = CancelToken()
    token.cancel()  # before the run: nothing (locally) or what the server finished before the cancel reached it
    prompts = ["bone", "air", "fat", "soft tissue"]
    results = p.predict(prompts, cancel=token)
    assert len(results) < len(prompts)
    assert [r.prompt.text for r in results] == prompts[: len(results)] and all(r.complete for r in results)
    assert p.messages[-1] == f"Cancelled: kept {len(results)} of {len(prompts)} completed prompt(s)."
