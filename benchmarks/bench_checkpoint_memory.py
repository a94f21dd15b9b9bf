"""Peak memory of loading a full-size official checkpoint, which carries optimizer state, before and after
memory-mapped loading (textseg.models.checkpoint.read_checkpoint).

    python benchmarks/bench_checkpoint_memory.py [--model sat-nano biomedparse-v2] [--dir DIR] [--json out.json]

For each model a full-size random-weight file is written once in ``DIR`` (default
/work/scratch/weights-bench, several GB: keep it out of the repository) in the official layout:

* ``sat-nano``: ``nano.pth`` as SAT's train/trainer.py saved it: ``{'step', 'model_state_dict':
  {'module.' + key}, 'optimizer_state_dict'}``, AdamW moments for every parameter, the learning rate a
  numpy float64 pickled under numpy 1's name (Testing/checkpoint_layouts.py). About 1.3 GB.
* ``biomedparse-v2``: ``biomedparse_v2.ckpt`` as Lightning saved it: ``{'state_dict': {'model.' + key}``
  with the two loss tensors, ``'optimizer_states': [AdamW state]``, epoch, global_step}. About 4.46 GB,
  as the published file (needs ~10 GB of free memory: check ``free -g`` first).

Each measurement runs in a fresh process through the model's real loader (``load_sat_network``; v2:
``build_v2`` + ``load_v2_weights``, as the adapter does) and samples the resident set size (which counts
the file pages a memory map has read) every 5 ms (benchmarks/peak.py):

* ``before``: ``torch.load`` without ``mmap`` (the whole pickle, optimizer state included, read into
  memory) - what the loaders did before; numpy's scalar is allowed so that SAT's file loads at all.
* ``after``: the loaders as they are (``mmap=True``, the mapped tensors assigned to the model).

Reported: peak growth over the process before loading, during the load and after reading every weight
once (what the first inference does), and the model's own size. Results: docs/weights.md, "Memory".
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "BiomedParseSlicer"))
sys.path.insert(0, str(ROOT / "Testing"))
sys.path.insert(0, str(ROOT / "benchmarks"))

FILES = {"sat-nano": "nano.pth", "biomedparse-v2": "biomedparse_v2.ckpt"}


def write(model: str, path: Path) -> None:
    import numpy as np
    import torch
    from checkpoint_layouts import adamw_state, save_numpy1

    torch.manual_seed(0)
    tmp = path.with_suffix(".tmp")
    if model == "sat-nano":
        from textseg.models.sat.network import NANO, SATNetwork

        net = SATNetwork(NANO)
        sd = {"module." + k: v for k, v in net.state_dict().items()}
        params = list(dict(net.named_parameters()).values())  # each tensor once (the aliases share them)
        save_numpy1({"step": 190000, "model_state_dict": sd,
                     "optimizer_state_dict": adamw_state(params, np.float64(3.2e-5))}, tmp)
    else:
        from textseg.models.biomedparse.v2.loader import LOSS_KEYS
        from textseg.models.biomedparse.v2.model import build_v2

        net = build_v2()
        sd = {"model." + k: v for k, v in net.state_dict().items()}
        sd.update({"model." + k: torch.ones(2) for k in LOSS_KEYS})
        torch.save({"epoch": 99, "global_step": 123400, "pytorch-lightning_version": "2.4.0", "state_dict": sd,
                    "optimizer_states": [adamw_state(net.parameters(), 1e-5)], "lr_schedulers": []}, tmp)
    os.replace(tmp, path)


def child(model: str, mode: str, path: str) -> dict:
    """One load in this (fresh) process; ``mode`` 'before' reads the whole file as the loaders used to."""
    import torch
    from peak import Peak

    if mode == "before":
        real = torch.load

        def whole_file(*args, **kwargs):
            kwargs["mmap"] = False
            return real(*args, **kwargs)

        torch.load = whole_file
    if model == "sat-nano":
        from textseg.models.sat.loader import load_sat_network
        from textseg.models.sat.network import NANO

        def load():
            return load_sat_network(path, NANO)
    else:
        from textseg.models.biomedparse.v2.loader import load_v2_weights
        from textseg.models.biomedparse.v2.model import build_v2

        def load():
            net = build_v2()  # the adapter's full-size model (random init), then the checkpoint
            load_v2_weights(net, Path(path))
            return net
    with Peak("cpu") as p:
        net = load()
        load_mb = (p.peak - p.base) / 2**20
        total = sum(float(t.float().sum()) for t in net.state_dict().values())  # read every weight once
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in net.state_dict().values()}
    model_mb = sum(storages.values()) / 2**20  # each tensor once (SAT's state dict names every conv twice)
    return {"model": model, "mode": mode, "file_mb": os.path.getsize(path) / 2**20, "model_mb": model_mb,
            "load_peak_mb": load_mb, "peak_after_reading_mb": p.added_mb, "seconds_cpu": p.cpu_s, "check": total}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", nargs="+", default=["sat-nano"], choices=sorted(FILES))
    ap.add_argument("--dir", default="/work/scratch/weights-bench")
    ap.add_argument("--json")
    ap.add_argument("--child", nargs=3, metavar=("MODEL", "MODE", "PATH"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(*a.child)))
        return
    rows = []
    for model in a.model:
        path = Path(a.dir) / FILES[model]
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.is_file():
            print(f"writing a full-size {model} checkpoint to {path} ...", flush=True)
            write(model, path)
        for mode in ("before", "after"):
            r = subprocess.run([sys.executable, __file__, "--child", model, mode, str(path)], capture_output=True,
                               text=True, check=True)
            rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
            x = rows[-1]
            print(f"{model:<15} {mode:<6} file {x['file_mb']:7.0f} MB  model {x['model_mb']:6.0f} MB  peak while "
                  f"loading +{x['load_peak_mb']:6.0f} MB  after reading every weight "
                  f"+{x['peak_after_reading_mb']:6.0f} MB  ({x['seconds_cpu']:.1f} s CPU)", flush=True)
        before, after = rows[-2], rows[-1]
        assert abs(before["check"] - after["check"]) <= 1e-6 * max(1.0, abs(before["check"])), "different weights"
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
