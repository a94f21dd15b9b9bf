"""BiomedParse v2 predictor: BoltzFormer text decoder with the existence classifier.

Parameter names equal upstream's ``sem_seg_head.predictor.*`` (v2 @ f571d5c,
``src/model/transformer_decoder/boltzformer_cls_decoder.py``) below that prefix; the language encoder is
attached by the model as ``language_encoder``. Layers are the Mask2Former post-norm layers shared with v1.

One forward (upstream ``BoltzFormerTextDecoder.forward``): 16 learnable queries (the last ``edge_queries``
predict edges) and the prompt's grounding tokens first pass an initial self-attention + FFN
(``pre_self_attention``); then per layer i: masked cross-attention to scale i % 3 (coarsest first), the mask
being Boltzmann-sampled from the previous head's prediction; self-attention over [queries ; text tokens]
(query pos = ``query_embed_``, text pos = the original tokens); FFN on the queries; a prediction head; and
the classifier query cross-attends to [queries ; text] (+ FFN). Existence = ``classifier(cls_query)``.

Prompt semantics:

* ``compat_upstream=True``: prompts of a call are padded with zero rows that every query attends to, and
  the sampling draws one ``rand`` per head for the whole batch from ``generator`` (= upstream's
  ``torch.manual_seed(seed)`` + ``rand_like``): bit-for-bit upstream's RNG order.
* default: padding is masked (key padding mask in the self-attention and the classifier), and each
  (slice, prompt) row draws its own random numbers from a generator seeded by ``row_seeds``, so a prompt's
  result does not depend on the other prompts of the call nor on the slice batching.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..v1.decoder import (
    MLP,
    CrossAttentionLayer,
    FFNLayer,
    SelfAttentionLayer,
    padding_attn_mask,
    sine_position_embedding,
)
from .boltzmann import boltzmann_attention_mask, open_full_rows


@dataclass
class Sampling:
    """Upstream ``boltzmann_sampling`` (biomedparse_3D config) plus our switches."""

    threshold: float = 1.1
    sample_ratio: float = 0.1
    base_temp: float = 1.0
    deterministic: bool = False  # True: full attention (no sampling; threshold 1.1 masks nothing)
    generator: Optional[torch.Generator] = None  # compat: one generator, upstream's call order
    row_seeds: Optional[Sequence[int]] = None  # default: one seed per batch row (slice, prompt)


class KeyMaskedCrossAttention(CrossAttentionLayer):
    """The classifier's cross-attention; ``key_padding_mask`` hides padded text tokens (default mode)."""

    def forward(self, x: Tensor, memory: Tensor, pos: Tensor, key_padding_mask: Optional[Tensor] = None) -> Tensor:
        mask = padding_attn_mask(key_padding_mask, self.multihead_attn.num_heads, x.shape[0])
        out = self.multihead_attn(x, memory + pos, memory, attn_mask=mask, need_weights=False)[0]
        return self.norm(x + out)


@dataclass
class DecoderOutput:
    masks: Tensor  # (B, num_queries, H/4, W/4) logits of the last head
    existence: Tensor  # (B, 1) logit


class BoltzFormerDecoder(nn.Module):
    num_feature_levels = 3

    def __init__(self, hidden_dim: int = 512, dim_proj: int = 512, num_queries: int = 16, nheads: int = 8,
                 dim_feedforward: int = 2048, dec_layers: int = 9, mask_dim: int = 512) -> None:
        super().__init__()
        self.num_heads, self.num_layers, self.num_queries, self.hidden_dim = nheads, dec_layers, num_queries, hidden_dim
        layers = range(dec_layers)
        self.initial_self_attention_layer = SelfAttentionLayer(hidden_dim, nheads)
        self.initial_ffn_layer = FFNLayer(hidden_dim, dim_feedforward)
        self.transformer_self_attention_layers = nn.ModuleList(SelfAttentionLayer(hidden_dim, nheads) for _ in layers)
        self.transformer_cross_attention_layers = nn.ModuleList(CrossAttentionLayer(hidden_dim, nheads) for _ in layers)
        self.transformer_ffn_layers = nn.ModuleList(FFNLayer(hidden_dim, dim_feedforward) for _ in layers)
        self.classifier_cross_attention_layers = nn.ModuleList(KeyMaskedCrossAttention(hidden_dim,
                                                                                       nheads) for _ in layers)
        self.classifier_ffn_layers = nn.ModuleList(FFNLayer(hidden_dim, dim_feedforward) for _ in layers)
        self.classifier = nn.Linear(hidden_dim, 1)
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.query_feat_ = nn.Embedding(num_queries, hidden_dim)
        self.query_embed_ = nn.Embedding(num_queries, hidden_dim)
        self.classifier_query = nn.Embedding(1, hidden_dim)
        self.level_embed = nn.Embedding(self.num_feature_levels, hidden_dim)
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)
        self.class_embed = nn.Parameter(torch.zeros(hidden_dim, dim_proj))  # v1-compat caption head, unused

    def prepare_memory(self, features: list[Tensor]):
        """Flattened (HW, B, C) sources + level embedding, sine positions, sizes (coarsest first)."""
        src, pos, sizes = [], [], []
        for i, x in enumerate(features[: self.num_feature_levels]):
            sizes.append(tuple(x.shape[-2:]))
            pos.append(sine_position_embedding(x, self.hidden_dim // 2).flatten(2).permute(2, 0, 1))
            src.append((x.flatten(2) + self.level_embed.weight[i][None, :, None]).permute(2, 0, 1))
        return src, pos, sizes

    def head(self, queries: Tensor, mask_features: Tensor, target, layer_id: int, sampling: Sampling):
        out = self.decoder_norm(queries).transpose(0, 1)
        masks = torch.einsum("bqc,bchw->bqhw", self.mask_embed(out), mask_features)
        prob = F.interpolate(masks, size=target, mode="bilinear", align_corners=False).sigmoid().flatten(2)
        return masks, self._sample(prob, layer_id, sampling)

    def _sample(self, prob: Tensor, layer_id: int, s: Sampling) -> Tensor:
        kw = dict(threshold=s.threshold, sample_ratio=s.sample_ratio, base_temp=s.base_temp,
                  deterministic=s.deterministic)
        h = self.num_heads
        if s.deterministic or s.row_seeds is None:
            # upstream: repeat over heads, then one draw of shape (B*heads, Q, HW)
            rep = prob.unsqueeze(1).repeat(1, h, 1, 1).flatten(0, 1)
            return boltzmann_attention_mask(rep, layer_id, generator=s.generator, **kw)
        rows = []
        for b, seed in enumerate(s.row_seeds):
            g = torch.Generator(device=prob.device).manual_seed((int(seed) * 1009 + layer_id + 1) % (2 ** 63))
            rows.append(boltzmann_attention_mask(prob[b:b + 1].unsqueeze(1).repeat(1, h, 1, 1).flatten(0, 1),
                                                 layer_id, generator=g, **kw))
        return torch.cat(rows)

    def forward(self, features: list[Tensor], mask_features: Tensor, tokens: Tensor,
                token_padding: Optional[Tensor] = None, sampling: Optional[Sampling] = None,
                memory=None) -> DecoderOutput:
        """features: 3 scales (B, C, h, w); mask_features (B, C, H/4, W/4); tokens (T, B, C) grounding tokens
        (padded rows zero); token_padding (B, T) True at padding = masked (None: upstream, unmasked)."""
        sampling = sampling or Sampling()
        src, pos, sizes = memory if memory is not None else self.prepare_memory(features)
        b, q = mask_features.shape[0], self.num_queries
        query_pos = self.query_embed_.weight.unsqueeze(1).repeat(1, b, 1)
        output = self.query_feat_.weight.unsqueeze(1).repeat(1, b, 1)
        cls = self.classifier_query.weight.unsqueeze(1).repeat(1, b, 1)
        sa_pos = torch.cat([query_pos, tokens])
        kpm = None
        if token_padding is not None:
            kpm = torch.cat([torch.zeros((b, q), dtype=torch.bool, device=tokens.device), token_padding], 1)
        state = self.initial_self_attention_layer(torch.cat([output, tokens]), sa_pos, kpm)
        output, text = self.initial_ffn_layer(state[:q]), state[q:]
        masks, attn = self.head(output, mask_features, sizes[0], -1, sampling)
        for i in range(self.num_layers):
            level = i % self.num_feature_levels
            attn = open_full_rows(attn)
            output = self.transformer_cross_attention_layers[i](output, src[level], attn, pos[level], query_pos)
            state = self.transformer_self_attention_layers[i](torch.cat([output, text]), sa_pos, kpm)
            output, text = self.transformer_ffn_layers[i](state[:q]), state[q:]
            masks, attn = self.head(output, mask_features, sizes[(i + 1) % self.num_feature_levels], i, sampling)
            cls = self.classifier_ffn_layers[i](self.classifier_cross_attention_layers[i](cls, state, sa_pos, kpm))
        return DecoderOutput(masks=masks, existence=self.classifier(cls[0]))


__all__ = ["BoltzFormerDecoder", "DecoderOutput", "Sampling"]
