"""Resolve a spec against traced models into an immutable plan (spec → **plan** → passes)."""

from __future__ import annotations

from dataclasses import dataclass

from graftnet._names import Activation, catalogue, resolve
from graftnet._trace import Traced
from graftnet.errors import NameResolutionError, SpecError
from graftnet.registry import closest
from graftnet.spec import Spec

__all__ = ["Plan", "SitePlan", "TapPlan", "TeacherPlan", "make_plan"]


@dataclass(frozen=True)
class TapPlan:
    teacher: str
    activation: Activation

    @property
    def name(self) -> str:
        return f"{self.teacher}:{self.activation.name}"


@dataclass(frozen=True)
class SitePlan:
    activation: Activation
    taps: tuple[TapPlan, ...]
    adapter: str

    @property
    def name(self) -> str:
        return self.activation.name


@dataclass(frozen=True)
class TeacherPlan:
    name: str
    taps: tuple[Activation, ...]  # distinct taps in execution order; the last is the deepest

    @property
    def runs(self) -> bool:
        return bool(self.taps)


@dataclass(frozen=True)
class Plan:
    sites: tuple[SitePlan, ...]
    teachers: tuple[TeacherPlan, ...]

    def teacher(self, name: str) -> TeacherPlan:
        return next(t for t in self.teachers if t.name == name)


def _resolve_all(
    traced: Traced, acts: dict[bool, list[Activation]], query: str, *, model_name: str, where: str
) -> Activation:
    """Resolve in every traced mode; a site must be the same activation in train and eval graphs."""
    found = {mode: resolve(query, acts[mode], traced, model_name=model_name, where=where) for mode in acts}
    names = {a.name for a in found.values()}
    if len(names) > 1:
        raise NameResolutionError(
            f"{where}: {query!r} names different activations in train mode and eval mode ({', '.join(sorted(names))}); "
            "name the activation itself rather than a parent module"
        )
    return found[False]


def make_plan(spec: Spec, student: Traced, teachers: dict[str, Traced]) -> Plan:
    """Resolve every site and tap name; check duplicates. Shapes must already be propagated."""
    sites: list[SitePlan] = []
    wanted: dict[str, dict[str, Activation]] = {name: {} for name in teachers}
    seen_sites: dict[str, int] = {}
    # Each model's activation list is derived once; every site and tap resolves against it.
    student_acts = {mode: catalogue(student, mode) for mode, _ in student.graphs()}
    teacher_acts = {name: catalogue(traced) for name, traced in teachers.items()}
    for i, site in enumerate(spec.sites):
        where = f"sites[{i}].student"
        act = _resolve_all(student, student_acts, site.student, model_name="the student", where=where)
        if act.node in seen_sites:
            j = seen_sites[act.node]
            raise SpecError(
                f"{where}: {site.student!r} resolves to activation {act.name!r}, which sites[{j}] already mixes; "
                "each activation can be one site only"
            )
        seen_sites[act.node] = i
        if act.shape is None:
            raise SpecError(f"{where}: the pre-activation of {act.name!r} is not a tensor; it cannot be a site")
        taps: list[TapPlan] = []
        for k, tap in enumerate(site.taps):
            t_where = f"sites[{i}].taps[{k}]"
            teacher, _, tap_name = tap.partition(":")
            if teacher not in teachers:
                near = closest(teacher, list(teachers))
                hint = f" Did you mean {near[0]!r}?" if near else ""
                raise SpecError(
                    f"{t_where}: tap {tap!r} names teacher {teacher!r}, which is not given.{hint} "
                    f"Teachers: {', '.join(sorted(teachers)) or '(none)'}"
                )
            t_act = resolve(tap_name, teacher_acts[teacher], teachers[teacher],
                            model_name=f"teacher {teacher!r}", where=t_where)  # fmt: skip
            if any(t.teacher == teacher and t.activation.node == t_act.node for t in taps):
                raise SpecError(f"{t_where}: tap {tap!r} is the same activation as another tap of this site")
            if t_act.shape is None:
                raise SpecError(f"{t_where}: the pre-activation of {tap!r} is not a tensor; it cannot be a tap")
            wanted[teacher][t_act.node] = t_act
            taps.append(TapPlan(teacher, t_act))
        sites.append(SitePlan(act, tuple(taps), site.adapter or spec.adapter))
    teacher_plans = []
    for name in teachers:
        order = {a.node: i for i, a in enumerate(teacher_acts[name])}
        taps_in_order = tuple(sorted(wanted[name].values(), key=lambda a: order[a.node]))
        teacher_plans.append(TeacherPlan(name, taps_in_order))
    return Plan(tuple(sites), tuple(teacher_plans))
