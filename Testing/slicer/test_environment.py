"""The Slicer Setup section's installer (BiomedParseSlicerLib/environment.py) checks the versions it
declares, not mere presence: a package older than its declared minimum (huggingface_hub from another
extension, an old torch) is offered the upgrade; a package 3D Slicer bundles is never replaced."""

from __future__ import annotations

import re

import pytest

from BiomedParseSlicerLib import environment

ALL = (environment.CLIENT_REQUIREMENTS + environment.MODEL_REQUIREMENTS + environment.SERVER_REQUIREMENTS
       + (environment.TORCH_REQUIREMENT,))


def satisfying(requirement: str) -> str:
    """A version the requirement accepts (the declared one itself)."""
    m = re.search(r"(==|>=)\s*([0-9][0-9.]*)", requirement)
    return m.group(2) if m else "1.0"


def installed(**versions):
    """installed_version for a computer that has every package at a satisfying version, except ``versions``
    (name -> version, None: missing)."""
    table = {environment.requirement_name(r): satisfying(r) for r in ALL}
    table.update({k.replace("__", "-"): v for k, v in versions.items()})
    return lambda name: table.get(name)


def test_this_environment_meets_every_declared_requirement():
    assert environment.unmet_requirements(local=True) == []
    assert environment.installed_version("torch") and "needs" not in str(environment.status(True)["torch"])


def test_package_older_than_declared_minimum_is_offered_the_upgrade(monkeypatch):
    monkeypatch.setattr(environment, "installed_version", installed(huggingface_hub="0.22.2", deepbet="1.0.1"))
    hub_req = next(r for r in environment.CLIENT_REQUIREMENTS if r.startswith("huggingface_hub"))
    assert environment.unmet_requirements(local=True) == [hub_req, "deepbet==1.0.2"]
    assert environment.status(local=True)["huggingface_hub"] == f"0.22.2 (needs {hub_req[len('huggingface_hub'):]})"
    asked, pipped = [], []
    done = environment.install(True, lambda msg: asked.append(msg) or True, pipped.append, install_torch=lambda: 1 / 0)
    assert pipped == [[hub_req, "deepbet==1.0.2"]] and done == [hub_req, "deepbet==1.0.2"]
    assert f"{hub_req} (0.22.2 installed)" in asked[0] and "deepbet==1.0.2 (1.0.1 installed)" in asked[0]
    # the same package at its declared minimum: nothing to do, nothing asked
    monkeypatch.setattr(environment, "installed_version", installed())
    assert environment.install(True, lambda msg: 1 / 0, pipped.append) == [] and len(pipped) == 1


def test_old_torch_goes_through_the_pytorch_extension(monkeypatch):
    monkeypatch.setattr(environment, "installed_version", installed(torch="2.0.1+cu118"))
    assert environment.unmet_requirements(local=True) == []  # torch is not pip-installed from here
    assert environment.status(True)["torch"] == f"2.0.1+cu118 (needs {environment.TORCH_REQUIREMENT[len('torch'):]})"
    calls, asked = [], []
    done = environment.install(True, lambda msg: asked.append(msg) or True, calls.append,
                               install_torch=lambda: calls.append("torch") or True)
    assert calls == ["torch"] and done == ["torch"] and "2.0.1+cu118 installed" in asked[0]
    # client-only use needs no torch at all
    assert environment.install(False, lambda msg: 1 / 0, calls.append) == []


def test_bundled_package_too_old_is_never_replaced(monkeypatch):
    monkeypatch.setattr(environment, "installed_version", installed(numpy="1.21.0"))
    with pytest.raises(RuntimeError, match=r"numpy>=1\.24 \(1\.21\.0 installed\).*update 3D Slicer"):
        environment.install(False, lambda msg: True, lambda reqs: 1 / 0)
