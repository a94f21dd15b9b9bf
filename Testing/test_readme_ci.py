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
