"""graftnet.fit and the public objectives: your modules, your Datasets or DataLoaders, your own loop."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from _tiny import CNN, SITES, pair_and_batch, take_steps
from _tiny import cnn as _cnn
from safetensors.torch import load_file
from torch.utils.data import DataLoader, TensorDataset

import graftnet
from graftnet import TrainingError
from graftnet.cli import main
from graftnet.training.evaluation import evaluate, logits_of


def _data(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 1, 40, generator=g), torch.randint(0, 3, (n,), generator=g))


def _spec(method: str = "knowledge_flow", **train: Any) -> dict[str, Any]:
    return {"sites": SITES, "train": {"method": method, "epochs": 3, "lr": 3e-3, **train}}


def test_fit_trains_your_modules_on_your_datasets_and_uses_val_and_test_as_given(tmp_path: Path) -> None:
    teacher = _cnn(1)
    val, test = _data(40, 2), _data(50, 3)
    result = graftnet.fit(_cnn(0), {"t": teacher}, _spec(), train=_data(96, 1), val=val, test=test,
                          run_dir=tmp_path / "run", progress=False, tensorboard=False)  # fmt: skip
    assert result.method == "knowledge_flow" and result.epochs == 3 and result.min_p_w_student is not None
    for name in ("spec.json", "run.json", "metrics.csv", "checkpoint.safetensors", "student.safetensors"):
        assert (tmp_path / "run" / name).is_file(), name
    student = _cnn(5)
    student.load_state_dict(load_file(tmp_path / "run" / "student.safetensors"), strict=True)
    _, val_acc = evaluate(student, val, 512, torch.device("cpu"))
    _, test_acc = evaluate(student, test, 512, torch.device("cpu"))
    assert result.val_error == pytest.approx(100 * (1 - val_acc))  # the given samples, not a redrawn split
    assert result.test_error == pytest.approx(100 * (1 - test_acc))
    assert json.loads((tmp_path / "run" / "results.json").read_text())["test_error"] == result.test_error
    assert all(not p.requires_grad for p in teacher.parameters())  # the user's teacher is frozen, in place


def test_fit_takes_dataloaders_and_no_test_split(tmp_path: Path) -> None:
    loader = DataLoader(_data(64, 1), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0))
    result = graftnet.fit(_cnn(0), {"t": _cnn(1)}, _spec(epochs=2), train=loader,
                          val=DataLoader(_data(30, 2), batch_size=7), run_dir=tmp_path / "run", progress=False,
                          tensorboard=False)  # fmt: skip
    assert result.test_error is None and result.val_error is not None
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[-1].split(",")[1] == "8"  # 2 epochs × len(loader) = 4 steps each
    assert "no test split" in "\n".join(result.summary())


def test_fit_resumes_bit_for_bit_after_a_signal(tmp_path: Path) -> None:
    def run(run_dir: Path, **kwargs: Any) -> graftnet.RunResult:
        return graftnet.fit(_cnn(0), {"t": _cnn(1)}, _spec(), train=_data(96, 1), val=_data(40, 2),
                            test=_data(40, 3), run_dir=run_dir, progress=False, tensorboard=False,
                            **kwargs)  # fmt: skip

    full = run(tmp_path / "full")

    def interrupt(step: int) -> None:
        if step == 5:  # mid-epoch (two batches of 64 per epoch)
            os.kill(os.getpid(), signal.SIGINT)

    stopped = run(tmp_path / "cut", on_step=interrupt)
    assert stopped.interrupted == "SIGINT"
    again = run(tmp_path / "cut", resume=True)
    assert again.test_error == full.test_error
    a, b = load_file(tmp_path / "full" / "student.safetensors"), load_file(tmp_path / "cut" / "student.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_registered_method_works_from_a_spec(tmp_path: Path) -> None:
    calls = []

    @graftnet.register_method("smoothed")
    class Smoothed(graftnet.Objective):
        def loss(self, x: torch.Tensor, y: torch.Tensor, progress: float | None = None) -> graftnet.StepLoss:
            calls.append(len(y))
            logits = logits_of(self.forward(x))
            task = F.cross_entropy(logits, y, label_smoothing=0.1)
            return graftnet.StepLoss(task, {"task_loss": task}, logits)

    spec = graftnet.load_spec({"train": {"method": "smoothed", "epochs": 1}})
    assert spec.train is not None and spec.train.method == "smoothed"
    result = graftnet.fit(_cnn(0), None, spec, train=_data(64, 1), val=_data(20, 2), run_dir=tmp_path / "run",
                          progress=False, tensorboard=False)  # fmt: skip
    assert result.method == "smoothed" and calls == [64]
    with pytest.raises(graftnet.SpecError, match="unknown training method 'smoothd'.*smoothed"):
        graftnet.load_spec({"train": {"method": "smoothd"}})


def test_finetune_with_a_new_head(tmp_path: Path) -> None:
    teacher, student = _cnn(1), _cnn(0)
    fresh_head = {k: v.clone() for k, v in student.state_dict().items() if k.startswith("head.")}
    assert fresh_head, "the cnn1d classifier is called head"
    g = graftnet.graft(student, {}, {"input_shape": [1, 40]})
    objective = graftnet.Finetune(g, teacher=teacher, reinit=["head"])
    state = student.state_dict()
    assert all(torch.equal(state[k], v) for k, v in fresh_head.items())  # the head kept its fresh initialisation
    body = [k for k in teacher.state_dict() if not k.startswith("head.")]
    assert body and all(torch.equal(state[k], teacher.state_dict()[k]) for k in body)
    assert sorted(objective.reinitialised) == sorted(fresh_head)
    with pytest.raises(TrainingError, match="no module 'haed'.*head"):
        graftnet.Finetune(g, teacher=teacher, reinit=["haed"])
    # and from a spec, with the same option
    spec = {"teachers": {"t": {}}, "train": {"method": "finetune", "epochs": 1, "finetune": {"teacher": "t",
            "reinit": ["head"]}}}  # fmt: skip
    result = graftnet.fit(_cnn(0), {"t": teacher}, spec, train=_data(32, 1), val=_data(20, 2),
                          run_dir=tmp_path / "ft", progress=False, tensorboard=False)  # fmt: skip
    assert result.method == "finetune"


def test_labels_the_student_cannot_output_are_a_named_error(tmp_path: Path) -> None:
    bad = TensorDataset(torch.randn(32, 1, 40), torch.full((32,), 7))
    with pytest.raises(TrainingError, match="labels run from 7 to 7 but the student outputs 3 classes"):
        graftnet.fit(_cnn(0), None, {"train": {"method": "scratch", "epochs": 1}}, train=bad, val=_data(10, 2),
                     run_dir=tmp_path / "run", progress=False, tensorboard=False)  # fmt: skip


class _Records(torch.utils.data.Dataset[Any]):
    """A Dataset of dict samples, as many datasets give them, or with inputs that cannot be batched (an image object
    without a transform, say)."""

    def __init__(self, n: int, kind: str) -> None:
        self.data, self.kind = _data(n, 0), kind

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> Any:
        x, y = self.data[i]
        return {"signal": x, "label": y} if self.kind == "dict" else (object(), y)


DICT_BATCH = r"a batch must be \(inputs, labels\) with inputs a tensor, got a dict with keys \['label', 'signal'\]"


@pytest.mark.parametrize("split", ["train", "val", "test"])
@pytest.mark.parametrize(("kind", "why"), [("dict", DICT_BATCH), ("object", "its samples cannot be made into a batch")])
def test_samples_that_are_not_input_label_pairs_are_named_before_anything_is_written(
    tmp_path: Path, split: str, kind: str, why: str
) -> None:
    data = {"train": _data(32, 1), "val": _data(20, 2), "test": _data(20, 3), split: _Records(16, kind)}
    with pytest.raises(TrainingError, match=f"^{split}: {why}"):
        graftnet.fit(_cnn(0), None, {"train": {"method": "scratch", "epochs": 1}}, **data, run_dir=tmp_path / "run",
                     progress=False, tensorboard=False)  # fmt: skip
    assert not (tmp_path / "run").exists()  # nothing written: the same call with good data starts afresh


def test_a_dataloader_of_dict_batches_is_named_at_its_first_batch(tmp_path: Path) -> None:
    loader = DataLoader(_Records(32, "dict"), batch_size=8)
    with pytest.raises(TrainingError, match=r"^train: a batch must be \(inputs, labels\).*got a dict"):
        graftnet.fit(_cnn(0), None, {"train": {"method": "scratch", "epochs": 1}}, train=loader, val=_data(20, 2),
                     run_dir=tmp_path / "run", progress=False, tensorboard=False)  # fmt: skip


LABELS = {  # labels that are not class indices, and the fix the error names
    "soft": (lambda n: torch.softmax(torch.randn(n, 3), -1), r"float32 of shape \(\d+, 3\) \(soft or one-hot"),
    "float": (lambda n: torch.randint(0, 3, (n,)).float(), r"float32 of shape \(\d+,\) \(give them as integers"),
    "column": (lambda n: torch.randint(0, 3, (n, 1)), r"int64 of shape \(\d+, 1\) \(one label per sample"),
}


@pytest.mark.parametrize("split", ["train", "val", "test"])
@pytest.mark.parametrize("kind", sorted(LABELS))
def test_labels_that_are_not_class_indices_are_named_before_anything_is_written(
    tmp_path: Path, split: str, kind: str
) -> None:
    make, why = LABELS[kind]
    data = {"train": _data(32, 1), "val": _data(20, 2), "test": _data(20, 3)}
    data[split] = TensorDataset(data[split].tensors[0], make(len(data[split])))
    with pytest.raises(TrainingError, match=f"^{split}: labels must be class indices, an integer tensor of shape "
                                            rf"\(batch,\); got {why}"):  # fmt: skip
        graftnet.fit(_cnn(0), None, {"train": {"method": "scratch", "epochs": 1}}, **data, run_dir=tmp_path / "run",
                     progress=False, tensorboard=False)  # fmt: skip
    assert not (tmp_path / "run").exists()


def test_integer_labels_of_any_width_train_as_int64_labels_do(tmp_path: Path) -> None:
    errors = {}
    for dtype in (torch.int64, torch.int32, torch.int16, torch.uint8):
        train, val = _data(32, 1), _data(20, 2)
        train, val = (TensorDataset(d.tensors[0], d.tensors[1].to(dtype)) for d in (train, val))
        result = graftnet.fit(_cnn(0), None, {"train": {"method": "scratch", "epochs": 1}}, train=train, val=val,
                              run_dir=tmp_path / str(dtype), progress=False, tensorboard=False)  # fmt: skip
        errors[dtype] = result.val_error
    assert len(set(errors.values())) == 1, errors


def test_a_validation_label_the_student_cannot_output_is_named_wherever_it_is(tmp_path: Path) -> None:
    val = _data(40, 2)
    val.tensors[1][-1] = 9  # after the first batch that fit looks at before training
    with pytest.raises(TrainingError, match="^val: labels run from 0 to 9 but the student outputs 3 classes"):
        graftnet.fit(_cnn(0), None, {"train": {"method": "scratch", "epochs": 1}}, train=_data(32, 1), val=val,
                     run_dir=tmp_path / "run", progress=False, tensorboard=False)  # fmt: skip


def test_an_empty_test_split_is_named_before_training(tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match="test: the test data is empty; pass test=None"):
        graftnet.fit(_cnn(0), None, {"train": {"method": "scratch", "epochs": 1}}, train=_data(32, 1),
                     val=_data(20, 2), test=_data(0, 3), run_dir=tmp_path / "run", progress=False,
                     tensorboard=False)  # fmt: skip
    assert not (tmp_path / "run").exists()


def test_your_own_loop_with_the_objective_matches_the_eq4_loss() -> None:
    student, _, g, x, y = pair_and_batch()
    kf = graftnet.KnowledgeFlow(g, {"lr": 1e-2, "lambda2": 0.5, "cut_teachers_at": 0.5}, total_steps=4)
    names = [group["name"] for group in kf.param_groups()]
    assert names == ["student", "mixing", "adapters"] or names == ["student", "mixing"]
    take_steps(kf, x, y)
    loss = kf.loss(x, y)
    lam1 = kf.lambda1()
    by_hand = loss.parts["task_loss"] + lam1 * loss.parts["dep_loss"] + 0.5 * loss.parts["kl_loss"]
    by_hand = by_hand + 0.3 * loss.parts["hint_loss"]  # the default feature hint: not eq. 4, graftnet's addition
    assert torch.allclose(loss.total, by_hand) and float(loss.parts["kl_loss"].detach()) > 0
    assert kf.maybe_cut() is not None and kf.cut and not kf.model.mixers  # 2 of 4 steps: the cut is due
    assert "dep_loss" not in kf.loss(x, y).parts
    detached = graftnet.detach(kf.model)
    assert type(detached) is type(student)
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in detached.state_dict().items())


def test_knowledge_flow_needs_a_graft() -> None:
    with pytest.raises(TrainingError, match="pass graftnet.graft"):
        graftnet.KnowledgeFlow(_cnn(0), total_steps=10)
    g = graftnet.graft(_cnn(0), {"t": _cnn(1)}, {"sites": SITES, "input_shape": [1, 40]})
    with pytest.raises(TrainingError, match="pass total_steps"):
        graftnet.KnowledgeFlow(g).param_groups()
    with pytest.raises(graftnet.SpecError, match="lambda2"):
        graftnet.KnowledgeFlow(g, lambda2=-1.0)


DATASET_MODULE = '''
import torch
from torch.utils.data import TensorDataset

def build(augment, n=60, seed=0):
    g = torch.Generator().manual_seed(seed)
    def part(k):
        return TensorDataset(torch.randn(k, 1, 40, generator=g), torch.randint(0, 3, (k,), generator=g))
    return {"train": part(n), "val": part(20), "test": part(30)}
'''


def test_graftnet_train_with_your_dataset_by_reference(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "mydata.py").write_text(DATASET_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    spec = {"student": {"model": "graftnet:cnn1d", "kwargs": CNN},
            "data": {"dataset": "mydata:build", "kwargs": {"n": 48}, "batch_size": 16},
            "train": {"method": "scratch", "epochs": 1}}  # fmt: skip
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    assert main(["train", "spec.json", "--out", "run", "--no-progress", "--no-tensorboard"]) == 0
    assert "test error" in capsys.readouterr().out
    metrics = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert metrics[1].split(",")[1] == "3"  # 48 given training samples in batches of 16: nothing carved off
    sys.modules.pop("mydata", None)


def test_graftnet_train_on_an_image_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 6), ("val", 2), ("test", 2)):
        for c, name in enumerate(("cat", "dog")):
            folder = tmp_path / "images" / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = (torch.rand(8, 8, 3, generator=g) * 255 * (c + 1) / 2).to(torch.uint8).numpy()
                Image.fromarray(pixels).save(folder / f"{i}.png")
    monkeypatch.chdir(tmp_path)
    spec = {"student": {"model": "graftnet:convnet", "kwargs": {"in_channels": 3, "num_classes": 2,
                                                                "image_size": 8}},
            "data": {"dataset": "imagefolder", "kwargs": {"root": "images"}, "batch_size": 4},
            "train": {"method": "scratch", "epochs": 2}}  # fmt: skip
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    assert main(["train", "spec.json", "--out", "run", "--no-progress", "--no-tensorboard"]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["test_error"] is not None and results["epochs"] == 2


def test_a_diverging_run_stops_before_it_saves_or_exports_a_broken_student(tmp_path: Path) -> None:
    # SGD at lr 1e6: the loss may stay finite for a while, BatchNorm statistics do not
    spec = {"train": {"method": "scratch", "epochs": 3, "optimizer": "sgd", "lr": 1e6, "momentum": 0.0}}
    student = graftnet.build_model("graftnet:cnn1d", {"num_classes": 3, "channels": [8, 8]})
    with pytest.raises(TrainingError, match="not finite|NaN or infinite"):
        graftnet.fit(student, None, spec, train=_data(64, 1), val=_data(20, 2), run_dir=tmp_path / "run",
                     progress=False, tensorboard=False)  # fmt: skip
    assert not (tmp_path / "run" / "student.safetensors").exists()
    if (tmp_path / "run" / "checkpoint.safetensors").exists():  # whatever was saved is finite
        saved = load_file(tmp_path / "run" / "checkpoint.safetensors")
        assert all(torch.isfinite(v).all() for v in saved.values() if v.is_floating_point())


def test_a_student_that_overflows_on_the_probe_batch_is_a_diverged_run_not_a_crash(tmp_path: Path) -> None:
    """Finite weights and losses, but outputs that overflow (seen in a tune at SGD lr 1): the run ends with a
    TrainingError, which a tune counts as a failed setting, and leaves no student file."""
    from graftnet.training.finish import export_student

    g = graftnet.graft(_cnn(0), {"t": _cnn(1)}, {"sites": SITES, "input_shape": [1, 40]})
    head = [m for m in g.student.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        head.weight.fill_(3.4e38)  # finite, but the logits overflow float32
        head.bias.fill_(3.4e38)
    assert all(torch.isfinite(p).all() for p in g.parameters())
    with pytest.raises(TrainingError, match="numerically broken, so the run diverged: .*probe batch is NaN or inf"):
        export_student(g, tmp_path, tol=0.5)
    assert not (tmp_path / "student.safetensors").exists()


def test_non_finite_state_is_named(tmp_path: Path) -> None:
    from graftnet.training.guards import check_finite_state

    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
    check_finite_state(model, "here")  # a healthy model passes
    model[1].running_var[1] = float("inf")
    with pytest.raises(TrainingError, match=r"here: 1.running_var has 1 of 3 values that are NaN or infinite"):
        check_finite_state(model, "here")


def test_nan_in_the_validation_data_stops_the_run(tmp_path: Path) -> None:
    val = _data(20, 2)
    val.tensors[0][3, 0, 5] = float("nan")
    with pytest.raises(TrainingError, match="validation loss is not finite after epoch 1"):
        graftnet.fit(_cnn(0), None, {"train": {"method": "scratch", "epochs": 2}}, train=_data(32, 1), val=val,
                     run_dir=tmp_path / "run", progress=False, tensorboard=False)  # fmt: skip


def _scratch_run(run_dir: Path, **kwargs: Any) -> graftnet.RunResult:
    return graftnet.fit(_cnn(0), None, {"train": {"method": "scratch", "epochs": 2}}, train=_data(32, 1),
                        val=_data(20, 2), run_dir=run_dir, progress=False, **kwargs)  # fmt: skip


def test_a_run_killed_before_its_first_checkpoint_resumes_by_starting_again(tmp_path: Path) -> None:
    run = tmp_path / "run"
    full = _scratch_run(tmp_path / "full", tensorboard=False)
    _scratch_run(run, tensorboard=False)
    for name in ("checkpoint.safetensors", "student.safetensors", "results.json", "metrics.csv"):
        (run / name).unlink()  # what a SIGKILL in the first epoch leaves: spec.json and run.json
    (run / ".checkpoint.safetensors.x1y2.tmp").write_bytes(b"half a file")  # and perhaps a half-written save
    with pytest.raises(TrainingError, match="pass --resume to continue it .*starts again.* or --overwrite"):
        _scratch_run(run, tensorboard=False)
    again = _scratch_run(run, resume=True, tensorboard=False)
    assert again.test_error == full.test_error and again.interrupted is None
    assert not list(run.glob(".*.tmp"))  # the leftover is gone


def test_overwrite_clears_the_previous_runs_logs(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _scratch_run(run, tensorboard=True)
    (run / "my_notes.txt").write_text("kept")
    _scratch_run(run, tensorboard=True, overwrite=True)
    events = list((run / "tb").glob("events.out.tfevents.*"))
    assert len(events) == 1  # one run's events, not two runs mixed
    assert len((run / "metrics.csv").read_text().splitlines()) == 3  # header + 2 epochs
    assert (run / "my_notes.txt").read_text() == "kept"  # only graftnet's own files are removed


@pytest.mark.parametrize("damage", ["flip", "missing", "int64"])
def test_resuming_a_finished_run_from_a_damaged_checkpoint_keeps_the_good_student(tmp_path: Path, damage: str) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    run = tmp_path / "run"
    _scratch_run(run, tensorboard=False)
    ckpt = run / "checkpoint.safetensors"
    good_student, good_results = (run / "student.safetensors").read_bytes(), (run / "results.json").read_bytes()
    if damage == "flip":
        data = bytearray(ckpt.read_bytes())
        data[-100] ^= 0x01  # a bit in the last tensor's bytes
        ckpt.write_bytes(bytes(data))
    else:
        with safe_open(str(ckpt), framework="pt") as f:
            meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        key = next(k for k in tensors if k.startswith("student.") and k.endswith("weight"))
        if damage == "missing":
            del tensors[key]
        else:
            tensors[key] = tensors[key].to(torch.int64)
        save_file(tensors, str(ckpt), metadata=meta)
    with pytest.raises(graftnet.CheckpointError):
        _scratch_run(run, resume=True, tensorboard=False)
    assert (run / "student.safetensors").read_bytes() == good_student
    assert (run / "results.json").read_bytes() == good_results


def test_the_objective_never_asks_its_runner_for_truth() -> None:
    """A compiled module (or DDP) runs the model; ``runner or model`` would call its __len__/__bool__ and fail."""

    class Runner(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner
            self.calls = 0

        def forward(self, x: torch.Tensor) -> Any:
            self.calls += 1
            return self.inner(x)

        def __len__(self) -> int:
            raise TypeError("GraftedModel does not support len()")

    x, y = torch.randn(8, 1, 40), torch.randint(0, 3, (8,))
    g = graftnet.graft(_cnn(0), {"t": _cnn(1)}, {"sites": SITES}, example_input=x[:2])
    kf = graftnet.KnowledgeFlow(g, total_steps=10)
    kf.runner = runner = Runner(g)
    kf.loss(x, y)
    assert runner.calls == 1
