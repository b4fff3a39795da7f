"""Builder tests: the trained fixture exported once per session (fp16, int4, fp8) and one
TensorRT-RTX engine per precision built once (--moe plugin, SM 8.9, optimisation level 0,
small limits), shared by every test. Build wall times are printed in the terminal summary.

tensorrt_rtx is part of the dev extra: when it is missing these tests fail, they never skip.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

PRECISIONS = ("fp16", "int4", "fp8")
TARGET = "8.9"
LIMITS = {"max_batch": 2, "max_step_tokens": 16, "max_context": 64}
BUILD_TIMES: dict[str, float] = {}


def pytest_terminal_summary(terminalreporter):
    if BUILD_TIMES:
        terminalreporter.section("TensorRT-RTX engine builds (wall time)")
        for name, seconds in BUILD_TIMES.items():
            terminalreporter.write_line(f"{name:<24} {seconds:6.2f} s")


@pytest.fixture(scope="session")
def trt():
    if importlib.util.find_spec("tensorrt_rtx") is None:
        pytest.fail("tensorrt_rtx is not installed; it is part of the dev extra "
                    "(pip install -e '.[dev]')", pytrace=False)
    import tensorrt_rtx

    return tensorrt_rtx


def engine_artifacts(fixture_export, **options) -> dict[str, Path]:
    """The trained fixture as fp16, int4 (RTN) and fp8 fp16 artifacts with the small calibration
    (engines do not depend on how the weights were rounded), shared across the test session."""
    from tests.conftest import small_quant

    quant = {"fp16": None, "int4": small_quant("int4", int4_method="rtn"), "fp8": small_quant("fp8")}
    return {name: fixture_export(dtype="fp16", quant=q, **options) for name, q in quant.items()}


@pytest.fixture(scope="session")
def artifacts(fixture_export) -> dict[str, Path]:
    """Concat-layout artifacts: engines for the past-in / present-out contract (the serving
    layout's engines, what `mixbuild engine` builds from a default export, are
    tests/builder/test_serving_engine.py's)."""
    return engine_artifacts(fixture_export, layout="concat")


@pytest.fixture(scope="session")
def engines(trt, artifacts, tmp_path_factory) -> dict[str, Path]:
    """One plugin-mode engine per precision; fp16 goes through engine_command with a timing
    cache (which TensorRT-RTX ignores), so the CLI function is exercised by the same build."""
    from mixbuild.builder.build import build_engine
    from mixbuild.builder.cli import engine_command

    root = tmp_path_factory.mktemp("engines")
    built = {}
    for name in PRECISIONS:
        out = root / name
        if name == "fp16":
            lines = []
            engine_command(str(artifacts[name]), str(out), compute_capability=TARGET, opt_level=0,
                           timing_cache=str(root / "timing.cache"), progress=False,
                           echo=lines.append, **LIMITS)
            (root / "fp16-command.txt").write_text("\n".join(lines))
        else:
            build_engine(artifacts[name], out, backend="tensorrt-rtx", compute_capability=TARGET,
                         moe="plugin", opt_level=0, progress=False, **LIMITS)
        BUILD_TIMES[f"{name} --moe plugin"] = manifest(out)["build"]["wall_s"]
        built[name] = out
    return built


@pytest.fixture(scope="session")
def inline_engines(trt, artifacts, tmp_path_factory) -> dict[str, Path]:
    """One --moe inline engine per precision: TensorRT imports the MoE function bodies."""
    from mixbuild.builder.build import build_engine

    root = tmp_path_factory.mktemp("inline")
    built = {}
    for name in PRECISIONS:
        built[name] = build_engine(artifacts[name], root / name, backend="tensorrt-rtx",
                                   compute_capability=TARGET, moe="inline", opt_level=0,
                                   progress=False, **LIMITS)
        BUILD_TIMES[f"{name} --moe inline"] = manifest(built[name])["build"]["wall_s"]
    return built


def manifest(engine_dir: Path) -> dict:
    return json.loads((engine_dir / "engine.json").read_text())


def leftovers(out: Path) -> list[str]:
    """Anything an aborted build could have left: the output or its temporary siblings."""
    if not out.parent.exists():
        return []
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(out.name)
                  or p.name.startswith(f".{out.name}"))
