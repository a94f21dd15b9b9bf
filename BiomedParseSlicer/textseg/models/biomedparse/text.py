"""[Shared with v2; written on branch bpv1 as the fallback while bpv2 had none - replace with bpv2's version on merge, keeping the key names.]
CLIP-style causal text transformer of BiomedParse (X-Decoder ``LangEncoder/transformer.py``), plain
torch; key names equal upstream (``token_embedding``, ``positional_embedding``,
``resblocks.{i}.{attn, ln_1, mlp.c_fc, mlp.c_proj, ln_2}``, ``ln_final``). QuickGELU, LayerNorm eps
1e-12, causal mask; returns the final hidden states (N, L, width).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn


class QuickGELU(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1 = nn.LayerNorm(width, eps=1e-12)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, width * 4)), ("gelu", QuickGELU()),
                                              ("c_proj", nn.Linear(width * 4, width))]))
        self.ln_2 = nn.LayerNorm(width, eps=1e-12)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class TextTransformer(nn.Module):
    def __init__(self, context_length: int = 77, vocab_size: int = 49408, width: int = 512, layers: int = 12,
                 heads: int = 8) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.zeros(context_length, width))
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads) for _ in range(layers))
        self.ln_final = nn.LayerNorm(width, eps=1e-12)
        self.context_length = context_length

    def forward(self, input_ids: Tensor) -> Tensor:
        n = input_ids.shape[1]
        mask = torch.full((n, n), float("-inf"), device=input_ids.device).triu_(1)
        x = (self.token_embedding(input_ids) + self.positional_embedding[:n]).permute(1, 0, 2)
        for block in self.resblocks:
            x = block(x, mask)
        return self.ln_final(x.permute(1, 0, 2))
