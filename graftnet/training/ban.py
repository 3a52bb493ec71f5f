"""Born-again networks: a sequence of generations, each a student of the one before (Furlanello et al. 2018).

``train.method: ban`` runs generation 0 (trained normally: ``scratch``) and then generations 1 … N, each a
``born_again`` run whose teacher is the previous generation's exported student — or, with
``ban.knowledge_flow``, a ``knowledge_flow`` run grafted onto earlier generations at every matching site
(born-again knowledge flow). Each generation is an ordinary run folder ``RUN/gen{k}``, so a stopped
sequence resumes where it stopped. At the end the BAN ensembles (eq. 4: the mean of the members'
distributions) of generations 1..k are evaluated on the validation and test sets, per sample.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from graftnet.checkpoint import spec_hash, verify_student
from graftnet.data import Splits
from graftnet.errors import TrainingError
from graftnet.graft import sites
from graftnet.losses import ensemble_probs
from graftnet.models import build_model
from graftnet.spec import BANSpec, ModelSpec, Spec, load_spec
from graftnet.training.evaluation import predict
from graftnet.training.results import RunResult
from graftnet.training.run_dir import RESULTS_NAME, SPEC_NAME, check_run_dir
from graftnet.training.supervised import fit

__all__ = ["EnsembleResult", "ensemble_errors", "generation_spec", "train_ban"]


def _generation_model(spec: Spec, k: int) -> ModelSpec:
    assert spec.student is not None and spec.train is not None
    ban = spec.train.ban or BANSpec()
    model = ban.teacher_model if k == 0 and ban.teacher_model is not None else spec.student
    return model.model_copy(update={"weights": None})


def generation_spec(spec: Spec, k: int, run_dir: Path, input_shape: tuple[int, ...]) -> Spec:
    """The spec of generation ``k`` of a ``ban`` run: what it trains, from which earlier generations.

    Raises:
        TrainingError: born-again knowledge flow asked for while generation 0 has another architecture.
    """
    assert spec.train is not None
    ban = spec.train.ban or BANSpec()
    model = _generation_model(spec, k)
    train: dict[str, Any] = {"seed": spec.train.seed * 1000 + k, "ban": None, "label": f"gen{k}"}
    update: dict[str, Any] = {"student": model, "teachers": {}, "sites": []}
    if k == 0:
        train["method"] = "scratch"
    elif not ban.knowledge_flow:
        previous = _generation_model(spec, k - 1).model_copy(
            update={"weights": str(run_dir / f"gen{k - 1}" / "student.safetensors")}
        )
        update["teachers"] = {"previous": {"model": previous.model, "kwargs": previous.kwargs,
                                           "weights": previous.weights}}  # fmt: skip
        train["method"] = "born_again"
        train["born_again"] = {"teacher": "previous", "treatment": ban.treatment, "label_weight": ban.label_weight}
    else:
        sources = [k - 1] if ban.flow_from == "previous" else list(range(k))
        if ban.teacher_model is not None and 0 in sources and ban.teacher_model.model_dump() != model.model_dump():
            raise TrainingError(
                "train.ban.knowledge_flow grafts generations onto each other at matching sites, so generation 0 "
                "must have the student's architecture: drop train.ban.teacher_model"
            )
        names = [s.student for s in spec.sites] or [  # every activation; the output only if the spec names it
            s.name for s in sites(build_model(model.model, model.kwargs), input_shape=input_shape) if s.kind != "output"
        ]
        update["teachers"] = {
            f"gen{j}": {"model": model.model, "kwargs": model.kwargs,
                        "weights": str(run_dir / f"gen{j}" / "student.safetensors")}
            for j in sources
        }  # fmt: skip
        update["sites"] = [{"student": n, "taps": [f"gen{j}:{n}" for j in sources]} for n in names]
        train["method"] = "knowledge_flow"
    data = spec.model_dump(mode="json")
    data.update({k2: (v.model_dump(mode="json") if isinstance(v, ModelSpec) else v) for k2, v in update.items()})
    data["train"] = {**data["train"], **train}
    data["input_shape"] = list(input_shape)
    return load_spec(data)


@dataclass(frozen=True)
class EnsembleResult:
    """Errors (%) of the ensemble of ``members`` (generation indices); no test error without a test split."""

    members: tuple[int, ...]
    val_error: float
    test_error: float | None


def ensemble_errors(
    members: dict[int, torch.nn.Module], groups: list[tuple[int, ...]], splits: Splits, batch_size: int = 512
) -> list[EnsembleResult]:
    """Val and test error of each group's ensemble: every sample scored by the mean of the members' softmax."""
    cpu = torch.device("cpu")
    names = ("val", "test") if splits.test is not None else ("val",)
    cached = {k: {name: predict(m, getattr(splits, name), batch_size, cpu) for name in names}
              for k, m in members.items()}  # fmt: skip
    results = []
    for group in groups:
        errors: list[float] = []
        for name in names:
            probs = ensemble_probs([cached[k][name][0] for k in group])
            labels = cached[group[0]][name][1]
            errors.append(100.0 * float((probs.argmax(-1) != labels).float().mean()))
        results.append(EnsembleResult(tuple(group), errors[0], errors[1] if len(errors) > 1 else None))
    return results


def train_ban(
    spec: Spec, run_dir: Path, splits: Splits, *, resume: bool = False, overwrite: bool = False, **fit_kwargs: Any
) -> RunResult:
    """Run the generations of a ``ban`` spec in ``run_dir/gen{k}``, then evaluate the ensembles.

    ``fit_kwargs`` go to every generation's :func:`graftnet.fit` (``progress``, ``tensorboard``, ``on_step``).

    Returns:
        A :class:`RunResult` for the sequence: the last generation's errors and p_w, every generation's and the
        ensembles' (also in ``run_dir/results.json``), or the generation that a signal interrupted.
    """
    assert spec.train is not None and spec.data is not None
    check_run_dir(run_dir, spec, resume, overwrite, SPEC_NAME)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / SPEC_NAME).write_text(json.dumps(spec.model_dump(mode="json"), indent=2))
    ban = spec.train.ban or BANSpec()
    generations: list[dict[str, Any]] = []
    result: RunResult | None = None
    for k in range(ban.generations + 1):
        gen_dir = run_dir / f"gen{k}"
        gen_spec = generation_spec(spec, k, run_dir, splits.input_shape)
        done = gen_dir / RESULTS_NAME
        if resume and done.is_file() and json.loads((gen_dir / SPEC_NAME).read_text()) == gen_spec.model_dump(
            mode="json"
        ):
            result = RunResult.read(done)
        else:
            for teacher in gen_spec.teachers.values():  # earlier generations' exports: refuse damaged files
                if teacher.weights is not None:
                    verify_student(teacher.weights)
            again = resume and (gen_dir / "checkpoint.safetensors").is_file()
            result = fit(None, None, gen_spec, train=splits.train, val=splits.val, test=splits.test,
                         num_classes=splits.num_classes, run_dir=gen_dir, resume=again, overwrite=not again,
                         **fit_kwargs)  # fmt: skip
        if result.interrupted:
            return result
        generations.append({"generation": k, "val_error": result.val_error, "test_error": result.test_error,
                            "seed": gen_spec.train.seed if gen_spec.train else None})  # fmt: skip
    members = {
        k: build_model(m.model, m.kwargs, run_dir / f"gen{k}" / "student.safetensors")
        for k, m in ((k, _generation_model(spec, k)) for k in range(ban.generations + 1))
    }
    first = 0 if ban.ensemble_with_teacher else 1
    groups = [tuple(range(first, k + 1)) for k in range(max(first + 1, 2), ban.generations + 1)]
    ensembles = ensemble_errors(members, groups, splits, spec.data.eval_batch_size)
    best = min(generations, key=lambda g: g["val_error"])["generation"]
    treatment = "knowledge_flow" if ban.knowledge_flow else ban.treatment
    payload = {
        "spec_sha256": spec_hash(spec),
        "treatment": treatment,
        "generations": generations,
        "ensembles": [asdict(e) for e in ensembles],
        "best_generation_by_validation": best,
    }
    (run_dir / RESULTS_NAME).write_text(json.dumps(payload, indent=2))
    assert result is not None
    last = generations[-1]
    return RunResult(run_dir, "ban", result.epochs, last["val_error"], last["test_error"], result.min_p_w_student,
                     result.forced_export, seconds=result.seconds,
                     generations=generations, ensembles=payload["ensembles"], treatment=treatment,
                     best_generation=best)  # fmt: skip
