"""Grafting real models: timm, torchvision and graftnet's own, as students and as teachers.

The reference for every rewrite is the untouched model: with p_w(student) = 1 at every site the grafted
model must compute exactly what the student computes, in eval and in train mode, BatchNorm buffers included.
Image models run on 32×32 inputs so the whole file stays fast on a small CPU.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import graftnet

GOLDEN = Path(__file__).parent / "golden"


# --- helpers -------------------------------------------------------------------------------------------------


def build(ref: str, **kwargs: Any) -> nn.Module:
    if ref.startswith("timm:resnet"):
        # timm zero-initialises the last BatchNorm of every residual branch: every block would start as its
        # shortcut, drop-path would have nothing to drop and gradients would stop there. Keep branches live.
        kwargs.setdefault("zero_init_last", False)
    return graftnet.build_model(ref, kwargs)


def outputs(y: Any) -> tuple[torch.Tensor, ...]:
    return tuple(y) if isinstance(y, (tuple, list)) else (y,)


def assert_same(a: Any, b: Any) -> None:
    a, b = outputs(a), outputs(b)
    assert len(a) == len(b)
    for u, v in zip(a, b, strict=True):
        assert u.shape == v.shape
        assert torch.equal(u, v), f"max |diff| = {(u - v).abs().max().item():.3g}"


def differs(a: Any, b: Any) -> bool:
    return any(not torch.equal(u, v) for u, v in zip(outputs(a), outputs(b), strict=True))


def run(model: nn.Module, x: torch.Tensor, seed: int) -> Any:
    torch.manual_seed(seed)
    return model(x)


def student_only(g: graftnet.GraftedModel) -> None:
    """p_w(student) = 1 exactly at every site: logits [0, -inf, ...]."""
    with torch.no_grad():
        for mixer in g.mixers.values():
            mixer.logits.fill_(float("-inf"))
            mixer.logits[0] = 0.0


def uniform(g: graftnet.GraftedModel) -> None:
    with torch.no_grad():
        for mixer in g.mixers.values():
            mixer.logits.zero_()


def random_loss(y: Any) -> torch.Tensor:
    # A random projection: a plain sum can have zero gradient (e.g. sums of BatchNorm outputs over the batch).
    return sum((u * torch.randn_like(u)).sum() for u in outputs(y))  # type: ignore[return-value]


def assert_states_equal(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    different = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not different, f"state differs at {different[:5]}"


def cloned_state(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def assert_states_equal_to(m: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = m.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"changed: {changed[:5]}"


def spec(input_shape: tuple[int, ...], sites: list[tuple[str, list[str]]], **extra: Any) -> dict[str, Any]:
    return {
        "input_shape": list(input_shape),
        "sites": [{"student": s, "taps": list(taps)} for s, taps in sites],
        **extra,
    }


# --- every model as a student (and, across the table, as a teacher) -----------------------------------------


@dataclass(frozen=True)
class Case:
    student: tuple[str, dict[str, Any]]
    teacher: tuple[str, dict[str, Any]]
    input_shape: tuple[int, ...]
    sites: list[tuple[str, list[str]]]
    resolved: list[str]  # the activation names the site queries must resolve to
    batch: int = 2
    teacher_input: list[dict[str, Any]] = field(default_factory=list)


CASES = [
    pytest.param(
        Case(("timm:resnet18", {"num_classes": 10}), ("timm:resnet50", {}), (3, 32, 32),
             [("act1", ["t:act1"]), ("layer1", ["t:layer2.1.act2"]), ("layer3.0.act2", ["t:layer3"])],
             ["act1", "layer1.1.act2", "layer3.0.act2"]),
        id="timm-resnet18<-timm-resnet50"),
    pytest.param(
        Case(("timm:resnet50", {"num_classes": 10}), ("timm:resnet18", {}), (3, 32, 32),
             [("layer1.0.act3", ["t:layer1.0.act2"]), ("layer4", ["t:layer4"])],
             ["layer1.0.act3", "layer4.2.act3"]),
        id="timm-resnet50<-timm-resnet18"),
    pytest.param(
        Case(("timm:densenet121", {"num_classes": 10}), ("torchvision:densenet121", {}), (3, 32, 32),
             [("features.norm0.act", ["t:features.relu0"]),
              ("features.denseblock2", ["t:features.denseblock2.denselayer3.relu2"]),
              ("features.norm5.act", ["t:relu"])],
             ["features.norm0.act", "features.denseblock2.denselayer12.norm2.act", "features.norm5.act"]),
        id="timm-densenet121<-torchvision-densenet121"),
    pytest.param(
        Case(("torchvision:resnet18", {"num_classes": 10}), ("timm:densenet121", {}), (3, 32, 32),
             [("relu", ["t:features.norm0.act"]), ("layer1.0.relu@1", ["t:features.transition1"]),
              ("layer4.1.relu@0", ["t:features.norm5.act"])],
             ["relu", "layer1.0.relu@1", "layer4.1.relu@0"]),
        id="torchvision-resnet18<-timm-densenet121"),
    pytest.param(
        Case(("torchvision:densenet121", {"num_classes": 10}), ("torchvision:resnet18", {}), (3, 32, 32),
             [("features.relu0", ["t:relu"]), ("features.denseblock1.denselayer2.relu1", ["t:layer1.1.relu@1"]),
              ("relu", ["t:layer4"])],
             ["features.relu0", "features.denseblock1.denselayer2.relu1", "relu"]),
        id="torchvision-densenet121<-torchvision-resnet18"),
    pytest.param(
        Case(("graftnet:a3c", {}), ("graftnet:a3c", {"num_actions": 18}), (4, 84, 84),
             [("features.1", ["t:features.3"]), ("features.3", ["t:features.1"]), ("act", ["t:act"])],
             ["features.1", "features.3", "act"]),
        id="a3c<-a3c"),
    pytest.param(
        Case(("graftnet:a3c", {}), ("timm:resnet18", {}), (4, 84, 84),
             [("features.1", ["t:layer1"]), ("act", ["t:layer4"])], ["features.1", "act"],
             teacher_input=[{"adapter": "resize", "kwargs": {"size": [32, 32]}},
                            {"adapter": "conv1x1", "kwargs": {"out_channels": 3}}]),
        id="a3c<-timm-resnet18-via-input-adapter"),
    pytest.param(
        Case(("graftnet:a3c_minatar", {"in_channels": 7}),
             ("graftnet:a3c_minatar", {"in_channels": 7, "num_actions": 3}), (7, 10, 10),
             [("features", ["t:features"]), ("act", ["t:act"])], ["features.1", "act"], batch=4),
        id="a3c_minatar<-a3c_minatar"),
    pytest.param(
        Case(("graftnet:mlp", {"hidden": [800, 800], "dropout": 0.2}),
             ("graftnet:mlp", {"hidden": [1200, 1200], "dropout": 0.5}),
             (784,), [("body.2", ["t:body.2"]), ("body", ["t:body.5"])], ["body.2", "body.5"], batch=4),
        id="mlp-2x800<-mlp-2x1200"),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_student_only_graft_equals_student(case: Case) -> None:
    student = build(case.student[0], **case.student[1])
    teacher = build(case.teacher[0], **case.teacher[1])
    ref = copy.deepcopy(student)
    extra = {"teachers": {"t": {"input": case.teacher_input}}} if case.teacher_input else {}
    g = graftnet.graft(student, {"t": teacher}, spec(case.input_shape, case.sites, **extra))
    assert list(g.mixers) == case.resolved
    x = torch.randn(case.batch, *case.input_shape)

    student_only(g)
    assert all(p["student"] == 1.0 for p in g.p_w().values())
    assert g.dependency_loss().item() == 0.0
    for mode in (False, True):
        g.train(mode)
        ref.train(mode)
        assert_same(run(ref, x, seed=1), run(g, x, seed=1))
    assert_states_equal(ref, g.student)  # BatchNorm running stats updated identically in train mode

    # The mixers really sit in the graph: with teachers mixed in, the output changes.
    uniform(g)
    g.eval()
    ref.eval()
    assert differs(ref(x), g(x))

    # Gradients reach the student, the mixer logits, every adapter and learned input adapter, never the teacher.
    g.train()
    random_loss(g(x)).backward()
    for site, mixer in g.mixers.items():
        assert mixer.logits.grad is not None and torch.isfinite(mixer.logits.grad).all(), site
        assert mixer.logits.grad.abs().sum() > 0, site
        for name, p in mixer.adapters.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{site}: adapter {name}"
    for name, p in g.input_adapters.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"input adapter {name}"
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())


def test_mixed_architectures_in_one_graft() -> None:
    """timm student, a torchvision DenseNet and a timm ResNet-50 teacher, taps from both at the same sites."""
    student = build("timm:resnet18", num_classes=10)
    dense, r50 = build("torchvision:densenet121"), build("timm:resnet50")
    ref = copy.deepcopy(student)
    sites = [
        ("act1", ["dense:features.relu0", "r50:act1"]),
        ("layer2.0.act1", ["dense:features.denseblock2.denselayer3.relu2", "r50:layer2.1.act2"]),
        ("layer4", ["dense:relu", "r50:layer3"]),
    ]
    g = graftnet.graft(student, {"dense": dense, "r50": r50}, spec((3, 32, 32), sites))
    assert g.p_w() == {
        "act1": {"student": pytest.approx(1 / 3), "dense:features.relu0": pytest.approx(1 / 3),
                 "r50:act1": pytest.approx(1 / 3)},
        "layer2.0.act1": {"student": pytest.approx(1 / 3),
                          "dense:features.denseblock2.denselayer3.relu2": pytest.approx(1 / 3),
                          "r50:layer2.1.act2": pytest.approx(1 / 3)},
        "layer4.1.act2": {"student": pytest.approx(1 / 3), "dense:relu": pytest.approx(1 / 3),
                          "r50:layer3.5.act3": pytest.approx(1 / 3)},
    }  # fmt: skip
    assert g.teachers["dense"].taps == ("features.relu0", "features.denseblock2.denselayer3.relu2", "relu")
    assert g.teachers["r50"].taps == ("act1", "layer2.1.act2", "layer3.5.act3")
    x = torch.randn(2, 3, 32, 32)

    student_only(g)
    for mode in (False, True):
        g.train(mode)
        ref.train(mode)
        assert_same(run(ref, x, seed=1), run(g, x, seed=1))
    assert_states_equal(ref, student)

    uniform(g)
    g.train()
    y = g(x)
    assert y.shape == (2, 10) and torch.isfinite(y).all()
    random_loss(y).backward()
    for mixer in g.mixers.values():
        assert mixer.logits.grad is not None and (mixer.logits.grad[1:] != 0).all()
        for p in mixer.adapters.parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0
    for teacher in (dense, r50):
        assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())


# --- in-place activations -------------------------------------------------------------------------------------


def _capture_inputs(model: nn.Module, paths: set[str]) -> dict[str, list[torch.Tensor]]:
    """Copies of the input of every call of the modules at ``paths`` (taken before an in-place op can run)."""
    seen: dict[str, list[torch.Tensor]] = {p: [] for p in paths}
    for path in paths:
        model.get_submodule(path).register_forward_pre_hook(
            lambda _m, args, path=path: seen[path].append(args[0].detach().clone())
        )
    return seen


@pytest.mark.parametrize(
    ("teacher_ref", "taps"),
    [
        # torchvision's BasicBlock calls one ReLU(inplace=True) twice: (module path, call index) per tap.
        ("torchvision:resnet18", {"relu": ("relu", 0), "layer1.0.relu@0": ("layer1.0.relu", 0),
                                  "layer1.0.relu@1": ("layer1.0.relu", 1), "layer1.1.relu@1": ("layer1.1.relu", 1)}),
        # timm's DenseNet applies ReLU(inplace=True) inside fused BatchNormAct2d modules.
        ("timm:densenet121", {name: (name, 0) for name in ("features.norm0.act",
                                                             "features.denseblock1.denselayer1.norm2.act",
                                                             "features.denseblock1.denselayer2.norm2.act")}),
    ],
    ids=["torchvision-resnet18", "timm-densenet121"],
)  # fmt: skip
def test_inplace_taps_hold_pre_activations(teacher_ref: str, taps: dict[str, tuple[str, int]]) -> None:
    teacher = build(teacher_ref)
    listing = {s.name: s for s in graftnet.sites(teacher, input_shape=(3, 32, 32))}
    assert all(listing[name].inplace for name in taps), "the test needs in-place activations"
    plain = copy.deepcopy(teacher).eval()
    seen = _capture_inputs(plain, {path for path, _ in taps.values()})

    # One site reads all taps, so the truncated teacher still runs the in-place ReLUs after the shallow taps.
    g = graftnet.graft(build("timm:resnet18"), {"t": teacher},
                       spec((3, 32, 32), [("layer1.0.act1", [f"t:{name}" for name in taps])]))  # fmt: skip
    assert g.teachers["t"].taps == tuple(taps)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        plain(x)
    got = g.teachers["t"](x)
    assert len(got) == len(taps)
    for z, (name, (path, call)) in zip(got, taps.items(), strict=True):
        expected = seen[path][call]
        assert torch.equal(z, expected), name
        assert (z < 0).any(), f"{name}: no negative values, so the tap holds post-ReLU values"
    g.eval()
    assert torch.isfinite(g(x)).all()


# --- fused norm+act (timm BatchNormAct2d) ------------------------------------------------------------------------


def test_fused_batchnormact_site_and_tap_keep_buffer_updates() -> None:
    # proj_drop_rate adds a self.training branch in every dense layer: fused splicing on dual graphs.
    student = build("timm:densenet121", num_classes=10, proj_drop_rate=0.1)
    teacher = build("timm:densenet121")
    ref = copy.deepcopy(student)
    teacher_before = cloned_state(teacher)
    sites = [
        ("features.norm0.act", ["t:features.norm0.act"]),
        ("features.denseblock1.denselayer1.norm2.act", ["t:features.denseblock1.denselayer2.norm2.act"]),
    ]
    g = graftnet.graft(student, {"t": teacher}, spec((3, 32, 32), sites))
    assert type(student.features.norm0).__name__ == "BatchNormAct2d"
    x = torch.randn(3, 3, 32, 32)

    student_only(g)
    g.train()
    ref.train()
    for step in range(2):
        assert_same(run(ref, x, seed=step), run(g, x, seed=step))
    assert_states_equal(ref, student)
    assert student.features.norm0.num_batches_tracked.item() == 2
    assert student.features.denseblock1.denselayer1.norm2.num_batches_tracked.item() == 2
    assert isinstance(student.features.norm0.act, nn.ReLU)  # the split put the activation back
    # A tap never updates its teacher's statistics: teachers run in eval mode.
    assert_states_equal_to(teacher, teacher_before)

    # With teachers mixed in, the fused modules at the sites still run their own BatchNorm forward.
    uniform(g)
    run(g, x, seed=5)
    assert student.features.norm0.num_batches_tracked.item() == 3
    assert student.features.denseblock1.denselayer1.norm2.num_batches_tracked.item() == 3
    run(ref, x, seed=5)
    assert torch.equal(student.features.norm0.running_mean, ref.features.norm0.running_mean)  # upstream of mixing
    assert torch.equal(student.features.norm0.running_var, ref.features.norm0.running_var)
    assert_states_equal_to(teacher, teacher_before)


# --- self.training branches ------------------------------------------------------------------------------------


def test_drop_path_student_keeps_its_training_branch() -> None:
    student = build("timm:resnet18", num_classes=10, drop_path_rate=0.2)
    ref = copy.deepcopy(student)
    sites = [("layer2", ["t:layer2"]), ("layer3.0.act1", ["t:layer3.0.act1"])]
    g = graftnet.graft(student, {"t": build("timm:resnet18")}, spec((3, 32, 32), sites))
    student_only(g)
    x = torch.randn(4, 3, 32, 32)

    g.train()
    ref.train()
    train1, train2 = run(g, x, seed=1), run(g, x, seed=2)
    assert_same(run(ref, x, seed=1), train1)
    assert_same(run(ref, x, seed=2), train2)
    assert differs(train1, train2), "drop-path was frozen at trace time"

    g.eval()
    ref.eval()
    evaluated = g(x)
    assert_same(ref(x), evaluated)
    assert differs(train1, evaluated)
    assert_same(evaluated, g(x))  # eval is deterministic


# --- teachers: truncated, frozen, eval ----------------------------------------------------------------------------


def test_teacher_is_cut_after_its_deepest_tap_and_frozen() -> None:
    teacher = build("timm:resnet50")
    before = cloned_state(teacher)
    g = graftnet.graft(build("timm:resnet18"), {"t": teacher}, spec((3, 32, 32), [("layer2", ["t:layer2"])]))
    assert g.teachers["t"].taps == ("layer2.3.act3",)

    ran: list[str] = []
    for name, module in teacher.named_modules():
        if name and not list(module.children()):
            module.register_forward_hook(lambda _m, _i, _o, name=name: ran.append(name))
    g.train()
    assert not g.teachers["t"].training
    assert all(not m.training for m in g.teachers["t"].modules())
    x = torch.randn(2, 3, 32, 32)
    random_loss(g(x)).backward()

    assert "layer2.3.conv3" in ran and "layer2.3.bn3" in ran  # the deepest tap's pre-activation is computed
    assert "layer2.3.act3" not in ran  # ... but not its activation
    late = [n for n in ran if n.startswith(("layer3", "layer4", "global_pool", "fc"))]
    assert not late, f"teacher layers after the deepest tap ran: {late[:5]}"
    targets = {str(n.target) for n in g.teachers["t"].body.graph.nodes if n.op == "call_module"}
    assert not any(t.startswith(("layer3", "layer4", "fc")) for t in targets)

    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    assert_states_equal_to(teacher, before)  # no BatchNorm update in g.train()
    (tap,) = g.teachers["t"](x.clone().requires_grad_())
    assert not tap.requires_grad
    assert tap.shape == (2, 512, 4, 4)


def test_learned_input_adapter_trains_through_the_frozen_teacher() -> None:
    student = build("graftnet:a3c_minatar", in_channels=4)  # e.g. Breakout: 4 channels
    teacher = build("graftnet:a3c_minatar", in_channels=7, num_actions=3)  # e.g. Freeway: 7 channels
    s = spec((4, 10, 10), [("features", ["t:features"]), ("act", ["t:act"])],
             teachers={"t": {"input": [{"adapter": "conv1x1", "kwargs": {"out_channels": 7}}]}})  # fmt: skip
    g = graftnet.graft(student, {"t": teacher}, s)
    adapter = g.input_adapters["t"]
    assert isinstance(adapter, nn.Conv2d) and (adapter.in_channels, adapter.out_channels) == (4, 7)
    assert all(p.requires_grad for p in adapter.parameters())

    g.train()
    x = torch.randn(4, 4, 10, 10)
    policy, value = g(x)
    assert policy.shape == (4, 6) and value.shape == (4,)
    random_loss((policy, value)).backward()
    assert adapter.weight.grad is not None and adapter.weight.grad.abs().sum() > 0
    assert adapter.bias.grad is not None and adapter.bias.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    assert all(not m.training for m in g.teachers["t"].modules())


# --- golden site lists ---------------------------------------------------------------------------------------------

GOLDEN_MODELS = {
    "timm_resnet18": ("timm:resnet18", (3, 224, 224)),
    "torchvision_resnet18": ("torchvision:resnet18", (3, 224, 224)),
    "graftnet_a3c": ("graftnet:a3c", (4, 84, 84)),
}


def _site_lines(ref: str, input_shape: tuple[int, ...]) -> list[str]:
    listing = graftnet.sites(build(ref), input_shape=input_shape)
    return [f"{s.name} {'x'.join(map(str, s.shape or ()))}" for s in listing]


@pytest.mark.parametrize("name", sorted(GOLDEN_MODELS))
def test_sites_match_golden_list(name: str) -> None:
    """Regenerate with GRAFTNET_UPDATE_GOLDEN=1 after a deliberate naming change, then review the diff."""
    ref, input_shape = GOLDEN_MODELS[name]
    lines = _site_lines(ref, input_shape)
    path = GOLDEN / f"{name}.txt"
    if os.environ.get("GRAFTNET_UPDATE_GOLDEN"):
        path.write_text("\n".join(lines) + "\n")
    assert lines == path.read_text().splitlines()


def test_golden_lists_make_sense() -> None:
    """Facts a reader can check by hand against the architectures, independent of the generated files."""
    timm18 = dict(line.split() for line in (GOLDEN / "timm_resnet18.txt").read_text().splitlines())
    assert len(timm18) == 18  # stem + 2 per BasicBlock × 8, and the output (the logits)
    assert list(timm18)[-1] == "output" and timm18["output"] == "1000"
    assert list(timm18)[:3] == ["act1", "layer1.0.act1", "layer1.0.act2"]
    assert timm18["act1"] == "64x112x112" and timm18["layer4.1.act2"] == "512x7x7"
    tv18 = dict(line.split() for line in (GOLDEN / "torchvision_resnet18.txt").read_text().splitlines())
    assert len(tv18) == 18
    assert [n for n in tv18 if n.startswith("layer1.0.")] == ["layer1.0.relu@0", "layer1.0.relu@1"]
    assert list(tv18.values()) == list(timm18.values())  # same architecture, same shapes
    a3c = [line.split() for line in (GOLDEN / "graftnet_a3c.txt").read_text().splitlines()]
    # an actor-critic returns (policy, value): no single output to mix
    assert a3c == [["features.1", "16x20x20"], ["features.3", "32x9x9"], ["act", "256"]]


def test_sites_leave_the_model_untouched() -> None:
    model = build("timm:resnet18")
    model.train()
    before = cloned_state(model)
    graftnet.sites(model, input_shape=(3, 32, 32))
    assert model.training and all(m.training for m in model.modules())
    assert_states_equal_to(model, before)
