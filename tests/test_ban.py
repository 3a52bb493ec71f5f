"""Born-again networks: the treatments' math on hand-made examples, ensembles, generations, born-again KF."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

import graftnet
from graftnet.data import Splits, TensorData
from graftnet.errors import TrainingError
from graftnet.launch import train
from graftnet.losses import cwtm_loss, cwtm_weights, dkpp_targets, ensemble_probs, soft_cross_entropy
from graftnet.training.ban import ensemble_errors, generation_spec

# ---- the math -------------------------------------------------------------------------------------------------


def test_ban_gradient_is_q_minus_p() -> None:
    """Eq. 5: d/dz of the cross-entropy to the teacher's distribution is q − p (per sample; the loss is a mean)."""
    z = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]], requires_grad=True)
    t = torch.tensor([[0.2, 0.1, 3.0], [1.0, 1.0, 1.0]])
    p = F.softmax(t, -1)
    (grad,) = torch.autograd.grad(soft_cross_entropy(z, p), z)
    q = F.softmax(z.detach(), -1)
    torch.testing.assert_close(grad, (q - p) / 2)


def test_cwtm_weights_are_teacher_max_normalised_over_the_batch() -> None:
    p = torch.tensor([[0.7, 0.2, 0.1], [0.4, 0.4, 0.2], [0.1, 0.1, 0.8]])
    torch.testing.assert_close(cwtm_weights(p), torch.tensor([0.7, 0.4, 0.8]) / 1.9)


def test_cwtm_gradient_is_weighted_label_gradient() -> None:
    """Eq. 10: sample s contributes w_s (q_s − y_s), with w_s = max p_s / Σ_u max p_u — even if the teacher is wrong."""
    z = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 0.0]], requires_grad=True)
    p = torch.tensor([[0.1, 0.6, 0.3], [0.9, 0.05, 0.05]])  # sample 0: the teacher is wrong (argmax 1, label 0)
    y = torch.tensor([0, 0])
    (grad,) = torch.autograd.grad(cwtm_loss(z, p, y), z)
    w = torch.tensor([0.6, 0.9]) / 1.5
    expected = w[:, None] * (F.softmax(z.detach(), -1) - F.one_hot(y, 3).float())
    torch.testing.assert_close(grad, expected)


def test_dkpp_keeps_the_argmax_and_permutes_only_the_rest() -> None:
    torch.manual_seed(0)
    p = F.softmax(torch.randn(200, 6) * 2, -1)
    out = dkpp_targets(p)
    top = p.argmax(-1)
    rows = torch.arange(200)
    assert torch.equal(out[rows, top], p[rows, top])  # the teacher's argmax entry stays where it was
    assert torch.equal(out.argmax(-1), top)
    mask = torch.ones_like(p, dtype=torch.bool)
    mask[rows, top] = False
    others_in = p[mask].view(200, 5).sort(-1).values
    others_out = out[mask].view(200, 5).sort(-1).values
    assert torch.equal(others_in, others_out)  # the other entries are the same values, moved
    moved = (out[mask].view(200, 5) != p[mask].view(200, 5)).any(-1)
    assert moved.float().mean() > 0.9  # most rows really are permuted…
    perms = {tuple((out[i][mask[i]] / 1).argsort().tolist()) for i in range(200)}
    assert len(perms) > 50  # …each with its own permutation


def test_dkpp_uses_the_teachers_argmax_not_the_label() -> None:
    p = torch.tensor([[0.05, 0.7, 0.15, 0.1]])  # whatever the true label, index 1 is kept
    for seed in range(5):
        out = dkpp_targets(p, torch.Generator().manual_seed(seed))
        assert out[0, 1] == p[0, 1]


class _Fixed(nn.Module):
    """A 'model' returning fixed logits per sample index (the index is the input)."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.table = logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table[x.long().view(-1)]


def test_ensemble_error_counts_samples_not_batches() -> None:
    # 7 samples scored in batches of 3 (3 + 3 + 1): a per-batch mean would weigh the last sample 3×.
    n = 7
    labels = torch.tensor([0, 1, 0, 1, 0, 1, 1])
    a = torch.tensor([[2.0, 0.0]] * 6 + [[2.0, 0.0]])  # always class 0
    b = torch.tensor([[0.0, 1.0]] * 6 + [[0.0, 3.0]])  # always class 1, very sure on the last sample
    data = TensorData(torch.arange(n).float().view(n, 1), labels)
    splits = Splits(data, data, data, 2, (1,))
    (result,) = ensemble_errors({1: _Fixed(a), 2: _Fixed(b)}, [(1, 2)], splits, batch_size=3)
    probs = ensemble_probs([a, b])
    expected = 100 * float((probs.argmax(-1) != labels).float().mean())
    assert result.test_error == pytest.approx(expected)
    assert result.members == (1, 2)
    # by hand: mean of softmax(2,0)=(.881,.119) and softmax(0,1)=(.269,.731) → class 0 for samples 0-5;
    # the last: softmax(0,3)=(.047,.953) → class 1. Wrong: samples 1, 3, 5 → 3 of 7.
    assert result.test_error == pytest.approx(300 / 7)


# ---- generations -------------------------------------------------------------------------------------------

CNN = {"model": "graftnet:cnn1d", "kwargs": {"num_classes": 3, "channels": [8, 8]}}
DATA = {"dataset": "mnist1d", "kwargs": {"samples": 600}, "classes": [0, 1, 2], "train_size": 96, "val_size": 40,
        "batch_size": 32}  # fmt: skip


def _ban_spec(**ban: Any) -> dict[str, Any]:
    train = {"method": "ban", "epochs": 2, "lr": 3e-3, "threads": 1, "ban": {"generations": 2, **ban}}
    return {"student": CNN, "data": DATA, "train": train}


def test_generations_start_fresh_with_their_own_seeds(tmp_path: Path) -> None:
    spec = graftnet.load_spec(_ban_spec())
    specs = [generation_spec(spec, k, tmp_path, (1, 40)) for k in range(3)]
    assert [s.train.method for s in specs] == ["scratch", "born_again", "born_again"]  # type: ignore[union-attr]
    assert len({s.train.seed for s in specs}) == 3  # type: ignore[union-attr]
    assert all(s.student is not None and s.student.weights is None for s in specs)  # random init, never copied
    assert specs[2].teachers["previous"].weights == str(tmp_path / "gen1" / "student.safetensors")


@pytest.mark.parametrize("treatment", ["ban", "ban_l", "cwtm", "dkpp"])
def test_a_ban_sequence_trains_each_generation_from_the_previous(tmp_path: Path, treatment: str) -> None:
    result = train(_ban_spec(treatment=treatment), tmp_path / "run", progress=False, tensorboard=False)
    assert result.run_dir == tmp_path / "run" and result.method == "ban"  # one result for the whole sequence
    assert [g["generation"] for g in result.generations] == [0, 1, 2] and result.treatment == treatment
    assert result.test_error == result.generations[-1]["test_error"]
    summary = json.loads((tmp_path / "run" / "results.json").read_text())
    assert [g["generation"] for g in summary["generations"]] == [0, 1, 2]
    assert [e["members"] for e in summary["ensembles"]] == [[1, 2]]
    assert summary["treatment"] == treatment
    for k in range(3):
        assert (tmp_path / "run" / f"gen{k}" / "student.safetensors").is_file()
    gen1 = json.loads((tmp_path / "run" / "gen1" / "spec.json").read_text())
    assert gen1["train"]["born_again"]["treatment"] == treatment


def test_ban_resume_skips_finished_generations(tmp_path: Path) -> None:
    spec = _ban_spec()
    train(spec, tmp_path / "run", progress=False, tensorboard=False)
    before = (tmp_path / "run" / "gen1" / "student.safetensors").stat().st_mtime_ns
    train(spec, tmp_path / "run", resume=True, progress=False, tensorboard=False)
    assert (tmp_path / "run" / "gen1" / "student.safetensors").stat().st_mtime_ns == before
    with pytest.raises(TrainingError, match="not empty"):
        train(spec, tmp_path / "run", progress=False, tensorboard=False)


def test_teacher_of_another_architecture(tmp_path: Path) -> None:
    mlp = {"model": "graftnet:mlp", "kwargs": {"in_features": 40, "hidden": [32], "num_classes": 3}}
    result = train(_ban_spec(teacher_model=mlp, generations=1), tmp_path / "run", progress=False, tensorboard=False)
    assert result.test_error is not None
    gen0 = json.loads((tmp_path / "run" / "gen0" / "spec.json").read_text())
    assert gen0["student"]["model"] == "graftnet:mlp"


def test_born_again_knowledge_flow_grafts_generations_at_matching_sites(tmp_path: Path) -> None:
    spec = _ban_spec(knowledge_flow=True, flow_from="all")
    gen2 = generation_spec(graftnet.load_spec(spec), 2, tmp_path, (1, 40))
    assert gen2.train is not None and gen2.train.method == "knowledge_flow"
    assert set(gen2.teachers) == {"gen0", "gen1"}
    assert [(s.student, s.taps) for s in gen2.sites] == [
        ("features.act1", ["gen0:features.act1", "gen1:features.act1"]),
        ("features.act2", ["gen0:features.act2", "gen1:features.act2"]),
    ]
    result = train(spec, tmp_path / "run", progress=False, tensorboard=False)
    assert result.min_p_w_student is not None  # the generation was grafted, then detached
    summary = json.loads((tmp_path / "run" / "results.json").read_text())
    assert summary["treatment"] == "knowledge_flow"


def test_born_again_knowledge_flow_needs_one_architecture(tmp_path: Path) -> None:
    mlp = {"model": "graftnet:mlp", "kwargs": {"in_features": 40, "hidden": [32], "num_classes": 3}}
    with pytest.raises(TrainingError, match="generation 0 must have the student's architecture"):
        train(_ban_spec(knowledge_flow=True, teacher_model=mlp), tmp_path / "run", progress=False)
