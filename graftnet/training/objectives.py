"""Training objectives: what trains and what its loss is — knowledge flow and the baselines (docs/architecture.md).

An objective wraps a model (a :class:`GraftedModel`, or any module for the baselines) and the train
settings, and gives everything a training loop needs: :meth:`Objective.loss` (the total and its named
parts), :meth:`Objective.param_groups` (student, mixing logits w and adapters Q with their own learning
rates), :meth:`Objective.step` (the θ_old refresh around the optimizer step) and :meth:`Objective.maybe_cut`
(the teacher cut). graftnet's supervised, born-again and RL trainers use these objects, and so can a plain
PyTorch loop or a Lightning module:

    kf = graftnet.KnowledgeFlow(g, lr=3e-3, total_steps=epochs * len(loader))
    opt = torch.optim.Adam(kf.param_groups())
    for epoch in range(epochs):
        kf.maybe_cut(epoch / epochs)
        for x, y in loader:
            loss = kf.loss(x, y)
            opt.zero_grad()
            kf.backward(loss.total)   # loss.total.backward(), scaled when train.precision is fp16
            kf.step(opt)

The fast paths are settings like any other: ``KnowledgeFlow(g, compile=True, precision="bf16")`` compiles the
model (and the θ_old pass) with torch.compile and autocasts every forward pass the objective makes.

Objectives are registered by name in :data:`METHODS` (``train.method`` in a spec); :meth:`Objective.from_spec`
builds one, with its model, from a spec.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F  # noqa: N812
from pydantic import ValidationError
from torch import nn

from graftnet.errors import SpecError, TrainingError
from graftnet.graft import GraftedModel, graft
from graftnet.losses import (
    ParameterSnapshot,
    RngState,
    cwtm_loss,
    dkpp_targets,
    kd_loss,
    kl_to_old,
    lambda1_at,
    soft_cross_entropy,
)
from graftnet.mixer import full_precision
from graftnet.models import build_model
from graftnet.registry import Registry
from graftnet.spec import BornAgainSpec, KDSpec, Spec, TrainSpec, register_method_name, validation_problems
from graftnet.training.evaluation import logits_of
from graftnet.training.optim import param_groups

__all__ = [
    "METHODS",
    "BornAgain",
    "Finetune",
    "KnowledgeDistillation",
    "KnowledgeFlow",
    "Objective",
    "Scratch",
    "StepLoss",
    "copy_matching",
    "register_method",
]

Head = Callable[[Any], torch.Tensor]

_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}
_SCALER_KEY = "grad_scaler."


def _in_fp32(out: Any) -> Any:
    """``out`` with every bfloat16/float16 tensor in it cast to float32 (the losses are computed in float32)."""
    if isinstance(out, torch.Tensor):
        return full_precision(out)
    if isinstance(out, (tuple, list)):
        return type(out)(_in_fp32(o) for o in out)
    if isinstance(out, dict):
        return {k: _in_fp32(v) for k, v in out.items()}
    return out


@dataclass
class StepLoss:
    """One batch's loss ``total`` and its named ``parts`` (for logging), and the class scores it came from."""

    total: torch.Tensor
    parts: dict[str, torch.Tensor]
    logits: torch.Tensor


def _settings(settings: TrainSpec | Mapping[str, Any] | None, overrides: Mapping[str, Any]) -> TrainSpec:
    """The train settings as a validated :class:`TrainSpec`: ``settings`` with ``overrides`` on top."""
    base = settings.model_dump() if isinstance(settings, TrainSpec) else dict(settings or {})
    try:
        return TrainSpec.model_validate({**base, **overrides})
    except ValidationError as e:
        problems = "; ".join(f"{path}: {msg}" if path else msg for path, msg in validation_problems(e))
        raise SpecError(f"invalid train settings: {problems}") from e


def _plain(student: nn.Module, example: torch.Tensor | None, spec: Spec | None = None) -> GraftedModel:
    """The student as a graft without sites or teachers: it computes exactly ``student(x)``."""
    bare = (spec or Spec()).graft_part().model_copy(update={"teachers": {}, "sites": []})
    return graft(student, {}, bare, example_input=example)


class Objective:
    """The loss of one method and the bookkeeping around it; the base class trains on the task loss alone.

    Args:
        model: what trains: a :class:`GraftedModel`, or for the baselines any module.
        settings: the train settings (a :class:`~graftnet.spec.TrainSpec` or the dict of a spec's ``train``
            section); ``overrides`` are set on top of them, e.g. ``lr=1e-2``.
        total_steps: optimizer steps in the whole run; the clock of λ1(t) and of the default learning rate of w.

    Subclasses override :meth:`loss` (or :meth:`regularizer`, for terms added to any task loss), and
    :meth:`from_spec` when they build their model differently.
    """

    name: ClassVar[str] = ""

    def __init__(
        self, model: nn.Module, settings: TrainSpec | Mapping[str, Any] | None = None, *,
        total_steps: int | None = None, **overrides: Any,
    ) -> None:  # fmt: skip
        if not isinstance(model, nn.Module):
            raise TrainingError(f"{type(self).__name__}: the model is a {type(model).__name__}, not a torch.nn.Module")
        if total_steps is not None and total_steps < 1:
            raise TrainingError(f"{type(self).__name__}: total_steps must be at least 1, got {total_steps}")
        self.model = model
        self.settings = _settings(settings, overrides)
        self.total_steps = total_steps
        self.steps = 0  # optimizer steps taken: step() counts them; a framework that steps itself sets it
        self.cut = False  # True once the teachers are removed
        self.dependence_at_cut: dict[str, float] = {}  # p_w(student) per site when they were
        self.runner: nn.Module | None = None  # runs the model when set (the model in DistributedDataParallel)
        self.scaler: torch.amp.GradScaler | None = None  # fp16's gradient scaler, made on the first backward
        self._scaler_state: dict[str, Any] | None = None  # a resumed scaler state, for when it is made
        self._compiled: tuple[nn.Module, Callable[..., Any]] | None = None
        self._example: torch.Tensor | None = None
        if self.settings.channels_last:
            model.to(memory_format=torch.channels_last)

    @property
    def grafted(self) -> GraftedModel:
        """:attr:`model` as a :class:`GraftedModel`, what graftnet's trainers checkpoint and export."""
        if not isinstance(self.model, GraftedModel):
            raise TrainingError(
                f"{type(self).__name__}: graftnet's trainers checkpoint and export a grafted model; build the "
                "objective with from_spec, or pass graftnet.graft(student, {}, {...}) (a graft without sites, for a "
                "baseline)"
            )
        return self.model

    # ---- building from a spec ------------------------------------------------------------------------------

    @classmethod
    def from_spec(
        cls, spec: Spec, student: nn.Module, example: torch.Tensor, *,
        teachers: Mapping[str, nn.Module] | None = None, total_steps: int | None = None,
    ) -> Objective:  # fmt: skip
        """The objective of ``spec.train`` with its model: by default ``student`` as a plain graft (baselines).

        ``teachers`` are modules for the spec's teachers; those not given are built from the spec.
        """
        return cls(_plain(student, example, spec), spec.train, total_steps=total_steps)

    # ---- the loss ------------------------------------------------------------------------------------------

    def progress(self) -> float:
        """How far training is, in [0, 1]: ``steps / total_steps`` (0 when ``total_steps`` is unknown)."""
        return min(self.steps / self.total_steps, 1.0) if self.total_steps else 0.0

    def autocast(self, x: torch.Tensor) -> contextlib.AbstractContextManager[Any]:
        """The autocast context of ``train.precision`` on ``x``'s device (a context that does nothing for fp32)."""
        dtype = _AUTOCAST.get(self.settings.precision)
        return torch.autocast(x.device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` in the memory layout the model runs in (channels-last for a 4-D batch with ``channels_last``)."""
        if self.settings.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def run(self, module: nn.Module, x: torch.Tensor) -> Any:
        """``module(x)`` with the precision settings, compiled with torch.compile when ``compile`` is set.

        The compiled module is kept until another module is run (after the teachers are cut, say); outputs in
        a low precision come back in float32.
        """
        if not self.settings.compile:
            return self.in_precision(module, x)
        if self._compiled is None or self._compiled[0] is not module:
            self._compiled = (module, torch.compile(module))
        out = self.in_precision(self._compiled[1], x)
        if module.training and isinstance(self.model, GraftedModel):
            self.model.after_compiled_pass()
        return out

    def in_precision(self, fn: Callable[[torch.Tensor], Any], x: torch.Tensor) -> Any:
        """``fn(x)`` with ``x`` in the model's memory layout, under ``train.precision``'s autocast, and its
        low-precision outputs back in float32: every forward pass an objective makes goes through here."""
        with self.autocast(x):
            return _in_fp32(fn(self.prepare(x)))

    def forward(self, x: torch.Tensor) -> Any:
        """Run the model on ``x`` (through :attr:`runner` when set) and remember what :meth:`regularizer` needs."""
        self._example = x[:2].detach()
        return self.run(self.runner if self.runner is not None else self.model, x)

    def regularizer(
        self, x: torch.Tensor, logits: torch.Tensor, progress: float | None = None, head: Head = logits_of
    ) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        """Weighted terms this method adds to any task loss (the RL trainer's policy loss too), and their parts.

        ``logits`` came from :meth:`forward` on ``x``; ``head`` picks the distribution's logits out of a
        model output. Add the terms to the task loss in order (``total = total + term``).
        """
        return [], {}

    def loss(self, x: torch.Tensor, y: torch.Tensor, progress: float | None = None) -> StepLoss:
        """The batch's loss. ``progress`` ∈ [0, 1] defaults to :meth:`progress`."""
        logits = logits_of(self.forward(x))
        task = F.cross_entropy(logits, y)
        return StepLoss(task, {"task_loss": task}, logits)

    def lambda1(self, progress: float | None = None) -> float:
        """The dependency-loss weight at ``progress`` of training (0 for methods without one)."""
        return 0.0

    # ---- around the optimizer ------------------------------------------------------------------------------

    def param_groups(self) -> list[dict[str, Any]]:
        """Optimizer parameter groups ``student``, ``mixing`` (w) and ``adapters`` (Q), each with its learning rate."""
        return param_groups(self.model, self.settings, self.total_steps)

    def before_step(self) -> None:
        """Called after backward and before every optimizer step (knowledge flow refreshes θ_old here)."""

    def after_step(self, progress: float | None = None) -> None:
        """Called after every optimizer step, with the clock already ticked (knowledge flow raises the floor of
        p_w(student) here). ``progress`` ∈ [0, 1] defaults to :meth:`progress`."""

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()``; with ``precision: fp16`` the loss is scaled first (a GradScaler) so that small
        gradients survive float16, and :meth:`step` unscales them. Call it instead of ``loss.backward()``."""
        if self.settings.precision == "fp16":
            if self.scaler is None:
                self.scaler = torch.amp.GradScaler(loss.device.type)
                if self._scaler_state is not None:
                    self.scaler.load_state_dict(self._scaler_state)
            loss = self.scaler.scale(loss)
        loss.backward()

    def unscale_gradients(self, optimizer: torch.optim.Optimizer) -> None:
        """Divide fp16-scaled gradients back to their true size, before clipping them (nothing to do otherwise)."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer, progress: float | None = None) -> None:
        """:meth:`before_step`, ``optimizer.step()``, one tick of the clock, and :meth:`after_step`.

        ``progress`` is where training stands after this step, for trainers whose clock is not ``steps``
        (A3C's workers count frames); it defaults to :meth:`progress`. With fp16 the gradient scaler steps
        (skipping the update if a gradient overflowed) and adapts its scale.
        """
        self.before_step()
        if self.scaler is not None:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()
        self.steps += 1
        self.after_step(progress)

    def maybe_cut(self, progress: float | None = None, example: torch.Tensor | None = None) -> GraftedModel | None:
        """Remove the teachers if it is time (``cut_teachers_at``); returns the new :attr:`model`, or None.

        ``example`` is an input batch to re-trace the student on (default: the last batch :meth:`loss` saw).
        """
        return None

    def to(self, *args: Any, **kwargs: Any) -> Objective:
        """``model.to(...)``, and the same for what the objective holds outside the model (a distillation
        teacher, θ_old). Call it again after something else moved or cast the model (Lightning does)."""
        self.model.to(*args, **kwargs)
        return self

    # ---- resumable state -----------------------------------------------------------------------------------

    def extra_state(self) -> dict[str, torch.Tensor]:
        """Tensors a checkpoint must keep for an exact resume (subclasses add theirs to these)."""
        if self.scaler is None:
            return {}
        state = self.scaler.state_dict()
        return {f"{_SCALER_KEY}{k}": torch.tensor(float(v), dtype=torch.float64) for k, v in state.items()}

    def load_extra_state(self, tensors: dict[str, torch.Tensor]) -> None:
        scaler = {k[len(_SCALER_KEY) :]: float(v) for k, v in tensors.items() if k.startswith(_SCALER_KEY)}
        if scaler:
            ints = ("growth_interval", "_growth_tracker")
            self._scaler_state = {k: int(v) if k in ints else v for k, v in scaler.items()}
            if self.scaler is not None:
                self.scaler.load_state_dict(self._scaler_state)


METHODS: Registry[type[Objective]] = Registry("training method", TrainingError)


def register_method(name: str) -> Callable[[type[Objective]], type[Objective]]:
    """Register an :class:`Objective` subclass as ``train.method: NAME`` (for specs, ``fit`` and ``graftnet train``).

    Examples:
        >>> @register_method("label_smoothing")            # doctest: +SKIP
        ... class LabelSmoothing(Objective):
        ...     def loss(self, x, y, progress=None):
        ...         logits = logits_of(self.forward(x))
        ...         task = F.cross_entropy(logits, y, label_smoothing=0.1)
        ...         return StepLoss(task, {"task_loss": task}, logits)
    """

    def decorate(cls: type[Objective]) -> type[Objective]:
        METHODS.add(name, cls)
        register_method_name(name)
        return cls

    return decorate


def _teacher(spec: Spec, name: str, teachers: Mapping[str, nn.Module] | None) -> nn.Module:
    """The teacher ``name``: the module given, or built from the spec (with its weights), frozen in eval mode."""
    if teachers is not None and name in teachers:
        return teachers[name].eval().requires_grad_(False)
    t = spec.teachers[name]
    if t.model is None:
        raise TrainingError(f"teachers.{name}.model: no module was given for teacher {name!r}, so name its model")
    return build_model(t.model, t.kwargs, t.weights).eval().requires_grad_(False)


@register_method("scratch")
class Scratch(Objective):
    """The student from its random initialisation, on the task loss alone."""

    name = "scratch"


def copy_matching(
    student: nn.Module, source: Mapping[str, torch.Tensor], reinit: Sequence[str] = ()
) -> tuple[list[str], list[str]]:
    """Copy ``source`` tensors into ``student`` wherever names and shapes match, except under ``reinit``.

    ``reinit`` names module paths (``head``, ``fc``, ``classifier.1``) whose tensors are never copied and keep
    the student's fresh initialisation: the usual fine-tune with a new head.

    Returns:
        The copied keys and the keys kept fresh because of ``reinit``.

    Raises:
        TrainingError: a ``reinit`` name is no module of the student (the closest names are listed).
    """
    modules = dict(student.named_modules())
    for name in reinit:
        if name not in modules or not name:
            from graftnet.registry import closest

            hint = closest(name, [m for m in modules if m])
            raise TrainingError(
                f"train.finetune.reinit: the student has no module {name!r}"
                + (f"; closest: {', '.join(hint)}" if hint else "")
            )
    target = student.state_dict()

    def fresh(key: str) -> bool:
        return any(key.startswith(prefix + ".") for prefix in reinit)

    kept = [k for k in target if fresh(k)]
    copied = [k for k, v in source.items() if k in target and target[k].shape == v.shape and not fresh(k)]
    student.load_state_dict({k: source[k] for k in copied}, strict=False)
    return copied, kept


@register_method("finetune")
class Finetune(Objective):
    """The student starts from a teacher's weights wherever names and shapes match, except the parts in
    ``reinit``, which keep their fresh initialisation; then trains on the task loss.

    Args:
        model: the student (or its plain graft); ``teacher``'s tensors are copied into it on construction.
        teacher: the module whose weights the student starts from (``teacher_name`` names it in errors).
        reinit: module paths of the student to re-initialise (e.g. ``["head"]``). Default ``train.finetune.reinit``
            (empty: every tensor that fits is copied, the head too when the shapes match).
    """

    name = "finetune"

    def __init__(
        self, model: nn.Module, settings: TrainSpec | Mapping[str, Any] | None = None, *, teacher: nn.Module,
        reinit: Sequence[str] | None = None, teacher_name: str | None = None, total_steps: int | None = None,
        **overrides: Any,
    ) -> None:  # fmt: skip
        super().__init__(model, settings, total_steps=total_steps, **overrides)
        if reinit is None:
            reinit = self.settings.finetune.reinit if self.settings.finetune is not None else []
        student = model.student if isinstance(model, GraftedModel) else model
        self.copied, self.reinitialised = copy_matching(student, teacher.state_dict(), reinit)
        if not self.copied:
            which = f"teacher {teacher_name!r}" if teacher_name else "the teacher"
            raise TrainingError(
                f"train.finetune.teacher: no tensor of {which} fits the student (names or shapes differ); "
                "fine-tuning needs a teacher of the student's architecture"
            )

    @classmethod
    def from_spec(
        cls, spec: Spec, student: nn.Module, example: torch.Tensor, *,
        teachers: Mapping[str, nn.Module] | None = None, total_steps: int | None = None,
    ) -> Objective:  # fmt: skip
        assert spec.train is not None and spec.train.finetune is not None  # the spec validator checks both
        name = spec.train.finetune.teacher
        teacher = _teacher(spec, name, teachers)
        return cls(_plain(student, example, spec), spec.train, teacher=teacher, teacher_name=name,
                   total_steps=total_steps)  # fmt: skip


class _TeacherOutputs(Objective):
    """A method that learns from a whole teacher's outputs (KD, born-again): it keeps the teacher beside the model."""

    def __init__(
        self, model: nn.Module, settings: TrainSpec | Mapping[str, Any] | None = None, *, teacher: nn.Module,
        total_steps: int | None = None, **overrides: Any,
    ) -> None:  # fmt: skip
        super().__init__(model, settings, total_steps=total_steps, **overrides)
        if not isinstance(teacher, nn.Module):
            raise TrainingError(f"{type(self).__name__}: the teacher is a {type(teacher).__name__}, not a module")
        self.teacher = teacher.eval().requires_grad_(False)

    def teacher_logits(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return logits_of(self.in_precision(self.teacher, x))

    def to(self, *args: Any, **kwargs: Any) -> Objective:
        self.teacher.to(*args, **kwargs)
        return super().to(*args, **kwargs)


def _same_outputs(student: nn.Module, teacher: nn.Module, example: torch.Tensor, where: str) -> None:
    """Refuse a distillation teacher whose output space is not the student's."""
    with torch.no_grad():
        was = student.training
        student.eval()
        s_shape, t_shape = logits_of(student(example)).shape, logits_of(teacher(example)).shape
        student.train(was)
    if s_shape != t_shape:
        raise TrainingError(
            f"{where} outputs {tuple(t_shape[1:])} per sample but the student outputs {tuple(s_shape[1:])}; "
            "distillation needs the teacher's output space to be the target's"
        )


@register_method("kd")
class KnowledgeDistillation(_TeacherOutputs):
    """Hinton et al. (2015): match the teacher's softened outputs as well as the labels.

    Args:
        teacher: a module with the target's output space.
        temperature, alpha: T and the weight α of the soft term; default ``train.kd`` (T = 4, α = 0.9).
    """

    name = "kd"

    def __init__(
        self, model: nn.Module, settings: TrainSpec | Mapping[str, Any] | None = None, *, teacher: nn.Module,
        temperature: float | None = None, alpha: float | None = None, total_steps: int | None = None,
        **overrides: Any,
    ) -> None:  # fmt: skip
        super().__init__(model, settings, teacher=teacher, total_steps=total_steps, **overrides)
        kd = self.settings.kd or KDSpec(teacher="")  # the spec's settings, else the defaults
        self.temperature = kd.temperature if temperature is None else temperature
        self.alpha = kd.alpha if alpha is None else alpha

    @classmethod
    def from_spec(
        cls, spec: Spec, student: nn.Module, example: torch.Tensor, *,
        teachers: Mapping[str, nn.Module] | None = None, total_steps: int | None = None,
    ) -> Objective:  # fmt: skip
        assert spec.train is not None and spec.train.kd is not None
        name = spec.train.kd.teacher
        teacher = _teacher(spec, name, teachers)
        g = _plain(student, example, spec)
        _same_outputs(student, teacher, example, f"train.kd.teacher: teacher {name!r}")
        return cls(g, spec.train, teacher=teacher, total_steps=total_steps)

    def loss(self, x: torch.Tensor, y: torch.Tensor, progress: float | None = None) -> StepLoss:
        logits = logits_of(self.forward(x))
        total = kd_loss(logits, self.teacher_logits(x), y, self.temperature, self.alpha)
        return StepLoss(total, {"task_loss": F.cross_entropy(logits.detach(), y), "kd_loss": total.detach()}, logits)


@register_method("knowledge_flow")
class KnowledgeFlow(Objective):
    """The paper's eq. 3/4: task loss of the grafted model + λ1(t)·ℓ_dep + λ2·KL(f_θ ‖ f_θold).

    λ1(t) follows ``lambda1`` (0, then a ramp to its final value); θ_old is a snapshot of every trainable
    parameter (student, w, Q) refreshed before each optimizer step (every ``kl_lag`` steps), and the KL pass
    reuses the batch's teacher taps and dropout masks. With ``cut_teachers_at`` the teachers are removed at
    that fraction of training and the plain student trains on (:meth:`maybe_cut`). With a feature-hint weight > 0
    (``feature_hint``; unset, 0.3 under Adam and 1 under SGD: :attr:`TrainSpec.feature_hint_weight`) it adds that
    weight times the feature hint (:meth:`GraftedModel.feature_hint_loss`) until the cut: not in the paper
    (``feature_hint=0`` is its objective), and what makes knowledge flow pay off in graftnet's transfer study
    (examples/README.md, "Feature hints").

    With ``train.kd.with_knowledge_flow`` the task loss is Hinton's KD loss against ``distill_from`` (a whole
    teacher with the target's output space): the student also matches that teacher's softened outputs, after the
    cut too (the cut removes the teachers' layers from the student, not the distillation target).

    Args:
        model: a :class:`GraftedModel` (from :func:`graftnet.graft`).
        total_steps: optimizer steps in the whole run: λ1's clock, and the default learning rate of w.
        distill_from: the teacher whose outputs the KD loss matches; needed with ``train.kd.with_knowledge_flow``.
    """

    name = "knowledge_flow"

    def __init__(
        self, model: nn.Module, settings: TrainSpec | Mapping[str, Any] | None = None, *,
        total_steps: int | None = None, distill_from: nn.Module | None = None, **overrides: Any,
    ) -> None:  # fmt: skip
        if not isinstance(model, GraftedModel):
            raise TrainingError(
                f"KnowledgeFlow trains a grafted model: pass graftnet.graft(student, teachers, spec), "
                f"not a {type(model).__name__}"
            )
        super().__init__(model, settings, total_steps=total_steps, **overrides)
        self.model: GraftedModel = model
        self.snapshot = ParameterSnapshot(model, compile=self.settings.compile) if self.settings.lambda2 > 0 else None
        self._rng: RngState | None = None
        self.hint_weight = self.settings.feature_hint_weight  # resolved once: it depends on the optimizer
        if self.hint_weight > 0:
            model.keep_feature_hints()
        kd = self.settings.kd
        self.kd = kd if kd is not None and kd.with_knowledge_flow else None
        if self.kd is not None and not isinstance(distill_from, nn.Module):
            raise TrainingError(
                "train.kd.with_knowledge_flow: pass the whole teacher whose outputs the student matches as "
                "KnowledgeFlow(..., distill_from=teacher)"
            )
        self.distill_from = (distill_from.eval().requires_grad_(False)
                             if self.kd is not None and distill_from is not None else None)  # fmt: skip

    @classmethod
    def from_spec(
        cls, spec: Spec, student: nn.Module, example: torch.Tensor, *,
        teachers: Mapping[str, nn.Module] | None = None, total_steps: int | None = None,
    ) -> Objective:  # fmt: skip
        given = dict(teachers or {})
        modules = {name: given[name] if name in given else _teacher(spec, name, None) for name in spec.teachers}
        assert spec.train is not None
        kd = spec.train.kd
        distill_from = modules[kd.teacher] if kd is not None and kd.with_knowledge_flow else None
        if distill_from is not None:
            assert kd is not None
            _same_outputs(student, distill_from, example, f"train.kd.teacher: teacher {kd.teacher!r}")
        g = graft(student, modules, spec.graft_part(), example_input=example)
        return cls(g, spec.train, total_steps=total_steps, distill_from=distill_from)

    def to(self, *args: Any, **kwargs: Any) -> Objective:
        super().to(*args, **kwargs)
        if self.distill_from is not None:
            self.distill_from.to(*args, **kwargs)
        if self.snapshot is not None:
            self.snapshot.follow(self.model)  # θ_old on the parameters' device, in their dtype
        return self

    def lambda1(self, progress: float | None = None) -> float:
        l1 = self.settings.lambda1
        return lambda1_at(self.progress() if progress is None else progress, l1.final, l1.start, l1.end, l1.kind)

    def forward(self, x: torch.Tensor) -> Any:
        # the θ_old pass must draw the same dropout masks as this one
        self._rng = RngState.capture(x.device) if self.snapshot is not None else None
        return super().forward(x)

    def regularizer(
        self, x: torch.Tensor, logits: torch.Tensor, progress: float | None = None, head: Head = logits_of
    ) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        """λ1(t)·ℓ_dep and, with ``feature_hint``, its weight times the feature hint (both until the cut), and
        λ2·KL(f_θ ‖ f_θold). Call within ``model.reusing_teacher_features()`` after :meth:`forward` on the same
        ``x``, so the θ_old pass reuses the teachers' taps (and the hint is this pass's)."""
        terms: list[torch.Tensor] = []
        parts: dict[str, torch.Tensor] = {}
        if not self.cut:
            dep = self.model.dependency_loss()
            parts["dep_loss"] = dep
            terms.append(self.lambda1(progress) * dep)
            if self.hint_weight > 0:
                hint = self.model.feature_hint_loss()
                parts["hint_loss"] = hint
                terms.append(self.hint_weight * hint)
        if self.snapshot is not None:
            snapshot, rng = self.snapshot, self._rng
            old = self.in_precision(lambda x: snapshot.outputs(self.model, x, rng), x)
            kl = kl_to_old(logits, head(old))
            parts["kl_loss"] = kl
            terms.append(self.settings.lambda2 * kl)
        return terms, parts

    def loss(self, x: torch.Tensor, y: torch.Tensor, progress: float | None = None) -> StepLoss:
        with self.model.reusing_teacher_features():
            logits = logits_of(self.forward(x))
            terms, parts = self.regularizer(x, logits, progress)
        if self.kd is not None and self.distill_from is not None:
            with torch.no_grad():
                teacher = logits_of(self.in_precision(self.distill_from, x))
            total = kd_loss(logits, teacher, y, self.kd.temperature, self.kd.alpha)
            task = F.cross_entropy(logits.detach(), y)  # reported only: the KD loss holds its own cross-entropy
            parts["kd_loss"] = total.detach()
        else:
            total = task = F.cross_entropy(logits, y)
        for term in terms:
            total = total + term
        return StepLoss(total, {"task_loss": task, **parts}, logits)

    def before_step(self) -> None:
        if self.snapshot is not None and self.steps % self.settings.kl_lag == 0:
            self.snapshot.refresh(self.model)

    def student_floor(self, progress: float | None = None) -> float:
        """The lower bound ``p_w_floor`` puts on p_w(student) at ``progress`` (0 without one, or after the cut)."""
        floor, t = self.settings.p_w_floor, self.settings
        if floor is None or self.cut:
            return 0.0
        progress = self.progress() if progress is None else progress
        end = floor.end or t.cut_teachers_at or 1.0
        ramp = 1.0 if progress >= end else max(0.0, (progress - floor.start) / (end - floor.start))
        return ramp * (1.0 - t.export_tol / 10)

    def after_step(self, progress: float | None = None) -> None:
        self.model.raise_student_floor(self.student_floor(progress))

    def maybe_cut(self, progress: float | None = None, example: torch.Tensor | None = None) -> GraftedModel | None:
        at = self.settings.cut_teachers_at
        progress = self.progress() if progress is None else progress
        if self.cut or at is None or progress < at:
            return None
        return self.cut_teachers(example)

    def cut_teachers(self, example: torch.Tensor | None = None) -> GraftedModel:
        """Remove the teachers now: :attr:`model` becomes the plain student (as a graft without sites).

        ``example`` is an input batch to re-trace the student on (default: the last batch :meth:`loss` saw).
        """
        self.cut = True
        self.dependence_at_cut = {site: row["student"] for site, row in self.model.p_w().items()}
        example = example if example is not None else self._example
        if example is None:
            shape = self.model.spec.input_shape
            if shape is None:
                raise TrainingError(
                    "cutting the teachers re-traces the student, which needs an example input: call loss() once "
                    "first, or give the spec an input_shape"
                )
            example = torch.zeros(2, *shape)
        device = next((p.device for p in self.model.student.parameters()), torch.device("cpu"))
        plain = _plain(self.model.student, example.to(device), self.model.spec)
        plain.train(self.model.training)
        self.model = plain
        return plain

    def extra_state(self) -> dict[str, torch.Tensor]:
        state = super().extra_state()
        state.update({f"theta_old.{k}": v for k, v in (self.snapshot.state() if self.snapshot else {}).items()})
        state.update({f"p_w_at_cut.{site}": torch.tensor(p) for site, p in self.dependence_at_cut.items()})
        return state

    def load_extra_state(self, tensors: dict[str, torch.Tensor]) -> None:
        super().load_extra_state(tensors)
        if self.snapshot is not None:
            self.snapshot.load({k[len("theta_old.") :]: v for k, v in tensors.items() if k.startswith("theta_old.")})
        cut = {k[len("p_w_at_cut.") :]: float(v) for k, v in tensors.items() if k.startswith("p_w_at_cut.")}
        if cut:
            self.dependence_at_cut = cut


@register_method("born_again")
class BornAgain(_TeacherOutputs):
    """One born-again generation (Furlanello et al. 2018): learn from the teacher's output distribution.

    Treatments: ``ban`` (teacher distribution only), ``ban_l`` (plus ``label_weight`` × labels), ``cwtm``
    (labels weighted by the teacher's confidence, eq. 10), ``dkpp`` (teacher distribution with non-argmax
    entries permuted, eq. 11). Defaults come from ``train.born_again``.
    """

    name = "born_again"

    def __init__(
        self, model: nn.Module, settings: TrainSpec | Mapping[str, Any] | None = None, *, teacher: nn.Module,
        treatment: str | None = None, label_weight: float | None = None, total_steps: int | None = None,
        **overrides: Any,
    ) -> None:  # fmt: skip
        super().__init__(model, settings, teacher=teacher, total_steps=total_steps, **overrides)
        ba = self.settings.born_again or BornAgainSpec(teacher="")  # the spec's settings, else the defaults
        self.treatment = treatment or ba.treatment
        if self.treatment not in ("ban", "ban_l", "cwtm", "dkpp"):
            raise TrainingError(f"born-again treatment {self.treatment!r}: use ban, ban_l, cwtm or dkpp")
        self.label_weight = ba.label_weight if label_weight is None else label_weight

    @classmethod
    def from_spec(
        cls, spec: Spec, student: nn.Module, example: torch.Tensor, *,
        teachers: Mapping[str, nn.Module] | None = None, total_steps: int | None = None,
    ) -> Objective:  # fmt: skip
        assert spec.train is not None and spec.train.born_again is not None
        teacher = _teacher(spec, spec.train.born_again.teacher, teachers)
        return cls(_plain(student, example, spec), spec.train, teacher=teacher, total_steps=total_steps)

    def loss(self, x: torch.Tensor, y: torch.Tensor, progress: float | None = None) -> StepLoss:
        logits = logits_of(self.forward(x))
        teacher_probs = F.softmax(self.teacher_logits(x), dim=-1)
        if teacher_probs.shape != logits.shape:
            raise TrainingError(
                f"train.born_again.teacher: the teacher outputs {tuple(teacher_probs.shape)} but the student "
                f"{tuple(logits.shape)}; a born-again student needs its teacher's output space"
            )
        if self.treatment == "cwtm":
            total = cwtm_loss(logits, teacher_probs, y)
        else:
            target = dkpp_targets(teacher_probs) if self.treatment == "dkpp" else teacher_probs
            total = soft_cross_entropy(logits, target)
            if self.treatment == "ban_l":
                total = total + self.label_weight * F.cross_entropy(logits, y)
        return StepLoss(total, {"task_loss": F.cross_entropy(logits.detach(), y), "kd_loss": total.detach()}, logits)
