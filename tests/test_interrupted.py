"""Fault injection: `mixbuild export` (float and fp8) killed with SIGTERM or SIGKILL part way
leaves no output that looks valid, never touches its input, and the next run succeeds."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mixbuild.atomic import output_kind
from mixbuild.exporter.artifact import Artifact

FIXTURE = Path(__file__).resolve().parents[1] / "mixbuild" / "fixtures" / "tiny-code"


def digest(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def export(ckpt: Path, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mixbuild", "export", str(ckpt), "-o", str(out),
                             "--overwrite", *extra], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
@pytest.mark.parametrize("precision, sig, after_s", [
    ("float", signal.SIGTERM, 0.0), ("float", signal.SIGTERM, 2.0), ("float", signal.SIGKILL, 1.0),
    ("fp8", signal.SIGTERM, 2.0), ("fp8", signal.SIGKILL, 2.0),
])
def test_a_killed_export_leaves_nothing_valid_and_the_next_run_succeeds(tmp_path, precision, sig,
                                                                        after_s):
    """The signal comes `after_s` after the export's first temporary appeared: from then on the
    SIGTERM handler is installed (a signal during Python's start-up is the default kill, with
    nothing written yet), so the delay does not depend on how fast the machine imports torch."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(FIXTURE, ckpt)
    before = digest(ckpt)
    out = tmp_path / "out"
    extra = ("--precision", precision, "--calib-tokens", "1024") if precision != "float" else ()
    proc = export(ckpt, out, *extra)
    _when(tmp_path, ".out.*", proc)
    time.sleep(after_s)
    assert proc.poll() is None, "the export finished before it could be interrupted"
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == (143 if sig is signal.SIGTERM else -signal.SIGKILL), stderr
    assert not out.exists()                       # nothing that looks like an artifact
    left = sorted(p.name for p in tmp_path.iterdir() if p.name not in ("ckpt", "out"))
    if sig is signal.SIGTERM:                     # cleaned up on the way out
        assert left == [] and "interrupted; no output was left half-written" in stderr
    else:                                         # nothing could clean up: hidden temporaries only
        assert left and all(n.startswith((".out.tmp-", ".out.scratch-")) for n in left)
    proc = export(ckpt, out, *extra)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert output_kind(out) == "artifact" and Artifact.open(out).spec.num_layers == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "out"]   # the kill -9 leftovers too
    assert digest(ckpt) == before


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_the_engine_build_process_dies_with_mixbuild():
    """A kill -9 of mixbuild must not leave the build process writing into the output."""
    parent = subprocess.Popen([sys.executable, "-c", (
        "import subprocess, sys, time\n"
        "from mixbuild.builder.build import _die_with_parent\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'],"
        " preexec_fn=_die_with_parent)\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    parent.kill()
    parent.wait(timeout=10)
    deadline = time.monotonic() + 10
    while _running(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _running(child)


def _running(pid: int) -> bool:
    """Alive and not a zombie (an exited child waits in state Z until init reaps it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] not in ("Z", "X")
    except FileNotFoundError:
        return False


# ------------------------------------------------------------------------------ engine builds

ENGINE_ARGS = ("--backend", "tensorrt-rtx", "--cc", "8.9", "--max-batch", "1",
               "--max-step-tokens", "16", "--max-context", "64", "--opt-level", "0")


def build(artifact: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mixbuild", "engine", str(artifact), "-o", str(out),
                             *ENGINE_ARGS], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)


def _when(root: Path, pattern: str, proc: subprocess.Popen, timeout: float = 120) -> Path:
    """Wait until a file matching `pattern` (a glob under `root`) exists; the process must still
    be running then."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = next(iter(root.glob(pattern)), None)
        if found is not None:
            return found
        assert proc.poll() is None, f"the process ended before {pattern} appeared: {proc.stderr.read()}"
        time.sleep(0.002)
    raise AssertionError(f"{pattern} never appeared")


def _processes_under(path: Path) -> list[int]:
    """Live processes whose command line names `path` (a build process left behind)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (proc / "stat").read_text().split()[2]
        except OSError:
            continue
        if str(path) in cmdline and state not in ("Z", "X"):
            found.append(int(proc.name))
    return found


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("sig, moment", [
    (signal.SIGTERM, ".out.tmp-*/engine.plan"),       # TensorRT is building, the plan opened
    (signal.SIGTERM, ".out.scratch-*/result.json"),   # the plan is written, not yet renamed
    (signal.SIGKILL, ".out.tmp-*/engine.plan"),
    (signal.SIGKILL, ".out.scratch-*/result.json"),
], ids=["SIGTERM-while-building", "SIGTERM-before-rename", "SIGKILL-while-building",
        "SIGKILL-before-rename"])
def test_a_killed_engine_build_leaves_nothing_valid_and_the_next_run_succeeds(
        tmp_path, fixture_concat_artifact, sig, moment):
    from mixbuild.builder.inspect import inspect_engine

    artifact = tmp_path / "artifact"
    shutil.copytree(fixture_concat_artifact, artifact)   # fp32 engines: the concat layout
    before = digest(artifact)
    out = tmp_path / "out"
    proc = build(artifact, out)
    _when(tmp_path, moment, proc)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == (143 if sig is signal.SIGTERM else -signal.SIGKILL), stderr
    assert not out.exists()                       # nothing that looks like an engine
    deadline = time.monotonic() + 10              # the build process dies with mixbuild
    while _processes_under(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _processes_under(tmp_path) == []
    left = sorted(p.name for p in tmp_path.iterdir() if p.name not in ("artifact", "out"))
    if sig is signal.SIGTERM:                     # cleaned up on the way out
        assert left == [] and "interrupted; no output was left half-written" in stderr
    else:                                         # nothing could clean up: hidden temporaries only
        assert left and all(n.startswith((".out.tmp-", ".out.scratch-")) for n in left)
    assert digest(artifact) == before
    proc = build(artifact, out)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert output_kind(out) == "engine" and inspect_engine(out)["plan"]["verified"]
    assert sorted(p.name for p in out.iterdir()) == ["engine.json", "engine.plan"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifact", "out"]   # kill -9 leftovers too
    assert digest(artifact) == before
