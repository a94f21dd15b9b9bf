"""BiomedParse v1: equality with the official code (oracle fixture from
Testing/oracles/make_biomedparse_v1_fixture.py, reduced configuration, seeded random weights), the
full-size key contract, the existence p-value test, recognition rules and the checkpoint loader."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from textseg.errors import WeightsError  # noqa: E402
from textseg.models.biomedparse import v1_existence as ex  # noqa: E402
from textseg.models.biomedparse.v1_decoder import SEEMGroundingDecoder, vl_similarity  # noqa: E402

FIX = Path(__file__).parent / "fixtures"
ORACLE = FIX / "biomedparse_v1_oracle.npz"
KEYS = FIX / "biomedparse_v1_keys.json"
TOL = 1e-4  # fp32 CPU, max abs logit difference
PRED = "sem_seg_head.predictor."


@pytest.fixture(scope="module")
def oracle():
    return dict(np.load(ORACLE))


def state_dict(o) -> dict:
    """The fixture's upstream state dict (token embedding rows restored; the others are zero)."""
    sd = {k[3:]: torch.from_numpy(v) for k, v in o.items() if k.startswith("sd/")}
    for k in [k for k in o if k.startswith("sd_rows/")]:
        name = k[len("sd_rows/"):]
        full = torch.zeros(tuple(o["sd_shape/" + name]))
        full[torch.from_numpy(o[k])] = torch.from_numpy(o["sd_rows_values/" + name])
        sd[name] = full
    return sd


def reduced_decoder(o) -> SEEMGroundingDecoder:
    dec = SEEMGroundingDecoder(hidden_dim=32, dim_proj=32, num_queries=101, nheads=4, dim_feedforward=64,
                               dec_layers=3, mask_dim=32).eval()
    sd = {k[len(PRED):]: v for k, v in state_dict(o).items() if k.startswith(PRED) and ".lang_encoder." not in k
          and not k.startswith(PRED + "lang_encoder.")}
    dec.load_state_dict(sd, strict=True)
    return dec


def upstream_features(o):
    feats = [torch.from_numpy(o[f"img_scale{i}"])[None] for i in range(3)]
    return feats, torch.from_numpy(o["img_mask_features"])[None]


@pytest.mark.parametrize("case", ["a", "ab"])
def test_decoder_matches_upstream_on_upstream_features(oracle, case):
    """Our grounding decoder on upstream's image features and grounding tokens: pred_masks and
    pred_captions of the last head equal upstream's evaluate_demo (``ab``: concatenated tokens)."""
    dec = reduced_decoder(oracle)
    feats, mf = upstream_features(oracle)
    tokens = torch.from_numpy(oracle[f"{case}_grounding_tokens"])[:, None]
    with torch.no_grad():
        masks, captions = dec(feats, mf, tokens)
    assert np.abs(masks[0].numpy() - oracle[f"{case}_pred_masks"]).max() <= TOL
    assert np.abs(captions[0].numpy() - oracle[f"{case}_pred_captions"]).max() <= TOL
    scale = torch.tensor(float(oracle["sd/" + PRED + "lang_encoder.logit_scale"]))
    sim = vl_similarity(captions[0], torch.from_numpy(oracle[f"{case}_grounding_class"]), scale)
    assert np.abs(sim.numpy() - oracle[f"{case}_similarity"]).max() <= TOL
    assert sim.argmax(0).tolist() == oracle[f"{case}_matched"].tolist()


def test_independent_prompts_batched_equal_single_calls(oracle):
    """Default semantics: 'liver' and 'left kidney' decoded in one padded, masked batch give exactly
    upstream's single-prompt calls (upstream's own two-prompt call differs: tokens are concatenated)."""
    dec = reduced_decoder(oracle)
    feats, mf = upstream_features(oracle)
    ta, tb = (torch.from_numpy(oracle[f"{c}_grounding_tokens"]) for c in "ab")
    t = max(len(ta), len(tb))
    tokens = torch.zeros((t, 2, ta.shape[1]))
    tokens[: len(ta), 0], tokens[: len(tb), 1] = ta, tb
    pad = torch.ones((2, t), dtype=torch.bool)
    pad[0, : len(ta)] = pad[1, : len(tb)] = False
    with torch.no_grad():
        masks, captions = dec([f.expand(2, -1, -1, -1) for f in feats], mf.expand(2, -1, -1, -1), tokens, pad)
    assert np.abs(masks[0].numpy() - oracle["a_pred_masks"]).max() <= TOL
    assert np.abs(captions[1].numpy() - oracle["b_pred_captions"]).max() <= TOL
    # and the concatenated call really is different (what the compat mode reproduces)
    assert np.abs(oracle["ab_pred_masks"] - oracle["a_pred_masks"]).max() > 0.01


# ---- existence: upstream check_mask_stats -----------------------------------------------------------
def test_ks_p_value_equals_scipy_kstest_on_known_beta():
    from scipy import stats

    params = np.array([[2.0, 5.0], [8.0, 3.0], [0.7, 0.9], [30.0, 2.0]])
    xs = np.array([[0.3, 0.9, 0.5, 0.95], [0.01, 0.2, 0.99, 0.5], [0.0, 0.0, 0.0, 0.0]])
    ours = ex.ks_pvalue_beta(xs, params[None, :, 0], params[None, :, 1])
    for r, row in enumerate(xs):
        for c, x in enumerate(row):
            want = stats.kstest([x], stats.beta(*params[c]).cdf).pvalue
            assert ours[r, c] == pytest.approx(want, rel=1e-9, abs=1e-12)
    adj = ex.adjusted_p_value(xs, params)
    want0 = np.prod([stats.kstest([x], stats.beta(*params[c]).cdf).pvalue for c, x in enumerate(xs[0])]) ** 0.25
    assert adj[0] == pytest.approx(want0, rel=1e-9) and adj[2] == 0.0


def test_mask_stats_follow_upstream_rules():
    rgb = np.zeros((2, 4, 4, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 100, 50, 200
    prob = np.zeros((2, 4, 4))
    prob[0, :2, :2] = 255.0  # 4 pixels >= 128
    prob[0, 3, 3] = 128.0  # boundary: included
    prob[0, 2, 2] = 127.9  # excluded
    prob[1] = 127.0  # max <= 127: all-zero statistics
    s = ex.mask_stats(prob, rgb)
    assert s[0].tolist() == pytest.approx([(4 * 255 + 128) / 5 / 256, 100 / 256, 50 / 256, 200 / 256])
    assert s[1].tolist() == [0, 0, 0, 0]


def test_target_dist_errors(tmp_path):
    good = tmp_path / "target_dist.json"
    good.write_text(json.dumps({"CT-Abdomen": {"liver": [[2, 5], [3, 3], [3, 3], [3, 3]]}}))
    dist = ex.load_target_dist(good)
    it, key, params = ex.find_params(dist, ["CT-Chest", "CT-Abdomen"], "Liver")
    assert (it, key, params.shape) == ("CT-Abdomen", "liver", (4, 2))
    assert ex.find_params(dist, ["CT-Abdomen"], "hello world") is None
    bad = tmp_path / "bad.json"
    bad.write_text('{"CT-Abdomen": {"liver": [[2, 5]]}}')
    with pytest.raises(WeightsError, match="target_dist"):
        ex.load_target_dist(bad)
    bad.write_text('{"CT-Abd')
    with pytest.raises(WeightsError, match="Download it again"):
        ex.load_target_dist(bad)


# ---- recognition rules (upstream non_maxima_suppression, combine_masks) ----------------------------
def test_nms_drops_masks_mostly_inside_a_better_one():
    a = np.zeros((10, 10)); a[:, :6] = 0.9
    b = np.zeros((10, 10)); b[:, 2:7] = 0.8  # 40 of 50 pixels inside a
    c = np.zeros((10, 10)); c[:, 5:] = 0.7  # 10 of 50 inside a
    empty = np.zeros((10, 10))
    kept = ex.non_maxima_suppression({"a": a, "b": b, "c": c, "e": empty}, {"a": 0.9, "b": 0.5, "c": 0.3, "e": 1.0})
    assert kept == ["a", "c"]
    # order is by p-value: with b first, a is the one dropped (40 of its 60 pixels lie in b)
    assert ex.non_maxima_suppression({"a": a, "b": b}, {"a": 0.1, "b": 0.9}) == ["b"]


def test_combine_masks_pixelwise_argmax_and_discard():
    a = np.zeros((4, 10)); a[:, :6] = 0.9
    b = np.zeros((4, 10)); b[:, 4:] = 0.6
    small = np.zeros((4, 10)); small[:, 5:7] = 0.55  # loses all its pixels to a (0.9) / b (0.6)
    m = ex.combine_masks({"a": a, "b": b, "small": small})
    assert set(m) == {"a", "b"}
    assert int(m["a"].sum()) == 24 and int(m["b"].sum()) == 16 and not (m["a"] & m["b"]).any()
    # the most confident target is kept even when it loses most of its area
    weak = np.zeros((4, 10)); weak[:, :] = 0.3
    strong = np.zeros((4, 10)); strong[:, 1:] = 0.35
    m2 = ex.combine_masks({"weak": weak, "strong": strong})
    assert set(m2) == {"strong"} and int(m2["strong"].sum()) == 0  # nothing > 0.5


# ---- preprocessing oracle on real scans ------------------------------------------------------------
@pytest.mark.parametrize("case,rel,k,modality,site", [
    ("ct", "totalsegmentator-examples/example_ct_sm.nii.gz", 15, "CT", "abdomen"),  # 101x122: odd difference
    ("mr", "totalsegmentator-examples/example_mr_sm.nii.gz", 10, "MRI", None),  # percentile window
])
def test_preprocessing_equals_upstream_elementwise(case, rel, k, modality, site):
    from conftest import shared_file
    from textseg.io import read_volume
    from textseg.models.biomedparse.v1_preprocess import preprocess_slice
    from textseg.presets import get_preset

    want = np.load(FIX / "biomedparse_v1_preprocess.npz")[case]
    sl = read_volume(shared_file(*rel.split("/"))).canonical().array[k]
    img, pad = preprocess_slice(sl, get_preset(modality, site))
    assert img.dtype == np.uint8 and img.shape == (1024, 1024, 3)
    assert np.array_equal(img[..., 0], want) and np.array_equal(img[..., 1], img[..., 2])
    assert pad.shape == sl.shape
    if case == "ct":  # the quirk: 101x122 -> padded 121x122, not square
        assert pad.padded == (121, 122) and pad.offset == (10, 0)
    else:  # 91x117 -> 117x117
        assert pad.padded == (117, 117) and pad.offset == (13, 0)
