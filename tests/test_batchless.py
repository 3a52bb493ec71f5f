"""Activations without a batch dimension are not graftable (issue 16, point 1)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import graftnet


class RelPosNet(nn.Module):
    """A conv net plus a relative-position-style MLP over a coordinate table: the table has no batch dimension."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.act = nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()
        self.coords = nn.Parameter(torch.randn(5, 2))  # a table: no batch dimension
        self.meta_mlp = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 8))
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.conv(x)).mean((2, 3)) + self.meta_mlp(self.coords).mean(0))


X = torch.randn(2, 3, 8, 8)


def test_sites_leave_out_activations_without_a_batch_dimension() -> None:
    assert [s.name for s in graftnet.sites(RelPosNet(), example_input=X)] == ["act", "output"]


def test_a_table_whose_rows_equal_the_batch_size_is_still_found() -> None:
    # 5 coordinate rows and an example batch of 5: only a second batch size tells the table from the batch
    assert [s.name for s in graftnet.sites(RelPosNet(), example_input=torch.randn(5, 3, 8, 8))] == ["act", "output"]


@pytest.mark.parametrize(
    ("site", "tap", "message"),
    [
        ("act", "t:meta_mlp.1", "'meta_mlp.1' in teacher 't' runs on a tensor without the batch dimension"),
        ("meta_mlp.1", "t:act", "'meta_mlp.1' in the student runs on a tensor without the batch dimension"),
        ("meta_mlp", "t:act", "every activation inside 'meta_mlp' in the student"),
    ],
)
def test_naming_one_is_a_name_error_that_says_why(site: str, tap: str, message: str) -> None:
    with pytest.raises(graftnet.NameResolutionError, match=message):
        graftnet.graft(RelPosNet(), {"t": RelPosNet()}, {"sites": [{"student": site, "taps": [tap]}]},
                       example_input=X)  # fmt: skip


def test_a_graft_on_the_batched_activation_still_works() -> None:
    g = graftnet.graft(RelPosNet(), {"t": RelPosNet()}, {"sites": [{"student": "act", "taps": ["t:act"]}]},
                       example_input=X)  # fmt: skip
    assert g(X).shape == (2, 3)


@pytest.mark.parametrize(
    ("model", "kwargs", "batchless_part"),
    [
        ("swinv2_cr_tiny_ns_224", {"img_size": (64, 64)}, r"\.attn\.meta_mlp\."),  # relative-position MLP
        ("swinv2_tiny_window8_256", {"img_size": 64}, r"\.attn\.cpb_mlp\.|^sigmoid"),  # its MLP, and the bias table
        ("maxxvit_rmlp_nano_rw_256", {"img_size": 64}, r"\.rel_pos\.mlp\."),  # relative-position MLP
        ("vit_srelpos_small_patch16_224", {"img_size": 64}, r"^shared_rel_pos\.mlp\."),  # one shared table
        ("tnt_s_patch16_224", {"img_size": 64}, r"\.mlp_in\."),  # inner tokens: batch × patches merged
    ],
)
def test_timm_relative_position_mlps_and_merged_batches_are_not_offered(
    model: str, kwargs: dict[str, object], batchless_part: str
) -> None:
    import re

    import timm

    from graftnet._names import catalogue
    from graftnet._trace import propagate_shapes, trace

    m = timm.create_model(model, **kwargs)
    traced = trace(m, training_modes=(False,))
    propagate_shapes(traced, (torch.randn(2, 3, 64, 64),))
    acts = catalogue(traced)
    batchless = [a.name for a in acts if not a.batched]
    assert batchless and all(re.search(batchless_part, name) for name in batchless), batchless
    offered = {s.name for s in graftnet.sites(m, input_shape=(3, 64, 64))}
    assert offered == {a.name for a in acts if a.batched} and not offered & set(batchless)
    with pytest.raises(graftnet.NameResolutionError, match="without the batch dimension"):
        graftnet.graft(m, {"t": m}, {"sites": [{"student": batchless[0], "taps": [f"t:{batchless[0]}"]}]},
                       example_input=torch.randn(2, 3, 64, 64))  # fmt: skip
