"""graftnet: move knowledge between neural networks by graph surgery.

Knowledge flow (Liu et al., ICLR 2019) wires a student, layer by layer, to frozen teachers of any
architecture; learned weights p_w decide how much each student layer trusts each teacher, and a
dependency loss pushes the student to independence so the teachers can be cut away.
"""

from graftnet._trace import register_leaf_module
from graftnet._version import __version__
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
]
