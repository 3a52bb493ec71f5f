"""Every Python block of README.md and docs/*.md runs as written (blocks of one file share a namespace, in order)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks(path: Path) -> list[str]:
    return BLOCK.findall(path.read_text())


def test_the_block_finder_finds_blocks() -> None:
    text = "intro\n```python\nx = 1\n```\n```bash\nls\n```\n```python\ny = x + 1\n```\n"
    assert BLOCK.findall(text) == ["x = 1\n", "y = x + 1\n"]
    assert len(python_blocks(ROOT / "README.md")) >= 4  # graft, own loop, fit, detach/export


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_python_blocks_run_as_written(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # blocks may write run folders (runs/…)
    namespace: dict[str, object] = {"__name__": "__docs__"}
    for i, block in enumerate(python_blocks(path)):
        try:
            exec(compile(block, f"{path.name} python block {i + 1}", "exec"), namespace)  # noqa: S102
        except Exception as e:
            raise AssertionError(f"{path.name}, python block {i + 1} fails as written:\n{block}") from e
