"""mixbuild.atomic: outputs appear whole or not at all, and nothing mixbuild did not make is lost."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mixbuild import atomic
from mixbuild.contract import MANIFEST_FILE, REPORT_FILE, REPORT_SCHEMA
from mixbuild.errors import UsageError

ROOT = Path(__file__).resolve().parents[1]


def make_report_dir(path: Path, marker: str = "old") -> Path:
    path.mkdir(parents=True)
    (path / REPORT_FILE).write_text(json.dumps({"schema": REPORT_SCHEMA, "marker": marker}))
    return path


def tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_writes_whole_and_hides_the_work(tmp_path):
    out = tmp_path / "out"
    with atomic.atomic_directory(out, "report") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".out.tmp-") and not out.exists()
        (tmp / REPORT_FILE).write_text(json.dumps({"schema": REPORT_SCHEMA}))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert atomic.output_kind(out) == "report"


def test_a_failure_leaves_the_old_output_and_no_temporary(tmp_path):
    out = make_report_dir(tmp_path / "out")
    before = tree(out)
    def fail_half_way():
        with atomic.atomic_directory(out, "report", overwrite=True) as tmp:
            (tmp / "half").write_text("x")
            raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"):
        fail_half_way()
    assert tree(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_failed_swap_puts_the_old_output_back(tmp_path, monkeypatch):
    out = make_report_dir(tmp_path / "out")
    before = tree(out)
    real = os.replace

    def failing(src, dst):
        if Path(src).name.startswith(".out.tmp-"):
            raise OSError(28, "No space left on device")
        return real(src, dst)
    monkeypatch.setattr(atomic.os, "replace", failing)
    def write():
        with atomic.atomic_directory(out, "report", overwrite=True) as tmp:
            make_report_dir(tmp / "x")
    with pytest.raises(OSError, match="No space"):
        write()
    assert tree(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_never_replaces_what_mixbuild_did_not_create(tmp_path):
    user = tmp_path / "photos"
    user.mkdir()
    (user / "cat.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(UsageError, match="already exists"):
        atomic.check_destination(user, False, "report")
    with pytest.raises(UsageError, match="it is not a mixbuild report") as err:
        atomic.check_destination(user, True, "report")
    assert "a directory mixbuild did not create" in str(err.value)
    artifact = tmp_path / "artifact"
    artifact.mkdir()
    (artifact / MANIFEST_FILE).write_text(json.dumps({"kind": "artifact"}))
    with pytest.raises(UsageError, match="found:    a mixbuild artifact"):
        atomic.check_destination(artifact, True, "engine")       # an artifact is not an engine
    assert (user / "cat.jpg").read_bytes() == b"\xff\xd8"


@pytest.mark.parametrize("relation", ["is", "holds"])
def test_never_replaces_an_input(tmp_path, relation):
    out = make_report_dir(tmp_path / "out")
    source = out if relation == "is" else make_report_dir(out / "inner")
    with pytest.raises(UsageError, match=f"the output directory {relation} an input"):
        atomic.check_destination(out, True, "report", inputs=[source])
    with pytest.raises(UsageError, match=f"{relation} an input"):   # through another spelling
        atomic.check_destination(tmp_path / "." / "out", True, "report",
                                 inputs=[Path(os.path.relpath(source))])


def test_a_killed_runs_leftovers_are_removed_and_a_moved_aside_output_restored(tmp_path):
    out = tmp_path / "out"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    make_report_dir(tmp_path / f".out.old-{dead}-0123abcd", marker="previous")
    (tmp_path / f".out.tmp-{dead}-89abcdef").mkdir()
    (tmp_path / f".out.scratch-{dead}-00000000").mkdir()
    alive = tmp_path / f".out.tmp-{os.getpid()}-11111111"   # a run still going: kept
    alive.mkdir()
    notes = atomic.recover_leftovers(out, report=lambda line: None)
    assert len(notes) == 3 and any(n.startswith("restored") for n in notes)
    assert json.loads((out / REPORT_FILE).read_text())["marker"] == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == [alive.name, "out"]


def _writer_script(out: Path) -> str:
    return textwrap.dedent(f"""
        import json, sys, time
        from pathlib import Path
        from mixbuild import atomic
        with atomic.atomic_directory(Path({str(out)!r}), "report", overwrite=True) as tmp:
            (tmp / "report.json").write_text(json.dumps({{"schema": "mixbuild.validate/1"}}))
            print("writing", flush=True)
            time.sleep(60)
        """)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_signals_leave_the_old_output_and_the_next_run_cleans_up(tmp_path, sig):
    out = make_report_dir(tmp_path / "out")
    before = tree(out)
    proc = subprocess.Popen([sys.executable, "-c", _writer_script(out)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(sig)
    proc.wait(timeout=30)
    assert tree(out) == before
    left = sorted(p.name for p in tmp_path.iterdir() if p.name != "out")
    if sig is signal.SIGKILL:
        assert len(left) == 1 and left[0].startswith(".out.tmp-")   # nothing could clean up...
        with atomic.atomic_directory(out, "report", overwrite=True) as tmp:  # ...the next run does
            make_report_dir(tmp / "sub")
            (tmp / REPORT_FILE).write_text(json.dumps({"schema": REPORT_SCHEMA}))
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    else:
        assert left == []
        assert proc.returncode != 0


def test_atomic_file(tmp_path):
    path = tmp_path / "cache.bin"
    path.write_bytes(b"old")
    def fail_half_way():
        with atomic.atomic_file(path) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"):
        fail_half_way()
    assert path.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["cache.bin"]
    with atomic.atomic_file(path) as tmp:
        tmp.write_bytes(b"new")
    assert path.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["cache.bin"]
