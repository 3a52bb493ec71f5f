"""What A2C and A3C runs share: the agent built from a spec, the metrics rows, and the end of a run.

The run folder is the supervised trainer's (:mod:`graftnet.training.run_dir`): ``metrics.csv`` gets one row
every ``rl.log_every`` frames (episodic return against frames, steps per second, losses, λ1, p_w), and at the
end the detached student plays ``eval_episodes`` games alone, each after up to ``noop_max`` random no-ops.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from graftnet.errors import SpecError, TraceError, TrainingError
from graftnet.models import build_model
from graftnet.rl.a2c import LOSS_PARTS, policy_and_value
from graftnet.rl.envs import evaluate
from graftnet.spec import RLSpec, Spec
from graftnet.training.finish import export_student
from graftnet.training.metrics import MetricsLog, p_w_row
from graftnet.training.objectives import METHODS, Objective
from graftnet.training.results import RunResult
from graftnet.training.run_dir import RESULTS_NAME

__all__ = ["RL_COLUMNS", "ReturnLog", "build_agent", "finish_rl", "sample_policy"]

RL_COLUMNS = [
    "frames", "step", "seconds", "steps_per_s", "return_mean", "return_std", "episodes", *LOSS_PARTS, "lambda1",
    "lr", "teachers_cut",
]  # fmt: skip


class ReturnLog:
    """What the updates since the last metrics row reported; a row every ``rl.log_every`` frames."""

    def __init__(self, metrics: MetricsLog, p_w_columns: list[str], rl: RLSpec, frames: int) -> None:
        self.metrics, self.p_w_columns, self.rl, self.logged = metrics, p_w_columns, rl, frames
        self._start(time.perf_counter())

    def _start(self, now: float) -> None:
        self.returns: list[float] = []
        self.sums: dict[str, float] = {}
        self.updates, self.steps, self.since = 0, 0, now

    def add(self, values: dict[str, float], returns: list[float], steps: int) -> None:
        self.updates += 1
        self.steps += steps
        self.returns += returns
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v

    def due(self, frames: int) -> bool:
        return frames - self.logged >= self.rl.log_every or frames >= self.rl.frames

    def write(
        self, objective: Objective, *, frames: int, update: int, seconds: float, lr: float, cut: bool
    ) -> dict[str, Any]:
        now = time.perf_counter()
        returns = self.returns
        row = {
            "frames": frames, "step": update, "seconds": seconds,
            "steps_per_s": self.steps / max(now - self.since, 1e-9),
            "return_mean": statistics.fmean(returns) if returns else None,
            "return_std": statistics.pstdev(returns) if returns else None,
            "episodes": len(returns), "lambda1": objective.lambda1(frames / self.rl.frames), "lr": lr,
            "teachers_cut": int(cut), **{k: v / max(self.updates, 1) for k, v in self.sums.items()},
            **p_w_row(objective.grafted, self.p_w_columns),
        }  # fmt: skip
        self.metrics.write(row)
        self.logged = frames
        self._start(now)
        return row


def sample_policy(student: nn.Module, device: torch.device) -> Any:
    """The agent's policy for evaluation: an action sampled from softmax(policy logits)."""

    @torch.no_grad()
    def act(obs: np.ndarray) -> np.ndarray:
        logits, _ = policy_and_value(student(torch.from_numpy(obs).to(device)))
        return torch.multinomial(torch.softmax(logits, dim=-1), 1).squeeze(1).cpu().numpy()

    return act


def build_agent(
    spec: Spec, observation_shape: tuple[int, ...], num_actions: int, *, total_steps: int | None = None
) -> tuple[Objective, torch.Tensor]:
    """The method's objective (with its model) for this environment, checked against its observations and
    actions, and an example observation batch."""
    ref, train, rl = spec.student, spec.train, spec.rl
    assert ref is not None and train is not None and rl is not None
    if spec.input_shape is not None and tuple(spec.input_shape) != tuple(observation_shape):
        raise SpecError(
            f"input_shape: the spec says {spec.input_shape} but {rl.env} observes {list(observation_shape)} "
            "(channels first); fix input_shape or the sites' names"
        )
    spec = spec.model_copy(update={"input_shape": list(observation_shape)})
    student = build_model(ref.model, ref.kwargs, ref.weights)
    example = torch.zeros(2, *observation_shape)
    try:
        objective = METHODS.get(train.method).from_spec(spec, student, example, total_steps=total_steps)
    except TraceError as e:
        raise TraceError(
            f"{rl.env} observes {list(observation_shape)} (channels first), which {ref.model} cannot take: pick a "
            f"student (and teachers, or their input adapters) for that shape. {e}"
        ) from e
    with torch.no_grad():
        logits, _ = policy_and_value(objective.model.eval()(example))
    if logits.shape[1] != num_actions:
        raise TrainingError(
            f"student.kwargs: the student has {logits.shape[1]} actions but {rl.env} has {num_actions}; "
            "set num_actions to match"
        )
    return objective, example


def finish_rl(
    objective: Objective, spec: Spec, run_dir: Path, device: torch.device, frames: int, seconds: float
) -> RunResult:
    """Export the student (forced, and said so, if it still leans on its teachers) and play it alone."""
    assert spec.train is not None and spec.rl is not None
    exported = export_student(objective.grafted, run_dir, spec.train.export_tol, objective.dependence_at_cut)
    student = exported.student.to(device).eval()
    returns = evaluate(sample_policy(student, device), spec.rl.env, spec.rl.eval_episodes, spec.rl.noop_max,
                       seed=spec.train.seed + 10_000)  # fmt: skip
    result = RunResult(run_dir, spec.train.method, seconds=seconds, frames=frames,
                       eval_returns=[float(r) for r in returns], min_p_w_student=exported.min_p_w_student,
                       forced_export=exported.forced)  # fmt: skip
    result.write(run_dir / RESULTS_NAME)
    return result
