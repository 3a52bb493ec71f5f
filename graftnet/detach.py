"""``graftnet.detach``: cut the teachers away and return the plain student (docs/architecture.md)."""

from __future__ import annotations

import copy

from torch import nn

from graftnet.errors import DetachError
from graftnet.graft import GraftedModel

__all__ = ["detach", "student_dependence"]


def student_dependence(g: GraftedModel) -> dict[str, float]:
    """``{site: p_w(student)}`` for every site."""
    return {site: row["student"] for site, row in g.p_w().items()}


def detach(g: GraftedModel, tol: float = 1e-3, *, force: bool = False) -> nn.Module:
    """The trained student alone: its own class and weights, no mixers, adapters or teachers.

    The graft never changes the student's structure (mixing lives in the grafted graph), so the
    detached student is a copy of ``g.student``: its ``state_dict()`` has exactly the original keys and
    loads ``strict=True`` into a freshly built student, and its outputs equal ``g``'s at p_w(student)=1.

    Args:
        g: a grafted model.
        tol: every site must have p_w(student) ≥ 1 − tol.
        force: detach anyway (the student then loses what the teachers still contributed).

    Raises:
        DetachError: some site is below 1 − tol; lists each site's p_w(student) and the gap.

    Examples:
        >>> student = detach(g, tol=1e-3)                  # doctest: +SKIP
        >>> # or detach, verify on a probe batch and write the file in one:
        >>> graftnet.export(g, "student.safetensors")      # doctest: +SKIP
    """
    if not isinstance(g, GraftedModel):
        raise DetachError(f"detach() takes a GraftedModel from graftnet.graft(), got a {type(g).__name__}")
    if not 0.0 <= tol < 1.0:
        raise DetachError(f"tol must lie in [0, 1), got {tol}")
    dependence = student_dependence(g)
    below = {site: p for site, p in dependence.items() if p < 1.0 - tol}
    if below and not force:
        rows = "\n".join(
            f"  {site}: p_w(student) = {p:.6f}  (gap {1.0 - tol - p:.2e} below 1 - tol = {1.0 - tol})"
            for site, p in dependence.items()
            if site in below
        )
        ok = len(dependence) - len(below)
        raise DetachError(
            f"{len(below)} of {len(dependence)} sites still rely on teachers ({ok} are independent):\n{rows}\n"
            "Train longer or with a larger dependency weight (lambda1), raise tol, or pass force=True "
            "(the student then loses what the teachers contributed)."
        )
    return copy.deepcopy(g.student)
