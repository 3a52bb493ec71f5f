"""graftnet.plot: accuracy and p_w figures from run folders, and errors for folders it cannot read."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
from PIL import Image

from graftnet.errors import GraftError, TrainingError
from graftnet.plot import METRICS_COLUMNS, _load, _teacher_totals, plot_runs, read_metrics

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
) -> Path:
    run = root / name
    run.mkdir()
    p_w_columns = [f"p_w/{site}/{c}" for site, cands in sites.items() for c in cands] if p_w else []
    rows = []
    for e in range(epochs):
        row = {c: f"{0.1 * e:.3f}" for c in METRICS_COLUMNS}
        row.update(epoch=str(e), kd_loss="", teachers_cut=str(int(cut_at is not None and e >= cut_at)))
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
