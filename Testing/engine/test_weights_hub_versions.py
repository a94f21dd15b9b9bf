"""Downloads work with the lowest huggingface_hub the project declares (BiomedParseSlicer/requirements/core.txt).

That release is installed from PyPI, once, into a cached folder (``$TEXTSEG_TEST_CACHE``, default
``~/.cache/textseg-tests``) and put first on ``PYTHONPATH`` of a child process, which downloads from
the hub look-alike (Testing/hubserver.py) through ``textseg.weights`` as a user's first try does.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def declared_minimum(name: str = "huggingface_hub") -> str:
    text = (ROOT / "BiomedParseSlicer" / "requirements" / "core.txt").read_text(encoding="utf-8")
    found = re.findall(rf"^{name}>=([0-9][0-9.]*)", text, re.M)
    assert found, f"requirements/core.txt declares no minimum for {name}"
    return found[0]


def installed_release(name: str, version: str) -> Path:
    """A folder holding ``name==version`` only (its dependencies come from the test environment)."""
    cache = Path(os.environ.get("TEXTSEG_TEST_CACHE") or Path.home() / ".cache" / "textseg-tests")
    folder = cache / f"{name}-{version}"
    if (folder / name).is_dir():
        return folder
    tmp = cache / f"{name}-{version}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
                        "--target", str(tmp), f"{name}=={version}"], capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        pytest.fail(f"could not install {name}=={version} from PyPI for this test: {r.stderr.strip()[-500:]}")
    try:
        os.replace(tmp, folder)
    except OSError:  # another run installed it meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


_CHILD = r"""
import json, sys
import huggingface_hub
sys.path.insert(0, sys.argv[1])
from textseg import catalog, weights
from textseg.catalog import ModelSpec, WeightFile
from textseg.errors import WeightsError

out = {"huggingface_hub": huggingface_hub.__version__, "errors": {}}
for model_id, files in json.loads(sys.argv[2]).items():
    catalog.register(ModelSpec(id=model_id, family="test", title=model_id, version="1", dims=3, modalities=("CT",),
                               adapter="x:y", files=tuple(WeightFile(**f) for f in files), hidden=True))
    try:
        out[model_id] = str(weights.download(model_id))
    except WeightsError as e:
        out["errors"][model_id] = f"{type(e).__name__}: {e}"
print(json.dumps(out))
"""


def test_download_with_lowest_declared_huggingface_hub(hub, hub_env, tmp_path):
    version = declared_minimum()
    site = installed_release("huggingface_hub", version)
    data = os.urandom(70_000)
    commit = hub.add("test-org/old-hub", "w.bin", data)
    hub.add("test-org/old-hub", "config.json", b'{"a": 1}\n', lfs=False)
    hub.add("test-org/old-hub-gated", "w.bin", data, gated=True)
    ok = [dict(name="w.bin", repo="test-org/old-hub", revision=commit, filename="w.bin", size=len(data),
               sha256=hashlib.sha256(data).hexdigest()),
          dict(name="config.json", repo="test-org/old-hub", revision="main", filename="config.json")]
    models = {"t-old-ok": ok,
              "t-old-gated": [dict(name="w.bin", repo="test-org/old-hub-gated", revision="main", filename="w.bin",
                                   gated=True)],
              "t-old-absent": [dict(name="x.bin", repo="test-org/old-hub", revision=commit, filename="nothere.bin")]}
    env = {**os.environ, "PYTHONPATH": str(site), "PYTHONWARNINGS": "ignore"}
    r = subprocess.run([sys.executable, "-c", _CHILD, str(ROOT / "BiomedParseSlicer"), json.dumps(models)],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["huggingface_hub"] == version or out["huggingface_hub"].startswith(version + "."), out
    folder = Path(out["t-old-ok"])
    assert (folder / "w.bin").read_bytes() == data and (folder / "config.json").read_bytes() == b'{"a": 1}\n'
    rec = json.loads((folder / ".meta" / "w.bin.json").read_text())
    assert rec["checked_against"] == "catalog" and rec["commit"] == commit
    assert json.loads((folder / ".meta" / "config.json.json").read_text())["checked_against"] == "hub-git-sha1"
    # the hub's typed errors (huggingface_hub.errors only exists from 0.25) become our messages
    assert out["errors"]["t-old-gated"].startswith("AccessDeniedError: Model 't-old-gated' needs a HuggingFace token")
    assert out["errors"]["t-old-absent"].startswith("RemoteNotFoundError: "), out["errors"]
