"""examples/lightning_knowledge_flow.py: graftnet's KnowledgeFlow objective driven by a Lightning Trainer.

One tiny run (4 epochs of 4 batches, teachers cut at half-way) is shared by the tests; each checks one
place where Lightning and the objective must agree: the hook order of the θ_old refresh, the clock, the
teacher cut and re-registration, what is logged, the detached student, and the loss itself.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

pl = pytest.importorskip("lightning.pytorch")

pytestmark = [  # Lightning's own notices: the frozen teachers are in eval mode on purpose; LeafSpec is its torch shim
    pytest.mark.filterwarnings("ignore:.*module\\(s\\) in eval mode"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec"),
]

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "lightning_knowledge_flow.py"
ARGV = ["--epochs", "4", "--samples", "1000", "--labels", "64", "--teacher-epochs", "2", "--width", "8",
        "--batch-size", "16", "--cut-at", "0.5"]  # fmt: skip
EPOCHS, BATCHES = 4, 4


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("lightning_knowledge_flow", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


class Recorder(pl.Callback):
    """What Lightning did at each step, seen from outside the example's module."""

    def __init__(self) -> None:
        self.before_step: dict[str, torch.Tensor] = {}  # the parameters just before the last optimizer step
        self.first_loss: torch.Tensor | None = None
        self.steps: list[dict[str, Any]] = []

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        # callbacks run this hook before the LightningModule's: the gradients are there, the step is not yet
        self.before_step = {n: p.detach().clone() for n, p in pl_module.objective.model.named_parameters()}

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.first_loss is None:
            self.first_loss = outputs["loss"].detach().clone()
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        self.steps.append({"epoch": trainer.current_epoch, "cut": pl_module.objective.cut, **metrics})


@pytest.fixture(scope="module")
def example() -> ModuleType:
    return _load()


@pytest.fixture(scope="module")
def run(example: ModuleType) -> tuple[Any, Recorder]:
    recorder = Recorder()
    return example.main(ARGV, callbacks=[recorder]), recorder


def test_the_clock_follows_lightnings_global_step(run: tuple[Any, Recorder]) -> None:
    result, recorder = run
    assert result.trainer.global_step == EPOCHS * BATCHES == result.objective.total_steps
    assert result.objective.steps == result.trainer.global_step
    assert len(recorder.steps) == EPOCHS * BATCHES
    lambdas = [s["lambda1"] for s in recorder.steps]
    assert lambdas[0] == 0.0 and lambdas[-1] == 10.0  # the ramp ran its course on global_step / total_steps
    assert lambdas == sorted(lambdas)


def test_theta_old_is_refreshed_between_backward_and_the_optimizer_step(run: tuple[Any, Recorder]) -> None:
    result, recorder = run
    snapshot = result.objective.snapshot.tensors
    now = dict(result.objective.model.named_parameters())
    assert recorder.before_step and set(recorder.before_step) <= set(snapshot)
    for name, before in recorder.before_step.items():
        assert torch.equal(snapshot[name], before), name  # θ_old = the parameters the last step started from
    assert any(not torch.equal(snapshot[n], p) for n, p in now.items())  # ...and that step then moved them
    # A refresh after the step (or before the loss) would make θ_old = θ and the KL exactly 0. Mixer calibration
    # makes it nonzero in epoch 0 anyway, so look at the last epoch, after the cut.
    assert all(s["kl_loss"] > 0 for s in recorder.steps if s["epoch"] == EPOCHS - 1)


def test_losses_lambda_and_p_w_are_logged(run: tuple[Any, Recorder]) -> None:
    _, recorder = run
    first = recorder.steps[0]
    for key in ("loss", "task_loss", "dep_loss", "kl_loss", "lambda1", "p_w_student_min", "train_acc"):
        assert key in first and math.isfinite(first[key]), key
    assert "val_acc" in recorder.steps[-1]
    assert len({s["kl_loss"] for s in recorder.steps}) > 1  # logged every step, not once


def test_p_w_student_rose_and_the_teachers_were_cut_on_time(run: tuple[Any, Recorder]) -> None:
    result, recorder = run
    module, objective = result.module, result.objective
    assert module.p_w_start == pytest.approx(0.5)  # one teacher, uniform logits
    before_cut = [s["p_w_student_min"] for s in recorder.steps if not s["cut"]]
    assert before_cut[-1] > module.p_w_start
    assert min(objective.dependence_at_cut.values()) > 0.9
    assert objective.cut and module.cut_epoch == math.ceil(0.5 * EPOCHS)
    assert [s["cut"] for s in recorder.steps] == [s["epoch"] >= module.cut_epoch for s in recorder.steps]
    # re-registered: the LightningModule holds the plain graft, without mixers, adapters or teachers
    assert module.model is objective.model and not objective.model.mixers
    assert sum(p.numel() for p in module.parameters()) == sum(p.numel() for p in objective.model.student.parameters())


def test_the_detached_student_is_a_plain_student(run: tuple[Any, Recorder], example: ModuleType) -> None:
    result, _ = run
    assert not result.forced and 0.0 <= result.val_error <= 1.0 and 0.0 <= result.test_error <= 1.0
    fresh = example.make_student(example.parse_args(ARGV))
    state = result.student.state_dict()
    assert list(state) == list(fresh.state_dict())
    fresh.load_state_dict(state, strict=True)
    x = torch.randn(3, 1, 40)
    torch.testing.assert_close(fresh.eval()(x), result.student.eval()(x))
    trained = result.objective.model.student.state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in state.items())


def test_lightnings_first_loss_equals_the_objective_by_hand(run: tuple[Any, Recorder], example: ModuleType) -> None:
    _, recorder = run
    setup = example.build(example.parse_args(ARGV))  # the same seed: the same teacher, student, graft and batches
    x, y = next(iter(setup.train))
    setup.objective.model.train()
    by_hand = setup.objective.loss(x, y, 0.0)
    assert set(by_hand.parts) == {"task_loss", "dep_loss", "kl_loss", "hint_loss"}
    assert recorder.first_loss is not None
    torch.testing.assert_close(recorder.first_loss, by_hand.total.detach())


def test_theta_old_follows_the_model_when_lightning_casts_it(example: ModuleType) -> None:
    # Lightning moves and casts the model after the objective (and its θ_old) was built; "64-true" does on the CPU
    # what a GPU run does to the device. Without the module's on_fit_start the KL pass would mix float and double.
    setup = example.build(example.parse_args(ARGV))
    module = example.KnowledgeFlowModule(setup.objective, setup.example)
    trainer = pl.Trainer(accelerator="cpu", devices=1, precision="64-true", max_steps=2, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0)  # fmt: skip
    trainer.fit(module, setup.train, setup.val)
    assert trainer.global_step == 2
    assert all(t.dtype == torch.float64 for t in setup.objective.snapshot.tensors.values())
