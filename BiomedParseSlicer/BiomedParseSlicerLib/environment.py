"""What the engine needs, what is installed, and installing it (after the user confirms).

The requirements are read from ``BiomedParseSlicer/requirements/*.txt``, the files pyproject.toml reads too
(shipped with the module; one file an extra). A requirement is met when the
package is installed at a version it accepts (``packaging``, bundled with 3D Slicer, compares them):
a package another extension installed at an older version than declared is offered the upgrade.
Packages that 3D Slicer bundles (numpy, scipy, SimpleITK, requests, ...) are never installed or
upgraded by the module; torch is installed or upgraded through the PyTorch extension (SlicerPyTorch's
``PyTorchUtils``), which picks the build for the computer's GPU/CUDA.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path
from typing import Callable, Optional

# Bundled with 3D Slicer (>= 5.10): never installed or replaced from here.
SLICER_BUNDLED = ("numpy", "scipy", "SimpleITK", "requests")
REQUIREMENTS_DIR = Path(__file__).resolve().parents[1] / "requirements"


def requirement_name(requirement: str) -> str:
    for sep in ("==", ">=", "<=", "~=", ">", "<", "["):
        requirement = requirement.split(sep)[0]
    return requirement.strip()


def read_requirements(extra: str, folder: Path = REQUIREMENTS_DIR) -> tuple[str, ...]:
    """The requirements of one extra ('core': the engine's own), as pip and setuptools read the file: one a
    line, blank lines and whole-line comments skipped."""
    lines = (folder / f"{extra}.txt").read_text(encoding="utf-8").splitlines()
    return tuple(line.strip() for line in lines if line.strip() and not line.strip().startswith("#"))


# The engine's own dependencies: enough for client-only mode.
CLIENT_REQUIREMENTS = read_requirements("core")
# Needed to run models in this computer; torch itself comes from the PyTorch extension, with its requirement.
TORCH_REQUIREMENT = next(r for r in read_requirements("models") if requirement_name(r) == "torch")
MODEL_REQUIREMENTS = tuple(r for r in read_requirements("models") if r != TORCH_REQUIREMENT)
SERVER_REQUIREMENTS = read_requirements("server")


def installed_version(name: str) -> Optional[str]:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def satisfied(requirement: str) -> bool:
    """The package is installed at a version the requirement accepts (pre-releases and local builds such
    as torch's ``2.6.0+cu124`` included)."""
    from packaging.requirements import Requirement
    from packaging.version import InvalidVersion, Version

    version = installed_version(requirement_name(requirement))
    if version is None:
        return False
    try:
        return Requirement(requirement).specifier.contains(Version(version), prereleases=True)
    except InvalidVersion:  # a version pip itself could not compare: install the declared one
        return False


def _requirements(local: bool) -> list[str]:
    return list(CLIENT_REQUIREMENTS) + (list(MODEL_REQUIREMENTS + SERVER_REQUIREMENTS) if local else [])


def status(local: bool = True) -> dict[str, Optional[str]]:
    """Package -> installed version (None: missing), with what is needed after it when the installed
    version is not the declared one, e.g. ``'0.22.2 (needs >=0.23)'``, for client-only or local use."""
    reqs = list(CLIENT_REQUIREMENTS) + ([TORCH_REQUIREMENT] + list(MODEL_REQUIREMENTS + SERVER_REQUIREMENTS)
                                        if local else [])
    out: dict[str, Optional[str]] = {}
    for r in reqs:
        name, version = requirement_name(r), installed_version(requirement_name(r))
        out[name] = version if version is None or satisfied(r) else f"{version} (needs {r[len(name):]})"
    return out


def unmet_requirements(local: bool = True) -> list[str]:
    """Requirements (pip syntax) whose package is missing or installed at a version they do not accept;
    torch is not among them (see ``torch_needed``)."""
    return [r for r in _requirements(local) if not satisfied(r)]


def torch_needed(local: bool = True) -> bool:
    return local and not satisfied(TORCH_REQUIREMENT)


def _describe(requirement: str) -> str:
    version = installed_version(requirement_name(requirement))
    return requirement + (f" ({version} installed)" if version else "")


def install(local: bool, confirm: Callable[[str], bool], pip_install: Callable[[list[str]], None],
            install_torch: Optional[Callable[[], bool]] = None) -> list[str]:
    """Install what is missing after ``confirm(message)`` says yes; returns what was installed.
    Inside Slicer, ``pip_install`` is slicer.util.pip_install and ``install_torch`` calls the
    PyTorch extension (see ``torch_installer``)."""
    missing = unmet_requirements(local)
    need_torch = torch_needed(local)
    if not missing and not need_torch:
        return []
    broken = [_describe(r) for r in missing if requirement_name(r) in SLICER_BUNDLED]
    if broken:
        raise RuntimeError(f"{', '.join(broken)} should come with 3D Slicer but are missing or too old: update 3D "
                           "Slicer (>= 5.10); the module never installs or replaces packages Slicer bundles.")
    torch_note = f"{_describe(TORCH_REQUIREMENT)} via the PyTorch extension"
    what = ", ".join([_describe(r) for r in missing] + ([torch_note] if need_torch else []))
    if not confirm(f"BiomedParseSlicer needs these Python packages: {what}. Install them now?"):
        return []
    if need_torch:
        if install_torch is None or not install_torch():
            raise RuntimeError(f"torch is not installed at a version the engine needs ({TORCH_REQUIREMENT}): install "
                               "or update the 'PyTorch' extension from the Extensions Manager, restart Slicer, and try "
                               "again (or use a remote server).")
    if missing:
        pip_install(missing)
    return missing + (["torch"] if need_torch else [])


def torch_installer() -> Optional[Callable[[], bool]]:
    """SlicerPyTorch's installer, or None when the PyTorch extension is not installed."""
    try:
        import PyTorchUtils
    except ImportError:
        return None

    def install_torch() -> bool:
        # the user already confirmed the whole list; PyTorchUtils picks the CUDA/CPU/macOS build and replaces
        # a torch older than the requirement (as SlicerNNUnet's installer relies on)
        version = TORCH_REQUIREMENT[len("torch"):]
        return PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False,
                                                             torchVersionRequirement=version) is not None

    return install_torch


def model_rows() -> list[dict[str, object]]:
    """Catalog models with readiness, for the model selector and the setup table."""
    from textseg.catalog import list_models
    from textseg.weights import is_ready

    return [{"id": s.id, "title": s.title, "ready": is_ready(s), "license": s.license, "spec": s}
            for s in list_models()]


def download_model(model_id: str, progress=None, cancel=None, token: Optional[str] = None):
    """Download, verify and install a model's weights; ``progress(fraction, stage)`` as the engine reports it."""
    from textseg import weights

    return weights.download(model_id, progress=progress, cancel=cancel, token=token)


def import_candidates(model_id: str, path: str) -> list[str]:
    """Names of the model's weight files to choose from when the file's name does not say which one it
    is (the GUI asks the user then); [] when it is clear (a matching name, or a one-file model)."""
    from pathlib import Path

    from textseg.catalog import get_model

    own = [wf for wf in get_model(model_id).files if not wf.package]
    source = Path(path).name
    if len(own) <= 1 or any(source in (wf.name, Path(wf.filename or "").name) for wf in own):
        return []
    return [wf.name for wf in own]


def import_model_file(model_id: str, path: str, name: Optional[str] = None, progress=None, cancel=None):
    """Verify (size, SHA-256) and install a weight file downloaded elsewhere (proxy, air-gapped site)."""
    from textseg import weights

    return weights.import_file(model_id, path, name=name, progress=progress, cancel=cancel)
