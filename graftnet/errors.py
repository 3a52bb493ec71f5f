"""The exceptions graftnet raises. Every user mistake is a :class:`GraftError`."""

from __future__ import annotations

__all__ = [
    "AdapterError",
    "CheckpointError",
    "DataError",
    "DetachError",
    "EnvError",
    "GraftError",
    "ModelSourceError",
    "NameResolutionError",
    "NonFiniteError",
    "SpecError",
    "TraceError",
    "TrainingError",
]


class GraftError(RuntimeError):
    """Root of every error graftnet raises for a user mistake."""


class SpecError(GraftError):
    """The spec is malformed: bad YAML/JSON, unknown keys, wrong types, duplicate sites."""


class NameResolutionError(GraftError):
    """A site or tap name does not name exactly one activation of its model."""


class AdapterError(GraftError):
    """No adapter can map a tap's shape onto its site's shape, or an adapter key is unknown."""


class TraceError(GraftError):
    """torch.fx could not trace a model."""


class ModelSourceError(GraftError):
    """A model reference (``timm:NAME``, ``package.module:callable`` …) cannot be built or loaded."""


class DetachError(GraftError):
    """The student still depends on its teachers: some site's p_w(student) is below 1 − tol."""


class CheckpointError(GraftError):
    """A checkpoint or exported file is missing, corrupt, or belongs to another model; or a write is refused."""


class NonFiniteError(CheckpointError):
    """A model to be saved or exported holds NaN or infinite values, or answers a probe batch with them."""


class DataError(GraftError):
    """A dataset is unknown, absent (with download off), or asked for classes or sizes it does not have."""


class EnvError(GraftError):
    """A reinforcement-learning environment is unknown, needs an extra that is not installed, or cannot run."""


class TrainingError(GraftError):
    """Training cannot start or go on: a method lacks what it needs, a loss is not finite, a run folder clashes."""
