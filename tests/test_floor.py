"""train.p_w_floor: a rising lower bound on p_w(student) that hands every site to the student by the cut."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest
import torch

import graftnet
from graftnet.errors import SpecError
from graftnet.models import build_model
from graftnet.spec import TrainSpec
from graftnet.training.objectives import KnowledgeFlow

CNN = {"model": "graftnet:cnn1d", "kwargs": {"num_classes": 3, "channels": [8, 8]}}
SITES = ("features.act1", "features.act2")


def _graft(n_teachers: int = 2) -> graftnet.GraftedModel:
    torch.manual_seed(0)
    teachers = {f"t{i}": build_model(CNN["model"], CNN["kwargs"]) for i in range(n_teachers)}
    spec = {"input_shape": [1, 40], "sites": [{"student": s, "taps": [f"{t}:{s}" for t in teachers]} for s in SITES]}
    return graftnet.graft(build_model(CNN["model"], CNN["kwargs"]), teachers, spec)


def test_the_projection_lifts_p0_to_the_floor_and_keeps_the_teachers_ratios() -> None:
    g = _graft()
    low, high = g.mixers[SITES[0]], g.mixers[SITES[1]]
    with torch.no_grad():
        low.logits.copy_(torch.tensor([0.0, 2.0, 1.0]))  # p0 ≈ 0.09
        high.logits.copy_(torch.tensor([5.0, 0.0, 0.0]))  # p0 ≈ 0.987
    before = high.logits.clone()
    g.raise_student_floor(0.9)
    p = low.p_w()
    assert p[0].item() == pytest.approx(0.9, abs=1e-6)
    assert (p[1] / p[2]).item() == pytest.approx(math.e, rel=1e-5)  # the teachers' ratio e^(2-1) is kept
    assert torch.equal(high.logits, before)  # already above the floor: untouched
    g.raise_student_floor(0.0)
    assert low.p_w()[0].item() == pytest.approx(0.9, abs=1e-6)
    with pytest.raises(ValueError, match="below 1"):
        g.raise_student_floor(1.0)


def _projected_on_device(w: torch.Tensor, floor: float) -> torch.Tensor:
    """The projection as raise_student_floor computes it off the CPU: tensor ops only, no host check."""
    allowed = math.log((1.0 - floor) / floor)
    w = w.clone()
    w[1:] -= (torch.logsumexp(w[1:] - w[0], dim=0) - allowed).clamp_min(0)
    return w


def test_the_host_check_skips_only_sites_the_projection_would_leave_bit_for_bit() -> None:
    """On the CPU a site clearly above the floor is skipped after a host check: the result must be exactly the
    tensor path's, at the boundary too, and a skipped site keeps its version counter (the mixers' kept
    coefficients stay valid)."""
    g = _graft(n_teachers=3)
    mixer = g.mixers[SITES[0]]
    gen = torch.Generator().manual_seed(0)
    skipped = 0
    for floor in (0.05, 0.5, 0.9, 0.999, 0.9999):
        allowed = math.log((1.0 - floor) / floor)
        for _ in range(300):
            w = torch.randn(4, generator=gen) * 6
            if torch.rand((), generator=gen) < 0.5:
                w[2:] = w[1]  # equal teachers: the host's bound is tight
            w[0] = w[1:].logsumexp(0) - allowed + torch.empty(()).uniform_(-0.01, 0.01, generator=gen)  # near it
            if torch.rand((), generator=gen) < 0.5:
                w[0] += torch.rand((), generator=gen) * 10  # well above
            with torch.no_grad():
                mixer.logits.copy_(w)
            version = mixer.logits._version
            g.raise_student_floor(floor)
            assert torch.equal(mixer.logits.detach(), _projected_on_device(w, floor)), (floor, w)
            skipped += mixer.logits._version == version
    assert 100 < skipped < 1400  # both paths ran


def test_the_floor_rises_linearly_from_start_to_the_cut() -> None:
    g = _graft()
    kf = KnowledgeFlow(g, TrainSpec(cut_teachers_at=0.7, p_w_floor={"start": 0.2}, export_tol=1e-3), total_steps=100)
    top = 1 - 1e-4
    assert [kf.student_floor(p) for p in (0.0, 0.2)] == [0.0, 0.0]
    assert kf.student_floor(0.45) == pytest.approx(0.5 * top)
    assert kf.student_floor(0.7) == kf.student_floor(0.9) == pytest.approx(top)
    kf = KnowledgeFlow(g, TrainSpec(cut_teachers_at=None, p_w_floor={"start": 0.5}), total_steps=100)
    assert kf.student_floor(0.75) == pytest.approx(0.5 * top)  # no cut: the floor ends with training
    kf = KnowledgeFlow(g, TrainSpec(p_w_floor=None), total_steps=100)
    assert kf.student_floor(0.9) == 0.0
    with pytest.raises(SpecError, match="after p_w_floor.start"):
        graftnet.load_spec({"train": {"p_w_floor": {"start": 0.5, "end": 0.4}}})


def test_step_applies_the_floor_at_the_progress_it_is_given() -> None:
    g = _graft()
    kf = KnowledgeFlow(g, TrainSpec(lambda2=0.0, lr_mixing=1e-9, p_w_floor={"start": 0.0, "end": 0.5}), total_steps=10)
    opt = torch.optim.SGD(kf.param_groups())
    x = torch.randn(4, 1, 40)
    kf.loss(x, torch.tensor([0, 1, 2, 0])).total.backward()
    kf.step(opt, progress=0.25)  # A3C's workers pass the frames' progress
    assert min(p["student"] for p in g.p_w().values()) == pytest.approx(0.5 * (1 - 1e-4), abs=1e-6)


SPEC: dict[str, Any] = {
    "student": CNN,
    "data": {"dataset": "mnist1d", "kwargs": {"samples": 600}, "classes": [0, 1, 2], "train_size": 64, "val_size": 40,
             "batch_size": 32},  # fmt: skip
    # w barely moves and λ1 is 0: only the floor can hand the sites to the student
    "train": {"method": "knowledge_flow", "epochs": 4, "lr": 3e-3, "threads": 1, "lr_mixing": 1e-6,
              "lambda1": {"final": 0.0}},  # fmt: skip
    "sites": [{"student": s, "taps": [f"t:{s}"]} for s in SITES],
}


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_a_run_reaches_the_export_tolerance_by_the_cut_under_any_optimizer(
    tmp_path: Path, optimizer: str
) -> None:
    spec = copy.deepcopy(SPEC)
    spec["teachers"] = {"t": {**CNN}}
    spec["train"]["optimizer"] = optimizer
    r = graftnet.train(spec, tmp_path / "floor", progress=False, tensorboard=False)
    assert not r.forced_export and r.min_p_w_student is not None and r.min_p_w_student >= 1 - 1e-3
    spec["train"]["p_w_floor"] = None  # the paper's schedule alone, with w this slow, cannot get there
    r = graftnet.train(spec, tmp_path / "paper", progress=False, tensorboard=False)
    assert r.forced_export and r.min_p_w_student is not None and r.min_p_w_student < 0.9
