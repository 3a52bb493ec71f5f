"""Human-readable reports of a graft: what ``graftnet check`` and ``graftnet nodes`` print."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from graftnet.graft import FrozenTeacher, GraftedModel, SiteInfo

__all__ = ["describe", "sites_table"]


def _count(n: int) -> str:
    return f"{n:,}"


def _module_name(module: nn.Module) -> str:
    if isinstance(module, nn.Identity):
        return "identity"
    if isinstance(module, nn.Sequential):  # an adapter chain: layout moves around the mapping that learns
        return " → ".join(_module_name(m) for m in module)
    return type(module).__name__


def describe(g: GraftedModel) -> str:
    """The resolved plan: per site its candidates, shapes, adapters and added parameters; per teacher
    which top-level layers run and which truncation cut."""
    plan = g.plan
    student_params = sum(p.numel() for p in g.student.parameters())
    lines = [f"student: {type(g.student).__name__}, {_count(student_params)} parameters"]
    lines.append("teachers:")
    for t in plan.teachers:
        if not t.runs:
            lines.append(f"  {t.name}: not tapped — never runs")
            continue
        ft = g.teachers[t.name]
        assert isinstance(ft, FrozenTeacher)
        input_note = f", input adapter {_module_name(g.input_adapters[t.name])}" if t.name in g.input_adapters else ""
        grad = " (runs with autograd for its learned input adapter)" if ft.needs_input_grad else ""
        lines.append(
            f"  {t.name}: deepest tap {t.taps[-1].name}; runs {_count(ft.parameters_run)} of "
            f"{_count(ft.parameters_total)} parameters{input_note}{grad}"
        )
        lines.append(f"      runs: {', '.join(ft.children_run) or '-'}")
        lines.append(f"      cut:  {', '.join(ft.children_cut) or '(nothing: the deepest tap is at the end)'}")
    lines.append(f"sites ({len(plan.sites)}):")
    total = 0
    for site_plan in plan.sites:
        mixer = g.mixers[site_plan.name]
        added = sum(p.numel() for p in mixer.parameters())
        total += added
        p_w = mixer.p_w().tolist()
        inplace = ", in-place" if site_plan.activation.inplace else ""
        lines.append(f"  {site_plan.name}  ({site_plan.activation.kind}{inplace})")
        width = max(len(c) for c in mixer.candidates)
        site_act = site_plan.activation
        lines.append(
            f"      {'student'.ljust(width)}  {str(site_act.shape):<16} {str(site_act.layout):<14} p_w={p_w[0]:.3f}"
        )
        for i, (tap, adapter) in enumerate(zip(site_plan.taps, list(mixer.adapters), strict=True)):
            params = sum(p.numel() for p in adapter.parameters())
            lines.append(
                f"      {tap.name.ljust(width)}  {str(tap.activation.shape):<16} {str(tap.activation.layout):<14} "
                f"p_w={p_w[i + 1]:.3f}  "
                f"adapter {site_plan.adapter}: {_module_name(adapter)} ({_count(params)} parameters)"
            )
        lines.append(f"      adds {_count(added)} trainable parameters")
    lines.append(f"total added for training: {_count(total)} parameters (removed by detach)")
    return "\n".join(lines)


def sites_table(infos: Sequence[SiteInfo]) -> str:
    """One line per graftable activation: name, pre-activation shape, its layout, what applies it."""
    if not infos:
        return "(no graftable activations found)"
    width = max(len("name"), *(len(s.name) for s in infos))
    shape_width = max(len("pre-activation shape"), *(len(str(s.shape)) for s in infos))
    layout_width = max(len("layout"), *(len(str(s.layout)) for s in infos))
    rows = [f"{'name'.ljust(width)}  {'pre-activation shape'.ljust(shape_width)}  {'layout'.ljust(layout_width)}  kind"]
    for s in infos:
        kind = s.kind + (" (in-place)" if s.inplace else "")
        layout = str(s.layout).ljust(layout_width)
        rows.append(f"{s.name.ljust(width)}  {str(s.shape).ljust(shape_width)}  {layout}  {kind}")
    return "\n".join(rows)
