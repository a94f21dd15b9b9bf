"""Load SAT's official checkpoints (HF ``zzh99/SAT``: ``Nano/nano.pth`` + text encoder, ``Pro/SAT_Pro.pth`` +
``Pro/text_encoder.pth``) strictly into :class:`SATNetwork` and :class:`SATTextEncoder`.

Both files are ``{'model_state_dict': {'module.' + key: tensor}, 'step': n}`` (DDP); the segmentation file
also holds ``'optimizer_state_dict'`` (AdamW moments and numpy-float learning rates), which
:func:`..checkpoint.read_checkpoint` leaves unread in the mapped file. The segmentation file
holds every conv/norm of the U-Net under two names (``convs.N.conv.*`` and ``convs.N.all_modules.0.*``,
``convs.N.norm.*`` and ``convs.N.all_modules.1.*``); a file carrying only one of them is completed from
the other. The text file may also hold the knowledge-pretraining ``atlas_tower.*`` and ``temperature``
(dropped, as upstream does) and transformers-4.21's persistent ``embeddings.position_ids`` buffer.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional, Union

import torch

from ...errors import WeightsError
from ..checkpoint import assign_state_dict, key_mismatch, read_checkpoint
from .network import NANO, SATConfig, SATNetwork
from .text import SATTextEncoder

_ALIAS = re.compile(r"\.convs\.(\d+)\.(conv|norm|all_modules\.0|all_modules\.1)\.")
_OTHER = {"conv": "all_modules.0", "norm": "all_modules.1", "all_modules.0": "conv", "all_modules.1": "norm"}
STALE_TEXT_KEYS = ("text_tower.biolord.embeddings.position_ids",)


def read_state_dict(path: Union[str, Path], what: str) -> dict[str, torch.Tensor]:
    """The ``model_state_dict`` of an official SAT file, ``module.`` stripped; WeightsError if unusable."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"SAT {what} weights not found at {path}: download them (HF zzh99/SAT) first.")
    ckpt = read_checkpoint(path, f"SAT {what} checkpoint",
                           "delete it and download it again (`textseg models download sat-nano` or `sat-pro`).")
    sd = ckpt.get("model_state_dict", ckpt) if isinstance(ckpt, Mapping) else None
    if not isinstance(sd, Mapping) or not sd or not all(torch.is_tensor(v) for v in sd.values()):
        raise WeightsError(f"{path.name} does not contain SAT's 'model_state_dict' of tensors; it is not a SAT {what} "
                           "checkpoint.")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in sd.items()}


def fill_aliases(sd: Mapping[str, torch.Tensor], own: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Add the missing twin name of every conv/norm tensor (``conv`` <-> ``all_modules.0``,
    ``norm`` <-> ``all_modules.1``)."""
    out = dict(sd)
    for k, v in sd.items():
        m = _ALIAS.search(k)
        if m:
            twin = k[:m.start()] + f".convs.{m.group(1)}.{_OTHER[m.group(2)]}." + k[m.end():]
            if twin in own and twin not in out:
                out[twin] = v
    return out


def _check(model: torch.nn.Module, sd: Mapping[str, torch.Tensor], name: str, hint: str) -> None:
    problem = key_mismatch(model.state_dict(), sd)
    if problem:
        raise WeightsError(f"{name} does not match this SAT architecture ({problem}). {hint}")


def load_network_weights(model: SATNetwork, path: Union[str, Path]) -> SATNetwork:
    """Load an official segmentation checkpoint into ``model`` strictly (WeightsError says what differs)."""
    own = model.state_dict()
    sd = fill_aliases(read_state_dict(path, "segmentation"), own)
    for k in [k for k in sd if k not in own and k.startswith("backbone.decoder.seg_layers")]:
        del sd[k]  # never built by SAT's decoder; tolerated if a variant stored them
    _check(model, sd, Path(path).name,
           "Use the segmentation file paired with the chosen size: SAT-Nano nano.pth or SAT-Pro SAT_Pro.pth "
           "(not text_encoder.pth or a Pretrain/ file).")
    assign_state_dict(model, sd)
    return model


def load_text_weights(model: SATTextEncoder, path: Union[str, Path]) -> SATTextEncoder:
    own = model.state_dict()
    sd = {k: v for k, v in read_state_dict(path, "text encoder").items()
          if "atlas_tower" not in k and "temperature" not in k and not (k in STALE_TEXT_KEYS and k not in own)}
    _check(model, sd, Path(path).name,
           "Use the text_encoder.pth paired with the segmentation file (SAT's Pretrain/ encoders are not inference "
           "pairs) and BioLORD-2023-C's config.json.")
    assign_state_dict(model, sd)
    return model


def load_sat_network(path: Union[str, Path], cfg: SATConfig = NANO, device: Any = "cpu") -> SATNetwork:
    """Build :class:`SATNetwork` for ``cfg`` (``NANO``/``PRO``), load ``path``, float32, eval mode on ``device``.

    The network is built on the meta device and takes the checkpoint's tensors (no random init, no
    second copy of the weights); it has no buffers, so nothing is left on meta."""
    with torch.device("meta"):
        model = SATNetwork(cfg)
    model = load_network_weights(model, path)
    return model.float().to(device).eval()


def load_text_tower(path: Union[str, Path], config_path: Optional[Union[str, Path]] = None, device: Any = "cpu",
                    tokenizer=None) -> SATTextEncoder:
    """Build :class:`SATTextEncoder` from BioLORD's ``config.json`` (None: BioLORD-2023-C's numbers), load ``path``.

    ``tokenizer``: a tokenizer object or a path for :func:`text.load_tokenizer` (optional; needed for ``embed``)."""
    from .text import load_tokenizer, mpnet_config

    try:
        config = mpnet_config(config_path)
        if isinstance(tokenizer, (str, Path)):
            tokenizer = load_tokenizer(tokenizer)
    except Exception as exc:  # missing / unreadable BioLORD files
        raise WeightsError(
            f"SAT's text tower needs FremyCompany/BioLORD-2023-C's config.json and tokenizer files "
            f"({type(exc).__name__}: {str(exc)[:160]}); download them again.") from None
    model = SATTextEncoder(config, tokenizer)
    return load_text_weights(model, path).to(device).eval()
