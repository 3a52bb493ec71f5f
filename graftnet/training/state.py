"""The resumable state of a run: model, optimizer, random generators and the objective's own tensors.

Everything lives in the run's one ``checkpoint.safetensors``: tensors under ``train_state.`` keys beside the
model's, scalars as JSON metadata. Restoring it continues a run bit for bit (supervised runs also record
where in the epoch they stopped).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from graftnet.checkpoint import TRAIN_STATE, read_checkpoint, save_checkpoint
from graftnet.graft import GraftedModel

__all__ = ["SavedRun", "StatefulObjective", "load_run", "restore", "save_run"]


class StatefulObjective(Protocol):
    """What a checkpoint needs of an objective: its extra tensors (θ_old, p_w at the cut) and the cut."""

    cut: bool

    def extra_state(self) -> dict[str, torch.Tensor]: ...

    def load_extra_state(self, tensors: dict[str, torch.Tensor]) -> None: ...


class SavedRun:
    """A checkpoint read back: the model's tensors, the training-state tensors and the metadata ``meta``."""

    def __init__(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        self.tensors = tensors
        self.meta = meta  # the trainer's state: epoch/step/frames, seconds, teachers_cut, finished, …

    @property
    def model_state(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.tensors.items() if not k.startswith(TRAIN_STATE)}


def load_run(path: str | Path) -> SavedRun:
    """The checkpoint at ``path`` (a file or run folder), for :func:`restore`."""
    tensors, meta = read_checkpoint(path)
    return SavedRun(tensors, meta["train_state"])


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
    """Load a :class:`SavedRun` into the model, the optimizer, the random generators and the objective."""
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
