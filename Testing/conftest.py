"""Shared fixtures. Tests that need ../shared/data skip with a clear reason when it is absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# pyproject's pytest ``pythonpath`` puts this checkout's engine first (also when another checkout is
# pip-installed in editable mode), this folder's shared helpers, the oracle scripts' weight/input recipes
# (they import only numpy at module level, upstream code only when run), Utilities/ and benchmarks/.
ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TEXTSEG_SHARED_DATA", ROOT.parent / "shared" / "data"))


def shared_file(*parts: str) -> Path:
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"needs the shared test data {p} (../shared/data beside the checkout, or TEXTSEG_SHARED_DATA)")
    return p


@pytest.fixture
def textseg_home(tmp_path, monkeypatch):
    """An empty, private weights cache."""
    home = tmp_path / "textseg-home"
    monkeypatch.setenv("TEXTSEG_HOME", str(home))
    return home


@pytest.fixture
def hub():
    """The HuggingFace hub look-alike (Testing/hubserver.py) on 127.0.0.1."""
    from hubserver import Hub

    h = Hub()
    yield h
    h.stop()


@pytest.fixture
def hub_env(hub, textseg_home, tmp_path, monkeypatch):
    """A private weights cache, HF_ENDPOINT at the test hub, no token anywhere, no automatic retries."""
    from textseg import weights

    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "HTTP_PROXY", "HTTPS_PROXY", "http_proxy",
                "https_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setattr(weights, "_SETTINGS", weights.Settings(timeout=10, retries=0))
    monkeypatch.setattr(weights, "_saved_token", lambda: None)
    return textseg_home
