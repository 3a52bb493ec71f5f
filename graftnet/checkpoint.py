"""Checkpoints of grafted models and export of the detached student — safetensors only, never pickle.

A checkpoint is one ``.safetensors`` file holding the student's, mixers' and input adapters' tensors, and
JSON metadata under the key ``graftnet``: the format, graftnet's version, the spec (with references to
the teachers' models and weight files rather than their weights) and p_w per site. Every write goes to a
temporary file in the target folder and is renamed into place, so an interrupted write leaves no half
file and never damages an existing one.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from graftnet._version import __version__
from graftnet.errors import CheckpointError, GraftError
from graftnet.graft import GraftedModel, graft
from graftnet.spec import Spec, load_spec

__all__ = [
    "CHECKPOINT_FORMAT",
    "STUDENT_FORMAT",
    "ExportReport",
    "atomic_write",
    "export",
    "load_checkpoint",
    "read_checkpoint",
    "save_checkpoint",
    "spec_hash",
]

CHECKPOINT_FORMAT = "graftnet-checkpoint/1"
STUDENT_FORMAT = "graftnet-student/1"
CHECKPOINT_NAME = "checkpoint.safetensors"
_TEACHERS = "teachers."
TRAIN_STATE = "train_state."  # tensors of the trainer's state: kept in the file, not part of the model


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, fsync it, then rename it onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def spec_hash(spec: Spec) -> str:
    """sha256 of the spec's canonical JSON: ties an exported student to the spec that trained it."""
    text = json.dumps(spec.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _tensors(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses shared or non-contiguous storage: give each tensor its own contiguous copy.
    return {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}


def _save(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: Path) -> None:
    from safetensors.torch import save_file

    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def save_checkpoint(
    g: GraftedModel,
    path: str | Path,
    *,
    extra: Mapping[str, Any] | None = None,
    tensors: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``g``'s trainable state (student, mixers, input adapters) and metadata to ``path``.

    Teachers are stored as references (their spec entries), never as weights. ``extra`` adds metadata and
    ``tensors`` adds tensors under keys starting with ``train_state.`` (the trainer's optimizer and RNG
    state), which loading the model ignores.
    """
    path = Path(path)
    state = {k: v for k, v in g.state_dict().items() if not k.startswith(_TEACHERS)}
    for key, value in (tensors or {}).items():
        if not key.startswith(TRAIN_STATE):
            raise CheckpointError(f"extra checkpoint tensor {key!r} must start with {TRAIN_STATE!r}")
        state[key] = value
    meta = {
        "format": CHECKPOINT_FORMAT,
        "graftnet_version": _version(),
        "spec": g.spec.model_dump(mode="json"),
        "p_w": g.p_w(),
        "student_class": f"{type(g.student).__module__}.{type(g.student).__qualname__}",
        **dict(extra or {}),
    }
    _save(_tensors(state), {"graftnet": json.dumps(meta)}, path)
    return path


def _version() -> str:
    return __version__


def _resolve(path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise CheckpointError(
            f"no checkpoint at {str(path)!r} (give a run folder holding {CHECKPOINT_NAME} or the file itself)"
        )
    return path


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and the ``graftnet`` metadata of a checkpoint file or run folder.

    Raises:
        CheckpointError: missing, truncated or corrupt file, or a safetensors file that is no graftnet checkpoint.
    """
    from safetensors import SafetensorError, safe_open

    path = _resolve(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("graftnet")
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{str(path)!r} is not a readable safetensors file (truncated or corrupt?): {e}") from e
    if raw is None:
        raise CheckpointError(
            f"{str(path)!r} is a safetensors file but not a graftnet checkpoint (no 'graftnet' metadata)"
        )
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{str(path)!r}: its graftnet metadata is not valid JSON: {e}") from e
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{str(path)!r} has format {meta.get('format')!r}; expected {CHECKPOINT_FORMAT!r}")
    return tensors, meta


def load_checkpoint(
    path: str | Path, student: nn.Module | None = None, teachers: Mapping[str, nn.Module] | None = None
) -> GraftedModel:
    """Rebuild the graft a checkpoint was saved from and load its state.

    The student and teachers are built from the spec's model references (teachers with their own weight
    files) unless given.

    Raises:
        CheckpointError: unreadable file, or tensors that do not fit the rebuilt graft (names the keys).
    """
    tensors, meta = read_checkpoint(path)
    tensors = {k: v for k, v in tensors.items() if not k.startswith(TRAIN_STATE)}
    spec = load_spec(meta["spec"])
    try:
        g = graft(student, teachers, spec)
    except GraftError as e:
        raise CheckpointError(f"cannot rebuild the graft saved in {str(path)!r}: {e}") from e
    expected = {k: v for k, v in g.state_dict().items() if not k.startswith(_TEACHERS)}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = sorted(k for k in set(expected) & set(tensors) if expected[k].shape != tensors[k].shape)
    if missing or unexpected or wrong:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if keys:
                parts.append(f"{label} ({len(keys)}): {', '.join(keys[:5])}{' …' if len(keys) > 5 else ''}")
        raise CheckpointError(
            f"checkpoint {str(path)!r} does not fit {meta.get('student_class', 'its student')} as built now — "
            + "; ".join(parts)
            + ". Is it a checkpoint of another model, or were the model kwargs changed?"
        )
    g.load_state_dict(tensors, strict=False)
    return g


@dataclass(frozen=True)
class ExportReport:
    """What ``export`` verified and wrote."""

    path: Path
    max_abs_diff: float
    argmax_agreement: float
    min_p_w_student: float
    forced: bool
    spec_sha256: str


def _outputs(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in _outputs(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _outputs(v)]
    return []


def export(
    source: str | Path | GraftedModel,
    out: str | Path,
    *,
    tol: float = 1e-3,
    force: bool = False,
    overwrite: bool = False,
    probe_batch: int = 8,
    seed: int = 0,
) -> ExportReport:
    """Detach the student of a checkpoint (or grafted model), verify it on a probe batch, and write it.

    The file holds exactly the student's ``state_dict()``: ``safetensors.torch.load_file(out)`` loads
    ``strict=True`` into the student's constructor output. Its metadata records the student's model
    reference, the spec hash, and the probe's max |grafted − detached| and argmax agreement.

    Raises:
        CheckpointError: ``out`` exists and ``overwrite`` is False, or the source is unreadable.
        DetachError: a site's p_w(student) is below 1 − tol and ``force`` is False.
    """
    from safetensors.torch import load_file

    from graftnet.detach import detach, student_dependence

    out = Path(out)
    if out.exists() and not overwrite:
        raise CheckpointError(f"{str(out)!r} exists; pass --overwrite (overwrite=True) to replace it")
    g = source if isinstance(source, GraftedModel) else load_checkpoint(source)
    student = detach(g, tol, force=force)
    if g.spec.input_shape is None:
        raise CheckpointError("the spec has no input_shape, so there is no probe batch to verify the export on")
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(probe_batch, *g.spec.input_shape, generator=generator)
    was_training = g.training
    g.eval()
    student.eval()
    with torch.no_grad():
        grafted_out, student_out = _outputs(g(x)), _outputs(student(x))
    g.train(was_training)
    diff = max((float((a - b).abs().max()) for a, b in zip(grafted_out, student_out, strict=True)), default=0.0)
    first_g, first_s = grafted_out[0], student_out[0]
    if first_g.ndim >= 2:
        agreement = float((first_g.argmax(-1) == first_s.argmax(-1)).float().mean())
    else:
        agreement = float(torch.isclose(first_g, first_s).float().mean())
    dependence = student_dependence(g)
    report = ExportReport(out, diff, agreement, min(dependence.values(), default=1.0), force, spec_hash(g.spec))
    metadata = {
        "format": STUDENT_FORMAT,
        "graftnet_version": _version(),
        "student_model": json.dumps(g.spec.student.model_dump(mode="json") if g.spec.student else None),
        "student_class": f"{type(student).__module__}.{type(student).__qualname__}",
        "spec_sha256": report.spec_sha256,
        "probe_max_abs_diff": repr(diff),
        "probe_argmax_agreement": repr(agreement),
        "min_p_w_student": repr(report.min_p_w_student),
        "forced": str(force).lower(),
    }
    state = _tensors(student.state_dict())
    _save(state, metadata, out)
    written = load_file(str(out))
    if set(written) != set(state) or any(not torch.equal(written[k], state[k]) for k in state):
        raise CheckpointError(f"verification of {str(out)!r} failed: the file does not hold the student's state")
    return report
