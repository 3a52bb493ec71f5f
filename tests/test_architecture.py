"""Architecture rules that matter, checked on the import graph (grimp, import-linter's engine) and the source.

- no import cycles anywhere in graftnet, imports inside functions included;
- no module imports another module's private (``_name``) objects;
- the layer contracts in pyproject.toml hold (``lint-imports``, also run by .ci/run).

Each checker is first shown to catch a planted violation in a throwaway package, so the tests can fail.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[1]


def import_cycles(package: str) -> list[list[str]]:
    """Every direct import ``a → b`` whose target leads back to ``a``, as the chain ``[a, b, …, a]``."""
    graph = grimp.build_graph(package, cache_dir=None)
    cycles = []
    for a in sorted(graph.modules):
        for b in sorted(graph.find_modules_directly_imported_by(a)):
            chain = graph.find_shortest_chain(importer=b, imported=a)
            if chain:
                cycles.append([a, *chain])
    return cycles


def private_name_imports(package_dir: Path, package: str) -> list[str]:
    """``from X import _name`` where X is another module of the package (its own private submodules excepted)."""
    found = []
    for path in sorted(package_dir.rglob("*.py")):
        rel = path.relative_to(package_dir.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        module = ".".join(parts)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.ImportFrom) or not node.module or not node.module.startswith(package):
                continue
            for alias in node.names:
                if not alias.name.startswith("_") or alias.name.startswith("__"):
                    continue
                own_submodule = node.module == module and path.name == "__init__.py"
                if not own_submodule:
                    found.append(f"{module}: from {node.module} import {alias.name}")
    return found


def _plant(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


def test_the_checkers_catch_what_they_look_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _plant(tmp_path, {
        "plantedpkg/__init__.py": "",
        "plantedpkg/a.py": "def f():\n    from plantedpkg import b  # inside a function: still an import\n",
        "plantedpkg/b.py": "from plantedpkg.a import f\nfrom plantedpkg.c import _hidden\n",
        "plantedpkg/c.py": "_hidden = 1\n",
    })  # fmt: skip
    monkeypatch.syspath_prepend(str(root))
    cycles = import_cycles("plantedpkg")
    assert ["plantedpkg.a", "plantedpkg.b", "plantedpkg.a"] in cycles
    assert private_name_imports(root / "plantedpkg", "plantedpkg") == ["plantedpkg.b: from plantedpkg.c import _hidden"]


def test_graftnet_has_no_import_cycles() -> None:
    cycles = import_cycles("graftnet")
    assert not cycles, "import cycles:\n" + "\n".join(" → ".join(c) for c in cycles)


def test_no_module_imports_another_modules_private_names() -> None:
    found = private_name_imports(ROOT / "graftnet", "graftnet")
    assert not found, "private names imported across modules:\n" + "\n".join(found)


def test_the_layer_contracts_hold() -> None:
    lint = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


def test_import_graftnet_and_the_cli_need_no_torch() -> None:
    code = "import sys, graftnet, graftnet.cli; print(sorted(m for m in ('torch', 'timm') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr


def test_every_public_name_resolves() -> None:
    import inspect

    import graftnet
    import graftnet.detach
    import graftnet.graft  # binding the modules must not hide the functions of the same name

    assert inspect.isfunction(graftnet.graft) and inspect.isfunction(graftnet.detach)

    assert set(graftnet.__all__) == {"__version__", *graftnet._EXPORTS}
    for name in graftnet.__all__:
        assert getattr(graftnet, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'no_such_thing'"):
        graftnet.no_such_thing  # noqa: B018
