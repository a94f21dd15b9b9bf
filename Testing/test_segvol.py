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

from conftest import shared_file  # noqa: E402
from textseg.catalog import get_model  # noqa: E402
from textseg.errors import WeightsError  # noqa: E402
from textseg.models.base import RunContext  # noqa: E402
from textseg.models.segvol import adapter as sv  # noqa: E402
from textseg.models.segvol.network import CLIP_FLAT, CLIP_OFFICIAL, SegVolConfig, SegVolNet, load_checkpoint  # noqa: E402
from textseg.prompts import Prompt  # noqa: E402
from textseg.volume import Volume  # noqa: E402

FIX = Path(__file__).parent / "fixtures"
TOL = 1e-4
LN_LIKE = ("mask_decoder.output_upscaling.1.weight",)


def recipe_tensor(key, shape, index, seed):
    """Same recipe as Testing/oracles/make_segvol_fixture.py."""
    rng = np.random.default_rng([seed, index])
    x = rng.standard_normal(tuple(shape)).astype(np.float32)
    if key.endswith(".bias"):
        return x * np.float32(0.02)
    if (len(shape) == 1 and key.endswith(".weight")) or key in LN_LIKE:
        return np.float32(1.0) + np.float32(0.1) * x
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else int(shape[0])
    return x / np.float32(np.sqrt(max(fan_in, 1)))


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
    sd = {k: torch.from_numpy(recipe_tensor(k, own[ours(k, own)].shape, i, seed)) for i, k in enumerate(fx["keys"].tolist())}
    h = hashlib.sha256()
    for k in sorted(sd):
        h.update(k.encode())
        h.update(sd[k].numpy().tobytes())
    assert h.hexdigest() == str(fx["weights_sha256"]), "weight recipe differs from the oracle's"
    return sd


@pytest.fixture(scope="module")
def oracle_adapter(tmp_path_factory):
    """An adapter loaded through our real loader from a checkpoint saved in the GitHub layout."""
    fx = np.load(FIX / "segvol_oracle_zoom.npz")
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


@pytest.mark.parametrize("name", ["segvol_oracle_zoom.npz", "segvol_oracle_box_text.npz"])
def test_matches_official_zoom_out_zoom_in(oracle_adapter, name):
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
    assert len(r["window_boxes"]) == len(fx["window_boxes"]) == 4
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
