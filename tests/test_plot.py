"""graftnet.plot: accuracy, return and p_w figures from run folders (seeds averaged into bands, smoothing, axes and
legends), the CLI's ``plot``, and errors for folders it cannot read."""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from matplotlib.collections import PolyCollection
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from PIL import Image

import graftnet.plot
from graftnet.cli import main
from graftnet.errors import GraftError, TrainingError
from graftnet.plot import (
    METRICS_COLUMNS,
    RL_METRICS_COLUMNS,
    _band,
    _ema,
    _figures,
    _load,
    _teacher_totals,
    plot_runs,
    read_metrics,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
KF_SITES = {  # site → candidates: two teachers, "related" with two taps at the second site
    "features.act1": ["student", "related:features.act1", "other:layer1.0.act1"],
    "layer1.1.act2": ["student", "related:features.act2", "related:features.act3", "other:layer1.1.act2"],
}


def write_run(
    root: Path,
    name: str,
    *,
    epochs: int = 6,
    p_w: bool = False,
    cut_at: int | None = None,
    label: str | None = None,
    sites: dict[str, list[str]] = KF_SITES,
    val: Sequence[float] | None = None,
    train: Sequence[float] | None = None,
) -> Path:
    run = root / name
    run.mkdir()
    p_w_columns = [f"p_w/{site}/{c}" for site, cands in sites.items() for c in cands] if p_w else []
    rows = []
    for e in range(epochs):
        row = {c: f"{0.1 * e:.3f}" for c in METRICS_COLUMNS}
        row.update(epoch=str(e), kd_loss="", teachers_cut=str(int(cut_at is not None and e >= cut_at)))
        if val is not None:
            row["val_acc"] = str(val[e])
        if train is not None:
            row["train_acc"] = str(train[e])
        for site, cands in sites.items() if p_w else ():
            student = min(1.0, 0.2 + 0.2 * e)
            row[f"p_w/{site}/student"] = str(student)
            for c in cands[1:]:
                row[f"p_w/{site}/{c}"] = str((1 - student) / (len(cands) - 1))
        rows.append(row)
    with open(run / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*METRICS_COLUMNS, *p_w_columns])
        writer.writeheader()
        writer.writerows(rows)
    (run / "run.json").write_text(
        json.dumps({"method": "kf" if p_w else "scratch", **({"label": label} if label else {})})
    )
    return run


def assert_png(path: Path) -> None:
    assert path.is_file() and path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.width > 100 and image.height > 100


def test_plots_knowledge_flow_and_scratch_runs(tmp_path: Path) -> None:
    kf = write_run(tmp_path, "kf", p_w=True, cut_at=4, label="knowledge flow")
    scratch = write_run(tmp_path, "scratch")
    written = plot_runs([kf, str(scratch)], tmp_path / "plots" / "nested")
    assert written == [tmp_path / "plots" / "nested" / "accuracy.png", tmp_path / "plots" / "nested" / "p_w.png"]
    for path in written:
        assert_png(path)
    # Two sites + the average panel lie in one row; more sites would wrap into a grid.
    with Image.open(written[1]) as p_w_image, Image.open(written[0]) as accuracy:
        assert p_w_image.width > accuracy.width


def test_no_p_w_plot_without_p_w_columns(tmp_path: Path) -> None:
    written = plot_runs([write_run(tmp_path, "a"), write_run(tmp_path, "b")], tmp_path / "out")
    assert [p.name for p in written] == ["accuracy.png"]
    assert_png(written[0])
    assert not (tmp_path / "out" / "p_w.png").exists()


def test_many_sites_fill_a_grid(tmp_path: Path) -> None:
    sites = {f"blocks.{i}.act": ["student", f"t:blocks.{i}.act"] for i in range(6)}
    run = write_run(tmp_path, "kf", epochs=3, p_w=True, sites=sites)
    (run / "run.json").unlink()  # the label falls back to the folder name
    assert_png(plot_runs([run], tmp_path / "out")[1])


def test_average_panel_sums_each_teachers_taps_and_means_over_sites(tmp_path: Path) -> None:
    run = _load(write_run(tmp_path, "kf", epochs=2, p_w=True, cut_at=1, label="kf"))
    assert run.label == "kf" and run.cut_epoch() == 1.0 and list(run.p_w) == list(KF_SITES)
    totals = _teacher_totals(run)
    assert list(totals) == ["student", "related", "other"]
    # epoch 0: student 0.2 at both sites; related 0.4 at the first, 2 × 0.8/3 at the second; other 0.4, 0.8/3.
    assert totals["student"] == pytest.approx([0.2, 0.4])
    assert totals["related"][0] == pytest.approx((0.4 + 1.6 / 3) / 2)
    assert totals["other"][0] == pytest.approx((0.4 + 0.8 / 3) / 2)
    assert [sum(v[i] for v in totals.values()) for i in range(2)] == pytest.approx([1.0, 1.0])
    assert _load(write_run(tmp_path, "scratch", cut_at=0)).cut_epoch() is None  # cut from the start: no switch


def test_read_metrics_reads_empty_cells_as_nan(tmp_path: Path) -> None:
    m = read_metrics(write_run(tmp_path, "kf", epochs=3, p_w=True, cut_at=2))
    assert list(m)[: len(METRICS_COLUMNS)] == list(METRICS_COLUMNS)
    assert all(math.isnan(v) for v in m["kd_loss"])
    assert m["epoch"] == [0.0, 1.0, 2.0] and m["teachers_cut"] == [0.0, 0.0, 1.0]
    assert m["p_w/layer1.1.act2/student"] == pytest.approx([0.2, 0.4, 0.6])
    assert repr(read_metrics(tmp_path / "kf" / "metrics.csv")) == repr(m)  # the file itself reads the same


def test_missing_run_folder(tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match=r"run folder .*nope does not exist"):
        plot_runs([tmp_path / "nope"], tmp_path / "out")


def test_missing_metrics_file(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    with pytest.raises(TrainingError, match=r"metrics\.csv is missing: `graftnet train` writes it"):
        plot_runs([tmp_path / "run"], tmp_path / "out")


def test_metrics_without_data_rows(tmp_path: Path) -> None:
    run = write_run(tmp_path, "run", epochs=0)
    with pytest.raises(TrainingError, match="no data rows"):
        plot_runs([run], tmp_path / "out")
    (run / "metrics.csv").write_text("")
    with pytest.raises(TrainingError, match="lacks the column"):
        read_metrics(run)


def test_metrics_missing_required_columns_are_named(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    kept = [c for c in METRICS_COLUMNS if c not in ("val_acc", "teachers_cut")]
    (run / "metrics.csv").write_text(",".join(kept) + "\n" + ",".join("1" for _ in kept) + "\n")
    with pytest.raises(TrainingError, match=r"lacks the column\(s\) val_acc, teachers_cut:"):
        plot_runs([run], tmp_path / "out")


def test_non_numeric_cell_names_line_and_column(tmp_path: Path) -> None:
    run = write_run(tmp_path, "run", epochs=2)
    text = (run / "metrics.csv").read_text().splitlines()
    text[2] = text[2].replace("0.100", "abc", 1)
    (run / "metrics.csv").write_text("\n".join(text) + "\n")
    with pytest.raises(TrainingError, match=r"line 3, column 'step': 'abc' is not a number"):
        read_metrics(run)


def test_no_runs(tmp_path: Path) -> None:
    with pytest.raises(GraftError, match="got no runs"):
        plot_runs([], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def write_rl_run(
    root: Path, name: str, frames: Sequence[int], returns: Sequence[float], *, cut_at: int | None = None,
    label: str | None = None,
) -> Path:  # fmt: skip
    run = root / name
    run.mkdir()
    with open(run / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*RL_METRICS_COLUMNS, "p_w/act/student", "p_w/act/t:act"])
        writer.writeheader()
        for fr, ret in zip(frames, returns, strict=True):
            s = min(1.0, fr / max(frames))
            row = {c: "0" for c in RL_METRICS_COLUMNS} | {"frames": str(fr), "return_mean": str(ret)}
            row |= {"teachers_cut": str(int(cut_at is not None and fr >= cut_at))}
            writer.writerow(row | {"p_w/act/student": str(s), "p_w/act/t:act": str(1 - s)})
    if label:
        (run / "run.json").write_text(json.dumps({"label": label}))
    return run


def drawn(ax: Any, color: str, linestyle: str = "-") -> list[Line2D]:
    """The data lines (not the cut lines) in ``color`` and ``linestyle``."""
    return [
        line for line in ax.get_lines()
        if to_rgba(line.get_color()) == to_rgba(color) and line.get_linestyle() == linestyle
        and not str(line.get_label()).startswith("teachers cut")
    ]  # fmt: skip


def legend_texts(fig: Figure) -> list[str]:
    return [t.get_text() for legend in fig.legends for t in legend.get_texts()]


def test_band_means_equal_runs_with_the_sample_std() -> None:
    x, mean, std = _band([[0, 1, 2]] * 3, [[0.1, 0.5, 0.9], [0.3, 0.4, 0.8], [0.2, 0.9, 0.7]])
    assert x.tolist() == [0, 1, 2]
    assert mean == pytest.approx([0.2, 0.6, 0.8])
    assert std is not None and std[1] == pytest.approx(statistics.stdev([0.5, 0.4, 0.9]))
    x, mean, std = _band([[0, 1]], [[0.5, 0.7]])  # one run: itself, no band
    assert x.tolist() == [0, 1] and mean.tolist() == [0.5, 0.7] and std is None


def test_band_of_runs_of_unequal_length_ends_with_the_shortest() -> None:
    x, mean, std = _band([[0, 1, 2, 3], [0, 1, 2]], [[1, 2, 3, 4], [3, 4, 5]])
    assert x.tolist() == [0, 1, 2] and mean.tolist() == [2, 3, 4]
    assert std == pytest.approx([math.sqrt(2)] * 3)


def test_band_interpolates_rl_seeds_onto_the_union_of_their_frames() -> None:
    # Seed b logs 10 frames later than seed a; y = x for a and y = 2x for b, so any misalignment shows.
    a, b = [0, 100, 200], [10, 110, 210]
    x, mean, std = _band([a, b], [[float(v) for v in a], [2.0 * v for v in b]])
    assert x.tolist() == [10, 100, 110, 200]  # inside the range both cover
    assert mean == pytest.approx([1.5 * v for v in x])
    assert std == pytest.approx([math.sqrt(0.5) * v for v in x])


def test_band_drops_nan_points_keeps_the_last_of_a_repeated_x_and_may_be_empty() -> None:
    x, mean, _ = _band([[0, 1, 1, 2]], [[0.0, 9.0, 1.0, math.nan]])
    assert x.tolist() == [0, 1] and mean.tolist() == [0, 1]
    assert _band([[0, 1], [2, 3]], [[0, 0], [0, 0]])[0].size == 0  # no overlap
    assert _band([[0, 1]], [[math.nan, math.nan]])[0].size == 0


def test_ema_is_tensorboards_debiased_smoothing() -> None:
    # By hand, weight 0.5: s1 = 1; s2 = (0.5·1 + 3)/1.5; s4 = (0.25·1 + 0.5·3 + 5)/1.75; NaN stays put.
    smoothed = _ema([1.0, 3.0, math.nan, 5.0], 0.5)
    assert smoothed[0] == 1 and smoothed[1] == pytest.approx(7 / 3) and smoothed[3] == pytest.approx(27 / 7)
    assert math.isnan(smoothed[2])
    assert _ema([1.0, 3.0, 2.0], 0.0) == [1.0, 3.0, 2.0]
    assert _ema([2.0] * 4, 0.9) == pytest.approx([2.0] * 4)


@pytest.mark.parametrize("smooth", [1.0, -0.1, 1.5, math.nan, "0.5", True])
def test_smooth_outside_0_1_is_refused(tmp_path: Path, smooth: Any) -> None:
    run = write_run(tmp_path, "run")
    with pytest.raises(GraftError, match=r"smooth=.* must be a number in \[0, 1\)"):
        plot_runs([run], tmp_path / "out", smooth=smooth)
    assert not (tmp_path / "out").exists()


def test_seeds_of_one_label_are_one_mean_curve_with_a_band(tmp_path: Path) -> None:
    seeds = [[0.1, 0.3, 0.5, 0.6], [0.2, 0.4, 0.6, 0.8], [0.3, 0.5, 0.7]]  # the third seed stopped early
    kf = [
        write_run(tmp_path, f"kf{i}", epochs=len(v), p_w=True, cut_at=2 + (i == 2), label="kf", val=v)
        for i, v in enumerate(seeds)
    ]
    scratch = write_run(tmp_path, "scratch", epochs=4, label="scratch")
    figures = _figures([*kf, scratch])
    assert list(figures) == ["accuracy.png", "p_w.png"]
    fig = figures["accuracy.png"]
    (ax,) = fig.axes
    (val,) = drawn(ax, "C0")
    assert val.get_xdata().tolist() == [0, 1, 2]
    assert val.get_ydata() == pytest.approx([0.2, 0.4, 0.6])
    assert len(drawn(ax, "C0", "--")) == 1  # training accuracy, dashed
    assert len(drawn(ax, "C1")) == 1 and len(drawn(ax, "C1", "--")) == 1  # scratch: its own colour
    bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert len(bands) == 2 and all(to_rgba(b.get_facecolor()[0])[:3] == to_rgba("C0")[:3] for b in bands)
    texts = legend_texts(fig)
    assert "kf (3 seeds)" in texts and "scratch (1 seed)" in texts and "validation" in texts
    assert ax.get_xlabel() == "epoch" and ax.get_ylabel() == "accuracy" and "mean ± 1 std" in ax.get_title()


def test_smoothing_is_applied_per_run_before_the_mean(tmp_path: Path) -> None:
    a = write_run(tmp_path, "a", epochs=3, label="kf", val=[0.0, 1.0, 0.0])
    b = write_run(tmp_path, "b", epochs=3, label="kf", val=[0.0, 1.0, 1.0])
    (ax,) = _figures([a, b], smooth=0.5)["accuracy.png"].axes
    (val,) = drawn(ax, "C0")
    expected = [(x + y) / 2 for x, y in zip(_ema([0, 1, 0], 0.5), _ema([0, 1, 1], 0.5), strict=True)]
    assert val.get_ydata() == pytest.approx(expected)
    assert expected != pytest.approx([0.0, 1.0, 0.5])  # the test tells smoothing from none
    assert "EMA 0.5" in ax.get_title()


def test_epoch_axes_have_integer_ticks_and_no_offset(tmp_path: Path) -> None:
    val = [0.9999 + 1e-6 * e for e in range(5)]  # a narrow range: matplotlib would write "1e-6+9.999e-1"
    figures = _figures([write_run(tmp_path, "kf", epochs=5, p_w=True, val=val, train=val[::-1])])
    for fig in figures.values():
        fig.canvas.draw()
        for ax in fig.axes:
            assert ax.get_xlabel() == "epoch" and ax.get_ylabel() and ax.get_title()
            ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
            assert len(ticks) >= 2 and all(float(t).is_integer() for t in ticks)
            assert ax.xaxis.get_offset_text().get_text() == "" and ax.yaxis.get_offset_text().get_text() == ""


@pytest.mark.parametrize(("top", "unit", "divisor"), [(2_400_000, "millions", 1e6), (16_000, "thousands", 1e3)])
def test_rl_frames_are_plotted_in_millions_or_thousands(tmp_path: Path, top: int, unit: str, divisor: float) -> None:
    frames = [top * i // 8 for i in range(1, 9)]
    jittered = [f + 7 for f in frames[:-1]] + [top]
    runs = [
        write_rl_run(tmp_path, "s0", frames, [1e4 + 0.1 * i for i in range(8)], cut_at=frames[3], label="kf"),
        write_rl_run(tmp_path, "s1", jittered, [1e4 + 0.1 * i + 0.1 for i in range(8)], cut_at=jittered[5], label="kf"),
    ]
    figures = _figures(runs, smooth=0.6)
    assert list(figures) == ["returns.png", "p_w.png"]
    fig = figures["returns.png"]
    fig.canvas.draw()
    (ax,) = fig.axes
    assert ax.get_xlabel() == f"frames ({unit})" and ax.get_ylabel() == "mean episodic return"
    assert ax.xaxis.get_offset_text().get_text() == ""  # no "1e6" at the end of the axis
    assert ax.yaxis.get_offset_text().get_text() == ""  # returns of 10000.x: no "+1e4"
    (curve,) = drawn(ax, "C0")
    assert curve.get_xdata()[0] == pytest.approx((frames[0] + 7) / divisor)
    assert curve.get_xdata()[-1] == pytest.approx(top / divisor)
    (cut,) = [line for line in ax.get_lines() if line.get_label() == "teachers cut (kf)"]
    assert cut.get_xdata()[0] == pytest.approx((frames[3] + jittered[5]) / 2 / divisor)  # the seeds' mean


def test_the_cut_is_a_labelled_line_per_group_in_its_colour(tmp_path: Path) -> None:
    runs = [write_run(tmp_path, f"kf{i}", p_w=True, cut_at=3 + i, label="kf") for i in range(2)]
    runs += [write_run(tmp_path, "late", p_w=True, cut_at=5, label="late")]
    runs += [write_run(tmp_path, "scratch", label="scratch")]
    figures = _figures(runs)
    for name, fig in figures.items():
        axes = fig.axes[:1] if name == "accuracy.png" else fig.axes
        for ax in axes:
            cuts = {line.get_label(): line for line in ax.get_lines() if str(line.get_label()).startswith("teachers")}
            assert set(cuts) == {"teachers cut (kf)", "teachers cut (late)"}, (name, ax.get_title())
            assert cuts["teachers cut (kf)"].get_xdata()[0] == 3.5  # the mean of the seeds' cut epochs
            assert to_rgba(cuts["teachers cut (kf)"].get_color()) == to_rgba("C0")
            assert to_rgba(cuts["teachers cut (late)"].get_color()) == to_rgba("C1")
        assert "teachers cut" in legend_texts(fig)
    assert "scratch (1 seed)" not in legend_texts(figures["p_w.png"])  # no p_w: not in the p_w figure


def test_legends_sit_outside_the_axes(tmp_path: Path) -> None:
    runs = [write_run(tmp_path, f"kf{i}", p_w=True, cut_at=4, label="kf") for i in range(3)]
    figures = _figures([*runs, write_run(tmp_path, "scratch")])
    for fig in figures.values():
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
        boxes = [ax.get_window_extent(renderer) for ax in fig.axes]
        legends = [*fig.legends, *(ax.get_legend() for ax in fig.axes if ax.get_legend() is not None)]
        assert legends
        for legend in legends:
            extent = legend.get_window_extent(renderer)
            assert not any(extent.overlaps(box) for box in boxes)


def test_p_w_line_styles_tell_candidates_apart(tmp_path: Path) -> None:
    (fig,) = [f for name, f in _figures([write_run(tmp_path, "kf", p_w=True)]).items() if name == "p_w.png"]
    site = next(ax for ax in fig.axes if ax.get_title() == "layer1.1.act2")
    legend = site.get_legend()
    lines = {t.get_text(): h for t, h in zip(legend.get_texts(), legend.legend_handles, strict=True)}
    assert list(lines) == ["student", "related:features.act2", "related:features.act3", "other:layer1.1.act2"]
    styles = {name: (h.get_linestyle(), h.get_marker()) for name, h in lines.items()}  # type: ignore[union-attr]
    assert styles["student"][0] == "-"
    assert len(set(styles.values())) == 4  # every candidate looks different
    assert styles["related:features.act2"][0] == styles["related:features.act3"][0]  # one teacher: one dash
    assert styles["related:features.act2"][1] != styles["related:features.act3"][1]  # its taps: markers
    assert styles["other:layer1.1.act2"][0] not in ("-", styles["related:features.act2"][0])


def test_cli_plot_passes_smooth_through(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    run = write_run(tmp_path, "kf", p_w=True, cut_at=3)
    assert main(["plot", str(run), "--out", str(tmp_path / "out"), "--smooth", "0.6"]) == 0
    assert "accuracy.png" in capsys.readouterr().out
    assert_png(tmp_path / "out" / "accuracy.png")
    seen: dict[str, Any] = {}
    monkeypatch.setattr(graftnet.plot, "plot_runs", lambda runs, out, smooth: seen.update(smooth=smooth) or [])
    assert main(["plot", str(run), "--smooth", "0.25"]) == 0 and seen == {"smooth": 0.25}
    assert main(["plot", str(run)]) == 0 and seen == {"smooth": 0.0}
    monkeypatch.undo()
    assert main(["plot", str(run), "--out", str(tmp_path / "bad"), "--smooth", "1"]) == 2
    assert "smooth=1.0: the smoothing weight must be a number in [0, 1)" in capsys.readouterr().err
