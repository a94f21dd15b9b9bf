"""The predictor contract on the weight-free synthetic adapters: geometry, paths, cancel, errors."""

from __future__ import annotations

import numpy as np
import pytest

from textseg.errors import UsageError
from textseg.predictor import Predictor
from textseg.runcontrol import CancelToken
from textseg.volume import Volume


def _phantom():
    arr = np.full((6, 8, 10), -1000, np.int16)
    arr[1:5, 2:6, 1:9] = 400  # a "bone" block spanning both halves in i
    return Volume(arr, (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), np.eye(3))


@pytest.mark.parametrize("model", ["synthetic-3d", "synthetic-2d"])
def test_exact_voxel_counts_and_sides(model):
    v = _phantom()
    p = Predictor(model, device="cpu", batch_size=4)
    p.set_image(v, "CT")
    bone, left, right = p.predict(["bone", "bone left", "bone right"])
    assert bone.voxel_count == 4 * 4 * 8
    # identity direction = LPS: "left" is the high-i half (i >= 5)
    assert left.voxel_count == 4 * 4 * 4 and left.mask[:, :, 5:].sum() == left.voxel_count
    assert right.voxel_count == 4 * 4 * 4 and right.mask[:, :, :5].sum() == right.voxel_count
    assert bone.provenance["model"] == model and bone.provenance["prompt"] == {"text": "bone"}


def test_flipped_copy_gives_same_physical_mask():
    v = _phantom()
    # the same physical image stored with i reversed: direction column 0 points right
    flipped = Volume(v.array[:, :, ::-1].copy(), v.spacing, (9.0, 0.0, 0.0), np.diag([-1.0, 1.0, 1.0]))
    p = Predictor("synthetic-3d", device="cpu")
    p.set_image(flipped, "CT")
    left = p.predict(["bone left"])[0]
    p.set_image(v, "CT")
    ref = p.predict(["bone left"])[0]
    np.testing.assert_array_equal(left.mask[:, :, ::-1], ref.mask)


def test_absent_target_is_dropped_with_message():
    p = Predictor("synthetic-3d", device="cpu")
    p.set_image(_phantom(), "CT")
    r = p.predict(["nothing"])[0]
    assert not r.present and r.voxel_count == 0 and "not in this image" in r.message


def test_cancel_keeps_completed_prompts():
    p = Predictor("synthetic-3d", device="cpu", delay=0.05)
    p.set_image(_phantom(), "CT")
    token = CancelToken()
    seen = []

    def progress(frac, stage):
        seen.append((frac, stage))
        if frac >= 0.5:
            token.cancel()

    results = p.predict(["bone", "air", "fat", "soft tissue"], progress=progress, cancel=token)
    assert [r.prompt.text for r in results] == ["bone", "air"]
    assert seen and all(0.0 <= f <= 1.0 for f, _ in seen)


def test_slice_range_and_encode_once():
    p = Predictor("synthetic-2d", device="cpu", batch_size=2)
    p.set_image(_phantom(), "CT", slices=(2, 4))
    results = p.predict(["bone", "bone left", "air"])
    assert results[0].voxel_count == 2 * 4 * 8  # slices 2 and 3 only
    assert p.adapter.calls["encode"] == 1  # one batch of 2 slices, encoded once for 3 prompts
    p.predict(["fat"])
    assert p.adapter.calls["encode"] == 1  # cached


def test_bad_requests_are_clear():
    p = Predictor("synthetic-3d", device="cpu")
    with pytest.raises(UsageError, match="set_image"):
        p.predict(["bone"])
    with pytest.raises(UsageError, match="Unknown modality"):
        p.set_image(_phantom(), "Sonar")
    with pytest.raises(UsageError, match="slice range"):
        p.set_image(_phantom(), "CT", slices=(0, 2))
    with pytest.raises(UsageError, match="Unknown model"):
        Predictor("no-such-model")


def test_cancel_in_slice_mode_keeps_whole_slices_as_partial_results():
    from textseg.formats.segments import segments_from_results

    p = Predictor("synthetic-2d", device="cpu", batch_size=1)
    p.set_image(_phantom(), "CT")
    token = CancelToken()

    def progress(frac, stage):
        if stage == "slices 3-3":  # slices 0..2 are done when slice 3 starts
            token.cancel()

    results = p.predict(["bone", "air"], progress=progress, cancel=token)
    assert [r.complete for r in results] == [False, False]
    assert results[0].extra["slices_done"] == [0, 3]
    assert results[0].voxel_count == 2 * 4 * 8  # bone lies in slices 1..4; only 1 and 2 were processed
    assert results[0].mask[3:].sum() == 0
    segs = segments_from_results(results)
    assert segs[0].name == "bone (partial)" and segs[0].tags["textseg.complete"] == "false"


def test_box_prompt_in_physical_coordinates():
    from textseg.prompts import Prompt

    v = _phantom()  # identity direction, spacing (1, 1, 2): LPS mm = (i, j, 2k)
    p = Predictor("synthetic-3d", device="cpu")
    p.set_image(v, "CT")
    inside, outside = p.predict([Prompt("bone", box=((1, 2, 2), (4, 5, 6))),
                                 Prompt("bone", box=((-9, -9, -9), (-5, -5, -5)))])
    assert inside.voxel_count == 4 * 4 * 3  # i 1..4, j 2..5, k 1..3
    assert outside.voxel_count == 0


def _on_fake_gpu(p):
    """Pretend the predictor runs on a GPU (the synthetic adapter simulates its memory)."""
    import torch

    p.device = torch.device("cuda")
    return p


def test_gpu_out_of_memory_halves_the_batch_and_says_so():
    p = _on_fake_gpu(Predictor("synthetic-2d", device="cpu", batch_size=4, fits=1))
    p.set_image(_phantom(), "CT")
    (r,) = p.predict(["bone"])
    assert r.voxel_count == 4 * 4 * 8  # every slice done despite the failures
    assert p.batch_size == 1 and p.adapter.calls["oom"] == 2  # 4 -> 2 -> 1
    assert [m for m in p.messages if "out of memory" in m] == [
        "GPU out of memory: retrying with batch size 2.", "GPU out of memory: retrying with batch size 1."]


def test_gpu_out_of_memory_at_batch_one_moves_to_the_cpu():
    p = _on_fake_gpu(Predictor("synthetic-3d", device="cpu", batch_size=1, fits=0))
    p.set_image(_phantom(), "CT")
    assert str(p.device) == "cpu" and p.adapter.calls["to"] == ["cpu"]
    assert any("continuing on the CPU" in m for m in p.messages)
    assert p.predict(["bone"])[0].provenance["device"] == "cpu"


class _Squares:
    """A picklable deferred map: counts its computations in a file-less way (class attribute)."""

    calls = 0

    def __call__(self):
        _Squares.calls += 1
        return np.arange(8, dtype=np.float32).reshape(2, 2, 2) / 8


def test_probability_may_be_computed_on_first_read():
    import pickle

    from textseg.predictor import PromptResult
    from textseg.prompts import Prompt

    mask = np.zeros((2, 2, 2), np.uint8)
    r = PromptResult(Prompt("x"), _Squares(), mask, None, True, {})
    assert not r.probability_ready and _Squares.calls == 0
    copy = pickle.loads(pickle.dumps(r))  # travels deferred
    assert _Squares.calls == 0 and not copy.probability_ready
    assert r.probability[1, 1, 1] == np.float32(7 / 8) and r.probability_ready and _Squares.calls == 1
    assert r.probability is r.probability and _Squares.calls == 1  # computed once, then kept
    np.testing.assert_array_equal(copy.probability, r.probability)
    r.probability = np.ones((2, 2, 2), np.float32)  # plain arrays as before
    assert r.probability_ready and r.probability.sum() == 8
