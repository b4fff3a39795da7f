"""docs/architecture.md stays true as modules come and go: every module of the package is
described in the paragraph of its package (the base modules in **base**)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARCHITECTURE = ROOT / "docs" / "architecture.md"


def _paragraphs() -> dict[str, str]:
    """'**name** — ...' paragraphs of the Packages section, by name."""
    text = ARCHITECTURE.read_text(encoding="utf-8").split("## Packages", 1)[1]
    found = {}
    for block in re.split(r"\n(?=\*\*)", text):
        head = re.match(r"\*\*([^*]+)\*\*", block)
        if head:
            for name in re.split(r"\s*/\s*", head.group(1)):
                found[name.strip()] = block
    return found


def test_every_module_is_in_its_package_paragraph():
    paragraphs = _paragraphs()
    missing = []
    for path in sorted((ROOT / "mixbuild").rglob("*.py")):
        rel = path.relative_to(ROOT / "mixbuild")
        if path.name in ("__init__.py", "__main__.py") or rel.parts[0] == "fixtures":
            continue
        package = rel.parts[0] if len(rel.parts) > 1 else "base"
        if package == "base" and path.stem in ("cli", "inspect", "demo"):
            package = {"cli": "cli.py", "inspect": "inspect.py", "demo": "demo.py"}[path.stem]
        paragraph = paragraphs.get(package, "")
        if path.name not in paragraph:
            missing.append(f"mixbuild/{rel} (paragraph **{package}**)")
    assert not missing, "docs/architecture.md does not describe: " + ", ".join(missing)
