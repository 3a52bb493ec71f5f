"""The feature hint (``train.feature_hint``): what it measures, what it trains, and when the objective adds it."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from _tiny import SITES, cnn, pair_and_batch

import graftnet
from graftnet import KnowledgeFlow
from graftnet.errors import GraftError
from graftnet.models.a3c import A3CNet
from graftnet.spec import TrainSpec, override_spec


def _capture_mixer_inputs(g: graftnet.GraftedModel) -> dict[str, tuple[torch.Tensor, ...]]:
    seen: dict[str, tuple[torch.Tensor, ...]] = {}
    for site, mixer in g.mixers.items():
        mixer.register_forward_pre_hook(lambda m, args, site=site: seen.__setitem__(site, args))
    return seen


def test_the_hint_is_the_mean_squared_distance_from_z_to_each_rescaled_tap() -> None:
    _, _, g, x, _ = pair_and_batch()  # same architecture: identity adapters, the tap scale folded into p_w
    g.train()
    g(x)  # calibrate the tap scales a little, so that they are not 1
    seen = _capture_mixer_inputs(g)
    g.keep_feature_hints()
    g(x)
    expected = []
    for site, (z, tap) in seen.items():
        scale = g.mixers[site].tap_scale[0]
        assert not torch.isclose(scale, torch.tensor(1.0))
        expected.append(torch.mean((z - scale * tap) ** 2))
    assert g.feature_hint_loss().item() == pytest.approx(torch.stack(expected).mean().item(), rel=1e-5)


def test_the_hint_goes_through_a_learned_adapter_and_trains_it_with_the_student() -> None:
    torch.manual_seed(0)
    student = cnn(0)
    wide = graftnet.build_model("graftnet:cnn1d", {"num_classes": 3, "channels": [16, 16]})
    x = torch.randn(16, 1, 40)
    g = graftnet.graft(student, {"t": wide}, {"sites": SITES}, example_input=x[:2]).train()
    adapted: dict[str, torch.Tensor] = {}
    for site, mixer in g.mixers.items():
        assert not isinstance(mixer.adapters[0], torch.nn.Identity)  # 16 channels onto 8: a learned 1×1 conv
        mixer.adapters[0].register_forward_hook(lambda m, i, out, site=site: adapted.__setitem__(site, out))
    seen = _capture_mixer_inputs(g)
    g.keep_feature_hints()
    g(x)
    hint = g.feature_hint_loss()
    expected = torch.stack([torch.mean((seen[s][0] - adapted[s]) ** 2) for s in g.mixers]).mean()
    assert hint.item() == pytest.approx(expected.item(), rel=1e-5)
    hint.backward()
    assert student.features[0].weight.grad is not None and student.features[0].weight.grad.abs().sum() > 0
    # Each site's learned Q is the hint's regressor and trains on it; the last site's w gets no gradient from the
    # hint (the first site's does, through what its mix feeds the second site's z, as the task loss does).
    first, last = g.mixers.values()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in last.adapters.parameters())
    assert last.logits.grad is None
    assert all(p.grad is not None for p in first.adapters.parameters()) and first.logits.grad is not None


def test_the_hint_never_trains_what_is_behind_the_tap() -> None:
    """A learned input adapter feeds the frozen teacher: the hint must not bend what the teacher sees toward the
    student. With one site, nothing downstream of the mix carries the hint back either."""
    student = graftnet.build_model("graftnet:a3c_minatar", {"in_channels": 4})
    teacher = A3CNet(in_channels=7, num_actions=3, convs=[(16, 3, 1)], hidden=64, input_size=10)
    spec = {"input_shape": [4, 10, 10], "sites": [{"student": "act", "taps": ["t:act"]}],
            "teachers": {"t": {"input": [{"adapter": "conv1x1", "kwargs": {"out_channels": 7}}]}}}  # fmt: skip
    g = graftnet.graft(student, {"t": teacher}, spec).train()
    (mixer,) = g.mixers.values()
    assert not isinstance(mixer.adapters[0], torch.nn.Identity)  # 64 features onto the student's: learned
    g.keep_feature_hints()
    g(torch.randn(8, 4, 10, 10))
    g.feature_hint_loss().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in mixer.adapters.parameters())
    assert all(p.grad is None for p in g.input_adapters.parameters())


def test_a_hint_is_handed_over_once_and_only_by_a_training_pass_with_autograd() -> None:
    _, _, g, x, _ = pair_and_batch()
    g.train()
    g(x)
    with pytest.raises(GraftError, match="keep_feature_hints"):
        g.feature_hint_loss()  # not kept: nothing to hand over
    g.keep_feature_hints()
    g(x)
    g.feature_hint_loss()
    with pytest.raises(GraftError, match="once per feature_hint_loss"):
        g.feature_hint_loss()  # a stale hint would be added twice
    with torch.no_grad():
        g(x)
    g.eval()
    g(x)
    with pytest.raises(GraftError, match="no feature hint"):
        g.feature_hint_loss()


def test_a_graft_holding_a_hint_deep_copies_without_it() -> None:
    _, _, g, x, _ = pair_and_batch()
    g.train().keep_feature_hints()
    g(x)  # every mixer now holds a hint with its autograd graph, which deepcopy cannot copy
    twin = copy.deepcopy(g)
    assert all(m.hint_loss is None and m.keeps_hint for m in twin.mixers.values())
    assert all(m.hint_loss is not None for m in g.mixers.values())


def _one_loss(settings: dict[str, Any]) -> tuple[KnowledgeFlow, graftnet.StepLoss, torch.Tensor]:
    _, _, g, x, y = pair_and_batch()
    kf = KnowledgeFlow(g.train(), {"lambda2": 0.1, **settings}, total_steps=10)
    return kf, kf.loss(x, y, 0.5), x


def test_knowledge_flow_adds_the_weighted_hint_until_the_cut() -> None:
    kf, loss, x = _one_loss({"feature_hint": 2.0})
    p = loss.parts
    rest = p["task_loss"] + kf.lambda1(0.5) * p["dep_loss"] + 0.1 * p["kl_loss"]
    assert p["hint_loss"] > 0
    assert loss.total.item() == pytest.approx((rest + 2.0 * p["hint_loss"]).item(), rel=1e-5)
    kf.cut_teachers(x)
    after = kf.loss(x, torch.zeros(len(x), dtype=torch.long), 0.9)
    assert "hint_loss" not in after.parts and "dep_loss" not in after.parts

    default, loss, _ = _one_loss({})  # on by default, at the weight the transfer study chose for Adam
    assert default.settings.feature_hint_weight == 0.3 and loss.parts["hint_loss"] > 0
    plain, loss, _ = _one_loss({"feature_hint": 0.0})  # the paper's objective: no hint kept
    assert "hint_loss" not in loss.parts
    assert not any(m.keeps_hint for m in plain.model.mixers.values())


def test_the_default_weight_follows_the_optimizer_and_a_given_one_wins() -> None:
    """Unset, the weight is the transfer study's choice for the optimizer; the spec keeps it unset, so that a
    spec whose optimizer is overridden later (``--set train.optimizer=sgd``, a tune's grid) gets that optimizer's."""
    sgd, loss, _ = _one_loss({"optimizer": "sgd"})
    assert sgd.settings.feature_hint is None and sgd.settings.feature_hint_weight == 1.0
    rest = loss.parts["task_loss"] + sgd.lambda1(0.5) * loss.parts["dep_loss"] + 0.1 * loss.parts["kl_loss"]
    assert loss.total.item() == pytest.approx((rest + 1.0 * loss.parts["hint_loss"]).item(), rel=1e-5)
    adam = graftnet.load_spec({"train": {"method": "scratch"}})
    assert adam.train is not None and adam.train.feature_hint_weight == 0.3
    moved = override_spec(adam, {"train.optimizer": "sgd"})
    assert moved.train is not None and moved.train.feature_hint_weight == 1.0
    given = override_spec(adam, {"train.optimizer": "sgd", "train.feature_hint": 0.3})
    assert given.train is not None and given.train.feature_hint_weight == 0.3
    assert {name: TrainSpec(optimizer=name).feature_hint_weight for name in ("adam", "adamw", "sgd")} == {
        "adam": 0.3, "adamw": 0.3, "sgd": 1.0
    }


def test_the_spec_takes_the_hint_weight_and_refuses_a_negative_one() -> None:
    spec = graftnet.load_spec({"train": {"method": "scratch", "feature_hint": 0.5}})
    assert spec.train is not None and spec.train.feature_hint == 0.5
    with pytest.raises(graftnet.SpecError, match="feature_hint"):
        graftnet.load_spec({"train": {"method": "scratch", "feature_hint": -1}})
