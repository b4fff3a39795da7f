"""The runtime example in the README runs as written."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_readme_runtime_example_runs(fixture_dir, tmp_path, monkeypatch, capsys):
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Embedding the runtime", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    code = code.replace('"mixbuild/fixtures/tiny-code"', repr(str(fixture_dir)))
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    out = capsys.readouterr().out
    assert "tok/s" in out and (tmp_path / "tiny-fp32" / "mixbuild.json").is_file()
    assert len(scope["ids"]) == 8
