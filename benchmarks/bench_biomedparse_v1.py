"""BiomedParse v1: ours vs the official code, same input, weights and device; prints a table.

Usage (upstream checkout and its import stand-ins as for Testing/oracles/make_biomedparse_v1_fixture.py):

    PYTHONPATH=<stand-ins> python benchmarks/bench_biomedparse_v1.py --upstream /path/to/BiomedParse \
        [--config reduced|full] [--image-size 1024] [--slices 4] [--device cpu|cuda]

Both models get the same seeded random weights (upstream's state dict, saved in the official
``biomedparse_v1.pt`` layout and read by our loader). Upstream runs as its notebooks do: one
``evaluate_demo`` call per slice and prompt (its multi-prompt call concatenates tokens, which is not
the same answer), image re-encoded each time. Ours encodes each slice batch once and decodes all prompts.
Per-prompt figures are seconds / (slices x prompts); "x" is upstream / ours. Timing excludes
preprocessing (identical code path cost) and model construction. Extrapolation to a 200-slice CT
multiplies the per-slice figures by 200 (both are linear in slices).
"""

from __future__ import annotations

import argparse
import importlib.util
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "BiomedParseSlicer"))

from textseg.models.biomedparse.v1.model import REDUCED, V1Config, build_v1, load_v1_weights  # noqa: E402
from textseg.models.clip_tokenizer import tokenize  # noqa: E402

PROMPTS = ["liver", "spleen", "left kidney", "right kidney", "pancreas", "aorta", "postcava", "stomach",
           "gallbladder", "duodenum"]


def oracle_module():
    spec = importlib.util.spec_from_file_location("bpv1_oracle",
                                                  ROOT / "Testing" / "oracles" / "make_biomedparse_v1_fixture.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def peak_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--upstream", required=True, type=Path)
    ap.add_argument("--config", choices=["reduced", "full"], default="reduced")
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--slices", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.set_grad_enabled(False)
    orc = oracle_module()
    upstream = args.upstream.resolve()
    tok_dir = tempfile.mkdtemp(prefix="clip-tok-")
    from textseg.models.clip_tokenizer import build_vocab_files

    build_vocab_files(Path(tok_dir))
    sys.path.insert(0, str(upstream))
    import os

    cwd = os.getcwd()
    os.chdir(upstream)
    up = orc.build(upstream, orc.load_config(upstream, tok_dir, reduced=args.config == "reduced")).eval()
    os.chdir(cwd)
    orc.seed_weights(up)
    from utilities.constants import BIOMED_CLASSES

    up.sem_seg_head.predictor.lang_encoder.get_text_embeddings(BIOMED_CLASSES + ["background"], is_eval=True)
    cfg = REDUCED if args.config == "reduced" else V1Config()
    cfg = V1Config(**{**cfg.__dict__, "image_size": args.image_size})
    ours = build_v1(cfg)
    with tempfile.TemporaryDirectory() as d:
        torch.save(up.state_dict(), Path(d) / "biomedparse_v1.pt")
        load_v1_weights(ours, Path(d) / "biomedparse_v1.pt")
    up.to(device)
    ours.to(device)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.slices, args.image_size, args.image_size, 3), dtype=np.uint8)
    for k in ("spatial", "visual", "audio"):
        up.task_switch[k] = False
    up.task_switch["grounding"] = True

    def run_upstream(prompts):
        for img in images:
            for p in prompts:
                data = {"image": torch.from_numpy(img).permute(2, 0, 1).to(device), "text": [p],
                        "height": args.image_size, "width": args.image_size}
                up.evaluate_demo([data])

    def run_ours(prompts):
        ids, att = tokenize(prompts, cfg.context_length)
        tok, cls = ours.embed_text(torch.from_numpy(ids).to(device))
        enc = ours.encode(torch.from_numpy(images).permute(0, 3, 1, 2).to(device))
        for s in range(0, len(prompts), 4):  # the adapter's max_prompts_per_call
            ours.decode(enc, tok[s:s + 4], torch.from_numpy(att[s:s + 4]).to(device), cls[s:s + 4])

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {device} ({name})")
    print(f"config: {args.config}, image {args.image_size}x{args.image_size}, {args.slices} slices, torch "
          f"{torch.__version__}")
    print(f"{'prompts':>7} | {'upstream s':>10} | {'ours s':>8} | {'up s/prompt/slice':>17} | "
          f"{'ours s/prompt/slice':>19} | {'x':>5} | {'peak MB':>8}")
    for n in (1, 10):
        prompts = PROMPTS[:n]
        times = {}
        for name, fn in (("upstream", run_upstream), ("ours", run_ours)):
            fn(prompts[:1])  # warm-up
            sync(device)
            t = time.perf_counter()
            fn(prompts)
            sync(device)
            times[name] = time.perf_counter() - t
        per = {k: v / (n * args.slices) for k, v in times.items()}
        print(f"{n:>7} | {times['upstream']:>10.2f} | {times['ours']:>8.2f} | {per['upstream']:>17.3f} | "
              f"{per['ours']:>19.3f} | {times['upstream'] / times['ours']:>5.1f} | {peak_mb(device):>8.0f}")
        print(f"        200-slice extrapolation: upstream {per['upstream'] * n * 200:.0f} s, ours "
              f"{per['ours'] * n * 200:.0f} s")


if __name__ == "__main__":
    main()
