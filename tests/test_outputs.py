"""The CLI never destroys an input or a directory mixbuild did not create, refuses a bad report
directory before doing any work, and reports environment failures and its own crashes clearly."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from click.testing import CliRunner

from mixbuild import cli


def run(*args):
    return CliRunner().invoke(cli.main, [str(a) for a in args])


def digest(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def test_export_overwrite_never_replaces_its_checkpoint(ckpt_copy):
    before = digest(ckpt_copy)
    result = run("export", ckpt_copy, "-o", ckpt_copy, "--overwrite")
    assert result.exit_code == 2, result.output
    assert "the output directory is an input of this command" in result.output
    result = run("export", ckpt_copy / "sub" / "..", "-o", ckpt_copy.parent, "--overwrite")
    assert result.exit_code == 2 and "the output directory holds an input" in result.output
    assert digest(ckpt_copy) == before


def test_export_overwrite_never_replaces_a_foreign_directory(ckpt_copy, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    result = run("export", ckpt_copy, "-o", mine, "--overwrite")
    assert result.exit_code == 2 and "refusing to replace" in result.output
    assert "it is not a mixbuild artifact" in result.output
    assert (mine / "notes.txt").read_text() == "keep me"


def test_validate_refuses_a_foreign_report_dir_before_any_work(ckpt_copy, tmp_path, monkeypatch):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    import mixbuild.exporter.artifact as artifact_module

    def no_work(*args, **kwargs):
        raise AssertionError("validate opened the artifact before checking -o")
    monkeypatch.setattr(artifact_module.Artifact, "open", no_work)
    for extra in ([], ["--overwrite"]):
        result = run("validate", tmp_path / "artifact", "--reference", ckpt_copy, "-o", mine, *extra)
        assert result.exit_code == 2, result.output
        assert ("already exists" if not extra else "it is not a mixbuild report") in result.output
    assert (mine / "notes.txt").read_text() == "keep me"


def test_environment_errors_are_one_message_and_exit_2(monkeypatch, tmp_path):
    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device", str(tmp_path / "x"))
    monkeypatch.setattr("mixbuild.inspect.inspect_config", disk_full)
    (tmp_path / "config.json").write_text("{}")
    result = run("inspect", tmp_path, "--config-only")
    assert result.exit_code == 2
    assert result.output.startswith("error: No space left on device: ") and "Traceback" not in result.output


def test_a_crash_says_it_is_a_bug_and_how_to_report_it(monkeypatch, tmp_path):
    def crash(*args, **kwargs):
        raise KeyError("oops")
    monkeypatch.setattr("mixbuild.inspect.inspect_config", crash)
    result = run("inspect", tmp_path, "--config-only")
    assert result.exit_code == cli.INTERNAL_ERROR == 70
    assert "internal error: mixbuild crashed (KeyError: 'oops')" in result.output
    assert "mixbuild --debug" in result.output


def test_the_cause_is_named_and_debug_shows_the_whole_chain(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    result = run("inspect", tmp_path, "--config-only")
    assert result.exit_code == 2
    assert "cause:    JSONDecodeError: " in result.output and "--debug" in result.output
    debug = run("--debug", "inspect", tmp_path, "--config-only")
    assert isinstance(debug.exception, Exception)
    assert isinstance(debug.exception.__cause__, json.JSONDecodeError)
