"""GPU figures in one call: ours vs the upstream code for every model, on the lent GPU machine.

    python benchmarks/gpu_prepare.py --biomedparse-v1 ... --sat ...      # here, once (docs/benchmarks.md)
    # then the device tool, from the repository root, carrying .gpu:
    PYTHONUNBUFFERED=1 python3 benchmarks/gpu_suite.py --prepared .gpu --out "$OUT"

    python benchmarks/gpu_suite.py --prepared DIR --out DIR --dry-run   # the same suite on a CPU, tiny sizes

Installs the carried wheels into a private folder, then runs each part in its own process with its own time budget
(``PARTS``; a part that overruns is stopped and recorded as such, the others go on), under one deadline for the
whole suite (default 450 s). After every part it rewrites ``results.json`` and ``results.md`` in ``--out``;
``suite.log`` and ``parts.log`` hold the output. docs/benchmarks.md explains every column.

For each model (BiomedParse v1 and v2, SegVol, SAT-Nano, SAT-Pro, deepbet): ours (the engine's Predictor) and the
upstream reference code, same seeded full-size random weights, same 512x512x200 CT (deepbet: a 1 mm T1), with 1 and
10 prompts: end-to-end seconds, the first prompt and each further prompt on the same image, peak GPU memory; ours in
fp32 and bf16 autocast (SAT: fp32 and its float16 default, upstream's own autocast) with the masks compared with
fp32; and the server's overhead on loopback. Parts left over at the deadline are named at the end with the command
for a second call.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent

# (part, budget in seconds on the GPU machine). Order = priority: the deadline skips what is left at the end.
PARTS: tuple[tuple[str, int], ...] = (
    ("env", 25), ("input", 40),
    ("deepbet/ours", 35), ("deepbet/upstream", 30),
    ("segvol/ours", 60), ("segvol/upstream", 80),
    ("sat-nano/ours", 50), ("sat-nano/upstream", 50),
    ("biomedparse-v2/ours", 75), ("biomedparse-v2/upstream", 55),
    ("biomedparse-v1/ours", 60), ("biomedparse-v1/upstream", 55),
    ("sat-pro/ours", 70), ("sat-pro/upstream", 65),
    ("server", 60),
)
INSTALL_BUDGET = 90
MIN_START = 15  # seconds a part needs at least; with less left before the deadline it is not started
DRY_SCALE = 8.0  # budgets x this on a CPU with --dry-run (tiny sizes, but no GPU)


# ---- running one part ---------------------------------------------------------------------------------
class Runner:
    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        self.out = Path(a.out)
        self.work = Path(a.work)
        self.prepared = Path(a.prepared).resolve()
        self.t_start = time.monotonic()
        self.deadline = self.t_start + a.deadline
        self.records: list[dict[str, Any]] = []
        self.parts: dict[str, dict[str, Any]] = {}
        self.meta: dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "dry_run": a.dry_run,
                                     "device": a.device, "deadline_s": a.deadline}
        self.log_file = open(self.out / "suite.log", "a", buffering=1)
        self.parts_log = open(self.out / "parts.log", "a", buffering=1)
        self.active: Optional[subprocess.Popen] = None

    def say(self, msg: str) -> None:
        line = f"[{time.monotonic() - self.t_start:6.1f} s] {msg}"
        print(line, flush=True)
        self.log_file.write(line + "\n")

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def env_for(self, part: str) -> dict[str, str]:
        site, upsite = self.work / "site", self.work / "site-upstream"
        paths = [str(site), str(ROOT / "BiomedParseSlicer"), str(HERE)]
        if part.endswith("/upstream") and not part.startswith("deepbet"):
            paths = [str(self.prepared / "standins" / "always")] + paths
        if part == "segvol/upstream":  # MONAI <= 1.3 (1.4 removed ViT(pos_embed=...)); SAT's code runs on the new one
            paths = [str(upsite)] + paths
        env = dict(os.environ)
        env.update(PYTHONPATH=os.pathsep.join(paths), TEXTSEG_HOME=str(self.work / "home"), PYTHONUNBUFFERED="1",
                   HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                   PYTHONDONTWRITEBYTECODE="1")
        env.pop("TEXTSEG_SHARED_DATA", None)
        return env

    def run_part(self, part: str, budget: float) -> None:
        entry: dict[str, Any] = {"budget_s": round(budget, 1)}
        self.parts[part] = entry
        left = self.left()
        if left < MIN_START:
            entry.update(status="not started", note=f"suite deadline ({self.a.deadline:.0f} s) reached")
            self.say(f"{part}: not started (deadline)")
            return
        limit = min(budget, left)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", part, "--device", self.a.device,
               "--work", str(self.work), "--prepared", str(self.prepared)] + (["--tiny"] if self.a.dry_run else [])
        self.say(f"{part}: start (budget {limit:.0f} s)")
        t0 = time.monotonic()
        errpath = self.work / "logs" / (part.replace("/", "_") + ".log")
        errpath.parent.mkdir(parents=True, exist_ok=True)
        got = 0
        with open(errpath, "w") as err:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=self.env_for(part),
                                    cwd=str(ROOT), start_new_session=True)
            self.active = proc
            lines: queue.Queue[Optional[str]] = queue.Queue()

            def reader() -> None:
                for line in proc.stdout:  # type: ignore[union-attr]
                    lines.put(line)
                lines.put(None)

            threading.Thread(target=reader, daemon=True).start()
            timed_out, eof = False, False
            while not eof:
                remaining = limit - (time.monotonic() - t0)
                if remaining <= 0:
                    timed_out = True
                    break
                try:
                    line = lines.get(timeout=min(remaining, 1.0))
                except queue.Empty:
                    continue
                if line is None:
                    eof = True
                elif line.startswith("RESULT "):
                    try:
                        rec = json.loads(line[7:])
                    except ValueError:
                        continue
                    rec.setdefault("part", part)
                    self.records.append(rec)
                    got += 1
                    self.say(f"  {summary(rec)}")
                    self.save()
            if timed_out:
                self.kill(proc)
            rc = proc.wait()
            self.active = None
            while True:  # lines that arrived while stopping
                try:
                    line = lines.get_nowait()
                except queue.Empty:
                    break
                if line and line.startswith("RESULT "):
                    try:
                        self.records.append(dict(json.loads(line[7:]), part=part))
                        got += 1
                    except ValueError:
                        pass
        seconds = time.monotonic() - t0
        tail = errpath.read_text(errors="replace")[-4000:]
        self.parts_log.write(f"\n===== {part} (exit {rc}, {seconds:.1f} s) =====\n{tail}\n")
        if timed_out:
            status = "stopped at its budget"
        elif rc == 0:
            status = "ok"
        else:
            status = "failed"
        entry.update(status=status, seconds=round(seconds, 1), results=got, exit_code=rc)
        if status != "ok":
            entry["error"] = last_error(tail)
        self.say(f"{part}: {status} in {seconds:.1f} s ({got} result(s))"
                 + (f": {entry['error']}" if status == "failed" else ""))

    def kill(self, proc: subprocess.Popen) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                proc.wait(timeout=5)
                return
            except subprocess.TimeoutExpired:
                continue

    def install(self) -> None:
        """The carried wheels into private folders: site (engine, ours) and site-upstream (upstream's MONAI)."""
        t0 = time.monotonic()
        entry: dict[str, Any] = {"budget_s": INSTALL_BUDGET}
        self.parts["install"] = entry
        try:
            manifest = json.loads((self.prepared / "manifest.json").read_text())
        except (OSError, ValueError) as exc:
            entry.update(status="failed", error=f"{self.prepared}/manifest.json unreadable ({exc}): run gpu_prepare.py")
            raise SystemExit(f"gpu_suite: {entry['error']}") from None
        self.meta["prepared"] = {k: manifest.get(k) for k in ("created", "python", "upstream", "folder_bytes")}
        want = manifest.get("python")
        have = f"{sys.version_info.major}.{sys.version_info.minor}"
        if want != have:
            self.say(f"warning: {self.prepared} was prepared for Python {want}, this is {have}")
        import shutil

        for folder, target in (("whl", "site"), ("whl-upstream", "site-upstream")):
            dest = self.work / target
            shutil.rmtree(dest, ignore_errors=True)
            wheels = sorted(str(p) for p in (self.prepared / folder).glob("*.whl"))
            if not wheels:
                continue
            cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                   "--no-cache-dir", "--disable-pip-version-check", "--target", str(dest)] + wheels
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=INSTALL_BUDGET)
            if p.returncode:
                entry.update(status="failed", error=p.stderr.strip()[-1500:])
                self.say(f"install {folder}: FAILED\n{p.stderr[-1500:]}")
                return
        home = self.work / "home"
        shutil.rmtree(home, ignore_errors=True)
        shutil.copytree(self.prepared / "home", home)
        entry.update(status="ok", seconds=round(time.monotonic() - t0, 1))
        self.say(f"install: ok in {entry['seconds']} s")

    def save(self) -> None:
        self.meta["elapsed_s"] = round(time.monotonic() - self.t_start, 1)
        data = {"meta": self.meta, "parts": self.parts, "records": self.records}
        try:
            md = report(data)
        except Exception as exc:  # noqa: BLE001 - the figures are in results.json; never lose the run to the table
            import traceback

            md = (f"# GPU suite results\n\nThe table could not be written ({type(exc).__name__}: {exc}); see "
                  f"results.json.\n")
            self.log_file.write(traceback.format_exc())
        for name, text in (("results.json", json.dumps(data, indent=1, default=str) + "\n"), ("results.md", md)):
            tmp = self.out / (name + ".tmp")
            tmp.write_text(text)
            os.replace(tmp, self.out / name)


def last_error(tail: str) -> str:
    lines = [ln.strip() for ln in tail.strip().splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "Error" in ln or "error" in ln or "Exception" in ln:
            return ln[:300]
    return lines[-1][:300] if lines else ""


def summary(rec: dict[str, Any]) -> str:
    k = rec.get("kind")
    if k in ("e2e", "interactive"):
        s = rec.get("seconds", rec.get("first_s"))
        extra = ""
        if rec.get("further_s"):
            extra = f", further median {statistics.median(rec['further_s']):.3f} s"
        if rec.get("dice_vs_fp32"):
            extra += f", Dice vs fp32 min {min(rec['dice_vs_fp32']):.4f}"
        return (f"{rec.get('model')} {rec.get('impl')} "
                f"{rec.get('precision')}{' ' + rec['variant'] if rec.get('variant') else ''} "
                f"{k} {rec.get('prompts')} prompt(s): {s:.2f} s, peak {rec.get('peak_mib', 0) / 1024:.2f} GiB{extra}")
    return json.dumps({key: v for key, v in rec.items() if key not in ("part",)}, default=str)[:300]


# ---- the report -----------------------------------------------------------------------------------------
MODEL_ORDER = ["biomedparse-v1", "biomedparse-v2", "segvol", "sat-nano", "sat-pro", "deepbet"]
PREC_LABEL = {"fp32": "fp32", "bf16": "bf16 autocast", "fp16-engine": "fp16 (engine's SAT default)",
              "fp16-upstream": "fp16 autocast (upstream's default)"}


def _gib(mib: Optional[float]) -> str:
    return "-" if mib is None else f"{mib / 1024:.2f}"


def _s(x: Optional[float]) -> str:
    if x is None:
        return "-"
    return f"{x:.3f}" if x < 1 else f"{x:.2f}" if x < 100 else f"{x:.0f}"


def _scale(rec: dict[str, Any]) -> float:
    """Factor to the whole image for a slice-range measurement (2D models are linear in slices)."""
    sl, total = rec.get("slices"), rec.get("total_slices")
    if not sl or not total or sl[1] - sl[0] >= total:
        return 1.0
    return total / (sl[1] - sl[0])


def _with_extrapolation(x: Optional[float], f: float) -> str:
    if x is None:
        return "-"
    return _s(x) if f == 1.0 else f"{_s(x)} (≈{_s(x * f)} all slices)"


def rows_of(records: list[dict[str, Any]]) -> dict[tuple[str, str, str, str], dict[str, Any]]:
    rows: dict[tuple[str, str, str, str], dict[str, Any]] = {}
    for r in records:
        if r.get("kind") not in ("e2e", "interactive", "agreement"):
            continue
        key = (r.get("model", ""), r.get("impl", ""), r.get("precision", ""), r.get("variant", ""))
        row = rows.setdefault(key, {"scale": _scale(r)})
        if r["kind"] == "agreement":
            row.update(dice=r.get("dice_vs_fp32"))
        elif r["kind"] == "interactive":
            row.update(first=r["first_s"], further=r.get("further_s") or [], peak1=r.get("peak_mib"),
                       set_image=r.get("set_image_s"),
                       voxels1=r.get("voxels"))
            if r.get("dice_vs_fp32"):  # one-prompt models compare their first prompt's masks
                row["dice"] = r["dice_vs_fp32"]
        elif r.get("prompts") == 1:
            row.update(first=r["seconds"], peak1=r.get("peak_mib"), voxels1=r.get("voxels"))
        else:
            row.update(e2e=r["seconds"], n=r.get("prompts"), peakn=r.get("peak_mib"), dice=r.get("dice_vs_fp32"),
                       voxels=r.get("voxels"))
    for key, row in rows.items():
        if key[1] == "upstream" and "first" in row and not row.get("further"):
            row["further_note"] = "= 1 prompt (no image cache)"
    return rows


def report(data: dict[str, Any]) -> str:
    meta, parts, records = data["meta"], data["parts"], data["records"]
    env = next((r for r in records if r.get("kind") == "env"), {})
    out = [f"# GPU suite results{' (CPU DRY RUN, tiny sizes: not figures)' if meta.get('dry_run') else ''}", ""]
    dev = env.get("device", meta.get("device"))
    out.append(f"Device: **{dev}**" + (f", {env.get('memory_gib')} GiB, CUDA {env.get('cuda')}, driver/clocks: "
                                        f"{env.get('nvidia_smi')}" if env.get("memory_gib") else "")
               + f"; torch {env.get('torch')}, Python {env.get('python')}; started {meta.get('started')}, "
               f"{meta.get('elapsed_s')} s so far.")
    if env.get("tf32_cudnn") is not None:
        out.append(f"fp32 = PyTorch defaults (TF32 convolutions: {env.get('tf32_cudnn')}, TF32 matmuls: "
                   f"{env.get('tf32_matmul')}).")
    inp = next((r for r in records if r.get("part") == "input" and r.get("kind") == "info"), None)
    if inp:
        out.append(f"Input: CT {'x'.join(map(str, inp['ct_shape']))} at {'x'.join(map(str, inp['ct_spacing']))} mm "
                   f"(real CT resampled), T1 {'x'.join(map(str, inp['t1_shape']))} (MNI152).")
    up = (meta.get("prepared") or {}).get("upstream") or {}
    if up:
        out.append("Upstream: " + ", ".join(f"{k} {v.get('repo')}@{str(v.get('commit'))[:7]}"
                                            for k, v in up.items()) + ".")
    used = {r["part"]: r["packages"] for r in records if r.get("kind") == "info" and r.get("packages")}
    if used:
        out.append("timm/torchvision for upstream: " + "; ".join(
            f"{p}: " + ", ".join(f"{k} {v}" for k, v in pk.items()) for p, pk in used.items()) + ".")
    out.append("")
    rows = rows_of(records)
    out += ["## Targets", "",
            "Ours vs upstream in fp32 (SAT also both sides' float16 defaults); ✓/✗: the issue's targets. "
            "Peak memory includes each side's weights.", "",
            "| model | further prompt / first (ours; target < 10 %) | 1 prompt s: upstream / ours "
            "| 10 prompts s: upstream / ours | peak GiB, 10 prompts: upstream / ours | ours bf16 (fp16 line: fp16) "
            "masks vs fp32: min Dice |",
            "| --- | --- | --- | --- | --- | --- |"]

    def ratio(r):
        if not r or not r.get("further") or not r.get("first"):
            return "-"
        v = statistics.median(r["further"]) / r["first"]
        return f"{100 * v:.1f} % {'✓' if v < 0.10 else '✗'}"

    def vs(u, o, key):
        u, o = (u or {}).get(key), (o or {}).get(key)
        if u is None or o is None:
            return f"{_s(u)} / {_s(o)}"
        return f"{_s(u)} / {_s(o)} ({u / o:.2f}x {'✓' if o < u else '✗'})"

    def mem(u, o):
        u, o = (u or {}).get("peakn", (u or {}).get("peak1")), (o or {}).get("peakn", (o or {}).get("peak1"))
        if u is None or o is None:
            return f"{_gib(u)} / {_gib(o)}"
        return f"{_gib(u)} / {_gib(o)} {'✓' if o <= u else '✗'}"

    for m in MODEL_ORDER:
        lines = [("fp32", "fp32", "fp32")]
        if m.startswith("sat"):
            lines.append(("fp16 defaults", "fp16-engine", "fp16-upstream"))
        for label, op, upp in lines:
            o, u = rows.get((m, "ours", op, "")), rows.get((m, "upstream", upp, ""))
            if not (o or u):
                continue
            o16 = rows.get((m, "ours", "bf16", ""))
            if m == "deepbet":
                further = "n/a (one prompt)"
            elif label == "fp32":
                further = f"fp32 {ratio(o)}" + (f", bf16 {ratio(o16)}" if o16 and o16.get("further") else "")
                cached = [r for k, r in rows.items() if k[0] == m and k[1] == "ours" and k[3]]
                if cached:
                    further += f"; fp32, whole range in the slice cache: {ratio(cached[0])}"
            else:
                further = ratio(o)
            d = ((o16 if label == "fp32" else o) or {}).get("dice")
            note = " (slice range: see below)" if (o or u or {}).get("scale", 1.0) != 1.0 else ""
            name = m + (f", {label}" if label != "fp32" else "") + note
            out.append(f"| {name} | {further} | {vs(u, o, 'first')} | {vs(u, o, 'e2e')} | {mem(u, o)} | "
                       f"{'-' if not d else f'{min(d):.4f}'} |")
    out += ["", "## All measurements", "",
            "| model | side | precision | 1 prompt: s | 10 prompts: s | set_image s | further prompt s: median (max) | "
            "further / first | peak GiB: 1 / 10 prompts | masks vs fp32: Dice min / mean | mask voxels (first 3) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for key in sorted(rows, key=lambda k: (MODEL_ORDER.index(k[0]) if k[0] in MODEL_ORDER else 99, k[1] != "ours", k[3],
                                           k[2])):
        m, impl, prec, variant = key
        r = rows[key]
        f = r["scale"]
        fur = r.get("further") or []
        fur_s = r.get("further_note", "-") if not fur else f"{_s(statistics.median(fur))} ({_s(max(fur))})"
        rat = "-" if not fur or not r.get("first") else f"{100 * statistics.median(fur) / r['first']:.1f} %"
        d = r.get("dice")
        vox = r.get("voxels") or r.get("voxels1") or []
        out.append(f"| {m} | {impl}{' (' + variant + ')' if variant else ''} | {PREC_LABEL.get(prec, prec)} | "
                   f"{_with_extrapolation(r.get('first'), f)} | {_with_extrapolation(r.get('e2e'), f)} | "
                   f"{_s(r.get('set_image'))} | "
                   f"{fur_s} | {rat} | {_gib(r.get('peak1'))} / {_gib(r.get('peakn'))} | "
                   f"{'-' if not d else f'{min(d):.4f} / {sum(d) / len(d):.4f}'} | {vox[:3]} |")
    srv = [r for r in records if r.get("kind") == "server"]
    if srv:
        out += ["", "## Server overhead on loopback (SegVol on the CT, a new image each round; median of 2 rounds "
                "after a warm-up; remote prompts return masks and uint8 probabilities)", "",
                "| step | local s | remote s | overhead s | overhead |", "| --- | --- | --- | --- | --- |"]
        for r in srv:
            pct = "-" if r.get("overhead_pct") is None else f"{r['overhead_pct']:.0f} %"
            out.append(f"| {r['step']} | {_s(r['local_s'])} | {_s(r['remote_s'])} | {_s(r['overhead_s'])} | {pct} |")
        first = [r for r in srv if r["step"] in ("set_image", "first prompt")]
        if len(first) == 2:
            lo, re = sum(r["local_s"] for r in first), sum(r["remote_s"] for r in first)
            out.append(f"| set_image + first prompt | {_s(lo)} | {_s(re)} | {_s(re - lo)} | {100 * (re - lo) / lo:.0f} "
                       f"% |")
    errors = [r for r in records if r.get("kind") == "error"]
    if errors:
        out += ["", "## Measurements that failed (the part went on)", "", "| part | what | error |",
                "| --- | --- | --- |"]
        for r in errors:
            out.append(f"| {r.get('part')} | {r.get('what')} | {str(r.get('error')).replace('|', '/')[:300]} |")
    loads = [r for r in records if r.get("kind") in ("load", "weights")]
    if loads:
        out += ["", "## Loading (not in the timings above)", "", "| part | what | s | GiB |",
                "| --- | --- | --- | --- |"]
        for r in loads:
            size = r.get("weights_mib")
            size = _gib(size) + " on the GPU" if size is not None else (f"{r['bytes'] / 2**30:.2f} on disk"
                                                                        if r.get("bytes") else "-")
            out.append(f"| {r.get('part')} | {'weights written' if r['kind'] == 'weights' else 'model loaded'} | "
                       f"{_s(r.get('seconds'))} | {size} |")
    out += ["", "## Parts", "", "| part | status | s | budget s | results | note |",
            "| --- | --- | --- | --- | --- | --- |"]
    for name, p in parts.items():
        out.append(f"| {name} | {p.get('status', 'running')} | {p.get('seconds', '-')} | {p.get('budget_s', '-')} | "
                   f"{p.get('results', '-')} | {str(p.get('error') or p.get('note') or '').replace('|', '/')[:200]} |")
    return "\n".join(out) + "\n"


# ---- main ------------------------------------------------------------------------------------------------
def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prepared", default=str(ROOT / ".gpu"), help="the folder gpu_prepare.py filled")
    ap.add_argument("--out", help="results folder (on the device: $OUT)")
    ap.add_argument("--work", default="/tmp/textseg-gpu-work", help="scratch: installed wheels, inputs, weights")
    ap.add_argument("--device", default=None, help="default: cuda (cpu with --dry-run)")
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU: tests the suite, gives no figures")
    ap.add_argument("--deadline", type=float, default=None,
                    help="seconds for the whole suite (default 450; dry run 1800)")
    ap.add_argument("--budget-scale", type=float, default=None,
                    help="multiply every part's budget (default 1; dry run 8)")
    ap.add_argument("--only", help="comma-separated parts or models to run (env and input always run)")
    ap.add_argument("--skip", help="comma-separated parts or models to leave out")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        import gpu_models

        gpu_models.main(a.worker, a.device, a.tiny, Path(a.work), Path(a.prepared))
        return 0
    if not a.out:
        ap.error("--out is required")
    a.device = a.device or ("cpu" if a.dry_run else "cuda")
    a.deadline = a.deadline or (1800.0 if a.dry_run else 450.0)
    scale = a.budget_scale or (DRY_SCALE if a.dry_run else 1.0)
    if a.device.startswith("cuda") and not a.dry_run:
        try:
            import torch

            if not torch.cuda.is_available():
                sys.exit("gpu_suite: no CUDA GPU here. On a CPU run the tiny dry run: add --dry-run.")
        except ImportError:
            sys.exit("gpu_suite: torch is not installed in this Python.")
    Path(a.out).mkdir(parents=True, exist_ok=True)
    Path(a.work).mkdir(parents=True, exist_ok=True)
    r = Runner(a)

    def stop(signum, frame):  # the device tool's limit or Ctrl-C: stop the running part, keep the results
        if r.active is not None:
            r.kill(r.active)
        r.say(f"stopped by signal {signum}")
        r.save()
        sys.exit(1)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    r.say(f"gpu_suite: device {a.device}, deadline {a.deadline:.0f} s, budgets x{scale:g}, prepared {r.prepared}, work "
          f"{a.work}")
    r.install()
    r.save()
    wanted = set((a.only or "").split(",")) - {""}
    skipped = set((a.skip or "").split(",")) - {""}
    for part, budget in PARTS:
        model = part.split("/")[0]
        if part not in ("env", "input") and ((wanted and part not in wanted and model not in wanted)
                                             or part in skipped or model in skipped):
            continue
        if r.parts.get("install", {}).get("status") != "ok" and part != "env":
            r.parts[part] = {"status": "not started", "note": "wheels not installed"}
            continue
        if part != "input" and r.parts.get("input", {}).get("status") not in (None, "ok") and part not in ("env",):
            r.parts[part] = {"status": "not started", "note": "no input images"}
            continue
        r.run_part(part, budget * scale)
        r.save()
    r.save()
    r.say(f"done in {time.monotonic() - r.t_start:.0f} s; results in {a.out}/results.md and results.json")
    again = [p for p, e in r.parts.items() if p not in ("install", "env", "input") and e.get("status") != "ok"]
    if again:
        r.say("not complete: " + ", ".join(f"{p} ({r.parts[p].get('status')})" for p in again) + ". Second call: "
              f"PYTHONUNBUFFERED=1 python3 benchmarks/gpu_suite.py --prepared .gpu --out \"$OUT\" --only "
              f"{','.join(again)}")
    print("\n" + (Path(a.out) / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
