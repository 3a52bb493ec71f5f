"""Checkpoints of grafted models and export of the detached student — safetensors only, never pickle.

A checkpoint is one ``.safetensors`` file holding the student's, mixers' and input adapters' tensors, and
JSON metadata under the key ``graftnet``: the format, graftnet's version, the spec (with references to
the teachers' models and weight files rather than their weights) and p_w per site.

Integrity. Every file graftnet writes carries an ``integrity`` record: the sha256 of each tensor (over its
dtype, shape and raw bytes) and of each metadata entry (the spec's is :func:`spec_hash`). Every read checks
the record, the set of tensors, and that every floating tensor is finite, and names what does not match. The
record detects damage (a flipped byte, a truncated or half-copied file, an edited entry); it is no signature:
whoever can write the file can write a matching record, which is why the trust rule below does not rest on it.

Trust. A checkpoint is data, and loading one never imports or calls code it names. The student's and
teachers' model references in its spec are built only when their source is registered in
:data:`graftnet.models.MODEL_SOURCES` (timm, torchvision, graftnet, and any added in Python), or when they
equal those of a spec the caller passes (``spec=``, ``graftnet export --spec``); or the caller passes the
modules themselves. Anything else (``package.module:callable``) is refused before any import.

Writes go to a temporary file ``.NAME.<random>.tmp`` in the target folder, are fsynced, (for exports)
verified, and renamed into place; the folder is fsynced after the rename. An interrupted or failed write
leaves no half file and never damages an existing one; :func:`remove_stale_temporaries` clears what a killed
process left behind.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import secrets
import stat
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from graftnet._version import __version__
from graftnet.errors import CheckpointError, GraftError, NonFiniteError
from graftnet.graft import GraftedModel, graft
from graftnet.models import MODEL_SOURCES
from graftnet.spec import Spec, load_spec

__all__ = [
    "CHECKPOINT_FORMAT",
    "STUDENT_FORMAT",
    "ExportReport",
    "atomic_write",
    "export",
    "integrity_record",
    "load_checkpoint",
    "read_checkpoint",
    "remove_stale_temporaries",
    "save_checkpoint",
    "spec_hash",
    "verify_student",
]

CHECKPOINT_FORMAT = "graftnet-checkpoint/2"
STUDENT_FORMAT = "graftnet-student/2"
# Files written before integrity records existed: readable only with allow_unverified=True.
_UNVERIFIED_FORMATS = {"graftnet-checkpoint/1": CHECKPOINT_FORMAT, "graftnet-student/1": STUDENT_FORMAT}
CHECKPOINT_NAME = "checkpoint.safetensors"
_TEACHERS = "teachers."
TRAIN_STATE = "train_state."  # tensors of the trainer's state: kept in the file, not part of the model
INTEGRITY = "integrity"
_ALGORITHM = "sha256"

# ``.NAME.<random>.tmp`` as atomic_write names its temporary files (and tempfile.mkstemp did before), for a
# file whose name ends in ``.safetensors``; and ``.tmpXXXXXX``, the temporary file safetensors' save_file (0.7+)
# writes beside its target and renames onto it: what remove_stale_temporaries may delete, and nothing else.
_STALE = re.compile(r"\.[^/]+\.safetensors\.[A-Za-z0-9_]+\.tmp|\.tmp[A-Za-z0-9]{6}")
# A reader that fails while the file is being replaced under it tries again this many times.
_READ_ATTEMPTS = 5
_READ_PAUSE_S = 0.02


# --- writing --------------------------------------------------------------------------------------------------


def _write_error(path: Path, e: OSError, doing: str = "write") -> CheckpointError:
    """What went wrong writing ``path``, and what to do about it."""
    reason = e.strerror or str(e) or type(e).__name__
    code = e.errno
    if code in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        fix = "the disk (or quota) is full: free some space, or write somewhere else"
    elif code in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = f"no permission to write in {str(path.parent)!r}: fix its permissions, or write somewhere else"
    elif code == errno.ENOTDIR or isinstance(e, FileExistsError) and doing == "create the folder of":
        fix = f"a file stands where a folder of {str(path)!r} should be: pick another path"
    elif code == errno.EISDIR:
        fix = f"{str(path)!r} is a folder: give the path of a file inside it"
    else:
        fix = "check the path and the file system"
    return CheckpointError(f"cannot {doing} {str(path)!r}: {reason} [errno {code}]; {fix}")


def _create_temporary(path: Path) -> Path:
    # os.open with mode 0o666 lets the kernel apply the umask (and any default ACL), so the file ends up with
    # the permissions of the run's other files; tempfile.mkstemp would make it 0600 (private to its owner).
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, flags, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(errno.EEXIST, "no free temporary file name", str(path.parent))


def _umask() -> int:
    """The process's umask, read without changing it where Linux allows (/proc), else by setting it back."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere the only way to read it: set and restore at once
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    # The rename is durable only once the folder's entry is on disk: fsync the folder after it.
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return  # a platform that cannot open a folder (Windows) offers nothing more than the rename
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a folder (EINVAL); the rename itself has happened
    finally:
        os.close(fd)


def atomic_write(
    path: str | Path, write: Callable[[Path], None], *, verify: Callable[[Path], None] | None = None
) -> None:
    """Write ``path`` through a temporary file beside it, so that it is either the old file or the whole new one.

    Calls ``write(tmp)``, fsyncs ``tmp``, calls ``verify(tmp)`` if given, renames ``tmp`` onto ``path`` and
    fsyncs the folder. ``tmp`` is ``.NAME.<random>.tmp`` with the permissions the umask gives new files. On any
    failure (``verify`` raising included) ``tmp`` is removed and ``path`` is left as it was.

    Raises:
        CheckpointError: the folder cannot be created or written (no permission, a file in the way, a full
            disk), or ``path`` is a folder. What ``write`` and ``verify`` raise passes through.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"cannot write {str(path)!r}: it is a folder; give the path of a file inside it")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _write_error(path, e, "create the folder of") from e
    try:
        tmp = _create_temporary(path)
    except OSError as e:
        raise _write_error(path, e) from e
    try:
        try:
            write(tmp)
            # Writers may replace tmp with a file of their own (safetensors renames a 0600 file of its own onto
            # it): give the result the permissions the umask gives the run's other files.
            os.chmod(tmp, 0o666 & ~_umask())
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        except OSError as e:
            raise _write_error(path, e) from e
        if verify is not None:
            verify(tmp)
        try:
            os.replace(tmp, path)
        except OSError as e:
            raise _write_error(path, e, "rename the finished temporary file onto") from e
        _fsync_dir(path.parent)
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass  # the error that brought us here is the one to report


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporary files that interrupted writes of checkpoints and students left in ``folder``.

    Only the leftovers of writing ``.safetensors`` files are removed: ``.NAME.safetensors.<random>.tmp``
    (graftnet's) and ``.tmpXXXXXX`` (the one safetensors' ``save_file`` writes through); only regular files, and
    only in ``folder`` itself. Call it when no save into ``folder`` is in flight (when a run starts or resumes):
    a temporary file is never part of a run's state.

    Returns:
        The files removed, sorted.

    Raises:
        CheckpointError: a leftover that cannot be removed (a read-only run folder).
    """
    folder = Path(folder)
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as e:
        raise CheckpointError(
            f"cannot list {str(folder)!r} to remove leftover temporary files: {e.strerror or e}"
        ) from e
    removed = []
    for entry in entries:
        if not _STALE.fullmatch(entry.name) or not entry.is_file(follow_symlinks=False):
            continue
        try:
            os.unlink(entry.path)
        except FileNotFoundError:
            continue  # gone already: another process cleaned up too
        except OSError as e:
            raise _write_error(Path(entry.path), e, "remove the leftover temporary file") from e
        removed.append(Path(entry.path))
    return sorted(removed)


# --- integrity --------------------------------------------------------------------------------------------------


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _value_sha256(value: Any) -> str:
    return hashlib.sha256(_canonical(value).encode()).hexdigest()


def spec_hash(spec: Spec) -> str:
    """sha256 of the spec's canonical JSON: ties an exported student to the spec that trained it."""
    return _value_sha256(spec.model_dump(mode="json"))


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _tensor_record(t: torch.Tensor) -> dict[str, Any]:
    t = t.detach().cpu().contiguous()
    h = hashlib.sha256(f"{_dtype_name(t.dtype)}{list(t.shape)}".encode())
    # The raw bytes as they are stored, through a zero-copy uint8 view (numpy has no bfloat16).
    h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return {"dtype": _dtype_name(t.dtype), "shape": list(t.shape), _ALGORITHM: h.hexdigest()}


def integrity_record(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, Any]) -> dict[str, Any]:
    """The ``integrity`` entry for a file of ``tensors`` and ``metadata`` (what graftnet's writers store).

    ``metadata`` is a checkpoint's ``graftnet`` object or a student file's string metadata, without the
    ``integrity`` key itself; each value is hashed over its canonical JSON.
    """
    return {
        "algorithm": _ALGORITHM,
        "tensors": {k: _tensor_record(v) for k, v in sorted(tensors.items())},
        "metadata": {k: _value_sha256(v) for k, v in sorted(metadata.items()) if k != INTEGRITY},
    }


def _shown(keys: list[str]) -> str:
    return f"({len(keys)}): {', '.join(keys[:5])}{' …' if len(keys) > 5 else ''}"


_DAMAGED = (
    "The file was damaged (a bad disk or copy) or edited after it was saved; restore it from a copy, or go back "
    "to an earlier checkpoint"
)


def _verify(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, Any], where: str) -> None:
    """Check ``tensors`` and ``metadata`` against the integrity record in ``metadata``; names what differs."""
    at = f"{str(path)!r}"
    record = metadata.get(INTEGRITY)
    if record is None:
        raise CheckpointError(
            f"{at} has no integrity record ({where}.{INTEGRITY} is missing), so its content cannot be verified. "
            f"{_DAMAGED}."
        )
    if (
        not isinstance(record, dict)
        or record.get("algorithm") != _ALGORITHM
        or not isinstance(record.get("tensors"), dict)
        or not isinstance(record.get("metadata"), dict)
        or not all(isinstance(v, dict) for v in record["tensors"].values())
    ):
        raise CheckpointError(
            f"{at}: {where}.{INTEGRITY} is malformed (expected an object with algorithm {_ALGORITHM!r}, 'tensors' "
            f"and 'metadata'). {_DAMAGED}."
        )
    recorded_meta: dict[str, Any] = record["metadata"]
    present = {k for k in metadata if k != INTEGRITY}
    missing = sorted(set(recorded_meta) - present)
    extra = sorted(present - set(recorded_meta))
    if missing or extra:
        parts = [f"{label} {_shown(keys)}" for label, keys in (("missing", missing), ("unrecorded", extra)) if keys]
        raise CheckpointError(f"{at}: the metadata keys of {where} differ from its integrity record — "
                              f"{'; '.join(parts)}. {_DAMAGED}.")  # fmt: skip
    for key in sorted(present):
        if recorded_meta[key] != _value_sha256(metadata[key]):
            raise CheckpointError(
                f"{at}: metadata key {where}.{key} does not match the sha256 recorded when the file was saved; it "
                f"was changed after saving (damaged, or edited, e.g. to describe another model). {_DAMAGED}."
            )
    recorded: dict[str, dict[str, Any]] = record["tensors"]
    missing = sorted(set(recorded) - set(tensors))
    extra = sorted(set(tensors) - set(recorded))
    if missing or extra:
        parts = [f"{label} {_shown(keys)}" for label, keys in (("missing", missing), ("unrecorded", extra)) if keys]
        raise CheckpointError(f"{at}: its tensors differ from its integrity record — {'; '.join(parts)}. {_DAMAGED}.")
    for name in sorted(tensors):
        want, got = recorded[name], _tensor_record(tensors[name])
        for field in ("dtype", "shape"):
            if want.get(field) != got[field]:
                raise CheckpointError(
                    f"{at}: tensor {name!r} has {field} {got[field]} but its integrity record says "
                    f"{want.get(field)}. {_DAMAGED}."
                )
        if want.get(_ALGORITHM) != got[_ALGORITHM]:
            raise CheckpointError(
                f"{at}: the bytes of tensor {name!r} do not match the sha256 recorded when the file was saved. "
                f"{_DAMAGED}."
            )


def _non_finite(tensors: Mapping[str, torch.Tensor]) -> tuple[str, int, int] | None:
    """The first floating tensor (by name) holding NaN or ±inf, with its count of such values."""
    floating = [torch.view_as_real(t) if t.is_complex() else t for t in tensors.values()
                if t.is_floating_point() or t.is_complex()]  # fmt: skip
    # A NaN or inf anywhere makes a tensor's sum NaN or inf, so finite sums clear every tensor in one vectorised
    # pass (15× cheaper than isfinite, which allocates a mask); a sum that merely overflows (large finite values)
    # falls through to the exact check, which decides.
    if not floating or bool(torch.isfinite(torch.stack([t.sum().double() for t in floating])).all()):
        return None
    for name in sorted(tensors):
        t = tensors[name]
        if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
            return name, int((~torch.isfinite(t)).sum()), t.numel()
    return None


def _check_finite(tensors: Mapping[str, torch.Tensor], what: str, fix: str) -> None:
    # Every floating tensor must be finite: parameters, buffers (BatchNorm statistics), the optimizer's moments
    # and the objective's copies alike. None of them is legitimately NaN or inf — a hand-set -inf mixer logit
    # (p_w exactly 0) is the one conceivable case, and -1e4 has the same effect in float32.
    bad = _non_finite(tensors)
    if bad is not None:
        name, count, total = bad
        raise NonFiniteError(f"{what}: tensor {name!r} has {count} of {total} values that are NaN or infinite; {fix}")


# --- reading ----------------------------------------------------------------------------------------------------


def _identity(st: os.stat_result) -> tuple[int, int, int]:
    return st.st_ino, st.st_mtime_ns, st.st_size


def _stat(path: Path, what: str) -> os.stat_result | None:
    """``path``'s status, None if it does not exist; a permission problem is reported as such."""
    try:
        return path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except PermissionError as e:
        raise CheckpointError(
            f"cannot read {what} {str(path)!r}: permission denied — it (or a folder above it) is not readable by "
            "this user; fix the permissions"
        ) from e
    except OSError as e:
        raise CheckpointError(f"cannot read {what} {str(path)!r}: {e.strerror or e}") from e


def _resolve(path: str | Path) -> Path:
    path = Path(path)
    st = _stat(path, "checkpoint")
    if st is not None and stat.S_ISDIR(st.st_mode):
        path = path / CHECKPOINT_NAME
        st = _stat(path, "checkpoint")
    if st is None:
        raise CheckpointError(
            f"no checkpoint at {str(path)!r} (give a run folder holding {CHECKPOINT_NAME} or the file itself)"
        )
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{str(path)!r} is not a regular file, so it is no checkpoint")
    return path


def _read_file(
    path: Path, what: str, check: Callable[[dict[str, torch.Tensor], dict[str, str]], Any]
) -> tuple[dict[str, torch.Tensor], dict[str, str], Any]:
    """Tensors, safetensors metadata and ``check(tensors, metadata)`` of ``path``, retrying while it changes.

    A save renames a whole new file over the old one, so a reader that opened either inode reads a whole file.
    Another writer may still rewrite a file in place (a copy in progress): a read that fails while the file's
    (inode, mtime, size) changed is tried again, up to a few times; a failure of an unchanging file is final.
    """
    from safetensors import SafetensorError, safe_open

    failure: CheckpointError | None = None
    for attempt in range(_READ_ATTEMPTS):
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError as e:
            raise CheckpointError(f"no {what} at {str(path)!r}") from e
        except PermissionError as e:
            raise CheckpointError(
                f"cannot read {what} {str(path)!r}: permission denied — the file is not readable by this user; fix "
                "its permissions"
            ) from e
        except OSError as e:
            raise CheckpointError(f"cannot read {what} {str(path)!r}: {e.strerror or e}") from e
        try:
            before = _identity(os.fstat(fd))
            try:
                with safe_open(str(path), framework="pt") as f:
                    metadata = dict(f.metadata() or {})
                    tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
                return tensors, metadata, check(tensors, metadata)
            except CheckpointError as e:
                failure = e
            except PermissionError as e:
                raise CheckpointError(
                    f"cannot read {what} {str(path)!r}: permission denied — fix the file's permissions"
                ) from e
            except (SafetensorError, OSError, ValueError, RuntimeError, TypeError, KeyError, OverflowError) as e:
                failure = CheckpointError(
                    f"{str(path)!r} is not a readable safetensors file (truncated or corrupt?): {e}"
                )
                failure.__cause__ = e
            after = _identity(os.fstat(fd))
        finally:
            os.close(fd)
        now = _stat(path, what)
        if before == after and now is not None and _identity(now) == after:
            raise failure
        time.sleep(_READ_PAUSE_S * (attempt + 1))
    assert failure is not None
    raise CheckpointError(
        f"{str(path)!r} kept changing while it was read ({_READ_ATTEMPTS} attempts): another process is writing it "
        f"in place; wait for it to finish. Last error: {failure}"
    ) from failure


def _parse_meta(path: Path, metadata: dict[str, str], allow_unverified: bool) -> dict[str, Any]:
    at = f"{str(path)!r}"
    raw = metadata.get("graftnet")
    if raw is None:
        raise CheckpointError(f"{at} is a safetensors file but not a graftnet checkpoint (no 'graftnet' metadata)")
    try:
        meta = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{at}: its graftnet metadata is not valid JSON: {e}. {_DAMAGED}.") from e
    if not isinstance(meta, dict):
        raise CheckpointError(
            f"{at}: its 'graftnet' metadata must be a JSON object, but it is a JSON {_json_kind(meta)}. {_DAMAGED}."
        )
    fmt = meta.get("format")
    if fmt == CHECKPOINT_FORMAT:
        return meta
    if fmt in _UNVERIFIED_FORMATS and _UNVERIFIED_FORMATS[fmt] == CHECKPOINT_FORMAT:
        if allow_unverified:
            return meta
        raise CheckpointError(_predates(path, fmt))
    raise CheckpointError(f"{at} has format {fmt!r}; expected {CHECKPOINT_FORMAT!r}")


def _predates(path: Path, fmt: Any) -> str:
    return (
        f"{str(path)!r} has format {fmt!r}: it predates integrity hashes, so its content cannot be verified and "
        "graftnet does not load it silently. If you trust the file, load it with allow_unverified=True (it is then "
        "checked for structure and finite values only) and save it again to add the hashes"
    )


def _json_kind(value: Any) -> str:
    return {list: "array", str: "string", dict: "object", bool: "boolean", type(None): "null"}.get(
        type(value), "number"
    )


def read_checkpoint(
    path: str | Path, *, allow_unverified: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The verified tensors and the ``graftnet`` metadata of a checkpoint file or run folder.

    Verified: every tensor and metadata entry matches the file's integrity record (sha256), no tensor is
    missing or unrecorded, every floating tensor is finite, and the metadata holds a ``spec`` object.

    Args:
        path: the checkpoint file, or a run folder holding ``checkpoint.safetensors``.
        allow_unverified: accept a file written before integrity records (format ``graftnet-checkpoint/1``),
            checked for structure and finite values only. Files of the current format are always verified.

    Raises:
        CheckpointError: missing, unreadable, truncated or corrupt file; a safetensors file that is no graftnet
            checkpoint; content that does not match its integrity record; a NaN/inf tensor; malformed metadata.
            The message names the file and the tensor or metadata key.
    """
    path = _resolve(path)

    def check(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, Any]:
        meta = _parse_meta(path, metadata, allow_unverified)
        if meta.get("format") == CHECKPOINT_FORMAT:
            _verify(path, tensors, meta, "graftnet")
        return meta

    tensors, _, meta = _read_file(path, "checkpoint", check)
    if not isinstance(meta.get("spec"), dict):
        got = "missing" if "spec" not in meta else f"a JSON {_json_kind(meta['spec'])}"
        raise CheckpointError(f"{str(path)!r}: metadata key graftnet.spec must be the spec object, but it is {got}")
    _check_finite(tensors, str(path), "the run diverged before this save; go back to an earlier checkpoint")
    return tensors, meta


# --- trust --------------------------------------------------------------------------------------------------

# timm.create_model arguments that make it read a file of the caller's choosing (torch.load included, which can run
# code in older torch) or fetch one: harmless in a spec the user wrote, not in one a checkpoint brings along.
_FILE_KWARGS = {"timm": ("checkpoint_path", "pretrained_cfg", "pretrained_cfg_overlay", "pretrained", "cache_dir")}


def _references(spec: Spec, student_given: bool, teachers_given: bool) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(metadata path, model reference, kwargs) of every model reference in ``spec`` that could be built."""
    if spec.student is not None and not student_given:
        yield "spec.student", spec.student.model, dict(spec.student.kwargs)
    if not teachers_given:
        for name, t in spec.teachers.items():
            if t.model is not None:
                yield f"spec.teachers.{name}", t.model, dict(t.kwargs)
    ban = spec.train.ban if spec.train is not None else None
    if ban is not None and ban.teacher_model is not None:  # not built here, but whoever reuses g.spec might
        yield "spec.train.ban.teacher_model", ban.teacher_model.model, dict(ban.teacher_model.kwargs)


def _trusted_entry(trusted: Spec, where: str) -> tuple[str, dict[str, Any]] | None:
    if where == "spec.student":
        return (trusted.student.model, dict(trusted.student.kwargs)) if trusted.student is not None else None
    if where.startswith("spec.teachers."):
        t = trusted.teachers.get(where.removeprefix("spec.teachers."))
        return (t.model, dict(t.kwargs)) if t is not None and t.model is not None else None
    ban = trusted.train.ban if trusted.train is not None else None
    if ban is not None and ban.teacher_model is not None:
        return ban.teacher_model.model, dict(ban.teacher_model.kwargs)
    return None


def _json_equal(a: Any, b: Any) -> bool:
    return _canonical(a) == _canonical(b)


_HOW = (
    "A checkpoint is data, and graftnet never imports or runs code a file names. If you trust this model "
    "reference, pass the spec file you trust (graftnet export --spec SPEC, or spec=SPEC), or build the modules "
    "yourself and pass them (student=..., teachers={...})"
)


def _check_references(path: Path, spec: Spec, trusted: Spec | None, student_given: bool, teachers_given: bool) -> None:
    """Refuse, before anything is imported, a model reference from a file that nothing vouches for."""
    for where, ref, kwargs in _references(spec, student_given, teachers_given):
        if trusted is not None:
            mine = _trusted_entry(trusted, where)
            if mine is None:
                entry = where.removeprefix("spec.")
                raise CheckpointError(
                    f"{str(path)!r}: {where}.model is {ref!r}, but the spec you gave has no {entry} model; pass the "
                    "spec this checkpoint was trained with, or the modules themselves"
                )
            if mine[0] != ref or not _json_equal(mine[1], kwargs):
                raise CheckpointError(
                    f"{str(path)!r}: {where} is {ref!r} with kwargs {kwargs}, but the spec you gave says {mine[0]!r} "
                    f"with kwargs {mine[1]}; it was refused because a checkpoint is data and only references equal "
                    "to those of the spec you trust are built. Pass the spec this checkpoint was trained with"
                )
            continue
        source = ref.partition(":")[0]
        if source not in MODEL_SOURCES:
            raise CheckpointError(
                f"{str(path)!r}: refused to build {where}.model = {ref!r}: it would import and call code named in "
                f"the file, and its source {source!r} is not a registered model source "
                f"({', '.join(MODEL_SOURCES.keys())}). {_HOW}"
            )
        risky = sorted(k for k in _FILE_KWARGS.get(source, ()) if k in kwargs)
        if risky:
            raise CheckpointError(
                f"{str(path)!r}: refused {where}.kwargs.{risky[0]} for {ref!r}: it makes {source} read or fetch a "
                f"file the checkpoint chooses. {_HOW}"
            )


def load_checkpoint(
    path: str | Path,
    student: nn.Module | None = None,
    teachers: Mapping[str, nn.Module] | None = None,
    *,
    spec: Spec | Mapping[str, Any] | str | Path | None = None,
    allow_unverified: bool = False,
) -> GraftedModel:
    """Rebuild the graft a checkpoint was saved from and load its state.

    The student and teachers are built from the model references in the checkpoint's spec (teachers with
    their own weight files) unless given as modules. A checkpoint is data: a reference is built only if its
    source is a registered model source (timm, torchvision, graftnet, or one added to
    :data:`graftnet.models.MODEL_SOURCES`), or if it equals, with its kwargs, the same entry of ``spec``.
    A ``package.module:callable`` reference from the file alone is refused before it is imported.

    Args:
        path: the checkpoint file, or a run folder holding ``checkpoint.safetensors``.
        student: the student module (its reference in the file is then not used).
        teachers: ``{name: module}`` (their references in the file are then not used).
        spec: a spec you trust (a :class:`Spec`, dict or YAML/JSON path, e.g. the one the run was trained with):
            its student and teacher references vouch for the file's, which must equal them.
        allow_unverified: accept a file from before integrity records (see :func:`read_checkpoint`).

    Raises:
        CheckpointError: unreadable or unverifiable file; a model reference refused (names the metadata path,
            e.g. ``spec.student.model``); tensors that do not fit the rebuilt graft (names the keys).
        SpecError: ``spec`` itself is invalid.
    """
    resolved = _resolve(path)
    tensors, meta = read_checkpoint(resolved, allow_unverified=allow_unverified)
    tensors = {k: v for k, v in tensors.items() if not k.startswith(TRAIN_STATE)}
    try:
        saved_spec = load_spec(meta["spec"])
    except GraftError as e:
        raise CheckpointError(f"{str(resolved)!r}: metadata key graftnet.spec is not a valid spec: {e}") from e
    trusted = None if spec is None else load_spec(dict(spec) if isinstance(spec, Mapping) else spec)
    _check_references(resolved, saved_spec, trusted, student is not None, teachers is not None)
    try:
        g = graft(student, teachers, saved_spec)
    except GraftError as e:
        raise CheckpointError(f"cannot rebuild the graft saved in {str(resolved)!r}: {e}") from e
    except Exception as e:  # constructors ran with kwargs from the file: whatever they raise is the file's fault
        raise CheckpointError(
            f"cannot rebuild the graft saved in {str(resolved)!r}: {type(e).__name__}: {e}; check the spec's model "
            "kwargs in the checkpoint (graftnet.spec)"
        ) from e
    expected = {k: v for k, v in g.state_dict().items() if not k.startswith(_TEACHERS)}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = sorted(k for k in set(expected) & set(tensors) if expected[k].shape != tensors[k].shape)
    if missing or unexpected or wrong:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if keys:
                parts.append(f"{label} {_shown(keys)}")
        raise CheckpointError(
            f"checkpoint {str(resolved)!r} does not fit {meta.get('student_class', 'its student')} as built now — "
            + "; ".join(parts)
            + ". Is it a checkpoint of another model, or were the model kwargs changed?"
        )
    g.load_state_dict(tensors, strict=False)
    return g


# --- saving -------------------------------------------------------------------------------------------------------


def _tensors(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses shared or non-contiguous storage: give each tensor its own contiguous copy.
    return {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}


def _save(
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str],
    path: Path,
    verify: Callable[[Path], None] | None = None,
) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    def write(tmp: Path) -> None:
        try:
            save_file(tensors, str(tmp), metadata=metadata)
        except SafetensorError as e:  # safetensors reports its I/O errors (a full disk …) as its own type
            raise CheckpointError(
                f"cannot write {str(path)!r} (through {tmp.name}): {e}; is the disk full, or the folder read-only?"
            ) from e

    atomic_write(path, write, verify=verify)


def save_checkpoint(
    g: GraftedModel,
    path: str | Path,
    *,
    extra: Mapping[str, Any] | None = None,
    tensors: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``g``'s trainable state (student, mixers, input adapters) and metadata to ``path``, atomically.

    Teachers are stored as references (their spec entries), never as weights. ``extra`` adds metadata and
    ``tensors`` adds tensors under keys starting with ``train_state.`` (the trainer's optimizer and RNG
    state), which loading the model ignores. The metadata gets an integrity record of every tensor and entry.

    Raises:
        CheckpointError: a tensor is NaN or infinite (it would never load again, and must not replace a good
            checkpoint), an extra tensor's key lacks the prefix, or the file cannot be written (says where and why).
    """
    path = Path(path)
    state = {k: v for k, v in g.state_dict().items() if not k.startswith(_TEACHERS)}
    for key, value in (tensors or {}).items():
        if not key.startswith(TRAIN_STATE):
            raise CheckpointError(f"extra checkpoint tensor {key!r} must start with {TRAIN_STATE!r}")
        state[key] = value
    meta: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "graftnet_version": _version(),
        "spec": g.spec.model_dump(mode="json"),
        "p_w": g.p_w(),
        "student_class": f"{type(g.student).__module__}.{type(g.student).__qualname__}",
        **dict(extra or {}),
    }
    meta.pop(INTEGRITY, None)
    # Hash what a reader will see: JSON turns tuples into lists and int keys into strings.
    meta = json.loads(json.dumps(meta))
    copies = _tensors(state)
    _check_finite(copies, f"not saving {str(path)!r}", "the model diverged; the previous checkpoint is kept")
    meta[INTEGRITY] = integrity_record(copies, meta)
    _save(copies, {"graftnet": json.dumps(meta)}, path)
    return path


def _version() -> str:
    return __version__


# --- export -------------------------------------------------------------------------------------------------------


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


def verify_student(
    path: str | Path, *, allow_unverified: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of an exported student file, verified like a checkpoint.

    Verified: the format, every tensor and metadata entry against the file's integrity record, the spec
    against ``spec_sha256``, and that every floating tensor is finite. Nothing is built or imported.

    Args:
        path: a file written by :func:`export` (``student.safetensors``).
        allow_unverified: accept a file from before integrity records (format ``graftnet-student/1``), checked
            for finite values only.

    Raises:
        CheckpointError: missing, unreadable, damaged or unverifiable file, or a NaN/inf tensor (names it).
    """
    path = Path(path)
    st = _stat(path, "student file")
    if st is None:
        raise CheckpointError(f"no student file at {str(path)!r}")
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{str(path)!r} is not a regular file, so it is no exported student")

    def check(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
        fmt = metadata.get("format")
        if fmt in _UNVERIFIED_FORMATS and _UNVERIFIED_FORMATS[fmt] == STUDENT_FORMAT:
            if not allow_unverified:
                raise CheckpointError(_predates(path, fmt))
            return
        if fmt != STUDENT_FORMAT:
            raise CheckpointError(
                f"{str(path)!r} has format {fmt!r}; expected an exported student ({STUDENT_FORMAT!r})"
            )
        try:
            record = json.loads(metadata.get(INTEGRITY, "null"))
        except (ValueError, RecursionError) as e:
            raise CheckpointError(f"{str(path)!r}: its {INTEGRITY} metadata is not valid JSON. {_DAMAGED}.") from e
        _verify(path, tensors, {**metadata, INTEGRITY: record}, "metadata")
        if hashlib.sha256(metadata.get("spec", "").encode()).hexdigest() != metadata.get("spec_sha256"):
            raise CheckpointError(f"{str(path)!r}: metadata key spec does not match spec_sha256. {_DAMAGED}.")

    tensors, metadata, _ = _read_file(path, "student file", check)
    _check_finite(tensors, str(path), "this student is broken; export it again from a good checkpoint")
    return tensors, metadata


def _check_target(out: Path, overwrite: bool) -> None:
    """Refuse an output path that cannot be written before any work is done (checked again when writing)."""
    if out.is_dir():
        raise CheckpointError(
            f"--out {str(out)!r} is a folder; give the path of a file, e.g. {str(out / 'student.safetensors')!r}"
        )
    if out.exists() and not overwrite:
        raise CheckpointError(f"{str(out)!r} exists; pass --overwrite (overwrite=True) to replace it")
    ancestor = out.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise CheckpointError(
            f"cannot write {str(out)!r}: {str(ancestor)!r} is a file, not a folder; pick another --out"
        )
    # root passes os.access on any folder; the write itself then reports what the file system refuses.
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise CheckpointError(
            f"cannot write {str(out)!r}: no permission to write in {str(ancestor)!r}; fix its permissions or pick "
            "another --out"
        )


def export(
    source: str | Path | GraftedModel,
    out: str | Path,
    *,
    tol: float = 1e-3,
    force: bool = False,
    overwrite: bool = False,
    probe_batch: int = 8,
    seed: int = 0,
    spec: Spec | Mapping[str, Any] | str | Path | None = None,
    student: nn.Module | None = None,
    teachers: Mapping[str, nn.Module] | None = None,
    allow_unverified: bool = False,
) -> ExportReport:
    """Detach the student of a checkpoint (or grafted model), verify it on a probe batch, and write it.

    The file holds exactly the student's ``state_dict()``: ``safetensors.torch.load_file(out)`` loads
    ``strict=True`` into the student's constructor output. Its metadata records the student's model
    reference, the spec and its hash, the probe's max |grafted − detached| and argmax agreement, and an
    integrity record (:func:`verify_student` checks it).

    The student is refused before anything is written if a tensor or a probe output is not finite. The file is
    written to a temporary file beside ``out``, read back and verified (integrity, equality with the student's
    state, finite probe outputs equal to the student's) and only then renamed onto ``out``: a failed export
    leaves no file behind and ``out``, if it existed, as it was.

    Args:
        source: a checkpoint file or run folder, or a :class:`GraftedModel`.
        out: the file to write.
        tol: every site needs p_w(student) ≥ 1 − tol, unless ``force``.
        force: export even if the student still relies on its teachers (the report says so).
        overwrite: replace ``out`` if it exists.
        probe_batch, seed: size and seed of the random probe batch (of the spec's ``input_shape``).
        spec, student, teachers, allow_unverified: how a checkpoint ``source`` is loaded; see
            :func:`load_checkpoint` (``spec`` vouches for the file's model references).

    Raises:
        CheckpointError: ``out`` exists and ``overwrite`` is False, or cannot be written (a folder, under a file,
            no permission, a full disk); the source is unreadable or refused; a NaN/inf student or probe output;
            the written file does not verify.
        DetachError: a site's p_w(student) is below 1 − tol and ``force`` is False.
    """
    from graftnet.detach import detach, student_dependence

    out = Path(out)
    _check_target(out, overwrite)
    if isinstance(source, GraftedModel):
        g = source
    else:
        g = load_checkpoint(source, student, teachers, spec=spec, allow_unverified=allow_unverified)
    detached = detach(g, tol, force=force)
    if g.spec.input_shape is None:
        raise CheckpointError("the spec has no input_shape, so there is no probe batch to verify the export on")
    state = _tensors(detached.state_dict())
    _check_finite(state, f"refusing to export the student to {str(out)!r}",
                  "the model diverged; export an earlier checkpoint, or train again with a lower lr")  # fmt: skip
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(probe_batch, *g.spec.input_shape, generator=generator)
    was_training = g.training
    g.eval()
    detached.eval()
    with torch.no_grad():
        grafted_out, student_out = _outputs(g(x)), _outputs(detached(x))
    g.train(was_training)
    for label, outs in (("the detached student", student_out), ("the grafted model", grafted_out)):
        for i, t in enumerate(outs):
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise NonFiniteError(
                    f"refusing to export the student to {str(out)!r}: output {i} of {label} on the probe batch is "
                    "NaN or infinite, though every tensor is finite; the model is numerically broken (overflowing "
                    "activations?) — export an earlier checkpoint"
                )
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
        "student_class": f"{type(detached).__module__}.{type(detached).__qualname__}",
        "spec": _canonical(g.spec.model_dump(mode="json")),
        "spec_sha256": report.spec_sha256,
        "probe_max_abs_diff": repr(diff),
        "probe_argmax_agreement": repr(agreement),
        "min_p_w_student": repr(report.min_p_w_student),
        "forced": str(force).lower(),
    }
    metadata[INTEGRITY] = json.dumps(integrity_record(state, metadata))

    def verify(tmp: Path) -> None:
        written, _ = verify_student(tmp)
        if set(written) != set(state):
            missing, extra = sorted(set(state) - set(written)), sorted(set(written) - set(state))
            raise CheckpointError(
                f"verification of {str(out)!r} failed: the written file's tensors differ from the student's "
                f"(missing {_shown(missing)}, unexpected {_shown(extra)}); nothing was replaced"
            )
        for k in sorted(state):
            if written[k].dtype != state[k].dtype or not torch.equal(written[k], state[k]):
                raise CheckpointError(
                    f"verification of {str(out)!r} failed: tensor {k!r} reads back different from the student's; "
                    "nothing was replaced — check the disk"
                )
        # The file alone must reproduce the probe: load it into the detached student and run it again.
        detached.load_state_dict(written, strict=True)
        with torch.no_grad():
            again = _outputs(detached(x))
        if any(not torch.equal(a, b) for a, b in zip(again, student_out, strict=True)):
            raise CheckpointError(
                f"verification of {str(out)!r} failed: the student loaded from the written file answers the probe "
                "batch differently; nothing was replaced"
            )

    _save(state, metadata, out, verify)
    return report
