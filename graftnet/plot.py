"""Plots of training runs: accuracy or return curves, and p_w per site over training (the paper's Fig. 1c).

A run folder is what ``graftnet train`` writes: ``metrics.csv`` (one row per epoch, or for reinforcement
learning one row per logging interval of frames; knowledge-flow runs add one ``p_w/<site>/<candidate>`` column
per site and candidate) and optionally ``run.json`` with a ``label``. Runs that share a label are the seeds of
one setting and are drawn as their mean with a ±1 std band.
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

import numpy as np
import numpy.typing as npt

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


@dataclass(frozen=True)
class _Group:
    """Runs that share a label (seeds of one setting): drawn as one mean curve with a ±1 std band."""

    label: str
    runs: list[_Run]

    @property
    def name(self) -> str:
        """The legend entry: the label and how many seeds are averaged."""
        n = len(self.runs)
        return f"{self.label} ({n} seed{'s' if n != 1 else ''})"

    def cut(self) -> float | None:
        """Where the teachers were cut: the mean over the group's runs that cut them, or None if none did."""
        cuts = [c for c in (run.cut_epoch() for run in self.runs) if c is not None]
        return sum(cuts) / len(cuts) if cuts else None


def _groups(runs: list[_Run]) -> list[_Group]:
    """Runs by label, in first-seen order."""
    by_label: dict[str, list[_Run]] = {}
    for run in runs:
        by_label.setdefault(run.label, []).append(run)
    return [_Group(label, members) for label, members in by_label.items()]


def _ema(values: Sequence[float], weight: float) -> list[float]:
    """TensorBoard's smoothing: a debiased exponential moving average of ``values`` with ``weight`` in [0, 1).

    ``s_n = (Σ_k w^(n−k) y_k) / (Σ_k w^(n−k))`` over the finite values so far, so the first value is kept as is
    and is not over-weighted; a NaN or inf stays where it is and does not enter the average; ``weight`` 0
    returns the values unchanged.
    """
    out: list[float] = []
    last, count = 0.0, 0
    for v in values:
        if weight == 0 or not math.isfinite(v):
            out.append(v)
            continue
        last = last * weight + (1 - weight) * v
        count += 1
        out.append(last / (1 - weight**count))
    return out


def _band(
    xs_list: Sequence[Sequence[float]], ys_list: Sequence[Sequence[float]]
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64] | None]:
    """Mean and sample standard deviation over runs of y against x, on one grid of x values.

    Per run, points where x or y is not finite are dropped and the rest sorted by x (a repeated x keeps its
    last row). The grid is the union of the runs' x values inside the range that every run covers (a run
    stopped early ends the band there); each run is linearly interpolated onto it with ``np.interp``, so RL
    seeds that log at slightly different frame counts line up. Runs without a finite point are left out.

    Returns:
        ``(x, mean, std)``; ``std`` (``ddof=1``) is None when fewer than two runs remain. All empty when no
        run has a point or the runs' ranges do not overlap.
    """
    curves = []
    for xs, ys in zip(xs_list, ys_list, strict=True):
        x, y = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
        keep = np.isfinite(x) & np.isfinite(y)
        x, y = x[keep][::-1], y[keep][::-1]  # reversed: np.unique's first index is then the last row
        if x.size:
            x, first = np.unique(x, return_index=True)
            curves.append((x, y[first]))
    empty = np.empty(0, dtype=np.float64)
    if not curves:
        return empty, empty, None
    lo, hi = max(x[0] for x, _ in curves), min(x[-1] for x, _ in curves)
    grid = np.unique(np.concatenate([x for x, _ in curves]))
    grid = grid[(grid >= lo) & (grid <= hi)]
    if not grid.size:
        return empty, empty, None
    on_grid = np.stack([np.interp(grid, x, y) for x, y in curves])
    return grid, on_grid.mean(axis=0), on_grid.std(axis=0, ddof=1) if len(curves) > 1 else None


def _draw(
    ax: Axes, xs_list: Sequence[Sequence[float]], ys_list: Sequence[Sequence[float]], scale: float, color: str,
    shade: float = 0.2, **style: Any,
) -> None:  # fmt: skip
    """Plot the mean of the runs' curves with a shaded ±1 std band (when there are two or more)."""
    x, mean, std = _band(xs_list, ys_list)
    if not x.size:
        return
    if x.size == 1:
        style.setdefault("marker", "o")  # one point draws no line
    ax.plot(x / scale, mean, color=color, **style)
    if std is not None and shade:
        ax.fill_between(x / scale, mean - std, mean + std, color=color, alpha=shade, linewidth=0)


def _x_axis(runs: list[_Run]) -> tuple[float, str]:
    """The divisor and label of the x axis: epochs as they are; frames in millions, or thousands below 1e6."""
    if runs[0].x == "epoch":
        return 1.0, "epoch"
    top = max((v for run in runs for v in run.m["frames"] if math.isfinite(v)), default=0.0)
    return (1e6, "frames (millions)") if top >= 1e6 else (1e3, "frames (thousands)")


def _format_axes(ax: Axes, x: str) -> None:
    """Integer ticks on an epoch axis; plain tick labels (no offset, no ×1e6) on both axes; a light grid."""
    from matplotlib.ticker import MaxNLocator

    if x == "epoch":
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.ticklabel_format(axis="both", style="plain", useOffset=False)
    ax.grid(alpha=0.3)


_CUT_STYLE: dict[str, Any] = {"linestyle": (0, (1, 1.5)), "linewidth": 1.6}


def _mark_cut(ax: Axes, group: _Group, color: str, scale: float) -> bool:
    """A vertical line, in the group's colour, where its teachers were cut; True if there is one."""
    cut = group.cut()
    if cut is not None:
        ax.axvline(cut / scale, color=color, label=f"teachers cut ({group.label})", **_CUT_STYLE)
    return cut is not None


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


def _subtitle(groups: list[_Group], smooth: float) -> str:
    """A second title line saying what a curve is: a mean over seeds, smoothed."""
    parts = ["mean ± 1 std over seeds"] if any(len(g.runs) > 1 for g in groups) else []
    parts += [f"smoothed: EMA {smooth:g}"] if smooth else []
    return "\n" + ", ".join(parts) if parts else ""


def _curves_figure(groups: list[_Group], colors: list[str], smooth: float) -> Figure:
    """accuracy.png (validation solid, training dashed, per epoch) or returns.png (mean return against frames)."""
    from matplotlib.lines import Line2D

    runs = [run for g in groups for run in g.runs]
    x, (scale, xlabel) = runs[0].x, _x_axis(runs)
    rl = x == "frames"
    fig = _figure(8.5, 4.5)
    ax = fig.add_subplot()
    cut = False
    for g, color in zip(groups, colors, strict=True):
        xs = [run.m[x] for run in g.runs]
        if rl:
            _draw(ax, xs, [_ema(r.m["return_mean"], smooth) for r in g.runs], scale, color)
        else:
            _draw(ax, xs, [_ema(r.m["val_acc"], smooth) for r in g.runs], scale, color)
            _draw(ax, xs, [_ema(r.m["train_acc"], smooth) for r in g.runs], scale, color, 0.08, linestyle="--")
        cut |= _mark_cut(ax, g, color, scale)
    title = "mean return of the training episodes" if rl else "validation and training accuracy"
    ax.set(xlabel=xlabel, ylabel="mean episodic return" if rl else "accuracy", title=title + _subtitle(groups, smooth))
    _format_axes(ax, x)
    handles = [Line2D([], [], color=color, label=g.name) for g, color in zip(groups, colors, strict=True)]
    # Grey key lines: colours are groups, line styles are what is measured.
    keys: list[tuple[str, dict[str, Any]]] = [("validation", {"linestyle": "-"}), ("training", {"linestyle": "--"})]
    keys = [] if rl else keys
    keys += [("teachers cut", _CUT_STYLE)] if cut else []
    handles += [Line2D([], [], color="grey", label=name, **style) for name, style in keys]
    fig.legend(handles=handles, loc="outside right upper", fontsize="small")
    return fig


def _p_w_figure(groups: list[_Group], colors: list[str]) -> Figure:
    """p_w.png: a panel of the mean over sites, then one per site; colours are groups, styles candidates."""
    from matplotlib.lines import Line2D

    runs = [run for g in groups for run in g.runs]
    x, (scale, xlabel) = runs[0].x, _x_axis(runs)
    sites = list(dict.fromkeys(site for run in runs for site in run.p_w))
    teachers = list(dict.fromkeys(c.split(":", 1)[0] for r in runs for cs in r.p_w.values() for c in cs))
    ncols = min(3, len(sites) + 1)
    nrows = math.ceil((len(sites) + 1) / ncols)
    fig = _figure(5.2 * ncols, 3.2 * nrows + 0.5)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    shown = [v for run in runs if run.p_w for v in run.m[x] if math.isfinite(v)]  # the same x range in every panel
    low, top = min(shown, default=0.0), max(shown, default=1.0)

    def style(candidate: str, taps: list[str]) -> dict[str, Any]:
        if candidate == _STUDENT:
            return {"linestyle": "-"}
        teacher = candidate.split(":", 1)[0]
        # Line style tells the teacher apart; a marker tells apart the taps one teacher has at one site.
        mine = [t for t in taps if t.split(":", 1)[0] == teacher]
        i = mine.index(candidate) if candidate in mine else 0
        return {"linestyle": _TEACHER_STYLES[teachers.index(teacher) % len(_TEACHER_STYLES)],
                "marker": _TAP_MARKERS[i % len(_TAP_MARKERS)], "markevery": 0.1, "markersize": 4}  # fmt: skip

    # Per panel, per group: (run, candidate → p_w per row) for the group's runs that have the panel's curves.
    panels: list[tuple[str, list[list[tuple[_Run, dict[str, list[float]]]]]]] = [
        ("average over sites", [[(r, _teacher_totals(r)) for r in g.runs if r.p_w] for g in groups])
    ]
    panels += [(site, [[(r, r.p_w[site]) for r in g.runs if site in r.p_w] for g in groups]) for site in sites]
    for ax, (title, by_group) in zip(axes, panels, strict=False):
        keys = list(dict.fromkeys(c for members in by_group for _, curves in members for c in curves))
        for g, color, members in zip(groups, colors, by_group, strict=True):
            for candidate in keys:
                having = [(r, curves[candidate]) for r, curves in members if candidate in curves]
                if having:
                    xs, ys = [r.m[x] for r, _ in having], [values for _, values in having]
                    _draw(ax, xs, ys, scale, color, 0.12, **style(candidate, keys))
            if members:
                _mark_cut(ax, g, color, scale)
        # Black key lines beside the panel: colours are groups, styles are candidates.
        handles = [Line2D([], [], color="k", label=c, **style(c, keys)) for c in keys]
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0,
                  fontsize="x-small", title="summed per teacher" if ax is axes[0] else "candidate",
                  title_fontsize="x-small")  # fmt: skip
        ax.set(title=title, xlabel=xlabel, ylabel="p_w", xlim=(low / scale, top / scale) if top > low else None)
        ax.title.set_fontsize("medium")
        ax.set_ylim(-0.02, 1.02)  # a hair past [0, 1] so p_w = 0 or 1 is not hidden by the frame
        _format_axes(ax, x)
    for ax in axes[len(panels) :]:
        ax.remove()
    with_p_w = [g for g in groups if any(r.p_w for r in g.runs)]
    fig.suptitle("p_w per site over training" + _subtitle(with_p_w, 0.0))
    # Colours match accuracy.png; groups without p_w (scratch, kd …) draw nothing here and are left out.
    pairs = [(g, color) for g, color in zip(groups, colors, strict=True) if any(r.p_w for r in g.runs)]
    group_handles = [Line2D([], [], color=color, label=g.name) for g, color in pairs]
    if any(g.cut() is not None for g, _ in pairs):
        group_handles.append(Line2D([], [], color="grey", label="teachers cut", **_CUT_STYLE))
    fig.legend(handles=group_handles, loc="outside lower center", ncols=min(len(group_handles), 4), fontsize="small")
    return fig


def plot_runs(runs: Sequence[str | Path], out_dir: str | Path, *, smooth: float = 0.0) -> list[Path]:
    """Draw ``accuracy.png`` (``returns.png`` for RL runs) and, for knowledge-flow runs, ``p_w.png`` into ``out_dir``.

    Runs with the same label are one group (the seeds of one setting; give them one ``train.label``): each
    group is one colour, drawn as the mean over its runs with a shaded ±1 standard deviation band (sample std,
    from two runs on). Runs of a group are aligned on their x values (epochs, or frames for RL, interpolated
    onto a common grid) and averaged where all of them have data, so a seed stopped early ends the band; the
    legend says how many seeds a group has. A vertical dotted line in the group's colour marks where its
    teachers were cut (the mean over its seeds if they differ), with a "teachers cut" key.

    ``accuracy.png`` shows validation (solid) and training (dashed) accuracy per epoch; ``returns.png`` the
    mean return of the training episodes against frames (in thousands or millions). ``p_w.png`` has one panel
    per site (in first-seen order over the runs) with p_w of the student (solid) and of each teacher candidate
    (a dash style per teacher, a marker per tap), led by a panel of the mean over sites of p_w(student) and of
    each teacher's summed p_w — the paper's Fig. 1c. Legends sit outside the axes; epoch axes have integer
    ticks.

    Args:
        runs: run folders written by ``graftnet train``; a run's label is ``run.json``'s ``label`` or its
            folder name.
        out_dir: where the PNGs go; created if needed. Existing PNGs of the same names are replaced.
        smooth: weight in [0, 1) of an exponential moving average (TensorBoard's smoothing slider; 0: none)
            applied to each run's accuracy or return curve before the group's mean and std are taken. p_w is
            drawn as logged.

    Returns:
        The paths written, ``accuracy.png`` (or ``returns.png``) first.

    Raises:
        GraftError: ``runs`` is empty, ``smooth`` is not in [0, 1), supervised and RL runs are mixed, or
            matplotlib is not installed.
        TrainingError: a run folder or its ``metrics.csv`` is missing or malformed.

    Examples:
        >>> plot_runs(["runs/kf_s0", "runs/kf_s1", "runs/scratch"], "plots", smooth=0.6)  # doctest: +SKIP
        [PosixPath('plots/accuracy.png'), PosixPath('plots/p_w.png')]
    """
    if isinstance(runs, str | Path):
        runs = [runs]
    if not runs:
        raise GraftError("plot_runs() got no runs: pass one or more run folders written by `graftnet train`")
    _check_smooth(smooth)
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        raise GraftError("plotting needs matplotlib: pip install matplotlib") from e
    figures = _figures(runs, smooth)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise GraftError(f"out_dir {out} is a file: pass a folder for the plots")
    out.mkdir(parents=True, exist_ok=True)
    return [_save(fig, out / name) for name, fig in figures.items()]


def _check_smooth(smooth: object) -> None:
    if isinstance(smooth, bool) or not isinstance(smooth, int | float) or not 0 <= smooth < 1:
        raise GraftError(
            f"smooth={smooth!r}: the smoothing weight must be a number in [0, 1) (0: no smoothing, 0.6: "
            "TensorBoard's default, closer to 1: smoother)"
        )


def _figures(runs: Sequence[str | Path], smooth: float = 0.0) -> dict[str, Figure]:
    """The figures :func:`plot_runs` saves, by file name, ``accuracy.png`` or ``returns.png`` first."""
    loaded = [_load(run) for run in runs]
    if len({run.x for run in loaded}) > 1:
        raise GraftError("plot_runs() got supervised and reinforcement-learning runs together: plot them separately")
    groups = _groups(loaded)
    colors = [f"C{i % 10}" for i in range(len(groups))]
    name = "returns.png" if loaded[0].x == "frames" else "accuracy.png"
    figures = {name: _curves_figure(groups, colors, float(smooth))}
    if any(run.p_w for run in loaded):
        figures["p_w.png"] = _p_w_figure(groups, colors)
    return figures
