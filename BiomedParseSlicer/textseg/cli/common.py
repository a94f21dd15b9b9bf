"""What more than one command uses: the tqdm progress bar of a case, Ctrl-C as a cancel request."""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager


class Bar:
    """tqdm progress for one case: fraction 0..1 with the stage as description."""

    def __init__(self, desc: str, quiet: bool) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=1000, desc=desc, disable=quiet, leave=False,
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}")
        self.desc = desc

    def __call__(self, fraction: float, stage: str) -> None:
        self.bar.set_description_str(f"{self.desc} [{stage}]", refresh=False)
        self.bar.n = int(1000 * fraction)
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


@contextmanager
def cancel_on_ctrl_c(token, kept: str = "completed work will be kept") -> Iterator[None]:
    """First Ctrl-C asks the run to stop (``token.cancel()``) and keep what is complete; a second one aborts."""
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum, frame):
        if token.cancelled:
            signal.signal(signal.SIGINT, previous)
            raise KeyboardInterrupt
        token.cancel()
        print(f"\nCancelling: {kept} (Ctrl-C again to abort).", file=sys.stderr)

    try:
        signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread
        pass
    try:
        yield
    finally:
        try:
            signal.signal(signal.SIGINT, previous)
        except ValueError:
            pass
