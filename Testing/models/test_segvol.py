"""SegVol: equality with the official code (oracle fixtures), checkpoint contract, prompt geometry.

Fixtures: Testing/fixtures/segvol_oracle_*.npz (made by Testing/oracles/make_segvol_fixture.py from
the official code, see Testing/fixtures/README.md) and segvol_keys.json (every key and shape of
the released checkpoint).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("monai")

import make_segvol_fixture as recipe  # noqa: E402  (the oracle script's weight and input recipes)
from conftest import shared_file  # noqa: E402
from make_segvol_fixture import recipe_tensor  # noqa: E402

from textseg.catalog import get_model  # noqa: E402
from textseg.errors import WeightsError  # noqa: E402
from textseg.models.base import RunContext  # noqa: E402
from textseg.models.segvol import adapter as sv  # noqa: E402
from textseg.models.segvol.network import CLIP_FLAT, CLIP_OFFICIAL, SegVolConfig, SegVolNet, load_checkpoint  # noqa: E402
from textseg.prompts import Prompt  # noqa: E402
from textseg.volume import Volume  # noqa: E402

FIX = Path(__file__).parents[1] / "fixtures"
TOL = 1e-4


def ours(key, own):
    return key if key in own or not key.startswith(CLIP_OFFICIAL) else CLIP_FLAT + key[len(CLIP_OFFICIAL):]


def reduced_config(fx) -> SegVolConfig:
    c = json.loads(str(fx["config"]))
    c["img_size"], c["patch_size"] = tuple(c["img_size"]), tuple(c["patch_size"])
    return SegVolConfig(**c)


def official_state_dict(fx, net):
    """The oracle's weights under the official key names, rebuilt from the recipe and checked."""
    own = net.state_dict()
    seed = int(fx["seed"])
    sd = {k: torch.from_numpy(recipe_tensor(k, own[ours(k, own)].shape, i, seed))
          for i, k in enumerate(fx["keys"].tolist())}
    if "overrides" in fx:
        sd = recipe.apply_overrides(sd, json.loads(str(fx["overrides"])))
    h = hashlib.sha256()
    for k in sorted(sd):
        h.update(k.encode())
        h.update(sd[k].numpy().tobytes())
    assert h.hexdigest() == str(fx["weights_sha256"]), "weight recipe differs from the oracle's"
    return sd


@pytest.fixture(scope="module")
def oracle_adapter(tmp_path_factory):
    return adapter_for(np.load(FIX / "segvol_oracle_zoom.npz"), tmp_path_factory)


def adapter_for(fx, tmp_path_factory):
    """An adapter loaded through our real loader from a checkpoint saved in the GitHub layout."""
    cfg = reduced_config(fx)
    sd = official_state_dict(fx, SegVolNet(cfg))
    d = tmp_path_factory.mktemp("segvol-weights")
    ckpt = {"module." + k: v for k, v in sd.items()}
    ckpt["module." + CLIP_OFFICIAL + "embeddings.position_ids"] = torch.arange(77)[None]  # transformers 4.18 buffer
    torch.save({"model": ckpt, "epoch": 1}, d / "pytorch_model.bin")
    ad = sv.SegVolAdapter(get_model("segvol"), weights_dir=d, config=cfg)
    ad.load("cpu")
    return ad


def fixture_volume(fx) -> Volume:
    """The oracle's NIfTI (RAS affine, array [x, y, z]) as a Volume (LPS, array [k, j, i])."""
    aff = fx["affine_ras"]
    spacing = np.linalg.norm(aff[:3, :3], axis=0)
    direction = np.diag([-1.0, -1.0, 1.0]) @ aff[:3, :3] / spacing
    origin = aff[:3, 3] * np.array([-1.0, -1.0, 1.0])
    return Volume(fx["ct_xyz"].transpose(2, 1, 0), tuple(spacing), tuple(origin), direction)


@pytest.mark.parametrize("name, n_windows", [("segvol_oracle_zoom.npz", 4), ("segvol_oracle_box_text.npz", 4),
                                             ("segvol_oracle_box_text_thin.npz", 1)])
def test_matches_official_zoom_out_zoom_in(oracle_adapter, name, n_windows):
    fx = np.load(FIX / name)
    ad = oracle_adapter
    ctx = RunContext(device=torch.device("cpu"))
    state = ad.prepare(fixture_volume(fx).canonical(), None, ctx)
    np.testing.assert_allclose(state.crop[0, 0].numpy(), fx["preprocessed"], atol=1e-6, rtol=0)
    np.testing.assert_array_equal(state.zoom_out[0, 0].numpy(), fx["zoom_out_image"])
    ad.encode(state, ctx)
    grid = sv.PromptGrid()
    if "zoom_out_box" in fx:
        grid.box_zo = torch.from_numpy(fx["zoom_out_box"]).float()
        grid.box_map = sv.box_map(grid.box_zo, ad.window, state.geo.crop_shape)
    r = ad.run(state, ad.text_embedding(str(fx["prompt"])), grid, ctx)
    assert np.abs(r["zoom_out_logits"].numpy() - fx["zoom_out_logits"]).max() <= TOL
    assert list(r["roi"]) == fx["roi"].tolist()
    assert len(r["window_boxes"]) == len(fx["window_boxes"]) == n_windows
    for got, want in zip(r["window_boxes"], fx["window_boxes"]):
        if want[0] == -2:  # text-only windows get no box
            assert got is None
        else:
            np.testing.assert_array_equal(got, want)
    assert np.abs(r["logits"].numpy() - fx["logits"]).max() <= TOL
    # the whole adapter path (geometry back to the input grid) gives the same probabilities
    if "zoom_out_box" not in fx:
        dec = ad.decode(state, [Prompt(str(fx["prompt"]))], ctx)[0]
        want = state.geo.to_canonical(torch.sigmoid(torch.from_numpy(fx["logits"])).numpy())
        assert np.abs(dec.probability - want).max() <= 1e-5
        assert dec.extra["roi"] == fx["roi"].tolist()


def test_window_embeddings_are_cached_across_prompts(oracle_adapter):
    fx = np.load(FIX / "segvol_oracle_zoom.npz")
    ad, ctx = oracle_adapter, RunContext(device=torch.device("cpu"))
    state = ad.encode(ad.prepare(fixture_volume(fx).canonical(), None, ctx), ctx)
    calls = []
    orig = ad.net.encode_image
    ad.net.encode_image = lambda x: (calls.append(tuple(x.shape)), orig(x))[1]
    try:
        a = ad.decode(state, [Prompt("liver")], ctx)[0]
        n_first = len(calls)
        b = ad.decode(state, [Prompt("liver")], ctx)[0]
    finally:
        ad.net.encode_image = orig
    assert n_first == 4 and len(calls) == 4  # second prompt: every window from the cache
    np.testing.assert_array_equal(a.probability, b.probability)
    # the cache is a byte budget (least recently used first out): room for 2 of the 4 windows re-encodes all 4
    # on the next prompt (the windows are visited in a cycle), same probabilities
    one = state.cache_bytes // 4
    assert len(state.window_cache) == 4 and one == 4 * int(np.prod(state.zo_embedding.shape))
    ad.options["feature_cache_bytes"] = 2 * one
    try:
        ad.free_memory(state)
        assert state.cache_bytes == 0 and not state.window_cache
        ad.net.encode_image = lambda x: (calls.append(tuple(x.shape)), orig(x))[1]
        calls.clear()
        ad.decode(state, [Prompt("liver")], ctx)
        assert len(calls) == 4 and len(state.window_cache) == 2 and state.cache_bytes == 2 * one
        c = ad.decode(state, [Prompt("liver")], ctx)[0]
        assert len(calls) == 8
    finally:
        ad.net.encode_image = orig
        del ad.options["feature_cache_bytes"]
    np.testing.assert_array_equal(a.probability, c.probability)


# ------------------------------------------------------------------------------------------------
# full-size key contract and loader errors
def test_full_size_model_loads_the_official_key_set_strictly():
    from textseg.models.segvol.network import check_state_dict, remap_state_dict

    contract = json.loads((FIX / "segvol_keys.json").read_text())
    assert len(contract["keys"]) == 474 and contract["n_parameters"] == 180891216
    with torch.device("meta"):
        net = SegVolNet()
    # as stored in BAAI/SegVol's pytorch_model.bin: 'model.' prefix plus the transformers 4.18 buffer
    sd = {"model." + k: torch.empty(s, device="meta") for k, s in contract["keys"].items()}
    sd["model." + CLIP_OFFICIAL + "embeddings.position_ids"] = torch.empty((1, 77), device="meta")
    sd = remap_state_dict(sd, net.state_dict().keys())
    check_state_dict(net, sd, "contract")
    net.load_state_dict(sd, strict=True, assign=True)
    assert sum(v.numel() for v in net.state_dict().values()) == contract["n_parameters"]  # incl. the PE buffer


def test_loader_errors(tmp_path):
    net = SegVolNet(reduced_config(np.load(FIX / "segvol_oracle_zoom.npz")))
    with pytest.raises(WeightsError, match="textseg models download segvol"):
        load_checkpoint(net, tmp_path / "absent.bin")
    good = tmp_path / "good.bin"
    torch.save({"model." + k: v for k, v in net.state_dict().items()}, good)
    load_checkpoint(net, good)  # HF layout loads
    cut = tmp_path / "pytorch_model.bin"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(WeightsError, match="truncated or corrupt"):
        load_checkpoint(net, cut)
    other = tmp_path / "other.bin"
    sd = {k: v for k, v in net.state_dict().items() if not k.startswith("mask_decoder.")}
    sd["image_encoder.norm.weight"] = torch.ones(5)
    sd["head.weight"] = torch.ones(2)
    torch.save(sd, other)
    with pytest.raises(WeightsError,
                       match=r"missing keys: mask_decoder.*1 unexpected keys: head.weight.*1 keys with another shape: "
                             r"image_encoder.norm.weight"):
        load_checkpoint(net, other)
    junk = tmp_path / "junk.bin"
    torch.save({"epoch": 3, "note": "not weights"}, junk)
    with pytest.raises(WeightsError, match="not a SegVol checkpoint"):
        load_checkpoint(net, junk)


# ------------------------------------------------------------------------------------------------
# physical prompts on flipped / permuted real CT
def reoriented(vol: Volume, perm, flips) -> Volume:
    """The same image stored another way: new index axis d = old axis perm[d], reversed if flips[d]."""
    arr = np.transpose(vol.array, [2 - perm[d] for d in (2, 1, 0)])
    arr = np.flip(arr, [2 - d for d in range(3) if flips[d]]) if any(flips) else arr
    m = np.zeros((4, 4))
    m[3, 3] = 1
    size = vol.size
    for d in range(3):
        m[perm[d], d] = -1.0 if flips[d] else 1.0
        m[perm[d], 3] = size[perm[d]] - 1 if flips[d] else 0.0
    a = vol.ijk_to_lps @ m
    spacing = np.linalg.norm(a[:3, :3], axis=0)
    return Volume(np.ascontiguousarray(arr), tuple(spacing), tuple(a[:3, 3]), a[:3, :3] / spacing)


@pytest.fixture(scope="module")
def real_ct():
    import SimpleITK as sitk

    img = sitk.ReadImage(str(shared_file("totalsegmentator-examples", "example_ct_sm.nii.gz")))
    return Volume(sitk.GetArrayFromImage(img).astype(np.float32), img.GetSpacing(), img.GetOrigin(),
                  np.array(img.GetDirection()).reshape(3, 3))


def test_box_and_points_map_to_the_same_place_on_reoriented_ct(oracle_adapter, real_ct):
    ad, ctx = oracle_adapter, RunContext(device=torch.device("cpu"))
    # a box of whole voxels: index corners (30, 20, 5)..(70, 60, 20) of the stored image, in LPS mm
    lo, hi = np.array([30, 20, 5]), np.array([70, 60, 20])
    box = real_ct.index_to_physical(np.stack([lo, hi]))
    pts = real_ct.index_to_physical([[50, 40, 12], [90, 30, 25]])
    prompt = Prompt("", tuple(map(tuple, box)), tuple(map(tuple, pts)), (1, 0))
    inside = np.zeros(real_ct.shape, bool)
    inside[lo[2] : hi[2] + 1, lo[1] : hi[1] + 1, lo[0] : hi[0] + 1] = True
    grids = []
    for perm, flips in [((0, 1, 2), (False, False, False)), ((0, 1, 2), (True, False, True)),
                        ((1, 0, 2), (False, True, False)), ((2, 0, 1), (True, True, True))]:
        vol = reoriented(real_ct, perm, flips)
        state = ad.prepare(vol.canonical(), None, ctx)
        g = ad.map_prompt(state, prompt)
        grids.append(g)
        # the crop-space box, mapped back to the stored grid, holds exactly the voxels in the box
        crop = state.geo.crop_shape
        c = state.geo.canonical_to_crop(vol.canonical().physical_to_index(box)[:, ::-1])
        a, b = np.floor(c.min(0) + 0.5).astype(int), np.floor(c.max(0) + 0.5).astype(int)
        cube = np.zeros(crop, np.float32)
        cube[a[0] : b[0] + 1, a[1] : b[1] + 1, a[2] : b[2] + 1] = 1
        back = vol.to_input_grid(state.geo.to_canonical(cube))
        same = reoriented(Volume(back.astype(np.float32), vol.spacing, vol.origin, vol.direction),
                          *inverse(perm, flips))
        assert same.array.shape == real_ct.shape and (same.array > 0).sum() == inside.sum() == 41 * 41 * 16
        np.testing.assert_array_equal(same.array > 0, inside)
    for g in grids[1:]:
        np.testing.assert_array_equal(g.box_zo.numpy(), grids[0].box_zo.numpy())
        np.testing.assert_array_equal(g.points_zo[0].numpy(), grids[0].points_zo[0].numpy())
        np.testing.assert_array_equal(g.points_zo[1].numpy(), [1.0, 0.0])
        np.testing.assert_array_equal(g.point_map.numpy(), grids[0].point_map.numpy())


def inverse(perm, flips):
    inv = [0, 0, 0]
    for d in range(3):
        inv[perm[d]] = d
    return tuple(inv), tuple(flips[inv[d]] for d in range(3))


def test_predictions_follow_the_image_on_reoriented_ct(oracle_adapter, real_ct):
    """Box + text through the Predictor: the answer on a flipped/permuted copy is the same physically."""
    from textseg.predictor import Predictor

    box = real_ct.index_to_physical([[30, 20, 5], [70, 60, 20]])
    prompt = Prompt("liver", tuple(map(tuple, box)))
    outs = []
    for perm, flips in [((0, 1, 2), (False, False, False)), ((2, 0, 1), (True, False, True))]:
        vol = reoriented(real_ct, perm, flips)
        pred = Predictor(oracle_adapter, device="cpu", seed=0)
        pred.set_image(vol, "CT")
        r = pred.predict([prompt], threshold=0.5)[0]
        assert r.probability.shape == vol.shape
        back = reoriented(Volume(r.probability, vol.spacing, vol.origin, vol.direction), *inverse(perm, flips))
        outs.append(back.array)
        assert r.extra.get("roi") is None or len(r.extra["roi"]) == 6
    assert np.abs(outs[0] - outs[1]).max() <= 1e-5
    assert (outs[0] > 0.5).sum() > 0


def test_point_prompts_are_seeded_and_runs_can_be_cancelled(oracle_adapter):
    from textseg.errors import Cancelled
    from textseg.runcontrol import CancelToken

    fx = np.load(FIX / "segvol_oracle_zoom.npz")
    vol = fixture_volume(fx)
    ad = oracle_adapter
    state = ad.encode(ad.prepare(vol.canonical(), None, RunContext(device=torch.device("cpu"))),
                      RunContext(device=torch.device("cpu")))
    pts = vol.index_to_physical([[52, 34, 11], [20, 20, 5]])  # inside the 'organ', and outside
    prompt = Prompt("liver", points=tuple(map(tuple, pts)), point_labels=(1, 0))
    runs = [ad.decode(state, [prompt], RunContext(device=torch.device("cpu"), seed=s))[0] for s in (7, 7)]
    np.testing.assert_array_equal(runs[0].probability, runs[1].probability)
    assert runs[0].extra["windows"] == 4 and runs[0].probability.shape == vol.shape
    g = ad.map_prompt(state, prompt)
    assert g.points_zo[1].tolist() == [1.0, 0.0] and int(g.point_map.sum()) > 0
    token, seen = CancelToken(), []

    def progress(f, stage):
        seen.append(f)
        if len(seen) == 2:
            token.cancel()

    with pytest.raises(Cancelled):
        ad.decode(state, [Prompt("liver")], RunContext(device=torch.device("cpu"), progress=progress, cancel=token))
    assert len(seen) == 2


# ------------------------------------------------------------------------------------------------
# real CT, tilted and oblique through its header (issue 15 item 2) and a zoom-in region strictly inside
# a larger volume (item 3): Testing/oracles/make_segvol_fixture.py --shared, see Testing/fixtures/README.md
def real_case_volume(tmp_path, case: str):
    """The fixture's NIfTI, written from the recipe as the oracle script wrote it and read the user's way."""
    from textseg.formats.images import read_volume

    shared = shared_file(recipe.REAL_DIR).parent
    ct, label, affine = recipe.subregion_case(shared) if case == "subregion" else recipe.real_ct_case(shared, case)
    path = tmp_path / f"{case}.nii.gz"
    recipe.save_nifti(ct, affine, path)
    return read_volume(path), label.transpose(2, 1, 0), path


def check_crop(state, fx):
    """Our crop equals upstream's (stored as every 2nd voxel + moments) and the zoom-out image bit for bit."""
    crop = state.crop[0, 0].numpy()
    assert crop.shape == tuple(fx["preprocessed_shape"])
    np.testing.assert_allclose(crop[::2, ::2, ::2], fx["preprocessed_sub"], atol=1e-6, rtol=0)
    c64 = crop.astype(np.float64)
    np.testing.assert_allclose([c64.sum(), (c64 ** 2).sum(), c64.min(), c64.max()], fx["preprocessed_moments"],
                               rtol=1e-6)
    zo = np.ascontiguousarray(state.zoom_out[0, 0].numpy(), dtype=np.float32)
    assert hashlib.sha256(zo.tobytes()).hexdigest() == str(fx["zoom_out_image_sha256"])


def check_run(r, fx):
    assert np.abs(r["zoom_out_logits"].numpy() - fx["zoom_out_logits"]).max() <= TOL
    assert list(r["roi"]) == fx["roi"].tolist()
    assert len(r["window_boxes"]) == len(fx["window_boxes"])
    for got, want in zip(r["window_boxes"], fx["window_boxes"]):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("case", ["tilted", "oblique"])
def test_matches_official_on_tilted_and_oblique_real_ct(oracle_adapter, tmp_path, case):
    """Upstream's orientation step is a no-op, so it segments the stored array whatever the header says; ours puts
    the image in closest-RAS order by flips/permutations only, which for a rotation under 45 degrees is the stored
    order of this RAS-stored file: the same model input, the same logits, and the result lands on exactly the
    input voxels upstream's crop came from (placement computed with MONAI's own pad/crop, stored in the fixture)."""
    fx = np.load(FIX / "segvol_oracle_oblique_ct.npz")
    assert str(fx["weights_sha256"]) == str(np.load(FIX / "segvol_oracle_zoom.npz")["weights_sha256"])
    vol, _, _ = real_case_volume(tmp_path, case)
    stored, _, _ = real_case_volume(tmp_path, "stored")
    tilt = np.degrees(np.arccos(np.clip(np.abs(np.diag(vol.direction.T @ stored.direction)), 0, 1)))
    assert tilt.max() > 9.9 and vol.orientation == stored.orientation  # really rotated; same closest axes
    ad, ctx = oracle_adapter, RunContext(device=torch.device("cpu"))
    state = ad.prepare(vol.canonical(), None, ctx)
    check_crop(state, fx)
    ad.encode(state, ctx)
    grid = sv.PromptGrid()
    grid.box_zo = torch.from_numpy(fx["zoom_out_box"]).float()
    grid.box_map = sv.box_map(grid.box_zo, ad.window, state.geo.crop_shape)
    r = ad.run(state, ad.text_embedding(str(fx["prompt"])), grid, ctx)
    check_run(r, fx)
    assert len(r["window_boxes"]) == 6
    assert np.abs(r["logits"].numpy() - fx["logits"]).max() <= TOL
    # onto the input grid: upstream's (z, y, x) crop sits at [crop_start - pad_before, crop_stop - pad_before) of
    # the stored array, which is our [k, j, i] input grid (RAS-stored file); zero elsewhere
    got = vol.to_input_grid(state.geo.to_canonical(torch.sigmoid(r["logits"]).numpy()))
    want = np.zeros(vol.shape, np.float32)
    lo, hi = fx["crop_start"] - fx["pad_before"], fx["crop_stop"] - fx["pad_before"]
    want[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = torch.sigmoid(torch.from_numpy(fx["logits"])).numpy()
    assert np.abs(got - want).max() <= 3e-5  # sigmoid of logits within 1e-4


def test_box_prompt_on_an_oblique_ct_covers_the_physical_box(oracle_adapter, tmp_path):
    """A box is an axis-aligned LPS box (a Slicer ROI's bounding box); on an oblique image it must become the
    model-grid box around all 8 of its corners, not the box spanned by two of them (which cut the liver)."""
    import SimpleITK as sitk

    fx = np.load(FIX / "segvol_oracle_oblique_ct.npz")
    vol, liver, path = real_case_volume(tmp_path, "oblique")
    ad, ctx = oracle_adapter, RunContext(device=torch.device("cpu"))
    state = ad.prepare(vol.canonical(), None, ctx)
    kji = np.argwhere(liver > 0)
    pts = vol.index_to_physical(kji[:, ::-1])
    box = np.stack([pts.min(0), pts.max(0)])  # the liver's LPS bounding box
    lo, hi = ad.crop_box(state, box)
    # where the liver voxels lie on the crop grid: stored (k, j, i) + pad - crop start (fixture, MONAI's)
    crop_idx = kji + fx["pad_before"] - fx["crop_start"]
    assert (crop_idx >= lo).all() and (crop_idx <= hi).all(), "liver voxels outside the box given to the model"
    # and the box is the one around the 8 corners, computed independently with ITK on the file
    img = sitk.ReadImage(str(path))
    corners = [(box[a][0], box[b][1], box[c][2]) for a in (0, 1) for b in (0, 1) for c in (0, 1)]
    ijk = np.array([img.TransformPhysicalPointToContinuousIndex(c) for c in corners])
    zyx = ijk[:, ::-1] + fx["pad_before"] - fx["crop_start"]
    shape = np.array(state.geo.crop_shape) - 1
    np.testing.assert_array_equal(lo, np.clip(np.floor(zyx.min(0) + 0.5), 0, shape))
    np.testing.assert_array_equal(hi, np.clip(np.floor(zyx.max(0) + 0.5), 0, shape))


@pytest.fixture(scope="module")
def subregion_adapter(tmp_path_factory):
    return adapter_for(np.load(FIX / "segvol_oracle_subregion.npz"), tmp_path_factory)


def test_matches_official_where_the_zoom_in_region_is_a_strict_sub_region(subregion_adapter, tmp_path):
    """Weights from the recipe + SUBREGION_OVERRIDES make the zoom-out mask a compact block: the ROI lies strictly
    inside the 64x97x122 crop on every axis and is zoomed in with 3 windows; everything equals upstream."""
    fx = np.load(FIX / "segvol_oracle_subregion.npz")
    vol, _, _ = real_case_volume(tmp_path, "subregion")
    ad, ctx = subregion_adapter, RunContext(device=torch.device("cpu"))
    state = ad.prepare(vol.canonical(), None, ctx)
    check_crop(state, fx)
    crop = state.geo.crop_shape
    assert crop == tuple(fx["crop_shape"]) == (64, 97, 122)
    ad.encode(state, ctx)
    grid = sv.PromptGrid()
    grid.box_zo = torch.from_numpy(fx["zoom_out_box"]).float()
    grid.box_map = sv.box_map(grid.box_zo, ad.window, crop)
    r = ad.run(state, ad.text_embedding(str(fx["prompt"])), grid, ctx)
    check_run(r, fx)
    roi = r["roi"]
    assert all(0 < roi[d] and roi[d + 3] < crop[d] - 1 for d in range(3)) and len(r["window_boxes"]) == 3
    sl = tuple(slice(roi[d], roi[d + 3] + 1) for d in range(3))
    logits = r["logits"].numpy()
    assert np.abs(logits[sl] - fx["roi_logits"]).max() <= TOL
    outside = np.ones(crop, bool)
    outside[sl] = False
    zo_up = torch.nn.functional.interpolate(torch.from_numpy(fx["zoom_out_logits"])[None, None], size=crop,
                                            mode="nearest")[0, 0].numpy()
    assert np.abs(logits[outside] - zo_up[outside]).max() <= TOL  # upstream keeps the zoom-out logits there
    mask = logits > 0
    assert 0 < mask.sum() and not mask[outside].any()  # the final mask lies inside the ROI
