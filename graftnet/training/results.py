"""One result type for every run — supervised, born-again sequence or reinforcement learning — and its summary."""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["RunResult"]


@dataclass
class RunResult:
    """How a run ended. Errors (%) and returns are those of the exported student, evaluated alone.

    Supervised runs fill ``epochs``, ``val_error`` and ``test_error`` (None without a test split); RL runs
    ``frames`` and ``eval_returns``; a ``ban`` sequence adds its ``generations`` and ``ensembles`` (the
    errors and ``test_error`` are then the last generation's). ``interrupted`` names the signal that stopped
    the run (its checkpoint is saved; resuming continues it).
    """

    run_dir: Path
    method: str
    epochs: int = 0
    val_error: float | None = None
    test_error: float | None = None
    min_p_w_student: float | None = None
    forced_export: bool = False
    interrupted: str | None = None
    seconds: float = 0.0
    frames: int | None = None
    eval_returns: list[float] = field(default_factory=list)
    generations: list[dict[str, Any]] = field(default_factory=list)
    ensembles: list[dict[str, Any]] = field(default_factory=list)
    treatment: str | None = None  # ban: the born-again treatment, or knowledge_flow
    best_generation: int | None = None  # ban: the generation with the lowest validation error

    @property
    def eval_mean(self) -> float | None:
        """Mean return of the evaluation games (RL), or None."""
        return statistics.fmean(self.eval_returns) if self.eval_returns else None

    @property
    def progress(self) -> str:
        """Where the run stands, e.g. ``epoch 12`` or ``1,200,000 frames``."""
        return f"{self.frames:,} frames" if self.frames is not None else f"epoch {self.epochs}"

    def to_json(self) -> dict[str, Any]:
        payload = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}
        payload["eval_mean"] = self.eval_mean
        return payload

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_json(), indent=2))

    @classmethod
    def read(cls, path: Path) -> RunResult:
        data = json.loads(path.read_text())
        data.pop("eval_mean", None)
        return cls(**{**data, "run_dir": Path(data["run_dir"])})

    def summary(self) -> list[str]:
        """Lines for a person: what ran, p_w(student), where the student is, how it scores alone."""
        if self.generations:
            return self._ban_summary()
        out = self.run_dir
        what = f"{self.frames:,} frames" if self.frames is not None else f"{self.epochs} epochs"
        lines = [f"run {out}: {self.method}, {what} in {self.seconds:.1f} s"]
        if self.min_p_w_student is not None:
            forced = " — exported anyway (forced): the student alone loses what the teachers still gave" if (
                self.forced_export) else ""  # fmt: skip
            lines.append(f"  min p_w(student) over sites: {self.min_p_w_student:.6f}{forced}")
        lines.append(f"  exported student: {out / 'student.safetensors'}")
        if self.frames is not None:
            returns = self.eval_returns
            spread = f" ± {statistics.pstdev(returns):.2f}" if len(returns) > 1 else ""
            mean = f"{statistics.fmean(returns):.2f}" if returns else "-"
            lines.append(f"  student alone: mean return {mean}{spread} over {len(returns)} episodes")
        else:
            test = f"test error {self.test_error:.2f}%" if self.test_error is not None else "no test split"
            lines.append(f"  student alone: validation error {self.val_error:.2f}%, {test}")
        return lines

    def _ban_summary(self) -> list[str]:
        def pct(v: float | None) -> str:
            return "-" if v is None else f"{v:.2f}"

        lines = [
            f"born-again sequence in {self.run_dir} ({self.treatment}); errors (%) of each exported student alone:",
            "| generation | val error | test error |",
            "| --- | --- | --- |",
        ]
        for g in self.generations:
            lines.append(f"| gen{g['generation']} | {pct(g['val_error'])} | {pct(g['test_error'])} |")
        for e in self.ensembles:
            members = "+".join(f"gen{k}" for k in e["members"])
            lines.append(f"| ensemble {members} | {pct(e['val_error'])} | {pct(e['test_error'])} |")
        lines.append(f"best generation by validation error: gen{self.best_generation}")
        return lines
