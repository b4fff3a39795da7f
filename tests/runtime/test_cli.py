"""The body of `mixbuild run`."""

from __future__ import annotations

from mixbuild.runtime.cli import cli_run


def test_cli_run_prints_text_and_latency(runtime_artifact, capsys):
    result = cli_run(str(runtime_artifact), "def main():", max_new_tokens=8, threads=1)
    out = capsys.readouterr().out
    assert result.text in out and "time to first token" in out and "tokens/s" in out


def test_cli_run_streams_and_chats(runtime_artifact, capsys):
    result = cli_run(str(runtime_artifact), "sum a list", stream=True, chat=True,
                     max_new_tokens=6, temperature=0.7, seed=1, stop=(), threads=1)
    out = capsys.readouterr().out
    assert out.startswith(result.text) and "[ort]" in out


def test_mixbuild_run_command(runtime_artifact):
    from click.testing import CliRunner

    from mixbuild.cli import main

    result = CliRunner().invoke(main, ["run", str(runtime_artifact), "--prompt", "def main():",
                                       "--max-new-tokens", "5", "--threads", "1", "--stream"])
    assert result.exit_code == 0, result.output
    assert "[ort]" in result.output and "time to first token" in result.output


def test_mixbuild_run_rejects_bad_input(runtime_artifact, tmp_path):
    from click.testing import CliRunner

    from mixbuild.cli import main

    runner = CliRunner()
    missing = runner.invoke(main, ["run", str(tmp_path / "nope"), "--prompt", "x"])
    assert missing.exit_code == 2 and "not found" in missing.output
    greedy_top_k = runner.invoke(main, ["run", str(runtime_artifact), "--prompt", "x",
                                        "--top-k", "5", "--temperature", "0"])
    assert greedy_top_k.exit_code == 2 and "temperature" in greedy_top_k.output
    wrong_backend = runner.invoke(main, ["run", str(runtime_artifact), "--prompt", "x",
                                         "--backend", "torch"])
    assert wrong_backend.exit_code == 2 and "backend" in wrong_backend.output


def test_mixbuild_run_takes_openai_sampling_options(runtime_artifact):
    """--logit-bias 2=100 makes the end-of-sequence id (2) certain; --min-tokens holds it back
    for three tokens, so the fourth ends the request."""
    from click.testing import CliRunner

    from mixbuild.cli import main

    base = ["run", str(runtime_artifact), "--prompt", "def main():", "--threads", "1",
            "--max-new-tokens", "8", "--logit-bias", "2=100"]
    result = CliRunner().invoke(main, [*base, "--min-tokens", "3", "--presence-penalty", "0.5",
                                       "--frequency-penalty", "0.5"])
    assert result.exit_code == 0, result.output
    assert "4 generated tokens (stop)" in result.output
    result = CliRunner().invoke(main, base)
    assert result.exit_code == 0 and "1 generated tokens (stop)" in result.output, result.output
    for bad, message in (("2", "is not TOKEN_ID=BIAS"), ("2=500", "biases in [-100, 100]")):
        result = CliRunner().invoke(main, [*base[:-1], bad])
        assert result.exit_code == 2 and message in result.output, result.output
