"""A3C (Mnih et al. 2016), as the knowledge-flow paper trains its Atari agents: Hogwild worker processes.

The grafted model's parameters and Adam's statistics live in shared memory; every worker (a forked process
with one thread and its own environments) computes the actor-critic loss of its rollouts on the shared
parameters and steps the shared optimizer, lock-free. The main process only watches: it writes metrics and
checkpoints from what the workers report, and stops them all — keeping the checkpoint — if one fails.
"""

from __future__ import annotations

import ctypes
import math
import os
import queue
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

from graftnet.errors import TrainingError
from graftnet.rl.a2c import Collector, a2c_update
from graftnet.rl.envs import env_info, make_env
from graftnet.rl.runs import RL_COLUMNS, ReturnLog, build_agent, finish_rl
from graftnet.spec import Spec
from graftnet.training.guards import check_finite_state
from graftnet.training.metrics import MetricsLog, p_w_columns
from graftnet.training.objectives import Objective
from graftnet.training.optim import lr_factor, make_optimizer, set_lr
from graftnet.training.results import RunResult
from graftnet.training.run_dir import CHECKPOINT_NAME, check_run_dir, start_run_dir
from graftnet.training.signals import StopFlag, catching_signals
from graftnet.training.state import load_run, resume_from, save_run

__all__ = ["train_a3c"]


def _share_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Create Adam's statistics now and move them to shared memory, so that every worker updates the same ones."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state[p]
            if not state:
                state["step"] = torch.zeros(())
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            for value in state.values():
                if isinstance(value, torch.Tensor):
                    value.share_memory_()


def _die_with_parent(parent: int) -> None:
    """Make this worker end when the main process does, even when that is killed with SIGKILL.

    Daemon processes are only terminated by a parent that exits normally; a killed parent would leave its
    workers running, holding its stdout/stderr open. On Linux the kernel sends SIGKILL on the parent's death
    (PR_SET_PDEATHSIG); elsewhere the update loop notices the new parent id.
    """
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass  # no prctl: the loop's parent check still applies
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


def _worker(
    rank: int, spec: Spec, objective: Objective, optimizer: torch.optim.Optimizer, example: torch.Tensor,
    frames: Any, stop: Any, reports: Any, parent: int,
) -> None:  # fmt: skip
    """One A3C learner: its own environments and RNG, the shared model and optimizer."""
    _die_with_parent(parent)
    assert spec.rl is not None and spec.train is not None
    rl, t = spec.rl, spec.train
    torch.set_num_threads(1)  # the workers are the parallelism; OpenMP pools inherited across fork can hang
    torch.manual_seed(t.seed * 1000 + rank + 1)
    device = torch.device("cpu")
    env = None
    try:
        env = make_env(rl.env, rl.num_envs, t.seed * 1000 + rank * rl.num_envs + 1, training=True)
        collector = Collector(env, device)
        base_lrs = [group["lr"] for group in optimizer.param_groups]
        objective.steps = 0  # this worker's own updates: the θ_old refresh counts them
        while not stop.is_set() and os.getppid() == parent:
            with frames.get_lock():
                done_frames = frames.value
            if done_frames >= rl.frames:
                break
            progress = done_frames / rl.frames
            if objective.maybe_cut(progress, example) is not None:
                objective.model.train()
            set_lr(optimizer, base_lrs, t.schedule, progress)
            values, ended, steps = a2c_update(objective, collector, optimizer, rl, progress)
            with frames.get_lock():
                frames.value += steps * env.frames_per_step
                now = frames.value
            reports.put(("update", rank, now, steps, values, [e.episode_return for e in ended], objective.cut))
    except BaseException:  # noqa: BLE001 - every failure must reach the main process, which stops the run
        reports.put(("error", rank, traceback.format_exc()))
        raise SystemExit(1) from None
    finally:
        if env is not None:
            env.close()


def train_a3c(spec: Spec, run_dir: Path, *, resume: bool, overwrite: bool, tensorboard: bool) -> RunResult:
    """:func:`graftnet.rl.train_rl` with ``rl.algorithm: a3c``."""
    assert spec.rl is not None and spec.train is not None
    rl, t = spec.rl, spec.train
    if t.optimizer != "adam":
        raise TrainingError("rl.algorithm 'a3c' shares Adam's statistics between workers: set train.optimizer: adam")
    if t.device != "cpu":
        raise TrainingError("rl.algorithm 'a3c' runs its workers on CPU: set train.device: cpu, or use algorithm a2c")
    saved = load_run(run_dir / CHECKPOINT_NAME) if check_run_dir(run_dir, spec, resume, overwrite) else None
    torch.manual_seed(t.seed)
    shape, actions = env_info(rl.env)
    probe = make_env(rl.env, 1, t.seed)
    frames_per_step = probe.frames_per_step
    probe.close()
    total_updates = math.ceil(rl.frames / (rl.rollout * rl.num_envs * frames_per_step))
    objective, example = build_agent(spec, shape, actions, total_steps=total_updates)
    objective.model.train()
    optimizer = make_optimizer(objective.param_groups(), t)
    start_frames, seconds, update = 0, 0.0, 0
    if saved is not None:
        meta = saved.meta
        resume_from(saved, objective, optimizer, example)
        start_frames, seconds, update = meta["frames"], meta["seconds"], meta["step"]
        if meta.get("finished"):
            return finish_rl(objective, spec, run_dir, torch.device("cpu"), start_frames, seconds)
    else:
        start_run_dir(run_dir, spec)
    g = objective.grafted
    g.share_memory()
    _share_optimizer_state(optimizer)

    ctx = mp.get_context("fork")  # workers inherit the shared model and optimizer without pickling them
    frames = ctx.Value("q", start_frames)
    stop = ctx.Event()
    reports = ctx.Queue()
    workers = [
        ctx.Process(target=_worker, args=(r, spec, objective, optimizer, example, frames, stop, reports, os.getpid()),
                    daemon=True)
        for r in range(rl.workers)
    ]
    columns = p_w_columns(g)
    metrics = MetricsLog(run_dir, RL_COLUMNS + columns, start_frames if saved else None, tensorboard, x="frames")
    ckpt = run_dir / CHECKPOINT_NAME
    flag = StopFlag()
    rows = ReturnLog(metrics, columns, rl, start_frames)
    now_frames, cut = start_frames, objective.cut
    began = time.perf_counter()

    def save(finished: bool = False) -> None:
        # Hogwild: the workers may be mid-step; the checkpoint holds the shared parameters as they are now.
        state = {"step": update, "frames": now_frames, "seconds": seconds + time.perf_counter() - began,
                 "teachers_cut": cut, "finished": finished}  # fmt: skip
        check_finite_state(g, f"{now_frames:,} frames", f"The last good checkpoint is {str(ckpt)!r}.")
        save_run(g, ckpt, optimizer, objective, state)

    failure = None
    try:
        with catching_signals(flag):
            for w in workers:
                w.start()
            while True:
                try:
                    report = reports.get(timeout=0.5)
                except queue.Empty:
                    # A worker's reports are in the pipe before it exits: nothing for 0.5 s after all exited is the end
                    # (Queue.empty() can say True while a report is still in flight).
                    if all(w.exitcode is not None for w in workers):
                        break
                    dead = [i for i, w in enumerate(workers) if w.exitcode not in (None, 0)]
                    if dead and failure is None:
                        failure = f"worker {dead[0]} exited with code {workers[dead[0]].exitcode} without a report"
                        stop.set()
                    if flag.signal is not None:
                        stop.set()
                    continue
                if report[0] == "error":
                    if failure is None:
                        failure = f"worker {report[1]} failed:\n{report[2]}"
                    stop.set()
                    continue
                _, _, reported_frames, steps, values, returns, worker_cut = report
                now_frames = max(now_frames, reported_frames)  # reports from different workers can cross
                update += 1
                cut = cut or worker_cut
                rows.add(values, returns, steps)
                if rows.due(now_frames):
                    lr = t.lr * lr_factor(t.schedule, now_frames / rl.frames)
                    elapsed = seconds + time.perf_counter() - began
                    rows.write(objective, frames=now_frames, update=update, seconds=elapsed, lr=lr, cut=cut)
                    save()
                if flag.signal is not None:
                    stop.set()
    finally:
        stop.set()
        for w in workers:
            w.join(timeout=30)
            if w.is_alive():
                w.terminate()
        metrics.close()
    seconds += time.perf_counter() - began
    began = time.perf_counter()
    if failure is not None or flag.signal is not None:
        save()
        if failure is not None:
            raise TrainingError(f"A3C stopped: {failure}\nThe checkpoint is kept in {str(ckpt)!r}.")
        return RunResult(run_dir, t.method, seconds=seconds, frames=now_frames, interrupted=flag.signal)
    if cut and not objective.cut:  # a worker cut its copy of the teachers: cut them here too
        g = objective.maybe_cut(1.0, example) or g
    save(finished=True)
    return finish_rl(objective, spec, run_dir, torch.device("cpu"), now_frames, seconds)
