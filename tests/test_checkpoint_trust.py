"""Checkpoints and exports as untrusted data: no code runs, every byte is verified, no good file is replaced.

Files are crafted with ``safetensors.torch.save_file`` and metadata written by hand. Where a test must get
past the integrity check to reach a later one, it re-seals the crafted metadata with ``integrity_record``,
exactly as an attacker could: the hashes detect damage, the trust rules stop code.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import sys
import threading
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors import SafetensorError
from safetensors.torch import save_file

import graftnet
from graftnet import checkpoint as ckpt
from graftnet.checkpoint import (
    integrity_record,
    load_checkpoint,
    read_checkpoint,
    remove_stale_temporaries,
    save_checkpoint,
    verify_student,
)
from graftnet.cli import main
from graftnet.errors import CheckpointError, GraftError
from graftnet.models import MODEL_SOURCES
from graftnet.training.state import load_run, restore, save_run

MLP = {"in_features": 6, "hidden": [5], "num_classes": 3}
SPEC: dict[str, Any] = {
    "student": {"model": "graftnet:mlp", "kwargs": MLP},
    "teachers": {"t": {"model": "graftnet:mlp", "kwargs": {"in_features": 6, "hidden": [4], "num_classes": 3}}},
    "input_shape": [6],
    "sites": [{"student": "body.2", "taps": ["t:body.2"]}],
    "adapter": "linear",
}
TRAIN_STATE = {"epoch": 1, "batch": 0, "step": 3, "sums": {}, "seconds": 1.5, "teachers_cut": False, "finished": False}


class _Objective:
    """What save_run and restore need of an objective."""

    cut = False

    def extra_state(self) -> dict[str, torch.Tensor]:
        return {}

    def load_extra_state(self, tensors: dict[str, torch.Tensor]) -> None:
        pass


def _grafted(spec: dict[str, Any] | None = None) -> graftnet.GraftedModel:
    torch.manual_seed(0)
    return graftnet.graft(None, None, spec or SPEC)


def _optimizer(g: graftnet.GraftedModel) -> torch.optim.Optimizer:
    return torch.optim.Adam([p for p in g.parameters() if p.requires_grad], lr=1e-3)


def _saved_run(path: Path) -> Path:
    """A real run checkpoint: model, Adam state after one step, RNG states and the trainer's counters."""
    g = _grafted()
    opt = _optimizer(g)
    g(torch.randn(4, 6)).sum().backward()
    opt.step()
    save_run(g, path, opt, _Objective(), dict(TRAIN_STATE))
    return path


def _write(path: Path, tensors: dict[str, torch.Tensor], meta: Any, *, seal: bool) -> Path:
    """A checkpoint file with ``meta`` as its graftnet metadata, re-sealed (valid hashes) if ``seal``."""
    if seal and isinstance(meta, dict):
        meta = {k: v for k, v in meta.items() if k != "integrity"}
        meta["integrity"] = integrity_record(tensors, meta)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"graftnet": json.dumps(meta)})
    return path


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp") or p.name.startswith(".tmp"))


# --- S1: a checkpoint never runs code ----------------------------------------------------------------------------


@pytest.fixture
def planted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A module ``planted_mod`` on sys.path that writes a marker file when imported or called."""
    marker = tmp_path / "marker"
    code = tmp_path / "code"
    code.mkdir()
    (code / "planted_mod.py").write_text(
        "from pathlib import Path\n"
        f"Path({str(marker)!r}).write_text('imported')\n"
        "def boom(**kwargs):\n"
        f"    Path({str(marker)!r}).write_text('called')\n"
    )
    monkeypatch.syspath_prepend(str(code))
    sys.modules.pop("planted_mod", None)
    return marker


def _planted_refs(marker: Path) -> list[tuple[str, dict[str, Any]]]:
    return [
        ("planted_mod:boom", {}),
        ("os:system", {"command": f"touch {marker}"}),
        ("builtins:exec", {"source": f"open({str(marker)!r}, 'w')"}),
        ("subprocess:call", {"args": ["touch", str(marker)]}),
    ]


def _plant(meta: dict[str, Any], where: str, ref: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    spec = json.loads(json.dumps(meta["spec"]))
    entry = {"model": ref, "kwargs": kwargs}
    if where == "student":
        spec["student"] = entry
    elif where == "teacher":
        spec["teachers"]["t"].update(entry)
    else:
        spec["train"] = {"method": "scratch", "ban": {"teacher_model": entry}}
    return {**meta, "spec": spec}


@pytest.mark.parametrize("seal", [True, False], ids=["resealed", "stale-hashes"])
@pytest.mark.parametrize("where", ["student", "teacher", "ban"])
def test_code_named_in_a_checkpoint_is_never_imported_or_called(
    tmp_path: Path, planted: Path, where: str, seal: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _saved_run(tmp_path / "checkpoint.safetensors")
    tensors, meta = read_checkpoint(path)
    metadata_path = {"student": "spec.student.model", "teacher": "spec.teachers.t.model",
                     "ban": "spec.train.ban.teacher_model.model"}[where]  # fmt: skip
    for ref, kwargs in _planted_refs(planted):
        bad = _write(tmp_path / "bad.safetensors", tensors, _plant(meta, where, ref, kwargs), seal=seal)
        for attempt in (
            partial(load_checkpoint, bad),
            partial(graftnet.export, bad, tmp_path / "student.safetensors", force=True),
        ):
            with pytest.raises(CheckpointError) as info:
                attempt()
            if seal:  # past the hashes: the trust rule itself refuses, and says how to proceed
                message = str(info.value)
                assert metadata_path in message and ref in message, message
                assert "checkpoint is data" in message and "--spec" in message and "spec=" in message
        assert main(["export", str(bad), "--out", str(tmp_path / "student.safetensors"), "--force"]) == 2
        assert "error" in capsys.readouterr().err
        assert not planted.exists(), f"{ref} ran"
        assert "planted_mod" not in sys.modules
        assert not (tmp_path / "student.safetensors").exists()


def test_a_refused_checkpoint_loads_with_the_modules_or_a_spec_that_vouches(tmp_path: Path, planted: Path) -> None:
    path = _saved_run(tmp_path / "checkpoint.safetensors")
    tensors, meta = read_checkpoint(path)
    bad = _write(tmp_path / "bad.safetensors", tensors, _plant(meta, "student", "planted_mod:boom", {}), seal=True)
    # The caller's own student module: the file's reference is not used at all.
    student = graftnet.build_model("graftnet:mlp", MLP)
    g = load_checkpoint(bad, student=student)
    assert g.student is not None and not planted.exists() and "planted_mod" not in sys.modules
    # A spec that says otherwise vouches for nothing.
    with pytest.raises(CheckpointError, match="spec.student is 'planted_mod:boom'.*the spec you gave says"):
        load_checkpoint(bad, spec=SPEC)
    assert not planted.exists()


def test_a_spec_the_user_trusts_lets_user_code_be_built(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code = tmp_path / "code"
    code.mkdir()
    (code / "trusted_nets.py").write_text(
        "import graftnet\ndef build(**kw):\n    return graftnet.build_model('graftnet:mlp', kw)\n"
    )
    monkeypatch.syspath_prepend(str(code))
    spec = dict(SPEC, student={"model": "trusted_nets:build", "kwargs": MLP})
    g = _grafted(spec)
    with torch.no_grad():
        g.mixers["body.2"].logits.copy_(torch.tensor([30.0, 0.0]))
    path = save_checkpoint(g, tmp_path / "run" / "checkpoint.safetensors")
    with pytest.raises(CheckpointError, match=r"refused to build spec\.student\.model = 'trusted_nets:build'"):
        load_checkpoint(path)
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    for trusted in (spec, tmp_path / "spec.json", graftnet.load_spec(spec)):
        loaded = load_checkpoint(tmp_path / "run", spec=trusted)
        assert torch.equal(loaded.student.head.weight, g.student.head.weight)
    with pytest.raises(CheckpointError, match="kwargs"):
        load_checkpoint(
            path, spec=dict(spec, student={"model": "trusted_nets:build", "kwargs": {**MLP, "hidden": [7]}})
        )
    report = graftnet.export(path, tmp_path / "student.safetensors", spec=tmp_path / "spec.json")
    assert report.argmax_agreement == 1.0 and verify_student(tmp_path / "student.safetensors")[0]
    sys.modules.pop("trusted_nets", None)


def test_registered_sources_load_and_file_reading_kwargs_do_not(tmp_path: Path) -> None:
    path = _saved_run(tmp_path / "checkpoint.safetensors")
    assert isinstance(load_checkpoint(path), graftnet.GraftedModel)  # graftnet:mlp needs no spec
    tensors, meta = read_checkpoint(path)
    MODEL_SOURCES.add("trust_test", lambda name, kwargs: graftnet.build_model("graftnet:mlp", kwargs), overwrite=True)
    mine = _write(tmp_path / "mine.safetensors", tensors, _plant(meta, "student", "trust_test:mlp", MLP), seal=True)
    assert isinstance(load_checkpoint(mine), graftnet.GraftedModel)  # a source registered in Python is trusted
    timm_file = {"num_classes": 3, "checkpoint_path": str(tmp_path / "evil.pth")}
    evil = _write(
        tmp_path / "evil.safetensors", tensors, _plant(meta, "student", "timm:resnet18", timm_file), seal=True
    )
    with pytest.raises(CheckpointError, match=r"spec\.student\.kwargs\.checkpoint_path"):
        load_checkpoint(evil)


# --- integrity ------------------------------------------------------------------------------------------------


def _data_offsets(path: Path) -> dict[str, tuple[int, int]]:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    return {k: (8 + n + v["data_offsets"][0], 8 + n + v["data_offsets"][1]) for k, v in header.items()
            if k != "__metadata__"}  # fmt: skip


def test_a_flipped_byte_in_any_tensor_is_named(tmp_path: Path) -> None:
    path = _saved_run(tmp_path / "checkpoint.safetensors")
    good = path.read_bytes()
    for name, (begin, end) in _data_offsets(path).items():
        if begin == end:
            continue
        data = bytearray(good)
        data[(begin + end) // 2] ^= 0x01
        path.write_bytes(bytes(data))
        for reader in (read_checkpoint, load_run, load_checkpoint):
            with pytest.raises(CheckpointError, match=f"tensor '{name}'"):
                reader(path)
    path.write_bytes(good)
    assert read_checkpoint(path)


def test_flipped_header_bytes_are_caught(tmp_path: Path) -> None:
    path = _saved_run(tmp_path / "checkpoint.safetensors")
    good = path.read_bytes()
    n = int.from_bytes(good[:8], "little")
    for offset in range(8, 8 + n, max(1, n // 97)):  # ~100 spots across the header (metadata included)
        data = bytearray(good)
        data[offset] ^= 0x04
        path.write_bytes(bytes(data))
        with pytest.raises(CheckpointError):
            load_run(path)


def test_missing_extra_retyped_and_reshaped_tensors_are_named(tmp_path: Path) -> None:
    path = _saved_run(tmp_path / "checkpoint.safetensors")
    tensors, meta = read_checkpoint(path)
    name = "student.head.weight"
    cases: dict[str, tuple[dict[str, torch.Tensor], str]] = {
        "missing": ({k: v for k, v in tensors.items() if k != name}, rf"missing \(1\): {name}"),
        "extra": ({**tensors, "student.extra": torch.zeros(2)}, r"unrecorded \(1\): student.extra"),
        "dtype": ({**tensors, name: tensors[name].double()}, f"tensor '{name}' has dtype float64"),
        "shape": ({**tensors, name: tensors[name].reshape(-1)}, f"tensor '{name}' has shape"),
    }
    for label, (changed, message) in cases.items():
        bad = _write(tmp_path / f"{label}.safetensors", changed, meta, seal=False)
        for reader in (read_checkpoint, load_run, load_checkpoint):
            with pytest.raises(CheckpointError, match=message):
                reader(bad)


@pytest.mark.parametrize("name", ["student.head.weight", "mixing.body_2.logits", "train_state.optim.0.exp_avg_sq"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_tensors_are_refused_even_with_valid_hashes(tmp_path: Path, name: str, value: float) -> None:
    path = _saved_run(tmp_path / "checkpoint.safetensors")
    tensors, meta = read_checkpoint(path)
    broken = {**tensors, name: tensors[name].clone().reshape(-1).index_fill(0, torch.tensor([0]), value)
              .reshape(tensors[name].shape)}  # fmt: skip
    bad = _write(tmp_path / "bad.safetensors", broken, meta, seal=True)
    for reader in (read_checkpoint, load_run, load_checkpoint):
        with pytest.raises(CheckpointError, match=f"tensor '{name}' has 1 of .* NaN or infinite"):
            reader(bad)


def test_an_edited_metadata_entry_is_named(tmp_path: Path) -> None:
    path = _saved_run(tmp_path / "checkpoint.safetensors")
    tensors, meta = read_checkpoint(path)
    edited = {**meta, "train_state": {**meta["train_state"], "epoch": 0}}
    with pytest.raises(CheckpointError, match=r"graftnet\.train_state does not match the sha256"):
        load_run(_write(tmp_path / "a.safetensors", tensors, edited, seal=False))
    with pytest.raises(CheckpointError, match=r"graftnet\.spec does not match"):
        read_checkpoint(_write(tmp_path / "b.safetensors", tensors, dict(meta, spec={**meta["spec"], "adapter": "x"}),
                               seal=False))  # fmt: skip
    with pytest.raises(CheckpointError, match=r"unrecorded \(1\): added"):
        read_checkpoint(_write(tmp_path / "c.safetensors", tensors, dict(meta, added=1), seal=False))


def test_files_from_before_integrity_hashes_need_allow_unverified(tmp_path: Path) -> None:
    path = _saved_run(tmp_path / "checkpoint.safetensors")
    tensors, meta = read_checkpoint(path)
    old = {k: v for k, v in meta.items() if k != "integrity"} | {"format": "graftnet-checkpoint/1"}
    old_path = _write(tmp_path / "old.safetensors", tensors, old, seal=False)
    for reader in (read_checkpoint, load_run, load_checkpoint):
        with pytest.raises(CheckpointError, match="predates integrity hashes.*allow_unverified=True"):
            reader(old_path)
    assert load_run(old_path, allow_unverified=True).meta["epoch"] == 1
    assert isinstance(load_checkpoint(old_path, allow_unverified=True), graftnet.GraftedModel)
    nan = {**tensors, "student.head.bias": torch.full_like(tensors["student.head.bias"], float("nan"))}
    with pytest.raises(CheckpointError, match="NaN"):  # unverified still means checked for finite values
        read_checkpoint(_write(tmp_path / "old_nan.safetensors", nan, old, seal=False), allow_unverified=True)
    # A current-format file without its record is damaged, not old: allow_unverified does not cover it.
    bare = _write(tmp_path / "bare.safetensors", tensors, {k: v for k, v in meta.items() if k != "integrity"},
                  seal=False)  # fmt: skip
    with pytest.raises(CheckpointError, match="no integrity record"):
        read_checkpoint(bare, allow_unverified=True)
    student = {k.removeprefix("student."): v for k, v in tensors.items() if k.startswith("student.")}
    save_file(student, str(tmp_path / "old_student.safetensors"), metadata={"format": "graftnet-student/1"})
    with pytest.raises(CheckpointError, match="predates integrity hashes"):
        verify_student(tmp_path / "old_student.safetensors")
    assert set(verify_student(tmp_path / "old_student.safetensors", allow_unverified=True)[0]) == set(student)


def _without(d: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k != key}


def _structure_cases(meta: dict[str, Any]) -> list[tuple[Any, str, str]]:
    """(metadata, message, readers): "a" all three readers, "c" load_checkpoint, "r" load_run."""
    ts = meta["train_state"]
    return [
        ([1, 2], "must be a JSON object, but it is a JSON array", "a"),
        ("spec", "must be a JSON object, but it is a JSON string", "a"),
        (3, "must be a JSON object, but it is a JSON number", "a"),
        (_without(meta, "spec"), r"graftnet\.spec must be the spec object, but it is missing", "a"),
        (dict(meta, spec=[]), r"graftnet\.spec must be the spec object, but it is a JSON array", "a"),
        (dict(meta, format="graftnet-checkpoint/9"), "expected 'graftnet-checkpoint/2'", "a"),
        (dict(meta, spec={"sites": 3}), r"graftnet\.spec is not a valid spec", "c"),
        (_without(meta, "train_state"), r"graftnet\.train_state is missing", "r"),
        (dict(meta, train_state=[]), r"graftnet\.train_state must be an object", "r"),
        (dict(meta, train_state=_without(ts, "epoch")), r"train_state\.epoch", "r"),
        (dict(meta, train_state=_without(ts, "step")), r"train_state\.step must be a count", "r"),
        (dict(meta, train_state=dict(ts, step="3")), r"train_state\.step must be a count", "r"),
        (dict(meta, train_state=dict(ts, epoch=True)), r"train_state\.epoch must be a count", "r"),
        (dict(meta, train_state=_without(ts, "sums")), r"train_state\.sums", "r"),
        (dict(meta, train_state=dict(ts, rng_python=[3, [1], None])), r"train_state\.rng_python", "r"),
        (dict(meta, train_state=dict(ts, optimizer_groups={})), r"train_state\.optimizer_groups", "r"),
    ]


def test_malformed_metadata_is_named_not_a_python_error(tmp_path: Path) -> None:
    path = _saved_run(tmp_path / "checkpoint.safetensors")
    tensors, meta = read_checkpoint(path)
    readers: dict[str, list[Callable[[Path], Any]]] = {
        "a": [read_checkpoint, load_checkpoint, load_run],
        "c": [load_checkpoint],
        "r": [load_run],
    }
    for bad_meta, message, which in _structure_cases(meta):
        bad = _write(tmp_path / "bad.safetensors", tensors, bad_meta, seal=True)
        for reader in readers[which]:
            with pytest.raises(CheckpointError, match=message):
                reader(bad)
    save_file(tensors, str(tmp_path / "text.safetensors"), metadata={"graftnet": "{not json"})
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_checkpoint(tmp_path / "text.safetensors")
    no_rng = {k: v for k, v in tensors.items() if k != "train_state.rng.torch"}
    with pytest.raises(CheckpointError, match=r"tensor 'train_state\.rng\.torch'.* missing"):
        load_run(_write(tmp_path / "norng.safetensors", no_rng, meta, seal=True))


def test_a_resumed_state_restores_and_a_foreign_one_is_refused(tmp_path: Path) -> None:
    saved = load_run(_saved_run(tmp_path / "checkpoint.safetensors"))
    g = _grafted()
    restore(saved, g, _optimizer(g), _Objective())
    other = graftnet.graft(None, None, dict(SPEC, sites=[]))
    with pytest.raises(CheckpointError, match="does not fit this run's model"):
        restore(saved, other, _optimizer(other), _Objective())
    sgd = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    with pytest.raises(CheckpointError, match="trainer state in checkpoint .* does not fit this run"):
        restore(saved, _grafted(), sgd, _Objective())


def test_saving_a_non_finite_model_keeps_the_good_checkpoint(tmp_path: Path) -> None:
    path = _saved_run(tmp_path / "checkpoint.safetensors")
    before = path.read_bytes()
    g = _grafted()
    with torch.no_grad():
        g.student.head.bias[0] = float("nan")
    with pytest.raises(CheckpointError, match="student.head.bias' has 1 of 3 values that are NaN"):
        save_checkpoint(g, path)
    assert path.read_bytes() == before and not _leftovers(tmp_path)


# --- export never replaces a good file by a worse one ---------------------------------------------------------


def _independent_grafted() -> graftnet.GraftedModel:
    g = _grafted()
    with torch.no_grad():
        g.mixers["body.2"].logits.copy_(torch.tensor([30.0, 0.0]))
    return g


def test_a_nan_student_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    g = _independent_grafted()
    out = tmp_path / "student.safetensors"
    out.write_bytes(b"the good old student")
    with torch.no_grad():
        g.student.body[1].weight[0, 0] = float("nan")
    with pytest.raises(CheckpointError) as info:
        graftnet.export(g, out, overwrite=True)
    assert "'body.1.weight' has 1 of 30 values that are NaN" in str(info.value)
    assert "does not hold the student's state" not in str(info.value)
    assert out.read_bytes() == b"the good old student" and not _leftovers(tmp_path)


def test_an_export_that_does_not_verify_leaves_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import safetensors.torch

    real = safetensors.torch.save_file
    out = tmp_path / "student.safetensors"
    out.write_bytes(b"the good old student")

    def damaging(tensors: dict[str, torch.Tensor], filename: str, metadata: dict[str, str]) -> None:
        real(tensors, filename, metadata=metadata)
        data = bytearray(Path(filename).read_bytes())
        data[-3] ^= 0xFF  # inside the last tensor's bytes
        Path(filename).write_bytes(bytes(data))

    monkeypatch.setattr(safetensors.torch, "save_file", damaging)
    with pytest.raises(CheckpointError, match="do not match the sha256"):
        graftnet.export(_independent_grafted(), out, overwrite=True)
    assert out.read_bytes() == b"the good old student" and not _leftovers(tmp_path)
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    graftnet.export(_independent_grafted(), out, overwrite=True)
    tensors, metadata = verify_student(out)
    assert metadata["format"] == "graftnet-student/2" and set(tensors) == set(_grafted().student.state_dict())


def test_a_damaged_student_file_is_named(tmp_path: Path) -> None:
    out = tmp_path / "student.safetensors"
    graftnet.export(_independent_grafted(), out)
    good = out.read_bytes()
    for name, (begin, _) in _data_offsets(out).items():
        data = bytearray(good)
        data[begin] ^= 0x10
        out.write_bytes(bytes(data))
        with pytest.raises(CheckpointError, match=f"tensor '{name}'"):
            verify_student(out)


@pytest.mark.parametrize(
    "error",
    [SafetensorError("Error while serializing: IoError(No space left on device)"),
     OSError(errno.ENOSPC, "No space left on device")],
    ids=["SafetensorError", "ENOSPC"],
)  # fmt: skip
def test_a_full_disk_is_a_checkpoint_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: Exception) -> None:
    import safetensors.torch

    path = _saved_run(tmp_path / "checkpoint.safetensors")
    before = path.read_bytes()
    out = tmp_path / "student.safetensors"
    out.write_bytes(b"old")

    def full(tensors: dict[str, torch.Tensor], filename: str, metadata: dict[str, str]) -> None:
        Path(filename).write_bytes(b"half")
        raise error

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    for attempt, target in ((lambda: save_checkpoint(_grafted(), path), path),
                            (lambda: graftnet.export(_independent_grafted(), out, overwrite=True), out)):  # fmt: skip
        with pytest.raises(CheckpointError, match="disk") as info:
            attempt()
        assert str(target) in str(info.value)
    assert path.read_bytes() == before and out.read_bytes() == b"old" and not _leftovers(tmp_path)


def test_export_to_a_folder_under_a_file_or_unwritable_place(tmp_path: Path) -> None:
    g = _independent_grafted()
    (tmp_path / "folder").mkdir()
    with pytest.raises(CheckpointError, match="is a folder; give the path of a file"):
        graftnet.export(g, tmp_path / "folder", overwrite=True)
    (tmp_path / "file").write_text("x")
    for out in (tmp_path / "file" / "student.safetensors", tmp_path / "file" / "deeper" / "student.safetensors"):
        with pytest.raises(CheckpointError, match="is a file, not a folder"):
            graftnet.export(g, out)
        with pytest.raises(CheckpointError, match="a file stands where a folder"):
            ckpt.atomic_write(out, lambda tmp: tmp.write_bytes(b"x"))
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        try:
            graftnet.export(g, locked / "student.safetensors")
        except CheckpointError as e:
            assert "permission" in str(e) and str(locked) in str(e)
        else:
            assert os.geteuid() == 0  # root writes anywhere: only the pre-check by os.access applies to others
            pytest.skip("running as root, which may write in a read-only folder")
    finally:
        locked.chmod(0o700)


def test_a_read_only_run_folder_and_an_unreadable_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _saved_run(tmp_path / "checkpoint.safetensors")
    real_open = os.open

    def refusing(file: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        name = os.fsdecode(file)
        if Path(name).parent == tmp_path and (flags & os.O_CREAT or name == str(path)):
            raise PermissionError(errno.EACCES, "Permission denied", name)
        return real_open(file, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", refusing)
    with pytest.raises(CheckpointError, match="no permission to write in"):
        save_checkpoint(_grafted(), path)
    with pytest.raises(CheckpointError, match="permission denied") as info:
        read_checkpoint(path)
    assert "No such file" not in str(info.value) and "no checkpoint" not in str(info.value)
    monkeypatch.setattr(os, "open", real_open)
    if os.geteuid() != 0:  # the real thing, where the user is not root
        path.chmod(0)
        try:
            with pytest.raises(CheckpointError, match="permission denied"):
                read_checkpoint(path)
        finally:
            path.chmod(0o600)


# --- the file system: temporaries, permissions, concurrent readers --------------------------------------------


def test_remove_stale_temporaries_removes_only_graftnets_own(tmp_path: Path) -> None:
    ours = [
        ".checkpoint.safetensors.abc123_x.tmp",
        ".student.safetensors.x1y2.tmp",
        ".gen1.safetensors.0f0f0f0f.tmp",
        ".tmpVhW4vV",
    ]
    theirs = [".metrics.csv.abc.tmp", ".plot.png.abcd.tmp", "checkpoint.safetensors", ".checkpoint.safetensors.tmp",
              "notes.safetensors.ab.tmp", ".checkpoint.safetensors.a.b.tmp", ".tmp12", ".tmpabcdefg"]  # fmt: skip
    for name in ours + theirs:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / ".folder.safetensors.ab.tmp").mkdir()
    removed = remove_stale_temporaries(tmp_path)
    assert removed == sorted(tmp_path / n for n in ours)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*theirs, ".folder.safetensors.ab.tmp"])
    assert remove_stale_temporaries(tmp_path / "absent") == []


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_written_files_follow_the_umask(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        path = save_checkpoint(_grafted(), tmp_path / "checkpoint.safetensors")
        graftnet.export(_independent_grafted(), tmp_path / "student.safetensors")
    finally:
        os.umask(old)
    for p in (path, tmp_path / "student.safetensors"):
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask, oct(p.stat().st_mode)


def test_reading_while_a_save_renames_over_the_file_never_fails(tmp_path: Path) -> None:
    path = _saved_run(tmp_path / "checkpoint.safetensors")
    g = _grafted()
    opt = _optimizer(g)
    stop = threading.Event()
    saves: list[int] = []
    errors: list[BaseException] = []

    def saver() -> None:
        try:
            while not stop.is_set():
                with torch.no_grad():
                    g.student.head.bias.add_(0.001)
                save_run(g, path, opt, _Objective(), dict(TRAIN_STATE, step=len(saves)))
                saves.append(1)
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    thread = threading.Thread(target=saver)
    thread.start()
    failures = []
    try:
        for _ in range(200):
            try:
                load_run(path)
            except GraftError as e:
                failures.append(e)
    finally:
        stop.set()
        thread.join()
    assert not errors and not failures, (errors, failures[:3])
    assert len(saves) > 5  # the reads did overlap with saves
    assert not _leftovers(tmp_path)


def test_a_read_that_fails_while_the_file_changes_is_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import safetensors

    path = _saved_run(tmp_path / "checkpoint.safetensors")
    real = safetensors.safe_open
    calls: list[str] = []

    def replaced_then_torn(filename: str, framework: str) -> Any:
        calls.append(filename)
        if len(calls) == 1:  # as if the file were rewritten mid-read: a new inode, and a failed parse
            _saved_run(path)
            raise OSError("incomplete metadata, file not fully covered")
        return real(filename, framework=framework)

    monkeypatch.setattr(safetensors, "safe_open", replaced_then_torn)
    assert load_run(path).meta["step"] == 3 and len(calls) == 2
    calls.clear()
    path.write_bytes(b"\x08" + b"\x00" * 15)  # a file that does not change: no retry, the error is final

    def failing(filename: str, framework: str) -> Any:
        calls.append(filename)
        return real(filename, framework=framework)

    monkeypatch.setattr(safetensors, "safe_open", failing)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        read_checkpoint(path)
    assert len(calls) == 1


# --- fuzzing: whatever a file holds, only GraftErrors come out -------------------------------------------------


def _json(integers: st.SearchStrategy[int]) -> st.SearchStrategy[Any]:
    return st.recursive(
        st.none() | st.booleans() | integers | st.floats(allow_nan=False) | st.text(max_size=8),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
        max_leaves=12,
    )


_JSON = _json(st.integers(-(2**70), 2**70))
# Where a value can reach a constructor or a tensor size (the spec), sizes stay small: a 2**30-wide layer is a
# memory test, not a parsing one.
_SMALL_JSON = _json(st.integers(-3, 64))
_KEYS = ["format", "spec", "train_state", "p_w", "graftnet_version", "student_class"]
_TS_KEYS = [*TRAIN_STATE, "optimizer_groups", "optimizer_scalars", "rng_python", "rng_numpy"]
_SPEC_KEYS = ["student", "teachers", "input_shape", "sites", "adapter", "mixing", "train"]


@st.composite
def _mutated_meta(draw: st.DrawFn, meta: dict[str, Any]) -> tuple[str, Any]:
    kind = draw(st.sampled_from(["whole", "drop", "replace", "add", "ts_drop", "ts_replace", "spec", "kwargs"]))
    m = json.loads(json.dumps(meta))
    if kind == "whole":
        return kind, draw(_JSON)
    if kind == "drop":
        m.pop(draw(st.sampled_from(_KEYS)), None)
    elif kind == "replace":
        m[draw(st.sampled_from(_KEYS))] = draw(_JSON)
    elif kind == "add":
        m[draw(st.text(min_size=1, max_size=8))] = draw(_JSON)
    elif kind == "ts_drop":
        m["train_state"].pop(draw(st.sampled_from(_TS_KEYS)), None)
    elif kind == "ts_replace":
        m["train_state"][draw(st.sampled_from(_TS_KEYS))] = draw(_JSON)
    elif kind == "spec":
        m["spec"][draw(st.sampled_from(_SPEC_KEYS))] = draw(_SMALL_JSON)
    else:  # the constructor's kwargs: what a registered factory will be called with
        m["spec"]["student"]["kwargs"] = draw(
            st.dictionaries(st.sampled_from([*MLP, "bogus"]), _SMALL_JSON, max_size=3)
        )
    return kind, m


@st.composite
def _mutated_tensors(draw: st.DrawFn, tensors: dict[str, torch.Tensor]) -> tuple[str, dict[str, torch.Tensor]]:
    kind = draw(st.sampled_from(["same", "drop", "add", "dtype", "shape", "nan"]))
    t = dict(tensors)
    name = draw(st.sampled_from(sorted(t)))
    if kind == "drop":
        del t[name]
    elif kind == "add":
        t[draw(st.sampled_from(["student.x", "train_state.optim.x.y", "train_state.rng.cuda.0", "mixing.q"]))] = (
            torch.zeros(draw(st.integers(0, 3)))
        )
    elif kind == "dtype":
        t[name] = t[name].to(draw(st.sampled_from([torch.float16, torch.float64, torch.int32, torch.uint8])))
    elif kind == "shape":
        t[name] = torch.zeros(draw(st.lists(st.integers(0, 3), max_size=3)))
    elif kind == "nan" and t[name].is_floating_point() and t[name].numel():
        t[name] = torch.full_like(t[name], draw(st.sampled_from([float("nan"), float("inf")])))
    return kind, t


@pytest.fixture(scope="module")
def base_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, torch.Tensor], dict[str, Any], Path]:
    folder = tmp_path_factory.mktemp("fuzz")
    tensors, meta = read_checkpoint(_saved_run(folder / "base.safetensors"))
    return tensors, meta, folder


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])  # fmt: skip
@given(data=st.data())
def test_fuzzed_checkpoints_raise_only_graft_errors(
    base_run: tuple[dict[str, torch.Tensor], dict[str, Any], Path], data: st.DataObject
) -> None:
    tensors, meta, folder = base_run
    meta_kind, bad_meta = data.draw(_mutated_meta(meta), label="metadata")
    tensor_kind, bad_tensors = data.draw(_mutated_tensors(tensors), label="tensors")
    seal = data.draw(st.sampled_from(["resealed", "stale", "old-format", "raw"]), label="seal")
    path = folder / "fuzzed.safetensors"
    contiguous = {k: v.contiguous() for k, v in bad_tensors.items()}
    if seal == "raw":  # not even JSON
        save_file(contiguous, str(path), metadata={"graftnet": data.draw(st.text(max_size=20))})
    else:
        if seal == "old-format" and isinstance(bad_meta, dict):
            bad_meta = {k: v for k, v in bad_meta.items() if k != "integrity"} | {"format": "graftnet-checkpoint/1"}
        _write(path, contiguous, bad_meta, seal=seal == "resealed")
    event(f"mutation: {meta_kind} metadata, {tensor_kind} tensors, {seal}")
    for name, reader in (("read_checkpoint", read_checkpoint), ("load_checkpoint", load_checkpoint),
                         ("load_run", load_run)):  # fmt: skip
        try:
            result = reader(path, allow_unverified=seal == "old-format")
        except GraftError as e:
            event(f"{name}: {type(e).__name__}: {_error_kind(str(e))}")
            continue
        event(f"{name}: loaded")
        if name == "load_run":  # and what loads must restore or refuse cleanly too
            g = _grafted()
            try:
                restore(result, g, _optimizer(g), _Objective())
                event("restore: restored")
            except GraftError as e:
                event(f"restore: {type(e).__name__}")


def _error_kind(message: str) -> str:
    for needle in ("predates", "not valid JSON", "must be a JSON object", "no integrity record", "integrity record",
                   "sha256", "NaN or infinite", "has format", "train_state", "not a valid spec", "spec object",
                   "refused", "does not fit", "cannot rebuild", "not a readable", "dtype", "shape"):  # fmt: skip
        if needle in message:
            return needle
    return message[:60]
