"""The README's API example must run as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"


def _api_example() -> str:
    text = README.read_text()
    section = text.split("## API", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "README's API section has no python example"
    return match.group(1)


def test_readme_api_example_runs(capsys):
    pytest.importorskip("circuit_tracer", reason="circuit-tracer is not installed")
    exec(compile(_api_example(), str(README), "exec"), {"__name__": "readme_example"})
    assert "kept " in capsys.readouterr().out


def test_readme_starts_with_the_two_commands():
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), re.S)
    assert blocks[0].strip().endswith("python -m fastattr demo")
    assert blocks[1].strip().endswith("python -m pytest -q")
    ci = (README.parent / ".ci" / "run").read_text()
    assert blocks[1].strip() in ci
