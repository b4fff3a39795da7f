"""Dependencies point one way: each module imports only from its own package or from layers
below it, there is no import cycle (function-local imports included), and every module imports
on its own in a fresh interpreter."""

from __future__ import annotations

import ast
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mixbuild"

# Lowest first. A module may import from its own group and from any group before it.
LAYERS = [
    {"mixbuild", "errors", "progress", "contract", "atomic", "tensors", "jsonfile", "fixtures"},
    {"model"},
    {"plugins"},
    {"schemes"},
    {"quant"},
    {"exporter"},
    {"builder"},
    {"runtime"},
    {"validate"},
    {"inspect", "demo"},
    {"serve"},
    {"cli", "__main__"},
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def group(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def layer(module: str) -> int:
    return next(i for i, names in enumerate(LAYERS) if group(module) in names)


def _type_checking_blocks(tree: ast.AST) -> set[int]:
    """ids of the import nodes under `if TYPE_CHECKING:` (they never run)."""
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped |= {id(n) for child in node.body for n in ast.walk(child)}
    return skipped


def imports_of(path: Path) -> set[str]:
    """mixbuild modules `path` imports anywhere (module level or inside functions)."""
    tree = ast.parse(path.read_text())
    skipped = _type_checking_blocks(tree)
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "mixbuild"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "mixbuild":
            for alias in node.names:  # `from mixbuild.plugins import formats` imports a module
                sub = f"{node.module}.{alias.name}"
                is_module = (ROOT / sub.replace(".", "/")).with_suffix(".py").is_file()
                found.add(sub if is_module else node.module)
    return found


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_module_has_a_layer():
    missing = sorted({group(m) for m in graph()} - set().union(*LAYERS))
    assert not missing, f"add these to LAYERS in tests/test_layering.py: {missing}"


def test_imports_point_down_the_layers():
    upward = [f"{a} -> {b}" for a, deps in graph().items() for b in sorted(deps)
              if layer(b) > layer(a)]
    assert not upward, "imports that point up the layers:\n  " + "\n  ".join(upward)


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in edges:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    edges = {m: {d for d in deps if d != m and d != "mixbuild"} for m, deps in graph().items()}
    assert _cycles(edges) == []


def test_the_checks_catch_a_cycle_and_an_upward_import():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert layer("mixbuild.runtime.api") > layer("mixbuild.exporter.export") > layer("mixbuild.contract")


def _import_alone(module: str) -> tuple[str, int, str]:
    proc = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)
    lines = proc.stderr.strip().splitlines()
    return module, proc.returncode, lines[-1] if lines else ""


@pytest.mark.slow
def test_every_module_imports_alone():
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(_import_alone, sorted(set(graph()) - {"mixbuild.__main__"})))
    failed = [f"{m}: {err}" for m, rc, err in results if rc != 0]
    assert not failed, "\n".join(failed)


def test_the_base_layer_imports_no_heavy_library():
    code = ("import sys, mixbuild.contract, mixbuild.errors, mixbuild.atomic, mixbuild.tensors, "
            "mixbuild.cli, mixbuild.runtime; "
            "print(sorted(m for m in ('torch', 'numpy', 'onnx', 'onnxruntime', 'transformers') "
            "if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          check=True)
    assert proc.stdout.strip() == "[]"
