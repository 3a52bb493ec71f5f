"""Wide-ResNet for 32×32 inputs: shapes, the paper's parameter count, site names, and grafting."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import graftnet
from graftnet.models.wide_resnet import WideResNet, wide_resnet_cifar


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(("depth", "widen_factor", "num_classes"), [(10, 1, 10), (16, 2, 100)])
def test_output_shape(depth: int, widen_factor: int, num_classes: int) -> None:
    model = wide_resnet_cifar(depth=depth, widen_factor=widen_factor, num_classes=num_classes, drop_rate=0.3)
    assert model.input_shape == (3, 32, 32)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, num_classes)


def test_in_channels() -> None:
    model = wide_resnet_cifar(depth=10, widen_factor=1, num_classes=10, in_channels=1)
    assert model.input_shape == (1, 32, 32)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)


def test_wrn_28_10_has_the_papers_36_5m_parameters() -> None:
    # Zagoruyko & Komodakis (2016), table 4: WRN-28-10 has 36.5M parameters; 100 classes add 64·640 + 90.
    count = n_params(wide_resnet_cifar(depth=28, widen_factor=10, num_classes=100))
    assert count == 36_536_884
    assert abs(count - 36.5e6) <= 0.005 * 36.5e6


@pytest.mark.parametrize(("depth", "widen_factor", "millions"), [(40, 4, 8.9), (16, 8, 11.0)])
def test_other_paper_parameter_counts(depth: int, widen_factor: int, millions: float) -> None:
    # Same table, CIFAR-10 heads: WRN-40-4 8.9M, WRN-16-8 11.0M.
    count = n_params(wide_resnet_cifar(depth=depth, widen_factor=widen_factor, num_classes=10))
    assert round(count / 1e6, 1) == millions


@pytest.mark.parametrize("depth", [4, 12, 27, 29, 0, -2])
def test_bad_depth_raises(depth: int) -> None:
    with pytest.raises(ValueError, match=r"depth must be 6n \+ 4.*10, 16, 22, 28, 40"):
        wide_resnet_cifar(depth=depth)


def test_bad_widen_factor_raises() -> None:
    with pytest.raises(ValueError, match="widen_factor"):
        wide_resnet_cifar(depth=10, widen_factor=0)


def test_init() -> None:
    model = wide_resnet_cifar(depth=10, widen_factor=1, num_classes=10)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.equal(m.weight, torch.ones_like(m.weight))
            assert torch.equal(m.bias, torch.zeros_like(m.bias))
        elif isinstance(m, nn.Conv2d):
            assert m.bias is None
    assert torch.equal(model.head.bias, torch.zeros(10))


def test_shortcut_only_where_the_shape_changes() -> None:
    model = wide_resnet_cifar(depth=16, widen_factor=1)
    # Stage 1 keeps 16 channels at k = 1, so its first block needs no projection; stages 2 and 3 do.
    assert [name for name, m in model.named_modules() if name.endswith("shortcut")] == [
        "stage2.0.shortcut",
        "stage3.0.shortcut",
    ]
    model = wide_resnet_cifar(depth=16, widen_factor=2)
    assert "stage1.0.shortcut" in dict(model.named_modules())


def test_sites_in_execution_order() -> None:
    names = [s.name for s in graftnet.sites(wide_resnet_cifar(depth=16, widen_factor=1), input_shape=(3, 32, 32))]
    blocks = [f"stage{s}.{b}.act{a}" for s in (1, 2, 3) for b in (0, 1) for a in (1, 2)]
    assert names == [*blocks, "act", "output"]


def test_sites_shapes_wrn_10_1() -> None:
    found = graftnet.sites(wide_resnet_cifar(depth=10, widen_factor=1), input_shape=(3, 32, 32))
    assert [s.name for s in found] == [
        "stage1.0.act1",
        "stage1.0.act2",
        "stage2.0.act1",
        "stage2.0.act2",
        "stage3.0.act1",
        "stage3.0.act2",
        "act",
        "output",
    ]
    # Each act1 sees its block's input width and resolution, each act2 the block's output.
    assert [s.shape for s in found] == [
        (16, 32, 32),
        (16, 32, 32),
        (16, 32, 32),
        (32, 16, 16),
        (32, 16, 16),
        (64, 8, 8),
        (64, 8, 8),
        (100,),  # the output: the logits
    ]


def test_build_model() -> None:
    model = graftnet.build_model("graftnet:wide_resnet_cifar", {"depth": 10, "widen_factor": 1, "num_classes": 10})
    assert isinstance(model, WideResNet)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_graft_student_only_equals_student() -> None:
    student = wide_resnet_cifar(depth=10, widen_factor=1, num_classes=10)
    teacher = wide_resnet_cifar(depth=10, widen_factor=2, num_classes=10)
    spec = {"input_shape": [3, 32, 32], "sites": [{"student": "stage2.0.act2", "taps": ["t:stage2.0.act2"]}]}
    g = graftnet.graft(student, {"t": teacher}, spec)
    assert list(g.mixers) == ["stage2.0.act2"]
    x = torch.randn(2, 3, 32, 32)
    g.eval()
    student.eval()
    (mixer,) = g.mixers.values()
    with torch.no_grad():
        mixer.logits.data = torch.tensor([50.0, -50.0])
        torch.testing.assert_close(g(x), student(x))
        # ... and the teacher does reach the output when it has the weight.
        mixer.logits.data = torch.tensor([-50.0, 50.0])
        assert not torch.allclose(g(x), student(x))
    g.train()
    assert g(x).shape == (2, 10)  # the train-mode graph (BatchNorm batch statistics) runs too
