"""Environment failures end in one message and exit code 2, never a traceback, never exit 1
or 70: a full disk, an output directory mixbuild may not write, an input it may not read, text
that is not UTF-8, a file where a directory belongs, a path that does not exist. Every case
also leaves its inputs byte-identical and no output (nor hidden temporary) behind.

Tests run as root here, where permission bits do not apply; the permission cases therefore
raise the PermissionError the kernel would raise, from a monkeypatched pathlib method, and the
real chmod variants run only for an unprivileged user."""

from __future__ import annotations

import errno
import hashlib
import os
import pathlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from mixbuild import cli

FIXTURE = Path(__file__).resolve().parents[1] / "mixbuild" / "fixtures" / "tiny-code"
ENGINE_ARGS = ("--backend", "tensorrt-rtx", "--cc", "8.9", "--max-batch", "1",
               "--max-step-tokens", "16", "--max-context", "64", "--opt-level", "0")
as_root = os.geteuid() == 0


def run(*args):
    return CliRunner().invoke(cli.main, [str(a) for a in args])


def digest(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def assert_one_message(result, *lines: str, prefix: str = "error: ") -> None:
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    assert prefix in result.output, result.output
    assert "Traceback" not in result.output and "internal error" not in result.output
    for line in lines:
        assert line in result.output, f"{line!r} not in:\n{result.output}"


def fail_on(monkeypatch, method: str, when, exc) -> list[Path]:
    """Make pathlib.Path.`method` raise `exc(path)` for the paths `when(path)` accepts (the
    kernel's refusal, simulated); returns the paths it refused."""
    original = getattr(pathlib.Path, method)
    refused = []

    def patched(self, *args, **kwargs):
        if when(self):
            refused.append(self)
            raise exc(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, method, patched)
    return refused


def permission_denied(path):
    return PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))


def disk_full(path):
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


@pytest.fixture
def ckpt(tmp_path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(FIXTURE, dst)
    return dst


def siblings(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# --------------------------------------------------------------------------------- disk full

def test_disk_full_while_writing_the_weights(ckpt, tmp_path, monkeypatch):
    import mixbuild.exporter.export as export_module

    def save_until_full(onnx_model, directory, progress):
        (directory / "model.onnx.data").write_bytes(b"\0" * 4096)    # part of the weights
        raise disk_full(directory / "model.onnx.data")
    monkeypatch.setattr(export_module, "save_model", save_until_full)
    before = digest(ckpt)
    result = run("export", ckpt, "-o", tmp_path / "out")
    assert_one_message(result, "error: No space left on device: ", "model.onnx.data",
                       "fix:      free disk space, fix the permissions or the path, and retry")
    assert result.output.startswith("error: No space left on device")
    assert siblings(tmp_path) == ["ckpt"]            # no output, no hidden temporaries
    assert digest(ckpt) == before


def test_disk_full_at_the_last_write_keeps_the_old_artifact(ckpt, tmp_path, monkeypatch,
                                                            fixture_fp32_artifact):
    """--overwrite over an existing artifact, the disk fills while writing the manifest (the
    very last file): the old artifact is still there, byte for byte."""
    out = tmp_path / "out"
    shutil.copytree(fixture_fp32_artifact, out)
    old = digest(out)
    before = digest(ckpt)
    refused = fail_on(monkeypatch, "write_text",
                      lambda p: p.name == "mixbuild.json" and p.parent.name.startswith(".out.tmp-"),
                      disk_full)
    result = run("export", ckpt, "-o", out, "--overwrite")
    assert refused, "the manifest write was never reached"
    assert_one_message(result, "error: No space left on device: ", "mixbuild.json")
    assert digest(out) == old
    assert siblings(tmp_path) == ["ckpt", "out"]
    assert digest(ckpt) == before


def test_disk_full_while_copying_tokenizer_files(ckpt, tmp_path, monkeypatch):
    import mixbuild.exporter.export as export_module

    def copy_full(src, dst, **kwargs):
        raise disk_full(dst)
    monkeypatch.setattr(export_module.shutil, "copy2", copy_full)
    before = digest(ckpt)
    result = run("export", ckpt, "-o", tmp_path / "out")
    assert_one_message(result, "error: No space left on device: ")
    assert siblings(tmp_path) == ["ckpt"]
    assert digest(ckpt) == before


# ------------------------------------------------------------------ unwritable output directory

def _inside(directory: Path):
    directory = directory.resolve()
    return lambda p: directory in Path(os.path.abspath(p)).parents


def test_an_unwritable_output_directory_export(ckpt, tmp_path, monkeypatch):
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    refused = fail_on(monkeypatch, "mkdir", _inside(readonly), permission_denied)
    before = digest(ckpt)
    result = run("export", ckpt, "-o", readonly / "out")
    assert refused
    assert_one_message(result, "error: Permission denied: ", str(readonly),
                       "fix:      free disk space, fix the permissions or the path, and retry")
    assert siblings(readonly) == []
    assert digest(ckpt) == before


def test_an_unwritable_output_directory_engine(fixture_fp32_artifact, tmp_path, monkeypatch):
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    refused = fail_on(monkeypatch, "mkdir", _inside(readonly), permission_denied)
    before = digest(fixture_fp32_artifact)
    result = run("engine", fixture_fp32_artifact, "-o", readonly / "engine", *ENGINE_ARGS)
    assert refused
    assert_one_message(result, "error: Permission denied: ", str(readonly))
    assert siblings(readonly) == []
    assert digest(fixture_fp32_artifact) == before


@pytest.mark.skipif(as_root, reason="root ignores permission bits; the monkeypatched "
                                    "PermissionError tests above cover this case")
def test_an_unwritable_output_directory_for_real(ckpt, tmp_path):
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    readonly.chmod(0o500)
    try:
        result = run("export", ckpt, "-o", readonly / "out")
        assert_one_message(result, "error: Permission denied: ")
        assert siblings(readonly) == []
    finally:
        readonly.chmod(0o700)


# ------------------------------------------------------------------------------ unreadable input

def test_an_unreadable_checkpoint_file(ckpt, tmp_path, monkeypatch):
    before = digest(ckpt)
    refused = fail_on(monkeypatch, "open", lambda p: p.suffix == ".safetensors", permission_denied)
    for args in (("inspect", ckpt), ("export", ckpt, "-o", tmp_path / "out")):
        result = run(*args)
        assert refused
        assert_one_message(result, "Permission denied", "model.safetensors")
    monkeypatch.undo()
    assert siblings(tmp_path) == ["ckpt"]
    assert digest(ckpt) == before


def test_an_unreadable_config(ckpt, tmp_path, monkeypatch):
    before = digest(ckpt)
    fail_on(monkeypatch, "open", lambda p: p.name == "config.json", permission_denied)
    for args in (("inspect", ckpt, "--config-only"), ("export", ckpt, "-o", tmp_path / "out"),
                 ("run", ckpt, "--prompt", "def")):
        assert_one_message(run(*args), "error: Permission denied: ", "config.json")
    monkeypatch.undo()
    assert siblings(tmp_path) == ["ckpt"]
    assert digest(ckpt) == before


def test_an_unreadable_artifact_file(fixture_fp32_artifact, tmp_path, monkeypatch):
    before = digest(fixture_fp32_artifact)
    fail_on(monkeypatch, "open", lambda p: p.name == "model.onnx.data", permission_denied)
    for args in (("inspect", fixture_fp32_artifact),
                 ("run", fixture_fp32_artifact, "--prompt", "def", "--max-new-tokens", "2"),
                 ("engine", fixture_fp32_artifact, "-o", tmp_path / "engine", *ENGINE_ARGS)):
        assert_one_message(run(*args), "error: Permission denied: ", "model.onnx.data")
    monkeypatch.undo()
    assert siblings(tmp_path) == []
    assert digest(fixture_fp32_artifact) == before


@pytest.mark.skipif(as_root, reason="root reads a 0o000 file; the monkeypatched "
                                    "PermissionError tests above cover this case")
def test_an_unreadable_checkpoint_file_for_real(ckpt, tmp_path):
    weights = ckpt / "model.safetensors"
    weights.chmod(0o000)
    try:
        assert_one_message(run("inspect", ckpt), "Permission denied")
    finally:
        weights.chmod(0o600)


# -------------------------------------------------------------------------- text not UTF-8

def _mixbuild(*argv: bytes) -> subprocess.CompletedProcess:
    """mixbuild with raw argv bytes: Python hands non-UTF-8 ones on as lone surrogates."""
    return subprocess.run([sys.executable.encode(), b"-m", b"mixbuild", *argv], capture_output=True,
                          timeout=120, env={**os.environ, "LC_ALL": "C.UTF-8"})


@pytest.mark.parametrize("option, value, found", [
    (b"--prompt", b"caf\xe9 au lait", "byte 0xe9 at character 3"),   # Latin-1 from a terminal
    (b"--stop", b"\xff\xfe", "byte 0xff at character 0"),
])
def test_run_refuses_arguments_that_are_not_utf8(fixture_fp32_artifact, option, value, found):
    before = digest(fixture_fp32_artifact)
    argv = [b"run", str(fixture_fp32_artifact).encode(), b"--max-new-tokens", b"2"]
    argv += [option, value] if option == b"--prompt" else [b"--prompt", b"def", option, value]
    done = _mixbuild(*argv)
    stderr = done.stderr.decode("utf-8", "replace")
    assert done.returncode == 2, stderr
    assert stderr.startswith(f"error: {option.decode()} is not valid UTF-8 text\n"), stderr
    assert f"found:    {found}" in stderr and "iconv" in stderr
    assert "Traceback" not in stderr and done.stdout == b""
    assert digest(fixture_fp32_artifact) == before


def test_validate_refuses_a_latin1_prompts_file(fixture_fp32_artifact, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes("déjà vu\n\nnaïve café\n".encode("latin-1"))
    inputs = {"artifact": digest(fixture_fp32_artifact), "fixture": digest(FIXTURE),
              "prompts": prompts.read_bytes()}
    result = run("validate", fixture_fp32_artifact, "--reference", FIXTURE, "--prompts", prompts,
                 "-o", tmp_path / "report")
    assert_one_message(result, f"error: {prompts}: prompts file is not UTF-8 text",
                       "can't decode byte 0xe9")
    assert siblings(tmp_path) == ["prompts.txt"]
    assert inputs == {"artifact": digest(fixture_fp32_artifact), "fixture": digest(FIXTURE),
                      "prompts": prompts.read_bytes()}


def test_export_refuses_a_latin1_calibration_file(ckpt, tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_bytes("déjà vu, naïve café\n".encode("latin-1") * 50)
    before = digest(ckpt), calib.read_bytes()
    result = run("export", ckpt, "-o", tmp_path / "out", "--precision", "fp8", "--calib", calib)
    assert_one_message(result, "is not UTF-8 text", "0xe9")
    assert siblings(tmp_path) == ["calib.txt", "ckpt"]
    assert (digest(ckpt), calib.read_bytes()) == before


# ---------------------------------------------------------------------------------- bad paths

def test_a_file_where_a_directory_belongs(ckpt, fixture_fp32_artifact, tmp_path):
    afile = tmp_path / "notes.txt"
    afile.write_text("keep me")
    before = digest(ckpt), digest(fixture_fp32_artifact)
    for args in (("inspect", afile), ("run", afile, "--prompt", "x"),
                 ("export", afile, "-o", tmp_path / "out"), ("engine", afile, "-o", tmp_path / "e")):
        assert_one_message(run(*args), "is a file", prefix="Error: Invalid value for")
    for args in (("export", ckpt, "-o", afile),
                 ("engine", fixture_fp32_artifact, "-o", afile, *ENGINE_ARGS)):
        assert_one_message(run(*args), f"error: output path exists and is not a directory: {afile}")
    for args in (("export", ckpt, "-o", afile / "out"),
                 ("engine", fixture_fp32_artifact, "-o", afile / "sub" / "engine", *ENGINE_ARGS)):
        assert_one_message(run(*args), "is a file, not a directory", f"found:    {afile} is a file",
                           "fix:      choose another -o")
    assert afile.read_text() == "keep me"
    assert siblings(tmp_path) == ["ckpt", "notes.txt"]
    assert (digest(ckpt), digest(fixture_fp32_artifact)) == before


def test_a_path_that_does_not_exist(ckpt, fixture_fp32_artifact, tmp_path):
    missing = tmp_path / "missing"
    before = digest(ckpt), digest(fixture_fp32_artifact)
    cases = {
        ("inspect", missing): "error: checkpoint directory not found",
        ("run", missing, "--prompt", "x"): "error: model directory not found",
        ("export", missing, "-o", tmp_path / "out"): "error: checkpoint directory not found",
        ("engine", missing, "-o", tmp_path / "e", *ENGINE_ARGS): "error: artifact directory not found",
        ("validate", missing, "--reference", ckpt, "-o", tmp_path / "r"):
            "error: model directory not found",      # an artifact, checkpoint or engine
        ("validate", fixture_fp32_artifact, "--reference", missing, "-o", tmp_path / "r"):
            "error: checkpoint directory not found",
        ("validate", fixture_fp32_artifact, "--reference", ckpt, "--prompts", missing / "p.txt",
         "-o", tmp_path / "r"): "error: prompts file not found",
        ("export", ckpt, "-o", tmp_path / "out", "--precision", "int4", "--calib", missing):
            "error: calibration file not found",
    }
    for args, message in cases.items():
        assert_one_message(run(*args), message)
    assert siblings(tmp_path) == ["ckpt"]
    assert (digest(ckpt), digest(fixture_fp32_artifact)) == before
