"""``graftnet train`` for a spec with an ``rl`` section: A2C or A3C, then the detached student evaluated alone.

The run folder is the supervised trainer's: ``spec.json``, ``run.json``, ``metrics.csv`` (one row every
``rl.log_every`` frames: episodic return against frames, steps per second, losses, λ1, p_w), ``tb/``,
``checkpoint.safetensors`` (model, optimizer, RNG, frames; ``--resume`` continues from it with fresh
environments), ``student.safetensors`` and ``results.json`` (the paper's evaluation: ``eval_episodes`` games of
the detached student, each after up to ``noop_max`` random no-ops).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from graftnet.distributed import resolve_device
from graftnet.errors import SpecError, TrainingError
from graftnet.rl.a2c import Collector, a2c_update
from graftnet.rl.a3c import train_a3c
from graftnet.rl.envs import make_env
from graftnet.rl.runs import RL_COLUMNS, ReturnLog, build_agent, finish_rl
from graftnet.spec import Spec
from graftnet.training.guards import check_finite_state
from graftnet.training.metrics import MetricsLog, p_w_columns
from graftnet.training.optim import make_optimizer, set_lr
from graftnet.training.results import RunResult
from graftnet.training.run_dir import CHECKPOINT_NAME, check_run_dir, start_run_dir
from graftnet.training.signals import StopFlag, catching_signals
from graftnet.training.state import load_run, resume_from, save_run, seed_everything

__all__ = ["train_rl"]


def train_rl(
    spec: Spec, run_dir: Path, *, resume: bool = False, overwrite: bool = False, progress: bool = True,
    tensorboard: bool = True,
) -> RunResult:  # fmt: skip
    """Train ``spec.student`` in ``spec.rl.env`` with ``spec.train.method``; export and evaluate the student alone."""
    assert spec.rl is not None
    for section in ("student", "train"):
        if getattr(spec, section) is None:
            raise SpecError(f"{section}: graftnet train needs a '{section}' section in the spec")
    assert spec.train is not None
    rl, t = spec.rl, spec.train
    if rl.algorithm == "a3c":
        return train_a3c(spec, run_dir, resume=resume, overwrite=overwrite, tensorboard=tensorboard)
    saved = load_run(run_dir / CHECKPOINT_NAME) if check_run_dir(run_dir, spec, resume, overwrite) else None
    device = resolve_device(t.device)
    if t.threads is not None:
        torch.set_num_threads(t.threads)
    seed_everything(t.seed)
    env = make_env(rl.env, rl.num_envs, t.seed, training=True)
    try:
        steps_per_update = rl.rollout * rl.num_envs
        total_updates = math.ceil(rl.frames / (steps_per_update * env.frames_per_step))
        objective, example = build_agent(spec, env.observation_shape, env.num_actions, total_steps=total_updates)
        objective.model.train()
        objective.to(device)
        optimizer = make_optimizer(objective.param_groups(), t)
        base_lrs = [group["lr"] for group in optimizer.param_groups]
        frames, seconds = 0, 0.0
        if saved is not None:
            meta = saved.meta
            resume_from(saved, objective, optimizer, example.to(device))
            frames, seconds = meta["frames"], meta["seconds"]
            if meta.get("finished"):
                return finish_rl(objective, spec, run_dir, device, frames, seconds)
        else:
            start_run_dir(run_dir, spec)
        columns = p_w_columns(objective.grafted)
        metrics = MetricsLog(run_dir, RL_COLUMNS + columns, frames if saved else None, tensorboard, x="frames")
        rows = ReturnLog(metrics, columns, rl, frames)
        ckpt = run_dir / CHECKPOINT_NAME
        flag = StopFlag()
        collector = Collector(env, device)

        def save(finished: bool = False) -> None:
            state = {"step": objective.steps, "frames": frames, "seconds": seconds, "teachers_cut": objective.cut,
                     "finished": finished}  # fmt: skip
            check_finite_state(objective.model, f"{frames:,} frames", f"The last good checkpoint is {str(ckpt)!r}.")
            save_run(objective.grafted, ckpt, optimizer, objective, state)

        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=rl.frames, initial=frames, desc=f"{t.method} {run_dir.name}", unit="frame", leave=False)
        try:
            with catching_signals(flag):
                while frames < rl.frames:
                    began = time.perf_counter()
                    progress_now = frames / rl.frames
                    if objective.maybe_cut(progress_now, example.to(device)) is not None:
                        objective.model.train().to(device)
                    set_lr(optimizer, base_lrs, t.schedule, progress_now)
                    try:
                        values, ended, steps = a2c_update(objective, collector, optimizer, rl, progress_now)
                    except TrainingError as e:
                        raise TrainingError(f"{e}. The last good checkpoint is {str(ckpt)!r}") from e
                    frames += steps * env.frames_per_step
                    rows.add(values, [e.episode_return for e in ended], steps)
                    seconds += time.perf_counter() - began
                    if bar is not None:
                        bar.update(steps * env.frames_per_step)
                    if rows.due(frames):
                        row = rows.write(objective, frames=frames, update=objective.steps, seconds=seconds,
                                         lr=optimizer.param_groups[0]["lr"], cut=objective.cut)  # fmt: skip
                        if bar is not None and row["return_mean"] is not None:
                            bar.set_postfix(ret=f"{row['return_mean']:.2f}")
                        save(finished=frames >= rl.frames)
                    if flag.signal is not None:
                        save()
                        return RunResult(run_dir, t.method, seconds=seconds, frames=frames, interrupted=flag.signal)
        finally:
            metrics.close()
            if bar is not None:
                bar.close()
        return finish_rl(objective, spec, run_dir, device, frames, seconds)
    finally:
        env.close()
