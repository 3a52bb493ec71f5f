"""Activations inside leaf modules are not graftable, and naming one says which leaf (issue 16, point 4)."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

import graftnet


class Closed(nn.Module):
    """A block with its own activation, kept as one opaque call."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.act = nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x))


graftnet.register_leaf_module(Closed)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.act0 = nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()
        self.body = nn.Sequential(Closed(), Closed())
        self.out, self.act1 = nn.Conv2d(8, 8, 1), nn.ReLU()
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act1(self.out(self.body(self.act0(self.stem(x))))).mean((2, 3)))


def name_error(student: nn.Module, site: str, shape: tuple[int, ...] = (3, 8, 8)) -> str:
    spec = {"input_shape": list(shape), "sites": [{"student": site, "taps": ["t:act0"]}]}
    with pytest.raises(graftnet.NameResolutionError) as info:
        graftnet.graft(student, {"t": Net()}, spec)
    return str(info.value)


@pytest.mark.parametrize(
    ("site", "says"),
    [
        ("body.0.act", "'body.0.act' (ReLU) runs inside 'body.0', a leaf module (Closed)"),
        ("body.1", "'body.1' is a leaf module (Closed)"),
        ("body", "every activation in 'body' (Sequential) runs inside leaf modules (body.0, body.1: Closed)"),
    ],
)
def test_naming_an_activation_in_a_leaf_names_the_leaf_and_the_graftable_names_around_it(site: str, says: str) -> None:
    msg = name_error(Net(), site)
    assert says in msg
    assert "registered with graftnet.register_leaf_module" in msg
    assert "nearest graftable names, just before and after: act0, act1" in msg
    assert [s.name for s in graftnet.sites(Net(), input_shape=(3, 8, 8))] == ["act0", "act1", "output"]


def test_a_timm_no_trace_block_is_named_with_timms_reason() -> None:
    model = timm.create_model("mobilevit_xxs", pretrained=False, num_classes=10)
    msg = name_error(model, "stages.3.1.transformer.0.mlp.act", (3, 64, 64))
    assert "runs inside 'stages.3.1', a leaf module (MobileVitBlock)" in msg
    assert "timm lists timm.models.mobilevit.MobileVitBlock among the modules FX cannot trace" in msg
    assert "stages.3.0.conv2_kxk.bn.act, stages.4.0.conv1_1x1.bn.act" in msg
