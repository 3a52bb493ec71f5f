"""``graftnet train SPEC``: a spec's own data or environment, trained with the building blocks of graftnet.training.

One entry for every kind of run a spec describes: a spec with ``data`` trains by :func:`graftnet.fit` on the
dataset it names, ``train.method: ban`` runs a born-again sequence (:func:`graftnet.training.ban.train_ban`),
and a spec with ``rl`` trains an agent (:func:`graftnet.rl.train_rl`, needs the ``rl`` extra).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from graftnet.data import Splits, task_splits
from graftnet.errors import SpecError, TrainingError
from graftnet.spec import Spec, load_spec
from graftnet.training.ban import train_ban
from graftnet.training.results import RunResult
from graftnet.training.supervised import fit

__all__ = ["train"]


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
        spec: a spec with ``student``, ``data`` and ``train`` sections (and teachers and sites for the methods
            that use them), or ``rl`` instead of ``data`` to train by reinforcement learning.
        run_dir: the run folder (created).
        resume: continue the run in ``run_dir`` exactly where its checkpoint stopped.
        overwrite: start over in a run folder that is not empty.
        progress: show a progress bar. tensorboard: write TensorBoard logs under ``run_dir/tb``.
        on_step: called with the global step after every optimizer step (supervised runs).
        splits: data to use instead of building ``spec.data`` (the demo shares one dataset between runs).

    Returns:
        A :class:`~graftnet.training.results.RunResult`.

    Raises:
        GraftError: anything wrong with the spec, data, models or run folder, before training starts;
            :class:`TrainingError` if the loss stops being finite (the last good checkpoint is kept).

    Examples:
        >>> r = train("specs/mnist1d_knowledge_flow.yaml", "runs/kf")   # doctest: +SKIP
        >>> r.test_error                                                 # doctest: +SKIP
    """
    spec = load_spec(spec)
    run_dir = Path(run_dir)
    if spec.rl is not None:
        from graftnet.rl import train_rl  # the rl extra is optional: import it only for RL specs

        return train_rl(spec, run_dir, resume=resume, overwrite=overwrite, progress=progress, tensorboard=tensorboard)
    for section in ("student", "data", "train"):
        if getattr(spec, section) is None:
            raise SpecError(f"{section}: graftnet train needs a '{section}' section in the spec")
    assert spec.train is not None
    kwargs: dict[str, Any] = {"progress": progress, "tensorboard": tensorboard, "on_step": on_step}
    if spec.train.method == "ban":
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise TrainingError(
                "train.method 'ban' does not run under torchrun yet; train its generations with several processes "
                "one by one (method born_again), or run the sequence in one process"
            )
        return train_ban(spec, run_dir, splits or task_splits(spec), resume=resume, overwrite=overwrite, **kwargs)
    splits = splits or task_splits(spec)
    return fit(None, None, spec, train=splits.train, val=splits.val, test=splits.test, num_classes=splits.num_classes,
               run_dir=run_dir, resume=resume, overwrite=overwrite, **kwargs)  # fmt: skip
