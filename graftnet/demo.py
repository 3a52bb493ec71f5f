"""``graftnet demo``: the whole pipeline on built-in data, in a few minutes on two CPU cores.

MNIST-1D (generated offline) is split into two tasks: digits 5–9 are the source, digits 0–4 with few
labels the target. Two teachers are trained on the source: ``related`` on its real labels, ``unrelated``
on shuffled labels (it learns nothing that transfers). Then students of the same 1-D convnet learn the
target by scratch, fine-tuning from ``related``, distillation from ``related`` (whose outputs are other
digits: KD is expected to struggle, see examples/README.md), knowledge flow from both teachers, and — the
control — knowledge flow from two untrained teachers wired the same way, which shows how much of the
gain is the teachers' knowledge and how much the extra capacity while training. Every method's learning
rate is chosen on the validation split with seed 0; the chosen setting then runs with every seed. The
table reports the test error of each exported, teacher-free student.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from graftnet.data import Splits, task_splits
from graftnet.launch import train
from graftnet.spec import Spec, load_spec
from graftnet.training.results import RunResult

__all__ = ["DemoConfig", "MethodSummary", "demo"]

STUDENT = {"model": "graftnet:cnn1d", "kwargs": {"num_classes": 5, "channels": [32, 32, 32]}}
SITES = ["features.act1", "features.act2", "features.act3"]


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of the demo; the defaults take a few minutes on two cores, ``quick()`` seconds (for tests)."""

    samples: int = 10000  # MNIST-1D samples generated (80% training split)
    target_train: int = 100  # labelled target samples
    val: int = 500
    batch_size: int = 32
    teacher_epochs: int = 20
    epochs: int = 100
    seeds: int = 3
    lrs: tuple[float, ...] = (3e-3, 1e-2, 3e-2)
    kd_alphas: tuple[float, ...] = (0.2, 0.9)  # KD's weight of the soft targets, chosen on validation too
    methods: tuple[str, ...] = ("scratch", "finetune", "kd", "knowledge_flow", "knowledge_flow_untrained")

    @classmethod
    def quick(cls) -> DemoConfig:
        return cls(samples=2000, target_train=64, val=100, teacher_epochs=2, epochs=4, seeds=2, lrs=(3e-3,),
                   kd_alphas=(0.9,))  # fmt: skip

    def settings(self, method: str) -> list[dict[str, float]]:
        """The hyper-parameter grid of ``method``: learning rates, and for KD also α."""
        alphas = self.kd_alphas if method == "kd" else (None,)
        return [{"lr": lr} | ({"alpha": a} if a is not None else {}) for lr in self.lrs for a in alphas]


@dataclass
class MethodSummary:
    """One row of the demo's table: the learning rate chosen on validation and the errors over seeds."""

    method: str
    setting: dict[str, float]
    test_errors: list[float] = field(default_factory=list)
    val_errors: list[float] = field(default_factory=list)
    min_p_w_student: list[float] = field(default_factory=list)

    def row(self) -> str:
        mean = statistics.mean(self.test_errors)
        std = statistics.stdev(self.test_errors) if len(self.test_errors) > 1 else 0.0
        p0 = f"{min(self.min_p_w_student):.4f}" if self.min_p_w_student else "-"
        val = statistics.mean(self.val_errors)
        return f"| {LABELS[self.method]} | {_name(self.setting, ' ')} | {mean:.2f} ± {std:.2f} | {val:.2f} | {p0} |"


LABELS = {
    "scratch": "scratch",
    "finetune": "fine-tune from related",
    "kd": "KD from related",
    "knowledge_flow": "knowledge flow (related + unrelated)",
    "knowledge_flow_untrained": "knowledge flow, untrained teachers (control)",
}


def _data(cfg: DemoConfig, classes: list[int], train_size: int | None, shuffle: bool = False) -> dict[str, Any]:
    return {
        "dataset": "mnist1d",
        "kwargs": {"samples": cfg.samples},
        "classes": classes,
        "train_size": train_size,
        "val_size": cfg.val,
        "shuffle_labels": shuffle,
        "batch_size": cfg.batch_size,
    }


def _train_section(method: str, epochs: int, lr: float, seed: int, label: str, **extra: Any) -> dict[str, Any]:
    return {"method": method, "epochs": epochs, "lr": lr, "seed": seed, "threads": 1, "label": label, **extra}


def _name(setting: dict[str, float], sep: str = "_") -> str:
    return sep.join(f"{k}{'=' if sep == ' ' else ''}{v:g}" for k, v in setting.items())


def _student_spec(
    cfg: DemoConfig, method: str, setting: dict[str, float], seed: int, teachers_dir: Path
) -> dict[str, Any]:
    """The spec of one target run."""
    lr = setting["lr"]
    data = _data(cfg, [0, 1, 2, 3, 4], cfg.target_train)
    spec: dict[str, Any] = {"student": STUDENT, "data": data}
    trained = {name: str(teachers_dir / name / "student.safetensors") for name in ("related", "unrelated")}
    label = LABELS[method]
    if method == "scratch":
        spec["train"] = _train_section("scratch", cfg.epochs, lr, seed, label)
    elif method == "finetune":
        spec["teachers"] = {"related": {**STUDENT, "weights": trained["related"]}}
        spec["train"] = _train_section("finetune", cfg.epochs, lr, seed, label, finetune={"teacher": "related"})
    elif method == "kd":
        spec["teachers"] = {"related": {**STUDENT, "weights": trained["related"]}}
        kd = {"teacher": "related", "alpha": setting["alpha"]}
        spec["train"] = _train_section("kd", cfg.epochs, lr, seed, label, kd=kd)
    else:
        untrained = method == "knowledge_flow_untrained"
        spec["teachers"] = {n: {**STUDENT, "weights": None if untrained else w} for n, w in trained.items()}
        spec["sites"] = [{"student": s, "taps": [f"related:{s}", f"unrelated:{s}"]} for s in SITES]
        spec["train"] = _train_section("knowledge_flow", cfg.epochs, lr, seed, label)
    return spec


class _SplitCache:
    """Generating MNIST-1D takes seconds: every run with the same data section shares one copy."""

    def __init__(self) -> None:
        self._cache: dict[str, Splits] = {}

    def __call__(self, spec: Spec) -> Splits:
        d = spec.data
        assert d is not None
        key = d.model_dump_json()
        if key not in self._cache:
            self._cache[key] = task_splits(spec)
        return self._cache[key]


def demo(
    out: str | Path = "runs/demo", cfg: DemoConfig | None = None, *, log: Callable[[str], None] = print
) -> list[MethodSummary]:
    """Train the teachers and every method's students, print the table, write the plots.

    Returns:
        One :class:`MethodSummary` per method, in ``cfg.methods`` order.

    Examples:
        >>> rows = demo("runs/demo")          # doctest: +SKIP
    """
    from graftnet.plot import plot_runs

    cfg = cfg or DemoConfig()
    out = Path(out)
    started = time.perf_counter()
    splits = _SplitCache()
    threads = torch.get_num_threads()

    def run(spec_dict: dict[str, Any], run_dir: Path, what: str) -> RunResult:
        spec = load_spec(spec_dict)
        t0 = time.perf_counter()
        result = train(spec, run_dir, overwrite=True, progress=False, tensorboard=False, splits=splits(spec))
        log(f"  {what}: val error {result.val_error:.2f}%, test error {result.test_error:.2f}% "
            f"({time.perf_counter() - t0:.1f} s)")  # fmt: skip
        return result

    try:
        log(f"graftnet demo → {out}  (MNIST-1D: source digits 5-9, target digits 0-4 with {cfg.target_train} labels)")
        teachers_dir = out / "teachers"
        for name, shuffle in (("related", False), ("unrelated", True)):
            spec = {
                "student": STUDENT,
                "data": _data(cfg, [5, 6, 7, 8, 9], None, shuffle),
                "train": _train_section("scratch", cfg.teacher_epochs, 3e-3, 0, f"teacher {name}"),
            }
            run(spec, teachers_dir / name, f"teacher {name} ({'shuffled' if shuffle else 'true'} source labels)")

        summaries = []
        for method in cfg.methods:
            log(f"{LABELS[method]}: choosing hyper-parameters on validation (seed 0)")
            best: tuple[float, dict[str, float], RunResult] | None = None
            for setting in cfg.settings(method):
                spec = _student_spec(cfg, method, setting, 0, teachers_dir)
                r = run(spec, out / method / f"{_name(setting)}_seed0", _name(setting, " "))
                assert r.val_error is not None
                if best is None or r.val_error < best[0]:
                    best = (r.val_error, setting, r)
            assert best is not None
            _, setting, first = best
            summary = MethodSummary(method, setting)
            for seed in range(cfg.seeds):
                r = first if seed == 0 else run(
                    _student_spec(cfg, method, setting, seed, teachers_dir),
                    out / method / f"{_name(setting)}_seed{seed}", f"{_name(setting, ' ')} seed {seed}",
                )  # fmt: skip
                assert r.test_error is not None and r.val_error is not None
                summary.test_errors.append(r.test_error)
                summary.val_errors.append(r.val_error)
                if r.min_p_w_student is not None:
                    summary.min_p_w_student.append(r.min_p_w_student)
            summaries.append(summary)
    finally:
        torch.set_num_threads(threads)

    table = [
        f"Test error (%) of the exported students on MNIST-1D digits 0-4 ({cfg.target_train} labels), "
        f"mean ± std over {cfg.seeds} seeds; hyper-parameters chosen on validation (seed 0):",
        "",
        "| method | chosen | test error | val error | min p_w(student) at cut |",
        "| --- | --- | --- | --- | --- |",
        *(s.row() for s in summaries),
    ]
    log("\n".join(table))
    chosen = [out / s.method / f"{_name(s.setting)}_seed0" for s in summaries]
    for path in plot_runs(chosen, out / "plots"):
        log(f"wrote {path}")
    (out / "results.md").write_text("\n".join(table) + "\n")
    (out / "results.json").write_text(json.dumps([s.__dict__ for s in summaries], indent=2))
    log(f"demo finished in {time.perf_counter() - started:.0f} s")
    return summaries
