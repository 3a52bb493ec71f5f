"""``graftnet.fit``: supervised training of your modules on your data, with graftnet's run folder around it.

``fit`` takes the student and teachers as modules (or model references), the data as Datasets or
DataLoaders, and a spec with the graft and ``train`` sections; it trains with the method's
:class:`~graftnet.training.objectives.Objective`, writes the run folder (:mod:`graftnet.training.run_dir`),
checkpoints every epoch (resumable bit for bit), stops cleanly on SIGINT/SIGTERM, and ends by exporting the
teacher-free student and scoring it alone on the validation and test data. ``graftnet train`` is this
function with the spec's own data (:func:`graftnet.launch.train`).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, default_collate

from graftnet.data import batches
from graftnet.distributed import World, resolve_device, setup, wrap
from graftnet.errors import SpecError, TrainingError
from graftnet.models import build_model
from graftnet.spec import Spec, load_spec, override_spec, read_spec_file
from graftnet.training.evaluation import check_labels, eval_batches, evaluate, logits_of, pair
from graftnet.training.finish import export_student
from graftnet.training.guards import check_finite_state
from graftnet.training.metrics import MetricsLog, p_w_columns, p_w_row
from graftnet.training.objectives import METHODS, Objective
from graftnet.training.optim import make_optimizer, set_lr
from graftnet.training.results import RunResult
from graftnet.training.run_dir import CHECKPOINT_NAME, RESULTS_NAME, check_run_dir, start_run_dir
from graftnet.training.signals import StopFlag, catching_signals
from graftnet.training.state import SavedRun, load_run, resume_from, save_run, seed_everything

__all__ = ["METRIC_COLUMNS", "fit"]

METRIC_COLUMNS = [
    "epoch", "step", "lr", "lambda1", "loss", "task_loss", "dep_loss", "kl_loss", "kd_loss", "hint_loss",
    "train_acc", "val_loss", "val_acc", "teachers_cut", "seconds",
]  # fmt: skip
_LOSS_PARTS = ("loss", "task_loss", "dep_loss", "kl_loss", "kd_loss", "hint_loss")
_SUMS = ("n", "correct", *_LOSS_PARTS)  # what an epoch's metrics add up over batches (and processes)

Data = Dataset[Any] | DataLoader[Any]


def _spec_for(spec: Spec | Mapping[str, Any] | str | Path | None, teachers: Mapping[str, Any] | None) -> Spec:
    """The spec, with a ``train`` section (defaults if absent) and an entry for every teacher module given."""
    for name, module in (teachers or {}).items():
        if not isinstance(module, nn.Module):
            raise TrainingError(f"teacher {name!r} is a {type(module).__name__}, not a torch.nn.Module")
    missing = [name for name in teachers or {} if not isinstance(spec, Spec) or name not in spec.teachers]
    if isinstance(spec, Spec) and spec.train is not None and not missing:
        return spec
    if isinstance(spec, Spec):
        raw: dict[str, Any] = spec.model_dump(mode="json")
    elif isinstance(spec, (str, Path)):
        raw = read_spec_file(Path(spec)) or {}
        if not isinstance(raw, dict):
            raise SpecError(f"invalid spec {spec}: the top level must be a mapping, got {type(raw).__name__}")
    else:
        raw = dict(spec or {})
    if raw.get("train") is None:
        raw["train"] = {}
    declared = dict(raw.get("teachers") or {})
    for name in teachers or {}:
        declared.setdefault(name, {})
    if declared:
        raw["teachers"] = declared
    return load_spec(raw)


def _steps_per_epoch(data: Data, batch_size: int) -> int:
    if isinstance(data, DataLoader):
        try:
            n = len(data)
        except TypeError as e:
            raise TrainingError(
                "train: the DataLoader has no length (an IterableDataset?); fit needs the number of batches per "
                "epoch for its schedules — give a map-style Dataset or a DataLoader over one"
            ) from e
    else:
        try:
            n = math.ceil(len(data) / batch_size)  # type: ignore[arg-type]
        except TypeError as e:
            raise TrainingError(f"train: a {type(data).__name__} has no length; give a map-style Dataset") from e
    if n < 1:
        raise TrainingError("train: the training data is empty")
    return n


@contextlib.contextmanager
def _batching(where: str) -> Iterator[None]:
    """Names the split when its samples cannot be collated into a batch (PIL images without a transform, say)."""
    try:
        yield
    except TypeError as e:
        raise TrainingError(
            f"{where}: its samples cannot be made into a batch ({e}); have the Dataset return tensors (with a "
            "transform such as torchvision's ToTensor), or give a DataLoader whose collate_fn makes them"
        ) from e


def _train_batches(
    data: Data, batch_size: int, epoch: int, seed: int, skip: int, num_workers: int, world: World
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of training batches: a Dataset shuffled by (seed, epoch), or the DataLoader's own order."""
    if isinstance(data, DataLoader):
        # The loader's order is its own: a mid-epoch resume skips as many batches as were trained on.
        for item in itertools.islice(data, skip, None):
            yield pair(item, "train")
        return
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    for item in batches(data, batch_size, shuffle=True, generator=generator, skip=skip, train=True,
                        num_workers=num_workers, shard=(world.rank, world.size)):  # fmt: skip
        yield pair(item, "train")


def fit(
    student: nn.Module | str | None = None,
    teachers: Mapping[str, nn.Module] | None = None,
    spec: Spec | Mapping[str, Any] | str | Path | None = None,
    *,
    train: Data,
    val: Data,
    test: Data | None = None,
    run_dir: str | Path,
    num_classes: int | None = None,
    batch_size: int | None = None,
    eval_batch_size: int | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    tensorboard: bool = True,
    on_step: Callable[[int], None] | None = None,
    compile: bool | None = None,  # noqa: A002 - the name of the setting it overrides
    precision: str | None = None,
) -> RunResult:
    """Train ``student`` with the method of ``spec.train`` on your data, then export it and score it alone.

    Args:
        student: the student module, a model reference (``"timm:resnet18"``), or None for ``spec.student``.
        teachers: ``{name: module}`` (trained, with their weights loaded); None builds the spec's teachers.
        spec: the graft (``sites`` …) and ``train`` sections as a :class:`Spec`, dict or YAML/JSON path.
            Teachers passed as modules need no entry in it. A ``data`` section is not needed (its batch
            sizes are used when present).
        train, val, test: Datasets of ``(input, label)`` or DataLoaders yielding such batches. Validation and
            test data are used as given; ``test`` may be None (no test error is reported). Each is checked
            before anything is written (a training DataLoader at its first batch, so as not to move its RNG):
            other samples (dicts, inputs that cannot be batched) are a :class:`TrainingError` naming the split.
            Labels are class indices of any integer dtype (used as int64); soft, one-hot or float labels, and
            labels outside the student's classes, are named the same way.
        run_dir: the run folder (created).
        num_classes: the task's class count, checked against the student's output (default: not checked
            beyond the labels of each batch).
        batch_size, eval_batch_size: batch sizes for Datasets (default ``spec.data`` or 64 and 512).
        resume: continue the run in ``run_dir`` from its checkpoint. With Datasets the resume is exact, even
            mid-epoch; with a DataLoader the interrupted epoch goes on in the loader's own order, skipping as
            many batches as were trained on (exact only if the loader's order repeats).
        overwrite: start over in a run folder that is not empty.
        progress: show a progress bar. tensorboard: write TensorBoard logs under ``run_dir/tb``.
        on_step: called with the global step after every optimizer step.
        compile, precision: override ``train.compile`` (torch.compile the model and the θ_old pass) and
            ``train.precision`` (``fp32``, ``bf16`` or ``fp16`` autocast).

    Returns:
        A :class:`RunResult` with the exported student's validation and test error (%). ``interrupted`` names
        the signal if SIGINT/SIGTERM stopped the run; its checkpoint is saved and ``resume=True`` continues it.

    Raises:
        GraftError: anything wrong with the spec, models, data or run folder, before the first step;
            :class:`TrainingError` if the loss stops being finite (the last good checkpoint is kept).

    Examples:
        >>> result = graftnet.fit(student, {"big": teacher}, spec, train=train_set, val=val_set,  # doctest: +SKIP
        ...                       test=test_set, run_dir="runs/kf")
        >>> result.test_error                                                                       # doctest: +SKIP
    """
    spec = _spec_for(spec, teachers)
    fast = {k: v for k, v in {"compile": compile, "precision": precision}.items() if v is not None}
    if fast:
        spec = override_spec(spec, {f"train.{k}": v for k, v in fast.items()})
    assert spec.train is not None
    if spec.train.method == "ban":
        raise TrainingError(
            "train.method 'ban' is a sequence of runs: train it with graftnet train (graftnet.train), or run its "
            "generations one by one with method born_again"
        )
    if student is None and spec.student is None:
        raise SpecError("student: fit() got no student module, so the spec must name its model")
    if student is not None and not isinstance(student, (str, nn.Module)):
        raise TrainingError(f"the student is a {type(student).__name__}, not a torch.nn.Module or model reference")
    device = resolve_device(spec.train.device)
    world = setup(device.type)
    if world.size > 1 and device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
    if world.size > 1 and isinstance(train, DataLoader):
        world.close()
        raise TrainingError(
            "under torchrun fit shards the training data itself: give train as a Dataset, not a DataLoader"
        )
    try:
        return _fit(student, teachers, spec, Path(run_dir), train, val,
                    test, num_classes, batch_size, eval_batch_size, resume, overwrite, progress, tensorboard, on_step,
                    device, world)  # fmt: skip
    finally:
        world.close()


def _fit(
    student: nn.Module | str | None, teachers: Mapping[str, nn.Module] | None, spec: Spec, run_dir: Path,
    train_data: Data, val_data: Data, test_data: Data | None, num_classes: int | None, batch_size: int | None,
    eval_batch_size: int | None, resume: bool, overwrite: bool, progress: bool, tensorboard: bool,
    on_step: Callable[[int], None] | None, device: torch.device, world: World,
) -> RunResult:  # fmt: skip
    """:func:`fit` in this process of ``world``."""
    assert spec.train is not None
    t, d = spec.train, spec.data
    given = spec
    bs = batch_size or (d.batch_size if d is not None else 64)
    eval_bs = eval_batch_size or (d.eval_batch_size if d is not None else 512)
    num_workers = d.num_workers if d is not None else 0
    saved: SavedRun | None = None
    if check_run_dir(run_dir, spec, resume, overwrite):
        saved = load_run(run_dir / CHECKPOINT_NAME)
    world.barrier()  # every process has checked the run folder before rank 0 writes into it

    # Everything that can fail on bad input happens here, before the first step.
    with _batching("val"):
        example = next(eval_batches(val_data, 8, "val"), None)
    if example is None:
        raise TrainingError("val: the validation data is empty")
    example_x = example[0][:8]
    check_labels(example[1], "val")
    if test_data is not None:
        with _batching("test"):
            first = next(eval_batches(test_data, 8, "test"), None)
        if first is None:
            raise TrainingError("test: the test data is empty; pass test=None to report no test error")
        check_labels(first[1], "test")
    steps_per_epoch = _steps_per_epoch(train_data, bs)
    if not isinstance(train_data, DataLoader):
        # a Dataset's first sample, collated as its batches will be, before anything is written (a DataLoader is
        # not read ahead: that would move its shuffling RNG)
        with _batching("train"):
            _, first_label = pair(default_collate([train_data[0]]), "train")
        check_labels(first_label, "train")
    spec = spec.model_copy(update={"input_shape": list(example_x.shape[1:])})
    if t.threads is not None:
        torch.set_num_threads(t.threads)
    seed_everything(t.seed)
    if isinstance(student, str):  # built after seeding, so its initialisation follows train.seed
        student = build_model(student, where="student")
    elif student is None:
        assert spec.student is not None  # fit() checked
        student = build_model(spec.student.model, spec.student.kwargs, spec.student.weights, where="student")
    total_steps = t.epochs * steps_per_epoch
    objective = METHODS.get(t.method).from_spec(spec, student, example_x, teachers=teachers, total_steps=total_steps)
    g = objective.model
    with torch.no_grad():
        outputs = logits_of(g.eval()(example_x)).shape[1]
    if num_classes is not None and outputs != num_classes:
        raise TrainingError(
            f"student.kwargs: the student outputs {outputs} classes but the task has {num_classes}; "
            "set the student's num_classes to match data.classes"
        )
    g.train()
    objective.to(device)
    optimizer = make_optimizer(objective.param_groups(), t)
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    columns = p_w_columns(objective.grafted)

    epoch, batch_in_epoch, seconds = 0, 0, 0.0
    sums: dict[str, float] = {}
    if saved is not None:
        meta = saved.meta
        g = resume_from(saved, objective, optimizer, example_x.to(device))
        epoch, batch_in_epoch = meta["epoch"], meta["batch"]
        sums, seconds = (meta["sums"] if world.main else {}), meta["seconds"]  # the saved sums are global
        if meta.get("finished"):
            return _finish(objective, spec, run_dir, val_data, test_data, eval_bs, device, epoch, seconds, world)
    elif world.main:
        start_run_dir(run_dir, given)
    if world.size > 1:  # same weights everywhere (DDP broadcasts them too), but each process its own randomness
        torch.manual_seed(int(torch.randint(2**62, (1,))) + world.rank)
    world.barrier()
    metrics = MetricsLog(run_dir, METRIC_COLUMNS + columns, epoch if saved else None, tensorboard) if (
        world.main) else None  # fmt: skip
    ckpt = run_dir / CHECKPOINT_NAME
    flag = StopFlag()
    objective.runner = wrap(g, world, device)

    def save(finished: bool = False) -> None:
        """Rank 0 writes the checkpoint (with the epoch's metric sums over every process); all wait for it."""
        state_now = {"epoch": epoch, "batch": batch_in_epoch, "step": objective.steps, "sums": world.sum(sums, _SUMS),
                     "seconds": seconds, "teachers_cut": objective.cut, "finished": finished}  # fmt: skip
        if world.main:
            check_finite_state(objective.model, f"epoch {epoch}, step {objective.steps}", _keep_hint(ckpt))
            save_run(objective.grafted, ckpt, optimizer, objective, state_now)
        world.barrier()

    def stopped() -> RunResult:
        return RunResult(run_dir, t.method, epoch, interrupted=flag.signal or "SIGTERM", seconds=seconds)

    bar = None
    if progress and world.main:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=objective.steps, desc=f"{t.method} {run_dir.name}", unit="step",
                   leave=False)  # fmt: skip
    checked_labels = False
    try:
        with catching_signals(flag):
            while epoch < t.epochs:
                started = time.perf_counter()
                if objective.maybe_cut(epoch / t.epochs, example_x.to(device)) is not None:
                    g = objective.model.train().to(device)
                    objective.runner = wrap(g, world, device)
                for x, y in _train_batches(train_data, bs, epoch, t.seed, batch_in_epoch, num_workers, world):
                    x, y = x.to(device), y.to(device)
                    if not checked_labels:
                        check_labels(y, "train", outputs)
                        checked_labels = True
                    progress_now = objective.steps / total_steps
                    set_lr(optimizer, base_lrs, t.schedule, progress_now)
                    result = objective.loss(x, y, progress_now)
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
                            f"the loss is not finite at epoch {epoch + 1}, step {objective.steps + 1} ({parts}); "
                            f"training stopped. {_keep_hint(ckpt)} Lower train.lr or train.lambda1.final, or check the "
                            "data for NaN/inf."
                        )
                    optimizer.zero_grad(set_to_none=True)
                    objective.backward(result.total)
                    objective.step(optimizer)
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
                        on_step(objective.steps)
                    if world.any(flag.signal is not None)[0]:  # a signal to any process stops them all
                        seconds += time.perf_counter() - started
                        save()
                        return stopped()
                g = objective.model
                val_loss, val_acc = evaluate(g, val_data, eval_bs, device, "val") if world.main else (0.0, 0.0)
                if world.any(not math.isfinite(val_loss))[0]:
                    raise TrainingError(
                        f"the validation loss is not finite after epoch {epoch + 1} ({val_loss}); training stopped. "
                        f"{_keep_hint(ckpt)} Check the validation data for NaN/inf, or lower train.lr."
                    )
                seconds += time.perf_counter() - started
                epoch += 1
                totals = world.sum(sums, _SUMS)
                n_seen = max(totals.get("n", 0), 1)
                row: dict[str, Any] = {
                    "epoch": epoch, "step": objective.steps, "lr": optimizer.param_groups[0]["lr"],
                    "lambda1": objective.lambda1(objective.steps / total_steps),
                    "train_acc": totals.get("correct", 0) / n_seen, "val_loss": val_loss, "val_acc": val_acc,
                    "teachers_cut": int(objective.cut), "seconds": seconds,
                    **{k: (totals[k] / n_seen if k in totals else None) for k in _LOSS_PARTS},
                    **p_w_row(objective.grafted, columns),
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
    return _finish(objective, spec, run_dir, val_data, test_data, eval_bs, device, epoch, seconds, world)


def _keep_hint(ckpt: Path) -> str:
    return f"The last good checkpoint is {str(ckpt)!r}" + ("." if ckpt.exists() else " (none was written yet).")


def _finish(
    objective: Objective, spec: Spec, run_dir: Path, val_data: Data, test_data: Data | None, eval_bs: int,
    device: torch.device, epochs: int, seconds: float, world: World,
) -> RunResult:  # fmt: skip
    """Export the student (forced, and said so, if it still leans on its teachers) and evaluate it alone."""
    assert spec.train is not None
    method = spec.train.method
    if not world.main:  # rank 0 exports and evaluates; the others wait for it
        world.barrier()
        return RunResult(run_dir, method, epochs, seconds=seconds)
    exported = export_student(objective.grafted, run_dir, spec.train.export_tol, objective.dependence_at_cut)
    student = exported.student.to(device)
    _, val_acc = evaluate(student, val_data, eval_bs, device, "val")
    test_error = None
    if test_data is not None:
        _, test_acc = evaluate(student, test_data, eval_bs, device, "test")
        test_error = 100 * (1 - test_acc)
    result = RunResult(run_dir, method, epochs, 100 * (1 - val_acc), test_error, exported.min_p_w_student,
                       exported.forced, seconds=seconds)  # fmt: skip
    result.write(run_dir / RESULTS_NAME)
    world.barrier()
    return result
