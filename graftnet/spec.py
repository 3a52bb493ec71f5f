"""The graft spec: which student layers may read which teacher layers (DESIGN.md §4).

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

__all__ = ["InputStep", "MixingSpec", "ModelSpec", "SiteSpec", "Spec", "TeacherSpec", "load_spec", "schema"]


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
    weights: str | None = Field(None, description="A .safetensors file loaded with strict=True after building.")

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


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid spec {source}:"]
    for e in err.errors():
        msg = str(e["msg"]).removeprefix("Value error, ")
        path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in e["loc"]).lstrip(".")
        lines.append(f"  {path}: {msg}" if path else f"  {msg}")
    return "\n".join(lines)


def _read(path: Path) -> Any:
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
        spec = _read(Path(spec))
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
