"""Training: the objectives and the building blocks every graftnet trainer is made of.

- :mod:`~graftnet.training.objectives`: knowledge flow and the baselines as objects (loss and its parts,
  parameter groups, θ_old refresh, teacher cut), registered by name for ``train.method``;
- :mod:`~graftnet.training.optim`: parameter groups, optimizers, learning-rate schedules;
- :mod:`~graftnet.training.run_dir`, :mod:`~graftnet.training.state`: the run folder and its resumable state;
- :mod:`~graftnet.training.metrics`, :mod:`~graftnet.training.signals`: ``metrics.csv``/TensorBoard, SIGINT/SIGTERM;
- :mod:`~graftnet.training.evaluation`, :mod:`~graftnet.training.finish`, :mod:`~graftnet.training.results`:
  scoring, exporting the student at the end, the one result type;
- :mod:`~graftnet.training.supervised` (:func:`fit`) and :mod:`~graftnet.training.ban` (born-again sequences)
  are built from these, as is :mod:`graftnet.rl`. See docs/architecture.md.
"""

from graftnet.training.objectives import (
    METHODS,
    BornAgain,
    Finetune,
    KnowledgeDistillation,
    KnowledgeFlow,
    Objective,
    Scratch,
    StepLoss,
    register_method,
)
from graftnet.training.results import RunResult
from graftnet.training.supervised import fit

__all__ = [
    "METHODS",
    "BornAgain",
    "Finetune",
    "KnowledgeDistillation",
    "KnowledgeFlow",
    "Objective",
    "RunResult",
    "Scratch",
    "StepLoss",
    "fit",
    "register_method",
]
