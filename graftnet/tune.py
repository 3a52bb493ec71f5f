"""``graftnet tune``: choose hyper-parameters on the validation split, then rerun the choice with several seeds.

Every setting of the grid (the product of the values given per key) trains once with the spec's seed (or with
``choose_seeds`` seeds); the setting with the lowest validation error of its exported student (the mean over those
seeds) is chosen (the test split is never looked at), and runs again with the next seeds. Each run is an
ordinary run folder under ``out``, so an interrupted tune resumes where it stopped: finished runs are read back,
an interrupted one continues from its checkpoint.

``out`` then holds ``results.csv`` and ``results.md`` (every run, and the chosen setting's mean ± std over
seeds), ``chosen.yaml`` (the spec with the chosen settings, ready for ``graftnet train``), ``tune.json`` and
``plots/`` (the chosen setting's curves as seed bands; ``plots/grid/`` compares the grid's settings).
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import re
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from graftnet.errors import GraftError, SpecError, TrainingError
from graftnet.launch import train
from graftnet.provenance import command_line, versions
from graftnet.spec import Spec, load_spec, override_spec, parse_yaml, short_repr
from graftnet.training.results import RunResult
from graftnet.training.run_dir import RESULTS_NAME, SPEC_NAME, spec_differences

__all__ = ["Trial", "TuneResult", "folder_name", "parse_grid", "seeds_text", "setting_text", "tune"]

Setting = dict[str, Any]
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


@dataclass
class Trial:
    """One run of the tune: a setting of the grid with one seed. ``failed`` says why a run that stopped with a
    :class:`TrainingError` (a loss or a validation loss that is not finite: the setting diverged) did."""

    setting: Setting
    seed: int
    result: RunResult
    failed: str | None = None


@dataclass
class TuneResult:
    """What :func:`tune` found: the grid's runs (``trials``: every setting with the first ``choose_seeds`` seeds),
    the ``chosen`` setting, and its runs over every seed (``seeds``, the grid's runs first)."""

    out: Path
    grid: dict[str, list[Any]]
    trials: list[Trial]
    chosen: Setting
    seeds: list[Trial] = field(default_factory=list)
    choose_seeds: int = 1

    @property
    def settings(self) -> list[Setting]:
        """The grid's settings, in grid order (each appears in :attr:`trials` once per choice seed)."""
        unique: list[Setting] = []
        for t in self.trials:
            if t.setting not in unique:
                unique.append(t.setting)
        return unique

    def runs_of(self, setting: Setting) -> list[Trial]:
        """The grid's runs of ``setting`` (one per seed the choice was made on)."""
        return [t for t in self.trials if t.setting == setting]

    def errors(self, which: str = "test_error") -> list[float]:
        """The chosen setting's ``test_error`` or ``val_error`` (%) per seed (failed runs are left out)."""
        return [v for t in self.seeds if (v := getattr(t.result, which)) is not None]

    def mean_std(self, which: str = "test_error") -> tuple[float, float]:
        """Mean and sample standard deviation over seeds (std 0 with one seed); NaN without values."""
        values = self.errors(which)
        if not values:
            return math.nan, math.nan
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0

    @property
    def failures(self) -> int:
        """Runs of the chosen setting that diverged (see :attr:`Trial.failed`)."""
        return sum(t.failed is not None for t in self.seeds)

    @property
    def forced_exports(self) -> int:
        """Runs of the chosen setting exported although some p_w(student) was below 1 − export_tol."""
        return sum(t.result.forced_export for t in self.seeds)

    @property
    def at_edge(self) -> dict[str, str]:
        """The grid's numeric keys with three values or more whose chosen value is their ``"smallest"`` or
        ``"largest"``: the best setting may lie beyond the grid there, so widen it (a learning rate chosen at the
        grid's edge is not a tuned one). ``{key: "smallest" | "largest"}``."""
        edges = {}
        for key, values in self.grid.items():
            numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
            if len(numbers) < 3 or len(numbers) != len(values) or key not in self.chosen:
                continue
            if self.chosen[key] == min(numbers):
                edges[key] = "smallest"
            elif self.chosen[key] == max(numbers):
                edges[key] = "largest"
        return edges

    def summary(self) -> list[str]:
        test, test_sd = self.mean_std("test_error")
        val, val_sd = self.mean_std("val_error")
        first = self.seeds[0].result if self.seeds else self.trials[0].result
        if self.choose_seeds > 1:
            score = _choice_score(self.runs_of(self.chosen))
            on = f"mean val error {score:.2f}% over {self.choose_seeds} seeds"
        else:
            on = f"val error {first.val_error:.2f}% with seed {self.seeds[0].seed if self.seeds else '-'}"
        lines = [
            f"tune {self.out}: {len(self.settings)} settings, chosen on validation: "
            f"{setting_text(self.chosen) or '-'} ({on})",
            f"  over {len(self.seeds)} seeds: val error {val:.2f} ± {val_sd:.2f}%, "
            f"test error {test:.2f} ± {test_sd:.2f}%",
        ]
        pw = [t.result.min_p_w_student for t in self.seeds if t.result.min_p_w_student is not None]
        if pw:
            lines.append(f"  min p_w(student) at the cut: {min(pw):.6f}; forced exports: {self.forced_exports}")
        if self.failures:
            lines.append(f"  {self.failures} of the chosen setting's runs diverged and are left out of the mean")
        if self.at_edge:
            lines.append(f"  {_edge_text(self.at_edge, self.chosen)}")
        lines.append(f"  chosen spec: {self.out / 'chosen.yaml'}; table: {self.out / 'results.md'}")
        return lines


def _edge_text(edges: Mapping[str, str], chosen: Setting) -> str:
    where = ", ".join(f"{k.removeprefix('train.')}={_value_text(chosen[k])} is its {side} value"
                      for k, side in edges.items())  # fmt: skip
    return f"chosen at the edge of the grid ({where}): the best may lie beyond it, widen the grid there"


def seeds_text(choose_seeds: int, first_seed: int = 0) -> str:
    """``seed 0`` or ``seeds 0–2``: the seeds a tune chooses on (for its reports and the demo's table)."""
    last = first_seed + choose_seeds - 1
    return f"seed {first_seed}" if choose_seeds == 1 else f"seeds {first_seed}–{last}"


def _choice_score(runs: Sequence[Trial]) -> float | None:
    """The mean validation error of a setting's grid runs; None if any of them diverged or has none (so a
    setting that diverged with one seed of the choice is never chosen)."""
    values = [t.result.val_error for t in runs]
    if not runs or any(t.failed is not None for t in runs) or any(v is None for v in values):
        return None
    return statistics.fmean(v for v in values if v is not None)


def parse_grid(items: Sequence[str]) -> dict[str, list[Any]]:
    """``["train.lr=1e-3,1e-2", "train.lambda1.final=[10, 100]"]`` as ``{key: [values]}``.

    A value list is written ``V1,V2,...`` (each a YAML value) or as one YAML list.

    Raises:
        SpecError: an item is not ``KEY=V1,V2``, has no values, or lists a value twice.
    """
    grid: dict[str, list[Any]] = {}
    for item in items:
        where = f"--grid {short_repr(item)}"
        key, sep, text = item.partition("=")
        if not sep or not key or not all(key.split(".")):
            raise SpecError(f"{where} must look like KEY=V1,V2,..., e.g. --grid train.lr=1e-3,3e-3,1e-2")
        if key in grid:
            raise SpecError(f"{where}: {key} is given twice; list all its values in one --grid")
        whole = parse_yaml(text, where)
        values = whole if isinstance(whole, list) else [parse_yaml(v, where) for v in text.split(",")]
        # PyYAML reads 1e-3 (no dot) as text: a value that is a number is one
        values = [float(v) if isinstance(v, str) and _NUMBER.fullmatch(v) else v for v in values]
        grid[key] = _checked_values(key, values, where)
    return grid


def _checked_values(key: str, values: Sequence[Any], where: str) -> list[Any]:
    values = list(values)
    if not values or any(v is None or v == "" for v in values):
        raise SpecError(f"{where}: {key} needs at least one value and no empty ones, e.g. {key}=1e-3,1e-2")
    if len({json.dumps(v, sort_keys=True, default=str) for v in values}) != len(values):
        raise SpecError(f"{where}: {key} lists a value twice")
    return values


def setting_text(setting: Setting) -> str:
    """``lr=0.01 lambda1.final=10``: the setting, with ``train.`` dropped from its keys."""
    return " ".join(f"{k}={_value_text(v)}" for k, v in _short(setting).items())


def _short(setting: Setting) -> dict[str, Any]:
    """The setting with ``train.`` dropped from its keys (``lr``, ``lambda1.final``, ``data.train_size``)."""
    return {k.removeprefix("train."): v for k, v in setting.items()}


def _value_text(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def folder_name(setting: Setting) -> str:
    """The folder of a setting's runs under the tune's folder: ``lr=0.01_kd.alpha=0.9``."""
    name = "_".join(f"{k}={_value_text(v)}" for k, v in _short(setting).items()) or "spec"
    return re.sub(r"[^A-Za-z0-9._=+-]", "-", name)[:120]


def tune(
    spec: Spec | Mapping[str, Any] | str | Path,
    grid: Mapping[str, Sequence[Any]],
    out: str | Path,
    *,
    seeds: int = 3,
    choose_seeds: int = 1,
    overwrite: bool = False,
    splits: Any = None,
    label: str | None = None,
    plots: bool = True,
    log: Callable[[str], None] = print,
) -> TuneResult:
    """Train every setting of ``grid`` with the spec's seed, choose on validation, rerun the choice with ``seeds``.

    Args:
        spec: a supervised spec (``student``, ``data``, ``train``; teachers and sites as its method needs), as
            for :func:`graftnet.train`.
        grid: ``{dotted spec key: [values]}``, e.g. ``{"train.lr": [1e-3, 1e-2]}``; every combination is tried.
            An empty grid runs the spec as it is.
        out: the tune's folder; every run is a run folder under it.
        seeds: runs of the chosen setting, with seeds ``train.seed``, ``train.seed + 1``, ...
        choose_seeds: seeds every setting runs with before the choice, which goes to the lowest mean validation
            error over them (a setting that diverged with one of them is not chosen). 1 (the default) chooses on
            one run; more make the choice less of a lottery where the validation split is small. The chosen
            setting's runs then go on to ``max(seeds, choose_seeds)`` seeds.
        overwrite: start over where a run folder holds another spec's run (default: refuse).
        splits: data to use instead of building ``spec.data`` (shared by every run).
        label: the name of the chosen setting's runs in plots (default the method's name).
        plots: write ``plots/`` (needs matplotlib).
        log: where progress lines go.

    Returns:
        A :class:`TuneResult`.

    Raises:
        SpecError: a grid key is not a spec field or a value does not validate (named), the grid sets
            ``train.seed``, or the spec is not a supervised one with a validation split.
        GraftError: anything :func:`graftnet.train` raises.

    Examples:
        >>> r = tune("specs/mnist1d_knowledge_flow.yaml", {"train.lr": [3e-3, 1e-2]}, "runs/tune")  # doctest: +SKIP
        >>> r.chosen, r.mean_std("test_error")                                                       # doctest: +SKIP
    """
    base = load_spec(spec)
    if base.rl is not None:
        raise SpecError("graftnet tune chooses on the validation split of a supervised task; an RL spec has none")
    if base.train is None or base.data is None or base.student is None:
        raise SpecError("graftnet tune needs a spec with student, data and train sections")
    if seeds < 1:
        raise SpecError(f"seeds must be at least 1, got {seeds}")
    if choose_seeds < 1:
        raise SpecError(f"choose_seeds must be at least 1, got {choose_seeds}")
    if not base.data.val_size:
        raise SpecError("graftnet tune chooses on the validation split: set data.val_size above 0")
    checked = {k: _checked_values(k, v, f"grid {k}") for k, v in grid.items()}
    if "train.seed" in checked:
        raise SpecError("the grid may not set train.seed: tune runs the chosen setting with every seed itself")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise GraftError(f"tune folder {out} is a file: pass a folder")
    settings = [dict(zip(checked, values, strict=True)) for values in itertools.product(*checked.values())]
    folders = [folder_name(s) for s in settings]
    if len(set(folders)) != len(folders):
        twice = next(f for f in folders if folders.count(f) > 1)
        raise SpecError(f"two settings of the grid would share the run folder {twice!r}: give values that differ in "
                        "their first 120 letters or characters [A-Za-z0-9._=+-]")  # fmt: skip
    specs = [override_spec(base, s, {k: f"grid {k}={_value_text(v)}" for k, v in s.items()}) for s in settings]
    first_seed = base.train.seed
    name = label or base.train.label or base.train.method
    cache: dict[str, Any] = {}

    def run(setting: Setting, spec: Spec, seed: int, what: str) -> Trial:
        spec = override_spec(spec, {"train.seed": seed, "train.label": f"{name} {setting_text(setting)}".strip()})
        run_dir = out / folder_name(setting) / f"seed{seed}"
        data = splits if splits is not None else _splits(spec, cache)
        return _run(setting, seed, spec, run_dir, overwrite, data, log, what)

    choice_seeds = range(first_seed, first_seed + choose_seeds)
    log(f"graftnet tune → {out}: {len(settings)} setting(s) × {seeds_text(choose_seeds, first_seed)}, then "
        f"{max(seeds, choose_seeds)} seed(s) of the choice")  # fmt: skip
    runs = [[run(s, sp, seed, f"{setting_text(s) or 'spec'} seed {seed}") for seed in choice_seeds]
            for s, sp in zip(settings, specs, strict=True)]  # fmt: skip
    scores = [_choice_score(r) for r in runs]
    usable = [i for i, score in enumerate(scores) if score is not None]
    if not usable:
        reason = next((t.failed for r in runs for t in r if t.failed), None) or "none"
        raise GraftError(f"every setting of the grid failed or has no validation error ({reason}); "
                         "try smaller learning rates")  # fmt: skip
    best = min(usable, key=lambda i: scores[i])  # type: ignore[arg-type, return-value]
    chosen = settings[best]
    log(f"chosen on validation: {setting_text(chosen) or 'the spec as given'} "
        f"({'mean ' if choose_seeds > 1 else ''}val error {scores[best]:.2f}%)")  # fmt: skip
    trials = [t for r in runs for t in r]
    result = TuneResult(out, checked, trials, chosen, list(runs[best]), choose_seeds)
    for seed in range(first_seed + choose_seeds, first_seed + seeds):
        result.seeds.append(run(chosen, specs[best], seed, f"{setting_text(chosen) or 'spec'} seed {seed}"))
    _write(result, specs[best], plots, log)
    for line in result.summary():
        log(line)
    return result


def _splits(spec: Spec, cache: dict[str, Any]) -> Any:
    """Every run with the same data section shares one copy of the data (generating MNIST-1D takes seconds)."""
    from graftnet.data import task_splits

    assert spec.data is not None
    key = spec.data.model_dump_json()
    if key not in cache:
        cache[key] = task_splits(spec)
    return cache[key]


FAILED_NAME = "tune_failed.txt"


def _run(
    setting: Setting, seed: int, spec: Spec, run_dir: Path, overwrite: bool, splits: Any,
    log: Callable[[str], None], what: str,
) -> Trial:  # fmt: skip
    """A finished run is read back, an interrupted one resumed, a new one started. A run that diverges (a
    :class:`TrainingError`) is a failed trial, not the end of the tune; the reason is kept in the run folder."""
    try:
        differences = spec_differences(run_dir, spec) if (run_dir / SPEC_NAME).is_file() else None
    except (OSError, ValueError, GraftError) as e:  # a damaged spec.json: the folder holds no run of this spec
        differences = [f"unreadable: {e}"]
    if differences and not overwrite:
        raise GraftError(
            f"{run_dir} holds a run of another spec ({run_dir / SPEC_NAME}: {'; '.join(differences)}); tune with "
            "the same spec and grid to resume, or pass --overwrite to start those runs over"
        )
    same = differences == []
    assert spec.train is not None
    failed_file, done = run_dir / FAILED_NAME, run_dir / RESULTS_NAME
    if same and failed_file.is_file():
        reason = failed_file.read_text().strip()
        log(f"  {what}: failed before ({reason})")
        return Trial(setting, seed, RunResult(run_dir, spec.train.method), reason)
    if same and done.is_file():
        result = RunResult.read(done)
        log(f"  {what}: done before, val error {result.val_error:.2f}%")
        return Trial(setting, seed, result)
    t0 = time.perf_counter()
    try:
        result = train(spec, run_dir, resume=same, overwrite=not same, progress=False, tensorboard=False,
                       splits=splits)  # fmt: skip
    except TrainingError as e:
        failed_file.write_text(f"{e}\n")
        log(f"  {what}: failed: {e}")
        return Trial(setting, seed, RunResult(run_dir, spec.train.method), str(e))
    if result.interrupted:
        raise GraftError(f"{result.interrupted}: the tune stopped in {run_dir}; run the same command again to resume")
    log(f"  {what}: val error {result.val_error:.2f}%, {time.perf_counter() - t0:.1f} s")
    return Trial(setting, seed, result)


_COLUMNS = ("phase", "seed", "val_error", "test_error", "min_p_w_student", "forced_export", "failed", "run_dir")


def _write(result: TuneResult, chosen_spec: Spec, plots: bool, log: Callable[[str], None]) -> None:
    out = result.out
    keys = list(result.grid)
    rows = [("grid", t) for t in result.trials] + [("seeds", t) for t in result.seeds[result.choose_seeds:]]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow([*keys, *_COLUMNS])
    for phase, t in rows:
        r = t.result
        writer.writerow([*(_value_text(t.setting[k]) for k in keys), phase, t.seed, r.val_error, r.test_error,
                         r.min_p_w_student, r.forced_export, t.failed or "", r.run_dir])  # fmt: skip
    (out / "results.csv").write_text(buffer.getvalue())

    provenance = versions()
    stamp = f"`{command_line()}` — " + ", ".join(f"{k} {v}" for k, v in provenance.items())

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    on = seeds_text(result.choose_seeds, result.trials[0].seed)
    md = [f"# graftnet tune: {out}", "", stamp, "",
          f"Grid ({on}); chosen on validation error only"
          + (" (the mean over the seeds)" if result.choose_seeds > 1 else "") + ":", "",
          "| setting | val error (%) | min p_w(student) | |", "| --- | --- | --- | --- |"]  # fmt: skip
    for setting in result.settings:
        runs = result.runs_of(setting)
        failed = [t.seed for t in runs if t.failed]
        mark = "**chosen**" if setting == result.chosen else ""
        if failed:
            mark = "failed: diverged" + (f" (seed {', '.join(map(str, failed))})" if result.choose_seeds > 1 else "")
        vals = [t.result.val_error for t in runs if t.failed is None and t.result.val_error is not None]
        shown = pct(statistics.fmean(vals)) if vals else "-"
        if len(vals) > 1:
            shown += f" ± {statistics.stdev(vals):.2f}"
        pws = [t.result.min_p_w_student for t in runs if t.result.min_p_w_student is not None]
        pw = f"{min(pws):.4f}" if pws else "-"
        md.append(f"| {setting_text(setting) or 'spec'} | {shown} | {pw} | {mark} |")
    test, test_sd = result.mean_std("test_error")
    val, val_sd = result.mean_std("val_error")
    md += ["", f"Chosen setting over {len(result.seeds)} seeds (exported student alone):", "",
           "| seed | val error (%) | test error (%) | min p_w(student) | forced export |",
           "| --- | --- | --- | --- | --- |"]  # fmt: skip
    for t in result.seeds:
        pw = "-" if t.result.min_p_w_student is None else f"{t.result.min_p_w_student:.4f}"
        forced = "failed (diverged)" if t.failed else ("yes" if t.result.forced_export else "no")
        md.append(f"| {t.seed} | {pct(t.result.val_error)} | {pct(t.result.test_error)} | {pw} | {forced} |")
    md.append(f"| mean ± std | {val:.2f} ± {val_sd:.2f} | {test:.2f} ± {test_sd:.2f} | | |")
    if result.at_edge:
        md += ["", _edge_text(result.at_edge, result.chosen) + "."]
    if result.failures:
        md += ["", f"{result.failures} run(s) diverged and are left out of the mean (see {FAILED_NAME} in each)."]
    (out / "results.md").write_text("\n".join(md) + "\n")

    header = [f"Chosen by graftnet tune on validation: {setting_text(result.chosen) or 'the spec as given'}",
              f"  {command_line()}", "  " + ", ".join(f"{k} {v}" for k, v in provenance.items())]  # fmt: skip
    body = chosen_spec.model_dump(mode="json", exclude_defaults=True)
    body.get("train", {}).pop("seed", None)
    body.get("train", {}).pop("label", None)
    text = "".join(f"# {line}\n" for line in header) + yaml.safe_dump(body, sort_keys=False)
    (out / "chosen.yaml").write_text(text)
    payload = {
        "grid": result.grid, "chosen": result.chosen, "at_edge": result.at_edge, "choose_seeds": result.choose_seeds,
        "command": command_line(),
        "versions": provenance,
        "trials": [{"setting": t.setting, "seed": t.seed, "failed": t.failed, **t.result.to_json()}
                   for t in result.trials],
        "seeds": [{"setting": t.setting, "seed": t.seed, "failed": t.failed, **t.result.to_json()}
                  for t in result.seeds],
        "test_error": {"mean": test, "std": test_sd}, "val_error": {"mean": val, "std": val_sd},
    }  # fmt: skip
    (out / "tune.json").write_text(json.dumps(payload, indent=2, default=str))
    if plots:
        from graftnet.plot import plot_runs

        for path in plot_runs([t.result.run_dir for t in result.seeds if t.failed is None], out / "plots"):
            log(f"wrote {path}")
        finished = [t.result.run_dir for t in result.trials if t.failed is None]
        if len(finished) > 1:
            for path in plot_runs(finished, out / "plots" / "grid"):
                log(f"wrote {path}")
