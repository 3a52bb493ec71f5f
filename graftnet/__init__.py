"""graftnet: move knowledge between neural networks by graph surgery.

Knowledge flow (Liu et al., ICLR 2019) wires a student, layer by layer, to frozen teachers of any
architecture; learned weights p_w decide how much each student layer trusts each teacher, and a
dependency loss pushes the student to independence so the teachers can be cut away.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

from graftnet._version import __version__

# Names are imported on first use (PEP 562), so that `import graftnet` and the CLI start without torch: the
# command line imports only what its command needs.
_EXPORTS: dict[str, str] = {
    "AdapterError": "graftnet.errors",
    "BornAgain": "graftnet.training",
    "CheckpointError": "graftnet.errors",
    "DataError": "graftnet.errors",
    "DetachError": "graftnet.errors",
    "EnvError": "graftnet.errors",
    "Finetune": "graftnet.training",
    "FrozenTeacher": "graftnet.graft",
    "GraftError": "graftnet.errors",
    "GraftedModel": "graftnet.graft",
    "KnowledgeDistillation": "graftnet.training",
    "KnowledgeFlow": "graftnet.training",
    "Mixer": "graftnet.mixer",
    "ModelSourceError": "graftnet.errors",
    "NameResolutionError": "graftnet.errors",
    "NonFiniteError": "graftnet.errors",
    "Objective": "graftnet.training",
    "RunResult": "graftnet.training",
    "Scratch": "graftnet.training",
    "SiteInfo": "graftnet.graft",
    "Spec": "graftnet.spec",
    "SpecError": "graftnet.errors",
    "StepLoss": "graftnet.training",
    "TraceError": "graftnet.errors",
    "TrainingError": "graftnet.errors",
    "build_model": "graftnet.models",
    "detach": "graftnet.detach",
    "export": "graftnet.checkpoint",
    "fit": "graftnet.training",
    "graft": "graftnet.graft",
    "is_isomorphic": "graftnet.graph_equivalence",
    "load_checkpoint": "graftnet.checkpoint",
    "load_spec": "graftnet.spec",
    "register_activation": "graftnet.activations",
    "register_adapter": "graftnet.adapters",
    "register_dataset": "graftnet.data",
    "register_fused": "graftnet.activations",
    "register_input_adapter": "graftnet.adapters",
    "register_leaf_module": "graftnet._trace",
    "register_method": "graftnet.training",
    "register_model": "graftnet.models",
    "save_checkpoint": "graftnet.checkpoint",
    "schema": "graftnet.spec",
    "sites": "graftnet.graft",
    "train": "graftnet.launch",
    "tune": "graftnet.tune",
}

__all__ = [
    "AdapterError",
    "BornAgain",
    "CheckpointError",
    "DataError",
    "DetachError",
    "EnvError",
    "Finetune",
    "FrozenTeacher",
    "GraftError",
    "GraftedModel",
    "KnowledgeDistillation",
    "KnowledgeFlow",
    "Mixer",
    "ModelSourceError",
    "NameResolutionError",
    "NonFiniteError",
    "Objective",
    "RunResult",
    "Scratch",
    "SiteInfo",
    "Spec",
    "SpecError",
    "StepLoss",
    "TraceError",
    "TrainingError",
    "__version__",
    "build_model",
    "detach",
    "export",
    "fit",
    "graft",
    "is_isomorphic",
    "load_checkpoint",
    "load_spec",
    "register_activation",
    "register_adapter",
    "register_dataset",
    "register_fused",
    "register_input_adapter",
    "register_leaf_module",
    "register_method",
    "register_model",
    "save_checkpoint",
    "schema",
    "sites",
    "train",
    "tune",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is not None:
        value = getattr(importlib.import_module(module), name)
    elif not name.startswith("__"):
        try:  # a submodule, e.g. graftnet.data after a plain `import graftnet`
            value = importlib.import_module(f"graftnet.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"graftnet.{name}":
                raise
            raise AttributeError(f"module 'graftnet' has no attribute {name!r}") from None
    else:
        raise AttributeError(f"module 'graftnet' has no attribute {name!r}")
    globals()[name] = value  # later lookups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


class _Package(types.ModuleType):
    """``graftnet.graft`` and ``graftnet.detach`` are functions that share their module's name. Importing the
    module makes Python bind the package attribute to the module; keep the function there instead, as the
    eager ``from graftnet.graft import graft`` of an ``__init__`` would."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == value.__name__:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


if TYPE_CHECKING:
    from graftnet._trace import register_leaf_module
    from graftnet.activations import register_activation, register_fused
    from graftnet.adapters import register_adapter, register_input_adapter
    from graftnet.checkpoint import export, load_checkpoint, save_checkpoint
    from graftnet.data import register_dataset
    from graftnet.detach import detach
    from graftnet.errors import (
        AdapterError,
        CheckpointError,
        DataError,
        DetachError,
        EnvError,
        GraftError,
        ModelSourceError,
        NameResolutionError,
        NonFiniteError,
        SpecError,
        TraceError,
        TrainingError,
    )
    from graftnet.graft import FrozenTeacher, GraftedModel, SiteInfo, graft, sites
    from graftnet.graph_equivalence import is_isomorphic
    from graftnet.launch import train
    from graftnet.mixer import Mixer
    from graftnet.models import build_model, register_model
    from graftnet.spec import Spec, load_spec, schema
    from graftnet.training import (
        BornAgain,
        Finetune,
        KnowledgeDistillation,
        KnowledgeFlow,
        Objective,
        RunResult,
        Scratch,
        StepLoss,
        fit,
        register_method,
    )
    from graftnet.tune import tune
