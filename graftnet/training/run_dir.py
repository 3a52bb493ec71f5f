"""The run folder: what a training run writes, and the rules for starting, resuming and overwriting one.

A run folder holds ``spec.json`` (the spec it was started with), ``run.json`` (method, label, seed, the
command line and the versions of graftnet, Python and its libraries),
``metrics.csv``, TensorBoard logs under ``tb/``, ``checkpoint.safetensors`` (written atomically, with the
whole training state) and, once finished, the exported teacher-free ``student.safetensors`` and
``results.json``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from graftnet.checkpoint import CHECKPOINT_NAME, remove_stale_temporaries
from graftnet.errors import GraftError, TrainingError
from graftnet.provenance import command_line, versions
from graftnet.spec import Spec, load_spec

__all__ = [
    "CHECKPOINT_NAME", "RESULTS_NAME", "SPEC_NAME", "STUDENT_NAME", "check_run_dir", "spec_differences",
    "start_run_dir",
]  # fmt: skip

STUDENT_NAME = "student.safetensors"
RESULTS_NAME = "results.json"
SPEC_NAME = "spec.json"


def spec_differences(run_dir: Path, spec: Spec, limit: int = 4) -> list[str]:
    """The first ``limit`` settings (dotted keys) in which ``run_dir/spec.json`` differs from ``spec``; empty when
    the run was started with ``spec``. The file is compared as written, every setting spelled out: re-read, a
    setting it lacks (written before that setting existed) would take today's default, which need not be what the
    run trained with.

    Raises:
        OSError, ValueError, GraftError: ``spec.json`` cannot be read, or is not a valid spec.
    """
    recorded = json.loads((run_dir / SPEC_NAME).read_text())
    load_spec(recorded)  # a damaged file is an error, not "another spec"
    return _differences(recorded, json.loads(json.dumps(spec.model_dump(mode="json"))), "")[:limit]


def _differences(recorded: Any, current: Any, where: str) -> list[str]:
    if isinstance(recorded, dict) and isinstance(current, dict):
        return [d for k in sorted(set(recorded) | set(current), key=str)
                for d in _differences(recorded.get(k, _MISSING), current.get(k, _MISSING), f"{where}{k}.")]  # fmt: skip
    if recorded == current:
        return []
    return [f"{where[:-1]} ({_shown(recorded)} in the run, {_shown(current)} now)"]


_MISSING = object()


def _shown(value: Any) -> str:
    return "missing" if value is _MISSING else json.dumps(value)


def check_run_dir(run_dir: Path, spec: Spec, resume: bool, overwrite: bool, marker: str = CHECKPOINT_NAME) -> bool:
    """Whether to resume the run in ``run_dir``; refuses to clobber a run by accident.

    Resuming needs a saved spec equal to ``spec``, and ``run_dir/marker``; a run that stopped before writing
    its first checkpoint (same spec, no marker yet) has nothing to lose and starts again from the beginning.
    Starting needs an empty (or absent) folder unless ``overwrite``. Leftover temporary files of interrupted
    writes are removed.

    Raises:
        TrainingError: nothing to resume, a resume with another spec, or a folder that is not empty.
    """
    saved = run_dir / SPEC_NAME
    if resume:
        if not saved.is_file():
            raise TrainingError(
                f"--resume: {str(run_dir)!r} holds no run ({SPEC_NAME} is missing); nothing to resume (drop --resume "
                "to start)"
            )
        try:
            differences = spec_differences(run_dir, spec)
        except (OSError, ValueError, GraftError) as e:  # unreadable or damaged spec.json
            raise TrainingError(
                f"--resume: cannot read the spec {str(run_dir)!r} was started with ({saved}): {e}; start again with "
                "--overwrite"
            ) from e
        if differences:
            raise TrainingError(
                f"--resume: the spec differs from the one {str(run_dir)!r} was started with ({saved}): "
                f"{'; '.join(differences)}. Resume with the same spec, or start a new run folder"
            )
        remove_stale_temporaries(run_dir)  # what an interrupted write left behind is never part of the state
        return (run_dir / marker).is_file()  # no checkpoint yet: the run starts again, nothing is lost
    if run_dir.exists() and any(run_dir.iterdir()) and not overwrite:
        raise TrainingError(
            f"run folder {str(run_dir)!r} is not empty; pass --resume to continue it (a run stopped before its first "
            "checkpoint then starts again), or --overwrite to start over"
        )
    return False


# What a run writes: --overwrite removes these (and nothing else a user may keep in the folder).
_RUN_FILES = (CHECKPOINT_NAME, STUDENT_NAME, RESULTS_NAME, SPEC_NAME, "run.json", "metrics.csv")


def start_run_dir(run_dir: Path, spec: Spec) -> None:
    """Create ``run_dir`` for a new run: remove an earlier run's files and logs, write the spec and run.json."""
    run_dir.mkdir(parents=True, exist_ok=True)
    for name in _RUN_FILES:
        (run_dir / name).unlink(missing_ok=True)
    shutil.rmtree(run_dir / "tb", ignore_errors=True)  # old TensorBoard events would mix with the new run's
    remove_stale_temporaries(run_dir)
    (run_dir / SPEC_NAME).write_text(json.dumps(spec.model_dump(mode="json"), indent=2))
    t = spec.train
    run = {"method": t.method, "label": t.label or run_dir.name, "seed": t.seed} if t is not None else {}
    run |= {"command": command_line(), "versions": versions()}  # so a fresh install can check the figures
    (run_dir / "run.json").write_text(json.dumps(run, indent=2))
