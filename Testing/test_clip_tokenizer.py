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
