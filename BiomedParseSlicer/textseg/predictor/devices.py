"""Devices and GPU out-of-memory handling for the local predictor.

``auto`` picks cuda, then mps, then cpu. On a GPU out-of-memory error the run frees what can be recomputed
(the slice cache, the adapter's feature caches), halves the batch and retries; at batch size 1 the model
moves to the CPU (a volumetric image is encoded again there). Each step is logged in ``messages``.
"""

from __future__ import annotations

from typing import Any, Callable

from ..errors import Cancelled, UsageError
from ..models.base import RunContext

# ``pred`` below is the local Predictor (local.py), whose state these functions share: typed Any because
# local.py imports this module (no import back, not even for typing).
RETRY = object()  # run_with_fallback(retry_same=False): the batch size or device was lowered, re-plan


def select_device(device: str = "auto") -> Any:
    """'auto' -> cuda, then mps, then cpu; or a forced 'cpu' / 'cuda' / 'cuda:1' / 'mps'."""
    import torch

    name = (device or "auto").lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for, but no CUDA GPU is available here. Use --device cpu or auto.")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UsageError("--device mps was asked for, but Apple MPS is not available here. Use --device cpu or auto.")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UsageError(f"Unknown device '{device}'. Use auto, cpu, cuda, cuda:N or mps.") from None


def is_out_of_memory(exc: BaseException) -> bool:
    try:
        import torch

        if isinstance(exc, torch.cuda.OutOfMemoryError):
            return True
    except Exception:  # pragma: no cover - torch without cuda module
        pass
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def run_with_fallback(pred: Any, fn: Callable[[RunContext], Any], ctx: RunContext,
                      retry_same: bool = True) -> Any:
    """Run ``fn(ctx)``, retrying with a smaller batch and finally on the CPU after GPU out-of-memory.

    With ``retry_same=False`` the caller re-plans its work instead: ``RETRY`` is returned after the batch size
    (or device) was lowered."""
    while True:
        try:
            return fn(ctx)
        except Cancelled:
            raise
        except Exception as exc:  # noqa: BLE001 - filtered below
            if not is_out_of_memory(exc) or getattr(pred.device, "type", "cpu") == "cpu":
                raise
            free_gpu(pred)
            if ctx.batch_size > 1:
                ctx.batch_size = pred.batch_size = max(1, ctx.batch_size // 2)
                pred._log(f"GPU out of memory: retrying with batch size {ctx.batch_size}.")
            else:
                import torch

                pred._log("GPU out of memory even with batch size 1: continuing on the CPU (slower).")
                pred.device = ctx.device = torch.device("cpu")
                pred.adapter.to(pred.device)
                pred.slices.cache.clear()
                if pred._encoded is not None and pred.spec.dims == 3:
                    pred._encoded = pred.adapter.encode(pred._state, ctx)
            if not retry_same:
                return RETRY


def free_gpu(pred: Any) -> None:
    """Drop what can be recomputed (the slice cache, the adapter's feature caches) and torch's cached blocks."""
    pred.slices.cache.clear()
    if pred._encoded is not None:
        pred.adapter.free_memory(pred._encoded)
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # pragma: no cover
        pass
