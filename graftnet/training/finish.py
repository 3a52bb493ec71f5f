"""The end of every run: export the teacher-free student and say how much it still leaned on its teachers."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from graftnet.checkpoint import export
from graftnet.detach import detach, student_dependence
from graftnet.errors import NonFiniteError, TrainingError
from graftnet.graft import GraftedModel
from graftnet.training.run_dir import STUDENT_NAME

__all__ = ["ExportedStudent", "export_student"]


@dataclass(frozen=True)
class ExportedStudent:
    """The detached student (on the CPU), and p_w(student) at the end (or at the cut)."""

    student: nn.Module
    min_p_w_student: float | None  # None: the run had no mixers
    forced: bool  # some site was below 1 − tol, and the student was exported anyway


def export_student(
    g: GraftedModel, run_dir: Path, tol: float, dependence_at_cut: dict[str, float] | None = None
) -> ExportedStudent:
    """Write ``run_dir/student.safetensors`` (verified, see :func:`graftnet.export`) and return the student.

    A student that still relies on its teachers (p_w(student) < 1 − tol at some site) is exported anyway and
    the result says so: a finished run always leaves its student. After a teacher cut the model has no
    mixers left, and the p_w(student) reported is the one at the cut.

    The file is replaced only by one that was read back and verified (integrity hashes, equal to the student's
    state, finite, the same probe outputs); a failed export leaves no file behind and the previous student (of a
    resumed, finished run) as it was. Callers write ``results.json`` only after this returns, so a run folder
    never reports a student it does not hold.

    Raises:
        TrainingError: the student holds NaN/inf values or answers the probe batch with them (names the tensor):
            the run diverged, though its losses stayed finite (a tune counts it as a failed setting).
        CheckpointError: the file cannot be written or does not verify (says where and why).
    """
    dependence = student_dependence(g) or dict(dependence_at_cut or {})
    low = min(dependence.values(), default=1.0)
    forced = low < 1.0 - tol
    g.cpu()
    try:
        export(g, run_dir / STUDENT_NAME, tol=tol, force=forced, overwrite=True)
    except NonFiniteError as e:
        raise TrainingError(f"the trained student is numerically broken, so the run diverged: {e}") from e
    return ExportedStudent(detach(g, force=True), low if dependence else None, forced)
