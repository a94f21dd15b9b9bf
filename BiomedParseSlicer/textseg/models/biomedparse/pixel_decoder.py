"""Transformer-encoder FPN pixel decoder of BiomedParse (Mask2Former ``TransformerEncoderPixelDecoder``),
plain torch; key names equal upstream ``modeling/vision/encoder/transformer_encoder_fpn.py``.

res5 -> 1x1 ``input_proj`` -> post-norm transformer encoder (sine positions) -> ``layer_4`` (3x3 conv,
GN, ReLU); then top-down over res4..res2: ``adapter_i`` (1x1 conv, GN) + nearest-upsampled previous,
``layer_i`` (3x3 conv, GN, ReLU). ``mask_features``: 3x3 conv of the stride-4 map. The decoder scales
are the first three FPN outputs (strides 32, 16, 8). Convolutions followed by GroupNorm(32) have no bias.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from .v1.decoder import sine_position_embedding


class ConvNorm(nn.Conv2d):
    """detectron2-style Conv2d with a ``norm`` submodule and optional ReLU (keys ``weight``, ``norm.*``)."""

    def __init__(self, cin: int, cout: int, k: int, relu: bool) -> None:
        super().__init__(cin, cout, k, padding=k // 2, bias=False)
        self.norm = nn.GroupNorm(32, cout)
        self.relu = relu

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm(super().forward(x))
        return F.relu(x) if self.relu else x


class EncoderLayer(nn.Module):
    def __init__(self, d: int, heads: int, ffn: int) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d, heads)
        self.linear1 = nn.Linear(d, ffn)
        self.linear2 = nn.Linear(ffn, d)
        self.norm1 = nn.LayerNorm(d)
        self.norm2 = nn.LayerNorm(d)

    def forward(self, x: Tensor, pos: Tensor) -> Tensor:
        q = x + pos
        x = self.norm1(x + self.self_attn(q, q, x, need_weights=False)[0])
        return self.norm2(x + self.linear2(F.relu(self.linear1(x))))


class _Encoder(nn.Module):
    def __init__(self, d: int, heads: int, ffn: int, layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(d, heads, ffn) for _ in range(layers))


class TransformerEncoderOnly(nn.Module):
    def __init__(self, d: int, heads: int, ffn: int, layers: int) -> None:
        super().__init__()
        self.encoder = _Encoder(d, heads, ffn, layers)

    def forward(self, src: Tensor, pos: Tensor) -> Tensor:
        b, c, h, w = src.shape
        x = src.flatten(2).permute(2, 0, 1)
        p = pos.flatten(2).permute(2, 0, 1)
        for layer in self.encoder.layers:
            x = layer(x, p)
        return x.permute(1, 2, 0).view(b, c, h, w)


class TransformerEncoderPixelDecoder(nn.Module):
    def __init__(self, in_channels: Sequence[int], conv_dim: int = 512, mask_dim: int = 512, nheads: int = 8,
                 dim_feedforward: int = 2048, enc_layers: int = 6) -> None:
        super().__init__()
        n = len(in_channels)  # res2..res5
        for i in range(n - 1):
            self.add_module(f"adapter_{i + 1}", ConvNorm(in_channels[i], conv_dim, 1, relu=False))
            self.add_module(f"layer_{i + 1}", ConvNorm(conv_dim, conv_dim, 3, relu=True))
        self.input_proj = nn.Conv2d(in_channels[-1], conv_dim, kernel_size=1)
        self.transformer = TransformerEncoderOnly(conv_dim, nheads, dim_feedforward, enc_layers)
        self.add_module(f"layer_{n}", ConvNorm(conv_dim, conv_dim, 3, relu=True))
        self.mask_features = nn.Conv2d(conv_dim, mask_dim, kernel_size=3, padding=1)
        self.n, self.conv_dim = n, conv_dim

    def forward_features(self, features: dict[str, Tensor]) -> tuple[Tensor, Tensor, list[Tensor]]:
        """(mask_features, transformer output, [stride 32, 16, 8 maps]) as upstream."""
        names = [f"res{i + 2}" for i in range(self.n)]
        x = features[names[-1]]
        enc = self.transformer(self.input_proj(x), sine_position_embedding(x, self.conv_dim // 2))
        y = getattr(self, f"layer_{self.n}")(enc)
        scales = [y]
        for i in range(self.n - 2, -1, -1):
            lat = getattr(self, f"adapter_{i + 1}")(features[names[i]])
            y = getattr(self, f"layer_{i + 1}")(lat + F.interpolate(y, size=lat.shape[-2:], mode="nearest"))
            if len(scales) < 3:
                scales.append(y)
        return self.mask_features(y), enc, scales
