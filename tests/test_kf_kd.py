"""Knowledge flow with a KD loss as its task loss (``train.kd.with_knowledge_flow``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from _tiny import SITES, pair_and_batch, take_steps
from _tiny import cnn as _cnn
from torch.utils.data import TensorDataset

import graftnet
from graftnet import SpecError, TrainingError
from graftnet.losses import kd_loss

KD = {"teacher": "t", "temperature": 4.0, "alpha": 0.7, "with_knowledge_flow": True}


def test_the_task_loss_becomes_the_kd_loss_and_the_rest_is_knowledge_flow() -> None:
    student, teacher, g, x, y = pair_and_batch()
    kf = graftnet.KnowledgeFlow(g, {"lr": 1e-2, "lambda2": 0.5, "kd": KD}, total_steps=4, distill_from=teacher)
    take_steps(kf, x, y)
    loss = kf.loss(x, y)
    with torch.no_grad():
        want_kd = kd_loss(loss.logits, teacher.eval()(x), y, 4.0, 0.7)
    torch.testing.assert_close(loss.parts["kd_loss"], want_kd)
    by_hand = loss.parts["kd_loss"] + kf.lambda1() * loss.parts["dep_loss"] + 0.5 * loss.parts["kl_loss"]
    by_hand = by_hand + 0.3 * loss.parts["hint_loss"]  # the default feature hint
    torch.testing.assert_close(loss.total, by_hand)
    assert loss.total.requires_grad and not any(p.requires_grad for p in teacher.parameters())
    # without the flag the section is KD's alone: knowledge flow keeps its cross-entropy
    plain = graftnet.KnowledgeFlow(g, {"lr": 1e-2, "kd": {**KD, "with_knowledge_flow": False}}, total_steps=4)
    assert "kd_loss" not in plain.loss(x, y).parts


def test_it_needs_the_whole_teacher() -> None:
    g = graftnet.graft(_cnn(0), {"t": _cnn(1)}, {"sites": SITES, "input_shape": [1, 40]})
    with pytest.raises(TrainingError, match="distill_from=teacher"):
        graftnet.KnowledgeFlow(g, {"kd": KD}, total_steps=4)


def _spec(**kd: Any) -> dict[str, Any]:
    return {"sites": SITES, "train": {"method": "knowledge_flow", "epochs": 1, "lr": 3e-3, "kd": {**KD, **kd}}}


def test_fit_runs_it_and_refuses_a_teacher_with_another_output_space(tmp_path: Path) -> None:
    data = TensorDataset(torch.randn(48, 1, 40), torch.randint(0, 3, (48,)))
    r = graftnet.fit(_cnn(0), {"t": _cnn(1)}, _spec(), train=data, val=data, run_dir=tmp_path / "ok", progress=False,
                     tensorboard=False)  # fmt: skip
    assert r.method == "knowledge_flow" and r.val_error is not None
    with pytest.raises(TrainingError, match="teacher 't' outputs \\(5,\\) per sample but the student outputs \\(3,\\)"):
        graftnet.fit(_cnn(0), {"t": _cnn(1, classes=5)}, _spec(), train=data, val=data, run_dir=tmp_path / "bad",
                     progress=False, tensorboard=False)  # fmt: skip


@pytest.mark.parametrize(
    ("train", "rl", "message"),
    [
        ({"method": "kd"}, None, "only method 'knowledge_flow' adds a KD loss"),
        ({"method": "knowledge_flow"}, {"env": "CartPole-v1"}, "reinforcement learning has no KD loss"),
    ],
)
def test_the_spec_refuses_it_where_it_does_nothing(train: dict[str, Any], rl: Any, message: str) -> None:
    mlp = {"model": "graftnet:mlp", "kwargs": {"in_features": 4, "num_classes": 2}}
    spec: dict[str, Any] = {"student": mlp, "teachers": {"t": mlp}, "train": {**train, "kd": KD},
                            "sites": [{"student": "output", "taps": ["t:output"]}]}  # fmt: skip
    if rl is not None:
        spec["rl"] = rl
    with pytest.raises(SpecError, match=message):
        graftnet.load_spec(spec)
