"""SAT pipeline (everything but the network): catalog, vocabulary, preprocessing and sliding-window
oracles against upstream (Testing/fixtures/sat_*.npz, see fixtures/README.md), back-mapping onto
the input grid, and the adapter end to end through the Predictor with a tiny random SAT."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from make_sat_fixtures import stand_in_logits  # the oracle script's stand-in network

from textseg.catalog import get_model
from textseg.models.sat import vocab
from textseg.volume import LPS_TO_RAS, Volume

FIX = Path(__file__).parents[1] / "fixtures"


# ---- catalog and vocabulary -------------------------------------------------------------------
def test_catalog_entries():
    nano, pro = get_model("sat-nano"), get_model("sat-pro")
    for spec in (nano, pro):
        assert (spec.family, spec.dims, spec.modalities, spec.free_text) == ("sat", 3, ("CT", "MRI", "PET"), True)
        assert spec.adapter == "textseg.models.sat.adapter:SATAdapter" and spec.prompt_kinds == ("text",)
        assert len(spec.vocabulary) == 451 and "liver" in spec.vocabulary
        assert [f.repo for f in spec.files[2:]] == ["FremyCompany/BioLORD-2023-C"] * 5
        assert [f.filename for f in spec.files[2:]] == ["config.json", "vocab.txt", "tokenizer.json",
                                                        "tokenizer_config.json", "special_tokens_map.json"]
    assert [(f.name, f.repo, f.filename) for f in nano.files[:2]] == [
        ("nano.pth", "zzh99/SAT", "Nano/nano.pth"),
        ("nano_text_encoder.pth", "zzh99/SAT", "Nano/nano_text_encoder.pth")]
    assert [(f.name, f.filename) for f in pro.files[:2]] == [("SAT_Pro.pth", "Pro/SAT_Pro.pth"),
                                                             ("text_encoder.pth", "Pro/text_encoder.pth")]


def test_catalog_is_torch_free():
    code = ("import sys; from textseg.catalog import get_model; get_model('sat-pro'); "
            "from textseg.models.sat import vocab; vocab.check_target('livr', 'CT'); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parents[2] / "BiomedParseSlicer")
    assert out.stdout.strip() == "False"


def test_vocabulary_counts():
    rows = vocab.classes()
    assert len(rows) == 498 and len({(c.modality, c.name) for c in rows}) == 498
    assert len(vocab.names()) == 451
    assert (len(vocab.names("CT")), len(vocab.names("MRI")), len(vocab.names("PET"))) == (306, 189, 3)
    assert vocab.names("PET") == ("head and neck tumor", "lymph node", "tumor")
    assert sum(c.abnormal for c in rows) == 24
    assert sorted(vocab.regions()) == ["abdomen", "brain", "head and neck", "lower limb", "pelvis", "spine",
                                       "thorax", "upper limb", "whole body"]
    assert {"liver", "inferior vena cava", "cervical vertebrae 1 (c1)", "covid-19 infection",
            "head of left femur"} <= set(vocab.names("CT"))


def test_vocabulary_checks():
    assert vocab.check_target("Liver", "CT") is None and vocab.check_target(" liver ", "MR") is None
    w = vocab.check_target("livr", "CT")
    assert "306 classes" in w and "for CT" in w and "closest: liver" in w
    w = vocab.check_target("tumor", "CT")
    assert "trained for PET" in w
    assert vocab.check_target("head and neck tumor", "PET") is None
    assert vocab.sat_modality("T2") == "MRI" and vocab.sat_modality("PET") == "PET" and vocab.sat_modality("ct") == "CT"
    with pytest.raises(ValueError, match="CT, MRI and PET"):
        vocab.sat_modality("Ultrasound")


# ---- preprocessing oracle ---------------------------------------------------------------------
def volume_from_nifti(arr_xyz: np.ndarray, affine_ras: np.ndarray) -> Volume:
    lps = LPS_TO_RAS @ affine_ras
    sp = np.linalg.norm(lps[:3, :3], axis=0)
    return Volume(arr_xyz.transpose(2, 1, 0), tuple(sp), tuple(lps[:3, 3]), lps[:3, :3] / sp)


@pytest.mark.parametrize("case", ["ct", "mr"])
def test_preprocess_matches_upstream(case):
    from textseg.models.sat.preprocess import canonical_to_ras, preprocess, resample_axis

    f = np.load(FIX / "sat_preprocess.npz")
    vol = volume_from_nifti(f[f"{case}_input"], f[f"{case}_affine"]).canonical()
    out, geo = preprocess(vol, str(f[f"{case}_modality"]))
    up = f[f"{case}_output"]
    assert out.shape == up.shape and out.dtype == np.float32
    # float32 rounding of upstream's resampling (relative 1e-6 of the HU range) after z-scoring
    np.testing.assert_allclose(out, up, rtol=0, atol=3e-5)
    # before normalisation: resampled + cropped intensities
    ras = canonical_to_ras(vol.array).astype(np.float64)
    for ax in range(3):
        ras = resample_axis(ras, ax, geo.resampled_shape[ax], geo.scale[ax], geo.offset[ax])
    ras = ras.astype(np.float32)[tuple(slice(a, b) for a, b in zip(geo.start, geo.stop))]
    pre = f[f"{case}_prenorm"]
    np.testing.assert_allclose(ras, pre, rtol=0, atol=2e-6 * np.abs(pre).max())
    assert geo.start != (0, 0, 0)  # the foreground crop did something
    # geometry: SAT voxel -> RAS mm equals upstream's affine of the SAT grid
    idx = np.array([[0, 0, 0], [3, 5, 7], [s - 1 for s in out.shape]], float)
    ours = vol.index_to_physical(geo.sat_to_canonical_index(idx), "RAS")
    a = f[f"{case}_output_affine"]
    np.testing.assert_allclose(ours, idx @ a[:3, :3].T + a[:3, 3], atol=1e-4)


def test_spacing_tolerance_keeps_original():
    """An axis within 1e-3 mm of its target spacing keeps its own (float32) spacing, as MONAI's Spacing."""
    from textseg.models.sat.preprocess import upstream_grid

    def spacing(sp):
        return upstream_grid(np.diag(list(sp) + [1.0]), (20, 20, 20)).spacing

    np.testing.assert_allclose(spacing((1.2, 1.0004, 2.2)), (1.0, 1.0004, 3.0), rtol=1e-7)
    np.testing.assert_allclose(spacing((1.0011, 0.5, 2.9995)), (1.0, 1.0, 2.9995), rtol=1e-7)
    assert spacing((1.0004, 1.0004, 2.9995))[0] == float(np.float32(1.0004))  # the float32 header's value


def test_preprocess_rejects_empty_foreground():
    from textseg.errors import InputError
    from textseg.models.sat.preprocess import preprocess

    with pytest.raises(InputError, match="image > 0"):
        preprocess(Volume(np.full((4, 5, 6), -1000.0), (1, 1, 3)), "CT")


# ---- sliding-window oracle --------------------------------------------------------------------
@pytest.mark.parametrize("key", ["overlap3", "padded"])
@pytest.mark.parametrize("batch_size,max_queries", [(2, 2), (1, 256), (3, 1)])
def test_window_matches_upstream(key, batch_size, max_queries):
    import torch

    from textseg.models.sat.window import compute_gaussian, sliding_window, split_3d

    f = np.load(FIX / "sat_window_oracle.npz")
    patch = tuple(int(x) for x in f[f"{key}_patch"])
    img = f["image"]
    assert np.array_equal(np.array(split_3d(img.shape, patch)), f[f"{key}_boxes"])
    g = compute_gaussian(patch)
    assert g.dtype == np.float16 and np.array_equal(g, f[f"{key}_gaussian"])
    calls = []
    prob = sliding_window(img, torch.tensor(f["coeffs"]), lambda p: p, lambda feats, q: stand_in_logits(feats, q),
                          patch=patch, batch_size=batch_size, max_queries=max_queries, progress=calls.append)
    up = f[f"{key}_probability"]
    assert prob.shape == up.shape
    np.testing.assert_allclose(prob.numpy(), up, rtol=0, atol=1e-5)
    assert np.array_equal(prob.numpy() > 0.5, f[f"{key}_masks"] > 0)
    assert calls[-1] == 1.0 and len(calls) == -(-len(f[f"{key}_boxes"]) // batch_size)


def test_gaussian_is_upstreams_3d_filter_at_full_size():
    """The separable importance map equals upstream's 3D ``gaussian_filter`` of a delta, bit for bit, at the
    real patch size (the oracle fixture above covers small odd/even sizes)."""
    from scipy.ndimage import gaussian_filter

    from textseg.models.sat.window import PATCH, compute_gaussian

    tmp = np.zeros(PATCH)
    tmp[tuple(i // 2 for i in PATCH)] = 1
    g = gaussian_filter(tmp, [i / 8 for i in PATCH], 0, mode="constant", cval=0)
    g = (g / np.max(g) * 10).astype(np.float16)
    g[g == 0] = np.min(g[g != 0])
    assert np.array_equal(compute_gaussian(PATCH), g)


def test_split_3d_full_size():
    from textseg.models.sat.window import split_3d

    boxes = split_3d((300, 200, 50))
    assert [b[:2] for b in boxes] == [(0, 288), (12, 300)]
    assert {b[2:4] for b in boxes} == {(0, 200)} and {b[4:] for b in boxes} == {(0, 50)}
    assert len(boxes) == 2 and len(split_3d((433, 289, 97))) == 3 * 2 * 2
    assert split_3d((433, 289, 97))[-1] == (145, 433, 1, 289, 1, 97)


# ---- back-mapping -----------------------------------------------------------------------------
def _grids():
    """The same physical image on three grids: LPS-ordered, RAS-flipped, axes permuted + flipped."""
    base = Volume(np.zeros((21, 37, 43), np.float32), (0.7, 0.9, 2.5), (-10.0, 20.0, -30.0), np.eye(3))
    c = base.index_to_physical(np.stack(np.meshgrid(*[np.arange(n) for n in base.size], indexing="ij"),
                                        -1).reshape(-1, 3))
    yield base
    flip = Volume(np.zeros(base.shape, np.float32), base.spacing,
                  tuple(base.index_to_physical([[base.size[0] - 1, base.size[1] - 1, 0]])[0]), np.diag([-1.0, -1, 1]))
    yield flip
    perm = np.array([[0, -1, 0], [0, 0, 1], [1, 0, 0]], float)  # columns: i -> S, j -> R (-L), k -> P
    sp = (base.spacing[2], base.spacing[0], base.spacing[1])
    size = (base.size[2], base.size[0], base.size[1])
    origin = np.array([c[:, 0].max(), c[:, 1].min(), c[:, 2].min()])
    yield Volume(np.zeros(size[::-1], np.float32), sp, tuple(origin), perm)


def _physical(vol: Volume) -> np.ndarray:
    """LPS mm of every voxel, array [k, j, i, 3]."""
    k, j, i = np.meshgrid(*[np.arange(n) for n in vol.shape], indexing="ij")
    return vol.index_to_physical(np.stack([i, j, k], -1).reshape(-1, 3)).reshape(vol.shape + (3,))


def _ball(p: np.ndarray) -> np.ndarray:
    return np.linalg.norm(p - np.array([2.0, 30.0, -2.0]), axis=-1) <= 9.0


def _oblique():
    """The first grid rotated 30 degrees about S and 12 about R (its float32 header fails upstream's corner
    test: the grid is centred)."""
    base = next(_grids())
    t, u = np.deg2rad(30.0), np.deg2rad(12.0)
    rs = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
    rr = np.array([[1, 0, 0], [0, np.cos(u), -np.sin(u)], [0, np.sin(u), np.cos(u)]])
    r = np.diag([-1.0, -1, 1]) @ rr @ rs @ np.diag([-1.0, -1, 1])  # RAS rotation in LPS
    return Volume(np.zeros(base.shape, np.float32), base.spacing, base.origin, r @ base.direction)


def test_back_mapping_linear_function_is_exact():
    """Linear interpolation reproduces a linear function: a map linear in physical position, made on
    the SAT grid, comes back onto every input voxel inside the resampled extent exactly -- also on an
    oblique grid that upstream centres (voxel 0 off the input's corner)."""
    from textseg.models.sat.preprocess import preprocess

    for case, vol in enumerate(list(_grids()) + [_oblique()]):
        vol.array[:] = 100.0 + np.arange(vol.array.size).reshape(vol.shape) % 7  # all foreground: no crop
        can = vol.canonical()
        _, geo = preprocess(can, "CT")
        assert (max(abs(o) for o in geo.offset) > 0.1) == (case == 3)  # the oblique grid is centred
        xs = np.stack(np.meshgrid(*[np.arange(n) for n in geo.shape], indexing="ij"), -1).reshape(-1, 3)
        lps = can.index_to_physical(geo.sat_to_canonical_index(xs))
        coef = np.array([0.01, -0.02, 0.005])
        sat_map = (lps @ coef + 0.3).reshape(geo.shape).astype(np.float32)
        back = vol.to_input_grid(geo.to_canonical(sat_map))
        expect = _physical(vol) @ coef + 0.3
        # input voxels beyond the last resampled voxel are clamped (border): compare inside only
        inside = np.ones(can.shape, bool)
        for ax, m in zip(range(3), geo.resampled_shape):
            idx = np.arange(can.shape[2 - ax])
            pos = ((idx if ax == 2 else idx[::-1]) - geo.offset[ax]) / geo.scale[ax]  # RAS x, y run against i, j
            shape = [1, 1, 1]
            shape[2 - ax] = -1
            inside &= ((pos >= -1e-9) & (pos <= m - 1 + 1e-9)).reshape(shape)
        inside = vol.to_input_grid(inside)
        assert inside.mean() > 0.85
        np.testing.assert_allclose(back[inside], expect[inside], atol=2e-6)


def test_back_mapping_of_an_object_and_orientations():
    """A ball drawn in SAT space (from physical positions) maps back onto the ball on the input grid,
    whatever the orientation of the input; every grid gives the same SAT image."""
    from textseg.models.sat.preprocess import preprocess

    ref_image = None
    for vol in _grids():
        phys = _physical(vol)
        vol.array[:] = np.where(_ball(phys), 200.0, -800.0)
        can = vol.canonical()
        image, geo = preprocess(can, "CT")
        if ref_image is None:
            ref_image = image
        assert np.array_equal(image, ref_image)
        xs = np.stack(np.meshgrid(*[np.arange(n) for n in geo.shape], indexing="ij"), -1).reshape(-1, 3)
        sat_mask = _ball(can.index_to_physical(geo.sat_to_canonical_index(xs))).reshape(geo.shape)
        back = vol.to_input_grid(geo.to_canonical(sat_mask.astype(np.float32))) >= 0.5
        truth = _ball(phys)
        dist = np.abs(np.linalg.norm(phys - np.array([2.0, 30.0, -2.0]), axis=-1) - 9.0)
        far = dist > 3.0  # beyond one SAT voxel (3 mm) of the surface: must agree exactly
        assert np.array_equal(back[far], truth[far])
        dice = 2 * (back & truth).sum() / (back.sum() + truth.sum())
        assert dice > 0.9


# ---- adapter end to end -----------------------------------------------------------------------
PATCH = (64, 64, 32)
TEXT_CONFIG = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                   max_position_embeddings=64)


def tiny_sat(tmp_path):
    """A tiny random SAT network + text tower (real classes) and a toy BioLORD-like tokenizer."""
    import torch

    from textseg.models.sat.network import SATConfig, SATNetwork
    from textseg.models.sat.text import SATTextEncoder, load_tokenizer

    torch.manual_seed(0)
    cfg = SATConfig(features=(4, 4, 8, 8, 8, 8), n_conv=(1,) * 6, n_conv_decoder=(1,) * 5, patch_size=PATCH,
                    projection_hidden=32, decoder_layers=1, decoder_ffn=64, mask_hidden=16, per_pixel_dim=4)
    net = SATNetwork(cfg).eval()
    words = ["<s>", "<pad>", "</s>", "<unk>", "[PAD]", "[CLS]", "[SEP]", "[UNK]", "<mask>", "liver", "kidney", "left",
             "tumor", "brain", "foo", "##bar"]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    tok = load_tokenizer(tmp_path)  # a BioLORD-like folder
    text = SATTextEncoder(dict(TEXT_CONFIG, vocab_size=len(words)), tok).eval()
    return net, text


@pytest.fixture
def tiny(tmp_path):
    pytest.importorskip("transformers")
    return tiny_sat(tmp_path)


def test_adapter_through_predictor(tiny):
    import torch

    from textseg.models.sat.adapter import SATAdapter
    from textseg.models.sat.window import sliding_window
    from textseg.predictor import Predictor
    from textseg.runcontrol import CancelToken

    net, text = tiny
    spec = get_model("sat-nano")
    # LPS-flipped, anisotropic input: 60 x 30 x 12 voxels of 1.6 x 1.3 x 4 mm
    arr = np.full((12, 30, 60), -900.0, np.float32)
    arr[2:10, 5:25, 6:54] = 60.0
    arr[4:8, 10:20, 12:24] = 400.0
    vol = Volume(arr, (1.6, 1.3, 4.0), (5.0, -3.0, 12.0), np.diag([-1.0, 1.0, -1.0]))
    adapter = SATAdapter(spec, None, network=net, text_tower=text, patch=PATCH)
    pred = Predictor(adapter, device="cpu")
    pred.set_image(vol, modality="CT")
    seen = []
    results = pred.predict(["Liver", "left kidney", "foobar"], progress=lambda f, s: seen.append(f))
    assert len(results) == 3
    # masks come without the probability maps; each map is computed on first read (and survives pickling)
    assert not any(r.probability_ready for r in results)
    copy = pickle.loads(pickle.dumps(results[0]))
    for r in results:
        assert r.mask.any() and not r.mask.all()
        np.testing.assert_array_equal(r.mask, (r.probability >= spec.threshold).astype(np.uint8))
        assert r.probability_ready and r.probability is r.probability
    np.testing.assert_array_equal(copy.probability, results[0].probability)
    for r in results:
        assert r.probability.shape == vol.shape and r.mask.shape == vol.shape
        assert r.probability.dtype == np.float32 and 0 <= r.probability.min() and r.probability.max() <= 1
    assert "vocabulary_warning" not in results[0].extra and "vocabulary_warning" not in results[1].extra
    assert "foobar" in results[2].extra["vocabulary_warning"]
    assert results[0].extra["sat_text"] == "liver"
    # the same numbers as the pipeline run by hand: preprocess -> text -> window -> back-map -> input grid
    state = adapter.prepare(vol.canonical(), pred._preset, pred._context(None, None))
    q = text.embed(["liver", "left kidney", "foobar"], "ct")
    with torch.no_grad():
        probs = sliding_window(state.image, q, net.encode, net.decode, patch=PATCH)
    for n, r in enumerate(results):
        np.testing.assert_allclose(r.probability, vol.to_input_grid(state.geo.to_canonical(probs[n].numpy())),
                                   atol=1e-6)
    assert max(seen) <= 1.0 and len(seen) > 3
    # cancel between patches (2 windows on the SAT grid): after the first one
    assert results[0].extra["sat_grid"] == [75, 25, 10]
    small = pred
    small.adapter.options["feature_cache_bytes"] = 0  # no feature cache: every pass encodes its windows
    encoded = []
    real_encode = net.encode
    net.encode = lambda x: encoded.append(x.shape) or real_encode(x)
    tok = CancelToken()
    assert len(small.predict(["liver"])) == 1 and len(encoded) == 2
    encoded.clear()
    out = small.predict(["liver", "brain"], cancel=tok, progress=lambda f,
                        s: tok.cancel() if s == "SAT: patches" and f > 0.2 else None)
    assert out == [] and len(encoded) == 1
    del net.encode


def test_adapter_modality_code(tiny):
    """MRI images use modality code 1 (mri), CT code 0: different queries for the same text."""
    from textseg.models.sat.adapter import SATAdapter

    net, text = tiny
    adapter = SATAdapter(get_model("sat-nano"), None, network=net, text_tower=text, patch=PATCH)
    adapter.load("cpu")
    ct, mr = adapter.queries(["liver"], "ct"), adapter.queries(["liver"], "mri")
    delta = text.modality_embed.weight[1] - text.modality_embed.weight[0]
    np.testing.assert_allclose((mr - ct)[0].numpy(), delta.detach().numpy(), atol=1e-5)


def test_adapter_loads_catalog_files(tiny, tmp_path):
    """load() through the catalog files: official-layout checkpoints + flat biolord-* files."""
    import json
    import shutil

    import torch

    from textseg.models.sat import BIOLORD_FILES
    from textseg.models.sat.adapter import SATAdapter

    net, text = tiny
    d = tmp_path / "weights"
    d.mkdir()
    torch.save({"model_state_dict": {"module." + k: v for k, v in net.state_dict().items()}}, d / "nano.pth")
    torch.save({"model_state_dict": {"module." + k: v for k, v in text.state_dict().items()}},
               d / "nano_text_encoder.pth")
    bio = tmp_path / "bio"
    text.tokenizer.tokenizer.save_pretrained(str(bio))
    (bio / "config.json").write_text(json.dumps(dict(TEXT_CONFIG, vocab_size=text.text_tower.biolord.config.vocab_size,
                                                     model_type="mpnet")))
    for name in BIOLORD_FILES:
        if (bio / name).is_file():
            shutil.copyfile(bio / name, d / f"biolord-{name}")
        else:  # a file this transformers version does not write (special_tokens_map.json)
            (d / f"biolord-{name}").write_text("{}")
    adapter = SATAdapter(get_model("sat-nano"), d, config=net.cfg, patch=PATCH)
    adapter.load("cpu")
    assert (d / "biolord" / "vocab.txt").is_file()
    texts = ["liver", "left kidney"]
    np.testing.assert_allclose(adapter.queries(texts, "mri").numpy(), text.embed(texts, "mri").numpy(), atol=1e-6)
    x = torch.randn(1, 3, *PATCH)
    q = text.embed(texts, "ct")
    with torch.no_grad():
        np.testing.assert_allclose(adapter.network(x, q).numpy(), net(x, q).numpy(), atol=1e-5)
    (d / "nano_text_encoder.pth").unlink()
    from textseg.errors import WeightsError

    with pytest.raises(WeightsError, match="nano_text_encoder.pth"):
        SATAdapter(get_model("sat-nano"), d, config=net.cfg).load("cpu")


def test_prompt_groups_follow_memory_budget(tiny):
    from textseg.models.base import RunContext
    from textseg.models.sat.adapter import SATAdapter
    from textseg.presets import get_preset

    net, text = tiny
    arr = 50.0 + np.arange(20000, dtype=np.float32).reshape(10, 40, 50) % 9
    vol = Volume(arr, (1.0, 1.0, 3.0))  # SAT grid 50 x 40 x 10 = 20000 voxels
    a = SATAdapter(get_model("sat-nano"), None, network=net, text_tower=text, patch=PATCH, memory_budget=4 * 20000 * 5)
    a.load("cpu")
    state = a.prepare(vol, get_preset("CT"), RunContext("cpu"))
    assert a.prompts_per_call(state) == 5


def test_feature_cache_encodes_each_window_once_across_calls(tiny):
    """With feature_cache_bytes, later prompts on the same image only decode (no window encoded twice), with
    the same results as without the cache; a budget too small for a window caches nothing; a new image
    starts empty."""
    from textseg.models.sat.adapter import SATAdapter
    from textseg.predictor import Predictor

    net, text = tiny
    arr = np.full((12, 30, 60), -900.0, np.float32)
    arr[2:10, 5:25, 6:54] = 60.0
    arr[4:8, 10:20, 12:24] = 400.0
    vol = Volume(arr, (1.6, 1.3, 4.0), (5.0, -3.0, 12.0), np.diag([-1.0, 1.0, -1.0]))
    plain = Predictor(SATAdapter(get_model("sat-nano"), None, network=net, text_tower=text, patch=PATCH), device="cpu")
    plain.set_image(vol, modality="CT")
    want = {r.prompt.text: r for r in plain.predict(["liver", "spleen", "aorta"])}

    calls = []
    real_encode = net.encode
    net.encode = lambda x: calls.append(x.shape[0]) or real_encode(x)
    try:
        for budget, first_calls in ((1 << 34, 2), (1000, 2)):
            pred = Predictor(SATAdapter(get_model("sat-nano"), None, network=net, text_tower=text, patch=PATCH,
                                        feature_cache_bytes=budget), device="cpu")
            pred.set_image(vol, modality="CT")
            calls.clear()
            got = pred.predict(["liver"]) + pred.predict(["spleen", "aorta"])
            cached = budget > 1000
            assert len(calls) == (first_calls if cached else 2 * first_calls)  # 2 windows on this SAT grid
            assert (pred._encoded.cache_bytes > 0) == cached
            for r in got:  # prompts grouped differently: float rounding of the batched decoder only
                np.testing.assert_allclose(r.probability, want[r.prompt.text].probability, atol=1e-6)
            if cached:  # out of memory: the predictor drops the cache first; the next call encodes again
                pred._free_gpu()
                assert pred._encoded.cache_bytes == 0 and not pred._encoded.features
                calls.clear()
                pred.predict(["liver"])
                assert len(calls) == 2 and pred._encoded.cache_bytes > 0
        pred.set_image(Volume(arr[:, :, ::-1].copy(), (1.6, 1.3, 4.0)), modality="CT")
        calls.clear()
        pred.predict(["liver"])
        assert len(calls) == 2 and pred._encoded.cache_bytes == 0  # budget 1000: nothing kept
    finally:
        del net.encode


def test_feature_cache_budget_is_an_lru_of_windows(tiny):
    """The window features live in the one FeatureCache: a budget of one window keeps exactly the most recently
    encoded window (the windows are visited in a cycle, so the next pass encodes both again); the default
    budget (2 GiB) keeps both."""
    from textseg.models.feature_cache import DEFAULT_BYTES
    from textseg.models.sat.adapter import SATAdapter
    from textseg.predictor import Predictor

    net, text = tiny
    arr = np.full((12, 30, 60), -900.0, np.float32)
    arr[2:10, 5:25, 6:54] = 60.0
    arr[4:8, 10:20, 12:24] = 400.0
    vol = Volume(arr, (1.6, 1.3, 4.0), (5.0, -3.0, 12.0), np.diag([-1.0, 1.0, -1.0]))
    calls = []
    real_encode = net.encode
    net.encode = lambda x: calls.append(x.shape[0]) or real_encode(x)
    try:
        pred = Predictor(SATAdapter(get_model("sat-nano"), None, network=net, text_tower=text, patch=PATCH),
                         device="cpu")
        pred.set_image(vol, modality="CT")
        pred.predict(["liver"])
        cache = pred._encoded.features
        assert cache.budget == DEFAULT_BYTES and len(cache) == 2 and len(calls) == 2
        one = cache.nbytes // 2
        assert one > 0 and cache.nbytes == 2 * one  # both windows' features are the same size
        pred.adapter.options["feature_cache_bytes"] = one
        calls.clear()
        pred.predict(["liver"])
        assert len(calls) == 2 and len(cache) == 1 and cache.nbytes == one
        assert cache.keys() == [("cpu", 1, 1)]  # (device, batch size, window): the last window encoded
        calls.clear()
        pred.predict(["spleen"])
        assert len(calls) == 2 and cache.nbytes == one
    finally:
        del net.encode
