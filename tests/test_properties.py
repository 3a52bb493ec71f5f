"""Property tests: graft() over generated architectures and generated specs (docs/architecture.md).

Students and teachers are small random networks from ``tests/_archs.py`` (Linear/Conv1d/Conv2d, BatchNorm,
Dropout, residual adds, concatenation, activations as modules, functions and Tensor methods, in place or
not); a spec picks 1–3 student sites and 1–2 taps each from one or two teachers, with adapter ``auto``.

Properties (README "A graft in Python"):

* with p_w(student)=1 at every site, ``g(x)`` is exactly ``student(x)`` in eval and train mode, BatchNorm
  buffers included, and both graphs lint;
* training steps never change a teacher's parameters or buffers and give teachers no gradients;
* gradients reach every mixer's logits, every adapter and the student;
* teachers are cut after their deepest tap: later layers never run, the layers the taps need do;
* taps hold the teacher's pre-activations (in-place activations do not fool them), in the graph too;
* ``p_w()`` lists exactly the spec's candidates, rows sum to 1; ``dependency_loss()`` = −mean log p0.

Bugs these properties found have deterministic regression tests at the end.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
import torch.fx as fx
from _archs import (
    ADDS,
    ALL_ACTS,
    Act,
    Arch,
    Case,
    Concat,
    Layer,
    Residual,
    archs,
    build,
    example_input,
    graft_cases,
    input_shapes,
    overwrites_a_tap_through_an_alias,
    writes_into_its_input,
)
from hypothesis import HealthCheck, Phase, event, given, note, settings
from hypothesis import strategies as st
from torch import nn

import graftnet
from graftnet.mixer import Mixer, mix

PROPERTY = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
)


# --- helpers -------------------------------------------------------------------------------------------


def _graft(case: Case) -> graftnet.GraftedModel:
    g = graftnet.graft(case.student, case.teachers, case.spec, example_input=case.x.clone())
    note(f"spec: {case.spec}")
    note(f"grafted eval graph:\n{g.code}")
    return g


def _student_only(g: graftnet.GraftedModel) -> None:
    """Set p_w(student) = 1 exactly at every site."""
    with torch.no_grad():
        for mixer in g.mixers.values():
            mixer.logits.fill_(-math.inf)
            mixer.logits[0] = 0.0


def _events(case: Case) -> None:
    chosen = case.chosen_sites
    event(f"sites: {len(chosen)}")
    event(f"teachers: {len(case.teachers)}")
    event(f"input rank: {len(case.x.shape) - 1}")
    if any(s.inplace for s in chosen):
        event("an in-place site")
    if any(len(s["taps"]) > 1 for s in case.spec["sites"]):
        event("a site with two taps")
    for site in chosen:
        event(f"site kind: {site.kind}")
    if _read_after_in_place_site(case):
        event("an in-place site whose input is read after it")


def _writes_in_place(n: fx.Node, root: nn.Module) -> bool:
    if n.op == "call_module":
        return getattr(root.get_submodule(str(n.target)), "inplace", False) is True
    name = str(n.target) if n.op == "call_method" else getattr(n.target, "__name__", "")
    return (
        n.kwargs.get("inplace") is True
        or (name.endswith("_") and not name.startswith("_"))
        or (n.op == "call_function" and n.target is torch.nn.functional.relu and len(n.args) > 1 and n.args[1] is True)
    )


def _read_after_in_place_site(case: Case) -> bool:
    """Whether some chosen in-place site's input (or a tensor it aliases) is read after the site: the student
    then relies on the site having overwritten it."""
    nodes = {n.name: n for n in fx.symbolic_trace(case.student).graph.nodes}
    for site in case.chosen_sites:
        act = nodes[site.node]
        if not site.inplace:
            continue
        aliases = [act.args[0]]
        while isinstance(aliases[-1], fx.Node) and _writes_in_place(aliases[-1], case.student) and aliases[-1].args:
            aliases.append(aliases[-1].args[0])
        node = act.next
        while node.op != "output":
            if any(a in node.all_input_nodes for a in aliases):
                return True
            node = node.next
    return False


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _assert_same_state(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str) -> None:
    assert actual.keys() == expected.keys(), what
    for key, value in expected.items():
        assert torch.equal(actual[key], value), f"{what}: {key} differs"


def _leaves(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if name and not list(m.children())}


@contextmanager
def _recording_calls(model: nn.Module) -> Iterator[list[str]]:
    """Names of ``model``'s leaf modules in the order they are called while the block runs."""
    calls: list[str] = []
    handles = [m.register_forward_hook(lambda *_, name=name: calls.append(name)) for name, m in _leaves(model).items()]
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


class _PreActivations(fx.Interpreter):
    """Runs a plain FX trace and records the input of chosen activation nodes *when the activation reads it*
    (so a later in-place write cannot change the record)."""

    def __init__(self, module: fx.GraphModule, nodes: set[str]) -> None:
        super().__init__(module)
        self.nodes = nodes
        self.seen: dict[str, torch.Tensor] = {}

    def run_node(self, n: fx.Node) -> Any:
        if n.name in self.nodes:
            z = n.args[0]
            assert isinstance(z, fx.Node)
            self.seen[n.name] = self.env[z].detach().clone()
        return super().run_node(n)


def _pre_activations(model: nn.Module, x: torch.Tensor, nodes: set[str]) -> dict[str, torch.Tensor]:
    interp = _PreActivations(fx.symbolic_trace(model), nodes)
    with torch.no_grad():
        interp.run(x.clone())
    assert interp.seen.keys() == nodes, "harness: an activation node of graftnet.sites() is not in the plain trace"
    return interp.seen


# --- (a) p_w(student) = 1 ⇒ the student, exactly --------------------------------------------------------


@PROPERTY
@given(graft_cases(unsafe_student=True))
def test_student_only_mixing_computes_the_student(case: Case) -> None:
    _events(case)
    reference = copy.deepcopy(case.student)
    g = _graft(case)
    _student_only(g)
    for mode in (False, True):
        g.train(mode)
        g.graph.lint()

    g.eval()
    reference.eval()
    out = g(case.x.clone())
    assert torch.equal(out, reference(case.x.clone()))
    assert torch.equal(out, case.student(case.x.clone()))

    g.train()
    reference.train()
    torch.manual_seed(case.seed)
    out = g(case.x.clone())
    torch.manual_seed(case.seed)
    expected = reference(case.x.clone())
    assert torch.equal(out, expected)
    state = _state(g.student)
    _assert_same_state(state, _state(reference), "student after one train-mode forward")
    tracked = [v for k, v in state.items() if k.endswith("num_batches_tracked")]
    if tracked:
        event("BatchNorm in the student")
        assert all(int(v) == 1 for v in tracked)  # the buffers did update (else the comparison proves little)
    for teacher in case.teachers.values():
        assert not any(m.training for m in teacher.modules()), "g.train() put a teacher in train mode"


# --- (b) training never touches the teachers -----------------------------------------------------------


@PROPERTY
@given(graft_cases())
def test_training_steps_leave_teachers_untouched(case: Case) -> None:
    _events(case)
    before = {name: _state(t) for name, t in case.teachers.items()}
    student_before = _state(case.student)
    g = _graft(case)
    g.train()
    optimizer = torch.optim.Adam(g.parameters(), lr=0.05)
    for _ in range(2):
        optimizer.zero_grad()
        g(case.x.clone()).pow(2).mean().backward()
        optimizer.step()
    for name, teacher in case.teachers.items():
        for pname, p in teacher.named_parameters():
            assert not p.requires_grad, f"{name}.{pname} is trainable"
            assert p.grad is None, f"{name}.{pname} got a gradient"
        _assert_same_state(_state(teacher), before[name], f"teacher {name}")
    after = _state(case.student)
    assert any(not torch.equal(after[k], v) for k, v in student_before.items()), "the step changed nothing at all"


# --- (c) gradients reach logits, adapters and the student ---------------------------------------------


@PROPERTY
@given(graft_cases())
def test_gradients_reach_mixers_adapters_and_student(case: Case) -> None:
    _events(case)
    g = _graft(case)
    g.train()
    upstream: dict[str, torch.Tensor] = {}

    def keep_upstream(site: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, out: torch.Tensor) -> None:
            out.register_hook(lambda grad: upstream.__setitem__(site, grad))

        return hook

    handles = [m.register_forward_hook(keep_upstream(site)) for site, m in g.mixers.items()]
    try:
        g(case.x.clone()).pow(2).sum().backward()
    finally:
        for h in handles:
            h.remove()
    assert set(g.mixers) == {s["student"] for s in case.spec["sites"]}
    for site, mixer in g.mixers.items():
        assert mixer.logits.grad is not None, site
        if upstream[site].count_nonzero() == 0:
            event("a site whose mixed output gets zero gradient")  # e.g. every unit of a ReLU off: dL/dw = 0 is right
        else:
            assert mixer.logits.grad.count_nonzero() > 0, f"{site}: the logits get an all-zero gradient"
        for pname, p in mixer.adapters.named_parameters():
            assert p.grad is not None, f"{site}: adapter parameter {pname} got no gradient"
        if any(True for _ in mixer.adapters.parameters()):
            event("a learned adapter")
    for pname, p in g.student.named_parameters():
        assert p.grad is not None, f"student parameter {pname} got no gradient"


# --- (d) teachers are cut after their deepest tap ------------------------------------------------------


@PROPERTY
@given(graft_cases())
def test_teacher_layers_after_the_deepest_tap_never_run(case: Case) -> None:
    _events(case)
    plans = {}
    for name, teacher in case.teachers.items():
        gm = fx.symbolic_trace(teacher)
        nodes = list(gm.graph.nodes)
        index = {n: i for i, n in enumerate(nodes)}
        first_node: dict[str, int] = {}
        for i, n in enumerate(nodes):
            if n.op == "call_module":
                first_node.setdefault(str(n.target), i)
        with _recording_calls(teacher) as calls:
            teacher(case.x.clone())
        first_calls = list(dict.fromkeys(calls))
        assert first_calls == sorted(first_node, key=first_node.__getitem__), "harness: graph order ≠ call order"

        by_name = {n.name: n for n in nodes}
        zs = [by_name[t.node].args[0] for t in case.taps_of(name)]
        deepest = max((index[z] for z in zs), default=-1)  # type: ignore[index]
        needed: set[fx.Node] = set()
        stack = list(zs)
        while stack:
            n = stack.pop()
            if isinstance(n, fx.Node) and n not in needed:
                needed.add(n)
                stack.extend(n.all_input_nodes)
        required = {str(n.target) for n in needed if n.op == "call_module"}
        forbidden = {m for m, i in first_node.items() if i > deepest}
        plans[name] = (required, forbidden)
        if not zs:
            event("a teacher with no taps")
        elif forbidden:
            event("a teacher with layers after its deepest tap")

    g = _graft(case)
    g.train()
    for name, teacher in case.teachers.items():
        required, forbidden = plans[name]
        with _recording_calls(teacher) as calls:
            g(case.x.clone())
        ran = set(calls)
        assert not ran & forbidden, f"teacher {name}: layers after the deepest tap ran: {sorted(ran & forbidden)}"
        assert required <= ran, f"teacher {name}: layers the taps need did not run: {sorted(required - ran)}"


# --- (e) taps are the teachers' pre-activations ------------------------------------------------------


@PROPERTY
@given(graft_cases())
def test_taps_are_the_teachers_pre_activations(case: Case) -> None:
    _events(case)
    expected: dict[str, torch.Tensor] = {}
    for name, teacher in case.teachers.items():
        taps = case.taps_of(name)
        if any(t.inplace for t in taps):
            event("an in-place tap")
        seen = _pre_activations(teacher, case.x, {t.node for t in taps})
        expected.update({f"{name}:{t.name}": seen[t.node] for t in taps})
    g = _graft(case)
    for name in case.teachers:
        taps = case.taps_of(name)
        if not taps:
            assert name not in g.teachers, f"teacher {name} has no taps but still runs"
            continue
        frozen = g.teachers[name]
        assert frozen.taps == tuple(t.name for t in taps)
        for t, value in zip(taps, frozen(case.x.clone()), strict=True):
            assert torch.equal(value, expected[f"{name}:{t.name}"]), f"tap {name}:{t.name} is not its pre-activation"

    # In the grafted graph, each mixer receives its own taps, in the spec's order.
    received: dict[str, tuple[torch.Tensor, ...]] = {}
    handles = [
        m.register_forward_pre_hook(lambda _m, args, site=site: received.__setitem__(site, tuple(args[1:])))
        for site, m in g.mixers.items()
    ]
    try:
        g.eval()
        g(case.x.clone())
    finally:
        for h in handles:
            h.remove()
    for site in case.spec["sites"]:
        got = received[site["student"]]
        assert len(got) == len(site["taps"])
        for tap, value in zip(site["taps"], got, strict=True):
            assert torch.equal(value, expected[tap]), f"site {site['student']} got the wrong tensor for {tap}"


# --- p_w and the dependency loss -----------------------------------------------------------------------


MIXING = st.fixed_dictionaries(
    {"init": st.just("uniform") | st.floats(0.05, 0.95)},
    optional={"rescale_taps": st.booleans()},
)


@PROPERTY
@given(graft_cases(mixing=MIXING), st.data())
def test_p_w_and_dependency_loss(case: Case, data: st.DataObject) -> None:
    _events(case)
    g = _graft(case)
    sites = [s["student"] for s in case.spec["sites"]]
    assert list(g.mixers) == sites
    init = case.spec["mixing"]["init"]

    def check_rows() -> None:
        p_w = g.p_w()
        assert list(p_w) == sites
        for site in case.spec["sites"]:
            row = p_w[site["student"]]
            assert list(row) == ["student", *site["taps"]]
            assert math.isclose(sum(row.values()), 1.0, rel_tol=1e-6)
            assert all(p > 0 for p in row.values())
        expected = -sum(math.log(p_w[s]["student"]) for s in sites) / len(sites)
        loss = g.dependency_loss()
        assert loss.shape == ()
        assert math.isclose(float(loss.detach()), expected, rel_tol=1e-5, abs_tol=1e-6)

    check_rows()
    for site in case.spec["sites"]:
        row = g.p_w()[site["student"]]
        n = len(site["taps"])
        if init == "uniform":
            assert all(math.isclose(p, 1 / (n + 1), rel_tol=1e-6) for p in row.values())
        else:
            assert math.isclose(row["student"], init, rel_tol=1e-5)
            assert all(math.isclose(row[t], (1 - init) / n, rel_tol=1e-5) for t in site["taps"])

    with torch.no_grad():
        for mixer in g.mixers.values():
            logits = data.draw(st.lists(st.floats(-6, 6), min_size=len(mixer.logits), max_size=len(mixer.logits)))
            mixer.logits.copy_(torch.tensor(logits))
    check_rows()
    for site, mixer in g.mixers.items():
        assert torch.allclose(torch.tensor(list(g.p_w()[site].values())), torch.softmax(mixer.logits.detach(), 0))

    # Only the logits carry the dependency loss's gradient.
    g.dependency_loss().backward()
    assert all(m.logits.grad is not None and m.logits.grad.count_nonzero() > 0 for m in g.mixers.values())
    assert all(p.grad is None for p in g.student.parameters())


# --- the fused mixing ------------------------------------------------------------------------------------


def test_fused_mix_has_the_gradients_of_the_formula() -> None:
    coeffs = torch.randn(3, dtype=torch.double, requires_grad=True)
    inputs = [torch.randn(4, 3, 5, dtype=torch.double, requires_grad=k != 1) for k in range(3)]
    assert torch.autograd.gradcheck(lambda c, *u: mix(c, u), (coeffs, *inputs))
    # mixed precisions promote as z + u would, and each gradient comes back in its input's dtype
    low = [u.detach().float().requires_grad_() for u in inputs[:2]] + [inputs[2]]
    out = mix(coeffs, low)
    assert out.dtype == torch.double
    out.sum().backward()
    assert low[0].grad is not None and low[0].grad.dtype == torch.float


def test_mixer_computes_the_formula_with_identity_and_learned_adapters() -> None:
    torch.manual_seed(0)
    mixer = Mixer("s", ["a:x", "b:y"], [torch.nn.Identity(), torch.nn.Linear(6, 4)], init=0.4)
    mixer.tap_scale.copy_(torch.tensor([0.5, 3.0]))
    mixer.calibrated_batches.fill_(mixer.calibration_batches)  # calibrated: the scales stay as set
    z = torch.randn(5, 4, requires_grad=True)
    taps = (torch.randn(5, 4), torch.randn(5, 6))
    out = mixer(z, *taps)
    grads = torch.autograd.grad(out.square().sum(), [z, mixer.logits, *mixer.adapters[1].parameters()])
    p = torch.softmax(mixer.logits, 0)
    expected = p[0] * z + p[1] * (0.5 * taps[0]) + p[2] * mixer.adapters[1](3.0 * taps[1])
    expected_grads = torch.autograd.grad(
        expected.square().sum(), [z, mixer.logits, *mixer.adapters[1].parameters()]
    )
    assert torch.allclose(out, expected, atol=1e-6)
    for got, want in zip(grads, expected_grads, strict=True):
        assert torch.allclose(got, want, atol=1e-5)


# --- adapter 'auto' refuses what it cannot map ---------------------------------------------------------


def test_auto_adapter_refuses_a_vector_tap_on_a_map_site() -> None:
    shape = (2, 8, 8)
    student = build(Arch(shape, (Layer(4, Act("module", "ReLU")),)), 0)
    teacher = build(Arch(shape, (Layer(3, Act("module", "ReLU")), Layer(5, Act("method", "tanh"), flatten=True))), 1)
    spec = {"sites": [{"student": "blocks.0.act", "taps": ["t0:tanh"]}]}
    with pytest.raises(graftnet.AdapterError, match=r"sites\[0\]\.taps\[0\]"):
        graftnet.graft(student, {"t0": teacher}, spec, example_input=example_input(shape, 0))


# --- the strategies reach what the properties are about ------------------------------------------------


class _AllReachedError(Exception):
    pass


def _unreached(
    strategy: st.SearchStrategy[Any], features: dict[str, Callable[[Any], bool]], max_examples: int
) -> list[str]:
    """The features no value of a (derandomized, so deterministic) run of ``strategy`` has; stops once all are seen."""
    left = dict(features)

    @settings(max_examples=max_examples, phases=[Phase.generate], derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(strategy)
    def probe(value: Any) -> None:
        for what in [w for w, holds in left.items() if holds(value)]:
            del left[what]
        if not left:
            raise _AllReachedError

    try:
        probe()
    except _AllReachedError:
        pass
    return list(left)


def _blocks(arch: Arch) -> list[Layer | Residual | Concat]:
    out: list[Layer | Residual | Concat] = []
    for b in arch.blocks:
        out.append(b)
        if isinstance(b, Concat):
            out.extend(x for x in b.branches if isinstance(x, Layer))
    return out


def _acts(arch: Arch) -> list[Act]:
    acts: list[Act] = []
    for b in _blocks(arch):
        if isinstance(b, Layer):
            acts += [a for a in (b.act, b.extra) if a is not None]
        elif isinstance(b, Residual):
            acts += [a for a in (b.act1, b.extra1, b.act2) if a is not None]
        else:
            acts += [a for a in (*b.branches, b.act) if isinstance(a, Act)]
    return acts


ANY_ARCH = input_shapes().flatmap(lambda shape: archs(shape, unsafe=True))
SAFE_ARCH = input_shapes().flatmap(lambda shape: archs(shape, unsafe=False))
ARCH_FEATURES: dict[str, Callable[[Arch], bool]] = {
    "a Linear": lambda a: len(a.input_shape) == 1,
    "a Conv1d": lambda a: len(a.input_shape) == 2,
    "a Conv2d": lambda a: len(a.input_shape) == 3,
    "a flatten from maps to vectors": lambda a: any(isinstance(b, Layer) and b.flatten for b in a.blocks),
    "BatchNorm": lambda a: any(getattr(b, "bn", False) for b in _blocks(a)),
    "nn.Dropout": lambda a: any(isinstance(b, Layer) and b.dropout == "module" for b in _blocks(a)),
    "F.dropout(x, p, self.training)": lambda a: any(
        isinstance(b, Layer) and b.dropout == "functional" for b in _blocks(a)),
    "a strided conv": lambda a: any(isinstance(b, Layer) and b.stride == 2 for b in a.blocks),
    "a concatenation": lambda a: any(isinstance(b, Concat) for b in a.blocks),
    "an activation module called twice": lambda a: any(isinstance(b, Residual) and b.shared for b in a.blocks),
    "an in-place module activation": lambda a: any(x.form == "module" and x.inplace for x in _acts(a)),
    "an in-place function activation": lambda a: any(x.form == "function" and x.inplace for x in _acts(a)),
    "an in-place method activation": lambda a: any(x.form == "method" and x.inplace for x in _acts(a)),
    "chained in-place activations": lambda a: any(
        isinstance(b, Layer) and b.act.inplace and b.extra is not None and b.extra.inplace for b in a.blocks),
    "a bare in-place activation on a shared input": lambda a: any(
        isinstance(b, Concat) and any(isinstance(x, Act) and x.inplace for x in b.branches) for b in a.blocks),
    "an in-place site read later through its alias": lambda a: any(
        isinstance(b, Residual) and b.skip == "z" and b.act1.inplace for b in a.blocks),
    "a write into the model's input": writes_into_its_input,
    "a pre-activation overwritten through an earlier alias": overwrites_a_tap_through_an_alias,
    **{f"residual add {add!r}": (lambda a, add=add: any(isinstance(b, Residual) and b.add == add for b in a.blocks))
       for add in ADDS},
}  # fmt: skip


def test_architectures_cover_every_feature_and_activation() -> None:
    missing = _unreached(ANY_ARCH, ARCH_FEATURES, 2000)
    assert not missing, f"the architecture strategies never drew: {missing}"
    every_act = {repr(act): (lambda a, act=act: act in _acts(a)) for act in ALL_ACTS}
    missing = _unreached(SAFE_ARCH, every_act, 1000)
    assert not missing, f"the safe architecture strategy (students of the gradient properties) never drew: {missing}"


def test_safe_architectures_train() -> None:
    """Safe architectures (the students of the gradient properties) run backward: no in-place op writes into a
    tensor autograd saved."""

    @settings(max_examples=60, deadline=None, database=None)
    @given(SAFE_ARCH, st.integers(0, 100))
    def backward_runs(arch: Arch, seed: int) -> None:
        net = build(arch, seed).train()
        net(example_input(arch.input_shape, seed)).pow(2).sum().backward()
        assert all(p.grad is not None for p in net.parameters())

    backward_runs()


def _tap_and_site_shapes(c: Case) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    taps = {f"{n}:{t.name}": t.shape for n, ts in c.teacher_sites.items() for t in ts}
    return [(taps[t], s.shape) for s, spec in zip(c.chosen_sites, c.spec["sites"], strict=True)  # type: ignore[misc]
            for t in spec["taps"]]  # fmt: skip


CASE_FEATURES: dict[str, Callable[[Case], bool]] = {
    "two teachers, several sites, an in-place one, two taps at a site": lambda c: (
        len(c.teachers) == 2 and len(c.chosen_sites) >= 2 and any(s.inplace for s in c.chosen_sites)
        and any(len(s["taps"]) == 2 for s in c.spec["sites"])),
    "a map tap on a vector site": lambda c: any(len(t) > 1 and len(s) == 1 for t, s in _tap_and_site_shapes(c)),
    "a map tap resized onto a map site": lambda c: any(
        len(t) == len(s) > 1 and t[1:] != s[1:] for t, s in _tap_and_site_shapes(c)),
    "an identity adapter": lambda c: any(t == s for t, s in _tap_and_site_shapes(c)),
    "a teacher writing into its input": lambda c: any(writes_into_its_input(a) for a in c.teacher_archs.values()),
}  # fmt: skip


def test_graft_cases_cover() -> None:
    cases = graft_cases(unsafe_student=True)
    missing = _unreached(cases, CASE_FEATURES, 300)
    assert not missing, f"graft_cases never drew: {missing}"


# --- regression tests for graftnet bugs the properties above found -------------------------------------


def _student_only_output_equals(student: nn.Module, teacher: nn.Module, site: str, tap: str, x: torch.Tensor) -> bool:
    reference = copy.deepcopy(student).eval()
    g = graftnet.graft(student, {"t0": teacher}, {"sites": [{"student": site, "taps": [tap]}]}, example_input=x.clone())
    _student_only(g)
    g.eval()
    return torch.equal(g(x.clone()), reference(x.clone()))


def test_a_teacher_writing_into_its_input_does_not_change_the_student_input() -> None:
    """Teachers run first, on the student's own input tensor: one that writes into its input in place (here
    ``x.relu_()``) must not change what the student sees (it did: g(x) != student(x) at p0=1)."""
    shape = (6,)
    student = build(Arch(shape, (Layer(5, Act("module", "Tanh")),)), 0)
    teacher_arch = Arch(shape, (Concat((Act("method", "relu", True), Layer(4, Act("module", "Tanh")))),))
    assert writes_into_its_input(teacher_arch)
    teacher = build(teacher_arch, 1).eval()
    assert _student_only_output_equals(
        student, teacher, "blocks.0.act", "t0:blocks.0.branches.1.act", example_input(shape, 0)
    )


def test_a_tap_overwritten_through_an_earlier_alias_keeps_its_value() -> None:
    """``z = relu_(a)`` aliases ``a``; a later ``a.add_(y)`` overwrites z too. The truncated teacher must clone
    the tap (it only followed aliases made *from* z, and returned the post-add values)."""
    shape = (6,)
    teacher_arch = Arch(shape, (Residual(Act("module", "ReLU", True), Act("module", "Tanh"),
                                         extra1=Act("module", "Sigmoid"), skip="z", add="into_skip_"),))  # fmt: skip
    assert overwrites_a_tap_through_an_alias(teacher_arch)
    teacher = build(teacher_arch, 1).eval()
    student = build(Arch(shape, (Layer(5, Act("module", "Tanh")),)), 0)
    x = example_input(shape, 0)
    spec = {"sites": [{"student": "blocks.0.act", "taps": ["t0:blocks.0.extra1", "t0:blocks.0.act2"]}]}
    g = graftnet.graft(student, {"t0": teacher}, spec, example_input=x.clone())
    expected = _pre_activations(teacher, x, {"blocks_0_extra1"})["blocks_0_extra1"]
    assert torch.equal(g.teachers["t0"](x.clone())[0], expected)


def test_a_teacher_without_taps_is_frozen_too() -> None:
    """graft() freezes every teacher in place, tapped or not (an untapped one was left trainable)."""
    shape = (6,)
    student = build(Arch(shape, (Layer(5, Act("module", "Tanh")),)), 0)
    t0, t1 = (
        build(Arch(shape, (Layer(4, Act("module", "ReLU")),)), 1),
        build(Arch(shape, (Layer(4, Act("module", "ReLU")),)), 2),
    )
    spec = {"sites": [{"student": "blocks.0.act", "taps": ["t0:blocks.0.act"]}]}
    graftnet.graft(student, {"t0": t0, "t1": t1}, spec, example_input=example_input(shape, 0))
    assert not any(p.requires_grad for p in t0.parameters())
    assert not any(p.requires_grad for p in t1.parameters())


@pytest.mark.parametrize("wrapper", ["torch.compile", "DataParallel"])
@pytest.mark.parametrize("role", ["student", "teacher"])
def test_a_wrapped_model_is_grafted_as_the_model_it_wraps(wrapper: str, role: str) -> None:
    """A torch.compile, DataParallel (or DistributedDataParallel) wrapper, which FX cannot trace, is grafted as the
    model inside it: the wrapper shares its parameters, so training the graft trains what the user holds."""
    from _tiny import SITES, cnn

    student, teacher = cnn(0), cnn(1)
    inner = student if role == "student" else teacher
    wrapped = torch.compile(inner) if wrapper == "torch.compile" else torch.nn.DataParallel(inner)
    x = torch.randn(4, 1, 40)
    assert [s.name for s in graftnet.sites(wrapped, x[:2])] == [s.name for s in graftnet.sites(inner, x[:2])]
    g = graftnet.graft(wrapped if role == "student" else student, {"t": wrapped if role == "teacher" else teacher},
                       {"sites": SITES}, example_input=x[:2])  # fmt: skip
    assert g.student is student
    if role == "student":  # the wrapper's parameters are the graft's student's
        assert {id(p) for p in wrapped.parameters()} == {id(p) for p in g.student.parameters()}
    else:  # and a wrapped teacher is frozen in place
        assert not any(p.requires_grad for p in wrapped.parameters())
    with torch.no_grad():
        for mixer in g.mixers.values():  # p_w(student) = 1: the graft computes the student
            mixer.logits.copy_(torch.tensor([0.0] + [-1e9] * (len(mixer.logits) - 1)))
        assert torch.equal(g(x), student(x))
