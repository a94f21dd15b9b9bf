"""Generate the SAT oracle fixture from the OFFICIAL SAT code (reduced size, random weights).

Run once, outside the engine's environment (scratch venv with torch, transformers, einops and
positional-encodings[pytorch]); see Testing/fixtures/README.md for the exact commands. Nothing of
upstream is copied into this repository: this script imports a checkout given on the command line
(``model/`` and the vendored ``model/dynamic-network-architectures-main``) and writes only inputs and
outputs to Testing/fixtures/.

What it does:

1. Builds upstream's ``Maskformer('UNET', image_size=PATCH, patch_size=[32, 32, 32])`` and swaps in
   reduced modules built from upstream's own classes (``PlainConvUNet`` with small, non-uniform
   stages, ``TransformerDecoder``/``TransformerDecoderLayer(normalize_before=True)`` with 2 layers
   and FFN 256, projection and mask-embedding MLPs of the same form and smaller width); the forward
   code (avg pooling 32/16/8/4/2, ``PositionalEncoding3D``, ``infer_forward``/``train_forward``) is upstream's.
2. Builds upstream's ``Knowledge_Encoder`` (text tower) from a tiny random MPNet saved to a temp
   folder together with an MPNet tokenizer over a tiny vocabulary (``VOCAB``).
3. Fills every tensor from ``recipe_tensor`` (numpy PCG64 seeded by (seed, index of the key in
   sorted order of the keys without dynamic-network-architectures' ``all_modules`` aliases; aliases
   share their twin's tensor)); the test rebuilds the weights and checks the stored SHA-256.
4. Runs text -> queries (upstream tokenizer + encoder), image (recipe, B=2) -> logits through
   ``Maskformer.forward`` (list of queries = the inference path, and a (B, N, d) tensor = the batched path)
   and records intermediates with hooks.
5. Writes ``sat_nano_keys.json`` / ``sat_pro_keys.json``: every key and shape of the full-size
   ``Maskformer('UNET'/'UNET-L')`` and of the text encoder with BioLORD-2023-C's MPNet config
   (meta device; ``AutoModel.from_pretrained`` replaced by ``from_config``, the hub is not used).
6. ``sat_pro_oracle.npz`` (``pro_and_precision``; ``--only pro`` makes just this file): SAT-Pro's family
   (``Maskformer('UNET-L')``) reduced as ``REDUCED_PRO``, weights seed ``SEED + 2``, on the same image and
   ``sat_oracle.npz``'s queries; and both reduced networks under CPU autocast (bfloat16, float16).

Patches: ``torch.cuda.current_device`` -> 'cpu' (upstream's text tower moves tokens to CUDA); for the
meta-device key listing only, ``PositionalEncoding3D`` -> zeros (it cannot run on meta; not in the state dict);
for the reduced SAT-Pro, ``PlainConvUNet`` wrapped during ``Maskformer``'s constructor (smaller features).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

SEED = 20251202
PATCH = [64, 64, 64]
# SATConfig fields (our names) of the reduced network; upstream constructor arguments are derived below.
REDUCED = dict(
    features=[8, 8, 16, 16, 32, 32], n_conv=[1, 2, 3, 2, 2, 2], n_conv_decoder=[3, 2, 2, 1, 2],
    strides=[1, 2, 2, 2, 2, 2], patch_size=PATCH, token_patch=[32, 32, 32], projection_hidden=64, d_model=768,
    decoder_layers=2, decoder_heads=8, decoder_ffn=256, mask_hidden=32, per_pixel_dim=8,
)
TEXT_CONFIG = dict(
    vocab_size=40, hidden_size=768, num_hidden_layers=1, num_attention_heads=12, intermediate_size=64,
    hidden_act="gelu", max_position_embeddings=300, layer_norm_eps=1e-5, relative_attention_num_buckets=32,
    pad_token_id=1, bos_token_id=0, eos_token_id=2,
)
VOCAB = ["<s>", "<pad>", "</s>", "<unk>", "[PAD]", "[CLS]", "[SEP]", "[UNK]", "<mask>", "liver", "left", "right",
         "kidney", "inferior", "vena", "cava", "tumor", "lesion", "lung", "of", "head", "femur", "##s", "##al", "spine",
         "-", "19", "covid", "infection", "(", ")", "c1", "cervical", "verte", "##bra", "##e", "1", "heart", "brain",
         "aorta"]
TEXTS_A = ["liver", "left kidneys", "cervical vertebrae 1 (c1) xyz"]  # queries of the network; 'xyz' -> [UNK]
MODS_A = ["ct", "mri", "pet"]
TEXTS_B = [" ".join(["inferior vena cava"] * 100), "covid-19 infection"]  # > 256 tokens: truncated, [SEP] last
MODS_B = ["us", "ct"]
BIOLORD = dict(vocab_size=30527, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
               hidden_act="gelu", max_position_embeddings=514, layer_norm_eps=1e-5, relative_attention_num_buckets=32,
               pad_token_id=1, bos_token_id=0, eos_token_id=2)
MODALITY = {"ct": 0, "mri": 1, "us": 2, "pet": 3}


def recipe_tensor(key: str, shape, index: int, seed: int = SEED) -> np.ndarray:
    """The weight recipe (Testing/models/test_sat_network.py imports it from here)."""
    rng = np.random.default_rng([seed, index])
    x = rng.standard_normal(tuple(shape)).astype(np.float32)
    if key.endswith("bias"):
        return x * np.float32(0.02)
    if len(shape) == 1:
        return np.float32(1.0) + np.float32(0.1) * x
    fan_in = int(np.prod(shape[1:]))
    return x / np.float32(np.sqrt(max(fan_in, 1)))


def recipe_image(seed: int = SEED, patch=PATCH) -> np.ndarray:
    """(2, 1, H, W, D) float32: noise plus a smooth blob per image (the test imports it from here)."""
    rng = np.random.default_rng([seed, 999_999])
    h, w, d = patch
    g = np.stack(np.meshgrid(*[np.linspace(-1, 1, n, dtype=np.float32) for n in (h, w, d)], indexing="ij"))
    imgs = []
    for b, c in enumerate(([0.3, -0.2, 0.1], [-0.4, 0.1, -0.3])):
        blob = np.exp(-((g - np.array(c, np.float32)[:, None, None, None]) ** 2).sum(0) * (4.0 + b))
        imgs.append(2.0 * blob + 0.5 * rng.standard_normal((h, w, d)).astype(np.float32))
    return np.stack(imgs)[:, None].astype(np.float32)


def canonical_keys(sd) -> list:
    return sorted(k for k in sd if ".all_modules." not in k)


def twin(key: str) -> str:
    for a, b in ((".conv.", ".all_modules.0."), (".norm.", ".all_modules.1.")):
        if a in key:
            return key.replace(a, b)
    return key


def fill(model, seed: int):
    import torch

    sd = model.state_dict()
    keys = canonical_keys(sd)
    new = {k: torch.from_numpy(recipe_tensor(k, sd[k].shape, i, seed)) for i, k in enumerate(keys)}
    for k in list(new):
        if twin(k) in sd and twin(k) != k:
            new[twin(k)] = new[k]
    model.load_state_dict(new, strict=True)
    return keys


def digest(sd) -> str:
    h = hashlib.sha256()
    for k in sorted(sd):
        h.update(k.encode())
        h.update(np.ascontiguousarray(sd[k].detach().cpu().numpy()).tobytes())
    return h.hexdigest()


def import_upstream(up: Path):
    import torch

    sys.path[:0] = [str(up), str(up / "model" / "dynamic-network-architectures-main")]
    torch.cuda.current_device = lambda: "cpu"  # Text_Tower.forward moves tokens to the current CUDA device
    import model.knowledge_encoder as ke
    import model.maskformer as mf
    import model.text_tower as tt
    import model.tokenizer as tk
    import model.transformer_decoder as td
    from dynamic_network_architectures.architectures.unet import PlainConvUNet
    return mf, ke, tt, tk, td, PlainConvUNet


def reduced_maskformer(mods):
    import torch.nn as nn

    mf, _, _, _, td, PlainConvUNet = mods
    r = REDUCED
    m = mf.Maskformer("UNET", image_size=list(PATCH), patch_size=list(r["token_patch"]), deep_supervision=False)
    m.backbone = PlainConvUNet(
        input_channels=3, n_stages=6, features_per_stage=tuple(r["features"]), conv_op=nn.Conv3d, kernel_sizes=3,
        strides=tuple(r["strides"]), n_conv_per_stage=tuple(r["n_conv"]),
        n_conv_per_stage_decoder=tuple(r["n_conv_decoder"]),
        conv_bias=True, norm_op=nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True}, dropout_op=None,
        dropout_op_kwargs=None, nonlin=nn.LeakyReLU, nonlin_kwargs=None, deep_supervision=False, nonlin_first=False)
    m.projection_layer = nn.Sequential(nn.Linear(sum(r["features"]), r["projection_hidden"]), nn.GELU(),
                                       nn.Linear(r["projection_hidden"], r["d_model"]), nn.GELU())
    layer = td.TransformerDecoderLayer(d_model=r["d_model"], nhead=r["decoder_heads"], dim_feedforward=r["decoder_ffn"],
                                       normalize_before=True)
    m.transformer_decoder = td.TransformerDecoder(decoder_layer=layer, num_layers=r["decoder_layers"],
                                                  norm=nn.LayerNorm(r["d_model"]))
    m.mask_embed_proj = nn.Sequential(nn.Linear(r["d_model"], r["mask_hidden"]), nn.GELU(),
                                      nn.Linear(r["mask_hidden"], r["per_pixel_dim"]), nn.GELU())
    return m.eval()


# SAT-Pro's family ('UNET-L') reduced: upstream's UNET-L backbone arguments (3 convs per stage and per decoder
# stage) with small features; its projection (sum(features) -> 1536 -> 768) and mask MLP (768 -> 384 ->
# features[0]) widths; the query decoder as REDUCED.
REDUCED_PRO = dict(
    features=[16, 16, 32, 32, 64, 64], n_conv=[3] * 6, n_conv_decoder=[3] * 5, strides=[1, 2, 2, 2, 2, 2],
    patch_size=PATCH, token_patch=[32, 32, 32], projection_hidden=1536, d_model=768, decoder_layers=2,
    decoder_heads=8, decoder_ffn=256, mask_hidden=384, per_pixel_dim=16,
)
AUTOCAST = ("bfloat16", "float16")  # CPU autocast dtypes the precision fixture records


def reduced_pro_maskformer(mods):
    """Upstream's ``Maskformer('UNET-L')``: its backbone built by upstream's constructor call with the
    features reduced (``PlainConvUNet`` wrapped for the call; the unused UNET / UNET-H entries of its dict get
    the same small backbone), then the projection, query decoder and mask MLP swapped for reduced modules of
    upstream's classes with SAT-Pro's hidden widths."""
    import torch.nn as nn

    mf, _, _, _, td, PlainConvUNet = mods
    r = REDUCED_PRO
    real = mf.PlainConvUNet

    def small(**kw):
        assert kw["n_conv_per_stage"] == (3,) * 6 or kw["features_per_stage"][0] != 128  # UNET-L: 3 convs
        return real(**dict(kw, features_per_stage=tuple(r["features"])))

    mf.PlainConvUNet = small
    try:
        m = mf.Maskformer("UNET-L", image_size=list(PATCH), patch_size=list(r["token_patch"]), deep_supervision=False)
    finally:
        mf.PlainConvUNet = real
    assert tuple(m.backbone.encoder.output_channels) == tuple(r["features"])
    assert [len(s[0].convs) for s in m.backbone.encoder.stages] == [3] * 6
    assert isinstance(m.query_proj, nn.Identity) and m.mask_embed_proj[2].out_features == 128  # UNET-L's
    m.projection_layer = nn.Sequential(nn.Linear(sum(r["features"]), r["projection_hidden"]), nn.GELU(),
                                       nn.Linear(r["projection_hidden"], r["d_model"]), nn.GELU())
    layer = td.TransformerDecoderLayer(d_model=r["d_model"], nhead=r["decoder_heads"], dim_feedforward=r["decoder_ffn"],
                                       normalize_before=True)
    m.transformer_decoder = td.TransformerDecoder(decoder_layer=layer, num_layers=r["decoder_layers"],
                                                  norm=nn.LayerNorm(r["d_model"]))
    m.mask_embed_proj = nn.Sequential(nn.Linear(r["d_model"], r["mask_hidden"]), nn.GELU(),
                                      nn.Linear(r["mask_hidden"], r["per_pixel_dim"]), nn.GELU())
    return m.eval()


def pro_and_precision(mods, out: Path, commit: str) -> None:
    """``sat_pro_oracle.npz``: the reduced SAT-Pro network (fp32), and both reduced networks (Nano = sat_oracle's
    weights) under CPU autocast (bfloat16, float16), on sat_oracle's recipe image and queries."""
    import torch

    nano_fx = np.load(out / "sat_oracle.npz")
    q = torch.from_numpy(nano_fx["queries_a"])
    image = torch.from_numpy(recipe_image()).repeat(1, 3, 1, 1, 1)
    torch.manual_seed(0)
    pro = reduced_pro_maskformer(mods)
    pro_keys = fill(pro, SEED + 2)
    nano = reduced_maskformer(mods)
    fill(nano, SEED)
    assert digest(nano.state_dict()) == str(nano_fx["net_sha256"])
    res = dict(upstream_commit=commit, seed=np.int64(SEED + 2), config=json.dumps(REDUCED_PRO),
               net_keys=np.array(pro_keys),
               net_sha256=digest(pro.state_dict()), queries=q.numpy(), autocast=np.array(AUTOCAST))
    with torch.no_grad():
        emb, pos, per_pixel_ls = pro.vision_backbone_forward(image)
        logits = pro([q], image).numpy()
        res.update(image_tokens=emb.numpy(), per_pixel_sub=per_pixel_ls[0][..., ::4, ::4, ::4].numpy(),
                   logits_shape=np.array(logits.shape), logits_sub=logits[..., ::4, ::4, ::4],
                   logits_full_b0q1=logits[0, 1, ::2, ::2, ::2], logits_sum=logits.astype(np.float64).sum((2, 3, 4)),
                   logits_abs_sum=np.abs(logits.astype(np.float64)).sum((2, 3, 4)))
        q_batched = torch.stack([q[[2, 0]], q[[1, 2]]])
        res["logits_batched_sub"] = pro(q_batched, image)[0].numpy()[..., ::4, ::4, ::4]
        for name, net in (("pro", pro), ("nano", nano)):
            for dt in AUTOCAST:
                with torch.autocast("cpu", dtype=getattr(torch, dt)):
                    lg = net([q], image)
                res[f"{name}_{dt}_dtype"] = np.array(str(lg.dtype))
                lg = lg.float().numpy()
                res[f"{name}_{dt}_logits_sub"] = lg[..., ::4, ::4, ::4]
                res[f"{name}_{dt}_logits_abs_sum"] = np.abs(lg.astype(np.float64)).sum((2, 3, 4))
                print(name, dt, "max |autocast - fp32| on the sub-grid:",
                      float(np.abs(lg[..., ::4, ::4, ::4] - (logits[..., ::4, ::4, ::4] if name == "pro"
                                                               else nano_fx["logits_sub"][..., ::2, ::2, ::2])).max()))
    np.savez_compressed(out / "sat_pro_oracle.npz", **res)
    print("sat_pro_oracle.npz", (out / "sat_pro_oracle.npz").stat().st_size, "bytes; logits", logits.shape,
          "range", float(logits.min()), float(logits.max()))


def tiny_text_encoder(mods, tmp: Path):
    from transformers import MPNetConfig, MPNetModel, MPNetTokenizerFast

    _, ke, _, _, _, _ = mods
    (tmp / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    MPNetTokenizerFast(vocab={t: i for i, t in enumerate(VOCAB)},
                       do_lower_case=True).save_pretrained(str(tmp / "biolord"))
    MPNetModel(MPNetConfig(**TEXT_CONFIG)).save_pretrained(str(tmp / "biolord"))
    return ke.Knowledge_Encoder(biolord_checkpoint=str(tmp / "biolord")).eval()


def shapes(sd):
    return {k: list(v.shape) for k, v in sd.items()}


def key_contracts(mods, out: Path, commit: str) -> None:
    import torch
    import transformers

    mf, ke, tt, tk, _, _ = mods
    orig_auto, orig_tok = tt.AutoModel.from_pretrained, tk.AutoTokenizer.from_pretrained
    orig_pe = mf.PositionalEncoding3D
    mf.PositionalEncoding3D = lambda ch: (lambda t: torch.zeros(t.shape))  # not in the state dict; fails on meta
    tt.AutoModel.from_pretrained = lambda name, **kw: transformers.AutoModel.from_config(
        transformers.MPNetConfig(**BIOLORD))
    tk.AutoTokenizer.from_pretrained = lambda name, **kw: None
    try:
        with torch.device("meta"):
            text = ke.Knowledge_Encoder()
            for name, backbone in (("sat_nano_keys.json", "UNET"), ("sat_pro_keys.json", "UNET-L")):
                net = mf.Maskformer(backbone, image_size=[288, 288, 96], patch_size=[32, 32, 32])
                sd, tsd = net.state_dict(), text.state_dict()
                contract = dict(
                    source=f"zhaoziheng/SAT@{commit} model/maskformer.py Maskformer('{backbone}', [288, 288, 96], [32, "
                           f"32, 32]) and model/knowledge_encoder.py Knowledge_Encoder with BioLORD-2023-C's MPNet "
                           f"config (transformers {transformers.__version__}; checkpoints add the DDP 'module.' "
                           f"prefix, the text file from transformers 4.21 also "
                           f"text_tower.biolord.embeddings.position_ids)",
                    n_parameters=sum(p.numel() for p in net.parameters()),
                    n_text_parameters=sum(p.numel() for p in text.parameters()),
                    keys=shapes(sd), text_keys=shapes(tsd))
                (out / name).write_text(json.dumps(contract, indent=0) + "\n")
                print(name, len(sd), "keys", contract["n_parameters"], "params; text", len(tsd), "keys")
    finally:
        tt.AutoModel.from_pretrained, tk.AutoTokenizer.from_pretrained = orig_auto, orig_tok
        mf.PositionalEncoding3D = orig_pe


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("upstream", type=Path, help="checkout of zhaoziheng/SAT")
    ap.add_argument("--upstream-commit", required=True)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "fixtures")
    ap.add_argument("--only", choices=("nano", "pro"), help="nano: sat_oracle.npz and the key lists; pro: "
                    "sat_pro_oracle.npz (reads sat_oracle.npz from --out)")
    a = ap.parse_args()
    import torch
    from positional_encodings.torch_encodings import PositionalEncoding3D

    torch.manual_seed(0)
    mods = import_upstream(a.upstream.resolve())
    a.out.mkdir(parents=True, exist_ok=True)
    if a.only == "pro":
        pro_and_precision(mods, a.out, a.upstream_commit)
        return
    key_contracts(mods, a.out, a.upstream_commit)

    net = reduced_maskformer(mods)
    net_keys = fill(net, SEED)
    with tempfile.TemporaryDirectory() as tmp:
        text = tiny_text_encoder(mods, Path(tmp))
        text_keys = fill(text, SEED + 1)

        rec = {}
        hooks = [
            net.projection_layer.register_forward_pre_hook(lambda m, i: rec.__setitem__("tokens_in", i[0].clone())),
            net.transformer_decoder.register_forward_hook(lambda m, i, o: rec.__setitem__("decoder_out", o[0].clone())),
            net.mask_embed_proj.register_forward_hook(lambda m, i, o: rec.__setitem__("mask_embedding", o.clone())),
            text.text_tower.register_forward_hook(lambda m, i, o: rec.__setitem__("pooled", o.clone())),
        ]
        with torch.no_grad():
            tok_a = text.text_tower.tokenizer.tokenize(TEXTS_A)
            q_a = text(TEXTS_A, torch.tensor([MODALITY[m] for m in MODS_A]))
            pooled_a = rec["pooled"]
            tok_b = text.text_tower.tokenizer.tokenize(TEXTS_B)
            q_b = text(TEXTS_B, torch.tensor([MODALITY[m] for m in MODS_B]))
            pooled_b = rec["pooled"]

            image = torch.from_numpy(recipe_image()).repeat(1, 3, 1, 1, 1)
            emb, pos, per_pixel_ls = net.vision_backbone_forward(image)
            tokens_in = rec["tokens_in"]
            logits = net([q_a], image)  # list of queries: upstream's inference path
            decoder_out, mask_embedding = rec["decoder_out"], rec["mask_embedding"]
            q_batched = torch.stack([q_a[[2, 0]], torch.cat([q_b[1:], q_a[1:2]])])  # (B=2, N=2, d)
            logits_batched = net(q_batched, image)[0]
        for h in hooks:
            h.remove()
        pe768 = PositionalEncoding3D(768)(torch.zeros(1, 3, 4, 5, 768))[0]
        pe100 = PositionalEncoding3D(100)(torch.zeros(1, 2, 3, 4, 100))[0]

        lg = logits.numpy()
        np.savez_compressed(
            a.out / "sat_oracle.npz", upstream_commit=a.upstream_commit, seed=np.int64(SEED),
            config=json.dumps(REDUCED),
            text_config=json.dumps(TEXT_CONFIG), vocab=np.array(VOCAB), net_keys=np.array(net_keys),
            text_keys=np.array(text_keys), net_sha256=digest(net.state_dict()), text_sha256=digest(text.state_dict()),
            image_sha256=hashlib.sha256(recipe_image().tobytes()).hexdigest(),
            texts_a=np.array(TEXTS_A), mods_a=np.array(MODS_A), texts_b=np.array(TEXTS_B), mods_b=np.array(MODS_B),
            ids_a=tok_a["input_ids"].numpy(), mask_a=tok_a["attention_mask"].numpy(),
            ids_b=tok_b["input_ids"].numpy(), mask_b=tok_b["attention_mask"].numpy(),
            pooled_a=pooled_a.numpy(), pooled_b=pooled_b.numpy(), queries_a=q_a.numpy(), queries_b=q_b.numpy(),
            tokens_in=tokens_in.numpy(), image_tokens=emb.numpy(), pos=pos.numpy(),
            per_pixel_sub=per_pixel_ls[0][..., ::4, ::4, ::4].numpy(),
            decoder_out=decoder_out.numpy(), mask_embedding=mask_embedding.numpy(),
            logits_sub=lg[..., ::2, ::2, ::2], logits_full_b1q2=lg[1, 2],
            logits_sum=lg.astype(np.float64).sum((2, 3, 4)),
            logits_abs_sum=np.abs(lg.astype(np.float64)).sum((2, 3, 4)), logits_shape=np.array(lg.shape),
            queries_batched=q_batched.numpy(), logits_batched_sub=logits_batched.numpy()[..., ::2, ::2, ::2],
            pe768=pe768.numpy(), pe100=pe100.numpy(),
        )
    print("sat_oracle.npz", (a.out / "sat_oracle.npz").stat().st_size, "bytes; logits", lg.shape,
          "range", float(lg.min()), float(lg.max()), "ids_a", tok_a["input_ids"].tolist())
    if a.only is None:
        pro_and_precision(mods, a.out, a.upstream_commit)


if __name__ == "__main__":
    main()
