"""Layouts read from the graph, and adapters that map between them (issue 16, points 2 and 3)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from _zoo import check_graft
from torch import nn

import graftnet
from graftnet.adapters import MapAdapter, MapToTokens, MoveChannels, TokensToMap, make_adapter
from graftnet.layouts import Layout


class ConvNet(nn.Module):
    """Channels first: conv → ReLU."""

    def __init__(self, channels: int = 8) -> None:
        super().__init__()
        self.conv, self.act = nn.Conv2d(3, channels, 3, padding=1), nn.ReLU()
        self.head = nn.Linear(channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.conv(x)).mean((2, 3)))


class ChannelsLastNet(nn.Module):
    """A ConvNeXt-style block: the MLP runs on (B, H, W, C) between two permutes."""

    def __init__(self, channels: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.norm = nn.LayerNorm(channels)
        self.fc1, self.act, self.fc2 = nn.Linear(channels, 2 * channels), nn.GELU(), nn.Linear(2 * channels, channels)
        self.head = nn.Linear(channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = self.fc2(self.act(self.fc1(self.norm(x.permute(0, 2, 3, 1))))).permute(0, 3, 1, 2)
        return self.head((x + y).mean((2, 3)))


class TokenNet(nn.Module):
    """A ViT-style net: conv patches → tokens, a class token in front, an MLP over tokens."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 2, stride=2)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.fc1, self.act, self.fc2 = nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.patch(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(t.shape[0], -1, -1), t], dim=1)
        t = t + self.fc2(self.act(self.fc1(t)))
        return self.head(t[:, 0])


class Opaque(nn.Module):
    """A module graftnet keeps closed: what it does to the axes cannot be read from the graph."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


graftnet.register_leaf_module(Opaque)


class OpaqueNet(nn.Module):
    def __init__(self, channels: int = 8) -> None:
        super().__init__()
        self.conv, self.opaque, self.act = nn.Conv2d(3, channels, 3, padding=1), Opaque(), nn.ReLU()
        self.head = nn.Linear(channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.opaque(self.conv(x))).flatten(2).mean(2))


X = torch.randn(2, 3, 8, 8)


def layouts(model: nn.Module) -> dict[str, str]:
    return {s.name: str(s.layout) for s in graftnet.sites(model, example_input=X) if s.name != "output"}


def test_layouts_are_read_from_the_ops_around_each_activation() -> None:
    assert layouts(ConvNet()) == {"act": "channels_first"}
    assert layouts(ChannelsLastNet()) == {"act": "channels_last"}
    assert layouts(TokenNet()) == {"act": "tokens 4×4+1"}  # 16 patches from the conv's grid, the class token in front
    assert layouts(OpaqueNet()) == {"act": "unknown"}  # never guessed from the rank


def test_a_channels_last_tap_is_moved_to_channels_first_before_the_1x1_conv() -> None:
    # equal shapes (8, 8, 8) in different layouts: identity would silently mix channels with rows
    adapter = make_adapter("auto", (8, 8, 8), (8, 8, 8), Layout("channels_last"), Layout("channels_first"))
    assert isinstance(adapter, nn.Sequential) and isinstance(adapter[0], MoveChannels)
    t = torch.randn(2, 8, 8, 8)
    conv = adapter[1].conv
    torch.testing.assert_close(adapter(t), conv(t.permute(0, 3, 1, 2)))


def test_the_resize_runs_on_the_spatial_axes_of_each_layout() -> None:
    # tap (H, W, C) = (4, 6, 3) channels last → site (C, H, W) = (5, 2, 3) channels first
    adapter = make_adapter("auto", (4, 6, 3), (5, 2, 3), Layout("channels_last"), Layout("channels_first"))
    t = torch.randn(2, 4, 6, 3)
    core = adapter[1]
    assert isinstance(core, MapAdapter)
    want = core.conv(F.adaptive_avg_pool2d(t.permute(0, 3, 1, 2), (2, 3)))
    torch.testing.assert_close(adapter(t), want)
    # and back: a channels-first tap onto a channels-last site of (H, W, C) = (2, 3, 5)
    back = make_adapter("auto", (3, 4, 6), (2, 3, 5), Layout("channels_first"), Layout("channels_last"))
    assert back(torch.randn(2, 3, 4, 6)).shape == (2, 2, 3, 5)


def test_tokens_and_maps_convert_through_the_grid() -> None:
    tokens = torch.randn(2, 1 + 12, 5)  # a class token, then a 3×4 grid of 5-dim tokens
    as_map = TokensToMap((3, 4), prefix=1)(tokens)
    assert as_map.shape == (2, 5, 3, 4)
    torch.testing.assert_close(as_map[:, :, 1, 2], tokens[:, 1 + 1 * 4 + 2])  # row-major, after the class token
    back = MapToTokens(prefix=1)(as_map)
    torch.testing.assert_close(back[:, 1:], tokens[:, 1:])
    torch.testing.assert_close(back[:, 0], tokens[:, 1:].mean(1))  # the class token gets the map's average


def test_the_token_adapter_is_a_pool_and_a_1x1_projection() -> None:
    site = Layout("tokens", (6, 6), 1)  # a ViT-S/16 at 96×96: 36 patches and a class token, 384 dims
    adapter = make_adapter("auto", (128, 12, 12), (37, 384), Layout("channels_first"), site)
    assert [type(m).__name__ for m in adapter] == ["MapAdapter", "MapToTokens"]
    assert sum(p.numel() for p in adapter.parameters()) == 128 * 384 + 384  # not 10⁹: flatten+Linear would be
    assert adapter(torch.randn(2, 128, 12, 12)).shape == (2, 37, 384)
    reverse = make_adapter("auto", (37, 384), (128, 12, 12), site, Layout("channels_first"))
    assert [type(m).__name__ for m in reverse] == ["TokensToMap", "MapAdapter"]
    assert reverse(torch.randn(2, 37, 384)).shape == (2, 128, 12, 12)
    # token to token of one length and the same class tokens: Linear token by token
    assert isinstance(make_adapter("auto", (37, 192), (37, 384), site, site), nn.Linear)


@pytest.mark.parametrize(
    ("tap", "site", "message"),
    [
        (((8, 8, 8), "unknown"), ((16, 8, 8), "channels_first"), "the tap's layout .* cannot be read"),
        (((8, 8, 8), "channels_first"), ((16, 8, 8), "unknown"), "the site's layout .* cannot be read"),
        (((8, 8, 8), "channels_first"), ((37, 16), "tokens"), "tokens map onto a feature map only when the graph"),
        (((8, 8, 8), "channels_first"), ((16, 25), "channels_first"), "reads as a 2-D map and the site as a 1-D"),
    ],
)
def test_what_cannot_be_read_is_refused(
    tap: tuple[tuple[int, ...], str], site: tuple[tuple[int, ...], str], message: str
) -> None:
    with pytest.raises(graftnet.AdapterError, match=message):
        make_adapter("auto", tap[0], site[0], Layout(tap[1]), Layout(site[1]))


def test_an_unknown_layout_of_the_same_shape_is_the_same_architecture_case() -> None:
    g = graftnet.graft(OpaqueNet(), {"t": ConvNet()}, {"sites": [{"student": "act", "taps": ["t:act"]}]},
                       example_input=X)  # fmt: skip
    assert isinstance(g.mixers["act"].adapters[0], nn.Identity)
    with pytest.raises(graftnet.AdapterError, match=r"sites\[0\]\.taps\[0\].*the site's layout"):
        graftnet.graft(OpaqueNet(), {"t": ConvNet(16)}, {"sites": [{"student": "act", "taps": ["t:act"]}]},
                       example_input=X)  # fmt: skip


def test_grafts_between_layouts_are_exact_when_the_student_takes_over() -> None:
    for student, teacher in [(ChannelsLastNet, TokenNet), (TokenNet, ChannelsLastNet), (TokenNet, ConvNet)]:
        torch.manual_seed(0)
        check_graft(student(), {"t": teacher(16)}, "act", "t:act", (3, 8, 8), student)


def timm_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=10, **TIMM[name][1])


# model: (its site, kwargs) at 96×96; the ViT/DeiT/Swin sites are token sequences, EdgeNeXt's channels last
TIMM: dict[str, tuple[str, dict[str, int]]] = {
    "edgenext_xx_small": ("stages.1.blocks.1.mlp.act", {}),
    "convnext_atto": ("stages.1.blocks.1.mlp.act", {}),
    "swin_tiny_patch4_window7_224": ("layers.1.blocks.1.mlp.act", {"img_size": 96, "window_size": 6}),
    "test_vit": ("blocks.2.mlp.act", {"img_size": 96}),
    "deit_tiny_patch16_224": ("blocks.5.mlp.act", {"img_size": 96}),
}
LAYOUT = {"edgenext_xx_small": "channels_last", "convnext_atto": "channels_first",
          "swin_tiny_patch4_window7_224": "tokens 12×12", "test_vit": "tokens 6×6+1",
          "deit_tiny_patch16_224": "tokens 6×6+1"}  # fmt: skip
SHAPE = (3, 96, 96)


@pytest.mark.parametrize("name", sorted(TIMM))
@pytest.mark.parametrize("role", ["student", "teacher"])
def test_timm_models_of_every_layout_graft_with_a_cnn(name: str, role: str) -> None:
    site = TIMM[name][0]
    offered = {s.name: s for s in graftnet.sites(timm_model(name), input_shape=SHAPE)}
    assert str(offered[site].layout) == LAYOUT[name]
    cnn = lambda: timm.create_model("resnet18", pretrained=False, num_classes=10)  # noqa: E731
    if role == "student":
        g = check_graft(timm_model(name), {"cnn": cnn()}, site, "cnn:layer2", SHAPE, lambda: timm_model(name))
    else:
        g = check_graft(cnn(), {"t": timm_model(name)}, "layer2", f"t:{site}", SHAPE, cnn)
    adapter = next(iter(g.mixers.values())).adapters[0]
    convs = [m for m in adapter.modules() if isinstance(m, nn.Conv2d)]  # the only parameters: one 1×1 conv
    assert len(convs) == 1
    assert sum(p.numel() for p in adapter.parameters()) == sum(p.numel() for p in convs[0].parameters())


def test_nodes_and_check_show_layouts_and_adapter_parameters(tmp_path: Path) -> None:
    nodes = subprocess.run(
        [sys.executable, "-m", "graftnet", "nodes", "timm:test_vit", "--kwargs", "{img_size: 96, num_classes: 10}",
         "--input-shape", "3", "96", "96"], capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert "layout" in nodes.splitlines()[1] and "blocks.0.mlp.act" in nodes and "tokens 6×6+1" in nodes
    spec = tmp_path / "vit.yaml"
    spec.write_text(
        "student: {model: 'timm:test_vit', kwargs: {img_size: 96, num_classes: 10}}\n"
        "teachers: {cnn: {model: 'timm:resnet18', kwargs: {num_classes: 10}}}\n"
        "input_shape: [3, 96, 96]\n"
        "sites: [{student: blocks.2.mlp.act, taps: ['cnn:layer2']}]\n"
    )
    check = subprocess.run([sys.executable, "-m", "graftnet", "check", str(spec)], capture_output=True, text=True,
                           check=True).stdout  # fmt: skip
    assert "tokens 6×6+1" in check and "channels_first" in check
    assert "MapAdapter → MapToTokens (24,768 parameters)" in check  # a 1×1 conv from 128 to 192 channels


def test_a_vit_student_learns_through_a_cnn_teachers_token_adapter() -> None:
    torch.manual_seed(0)
    vit, cnn = timm_model("test_vit"), timm.create_model("resnet18", pretrained=False, num_classes=10)
    spec = {"input_shape": list(SHAPE), "sites": [{"student": "blocks.2.mlp.act", "taps": ["cnn:layer2"]}]}
    g = graftnet.graft(vit, {"cnn": cnn}, spec)
    x, y = torch.randn(8, *SHAPE), torch.arange(8) % 10
    opt = torch.optim.Adam([p for p in g.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(8):
        loss = F.cross_entropy(g(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.75 * losses[0]  # it fits the batch through the mixed tokens (2.33 → 1.17 measured)
    adapter = g.mixers["blocks.2.mlp.act"].adapters[0]
    assert adapter[0].conv.weight.grad is not None and adapter[0].conv.weight.grad.abs().sum() > 0
