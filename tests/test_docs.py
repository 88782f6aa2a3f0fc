"""Every ```python block of README.md and docs/*.md runs as written (blocks of one file in order,
in one namespace, in a fresh working directory)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks(path: Path) -> list:
    return _BLOCK.findall(path.read_text())


def test_the_documents_hold_python_blocks():
    """The collection below cannot pass by finding nothing: the README's usage block is one."""
    assert python_blocks(ROOT / "README.md")


@pytest.mark.parametrize("path", [d for d in DOCUMENTS if python_blocks(d)], ids=lambda p: p.name)
def test_python_blocks_run(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": f"doc_{path.stem}"}
    for number, block in enumerate(python_blocks(path), 1):
        code = compile(block, f"{path.relative_to(ROOT)} (python block {number})", "exec")
        exec(code, namespace)
