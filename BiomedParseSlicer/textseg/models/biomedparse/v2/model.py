"""BiomedParse v2 network (upstream ``src/model/biomedparse_3D.BiomedParseModel``, eval path) for one slice batch.

State-dict keys equal upstream's after the loader strips ``model.``: ``pixel_mean``/``pixel_std`` (1,3,1,1),
``backbone.*`` (FocalNet-L), ``sem_seg_head.pixel_decoder.*`` (transformer-encoder FPN), and
``sem_seg_head.predictor.*`` (``v2.decoder``) with the text encoder under
``sem_seg_head.predictor.language_encoder.{encoder_transformer.*, lang_proj, logit_scale}``. The backbone,
pixel decoder and text transformer are the modules shared with v1 (``focal``, ``pixel_decoder``, ``text``).

Split for the adapter: ``encode`` (backbone + pixel decoder, once per slice batch), ``embed_prompts`` (text,
once per call) and ``decode`` (the BoltzFormer decoder for a group of prompts on the encoded batch).
Upstream's ``get_text_embeddings(self.classes)`` (17 classes x 81 templates, unused by masks and existence)
is skipped.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch
from torch import Tensor, nn

from .decoder import BoltzFormerDecoder, Sampling
from .preprocess import PIXEL_MEAN, PIXEL_STD


@dataclass(frozen=True)
class V2Config:
    image_size: int = 512
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
    dec_layers: int = 9
    num_queries: int = 16
    edge_queries: int = 4
    dim_proj: int = 512
    text_width: int = 512
    text_heads: int = 8
    text_layers: int = 12
    context_length: int = 77
    vocab_size: int = 49408


class LanguageEncoder(nn.Module):
    """``sem_seg_head.predictor.language_encoder``: CLIP-style causal transformer + projection + logit scale."""

    def __init__(self, cfg: V2Config) -> None:
        super().__init__()
        from ..text import TextTransformer  # shared with v1

        self.encoder_transformer = TextTransformer(context_length=cfg.context_length, vocab_size=cfg.vocab_size,
                                                   width=cfg.text_width, layers=cfg.text_layers, heads=cfg.text_heads)
        self.lang_proj = nn.Parameter(torch.zeros(cfg.text_width, cfg.dim_proj))
        self.logit_scale = nn.Parameter(torch.ones([]))

    def forward(self, input_ids: Tensor) -> Tensor:
        """Projected token embeddings (N, L, D) (upstream ``forward_language_token``, norm=False)."""
        return self.encoder_transformer(input_ids) @ self.lang_proj


class SemSegHead(nn.Module):
    def __init__(self, cfg: V2Config) -> None:
        super().__init__()
        from ..pixel_decoder import TransformerEncoderPixelDecoder  # shared with v1

        chans = [cfg.embed_dim * 2 ** i for i in range(4)]
        self.pixel_decoder = TransformerEncoderPixelDecoder(in_channels=chans, conv_dim=cfg.conv_dim,
                                                            mask_dim=cfg.mask_dim,
                                                            nheads=cfg.nheads, dim_feedforward=cfg.dim_feedforward,
                                                            enc_layers=cfg.enc_layers)
        self.predictor = BoltzFormerDecoder(cfg.hidden_dim, cfg.dim_proj, cfg.num_queries, cfg.nheads,
                                            cfg.dim_feedforward, cfg.dec_layers, cfg.mask_dim)
        self.predictor.language_encoder = LanguageEncoder(cfg)


@dataclass
class Encoded:
    mask_features: Tensor  # (B, C, S/4, S/4)
    memory: tuple  # decoder-ready (src, pos, sizes) of the three scales


@dataclass
class Prompts:
    tokens: Tensor  # (T, P, C) grounding tokens, padding rows zero
    padding: Tensor  # (P, T) True at padding


@dataclass
class Decoded:
    masks: Tensor  # (B, P, S/4, S/4) mean of the segmentation queries' logits
    edges: Optional[Tensor]  # (B, P, S/4, S/4) mean of the edge queries' logits
    existence: Tensor  # (B, P) logits


class BiomedParseV2(nn.Module):
    def __init__(self, cfg: V2Config = V2Config()) -> None:
        super().__init__()
        from ..focal import FocalNet  # shared with v1

        self.cfg = cfg
        self.backbone = FocalNet(embed_dim=cfg.embed_dim, depths=cfg.depths, focal_levels=cfg.focal_levels,
                                 focal_windows=cfg.focal_windows)
        self.sem_seg_head = SemSegHead(cfg)
        self.register_buffer("pixel_mean", torch.full((1, 3, 1, 1), PIXEL_MEAN))  # stored in the checkpoint
        self.register_buffer("pixel_std", torch.full((1, 3, 1, 1), PIXEL_STD))

    @property
    def predictor(self) -> BoltzFormerDecoder:
        return self.sem_seg_head.predictor

    def encode(self, images: Tensor) -> Encoded:
        """images: (B, 3, S, S) packed slices in 0..255; upstream normalises with the buffers' means."""
        x = (images.float() - self.pixel_mean.mean()) / self.pixel_std.mean()
        out = self.sem_seg_head.pixel_decoder.forward_features(self.backbone(x))
        return Encoded(out[0], self.predictor.prepare_memory(list(out[-1])))

    def embed_prompts(self, input_ids: Tensor, attention_mask: Tensor) -> Prompts:
        """Grounding tokens: each prompt's non-pad tokens, padded across prompts with zero rows (encode_prompts)."""
        emb = self.predictor.language_encoder(input_ids)
        rows = [e[m.bool()] for e, m in zip(emb, attention_mask)]
        tokens = nn.utils.rnn.pad_sequence(rows)  # (T, P, C), zeros; upstream pads -1 then zeroes those rows
        lengths = torch.tensor([len(r) for r in rows], device=emb.device)
        padding = torch.arange(tokens.shape[0], device=emb.device)[None] >= lengths[:, None]
        return Prompts(tokens, padding)

    def decode(self, enc: Encoded, prompts: Prompts, sampling: Optional[Sampling] = None,
               compat_upstream: bool = False) -> Decoded:
        """All prompts on all slices of ``enc``; rows slice-major, prompt-minor (upstream's tiling)."""
        b, p = enc.mask_features.shape[0], prompts.tokens.shape[1]
        src, pos, sizes = enc.memory
        memory = ([s.repeat_interleave(p, 1) for s in src], [q.repeat_interleave(p, 1) for q in pos], sizes)
        # no prompt padded (one prompt, or equal lengths): no mask at all, upstream's computation
        padding = None if compat_upstream or not bool(prompts.padding.any()) else prompts.padding.repeat(b, 1)
        out = self.predictor(None, enc.mask_features.repeat_interleave(p, 0), prompts.tokens.repeat(1, b, 1),
                             padding, sampling, memory=memory)
        e = self.cfg.edge_queries
        masks = out.masks[:, : out.masks.shape[1] - e].mean(1)
        edges = out.masks[:, -e:].mean(1) if e else None
        shape = (b, p) + tuple(masks.shape[-2:])
        return Decoded(masks.view(shape), edges.view(shape) if e else None, out.existence.view(b, p))


REDUCED = V2Config(image_size=64, embed_dim=8, depths=(1, 1, 1, 1), focal_levels=(2, 2, 2, 2), conv_dim=32,
                   mask_dim=32, enc_layers=1, hidden_dim=32, nheads=4, dim_feedforward=64, dec_layers=3,
                   num_queries=6, edge_queries=2, dim_proj=32, text_width=32, text_heads=4, text_layers=1)


def build_v2(cfg: Optional[V2Config] = None, device: str = "cpu") -> BiomedParseV2:
    with torch.device(device):
        return BiomedParseV2(cfg or V2Config()).eval()


__all__ = ["V2Config", "REDUCED", "BiomedParseV2", "Encoded", "Prompts", "Decoded", "build_v2", "replace"]
