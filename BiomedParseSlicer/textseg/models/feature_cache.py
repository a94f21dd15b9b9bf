"""One cache for features that can be recomputed: a least-recently-used map under a byte budget.

Three places keep an image's features so that the next prompt on the same image does not encode them again:
the predictor's slice cache (slice-wise models: one entry per batch of encoded slices), SegVol's window
embeddings and SAT's window features. All three are a ``FeatureCache`` whose budget is the adapter option
``feature_cache_bytes`` (``textseg.models.options``), resolved by ``cache_budget``: the option when given
(0 = keep nothing), else ``DEFAULT_BYTES`` (2 GiB), on a CUDA device at most half its free memory when the
budget is resolved (the start of each run). The cache lives with the image: a new image starts empty, and
the predictor drops it (``clear``) after an out-of-memory error.

Policy: ``put`` keeps an entry when it fits the budget on its own, then drops the least recently used
entries (``get`` and ``put`` make an entry the most recent) until the total fits. A sliding window visits
its windows in a cycle, so a budget smaller than one pass re-encodes every window on the next pass; the
budget to give is then the pass's size (SegVol: ~6 MB a window at full size; SAT: the features of a batch of
patches; BiomedParse: one batch of slices' features times the number of batches).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterator
from typing import Any, Callable, Optional

from .base import nbytes

DEFAULT_BYTES = 2 << 30


def default_budget(device: Any = None) -> int:
    """``DEFAULT_BYTES``; on a CUDA device at most half of its free memory now."""
    if getattr(device, "type", str(device or "")).split(":")[0] == "cuda":
        import torch

        try:
            free = int(torch.cuda.mem_get_info(device)[0])
        except (RuntimeError, AssertionError):  # no CUDA runtime to ask (a simulated device): the default
            return DEFAULT_BYTES
        return min(DEFAULT_BYTES, free // 2)
    return DEFAULT_BYTES


def cache_budget(option: Optional[int], device: Any = None) -> int:
    """The budget in bytes: the option ``feature_cache_bytes`` when set, else ``default_budget(device)``."""
    return int(option) if option is not None else default_budget(device)


class FeatureCache:
    """A byte-budget LRU map (see the module docstring). ``sizeof`` counts an entry's bytes (default: the
    tensors and arrays it holds, ``models.base.nbytes``)."""

    def __init__(self, budget: int = DEFAULT_BYTES, sizeof: Callable[[Any], int] = nbytes) -> None:
        self._entries: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._sizeof = sizeof
        self._budget = int(budget)
        self.nbytes = 0  # bytes held now
        self.hits = 0
        self.misses = 0

    @property
    def budget(self) -> int:
        return self._budget

    @budget.setter
    def budget(self, value: int) -> None:
        """A new budget; entries beyond it are dropped, least recently used first."""
        self._budget = int(value)
        self._evict()

    def get(self, key: Hashable) -> Any:
        """The entry's value (now the most recent), or None."""
        item = self._entries.get(key)
        if item is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return item[0]

    def put(self, key: Hashable, value: Any) -> bool:
        """Keep ``value`` as the most recent entry when it fits the budget on its own; returns whether it
        was kept. Older entries are dropped until the total fits."""
        self.pop(key)
        size = int(self._sizeof(value))
        if size > self._budget:
            return False
        self._entries[key] = (value, size)
        self.nbytes += size
        self._evict()
        return True

    def pop(self, key: Hashable) -> Any:
        item = self._entries.pop(key, None)
        if item is None:
            return None
        self.nbytes -= item[1]
        return item[0]

    def clear(self) -> None:
        self._entries.clear()
        self.nbytes = 0

    def _evict(self) -> None:
        while self.nbytes > self._budget and self._entries:
            self.nbytes -= self._entries.popitem(last=False)[1][1]

    def keys(self) -> list[Hashable]:
        """Keys from least to most recently used."""
        return list(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[Hashable]:
        return iter(list(self._entries))

    def __repr__(self) -> str:
        return f"FeatureCache({len(self)} entries, {self.nbytes} of {self._budget} bytes)"
