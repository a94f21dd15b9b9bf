"""CI runs exactly the README's set-up and test commands."""

import re

from conftest import ROOT


def _block_after(text: str, heading: str) -> str:
    section = text.split(f"## {heading}", 1)[1]
    return re.search(r"```bash\n(.*?)\n```", section, re.S).group(1).strip()


def test_ci_runs_the_readme_commands():
    readme = (ROOT / "README.md").read_text()
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert _block_after(readme, "Set up a fresh machine") in ci
    assert _block_after(readme, "Run the tests") in ci


def test_setup_installs_every_package_with_its_dependencies():
    """The set-up installs nothing without its dependencies (``--no-deps``), and the environment it made has
    no broken requirements: what pip prints, in red, as "ERROR: ... requires X, which is not installed" at the
    end of an install (``pip check`` reports the same conflicts)."""
    import subprocess
    import sys

    setup = _block_after((ROOT / "README.md").read_text(), "Set up a fresh machine")
    assert "--no-deps" not in setup
    r = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"pip check: {r.stdout.strip()} (an environment made by an older set-up? " \
                              "uninstall what it names)"
