"""Rewrite the file lists in BiomedParseSlicer/CMakeLists.txt from the source tree.

Every .py under BiomedParseSlicer/ (module, helpers and the whole textseg engine) is shipped, and
every other file of the module (UI, icons, engine data). Testing/slicer/test_slicer_packaging.py fails
when the lists are stale; run `python Utilities/update_cmake_scripts.py` to fix them.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULE = ROOT / "BiomedParseSlicer"
CMAKE = MODULE / "CMakeLists.txt"
SKIP_PARTS = {"__pycache__", ".pytest_cache"}
SKIP_SUFFIXES = {".pyc", ".pyo"}


def module_files() -> list[str]:
    """Files of the module folder, relative to it: git's view (tracked + new, not ignored) or a walk."""
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "."], cwd=MODULE,
                             capture_output=True, text=True, check=True).stdout.split("\n")
        files = [f for f in out if f and (MODULE / f).is_file()]
    except (OSError, subprocess.CalledProcessError):
        files = [str(p.relative_to(MODULE)) for p in MODULE.rglob("*") if p.is_file()]
    files = {f.replace("\\", "/") for f in files}  # a set: git lists a file under conflict once per stage
    return sorted(f for f in files if not (set(f.split("/")) & SKIP_PARTS) and Path(f).suffix not in SKIP_SUFFIXES
                  and f != "CMakeLists.txt" and not f.endswith(".egg-info") and ".egg-info/" not in f)


def expected_lists() -> tuple[list[str], list[str]]:
    files = module_files()
    return [f for f in files if f.endswith(".py")], [f for f in files if not f.endswith(".py")]


def cmake_list(name: str, text: str) -> list[str]:
    m = re.search(rf"set\({name}\n(.*?)\n  \)", text, re.S)
    if not m:
        raise ValueError(f"{CMAKE}: no set({name} ...) block")
    return [line.strip() for line in m.group(1).splitlines() if line.strip()]


def rewrite(text: str) -> str:
    scripts, resources = expected_lists()
    for name, items in (("MODULE_PYTHON_SCRIPTS", scripts), ("MODULE_PYTHON_RESOURCES", resources)):
        body = "\n".join(f"  {f}" for f in items)
        text = re.sub(rf"set\({name}\n.*?\n  \)", lambda m: f"set({name}\n{body}\n  )", text, flags=re.S)  # noqa: B023 - runs in this iteration
    return text


if __name__ == "__main__":
    old = CMAKE.read_text()
    new = rewrite(old)
    if new != old:
        CMAKE.write_text(new)
        print(f"updated {CMAKE}")
    else:
        print(f"{CMAKE} is up to date")
    sys.exit(0)
