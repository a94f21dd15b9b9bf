"""The CLIP BPE tokenizer (openai/clip-vit-base-patch32), built offline.

The BPE table ships inside the ``open_clip_torch`` wheel (``open_clip/bpe_simple_vocab_16e6.txt.gz``,
MIT). From it we write ``vocab.json`` (byte-unicode table, ``</w>`` variants, 48 894 merges and the
two special tokens: 49 408 entries) and ``merges.txt`` - byte-identical in content to the official
files - and hand them to transformers' CLIPTokenizer. A user without open_clip_torch can instead
put the official ``vocab.json`` + ``merges.txt`` in ``$TEXTSEG_HOME/tokenizers/clip``.

Used by BiomedParse (v1, v2) and SegVol. Install open_clip_torch with ``--no-deps`` (its
dependencies would replace torch): ``pip install --no-deps open_clip_torch``.
"""

from __future__ import annotations

import functools
import gzip
import json
import os
from importlib import metadata
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from ..errors import WeightsError

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
N_MERGES = 49152 - 256 - 2  # open_clip / OpenAI CLIP use the first 48 894 merges


def bytes_to_unicode() -> Dict[int, str]:
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


def _bpe_source() -> Optional[Path]:
    try:
        p = Path(str(metadata.distribution("open_clip_torch").locate_file("open_clip/bpe_simple_vocab_16e6.txt.gz")))
    except metadata.PackageNotFoundError:
        return None
    return p if p.is_file() else None


def build_vocab_files(out_dir: Path, bpe_gz: Optional[Path] = None) -> Tuple[Path, Path]:
    """Write vocab.json and merges.txt (official layout) from open_clip's BPE table."""
    src = bpe_gz or _bpe_source()
    if src is None:
        raise WeightsError(
            "The CLIP tokenizer needs its BPE vocabulary: install it with `pip install --no-deps open_clip_torch`, "
            "or put the official vocab.json and merges.txt of openai/clip-vit-base-patch32 in "
            f"{out_dir}."
        )
    lines = gzip.open(src).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : N_MERGES + 1]]
    vocab: List[str] = list(bytes_to_unicode().values())
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


@functools.lru_cache(maxsize=2)
def get_clip_tokenizer(directory: Optional[str] = None):
    """transformers' CLIPTokenizer over the official vocabulary (built offline on first use)."""
    from transformers import CLIPTokenizer

    d = Path(directory) if directory else tokenizer_dir()
    if not ((d / "vocab.json").is_file() and (d / "merges.txt").is_file()):
        build_vocab_files(d)
    return CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"), pad_token=EOS)


def tokenize(texts: List[str], context_length: int = 77, directory: Optional[str] = None):
    """Token ids (N, context_length) padded with EOS, like upstream BiomedParse/SegVol (int64 numpy)."""
    import numpy as np

    tok = get_clip_tokenizer(directory)
    enc = tok(list(texts), padding="max_length", truncation=True, max_length=context_length)
    return np.asarray(enc["input_ids"], dtype=np.int64), np.asarray(enc["attention_mask"], dtype=np.int64)
