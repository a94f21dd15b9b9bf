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
from textseg.models.biomedparse.v1 import existence as ex  # noqa: E402
from textseg.models.biomedparse.v1.decoder import SEEMGroundingDecoder, vl_similarity  # noqa: E402

FIX = Path(__file__).parents[1] / "fixtures"
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


@pytest.mark.parametrize("low_res", [True, False])
@pytest.mark.parametrize("case", ["a", "ab"])
def test_decoder_matches_upstream_on_upstream_features(oracle, case, low_res):
    """Our grounding decoder on upstream's image features and grounding tokens: pred_masks and
    pred_captions of the last head equal upstream's evaluate_demo (``ab``: concatenated tokens),
    with attention masks computed at the attended scale (default) or as upstream (resized logits)."""
    dec = reduced_decoder(oracle)
    feats, mf = upstream_features(oracle)
    tokens = torch.from_numpy(oracle[f"{case}_grounding_tokens"])[:, None]
    with torch.no_grad():
        emb, captions = dec(feats, mf, tokens, low_res_attention=low_res)
        masks = dec.mask_logits(emb, mf)
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
        emb, captions = dec([f.expand(2, -1, -1, -1) for f in feats], mf.expand(2, -1, -1, -1), tokens, pad)
        masks = dec.mask_logits(emb, mf.expand(2, -1, -1, -1))
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
    a = np.zeros((10, 10))
    a[:, :6] = 0.9
    b = np.zeros((10, 10))
    b[:, 2:7] = 0.8  # 40 of 50 pixels inside a
    c = np.zeros((10, 10))
    c[:, 5:] = 0.7  # 10 of 50 inside a
    empty = np.zeros((10, 10))
    kept = ex.non_maxima_suppression({"a": a, "b": b, "c": c, "e": empty}, {"a": 0.9, "b": 0.5, "c": 0.3, "e": 1.0})
    assert kept == ["a", "c"]
    # order is by p-value: with b first, a is the one dropped (40 of its 60 pixels lie in b)
    assert ex.non_maxima_suppression({"a": a, "b": b}, {"a": 0.1, "b": 0.9}) == ["b"]


def test_combine_masks_pixelwise_argmax_and_discard():
    a = np.zeros((4, 10))
    a[:, :6] = 0.9
    b = np.zeros((4, 10))
    b[:, 4:] = 0.6
    small = np.zeros((4, 10))
    small[:, 5:7] = 0.55  # loses all its pixels to a (0.9) / b (0.6)
    m = ex.combine_masks({"a": a, "b": b, "small": small})
    assert set(m) == {"a", "b"}
    assert int(m["a"].sum()) == 24 and int(m["b"].sum()) == 16 and not (m["a"] & m["b"]).any()
    # the most confident target is kept even when it loses most of its area
    weak = np.zeros((4, 10))
    weak[:, :] = 0.3
    strong = np.zeros((4, 10))
    strong[:, 1:] = 0.35
    m2 = ex.combine_masks({"weak": weak, "strong": strong})
    assert set(m2) == {"strong"} and int(m2["strong"].sum()) == 0  # nothing > 0.5


# ---- preprocessing oracle on real scans ------------------------------------------------------------
@pytest.mark.parametrize("case,rel,k,modality,site", [
    ("ct", "totalsegmentator-examples/example_ct_sm.nii.gz", 15, "CT", "abdomen"),  # 101x122: odd difference
    ("mr", "totalsegmentator-examples/example_mr_sm.nii.gz", 10, "MRI", None),  # percentile window
])
def test_preprocessing_equals_upstream_elementwise(case, rel, k, modality, site):
    from conftest import shared_file

    from textseg.formats.images import read_volume
    from textseg.models.biomedparse.v1.preprocess import preprocess_slice
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


# ---- the whole network through our loader -----------------------------------------------------------
def official_file(o, path: Path, extra: bool = True) -> Path:
    """The fixture's weights saved as the official biomedparse_v1.pt is: a plain model.state_dict()
    (plus the loss buffer and a BiomedBERT tensor, which the loader must ignore)."""
    sd = state_dict(o)
    if extra:
        sd["criterion.empty_weight"] = torch.ones(17)
        sd["sem_seg_head.predictor.lang_encoder.biomed_encoder.embeddings.word_embeddings.weight"] = torch.zeros(4, 3)
    torch.save(sd, path)
    return path


@pytest.fixture(scope="module")
def reduced_model(oracle, tmp_path_factory):
    from textseg.models.biomedparse.v1.model import REDUCED, build_v1, load_v1_weights

    m = build_v1(REDUCED)
    load_v1_weights(m, official_file(oracle, tmp_path_factory.mktemp("w") / "biomedparse_v1.pt"))
    return m


def _upsampled(logits):
    return torch.nn.functional.interpolate(logits[:, None], size=(128, 128), mode="bilinear")[:, 0].sigmoid().numpy()


def test_full_network_matches_upstream(oracle, reduced_model):
    """Loader -> backbone -> pixel decoder -> text encoder -> decoder -> selection -> probability map."""
    from textseg.models.clip_tokenizer import tokenize

    m = reduced_model
    ids, att = tokenize(["liver", "left kidney"])
    assert np.array_equal(ids, oracle["ab_input_ids"]) and np.array_equal(att, oracle["ab_attention_mask"])
    with torch.no_grad():
        enc = m.encode(torch.from_numpy(oracle["image"]).permute(2, 0, 1)[None])
        assert np.abs(enc.mask_features[0].numpy() - oracle["img_mask_features"]).max() <= TOL
        for i in range(3):
            assert np.abs(enc.features[i][0].numpy() - oracle[f"img_scale{i}"]).max() <= TOL
        tok, cls = m.embed_text(torch.from_numpy(ids))
        assert np.abs(cls.numpy() - oracle["ab_grounding_class"]).max() <= TOL
        out = m.decode(enc, tok, torch.from_numpy(att), cls, all_masks=True)  # default: independent prompts
        comp = m.decode(enc, tok, torch.from_numpy(att), cls, concat=True, all_masks=True)  # upstream's one call
    assert np.abs(out["pred_masks"][0].numpy() - oracle["a_pred_masks"]).max() <= TOL
    assert np.abs(out["pred_captions"][1].numpy() - oracle["b_pred_captions"]).max() <= TOL
    assert out["matched"][0].tolist() == [int(oracle["a_matched"][0]), int(oracle["b_matched"][0])]
    prob = _upsampled(out["logits"][0])
    assert np.abs(prob[0] - oracle["a_prob"][0]).max() <= TOL and np.abs(prob[1] - oracle["b_prob"][0]).max() <= TOL
    assert np.abs(comp["pred_masks"][0].numpy() - oracle["ab_pred_masks"]).max() <= TOL
    assert comp["matched"][0].tolist() == oracle["ab_matched"].tolist()
    assert np.abs(_upsampled(comp["logits"][0]) - oracle["ab_prob"]).max() <= TOL


# ---- through the predictor ----------------------------------------------------------------------------
def beta_around(x: float, spread: float = 200.0):
    """Beta parameters with mean x (a sharp distribution: x passes, far values fail)."""
    return [x * spread, (1 - x) * spread]


def upstream_p_value(prob: np.ndarray, rgb: np.ndarray, params) -> float:
    """upstream check_mask_stats, transcribed with scipy (independent of our vectorised version)."""
    from scipy import stats

    mask = prob * 255
    if mask.max() <= 127:
        ms = [0, 0, 0, 0]
    else:
        ms = [mask[mask >= 128].mean() / 256] + [rgb[:, :, c][mask >= 128].mean() / 256 for c in range(3)]
    ps = [stats.ks_1samp([ms[i]], stats.beta(a, b).cdf).pvalue for i, (a, b) in enumerate(params)]
    return float(np.prod(ps) ** 0.25)


@pytest.fixture
def weights_dir(oracle, tmp_path):
    official_file(oracle, tmp_path / "biomedparse_v1.pt")
    img = oracle["image"]
    sel = oracle["a_prob"][0] * 255 >= 128
    stats_liver = [(oracle["a_prob"][0] * 255)[sel].mean() / 256] + [img[..., c][sel].mean() / 256 for c in range(3)]
    dist = {"Pathology": {"liver": [beta_around(float(s)) for s in stats_liver],
                          "left kidney": [[50.0, 2.0]] * 4}}  # far from anything: fails
    (tmp_path / "target_dist.json").write_text(json.dumps(dist))
    return tmp_path


def rgb_volume(img: np.ndarray, n: int = 2):
    from textseg.volume import Volume

    return Volume(np.repeat(img[None], n, axis=0), (0.5, 0.5, 2.0), (10.0, -5.0, 3.0), np.eye(3))


def test_predictor_end_to_end_equals_upstream(oracle, weights_dir):
    """An RGB image whose preprocessing is the identity (128x128 at input size 128): the predictor's
    probabilities equal upstream's final maps; existence = upstream's adjusted p-value per slice;
    a failing prompt is dropped and says so."""
    from textseg.catalog import get_model
    from textseg.models.biomedparse.v1.model import REDUCED
    from textseg.predictor import Predictor

    p = Predictor(get_model("biomedparse-v1"), device="cpu", weights_dir=weights_dir, config=REDUCED, batch_size=2)
    p.set_image(rgb_volume(oracle["image"]), "Pathology")
    liver, kidney = p.predict(["liver", "left kidney"], keep_absent=True)
    for k in range(2):
        assert np.abs(liver.probability[k] - oracle["a_prob"][0]).max() <= TOL
        assert np.abs(kidney.probability[k] - oracle["b_prob"][0]).max() <= TOL
    params = json.loads((weights_dir / "target_dist.json").read_text())["Pathology"]
    want = upstream_p_value(oracle["a_prob"][0], oracle["image"], params["liver"])
    assert want > 0.05 and liver.existence == pytest.approx(want, abs=1e-4) and liver.present
    assert liver.extra["slice_existence"] == pytest.approx([want, want], abs=1e-4)
    assert liver.voxel_count == 2 * int((oracle["a_prob"][0] >= 0.5).sum())
    assert upstream_p_value(oracle["b_prob"][0], oracle["image"], params["left kidney"]) < 0.05
    assert not kidney.present and kidney.voxel_count > 0 and "mask kept as asked" in kidney.message
    dropped = p.predict(["left kidney"])[0]  # default: absent slices dropped, and said so
    assert dropped.voxel_count == 0 and not dropped.probability.any() and dropped.extra["slices_absent"] == 2
    assert "probably not in this image" in dropped.message


def test_predictor_compat_mode_reproduces_upstream_concatenation(oracle, weights_dir):
    from textseg.catalog import get_model
    from textseg.models.biomedparse.v1.model import REDUCED
    from textseg.predictor import Predictor

    p = Predictor(get_model("biomedparse-v1"), device="cpu", weights_dir=weights_dir, config=REDUCED,
                  concat_prompts=True)
    p.set_image(rgb_volume(oracle["image"], 1), "Pathology")
    res = p.predict(["liver", "left kidney"], keep_absent=True)
    for j, r in enumerate(res):
        assert np.abs(r.probability[0] - oracle["ab_prob"][j]).max() <= TOL


def test_non_square_slices_are_unpadded_onto_the_input_grid(oracle, weights_dir):
    """A 100x128 slice is padded 14 rows each side to 128x128 (identity resize here): the result on
    the slice equals the padded image's result, cropped - rows, not columns."""
    from textseg.catalog import get_model
    from textseg.models.biomedparse.v1.model import REDUCED
    from textseg.predictor import Predictor

    img = oracle["image"].copy()
    img[:14] = 0
    img[114:] = 0
    p = Predictor(get_model("biomedparse-v1"), device="cpu", weights_dir=weights_dir, config=REDUCED)
    p.set_image(rgb_volume(img, 1), "Pathology")
    full = p.predict(["liver"], keep_absent=True)[0].probability[0]
    p.set_image(rgb_volume(img[14:114], 1), "Pathology")
    cut = p.predict(["liver"], keep_absent=True)[0].probability[0]
    assert cut.shape == (100, 128)
    assert np.abs(cut - full[14:114]).max() <= 1e-6


def test_recognition_keeps_passing_targets_as_named_disjoint_segments(oracle, weights_dir):
    from textseg.catalog import get_model
    from textseg.models.biomedparse.v1.adapter import recognize
    from textseg.models.biomedparse.v1.model import REDUCED
    from textseg.models.biomedparse.v1.spec import BIOMED_OBJECTS
    from textseg.predictor import Predictor

    dist = json.loads((weights_dir / "target_dist.json").read_text())
    liver = dist["Pathology"]["liver"]
    dist["Pathology"] = {t: ([[50.0, 2.0]] * 4 if i else liver) for i, t in enumerate(BIOMED_OBJECTS["Pathology"])}
    (weights_dir / "target_dist.json").write_text(json.dumps(dist))
    p = Predictor(get_model("biomedparse-v1"), device="cpu", weights_dir=weights_dir, config=REDUCED)
    p.set_image(rgb_volume(oracle["image"], 1), "Pathology")
    out = recognize(p)
    first = BIOMED_OBJECTS["Pathology"][0]
    assert [r.name for r in out] == [first]  # the only target passing the test
    r = out[0]
    assert r.existence >= 0.05 and r.mask.any()
    assert not (r.mask.astype(bool) & (r.probability <= 0.5)).any()


# ---- full-size key contract and loader errors ----------------------------------------------------------
def test_full_size_model_has_exactly_the_official_keys_and_shapes():
    """Our full-size model (meta device: no memory) against every key/shape/dtype of the official
    state dict, as upstream's own model definition produces it; loads strictly."""
    from textseg.models.biomedparse.v1.model import V1Config, build_v1, check_state_dict

    want = json.loads(KEYS.read_text())
    assert len(want) == 932
    model = build_v1(V1Config(), device="meta")
    own = {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")}
           for k, v in model.state_dict().items()}
    assert own == want
    n_params = sum(int(np.prod(v["shape"])) for k, v in want.items() if k != "dilation_kernel")
    assert 341.0e6 < n_params < 341.5e6  # 341.2 M measured on upstream
    sd = {k: torch.empty(v["shape"], dtype=getattr(torch, v["dtype"]), device="meta") for k, v in want.items()}
    check_state_dict(model, sd, "official key list")
    model.load_state_dict(sd, strict=True, assign=True)


def test_loader_errors(oracle, tmp_path):
    from textseg.models.biomedparse.v1.model import REDUCED, build_v1, load_v1_weights

    m = build_v1(REDUCED)
    good = official_file(oracle, tmp_path / "good.pt")
    with pytest.raises(WeightsError, match="not found"):
        load_v1_weights(m, tmp_path / "nothing.pt")
    trunc = tmp_path / "truncated.pt"
    trunc.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(WeightsError, match="truncated"):
        load_v1_weights(m, trunc)
    text = tmp_path / "config.yaml"
    text.write_text("MODEL:\n  NAME: seem_model_demo\n")
    with pytest.raises(WeightsError, match="not a readable BiomedParse v1 checkpoint"):
        load_v1_weights(m, text)
    v2 = tmp_path / "biomedparse_v2.ckpt"
    torch.save({"state_dict": {"model.backbone.x": torch.zeros(1)}}, v2)
    with pytest.raises(WeightsError, match="v2"):
        load_v1_weights(m, v2)
    sd = state_dict(oracle)
    del sd["sem_seg_head.predictor.query_feat.weight"]
    sd["sem_seg_head.predictor.class_embed"] = torch.zeros(32, 64)
    sd["sem_seg_head.extra.weight"] = torch.zeros(1)
    bad = tmp_path / "bad.pt"
    torch.save(sd, bad)
    with pytest.raises(WeightsError) as err:
        load_v1_weights(m, bad)
    msg = str(err.value)
    assert "1 missing: sem_seg_head.predictor.query_feat.weight" in msg
    assert "1 unexpected: sem_seg_head.extra.weight" in msg
    assert "class_embed (32, 64) != (32, 32)" in msg and "download it again" in msg


def test_spec_and_image_types():
    from textseg.catalog import get_model
    from textseg.models.biomedparse.v1.spec import BIOMED_OBJECTS, image_types_for

    spec = get_model("biomedparse-v1")
    assert spec.dims == 2 and spec.recognition and spec.existence_threshold == 0.05
    assert spec.sites == ("abdomen", "lung", "pelvis", "liver", "colon", "pancreas") and len(spec.modalities) == 9
    assert {f.name for f in spec.files} == {"biomedparse_v1.pt",
                                            "target_dist.json"} and all(f.gated for f in spec.files)
    assert sum(map(len, BIOMED_OBJECTS.values())) == 52 and "COVID-19 infection" in spec.vocabulary
    assert image_types_for("CT", "pelvis") == ["CT-Abdomen"] and image_types_for("CT", "lung") == ["CT-Chest"]
    assert image_types_for("MRI", "brain") == ["MRI-FLAIR-Brain", "MRI-T1-Gd-Brain"]
    assert image_types_for("MRI") == ["MRI-Abdomen", "MRI-Cardiac", "MRI-FLAIR-Brain", "MRI-T1-Gd-Brain"]
    assert image_types_for("OCT") == ["OCT"]


# ---- real scans turned through their header (issue 15 item 2) -------------------------------------------
GEOMETRY = FIX / "biomedparse_v1_geometry.npz"


def turned_scan(tmp_path, scan: str, case: str):
    """The real scan turned through its header (Testing/oracles/real_scans.py), written and read the user's way."""
    from conftest import shared_file
    from make_biomedparse_v1_fixture import GEOMETRY_SCANS
    from real_scans import save_nifti, turned_copy

    from textseg.formats.images import read_volume

    name = GEOMETRY_SCANS[scan][0]
    array, affine = turned_copy(shared_file("totalsegmentator-examples", name), case)
    save_nifti(array, affine, tmp_path / f"{scan}_{case}.nii.gz")
    return read_volume(tmp_path / f"{scan}_{case}.nii.gz"), array


def _sha(img) -> str:
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(img[..., 0]).tobytes()).hexdigest()


@pytest.mark.parametrize("scan", ["mr", "ct"])
def test_slices_of_tilted_and_oblique_scans_against_upstreams_nifti_reader(tmp_path, scan):
    """Upstream's read_nifti ignores the header and slices the stored array: rows = the file's first axis by
    default (HW_index (0, 1)), its second axis with HW_index (1, 0). Ours slices the canonical array (radiological:
    rows anterior to posterior, columns right to left), so a tilted or oblique file gives the slices of the
    unrotated one. For the LPS-stored MR that is upstream's HW_index (1, 0) input bit for bit (and the transpose
    of its default); for the RAS-stored CT upstream's input is ours turned by 180 degrees (the documented choice)."""
    from make_biomedparse_v1_fixture import GEOMETRY_SCANS

    from textseg.models.biomedparse.v1.preprocess import preprocess_slice
    from textseg.presets import get_preset

    o = np.load(GEOMETRY)
    _, is_ct, site, slices = GEOMETRY_SCANS[scan]
    stored, _ = turned_scan(tmp_path, scan, "stored")
    canonical = stored.canonical().array
    for case in ("tilted", "oblique"):
        vol, _ = turned_scan(tmp_path, scan, case)
        turn = np.degrees(np.arccos(np.clip(np.abs(np.diag(vol.direction.T @ stored.direction)), 0, 1)))
        assert turn.max() > 9.9
        np.testing.assert_array_equal(vol.canonical().array, canonical)  # the model sees the unrotated slices
    preset = get_preset("CT" if is_ct else "MRI", site)
    for n, k in enumerate(slices):
        sl = canonical[k].astype(np.float64)
        upstream_view = sl if scan == "mr" else sl[::-1, ::-1]  # upstream's rows = the stored second axis
        assert _sha(preprocess_slice(upstream_view, preset)[0]) == str(o[f"{scan}/hw10/sha256"][n])
        assert _sha(preprocess_slice(upstream_view.T, preset)[0]) == str(o[f"{scan}/hw01/sha256"][n])
        if scan == "ct":
            assert _sha(preprocess_slice(sl, preset)[0]) != str(o["ct/hw10/sha256"][n])


@pytest.mark.parametrize("scan", ["mr", "ct"])
def test_predictor_on_tilted_and_oblique_scans_lands_on_the_input_voxels(weights_dir, tmp_path, scan):
    """Reference: the model on slices cut from the stored array with nibabel in radiological order (the MR's
    rows and columns as stored; the RAS-stored CT's reversed), in a volume with an identity direction (nothing to
    reorient), put back on the stored grid by hand. The predictor on the tilted and oblique files gives exactly that
    on the input grid (canonical slices 8..11)."""
    from textseg.catalog import get_model
    from textseg.models.biomedparse.v1.model import REDUCED
    from textseg.predictor import Predictor
    from textseg.volume import Volume

    modality = "MRI" if scan == "mr" else "CT"
    site = None if scan == "mr" else "abdomen"
    first, stop = 8, 12
    _, xyz = turned_scan(tmp_path, scan, "stored")
    view = xyz if scan == "mr" else xyz[::-1, ::-1]
    ref_vol = Volume(np.ascontiguousarray(view.transpose(2, 1, 0)).astype(np.float32), (3.0, 3.0, 3.0))
    p = Predictor(get_model("biomedparse-v1"), device="cpu", weights_dir=weights_dir, config=REDUCED, batch_size=4)
    p.set_image(ref_vol, modality, site, slices=(first, stop))
    ref = p.predict(["liver"], keep_absent=True)[0].probability
    want = ref if scan == "mr" else ref[:, ::-1, ::-1]
    assert want[first:stop].std() > 0 and not want[:first].any() and not want[stop:].any()
    for case in ("tilted", "oblique"):
        vol, _ = turned_scan(tmp_path, scan, case)
        p.set_image(vol, modality, site, slices=(first, stop))
        got = p.predict(["liver"], keep_absent=True)[0].probability
        assert got.shape == vol.shape
        np.testing.assert_array_equal(got, want)
