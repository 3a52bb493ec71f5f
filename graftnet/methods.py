"""Training methods by name: ``scratch``, ``finetune``, ``kd``, ``knowledge_flow``, ``born_again`` (DESIGN.md §6).

``ban`` — a sequence of born-again generations — is a sequence of runs of these, in :mod:`graftnet.ban`.

A method decides what model trains and what its loss is; the trainer (:mod:`graftnet.trainer`) owns the
loop, the data, checkpoints and logging, so every method gets the same data, student and budget. Every
method trains a :class:`GraftedModel` — for the baselines a graft without sites, which computes exactly
the student — so checkpoints, export and evaluation are one code path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from graftnet.errors import TrainingError
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
from graftnet.models import build_model
from graftnet.registry import Registry
from graftnet.spec import Spec

__all__ = [
    "METHODS",
    "BornAgain",
    "Finetune",
    "KnowledgeDistillation",
    "KnowledgeFlow",
    "Method",
    "Scratch",
    "StepLoss",
]


def logits_of(out: Any) -> torch.Tensor:
    """The class scores of a model's output: the tensor itself, or the first element of a tuple."""
    if isinstance(out, (tuple, list)) and out:
        out = out[0]
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        raise TrainingError(
            "supervised training needs a model that returns class scores of shape (batch, classes), got "
            + (f"shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__)
        )
    return out


@dataclass
class StepLoss:
    """One batch's loss and its named parts (for logging), and the class scores it came from."""

    total: torch.Tensor
    parts: dict[str, torch.Tensor]
    logits: torch.Tensor


def _plain(student: nn.Module, spec: Spec, example: torch.Tensor) -> GraftedModel:
    """The student as a graft without sites or teachers: it computes exactly ``student(x)``."""
    bare = spec.graft_part().model_copy(update={"teachers": {}, "sites": []})
    return graft(student, {}, bare, example_input=example)


def _teacher(spec: Spec, name: str) -> nn.Module:
    t = spec.teachers[name]
    if t.model is None:
        raise TrainingError(f"teachers.{name}.model: training builds its teachers from the spec, so name the model")
    return build_model(t.model, t.kwargs, t.weights).eval().requires_grad_(False)


class Method:
    """What trains and how it is scored. Subclasses override :meth:`build`, and :meth:`loss` if they add terms."""

    name = ""
    cut = False  # True once the teachers are removed
    dependence_at_cut: dict[str, float] = {}  # p_w(student) per site when they were

    def __init__(self, spec: Spec) -> None:
        self.spec = spec
        assert spec.train is not None  # the trainer checks this before building a method
        self.train_spec = spec.train

    def build(self, student: nn.Module, example: torch.Tensor) -> GraftedModel:
        return _plain(student, self.spec, example)

    def loss(
        self, g: GraftedModel, x: torch.Tensor, y: torch.Tensor, progress: float, forward: nn.Module | None = None
    ) -> StepLoss:
        """The batch's loss. ``forward`` runs the model (``g`` itself, or ``g`` in DistributedDataParallel)."""
        logits = logits_of((forward or g)(x))
        task = F.cross_entropy(logits, y)
        return StepLoss(task, {"task_loss": task}, logits)

    def before_step(self, g: GraftedModel, step: int) -> None:
        """Called before every optimizer step."""

    def lambda1(self, progress: float) -> float:
        """The dependency-loss weight at ``progress`` of training (0 for methods without one)."""
        return 0.0

    def to(self, device: torch.device) -> None:
        """Move what the method holds outside the model (a distillation teacher) to ``device``."""

    def maybe_cut(self, g: GraftedModel, progress: float, example: torch.Tensor) -> GraftedModel | None:
        """A teacher-free model to train on from here, or None to keep ``g``."""
        return None

    def extra_state(self) -> dict[str, torch.Tensor]:
        """Tensors a checkpoint must keep for an exact resume."""
        return {}

    def load_extra_state(self, tensors: dict[str, torch.Tensor]) -> None:
        pass


METHODS: Registry[Callable[[Spec], Method]] = Registry("training method", TrainingError)


@METHODS.register("scratch")
class Scratch(Method):
    """The student from its random initialisation, on the task loss alone."""

    name = "scratch"


@METHODS.register("finetune")
class Finetune(Method):
    """The student starts from a teacher's weights wherever names and shapes match (the rest stays random)."""

    name = "finetune"
    copied: list[str]

    def build(self, student: nn.Module, example: torch.Tensor) -> GraftedModel:
        assert self.train_spec.finetune is not None
        name = self.train_spec.finetune.teacher
        source = _teacher(self.spec, name).state_dict()
        target = student.state_dict()
        self.copied = [k for k, v in source.items() if k in target and target[k].shape == v.shape]
        if not self.copied:
            raise TrainingError(
                f"train.finetune.teacher: no tensor of teacher {name!r} fits the student (names or shapes differ); "
                "fine-tuning needs a teacher of the student's architecture"
            )
        student.load_state_dict({k: source[k] for k in self.copied}, strict=False)
        return _plain(student, self.spec, example)


@METHODS.register("kd")
class KnowledgeDistillation(Method):
    """Hinton et al. (2015): match the teacher's softened outputs as well as the labels."""

    name = "kd"

    def build(self, student: nn.Module, example: torch.Tensor) -> GraftedModel:
        assert self.train_spec.kd is not None
        self.kd = self.train_spec.kd
        self.teacher = _teacher(self.spec, self.kd.teacher)
        g = _plain(student, self.spec, example)
        with torch.no_grad():
            was = student.training
            student.eval()
            s_shape, t_shape = logits_of(student(example)).shape, logits_of(self.teacher(example)).shape
            student.train(was)
        if s_shape != t_shape:
            raise TrainingError(
                f"train.kd.teacher: teacher {self.kd.teacher!r} outputs {tuple(t_shape)} but the student outputs "
                f"{tuple(s_shape)}; distillation needs the teacher's output space to be the target's"
            )
        return g

    def loss(
        self, g: GraftedModel, x: torch.Tensor, y: torch.Tensor, progress: float, forward: nn.Module | None = None
    ) -> StepLoss:
        logits = logits_of((forward or g)(x))
        with torch.no_grad():
            teacher_logits = logits_of(self.teacher(x))
        total = kd_loss(logits, teacher_logits, y, self.kd.temperature, self.kd.alpha)
        return StepLoss(total, {"task_loss": F.cross_entropy(logits.detach(), y), "kd_loss": total.detach()}, logits)

    def to(self, device: torch.device) -> None:
        self.teacher.to(device)


@METHODS.register("knowledge_flow")
class KnowledgeFlow(Method):
    """The paper's eq. 3: task loss of the grafted model + λ1(t)·ℓ_dep + λ2·KL(f_θ ‖ f_θold).

    Optionally the teachers are cut at ``cut_teachers_at`` of training and the plain student trains on
    (FIELD-NOTES: this made the student reliable once p_w(student) was near 1).
    """

    name = "knowledge_flow"
    snapshot: ParameterSnapshot | None = None

    def build(self, student: nn.Module, example: torch.Tensor) -> GraftedModel:
        g = graft(student, None, self.spec.graft_part(), example_input=example)
        if self.train_spec.lambda2 > 0:
            self.snapshot = ParameterSnapshot(g)
        return g

    def lambda1(self, progress: float) -> float:
        l1 = self.train_spec.lambda1
        return lambda1_at(progress, l1.final, l1.start, l1.end, l1.kind)

    def loss(
        self, g: GraftedModel, x: torch.Tensor, y: torch.Tensor, progress: float, forward: nn.Module | None = None
    ) -> StepLoss:
        rng = RngState.capture(x.device) if self.snapshot is not None else None
        with g.reusing_teacher_features():
            logits = logits_of((forward or g)(x))
            task = F.cross_entropy(logits, y)
            parts = {"task_loss": task}
            total = task
            if not self.cut:
                dep = g.dependency_loss()
                total = total + self.lambda1(progress) * dep
                parts["dep_loss"] = dep
            if self.snapshot is not None:
                kl = kl_to_old(logits, logits_of(self.snapshot.outputs(g, x, rng)))
                total = total + self.train_spec.lambda2 * kl
                parts["kl_loss"] = kl
        return StepLoss(total, parts, logits)

    def before_step(self, g: GraftedModel, step: int) -> None:
        if self.snapshot is not None and step % self.train_spec.kl_lag == 0:
            self.snapshot.refresh(g)

    def maybe_cut(self, g: GraftedModel, progress: float, example: torch.Tensor) -> GraftedModel | None:
        at = self.train_spec.cut_teachers_at
        if self.cut or at is None or progress < at:
            return None
        self.cut = True
        self.dependence_at_cut = {site: row["student"] for site, row in g.p_w().items()}
        return _plain(g.student, self.spec, example)

    def extra_state(self) -> dict[str, torch.Tensor]:
        state = {f"theta_old.{k}": v for k, v in (self.snapshot.state() if self.snapshot is not None else {}).items()}
        state.update({f"p_w_at_cut.{site}": torch.tensor(p) for site, p in self.dependence_at_cut.items()})
        return state

    def load_extra_state(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.snapshot is not None:
            self.snapshot.load({k[len("theta_old.") :]: v for k, v in tensors.items() if k.startswith("theta_old.")})
        cut = {k[len("p_w_at_cut.") :]: float(v) for k, v in tensors.items() if k.startswith("p_w_at_cut.")}
        if cut:
            self.dependence_at_cut = cut


@METHODS.register("born_again")
class BornAgain(Method):
    """One born-again generation (Furlanello et al. 2018): learn from the teacher's output distribution.

    Treatments: ``ban`` (teacher distribution only), ``ban_l`` (plus labels), ``cwtm`` (labels weighted by
    the teacher's confidence, eq. 10), ``dkpp`` (teacher distribution with non-argmax entries permuted, eq. 11).
    """

    name = "born_again"

    def build(self, student: nn.Module, example: torch.Tensor) -> GraftedModel:
        assert self.train_spec.born_again is not None
        self.settings = self.train_spec.born_again
        self.teacher = _teacher(self.spec, self.settings.teacher)
        return _plain(student, self.spec, example)

    def loss(
        self, g: GraftedModel, x: torch.Tensor, y: torch.Tensor, progress: float, forward: nn.Module | None = None
    ) -> StepLoss:
        logits = logits_of((forward or g)(x))
        with torch.no_grad():
            teacher_probs = F.softmax(logits_of(self.teacher(x)), dim=-1)
        if teacher_probs.shape != logits.shape:
            raise TrainingError(
                f"train.born_again.teacher: the teacher outputs {tuple(teacher_probs.shape)} but the student "
                f"{tuple(logits.shape)}; a born-again student needs its teacher's output space"
            )
        treatment = self.settings.treatment
        if treatment == "cwtm":
            total = cwtm_loss(logits, teacher_probs, y)
        else:
            target = dkpp_targets(teacher_probs) if treatment == "dkpp" else teacher_probs
            total = soft_cross_entropy(logits, target)
            if treatment == "ban_l":
                total = total + self.settings.label_weight * F.cross_entropy(logits, y)
        return StepLoss(total, {"task_loss": F.cross_entropy(logits.detach(), y), "kd_loss": total.detach()}, logits)

    def to(self, device: torch.device) -> None:
        self.teacher.to(device)
