"""SAT in half precision (autocast) against float32 and against upstream: the numbers of docs/sat.md, "Precision".

    python benchmarks/bench_sat_precision.py [--dtypes bfloat16 float16] [--device cpu|cuda] [--no-e2e]

Run from the repository root with the engine's environment; needs ../shared/data (or TEXTSEG_SHARED_DATA) for
the end-to-end part. Nothing is downloaded: the networks are the reduced SAT-Nano (``sat_oracle.npz``) and
SAT-Pro (``sat_pro_oracle.npz``) of the oracle fixtures, built from their weight recipes and loaded by our
loader, on the fixtures' 2 x 64^3 image and 3 queries.

* Network: our logits under ``torch.autocast(device, dtype)`` vs our float32 logits and (CPU only: the fixture
  holds upstream's network under CPU autocast) vs upstream's logits under the same autocast; max |difference|
  and as a share of the largest float32 logit.
* End to end (``--no-e2e`` skips): the reduced Nano on the oblique chest CT of ``sat_oblique_oracle.npz``
  (``compat_upstream=True``, 6 windows, prompts lung / aorta / heart) under each autocast dtype vs upstream's
  float32 probabilities on the SAT grid: max |probability difference|, voxels whose mask differs, Dice per
  prompt. The adapter refuses float16 on a CPU (PyTorch's CPU float16 3D convolutions are ~200x slower than
  float32), so this script enters the autocast itself around the same sliding window, as the adapter does on
  CUDA.

CPU float16 takes minutes (the reason above); bfloat16 seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "BiomedParseSlicer"), str(ROOT / "Testing"), str(ROOT / "Testing" / "oracles")]
FIX = ROOT / "Testing" / "fixtures"


def build(fx, tmp: Path):
    import torch
    from make_sat_fixture import recipe_tensor

    from textseg.models.sat.loader import fill_aliases, load_sat_network
    from textseg.models.sat.network import SATConfig, SATNetwork

    cfg = SATConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(str(fx["config"])).items()})
    own = SATNetwork(cfg).state_dict()
    sd = {k: torch.from_numpy(recipe_tensor(k, own[k].shape, i, int(fx["seed"])))
          for i, k in enumerate(fx["net_keys"].tolist())}
    path = tmp / f"net{int(fx['seed'])}.pth"
    torch.save({"model_state_dict": {"module." + k: v for k, v in fill_aliases(sd, own).items()}}, path)
    return load_sat_network(path, cfg)


def network_rows(dtypes, device, tmp):
    import torch
    from make_sat_fixture import recipe_image

    pro_fx, nano_fx = np.load(FIX / "sat_pro_oracle.npz"), np.load(FIX / "sat_oracle.npz")
    image = torch.from_numpy(recipe_image()).repeat(1, 3, 1, 1, 1).to(device)
    q = torch.from_numpy(pro_fx["queries"]).to(device)
    rows = []
    for name, fx in (("nano", nano_fx), ("pro", pro_fx)):
        net = build(fx, tmp).to(device)
        with torch.no_grad():
            ref = net(image, q).float().cpu().numpy()[..., ::4, ::4, ::4]
            scale = float(np.abs(ref).max())
            for dt in dtypes:
                t0 = time.perf_counter()
                with torch.autocast(torch.device(device).type, dtype=getattr(torch, dt)):
                    lg = net(image, q)
                sec = time.perf_counter() - t0
                sub = lg.float().cpu().numpy()[..., ::4, ::4, ::4]
                up = (np.abs(sub - pro_fx[f"{name}_{dt}_logits_sub"]).max()
                      if torch.device(device).type == "cpu" and f"{name}_{dt}_logits_sub" in pro_fx.files else np.nan)
                rows.append(dict(net=name, dtype=dt, out_dtype=str(lg.dtype), seconds=round(sec, 2), max_logit=scale,
                                 from_fp32=float(np.abs(sub - ref).max()), from_upstream_autocast=float(up)))
    return rows


def e2e_rows(dtypes, device, tmp):
    import make_sat_oblique_fixtures as rec
    import torch
    from conftest import SHARED
    from make_sat_fixture import recipe_tensor

    from textseg.catalog import get_model
    from textseg.formats.images import read_volume
    from textseg.models.base import RunContext
    from textseg.models.sat.adapter import SATAdapter
    from textseg.models.sat.loader import fill_aliases, load_text_tower
    from textseg.models.sat.text import SATTextEncoder
    from textseg.models.sat.window import sliding_window
    from textseg.presets import get_preset
    from textseg.volume import Volume

    obl = np.load(FIX / "sat_oblique_oracle.npz")
    net = build(obl, tmp).to(device)
    text_cfg = json.loads(str(obl["text_config"]))
    own = SATTextEncoder(text_cfg).state_dict()
    sd = {k: torch.from_numpy(recipe_tensor(k, own[k].shape, i, int(obl["seed"]) + 1))
          for i, k in enumerate(obl["text_keys"].tolist())}
    torch.save({"model_state_dict": {"module." + k: v for k, v in fill_aliases(sd, own).items()}}, tmp / "text.pth")
    (tmp / "config.json").write_text(json.dumps(dict(text_cfg, model_type="mpnet")))
    (tmp / "vocab.txt").write_text("\n".join(obl["vocab"].tolist()) + "\n")
    text = load_text_tower(tmp / "text.pth", tmp / "config.json", tokenizer=tmp)
    src = read_volume(SHARED.joinpath(*rec.SOURCE))
    o, size = rec.crop_geometry(src.spacing, src.origin, src.direction)
    rows = []
    for case in rec.ROTATIONS:
        origin, direction = rec.rotate_geometry(src.spacing, o, src.direction, size, rec.ROTATIONS[case])
        vol = Volume(rec.recipe_volume_array(src.array), src.spacing, origin, direction)
        a = SATAdapter(get_model("sat-nano"), None, network=net, text_tower=text, patch=tuple(obl["patch"]),
                       compat_upstream=True)
        a.load("cpu")
        state = a.prepare(vol.canonical(), get_preset("CT"), RunContext("cpu"))
        queries = text.embed(obl["prompts"].tolist(), "ct").to(device)
        up = np.unpackbits(obl[f"{case}_masks"])[: 3 * state.image.size].reshape((3,) + state.image.shape).astype(bool)
        for dt in dtypes:
            t0 = time.perf_counter()
            with torch.autocast(torch.device(device).type, dtype=getattr(torch, dt)):
                prob = sliding_window(state.image, queries, net.encode, net.decode, patch=tuple(obl["patch"]),
                                      device=device, batch_size=2, max_queries=2).numpy()
            sec = time.perf_counter() - t0
            mine = prob > 0.5
            dice = [float(2 * (mine[n] & up[n]).sum() / (mine[n].sum() + up[n].sum())) for n in range(3)]
            rows.append(dict(case=case, dtype=dt, seconds=round(sec, 2),
                             max_prob_diff=float(np.abs(prob[:, ::2, ::2, ::2] - obl[f"{case}_probability_sub"]).max()),
                             mask_voxels_differing=int((mine != up).sum()), voxels=int(mine.size),
                             dice=[round(d, 5) for d in dice]))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float16"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-e2e", action="store_true")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        print("| network | autocast | output | max abs logit (fp32) | max diff from fp32 | % | "
              "max diff from upstream's autocast | % | seconds |")
        print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        for r in network_rows(a.dtypes, a.device, Path(tmp)):
            s = r["max_logit"]
            print(f"| {r['net']} | {r['dtype']} | {r['out_dtype']} | {s:.2f} | {r['from_fp32']:.4f} | "
                  f"{100 * r['from_fp32'] / s:.2f} | {r['from_upstream_autocast']:.4f} | "
                  f"{100 * r['from_upstream_autocast'] / s:.2f} | {r['seconds']} |")
        if not a.no_e2e:
            print("\n| case | autocast | max prob diff from upstream fp32 | mask voxels differing | Dice per prompt | "
                  "seconds |")
            print("| --- | --- | ---: | ---: | --- | ---: |")
            for r in e2e_rows(a.dtypes, a.device, Path(tmp)):
                print(f"| {r['case']} | {r['dtype']} | {r['max_prob_diff']:.4f} | {r['mask_voxels_differing']} of "
                      f"{r['voxels']} | {', '.join(map(str, r['dice']))} | {r['seconds']} |")


if __name__ == "__main__":
    main()
