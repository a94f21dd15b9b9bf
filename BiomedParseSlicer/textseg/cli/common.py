"""What more than one command uses: the tqdm progress bar of a case."""

from __future__ import annotations


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
