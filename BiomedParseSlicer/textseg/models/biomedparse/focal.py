"""FocalNet backbone (FocalNet-L configuration of BiomedParse v1/v2), plain torch.

Key names equal upstream ``modeling/vision/backbone/focal.py`` (``patch_embed.*``,
``layers.{i}.blocks.{j}.{norm1, modulation.{f, h, proj, focal_layers.{k}.0}, norm2, mlp.fc1/fc2,
gamma_1, gamma_2}``, ``layers.{i}.downsample.*``, ``norm{i}``). Inference only (no drop path).
Configuration as BiomedParse: conv patch embedding (stem k7 s4 p2, downsample k3 s2 p1), post-LN
blocks with layer scale, modulation divided by (focal_level + 1).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class FocalModulation(nn.Module):
    def __init__(self, dim: int, focal_level: int, focal_window: int, focal_factor: int = 2) -> None:
        super().__init__()
        self.focal_level = focal_level
        self.f = nn.Linear(dim, 2 * dim + focal_level + 1)
        self.h = nn.Conv2d(dim, dim, kernel_size=1)
        self.proj = nn.Linear(dim, dim)
        self.focal_layers = nn.ModuleList()
        for k in range(focal_level):
            ks = focal_factor * k + focal_window
            self.focal_layers.append(nn.Sequential(nn.Conv2d(dim, dim, ks, groups=dim, padding=ks // 2, bias=False),
                                                   nn.GELU()))

    def forward(self, x: Tensor) -> Tensor:  # (B, H, W, C)
        c = x.shape[-1]
        q, ctx, gates = torch.split(self.f(x).permute(0, 3, 1, 2), (c, c, self.focal_level + 1), 1)
        ctx_all = 0
        for lvl, layer in enumerate(self.focal_layers):
            ctx = layer(ctx)
            ctx_all = ctx_all + ctx * gates[:, lvl : lvl + 1]
        ctx_global = F.gelu(ctx.mean(2, keepdim=True).mean(3, keepdim=True))
        ctx_all = (ctx_all + ctx_global * gates[:, self.focal_level :]) / (self.focal_level + 1)
        return self.proj((q * self.h(ctx_all)).permute(0, 2, 3, 1))


class FocalModulationBlock(nn.Module):
    def __init__(self, dim: int, focal_level: int, focal_window: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.modulation = FocalModulation(dim, focal_level, focal_window)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.gamma_1 = nn.Parameter(torch.ones(dim))
        self.gamma_2 = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:  # (B, HW, C), post-LN
        b, n, c = x.shape
        x = x + self.gamma_1 * self.norm1(self.modulation(x.view(b, h, w, c)).view(b, n, c))
        return x + self.gamma_2 * self.norm2(self.mlp(x))


class PatchEmbed(nn.Module):
    def __init__(self, in_chans: int, embed_dim: int, stem: bool) -> None:
        super().__init__()
        self.patch = 4 if stem else 2
        k, s, p = (7, 4, 2) if stem else (3, 2, 1)
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=k, stride=s, padding=p)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        x = F.pad(x, (0, (-w) % self.patch, 0, (-h) % self.patch))
        x = self.proj(x)
        b, c, h, w = x.shape
        return self.norm(x.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(b, c, h, w)


class BasicLayer(nn.Module):
    def __init__(self, dim: int, depth: int, focal_level: int, focal_window: int, downsample: bool) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(FocalModulationBlock(dim, focal_level, focal_window) for _ in range(depth))
        self.downsample = PatchEmbed(dim, 2 * dim, stem=False) if downsample else None


class FocalNet(nn.Module):
    """Returns {"res2".."res5": (B, C_i, H/4/2^i, W/4/2^i)} with C_i = embed_dim * 2^i."""

    def __init__(self, embed_dim: int = 192, depths: Sequence[int] = (2, 2, 18, 2),
                 focal_levels: Sequence[int] = (4, 4, 4, 4), focal_windows: Sequence[int] = (3, 3, 3, 3),
                 in_chans: int = 3) -> None:
        super().__init__()
        n = len(depths)
        self.num_features = [embed_dim * 2 ** i for i in range(n)]
        self.patch_embed = PatchEmbed(in_chans, embed_dim, stem=True)
        self.layers = nn.ModuleList(
            BasicLayer(self.num_features[i], depths[i], focal_levels[i], focal_windows[i], i < n - 1) for i in range(n)
        )
        for i in range(n):
            self.add_module(f"norm{i}", nn.LayerNorm(self.num_features[i]))

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        x = self.patch_embed(x)
        h, w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        outs = {}
        for i, layer in enumerate(self.layers):
            for blk in layer.blocks:
                x = blk(x, h, w)
            out = getattr(self, f"norm{i}")(x)
            outs[f"res{i + 2}"] = out.view(-1, h, w, self.num_features[i]).permute(0, 3, 1, 2).contiguous()
            if layer.downsample is not None:
                x = layer.downsample(x.transpose(1, 2).reshape(x.shape[0], -1, h, w))
                h, w = x.shape[-2:]
                x = x.flatten(2).transpose(1, 2)
        return outs
