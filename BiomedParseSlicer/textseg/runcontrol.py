"""Run control: how a long operation is cancelled, reports its progress, and says what a cancel kept.

Every long operation of the engine (a prediction, a download, a comparison, an export) and every caller (the
CLI's tqdm bar, a server job, Slicer's progress bar) uses the three things here:

* ``CancelToken``: the one cancel flag. The caller keeps it and calls ``cancel()``; the operation calls
  ``check()`` between steps (raises ``Cancelled``) or reads ``cancelled``. ``CancelToken.of(x)`` turns what a
  public function accepts (None, a token, a ``threading.Event`` or a callable returning True) into a token.
* ``ProgressFn`` ``(fraction, stage)`` with fraction 0..1 of the whole operation, and ``sub_progress`` /
  ``Progress``: a step's own 0..1 mapped into its sub-range of the parent's 0..1 (nested as deep as needed).
* ``kept_summary``: the "kept N of M" line a cancelled prompt run ends with, locally and over HTTP.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Optional

from .errors import Cancelled

ProgressFn = Callable[[float, str], None]

CANCELLED = "Cancelled by the user; completed results are kept."


class _Polled:
    """A flag read from a callable (``cancel=lambda: ...``) that ``cancel()`` can also set."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self._fn, self._set = fn, False

    def set(self) -> None:
        self._set = True

    def is_set(self) -> bool:
        return self._set or bool(self._fn())


class CancelToken:
    """Cooperative cancel flag shared between a caller (GUI thread, HTTP handler) and a run.

    ``flag`` is anything with ``set()`` / ``is_set()``: by default a ``threading.Event``; a server worker
    process passes the shared-memory flag its server sets, so the same token crosses the process boundary."""

    def __init__(self, flag: Any = None) -> None:
        self._flag = flag if flag is not None else threading.Event()

    @classmethod
    def of(cls, cancel: Any) -> CancelToken:
        """A token for what a public function accepts as ``cancel``: None (never cancelled), a CancelToken
        (itself), a ``threading.Event``-like flag (``is_set()``), an object with a ``cancelled`` attribute or a
        callable returning True when cancelled."""
        if isinstance(cancel, CancelToken):
            return cancel
        if cancel is None:
            return cls()
        if hasattr(cancel, "is_set"):
            return cls(cancel)
        if hasattr(cancel, "cancelled"):  # a token-like object (e.g. a CancelToken of a reloaded module)
            return cls(_Polled(lambda: cancel.cancelled))
        if callable(cancel):
            return cls(_Polled(cancel))
        raise TypeError(f"cancel must be a CancelToken, a threading.Event or a callable, not {type(cancel).__name__}")

    def cancel(self) -> None:
        self._flag.set()

    @property
    def cancelled(self) -> bool:
        return bool(self._flag.is_set())

    def check(self, message: str = CANCELLED) -> None:
        """Raise ``Cancelled(message)`` once cancelled."""
        if self._flag.is_set():
            raise Cancelled(message)


def _clamp(fraction: float) -> float:
    return min(max(float(fraction), 0.0), 1.0)


def sub_progress(progress: Optional[ProgressFn], lo: float, hi: float) -> Optional[ProgressFn]:
    """``progress`` seen by a step that covers ``lo..hi`` of the parent: the step reports its own 0..1
    (clamped) and the parent receives ``lo + (hi - lo) * fraction``. None stays None."""
    if progress is None:
        return None

    def child(fraction: float, stage: str = "") -> None:
        progress(lo + (hi - lo) * _clamp(fraction), stage)

    return child


class Progress:
    """A parent's progress split into consecutive steps: ``span(lo, hi, stage)`` starts a step covering
    ``lo..hi`` of the whole (and reports its start), ``report(fraction, stage)`` reports within it; the stage
    text is kept until a report changes it."""

    def __init__(self, progress: Optional[ProgressFn] = None) -> None:
        self.progress = progress
        self.stage = ""
        self.range = (0.0, 1.0)

    def span(self, lo: float, hi: float, stage: str) -> None:
        self.range, self.stage = (lo, hi), stage
        self.report(0.0)

    def report(self, fraction: float, stage: Optional[str] = None) -> None:
        if stage:
            self.stage = stage
        if self.progress is not None:
            lo, hi = self.range
            self.progress(lo + (hi - lo) * _clamp(fraction), self.stage)


def kept_summary(done: int, total: int, partial: int) -> str:
    """What a cancelled prompt run kept, as the predictor, the client and the server's job stage say it."""
    return f"kept {done} of {total} completed prompt(s)" + (f" and {partial} partial result(s)" if partial else "")
