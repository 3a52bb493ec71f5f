"""The scripts behind the figures in the docs: their specs validate, their table plumbing is right."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

from graftnet.spec import load_spec

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _module(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_the_readme_table_is_replaced_between_its_markers() -> None:
    m = _module("update_demo_table")
    readme = f"intro\n{m.START}\nold table\n{m.END}\nrest\n"
    assert m.replace_table(readme, "| new |\n") == f"intro\n{m.START}\n| new |\n{m.END}\nrest\n"
    for broken in ("no markers", f"{m.START} a {m.END} {m.START} b {m.END}"):
        with pytest.raises(ValueError, match="exactly one"):
            m.replace_table(broken, "x")


def test_a_rerun_of_the_demo_starts_from_an_empty_folder_and_touches_only_a_demo(tmp_path: Path) -> None:
    m = _module("update_demo_table")
    demo = tmp_path / "demo"
    (demo / "teachers" / "related").mkdir(parents=True)
    (demo / "scratch").mkdir()
    m.clear_demo(demo)  # finished runs would be read back, whatever the code now does
    assert not demo.exists()
    m.clear_demo(demo)  # nothing there: nothing to do
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    with pytest.raises(ValueError, match="holds no demo"):
        m.clear_demo(other)
    assert (other / "notes.txt").read_text() == "keep"


def test_every_transfer_study_spec_validates(tmp_path: Path) -> None:
    m = _module("transfer_study")
    for scenario, (teachers, can_finetune) in m.SCENARIOS.items():
        methods = (["finetune"] if can_finetune else []) + ["knowledge_flow", "control"]
        for method in methods:
            spec = load_spec(m.job_spec(m.Job(scenario, method, 50), tmp_path, 1000, 2))
            assert set(spec.teachers) == ({"t"} if method == "finetune" else set(teachers))
            if method == "control":
                assert all(t.weights is None for t in spec.teachers.values())
            assert spec.train.optimizer == "adam"
            sgd = load_spec(m.job_spec(m.Job(scenario, method, 50), tmp_path, 1000, 2, optimizer="sgd"))
            assert sgd.train.optimizer == "sgd"  # --optimizer reaches every method's student
    assert load_spec(m.job_spec(m.Job("-", "scratch", 50), tmp_path, 1000, 2)).teachers == {}


def test_p_w_at_cut_reads_the_last_epoch_before_the_cut(tmp_path: Path) -> None:
    m = _module("transfer_study")
    (tmp_path / "metrics.csv").write_text(
        "epoch,teachers_cut,p_w/a/student,p_w/a/t:a\n1,0,0.5,0.5\n2,0,0.9,0.1\n3,1,1.0,0.0\n"
    )
    assert m.p_w_at_cut(tmp_path) == {"a": 0.9}


def test_the_transfer_table_marks_a_learning_rate_chosen_at_the_grids_edge() -> None:
    m = _module("transfer_study")

    def row(method: str, lr: float, at_edge: bool) -> dict[str, object]:
        return {"job": {"labels": 50, "scenario": "related", "method": method}, "chosen": {"train.lr": lr},
                "test": [5.0, 6.0], "val": [4.0], "p_w": [], "forced": 0, "at_edge": at_edge}  # fmt: skip

    lines = m.table([row("knowledge_flow", 0.1, True), row("finetune", 0.03, False)], [50])
    assert any("| knowledge flow | 0.1 (edge) |" in line for line in lines)
    assert any("| fine-tune, new head | 0.03 |" in line for line in lines)
