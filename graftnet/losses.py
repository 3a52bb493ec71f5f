"""The loss terms of knowledge flow (paper eq. 3, 5, 6) and of Hinton distillation.

The dependency loss itself lives on the model (:meth:`GraftedModel.dependency_loss`), next to the mixers
it reads.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from torch.func import functional_call

from graftnet.graft import GraftedModel
from graftnet.mixer import Mixer

__all__ = ["ParameterSnapshot", "kd_loss", "kl_to_old", "lambda1_at"]


def lambda1_at(progress: float, final: float, start: float, end: float, kind: str = "linear") -> float:
    """λ1 at ``progress`` ∈ [0, 1] of training: 0 before ``start``, ramping to ``final`` at ``end``, then flat.

    Examples:
        >>> [round(lambda1_at(p, 10.0, 0.2, 0.6), 6) for p in (0.0, 0.2, 0.4, 0.6, 1.0)]
        [0.0, 0.0, 5.0, 10.0, 10.0]
    """
    if kind == "constant":
        return final
    if progress <= start:
        return 0.0
    if progress >= end:
        return final
    ramp = (progress - start) / (end - start)
    if kind == "cosine":
        ramp = 0.5 * (1.0 - math.cos(math.pi * ramp))
    return final * ramp


def kd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor, temperature: float, alpha: float
) -> torch.Tensor:
    """Hinton et al. (2015): α·T²·KL(softmax(t/T) ‖ softmax(s/T)) + (1 − α)·CE(s, y).

    The T² keeps the soft term's gradients on the scale of the hard term's when T changes.
    """
    soft = F.kl_div(
        F.log_softmax(student_logits / temperature, dim=-1),
        F.log_softmax(teacher_logits / temperature, dim=-1),
        log_target=True,
        reduction="batchmean",
    )
    return alpha * temperature**2 * soft + (1.0 - alpha) * F.cross_entropy(student_logits, target)


class ParameterSnapshot:
    """θ_old: a copy of every trainable parameter, refreshed before an optimizer step.

    KL(f_θ ‖ f_θ) against the *current* parameters has zero gradient, so the KL term needs a genuine
    earlier copy; :meth:`refresh` before each ``optimizer.step()`` makes it the parameters of one step ago.
    """

    def __init__(self, model: nn.Module) -> None:
        self.tensors = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def refresh(self, model: nn.Module) -> None:
        for name, p in model.named_parameters():
            if name in self.tensors:
                self.tensors[name].copy_(p)

    def outputs(self, model: GraftedModel, x: torch.Tensor, rng_state: torch.Tensor | None = None) -> torch.Tensor:
        """``model(x)`` with θ_old, without autograd and without touching the model's buffers.

        Buffers (BatchNorm statistics, tap scales) are passed as copies, so the extra pass updates nothing;
        with ``rng_state`` the pass replays the same dropout masks as the current pass it is compared to.
        Call it inside ``model.reusing_teacher_features()`` so teachers run once per batch.
        """
        state: dict[str, torch.Tensor] = {n: b.clone() for n, b in model.named_buffers()}
        present = dict(model.named_parameters())
        state.update({n: t for n, t in self.tensors.items() if n in present})
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            if rng_state is not None:
                torch.set_rng_state(rng_state)
            out = functional_call(model, state, (x,), strict=False)
        for mixer in model.modules():
            if isinstance(mixer, Mixer):
                mixer.refresh()  # the pass above calibrated on copies: re-read the real buffers
        return out  # type: ignore[no-any-return]

    def state(self) -> Mapping[str, torch.Tensor]:
        return self.tensors

    def load(self, tensors: Mapping[str, torch.Tensor]) -> None:
        for name, t in tensors.items():
            if name in self.tensors:
                self.tensors[name].copy_(t)


def kl_to_old(logits: torch.Tensor, old_logits: torch.Tensor) -> torch.Tensor:
    """The paper's eq. 6: D_KL(f_θ(·|x) ‖ f_θold(·|x)), averaged over the batch; gradients reach θ only."""
    log_p = F.log_softmax(logits, dim=-1)
    log_q = F.log_softmax(old_logits.detach(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()
