"""The graft spec: which student layers may read which teacher layers (README "The spec").

The spec is plain data validated by pydantic (``extra="forbid"`` everywhere, so a typo is an error, not a
silently ignored key). Nothing here imports torch or user code: model references are strings that
:func:`graftnet.models.build_model` resolves later.
"""

from __future__ import annotations

import copy
import json
import keyword
import reprlib
import unicodedata
from collections.abc import Mapping, Sequence
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
    "FloorSpec",
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
    "clip",
    "input_shape_problem",
    "load_spec",
    "override_spec",
    "parse_overrides",
    "parse_yaml",
    "register_method_name",
    "schema",
    "short_repr",
    "teacher_name_problem",
    "validation_problems",
]

# --- limits on untrusted input --------------------------------------------------------------------------------

#: Seeds (``train.seed``, ``data.seed``) lie in [0, MAX_SEED]. Training derives further seeds from them (per epoch
#: ``seed * 1_000_003 + epoch``, per born-again generation ``seed * 1000 + k``, per A3C worker ``seed * 1000 + rank``),
#: and every derived seed must still fit the 64-bit generators of torch and numpy: with seed < 2**32, the largest,
#: ``(seed * 1000 + k) * 1_000_003 + epoch``, stays below 2**63.
MAX_SEED = 2**32 - 1
#: ``train.method: ban`` trains generation k with the seed ``train.seed * BAN_SEED_STRIDE + k``.
BAN_SEED_STRIDE = 1000
# train.feature_hint when unset, per train.optimizer (TrainSpec.feature_hint_weight says why)
DEFAULT_FEATURE_HINT: dict[str, float] = {"adam": 0.3, "adamw": 0.3, "sgd": 1.0}
# train.lr_mixing when unset is this × train.lr, per train.optimizer (TrainSpec.mixing_lr_factor says why)
DEFAULT_LR_MIXING_FACTOR: dict[str, float] = {"adam": 10.0, "adamw": 10.0, "sgd": 0.1}
# train.lr_adapters when unset is train.lr divided by this, per train.optimizer (TrainSpec.adapter_lr says why)
DEFAULT_ADAPTER_LR_DIVISOR: dict[str, float] = {"adam": 1.0, "adamw": 1.0, "sgd": 10.0}
#: One sample of ``input_shape`` holds at most this many elements (a 16-bit 4096×4096 RGB image holds 2**25.6).
MAX_INPUT_ELEMENTS = 2**28
#: A spec file is read up to this size, and its data may hold at most this many values, nested this deep, counted
#: after YAML aliases are expanded (an alias bomb is a few hundred bytes that expand to billions of values).
MAX_SPEC_BYTES = 16 * 2**20
MAX_SPEC_VALUES = 200_000
MAX_SPEC_DEPTH = 100

_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxdict, _REPR.maxlist, _REPR.maxtuple, _REPR.maxset = 3, 8, 8, 8, 8
_REPR.maxstring, _REPR.maxother, _REPR.maxlong = 80, 80, 40


def short_repr(value: object) -> str:
    """``repr(value)`` cut to a few hundred characters, whatever its size or depth (for error messages).

    Examples:
        >>> short_repr(list(range(100)))
        '[0, 1, 2, 3, 4, 5, 6, 7, ...]'
    """
    try:
        text = _REPR.repr(value)
    except (RecursionError, MemoryError, ValueError):  # a user object's __repr__, or an int too long to print
        text = f"<{type(value).__name__}>"
    return clip(text)


def input_shape_problem(shape: object) -> str | None:
    """Why ``shape`` cannot be one input sample's shape, or None if it can.

    A shape is a non-empty list of positive integers with at most :data:`MAX_INPUT_ELEMENTS` elements in all.

    Examples:
        >>> input_shape_problem([3, 32, 32]) is None
        True
    """
    if (
        isinstance(shape, str | bytes)
        or not isinstance(shape, list | tuple)
        or not shape
        or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)
    ):
        return f"input_shape must be a non-empty list of positive sizes, got {short_repr(shape)}"
    elements = 1
    for d in shape:  # stops early: math.prod of a long list of huge sizes takes long
        elements *= d
        if elements > 2**64:
            break
    if elements > MAX_INPUT_ELEMENTS:
        count = str(elements) if elements <= 2**64 else "more than 2**64"
        return (
            f"input_shape {short_repr(list(shape))} has {count} elements per sample, more than the "
            f"{MAX_INPUT_ELEMENTS} (2**28) graftnet accepts (graft() runs an example batch of that shape); give "
            "the shape of one sample without the batch dimension, e.g. [3, 32, 32]"
        )
    return None


def clip(text: str, limit: int = 300) -> str:
    """``text`` cut to ``limit`` characters (an exception's message, for another message)."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


# Attribute names of nn.Module and nn.ModuleDict instances (dunders aside): a teacher becomes the attribute
# ``teachers.NAME`` of the grafted model, and these are taken. Kept here because validating a spec never imports
# torch; tests/test_untrusted_input.py checks that the list covers ``dir()`` of the installed torch's modules.
_MODULE_ATTRIBUTES = frozenset("""
    T_destination _apply _backward_hooks _backward_pre_hooks _buffers _call_impl _compiled_call_impl
    _forward_hooks _forward_hooks_always_called _forward_hooks_with_kwargs _forward_pre_hooks
    _forward_pre_hooks_with_kwargs _get_backward_hooks _get_backward_pre_hooks _get_name _is_full_backward_hook
    _load_from_state_dict _load_state_dict_post_hooks _load_state_dict_pre_hooks _maybe_warn_non_full_backward_hook
    _modules _named_members _non_persistent_buffers_set _parameters _register_load_state_dict_pre_hook
    _register_state_dict_hook _replicate_for_data_parallel _save_to_state_dict _slow_forward _state_dict_hooks
    _state_dict_pre_hooks _version _wrapped_call_impl add_module apply bfloat16 buffers call_super_init children
    clear compile cpu cuda double dump_patches eval extra_repr float forward get_buffer get_extra_state
    get_parameter get_submodule half ipu items keys load_state_dict modules mtia named_buffers named_children
    named_modules named_parameters parameters pop register_backward_hook register_buffer register_forward_hook
    register_forward_pre_hook register_full_backward_hook register_full_backward_pre_hook
    register_load_state_dict_post_hook register_load_state_dict_pre_hook register_module register_parameter
    register_state_dict_post_hook register_state_dict_pre_hook requires_grad_ set_extra_state set_submodule
    share_memory state_dict to to_empty train training type update values xpu zero_grad
""".split())  # fmt: skip


def teacher_name_problem(name: object) -> str | None:
    """Why ``name`` cannot name a teacher, or None if it can.

    A teacher is the attribute ``teachers.NAME`` of the grafted model and appears so in its generated code: the
    name must be an identifier (NFKC-normal, as Python reads source), not a keyword, and not an attribute of
    ``torch.nn.Module``/``nn.ModuleDict`` (``to``, ``training``, ``forward``, ``keys`` …).

    Examples:
        >>> teacher_name_problem("class")
        "teacher name 'class' is a Python keyword; rename it, e.g. 'class_teacher'"
    """
    if not isinstance(name, str):
        return f"teacher name {short_repr(name)} is a {type(name).__name__}; teacher names are strings"
    shown, fix = short_repr(name), f"rename it, e.g. {short_repr(name + '_teacher')}"
    if not name.isidentifier() or unicodedata.normalize("NFKC", name) != name:
        return f"teacher name {shown} must be a Python identifier (letters, digits, _; not starting with a digit)"
    if keyword.iskeyword(name):
        return f"teacher name {shown} is a Python keyword; {fix}"
    if name in _MODULE_ATTRIBUTES or name.startswith("__") and name.endswith("__"):
        return (
            f"teacher name {shown} is taken: teachers become attributes of a torch.nn.ModuleDict "
            f"(GraftedModel.teachers.{name}), which already has an attribute {name!r}; {fix}"
        )
    return None


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

    student: str = Field(
        min_length=1, description="Activation module path, functional node name, or parent module path."
    )
    taps: list[str] = Field(min_length=1, description="Teacher activations written 'teacher:name'.")
    adapter: str | None = Field(None, description="Adapter for this site's taps; defaults to the spec's adapter.")

    @field_validator("taps")
    @classmethod
    def _taps_name_a_teacher(cls, taps: list[str]) -> list[str]:
        for tap in taps:
            teacher, sep, name = tap.partition(":")
            if not sep or not teacher or not name:
                raise ValueError(f"tap {short_repr(tap)} must be written 'teacher:name', e.g. 'c100:layer1.2.act2'")
        if len(set(taps)) != len(taps):
            dup = sorted({t for t in taps if taps.count(t) > 1})
            raise ValueError(f"tap listed twice: {clip(', '.join(dup))}")
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
    label_map: dict[int, int] | None = Field(
        None, description="Explicit {original: new} labels for kept classes; labels are class indices >= 0."
    )
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
    seed: int = Field(
        0, ge=0, le=MAX_SEED,
        description="Draws the validation split and the training subset, the same for every method.",
    )  # fmt: skip

    @field_validator("val_size")
    @classmethod
    def _val_size(cls, v: int | float) -> int | float:
        if isinstance(v, float) and not 0.0 < v < 1.0 or isinstance(v, int) and v < 1:
            raise ValueError(f"val_size must be a count >= 1 or a fraction in (0, 1), got {short_repr(v)}")
        return v

    @field_validator("classes")
    @classmethod
    def _distinct(cls, classes: list[int] | None) -> list[int] | None:
        if classes is not None and (not classes or len(set(classes)) != len(classes)):
            raise ValueError(f"classes must be a non-empty list without repeats, got {short_repr(classes)}")
        negative = [c for c in classes or () if c < 0]
        if negative:
            raise ValueError(f"classes are class indices >= 0, got {negative[0]}")
        return classes

    @field_validator("label_map")
    @classmethod
    def _labels(cls, label_map: dict[int, int] | None) -> dict[int, int] | None:
        for old, new in (label_map or {}).items():
            if old < 0 or new < 0:
                raise ValueError(
                    f"label_map {{{old}: {new}}}: labels are class indices >= 0 (the new ones run 0 … k-1 for k "
                    "classes); map every kept class to a label >= 0"
                )
        return label_map


class Lambda1Spec(_Strict):
    """λ1(t), the weight of the dependency loss: 0 until ``start``, a ramp to ``final`` by ``end``, then flat.

    ``start`` and ``end`` are fractions of training; the paper ramps linearly from 0.
    """

    final: float = Field(
        100.0, ge=0.0, description="λ1 at the end of the ramp (examples/README.md, 'Which defaults the study "
        "supports': 100 beat 10 on validation under SGD and was level under Adam)."
    )
    start: float = Field(0.1, ge=0.0, le=1.0, description="Fraction of training where the ramp begins.")
    end: float = Field(0.6, ge=0.0, le=1.0, description="Fraction of training where λ1 reaches its final value.")
    kind: Literal["linear", "cosine", "constant"] = "linear"

    @model_validator(mode="after")
    def _ordered(self) -> Lambda1Spec:
        if self.end < self.start:
            raise ValueError(f"lambda1.end ({self.end}) must not come before lambda1.start ({self.start})")
        return self


class FloorSpec(_Strict):
    """A rising lower bound on p_w(student): 0 until ``start``, then linear to 1 − export_tol/10 at ``end``.

    It hands the student's layers over from the teachers by a fixed date whatever the optimizer does with w,
    so the teachers can be cut without a forced export (a projection of w after each step; see
    :meth:`GraftedModel.raise_student_floor`). It binds only where the learned p_w(student) lags behind it.
    """

    start: float = Field(0.2, ge=0.0, lt=1.0, description="Fraction of training where the floor starts rising from 0.")
    end: float | None = Field(
        None, gt=0.0, le=1.0,
        description="Fraction of training where it reaches 1 - export_tol/10 (default: cut_teachers_at, or 1).",
    )  # fmt: skip

    @model_validator(mode="after")
    def _ordered(self) -> FloorSpec:
        if self.end is not None and self.end <= self.start:
            raise ValueError(f"p_w_floor.end ({self.end}) must come after p_w_floor.start ({self.start})")
        return self


class KDSpec(_Strict):
    """Hinton et al. (2015): α·T²·KL(teacher_T ‖ student_T) + (1 − α)·cross-entropy."""

    teacher: str = Field(description="The teacher (a key of 'teachers') whose outputs the student matches.")
    temperature: float = Field(4.0, gt=0.0)
    alpha: float = Field(0.9, ge=0.0, le=1.0)
    with_knowledge_flow: bool = Field(
        False,
        description="With method knowledge_flow: the task loss becomes this KD loss (the student matches the "
        "teacher's softened outputs while it reads the teachers' layers). Off, knowledge_flow ignores this section.",
    )


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
        description="Learning rate of the mixers' logits w (default: lr_mixing_factor × lr; with p_w_floor null, "
        "at least enough for w to move 20 units over the lambda1 ramp, since Adam moves w about its learning rate "
        "per step).",
    )
    lr_mixing_factor: float | None = Field(
        None,
        gt=0.0,
        description="w's learning rate as a multiple of lr when lr_mixing is unset, a relative rate that a tune of "
        "lr keeps (default: 10 with adam and adamw, 0.1 with sgd, chosen by graftnet's transfer study, "
        "examples/README.md, \"w's learning rate with the hint\").",
    )
    lr_adapters: float | None = Field(
        None,
        gt=0.0,
        description="Learning rate of the learned adapters (Q and input adapters); default lr under Adam and AdamW, "
        "lr / 10 under SGD.",
    )
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="SGD momentum.")
    weight_decay: float = Field(0.0, ge=0.0, description="Weight decay of the student (never of w).")
    schedule: Literal["constant", "cosine"] = Field("cosine", description="Learning-rate schedule over training.")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="Initialisation, batch order, augmentation and dropout.")
    device: str = Field("cpu", description="cpu, cuda, cuda:N, or auto (cuda when available).")
    threads: int | None = Field(
        None, ge=1, description="CPU threads for torch (default: torch's choice; small models run faster on 1)."
    )
    compile: bool = Field(
        False,
        description="Compile the model's forward and backward (and the θ_old pass) with torch.compile: faster steps "
        "after a first step that compiles (seconds to a minute); needs a C++ compiler on the CPU.",
    )
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32",
        description="Autocast the forward passes to bfloat16 or float16 (fp16 with a gradient scaler); the losses, "
        "the mixers' softmax and the dependency loss stay in float32.",
    )
    channels_last: bool = Field(
        False, description="Keep 4-D weights and inputs in channels-last memory layout (faster convolutions on GPUs)."
    )
    lambda1: Lambda1Spec = Field(default_factory=Lambda1Spec)
    lambda2: float = Field(0.1, ge=0.0, description="Weight of KL(f_θ ‖ f_θold), the paper's λ2.")
    kl_lag: int = Field(1, ge=1, description="θ_old is refreshed every kl_lag optimiser steps (1: the step before).")
    feature_hint: float | None = Field(
        None, ge=0.0,
        description="Weight of the feature hint (knowledge_flow, until the cut): the mean squared distance from each "
        "site's pre-activation to its adapted taps, which trains the student and the learned tap adapters (never "
        "the teachers), so the student's own layers learn what the teachers give the site (0: the paper's "
        "objective; default: 0.3 with adam and adamw, 1 with sgd, chosen by graftnet's transfer study, "
        "examples/README.md, \"Feature hints\").",
    )  # fmt: skip
    cut_teachers_at: float | None = Field(
        0.7, gt=0.0, le=1.0,
        description="Fraction of training after which teachers are removed and the plain student trains on "
        "(null: keep them to the end).",
    )  # fmt: skip
    export_tol: float = Field(1e-3, gt=0.0, lt=1.0, description="Export refuses p_w(student) below 1 - tol.")
    p_w_floor: FloorSpec | None = Field(
        default_factory=FloorSpec,
        description="A rising lower bound on p_w(student) that reaches 1 - export_tol/10 by the cut (null: none, "
        "as in the paper; p_w(student) is then only pushed by lambda1).",
    )  # fmt: skip
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
                f"unknown training method {short_repr(method)}; registered: {', '.join(sorted(_METHOD_NAMES))} "
                "(add one with graftnet.register_method)"
            )
        return method

    @model_validator(mode="after")
    def _one_mixing_rate(self) -> TrainSpec:
        if self.lr_mixing is not None and self.lr_mixing_factor is not None:
            raise ValueError(
                "w's learning rate is set twice: keep lr_mixing (an absolute rate) or lr_mixing_factor (a multiple "
                "of lr), not both"
            )
        return self

    @property
    def feature_hint_weight(self) -> float:
        """``feature_hint``, or its default for ``optimizer`` when unset: 0.3 under Adam (and AdamW), 1 under SGD.

        One number did not suit both: Adam steps every parameter by about its learning rate whatever the loss's
        scale, SGD by the gradient, so the hint's pull under SGD grows with its weight. With every learning rate
        chosen on three seeds, 1 under SGD was better than 0.3 on validation in all four 50-label cells of the
        transfer study, slightly worse with 250 labels, level in the Table 4 analogue (examples/README.md, "The
        hint's weight under SGD"); under Adam 0.3 was better than 1 on validation.

        Examples:
            >>> TrainSpec().feature_hint_weight, TrainSpec(optimizer="sgd").feature_hint_weight
            (0.3, 1.0)
            >>> TrainSpec(optimizer="sgd", feature_hint=0).feature_hint_weight   # the paper's objective
            0.0
        """
        if self.feature_hint is not None:
            return self.feature_hint
        return DEFAULT_FEATURE_HINT[self.optimizer]

    @property
    def mixing_lr_factor(self) -> float:
        """``lr_mixing_factor``, or its default for ``optimizer`` when unset: 10 under Adam (and AdamW), 0.1 under SGD.

        Adam moves w about its learning rate per step, SGD by its gradient, which λ1 (up to 100) scales. With the
        feature hint and every learning rate chosen on three seeds, 10 × lr under Adam was better than or level with
        the earlier max(10 · lr, 20 / ramp steps) on validation wherever the sites are the hidden layers; under SGD
        lr / 10 had a lower mean validation error than 10 × lr over eleven cells (4.04 against 4.16%; better in
        five, worse in five by at most 0.33) and a lower test error in ten (examples/README.md, "w's learning rate
        with the hint").

        Examples:
            >>> TrainSpec().mixing_lr_factor, TrainSpec(optimizer="sgd").mixing_lr_factor
            (10.0, 0.1)
            >>> TrainSpec(optimizer="sgd", lr_mixing_factor=3).mixing_lr_factor
            3.0
        """
        if self.lr_mixing_factor is not None:
            return self.lr_mixing_factor
        return DEFAULT_LR_MIXING_FACTOR[self.optimizer]

    @property
    def adapter_lr(self) -> float:
        """``lr_adapters``, or its default when unset: ``lr`` under Adam (and AdamW), ``lr / 10`` under SGD.

        Under SGD the adapters' step grows with their gradient, which the feature hint (weight 1 under SGD) adds
        to; at ``lr`` knowledge flow from a teacher of another architecture (read through learned 1×1 adapters)
        was no better than scratch under SGD. With every learning rate chosen on three seeds, a tenth was better
        with 50 labels (validation 8.67 against 10.27%) and in the Table 4 analogue, level with 250 labels; under
        Adam a tenth was worse (examples/README.md, "The adapters' learning rate under SGD").

        Examples:
            >>> TrainSpec(lr=0.1).adapter_lr, TrainSpec(lr=0.1, optimizer="sgd").adapter_lr
            (0.1, 0.01)
            >>> TrainSpec(lr=0.1, optimizer="sgd", lr_adapters=0.05).adapter_lr
            0.05
        """
        if self.lr_adapters is not None:
            return self.lr_adapters
        return self.lr / DEFAULT_ADAPTER_LR_DIVISOR[self.optimizer]


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
        problem = None if shape is None else input_shape_problem(shape)
        if problem is not None:
            raise ValueError(problem)
        return shape

    @field_validator("teachers")
    @classmethod
    def _teacher_names(cls, teachers: dict[str, TeacherSpec]) -> dict[str, TeacherSpec]:
        for name in teachers:
            problem = teacher_name_problem(name)
            if problem is not None:
                raise ValueError(problem)
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
            if train.kd is not None and train.kd.with_knowledge_flow:
                raise ValueError("train.kd.with_knowledge_flow: reinforcement learning has no KD loss; remove it")
            if self.data is not None:
                raise ValueError("rl: a spec trains either on data or in an environment: remove 'data' or 'rl'")
            if train.method not in ("scratch", "finetune", "knowledge_flow"):
                raise ValueError(
                    f"train.method: {train.method!r} does not apply to 'rl': use scratch, finetune or knowledge_flow"
                )
        if train.kd is not None and train.kd.with_knowledge_flow and train.method != "knowledge_flow":
            raise ValueError(
                f"train.kd.with_knowledge_flow: only method 'knowledge_flow' adds a KD loss; method {train.method!r} "
                "does not (for KD alone use method 'kd')"
            )
        if train.method == "knowledge_flow" and not self.sites:
            raise ValueError("sites: method 'knowledge_flow' needs at least one site with taps to mix")
        if train.method == "ban":
            generations = (train.ban or BANSpec()).generations
            largest = (MAX_SEED - generations) // BAN_SEED_STRIDE
            if train.seed > largest:
                raise ValueError(
                    f"train.seed: method 'ban' trains generation k with the seed train.seed * {BAN_SEED_STRIDE} + k, "
                    f"which must stay <= {MAX_SEED}; with {generations} generations train.seed must be at most "
                    f"{largest}, got {train.seed}"
                )
        return self

    def graft_part(self) -> Spec:
        """The spec without its training and data sections: what a graft and its checkpoint need."""
        return self.model_copy(update={"data": None, "train": None, "rl": None})


def _dotted(loc: tuple[Any, ...] | list[Any]) -> str:
    """A spec path as messages write it: ``sites[0].taps``, ``teachers.t.kwargs``."""
    text = "".join(f"[{p}]" if isinstance(p, int) else f".{short_repr(p)[1:-1]}" for p in loc if p != "[key]")
    return text.lstrip(".") + (" (a key)" if "[key]" in loc else "")


def validation_problems(err: ValidationError) -> list[tuple[str, str]]:
    """Each problem of ``err`` as ``(path, message)``, the path as messages write it (``lambda1.end``; empty for a
    check of the whole model, whose message names what it is about)."""
    return [(_dotted(e["loc"]), str(e["msg"]).removeprefix("Value error, "))
            for e in err.errors(include_url=False, include_input=False)]  # fmt: skip


def _format_validation_error(err: ValidationError, source: str, origins: Mapping[str, str]) -> str:
    lines = [f"invalid spec {source}:"]
    for path, msg in validation_problems(err):
        line = f"  {path}: {msg}" if path else f"  {msg}"
        at = path or msg.partition(":")[0]  # a whole-spec check names its path at the start of its message
        origin = next((o for key, o in origins.items() if _within(at, key) or _within(key, at)), None)
        lines.append(f"{line} (from {origin})" if origin else line)
    return "\n".join(lines)


def _within(path: str, prefix: str) -> bool:
    return bool(prefix) and (path == prefix or path.startswith((prefix + ".", prefix + "[")))


def _check_size(data: Any, source: str) -> None:
    """Refuse data that is too large or too deep once YAML aliases are expanded, or that contains itself."""
    count = 0
    on_path: set[int] = set()
    # (node, key in its parent, the parent's entry, depth, leaving); the parent links give the path for a message
    stack: list[tuple[Any, Any, Any, int, bool]] = [(data, None, None, 0, False)]

    def where(entry: tuple[Any, Any, Any, int, bool]) -> str:
        loc = []
        while entry[2] is not None:
            loc.append(entry[1])
            entry = entry[2]
        return f" (at {clip(_dotted(loc[::-1]), 160)})" if loc else ""

    while stack:
        entry = stack.pop()
        node, _, _, depth, leaving = entry
        if leaving:
            on_path.discard(id(node))
            continue
        count += 1
        if count > MAX_SPEC_VALUES:
            raise SpecError(
                f"spec {source} holds more than {MAX_SPEC_VALUES} values once its YAML aliases (*name) are expanded"
                f"{where(entry)}; a spec this large is most likely an alias bomb. Write the values out, or pass large "
                "data through a file your dataset or model code reads"
            )
        if not isinstance(node, dict | list | tuple):
            continue
        if depth >= MAX_SPEC_DEPTH:
            raise SpecError(f"spec {source} is nested more than {MAX_SPEC_DEPTH} levels deep{where(entry)}; flatten it")
        if id(node) in on_path:
            raise SpecError(
                f"spec {source} contains itself{where(entry)}: a YAML alias (*name) refers to a node that holds it; "
                "a spec must be a tree"
            )
        on_path.add(id(node))
        stack.append((node, None, None, depth, True))
        items = node.items() if isinstance(node, dict) else enumerate(node)
        stack.extend((value, key, entry, depth + 1, False) for key, value in items)


def parse_yaml(text: str, where: str) -> Any:
    """The value of YAML (or JSON) ``text``, with the limits of spec files (size, depth, aliases).

    Args:
        text: the YAML text.
        where: what the text is, for messages: ``"--set train.lr=["``, ``"spec run.yaml"``.

    Raises:
        SpecError: the text is not valid YAML, or is too large or deep once aliases are expanded.
    """
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        context = getattr(e, "context", None)
        detail = f"{problem} ({context})" if context and context != problem else problem
        raise SpecError(f"malformed YAML in {where}{at}: {detail}") from e
    except (ValueError, OverflowError) as e:  # an int of over 4300 digits, a date like 2001-02-30
        raise SpecError(f"malformed YAML in {where}: a value cannot be read: {clip(str(e))}") from e
    except RecursionError as e:
        raise SpecError(f"malformed YAML in {where}: nested too deeply to read; flatten it") from e
    _check_size(data, where)
    return data


def _decode(raw: bytes, path: Path) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise SpecError(
            f"spec {path} is not UTF-8 text: byte 0x{raw[e.start]:02x} at line {line}, column {column} "
            f"({e.reason}); save the file as UTF-8"
        ) from e


def read_spec_file(path: Path) -> Any:
    """The raw data of a YAML or JSON spec file, before validation.

    Raises:
        SpecError: the file cannot be read (missing, a directory, no permission), is not UTF-8, is malformed,
            or is too large or deep once its YAML aliases are expanded.
    """
    try:
        if path.is_dir():
            raise SpecError(f"cannot read spec {path}: it is a directory; give the YAML or JSON spec file in it")
        with path.open("rb") as f:
            raw = f.read(MAX_SPEC_BYTES + 1)
    except PermissionError as e:
        raise SpecError(f"cannot read spec {path}: permission denied; check the file's permissions") from e
    except FileNotFoundError as e:
        raise SpecError(f"cannot read spec {path}: no such file (relative paths start at {Path.cwd()})") from e
    except (OSError, ValueError) as e:  # ValueError: a path with a NUL byte in it
        raise SpecError(f"cannot read spec {short_repr(str(path))}: {getattr(e, 'strerror', None) or e}") from e
    if len(raw) > MAX_SPEC_BYTES:
        raise SpecError(f"spec {path} is larger than {MAX_SPEC_BYTES // 2**20} MiB; a spec is a short text file")
    text = _decode(raw, path)
    if path.suffix != ".json":
        return parse_yaml(text, str(path))
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise SpecError(f"malformed JSON in {path} at line {e.lineno}, column {e.colno}: {e.msg}") from e
    except ValueError as e:  # an int of over 4300 digits
        raise SpecError(f"malformed JSON in {path}: a value cannot be read: {clip(str(e))}") from e
    except RecursionError as e:
        raise SpecError(f"malformed JSON in {path}: nested too deeply to read; flatten it") from e
    _check_size(data, str(path))
    return data


def load_spec(
    spec: str | Path | Mapping[str, Any] | Spec,
    *,
    source: str | None = None,
    origins: Mapping[str, str] | None = None,
) -> Spec:
    """Validate a spec given as a YAML/JSON file path, a dict, or a :class:`Spec`.

    Args:
        spec: the spec.
        source: what the spec is, for messages (default: the file's path, or "given as a dict").
        origins: ``{spec path: where its value came from}`` (``{"train.lr": "--set train.lr=0.1"}``); an error at
            or under one of these paths names where the value came from.

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
    if isinstance(spec, (str, Path)):
        source = source or str(spec)
        data = read_spec_file(Path(spec))
    else:
        source = source or ("given as a dict" if isinstance(spec, Mapping) else f"given as a {type(spec).__name__}")
        data = spec
        _check_size(data, source)
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise SpecError(f"invalid spec {source}: the top level must be a mapping, got {type(data).__name__}")
    try:
        return Spec.model_validate(data)
    except ValidationError as e:
        raise SpecError(_format_validation_error(e, source, origins or {})) from e
    except RecursionError as e:  # pragma: no cover - _check_size bounds the depth first
        raise SpecError(f"invalid spec {source}: nested too deeply to validate") from e


_KEY_EXAMPLE = "write it like train.lr or sites.0.student"


def parse_overrides(items: Sequence[str], flag: str = "--set") -> tuple[dict[str, Any], dict[str, str]]:
    """``KEY=VALUE`` strings as ``({key: value}, {key: the text it came from})``; VALUE is YAML.

    Raises:
        SpecError: an item is not ``KEY=VALUE``, KEY has an empty part, or VALUE is malformed YAML.
    """
    values: dict[str, Any] = {}
    texts: dict[str, str] = {}
    for item in items:
        where = f"{flag} {short_repr(item)}"
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise SpecError(f"{where} must look like KEY=VALUE, e.g. {flag} train.method=scratch")
        if not all(key.split(".")):
            raise SpecError(f"{where}: KEY {short_repr(key)} has an empty part; {_KEY_EXAMPLE}")
        values[key] = parse_yaml(text, where)
        texts[key] = where
    return values, texts


def override_spec(
    spec: str | Path | Mapping[str, Any] | Spec, overrides: Mapping[str, Any], labels: Mapping[str, str] | None = None
) -> Spec:
    """``spec`` with each ``{dotted.key: value}`` of ``overrides`` put in place, validated.

    KEY is a dotted spec path (``train.lr``, ``teachers.t.kwargs.num_classes``); a number indexes a list
    (``sites.0.student``). A missing section is created. An error in an overridden value names its label
    (``labels[key]``, default ``KEY=VALUE``), e.g. the ``--set`` flag it came from.

    Raises:
        SpecError: a key names no place in the spec, or the result is not a valid spec.

    Examples:
        >>> override_spec({"train": {"method": "scratch", "lr": 0.1}}, {"train.lr": 0.01, "train.seed": 3}).train.seed
        3
    """
    labels = labels or {}
    if isinstance(spec, Spec):
        raw: Any = spec.model_dump(mode="json")
        source = "the spec"
    elif isinstance(spec, (str, Path)):
        raw, source = read_spec_file(Path(spec)), str(spec)
    else:
        raw, source = copy.deepcopy(dict(spec)), "given as a dict"  # the caller's dict is kept as it was
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise SpecError(f"invalid spec {source}: the top level must be a mapping, got {type(raw).__name__}")
    origins: dict[str, str] = {}
    for key, value in overrides.items():
        label = labels.get(key) or f"{key}={short_repr(value)}"
        parts = key.split(".")
        if not all(parts):
            raise SpecError(f"{label}: KEY {short_repr(key)} has an empty part; {_KEY_EXAMPLE}")
        origins[_set_path(raw, parts, value, label)] = label
    return load_spec(raw, source=f"{source} with {', '.join(labels.get(k) or k for k in overrides)}", origins=origins)


def _set_path(raw: dict[str, Any], parts: list[str], value: Any, flag: str) -> str:
    """Put ``value`` at ``parts`` in ``raw`` (creating sections); the spec path it went to, as messages write it."""
    node: Any = raw
    where = ""
    for i, part in enumerate(parts):
        above = ".".join(parts[:i])
        key: str | int
        if isinstance(node, list):
            if not (part.isascii() and part.isdecimal() and int(part) < len(node)):
                if not node:
                    raise SpecError(f"{flag}: {where} is an empty list; set the whole list, e.g. --set '{above}=[…]'")
                rest = "".join(f".{p}" for p in parts[i + 1 if part.isdecimal() else i :])  # replace, or insert 0
                raise SpecError(
                    f"{flag}: {where} is a list of {len(node)}, so {short_repr(part)} must be an index from 0 to "
                    f"{len(node) - 1} (e.g. --set {above}.0{rest}=…); to add an entry, set the whole list"
                )
            key = int(part)
            where = f"{where}[{key}]"
        elif isinstance(node, dict):
            key = part
            where = f"{where}.{part}" if where else part
        else:
            raise SpecError(
                f"{flag}: {where} is {short_repr(node)}, not a section or a list, so it has no {short_repr(part)}; "
                f"set {where} itself, e.g. --set {above}=VALUE"
            )
        if i == len(parts) - 1:
            node[key] = value
        else:
            if (node.get(key) if isinstance(node, dict) else node[key]) is None:
                node[key] = {}
            node = node[key]
    return where


def schema() -> dict[str, Any]:
    """The spec's JSON Schema (what ``graftnet schema`` prints)."""
    return Spec.model_json_schema()
