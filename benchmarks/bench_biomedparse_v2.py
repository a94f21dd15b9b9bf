"""BiomedParse v2: ours vs upstream, same input, device and random (full-size) weights.

    PYTHONPATH=<stand-ins for timm, fvcore, detectron2 (see Testing/fixtures/README.md)> \
      python benchmarks/bench_biomedparse_v2.py --upstream /path/to/BiomedParse-v2 --tokenizer /path/to/clip \
          [--slices 200] [--device cuda] [--prompts 1 10]

The target workload is a 512x512x200 CT. On a CPU, run fewer slices (``--slices 2``) and read the
extrapolated column (per-call constant = text encoding, timed inside the run, counted once; the rest scaled to 200
slices):
both pipelines are linear in the number of slices (per slice: backbone once, decoder
once per prompt), plus a per-call constant (text; upstream also encodes 17 classes x 81 templates each call).
Upstream: ``BiomedParseModel.forward_eval`` with all prompts joined by [SEP] (slice batch 4), then its
bicubic-antialias upsampling. Ours: the adapter's path (``encode`` once per slice batch of 4, ``decode`` per
group of 8 prompts, independent prompts, upsampling). Peak memory: CUDA peak allocated on a GPU; on a CPU the
growth of the process's peak RSS (a coarse bound, shown for completeness). ``cpu s/slice``: the same split in
process CPU time (all threads), which other jobs on a shared machine disturb far less than wall time; run
with ``OMP_WAIT_POLICY=PASSIVE`` so that idle threads do not spin it up.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "Testing" / "oracles"))
sys.path.insert(0, str(ROOT / "BiomedParseSlicer"))

from textseg.models.biomedparse.v2 import preprocess as pre  # noqa: E402
from textseg.models.biomedparse.v2.decoder import Sampling  # noqa: E402
from textseg.models.biomedparse.v2.model import build_v2  # noqa: E402
from textseg.models.clip_tokenizer import tokenize  # noqa: E402

TARGETS = ["liver", "spleen", "left kidney", "right kidney", "pancreas", "stomach", "aorta", "gallbladder",
           "esophagus", "duodenum"]


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    r0, t0, c0 = rss_mb(), time.perf_counter(), time.process_time()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        return time.perf_counter() - t0, time.process_time() - c0, torch.cuda.max_memory_allocated() / 2 ** 20
    return time.perf_counter() - t0, time.process_time() - c0, rss_mb() - r0


def sentences_of(prompts):
    return [f"Visualization of the {t} in abdominal CT imaging" for t in prompts]


def run_upstream(model, vol, prompts, device):
    with torch.no_grad():
        out = model({"image": vol[None].to(device), "text": ["[SEP]".join(sentences_of(prompts))]}, mode="eval",
                    slice_batch_size=4)
        m = out["predictions"]["pred_gmasks"]
        F.interpolate(m, size=(512, 512), mode="bicubic", align_corners=False, antialias=True)


class Timed:
    """Wraps a callable and accumulates its wall time (the per-call constant, timed inside the run)."""

    def __init__(self, fn, device):
        self.fn, self.device, self.seconds, self.cpu = fn, device, 0.0, 0.0

    def __call__(self, *a, **k):
        t0, c0 = time.perf_counter(), time.process_time()
        out = self.fn(*a, **k)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - t0
        self.cpu += time.process_time() - c0
        return out


def run_ours(model, vol, prompts, device):
    sentences = sentences_of(prompts)
    with torch.inference_mode():
        ids, am = tokenize(sentences)
        groups = [slice(i, i + 8) for i in range(0, len(sentences), 8)]
        pr = [model.embed_prompts(torch.from_numpy(ids[g]).to(device),
                                  torch.from_numpy(am[g]).to(device)) for g in groups]
        for start in range(0, vol.shape[0], 4):
            idx = list(range(start, min(start + 4, vol.shape[0])))
            enc = model.encode(pre.pack_neighbours(vol, idx).to(device))
            for p in pr:
                d = model.decode(enc, p, Sampling(row_seeds=list(range(len(idx) * p.tokens.shape[1]))))
                pre.upsample_logits(d.masks, 512).sigmoid()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--upstream", type=Path, required=True)
    ap.add_argument("--tokenizer", type=Path, required=True)
    ap.add_argument("--slices", type=int, default=None, help="default: 200 on a GPU, 2 on a CPU")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--prompts", type=int, nargs="+", default=[1, 10])
    args = ap.parse_args()
    device = torch.device(args.device)
    n = args.slices or (200 if device.type == "cuda" else 2)
    from make_biomedparse_v2_fixture import build_model

    torch.manual_seed(0)
    upstream = build_model(args.upstream, False, args.tokenizer).to(device)
    ours = build_v2(device="cpu")
    ours.load_state_dict(upstream.state_dict(), strict=True)
    ours.to(device)
    g = torch.Generator().manual_seed(0)
    vol = pre.square_pad_resize((torch.rand(n, 512, 512, generator=g) * 255).to(torch.uint8).numpy())[0]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}; torch {torch.__version__}; fp32; {n} slices of 512x512 (target 200)")
    print(f"{'prompts':>7} {'impl':>8} {'seconds':>9} {'per call':>9} {'s/slice':>8} {'200 slices (extrap.)':>21} "
          f"{'peak MB':>8} {'cpu s/slice':>12}")
    for p in args.prompts:
        prompts = TARGETS[:p] if p <= len(TARGETS) else (TARGETS * (p // len(TARGETS) + 1))[:p]
        res = {}
        for impl, fn, model, owner, attr in (("upstream", run_upstream, upstream, upstream.sem_seg_head,
                                              "encode_prompts"),
                                             ("ours", run_ours, ours, ours, "embed_prompts")):
            timer = Timed(getattr(owner, attr), device)
            setattr(owner, attr, timer)  # text encoding: the per-call constant
            sec, cpu, mem = measure(lambda: fn(model, vol, prompts, device), device)  # noqa: B023 - runs in this iteration
            delattr(owner, attr)
            c = timer.seconds
            per_slice = max(sec - c, 0.0) / n
            res[impl] = c + per_slice * 200  # the per-call constant once, the rest linear in slices
            cpu_slice = max(cpu - timer.cpu, 0.0) / n
            print(f"{p:>7} {impl:>8} {sec:>9.1f} {c:>9.1f} {per_slice:>8.2f} {res[impl]:>21.0f} {mem:>8.0f} "
                  f"{cpu_slice:>12.2f}")
        print(f"{p:>7} {'speed-up':>8} {'':>9} {'':>9} {'':>8} {res['upstream'] / res['ours']:>20.2f}x")


if __name__ == "__main__":
    main()
