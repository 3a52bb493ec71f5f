"""The mixer spliced in front of a student activation (paper §3.2; docs/architecture.md).

    z̃ = p_0·z + Σ_l p_l·Q_l(s_l·t_l),   p = softmax(logits),   h = act(z̃)

``logits`` is the paper's w (index 0 = the student), Q_l the adapters, and s_l a per-tap scale that
brings each teacher activation to unit mean magnitude: teachers' activation scales differ by an order
of magnitude, and without it a loud teacher swamps the mix (docs/architecture.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, TypeVar, cast

import torch
import torch.distributed as dist
from torch import nn
from torch.autograd.function import once_differentiable

__all__ = ["Mixer", "full_precision", "initial_logits", "mix"]

_T = TypeVar("_T")


def full_precision(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32 if it is in a lower precision (bfloat16, float16), else as it is (float64 stays)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def initial_logits(n_taps: int, init: str | float) -> torch.Tensor:
    """Logits for ``'uniform'`` or for a given initial p_w of the student (teachers share the rest)."""
    if init == "uniform":
        return torch.zeros(n_taps + 1)
    p0 = float(init)
    rest = math.log((1.0 - p0) / n_taps)
    return torch.tensor([math.log(p0)] + [rest] * n_taps)


class _Mix(torch.autograd.Function):
    """Σ_k c_k·u_k in one pass, with the weights' gradients as dot products.

    Written out with ``*`` and ``+`` autograd keeps a full-size temporary per candidate in the forward and
    another for each ``grad·u_k`` before it sums it; here the forward accumulates in place and the backward
    takes ⟨grad, u_k⟩ with one BLAS dot each.
    """

    @staticmethod
    def forward(ctx: Any, coeffs: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(coeffs, *inputs)
        return _accumulate(coeffs.unbind(), inputs)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        coeffs, *inputs = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grad_coeffs = None
        if needs[0]:
            flat = full_precision(grad.reshape(-1))  # half-precision dots lose digits, and CPUs run them 100× slower
            dots = [torch.dot(flat, u.reshape(-1) if u.dtype == flat.dtype else u.reshape(-1).to(flat.dtype))
                    for u in inputs]  # fmt: skip
            grad_coeffs = torch.stack(dots)
            if grad_coeffs.dtype != coeffs.dtype:
                grad_coeffs = grad_coeffs.to(coeffs.dtype)
        c = coeffs.unbind() if any(needs[1:]) else ()
        grads = [grad * c[k] if needs[k + 1] else None for k in range(len(inputs))]
        return (grad_coeffs, *grads)


def _accumulate(c: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σ_k c_k·u_k into one new tensor, in place after the first product. ``c``: the coefficients unbound (one
    ``unbind`` call: indexing costs a dispatch each)."""
    first = inputs[0]
    dtype = first.dtype
    for u in inputs[1:]:  # as z + u would give
        if u.dtype != dtype:
            dtype = torch.promote_types(dtype, u.dtype)
    out = (first if first.dtype == dtype else first.to(dtype)) * c[0]
    for k in range(1, len(inputs)):
        out.addcmul_(inputs[k], c[k])
    return out


def mix(coeffs: torch.Tensor, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """``Σ_k coeffs[k]·inputs[k]`` for same-shaped inputs, fused (forward and backward).

    Examples:
        >>> mix(torch.tensor([0.25, 0.75]), [torch.ones(2), torch.zeros(2)])
        tensor([0.2500, 0.2500])
    """
    if len(inputs) == 1:
        return inputs[0] * coeffs[0]
    if torch.compiler.is_compiling():
        # Compiled, the plain expression is the better one: inductor fuses the sum (and the activation after
        # it) into one kernel and writes its backward; the hand-written function would only break the graph.
        out = inputs[0] * coeffs[0]
        for k in range(1, len(inputs)):
            out = out + inputs[k] * coeffs[k]
        return out
    if not torch.is_grad_enabled():
        return _accumulate(coeffs.unbind(), inputs)  # the same sum without the autograd function's overhead
    return _Mix.apply(coeffs, *inputs)  # type: ignore[no-any-return]


class Mixer(nn.Module):
    """Mixes a student pre-activation with adapted teacher pre-activations.

    Args:
        site: the student activation's name.
        taps: the teacher activations' names (``teacher:name``), in candidate order 1..n.
        adapters: one adapter per tap.
        init: ``'uniform'`` or the initial p_w of the student.
        rescale_taps: scale each tap to unit mean |t| before its adapter.
        calibration_batches: training-mode forward passes the tap scales are averaged over before they freeze.

    Examples:
        >>> m = Mixer("act1", ["t:act1"], [torch.nn.Identity()])
        >>> m.p_w()
        tensor([0.5000, 0.5000], grad_fn=<SoftmaxBackward0>)
    """

    tap_scale: torch.Tensor
    fold_mask: torch.Tensor
    calibrated_batches: torch.Tensor

    def __init__(
        self,
        site: str,
        taps: Sequence[str],
        adapters: Sequence[nn.Module],
        init: str | float = "uniform",
        rescale_taps: bool = True,
        calibration_batches: int = 4,
    ) -> None:
        super().__init__()
        if len(taps) != len(adapters):
            raise ValueError(f"{len(taps)} taps but {len(adapters)} adapters")
        self.site = site
        self.taps = tuple(taps)
        self.logits = nn.Parameter(initial_logits(len(taps), init))
        self.adapters = nn.ModuleList(adapters)
        self.rescale_taps = rescale_taps
        self.calibration_batches = calibration_batches
        self.register_buffer("tap_scale", torch.ones(len(taps)))
        self.register_buffer("calibrated_batches", torch.zeros((), dtype=torch.long))
        # The scale of an identity adapter's tap is folded into its mixing weight, (p·s)·t: one pass over the tap
        # fewer than p·(s·t). True at index k: candidate k's coefficient is p_k·s_k (index 0, the student: never).
        folded = [False] + [rescale_taps and isinstance(a, nn.Identity) for a in adapters]
        self._folds = any(folded)
        self._folded = tuple(folded)
        self.register_buffer("fold_mask", torch.tensor(folded), persistent=False)
        # Every tap enters the sum as it comes (identity adapters, scales folded or off): the inputs need no loop.
        # Same-shaped teachers give this; an RL rollout mixes at every step (16.1 → 13.5 µs a call at batch 16).
        self._taps_as_given = all(type(a) is nn.Identity for a in adapters)
        # ``calibrated_batches`` mirrored on the host: reading the buffer every step would sync with the device
        # (and break a compiled graph); it is re-read only when the buffers are loaded or swapped (refresh).
        # ``_calibrating`` is the one thing a compiled graph reads: a bool that flips once, so calibrating and
        # calibrated are two graphs, not one per batch count.
        self._seen = 0
        self._calibrating = rescale_taps and calibration_batches > 0
        self._kept: dict[str, tuple[tuple[torch.Tensor, ...], tuple[Any, ...], Any]] = {}  # see _keep()
        # Set by GraftedModel.keep_feature_hints(): each training pass with autograd then leaves its feature hint,
        # the mean squared distance from z to every adapted tap, in ``hint_loss``.
        self.keeps_hint = False
        self.hint_loss: torch.Tensor | None = None

    @property
    def candidates(self) -> tuple[str, ...]:
        """Candidate names in logit order: ``'student'`` then the taps."""
        return ("student", *self.taps)

    def p_w(self) -> torch.Tensor:
        """The normalised weights softmax(logits), in float32 at least (whatever autocast or a half-precision
        cast of the model does); index 0 is the student."""
        return torch.softmax(full_precision(self.logits), dim=0)

    @property
    def calibrating(self) -> bool:
        """True while the tap scales are still being averaged (the first ``calibration_batches`` training passes)."""
        return self._calibrating

    @torch.no_grad()
    def _calibrate(self, taps: Sequence[torch.Tensor]) -> None:
        """Fold this batch's mean |t| into the running mean behind ``tap_scale`` — a no-op once calibrated.

        Written with tensors only (the count is the buffer, "calibrated yet" a mask), so that a compiled graph
        needs no host read and stays one graph whether or not calibration is still going on.
        """
        batch = torch.stack([t.detach().abs().mean().to(self.tap_scale.dtype) for t in taps])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # data-parallel: the mean over the global batch, so every process keeps the same scales
            dist.all_reduce(batch)
            batch /= dist.get_world_size()
        n = self.calibrated_batches.to(self.tap_scale.dtype)
        seen = torch.where(n > 0, 1.0 / self.tap_scale, torch.zeros_like(self.tap_scale))
        mean_abs = (seen * n + batch) / (n + 1)
        still = self.calibrated_batches < self.calibration_batches
        self.tap_scale.copy_(torch.where(still, 1.0 / mean_abs.clamp_min(1e-6), self.tap_scale))
        self.calibrated_batches.add_(still.long())

    def forward(self, z: torch.Tensor, *taps: torch.Tensor) -> torch.Tensor:
        if self.training and self._calibrating:  # evaluation never changes state
            self._calibrate(taps)
            # Compiled, the graph cannot count on the host: it learns that calibration is over from
            # after_compiled_pass(), and the next graph leaves this out.
            if not torch.compiler.is_compiling():
                self._seen += 1
                self._calibrating = self._seen < self.calibration_batches
        if self._taps_as_given and len(taps) == len(self.taps):
            inputs = [z, *taps]
        else:
            inputs = [z]
            for i, (adapter, t) in enumerate(zip(self.adapters, taps, strict=True)):
                if self.rescale_taps and not self._folded[i + 1]:
                    t = t * self.tap_scale[i]
                inputs.append(t if type(adapter) is nn.Identity else adapter(t))  # skip a call that does nothing
        if self.keeps_hint and self.training and torch.is_grad_enabled():
            self.hint_loss = self._hint(z, taps, inputs[1:])
        if not torch.is_grad_enabled() and not torch.compiler.is_compiling():
            return _accumulate(self._kept_coefficients(), inputs)
        return mix(self._coefficients(), inputs)

    def _coefficients(self) -> torch.Tensor:
        """p_w, with the folded tap scales multiplied in: the weight of each candidate as it enters the sum."""
        coeffs = self.p_w()
        return coeffs * self._fold_scales() if self._folds else coeffs

    def _kept_coefficients(self) -> tuple[torch.Tensor, ...]:
        """:meth:`_coefficients` unbound, for passes without autograd, kept until w or the tap scales change: an RL
        rollout's policy steps all mix with one w, and recomputing the softmax, the scales' product and the
        unbinding on each step was most of a mixer's cost there."""
        return self._keep("coefficients", (self.logits, self.tap_scale), lambda: self._coefficients().unbind())

    def _keep(self, name: str, sources: tuple[torch.Tensor, ...], build: Callable[[], _T]) -> _T:
        """``build()``, kept under ``name`` until one of ``sources`` changes.

        Parameters and buffers are written in place (the optimizer, the floor, calibration, ``load_state_dict``,
        θ_old's copies), which bumps their version counters, or replaced (``.to()``, ``.data =``), which changes the
        tensor or its storage: either makes the next call build again. Kept values are never written, so a graph
        that saved one for backward stays valid. Nothing is kept while compiling (a compiled graph reads no
        host-side cache), nor for a source in shared memory (A3C's workers), which other processes write without
        bumping this one's counter. A value built in inference mode is built again outside it, and the other way
        round (inference tensors cannot be saved for a backward).
        """
        if torch.compiler.is_compiling():
            return build()
        # the ids stand for the tensors themselves: the kept entry holds them, so no other object can take an id
        key = (torch.is_inference_mode_enabled(), *[(id(t), t._version, t.data_ptr()) for t in sources])
        kept = self._kept.get(name)
        if kept is not None and kept[1] == key:
            return cast(_T, kept[2])
        value = build()
        if any(t.is_shared() for t in sources):  # a shared tensor's entry could not tell when it is stale
            self._kept.pop(name, None)
        else:
            self._kept[name] = (sources, key, value)
        return value

    def _hint(self, z: torch.Tensor, taps: Sequence[torch.Tensor], adapted: Sequence[torch.Tensor]) -> torch.Tensor:
        """mean_l mean((z − u_l)²) over the adapted taps u_l = Q_l(s_l·t_l): it teaches the student's own layers
        to produce what the teachers give the site, so that handing the site back to the student loses less
        (examples/README.md, "Feature hints"). A learned adapter Q_l trains on it too, as the regressor of a
        FitNets hint: held fixed as a target, a random Q_l pulls z toward a random view of the teacher, which
        cost the Table 4 analogue 3–6 points. Nothing behind the tap trains on it (the teacher is frozen; a
        learned input adapter is kept out by detaching the tap)."""
        z = full_precision(z)
        terms = []
        for i, (t, u) in enumerate(zip(taps, adapted, strict=True)):
            adapter = self.adapters[i]
            if self._folded[i + 1]:  # an identity adapter's scale is in its coefficient, not yet in the tap
                u = (u * self.tap_scale[i]).detach()
            elif not any(p.requires_grad for p in adapter.parameters()):
                u = u.detach()
            elif t.requires_grad:  # a learned input adapter is behind the tap: Q_l alone trains on the hint
                t = t.detach()
                u = adapter(t * self.tap_scale[i] if self.rescale_taps else t)
            terms.append(torch.mean((z - full_precision(u)) ** 2))
        return torch.stack(terms).mean()

    def _fold_scales(self) -> torch.Tensor:
        """``(1, s_1 or 1, …)``: the tap scales folded into the coefficients, 1 for the student and unfolded taps;
        built in four small ops, so kept until ``tap_scale`` changes (:meth:`_keep`)."""
        return self._keep("fold scales", (self.tap_scale,), lambda: self._build_fold_scales(self.tap_scale))

    def _build_fold_scales(self, scale: torch.Tensor) -> torch.Tensor:
        scales = torch.cat([scale.new_ones(1), scale])
        return torch.where(self.fold_mask, scales, torch.ones_like(scales))

    def __getstate__(self) -> dict[str, Any]:
        # a pass's hint holds its autograd graph, and the kept tensors are the original's: copies go without them
        return {**super().__getstate__(), "hint_loss": None, "_kept": {}}

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self.refresh()

    def calibrating_like(self, other: Mixer) -> None:
        """Take ``other``'s calibration state, after its buffers were copied into this mixer's (no device read)."""
        if (self._seen, self._calibrating) != (other._seen, other._calibrating):  # nn.Module's setattr is slow
            self._seen, self._calibrating = other._seen, other._calibrating

    def after_compiled_pass(self) -> None:
        """Catch the host mirror up with the buffer after a compiled training pass (a device read while calibrating
        only: a few steps at the start of training, none after)."""
        if self._calibrating:
            self.refresh()

    def refresh(self) -> None:
        """Re-read the calibration state from the buffers (after they were loaded or swapped)."""
        if self.calibrated_batches.device.type != "meta":  # a module built on the meta device has no values yet
            self._seen = int(self.calibrated_batches)
            self._calibrating = self.rescale_taps and self._seen < self.calibration_batches

    def extra_repr(self) -> str:
        return f"site={self.site!r}, taps={list(self.taps)}, rescale_taps={self.rescale_taps}"
