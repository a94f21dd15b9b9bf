"""Every official checkpoint layout, built small at test time in the layout the published file has,
published on the hub look-alike (Testing/hubserver.py) under the catalog's repository and file names,
downloaded by the weights manager and loaded by the model's own loader through ``load_adapter``: the
path of a user's first ``textseg models download ID`` followed by a segmentation.

The layouts (upstream code and HuggingFace file listings, see docs/weights.md):

- BiomedParse v1 ``biomedparse_v1.pt``: a flat ``model.state_dict()`` plus ``criterion.empty_weight``.
- BiomedParse v2 ``biomedparse_v2.ckpt``: a Lightning checkpoint, ``{'state_dict': {'model.*'}}`` with the two
  loss tensors, the optimizer states and Lightning's bookkeeping.
- SegVol on HF ``pytorch_model.bin``: ``{'model.*'}`` (transformers' SegVolModel holds SegVol as ``model``),
  with transformers 4.18's persistent ``position_ids``; SegVol on GitHub ``SegVol_v1.pth``: ``{'model':
  {'module.*'}, 'optimizer', 'epoch', 'scheduler'}`` (its train.py), installed with ``textseg models import``.
- SAT Nano/Pro: ``{'step', 'model_state_dict': {'module.*'}, 'optimizer_state_dict'}`` (train/trainer.py); the
  AdamW param groups hold numpy float64 learning rates (train/scheduler.py), pickled under numpy 1's module
  name ``numpy.core.multiarray.scalar`` as in the published files; text encoders ``{'step', 'model_state_dict'}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from checkpoint_layouts import save_numpy1  # noqa: E402

from textseg import catalog, weights  # noqa: E402
from textseg.catalog import get_model  # noqa: E402
from textseg.errors import WeightsError  # noqa: E402
from textseg.predictor import load_adapter  # noqa: E402

FIX = Path(__file__).parents[1] / "fixtures"
TOKEN = "hf_accepted"  # a token the hub look-alike lets into gated repos


# ---- writing files the way the upstream trainers did ----------------------------------------------
def save(obj, path: Path) -> bytes:
    torch.save(obj, path)
    return path.read_bytes()


def trained_adamw(*modules, lr=None) -> dict:
    """The state of an AdamW that took one step over the modules' parameters (moments for every tensor);
    ``lr`` replaces the param groups' learning rate, as SAT's cosine scheduler does with a numpy float."""
    params = [p for m in modules for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-4)
    for p in params:
        p.grad = torch.full_like(p, 1e-3)
    opt.step()
    for p in params:
        p.grad = None
    state = opt.state_dict()
    if lr is not None:
        for group in state["param_groups"]:
            group["lr"] = lr
    return state


def same_tensors(model_sd, saved, prefix=""):
    """Every tensor of the loaded model equals the saved one (names in the official file: prefix + name)."""
    assert model_sd, "nothing loaded"
    for k, v in model_sd.items():
        assert torch.equal(v.float(), saved[prefix + k].float()), k


def load_mapped(adapter, monkeypatch):
    """``adapter.load('cpu')``, checking that every torch.load it makes is weights_only and memory-mapped
    (the optimizer state in the official files is then never read into memory)."""
    calls, real = [], torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    adapter.load("cpu")
    monkeypatch.setattr(torch, "load", real)
    assert calls and all(c.get("weights_only") is True and c.get("mmap") is True for c in calls), calls
    return adapter


def seeded(module_factory, seed=0):
    torch.manual_seed(seed)
    return module_factory()


def with_files(spec_id: str, new_id: str, **by_name) -> catalog.ModelSpec:
    """The catalog entry of ``spec_id`` under a hidden test id, with some files' fields replaced."""
    spec = get_model(spec_id)
    files = tuple(dataclasses.replace(wf, **by_name.get(wf.name, {})) for wf in spec.files)
    return catalog.register(dataclasses.replace(spec, id=new_id, files=files, hidden=True))


# ---- BiomedParse v1 ---------------------------------------------------------------------------------
def test_biomedparse_v1_flat_state_dict(hub_env, hub, monkeypatch):
    from textseg.models.biomedparse.v1.model import REDUCED, build_v1

    model = seeded(lambda: build_v1(REDUCED))
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    saved["criterion.empty_weight"] = torch.ones(17)  # the loss buffer upstream's notebook reports as unused
    spec = get_model("biomedparse-v1")
    hub.add("microsoft/BiomedParse", "biomedparse_v1.pt", save(saved, hub_env.parent / "upload.pt"), gated=True)
    dist = {"CT-Abdomen": {"liver": [[2.0, 5.0]] * 4}}
    hub.add("microsoft/BiomedParse", "target_dist.json", json.dumps(dist).encode(), lfs=False, gated=True)

    weights.download(spec.id, token=TOKEN)
    adapter = load_mapped(load_adapter(spec, config=REDUCED), monkeypatch)
    same_tensors(adapter.model.state_dict(), saved)


# ---- BiomedParse v2 ---------------------------------------------------------------------------------
def test_biomedparse_v2_lightning_checkpoint(hub_env, hub, monkeypatch):
    from textseg.models.biomedparse.v2.loader import LOSS_KEYS
    from textseg.models.biomedparse.v2.model import REDUCED, build_v2

    model = seeded(lambda: build_v2(REDUCED))
    sd = {"model." + k: v.clone() for k, v in model.state_dict().items()}
    sd.update({"model." + k: torch.ones(2) for k in LOSS_KEYS})
    ckpt = {"epoch": 99, "global_step": 123400, "pytorch-lightning_version": "2.4.0", "state_dict": sd,
            "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 100, "completed": 99}}}},
            "callbacks": {}, "optimizer_states": [trained_adamw(model)],
            "lr_schedulers": [{"base_lrs": [1e-4], "last_epoch": 99, "_step_count": 100}]}
    pin = get_model("biomedparse-v2").files[0].revision
    data = save(ckpt, hub_env.parent / "upload.ckpt")
    hub.add("microsoft/BiomedParse", "biomedparse_v2.ckpt", data, gated=True, commit=pin)
    spec = with_files("biomedparse-v2", "t-official-v2",
                      **{"biomedparse_v2.ckpt": dict(size=len(data), sha256=hashlib.sha256(data).hexdigest())})

    weights.download(spec.id, token=TOKEN)
    adapter = load_mapped(load_adapter(spec, config=REDUCED), monkeypatch)
    same_tensors(adapter.model.state_dict(), sd, "model.")


# ---- SegVol -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def segvol_net():
    from textseg.models.segvol.network import CLIP_OFFICIAL, SegVolConfig, SegVolNet

    fx = np.load(FIX / "segvol_oracle_zoom.npz")
    c = json.loads(str(fx["config"]))
    c["img_size"], c["patch_size"] = tuple(c["img_size"]), tuple(c["patch_size"])
    c["text_config"] = dict(c["text_config"], vocab_size=1000)  # a small token table; the layout is the same
    cfg = SegVolConfig(**c)
    net = seeded(lambda: SegVolNet(cfg))
    own = net.state_dict()
    # the official key names (transformers 4.x CLIPTextModel: clip_text_model.text_model.*)
    official = {}
    for k, v in own.items():
        if k.startswith("text_encoder.clip_text_model.") and not k.startswith(CLIP_OFFICIAL):
            k = CLIP_OFFICIAL + k[len("text_encoder.clip_text_model."):]
        official[k] = v.clone()
    official[CLIP_OFFICIAL + "embeddings.position_ids"] = torch.arange(77)[None]  # transformers 4.18 buffer
    return cfg, net, official


def segvol_same(adapter, net, official):
    from textseg.models.segvol.network import remap_state_dict

    want = remap_state_dict(official, net.state_dict().keys())
    same_tensors(adapter.net.state_dict(), want)


def test_segvol_huggingface_model_prefix(hub_env, hub, monkeypatch, segvol_net):
    cfg, net, official = segvol_net
    spec = get_model("segvol")
    hub.add("BAAI/SegVol", "pytorch_model.bin", save({"model." + k: v for k, v in official.items()},
                                                      hub_env.parent / "upload.bin"), commit=spec.files[0].revision)
    weights.download(spec.id)
    adapter = load_mapped(load_adapter(spec, config=cfg), monkeypatch)
    segvol_same(adapter, net, official)


def test_segvol_github_release_imported(hub_env, tmp_path, monkeypatch, segvol_net):
    cfg, net, official = segvol_net
    ckpt = {"model": {"module." + k: v for k, v in official.items()}, "optimizer": trained_adamw(net), "epoch": 2000,
            "scheduler": {"warmup_epochs": 10, "max_epochs": 3000, "base_lrs": [1e-4], "last_epoch": 2000}}
    release = tmp_path / "SegVol_v1.pth"
    save(ckpt, release)
    weights.import_file("segvol", release, name="pytorch_model.bin")
    adapter = load_mapped(load_adapter(get_model("segvol"), config=cfg), monkeypatch)
    segvol_same(adapter, net, official)


# ---- SAT --------------------------------------------------------------------------------------------
def sat_parts():
    from textseg.models.sat.network import SATConfig, SATNetwork
    from textseg.models.sat.text import SATTextEncoder

    fx = np.load(FIX / "sat_oracle.npz")
    c = json.loads(str(fx["config"]))
    cfg = SATConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in c.items()})
    text_cfg = json.loads(str(fx["text_config"]))
    net = seeded(lambda: SATNetwork(cfg))
    text = seeded(lambda: SATTextEncoder(text_cfg), 1)
    return cfg, text_cfg, fx["vocab"].tolist(), net, text


def biolord_files(text_cfg, vocab) -> dict:
    """BioLORD-2023-C's tokenizer and config files (small ones, as git files on the hub)."""
    import tempfile

    from transformers import MPNetTokenizerFast

    with tempfile.TemporaryDirectory() as d:
        MPNetTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True).save_pretrained(d)
        files = {n: (Path(d) / n).read_bytes() for n in ("tokenizer.json", "tokenizer_config.json")}
    files["vocab.txt"] = ("\n".join(vocab) + "\n").encode()
    files["config.json"] = json.dumps(dict(text_cfg, model_type="mpnet", architectures=["MPNetModel"])).encode()
    files["special_tokens_map.json"] = json.dumps({"bos_token": "<s>", "cls_token": "<s>", "eos_token": "</s>",
                                                   "mask_token": "<mask>", "pad_token": "<pad>", "sep_token": "</s>",
                                                   "unk_token": "[UNK]"}).encode()
    return files


@pytest.fixture(scope="module")
def sat_trained():
    """SAT's segmentation and text encoder checkpoints as train/trainer.py saved them (objects)."""
    cfg, text_cfg, vocab, net, text = sat_parts()
    seg_sd = {"module." + k: v.clone() for k, v in net.state_dict().items()}
    text_sd = {"module." + k: v.clone() for k, v in text.state_dict().items()}
    position_ids = torch.arange(text_cfg["max_position_embeddings"])[None]
    text_sd["module.text_tower.biolord.embeddings.position_ids"] = position_ids
    text_sd["module.temperature"] = torch.tensor(0.07)
    seg = {"step": 190000, "model_state_dict": seg_sd,
           "optimizer_state_dict": trained_adamw(net, text, lr=np.float64(0.5 * (1 + np.cos(np.pi * 0.3)) * 1e-4))}
    return cfg, seg, {"step": 190000, "model_state_dict": text_sd}, biolord_files(text_cfg, vocab)


def sat_official_files(sat_trained, tmp: Path, extra: dict = None):
    """The trained checkpoints written as the published files are (numpy scalars under numpy 1's name)."""
    cfg, seg, text, biolord = sat_trained
    save_numpy1({**seg, **(extra or {})}, tmp / "seg.pth")
    seg_bytes = (tmp / "seg.pth").read_bytes()
    text_bytes = save(text, tmp / "text.pth")
    return cfg, seg_bytes, text_bytes, seg["model_state_dict"], text["model_state_dict"], biolord


def publish_sat(hub, spec, seg_bytes, text_bytes, biolord):
    from textseg.models.sat import BIOLORD_PREFIX, BIOLORD_REPO, SAT_REPO

    seg_wf, text_wf = spec.files[:2]
    hub.add(SAT_REPO, seg_wf.filename, seg_bytes)
    hub.add(SAT_REPO, text_wf.filename, text_bytes)
    for name, data in biolord.items():
        assert any(wf.name == BIOLORD_PREFIX + name for wf in spec.files)
        hub.add(BIOLORD_REPO, name, data, lfs=False)


@pytest.mark.parametrize("model_id", ["sat-nano", "sat-pro"])
def test_sat_trainer_checkpoints_with_numpy_scalars(hub_env, hub, model_id, monkeypatch, sat_trained):
    cfg, seg_bytes, text_bytes, seg_sd, text_sd, biolord = sat_official_files(sat_trained, hub_env.parent)
    # what HuggingFace's pickle scan lists for Nano/nano.pth, less the globals torch allows by default
    assert sorted(torch.serialization.get_unsafe_globals_in_checkpoint(hub_env.parent / "seg.pth")) == \
        ["numpy.core.multiarray.scalar", "numpy.dtype"]
    spec = get_model(model_id)
    publish_sat(hub, spec, seg_bytes, text_bytes, biolord)

    weights.download(spec.id)
    adapter = load_mapped(load_adapter(spec, config=cfg), monkeypatch)
    same_tensors(adapter.network.state_dict(), seg_sd, "module.")
    same_tensors(adapter.text_tower.state_dict(), text_sd, "module.")


# ---- refusals ---------------------------------------------------------------------------------------
class _RunsCode:
    """What a hostile checkpoint holds: unpickling it would run a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("extra, named", [
    ({"args": argparse.Namespace(lr=1e-4)}, "argparse.Namespace"),
    ({"hook": _RunsCode(Path("/nonexistent"))}, os.system.__module__ + ".system"),
])
def test_file_with_unexpected_global_is_refused_naming_it(hub_env, hub, tmp_path, extra, named, sat_trained):
    marker = tmp_path / "code-ran"
    if "hook" in extra:
        extra = {"hook": _RunsCode(marker)}
    cfg, seg_bytes, text_bytes, *_, biolord = sat_official_files(sat_trained, hub_env.parent, extra)
    spec = get_model("sat-nano")
    publish_sat(hub, spec, seg_bytes, text_bytes, biolord)
    weights.download(spec.id)  # verify passes: the bytes are the published ones
    with pytest.raises(WeightsError) as err:
        load_adapter(spec, config=cfg).load("cpu")
    msg = str(err.value)
    assert named in msg and "nano.pth" in msg and "\n" not in msg, msg
    assert "numpy" not in msg, msg  # the globals allowed for SAT's optimizer state are not named
    assert "truncated" not in msg and "download it again" not in msg, msg
    assert not marker.exists()


def test_old_torch_refuses_numpy_scalars_with_the_fix(hub_env, monkeypatch, sat_trained):
    """torch < 2.6 cannot allow numpy's scalar under its numpy-1 name: SAT's segmentation file is refused
    with what to do; a file of tensors only (SAT's text encoder) still loads."""
    from textseg.models.sat.loader import read_state_dict

    cfg, seg_bytes, text_bytes, seg_sd, text_sd, biolord = sat_official_files(sat_trained, hub_env.parent)
    monkeypatch.setattr(torch, "__version__", "2.4.1+cpu")
    with pytest.raises(WeightsError, match=r"needs torch >= 2\.6.*2\.4\.1") as err:
        read_state_dict(hub_env.parent / "seg.pth", "segmentation")
    assert "numpy.core.multiarray.scalar" in str(err.value)
    assert read_state_dict(hub_env.parent / "text.pth", "text encoder").keys() == {k[7:] for k in text_sd}
