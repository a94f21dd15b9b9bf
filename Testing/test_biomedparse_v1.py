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
