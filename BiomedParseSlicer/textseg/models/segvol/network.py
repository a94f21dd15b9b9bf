"""SegVol's network in plain torch, with the key names of the official checkpoint.

Parts (names as in the official state dict):

* ``image_encoder``: MONAI's ViT (perceptron patch embedding, learnable position embedding, no
  class token). Current MONAI builds it with ``proj_type``/``pos_embed_type`` (MONAI >= 1.4 removed
  the ``pos_embed=`` argument upstream passes); keys and math are unchanged.
* ``prompt_encoder``: the 3D SAM prompt encoder (random-Fourier positional encoding, 4 point
  embeddings + not-a-point, an unused mask branch kept for key compatibility).
* ``mask_decoder``: SAM's two-way transformer decoder in 3D plus SegVol's text-to-pixel
  similarity term (``txt_align_upscaled_embedding``) added to the mask logits.
* ``text_encoder``: transformers' ``CLIPTextModel`` (``clip_text_model``) and ``dim_align``.

``SegVolNet`` splits upstream's ``forward`` into ``encode_image`` (once per image or window),
``encode_text`` (once per prompt) and ``decode`` so that embeddings can be reused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...errors import WeightsError
from ..checkpoint import assign_state_dict, read_checkpoint

STALE_KEYS = ("text_encoder.clip_text_model.text_model.embeddings.position_ids",)
PREFIXES = ("module.", "model.")


@dataclass(frozen=True)
class SegVolConfig:
    """Architecture knobs; the defaults are the released SegVol (ViT-B, 32x256x256 input)."""

    img_size: tuple[int, int, int] = (32, 256, 256)
    patch_size: tuple[int, int, int] = (4, 16, 16)
    hidden_size: int = 768
    mlp_dim: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_heads: int = 8
    iou_head_hidden: int = 256
    mask_in_chans: int = 16
    text_config: dict[str, Any] = field(default_factory=dict)  # CLIPTextConfig overrides

    @property
    def feat_shape(self) -> tuple[int, int, int]:
        return tuple(int(s // p) for s, p in zip(self.img_size, self.patch_size))  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------------
# prompt encoder
class LayerNorm2d(nn.Module):
    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        return self.weight[:, None, None] * (x - u) / torch.sqrt(s + self.eps) + self.bias[:, None, None]


class PositionEmbeddingRandom(nn.Module):
    def __init__(self, num_pos_feats: int) -> None:
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", torch.randn((3, num_pos_feats)))

    def _pe_encoding(self, coords: torch.Tensor) -> torch.Tensor:
        coords = (2 * coords - 1) @ self.positional_encoding_gaussian_matrix
        coords = 2 * np.pi * coords
        return torch.cat([torch.sin(coords), torch.cos(coords)], dim=-1)

    def forward(self, size: Sequence[int]) -> torch.Tensor:
        h, w, d = size
        grid = torch.ones((h, w, d), device=self.positional_encoding_gaussian_matrix.device)
        y = (grid.cumsum(0) - 0.5) / h
        x = (grid.cumsum(1) - 0.5) / w
        z = (grid.cumsum(2) - 0.5) / d
        # Upstream's order (x, y, z) with x along axis 1: kept for checkpoint compatibility.
        return self._pe_encoding(torch.stack([x, y, z], dim=-1)).permute(3, 0, 1, 2)

    def forward_with_coords(self, coords: torch.Tensor, image_size: Sequence[int]) -> torch.Tensor:
        scale = torch.tensor([image_size[1], image_size[0], image_size[2]], dtype=torch.float32, device=coords.device)
        return self._pe_encoding(coords.float() / scale)


class PromptEncoder(nn.Module):
    def __init__(self, embed_dim: int, image_embedding_size: Sequence[int], input_image_size: Sequence[int],
                 mask_in_chans: int) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.input_image_size = tuple(input_image_size)
        self.image_embedding_size = tuple(image_embedding_size)
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)
        self.point_embeddings = nn.ModuleList([nn.Embedding(1, embed_dim) for _ in range(4)])
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        # Unused at inference (no mask prompts); present in the checkpoint.
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans // 4),
            nn.GELU(),
            nn.Conv2d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans),
            nn.GELU(),
            nn.Conv2d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def get_dense_pe(self) -> torch.Tensor:
        return self.pe_layer(self.image_embedding_size).unsqueeze(0)

    def _embed_points(self, points: torch.Tensor, labels: torch.Tensor, pad: bool) -> torch.Tensor:
        points = points + 0.5
        if pad:
            points = torch.cat([points, points.new_zeros((points.shape[0], 1, 3))], dim=1)
            labels = torch.cat([labels, -labels.new_ones((labels.shape[0], 1))], dim=1)
        emb = self.pe_layer.forward_with_coords(points, self.input_image_size)
        lab = labels[..., None]
        emb = torch.where(lab == -1, self.not_a_point_embed.weight, emb)
        emb = emb + (lab == 0) * self.point_embeddings[0].weight + (lab == 1) * self.point_embeddings[1].weight
        return emb

    def _embed_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        corners = self.pe_layer.forward_with_coords((boxes + 0.5).reshape(-1, 2, 3), self.input_image_size)
        return corners + torch.cat([self.point_embeddings[2].weight, self.point_embeddings[3].weight])[None]

    def forward(self, points, boxes, text_embedding) -> tuple[torch.Tensor, torch.Tensor]:
        parts = []
        if points is not None:
            parts.append(self._embed_points(points[0], points[1], pad=boxes is None))
        if boxes is not None:
            parts.append(self._embed_boxes(boxes))
        if text_embedding is not None:
            parts.append(text_embedding[:, None])
        bs = parts[0].shape[0] if parts else 1
        sparse = torch.cat(parts, dim=1) if parts else self.no_mask_embed.weight.new_zeros((1, 0, self.embed_dim))
        dense = self.no_mask_embed.weight.reshape(1, -1, 1, 1, 1).expand(bs, -1, *self.image_embedding_size)
        return sparse, dense


# ------------------------------------------------------------------------------------------------
# mask decoder
class MLPBlock(nn.Module):
    def __init__(self, dim: int, mlp_dim: int) -> None:
        super().__init__()
        self.lin1 = nn.Linear(dim, mlp_dim)
        self.lin2 = nn.Linear(mlp_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(F.relu(self.lin1(x)))


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, downsample_rate: int = 1) -> None:
        super().__init__()
        inner = dim // downsample_rate
        self.num_heads = num_heads
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(dim, inner), nn.Linear(dim, inner), nn.Linear(dim, inner)
        self.out_proj = nn.Linear(inner, dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = F.scaled_dot_product_attention(self._heads(self.q_proj(q)), self._heads(self.k_proj(k)),
                                             self._heads(self.v_proj(v)))
        b, h, n, c = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, h * c))


class TwoWayAttentionBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_dim: int, skip_first_layer_pe: bool) -> None:
        super().__init__()
        self.self_attn = Attention(dim, num_heads)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn_token_to_image = Attention(dim, num_heads, 2)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLPBlock(dim, mlp_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.norm4 = nn.LayerNorm(dim)
        self.cross_attn_image_to_token = Attention(dim, num_heads, 2)
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(self, queries, keys, query_pe, key_pe):
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)
        k = keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(queries + query_pe, k, keys))
        queries = self.norm3(queries + self.mlp(queries))
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, queries + query_pe, queries))
        return queries, keys


class TwoWayTransformer(nn.Module):
    def __init__(self, depth: int, dim: int, num_heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList([TwoWayAttentionBlock(dim, num_heads, mlp_dim, i == 0) for i in range(depth)])
        self.final_attn_token_to_image = Attention(dim, num_heads, 2)
        self.norm_final_attn = nn.LayerNorm(dim)

    def forward(self, image_embedding, image_pe, point_embedding):
        keys = image_embedding.flatten(2).permute(0, 2, 1)
        key_pe = image_pe.flatten(2).permute(0, 2, 1)
        queries = point_embedding
        for layer in self.layers:
            queries, keys = layer(queries, keys, point_embedding, key_pe)
        attn = self.final_attn_token_to_image(queries + point_embedding, keys + key_pe, keys)
        return self.norm_final_attn(queries + attn), keys


class MLP(nn.Module):
    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        h = [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip([input_dim] + h, h + [output_dim]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


class MaskDecoder(nn.Module):
    def __init__(self, cfg: SegVolConfig, text_dim: int = 768) -> None:
        super().__init__()
        dim = cfg.hidden_size
        self.num_mask_tokens = 4  # 3 multimask outputs + 1
        self.transformer = TwoWayTransformer(cfg.decoder_depth, dim, cfg.decoder_heads, cfg.decoder_mlp_dim)
        self.iou_token = nn.Embedding(1, dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, dim)
        up = tuple(2 * s for s in cfg.feat_shape)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose3d(dim, dim // 4, kernel_size=2, stride=2),
            nn.LayerNorm((dim // 4, *up)),
            nn.GELU(),
            nn.ConvTranspose3d(dim // 4, dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList([MLP(dim, dim, dim // 8,
                                                            3) for _ in range(self.num_mask_tokens)])
        self.iou_prediction_head = MLP(dim, cfg.iou_head_hidden, self.num_mask_tokens, 3)
        self.txt_align_upscaled_embedding = nn.Linear(text_dim, dim // 8)

    def forward(self, image_embeddings, text_embedding, image_pe, sparse, dense) -> torch.Tensor:
        """Low-resolution logits of mask 0 (upstream's ``multimask_output=False``), (B, 1, d, h, w)."""
        n = sparse.shape[0]
        tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = torch.cat([tokens.unsqueeze(0).expand(n, -1, -1), sparse], dim=1)
        src = image_embeddings if image_embeddings.shape[0] == n else image_embeddings.expand(n, -1, -1, -1, -1)
        src = src + dense
        pos = image_pe.expand(n, -1, -1, -1, -1)
        b, c, h, w, d = src.shape
        hs, src = self.transformer(src, pos, tokens)
        up = self.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w, d))
        b, c, h, w, d = up.shape
        up = up.reshape(b, c, h * w * d)
        hyper = self.output_hypernetworks_mlps[0](hs[:, 1])[:, None]  # only mask 0 is used
        masks = hyper @ up
        if text_embedding is not None:
            masks = masks + self.txt_align_upscaled_embedding(text_embedding)[:, None] @ up
        return masks.view(b, 1, h, w, d)


# ------------------------------------------------------------------------------------------------
# text tower and the whole model
class TextEncoder(nn.Module):
    def __init__(self, text_config: dict[str, Any], out_dim: int = 768) -> None:
        super().__init__()
        from transformers import CLIPTextConfig, CLIPTextModel

        config = CLIPTextConfig(**text_config)
        self.clip_text_model = CLIPTextModel(config)
        self.dim_align = nn.Linear(config.hidden_size, out_dim)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        pooled = self.clip_text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        return self.dim_align(pooled)


def build_vit(cfg: SegVolConfig) -> nn.Module:
    from monai.networks.nets import ViT

    vit = ViT(
        in_channels=1,
        img_size=cfg.img_size,
        patch_size=cfg.patch_size,
        hidden_size=cfg.hidden_size,
        mlp_dim=cfg.mlp_dim,
        num_layers=cfg.num_layers,
        num_heads=cfg.num_heads,
        proj_type="perceptron",
        pos_embed_type="learnable",
        classification=False,
        dropout_rate=0.0,
    )
    for block in vit.blocks:  # MONAI >= 1.4 always builds this (unused) norm; the checkpoint has none
        if not getattr(block, "with_cross_attention", True) and hasattr(block, "norm_cross_attn"):
            del block.norm_cross_attn
        if hasattr(block.attn, "use_flash_attention"):  # torch's fused attention: same math, faster
            block.attn.use_flash_attention = True
    return vit


class SegVolNet(nn.Module):
    def __init__(self, cfg: SegVolConfig = SegVolConfig()) -> None:
        super().__init__()
        self.cfg = cfg
        self.image_encoder = build_vit(cfg)
        self.mask_decoder = MaskDecoder(cfg)
        self.prompt_encoder = PromptEncoder(cfg.hidden_size, cfg.feat_shape, cfg.img_size, cfg.mask_in_chans)
        self.text_encoder = TextEncoder(cfg.text_config, cfg.hidden_size)

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 1, *img_size) -> image embedding (B, C, *feat_shape)."""
        tokens, _ = self.image_encoder(image)
        return tokens.transpose(1, 2).reshape(image.shape[0], -1, *self.cfg.feat_shape)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(input_ids, attention_mask)

    def decode(self, embedding, text_embedding=None, boxes=None, points=None) -> torch.Tensor:
        """Logits (B, 1, *img_size) for prompts on one (or B) image embeddings."""
        if boxes is not None and boxes.ndim == 2:
            boxes = boxes[:, None]
        sparse, dense = self.prompt_encoder(points, boxes, text_embedding)
        low = self.mask_decoder(embedding, text_embedding, self.prompt_encoder.get_dense_pe(), sparse, dense)
        return F.interpolate(low, size=self.cfg.img_size, mode="trilinear", align_corners=False)


# ------------------------------------------------------------------------------------------------
# checkpoint
def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"SegVol weights not found at {path}: run `textseg models download segvol`.")
    fix = "delete it and run `textseg models download segvol` again."
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            sd: Any = load_file(str(path))
        except Exception as exc:  # truncated download, wrong format
            raise WeightsError(f"{path.name} is not a readable SegVol checkpoint ({type(exc).__name__}: "
                               f"{str(exc)[:120]}); the file is probably truncated or corrupt: {fix}") from None
    else:
        sd = read_checkpoint(path, "SegVol checkpoint", fix)
    if isinstance(sd, dict) and isinstance(sd.get("model"), dict):
        sd = sd["model"]  # GitHub release SegVol_v1.pth: {'model': DataParallel state dict, 'epoch': n}
    elif isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsError(f"{path.name} does not contain a state dict of tensors; it is not a SegVol checkpoint.")
    return sd


CLIP_OFFICIAL, CLIP_FLAT = "text_encoder.clip_text_model.text_model.", "text_encoder.clip_text_model."


def remap_state_dict(sd: dict[str, torch.Tensor], own_keys=None) -> dict[str, torch.Tensor]:
    """Strip ``module.`` (GitHub, DataParallel) / ``model.`` (HF SegVolModel) prefixes, drop stale keys.

    With ``own_keys`` given, CLIP keys follow the installed transformers: 5.x's CLIPTextModel has
    no ``text_model.`` level, so ``clip_text_model.text_model.X`` becomes ``clip_text_model.X``."""
    flat = own_keys is not None and not any(k.startswith(CLIP_OFFICIAL) for k in own_keys)
    out = {}
    for k, v in sd.items():
        for p in PREFIXES:
            if k.startswith(p):
                k = k[len(p):]
                break
        if k in STALE_KEYS:
            continue
        if flat and k.startswith(CLIP_OFFICIAL):
            k = CLIP_FLAT + k[len(CLIP_OFFICIAL):]
        out[k] = v
    return out


def check_state_dict(model: nn.Module, sd: dict[str, torch.Tensor], name: str) -> None:
    """Raise a WeightsError naming missing, unexpected and mis-shaped keys."""
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    bad = sorted(k for k in set(own) & set(sd) if tuple(own[k].shape) != tuple(sd[k].shape))
    if not (missing or unexpected or bad):
        return

    def few(keys):
        return ", ".join(keys[:4]) + (f" (+{len(keys) - 4} more)" if len(keys) > 4 else "")

    parts = [f"{len(missing)} missing keys: {few(missing)}" if missing else "",
             f"{len(unexpected)} unexpected keys: {few(unexpected)}" if unexpected else "",
             f"{len(bad)} keys with another shape: {few(bad)}" if bad else ""]
    raise WeightsError(
        f"{name} is not a SegVol checkpoint of this architecture (" + "; ".join(p for p in parts if p)
        + "). Use BAAI/SegVol's pytorch_model.bin (or model.safetensors) or the GitHub release SegVol_v1.pth."
    )


def load_checkpoint(model: SegVolNet, path: Path) -> None:
    """Load official SegVol weights strictly; a WeightsError says what is wrong."""
    sd = remap_state_dict(_read_state_dict(path), model.state_dict().keys())
    check_state_dict(model, sd, Path(path).name)
    assign_state_dict(model, sd)
