"""The resumable state of a run: model, optimizer, random generators and the objective's own tensors.

Everything lives in the run's one ``checkpoint.safetensors``: tensors under ``train_state.`` keys beside the
model's, scalars as JSON metadata. Restoring it continues a run bit for bit (supervised runs also record
where in the epoch they stopped).
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from graftnet.checkpoint import CHECKPOINT_NAME, TRAIN_STATE, read_checkpoint, save_checkpoint
from graftnet.errors import CheckpointError
from graftnet.graft import GraftedModel

__all__ = [
    "ResumableObjective",
    "SavedRun",
    "StatefulObjective",
    "load_run",
    "restore",
    "resume_from",
    "save_run",
    "seed_everything",
]


class StatefulObjective(Protocol):
    """What a checkpoint needs of an objective: its extra tensors (θ_old, p_w at the cut) and the cut."""

    cut: bool

    def extra_state(self) -> dict[str, torch.Tensor]: ...

    def load_extra_state(self, tensors: dict[str, torch.Tensor]) -> None: ...


class ResumableObjective(StatefulObjective, Protocol):
    """What :func:`resume` needs besides: the step counter, the grafted model, and the teacher cut."""

    steps: int

    @property
    def grafted(self) -> GraftedModel: ...

    def maybe_cut(self, progress: float | None = None, example: torch.Tensor | None = None) -> GraftedModel | None: ...


class SavedRun:
    """A checkpoint read back: the model's tensors, the training-state tensors and the metadata ``meta``."""

    def __init__(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any], path: Path | None = None) -> None:
        self.path = path  # the file it was read from, for error messages
        self.tensors = tensors
        self.meta = meta  # the trainer's state: epoch/step/frames, seconds, teachers_cut, finished, …

    @property
    def model_state(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.tensors.items() if not k.startswith(TRAIN_STATE)}


def _run_file(path: str | Path) -> str:
    path = Path(path)
    return str(path / CHECKPOINT_NAME if path.is_dir() else path)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_index(text: str) -> bool:
    return text.isascii() and text.isdigit()


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# What each trainer reads back on resume (supervised.fit; rl.trainer and rl.a3c), beside the common entries.
_COUNTERS = {"supervised": ("epoch", "batch"), "rl": ("frames",)}
_RNG_TENSORS = {f"{TRAIN_STATE}rng.torch": torch.uint8, f"{TRAIN_STATE}rng.numpy": torch.int64}
_MT_WORDS = 624  # the Mersenne Twister's state, numpy's and Python's alike (Python adds the position: 625)


def _check_run(where: str, state: Any, tensors: dict[str, torch.Tensor]) -> None:
    """Refuse a train_state that restore() or a trainer could not use, naming the entry (or tensor)."""

    def bad(key: str, want: str) -> CheckpointError:
        got = "missing" if isinstance(state, dict) and key not in state else repr(state.get(key))[:80]
        return CheckpointError(
            f"{where}: metadata key graftnet.train_state.{key} must be {want}, but it is {got}; the checkpoint is "
            "damaged or was not written by a graftnet trainer — resume from another checkpoint, or start again"
        )

    if not isinstance(state, dict):
        raise CheckpointError(
            f"{where}: metadata key graftnet.train_state must be an object, but it is {type(state).__name__}; the "
            "checkpoint is damaged — resume from another checkpoint, or start again"
        )
    if not _is_count(state.get("step")):
        raise bad("step", "a count (an integer >= 0)")
    if not _is_number(state.get("seconds")) or state["seconds"] < 0:
        raise bad("seconds", "a number of seconds >= 0")
    kind = "supervised" if "epoch" in state else "rl" if "frames" in state else None
    if kind is None:
        raise bad("epoch", "the epoch (supervised runs) — or train_state.frames must give the frames (RL runs)")
    for key in _COUNTERS[kind]:
        if not _is_count(state.get(key)):
            raise bad(key, "a count (an integer >= 0)")
    if kind == "supervised":
        sums = state.get("sums")
        if not isinstance(sums, dict) or not all(_is_number(v) for v in sums.values()):
            raise bad("sums", "an object of finite numbers (the epoch's metric sums)")
    for key in ("teachers_cut", "finished"):
        if key in state and not isinstance(state[key], bool):
            raise bad(key, "true or false")
    groups = state.get("optimizer_groups")
    if not isinstance(groups, list) or not all(
        isinstance(g, dict) and isinstance(g.get("params"), list) and all(_is_count(p) for p in g["params"])
        for g in groups
    ):
        raise bad("optimizer_groups", "a list of parameter groups, each with its 'params' indices")
    scalars = state.get("optimizer_scalars")
    if not isinstance(scalars, dict) or not all(_is_index(k) and isinstance(v, dict) for k, v in scalars.items()):
        raise bad("optimizer_scalars", "an object from parameter index to that parameter's scalar state")
    rng = state.get("rng_python")
    if not (
        isinstance(rng, list) and len(rng) == 3 and isinstance(rng[0], int) and isinstance(rng[1], list)
        and len(rng[1]) == _MT_WORDS + 1 and all(_is_count(k) and k < 2**32 for k in rng[1])
        and (rng[2] is None or _is_number(rng[2]))
    ):  # fmt: skip
        raise bad("rng_python", "Python's random state: [version, 625 words, gauss]")
    rng = state.get("rng_numpy")
    if not (
        isinstance(rng, list) and len(rng) == 4 and isinstance(rng[0], str) and _is_count(rng[1])
        and _is_count(rng[2]) and _is_number(rng[3])
    ):  # fmt: skip
        raise bad("rng_numpy", "numpy's random state: [name, position, has_gauss, cached_gaussian]")
    for name, dtype in _RNG_TENSORS.items():
        t = tensors.get(name)
        if t is None or t.dtype != dtype or t.ndim != 1:
            got = "missing" if t is None else f"{t.dtype} of shape {list(t.shape)}"
            raise CheckpointError(
                f"{where}: tensor {name!r} (a random generator's state) must be a 1-D {dtype} tensor, but it is "
                f"{got}; the checkpoint is damaged or was not written by a graftnet trainer"
            )
    if tensors[f"{TRAIN_STATE}rng.numpy"].numel() != _MT_WORDS:
        raise CheckpointError(f"{where}: tensor '{TRAIN_STATE}rng.numpy' must hold {_MT_WORDS} words")
    prefix = f"{TRAIN_STATE}optim."
    for name in tensors:
        idx, dot, slot = name[len(prefix) :].partition(".")
        if name.startswith(prefix) and not (_is_index(idx) and dot and slot):
            raise CheckpointError(f"{where}: tensor {name!r} must be named {prefix}INDEX.SLOT (the optimizer's state)")


def load_run(path: str | Path, *, allow_unverified: bool = False) -> SavedRun:
    """The checkpoint at ``path`` (a file or run folder), verified, for :func:`restore`.

    Beside :func:`graftnet.checkpoint.read_checkpoint`'s checks (integrity hashes, finite tensors), the
    trainer's state must be whole: the counters (``step``, ``seconds``, and ``epoch``/``batch``/``sums`` or
    ``frames``), the optimizer's groups and scalars, and every random generator's state.

    Raises:
        CheckpointError: an unreadable, damaged or unverifiable checkpoint, or one without a usable
            ``train_state`` (names the missing or malformed entry or tensor).
    """
    tensors, meta = read_checkpoint(path, allow_unverified=allow_unverified)
    where = _run_file(path)
    if "train_state" not in meta:
        raise CheckpointError(
            f"{where}: metadata key graftnet.train_state is missing: the file holds a model but no trainer state "
            "(written by save_checkpoint, not by a run), so it cannot resume a run; start the run again"
        )
    _check_run(where, meta["train_state"], tensors)
    return SavedRun(tensors, meta["train_state"], Path(where))


def save_run(
    g: GraftedModel, path: Path, optimizer: torch.optim.Optimizer, objective: StatefulObjective, meta: dict[str, Any]
) -> None:
    """Write ``g`` with the optimizer, RNG and objective state, and ``meta``, atomically to ``path``."""
    tensors: dict[str, torch.Tensor] = {}
    opt = optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for idx, slots in opt["state"].items():
        for key, value in slots.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{TRAIN_STATE}optim.{idx}.{key}"] = value
            else:
                scalars.setdefault(str(idx), {})[key] = value
    tensors[f"{TRAIN_STATE}rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"{TRAIN_STATE}rng.cuda.{i}"] = s
    np_state: tuple[Any, ...] = tuple(np.random.get_state())
    tensors[f"{TRAIN_STATE}rng.numpy"] = torch.from_numpy(np.asarray(np_state[1], dtype=np.int64))
    for name, t in objective.extra_state().items():
        tensors[f"{TRAIN_STATE}method.{name}"] = t
    state = {
        **meta,
        "optimizer_groups": opt["param_groups"],
        "optimizer_scalars": scalars,
        "rng_python": random.getstate(),
        "rng_numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    save_checkpoint(g, path, extra={"train_state": state}, tensors=tensors)


def restore(saved: SavedRun, g: GraftedModel, optimizer: torch.optim.Optimizer, objective: StatefulObjective) -> None:
    """Load a :class:`SavedRun` into the model, the optimizer, the random generators and the objective.

    Raises:
        CheckpointError: the saved state does not fit this run (its model's tensors, its optimizer's groups)
            or a generator refuses its saved state.
    """
    where = f"checkpoint {str(saved.path)!r}" if saved.path is not None else "the checkpoint"
    expected = {k for k in g.state_dict() if not k.startswith("teachers.")}
    model_state = saved.model_state
    missing, unexpected = sorted(expected - set(model_state)), sorted(set(model_state) - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{where} does not fit this run's model: missing {missing[:5]}, unexpected {unexpected[:5]}; was the run "
            "folder started with another model? Start the run again with --overwrite"
        )
    try:
        _restore(saved, g, optimizer, objective)
    except CheckpointError:
        raise
    # What torch, random and numpy raise for a state that is well-formed but does not fit (another optimizer's
    # groups, a generator state of the wrong length): load_run checked the form, only the fit is left.
    except (ValueError, TypeError, KeyError, IndexError, RuntimeError, OverflowError) as e:
        raise CheckpointError(
            f"the trainer state in {where} does not fit this run: {type(e).__name__}: {e}; resume from another "
            "checkpoint, or start the run again with --overwrite"
        ) from e


def _restore(saved: SavedRun, g: GraftedModel, optimizer: torch.optim.Optimizer, objective: StatefulObjective) -> None:
    g.load_state_dict(saved.model_state, strict=False)
    tensors, state = saved.tensors, saved.meta
    opt_state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith(f"{TRAIN_STATE}optim."):
            idx, slot = key[len(f"{TRAIN_STATE}optim.") :].split(".", 1)
            opt_state.setdefault(int(idx), {})[slot] = value
    for idx, slots in state["optimizer_scalars"].items():
        opt_state.setdefault(int(idx), {}).update(slots)
    optimizer.load_state_dict({"state": opt_state, "param_groups": state["optimizer_groups"]})
    torch.set_rng_state(tensors[f"{TRAIN_STATE}rng.torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith(f"{TRAIN_STATE}rng.cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, keys, gauss = state["rng_python"]
    random.setstate((version, tuple(keys), gauss))
    name, pos, has_gauss, cached = state["rng_numpy"]
    np.random.set_state((name, tensors[f"{TRAIN_STATE}rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    prefix = f"{TRAIN_STATE}method."
    objective.load_extra_state({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})


def resume_from(
    saved: SavedRun, objective: ResumableObjective, optimizer: torch.optim.Optimizer, example: torch.Tensor
) -> GraftedModel:
    """Continue a run from ``saved``: cut the teachers first if the run had (``example`` re-traces the student),
    then :func:`restore` the model, optimizer, generators and objective, and set the step counter.

    Returns:
        The model to train on from here (the plain student once the teachers are cut).
    """
    if saved.meta.get("teachers_cut"):
        objective.maybe_cut(1.0, example)
    restore(saved, objective.grafted, optimizer, objective)
    objective.steps = saved.meta["step"]
    return objective.grafted


def seed_everything(seed: int) -> None:
    """Seed the three generators a run's checkpoint saves and restores: Python's, numpy's and torch's."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
