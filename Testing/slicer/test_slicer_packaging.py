"""Packaging of the Slicer extension: CMake lists every shipped file, the panel's widgets exist,
the module file stays UI/MRML glue, metadata files agree, requirement lists match pyproject."""

from __future__ import annotations

import ast
import json
import re
import sys
import xml.etree.ElementTree as ET

import pytest
import update_cmake_scripts  # noqa: E402
from conftest import ROOT

MODULE = ROOT / "BiomedParseSlicer"
MODULE_PY = MODULE / "BiomedParseSlicer.py"
UI = MODULE / "Resources" / "UI" / "BiomedParseSlicer.ui"


def test_cmake_lists_every_shipped_file():
    text = (MODULE / "CMakeLists.txt").read_text()
    scripts, resources = update_cmake_scripts.expected_lists()
    assert "textseg/predictor/local.py" in scripts and "BiomedParseSlicerLib/mrml.py" in scripts
    fix = "run `python Utilities/update_cmake_scripts.py`"
    assert update_cmake_scripts.cmake_list("MODULE_PYTHON_SCRIPTS", text) == scripts, fix
    assert update_cmake_scripts.cmake_list("MODULE_PYTHON_RESOURCES", text) == resources, fix
    assert "WITH_GENERIC_TESTS" in text and "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text


def test_stale_list_is_detected(tmp_path):
    text = (MODULE / "CMakeLists.txt").read_text().replace("  textseg/volume.py\n", "")
    assert "textseg/volume.py" not in update_cmake_scripts.cmake_list("MODULE_PYTHON_SCRIPTS", text)
    assert update_cmake_scripts.rewrite(text) == (MODULE / "CMakeLists.txt").read_text()


def test_ui_has_every_widget_the_module_uses_and_parameters_exist():
    tree = ET.parse(UI)
    names = {w.get("name") for w in tree.iter("widget")}
    used = set(re.findall(r"\bui\.(\w+)",
                          MODULE_PY.read_text() + (MODULE / "BiomedParseSlicerLib" / "panel.py").read_text()))
    assert used and used <= names, f"widgets missing from the .ui: {sorted(used - names)}"
    params = {p.find("string").text for p in tree.iter("property") if p.get("name") == "SlicerParameterName"}
    fields = set(_parameter_fields())
    assert params and params <= fields, f"unknown parameters: {sorted(params - fields)}"
    receivers = {c.find("receiver").text for c in tree.iter("connection")}
    combos = {w.get("name") for w in tree.iter("widget") if w.get("class") == "qMRMLNodeComboBox"}
    assert combos == receivers  # every node selector gets the scene


def _parameter_fields():
    mod = ast.parse(MODULE_PY.read_text())
    cls = next(n for n in mod.body if isinstance(n, ast.ClassDef) and n.name == "BiomedParseSlicerParameterNode")
    return [n.target.id for n in cls.body if isinstance(n, ast.AnnAssign)]


def test_module_file_is_ui_and_mrml_glue_only():
    """Module, parameter node, Widget and Test in Slicer's template order; the Logic comes from the Lib; no
    engine, HTTP or process code and no headless import shim (the file is only ever imported inside Slicer)."""
    tree = ast.parse(MODULE_PY.read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & {"torch", "requests", "urllib", "http", "httpx", "fastapi", "uvicorn", "subprocess",
                           "threading"}
    classes = [n.name for n in tree.body if isinstance(n, ast.ClassDef)]
    assert classes == ["BiomedParseSlicer", "BiomedParseSlicerParameterNode", "BiomedParseSlicerWidget",
                       "BiomedParseSlicerTest"]
    assert not [n for n in ast.walk(tree) if isinstance(n, ast.Try) and any(
        isinstance(h.type, ast.Name) and h.type.id == "ImportError" for h in n.handlers)], "no import shim"
    logic_import = [n for n in tree.body if isinstance(n, ast.ImportFrom) and n.module == "BiomedParseSlicerLib.logic"]
    assert [a.name for n in logic_import for a in n.names] == ["BiomedParseSlicerLogic"]


def test_category_is_translated_as_slicer_modules_do_it():
    """Slicer's own modules put their category through translate("qSlicerAbstractCoreModule", ...) (e.g.
    Modules/Scripted/SegmentEditor/SegmentEditor.py), so it matches the translated category Slicer shows."""
    tree = ast.parse(MODULE_PY.read_text())
    module_class = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "BiomedParseSlicer")
    assign = next(n for n in ast.walk(module_class) if isinstance(n, ast.Assign)
                  and ast.unparse(n.targets[0]) == "self.parent.categories")
    assert ast.unparse(assign.value) == "[translate('qSlicerAbstractCoreModule', 'Segmentation')]"
    cmake = (ROOT / "CMakeLists.txt").read_text()
    assert re.search(r'set\(EXTENSION_CATEGORY "Segmentation"\)', cmake)


def test_input_volume_field_offers_what_the_selector_shows():
    """connectGui replaces the selector's nodeTypes with the field's node classes (Slicer v5.10.0
    parameterNodeWrapper/guiConnectors.py qMRMLNodeComboBoxToNodeConnector, util.getNodeTypes: the classes of a
    Union, None left out): they must be the .ui's, scalar and vector (RGB) volumes."""
    import typing

    slicer = pytest.importorskip("slicer", reason="needs the real Slicer core (test extra) for the node classes")
    tree = ast.parse(MODULE_PY.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "BiomedParseSlicerParameterNode")
    annotation = next(n.annotation for n in cls.body if isinstance(n, ast.AnnAssign) and n.target.id == "inputVolume")
    datatype = eval(compile(ast.Expression(annotation), str(MODULE_PY), "eval"),
                    {"slicer": slicer, "Optional": typing.Optional, "Union": typing.Union})
    if typing.get_origin(datatype) is typing.Union:
        classes = [a for a in typing.get_args(datatype) if isinstance(a, type) and issubclass(a, slicer.vtkMRMLNode)]
    else:
        classes = [datatype]
    node_types = [c().GetClassName() for c in classes]
    selector = next(w for w in ET.parse(UI).iter("widget") if w.get("name") == "inputVolumeSelector")
    ui_types = [s.text for p in selector.iter("property") if p.get("name") == "nodeTypes" for s in p.iter("string")]
    assert node_types == ui_types == ["vtkMRMLScalarVolumeNode", "vtkMRMLVectorVolumeNode"]
    assert type(None) in typing.get_args(datatype)  # "no volume" is a valid value of a Union field only with None


def test_ui_is_what_make_ui_generates(tmp_path):
    import subprocess

    out = subprocess.run([sys.executable, str(ROOT / "Utilities" / "make_ui.py"), str(tmp_path / "panel.ui")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "panel.ui").read_text() == UI.read_text(), "regenerate: python Utilities/make_ui.py " + str(UI)


def test_icon_is_128_png():
    import numpy as np

    Image = pytest.importorskip("PIL.Image", reason="needs Pillow (comes with scikit-image, test extra)")
    with Image.open(MODULE / "Resources" / "Icons" / "BiomedParseSlicer.png") as im:
        assert im.format == "PNG" and im.size == (128, 128)
        assert len(np.unique(np.asarray(im.convert("RGB")).reshape(-1, 3),
                             axis=0)) > 20  # a picture, not a flat placeholder
    # one icon: the module's, which the catalog's ICONURL names too
    import subprocess

    pngs = subprocess.run(["git", "ls-files", "*.png"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    if pngs:  # a git checkout
        assert [f for f in pngs if "Icons/" in f] == ["BiomedParseSlicer/Resources/Icons/BiomedParseSlicer.png"]
    url = re.search(r'set\(EXTENSION_ICONURL "([^"]*)"\)', (ROOT / "CMakeLists.txt").read_text()).group(1)
    assert url.endswith("/main/BiomedParseSlicer/Resources/Icons/BiomedParseSlicer.png")


# Slicer/Slicer Schemas/slicer-extension-catalog-entry-schema-v1.0.1.json (additionalProperties: false):
# its required and allowed keys. Screenshots and icons are not catalog-entry fields: the catalog takes
# them from CMakeLists.txt's EXTENSION_SCREENSHOTURLS / EXTENSION_ICONURL.
CATALOG_REQUIRED = {"$schema", "category", "scm_url"}
CATALOG_ALLOWED = CATALOG_REQUIRED | {"scm_revision", "scm_type", "build_dependencies", "build_subdirectory",
                                      "enabled", "tier"}


def test_extension_metadata_agrees():
    cmake = (ROOT / "CMakeLists.txt").read_text()
    s4ext = dict(line.split(" ", 1) if " " in line else (line, "")
                 for line in (ROOT / "BiomedParseSlicer.s4ext").read_text().splitlines()
                 if line.strip() and not line.startswith("#"))
    index = json.loads((ROOT / "BiomedParseSlicer.json").read_text())
    assert index["$schema"] == ("https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/"
                                "slicer-extension-catalog-entry-schema-v1.0.1.json#")
    assert CATALOG_REQUIRED <= set(index) <= CATALOG_ALLOWED
    depends = re.search(r'set\(EXTENSION_DEPENDS "([^"]*)"\)', cmake).group(1).split()
    assert index["build_dependencies"] == depends == s4ext["depends"].split()
    category = re.search(r'set\(EXTENSION_CATEGORY "([^"]*)"\)', cmake).group(1)
    assert index["category"] == category == s4ext["category"]
    assert s4ext["scmurl"] == index["scm_url"] and "add_subdirectory(BiomedParseSlicer)" in cmake
    assert 'VERSION_LESS "5.10"' in cmake  # the supported versions are enforced at build time
    assert "Apache License" in (ROOT / "LICENSE").read_text() and "CC-BY-NC-SA" in (ROOT / "NOTICE").read_text()


def test_extensions_index_checks():
    """What Slicer's Extensions Index checks (Slicer/ExtensionsIndex scripts/check_description_files.py):
    the git repository's name starts with "Slicer", the extension's (the .json's) does not, CMake's project()
    is the extension's name, the category is an accepted one. (The GitHub topic "3d-slicer-extension" is a
    repository setting: dev-notes/slicer-module-audit.md, release checklist.)"""
    cmake = (ROOT / "CMakeLists.txt").read_text()
    index = json.loads((ROOT / "BiomedParseSlicer.json").read_text())
    extension = "BiomedParseSlicer"
    repo = index["scm_url"].rstrip("/").split("/")[-1].removesuffix(".git")
    assert repo.startswith("Slicer") and not extension.lower().startswith("slicer")
    assert re.search(r"project\s*\(\s*([^\s)]+)", cmake).group(1) == extension
    homepage = re.search(r'set\(EXTENSION_HOMEPAGE "([^"]*)"\)', cmake).group(1)
    assert homepage.rstrip("/").split("/")[-1] == repo and index["scm_url"].startswith(homepage)
    assert index["category"] in ("Segmentation", "Quantification", "Analysis")  # of the index's accepted list


def test_cmake_states_the_slicer_and_python_versions():
    """Slicer 5.10 bundles Python 3.12 (5.8 bundled 3.9.10); 5.10 is the oldest supported (docs/slicer-tutorial.md)."""
    cmake = (ROOT / "CMakeLists.txt").read_text()
    assert "Slicer 5.10" in cmake and "Python 3.12" in cmake and "5.8 bundles Python 3.12" not in cmake
    assert 'message(FATAL_ERROR "BiomedParseSlicer needs 3D Slicer 5.10 or newer' in cmake


def test_test_extra_brings_a_real_qt():
    """The README's test command runs the panel's Qt tests: the test extra installs PyQt5 (Qt 5.15, as Slicer 5.10)."""
    from BiomedParseSlicerLib import environment

    test = environment.read_requirements("test")  # the test extra (pyproject reads the same file)
    assert any(r.startswith("PyQt5") for r in test)


def test_screenshot_and_icon_urls_point_at_files_in_this_repository():
    """The catalog's screenshot and icon: raw URLs of files committed here, under the homepage's repository."""
    Image = pytest.importorskip("PIL.Image", reason="needs Pillow (comes with scikit-image, test extra)")
    cmake = (ROOT / "CMakeLists.txt").read_text()
    s4ext = (ROOT / "BiomedParseSlicer.s4ext").read_text()
    homepage = re.search(r'set\(EXTENSION_HOMEPAGE "([^"]*)"\)', cmake).group(1)
    raw = homepage.replace("https://github.com/", "https://raw.githubusercontent.com/") + "/main/"
    for var, key in (("SCREENSHOTURLS", "screenshoturls"), ("ICONURL", "iconurl")):
        url = re.search(rf'set\(EXTENSION_{var} "([^"]*)"\)', cmake).group(1)
        assert url.startswith(raw) and re.search(rf"^{key} {re.escape(url)}$", s4ext, re.M), (var, url)
        path = ROOT / url[len(raw):]
        assert path.is_file(), path
        with Image.open(path) as im:
            assert im.format == "PNG"
    shot = ROOT / "Resources" / "Screenshots" / "brain-extraction.png"
    assert shot.stat().st_size < 500_000
    with Image.open(shot) as im:
        assert min(im.size) >= 600


def _canonical(requirements) -> set:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    return {(canonicalize_name(r.name), tuple(sorted(r.extras)), str(r.specifier))
            for r in map(Requirement, requirements)}


def test_requirements_have_one_source_read_by_pyproject_and_the_installer():
    """BiomedParseSlicer/requirements/*.txt is the only list: pyproject declares its dependencies dynamic from those
    files, the installed package's metadata (what pip built from pyproject) holds exactly them, and the Slicer
    installer's lists are read from the same files, which CMake ships with the module."""
    from importlib import metadata

    from packaging.requirements import Requirement

    from BiomedParseSlicerLib import environment

    tomllib = pytest.importorskip("tomllib", reason="Python >= 3.11 reads pyproject.toml")
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project, dynamic = pyproject["project"], pyproject["tool"]["setuptools"]["dynamic"]
    assert "dependencies" not in project and "optional-dependencies" not in project
    folder = "BiomedParseSlicer/requirements"
    assert dynamic["dependencies"] == {"file": [f"{folder}/core.txt"]}
    extras = sorted(dynamic["optional-dependencies"])
    assert {e: v["file"] for e, v in dynamic["optional-dependencies"].items()} == {e: [f"{folder}/{e}.txt"]
                                                                                  for e in extras}
    assert environment.REQUIREMENTS_DIR == ROOT / folder
    # the installed metadata, extra by extra, is the files' content
    declared = [Requirement(r) for r in metadata.requires("textseg")]
    assert _canonical(str(r) for r in declared if r.marker is None) == _canonical(environment.read_requirements("core"))
    for extra in extras:
        in_metadata = [str(Requirement(str(r).split(";")[0])) for r in declared
                       if r.marker is not None and r.marker.evaluate({"extra": extra})]
        assert _canonical(in_metadata) == _canonical(environment.read_requirements(extra)), extra
    # the installer's lists are those files (torch apart: it comes from the PyTorch extension)
    assert environment.CLIENT_REQUIREMENTS == environment.read_requirements("core")
    models = environment.read_requirements("models")
    assert environment.TORCH_REQUIREMENT == "torch>=2.1" and environment.TORCH_REQUIREMENT in models
    assert environment.MODEL_REQUIREMENTS == tuple(r for r in models if not r.startswith("torch"))
    assert environment.SERVER_REQUIREMENTS == environment.read_requirements("server")
    cmake = (ROOT / "BiomedParseSlicer" / "CMakeLists.txt").read_text()
    assert all(f"requirements/{e}.txt" in cmake for e in ("core", "models", "server"))


def test_the_installer_checks_every_minimum_version(monkeypatch):
    """Every requirement of the Setup lists is checked against the installed version: one just below its
    minimum (or beside its pin) is unmet, the declared version itself is met."""
    from BiomedParseSlicerLib import environment

    reqs = environment.CLIENT_REQUIREMENTS + environment.MODEL_REQUIREMENTS + environment.SERVER_REQUIREMENTS
    minimum = {environment.requirement_name(r): re.findall(r"(?:>=|==)([0-9.]+)", r) for r in reqs}
    assert [n for n, v in minimum.items() if not v] == ["regex"]  # the one requirement without a version
    versioned = [r for r in reqs if minimum[environment.requirement_name(r)]]

    def below(version: str) -> str:
        parts = [int(p) for p in version.split(".")]
        return ".".join(map(str, parts[:-1] + [parts[-1] - 1])) if parts[-1] else version + "rc0"

    monkeypatch.setattr(environment, "installed_version", lambda name: below(minimum[name][0]) if minimum.get(name)
                        else "1.0")
    assert environment.unmet_requirements(local=True) == versioned
    monkeypatch.setattr(environment, "installed_version", lambda name: (minimum.get(name) or ["1.0"])[0])
    assert environment.unmet_requirements(local=True) == []


def test_install_asks_first_and_never_touches_bundled_packages(monkeypatch):
    from BiomedParseSlicerLib import environment

    declared = {environment.requirement_name(r): (re.findall(r"[=>]=([0-9.]+)", r) or ["1.0"])[0]
                for r in environment.CLIENT_REQUIREMENTS + environment.MODEL_REQUIREMENTS
                + environment.SERVER_REQUIREMENTS + (environment.TORCH_REQUIREMENT,)}
    monkeypatch.setattr(environment, "installed_version",
                        lambda name: None if name in ("pynrrd", "torch") else declared.get(name))
    installed = []
    assert environment.install(True, lambda msg: False, installed.extend) == [] and installed == []  # declined
    asked = []
    done = environment.install(True, lambda msg: asked.append(msg) or True, installed.extend,
                               install_torch=lambda: True)
    assert installed == ["pynrrd>=1.0"] and done == ["pynrrd>=1.0", "torch"] and "PyTorch extension" in asked[0]
    with pytest.raises(RuntimeError, match="PyTorch"):
        environment.install(True, lambda msg: True, installed.extend, install_torch=None)
    # every requirement goes to pip in one call, with its version (pip upgrades what is older)
    monkeypatch.setattr(environment, "installed_version",
                        lambda name: None if name in ("einops", "regex") else declared.get(name))
    calls = []
    environment.install(True, lambda msg: True, calls.append)
    assert calls == [["einops>=0.6", "regex"]]
    monkeypatch.setattr(environment, "installed_version", lambda name: None if name == "numpy" else declared.get(name))
    with pytest.raises(RuntimeError, match="never installs or replaces"):
        environment.install(False, lambda msg: True, installed.extend)


def test_setup_download_reports_the_engines_fraction_and_stage(hub_env, hub):
    """Setup > Download: the progress bar gets the engine's (fraction, stage) over all files, unchanged."""
    import hashlib

    from BiomedParseSlicerLib import environment
    from textseg import catalog
    from textseg.catalog import ModelSpec, WeightFile

    data = {"a.bin": b"a" * 300_000, "b.bin": b"b" * 100_000}
    files = tuple(WeightFile(name=n, repo="test-org/setup", revision=hub.add("test-org/setup", f"w/{n}", d, lfs=True),
                             filename=f"w/{n}", size=len(d), sha256=hashlib.sha256(d).hexdigest())
                  for n, d in data.items())
    catalog.register(ModelSpec(id="t-slicer-download", family="test", title="t", version="1", dims=3,
                               modalities=("CT",), adapter="x:y", files=files, hidden=True))
    seen = []
    folder = environment.download_model("t-slicer-download", lambda f, stage: seen.append((f, stage)))
    assert (folder / "a.bin").read_bytes() == data["a.bin"] and (folder / "b.bin").read_bytes() == data["b.bin"]
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[0] == 0.0 and seen[-1] == (1.0, "t-slicer-download is ready")
    assert [f for f, s in seen if s == "Checking b.bin"] == [pytest.approx(0.75)]  # weighted by size
    assert all(isinstance(s, str) and s for _, s in seen)


def test_import_weight_file_asks_only_when_ambiguous_and_verifies(textseg_home, tmp_path):
    """Setup > Import weight file: a renamed file of a multi-file model makes the GUI ask which one
    it is; the chosen file is checked against the catalog's SHA-256 before it is installed."""
    import hashlib

    from BiomedParseSlicerLib import environment
    from textseg import catalog
    from textseg.catalog import ModelSpec, WeightFile
    from textseg.errors import TextsegError

    data = {"a.bin": b"weights A" * 1000, "b.bin": b"weights B" * 700}
    files = tuple(WeightFile(name=n, repo="test-org/two", filename=f"w/{n}", size=len(d),
                             sha256=hashlib.sha256(d).hexdigest()) for n, d in data.items())
    catalog.register(ModelSpec(id="t-slicer-import", family="test", title="t", version="1", dims=3,
                               modalities=("CT",), adapter="x:y", files=files, hidden=True))
    for name, d in data.items():
        (tmp_path / name).write_bytes(d)
    (tmp_path / "download(1).bin").write_bytes(data["b.bin"])
    assert environment.import_candidates("t-slicer-import", str(tmp_path / "a.bin")) == []
    assert environment.import_candidates("t-slicer-import", str(tmp_path / "download(1).bin")) == ["a.bin", "b.bin"]
    with pytest.raises(TextsegError):  # the wrong choice fails the checksum; nothing is installed
        environment.import_model_file("t-slicer-import", str(tmp_path / "download(1).bin"), "a.bin")
    seen = []
    path = environment.import_model_file("t-slicer-import", str(tmp_path / "download(1).bin"), "b.bin",
                                         progress=lambda f, stage: seen.append(f))
    assert path.read_bytes() == data["b.bin"] and seen[-1] == 1.0
    assert not any((textseg_home / "models" / "t-slicer-import").glob("a.bin"))
    environment.import_model_file("t-slicer-import", str(tmp_path / "a.bin"))
    rows = {r["id"]: r for r in environment.model_rows()}
    assert "t-slicer-import" not in rows and "synthetic-3d" not in rows  # hidden test models are never offered
    if environment.installed_version("deepbet"):
        assert rows["deepbet"]["ready"]  # its weights come inside its PyPI package: ready without a download
    assert any(not r["ready"] for r in rows.values())  # the empty cache: downloadable models are marked
    from textseg.weights import is_ready

    assert is_ready(catalog.get_model("t-slicer-import"))


def test_shipped_code_parses_as_python_3_9():
    """The engine supports Python >= 3.9 (pyproject); the module needs Slicer >= 5.10 (Python 3.12) but ships the
    engine, so no newer syntax in any shipped file."""
    for path in sorted(MODULE.rglob("*.py")):
        ast.parse(path.read_text(encoding="utf-8"), str(path), feature_version=(3, 9))
