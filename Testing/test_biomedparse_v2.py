"""BiomedParse v2: catalog spec, checkpoint loader (official Lightning layout) and BoltzFormer's Boltzmann
attention sampling (formula, RNG order, deterministic full-attention option)."""

from __future__ import annotations

import math

import pytest

from textseg import catalog
from textseg.models.biomedparse import v2_spec

torch = pytest.importorskip("torch")

from textseg.errors import WeightsError  # noqa: E402
from textseg.models.biomedparse.v2_boltzmann import boltzmann_attention_mask, open_full_rows  # noqa: E402
from textseg.models.biomedparse.v2_loader import LOSS_KEYS, load_v2_weights, read_v2_state_dict  # noqa: E402


# ---- spec ----------------------------------------------------------------------------------------------
def test_spec_registered_next_to_v1():
    ids = [s.id for s in catalog.list_models(include_hidden=True)]
    assert "biomedparse-v1" in ids and "biomedparse-v2" in ids
    spec = catalog.get_model("biomedparse-v2")
    assert spec is v2_spec.SPEC and spec.hidden  # hidden until the network/adapter land
    assert spec.dims == 2 and spec.existence_threshold == 0.5 and spec.recognition
    (f,) = spec.files
    assert (f.filename, f.gated, f.revision) == ("biomedparse_v2.ckpt", True,
                                                  "e473e5b2b1a3f44649734afd3dc7cf1770aaa9e2")
    assert spec.license == "CC-BY-NC-SA-4.0" and "Boltzmann Attention Sampling" in spec.citation
    assert set(spec.modalities) == {"CT", "MRI", "Ultrasound", "PET", "Microscopy"}
    assert len(spec.vocabulary) == len(set(spec.vocabulary)) and "liver" in spec.vocabulary
    assert "enhancing tissue" in spec.vocabulary and "mitochondria" in spec.vocabulary


def test_prompt_sentence_matches_upstream_example():
    # examples/imgs/CT_AMOS_amos_0018.npz prompt 6 and 13
    assert v2_spec.prompt_sentence("liver", "CT", "abdomen") == "Visualization of the liver in abdominal CT imaging"
    assert v2_spec.prompt_sentence("duodenum", "CT", "abdomen") == \
        "Visualization of the duodenum in abdominal CT imaging"
    own = "Segmentation of enhancing tissue in head post-contrast T1-weighted MR"
    assert v2_spec.prompt_sentence(own, "MRI", "brain") == own
    assert v2_spec.prompt_sentence("mitochondria", "Microscopy") == "Visualization of the mitochondria in Microscopy imaging"


# ---- loader --------------------------------------------------------------------------------------------
class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = torch.nn.Linear(32, 8)
        self.register_buffer("pixel_mean", torch.full((1, 3, 1, 1), 114.495))


def lightning_ckpt(path, model, extra=None, drop=None):
    sd = {"model." + k: v.clone() + 1 for k, v in model.state_dict().items() if k != drop}
    sd.update({"model." + k: torch.ones(2) for k in LOSS_KEYS})
    sd.update(extra or {})
    torch.save({"state_dict": sd, "epoch": 3, "optimizer_states": [{"step": torch.tensor(7)}]}, path)


def test_loader_reads_official_layout(tmp_path):
    src = Tiny()
    p = tmp_path / "biomedparse_v2.ckpt"
    lightning_ckpt(p, src)
    sd = read_v2_state_dict(p)
    assert sorted(sd) == ["backbone.bias", "backbone.weight", "pixel_mean"]
    dst = Tiny()
    load_v2_weights(dst, p)
    assert torch.equal(dst.backbone.weight, src.backbone.weight + 1)
    assert torch.allclose(dst.pixel_mean, torch.full((1, 3, 1, 1), 115.495))


def test_loader_safetensors(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    src = Tiny()
    p = tmp_path / "v2.safetensors"
    safetensors.save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(p))
    dst = Tiny()
    load_v2_weights(dst, p)
    assert torch.equal(dst.backbone.bias, src.backbone.bias)


def test_loader_meta_device(tmp_path):
    p = tmp_path / "biomedparse_v2.ckpt"
    lightning_ckpt(p, Tiny())
    with torch.device("meta"):
        dst = Tiny()
    load_v2_weights(dst, p)
    assert not dst.backbone.weight.is_meta and float(dst.backbone.weight.detach().sum()) != 0


def test_loader_errors(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        read_v2_state_dict(tmp_path / "missing.ckpt")
    ptr = tmp_path / "pointer.ckpt"
    ptr.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 4460000000\n")
    with pytest.raises(WeightsError, match="Git LFS pointer"):
        read_v2_state_dict(ptr)
    good = tmp_path / "good.ckpt"
    lightning_ckpt(good, Tiny())
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(WeightsError, match="truncated"):
        read_v2_state_dict(cut)
    extra = tmp_path / "extra.ckpt"
    lightning_ckpt(extra, Tiny(), extra={"model.sem_seg_head.extra": torch.zeros(1)}, drop="backbone.bias")
    with pytest.raises(WeightsError, match=r"1 missing: backbone.bias; 1 unexpected: sem_seg_head.extra"):
        load_v2_weights(Tiny(), extra)
    wrong = Tiny()
    wrong.backbone = torch.nn.Linear(32, 9)
    with pytest.raises(WeightsError, match=r"2 with another shape: backbone.bias \(8,\) != \(9,\), backbone.weight \(8, 32\) != \(9, 32\)"):
        load_v2_weights(wrong, good)


# ---- Boltzmann sampling --------------------------------------------------------------------------------
def test_deterministic_mode_is_threshold_only():
    prob = torch.rand(16, 4, 64)
    full = boltzmann_attention_mask(prob, 0, deterministic=True)
    assert full.all() and not open_full_rows(full).any()  # threshold 1.1: all blocked -> rows opened -> full
    m = boltzmann_attention_mask(prob, 0, threshold=0.5, deterministic=True)
    assert torch.equal(m, prob < 0.5)


def test_seeded_generator_reproduces_global_rng_order():
    """Two heads drawn with a seeded generator == upstream's rand_like on the seeded global RNG."""
    probs = [torch.rand(8, 16, 9 * 9), torch.rand(8, 16, 17 * 17)]
    g = torch.Generator().manual_seed(1234)
    ours = [boltzmann_attention_mask(p, i - 1, generator=g) for i, p in enumerate(probs)]
    torch.manual_seed(1234)
    for i, p in enumerate(probs):
        w = torch.exp(p / (1.0 / (2 + i - 1)))
        w = w / w.sum(-1, keepdim=True)
        ref = torch.rand_like(w) < (1 - w) ** int(p.shape[-1] * 0.1)
        assert torch.equal(ours[i], ref)
    g2 = torch.Generator().manual_seed(1235)
    assert not torch.equal(boltzmann_attention_mask(probs[0], -1, generator=g2), ours[0])


def test_uniform_probabilities_open_expected_fraction():
    """Equal weights 1/N: a position opens with probability 1-(1-1/N)^int(0.1N) (binomial bounds)."""
    n_pos = 400
    prob = torch.full((64, 16, n_pos), 0.3)
    g = torch.Generator().manual_seed(0)
    opened = (~boltzmann_attention_mask(prob, 3, generator=g)).float()
    expect = 1 - (1 - 1 / n_pos) ** int(0.1 * n_pos)
    sd = math.sqrt(expect * (1 - expect) / opened.numel())
    assert abs(float(opened.mean()) - expect) < 5 * sd


def test_low_temperature_favours_high_probability_positions():
    prob = torch.zeros(256, 1, 100)
    prob[..., :10] = 0.9
    g = torch.Generator().manual_seed(0)
    opened = ~boltzmann_attention_mask(prob, 8, generator=g)  # T = 0.1: weights e^9 higher on the first 10
    assert float(opened[..., :10].float().mean()) > 0.6 > 0.01 > float(opened[..., 10:].float().mean())


def test_open_full_rows():
    m = torch.ones(2, 3, 5, dtype=torch.bool)
    m[0, 1, 2] = False
    out = open_full_rows(m)
    assert bool(out[0, 1].sum() == 4) and not out[0, 0].any() and not out[1].any()
