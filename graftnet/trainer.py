"""``graftnet train``: the supervised training loop shared by every method (DESIGN.md §6–7).

A run folder holds ``spec.json`` (the spec it was started with), ``run.json``, ``metrics.csv`` (one row
per epoch), TensorBoard logs under ``tb/``, ``checkpoint.safetensors`` (written atomically after every
epoch and on SIGINT/SIGTERM, with the optimizer and RNG states for an exact resume), and at the end the
exported teacher-free ``student.safetensors`` and ``results.json`` (its validation and test error).
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from graftnet.checkpoint import CHECKPOINT_NAME, TRAIN_STATE, export, read_checkpoint, save_checkpoint, spec_hash
from graftnet.data import Splits, batches, make_splits
from graftnet.detach import detach, student_dependence
from graftnet.distributed import World, setup, wrap
from graftnet.errors import SpecError, TrainingError
from graftnet.graft import GraftedModel
from graftnet.methods import METHODS, Method, logits_of
from graftnet.models import build_model
from graftnet.spec import Spec, load_spec

__all__ = ["RunResult", "evaluate", "predict", "task_splits", "train"]

STUDENT_NAME = "student.safetensors"
RESULTS_NAME = "results.json"
METRIC_COLUMNS = [
    "epoch", "step", "lr", "lambda1", "loss", "task_loss", "dep_loss", "kl_loss", "kd_loss",
    "train_acc", "val_loss", "val_acc", "teachers_cut", "seconds",
]  # fmt: skip
_LOSS_PARTS = ("loss", "task_loss", "dep_loss", "kl_loss", "kd_loss")
_SUMS = ("n", "correct", *_LOSS_PARTS)  # what an epoch's metrics add up over batches (and processes)
_STATE = TRAIN_STATE


@dataclass(frozen=True)
class RunResult:
    """How a run ended. Errors are those of the exported student evaluated alone, in percent."""

    run_dir: Path
    method: str
    epochs: int
    val_error: float | None
    test_error: float | None
    min_p_w_student: float | None
    forced_export: bool
    interrupted: str | None = None  # the signal's name when a signal stopped the run
    seconds: float = 0.0


@torch.no_grad()
def predict(model: nn.Module, data: Any, batch_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``model``'s class scores for every sample of ``data``, in eval mode (the mode is restored), and the labels."""
    was = model.training
    model.eval()
    outs, labels = [], []
    for x, y in batches(data, batch_size):
        outs.append(logits_of(model(x.to(device))).cpu())
        labels.append(y)
    model.train(was)
    return torch.cat(outs), torch.cat(labels)


def evaluate(model: nn.Module, data: Any, batch_size: int, device: torch.device) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``data``, per sample."""
    logits, labels = predict(model, data, batch_size, device)
    loss = float(torch.nn.functional.cross_entropy(logits, labels))
    return loss, float((logits.argmax(-1) == labels).float().mean())


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise SpecError(f"train.device: {e}") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SpecError(f"train.device: {name!r} asked for, but this machine has no CUDA device (use cpu or auto)")
    return device


def _default_lr_mixing(spec: Spec, total_steps: int) -> float:
    """Adam moves each logit w by about its learning rate per step, whatever the gradient's size, and
    p_w(student) ≥ 0.999 needs the student's logit ~7–10 above the teachers'. So by default w may move 20
    units over the λ1 ramp (FIELD-NOTES: a too-slow w leaves p_w(student) near 0.9 and the student alone fails),
    and never less than 10 × the student's learning rate."""
    t = spec.train
    assert t is not None
    ramp_steps = max(1.0, (t.lambda1.end - t.lambda1.start) * total_steps)
    return max(10 * t.lr, 20.0 / ramp_steps)


def _param_groups(g: GraftedModel, spec: Spec, total_steps: int) -> list[dict[str, Any]]:
    """Student, mixer logits w and adapters Q, each with its own learning rate (w never decays)."""
    t = spec.train
    assert t is not None
    groups: dict[str, list[nn.Parameter]] = {"student": [], "mixing": [], "adapters": []}
    for name, p in g.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("mixing.") and name.endswith(".logits"):
            groups["mixing"].append(p)
        elif name.startswith(("mixing.", "input_adapters.")):
            groups["adapters"].append(p)
        else:
            groups["student"].append(p)
    mixing_lr = t.lr_mixing or _default_lr_mixing(spec, total_steps)
    lrs = {"student": t.lr, "mixing": mixing_lr, "adapters": t.lr_adapters or t.lr}
    decay = {"student": t.weight_decay, "mixing": 0.0, "adapters": t.weight_decay}
    return [{"params": ps, "lr": lrs[k], "weight_decay": decay[k], "name": k} for k, ps in groups.items() if ps]


def _optimizer(groups: list[dict[str, Any]], spec: Spec) -> torch.optim.Optimizer:
    t = spec.train
    assert t is not None
    if t.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum, nesterov=t.momentum > 0)
    if t.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=t.lr)
    return torch.optim.Adam(groups, lr=t.lr)


def _lr_factor(schedule: str, progress: float) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))) if schedule == "cosine" else 1.0


# ---- checkpoints with the training state --------------------------------------------------------------------


def _pack(
    optimizer: torch.optim.Optimizer, method: Method, meta: dict[str, Any]
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Optimizer, RNG and method state as safetensors tensors plus JSON: one file holds the whole run state."""
    tensors: dict[str, torch.Tensor] = {}
    opt = optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for idx, slots in opt["state"].items():
        for key, value in slots.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{_STATE}optim.{idx}.{key}"] = value
            else:
                scalars.setdefault(str(idx), {})[key] = value
    tensors[f"{_STATE}rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"{_STATE}rng.cuda.{i}"] = s
    np_state: tuple[Any, ...] = tuple(np.random.get_state())
    tensors[f"{_STATE}rng.numpy"] = torch.from_numpy(np.asarray(np_state[1], dtype=np.int64))
    for name, t in method.extra_state().items():
        tensors[f"{_STATE}method.{name}"] = t
    state = {
        **meta,
        "optimizer_groups": opt["param_groups"],
        "optimizer_scalars": scalars,
        "rng_python": random.getstate(),
        "rng_numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    return tensors, state


def _unpack(
    tensors: dict[str, torch.Tensor], state: dict[str, Any], optimizer: torch.optim.Optimizer, method: Method
) -> None:
    opt_state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith(f"{_STATE}optim."):
            idx, slot = key[len(f"{_STATE}optim.") :].split(".", 1)
            opt_state.setdefault(int(idx), {})[slot] = value
    for idx, slots in state["optimizer_scalars"].items():
        opt_state.setdefault(int(idx), {}).update(slots)
    optimizer.load_state_dict({"state": opt_state, "param_groups": state["optimizer_groups"]})
    torch.set_rng_state(tensors[f"{_STATE}rng.torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith(f"{_STATE}rng.cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, keys, gauss = state["rng_python"]
    random.setstate((version, tuple(keys), gauss))
    name, pos, has_gauss, cached = state["rng_numpy"]
    np.random.set_state((name, tensors[f"{_STATE}rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    prefix = f"{_STATE}method."
    method.load_extra_state({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})


def _save_run_checkpoint(
    g: GraftedModel, path: Path, optimizer: torch.optim.Optimizer, method: Method, meta: dict[str, Any]
) -> None:
    tensors, state = _pack(optimizer, method, meta)
    save_checkpoint(g, path, extra={"train_state": state}, tensors=tensors)


# ---- signals ------------------------------------------------------------------------------------------------


class _StopFlag:
    """Set by SIGINT/SIGTERM: the loop finishes its step, saves, and returns."""

    def __init__(self) -> None:
        self.signal: str | None = None

    def __call__(self, signum: int, frame: Any) -> None:
        self.signal = signal.Signals(signum).name


@contextmanager
def _catching_signals(flag: _StopFlag) -> Iterator[None]:
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be installed from the main thread
        return
    previous = {s: signal.signal(s, flag) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


# ---- metrics ------------------------------------------------------------------------------------------------


class _Metrics:
    """metrics.csv (one row per epoch, or per logging interval of ``x``) and TensorBoard scalars against ``x``."""

    def __init__(
        self, run_dir: Path, columns: list[str], keep_up_to: int | None, tensorboard: bool, x: str = "epoch"
    ) -> None:
        self.path = run_dir / "metrics.csv"
        self.columns = columns
        self.x = x
        rows: list[dict[str, str]] = []
        if keep_up_to is not None and self.path.exists():  # resuming: drop rows newer than the checkpoint
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


def _p_w_columns(g: GraftedModel) -> list[str]:
    return [f"p_w/{site}/{cand}" for site, row in g.p_w().items() for cand in row]


def _p_w_row(g: GraftedModel, columns: list[str]) -> dict[str, float]:
    """Current p_w; once the teachers are cut the student is on its own (p_w(student) = 1)."""
    current = {f"p_w/{s}/{c}": p for s, row in g.p_w().items() for c, p in row.items()}
    return {c: current.get(c, 1.0 if c.endswith("/student") else 0.0) for c in columns}


# ---- the loop -----------------------------------------------------------------------------------------------


def task_splits(spec: Spec) -> Splits:
    """The data of ``spec.data``, checked against the spec's ``input_shape``."""
    d = spec.data
    assert d is not None
    splits = make_splits(
        d.dataset, d.kwargs, classes=d.classes, label_map=d.label_map, train_size=d.train_size,
        val_size=d.val_size, augment=d.augment, shuffle_labels=d.shuffle_labels, seed=d.seed,
    )  # fmt: skip
    if spec.input_shape is not None and tuple(spec.input_shape) != tuple(splits.input_shape):
        raise SpecError(
            f"input_shape: the spec says {list(spec.input_shape)} but {d.dataset} samples are "
            f"{list(splits.input_shape)}; fix input_shape or drop it (it is taken from the data)"
        )
    return splits


def _train_ban(
    spec: Spec, run_dir: Path, resume: bool, overwrite: bool, splits: Splits | None, **kwargs: Any
) -> RunResult:
    """A ``ban`` run: a folder of generation runs (see :mod:`graftnet.ban`)."""
    from graftnet.ban import train_ban

    _check_run_dir(run_dir, spec, resume, overwrite, "spec.json")
    splits = splits or task_splits(spec)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "spec.json").write_text(json.dumps(spec.model_dump(mode="json"), indent=2))
    result: RunResult = train_ban(spec, run_dir, splits, resume=resume, **kwargs)
    return result


def _check_run_dir(run_dir: Path, spec: Spec, resume: bool, overwrite: bool, marker: str) -> bool:
    """Whether to resume the run in ``run_dir`` (whose ``marker`` file must exist, and whose spec must be
    ``spec``); refuses to clobber a run by accident."""
    if resume:
        if not (run_dir / marker).is_file():
            raise TrainingError(
                f"--resume: {str(run_dir / marker)!r} does not exist; nothing to resume (drop --resume to start)"
            )
        saved = run_dir / "spec.json"
        if not saved.is_file() or spec_hash(load_spec(json.loads(saved.read_text()))) != spec_hash(spec):
            raise TrainingError(
                f"--resume: the spec differs from the one {str(run_dir)!r} was started with ({saved}); "
                "resume with the same spec, or start a new run folder"
            )
        return True
    if run_dir.exists() and any(run_dir.iterdir()) and not overwrite:
        raise TrainingError(
            f"run folder {str(run_dir)!r} is not empty; pass --resume to continue it or --overwrite to start over"
        )
    return False


def train(
    spec: Spec | dict[str, Any] | str | Path,
    run_dir: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    tensorboard: bool = True,
    on_step: Callable[[int], None] | None = None,
    splits: Splits | None = None,
) -> RunResult:
    """Train the spec's student with its method, then export and evaluate the student alone.

    Args:
        spec: a spec with ``student``, ``data`` and ``train`` sections (and teachers and sites for the
            methods that use them). A spec with an ``rl`` section instead of ``data`` trains by reinforcement
            learning (:func:`graftnet.rl.train_rl`) and returns a :class:`graftnet.rl.RLRunResult`.
        run_dir: the run folder (created).
        resume: continue the run in ``run_dir`` exactly where its checkpoint stopped.
        overwrite: start over in a run folder that is not empty.
        progress: show a progress bar.
        tensorboard: write TensorBoard logs under ``run_dir/tb``.
        on_step: called with the global step after every optimizer step.
        splits: data to use instead of building ``spec.data`` (the demo shares one dataset between runs).

    Returns:
        A :class:`RunResult`; ``interrupted`` names the signal if SIGINT/SIGTERM stopped the run (its
        checkpoint is saved and ``resume=True`` continues it).

    Raises:
        GraftError: anything wrong with the spec, data, models or run folder, before training starts;
            :class:`TrainingError` if the loss stops being finite (the last good checkpoint is kept).

    Examples:
        >>> r = train("specs/mnist1d_knowledge_flow.yaml", "runs/kf")   # doctest: +SKIP
        >>> r.test_error                                                 # doctest: +SKIP
    """
    spec = given = load_spec(spec)  # type: ignore[arg-type]
    if spec.rl is not None:
        from graftnet.rl import train_rl

        return train_rl(spec, Path(run_dir), resume=resume, overwrite=overwrite, progress=progress,  # type: ignore[return-value]
                        tensorboard=tensorboard)  # fmt: skip
    for section in ("student", "data", "train"):
        if getattr(spec, section) is None:
            raise SpecError(f"{section}: graftnet train needs a '{section}' section in the spec")
    assert given.student is not None and spec.data is not None and spec.train is not None
    t = spec.train
    run_dir = Path(run_dir)
    if t.method == "ban":
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise TrainingError(
                "train.method 'ban' does not run under torchrun yet; train its generations with several processes "
                "one by one (method born_again), or run the sequence in one process"
            )
        return _train_ban(spec, run_dir, resume, overwrite, splits, progress=progress, tensorboard=tensorboard,
                          on_step=on_step)  # fmt: skip
    device = _device(t.device)
    world = setup(device.type)
    if world.size > 1 and device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
    try:
        return _train(spec, given, run_dir, resume, overwrite, progress, tensorboard, on_step, splits, device, world)
    finally:
        world.close()


def _train(
    spec: Spec, given: Spec, run_dir: Path, resume: bool, overwrite: bool, progress: bool, tensorboard: bool,
    on_step: Callable[[int], None] | None, splits: Splits | None, device: torch.device, world: World,
) -> RunResult:  # fmt: skip
    """:func:`train` for one method in one run folder, in this process of ``world``."""
    assert given.student is not None and spec.data is not None and spec.train is not None
    t, d = spec.train, spec.data
    saved = None
    if _check_run_dir(run_dir, spec, resume, overwrite, CHECKPOINT_NAME):
        tensors, meta = read_checkpoint(run_dir / CHECKPOINT_NAME)
        saved = {"tensors": tensors, "meta": meta}
    world.barrier()  # every process has checked the run folder before rank 0 writes into it

    # Everything that can fail on bad input happens here, before the first step.
    splits = splits or task_splits(spec)
    spec = spec.model_copy(update={"input_shape": list(splits.input_shape)})
    if t.threads is not None:
        torch.set_num_threads(t.threads)
    random.seed(t.seed)
    np.random.seed(t.seed % 2**32)
    torch.manual_seed(t.seed)
    student = build_model(given.student.model, given.student.kwargs, given.student.weights)
    example = next(batches(splits.val, 8))[0]
    method = METHODS.get(t.method)(spec)
    g = method.build(student, example)
    with torch.no_grad():
        logits = logits_of(g.eval()(example))
    if logits.shape[1] != splits.num_classes:
        raise TrainingError(
            f"student.kwargs: the student outputs {logits.shape[1]} classes but the task has {splits.num_classes}; "
            "set the student's num_classes to match data.classes"
        )
    g.train().to(device)
    method.to(device)
    steps_per_epoch = math.ceil(len(splits.train) / d.batch_size)  # type: ignore[arg-type]
    total_steps = t.epochs * steps_per_epoch
    optimizer = _optimizer(_param_groups(g, spec, total_steps), spec)
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    p_w_columns = _p_w_columns(g)

    epoch, batch_in_epoch, step, seconds = 0, 0, 0, 0.0
    sums: dict[str, float] = {}
    if saved is not None:
        meta = saved["meta"]["train_state"]
        if meta.get("teachers_cut"):
            g = method.maybe_cut(g, 1.0, example.to(device)) or g
        g.load_state_dict({k: v for k, v in saved["tensors"].items() if not k.startswith(_STATE)}, strict=False)
        _unpack(saved["tensors"], meta, optimizer, method)
        epoch, batch_in_epoch, step = meta["epoch"], meta["batch"], meta["step"]
        sums, seconds = (meta["sums"] if world.main else {}), meta["seconds"]  # the saved sums are global
        if meta.get("finished"):
            return _finish(g, spec, splits, run_dir, device, epoch, seconds, t.method, method.dependence_at_cut, world)
    elif world.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        for name in (CHECKPOINT_NAME, STUDENT_NAME, RESULTS_NAME):
            (run_dir / name).unlink(missing_ok=True)
        (run_dir / "spec.json").write_text(json.dumps(given.model_dump(mode="json"), indent=2))
        label = t.label or run_dir.name
        (run_dir / "run.json").write_text(json.dumps({"method": t.method, "label": label, "seed": t.seed}, indent=2))
    if world.size > 1:  # same weights everywhere (DDP broadcasts them too), but each process its own randomness
        torch.manual_seed(int(torch.randint(2**62, (1,))) + world.rank)
    world.barrier()
    metrics = None
    if world.main:
        metrics = _Metrics(run_dir, METRIC_COLUMNS + p_w_columns, epoch if saved is not None else None, tensorboard)
    ckpt = run_dir / CHECKPOINT_NAME
    flag = _StopFlag()
    forward = wrap(g, world, device)

    def save(finished: bool = False) -> None:
        """Rank 0 writes the checkpoint (with the epoch's metric sums over every process); all wait for it."""
        state_now = {"epoch": epoch, "batch": batch_in_epoch, "step": step, "sums": world.sum(sums, _SUMS),
                     "seconds": seconds, "teachers_cut": method.cut, "finished": finished}  # fmt: skip
        if world.main:
            _save_run_checkpoint(g, ckpt, optimizer, method, state_now)
        world.barrier()

    def stopped() -> RunResult:
        return RunResult(run_dir, t.method, epoch, None, None, None, False, flag.signal or "SIGTERM", seconds)

    bar = None
    if progress and world.main:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=step, desc=f"{t.method} {run_dir.name}", unit="step", leave=False)
    try:
        with _catching_signals(flag):
            while epoch < t.epochs:
                started = time.perf_counter()
                cut = method.maybe_cut(g, epoch / t.epochs, example.to(device))
                if cut is not None:
                    g = cut.train().to(device)
                    forward = wrap(g, world, device)
                generator = torch.Generator().manual_seed(t.seed * 1_000_003 + epoch)
                data = batches(splits.train, d.batch_size, shuffle=True, generator=generator, skip=batch_in_epoch,
                               train=True, num_workers=d.num_workers, shard=(world.rank, world.size))  # fmt: skip
                for x, y in data:
                    x, y = x.to(device), y.to(device)
                    progress_now = step / total_steps
                    for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
                        group["lr"] = base * _lr_factor(t.schedule, progress_now)
                    result = method.loss(g, x, y, progress_now, forward)
                    # one device-to-host copy per step for the finiteness check and every logged number
                    named = {"loss": result.total, **result.parts}
                    correct = (result.logits.detach().argmax(-1) == y).sum()
                    host = torch.stack([*(v.detach().float() for v in named.values()), correct.float()]).tolist()
                    *values, n_correct = host
                    values_now = dict(zip(named, values, strict=True))
                    # every process takes the same branch: a bad loss anywhere stops them all
                    if world.any(not math.isfinite(values_now["loss"]))[0]:
                        parts = ", ".join(f"{k}={v:.4g}" for k, v in values_now.items() if k != "loss")
                        raise TrainingError(
                            f"the loss is not finite at epoch {epoch + 1}, step {step + 1} ({parts}); training "
                            f"stopped. The last good checkpoint is {str(ckpt)!r}"
                            + (" (none was written yet)" if not ckpt.exists() else "")
                            + ". Lower train.lr or train.lambda1.final, or check the data for NaN/inf."
                        )
                    optimizer.zero_grad(set_to_none=True)
                    result.total.backward()
                    method.before_step(g, step)
                    optimizer.step()
                    step += 1
                    batch_in_epoch += 1
                    n = len(y)
                    sums["n"] = sums.get("n", 0) + n
                    sums["correct"] = sums.get("correct", 0) + int(n_correct)
                    for k, v in values_now.items():
                        sums[k] = sums.get(k, 0.0) + v * n
                    if bar is not None:
                        bar.update(1)
                        mean_loss, acc = sums["loss"] / sums["n"], sums["correct"] / sums["n"]
                        bar.set_postfix(loss=f"{mean_loss:.3f}", acc=f"{acc:.3f}")
                    if on_step is not None:
                        on_step(step)
                    if world.any(flag.signal is not None)[0]:  # a signal to any process stops them all
                        seconds += time.perf_counter() - started
                        save()
                        return stopped()
                val_loss, val_acc = evaluate(g, splits.val, d.eval_batch_size, device) if world.main else (0.0, 0.0)
                seconds += time.perf_counter() - started
                epoch += 1
                totals = world.sum(sums, _SUMS)
                n_seen = max(totals.get("n", 0), 1)
                row: dict[str, Any] = {
                    "epoch": epoch, "step": step, "lr": optimizer.param_groups[0]["lr"],
                    "lambda1": method.lambda1(step / total_steps),
                    "train_acc": totals.get("correct", 0) / n_seen, "val_loss": val_loss, "val_acc": val_acc,
                    "teachers_cut": int(method.cut), "seconds": seconds,
                    **{k: (totals[k] / n_seen if k in totals else None) for k in _LOSS_PARTS},
                    **_p_w_row(g, p_w_columns),
                }  # fmt: skip
                if metrics is not None:
                    metrics.write(row)
                batch_in_epoch, sums = 0, {}
                save(finished=epoch == t.epochs)
                if world.any(flag.signal is not None)[0]:
                    return stopped()
    finally:
        if metrics is not None:
            metrics.close()
        if bar is not None:
            bar.close()
    return _finish(g, spec, splits, run_dir, device, epoch, seconds, t.method, method.dependence_at_cut, world)


def _finish(
    g: GraftedModel, spec: Spec, splits: Splits, run_dir: Path, device: torch.device, epochs: int, seconds: float,
    method: str, dependence_at_cut: dict[str, float], world: World,
) -> RunResult:  # fmt: skip
    """Export the student (forced, and said so, if it still leans on its teachers) and evaluate it alone.

    After a teacher cut the model has no mixers left; the p_w(student) reported is then the one at the cut.
    """
    assert spec.train is not None and spec.data is not None
    if not world.main:  # rank 0 exports and evaluates; the others wait for it
        world.barrier()
        return RunResult(run_dir, method, epochs, None, None, None, False, seconds=seconds)
    dependence = student_dependence(g) or dependence_at_cut
    low = min(dependence.values(), default=1.0)
    forced = low < 1.0 - spec.train.export_tol
    g.cpu()
    export(g, run_dir / STUDENT_NAME, tol=spec.train.export_tol, force=forced, overwrite=True)
    student = detach(g, force=True).to(device)
    _, val_acc = evaluate(student, splits.val, spec.data.eval_batch_size, device)
    _, test_acc = evaluate(student, splits.test, spec.data.eval_batch_size, device)
    result = RunResult(
        run_dir, method, epochs, 100 * (1 - val_acc), 100 * (1 - test_acc), low if dependence else None, forced,
        seconds=seconds,
    )  # fmt: skip
    payload = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(result).items()}
    (run_dir / RESULTS_NAME).write_text(json.dumps(payload, indent=2))
    world.barrier()
    return result

