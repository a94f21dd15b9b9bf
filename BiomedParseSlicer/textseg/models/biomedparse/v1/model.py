"""BiomedParse v1 network (upstream ``seem_model_demo`` inference path) and its checkpoint loader.

State-dict keys equal upstream ``model.state_dict()`` of ``GeneralizedSEEM`` (no prefix):
``backbone.*`` (FocalNet-L), ``sem_seg_head.pixel_decoder.*`` (transformer-encoder FPN),
``sem_seg_head.predictor.*`` (grounding decoder, ``v1.decoder``) with the text encoder under
``sem_seg_head.predictor.lang_encoder.{lang_encoder.*, lang_proj, logit_scale}``, and the buffer
``dilation_kernel`` (3x3 ones). The backbone, pixel decoder and text transformer are the modules
shared with v2 (same hyper-parameters and key names below their prefixes).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ....errors import WeightsError
from ...checkpoint import assign_state_dict, key_mismatch, read_checkpoint
from .decoder import SEEMGroundingDecoder, vl_similarity

PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)
IGNORED_KEYS = ("criterion.empty_weight",)
IGNORED_PARTS = (".lang_encoder.biomed_encoder.",)  # BiomedBERT, unused with the CLIP tokenizer


@dataclass(frozen=True)
class V1Config:
    image_size: int = 1024
    embed_dim: int = 192
    depths: tuple[int, ...] = (2, 2, 18, 2)
    focal_levels: tuple[int, ...] = (4, 4, 4, 4)
    focal_windows: tuple[int, ...] = (3, 3, 3, 3)
    conv_dim: int = 512
    mask_dim: int = 512
    enc_layers: int = 6
    hidden_dim: int = 512
    nheads: int = 8
    dim_feedforward: int = 2048
    dec_layers: int = 9  # upstream DEC_LAYERS 10 = 9 layers + the initial head
    num_queries: int = 101
    dim_proj: int = 512
    text_width: int = 512
    text_heads: int = 8
    text_layers: int = 12
    context_length: int = 77
    vocab_size: int = 49408
    size_divisibility: int = 32


# The reduced configuration of the oracle fixture (Testing/oracles/make_biomedparse_v1_fixture.py).
REDUCED = V1Config(image_size=128, embed_dim=8, depths=(1, 1, 1, 1), focal_levels=(2, 2, 2, 2), conv_dim=32,
                   mask_dim=32, enc_layers=1, hidden_dim=32, nheads=4, dim_feedforward=64, dec_layers=3,
                   dim_proj=32, text_width=32, text_heads=4, text_layers=1)


class LanguageEncoder(nn.Module):
    """``sem_seg_head.predictor.lang_encoder``: CLIP-style causal transformer + projection + logit scale."""

    def __init__(self, cfg: V1Config) -> None:
        super().__init__()
        from ..text import TextTransformer  # shared with v2

        self.lang_encoder = TextTransformer(context_length=cfg.context_length, vocab_size=cfg.vocab_size,
                                            width=cfg.text_width, layers=cfg.text_layers, heads=cfg.text_heads)
        self.lang_proj = nn.Parameter(torch.zeros(cfg.text_width, cfg.dim_proj))
        self.logit_scale = nn.Parameter(torch.ones([]))

    def forward(self, input_ids: Tensor) -> tuple[Tensor, Tensor]:
        """Token embeddings (N, L, D) and class embeddings (N, D) at the first EOS (argmax id), projected."""
        x = self.lang_encoder(input_ids)
        cls = x[torch.arange(x.shape[0], device=x.device), input_ids.argmax(dim=-1)]
        return x @ self.lang_proj, cls @ self.lang_proj


class SemSegHead(nn.Module):
    def __init__(self, cfg: V1Config) -> None:
        super().__init__()
        from ..pixel_decoder import TransformerEncoderPixelDecoder  # shared with v2

        chans = [cfg.embed_dim * 2 ** i for i in range(4)]
        self.pixel_decoder = TransformerEncoderPixelDecoder(in_channels=chans, conv_dim=cfg.conv_dim,
                                                            mask_dim=cfg.mask_dim,
                                                            nheads=cfg.nheads, dim_feedforward=cfg.dim_feedforward,
                                                            enc_layers=cfg.enc_layers)
        self.predictor = SEEMGroundingDecoder(cfg.hidden_dim, cfg.dim_proj, cfg.num_queries, cfg.nheads,
                                              cfg.dim_feedforward, cfg.dec_layers, cfg.mask_dim)
        self.predictor.lang_encoder = LanguageEncoder(cfg)


@dataclass
class Encoded:
    """Image features of a slice batch (kept on the model's device)."""

    mask_features: Tensor  # (B, C, S/4, S/4)
    features: list[Tensor]  # three decoder scales
    memory: tuple  # decoder-ready (src, pos, sizes)


class BiomedParseV1(nn.Module):
    def __init__(self, cfg: V1Config = V1Config()) -> None:
        super().__init__()
        from ..focal import FocalNet  # shared with v2

        self.cfg = cfg
        self.backbone = FocalNet(embed_dim=cfg.embed_dim, depths=cfg.depths, focal_levels=cfg.focal_levels,
                                 focal_windows=cfg.focal_windows)
        self.sem_seg_head = SemSegHead(cfg)
        self.register_buffer("dilation_kernel", torch.ones((1, 1, 3, 3)))  # persistent upstream; unused here
        self.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(PIXEL_STD).view(-1, 1, 1), False)

    @property
    def lang(self) -> LanguageEncoder:
        return self.sem_seg_head.predictor.lang_encoder

    def encode(self, images: Tensor) -> Encoded:
        """images: (B, 3, S, S) uint8/float in 0..255 (the preprocessed slices)."""
        x = (images.float() - self.pixel_mean) / self.pixel_std
        d = self.cfg.size_divisibility
        ph, pw = (-x.shape[-2]) % d, (-x.shape[-1]) % d
        if ph or pw:  # upstream ImageList.from_tensors pads bottom/right with 0 after normalisation
            x = F.pad(x, (0, pw, 0, ph))
        feats = self.backbone(x)
        mask_features, multi_scale = self._pixel(feats)
        memory = self.sem_seg_head.predictor.prepare_memory(multi_scale)
        return Encoded(mask_features, multi_scale, memory)

    def _pixel(self, feats) -> tuple[Tensor, list[Tensor]]:
        """mask features (stride 4) and the three decoder scales (strides 32, 16, 8)."""
        out = self.sem_seg_head.pixel_decoder.forward_features(feats)
        return out[0], list(out[-1])

    def embed_text(self, input_ids: Tensor) -> tuple[Tensor, Tensor]:
        return self.lang(input_ids)

    def decode(self, enc: Encoded, token_emb: Tensor, attention_mask: Tensor, class_emb: Tensor,
               concat: bool = False, all_masks: bool = False, low_res_attention: bool = True) -> dict[str, Tensor]:
        """Decode P prompts on B slices.

        token_emb (P, L, D), attention_mask (P, L), class_emb (P, D). Default: each prompt decoded on
        its own (batched B*P, slice-major; token sequences padded and masked). ``concat``: upstream's
        single call with all prompts' tokens concatenated into one grounding sequence. Returns
        ``logits`` (B, P, S/4, S/4) of the query selected per slice and prompt, ``matched`` (B, P),
        ``pred_captions`` (N, Q, D) and, with ``all_masks``, ``pred_masks`` (N, Q, S/4, S/4) of every
        query (N = B*P, or B with ``concat``).
        """
        pred = self.sem_seg_head.predictor
        b, p = enc.mask_features.shape[0], token_emb.shape[0]
        keep = attention_mask.bool()
        scale = pred.lang_encoder.logit_scale
        if concat:
            tokens = token_emb[keep][:, None].expand(-1, b, -1)
            emb, captions = pred(None, enc.mask_features, tokens, memory=enc.memory,
                                 low_res_attention=low_res_attention)
            matched = vl_similarity(captions, class_emb, scale).argmax(1)  # (B, P)
            chosen = torch.gather(emb, 1, matched[..., None].expand(-1, -1, emb.shape[-1]))  # (B, P, C)
            logits = pred.mask_logits(chosen, enc.mask_features)
            group = 1
        else:
            lengths = keep.sum(1)
            tok = torch.zeros((p, int(lengths.max()), token_emb.shape[-1]), dtype=token_emb.dtype,
                              device=token_emb.device)
            pad = torch.ones(tok.shape[:2], dtype=torch.bool, device=token_emb.device)
            for i in range(p):
                tok[i, : lengths[i]] = token_emb[i][keep[i]]
                pad[i, : lengths[i]] = False
            src, pos, sizes = enc.memory
            memory = ([s.repeat_interleave(p, dim=1) for s in src], [q.repeat_interleave(p, dim=1) for q in pos], sizes)
            emb, captions = pred(None, enc.mask_features, tok.repeat(b, 1, 1).transpose(0, 1), pad.repeat(b, 1),
                                 memory=memory, group=p, low_res_attention=low_res_attention)
            sim = vl_similarity(captions, class_emb.repeat(b, 1)[:, None, :], scale)[..., 0]  # (B*P, Q)
            matched = sim.argmax(1)
            chosen = emb[torch.arange(emb.shape[0], device=emb.device), matched][:, None]  # (B*P, 1, C)
            logits = pred.mask_logits(chosen, enc.mask_features, group=p).view(b, p, *enc.mask_features.shape[-2:])
            matched = matched.view(b, p)
            group = p
        out = {"logits": logits, "matched": matched, "pred_captions": captions}
        if all_masks:
            out["pred_masks"] = pred.mask_logits(emb, enc.mask_features, group)
        return out


# ---- checkpoint -------------------------------------------------------------------------------------
def read_v1_state_dict(path: Path) -> dict[str, Tensor]:
    """The official ``biomedparse_v1.pt`` (a plain ``model.state_dict()``), loss/BiomedBERT keys dropped."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"BiomedParse v1 weights not found at {path}: run `textseg models download biomedparse-v1`.")
    sd = read_checkpoint(path, "BiomedParse v1 checkpoint",
                         "delete it and download it again (`textseg models download biomedparse-v1`).")
    if isinstance(sd, dict) and "state_dict" in sd and any(str(k).startswith("model.") for k in sd["state_dict"]):
        raise WeightsError(f"{path} is a BiomedParse v2 (Lightning) checkpoint; use the model biomedparse-v2 for it.")
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsError(f"{path} is not a BiomedParse v1 state dict (expected a mapping of tensor names to "
                           f"tensors).")
    return {k: v for k, v in sd.items() if k not in IGNORED_KEYS and not any(p in k for p in IGNORED_PARTS)}


def load_v1_weights(model: BiomedParseV1, path: Path) -> None:
    """Strict load: every tensor of the model present with its shape, nothing left over."""
    sd = read_v1_state_dict(path)
    check_state_dict(model, sd, str(path))
    assign_state_dict(model, sd)


def check_state_dict(model: nn.Module, sd: dict[str, Tensor], source: str) -> None:
    """WeightsError naming missing, unexpected and reshaped tensors (shapes only; works on meta)."""
    problems = key_mismatch(model.state_dict(), sd)
    if not problems:
        return
    raise WeightsError(f"{source} does not match BiomedParse v1 ({problems}). Is it the official "
                       "biomedparse_v1.pt? Delete it and download it again.")


def build_v1(cfg: Optional[V1Config] = None, device: str = "cpu") -> BiomedParseV1:
    cfg = cfg or V1Config()
    with torch.device(device):
        return BiomedParseV1(cfg).eval()


__all__ = ["V1Config", "REDUCED", "BiomedParseV1", "Encoded", "build_v1", "check_state_dict", "load_v1_weights",
           "read_v1_state_dict", "replace"]
