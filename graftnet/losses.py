"""The loss terms of knowledge flow (paper eq. 3, 5, 6) and of Hinton distillation.

The dependency loss itself lives on the model (:meth:`GraftedModel.dependency_loss`), next to the mixers
it reads.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from torch.func import functional_call

from graftnet.graft import GraftedModel

__all__ = [
    "ParameterSnapshot",
    "RngState",
    "cwtm_loss",
    "cwtm_weights",
    "dkpp_targets",
    "ensemble_probs",
    "kd_loss",
    "kl_to_old",
    "lambda1_at",
    "soft_cross_entropy",
]


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


@dataclass(frozen=True)
class RngState:
    """The random generators a forward pass draws from (CPU, and the GPU it runs on): to replay its dropout masks."""

    cpu: torch.Tensor
    gpu: torch.Tensor | None

    @staticmethod
    def capture(device: torch.device) -> RngState:
        return RngState(torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None)

    def restore(self, device: torch.device) -> None:
        torch.set_rng_state(self.cpu)
        if self.gpu is not None:
            torch.cuda.set_rng_state(self.gpu, device)


class ParameterSnapshot:
    """θ_old: a copy of every trainable parameter, refreshed before an optimizer step.

    KL(f_θ ‖ f_θ) against the *current* parameters has zero gradient, so the KL term needs a genuine
    earlier copy; :meth:`refresh` before each ``optimizer.step()`` makes it the parameters of one step ago.
    """

    def __init__(self, model: nn.Module) -> None:
        self.tensors = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def follow(self, model: nn.Module) -> None:
        """Re-home every copy whose parameter moved to another device or dtype (``model.to(...)``), keeping values."""
        for name, p in model.named_parameters():
            old = self.tensors.get(name)
            if old is not None and (old.device != p.device or old.dtype != p.dtype):
                self.tensors[name] = old.to(device=p.device, dtype=p.dtype)

    @torch.no_grad()
    def refresh(self, model: nn.Module) -> None:
        pairs = [(self.tensors[name], p) for name, p in model.named_parameters() if name in self.tensors]
        if pairs:
            olds, news = zip(*pairs, strict=True)
            torch._foreach_copy_(olds, news)  # one fused copy instead of one kernel launch per tensor

    def outputs(self, model: GraftedModel, x: torch.Tensor, rng_state: RngState | None = None) -> torch.Tensor:
        """``model(x)`` with θ_old, without autograd and without touching the model's buffers.

        Buffers (BatchNorm statistics, tap scales) are passed as copies, so the extra pass updates nothing;
        with ``rng_state`` the pass replays the same dropout masks as the current pass it is compared to.
        Call it inside ``model.reusing_teacher_features()`` so teachers run once per batch.
        """
        # Teachers run in eval mode or not at all (their taps are reused), so only the rest needs copies.
        # (Swapping storages with ``p.data = ...`` would be cheaper but bumps version counters of tensors
        # that the current step's autograd graph has saved.)
        state = {n: b.clone() for n, b in model.named_buffers() if not n.startswith("teachers.")}
        present = dict(model.named_parameters())
        state.update({n: t for n, t in self.tensors.items() if n in present})
        on_gpu = x.device.type == "cuda"
        with torch.no_grad(), torch.random.fork_rng(devices=[x.device] if on_gpu else []):
            if rng_state is not None:
                rng_state.restore(x.device)
            out = functional_call(model, state, (x,), strict=False)
        for mixer in model.mixers.values():
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


# ---- born-again networks (Furlanello et al. 2018) -------------------------------------------------------------


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """−Σ_i p_i log q_i averaged over the batch, q = softmax(logits): BAN's loss to the teacher's distribution p.

    Its gradient with respect to the logits is (q − p) / batch (the paper's eq. 5).
    """
    return -(target * F.log_softmax(logits, dim=-1)).sum(-1).mean()


def cwtm_weights(teacher_probs: torch.Tensor) -> torch.Tensor:
    """Confidence weighted by teacher max (eq. 10): max_i p_{i,s} / Σ_u max_i p_{i,u}, summing to 1 over the batch."""
    top = teacher_probs.max(dim=-1).values
    return top / top.sum()


def cwtm_loss(logits: torch.Tensor, teacher_probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The label cross-entropy with each sample weighted by :func:`cwtm_weights` (eq. 10)."""
    per_sample = F.cross_entropy(logits, target, reduction="none")
    return (cwtm_weights(teacher_probs.detach()) * per_sample).sum()


def dkpp_targets(teacher_probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Dark knowledge with permuted predictions (eq. 11): each row keeps the teacher's argmax entry in place and
    gets its other entries shuffled among the other positions, with a new permutation per sample.

    The argmax is the teacher's, not the ground-truth class (a public DKPP gets this wrong; docs/architecture.md).
    """
    b, n = teacher_probs.shape
    top = teacher_probs.argmax(dim=-1, keepdim=True)
    # Sorting puts the argmax first in both orders (key −1); the source order lists the other positions in
    # index order, the destination order in a random one, so scatter(gather) is a per-row permutation.
    src_keys = torch.arange(n, dtype=torch.float32, device=teacher_probs.device).expand(b, n).clone()
    dst_keys = torch.rand(b, n, generator=generator, device=teacher_probs.device)
    src_keys.scatter_(1, top, -1.0)
    dst_keys.scatter_(1, top, -1.0)
    src, dst = src_keys.argsort(dim=1), dst_keys.argsort(dim=1)
    return torch.zeros_like(teacher_probs).scatter_(1, dst, teacher_probs.gather(1, src))


def ensemble_probs(logits: list[torch.Tensor]) -> torch.Tensor:
    """BAN ensembles (eq. 4): the mean of the members' predicted distributions."""
    return torch.stack([F.softmax(z, dim=-1) for z in logits]).mean(0)
