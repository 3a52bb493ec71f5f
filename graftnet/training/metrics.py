"""``metrics.csv`` and TensorBoard: one row per epoch (or per logging interval), p_w per site and candidate."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from graftnet.graft import GraftedModel

__all__ = ["MetricsLog", "p_w_columns", "p_w_row"]


class MetricsLog:
    """``run_dir/metrics.csv`` with ``columns``, and TensorBoard scalars under ``run_dir/tb``, against ``x``.

    When resuming (``keep_up_to`` set) rows newer than the checkpoint are dropped, so a resumed run's file
    reads as if it had never stopped.
    """

    def __init__(
        self, run_dir: Path, columns: list[str], keep_up_to: int | None, tensorboard: bool, x: str = "epoch"
    ) -> None:
        self.path = run_dir / "metrics.csv"
        self.columns = columns
        self.x = x
        rows: list[dict[str, str]] = []
        if keep_up_to is not None and self.path.exists():
            with open(self.path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(float(r[x])) <= keep_up_to]
        with open(self.path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tb"))

    def write(self, row: dict[str, Any]) -> None:
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.columns).writerow(
                {k: ("" if v is None else v) for k, v in row.items() if k in self.columns}
            )
        if self.writer is not None:
            for key, value in row.items():
                if key not in ("epoch", "step", self.x) and isinstance(value, (int, float)) and value is not None:
                    self.writer.add_scalar(key, value, int(row[self.x]))
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def p_w_columns(g: GraftedModel) -> list[str]:
    """``p_w/SITE/CANDIDATE`` for every site and candidate of ``g``."""
    return [f"p_w/{site}/{cand}" for site, row in g.p_w().items() for cand in row]


def p_w_row(g: GraftedModel, columns: list[str]) -> dict[str, float]:
    """Current p_w; once the teachers are cut the student is on its own (p_w(student) = 1)."""
    current = {f"p_w/{s}/{c}": p for s, row in g.p_w().items() for c, p in row.items()}
    return {c: current.get(c, 1.0 if c.endswith("/student") else 0.0) for c in columns}
