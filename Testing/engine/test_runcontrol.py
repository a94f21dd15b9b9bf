"""Run control (textseg/runcontrol.py): the one cancel token and its accepted forms, progress sub-ranges, and the
adapter classes checked against their spec (textseg/models/base.py)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from textseg.errors import Cancelled, ModelError
from textseg.runcontrol import CancelToken, Progress, kept_summary, sub_progress


def test_cancel_token_of_every_accepted_form():
    assert CancelToken.of(None).cancelled is False
    token = CancelToken()
    assert CancelToken.of(token) is token
    event = threading.Event()
    from_event = CancelToken.of(event)
    assert not from_event.cancelled
    event.set()
    assert from_event.cancelled
    with pytest.raises(Cancelled, match="completed results are kept"):
        from_event.check()
    flag = []
    polled = CancelToken.of(lambda: bool(flag))
    assert not polled.cancelled
    flag.append(1)
    assert polled.cancelled
    with pytest.raises(Cancelled, match="stopped here"):
        polled.check("stopped here")
    class TokenLike:
        cancelled = False

    like = TokenLike()
    from_like = CancelToken.of(like)
    assert not from_like.cancelled
    like.cancelled = True
    assert from_like.cancelled
    shared = threading.Event()  # a flag another party sets (the server's shared-memory flag in a worker)
    CancelToken(shared).cancel()
    assert shared.is_set()
    with pytest.raises(TypeError, match="cancel must be"):
        CancelToken.of(3)


def test_sub_progress_nests_and_clamps():
    seen = []
    outer = sub_progress(lambda f, stage: seen.append((round(f, 6), stage)), 0.3, 1.0)
    inner = sub_progress(outer, 0.5, 1.0)  # the second half of 0.3..1.0: 0.65..1.0
    inner(0.0, "a")
    inner(0.5, "b")
    inner(2.0, "c")
    inner(-1.0)
    assert seen == [(0.65, "a"), (0.825, "b"), (1.0, "c"), (0.65, "")]
    assert sub_progress(None, 0.0, 1.0) is None


def test_progress_steps_keep_their_stage():
    seen = []
    p = Progress(lambda f, stage: seen.append((round(f, 6), stage)))
    p.span(0.1, 0.3, "preprocessing")
    p.report(0.5)
    p.report(1.0, "resampled")
    p.span(0.3, 1.0, "encoding")
    assert seen == [(0.1, "preprocessing"), (0.2, "preprocessing"), (0.3, "resampled"), (0.3, "encoding")]
    Progress(None).report(0.5)  # no callback: nothing to do


def test_kept_summary():
    assert kept_summary(2, 5, 0) == "kept 2 of 5 completed prompt(s)"
    assert kept_summary(0, 2, 2) == "kept 0 of 2 completed prompt(s) and 2 partial result(s)"


def test_adapter_class_must_match_the_spec_dims():
    from textseg.catalog import get_model
    from textseg.models.synthetic.adapter import Synthetic2D, Synthetic3D
    from textseg.predictor import Predictor

    with pytest.raises(ModelError, match="synthetic-3d.* is 3D but its adapter Synthetic2D is not a VolumeAdapter"):
        Predictor(Synthetic2D(get_model("synthetic-3d")), device="cpu")
    with pytest.raises(ModelError, match="is 2D but its adapter Synthetic3D is not a SliceAdapter"):
        Predictor(Synthetic3D(get_model("synthetic-2d")), device="cpu")
    assert Predictor(Synthetic3D(get_model("synthetic-3d")), device="cpu").spec.dims == 3


def test_prompts_per_call_is_a_class_constant_not_mutated_per_instance():
    from textseg.catalog import get_model
    from textseg.models.synthetic.adapter import Synthetic3D
    from textseg.predictor import Predictor
    from textseg.volume import Volume

    p = Predictor("synthetic-3d", device="cpu")
    p.set_image(Volume(np.zeros((2, 3, 4), np.int16), (1.0, 1.0, 1.0)), "CT")
    assert p.adapter.prompts_per_call(p._state) == Synthetic3D.max_prompts_per_call == 1
    assert "max_prompts_per_call" not in vars(p.adapter)
    assert get_model("synthetic-3d").dims == Synthetic3D.dims == 3
