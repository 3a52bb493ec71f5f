"""A3C (Mnih et al. 2016), as the knowledge-flow paper trains its Atari agents: Hogwild worker processes.

The grafted model's parameters and Adam's statistics live in shared memory; every worker (a forked process
with one thread and its own environments) computes the actor-critic loss of its rollouts on the shared
parameters and steps the shared optimizer, lock-free. The main process only watches: it writes metrics and
checkpoints from what the workers report, and stops them all — keeping the checkpoint — if one fails.
"""

from __future__ import annotations

import math
import queue
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

from graftnet.checkpoint import CHECKPOINT_NAME
from graftnet.errors import TrainingError
from graftnet.graft import GraftedModel
from graftnet.methods import Method
from graftnet.rl.a2c import Collector, a2c_update
from graftnet.rl.envs import env_info, make_env
from graftnet.rl.trainer import (
    RL_COLUMNS,
    RLRunResult,
    _finish,
    _restore,
    _Rows,
    _saved_run,
    _start_run_dir,
    build_agent,
)
from graftnet.spec import Spec
from graftnet.trainer import (
    _catching_signals,
    _lr_factor,
    _Metrics,
    _optimizer,
    _p_w_columns,
    _param_groups,
    _save_run_checkpoint,
    _StopFlag,
)

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


def _worker(
    rank: int, spec: Spec, g: GraftedModel, method: Method, optimizer: torch.optim.Optimizer, example: torch.Tensor,
    frames: Any, stop: Any, reports: Any,
) -> None:  # fmt: skip
    """One A3C learner: its own environments and RNG, the shared model and optimizer."""
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
        step = 0
        while not stop.is_set():
            with frames.get_lock():
                done_frames = frames.value
            if done_frames >= rl.frames:
                break
            progress = done_frames / rl.frames
            cut = method.maybe_cut(g, progress, example)
            if cut is not None:
                g = cut.train()
            for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
                group["lr"] = base * _lr_factor(t.schedule, progress)
            values, ended, steps = a2c_update(g, method, collector, optimizer, rl, progress, step)
            step += 1
            with frames.get_lock():
                frames.value += steps * env.frames_per_step
                now = frames.value
            reports.put(("update", rank, now, steps, values, [e.episode_return for e in ended], method.cut))
    except BaseException:  # noqa: BLE001 - every failure must reach the main process, which stops the run
        reports.put(("error", rank, traceback.format_exc()))
        raise SystemExit(1) from None
    finally:
        if env is not None:
            env.close()


def train_a3c(spec: Spec, run_dir: Path, *, resume: bool, overwrite: bool, tensorboard: bool) -> RLRunResult:
    """:func:`graftnet.rl.train_rl` with ``rl.algorithm: a3c``."""
    assert spec.rl is not None and spec.train is not None
    rl, t = spec.rl, spec.train
    if t.optimizer != "adam":
        raise TrainingError("rl.algorithm 'a3c' shares Adam's statistics between workers: set train.optimizer: adam")
    if t.device != "cpu":
        raise TrainingError("rl.algorithm 'a3c' runs its workers on CPU: set train.device: cpu, or use algorithm a2c")
    saved = _saved_run(run_dir, spec, resume, overwrite)
    torch.manual_seed(t.seed)
    shape, actions = env_info(rl.env)
    g, method, example = build_agent(spec, shape, actions)
    g.train()
    probe = make_env(rl.env, 1, t.seed)
    frames_per_step = probe.frames_per_step
    probe.close()
    total_updates = math.ceil(rl.frames / (rl.rollout * rl.num_envs * frames_per_step))
    optimizer = _optimizer(_param_groups(g, spec, total_updates), spec)
    start_frames, seconds, update = 0, 0.0, 0
    if saved is not None:
        g = _restore(g, method, optimizer, saved, example)
        meta = saved["meta"]
        start_frames, seconds, update = meta["frames"], meta["seconds"], meta["step"]
        if meta.get("finished"):
            return _finish(g, spec, run_dir, torch.device("cpu"), start_frames, seconds, method)
    else:
        _start_run_dir(run_dir, spec)
    g.share_memory()
    _share_optimizer_state(optimizer)

    ctx = mp.get_context("fork")  # workers inherit the shared model and optimizer without pickling them
    frames = ctx.Value("q", start_frames)
    stop = ctx.Event()
    reports = ctx.Queue()
    workers = [
        ctx.Process(target=_worker, args=(r, spec, g, method, optimizer, example, frames, stop, reports), daemon=True)
        for r in range(rl.workers)
    ]
    p_w_columns = _p_w_columns(g)
    metrics = _Metrics(run_dir, RL_COLUMNS + p_w_columns, start_frames if saved else None, tensorboard, x="frames")
    ckpt = run_dir / CHECKPOINT_NAME
    flag = _StopFlag()
    rows = _Rows(metrics, p_w_columns, rl, start_frames)
    now_frames, cut = start_frames, method.cut
    began = time.perf_counter()

    def save(finished: bool = False) -> None:
        # Hogwild: the workers may be mid-step; the checkpoint holds the shared parameters as they are now.
        state = {"step": update, "frames": now_frames, "seconds": seconds + time.perf_counter() - began,
                 "teachers_cut": cut, "finished": finished}  # fmt: skip
        _save_run_checkpoint(g, ckpt, optimizer, method, state)

    failure = None
    try:
        with _catching_signals(flag):
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
                    lr = t.lr * _lr_factor(t.schedule, now_frames / rl.frames)
                    elapsed = seconds + time.perf_counter() - began
                    rows.write(g, method, frames=now_frames, update=update, seconds=elapsed, lr=lr, cut=cut)
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
        return RLRunResult(run_dir, t.method, now_frames, seconds, interrupted=flag.signal)
    if cut and not method.cut:
        g = method.maybe_cut(g, 1.0, example) or g
    save(finished=True)
    return _finish(g, spec, run_dir, torch.device("cpu"), now_frames, seconds, method)
