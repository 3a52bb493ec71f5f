"""graftnet tune: the grid, the choice on validation only, the reruns with seeds, resuming, the files it writes."""

from __future__ import annotations

import csv
import importlib
import json
from pathlib import Path
from typing import Any

import pytest

from graftnet.cli import main
from graftnet.errors import GraftError, SpecError, TrainingError
from graftnet.spec import load_spec
from graftnet.training.results import RunResult
from graftnet.tune import parse_grid, tune

tune_module = importlib.import_module("graftnet.tune")  # `import graftnet.tune as m` gives the function
CNN = {"model": "graftnet:cnn1d", "kwargs": {"num_classes": 3, "channels": [8, 8]}}
SPEC: dict[str, Any] = {
    "student": CNN,
    "data": {"dataset": "mnist1d", "kwargs": {"samples": 600}, "classes": [0, 1, 2], "train_size": 64,
             "val_size": 40, "batch_size": 32},  # fmt: skip
    "train": {"method": "scratch", "epochs": 2, "lr": 3e-3, "threads": 1},
}


class FakeTrain:
    """Stands in for graftnet.train: each lr has a fixed val and test error; records every call."""

    def __init__(self, errors: dict[float, tuple[float, float]]) -> None:
        self.errors = errors
        self.calls: list[dict[str, Any]] = []

    def __call__(self, spec: Any, run_dir: Path, **kwargs: Any) -> RunResult:
        self.calls.append({"lr": spec.train.lr, "seed": spec.train.seed, "run_dir": run_dir, **kwargs})
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "spec.json").write_text(json.dumps(spec.model_dump(mode="json")))
        if spec.train.lr not in self.errors:
            raise TrainingError(f"the loss is not finite at step 3 (lr {spec.train.lr})")
        val, test = self.errors[spec.train.lr]
        result = RunResult(run_dir, "scratch", epochs=2, val_error=val + spec.train.seed, test_error=test)
        result.write(run_dir / "results.json")
        return result


def test_the_choice_is_made_on_validation_never_on_test(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # lr 0.1 has the best test error, lr 0.01 the best validation error: tune must pick 0.01.
    fake = FakeTrain({0.1: (9.0, 1.0), 0.01: (3.0, 8.0), 0.001: (5.0, 2.0)})
    monkeypatch.setattr(tune_module, "train", fake)
    r = tune(SPEC, {"train.lr": [0.1, 0.01, 0.001]}, tmp_path / "t", seeds=3, plots=False, log=lambda _: None)
    assert r.chosen == {"train.lr": 0.01}
    assert [(c["lr"], c["seed"]) for c in fake.calls] == [(0.1, 0), (0.01, 0), (0.001, 0), (0.01, 1), (0.01, 2)]
    assert [t.seed for t in r.seeds] == [0, 1, 2]
    assert r.errors("val_error") == [3.0, 4.0, 5.0]
    assert r.mean_std("test_error") == (8.0, 0.0)
    assert (tmp_path / "t" / "lr=0.01" / "seed2") == fake.calls[-1]["run_dir"]


def test_a_choice_at_the_edge_of_a_numeric_grid_is_flagged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the best validation error at the grid's largest lr: a tuned lr would need the grid widened beyond it
    monkeypatch.setattr(tune_module, "train", FakeTrain({0.001: (9.0, 9.0), 0.01: (5.0, 5.0), 0.1: (3.0, 3.0)}))
    lines: list[str] = []
    r = tune(SPEC, {"train.lr": [0.001, 0.01, 0.1]}, tmp_path / "t", seeds=1, plots=False, log=lines.append)
    assert r.at_edge == {"train.lr": "largest"}
    assert any("edge of the grid (lr=0.1 is its largest value)" in line for line in lines)
    assert "edge of the grid (lr=0.1 is its largest value)" in (tmp_path / "t" / "results.md").read_text()
    assert json.loads((tmp_path / "t" / "tune.json").read_text())["at_edge"] == {"train.lr": "largest"}
    monkeypatch.setattr(tune_module, "train", FakeTrain({0.001: (3.0, 9.0), 0.01: (5.0, 5.0), 0.1: (9.0, 3.0)}))
    assert tune(SPEC, {"train.lr": [0.1, 0.01, 0.001]}, tmp_path / "u", seeds=1, plots=False,
                log=lambda _: None).at_edge == {"train.lr": "smallest"}  # fmt: skip
    # inside the grid, or a grid of two values (where every choice is an edge): nothing to flag
    monkeypatch.setattr(tune_module, "train", FakeTrain({0.001: (9.0, 9.0), 0.01: (3.0, 3.0), 0.1: (5.0, 5.0)}))
    inside = tune(SPEC, {"train.lr": [0.001, 0.01, 0.1]}, tmp_path / "v", seeds=1, plots=False, log=lines.append)
    assert inside.at_edge == {} and "edge of the grid" not in "\n".join(inside.summary())
    assert tune(SPEC, {"train.lr": [0.01, 0.1]}, tmp_path / "w", seeds=1, plots=False,
                log=lambda _: None).at_edge == {}  # fmt: skip


class FakeTrainBySeed(FakeTrain):
    """Val and test errors per (lr, seed); a missing pair diverges."""

    def __init__(self, errors: dict[tuple[float, int], tuple[float, float]]) -> None:
        super().__init__({})
        self.by_seed = errors

    def __call__(self, spec: Any, run_dir: Path, **kwargs: Any) -> RunResult:
        self.errors = {spec.train.lr: self.by_seed[(spec.train.lr, spec.train.seed)]} if (
            spec.train.lr, spec.train.seed) in self.by_seed else {}  # fmt: skip
        result = super().__call__(spec, run_dir, **kwargs)
        result.val_error = self.by_seed[(spec.train.lr, spec.train.seed)][0]  # without FakeTrain's + seed
        result.write(run_dir / "results.json")
        return result


def test_choose_seeds_chooses_on_the_mean_validation_error_of_several_seeds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # seed 0 alone prefers lr 0.1 (a lucky draw); over three seeds 0.01 is better; 0.001 diverges with seed 2
    errors = {(0.1, 0): (2.0, 9.0), (0.1, 1): (8.0, 9.0), (0.1, 2): (8.0, 9.0),
              (0.01, 0): (4.0, 3.0), (0.01, 1): (4.0, 4.0), (0.01, 2): (4.0, 5.0),
              (0.001, 0): (1.0, 1.0), (0.001, 1): (1.0, 1.0)}  # fmt: skip
    fake = FakeTrainBySeed(errors)
    monkeypatch.setattr(tune_module, "train", fake)
    lines: list[str] = []
    grid = {"train.lr": [0.1, 0.01, 0.001]}
    one = tune(SPEC, grid, tmp_path / "one", seeds=1, plots=False, log=lambda _: None)
    assert one.chosen == {"train.lr": 0.001}  # one seed: the setting that later diverges looks best
    fake.calls.clear()
    r = tune(SPEC, grid, tmp_path / "t", seeds=3, choose_seeds=3, plots=False, log=lines.append)
    assert r.chosen == {"train.lr": 0.01}  # 0.1's mean is 6.0; 0.001 diverged with seed 2: never chosen
    assert len(fake.calls) == 9 and len(r.trials) == 9  # every setting × 3 seeds, and no reruns after
    assert [t.seed for t in r.seeds] == [0, 1, 2] and r.mean_std("test_error") == (4.0, 1.0)
    assert any("mean val error 4.00% over 3 seeds" in line for line in lines)
    md = (tmp_path / "t" / "results.md").read_text()
    assert "Grid (seeds 0–2); chosen on validation error only (the mean over the seeds)" in md
    assert "| lr=0.1 | 6.00 ± 3.46 |" in md and "failed: diverged (seed 2)" in md
    with open(tmp_path / "t" / "results.csv", newline="") as f:
        assert [row["phase"] for row in csv.DictReader(f)] == ["grid"] * 9
    # fewer choice seeds than seeds: the choice runs on to the rest
    fake.calls.clear()
    two = tune(SPEC, grid, tmp_path / "u", seeds=3, choose_seeds=2, plots=False, log=lambda _: None)
    assert two.chosen == {"train.lr": 0.001} and [t.seed for t in two.seeds] == [0, 1, 2]
    assert two.failures == 1  # the third seed of the choice diverged, and is reported as such
    with pytest.raises(SpecError, match="choose_seeds"):
        tune(SPEC, grid, tmp_path / "v", choose_seeds=0, plots=False, log=lambda _: None)


def test_seeds_start_at_the_spec_seed_and_the_grid_may_not_set_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeTrain({0.003: (3.0, 3.0)})
    monkeypatch.setattr(tune_module, "train", fake)
    spec = {**SPEC, "train": {**SPEC["train"], "seed": 5}}
    tune(spec, {}, tmp_path / "t", seeds=2, plots=False, log=lambda _: None)
    assert [c["seed"] for c in fake.calls] == [5, 6]
    with pytest.raises(SpecError, match="train.seed"):
        tune(SPEC, {"train.seed": [1, 2]}, tmp_path / "u", plots=False, log=lambda _: None)


def test_a_second_tune_reads_finished_runs_back_and_resumes_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeTrain({0.1: (9.0, 1.0), 0.01: (3.0, 8.0)})
    monkeypatch.setattr(tune_module, "train", fake)
    tune(SPEC, {"train.lr": [0.1, 0.01]}, tmp_path / "t", seeds=2, plots=False, log=lambda _: None)
    assert len(fake.calls) == 3
    # seed 1 stopped before it finished: its spec is there, its results are not
    (tmp_path / "t" / "lr=0.01" / "seed1" / "results.json").unlink()
    fake.calls.clear()
    r = tune(SPEC, {"train.lr": [0.1, 0.01]}, tmp_path / "t", seeds=2, plots=False, log=lambda _: None)
    assert [(c["lr"], c["seed"], c["resume"]) for c in fake.calls] == [(0.01, 1, True)]
    assert r.chosen == {"train.lr": 0.01}


def test_a_folder_of_another_spec_is_refused_unless_overwrite(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeTrain({0.1: (9.0, 1.0), 0.01: (3.0, 8.0)})
    monkeypatch.setattr(tune_module, "train", fake)
    tune(SPEC, {"train.lr": [0.1]}, tmp_path / "t", seeds=1, plots=False, log=lambda _: None)
    other = {**SPEC, "train": {**SPEC["train"], "epochs": 3}}
    with pytest.raises(GraftError, match=r"another spec .*train\.epochs \(2 in the run, 3 now\)"):
        tune(other, {"train.lr": [0.1]}, tmp_path / "t", seeds=1, plots=False, log=lambda _: None)
    fake.calls.clear()
    tune(other, {"train.lr": [0.1]}, tmp_path / "t", seeds=1, overwrite=True, plots=False, log=lambda _: None)
    assert [c["overwrite"] for c in fake.calls] == [True]


def test_a_run_written_before_a_setting_existed_is_not_read_back_as_todays_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A spec.json without a setting (written by an older graftnet) re-read would take today's default, which may
    not be what the run trained with: such a run is another spec's, never "done before"."""
    fake = FakeTrain({0.1: (9.0, 1.0)})
    monkeypatch.setattr(tune_module, "train", fake)
    tune(SPEC, {"train.lr": [0.1]}, tmp_path / "t", seeds=1, plots=False, log=lambda _: None)
    saved = tmp_path / "t" / "lr=0.1" / "seed0" / "spec.json"
    old = json.loads(saved.read_text())
    del old["train"]["lambda2"]
    saved.write_text(json.dumps(old))
    with pytest.raises(GraftError, match=r"train\.lambda2 \(missing in the run, 0\.1 now\)"):
        tune(SPEC, {"train.lr": [0.1]}, tmp_path / "t", seeds=1, plots=False, log=lambda _: None)
    fake.calls.clear()
    tune(SPEC, {"train.lr": [0.1]}, tmp_path / "t", seeds=1, overwrite=True, plots=False, log=lambda _: None)
    assert [c["overwrite"] for c in fake.calls] == [True]  # run again, not read back


def test_a_diverged_setting_is_a_failed_trial_not_the_end_of_the_tune(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeTrain({0.01: (3.0, 8.0)})  # lr 1.0 diverges
    monkeypatch.setattr(tune_module, "train", fake)
    r = tune(SPEC, {"train.lr": [1.0, 0.01]}, tmp_path / "t", seeds=1, plots=False, log=lambda _: None)
    assert r.chosen == {"train.lr": 0.01} and r.trials[0].failed is not None and "not finite" in r.trials[0].failed
    assert "failed: diverged" in (tmp_path / "t" / "results.md").read_text()
    fake.calls.clear()  # the failure is remembered: a second tune does not rerun it
    tune(SPEC, {"train.lr": [1.0, 0.01]}, tmp_path / "t", seeds=1, plots=False, log=lambda _: None)
    assert fake.calls == []
    with pytest.raises(GraftError, match="every setting of the grid failed"):
        tune(SPEC, {"train.lr": [2.0]}, tmp_path / "u", seeds=1, plots=False, log=lambda _: None)


def test_parse_grid_reads_values_and_lists() -> None:
    grid = parse_grid(["train.lr=1e-3,0.01", "train.lambda1.final=[10, 100]", "train.optimizer=adam,sgd"])
    assert grid == {"train.lr": [0.001, 0.01], "train.lambda1.final": [10, 100], "train.optimizer": ["adam", "sgd"]}
    for bad, match in (("train.lr", "KEY=V1,V2"), ("train.lr=1,1", "twice"), ("train.lr=", "at least one"),
                       (".lr=1", "KEY=V1,V2")):  # fmt: skip
        with pytest.raises(SpecError, match=match):
            parse_grid([bad])
    with pytest.raises(SpecError, match="given twice"):
        parse_grid(["train.lr=1", "train.lr=2"])


def test_a_bad_grid_value_is_named(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"grid train.lr=-1"):
        tune(SPEC, {"train.lr": [-1.0]}, tmp_path / "t", plots=False, log=lambda _: None)
    with pytest.raises(SpecError, match="lrr"):
        tune(SPEC, {"train.lrr": [1.0]}, tmp_path / "t", plots=False, log=lambda _: None)
    with pytest.raises(SpecError, match="share the run folder"):
        tune(SPEC, {"train.label": ["a/b", "a b"]}, tmp_path / "t", plots=False, log=lambda _: None)
    rl = {"student": CNN, "rl": {"env": "CartPole-v1"}, "train": {"method": "scratch"}}
    with pytest.raises(SpecError, match="validation"):
        tune(rl, {}, tmp_path / "t", plots=False, log=lambda _: None)


def test_graftnet_tune_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(SPEC))
    out = tmp_path / "tune"
    code = main(["tune", str(spec), "--grid", "train.lr=3e-3,1e-2", "--seeds", "2", "--out", str(out),
                 "--set", "train.epochs=1"])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "chosen on validation" in printed and "over 2 seeds" in printed
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["phase"] for r in rows] == ["grid", "grid", "seeds"]
    grid_val = {r["train.lr"]: float(r["val_error"]) for r in rows if r["phase"] == "grid"}
    chosen = min(grid_val, key=lambda k: grid_val[k])
    assert rows[-1]["train.lr"] == chosen
    chosen_spec = load_spec(out / "chosen.yaml")
    assert chosen_spec.train is not None and chosen_spec.train.lr == float(chosen) and chosen_spec.train.epochs == 1
    assert "mean ± std" in (out / "results.md").read_text()
    info = json.loads(next(out.glob("*/seed1/run.json")).read_text())
    assert info["versions"]["torch"] and "tune" in info["command"]
    assert {p.name for p in (out / "plots").iterdir()} >= {"accuracy.png"}
    # a second call finds every run finished and trains nothing
    assert main(["tune", str(spec), "--grid", "train.lr=3e-3,1e-2", "--seeds", "2", "--out", str(out),
                 "--set", "train.epochs=1", "--no-plots"]) == 0  # fmt: skip
    assert capsys.readouterr().out.count("done before") == 3


def test_the_cli_passes_choose_seeds_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}
    monkeypatch.setattr(tune_module, "tune", lambda *a, **kw: seen.update(kw))
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(SPEC))
    assert main(["tune", str(spec), "--grid", "train.lr=1e-3,1e-2", "--choose-seeds", "3", "--out",
                 str(tmp_path / "t")]) == 0  # fmt: skip
    assert seen["choose_seeds"] == 3 and seen["seeds"] == 3
