"""Training: the objective's parts, the methods, repeatability, exact resume, signals, non-finite losses, export."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import graftnet
from graftnet.checkpoint import read_checkpoint
from graftnet.errors import DataError, ModelSourceError, SpecError, TrainingError
from graftnet.launch import train
from graftnet.losses import ParameterSnapshot, RngState, kd_loss, kl_to_old, lambda1_at
from graftnet.models import build_model
from graftnet.spec import TrainSpec, override_spec
from graftnet.training.evaluation import evaluate
from graftnet.training.objectives import METHODS, KnowledgeFlow

CNN = {"model": "graftnet:cnn1d", "kwargs": {"num_classes": 3, "channels": [8, 8]}}
DATA = {"dataset": "mnist1d", "kwargs": {"samples": 600}, "classes": [0, 1, 2], "train_size": 96, "val_size": 40,
        "batch_size": 32}  # fmt: skip


def _teacher_file(tmp_path: Path, seed: int = 1) -> str:
    torch.manual_seed(seed)
    path = tmp_path / f"teacher{seed}.safetensors"
    save_file({k: v.contiguous() for k, v in build_model(CNN["model"], CNN["kwargs"]).state_dict().items()}, path)
    return str(path)


def _spec(tmp_path: Path, method: str = "knowledge_flow", **train: Any) -> dict[str, Any]:
    weights = _teacher_file(tmp_path)
    spec: dict[str, Any] = {
        "student": copy.deepcopy(CNN),
        "teachers": {"t": {**copy.deepcopy(CNN), "weights": weights}},
        "data": copy.deepcopy(DATA),
        "train": {"method": method, "epochs": 3, "lr": 3e-3, "threads": 1, **train},
    }
    if method == "knowledge_flow":
        spec["sites"] = [{"student": s, "taps": [f"t:{s}"]} for s in ("features.act1", "features.act2")]
    if method in ("kd", "finetune"):
        spec["train"][method] = {"teacher": "t"}
    return spec


def _run(spec: dict[str, Any], run_dir: Path, **kwargs: Any) -> graftnet.RunResult:
    kwargs.setdefault("progress", False)
    kwargs.setdefault("tensorboard", False)
    return train(spec, run_dir, **kwargs)


# ---- the objective's parts ----------------------------------------------------------------------------------


def test_lambda1_ramps_from_zero() -> None:
    assert [lambda1_at(p, 10.0, 0.2, 0.6) for p in (0.0, 0.2, 0.4, 0.6, 1.0)] == pytest.approx([0, 0, 5, 10, 10])
    assert lambda1_at(0.4, 10.0, 0.2, 0.6, "cosine") == pytest.approx(5.0)
    assert lambda1_at(0.0, 2.0, 0.2, 0.6, "constant") == 2.0


def test_kd_loss_is_hintons() -> None:
    torch.manual_seed(0)
    s, t, y = torch.randn(5, 4), torch.randn(5, 4), torch.randint(0, 4, (5,))
    p_t = torch.softmax(t / 3.0, -1)
    soft = (p_t * (p_t.log() - torch.log_softmax(s / 3.0, -1))).sum(-1).mean()
    expected = 0.7 * 9.0 * soft + 0.3 * torch.nn.functional.cross_entropy(s, y)
    assert kd_loss(s, t, y, 3.0, 0.7) == pytest.approx(float(expected), rel=1e-5)


def test_kl_to_old_is_zero_at_equal_parameters_and_pulls_toward_old() -> None:
    logits = torch.randn(6, 5, requires_grad=True)
    same = kl_to_old(logits, logits.detach().clone())
    assert float(same.detach()) == pytest.approx(0.0, abs=1e-6)
    old = torch.randn(6, 5)
    kl = kl_to_old(logits, old)
    (grad,) = torch.autograd.grad(kl, logits)
    assert float(kl.detach()) > 0 and float(grad.abs().sum()) > 0


def test_snapshot_holds_the_parameters_before_the_last_step(tmp_path: Path) -> None:
    spec = graftnet.load_spec(_spec(tmp_path)).model_copy(update={"input_shape": [1, 40]})
    method = KnowledgeFlow.from_spec(spec, build_model(CNN["model"], CNN["kwargs"]), torch.randn(4, 1, 40))
    g = method.model
    assert method.snapshot is not None
    names = set(method.snapshot.tensors)
    assert any(n.startswith("mixing.") and n.endswith("logits") for n in names)  # w, Q and student all kept
    assert any(n.startswith("student.") for n in names)
    opt = torch.optim.SGD([p for p in g.parameters() if p.requires_grad], lr=0.1)
    x, y = torch.randn(8, 1, 40), torch.randint(0, 3, (8,))
    for _ in range(2):
        before = {n: p.detach().clone() for n, p in g.named_parameters() if p.requires_grad}
        loss = method.loss(x, y, 0.9)
        opt.zero_grad()
        loss.total.backward()
        method.step(opt)
        for n, t in method.snapshot.tensors.items():
            assert torch.equal(t, before[n]), n
    # after two real steps θ_old differs from θ, so the KL term is positive and has a gradient
    loss = method.loss(x, y, 0.9)
    assert float(loss.parts["kl_loss"].detach()) > 0


def test_teachers_run_once_per_batch_for_both_passes(tmp_path: Path) -> None:
    spec = graftnet.load_spec(_spec(tmp_path, lambda2=1.0)).model_copy(update={"input_shape": [1, 40]})
    method = KnowledgeFlow.from_spec(spec, build_model(CNN["model"], CNN["kwargs"]), torch.randn(4, 1, 40))
    g = method.model
    calls = []
    g.teachers["t"].body.register_forward_hook(lambda *a: calls.append(1))
    method.loss(torch.randn(8, 1, 40), torch.randint(0, 3, (8,)), 0.5)
    assert len(calls) == 1
    g(torch.randn(8, 1, 40))  # outside the loss, teachers run again: nothing stale is reused
    assert len(calls) == 2


def test_kl_pass_leaves_buffers_alone(tmp_path: Path) -> None:
    spec = graftnet.load_spec(_spec(tmp_path)).model_copy(update={"input_shape": [1, 40]})
    method = KnowledgeFlow.from_spec(spec, build_model(CNN["model"], CNN["kwargs"]), torch.randn(4, 1, 40))
    g = method.model
    x = torch.randn(8, 1, 40)
    g(x)  # one ordinary training pass
    buffers = {n: b.clone() for n, b in g.named_buffers()}
    assert method.snapshot is not None
    method.snapshot.outputs(g, x)
    for n, b in g.named_buffers():
        assert torch.equal(b, buffers[n]), n


def test_kl_pass_replays_the_dropout_masks() -> None:
    torch.manual_seed(0)
    small = {"in_features": 12, "hidden": [16], "num_classes": 3}
    student = build_model("graftnet:mlp", {**small, "dropout": 0.5})
    spec = {"input_shape": [12], "sites": [{"student": "body.2", "taps": ["t:body.2"]}]}
    g = graftnet.graft(student, {"t": build_model("graftnet:mlp", small)}, spec).train()
    x = torch.randn(8, 12)
    for _ in range(4):
        g(x)  # the tap scales finish calibrating
    snapshot = ParameterSnapshot(g)  # θ_old = θ: with the same masks the pass must reproduce the current one
    state = RngState.capture(x.device)
    out = g(x)
    after = torch.get_rng_state()
    assert torch.equal(snapshot.outputs(g, x, state), out)
    assert torch.equal(torch.get_rng_state(), after)  # and leave the generator where the step left it
    assert not torch.equal(snapshot.outputs(g, x), out)  # without the replay: other masks


class _BNDropoutNet(torch.nn.Module):
    """Conv → BatchNorm → ReLU → dropout → linear: every kind of state a θ_old pass must not disturb."""

    def __init__(self, width: int = 6) -> None:
        super().__init__()
        self.conv = torch.nn.Conv1d(1, width, 3, padding=1)
        self.bn = torch.nn.BatchNorm1d(width)
        self.act = torch.nn.ReLU()
        self.drop = torch.nn.Dropout(0.3)
        self.head = torch.nn.Linear(width * 10, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.act(self.bn(self.conv(x)))).flatten(1))


def _theta_old_by_functional_call(g: Any, tensors: dict[str, torch.Tensor], x: torch.Tensor,
                                  rng: RngState) -> torch.Tensor:  # fmt: skip
    """The θ_old pass as graftnet computed it before the shadow model: parameters swapped in by functional_call,
    buffers cloned. The reference the shadow must reproduce exactly."""
    from torch.func import functional_call

    state = {n: b.clone() for n, b in g.named_buffers() if not n.startswith("teachers.")}
    state.update(tensors)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        rng.restore(x.device)
        out = functional_call(g, state, (x,), strict=False)
    for mixer in g.mixers.values():
        mixer.refresh()
    return out  # type: ignore[no-any-return]


def test_the_shadow_theta_old_pass_equals_the_functional_call_one() -> None:
    torch.manual_seed(0)
    student, teacher = _BNDropoutNet(), _BNDropoutNet(8)
    spec = {"input_shape": [1, 10], "sites": [{"student": "act", "taps": ["t:act"]}],
            "train": {"lambda2": 1.0, "lr": 0.05}}  # fmt: skip
    g = graftnet.graft(student, {"t": teacher}, spec).train()
    method = KnowledgeFlow(g, spec["train"], total_steps=20)
    assert method.snapshot is not None
    opt = torch.optim.SGD(method.param_groups(), lr=0.05)
    for step in range(8):  # the first four steps calibrate the tap scale: the pass must calibrate like before
        x, y = torch.randn(16, 1, 10), torch.randint(0, 3, (16,))
        old = {n: t.clone() for n, t in method.snapshot.tensors.items()}
        with g.reusing_teacher_features():
            logits = method.forward(x)
            rng = method._rng
            assert rng is not None
            reference = _theta_old_by_functional_call(g, old, x, rng)
            buffers = {n: b.clone() for n, b in g.named_buffers()}
            shadow = method.snapshot.outputs(g, x, rng)
        assert torch.equal(shadow, reference), step
        for n, b in g.named_buffers():
            assert torch.equal(b, buffers[n]), (step, n)  # the model's BatchNorm statistics and scales untouched
        loss = torch.nn.functional.cross_entropy(logits, y) + kl_to_old(logits, shadow)
        opt.zero_grad()
        loss.backward()
        method.step(opt)
    assert not torch.equal(method.snapshot.tensors["student.conv.weight"], g.student.conv.weight)


def test_the_theta_old_pass_sees_every_write_to_the_model_s_buffers() -> None:
    """The shadow copies only the buffers written since its last copy (copying unchanged tap scales would make its
    mixers rebuild what they keep): a write in place, and a write to shared memory that bumps no version counter
    in this process (A3C's workers; simulated through numpy), must both reach the next θ_old pass."""
    torch.manual_seed(0)
    spec = {"input_shape": [1, 10], "sites": [{"student": "act", "taps": ["t:act"]}], "train": {"lambda2": 1.0}}
    g = graftnet.graft(_BNDropoutNet(), {"t": _BNDropoutNet(8)}, spec).eval()
    method = KnowledgeFlow(g, spec["train"], total_steps=20)
    assert method.snapshot is not None
    x = torch.randn(16, 1, 10)
    old = {n: t.clone() for n, t in method.snapshot.tensors.items()}

    def theta_old_pass() -> torch.Tensor:
        with g.reusing_teacher_features():
            method.forward(x)
            assert method._rng is not None
            shadow = method.snapshot.outputs(g, x, method._rng)  # type: ignore[union-attr]
            assert torch.equal(shadow, _theta_old_by_functional_call(g, old, x, method._rng))
            return shadow

    first = theta_old_pass()
    assert torch.equal(theta_old_pass(), first)  # nothing changed: nothing copied, the same result
    with torch.no_grad():
        g.student.bn.running_mean.add_(1.0)
    moved = theta_old_pass()
    assert not torch.equal(moved, first)
    g.share_memory()
    g.student.bn.running_var.numpy()[:] *= 4.0  # no version bump, as another process's write
    assert not torch.equal(theta_old_pass(), moved)


def test_learning_rates_are_separate(tmp_path: Path) -> None:
    spec = graftnet.load_spec(_spec(tmp_path, lr=1e-3, lr_mixing=5e-2, lr_adapters=2e-3, weight_decay=1e-4))
    spec = spec.model_copy(update={"input_shape": [1, 40]})
    method = METHODS.get("knowledge_flow").from_spec(
        spec, build_model(CNN["model"], CNN["kwargs"]), torch.randn(4, 1, 40), total_steps=100
    )
    g = method.model
    groups = {grp["name"]: grp for grp in method.param_groups()}
    assert groups["student"]["lr"] == 1e-3 and groups["mixing"]["lr"] == 5e-2
    assert groups["mixing"]["weight_decay"] == 0.0 and groups["student"]["weight_decay"] == 1e-4
    assert all(p.ndim == 1 for p in groups["mixing"]["params"])  # the logits w only
    assert not any(p is q for p in groups["student"]["params"] for q in g.teachers.parameters())



def _graft_onto_wider() -> graftnet.GraftedModel:
    """A cnn1d student grafted at both layers onto a wider one: mixing logits w and 8→16-channel 1×1 adapters Q."""
    student = build_model("graftnet:cnn1d", {"num_classes": 3, "channels": [8, 8]})
    wider = build_model("graftnet:cnn1d", {"num_classes": 3, "channels": [16, 16]})
    sites = [{"student": f"features.act{i}", "taps": [f"t:features.act{i}"]} for i in (1, 2)]
    return graftnet.graft(student, {"t": wider}, {"sites": sites}, example_input=torch.randn(2, 1, 40))


def _group_lrs(g: graftnet.GraftedModel, settings: TrainSpec | dict[str, Any], total_steps: int) -> dict[str, float]:
    groups = graftnet.KnowledgeFlow(g, settings, total_steps=total_steps).param_groups()
    return {group["name"]: group["lr"] for group in groups}


def test_the_adapters_learn_at_lr_under_adam_and_at_a_tenth_of_it_under_sgd() -> None:
    """Unset, lr_adapters follows the optimizer (TrainSpec.adapter_lr: the transfer study's choice); a value wins."""
    g = _graft_onto_wider()

    def lrs(**settings: object) -> dict[str, float]:
        return _group_lrs(g, {"lr": 0.1, **settings}, total_steps=10)

    assert lrs()["adapters"] == 0.1 and lrs(optimizer="adamw")["adapters"] == 0.1
    sgd = lrs(optimizer="sgd")
    assert sgd["adapters"] == pytest.approx(0.01) and sgd["student"] == 0.1  # the 8→16-channel 1×1 adapters Q
    assert lrs(optimizer="sgd", lr_adapters=0.05)["adapters"] == 0.05


def test_w_learns_at_a_multiple_of_lr_and_faster_only_without_a_floor() -> None:
    """Unset, lr_mixing is lr_mixing_factor × lr (10 under Adam, 0.1 under SGD); without the p_w floor w must also be
    able to move 20 units over the λ1 ramp."""
    g = _graft_onto_wider()

    def w_lr(**settings: object) -> float:
        return _group_lrs(g, {"lr": 1e-3, **settings}, total_steps=100)["mixing"]

    assert w_lr() == pytest.approx(0.01)  # the floor hands the sites back: 10 × lr, however short the run
    assert w_lr(lr_mixing_factor=3) == pytest.approx(0.003)
    assert w_lr(optimizer="sgd", lr=0.3) == pytest.approx(0.03)
    assert w_lr(optimizer="sgd", lr=0.3, lr_mixing_factor=10) == pytest.approx(3.0)
    assert w_lr(p_w_floor=None) == pytest.approx(20 / 50)  # the λ1 ramp, 10–60% of 100 steps
    assert w_lr(p_w_floor=None, lr=0.1) == pytest.approx(1.0)  # 10 × lr, above 20 / 50
    assert w_lr(lr_mixing=0.5) == 0.5
    assert _group_lrs(g, TrainSpec(lr_mixing=0.5), total_steps=100)["mixing"] == 0.5  # dumped and revalidated
    adam = graftnet.load_spec({"train": {"method": "scratch"}})  # unset in the spec: an override of the
    moved = override_spec(adam, {"train.optimizer": "sgd"})  # optimizer (a tune's grid) gets that optimizer's factor
    assert adam.train is not None and moved.train is not None
    assert (adam.train.mixing_lr_factor, moved.train.mixing_lr_factor) == (10.0, 0.1)
    with pytest.raises(SpecError, match="invalid train settings: w.s learning rate is set twice"):
        graftnet.KnowledgeFlow(g, {"lr_mixing": 0.5, "lr_mixing_factor": 3}, total_steps=100)

# ---- methods ------------------------------------------------------------------------------------------------


def test_finetune_starts_from_the_teacher(tmp_path: Path) -> None:
    spec = graftnet.load_spec(_spec(tmp_path, "finetune")).model_copy(update={"input_shape": [1, 40]})
    student = build_model(CNN["model"], CNN["kwargs"])
    METHODS.get("finetune").from_spec(spec, student, torch.randn(4, 1, 40))
    teacher = load_file(spec.teachers["t"].weights)
    assert all(torch.equal(student.state_dict()[k], v) for k, v in teacher.items())


def test_finetune_refuses_a_teacher_that_shares_nothing(tmp_path: Path) -> None:
    spec = _spec(tmp_path, "finetune")
    other = {"model": "graftnet:mlp", "kwargs": {"in_features": 40, "hidden": [7], "num_classes": 4}}
    spec["teachers"]["t"] = other
    with pytest.raises(TrainingError, match="no tensor of teacher 't' fits the student"):
        _run(spec, tmp_path / "run")


def test_kd_needs_the_targets_output_space(tmp_path: Path) -> None:
    spec = _spec(tmp_path, "kd")
    spec["teachers"]["t"] = {"model": "graftnet:cnn1d", "kwargs": {"num_classes": 7, "channels": [8, 8]}}
    with pytest.raises(TrainingError, match=r"outputs \(7,\) per sample but the student outputs \(3,\)"):
        _run(spec, tmp_path / "run")


@pytest.mark.parametrize("method", ["scratch", "finetune", "kd", "knowledge_flow"])
def test_every_method_trains_and_exports_a_plain_student(tmp_path: Path, method: str) -> None:
    result = _run(_spec(tmp_path, method), tmp_path / "run")
    assert result.epochs == 3 and result.test_error is not None and 0.0 <= result.test_error <= 100.0
    state = load_file(tmp_path / "run" / "student.safetensors")
    fresh = build_model(CNN["model"], CNN["kwargs"])
    fresh.load_state_dict(state, strict=True)  # the student's own keys, nothing of teachers or mixers
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["test_error"] == pytest.approx(result.test_error)
    # the reported error is the exported student's, evaluated alone
    splits = graftnet.data.make_splits(**{k: v for k, v in _data_args().items()})
    _, acc = evaluate(fresh, splits.test, 512, torch.device("cpu"))
    assert result.test_error == pytest.approx(100 * (1 - acc))
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert len(rows) == 4
    if method == "knowledge_flow":
        assert "p_w/features.act1/student" in rows[0] and result.min_p_w_student is not None


def _data_args() -> dict[str, Any]:
    return {"dataset": "mnist1d", "kwargs": DATA["kwargs"], "classes": DATA["classes"],
            "train_size": DATA["train_size"], "val_size": DATA["val_size"]}  # fmt: skip


def test_knowledge_flow_reaches_independence_and_cuts_teachers(tmp_path: Path) -> None:
    spec = _spec(tmp_path, epochs=10, lambda1={"final": 10.0, "start": 0.0, "end": 0.5},
                 cut_teachers_at=0.8)  # fmt: skip
    result = _run(spec, tmp_path / "run")
    header, *rows = [r.split(",") for r in (tmp_path / "run" / "metrics.csv").read_text().splitlines()]
    col = {name: i for i, name in enumerate(header)}
    p0 = [float(r[col["p_w/features.act2/student"]]) for r in rows]
    assert 0.5 < p0[0] < p0[1] < p0[4] and p0[7] > 0.999  # p_w(student) starts at 1/2 and rises as λ1 ramps up
    cut = [int(r[col["teachers_cut"]]) for r in rows]
    assert cut == [0] * 8 + [1] * 2  # cut at 80% of training
    assert result.min_p_w_student is not None and result.min_p_w_student > 0.999


def test_runs_are_repeatable(tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    _run(spec, tmp_path / "a")
    _run(spec, tmp_path / "b")
    a, b = load_file(tmp_path / "a" / "student.safetensors"), load_file(tmp_path / "b" / "student.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    spec["train"]["seed"] = 1
    _run(spec, tmp_path / "c")
    c = load_file(tmp_path / "c" / "student.safetensors")
    assert any(not torch.equal(a[k], c[k]) for k in a)


# ---- checkpoints, resume, signals, non-finite losses ---------------------------------------------------------


def _interrupt_at(step: int) -> Any:
    def on_step(s: int) -> None:
        if s == step:
            os.kill(os.getpid(), signal.SIGINT)

    return on_step


@pytest.mark.parametrize("stop_step", [4, 6], ids=["mid-epoch", "epoch-end"])
def test_resume_continues_exactly(tmp_path: Path, stop_step: int) -> None:
    # 96 samples / batch 32 = 3 steps per epoch; teachers cut at 70% (start of epoch 3); augmentation and KL on
    spec = _spec(tmp_path, epochs=3, lambda1={"start": 0.0, "end": 0.5})
    full = _run(spec, tmp_path / "full")
    stopped = _run(spec, tmp_path / "split", on_step=_interrupt_at(stop_step))
    assert stopped.interrupted == "SIGINT" and stopped.test_error is None
    meta = read_checkpoint(tmp_path / "split")[1]["train_state"]
    assert meta["step"] == stop_step and not (tmp_path / "split" / "student.safetensors").exists()
    resumed = _run(spec, tmp_path / "split", resume=True)
    a = load_file(tmp_path / "full" / "student.safetensors")
    b = load_file(tmp_path / "split" / "student.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.test_error == full.test_error
    full_rows = (tmp_path / "full" / "metrics.csv").read_text().splitlines()
    split_rows = (tmp_path / "split" / "metrics.csv").read_text().splitlines()
    at = full_rows[0].split(",").index("seconds")  # wall time differs between the runs; nothing else may

    def drop_seconds(row: str) -> list[str]:
        cells = row.split(",")
        return cells[:at] + cells[at + 1 :]

    assert [drop_seconds(r) for r in full_rows] == [drop_seconds(r) for r in split_rows]


def test_a_run_folder_is_not_clobbered(tmp_path: Path) -> None:
    spec = _spec(tmp_path, "scratch", epochs=1)
    _run(spec, tmp_path / "run")
    with pytest.raises(TrainingError, match="not empty; pass --resume .* or --overwrite"):
        _run(spec, tmp_path / "run")
    changed = copy.deepcopy(spec)
    changed["train"]["lr"] = 1e-2
    with pytest.raises(TrainingError, match=r"the spec differs .*: train\.lr \(0\.003 in the run, 0\.01 now\)"):
        _run(changed, tmp_path / "run", resume=True)
    with pytest.raises(TrainingError, match="nothing to resume"):
        _run(spec, tmp_path / "empty", resume=True)
    _run(spec, tmp_path / "run", overwrite=True)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    spec = _spec(tmp_path, "scratch", epochs=3)
    holder: dict[str, Any] = {}

    def poison(step: int) -> None:
        if step == 4:  # after the first epoch's checkpoint (3 steps per epoch)
            holder["before"] = load_file(tmp_path / "run" / "checkpoint.safetensors")
            model = holder["model"]
            with torch.no_grad():
                next(model.parameters()).fill_(float("nan"))

    original = METHODS.get("scratch")

    class Spy(original):  # type: ignore[misc,valid-type]
        @classmethod
        def from_spec(cls, spec: Any, student: torch.nn.Module, example: torch.Tensor, **kwargs: Any) -> Any:
            holder["model"] = student
            return super().from_spec(spec, student, example, **kwargs)

    METHODS.add("scratch", Spy, overwrite=True)
    try:
        with pytest.raises(TrainingError, match=r"not finite at epoch 2, step 5 .* last good checkpoint"):
            _run(spec, tmp_path / "run", on_step=poison)
    finally:
        METHODS.add("scratch", original, overwrite=True)
    after = load_file(tmp_path / "run" / "checkpoint.safetensors")
    assert all(torch.equal(after[k], v) for k, v in holder["before"].items())
    assert all(torch.isfinite(v).all() for k, v in after.items() if v.is_floating_point())
    assert read_checkpoint(tmp_path / "run")[1]["train_state"]["epoch"] == 1


# ---- bad input, before any training --------------------------------------------------------------------------


def test_missing_teacher_weights_fail_before_training(tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    spec["teachers"]["t"]["weights"] = str(tmp_path / "nope.safetensors")
    with pytest.raises(ModelSourceError, match="nope.safetensors.*does not exist"):
        _run(spec, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoint.safetensors").exists()


def test_method_needing_a_missing_teacher_is_a_spec_error(tmp_path: Path) -> None:
    spec = _spec(tmp_path, "kd")
    spec["train"]["kd"] = {"teacher": "c100"}
    with pytest.raises(SpecError, match=r"train.kd.teacher: 'c100' is not a teacher of this spec \(teachers: t\)"):
        _run(spec, tmp_path / "run")
    del spec["train"]["kd"]
    with pytest.raises(SpecError, match="method 'kd' needs a train.kd section"):
        _run(spec, tmp_path / "run")


def test_absent_dataset_root_fails_before_training(tmp_path: Path) -> None:
    spec = _spec(tmp_path, "scratch")
    spec["data"] = {"dataset": "cifar10", "kwargs": {"root": str(tmp_path / "nowhere"), "download": False}}
    with pytest.raises(DataError, match="nowhere.*download"):
        _run(spec, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_spec_errors_name_their_path(tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    spec["train"]["lambda1"] = {"final": -1}
    spec["data"]["val_size"] = 1.5
    with pytest.raises(SpecError) as err:
        _run(spec, tmp_path / "run")
    assert "train.lambda1.final" in str(err.value) and "data.val_size" in str(err.value)


def test_wrong_class_count_is_caught(tmp_path: Path) -> None:
    spec = _spec(tmp_path, "scratch")
    spec["student"] = {"model": "graftnet:cnn1d", "kwargs": {"num_classes": 10, "channels": [8, 8]}}
    with pytest.raises(TrainingError, match="outputs 10 classes but the task has 3"):
        _run(spec, tmp_path / "run")


# ---- the command line ----------------------------------------------------------------------------------------


def _write(tmp_path: Path, spec: dict[str, Any]) -> Path:
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    return path


def test_cli_train_then_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from graftnet.cli import main

    path = _write(tmp_path, _spec(tmp_path, epochs=2))
    assert main(["train", str(path), "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "student alone: validation error" in out and (tmp_path / "run" / "tb").is_dir()
    assert main(["plot", str(tmp_path / "run"), "--out", str(tmp_path / "plots")]) == 0
    assert (tmp_path / "plots" / "p_w.png").is_file() and (tmp_path / "plots" / "accuracy.png").is_file()


def test_cli_sigterm_saves_and_resume_finishes(tmp_path: Path) -> None:
    spec = _spec(tmp_path, "scratch", epochs=400)
    path = _write(tmp_path, spec)
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "graftnet", "train", str(path), "--out", str(run), "--no-progress", "--no-tensorboard"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (run / "checkpoint.safetensors").exists() and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "SIGTERM" in err and "--resume" in err
    epoch = read_checkpoint(run)[1]["train_state"]["epoch"]
    assert 1 <= epoch < 400
    spec["train"]["epochs"] = 400
    done = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (run / "student.safetensors").is_file()


def test_demo_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from graftnet.cli import main

    assert main(["demo", "--quick", "--out", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    for label in ("scratch", "fine-tune from related, new head", "KD from related", "knowledge flow (related + wide)",
                  "knowledge flow, untrained teachers (control)"):  # fmt: skip
        assert f"| {label}" in out
    assert (tmp_path / "demo" / "plots" / "p_w.png").is_file()
    assert (tmp_path / "demo" / "results.md").read_text().count("\n| ") == 7  # header, rule, 5 methods
