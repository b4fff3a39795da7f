"""The file names of the formats mixbuild reads and writes are spelled once, in
mixbuild/contract.py: a string literal equal to one of them anywhere else in the package is a
second spelling that can drift (docstrings and messages that mention a name inside a longer
text are not literals of it)."""

from __future__ import annotations

import ast
from pathlib import Path

import mixbuild.contract as contract

PACKAGE = Path(__file__).resolve().parents[1] / "mixbuild"


def contract_file_names() -> dict[str, str]:
    return {value: name for name, value in vars(contract).items()
            if name.isupper() and isinstance(value, str) and name.endswith(("_FILE", "_PLOT"))}


def stray_literals(root: Path) -> list[str]:
    names = contract_file_names()
    found = []
    for path in sorted(root.rglob("*.py")):
        if path.name == "contract.py" and path.parent == PACKAGE:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names:
                found.append(f"{path.relative_to(root.parent)}:{node.lineno}: {node.value!r} "
                             f"(contract.{names[node.value]})")
    return found


def test_file_names_are_spelled_only_in_the_contract():
    assert len(contract_file_names()) >= 15
    stray = stray_literals(PACKAGE)
    assert not stray, "use the contract's names:\n" + "\n".join(stray)


def test_the_check_finds_a_stray_name(tmp_path):
    package = tmp_path / "mixbuild"
    package.mkdir()
    (package / "x.py").write_text('TOKENIZER = "tokenizer.json"\nDOC = "see tokenizer.json"\n')
    assert stray_literals(package) == [
        "mixbuild/x.py:1: 'tokenizer.json' (contract.TOKENIZER_FILE)"]
