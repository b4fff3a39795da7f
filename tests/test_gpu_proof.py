"""scripts/gpu_proof.py --dry-run: the GPU proof's code on the CPU (Triton interpreter, tiny
shapes), its output files, its refusal of a foreign OUT_DIR, and a failing stage that is
recorded while the later stages still run."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_proof.py"
STAGES = ["environment", "kernel_correctness", "end_to_end", "kernel_benchmark", "decode",
          "tuning"]


def proof(out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), str(out), "--dry-run", "--no-progress",
                           *extra], capture_output=True, text=True, timeout=240, cwd=ROOT)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("proof") / "out"
    return proof(out), out


def test_dry_run_passes_every_stage(dry_run):
    result, out = dry_run
    assert result.returncode == 0, result.stderr[-3000:]
    doc = json.loads((out / "gpu_proof.json").read_text())
    assert doc["schema"] == "mixbuild-gpu-proof" and doc["dry_run"] is True and doc["passed"]
    assert [s["name"] for s in doc["stages"]] == STAGES
    for stage in doc["stages"]:
        assert stage["passed"] is True, stage
        assert isinstance(stage["seconds"], float) and stage["seconds"] >= 0
        assert all(g["met"] in (True, False, None) for g in stage.get("goals", []))
    md = (out / "gpu_proof.md").read_text()
    assert "| stage | passed | seconds | goals met |" in md
    for name in doc["files"]:
        assert (out / name).is_file(), name
    assert {"kernel_bandwidth.png", "decode.png"} <= set(doc["plots"])


def test_foreign_out_dir_is_refused_and_left_alone(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("not the proof's")
    result = proof(out)
    assert result.returncode == 2, result.stderr
    assert "refusing to write into" in result.stderr
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert (out / "notes.txt").read_text() == "not the proof's"


def test_failed_stage_is_recorded_and_later_stages_run(dry_run, tmp_path):
    out = tmp_path / "again"
    shutil.copytree(dry_run[1], out)           # an earlier proof's output may be reused
    result = proof(out, "--fail-stage", "kernel_correctness")
    assert result.returncode == 1, result.stderr[-3000:]
    doc = json.loads((out / "gpu_proof.json").read_text())
    stages = {s["name"]: s for s in doc["stages"]}
    failed = stages["kernel_correctness"]
    assert failed["passed"] is False and "injected" in failed["error"]
    assert failed["traceback"] and isinstance(failed["seconds"], float)
    assert [s["name"] for s in doc["stages"]] == STAGES
    assert all(stages[name]["passed"] for name in STAGES if name != "kernel_correctness")
    assert "**no**" in (out / "gpu_proof.md").read_text()
