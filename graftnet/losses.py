"""The loss terms of knowledge flow (paper eq. 3, 5, 6) and of Hinton distillation.

The dependency loss itself lives on the model (:meth:`GraftedModel.dependency_loss`), next to the mixers
it reads.
"""

from __future__ import annotations

import copy
import math
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

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
    """θ_old: an earlier copy of every trainable parameter, and the forward pass that uses it.

    KL(f_θ ‖ f_θ) against the *current* parameters has zero gradient, so the KL term needs a genuine
    earlier copy; :meth:`refresh` before each ``optimizer.step()`` makes it the parameters of one step ago.

    The copy is a *shadow* of the model: a deep copy of everything but the teachers, which it shares (they
    are frozen, and the shadow's pass reuses their taps). The θ_old pass is then a plain call of the shadow —
    no per-call parameter swapping (``functional_call``) and no buffer clones, which cost 0.05–0.5 of a
    student forward each step. The shadow's buffers are overwritten with the model's before every pass, so
    BatchNorm statistics and tap scales start from the model's and whatever the pass writes stays in the shadow.
    """

    def __init__(self, model: nn.Module, *, compile: bool = False) -> None:  # noqa: A002 - the setting's name
        self.compile = compile
        self._build(model, None)

    def _build(self, model: nn.Module, values: Mapping[str, torch.Tensor] | None) -> None:
        """Make the shadow of ``model``; θ_old takes ``values`` where names match (after a cut), else θ."""
        teachers = getattr(model, "teachers", None)
        shared = list(teachers.modules()) if isinstance(teachers, nn.Module) else []
        memo: dict[int, Any] = {id(m): m for m in shared}
        for m in shared:
            for t in (*m.parameters(recurse=False), *m.buffers(recurse=False)):
                memo[id(t)] = t
        for name in ("plan", "spec"):  # immutable descriptions of the graft: nothing to copy
            if hasattr(model, name):
                memo[id(getattr(model, name))] = getattr(model, name)
        with torch.no_grad():
            shadow = copy.deepcopy(model, memo)
        self.shadow = shadow.requires_grad_(False)
        self._run: nn.Module = torch.compile(self.shadow) if self.compile else self.shadow  # type: ignore[assignment]
        self._model_ref = weakref.ref(model)
        self.names = [name for name, p in model.named_parameters() if p.requires_grad]
        mine = dict(self.shadow.named_parameters())
        if values:
            with torch.no_grad():
                for name in self.names:
                    if name in values and values[name].shape == mine[name].shape:
                        mine[name].copy_(values[name])
        self._pairs()

    def _pairs(self) -> None:
        """The (shadow tensor, model tensor) pairs that refresh and every pass copy in one fused call each."""
        model = self._model_ref()
        assert model is not None
        mine, theirs = dict(self.shadow.named_parameters()), dict(model.named_parameters())
        self._params: tuple[list[torch.Tensor], list[torch.Tensor]] = (
            [mine[n] for n in self.names], [theirs[n] for n in self.names])
        buffers = [(n, b) for n, b in model.named_buffers() if not n.startswith("teachers.")]
        mine_b = dict(self.shadow.named_buffers())
        self._buffers: tuple[list[torch.Tensor], list[torch.Tensor]] = (
            [mine_b[n] for n, _ in buffers], [b for _, b in buffers])
        self._copied: list[tuple[int, int] | None] = [None] * len(buffers)  # (model's, shadow's) versions after a copy
        self._mixers = [(m, getattr(self.shadow, "mixers", {}).get(site)) for site, m in
                        getattr(model, "mixers", {}).items()]  # fmt: skip

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        """``{parameter name: θ_old}`` for every trainable parameter."""
        mine = dict(self.shadow.named_parameters())
        return {name: mine[name] for name in self.names}

    def _follows(self, model: nn.Module) -> None:
        """Rebuild the shadow if ``model`` is another module (the teachers were cut), keeping θ_old's values."""
        if self._model_ref() is not model:
            self._build(model, self.tensors)

    @torch.no_grad()
    def follow(self, model: nn.Module) -> None:
        """Re-home every copy whose original moved to another device, dtype or memory layout (``model.to(...)``),
        keeping values."""
        self._follows(model)
        theirs = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        for name, t in (*self.shadow.named_parameters(), *self.shadow.named_buffers()):
            other = theirs.get(name)
            if other is not None and (t.device, t.dtype, t.stride()) != (other.device, other.dtype, other.stride()):
                t.data = torch.empty_like(other).copy_(t.data)  # empty_like keeps the original's layout
        self._pairs()

    @torch.no_grad()
    def refresh(self, model: nn.Module) -> None:
        self._follows(model)
        olds, news = self._params
        if olds:
            torch._foreach_copy_(olds, news)  # one fused copy instead of one kernel launch per tensor

    def outputs(self, model: GraftedModel, x: torch.Tensor, rng_state: RngState | None = None) -> torch.Tensor:
        """``model(x)`` with θ_old, without autograd and without touching the model's buffers.

        The shadow starts from the model's buffers (BatchNorm statistics, tap scales) and mode, so the pass
        computes what ``model(x)`` would with θ_old and updates nothing of the model's; with ``rng_state`` it
        replays the same dropout masks as the current pass it is compared to. Call it inside
        ``model.reusing_teacher_features()`` so teachers run once per batch.
        """
        self._follows(model)
        shadow = self.shadow
        if shadow.training != model.training:
            shadow.train(model.training)
        # the pass leaves the random generators as it found them (torch.random.fork_rng does the same, slower)
        before = RngState.capture(x.device)
        try:
            with torch.no_grad():
                self._copy_buffers()
                for real, copied in self._mixers:
                    if copied is not None:
                        copied.calibrating_like(real)  # the buffers just copied, without reading them on the host
                if rng_state is not None:
                    rng_state.restore(x.device)
                return self._run(x)  # type: ignore[no-any-return]
        finally:
            before.restore(x.device)

    def _copy_buffers(self) -> None:
        """The model's buffers into the shadow's, those that either side wrote since the last copy.

        BatchNorm statistics change on every training pass and are copied each time; the mixers' tap scales stop
        changing after calibration, and copying them anyway would bump their version counters, which makes the
        shadow's mixers rebuild the coefficients they keep (graftnet/mixer.py). A buffer in shared memory (A3C's
        workers) is written by other processes without bumping this process's counter: always copied.
        """
        mine, theirs = self._buffers
        stale = [i for i, (m, t) in enumerate(zip(mine, theirs, strict=True))
                 if t.is_shared() or self._copied[i] != (t._version, m._version)]  # fmt: skip
        if not stale:
            return
        torch._foreach_copy_([mine[i] for i in stale], [theirs[i] for i in stale])
        for i in stale:
            self._copied[i] = (theirs[i]._version, mine[i]._version)

    def state(self) -> Mapping[str, torch.Tensor]:
        return self.tensors

    def load(self, tensors: Mapping[str, torch.Tensor]) -> None:
        mine = self.tensors
        with torch.no_grad():
            for name, t in tensors.items():
                if name in mine:
                    mine[name].copy_(t)


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
