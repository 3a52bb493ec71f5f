"""The model's output as a site and a tap: a student's logits mixed with a teacher's (the paper's Table 4)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graftnet
from graftnet.models import build_model


def mlp(hidden: int) -> nn.Module:
    torch.manual_seed(hidden)
    return build_model("graftnet:mlp", {"in_features": 12, "hidden": [hidden, hidden], "num_classes": 5})


SPEC = {"input_shape": [12], "sites": [{"student": "output", "taps": ["big:output"]},
                                       {"student": "body.2", "taps": ["big:body.2"]}]}  # fmt: skip
X = torch.randn(6, 12)


def test_the_output_is_listed_last_with_the_logits_shape() -> None:
    listed = graftnet.sites(mlp(8), input_shape=(12,))
    assert (listed[-1].name, listed[-1].shape, listed[-1].kind, str(listed[-1].layout)) == ("output", (5,), "output",
                                                                                            "vector")  # fmt: skip


def test_mixing_the_outputs_trains_and_detaches_exactly() -> None:
    student, teacher = mlp(8), mlp(16)
    g = graftnet.graft(student, {"big": teacher}, SPEC)
    assert g.teachers["big"].children_cut == ()  # a tap at the output runs the whole teacher
    with torch.no_grad():
        expected = 0.5 * student(X) + 0.5 * g.mixers["output"].tap_scale[0] * teacher(X)  # uniform p_w, identity Q
        g.eval()
        mixed_body = g(X)
    assert not torch.allclose(mixed_body, student(X))
    g.train()
    loss = F.cross_entropy(g(X), torch.arange(6) % 5)
    loss.backward()
    assert g.mixers["output"].logits.grad is not None and g.mixers["output"].logits.grad.abs().sum() > 0
    for mixer in g.mixers.values():
        with torch.no_grad():
            mixer.logits.copy_(torch.tensor([0.0, -float("inf")]))
    g.eval()
    torch.testing.assert_close(g(X), student(X))
    fresh = mlp(8)
    fresh.load_state_dict(graftnet.detach(g).state_dict(), strict=True)
    torch.testing.assert_close(fresh(X), student(X))
    # and the output mix alone is what it says: p0·z + p1·s·t at uniform p_w
    only = graftnet.graft(mlp(8), {"big": mlp(16)}, {"input_shape": [12], "sites": [SPEC["sites"][0]]}).eval()
    with torch.no_grad():
        torch.testing.assert_close(only(X), expected)


class ActorCritic(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.act = nn.Linear(12, 8), nn.ReLU()
        self.policy, self.value = nn.Linear(8, 3), nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.act(self.fc(x))
        return self.policy(h), self.value(h)


def test_a_model_that_returns_a_tuple_has_no_output_site() -> None:
    assert [s.name for s in graftnet.sites(ActorCritic(), input_shape=(12,))] == ["act"]
    with pytest.raises(graftnet.NameResolutionError, match="'output' in the student cannot be mixed: it returns a"):
        graftnet.graft(ActorCritic(), {"t": ActorCritic()}, {"input_shape": [12], "sites": [
            {"student": "output", "taps": ["t:act"]}]})  # fmt: skip


class NamedOutput(nn.Module):
    """An activation module called ``output``: the name stays the module's."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.output = nn.Linear(12, 5), nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.fc(x))


def test_a_module_named_output_keeps_the_name() -> None:
    listed = graftnet.sites(NamedOutput(), input_shape=(12,))
    assert [(s.name, s.kind) for s in listed] == [("output", "Sigmoid")]
