"""Property: whatever is wrong with a manifest or a config.json, mixbuild either works (exit 0)
or says what is wrong (exit 2, "error: ..."): never a traceback, an internal error (70), exit
1, or an exception escaping the command.

Hypothesis mutates the fields of an exported artifact's mixbuild.json (inspect it, run it) and
of a checkpoint's config.json (inspect it, export it): keys deleted, values of another JSON
type, numbers and strings changed, unknown keys added, nested spec and rope fields included.
Derandomized (the same examples on every run) and bounded (settings below); the trained
fixture is exported once per session (tests/conftest.py: fixture_fp32_artifact)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mixbuild import cli
from mixbuild.atomic import output_kind
from mixbuild.exporter.artifact import Artifact

FIXTURE = Path(__file__).resolve().parents[1] / "mixbuild" / "fixtures" / "tiny-code"
BOUNDED = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                   suppress_health_check=[HealthCheck.too_slow])


def invoke(*args):
    return CliRunner().invoke(cli.main, [str(a) for a in args])


def digest(path: Path, skip: str = "") -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file() and p.name != skip}


def assert_works_or_says_why(result, args) -> None:
    """Exit 0, or exit 2 with an "error:" message; nothing else."""
    where = f"mixbuild {' '.join(map(str, args))}\n{result.output}"
    assert result.exit_code in (0, 2), where
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"{where}\n{result.exception!r}")
    assert "Traceback" not in result.output and "internal error" not in result.output, where
    if result.exit_code == 2:
        assert "error: " in result.output or "Error: " in result.output, where


# ---------------------------------------------------------------------------- JSON mutations

SMALL_INTS = st.sampled_from([-(2**63), -1, 0, 1, 2, 3, 7, 8, 9, 64, 2048, 4096, 2**31, 2**63,
                              10**30])
VALUES = st.one_of(
    st.none(), st.booleans(), SMALL_INTS, st.integers(-5, 5000),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.5, 1.0, 2.0, 1e-5, 1e6]),
    st.text(max_size=6), st.sampled_from(["", "fp32", "fp16", "bf16", "fp8", "int4", "float32",
                                          "float16", "bfloat16", "float64", "int8", "mixtral",
                                          "llama", "artifact", "engine", "default", "yarn",
                                          "model.onnx", "../x", "silu", "gelu"]),
    st.lists(SMALL_INTS, max_size=3), st.builds(dict), st.builds(lambda: {"a": 1}),
    st.builds(lambda: [{}]),   # built fresh: a mutation may edit a drawn container in place
)


def paths(doc, prefix=()) -> list[tuple]:
    """Every key / index path in a JSON document."""
    found = []
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for key, value in items:
        found.append((*prefix, key))
        found += paths(value, (*prefix, key))
    return found


def tweak(value, data):
    """A change of the same kind: a nearby or extreme number, another string."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return data.draw(st.sampled_from([value + 1, value - 1, value * 2, value // 2, -value, 0]))
    if isinstance(value, float):
        return data.draw(st.sampled_from([value * 10, value / 10, -value, 0.0, float("inf")]))
    return data.draw(VALUES)


def mutate(doc, data):
    """Apply 1-3 random mutations to `doc` (in place) and return it."""
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        where = paths(doc)
        if not where:
            break
        path = data.draw(st.sampled_from(where), label="path")
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        key = path[-1]
        op = data.draw(st.sampled_from(["delete", "retype", "tweak", "tweak", "add"]), label="op")
        if op == "delete":
            del parent[key]
        elif op == "retype":
            parent[key] = data.draw(VALUES, label="value")
        elif op == "tweak":
            parent[key] = tweak(parent[key], data)
        elif isinstance(parent, dict):
            parent[data.draw(st.sampled_from(["extra", "top_k", "group_size", "layout"]))] = (
                data.draw(VALUES))
        else:
            parent.append(data.draw(VALUES))
    return doc


# ---------------------------------------------------------------------------------- artifact

@pytest.fixture(scope="module")
def artifact_copy(fixture_fp32_artifact, tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("mutated") / "artifact"
    shutil.copytree(fixture_fp32_artifact, dst)
    return dst


@pytest.mark.slow
@BOUNDED
@given(data=st.data())
def test_a_mutated_artifact_manifest_is_run_or_refused(artifact_copy, data):
    manifest_path = artifact_copy / "mixbuild.json"
    original = _original(manifest_path)
    before = digest(artifact_copy, skip="mixbuild.json")
    mutated = mutate(json.loads(original), data)
    text = json.dumps(mutated)
    manifest_path.write_text(text)
    try:
        for args in (("inspect", artifact_copy),
                     ("run", artifact_copy, "--prompt", "def", "--max-new-tokens", "2")):
            assert_works_or_says_why(invoke(*args), args)
        assert manifest_path.read_text() == text
        assert digest(artifact_copy, skip="mixbuild.json") == before
    finally:
        manifest_path.write_text(original)


_ORIGINALS: dict[Path, str] = {}


def _original(path: Path) -> str:
    """The unmutated document, read once (before any example wrote it), restored after each."""
    if path not in _ORIGINALS:
        _ORIGINALS[path] = path.read_text()
    return _ORIGINALS[path]


# -------------------------------------------------------------------------------- checkpoint

@pytest.fixture(scope="module")
def checkpoint_copy(tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("mutated-ckpt") / "ckpt"
    shutil.copytree(FIXTURE, dst)
    return dst


_EXPORTED: set[str] = set()   # the specs (as JSON) this pytest run exported from a mutated config


def _spec_or_none(config: Path) -> str | None:
    """The spec config.json describes, as JSON, or None where it describes none. `mixbuild
    export` reads config.json only through this spec (mixbuild/model/checkpoint.py), so two
    configs with one spec export the same artifact: the test exports each spec once."""
    from mixbuild.errors import MixbuildError
    from mixbuild.model.spec import MixtralSpec

    try:
        return json.dumps(MixtralSpec.from_file(config).to_dict(), sort_keys=True)
    except MixbuildError:
        return None


@pytest.mark.slow
@BOUNDED
@given(data=st.data())
def test_a_mutated_config_is_exported_or_refused(checkpoint_copy, data):
    config_path = checkpoint_copy / "config.json"
    original = _original(config_path)
    before = digest(checkpoint_copy, skip="config.json")
    mutated = mutate(json.loads(original), data)
    text = json.dumps(mutated)
    config_path.write_text(text)
    out = checkpoint_copy.parent / "out"
    try:
        for args in (("inspect", checkpoint_copy, "--config-only"),
                     ("inspect", checkpoint_copy, "--no-values")):
            assert_works_or_says_why(invoke(*args), args)
        spec = _spec_or_none(config_path)
        if spec is None or spec not in _EXPORTED:   # an export of an exported spec is the same
            args = ("export", checkpoint_copy, "-o", out, "--overwrite")
            result = invoke(*args)
            assert_works_or_says_why(result, args)
            if result.exit_code == 0:
                assert Artifact.open(out).spec.to_dict() == json.loads(spec)
                _EXPORTED.add(spec)
        assert output_kind(out) in (None, "artifact")
        assert sorted(p.name for p in out.parent.iterdir()) in (["ckpt"], ["ckpt", "out"])
        assert config_path.read_text() == text
        assert digest(checkpoint_copy, skip="config.json") == before
    finally:
        config_path.write_text(original)
