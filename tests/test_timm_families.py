"""One small model of every timm family in timm's own FX tests, grafted as student and as teacher (slow).

Run with ``python -m pytest tests/test_timm_families.py -m slow -rf``. A family is the timm module a model is
registered from; its model here is the one with the fewest parameters (at most 60M) among the models that timm's
``test_model_forward_fx`` covers. Collection only lists the module names: the models are counted (on the meta
device) and built when a family's first case runs. Each case records its outcome, and a summary with the pass count
per role is written at the end of the run. Three families are refused by design (``REFUSED``): their cases pass
when graftnet refuses them with the documented reason, and fail when it grafts them or refuses for another.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import timm
import torch
from _zoo import check_graft, first_tensor
from timm.models import get_pretrained_cfg_value
from torch import nn

import graftnet

pytestmark = pytest.mark.slow

# timm's tests/test_models.py: test_model_forward_fx runs list_models(exclude_filters=EXCLUDE_FX_FILTERS), skipping
# models whose default input is larger than its FX size limit.
EXCLUDE_FX_FILTERS = ["vit_gi*", "hiera*", "gemma4_vit*"]
MAX_FX_INPUT = 256
MAX_PARAMS = 60_000_000
SIDE = 96  # the input side used wherever the model allows it, as in the study behind the issue
ROLES = ("student", "teacher")

RESULTS: dict[str, dict[str, str]] = {role: {} for role in ROLES}  # role -> family -> "pass" / "skip: ..." / error

# Families whose middle site graftnet refuses to map onto resnet18's layer2 (and back), by design (README, "Across
# timm"): the error must name the reason. If one of them starts to graft, the test fails, so the README is updated.
REFUSED = {
    "efficientvim": "the graph shows no grid that would reshape one into the other",  # (192, 25): 25 slots, no grid
    "levit": "tokens map onto a feature map only when the graph shows the grid",  # subsampled tokens
    "tnt": "tokens map onto a feature map only when the graph shows the grid",
}


@dataclass(frozen=True)
class Pick:
    """A family's model: its name, parameter count, constructor kwargs and one sample's input shape."""

    name: str
    params: int
    kwargs: tuple[tuple[str, Any], ...]
    shape: tuple[int, int, int]

    def build(self) -> nn.Module:
        return timm.create_model(self.name, pretrained=False, num_classes=10, **dict(self.kwargs))


@functools.cache
def fx_models() -> frozenset[str]:
    """timm's FX test set: every model but the excluded, with a default input of at most MAX_FX_INPUT."""
    names = timm.list_models(exclude_filters=EXCLUDE_FX_FILTERS)
    sizes = {n: get_pretrained_cfg_value(n, "input_size") for n in names}
    return frozenset(n for n, size in sizes.items() if size is not None and max(size[1:]) <= MAX_FX_INPUT)


def n_params(name: str) -> int | None:
    """Parameters of ``name`` with 10 classes, counted on the meta device (no memory, no init); None if it fails."""
    try:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False, num_classes=10)
    except Exception:
        return None
    return sum(p.numel() for p in model.parameters())


def _recipes(name: str) -> Iterator[tuple[dict[str, Any], tuple[int, int, int]]]:
    """Ways to build and feed ``name``, preferred first: img_size=96, a 96×96 input, then its default input."""
    c, h, w = get_pretrained_cfg_value(name, "input_size")
    yield {"img_size": SIDE}, (c, SIDE, SIDE)
    if not get_pretrained_cfg_value(name, "fixed_input_size"):
        yield {}, (c, SIDE, SIDE)
    yield {}, (c, h, w)


@functools.cache
def pick(family: str) -> Pick | str:
    """The family's smallest model in timm's FX test set and a recipe its plain timm forward runs with, or why none."""
    models = [n for n in timm.list_models(module=family) if n in fx_models()]
    if not models:
        return "no model in timm's FX test set"
    counted = sorted((p, n) for n in models if (p := n_params(n)) is not None and p <= MAX_PARAMS)
    if not counted:
        return f"no model at <= {MAX_PARAMS // 10**6}M parameters (of {len(models)}: {', '.join(models[:5])}, ...)"
    params, name = counted[0]
    errors = []
    for kwargs, shape in _recipes(name):
        try:
            torch.manual_seed(0)
            model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs).eval()
            with torch.no_grad():
                first_tensor(model(torch.randn(2, *shape)))
        except Exception as e:
            errors.append(f"{kwargs or 'no kwargs'} at {shape}: {type(e).__name__}: {e}")
            continue
        return Pick(name, params, tuple(kwargs.items()), shape)
    raise AssertionError(f"{name}: timm's own forward fails with every recipe: {'; '.join(errors)}"[:2000])


def resnet18() -> nn.Module:
    return timm.create_model("resnet18", pretrained=False, num_classes=10)


def middle_site(model: nn.Module, shape: tuple[int, ...]) -> str:
    offered = [s for s in graftnet.sites(model, input_shape=shape) if s.kind != "output"]  # activations only
    assert offered, "graftnet.sites offers no activation"
    return offered[len(offered) // 2].name


class Summary:
    """A pytest plugin that adds, to the terminal summary, the pass count per role, the skips and each failure."""

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if not any(RESULTS.values()):
            return
        write = terminalreporter.write_line
        terminalreporter.section("timm families grafted")
        write("student: the family's model with resnet18's layer2 tapped in; teacher: the reverse")
        for role, outcomes in RESULTS.items():
            passed = sum(v == "pass" for v in outcomes.values())
            skipped = sorted(f for f, v in outcomes.items() if v.startswith("skip"))
            refused = sorted(f for f, v in outcomes.items() if v == "refused")
            failed = {f: v for f, v in outcomes.items() if v not in ("pass", "refused") and not v.startswith("skip")}
            write(f"as {role}: {passed} passed of {len(outcomes) - len(skipped)} families run, "
                  f"{len(refused)} refused as documented ({', '.join(refused) or 'none'}), "
                  f"{len(skipped)} skipped ({', '.join(skipped) or 'none'})")  # fmt: skip
            for family, why in sorted(failed.items()):
                write(f"  FAILED {family}: {why[:400]}")


@pytest.fixture(scope="module", autouse=True)
def _summary(request: pytest.FixtureRequest) -> None:
    manager = request.config.pluginmanager
    if manager.get_plugin("timm-families-summary") is None:
        manager.register(Summary(), "timm-families-summary")


@pytest.mark.timeout(1200)
@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("family", timm.list_modules())
def test_graft_timm_family(family: str, role: str) -> None:
    outcomes = RESULTS[role]
    outcomes[family] = "did not finish (timed out?)"
    try:
        chosen = pick(family)
    except Exception as e:
        outcomes[family] = f"{type(e).__name__}: {e}"
        raise
    if isinstance(chosen, str):
        outcomes[family] = f"skip: {chosen}"
        pytest.skip(f"{family}: {chosen}")
    try:
        _graft(chosen, role)
    except Exception as e:
        if family in REFUSED and isinstance(e, graftnet.AdapterError) and REFUSED[family] in str(e):
            outcomes[family] = "refused"
            return
        outcomes[family] = f"{chosen.name}: {type(e).__name__}: {e}"
        raise AssertionError(f"{chosen.name} {chosen.shape} as {role}: {type(e).__name__}: {e}") from e
    if family in REFUSED:
        outcomes[family] = f"{chosen.name}: grafts, though REFUSED (and the README) say it is refused"
        pytest.fail(f"{family}: {outcomes[family]}: update REFUSED and the README's count")
    outcomes[family] = "pass"


def _graft(chosen: Pick, role: str) -> None:
    """``chosen`` as the student with resnet18's layer2 tapped in (role "student"), or resnet18 as the student
    tapping ``chosen`` (role "teacher"): graft, train a step, detach and reload (tests/_zoo.py's check_graft)."""
    torch.manual_seed(0)
    model = chosen.build()
    cnn = resnet18()
    # timm zero-initialises the last norm of many residual branches, so at init a site inside one may pass no
    # gradient back to its adapter: only finiteness is checked here (tests/test_layouts.py checks more)
    if role == "student":
        check_graft(model, {"cnn": cnn}, middle_site(model, chosen.shape), "cnn:layer2", chosen.shape, chosen.build,
                    nonzero_gradient=False)  # fmt: skip
    else:
        check_graft(cnn, {"t": model}, "layer2", "t:" + middle_site(model, chosen.shape), chosen.shape, resnet18,
                    nonzero_gradient=False)  # fmt: skip
