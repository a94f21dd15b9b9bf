"""CLIP BPE tokenizer built offline from open_clip's table."""

import json

import pytest

pytest.importorskip("transformers")
from textseg.models import clip_tokenizer as ct  # noqa: E402


def test_vocab_layout(tmp_path):
    vocab_path, merges_path = ct.build_vocab_files(tmp_path)
    vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
    assert len(vocab) == 49408
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    assert vocab["!"] == 0 and vocab["!</w>"] == 256
    merges = merges_path.read_text(encoding="utf-8").splitlines()
    assert merges[0] == "#version: 0.2" and len(merges) == 48894 + 1 and merges[1] == "i n"


def test_known_ids(tmp_path):
    ids, mask = ct.tokenize(["a photo of a cat", "Liver"], directory=str(tmp_path))
    # ids of the official openai/clip-vit-base-patch32 tokenizer
    assert ids[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert ids[1, :3].tolist() == [49406, 12639, 49407]  # lower-cased
    assert ids.shape == (2, 77) and (ids[1, 3:] == 49407).all()
    assert mask[1].sum() == 3


# OpenAI CLIP's bpe_simple_vocab_16e6.txt.gz
BPE_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"


def test_vocabulary_ships_with_the_engine():
    """No extra package (open_clip_torch) is needed: the BPE table is package data of textseg, with its licence."""
    import hashlib
    from pathlib import Path

    import textseg

    src = ct.bpe_source()
    assert src.parent == Path(textseg.__file__).parent / "data" / "clip"
    assert hashlib.sha256(src.read_bytes()).hexdigest() == BPE_SHA256
    assert "Copyright (c) 2021 OpenAI" in (src.parent / "LICENSE").read_text()


_READ_ONLY_CHILD = r"""
import os, sys, tempfile
sys.path.insert(0, sys.argv[1])
from textseg.models import clip_tokenizer as ct
if os.geteuid() == 0:  # root writes through any permission bits: use the code once, then become nobody
    ct.tokenize(["warm"], directory=tempfile.mkdtemp())
    ct.get_clip_tokenizer.cache_clear()
    os.setgid(65534)
    os.setuid(65534)
ids, _ = ct.tokenize(["Liver"])
print(ids[0, :3].tolist())
"""


def test_read_only_shared_cache(tmp_path):
    """A read-only TEXTSEG_HOME (a site-wide cache) is not written to and does not fail the tokenizer."""
    import os
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    home = Path(tempfile.mkdtemp(prefix="textseg-ro-"))  # outside pytest's private (0700) tmp folders
    hf_home = Path(tempfile.mkdtemp(prefix="textseg-hf-"))
    try:
        hf_home.chmod(0o777)
        home.chmod(0o555)
        env = {**os.environ, "TEXTSEG_HOME": str(home), "HF_HOME": str(hf_home), "HOME": str(hf_home)}
        src = Path(__file__).resolve().parents[2] / "BiomedParseSlicer"
        r = subprocess.run([sys.executable, "-c", _READ_ONLY_CHILD, str(src)], capture_output=True, text=True,
                           timeout=120, env=env)
        assert r.returncode == 0, r.stderr[-2000:]
        assert r.stdout.strip().splitlines()[-1] == "[49406, 12639, 49407]"
        assert list(home.iterdir()) == []
    finally:
        home.chmod(0o755)
        for d in (home, hf_home):
            subprocess.run(["rm", "-rf", str(d)], check=False)
