"""Checks shared by the tests that graft real zoo models (timm families, layouts): graft, train, detach, reload."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import graftnet


def first_tensor(out: Any) -> torch.Tensor:
    """The first tensor of a model's output (distilled models return a tuple in train mode, some models a dict)."""
    if isinstance(out, torch.Tensor):
        return out
    values = out.values() if isinstance(out, dict) else out
    for value in values:
        return first_tensor(value)
    raise TypeError(f"the output holds no tensor: {type(out).__name__}")


def student_only(g: graftnet.GraftedModel) -> None:
    """p_w(student) = 1 exactly at every site."""
    for mixer in g.mixers.values():
        with torch.no_grad():
            mixer.logits.copy_(torch.tensor([0.0] + [-float("inf")] * len(mixer.taps)))


def check_graft(
    student: nn.Module, teachers: dict[str, nn.Module], site: str, tap: str, shape: tuple[int, ...],
    fresh_student: Callable[[], nn.Module], *, nonzero_gradient: bool = True,
) -> graftnet.GraftedModel:  # fmt: skip
    """Graft, train one step (the tap's adapter gets a finite gradient, not all zero if ``nonzero_gradient``), then
    with p_w(student) = 1 the graft, the detached student and a fresh copy loaded from its state dict all compute
    the student's output. Returns the graft."""
    spec = {"input_shape": list(shape), "sites": [{"student": site, "taps": [tap]}], "adapter": "auto"}
    g = graftnet.graft(student, teachers, spec)
    x = torch.randn(2, *shape)
    g.train()
    opt = torch.optim.SGD([p for p in g.parameters() if p.requires_grad], lr=1e-3)
    first_tensor(g(x)).float().mean().backward()
    grads = [p.grad for m in g.mixers.values() for p in m.adapters.parameters()]
    assert all(gr is not None and bool(torch.isfinite(gr).all()) for gr in grads), "an adapter got no finite gradient"
    if nonzero_gradient:
        assert not grads or any(bool(gr.abs().sum() > 0) for gr in grads if gr is not None), "no adapter gradient"
    opt.step()
    student_only(g)
    g.eval()
    with torch.no_grad():
        expected = first_tensor(student.eval()(x))
        torch.testing.assert_close(first_tensor(g(x)), expected, rtol=1e-4, atol=1e-4)
    detached = graftnet.detach(g)
    fresh = fresh_student()
    fresh.load_state_dict(detached.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(first_tensor(fresh.eval()(x)), expected, rtol=1e-4, atol=1e-4)
    return g
