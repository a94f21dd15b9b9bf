"""SAT's segmentation network (``model/maskformer.py``) in plain torch, checkpoint-compatible.

Module names follow upstream's ``Maskformer`` so that the official state dict (minus the DDP
``module.`` prefix) loads strictly:

* ``backbone``: dynamic-network-architectures' ``PlainConvUNet`` (encoder ``stages.S.0.convs.I``,
  decoder ``transpconvs.S`` + ``stages.S.convs.I``). Every conv block registers its conv and norm
  twice (``convs.I.conv`` / ``convs.I.all_modules.0`` and ``convs.I.norm`` / ``convs.I.all_modules.1``),
  exactly as upstream, so both key names exist.
* ``projection_layer``: Linear-GELU-Linear-GELU on the concatenated multiscale tokens (encoder stage
  outputs average-pooled by 32/16/8/4/2 plus the bottleneck).
* ``transformer_decoder``: DETR-style pre-norm decoder (cross-attention only, ``norm1`` registered
  but unused, ReLU FFN) with a final LayerNorm; the text queries attend to the image tokens (keys
  get the fixed ``PositionalEncoding3D`` of the ``positional_encodings`` package, re-implemented
  here in :func:`positional_encoding_3d`).
* ``mask_embed_proj``: Linear-GELU-Linear-GELU to the per-pixel dimension; logits are the einsum of
  the decoder's full-resolution output with the mask embedding.

``SATNetwork`` splits upstream's ``forward(queries, image)`` into :meth:`SATNetwork.encode` (once per
patch batch) and :meth:`SATNetwork.decode` (any number of query chunks), ``forward`` does both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class SATConfig:
    """Architecture numbers; the defaults are SAT-Nano (upstream ``vision_backbone='UNET'``)."""

    features: tuple[int, ...] = (64, 64, 128, 256, 512, 768)
    n_conv: tuple[int, ...] = (2, 2, 2, 2, 2, 2)            # encoder, per stage
    n_conv_decoder: tuple[int, ...] = (2, 2, 2, 2, 2)       # decoder, bottleneck side first
    strides: tuple[int, ...] = (1, 2, 2, 2, 2, 2)
    in_channels: int = 3
    kernel_size: int = 3
    pool_sizes: tuple[int, ...] = (32, 16, 8, 4, 2)         # avg-pool of encoder stages 0..4
    patch_size: tuple[int, int, int] = (288, 288, 96)       # upstream crop_size (H, W, D)
    token_patch: tuple[int, int, int] = (32, 32, 32)        # upstream patch_size: H,W and D downsampling
    projection_hidden: int = 768                            # projection_layer: sum(features) -> hidden -> d_model
    d_model: int = 768
    decoder_layers: int = 6
    decoder_heads: int = 8
    decoder_ffn: int = 2048
    mask_hidden: int = 256                                  # mask_embed_proj: d_model -> hidden -> per_pixel_dim
    per_pixel_dim: int = 64

    @property
    def token_grid(self) -> tuple[int, int, int]:
        """Image tokens per patch (h, w, d): 9x9x3 for 288x288x96."""
        p = self.token_patch
        return (self.patch_size[0] // p[0], self.patch_size[1] // p[0], self.patch_size[2] // p[-1])


NANO = SATConfig()
PRO = SATConfig(features=(128, 128, 256, 512, 1024, 1536), n_conv=(3,) * 6, n_conv_decoder=(3,) * 5,
                projection_hidden=1536, mask_hidden=384, per_pixel_dim=128)
PRESETS = {"nano": NANO, "pro": PRO}


# ------------------------------------------------------------------------------------------------
# positional encoding (numerically identical to positional_encodings 6.0.1 PositionalEncoding3D)

def positional_encoding_3d(x: int, y: int, z: int, channels: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """(x, y, z, channels) sin/cos encoding: per axis ``c = ceil(channels/6)*2`` (made even) channels,
    interleaved sin/cos of ``pos * 10000^(-2i/c)``; axes x, y, z concatenated, cut to ``channels``."""
    c = int(np.ceil(channels / 6) * 2)
    if c % 2:
        c += 1
    inv_freq = 1.0 / (10000 ** (torch.arange(0, c, 2, device=device).float() / c))

    def emb(n: int) -> torch.Tensor:
        sin_inp = torch.einsum("i,j->ij", torch.arange(n, device=device).float(), inv_freq)
        return torch.flatten(torch.stack((sin_inp.sin(), sin_inp.cos()), dim=-1), -2, -1)

    out = torch.zeros((x, y, z, c * 3), device=device)
    out[:, :, :, :c] = emb(x)[:, None, None]
    out[:, :, :, c:2 * c] = emb(y)[:, None]
    out[:, :, :, 2 * c:] = emb(z)
    return out[..., :channels].to(dtype)


# ------------------------------------------------------------------------------------------------
# PlainConvUNet (dynamic-network-architectures), same module tree as upstream

class ConvDropoutNormReLU(nn.Module):
    """Conv3d -> InstanceNorm3d(affine) -> LeakyReLU(0.01); ``all_modules`` holds the same modules."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(cin, cout, kernel, stride, padding=(kernel - 1) // 2, bias=True)
        self.norm = nn.InstanceNorm3d(cout, eps=1e-5, affine=True)
        self.nonlin = nn.LeakyReLU()
        self.all_modules = nn.Sequential(self.conv, self.norm, self.nonlin)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.all_modules(x)


class StackedConvBlocks(nn.Module):
    def __init__(self, n: int, cin: int, cout: int, kernel: int, stride: int) -> None:
        super().__init__()
        self.convs = nn.Sequential(*[ConvDropoutNormReLU(cin if i == 0 else cout, cout, kernel, stride if i == 0 else 1)
                                     for i in range(n)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convs(x)


class PlainConvEncoder(nn.Module):
    def __init__(self, cfg: SATConfig) -> None:
        super().__init__()
        stages, cin = [], cfg.in_channels
        for f, n, s in zip(cfg.features, cfg.n_conv, cfg.strides):
            stages.append(nn.Sequential(StackedConvBlocks(n, cin, f, cfg.kernel_size, s)))
            cin = f
        self.stages = nn.Sequential(*stages)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        skips = []
        for stage in self.stages:
            x = stage(x)
            skips.append(x)
        return skips


class UNetDecoder(nn.Module):
    def __init__(self, cfg: SATConfig) -> None:
        super().__init__()
        f, n_stages = cfg.features, len(cfg.features)
        self.transpconvs = nn.ModuleList(
            nn.ConvTranspose3d(f[-s], f[-(s + 1)], cfg.strides[-s], cfg.strides[-s],
                               bias=True) for s in range(1, n_stages))
        self.stages = nn.ModuleList(
            StackedConvBlocks(cfg.n_conv_decoder[s - 1], 2 * f[-(s + 1)], f[-(s + 1)], cfg.kernel_size, 1)
            for s in range(1, n_stages))

    def forward(self, skips: Sequence[torch.Tensor]) -> torch.Tensor:
        """Only the full-resolution output (upstream without deep supervision returns just that)."""
        x = skips[-1]
        for s, (up, stage) in enumerate(zip(self.transpconvs, self.stages)):
            x = stage(torch.cat((up(x), skips[-(s + 2)]), 1))
        return x


class PlainConvUNet(nn.Module):
    def __init__(self, cfg: SATConfig) -> None:
        super().__init__()
        self.encoder = PlainConvEncoder(cfg)
        self.decoder = UNetDecoder(cfg)

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        skips = self.encoder(x)
        return skips, self.decoder(skips)


# ------------------------------------------------------------------------------------------------
# query decoder (model/transformer_decoder.py, normalize_before=True)

class TransformerDecoderLayer(nn.Module):
    def __init__(self, d_model: int, nhead: int, dim_feedforward: int) -> None:
        super().__init__()
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=0.0)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)  # registered upstream, unused by the pre-norm path
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        t = self.norm2(tgt)
        # upstream adds its float32 encoding to the (autocast: float16) memory; the sum is what autocast
        # casts at the key projection, so rounding it to memory's dtype here is the same (and works in pure fp16)
        t = self.multihead_attn(query=t, key=(memory + pos).to(memory.dtype), value=memory, need_weights=False)[0]
        tgt = tgt + t
        return tgt + self.linear2(F.relu(self.linear1(self.norm3(tgt))))


class TransformerDecoder(nn.Module):
    def __init__(self, cfg: SATConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(TransformerDecoderLayer(cfg.d_model, cfg.decoder_heads, cfg.decoder_ffn)
                                    for _ in range(cfg.decoder_layers))
        self.norm = nn.LayerNorm(cfg.d_model)

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            tgt = layer(tgt, memory, pos)
        return self.norm(tgt)


# ------------------------------------------------------------------------------------------------

class SATFeatures(NamedTuple):
    """What :meth:`SATNetwork.encode` returns (sequence-first like upstream)."""

    image_tokens: torch.Tensor   # (T, B, d_model) projected multiscale tokens, T = h*w*d
    pos: torch.Tensor            # (T, 1, d_model) positional encoding of the token grid (float32)
    per_pixel: torch.Tensor      # (B, per_pixel_dim, H, W, D) full-resolution decoder output


def _mlp(cin: int, hidden: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(cin, hidden), nn.GELU(), nn.Linear(hidden, cout), nn.GELU())


class SATNetwork(nn.Module):
    """Upstream ``Maskformer`` (UNET / UNET-L backbones, no deep supervision) with keys of the official state dict."""

    def __init__(self, cfg: SATConfig = NANO) -> None:
        super().__init__()
        if len(cfg.pool_sizes) != len(cfg.features) - 1:
            raise ValueError("SATConfig.pool_sizes needs one entry per encoder stage but the bottleneck")
        self.cfg = cfg
        self.backbone = PlainConvUNet(cfg)
        self.projection_layer = _mlp(sum(cfg.features), cfg.projection_hidden, cfg.d_model)
        self.transformer_decoder = TransformerDecoder(cfg)
        self.query_proj = nn.Identity()  # upstream: an MLP only for UNET-H (d_model 1536)
        self.mask_embed_proj = _mlp(cfg.d_model, cfg.mask_hidden, cfg.per_pixel_dim)

    def check_image(self, image: torch.Tensor) -> None:
        bottleneck = int(np.prod(self.cfg.strides))
        if image.ndim != 5 or image.shape[1] != self.cfg.in_channels or any(s % bottleneck for s in image.shape[2:]):
            raise ValueError(f"SAT expects an image (B, {self.cfg.in_channels}, H, W, D) with H, W, D multiples of "
                             f"{bottleneck}; got {tuple(image.shape)}")

    def encode(self, image: torch.Tensor) -> SATFeatures:
        """image (B, 3, H, W, D) -> tokens, positional encoding, per-pixel embedding.

        Upstream fixes the token grid at construction (crop_size // patch_size); here it follows the
        input, which is identical for the configured patch size."""
        self.check_image(image)
        skips, per_pixel = self.backbone(image)
        pooled = [F.avg_pool3d(s, k, k) for s, k in zip(skips[:-1], self.cfg.pool_sizes)] + [skips[-1]]
        tokens = torch.cat(pooled, dim=1)                          # B C h w d
        b, _, h, w, d = tokens.shape
        tokens = self.projection_layer(tokens.permute(0, 2, 3, 4, 1))  # B h w d dim
        tokens = tokens.reshape(b, h * w * d, -1).transpose(0, 1)  # (h w d) B dim
        pos = positional_encoding_3d(h, w, d, self.cfg.d_model, device=tokens.device)  # float32, as upstream
        return SATFeatures(tokens, pos.reshape(h * w * d, 1, -1), per_pixel)

    def mask_embedding(self, features: SATFeatures, queries: torch.Tensor) -> torch.Tensor:
        """queries (N, d) shared by the batch, or (B, N, d) -> mask embedding (B, N, per_pixel_dim)."""
        b = features.image_tokens.shape[1]
        if queries.ndim == 2:
            q = queries[:, None].expand(-1, b, -1)                 # N B dim
        elif queries.ndim == 3 and queries.shape[0] == b:
            q = queries.transpose(0, 1)
        else:
            raise ValueError(f"queries must be (N, {self.cfg.d_model}) or ({b}, N, {self.cfg.d_model}); "
                             f"got {tuple(queries.shape)}")
        q = self.query_proj(q)
        emb = self.transformer_decoder(q, features.image_tokens, features.pos)  # N B dim
        return self.mask_embed_proj(emb.transpose(0, 1))           # B N c

    def decode(self, features: SATFeatures, queries: torch.Tensor) -> torch.Tensor:
        """Logits (B, N, H, W, D) for queries (N, d) or (B, N, d)."""
        emb = self.mask_embedding(features, queries)
        return torch.einsum("bchwd,bnc->bnhwd", features.per_pixel, emb)

    def forward(self, image: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(image), queries)
