"""SAT's text tower ("ours", knowledge-enhanced): BioLORD-2023-C (MPNet) + projection + modality embedding.

Upstream (``model/knowledge_encoder.py``, ``text_tower.py``, ``tokenizer.py``, ``text_encoder.py``):

* tokens = ``'[CLS]'`` + the tokenizer's word pieces + ``'[SEP]'`` (the literal BERT strings, looked up
  in BioLORD's vocabulary), right-padded with id **0** to the longest text of the batch (at most
  256; longer texts are cut and their last id set to ``[SEP]``); attention mask = ``ids > 0``;
* MPNet (``AutoModel`` -> ``MPNetModel`` with pooler) -> **mean of the last hidden states over the mask**;
* ``projection_layer`` Linear(768, 768)-GELU-Linear(768, 768), then + ``modality_embed`` (ct 0, mri 1,
  us 2, pet 3).

Key names equal the text checkpoint's (``text_tower.biolord.*``, ``projection_layer.*``,
``modality_embed.weight``) once the DDP ``module.`` prefix is removed. The MPNet config and the
tokenizer are not in SAT's checkpoint: they come from the user's copy of
``FremyCompany/BioLORD-2023-C`` (``config.json`` and ``tokenizer.json`` / ``vocab.txt``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import torch
from torch import nn

MODALITY_CODES = {"ct": 0, "mri": 1, "us": 2, "pet": 3}
MAX_LENGTH = 256
# config.json of FremyCompany/BioLORD-2023-C (MPNet base); used when no config file is given.
BIOLORD_CONFIG: dict[str, Any] = dict(
    vocab_size=30527, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
    hidden_act="gelu", hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, max_position_embeddings=514,
    initializer_range=0.02, layer_norm_eps=1e-5, relative_attention_num_buckets=32, pad_token_id=1,
    bos_token_id=0, eos_token_id=2,
)


def mpnet_config(config: Union[None, str, Path, Mapping[str, Any]] = None):
    """An ``MPNetConfig`` from a config.json path, a folder holding one, a dict, or BioLORD's defaults."""
    from transformers import MPNetConfig

    if config is None:
        return MPNetConfig(**BIOLORD_CONFIG)
    if isinstance(config, Mapping):
        return MPNetConfig(**dict(config))
    path = Path(config)
    if path.is_dir():
        path = path / "config.json"
    d = json.loads(path.read_text(encoding="utf-8"))
    d = {k: v for k, v in d.items() if k not in ("architectures", "model_type", "transformers_version", "torch_dtype")}
    return MPNetConfig(**d)


def load_tokenizer(path: Union[str, Path]):
    """BioLORD's (MPNet) fast tokenizer from its folder (tokenizer.json / vocab.txt + tokenizer_config.json, as
    upstream's ``AutoTokenizer.from_pretrained``), a tokenizer.json or a vocab.txt (lower-casing WordPiece)."""
    import inspect

    from transformers import MPNetTokenizerFast, PreTrainedTokenizerFast

    p = Path(path)
    if p.is_dir():
        if not ((p / "tokenizer.json").is_file() or (p / "vocab.txt").is_file()):
            raise FileNotFoundError(f"{path} holds neither tokenizer.json nor vocab.txt of BioLORD-2023-C")
        return MPNetTokenizerFast.from_pretrained(str(p), local_files_only=True)
    if p.name.endswith(".json"):
        return PreTrainedTokenizerFast(tokenizer_file=str(p))
    if "vocab" in inspect.signature(MPNetTokenizerFast.__init__).parameters:  # transformers >= 5
        words = p.read_text(encoding="utf-8").splitlines()
        return MPNetTokenizerFast(vocab={w: i for i, w in enumerate(words)}, do_lower_case=True)
    return MPNetTokenizerFast(vocab_file=str(p), do_lower_case=True)


class SATTokenizer:
    """Upstream ``MyTokenizer.tokenize`` around any tokenizer with ``tokenize``/``convert_tokens_to_ids``."""

    def __init__(self, tokenizer, max_length: int = MAX_LENGTH) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, texts: Union[str, Sequence[str]]) -> dict[str, torch.Tensor]:
        if isinstance(texts, str):
            texts = [texts]
        ids = [self.tokenizer.convert_tokens_to_ids(["[CLS]"] + self.tokenizer.tokenize(t) + ["[SEP]"]) for t in texts]
        length = min(max(len(i) for i in ids), self.max_length)
        sep = self.tokenizer.convert_tokens_to_ids("[SEP]")
        out = torch.zeros(len(ids), length, dtype=torch.long)
        for row, tok in enumerate(ids):
            if len(tok) > length:
                tok = tok[:length]
                tok[-1] = sep
            out[row, :len(tok)] = torch.tensor(tok, dtype=torch.long)
        return {"input_ids": out, "attention_mask": torch.where(out > 0, 1, 0)}


class TextTower(nn.Module):
    """``text_tower``: holds ``biolord`` (MPNetModel with pooler, as ``AutoModel`` builds it)."""

    def __init__(self, config=None) -> None:
        super().__init__()
        from transformers import MPNetModel

        self.biolord = MPNetModel(config if hasattr(config, "to_dict") else mpnet_config(config))

    @staticmethod
    def mean_pooling(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.unsqueeze(-1).expand(hidden.size()).float()
        return torch.sum(hidden * mask, 1) / torch.clamp(mask.sum(1), min=1e-9)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.biolord(input_ids=input_ids, attention_mask=attention_mask)
        return self.mean_pooling(out[0], attention_mask)


def modality_codes(modality: Union[str, Sequence[str]], n: int) -> torch.Tensor:
    mods = [modality] * n if isinstance(modality, str) else list(modality)
    try:
        return torch.tensor([MODALITY_CODES[m.lower()] for m in mods], dtype=torch.long)
    except KeyError as exc:
        raise ValueError(f"SAT knows the modalities {sorted(MODALITY_CODES)}; got {exc.args[0]!r}") from None


class SATTextEncoder(nn.Module):
    """Upstream ``Knowledge_Encoder``: text -> query embedding (N, 768) for :class:`SATNetwork`."""

    def __init__(self, config=None, tokenizer=None) -> None:
        super().__init__()
        self.text_tower = TextTower(config)
        d = self.text_tower.biolord.config.hidden_size
        self.projection_layer = nn.Sequential(nn.Linear(d, 768), nn.GELU(), nn.Linear(768, 768))
        self.modality_embed = nn.Embedding(4, 768)
        self.tokenizer = SATTokenizer(tokenizer) if tokenizer is not None and not isinstance(tokenizer, SATTokenizer) \
            else tokenizer

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        """Token ids/mask (N, L) and modality codes (N,) -> queries (N, 768)."""
        feature = self.text_tower(input_ids, attention_mask)
        return self.projection_layer(feature) + self.modality_embed(modality)

    @torch.no_grad()
    def embed(self, texts: Sequence[str], modality: Union[str, Sequence[str]]) -> torch.Tensor:
        """Class names (lower-cased by the caller, as upstream) and 'ct'/'mri'/'us'/'pet' -> (N, 768)."""
        if self.tokenizer is None:
            raise RuntimeError("SATTextEncoder.embed needs a tokenizer (see load_tokenizer)")
        texts: list[str] = [texts] if isinstance(texts, str) else list(texts)
        tok = self.tokenizer(texts)
        dev = self.modality_embed.weight.device
        return self(tok["input_ids"].to(dev), tok["attention_mask"].to(dev),
                    modality_codes(modality, len(texts)).to(dev))
