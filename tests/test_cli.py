import json

import pytest
from click.testing import CliRunner

from mixbuild.cli import main
from mixbuild.model.presets import PRESETS


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_inspect_sharded_bf16_checkpoint(bf16_checkpoint):
    result = run("inspect", bf16_checkpoint, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    counts = PRESETS["tiny"].param_counts()
    assert report["params"]["total"] == counts["total"]
    assert report["params"]["active"] == counts["active"]
    assert report["stored"]["dtypes"] == ["BF16"]
    assert len(report["stored"]["files"]) > 1
    assert report["checks"]["values_finite"] == "ok"
    assert report["stored"]["bytes"] == 2 * counts["total"]


def test_inspect_human_output(hf_checkpoints):
    result = run("inspect", hf_checkpoints["tiny-e8k3-mha"])
    assert result.exit_code == 0, result.output
    assert "8 (top-3)" in result.output and "names+shapes ok" in result.output


def test_inspect_mixtral_8x7b_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(PRESETS["mixtral-8x7b"].to_hf_config()))
    result = run("inspect", tmp_path, "--config-only")
    assert result.exit_code == 0, result.output
    assert "46.70B total, 12.88B active" in result.output


def test_inspect_trained_fixture(fixture_dir):
    result = run("inspect", fixture_dir, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["spec"]["num_experts"] == 8 and report["spec"]["top_k"] == 2
    assert "tokenizer.json" in report["tokenizer_files"]


def test_missing_directory_exits_2(tmp_path):
    result = run("inspect", tmp_path / "nope")
    assert result.exit_code == 2
    assert "checkpoint directory not found" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("edit, message", [
    (lambda d: (d / "config.json").write_text('{"model_type": "llama"}'), "unsupported model_type"),
    (lambda d: (d / "config.json").write_text("{not json"), "not valid JSON"),
    (lambda d: next(d.glob("model-00002-*.safetensors")).unlink(), "missing shard model-00002"),
])
def test_bad_input_exit_code_and_message(ckpt_copy, edit, message):
    edit(ckpt_copy)
    result = run("inspect", ckpt_copy)
    assert result.exit_code == 2
    assert message in result.output
    assert result.output.startswith("error: ")


def test_debug_shows_traceback(tmp_path):
    result = run("--debug", "inspect", tmp_path / "nope")
    assert result.exit_code != 0
    assert result.exception is not None and type(result.exception).__name__ == "CheckpointError"


def test_module_entry_point():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "mixbuild", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "inspect" in out.stdout


def test_engine_command_and_inspect(fixture_dir, tmp_path):
    from mixbuild.exporter.export import export_checkpoint

    artifact = export_checkpoint(fixture_dir, tmp_path / "fp16", dtype="fp16", progress=False)
    built = run("engine", artifact, "-o", tmp_path / "engine", "--cc", "8.9", "--opt-level", "0",
                "--max-step-tokens", "64", "--max-context", "64")
    assert built.exit_code == 0, built.output
    shown = run("inspect", tmp_path / "engine", "--json")
    assert shown.exit_code == 0, shown.output
    report = json.loads(shown.output)
    layers = report["layers"]
    assert layers["moe_plugin_layers"] == 6
    assert sum(1 for layer in layers["items"] if layer["moe_plugin"]) == 6
    inline = run("engine", artifact, "-o", tmp_path / "inline", "--cc", "8.9", "--moe", "inline",
                 "--opt-level", "0", "--max-step-tokens", "64", "--max-context", "64")
    assert inline.exit_code == 0, inline.output
    assert json.loads(run("inspect", tmp_path / "inline", "--json").output)["plugins"] == []
    refused = run("engine", artifact, "-o", tmp_path / "sm90", "--cc", "9.0")
    assert refused.exit_code == 2 and "cannot target compute capability 9.0" in refused.output
    assert not (tmp_path / "sm90").exists()
