"""Detach, checkpoints and export: a clean, teacher-free student."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import graftnet
from graftnet.checkpoint import atomic_write, read_checkpoint

SPEC = {
    "student": {"model": "timm:resnet18", "kwargs": {"num_classes": 10}},
    "teachers": {"t": {"model": "graftnet:mlp", "kwargs": {"in_features": 3072, "hidden": [64], "num_classes": 5}}},
    "input_shape": [3, 32, 32],
    "sites": [{"student": "layer1.0.act1", "taps": ["t:body.2"]}, {"student": "layer4", "taps": ["t:body.2"]}],
    "adapter": "linear",
}


def _independent(g: graftnet.GraftedModel, logit: float = 30.0) -> None:
    for mixer in g.mixers.values():
        with torch.no_grad():
            mixer.logits.copy_(torch.tensor([logit] + [0.0] * len(mixer.taps)))


@pytest.fixture
def grafted() -> graftnet.GraftedModel:
    torch.manual_seed(0)
    return graftnet.graft(None, None, SPEC)


def test_detach_refuses_while_teachers_are_used_and_lists_each_site(grafted: graftnet.GraftedModel) -> None:
    with pytest.raises(graftnet.DetachError) as info:
        graftnet.detach(grafted, tol=1e-3)
    message = str(info.value)
    assert "2 of 2 sites" in message and "layer1.0.act1: p_w(student) = 0.500000" in message
    assert "layer4.1.act2" in message and "force=True" in message
    forced = graftnet.detach(grafted, force=True)
    assert type(forced) is type(grafted.student)


def test_tolerance_is_respected(grafted: graftnet.GraftedModel) -> None:
    _independent(grafted, logit=5.0)  # p0 = e^5 / (e^5 + 1) ≈ 0.9933
    with pytest.raises(graftnet.DetachError):
        graftnet.detach(grafted, tol=1e-3)
    assert graftnet.detach(grafted, tol=1e-2) is not None


def test_detached_student_is_the_plain_class_with_the_trained_weights(grafted: graftnet.GraftedModel) -> None:
    grafted.train()
    opt = torch.optim.SGD([p for p in grafted.parameters() if p.requires_grad], lr=0.1)
    x = torch.randn(4, 3, 32, 32)
    grafted(x).sum().backward()
    opt.step()
    _independent(grafted)
    student = graftnet.detach(grafted)
    assert type(student).__name__ == "ResNet"
    assert not any(isinstance(m, (graftnet.Mixer, graftnet.FrozenTeacher)) for m in student.modules())
    fresh = timm.create_model("resnet18", num_classes=10)
    assert list(student.state_dict()) == list(fresh.state_dict())
    fresh.load_state_dict(student.state_dict(), strict=True)
    for key, value in grafted.student.state_dict().items():
        assert torch.equal(student.state_dict()[key], value)
    grafted.eval()
    student.eval()
    _exactly_independent(grafted)
    assert torch.equal(grafted(x), student(x))
    assert graftnet.is_isomorphic(student, fresh)


def _exactly_independent(g: graftnet.GraftedModel) -> None:
    for mixer in g.mixers.values():
        with torch.no_grad():
            mixer.logits.copy_(torch.tensor([0.0] + [-float("inf")] * len(mixer.taps)))


def test_isomorphism_detects_a_difference() -> None:
    a = timm.create_model("resnet18", num_classes=10)
    assert graftnet.is_isomorphic(a, timm.create_model("resnet18", num_classes=10))
    assert not graftnet.is_isomorphic(a, timm.create_model("resnet18", num_classes=11))
    assert not graftnet.is_isomorphic(a, timm.create_model("resnet34", num_classes=10))


def test_checkpoint_round_trip_and_export(tmp_path: Path, grafted: graftnet.GraftedModel) -> None:
    _independent(grafted)
    graftnet.save_checkpoint(grafted, tmp_path / "checkpoint.safetensors")
    tensors, meta = read_checkpoint(tmp_path)
    assert not any(k.startswith("teachers.") for k in tensors)
    assert meta["spec"]["teachers"]["t"]["model"] == "graftnet:mlp" and meta["graftnet_version"]
    assert meta["p_w"]["layer1.0.act1"]["student"] > 0.999
    loaded = graftnet.load_checkpoint(tmp_path)
    for key, value in grafted.state_dict().items():
        if not key.startswith("teachers."):
            assert torch.equal(loaded.state_dict()[key], value), key

    report = graftnet.export(tmp_path, tmp_path / "student.safetensors")
    assert report.argmax_agreement == 1.0 and report.max_abs_diff < 1e-4
    fresh = timm.create_model("resnet18", num_classes=10)
    fresh.load_state_dict(load_file(str(tmp_path / "student.safetensors")), strict=True)
    for key, value in grafted.student.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    with safe_open(str(tmp_path / "student.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert json.loads(meta["student_model"])["model"] == "timm:resnet18"
    assert float(meta["probe_max_abs_diff"]) == report.max_abs_diff and len(meta["spec_sha256"]) == 64
    assert float(meta["probe_argmax_agreement"]) == 1.0


def test_export_refuses_dependent_students_and_existing_outputs(tmp_path: Path, grafted: graftnet.GraftedModel) -> None:
    graftnet.save_checkpoint(grafted, tmp_path / "checkpoint.safetensors")
    with pytest.raises(graftnet.DetachError):
        graftnet.export(tmp_path, tmp_path / "s.safetensors")
    assert not (tmp_path / "s.safetensors").exists()
    report = graftnet.export(tmp_path, tmp_path / "s.safetensors", force=True)
    assert report.forced and report.argmax_agreement <= 1.0
    before = (tmp_path / "s.safetensors").read_bytes()
    with pytest.raises(graftnet.CheckpointError, match="overwrite"):
        graftnet.export(tmp_path, tmp_path / "s.safetensors", force=True)
    assert (tmp_path / "s.safetensors").read_bytes() == before
    graftnet.export(tmp_path, tmp_path / "s.safetensors", force=True, overwrite=True)


def test_corrupt_truncated_foreign_and_missing_checkpoints(tmp_path: Path, grafted: graftnet.GraftedModel) -> None:
    path = tmp_path / "checkpoint.safetensors"
    graftnet.save_checkpoint(grafted, path)
    data = path.read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(graftnet.CheckpointError, match="truncated or corrupt"):
        graftnet.load_checkpoint(tmp_path / "truncated.safetensors")
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(graftnet.CheckpointError, match="not a readable safetensors"):
        graftnet.load_checkpoint(tmp_path / "garbage.safetensors")
    with pytest.raises(graftnet.CheckpointError, match="no checkpoint"):
        graftnet.load_checkpoint(tmp_path / "nowhere")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(graftnet.CheckpointError, match="not a graftnet checkpoint"):
        graftnet.load_checkpoint(tmp_path / "plain.safetensors")

    tensors, meta = read_checkpoint(path)
    dropped = dict(tensors)
    dropped.pop("student.fc.weight")
    save_file(dropped, str(tmp_path / "missing.safetensors"), metadata={"graftnet": json.dumps(meta)})
    with pytest.raises(graftnet.CheckpointError, match=r"missing \(1\): student.fc.weight"):
        graftnet.load_checkpoint(tmp_path / "missing.safetensors")

    other = dict(meta)
    other["spec"] = dict(meta["spec"], student={"model": "timm:resnet34", "kwargs": {"num_classes": 10}})
    save_file(tensors, str(tmp_path / "foreign.safetensors"), metadata={"graftnet": json.dumps(other)})
    with pytest.raises(graftnet.CheckpointError, match="another model"):
        graftnet.load_checkpoint(tmp_path / "foreign.safetensors")


def test_atomic_write_leaves_existing_file_intact_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")

    def fail(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, fail)
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["out.bin"]


def test_no_pickle_in_weights_code() -> None:
    root = Path(graftnet.__file__).parent
    for path in root.rglob("*.py"):
        if path.parent.name == "data":
            continue  # dataset readers: CIFAR's official files are pickled batches, read by torchvision
        text = path.read_text()
        assert "pickle" not in text.replace("never pickle", ""), path
        assert "torch.load(" not in text or "weights_only=True" in text, path
