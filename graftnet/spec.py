"""The graft spec: which student layers may read which teacher layers (README "The spec").

The spec is plain data validated by pydantic (``extra="forbid"`` everywhere, so a typo is an error, not a
silently ignored key). Nothing here imports torch or user code: model references are strings that
:func:`graftnet.models.build_model` resolves later.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from graftnet.errors import SpecError

__all__ = [
    "BANSpec",
    "BornAgainSpec",
    "DataSpec",
    "FinetuneSpec",
    "InputStep",
    "KDSpec",
    "Lambda1Spec",
    "MixingSpec",
    "ModelSpec",
    "RLSpec",
    "SiteSpec",
    "Spec",
    "TeacherSpec",
    "TrainSpec",
    "load_spec",
    "register_method_name",
    "schema",
]


# The names ``train.method`` accepts. The objectives themselves live in graftnet.training (which needs torch);
# registering one there adds its name here, so that validating a spec never imports torch.
_METHOD_NAMES: set[str] = {"scratch", "finetune", "kd", "knowledge_flow", "born_again", "ban"}


def register_method_name(name: str) -> None:
    """Let ``train.method`` accept ``name`` (called by :func:`graftnet.register_method`)."""
    if not name.isidentifier():
        raise SpecError(f"a training method's name must be an identifier (letters, digits, _), got {name!r}")
    _METHOD_NAMES.add(name)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_model_ref(ref: str) -> str:
    source, sep, name = ref.partition(":")
    if not sep or not source or not name:
        raise ValueError(
            f"model reference {ref!r} must look like 'SOURCE:NAME' "
            "(timm:resnet18, torchvision:densenet121, graftnet:a3c, or package.module:callable)"
        )
    return ref


class ModelSpec(_Strict):
    """A model to build: ``timm:NAME``, ``torchvision:NAME``, ``graftnet:NAME`` or ``package.module:callable``.

    A ``package.module:callable`` reference imports and runs that code: a spec is as trusted as a script.
    """

    model: str = Field(description="Model reference, e.g. 'timm:resnet18' or 'mypkg.nets:build'.")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments for the constructor.")
    weights: str | None = Field(
        None, description="Trained weights loaded with strict=True after building: .safetensors, or a state dict in "
        ".pth/.pt/.bin read with torch.load(weights_only=True); relative to the working directory."
    )

    _model_ref = field_validator("model")(_check_model_ref)


class InputStep(_Strict):
    """One step of a teacher's input adapter, applied to the student's input before the teacher sees it."""

    adapter: str = Field(description="Registered input adapter: identity, resize, normalize, conv1x1, ...")
    kwargs: dict[str, Any] = Field(default_factory=dict)


class TeacherSpec(_Strict):
    """A frozen teacher. ``model`` may be omitted when the module is passed to :func:`graftnet.graft`."""

    model: str | None = None
    kwargs: dict[str, Any] = Field(default_factory=dict)
    weights: str | None = None
    input: list[InputStep] = Field(
        default_factory=list, description="Input adapter steps from the student's input to this teacher's input."
    )

    @field_validator("model")
    @classmethod
    def _model_ref(cls, ref: str | None) -> str | None:
        return None if ref is None else _check_model_ref(ref)

    def model_spec(self) -> ModelSpec | None:
        return None if self.model is None else ModelSpec(model=self.model, kwargs=self.kwargs, weights=self.weights)


class SiteSpec(_Strict):
    """A student activation and the teacher activations (taps) it may mix in."""

    student: str = Field(description="Activation module path, functional node name, or parent module path.")
    taps: list[str] = Field(min_length=1, description="Teacher activations written 'teacher:name'.")
    adapter: str | None = Field(None, description="Adapter for this site's taps; defaults to the spec's adapter.")

    @field_validator("taps")
    @classmethod
    def _taps_name_a_teacher(cls, taps: list[str]) -> list[str]:
        for tap in taps:
            teacher, sep, name = tap.partition(":")
            if not sep or not teacher or not name:
                raise ValueError(f"tap {tap!r} must be written 'teacher:name', e.g. 'c100:layer1.2.act2'")
        if len(set(taps)) != len(taps):
            dup = sorted({t for t in taps if taps.count(t) > 1})
            raise ValueError(f"tap listed twice: {', '.join(dup)}")
        return taps


class MixingSpec(_Strict):
    """How the mixers start and how teacher activations are scaled before their adapters."""

    init: Literal["uniform"] | float = Field(
        "uniform", description="'uniform', or the initial p_w of the student (0 < p < 1); teachers share the rest."
    )
    rescale_taps: bool = Field(
        True, description="Rescale each tap to unit mean |z| before its adapter (scale calibrated, then frozen)."
    )
    calibration_batches: int = Field(4, ge=1, description="Training batches the tap scales are averaged over.")

    @field_validator("init")
    @classmethod
    def _probability(cls, init: str | float) -> str | float:
        if not isinstance(init, str) and not 0.0 < init < 1.0:
            raise ValueError(f"initial p_w of the student must lie strictly between 0 and 1, got {init}")
        return init


class DataSpec(_Strict):
    """The task: a registered dataset, the classes kept, and how its training split is divided."""

    dataset: str = Field(
        description="Registered dataset (digits, mnist1d, imagefolder, cifar10, cifar100, svhn, mnist, ...) or "
        "'package.module:callable' returning the splits — that imports and runs your code, like a model reference."
    )
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Dataset options: root, download, samples ...")
    classes: list[int] | None = Field(None, description="Keep only these classes, relabelled 0..k-1 in this order.")
    label_map: dict[int, int] | None = Field(None, description="Explicit {original: new} labels for kept classes.")
    train_size: int | None = Field(None, ge=1, description="At most this many training samples (low-data tasks).")
    val_size: int | float = Field(
        0.1, description="Validation samples carved from the training split: a count, or a fraction in (0, 1)."
    )
    shuffle_labels: bool = Field(
        False, description="Give training and validation samples randomly permuted labels (a control teacher "
        "that learns nothing transferable)."
    )  # fmt: skip
    augment: bool = Field(True, description="The dataset's standard training augmentation.")
    batch_size: int = Field(64, ge=1)
    eval_batch_size: int = Field(512, ge=1)
    num_workers: int = Field(0, ge=0, description="DataLoader workers (in-memory built-in data needs none).")
    seed: int = Field(0, description="Draws the validation split and the training subset, the same for every method.")

    @field_validator("val_size")
    @classmethod
    def _val_size(cls, v: int | float) -> int | float:
        if isinstance(v, float) and not 0.0 < v < 1.0 or isinstance(v, int) and v < 1:
            raise ValueError(f"val_size must be a count >= 1 or a fraction in (0, 1), got {v}")
        return v

    @field_validator("classes")
    @classmethod
    def _distinct(cls, classes: list[int] | None) -> list[int] | None:
        if classes is not None and (not classes or len(set(classes)) != len(classes)):
            raise ValueError(f"classes must be a non-empty list without repeats, got {classes}")
        return classes


class Lambda1Spec(_Strict):
    """λ1(t), the weight of the dependency loss: 0 until ``start``, a ramp to ``final`` by ``end``, then flat.

    ``start`` and ``end`` are fractions of training; the paper ramps linearly from 0.
    """

    final: float = Field(
        10.0, ge=0.0, description="λ1 at the end of the ramp (docs/architecture.md: 10 makes p0 reach 1)."
    )
    start: float = Field(0.1, ge=0.0, le=1.0, description="Fraction of training where the ramp begins.")
    end: float = Field(0.6, ge=0.0, le=1.0, description="Fraction of training where λ1 reaches its final value.")
    kind: Literal["linear", "cosine", "constant"] = "linear"

    @model_validator(mode="after")
    def _ordered(self) -> Lambda1Spec:
        if self.end < self.start:
            raise ValueError(f"lambda1.end ({self.end}) must not come before lambda1.start ({self.start})")
        return self


class KDSpec(_Strict):
    """Hinton et al. (2015): α·T²·KL(teacher_T ‖ student_T) + (1 − α)·cross-entropy."""

    teacher: str = Field(description="The teacher (a key of 'teachers') whose outputs the student matches.")
    temperature: float = Field(4.0, gt=0.0)
    alpha: float = Field(0.9, ge=0.0, le=1.0)


class FinetuneSpec(_Strict):
    """Start the student from a teacher's weights wherever names and shapes match, except under ``reinit``."""

    teacher: str = Field(description="The teacher (a key of 'teachers') to copy weights from.")
    reinit: list[str] = Field(
        default_factory=list,
        description="Student module paths that keep their fresh initialisation, e.g. ['head'] for a new "
        "classifier (default none: every tensor whose name and shape match is copied, the head too).",
    )


Treatment = Literal["ban", "ban_l", "cwtm", "dkpp"]


class BornAgainSpec(_Strict):
    """One born-again generation: the student learns from a teacher's outputs (Furlanello et al. 2018).

    ``ban``: cross-entropy to the teacher's distribution only; ``ban_l``: plus ``label_weight`` × the label
    cross-entropy; ``cwtm``: the label cross-entropy with samples weighted by the teacher's max probability,
    normalised over the batch (eq. 10); ``dkpp``: cross-entropy to the teacher's distribution with every
    entry but its argmax permuted per sample (eq. 11).
    """

    teacher: str = Field(description="The teacher (a key of 'teachers'): the previous generation.")
    treatment: Treatment = "ban"
    label_weight: float = Field(1.0, ge=0.0, description="Weight of the label loss in ban_l.")


class BANSpec(_Strict):
    """A sequence of born-again generations: generation 0 trains normally, generation k learns from k − 1.

    Every generation starts from a fresh random initialisation with its own seed (train.seed · 1000 + k).
    """

    generations: int = Field(3, ge=1, description="Students after generation 0.")
    treatment: Treatment = "ban"
    label_weight: float = Field(1.0, ge=0.0, description="Weight of the label loss in ban_l.")
    teacher_model: ModelSpec | None = Field(
        None, description="Generation 0's architecture when it differs from the student's (DenseNet → ResNet)."
    )
    knowledge_flow: bool = Field(
        False, description="Born-again knowledge flow: graft generation k onto earlier ones at every matching "
        "site (identity adapters), train with the dependency loss, detach; instead of distillation.",
    )  # fmt: skip
    flow_from: Literal["previous", "all"] = Field(
        "previous", description="With knowledge_flow: graft the previous generation only, or every earlier one."
    )
    ensemble_with_teacher: bool = Field(False, description="Count generation 0 in the ensembles too.")


class TrainSpec(_Strict):
    """How a student is trained: the method, the budget, the optimiser and the knowledge-flow schedule."""

    method: str = Field(
        "knowledge_flow",
        description="A registered training method: scratch, finetune, kd, knowledge_flow, born_again, ban, or one "
        "added with graftnet.register_method.",
    )
    epochs: int = Field(30, ge=1)
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = Field(1e-3, gt=0.0, description="Learning rate of the student.")
    lr_mixing: float | None = Field(
        None,
        gt=0.0,
        description="Learning rate of the mixers' logits w (default: enough for w to move 20 units over the "
        "lambda1 ramp, at least 10 × lr; Adam moves w about lr per step).",
    )
    lr_adapters: float | None = Field(None, gt=0.0, description="Learning rate of the adapters Q (default lr).")
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="SGD momentum.")
    weight_decay: float = Field(0.0, ge=0.0, description="Weight decay of the student (never of w).")
    schedule: Literal["constant", "cosine"] = Field("cosine", description="Learning-rate schedule over training.")
    seed: int = Field(0, description="Initialisation, batch order, augmentation and dropout.")
    device: str = Field("cpu", description="cpu, cuda, cuda:N, or auto (cuda when available).")
    threads: int | None = Field(
        None, ge=1, description="CPU threads for torch (default: torch's choice; small models run faster on 1)."
    )
    lambda1: Lambda1Spec = Field(default_factory=Lambda1Spec)
    lambda2: float = Field(0.1, ge=0.0, description="Weight of KL(f_θ ‖ f_θold), the paper's λ2.")
    kl_lag: int = Field(1, ge=1, description="θ_old is refreshed every kl_lag optimiser steps (1: the step before).")
    cut_teachers_at: float | None = Field(
        0.7, gt=0.0, le=1.0,
        description="Fraction of training after which teachers are removed and the plain student trains on "
        "(null: keep them to the end).",
    )  # fmt: skip
    export_tol: float = Field(1e-3, gt=0.0, lt=1.0, description="Export refuses p_w(student) below 1 - tol.")
    kd: KDSpec | None = None
    finetune: FinetuneSpec | None = None
    born_again: BornAgainSpec | None = None
    ban: BANSpec | None = None
    label: str | None = Field(None, description="Name of the run in plots and tables (default: the folder name).")

    @field_validator("method")
    @classmethod
    def _registered(cls, method: str) -> str:
        if method not in _METHOD_NAMES:
            raise ValueError(
                f"unknown training method {method!r}; registered: {', '.join(sorted(_METHOD_NAMES))} "
                "(add one with graftnet.register_method)"
            )
        return method


class RLSpec(_Strict):
    """Reinforcement learning (paper §4.1): A2C or A3C on a gymnasium environment, with the paper's evaluation."""

    env: str = Field(description="Environment id: MinAtar/<Game>-v1, ALE/<Game>-v5, or classic control (CartPole-v1).")
    algorithm: Literal["a2c", "a3c"] = Field(
        "a2c", description="a2c: synchronous, one learner; a3c: Hogwild worker processes sharing the model and Adam."
    )
    frames: int = Field(
        1_000_000, ge=1, description="Training budget in environment frames (agent steps × frame skip), all envs."
    )
    num_envs: int = Field(16, ge=1, description="Environments per learner (a2c) or per worker (a3c).")
    workers: int = Field(2, ge=1, description="A3C worker processes.")
    rollout: int = Field(5, ge=1, description="n of the n-step returns: steps per environment per update.")
    gamma: float = Field(0.99, gt=0.0, le=1.0, description="Discount.")
    entropy: float = Field(0.01, ge=0.0, description="Entropy bonus β.")
    value_coef: float = Field(0.5, ge=0.0, description="Weight of the value loss.")
    clip_rewards: bool | None = Field(
        None, description="Learn from rewards clipped to [-1, 1] (default: for ALE/* games, as A3C does)."
    )
    max_grad_norm: float | None = Field(0.5, gt=0.0, description="Gradient-norm clip (null: none).")
    log_every: int = Field(
        50_000, ge=1, description="Frames between metrics rows and checkpoints."
    )
    eval_episodes: int = Field(30, ge=1, description="Episodes of the final evaluation of the detached student.")
    noop_max: int = Field(30, ge=0, description="Up to this many random no-ops start every evaluation episode.")


class Spec(_Strict):
    """A graft: student, teachers, and the candidate set of every mixed student layer."""

    student: ModelSpec | None = Field(None, description="The student; omitted when graft() is given the module.")
    teachers: dict[str, TeacherSpec] = Field(default_factory=dict)
    input_shape: list[int] | None = Field(
        None, description="Shape of one input sample (no batch dim), used to resolve shapes without an example."
    )
    sites: list[SiteSpec] = Field(default_factory=list)
    adapter: str = Field("auto", description="Default adapter key for every tap.")
    mixing: MixingSpec = Field(default_factory=MixingSpec)
    data: DataSpec | None = Field(None, description="The task to train on (graftnet train).")
    train: TrainSpec | None = Field(None, description="How to train (graftnet train).")
    rl: RLSpec | None = Field(None, description="Train by reinforcement learning in an environment (instead of data).")

    @field_validator("input_shape")
    @classmethod
    def _positive(cls, shape: list[int] | None) -> list[int] | None:
        if shape is not None and (not shape or any(d <= 0 for d in shape)):
            raise ValueError(f"input_shape must be a non-empty list of positive sizes, got {shape}")
        return shape

    @field_validator("teachers")
    @classmethod
    def _teacher_names(cls, teachers: dict[str, TeacherSpec]) -> dict[str, TeacherSpec]:
        for name in teachers:
            if not name.isidentifier():
                raise ValueError(f"teacher name {name!r} must be a Python identifier (letters, digits, _)")
        return teachers

    @model_validator(mode="after")
    def _unique_sites(self) -> Spec:
        first: dict[str, int] = {}
        for i, site in enumerate(self.sites):
            if site.student in first:
                raise ValueError(
                    f"sites[{i}].student: site {site.student!r} is listed twice (also sites[{first[site.student]}])"
                )
            first[site.student] = i
        return self

    @model_validator(mode="after")
    def _method_has_what_it_needs(self) -> Spec:
        train = self.train
        if train is None:
            return self
        for method, section in (("kd", train.kd), ("finetune", train.finetune), ("born_again", train.born_again)):
            if train.method == method and section is None:
                raise ValueError(f"train.{method}: method {method!r} needs a train.{method} section naming its teacher")
            if section is not None and section.teacher not in self.teachers:
                raise ValueError(
                    f"train.{method}.teacher: {section.teacher!r} is not a teacher of this spec "
                    f"(teachers: {', '.join(sorted(self.teachers)) or 'none'})"
                )
        if self.rl is not None:
            if self.data is not None:
                raise ValueError("rl: a spec trains either on data or in an environment: remove 'data' or 'rl'")
            if train.method not in ("scratch", "finetune", "knowledge_flow"):
                raise ValueError(
                    f"train.method: {train.method!r} does not apply to 'rl': use scratch, finetune or knowledge_flow"
                )
        if train.method == "knowledge_flow" and not self.sites:
            raise ValueError("sites: method 'knowledge_flow' needs at least one site with taps to mix")
        return self

    def graft_part(self) -> Spec:
        """The spec without its training and data sections: what a graft and its checkpoint need."""
        return self.model_copy(update={"data": None, "train": None, "rl": None})


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid spec {source}:"]
    for e in err.errors():
        msg = str(e["msg"]).removeprefix("Value error, ")
        path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in e["loc"]).lstrip(".")
        lines.append(f"  {path}: {msg}" if path else f"  {msg}")
    return "\n".join(lines)


def read_spec_file(path: Path) -> Any:
    """The raw data of a YAML or JSON spec file, before validation."""
    try:
        text = path.read_text()
    except OSError as e:
        raise SpecError(f"cannot read spec {path}: {e.strerror or e}") from e
    if path.suffix == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise SpecError(f"malformed JSON in {path} at line {e.lineno}, column {e.colno}: {e.msg}") from e
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        raise SpecError(f"malformed YAML in {path}{where}: {problem}") from e


def load_spec(spec: str | Path | dict[str, Any] | Spec) -> Spec:
    """Validate a spec given as a YAML/JSON file path, a dict, or a :class:`Spec`.

    Raises:
        SpecError: the file is unreadable or malformed, or a field is wrong; the message names its path.

    Examples:
        >>> spec = load_spec({"input_shape": [3, 32, 32],
        ...                   "sites": [{"student": "layer1", "taps": ["t:layer2"]}]})
        >>> spec.sites[0].taps
        ['t:layer2']
    """
    if isinstance(spec, Spec):
        return spec
    source = "given as a dict"
    if isinstance(spec, (str, Path)):
        source = str(spec)
        spec = read_spec_file(Path(spec))
    if spec is None:
        spec = {}
    if not isinstance(spec, dict):
        raise SpecError(f"invalid spec {source}: the top level must be a mapping, got {type(spec).__name__}")
    try:
        return Spec.model_validate(spec)
    except ValidationError as e:
        raise SpecError(_format_validation_error(e, source)) from e


def schema() -> dict[str, Any]:
    """The spec's JSON Schema (what ``graftnet schema`` prints)."""
    return Spec.model_json_schema()
