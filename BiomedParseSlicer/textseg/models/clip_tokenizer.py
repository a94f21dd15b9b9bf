"""The CLIP BPE tokenizer (openai/clip-vit-base-patch32), built offline.

The BPE table ships with the engine: ``textseg/data/clip/bpe_simple_vocab_16e6.txt.gz`` is OpenAI
CLIP's file, MIT-licensed (its licence is next to it). From it we write ``vocab.json`` (byte-unicode
table, ``</w>`` variants, 48 894 merges and the two special tokens: 49 408 entries) and ``merges.txt``
- identical in content to the official files - and hand them to transformers' CLIPTokenizer.

The two files are kept in ``$TEXTSEG_HOME/tokenizers/clip`` (official copies put there are used as
they are). When that folder cannot be written (a read-only, site-wide cache), they are built in a
temporary folder of this process instead. Used by BiomedParse (v1, v2) and SegVol.
"""

from __future__ import annotations

import atexit
import functools
import gzip
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

from ..errors import WeightsError

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
N_MERGES = 49152 - 256 - 2  # open_clip / OpenAI CLIP use the first 48 894 merges


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP reversible byte -> printable unicode map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def bpe_source() -> Path:
    """OpenAI CLIP's BPE table, shipped in the engine's data folder."""
    return Path(__file__).resolve().parents[1] / "data" / "clip" / "bpe_simple_vocab_16e6.txt.gz"


def build_vocab_files(out_dir: Path, bpe_gz: Optional[Path] = None) -> tuple[Path, Path]:
    """Write vocab.json and merges.txt (official layout) from CLIP's BPE table."""
    src = bpe_gz or bpe_source()
    if not src.is_file():
        raise WeightsError(
            f"The CLIP tokenizer's vocabulary {src} is missing from this installation: reinstall textseg, or put the "
            f"official vocab.json and merges.txt of openai/clip-vit-base-patch32 in {out_dir}."
        )
    lines = gzip.open(src).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : N_MERGES + 1]]
    vocab: list[str] = list(bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += [BOS, EOS]
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab_path, merges_path = out_dir / "vocab.json", out_dir / "merges.txt"
    tmp = vocab_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, vocab_path)
    tmp = merges_path.with_suffix(".txt.tmp")
    tmp.write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8")
    os.replace(tmp, merges_path)
    return vocab_path, merges_path


def tokenizer_dir() -> Path:
    from ..weights import home

    return home() / "tokenizers" / "clip"


def _private_dir() -> Path:
    d = Path(tempfile.mkdtemp(prefix="textseg-clip-"))
    atexit.register(shutil.rmtree, d, True)
    return d


@functools.lru_cache(maxsize=2)
def get_clip_tokenizer(directory: Optional[str] = None):
    """transformers' CLIPTokenizer over the official vocabulary (built offline on first use; in a
    temporary folder when ``directory`` / the cache folder cannot be written)."""
    from transformers import CLIPTokenizer

    d = Path(directory) if directory else tokenizer_dir()
    if not ((d / "vocab.json").is_file() and (d / "merges.txt").is_file()):
        try:
            build_vocab_files(d)
        except OSError:  # read-only shared cache (PermissionError, read-only file system, ...)
            d = _private_dir()
            build_vocab_files(d)
    return CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"), pad_token=EOS)


def tokenize(texts: list[str], context_length: int = 77, directory: Optional[str] = None):
    """Token ids (N, context_length) padded with EOS, like upstream BiomedParse/SegVol (int64 numpy)."""
    import numpy as np

    tok = get_clip_tokenizer(directory)
    enc = tok(list(texts), padding="max_length", truncation=True, max_length=context_length)
    return np.asarray(enc["input_ids"], dtype=np.int64), np.asarray(enc["attention_mask"], dtype=np.int64)
