"""Peak memory and CPU time of a timed section, shared by the benchmark scripts.

``with Peak(device) as p: ...`` samples the resident set size every 5 ms on a CPU, or reads
``torch.cuda.max_memory_allocated`` on a GPU; ``p.mb``/``p.added_mb`` are the peak and its growth over
the section's start, ``p.cpu_s`` the process CPU time the section took (all threads)."""

from __future__ import annotations

import resource
import threading


class Peak:
    def __init__(self, device: str) -> None:
        self.device, self.peak, self._stop = device, 0, threading.Event()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()

    @staticmethod
    def cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self.rss())

    def __enter__(self) -> Peak:
        self.cpu0 = self.cpu()
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.reset_peak_memory_stats()
        self.peak = self.base = self.rss()
        self._t = threading.Thread(target=self._sample, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.cpu_s = self.cpu() - self.cpu0
        self._stop.set()
        self._t.join()
        if self.device.startswith("cuda"):
            import torch

            self.peak, self.base = torch.cuda.max_memory_allocated(), 0

    @property
    def mb(self) -> float:
        return self.peak / 2**20

    @property
    def added_mb(self) -> float:
        return (self.peak - self.base) / 2**20

    def result(self) -> dict:
        return {"cpu_s": self.cpu_s, "peak_mb": self.mb, "added_mb": self.added_mb,
                "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
