"""BiomedParse v2 compat mode: how often a Boltzmann draw flips against upstream, and what it does to the logits.

    PYTHONPATH=<stand-ins for timm, fvcore, detectron2 (see Testing/fixtures/README.md)> \
      python benchmarks/bench_v2_draw_flips.py --upstream /path/to/BiomedParse-v2 [--config full] [--runs 40]

Upstream's ``BoltzFormerTextDecoder`` and ours (``compat``: one generator, upstream's draw order) get the same
random weights (fan-in normal; norms near 1) and the same random multi-scale features of one 512x512 slice
(scales 16, 32, 64; mask features 128) and two prompts (3 and 7 tokens), and run ``--runs`` seeds. Per run:
upstream's sampled attention masks (all heads but the last, whose draw no layer reads) against ours, and the
final mask logits of every (slice, prompt) row. Printed: draws compared in rows not yet flipped, first flips
(a flipped row diverges and its later draws are not counted), the flip rate, the largest logit difference of
rows without a flip and of rows with one. ``--config reduced`` is the test decoder (hidden 32)
on the same maps. A CPU handles ``full`` at about 2 s per run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "BiomedParseSlicer"))

from textseg.models.biomedparse.v2.decoder import BoltzFormerDecoder, Sampling  # noqa: E402

CONFIGS = {
    "full": dict(in_channels=512, hidden_dim=512, dim_proj=512, num_queries=16, nheads=8, dim_feedforward=2048,
                 dec_layers=9, mask_dim=512, pre_self_attention=True),
    "reduced": dict(in_channels=32, hidden_dim=32, dim_proj=32, num_queries=6, nheads=4, dim_feedforward=64,
                    dec_layers=3, mask_dim=32, pre_self_attention=True),
}
SAMPLING = dict(mask_threshold=1.1, do_boltzmann=True, sample_ratio=0.1, base_temp=1)


def random_weights(model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, p in model.state_dict().items():
            r = torch.randn(p.shape, generator=g)
            if p.dim() >= 2:
                p.copy_(r / np.sqrt(p[0].numel()))
            elif "norm" in k and k.endswith("weight"):
                p.copy_(1 + 0.1 * r)
            else:
                p.copy_(0.02 * r)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--upstream", type=Path, required=True)
    ap.add_argument("--config", choices=list(CONFIGS), default="full")
    ap.add_argument("--runs", type=int, default=40)
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--init", choices=["upstream", "fanin"], default="upstream",
                    help="weights: upstream's module initialisation (torch.manual_seed(0)) or fan-in normal")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    sys.path.insert(0, str(a.upstream.resolve()))
    from src.model.transformer_decoder.boltzformer_cls_decoder import BoltzFormerTextDecoder  # upstream

    cfg = CONFIGS[a.config]
    torch.manual_seed(0)
    up = BoltzFormerTextDecoder(None, boltzmann_sampling=SAMPLING, **cfg).eval()
    if a.init == "fanin":
        random_weights(up)
    ours = BoltzFormerDecoder(**{k: v for k, v in cfg.items() if k not in ("in_channels", "pre_self_attention")}).eval()
    ours.load_state_dict(up.state_dict(), strict=True)
    c = cfg["hidden_dim"]
    g = torch.Generator().manual_seed(1)
    feats = [torch.randn(1, c, s, s, generator=g) for s in (16, 32, 64)]
    mask_features = torch.randn(1, c, 128, 128, generator=g)
    tokens = torch.nn.utils.rnn.pad_sequence([torch.randn(n, c, generator=g) for n in (3, 7)], padding_value=-1)
    tokens[tokens.sum(-1) == -c] = 0
    p = tokens.shape[1]
    feats_p, mf_p = [f.repeat(p, 1, 1, 1) for f in feats], mask_features.repeat(p, 1, 1, 1)
    draws = flips = 0
    clean, hit = 0.0, 0.0
    t0 = time.time()
    for seed in range(a.first_seed, a.first_seed + a.runs):
        heads = []
        orig = up.forward_prediction_heads
        up.forward_prediction_heads = lambda *x, **k: (heads.append(orig(*x, **k)), heads[-1])[1]  # noqa: B023 - runs in this iteration
        torch.manual_seed(seed)
        with torch.no_grad():
            ref = up(feats_p, mf_p, extra={"grounding_tokens": tokens})["pred_gmasks"]
        up.forward_prediction_heads = orig
        got = []
        head = ours.head
        ours.head = lambda *x, **k: (got.append(head(*x, **k)), got[-1])[1]  # noqa: B023 - runs in this iteration
        with torch.no_grad():
            out = ours(feats_p, mf_p, tokens, None, Sampling(generator=torch.Generator().manual_seed(seed))).masks
        del ours.head
        rows = set()
        for (_, a_ours), (_, a_up, _) in zip(got[:-1], heads[:-1]):
            diff = a_ours != a_up
            per_row = diff[0].numel() * cfg["nheads"]
            row = torch.arange(diff.numel()).view(diff.shape) // per_row
            fresh = diff & ~torch.isin(row, torch.tensor(sorted(rows), dtype=torch.long))
            draws += int((~torch.isin(row, torch.tensor(sorted(rows), dtype=torch.long))).sum())
            flips += int(fresh.sum())  # first flips only: a flipped row then diverges and flips again
            rows |= set(row[diff].unique().tolist())
        d = (out - ref).abs().flatten(1).max(1).values
        for r in range(len(d)):
            if r in rows:
                hit = max(hit, float(d[r]))
            else:
                clean = max(clean, float(d[r]))
        if rows:
            print(f"seed {seed}: flipped rows {sorted(rows)}, their max logit difference "
                  f"{max(float(d[r]) for r in rows):.2e}", flush=True)
    rate = flips / max(draws, 1)
    print(f"{a.config}: {a.runs} runs, {draws} draws, {flips} flips ({rate:.2e} per draw, 1 in {1 / rate:.3g})"
          if flips else f"{a.config}: {a.runs} runs, {draws} draws, no flip")
    print(f"max logit difference: rows without a flip {clean:.2e}, rows with one {hit:.2e}; {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
