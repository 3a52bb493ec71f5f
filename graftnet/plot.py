"""Plots of training runs: accuracy or return curves, and p_w per site over training (the paper's Fig. 1c).

A run folder is what ``graftnet train`` writes: ``metrics.csv`` (one row per epoch, or for reinforcement
learning one row per logging interval of frames; knowledge-flow runs add one ``p_w/<site>/<candidate>`` column
per site and candidate) and optionally ``run.json`` with a ``label``.
Figures are drawn on ``matplotlib.figure.Figure`` with the Agg canvas, so pyplot's global state and the
user's interactive backend are left alone.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from graftnet.checkpoint import atomic_write
from graftnet.errors import GraftError, TrainingError

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["METRICS_COLUMNS", "RL_METRICS_COLUMNS", "plot_runs", "read_metrics"]

METRICS_COLUMNS = (
    "epoch", "step", "lr", "lambda1", "loss", "task_loss", "dep_loss", "kl_loss", "kd_loss",
    "train_acc", "val_loss", "val_acc", "teachers_cut", "seconds",
)  # fmt: skip
RL_METRICS_COLUMNS = ("frames", "step", "seconds", "steps_per_s", "return_mean", "episodes", "lambda1", "teachers_cut")
_P_W = "p_w/"
_STUDENT = "student"
_TEACHER_STYLES = ("--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)))
_TAP_MARKERS = ("o", "s", "^", "v", "D", "x")


def read_metrics(run: str | Path) -> dict[str, list[float]]:
    """Read a run's ``metrics.csv`` into columns, in file order; an empty cell reads as NaN.

    Args:
        run: the run folder, or its ``metrics.csv`` itself.

    Raises:
        TrainingError: the folder or file is missing, it has no data rows, lacks a required column
            (:data:`METRICS_COLUMNS`), or holds a cell that is not a number.

    Examples:
        >>> m = read_metrics("runs/kf-cifar10")              # doctest: +SKIP
        >>> m["val_acc"][-1], [c for c in m if c.startswith("p_w/")][:1]  # doctest: +SKIP
        (0.71, ['p_w/features.act1/student'])
    """
    path = Path(run)
    if path.is_dir():
        path = path / "metrics.csv"
    elif not path.exists():
        raise TrainingError(f"run folder {path} does not exist: pass a folder that `graftnet train` wrote")
    if not path.is_file():
        raise TrainingError(f"{path} is missing: `graftnet train` writes it into the run folder after each epoch")
    with open(path, newline="") as f:
        rows = [row for row in csv.reader(f) if row]
    header = [name.strip() for name in rows[0]] if rows else []
    required = RL_METRICS_COLUMNS if "frames" in header else METRICS_COLUMNS
    missing = [c for c in required if c not in header]
    if missing:
        raise TrainingError(
            f"{path} lacks the column(s) {', '.join(missing)}: a metrics.csv from `graftnet train` starts with "
            f"{','.join(required)}"
        )
    if len(rows) < 2:
        raise TrainingError(f"{path} has a header but no data rows: plot the run after its first epoch")
    columns: dict[str, list[float]] = {name: [] for name in header}
    for line, row in enumerate(rows[1:], start=2):
        # A short row is an epoch still being written: its missing cells read as NaN.
        cells = [c.strip() for c in row] + [""] * (len(header) - len(row))
        for name, cell in zip(header, cells, strict=False):
            try:
                columns[name].append(float(cell) if cell else math.nan)
            except ValueError as e:
                raise TrainingError(f"{path}, line {line}, column {name!r}: {cell!r} is not a number") from e
    return columns


@dataclass(frozen=True)
class _Run:
    label: str
    m: dict[str, list[float]]
    p_w: dict[str, dict[str, list[float]]]  # site → candidate → p_w per row

    @property
    def x(self) -> str:
        """The training-time axis: epochs, or frames for a reinforcement-learning run."""
        return "frames" if "frames" in self.m else "epoch"

    def cut_epoch(self) -> float | None:
        """The first epoch (or frame count) at which ``teachers_cut`` turns from 0 to 1, if it does."""
        cut, epochs = self.m["teachers_cut"], self.m[self.x]
        return next((epochs[i] for i in range(1, len(cut)) if cut[i] == 1 and cut[i - 1] == 0), None)


def _load(run: str | Path) -> _Run:
    m = read_metrics(run)
    folder = Path(run) if Path(run).is_dir() else Path(run).parent
    label = folder.resolve().name
    info = folder / "run.json"
    if info.is_file():
        try:
            label = str(json.loads(info.read_text()).get("label") or label)
        except (json.JSONDecodeError, AttributeError) as e:
            raise TrainingError(f"{info} is not a JSON object: fix or delete it (it only names the run)") from e
    p_w: dict[str, dict[str, list[float]]] = {}
    for name, values in m.items():
        if name.startswith(_P_W):
            site, _, candidate = name[len(_P_W) :].partition("/")
            if not site or not candidate:
                raise TrainingError(f"{folder / 'metrics.csv'}: column {name!r} is not p_w/<site>/<candidate>")
            p_w.setdefault(site, {})[candidate] = values
    return _Run(label, m, p_w)


def _mark_cut(ax: Axes, run: _Run, color: str) -> None:
    epoch = run.cut_epoch()
    if epoch is not None:
        ax.axvline(epoch, color=color, linestyle=":", linewidth=1)


def _teacher_totals(run: _Run) -> dict[str, list[float]]:
    """Mean over the run's sites of p_w(student) and of each teacher's summed p_w (0 where it has no tap)."""
    n, sites = len(run.m[run.x]), list(run.p_w.values())
    totals: dict[str, list[float]] = {_STUDENT: [0.0] * n}
    for candidates in sites:
        for candidate, values in candidates.items():
            teacher = candidate.split(":", 1)[0]
            sums = totals.setdefault(teacher, [0.0] * n)
            for i, v in enumerate(values):
                sums[i] += v / len(sites)
    return totals


def _figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> Path:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    return path


def _accuracy(runs: list[_Run], colors: list[str], path: Path) -> Path:
    fig = _figure(7, 4.5)
    ax = fig.add_subplot()
    for run, color in zip(runs, colors, strict=True):
        ax.plot(run.m["epoch"], run.m["val_acc"], color=color, label=run.label)
        ax.plot(run.m["epoch"], run.m["train_acc"], color=color, linestyle="--")
        _mark_cut(ax, run, color)
    ax.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    ax.grid(alpha=0.3)
    keys = [("validation", "-"), ("training", "--")]
    keys += [("teachers cut", ":")] if any(run.cut_epoch() is not None for run in runs) else []
    for name, linestyle in keys:  # grey key lines: colours are runs, styles are what is measured
        ax.plot([], [], color="grey", linestyle=linestyle, label=name)
    ax.legend(fontsize="small")
    return _save(fig, path)


def _returns(runs: list[_Run], colors: list[str], path: Path) -> Path:
    fig = _figure(7, 4.5)
    ax = fig.add_subplot()
    for run, color in zip(runs, colors, strict=True):
        ax.plot(run.m["frames"], run.m["return_mean"], color=color, label=run.label)
        _mark_cut(ax, run, color)
    ax.set(xlabel="frames", ylabel="mean episodic return", title="return of training episodes")
    ax.grid(alpha=0.3)
    if any(run.cut_epoch() is not None for run in runs):
        ax.plot([], [], color="grey", linestyle=":", label="teachers cut")
    ax.legend(fontsize="small")
    return _save(fig, path)


def _p_w(runs: list[_Run], colors: list[str], path: Path) -> Path:
    from matplotlib.lines import Line2D

    sites = list(dict.fromkeys(site for run in runs for site in run.p_w))
    teachers = list(dict.fromkeys(c.split(":", 1)[0] for r in runs for cs in r.p_w.values() for c in cs))
    ncols = min(4, len(sites) + 1)
    nrows = math.ceil((len(sites) + 1) / ncols)
    fig = _figure(3.6 * ncols, 2.6 * nrows + 0.6)
    axes = fig.subplots(nrows, ncols, sharex=True, sharey=True, squeeze=False).ravel()

    def style(candidate: str, taps: list[str]) -> dict[str, Any]:
        if candidate == _STUDENT:
            return {"linestyle": "-"}
        teacher = candidate.split(":", 1)[0]
        # Line style tells the teacher apart; a marker tells apart the taps one teacher has at one site.
        mine = [t for t in taps if t.split(":", 1)[0] == teacher]
        i = mine.index(candidate) if candidate in mine else 0
        return {"linestyle": _TEACHER_STYLES[teachers.index(teacher) % len(_TEACHER_STYLES)],
                "marker": _TAP_MARKERS[i % len(_TAP_MARKERS)], "markevery": 0.1, "markersize": 4}  # fmt: skip

    # Per panel, per run (by position: labels may repeat): candidate → p_w per epoch.
    panels = [("average over sites", [_teacher_totals(r) if r.p_w else {} for r in runs])]
    panels += [(site, [r.p_w.get(site, {}) for r in runs]) for site in sites]
    for ax, (title, by_run) in zip(axes, panels, strict=False):
        for run, color, curves in zip(runs, colors, by_run, strict=True):
            for candidate, values in curves.items():
                ax.plot(run.m[run.x], values, color=color, **style(candidate, list(curves)))
            if curves:
                _mark_cut(ax, run, color)
        keys = list(dict.fromkeys(c for curves in by_run for c in curves))
        for candidate in keys:  # black key lines: colours are runs, styles are candidates
            ax.plot([], [], color="k", label=candidate, **style(candidate, keys))
        ax.legend(fontsize="x-small", loc="best")
        ax.set_title(title, fontsize="medium")
        ax.set_ylim(-0.02, 1.02)  # a hair past [0, 1] so p_w = 0 or 1 is not hidden by the frame
        ax.grid(alpha=0.3)
    for i, ax in enumerate(axes[len(panels) :], start=len(panels)):
        axes[i - ncols].xaxis.set_tick_params(labelbottom=True)  # the panel above loses its shared x labels
        ax.remove()
    fig.supxlabel(runs[0].x)
    fig.supylabel("p_w")
    # Colours match accuracy.png; runs without p_w (scratch, kd …) draw nothing here and are left out.
    pairs = [(run, color) for run, color in zip(runs, colors, strict=True) if run.p_w]
    handles = [Line2D([], [], color=color, label=run.label) for run, color in pairs]
    fig.legend(handles=handles, loc="outside upper center", ncols=min(len(handles), 5), fontsize="small")
    return _save(fig, path)


def plot_runs(runs: Sequence[str | Path], out_dir: str | Path) -> list[Path]:
    """Draw ``accuracy.png`` (``returns.png`` for RL runs) and, for knowledge-flow runs, ``p_w.png`` into ``out_dir``.

    ``accuracy.png`` shows validation (solid) and training (dashed) accuracy per epoch, one colour per run,
    with a dotted line where the teachers were cut; ``returns.png`` the mean return of the training episodes
    against frames. ``p_w.png`` has one panel per site (in first-seen order
    over the runs) with p_w of the student and of each teacher candidate, led by a panel of the mean over
    sites of p_w(student) and of each teacher's summed p_w — the paper's Fig. 1c.

    Args:
        runs: run folders written by ``graftnet train``; a run's label is ``run.json``'s ``label`` or its
            folder name.
        out_dir: where the PNGs go; created if needed. Existing PNGs of the same names are replaced.

    Returns:
        The paths written, ``accuracy.png`` first.

    Raises:
        GraftError: ``runs`` is empty, or matplotlib is not installed.
        TrainingError: a run folder or its ``metrics.csv`` is missing or malformed.

    Examples:
        >>> plot_runs(["runs/kf", "runs/scratch"], "plots")    # doctest: +SKIP
        [PosixPath('plots/accuracy.png'), PosixPath('plots/p_w.png')]
    """
    if isinstance(runs, str | Path):
        runs = [runs]
    if not runs:
        raise GraftError("plot_runs() got no runs: pass one or more run folders written by `graftnet train`")
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        raise GraftError("plotting needs matplotlib: pip install matplotlib") from e
    loaded = [_load(run) for run in runs]
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise GraftError(f"out_dir {out} is a file: pass a folder for the plots")
    out.mkdir(parents=True, exist_ok=True)
    colors = [f"C{i % 10}" for i in range(len(loaded))]
    kinds = {run.x for run in loaded}
    if len(kinds) > 1:
        raise GraftError("plot_runs() got supervised and reinforcement-learning runs together: plot them separately")
    if kinds == {"frames"}:
        written = [_returns(loaded, colors, out / "returns.png")]
    else:
        written = [_accuracy(loaded, colors, out / "accuracy.png")]
    if any(run.p_w for run in loaded):
        written.append(_p_w(loaded, colors, out / "p_w.png"))
    return written
