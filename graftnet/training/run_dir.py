"""The run folder: what a training run writes, and the rules for starting, resuming and overwriting one.

A run folder holds ``spec.json`` (the spec it was started with), ``run.json`` (method, label, seed),
``metrics.csv``, TensorBoard logs under ``tb/``, ``checkpoint.safetensors`` (written atomically, with the
whole training state) and, once finished, the exported teacher-free ``student.safetensors`` and
``results.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

from graftnet.checkpoint import CHECKPOINT_NAME, spec_hash
from graftnet.errors import TrainingError
from graftnet.spec import Spec, load_spec

__all__ = ["CHECKPOINT_NAME", "RESULTS_NAME", "SPEC_NAME", "STUDENT_NAME", "check_run_dir", "start_run_dir"]

STUDENT_NAME = "student.safetensors"
RESULTS_NAME = "results.json"
SPEC_NAME = "spec.json"


def check_run_dir(run_dir: Path, spec: Spec, resume: bool, overwrite: bool, marker: str = CHECKPOINT_NAME) -> bool:
    """Whether to resume the run in ``run_dir``; refuses to clobber a run by accident.

    Resuming needs ``run_dir/marker`` and a saved spec equal to ``spec``; starting needs an empty (or absent)
    folder unless ``overwrite``.

    Raises:
        TrainingError: nothing to resume, a resume with another spec, or a folder that is not empty.
    """
    if resume:
        if not (run_dir / marker).is_file():
            raise TrainingError(
                f"--resume: {str(run_dir / marker)!r} does not exist; nothing to resume (drop --resume to start)"
            )
        saved = run_dir / SPEC_NAME
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


def start_run_dir(run_dir: Path, spec: Spec) -> None:
    """Create ``run_dir`` for a new run: remove an earlier run's checkpoint and results, write the spec and run.json."""
    run_dir.mkdir(parents=True, exist_ok=True)
    for name in (CHECKPOINT_NAME, STUDENT_NAME, RESULTS_NAME):
        (run_dir / name).unlink(missing_ok=True)
    (run_dir / SPEC_NAME).write_text(json.dumps(spec.model_dump(mode="json"), indent=2))
    t = spec.train
    run = {"method": t.method, "label": t.label or run_dir.name, "seed": t.seed} if t is not None else {}
    (run_dir / "run.json").write_text(json.dumps(run, indent=2))
