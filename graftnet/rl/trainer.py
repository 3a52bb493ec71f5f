"""``graftnet train`` for a spec with an ``rl`` section: A2C or A3C, then the detached student evaluated alone.

The run folder is the supervised trainer's: ``spec.json``, ``run.json``, ``metrics.csv`` (one row every
``rl.log_every`` frames: episodic return against frames, steps per second, losses, λ1, p_w), ``tb/``,
``checkpoint.safetensors`` (model, optimizer, RNG, frames; ``--resume`` continues from it with fresh
environments), ``student.safetensors`` and ``results.json`` (the paper's evaluation: ``eval_episodes`` games of
the detached student, each after up to ``noop_max`` random no-ops).
"""

from __future__ import annotations

import json
import math
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from graftnet.checkpoint import CHECKPOINT_NAME, TRAIN_STATE, export, read_checkpoint
from graftnet.detach import detach, student_dependence
from graftnet.errors import SpecError, TraceError, TrainingError
from graftnet.graft import GraftedModel
from graftnet.methods import METHODS, Method
from graftnet.models import build_model
from graftnet.rl.a2c import LOSS_PARTS, Collector, a2c_update, policy_and_value
from graftnet.rl.envs import evaluate, make_env
from graftnet.spec import RLSpec, Spec
from graftnet.trainer import (
    RESULTS_NAME,
    STUDENT_NAME,
    _catching_signals,
    _check_run_dir,
    _device,
    _lr_factor,
    _Metrics,
    _optimizer,
    _p_w_columns,
    _p_w_row,
    _param_groups,
    _save_run_checkpoint,
    _StopFlag,
    _unpack,
)

__all__ = ["RL_COLUMNS", "RLRunResult", "train_rl"]

RL_COLUMNS = [
    "frames", "step", "seconds", "steps_per_s", "return_mean", "return_std", "episodes", *LOSS_PARTS, "lambda1",
    "lr", "teachers_cut",
]  # fmt: skip


@dataclass
class RLRunResult:
    """What a reinforcement-learning run produced; ``eval_returns`` are the detached student's games."""

    run_dir: Path
    method: str
    frames: int
    seconds: float
    eval_returns: list[float] = field(default_factory=list)
    min_p_w_student: float | None = None
    forced_export: bool = False
    interrupted: str | None = None

    @property
    def eval_mean(self) -> float | None:
        return statistics.fmean(self.eval_returns) if self.eval_returns else None


def _saved_run(run_dir: Path, spec: Spec, resume: bool, overwrite: bool) -> dict[str, Any] | None:
    """The checkpoint to continue from (``--resume``), after checking the run folder; None to start afresh."""
    if not _check_run_dir(run_dir, spec, resume, overwrite, CHECKPOINT_NAME):
        return None
    tensors, meta = read_checkpoint(run_dir / CHECKPOINT_NAME)
    return {"tensors": tensors, "meta": meta["train_state"]}


def _restore(
    g: GraftedModel, method: Method, optimizer: torch.optim.Optimizer, saved: dict[str, Any], example: torch.Tensor
) -> GraftedModel:
    """The model, optimizer and method state of a checkpoint (with the teachers cut if they were)."""
    meta = saved["meta"]
    if meta.get("teachers_cut"):
        g = method.maybe_cut(g, 1.0, example) or g
    g.load_state_dict({k: v for k, v in saved["tensors"].items() if not k.startswith(TRAIN_STATE)}, strict=False)
    _unpack(saved["tensors"], meta, optimizer, method)
    return g


class _Rows:
    """What the updates since the last metrics row reported; a row every ``rl.log_every`` frames."""

    def __init__(self, metrics: _Metrics, p_w_columns: list[str], rl: RLSpec, frames: int) -> None:
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
        self, g: GraftedModel, method: Method, *, frames: int, update: int, seconds: float, lr: float, cut: bool
    ) -> dict[str, Any]:
        now = time.perf_counter()
        returns = self.returns
        row = {
            "frames": frames, "step": update, "seconds": seconds,
            "steps_per_s": self.steps / max(now - self.since, 1e-9),
            "return_mean": statistics.fmean(returns) if returns else None,
            "return_std": statistics.pstdev(returns) if returns else None,
            "episodes": len(returns), "lambda1": method.lambda1(frames / self.rl.frames), "lr": lr,
            "teachers_cut": int(cut), **{k: v / max(self.updates, 1) for k, v in self.sums.items()},
            **_p_w_row(g, self.p_w_columns),
        }  # fmt: skip
        self.metrics.write(row)
        self.logged = frames
        self._start(now)
        return row


def _sample_policy(student: nn.Module, device: torch.device) -> Any:
    """The A3C agent's policy: an action sampled from softmax(policy logits)."""

    @torch.no_grad()
    def act(obs: np.ndarray) -> np.ndarray:
        logits, _ = policy_and_value(student(torch.from_numpy(obs).to(device)))
        return torch.multinomial(torch.softmax(logits, dim=-1), 1).squeeze(1).cpu().numpy()

    return act


def train_rl(
    spec: Spec, run_dir: Path, *, resume: bool = False, overwrite: bool = False, progress: bool = True,
    tensorboard: bool = True,
) -> RLRunResult:  # fmt: skip
    """Train ``spec.student`` in ``spec.rl.env`` with ``spec.train.method``; export and evaluate the student alone."""
    assert spec.rl is not None
    for section in ("student", "train"):
        if getattr(spec, section) is None:
            raise SpecError(f"{section}: graftnet train needs a '{section}' section in the spec")
    assert spec.train is not None
    rl, t = spec.rl, spec.train
    if rl.algorithm == "a3c":
        from graftnet.rl.a3c import train_a3c

        return train_a3c(spec, run_dir, resume=resume, overwrite=overwrite, tensorboard=tensorboard)
    saved = _saved_run(run_dir, spec, resume, overwrite)
    device = _device(t.device)
    if t.threads is not None:
        torch.set_num_threads(t.threads)
    random.seed(t.seed)
    np.random.seed(t.seed % 2**32)
    torch.manual_seed(t.seed)
    env = make_env(rl.env, rl.num_envs, t.seed, training=True)
    try:
        g, method, example = build_agent(spec, env.observation_shape, env.num_actions)
        g.train().to(device)
        steps_per_update = rl.rollout * rl.num_envs
        total_updates = math.ceil(rl.frames / (steps_per_update * env.frames_per_step))
        optimizer = _optimizer(_param_groups(g, spec, total_updates), spec)
        base_lrs = [group["lr"] for group in optimizer.param_groups]
        update, frames, seconds = 0, 0, 0.0
        if saved is not None:
            g = _restore(g, method, optimizer, saved, example.to(device))
            meta = saved["meta"]
            update, frames, seconds = meta["step"], meta["frames"], meta["seconds"]
            if meta.get("finished"):
                return _finish(g, spec, run_dir, device, frames, seconds, method)
        else:
            _start_run_dir(run_dir, spec)
        p_w_columns = _p_w_columns(g)
        metrics = _Metrics(run_dir, RL_COLUMNS + p_w_columns, frames if saved else None, tensorboard, x="frames")
        rows = _Rows(metrics, p_w_columns, rl, frames)
        ckpt = run_dir / CHECKPOINT_NAME
        flag = _StopFlag()
        collector = Collector(env, device)

        def save(finished: bool = False) -> None:
            state = {"step": update, "frames": frames, "seconds": seconds, "teachers_cut": method.cut,
                     "finished": finished}  # fmt: skip
            _save_run_checkpoint(g, ckpt, optimizer, method, state)

        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=rl.frames, initial=frames, desc=f"{t.method} {run_dir.name}", unit="frame", leave=False)
        try:
            with _catching_signals(flag):
                while frames < rl.frames:
                    began = time.perf_counter()
                    progress_now = frames / rl.frames
                    cut = method.maybe_cut(g, progress_now, example.to(device))
                    if cut is not None:
                        g = cut.train().to(device)
                    for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
                        group["lr"] = base * _lr_factor(t.schedule, progress_now)
                    try:
                        values, ended, steps = a2c_update(g, method, collector, optimizer, rl, progress_now, update)
                    except TrainingError as e:
                        raise TrainingError(f"{e}. The last good checkpoint is {str(ckpt)!r}") from e
                    update += 1
                    frames += steps * env.frames_per_step
                    rows.add(values, [e.episode_return for e in ended], steps)
                    seconds += time.perf_counter() - began
                    if bar is not None:
                        bar.update(steps * env.frames_per_step)
                    if rows.due(frames):
                        row = rows.write(g, method, frames=frames, update=update, seconds=seconds,
                                         lr=optimizer.param_groups[0]["lr"], cut=method.cut)  # fmt: skip
                        if bar is not None and row["return_mean"] is not None:
                            bar.set_postfix(ret=f"{row['return_mean']:.2f}")
                        save(finished=frames >= rl.frames)
                    if flag.signal is not None:
                        save()
                        return RLRunResult(run_dir, t.method, frames, seconds, interrupted=flag.signal)
        finally:
            metrics.close()
            if bar is not None:
                bar.close()
        return _finish(g, spec, run_dir, device, frames, seconds, method)
    finally:
        env.close()


def build_agent(spec: Spec, observation_shape: tuple[int, ...], num_actions: int) -> tuple[GraftedModel, Method, Any]:
    """The method's model for this environment, checked against its observations and actions."""
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
    method = METHODS.get(train.method)(spec)
    try:
        g = method.build(student, example)
    except TraceError as e:
        raise TraceError(
            f"{rl.env} observes {list(observation_shape)} (channels first), which {ref.model} cannot take: pick a "
            f"student (and teachers, or their input adapters) for that shape. {e}"
        ) from e
    with torch.no_grad():
        logits, _ = policy_and_value(g.eval()(example))
    if logits.shape[1] != num_actions:
        raise TrainingError(
            f"student.kwargs: the student has {logits.shape[1]} actions but {rl.env} has {num_actions}; "
            "set num_actions to match"
        )
    return g, method, example


def _start_run_dir(run_dir: Path, spec: Spec) -> None:
    assert spec.train is not None
    run_dir.mkdir(parents=True, exist_ok=True)
    for name in (CHECKPOINT_NAME, STUDENT_NAME, RESULTS_NAME):
        (run_dir / name).unlink(missing_ok=True)
    (run_dir / "spec.json").write_text(json.dumps(spec.model_dump(mode="json"), indent=2))
    run = {"method": spec.train.method, "label": spec.train.label or run_dir.name, "seed": spec.train.seed}
    (run_dir / "run.json").write_text(json.dumps(run, indent=2))


def _finish(
    g: GraftedModel, spec: Spec, run_dir: Path, device: torch.device, frames: int, seconds: float, method: Method
) -> RLRunResult:
    """Export the student (forced, and said so, if it still leans on its teachers) and play it alone."""
    assert spec.train is not None and spec.rl is not None
    dependence = student_dependence(g) or method.dependence_at_cut
    low = min(dependence.values(), default=1.0)
    forced = low < 1.0 - spec.train.export_tol
    g.cpu()
    export(g, run_dir / STUDENT_NAME, tol=spec.train.export_tol, force=forced, overwrite=True)
    student = detach(g, force=True).to(device).eval()
    returns = evaluate(_sample_policy(student, device), spec.rl.env, spec.rl.eval_episodes, spec.rl.noop_max,
                       seed=spec.train.seed + 10_000)  # fmt: skip
    result = RLRunResult(run_dir, spec.train.method, frames, seconds, [float(r) for r in returns],
                         low if dependence else None, forced)  # fmt: skip
    payload = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(result).items()}
    payload["eval_mean"] = result.eval_mean
    (run_dir / RESULTS_NAME).write_text(json.dumps(payload, indent=2))
    return result
