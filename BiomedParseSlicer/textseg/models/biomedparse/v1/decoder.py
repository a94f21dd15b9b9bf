"""BiomedParse v1 grounding decoder (SEEM / X-Decoder ``seem_demo`` restricted to text grounding).

Parameter names equal upstream's ``sem_seg_head.predictor.*`` (below that prefix), so the official
checkpoint loads strictly. Modules that the text-grounding path never runs but that the checkpoint
holds (``pn_indicator``, ``mask_sptial_embed``, ``spatial_embed``, ``spatial_featured``) are kept as
plain parameters.

What one forward does (upstream ``SEEMDecoder.forward`` with task ``demo`` and only the grounding
switch on): 101 learnable object queries cross-attend, layer by layer, to the three pixel-decoder
scales in round-robin (strides 32, 16, 8), masked by the previous prediction (``sigmoid < 0.5`` is
blocked; a fully blocked row is unblocked). In self-attention the queries and the prompt's grounding
tokens attend to each other (tokens carry themselves as positional embedding); tokens never
cross-attend. Each prediction head yields mask logits at stride 4 (``mask_embed · mask_features``)
and a caption embedding (``decoder_norm(q) @ class_embed``).

Prompt semantics (``concat_prompts``):

* default (False): each prompt is decoded on its own; prompts of one call are batched, their token
  sequences padded and masked, so a prompt's result never depends on the other prompts.
* compat (True): upstream's ``evaluate_demo``: the non-pad tokens of *all* prompts are concatenated
  into one grounding sequence, so each prompt's mask is influenced by the other prompts of the call.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def sine_position_embedding(x: Tensor, num_pos_feats: int) -> Tensor:
    """DETR/Mask2Former ``PositionEmbeddingSine(normalize=True)`` (scale 2π, eps 1e-6, T=10000)."""
    b, _, h, w = x.shape
    ones = torch.ones((b, h, w), dtype=x.dtype, device=x.device)
    y = ones.cumsum(1)
    xx = ones.cumsum(2)
    eps, scale = 1e-6, 2 * math.pi
    y = y / (y[:, -1:, :] + eps) * scale
    xx = xx / (xx[:, :, -1:] + eps) * scale
    dim_t = torch.arange(num_pos_feats, dtype=x.dtype, device=x.device)
    dim_t = 10000 ** (2 * (dim_t // 2) / num_pos_feats)
    px, py = xx[..., None] / dim_t, y[..., None] / dim_t
    px = torch.stack((px[..., 0::2].sin(), px[..., 1::2].cos()), dim=4).flatten(3)
    py = torch.stack((py[..., 0::2].sin(), py[..., 1::2].cos()), dim=4).flatten(3)
    return torch.cat((py, px), dim=3).permute(0, 3, 1, 2)


def padding_attn_mask(key_padding_mask: Optional[Tensor], heads: int, tgt_len: int) -> Optional[Tensor]:
    """(B, S) key padding (True = ignore) -> the (B*heads, tgt_len, S) attention mask ``nn.MultiheadAttention``
    builds from ``key_padding_mask`` (same values, same result). Passing it as ``attn_mask`` skips torch's
    key-padding shape check, whose first call imports sympy (about 1 s per process on a CPU, torch 2.x)."""
    if key_padding_mask is None:
        return None
    b, s = key_padding_mask.shape
    return key_padding_mask[:, None, None].expand(b, heads, tgt_len, s).reshape(b * heads, tgt_len, s)


class SelfAttentionLayer(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d, heads)
        self.norm = nn.LayerNorm(d)

    def forward(self, x: Tensor, pos: Tensor, key_padding_mask: Optional[Tensor] = None) -> Tensor:
        q = x + pos
        mask = padding_attn_mask(key_padding_mask, self.self_attn.num_heads, x.shape[0])
        return self.norm(x + self.self_attn(q, q, x, attn_mask=mask, need_weights=False)[0])


class CrossAttentionLayer(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.multihead_attn = nn.MultiheadAttention(d, heads)
        self.norm = nn.LayerNorm(d)

    def forward(self, x: Tensor, memory: Tensor, mask: Tensor, pos: Tensor, query_pos: Tensor) -> Tensor:
        out = self.multihead_attn(x + query_pos, memory + pos, memory, attn_mask=mask, need_weights=False)[0]
        return self.norm(x + out)


class FFNLayer(nn.Module):
    def __init__(self, d: int, ffn: int) -> None:
        super().__init__()
        self.linear1 = nn.Linear(d, ffn)
        self.linear2 = nn.Linear(ffn, d)
        self.norm = nn.LayerNorm(d)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x + self.linear2(F.relu(self.linear1(x))))


class MLP(nn.Module):
    def __init__(self, d_in: int, d_hidden: int, d_out: int, n: int) -> None:
        super().__init__()
        dims = [d_in] + [d_hidden] * (n - 1)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, dims[1:] + [d_out]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class SEEMGroundingDecoder(nn.Module):
    """``sem_seg_head.predictor`` of BiomedParse v1 (``lang_encoder`` is attached by the model)."""

    num_feature_levels = 3

    def __init__(self, hidden_dim: int = 512, dim_proj: int = 512, num_queries: int = 101, nheads: int = 8,
                 dim_feedforward: int = 2048, dec_layers: int = 9, mask_dim: int = 512,
                 spatial_memories: int = 32) -> None:
        super().__init__()
        self.num_heads, self.num_layers, self.num_queries = nheads, dec_layers, num_queries
        self.hidden_dim = hidden_dim
        self.transformer_self_attention_layers = nn.ModuleList(SelfAttentionLayer(hidden_dim,
                                                                                  nheads) for _ in range(dec_layers))
        self.transformer_cross_attention_layers = nn.ModuleList(CrossAttentionLayer(hidden_dim,
                                                                                    nheads) for _ in range(dec_layers))
        self.transformer_ffn_layers = nn.ModuleList(FFNLayer(hidden_dim, dim_feedforward) for _ in range(dec_layers))
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.query_feat = nn.Embedding(num_queries, hidden_dim)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.pn_indicator = nn.Embedding(2, hidden_dim)  # spatial prompts only (unused here)
        self.level_embed = nn.Embedding(self.num_feature_levels, hidden_dim)
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)
        self.class_embed = nn.Parameter(torch.zeros(hidden_dim, dim_proj))
        self.mask_sptial_embed = nn.ParameterList(nn.Parameter(torch.zeros(hidden_dim, hidden_dim)) for _ in range(3))
        self.spatial_embed = nn.Embedding(spatial_memories, hidden_dim)
        self.spatial_featured = nn.Embedding(spatial_memories, hidden_dim)

    # ------------------------------------------------------------------------------------------
    def prepare_memory(self, features: list[Tensor]) -> tuple[list[Tensor], list[Tensor], list[tuple[int, int]]]:
        """Flattened (HW, B, C) sources + level embedding, sine positions, sizes (upstream prepare_features)."""
        src, pos, sizes = [], [], []
        for i, x in enumerate(features[: self.num_feature_levels]):
            sizes.append(tuple(x.shape[-2:]))
            pos.append(sine_position_embedding(x, self.hidden_dim // 2).flatten(2).permute(2, 0, 1))
            src.append((x.flatten(2) + self.level_embed.weight[i][None, :, None]).permute(2, 0, 1))
        return src, pos, sizes

    def mask_logits(self, emb: Tensor, mask_features: Tensor, group: int = 1) -> Tensor:
        """Mask logits (N, Q, h, w) of mask embeddings (N, Q, C), N = B*group in slice-major order,
        over mask features (B, C, h, w) shared by the group (no copy of the features)."""
        b = mask_features.shape[0]
        n, q, c = emb.shape
        m = torch.einsum("bqc,bchw->bqhw", emb.reshape(b, group * q, c), mask_features)
        return m.reshape(n, q, *m.shape[-2:])

    def heads(self, queries: Tensor, mask_features: Tensor, target: Optional[tuple[int, int]],
              low_res: Optional[Tensor], group: int):
        """Prediction head: mask embeddings (N,Q,C), captions (N,Q,D), attention mask for the next layer.

        Upstream computes the stride-4 logits of every query and resizes them bilinearly to the next
        layer's scale; with ``low_res`` (the mask features resized to that scale) the same linear map is
        applied in the other order, which skips the full-resolution logits."""
        out = self.decoder_norm(queries).transpose(0, 1)
        caption = out @ self.class_embed
        emb = self.mask_embed(out)
        attn = None
        if target is not None:
            if low_res is not None:
                small = self.mask_logits(emb, low_res, group)
            else:
                small = F.interpolate(self.mask_logits(emb, mask_features, group), size=target, mode="bilinear",
                                      align_corners=False)
            attn = (small.sigmoid().flatten(2) < 0.5).unsqueeze(1).expand(-1, self.num_heads, -1, -1).flatten(0, 1)
            attn = attn.clone()
            attn[attn.all(-1)] = False
        return emb, caption, attn

    def forward(self, features: Optional[list[Tensor]], mask_features: Tensor, tokens: Tensor,
                token_padding: Optional[Tensor] = None, memory=None, group: int = 1,
                low_res_attention: bool = True) -> tuple[Tensor, Tensor]:
        """Decode.

        features: three scales (B, C, h, w) (strides 32, 16, 8) or ``memory`` from ``prepare_memory``
        (its sources/positions repeated ``group`` times per slice); mask_features (B, C, H/4, W/4);
        tokens: grounding tokens (T, N, C), N = B*group (slice-major); token_padding: (N, T) True where
        a token is padding. Returns the last head's mask embeddings (N, Q, C) (``mask_logits`` turns
        them into stride-4 logits) and captions (N, Q, dim_proj).
        """
        src, pos, sizes = memory if memory is not None else self.prepare_memory(features)
        n = tokens.shape[1]
        q = self.num_queries
        low = [None] * 3
        if low_res_attention:
            low = [F.interpolate(mask_features, size=s, mode="bilinear", align_corners=False) for s in sizes]
        query_pos = self.query_embed.weight.unsqueeze(1).expand(-1, n, -1)
        output = self.query_feat.weight.unsqueeze(1).expand(-1, n, -1)
        sa_pos = torch.cat([query_pos, tokens])
        kpm = None
        if token_padding is not None:
            kpm = torch.cat([torch.zeros((n, q), dtype=torch.bool, device=tokens.device), token_padding], 1)
        state = torch.cat([output, tokens])
        emb, caption, attn = self.heads(output, mask_features, sizes[0], low[0], group)
        for i in range(self.num_layers):
            level = i % self.num_feature_levels
            output = self.transformer_cross_attention_layers[i](state[:q], src[level], attn, pos[level], query_pos)
            state = torch.cat([output, state[q:]])
            state = self.transformer_self_attention_layers[i](state, sa_pos, kpm)
            state = self.transformer_ffn_layers[i](state)
            nxt = (i + 1) % self.num_feature_levels
            last = i == self.num_layers - 1
            emb, caption, attn = self.heads(state[:q], mask_features, None if last else sizes[nxt], low[nxt], group)
        return emb, caption


def vl_similarity(v_emb: Tensor, t_emb: Tensor, logit_scale: Tensor) -> Tensor:
    """Upstream query selection score: clamp(exp(logit_scale), max=100) · cos(v, t) (eps 1e-7 norms)."""
    v = v_emb / (v_emb.norm(dim=-1, keepdim=True) + 1e-7)
    t = t_emb / (t_emb.norm(dim=-1, keepdim=True) + 1e-7)
    return logit_scale.exp().clamp(max=100) * (v @ t.transpose(-1, -2))
