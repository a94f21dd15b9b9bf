"""Collect what the GPU suite (benchmarks/gpu_suite.py) needs on the lent GPU machine into one ignored folder.

Run HERE, in the repository root, before asking the device tool for a run (docs/benchmarks.md):

    python benchmarks/gpu_prepare.py --biomedparse-v1 /work/.mirror/microsoft+BiomedParse/repo \\
        --biomedparse-v2 /work/.mirror/Lsyyh+BiomedParse_v2/repo --segvol /work/.mirror/BAAI-DCAI+SegVol/repo \\
        --sat /work/.mirror/zhaoziheng+SAT/repo

It writes ``.gpu/`` (added to .git/info/exclude; ``/.gpu/`` is also in .gitignore) with:

* ``whl/``: the wheels the GPU machine lacks (KINDS.md lists what it has), pinned, for Python 3.12 on
  manylinux x86-64 (pure Python where the package has such a wheel); ``whl-upstream/``: MONAI 1.3.2 for
  the upstream SegVol code (MONAI 1.4 removed ``ViT(pos_embed=...)``; upstream SAT runs on the current MONAI,
  whose preprocessing equals MONAI 1.1's on the SAT fixture, and MONAI 1.1/1.3's ``Spacingd`` needs numpy < 2,
  which the machine does not have); every carried wheel's
  requirements are checked against the carried set plus the machine's own packages.
* ``upstream/<model>/``: only the files the suite imports, read from a checkout at the pinned commit
  (a bare mirror, a work tree whose HEAD is the pin and whose files are unmodified, or with
  ``--unverified`` any folder); ``standins/``: the import stand-ins (benchmarks/gpu_standins.py).
* ``data/``: the input images, compact: the real CT ``example_ct.nii.gz`` (122x101x112, 3 mm) and the MNI152
  T1 at 2 mm, as int16 arrays with their geometry; the suite resamples them on the machine (CT onto a
  512x512x200 grid of 0.8x0.8x1.5 mm, T1 onto 1 mm) - the same numbers every run, nothing random.
* ``home/tokenizers/clip/``: the CLIP vocabulary our engine builds from open_clip (TEXTSEG_HOME there).
* ``manifest.json``: commits, wheels (size, sha256), files, sizes; the size of what travels is checked against
  the device tool's 64 MiB (working tree + this folder). Finally it prints the device tool call.

``--this-machine`` prepares the same folder for this machine's Python (the CPU dry run, docs/benchmarks.md).
Nothing of upstream is committed: the folder is ignored, and is rebuilt from the checkouts each time.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_standins  # noqa: E402  (benchmarks/gpu_standins.py)

LIMIT = 64 << 20  # the device tool's limit on what travels: working tree + carried paths
DEVICE_PYTHON = "3.12"
DEVICE_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
                    "manylinux2014_x86_64", "manylinux1_x86_64")


@dataclass(frozen=True)
class Pin:
    key: str  # option name and folder under upstream/
    repo: str  # owner/name on GitHub
    commit: str
    include: tuple[str, ...]  # fnmatch patterns (paths inside the repository)
    exclude: tuple[str, ...] = ("*/__pycache__/*", "*.ipynb_checkpoints*")


PINS = (
    Pin("biomedparse-v1", "microsoft/BiomedParse", "750eb40d4624398561fe586418101f48ae9b0f1d",
        ("modeling/*.py", "utilities/*.py", "inference_utils/*.py", "configs/*.yaml"),
        ("*/__pycache__/*", "*.ipynb_checkpoints*", "modeling/vision/encoder/ops/*")),
    # The runnable fork of microsoft/BiomedParse branch v2 (f571d5c): its src/model is the same code; see
    # Testing/fixtures/README.md. Its pixel_decoder/ops (a CUDA extension's build script) is left out.
    Pin("biomedparse-v2", "Lsyyh/BiomedParse_v2", "61681551e9c95a33bd1a3fb06ca0d52efba8538f",
        ("src/*.py", "utils.py", "inference.py"),
        ("*/__pycache__/*", "src/model/pixel_decoder/ops/*", "src/CVPR25_text_eval.py", "src/SurfaceDice.py")),
    Pin("segvol", "BAAI-DCAI/SegVol", "5768c9795794a327a2629ce7f137ab03d5ea8378",
        ("network/*.py", "segment_anything_volumetric/*.py", "data_process/*.py", "utils/*.py", "inference_demo.py",
         "config/clip/*"),
        ("*/__pycache__/*", "*.ipynb_checkpoints*")),
    Pin("sat", "zhaoziheng/SAT", "5676be5a62f5cd517264b948c6198e38ddfeb0e2",
        ("model/*.py", "data/*.py", "evaluate/*.py", "train/*.py"),
        ("*/__pycache__/*", "*.ipynb_checkpoints*")),
)

# Wheels the GPU machine lacks (KINDS.md, 'Python packages already there', read 2026-11-17), pinned to the
# versions this project's own set-up installs today. (name, version, where): where "whl" = the engine and
# our side, "whl-upstream" = only on the upstream parts' path (ahead of "whl"); "whl<3.12": "whl", only for a
# Python older than 3.12.
WHEELS: tuple[tuple[str, str, str], ...] = (
    ("fastapi", "0.165.0", "whl"), ("starlette", "1.10.0", "whl"), ("uvicorn", "0.55.0", "whl"),
    ("pydantic", "2.14.4", "whl"), ("pydantic-core", "2.50.5", "whl"), ("annotated-types", "0.8.0", "whl"),
    ("typing-inspection", "0.4.5", "whl"), ("typing-extensions", "4.16.0", "whl"),
    ("opentelemetry-api", "1.45.2", "whl"), ("python-multipart", "0.0.34", "whl"),
    ("pynrrd", "1.1.3", "whl"), ("nibabel", "5.4.2", "whl"), ("ftfy", "6.3.1", "whl"), ("wcwidth", "0.9.4", "whl"),
    ("monai", "1.6.1", "whl"),
    ("deepbet", "1.0.2", "whl"), ("connected-components-3d", "4.1.1", "whl"), ("fill-voids", "2.1.2", "whl"),
    ("fastremap", "1.21.0", "whl"),
    ("positional-encodings", "6.0.1", "whl"),  # SAT's upstream pin (its PositionalEncoding3D)
    ("monai", "1.3.2", "whl-upstream"),  # upstream SegVol only
    ("importlib-resources", "7.1.0", "whl<3.12"),  # nibabel's need on Python < 3.12 (a CPU dry run here)
)

# What the GPU machine has (KINDS.md's package list, names normalised); a carried wheel's requirement must be
# one of these or another carried wheel.
DEVICE_HAS = set("""
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio interface-meta iniconfig jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft
pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers
statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm
tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope
triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
""".split())
# Requirements left out on purpose: deepbet's GUI (customtkinter) is never imported by its inference code.
NOT_NEEDED = {"customtkinter"}


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def die(msg: str) -> None:
    sys.exit(f"gpu_prepare: {msg}")


def git(*args: str, cwd: Optional[Path] = None, binary: bool = False):
    p = subprocess.run(["git", *args], cwd=cwd, capture_output=True)
    if p.returncode:
        raise RuntimeError(p.stderr.decode(errors="replace").strip() or f"git {' '.join(args)} failed")
    return p.stdout if binary else p.stdout.decode()


# ---- upstream code --------------------------------------------------------------------------------
def selected(path: str, pin: Pin) -> bool:
    """fnmatch patterns: '*' also matches '/', so 'model/*.py' is every .py file below model/."""
    return any(fnmatch.fnmatch(path, p) for p in pin.include) and not any(fnmatch.fnmatch(path, p) for p in pin.exclude)


def copy_upstream(pin: Pin, source: Path, dest: Path, unverified: bool) -> dict[str, object]:
    """Copy the pin's files from ``source`` into ``dest``; returns the manifest entry (how it was verified)."""
    if not source.exists():
        die(f"--{pin.key}: {source} does not exist. Give a checkout (or bare mirror) of github.com/{pin.repo}.")
    files: list[tuple[str, bytes]] = []
    try:
        bare = git("rev-parse", "--is-bare-repository", cwd=source).strip() == "true"
        top = None if bare else Path(git("rev-parse", "--show-toplevel", cwd=source).strip())
    except RuntimeError:
        bare, top = False, None
    if bare or top is not None:
        where = ["--git-dir", str(source)] if bare else ["-C", str(top)]
        try:
            commit = git(*where, "rev-parse", "--verify", pin.commit + "^{commit}").strip()
        except RuntimeError:
            die(f"--{pin.key}: {source} does not hold commit {pin.commit[:12]} of github.com/{pin.repo}: fetch it "
                "(git fetch) or give another checkout.")
        if not bare:
            head = git(*where, "rev-parse", "HEAD").strip()
            if head != commit:
                die(f"--{pin.key}: {top} is at {head[:12]}, not at the pinned {pin.commit[:12]}: "
                    f"git -C {top} checkout {pin.commit[:12]} (or give a bare mirror).")
        listing = git(*where, "ls-tree", "-r", "-z", commit).split("\0")
        paths = [(line.split("\t", 1)[1], line.split()[2]) for line in listing if line and line.split()[1] == "blob"]
        for path, blob in paths:
            if selected(path, pin):
                data = git(*where, "cat-file", "blob", blob, binary=True)
                if not bare:  # the work tree's file must be the committed one
                    on_disk = (top / path).read_bytes() if (top / path).is_file() else None
                    if on_disk != data:
                        die(f"--{pin.key}: {top / path} differs from commit {pin.commit[:12]}: "
                            "restore it (git checkout -- .) or give a bare mirror.")
                files.append((path, data))
        how = f"git {'mirror' if bare else 'work tree'} at {commit}"
    else:
        if not unverified:
            die(f"--{pin.key}: {source} is not a git checkout, so its commit cannot be verified. Give a git checkout "
                f"or bare mirror of github.com/{pin.repo} at {pin.commit[:12]}, or add --unverified.")
        for p in sorted(source.rglob("*")):
            rel = p.relative_to(source).as_posix()
            if p.is_file() and selected(rel, pin):
                files.append((rel, p.read_bytes()))
        how = "UNVERIFIED folder (--unverified): commit not checked"
    if not files:
        die(f"--{pin.key}: no files of {pin.include} found in {source}.")
    for rel, data in files:
        out = dest / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(data)
    return {"repo": pin.repo, "commit": pin.commit, "source": str(source), "verified": how, "files": len(files),
            "bytes": sum(len(d) for _, d in files)}


# ---- wheels ---------------------------------------------------------------------------------------
def download_wheels(dest: Path, python: str, platforms: Sequence[str],
                    cache: Optional[Path]) -> list[dict[str, object]]:
    out = []
    for name, version, where in wheels_for(python):
        folder = dest / where
        folder.mkdir(parents=True, exist_ok=True)
        got = find_wheel(cache, name, version) if cache else None
        if got is None:
            tmp = dest / ".download"
            shutil.rmtree(tmp, ignore_errors=True)
            cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                   "--python-version",
                   python, "--implementation", "cp", "-d", str(tmp), f"{name}=={version}"]
            for plat in platforms:
                cmd += ["--platform", plat]
            p = subprocess.run(cmd, capture_output=True, text=True)
            found = sorted(tmp.glob("*.whl")) if tmp.is_dir() else []
            if p.returncode or len(found) != 1:
                die(f"pip could not download {name}=={version} for Python {python} ({', '.join(platforms[:2])}...):\n"
                    + "\n".join(line for line in p.stderr.splitlines() if "WARNING: Location" not in line)[-1500:])
            got = found[0]
            if cache:
                cache.mkdir(parents=True, exist_ok=True)
                shutil.copy2(got, cache / got.name)
        shutil.copy2(got, folder / got.name)
        shutil.rmtree(dest / ".download", ignore_errors=True)
        data = (folder / got.name).read_bytes()
        out.append({"name": name, "version": version, "folder": where, "file": got.name, "bytes": len(data),
                    "sha256": hashlib.sha256(data).hexdigest(), "pure": got.name.endswith("-none-any.whl")})
    return out


def wheels_for(python: str) -> list[tuple[str, str, str]]:
    old = tuple(map(int, python.split("."))) < (3, 12)
    return [(n, v, w.split("<")[0]) for n, v, w in WHEELS if "<" not in w or old]


def find_wheel(cache: Path, name: str, version: str) -> Optional[Path]:
    stem = norm(name).replace("-", "_")
    for p in sorted(cache.glob("*.whl")) if cache.is_dir() else []:
        parts = p.name.split("-")
        if norm(parts[0]).replace("-", "_") == stem and parts[1] == version:
            return p
    return None


def check_requirements(dest: Path, python: str) -> list[str]:
    """Every Requires-Dist (no extras, markers for the target Python) of a carried wheel must be carried or there."""
    import zipfile

    carried = {norm(n) for n, _, _ in wheels_for(python)}
    problems = []
    for whl in sorted(dest.glob("whl*/*.whl")):
        with zipfile.ZipFile(whl) as z:
            meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
            lines = z.read(meta).decode("utf-8", "replace").splitlines()
        for line in lines:
            if not line.startswith("Requires-Dist:"):
                continue
            req = line.split(":", 1)[1].strip()
            spec, _, marker = req.partition(";")
            if "extra" in marker or not marker_holds(marker, python):
                continue
            name = norm(re.split(r"[\s<>=!~\[(]", spec.strip(), maxsplit=1)[0])
            if name not in carried and name not in DEVICE_HAS and name not in NOT_NEEDED:
                problems.append(f"{whl.name} needs {spec.strip()}, which is neither carried nor on the GPU machine")
    return problems


def marker_holds(marker: str, python: str) -> bool:
    m = re.search(r"python_version\s*([<>=!]=?)\s*['\"]([\d.]+)['\"]", marker)
    if not m:
        return True
    have, want = tuple(map(int, python.split("."))), tuple(map(int, m.group(2).split(".")))
    return {"<": have < want, "<=": have <= want, ">": have > want, ">=": have >= want, "==": have == want,
            "!=": have != want}[m.group(1)]


# ---- data -----------------------------------------------------------------------------------------
def write_data(dest: Path, shared: Path) -> dict[str, object]:
    """The real CT and the MNI152 T1 (2 mm) as int16 arrays + geometry (RAS affine, as stored in the NIfTI)."""
    import nibabel as nib
    import numpy as np

    dest.mkdir(parents=True, exist_ok=True)
    out = {}
    ct_path = shared / "totalsegmentator-examples" / "example_ct.nii.gz"
    t1_path = shared / "mni152" / "MNI152_T1.nii.gz"
    for path in (ct_path, t1_path):
        if not path.is_file():
            die(f"{path} is missing: give --shared (the shared data folder) or set TEXTSEG_SHARED_DATA.")
    ct = nib.load(str(ct_path))
    arr = np.asarray(ct.dataobj)
    np.savez_compressed(dest / "ct.npz", array=arr.astype(np.int16), affine=ct.affine.astype(np.float64),
                        source=np.array("TotalSegmentator tests/reference_files/example_ct.nii.gz (../shared/data)"))
    t1 = nib.load(str(t1_path))
    a = np.asarray(t1.dataobj)[::2, ::2, ::2].astype(np.int16)
    aff = t1.affine.astype(np.float64).copy()
    aff[:3, :3] *= 2.0
    np.savez_compressed(dest / "t1.npz", array=a, affine=aff,
                        source=np.array("MNI152_T1.nii.gz (../shared/data/mni152), every 2nd voxel: 2 mm"))
    for name in ("ct.npz", "t1.npz"):
        out[name] = (dest / name).stat().st_size
    return out


# ---- sizes and the launcher ----------------------------------------------------------------------
def tree_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def travelling_bytes(repo: Path, prepared: Path) -> tuple[int, int]:
    """(working tree that travels: tracked + untracked-not-ignored files, the prepared folder)."""
    listing = git("ls-files", "-z", "--cached", "--others", "--exclude-standard", cwd=repo).split("\0")
    tree = sum((repo / p).stat().st_size for p in listing if p and (repo / p).is_file())
    shared = repo / "shared"
    if shared.is_dir():
        tree += tree_bytes(shared)
    return tree, tree_bytes(prepared)


def ignore(repo: Path, rel: str) -> None:
    exclude = Path(git("rev-parse", "--git-path", "info/exclude", cwd=repo).strip())
    if not exclude.is_absolute():
        exclude = repo / exclude
    exclude.parent.mkdir(parents=True, exist_ok=True)
    lines = exclude.read_text().splitlines() if exclude.is_file() else []
    if f"/{rel}/" not in lines:
        with exclude.open("a") as f:
            f.write(f"/{rel}/\n")


def launcher(rel: str) -> str:
    return f'PYTHONUNBUFFERED=1 python3 benchmarks/gpu_suite.py --prepared {rel} --out "$OUT"'


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for pin in PINS:
        ap.add_argument(f"--{pin.key}", type=Path, required=True, metavar="CHECKOUT",
                        help=f"checkout or bare mirror of github.com/{pin.repo} holding {pin.commit[:12]}")
    ap.add_argument("--out", type=Path, default=ROOT / ".gpu",
                    help="the folder to fill (default: .gpu in the repository root)")
    ap.add_argument("--shared", type=Path,
                    default=Path(os.environ.get("TEXTSEG_SHARED_DATA", ROOT.parent / "shared" / "data")),
                    help="the shared data folder (default: $TEXTSEG_SHARED_DATA or ../shared/data)")
    ap.add_argument("--this-machine", action="store_true",
                    help="wheels for this machine's Python and platform (the CPU dry run), not the GPU machine's")
    ap.add_argument("--wheel-cache", type=Path, help="reuse wheels found here (and keep downloads here)")
    ap.add_argument("--unverified", action="store_true", help="accept upstream folders that are not git checkouts")
    a = ap.parse_args(argv)
    out = a.out.resolve()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    in_repo = out.is_relative_to(ROOT)
    if in_repo:
        ignore(ROOT, out.relative_to(ROOT).as_posix())
    t0 = time.time()
    if a.this_machine:
        import sysconfig

        python = f"{sys.version_info.major}.{sys.version_info.minor}"
        plat = sysconfig.get_platform().replace("linux-", "").replace("-", "_").replace(".", "_")
        platforms: Sequence[str] = [f"manylinux_2_{n}_{plat}" for n in (28, 27, 24, 17)] + [f"manylinux2014_{plat}"]
    else:
        python, platforms = DEVICE_PYTHON, DEVICE_PLATFORMS
    manifest: dict[str, object] = {"created": time.strftime("%Y-%m-%d %H:%M:%S"), "python": python,
                                   "platforms": list(platforms), "upstream": {}}
    for pin in PINS:
        print(f"upstream {pin.key}: github.com/{pin.repo}@{pin.commit[:12]} ...", flush=True)
        manifest["upstream"][pin.key] = copy_upstream(pin, getattr(a, pin.key.replace("-", "_")).resolve(),  # type: ignore[index]
                                                      out / "upstream" / pin.key, a.unverified)
    gpu_standins.write(out / "standins")
    print(f"wheels for Python {python} ...", flush=True)
    manifest["wheels"] = download_wheels(out, python, platforms, a.wheel_cache)
    problems = check_requirements(out, python)
    if problems:
        die("carried wheels miss requirements:\n  " + "\n  ".join(problems))
    manifest["data"] = write_data(out / "data", a.shared.resolve())
    sys.path.insert(0, str(ROOT / "BiomedParseSlicer"))
    from textseg.models.clip_tokenizer import build_vocab_files

    build_vocab_files(out / "home" / "tokenizers" / "clip")
    sizes = {p.name: tree_bytes(p) for p in sorted(out.iterdir()) if p.is_dir()}
    manifest["folder_bytes"] = sizes
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    rel = out.relative_to(ROOT).as_posix() if in_repo else str(out)
    folder = tree_bytes(out)
    print("\n| part | MiB |\n| --- | ---: |")
    for k, v in sizes.items():
        print(f"| {k} | {v / 2**20:.1f} |")
    print(f"| total ({rel}) | {folder / 2**20:.1f} |")
    if in_repo:
        tree, _ = travelling_bytes(ROOT, out)
        total = tree + folder
        print(f"\nworking tree that travels: {tree / 2**20:.1f} MiB; with {rel}: {total / 2**20:.1f} MiB of the "
              f"device tool's {LIMIT >> 20} MiB", flush=True)
        if total > LIMIT:
            die(f"{total / 2**20:.1f} MiB would travel: over the device tool's {LIMIT >> 20} MiB. Leave something out.")
    print(f"prepared in {time.time() - t0:.0f} s")
    if a.this_machine:
        print(f"\nCPU dry run (docs/benchmarks.md):\n  python benchmarks/gpu_suite.py --prepared {rel} --out "
              f"/tmp/gpu-dry-out --dry-run")
    else:
        cmd = launcher(rel)
        assert len(cmd) < 2000
        print("\nDevice tool call (one run, about 8 minutes; docs/benchmarks.md):")
        print(f"  run(command='{cmd}', carry=['{rel}'], timeout_s=600)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
