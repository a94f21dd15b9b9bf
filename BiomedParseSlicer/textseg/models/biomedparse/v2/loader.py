"""Reading the official ``biomedparse_v2.ckpt`` (a PyTorch Lightning checkpoint) or a ``.safetensors`` copy.

Upstream ``BiomedParseModel.load_pretrained`` (v2 @ f571d5c): take ``["state_dict"]``, strip the leading
``model.``, drop the two loss-only tensors, ``load_state_dict(strict=False)``. We load with
:func:`..checkpoint.read_checkpoint` (weights only, memory-mapped: the optimizer states stay unread) and
``strict=True``: a missing, extra or mis-shaped tensor is a WeightsError that says
what to do, as is a truncated file or a Git LFS pointer.
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor, nn

from ....errors import WeightsError
from ...checkpoint import assign_state_dict, key_mismatch, read_checkpoint

LOSS_KEYS = ("loss_function.loss_fn.dice_loss.class_weight", "loss_function.cls_loss_fn.pos_weight")
_REDOWNLOAD = "delete it and download it again (`textseg models download biomedparse-v2`)."


def _load_raw(path: Path) -> object:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except Exception as exc:  # truncated file, wrong format
            raise WeightsError(f"{path} is not a readable safetensors file ({type(exc).__name__}: {str(exc)[:200]}); "
                               f"the file is probably truncated: {_REDOWNLOAD}") from None
    return read_checkpoint(path, "BiomedParse v2 checkpoint", _REDOWNLOAD)


def read_v2_state_dict(path: Path) -> dict[str, Tensor]:
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"BiomedParse v2 weights not found at {path}: run `textseg models download biomedparse-v2`.")
    if path.stat().st_size < 1024:
        raise WeightsError(f"{path} is {path.stat().st_size} bytes: a failed download or a Git LFS pointer, "
                           f"not biomedparse_v2.ckpt; {_REDOWNLOAD}")
    raw = _load_raw(path)
    sd = raw.get("state_dict", raw) if isinstance(raw, dict) else raw
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, Tensor) for v in sd.values()):
        raise WeightsError(f"{path} holds no state dict of tensors; is it biomedparse_v2.ckpt? {_REDOWNLOAD}")
    sd = {(k[6:] if k.startswith("model.") else k): v for k, v in sd.items()}
    return {k: v for k, v in sd.items() if k not in LOSS_KEYS}


def check_keys(own: dict[str, Tensor], sd: dict[str, Tensor], path: Path) -> None:
    problems = key_mismatch(own, sd)
    if problems:
        raise WeightsError(f"{path} does not match BiomedParse v2 ({problems}). Is it the official "
                           f"biomedparse_v2.ckpt? If so, {_REDOWNLOAD}")


def load_v2_weights(model: nn.Module, path: Path) -> None:
    """Strict load of the official checkpoint into ``model`` (every tensor, same shapes, nothing left over)."""
    sd = read_v2_state_dict(path)
    check_keys(model.state_dict(), sd, Path(path))
    assign_state_dict(model, sd)


__all__ = ["LOSS_KEYS", "read_v2_state_dict", "check_keys", "load_v2_weights"]
