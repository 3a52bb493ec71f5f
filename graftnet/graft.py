"""``graftnet.graft``: splice teacher activations into a student (docs/architecture.md)."""

from __future__ import annotations

import linecache
import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from graftnet._names import catalogue
from graftnet._passes import splice_mixers, truncate_teacher
from graftnet._plan import Plan, make_plan
from graftnet._trace import Traced, propagate_shapes, trace, training_mode
from graftnet.adapters import make_adapter, make_input_adapter
from graftnet.errors import AdapterError, GraftError, SpecError
from graftnet.layouts import UNKNOWN, Layout
from graftnet.mixer import Mixer, full_precision
from graftnet.models import build_model
from graftnet.spec import Spec, clip, input_shape_problem, load_spec, short_repr, teacher_name_problem

__all__ = ["FrozenTeacher", "GraftedModel", "SiteInfo", "graft", "sites"]

Example = torch.Tensor | tuple[torch.Tensor, ...]


class FrozenTeacher(nn.Module):
    """A teacher cut after its deepest tap: returns the taps' pre-activations, always in eval mode.

    It runs without autograd unless a learned input adapter sits in front of it, in which case
    gradients flow through it to that adapter (its own parameters stay frozen).
    """

    def __init__(self, body: fx.GraphModule, taps: tuple[str, ...], needs_input_grad: bool, source: nn.Module) -> None:
        super().__init__()
        self.body = body
        self.taps = taps
        self.needs_input_grad = needs_input_grad
        self.reuse = False  # set by GraftedModel.reusing_teacher_features()
        self._cached: tuple[torch.Tensor, ...] | None = None
        self._records: list[tuple[torch.Tensor, ...]] | None = None  # set by recording()
        self.train(False)
        # What truncation kept, for reports: top-level children that run, and parameter counts.
        used = {str(n.target) for n in body.graph.nodes if n.op in ("call_module", "get_attr")}
        children = [name for name, _ in source.named_children()]
        self.children_run = tuple(c for c in children if any(u == c or u.startswith(c + ".") for u in used))
        self.children_cut = tuple(c for c in children if c not in self.children_run)
        self.parameters_total = sum(p.numel() for p in source.parameters())
        self.parameters_run = sum(p.numel() for p in body.parameters())

    def train(self, mode: bool = True) -> FrozenTeacher:
        return super().train(False)  # a teacher is frozen: BatchNorm statistics and dropout stay in eval mode

    @contextmanager
    def recording(self) -> Iterator[list[tuple[torch.Tensor, ...]]]:
        """Within this block the taps of every call are appended, in call order, to the list it yields.

        Only for a teacher whose taps depend on no trainable parameter (``needs_input_grad`` is False: no
        input adapter, or fixed ones): its recorded taps stay valid for later passes on the same inputs, and
        can be given to :meth:`GraftedModel.reusing_teacher_features` (the RL collector records a rollout's
        taps so that the update's passes on the rollout do not run the teachers again).
        """
        if self.needs_input_grad:
            raise GraftError(
                "a teacher behind a learned input adapter cannot record its taps: they depend on the adapter's "
                "trainable parameters, so a later pass must recompute them"
            )
        if self._records is not None:
            raise GraftError("this teacher is already recording its taps")
        records: list[tuple[torch.Tensor, ...]] = []
        self._records = records
        try:
            yield records
        finally:
            self._records = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.needs_input_grad:
            return self.body(x)  # type: ignore[no-any-return]
        if self.reuse and self._cached is not None:
            taps = self._cached
            if isinstance(x, torch.Tensor) and x.dim() and x.shape[0] != taps[0].shape[0]:
                raise GraftError(
                    f"the teacher's reused taps are of a batch of {taps[0].shape[0]}, but this call's input is a "
                    f"batch of {x.shape[0]}: within reusing_teacher_features() every call must see the same batch"
                )
        elif torch.is_grad_enabled():
            with torch.no_grad():
                taps = self.body(x)
        else:  # already without autograd (a rollout's steps, the θ_old pass): no context to enter
            taps = self.body(x)
        if self.reuse and self._cached is None:
            self._cached = taps
        if self._records is not None:
            self._records.append(taps)
        return taps


def _compile(graph: fx.Graph, label: str) -> Callable[..., Any]:
    """Python code for ``graph`` as a function of ``self`` — what ``GraphModule.recompile`` does, without
    copying submodules into a second module tree (so ``.to()``, deepcopy and state_dict see one set)."""
    code = graph.python_code(root_module="self")
    filename = f"<graftnet {label} {id(graph):x}>"
    linecache.cache[filename] = (len(code.src), None, code.src.splitlines(keepends=True), filename)
    namespace = dict(code.globals)
    exec(compile(code.src, filename, "exec"), namespace)  # noqa: S102 - code generated by torch.fx from our graph
    return namespace["forward"]  # type: ignore[no-any-return]


def _clearly_above_floor(w: list[float], allowed: float) -> bool:
    """True when the site's p_w(student) is above the floor by more than rounding: logsumexp(w_t − w_0) is at most
    max_t(w_t − w_0) + log(number of teachers), and that bound is below ``allowed`` with room for float32's error.
    The projection would then subtract 0 from the teachers' logits: skipping it changes no value, and leaves w's
    version counter alone (the mixers keep their coefficients while it stands)."""
    return max(w[1:]) - w[0] + math.log(len(w) - 1) < allowed - 1e-3


class GraftedModel(nn.Module):
    """A student whose sites mix in adapted teacher pre-activations.

    Called like the student and returning what the student returns. Holds the original ``student``
    module (its parameters train in place), the ``teachers``, their ``input_adapters`` and the
    ``mixing`` modules; :attr:`mixers` maps site names to their :class:`Mixer`.
    """

    def __init__(
        self,
        student: nn.Module,
        teachers: dict[str, FrozenTeacher],
        input_adapters: dict[str, nn.Module],
        mixers: dict[str, Mixer],
        graphs: dict[bool, fx.Graph],
        plan: Plan,
        spec: Spec | None = None,
    ) -> None:
        super().__init__()
        self.student = student
        self.teachers = nn.ModuleDict(teachers)
        self.input_adapters = nn.ModuleDict(input_adapters)
        self.mixing = nn.ModuleDict(mixers)
        self.plan = plan
        self.spec = spec if spec is not None else Spec()
        self._graphs = graphs
        self._compiled: dict[bool, Callable[..., Any]] = {}
        self._generate_code()
        self.training = student.training
        for graph in set(graphs.values()):
            graph.owning_module = self  # type: ignore[assignment]  # lets graph.lint() check targets

    @property
    def graph(self) -> fx.Graph:
        """The FX graph that runs in the current mode (train and eval differ only if the student branches on it)."""
        return self._graphs[self.training]

    @property
    def code(self) -> str:
        return str(self.graph.python_code(root_module="self").src)

    @property
    def mixers(self) -> Mapping[str, Mixer]:
        """``{site name: Mixer}`` in site order."""
        return MappingProxyType({m.site: m for m in self.mixing.values() if isinstance(m, Mixer)})

    def _generate_code(self) -> None:
        """Python functions for both modes' graphs, made now rather than on the first call, so that a first call
        under torch.compile does not meet code generation (``exec``), which it cannot trace."""
        self._compiled = {mode: _compile(graph, "train" if mode else "eval") for mode, graph in self._graphs.items()}

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._compiled[self.training](self, *args, **kwargs)

    @contextmanager
    def reusing_teacher_features(self, taps: Mapping[str, tuple[torch.Tensor, ...]] | None = None) -> Iterator[None]:
        """Within this block every call sees the same input batch: teachers run once and later calls reuse
        their taps (a second forward with other parameters, such as θ_old for the KL term, costs no teacher work).

        Teachers behind a learned input adapter are recomputed: their taps depend on trainable parameters.

        ``taps`` maps teacher names to their taps of this block's batch, computed before (with
        :meth:`FrozenTeacher.recording`; recorded on parts of the batch, concatenated along dim 0 in batch
        order): those teachers, and their fixed input adapters, do not run at all in the block. Only teachers
        without a learned input adapter can be given; the taps are assumed to be per-sample functions of the
        input, as a frozen teacher in eval mode behind fixed input adapters computes them.
        """
        teachers = {name: t for name, t in self.teachers.items() if isinstance(t, FrozenTeacher)}
        given = {name: tuple(value) for name, value in (taps or {}).items()}
        for name, value in given.items():
            t = teachers.get(name)
            if t is None:
                raise GraftError(
                    f"reusing_teacher_features: taps were given for {name!r}, which is not a teacher this model "
                    f"runs (it runs: {', '.join(teachers) or 'none'})"
                )
            if t.needs_input_grad:
                raise GraftError(
                    f"reusing_teacher_features: teacher {name!r} has a learned input adapter, so its taps depend on "
                    "trainable parameters and must be recomputed; give taps only for the other teachers"
                )
            if len(value) != len(t.taps) or not value or any(v.shape[:1] != value[0].shape[:1] for v in value):
                raise GraftError(
                    f"reusing_teacher_features: teacher {name!r} has {len(t.taps)} taps ({', '.join(t.taps)}); "
                    f"got {len(value)} tensors, which must share their batch size"
                )
        # The input adapters of teachers whose taps are given would compute what nobody reads: skip them.
        adapters = self.input_adapters._modules
        skipped = {name: adapters[name] for name in given if adapters.get(name) is not None}
        for name in skipped:
            adapters[name] = nn.Identity()
        for name, t in teachers.items():
            t.reuse, t._cached = True, given.get(name)
        try:
            yield
        finally:
            for t in teachers.values():
                t.reuse, t._cached = False, None
            adapters.update(skipped)

    def after_compiled_pass(self) -> None:
        """Call after each training pass of a compiled graft (``torch.compile(g)``) in a loop of your own, as the
        objectives do with ``train.compile``: it tells the mixers on the host when the tap calibration is over
        (reading the batch count only during the first ``mixing.calibration_batches`` passes), so the next graph
        leaves calibration out. Without it a compiled graft stays correct but keeps the masked calibration work.
        """
        for mixer in self.mixers.values():
            mixer.after_compiled_pass()

    def p_w(self) -> dict[str, dict[str, float]]:
        """``{site: {"student": p0, "teacher:tap": p, ...}}``: the normalised weights of every site."""
        result = {}
        with torch.no_grad():
            for site, mixer in self.mixers.items():
                result[site] = dict(zip(mixer.candidates, mixer.p_w().tolist(), strict=True))
        return result

    def raise_student_floor(self, floor: float) -> None:
        """Make p_w(student) ≥ ``floor`` at every site by lowering the teachers' logits w together, in place.

        A site already at or above the floor is left alone; below it, every teacher logit drops by the same
        amount, so the teachers keep their ratios and the student gets exactly ``floor``. This is a projection
        of w (no gradient), the same under any optimizer.
        """
        if floor <= 0.0:
            return
        if not floor < 1.0:
            raise ValueError(f"the floor of p_w(student) must be below 1, got {floor}")
        allowed = math.log((1.0 - floor) / floor)  # p0 ≥ floor ⟺ logsumexp(w_teachers − w_0) ≤ log((1−f)/f)
        with torch.no_grad():
            for mixer in self.mixers.values():
                w = mixer.logits
                if w.device.type == "cpu" and _clearly_above_floor(w.tolist(), allowed):
                    continue  # on the CPU a host check is cheaper than the dozen small ops below, and no sync
                excess = torch.logsumexp(w[1:].float() - w[0].float(), dim=0) - allowed
                w[1:] -= excess.clamp_min(0).to(w.dtype)  # no branch on a tensor: no device sync per step

    def dependency_loss(self) -> torch.Tensor:
        """The paper's eq. 5: −(1/L0) Σ_j log p_w^j(student), computed stably with log_softmax."""
        mixers = list(self.mixers.values())
        if not mixers:
            return torch.zeros(())
        terms = [torch.log_softmax(full_precision(m.logits), dim=0)[0] for m in mixers]
        return -torch.stack(terms).mean()

    def keep_feature_hints(self, keep: bool = True) -> None:
        """While on, every training pass with autograd leaves each site's feature hint for
        :meth:`feature_hint_loss` (``train.feature_hint`` turns it on)."""
        for mixer in self.mixers.values():
            mixer.keeps_hint, mixer.hint_loss = keep, None

    def feature_hint_loss(self) -> torch.Tensor:
        """The feature hint of the last training pass: the mean over sites of mean_l mean((z − Q_l(s_l·t_l))²),
        the distance from each site's pre-activation to its adapted taps. Its gradient trains the student and the
        learned adapters Q_l (the hint's regressors), never what is behind a tap (the frozen teacher, its input
        adapter). It is handed over once: a second call without a new pass raises, so a stale hint cannot be added
        twice.

        Examples:
            >>> import graftnet, torch
            >>> net = lambda: torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
            >>> g = graftnet.graft(net(), {"t": net()}, {"sites": [{"student": "1", "taps": ["t:1"]}]},
            ...                    example_input=torch.zeros(1, 4))
            >>> g.keep_feature_hints()
            >>> _ = g(torch.randn(3, 4))
            >>> g.feature_hint_loss().shape
            torch.Size([])
        """
        mixers = list(self.mixers.values())
        if not mixers:
            return torch.zeros(())
        hints = [m.hint_loss for m in mixers if m.hint_loss is not None]
        if len(hints) < len(mixers):
            missing = [m.site for m in mixers if m.hint_loss is None]
            raise GraftError(
                f"no feature hint at {', '.join(missing)}: call keep_feature_hints() and then the model in training "
                "mode with autograd on, once per feature_hint_loss()"
            )
        for m in mixers:
            m.hint_loss = None
        return torch.stack(hints).mean()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_compiled"] = {}  # generated functions are rebuilt from the graphs when the copy is made
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._generate_code()


@dataclass(frozen=True)
class SiteInfo:
    """A graftable activation: its name, pre-activation shape (no batch dim), what applies it, and its layout
    (which axis holds the channels, read from the graph: README "Layouts")."""

    name: str
    shape: tuple[int, ...] | None
    kind: str
    inplace: bool
    node: str
    layout: Layout = Layout(UNKNOWN)


Shape = list[int] | tuple[int, ...]


def _example(example_input: Example | None, input_shape: Shape | None, what: str) -> tuple[torch.Tensor, ...]:
    if example_input is not None:
        example = example_input if isinstance(example_input, tuple) else (example_input,)
        if not example or not all(isinstance(t, torch.Tensor) for t in example):
            raise GraftError(
                f"{what}: example_input must be an input batch, a torch.Tensor (or a non-empty tuple of tensors, the "
                f"model's positional inputs), got {short_repr(example_input)} ({type(example_input).__name__})"
            )
        if example[0].dim() == 0:
            raise GraftError(f"{what}: example_input must be a batch with a batch dimension, got a 0-dim tensor")
        return example
    if input_shape is None:
        raise SpecError(f"{what}: give example_input, or input_shape in the spec (one sample, no batch dimension)")
    problem = input_shape_problem(list(input_shape))
    if problem is not None:
        raise SpecError(f"{what}: {problem}")
    return (torch.randn(2, *input_shape),)


def _traced_with_shapes(
    model: nn.Module, example: tuple[torch.Tensor, ...], name: str, modes: tuple[bool, ...], hint: str = ""
) -> Traced:
    traced = trace(model, name=name, training_modes=modes)
    propagate_shapes(traced, example, name=name, hint=hint)
    return traced


def _unwrapped(module: nn.Module) -> nn.Module:
    """The model inside a ``torch.compile``, ``DataParallel`` or ``DistributedDataParallel`` wrapper, which shares its
    parameters: graftnet traces and grafts the model itself (as timm's ``unwrap_model`` does), and FX cannot trace
    the wrappers. Any other module is returned as it is."""
    while True:
        if isinstance(module, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            module = module.module
        elif type(module).__name__ == "OptimizedModule" and isinstance(getattr(module, "_orig_mod", None), nn.Module):
            module = module.get_submodule("_orig_mod")  # torch.compile's wrapper
        else:
            return module


def sites(
    model: nn.Module, example_input: Example | None = None, *, input_shape: Shape | None = None
) -> list[SiteInfo]:
    """The graftable activations of ``model`` in execution order, with their pre-activation shapes.

    Activations whose pre-activation has no batch dimension (a relative-position MLP over a coordinate table,
    computed once for every sample, or the batch merged with another dimension) are left out: they cannot be
    mixed sample by sample, and naming one in a spec is a :class:`NameResolutionError` that says so.

    Examples:
        >>> import torchvision
        >>> [s.name for s in sites(torchvision.models.resnet18(), input_shape=(3, 32, 32))][:3]
        ['relu', 'layer1.0.relu@0', 'layer1.0.relu@1']
    """
    if not isinstance(model, nn.Module):
        raise GraftError(f"graftnet.sites: the model is a {type(model).__name__}, not a torch.nn.Module")
    model = _unwrapped(model)
    example = _example(example_input, input_shape, "graftnet.sites")
    traced = _traced_with_shapes(model, example, "the model", (False,))
    # activations on tensors without the batch dimension (tables computed once for all samples) are not offered
    return [SiteInfo(a.name, a.shape, a.kind, a.inplace, a.node, a.layout) for a in catalogue(traced) if a.batched]


def _teacher_modules(teachers: Mapping[str, nn.Module] | None, spec: Spec) -> dict[str, nn.Module]:
    if teachers is None:
        built = {}
        for name, t in spec.teachers.items():
            ref = t.model_spec()
            if ref is None:
                raise SpecError(
                    f"teachers.{name}.model: no teacher module was passed to graft(), so the spec must name its model"
                )
            built[name] = build_model(ref.model, ref.kwargs, ref.weights, where=f"teachers.{name}")
        return built
    if not isinstance(teachers, Mapping):
        raise GraftError(f"graft(teachers=…) must map teacher names to modules, got a {type(teachers).__name__}")
    for name, module in teachers.items():
        problem = teacher_name_problem(name)
        if problem is not None:
            raise SpecError(f"graft(teachers=…): {problem}")
        if not isinstance(module, nn.Module):
            raise GraftError(f"teacher {name!r} is a {type(module).__name__}, not a torch.nn.Module")
    teachers = {name: _unwrapped(module) for name, module in teachers.items()}
    missing = sorted(set(spec.teachers) - set(teachers))
    if missing:
        raise SpecError(
            f"teachers.{missing[0]}: the spec declares teacher {missing[0]!r} but graft() got no module for it "
            f"(got: {', '.join(sorted(teachers)) or 'none'})"
        )
    return dict(teachers)


def graft(
    student: nn.Module | None,
    teachers: Mapping[str, nn.Module] | None,
    spec: Spec | Mapping[str, Any] | str | Any,
    *,
    example_input: Example | None = None,
) -> GraftedModel:
    """Wire ``teachers`` into ``student`` as ``spec`` describes.

    Args:
        student: the student, or None to build the spec's ``student`` model.
        teachers: ``{name: module}``, or None to build the spec's teachers.
        spec: a :class:`Spec`, a dict, or a YAML/JSON path.
        example_input: an input batch used to resolve shapes; defaults to random data of ``input_shape``.

    Returns:
        A :class:`GraftedModel`; with p_w(student)=1 at every site it computes exactly ``student(x)``.
        Teacher parameters are frozen in place (``requires_grad=False``) and teachers stay in eval mode.

    Raises:
        GraftError: a subclass saying what is wrong in the spec or the models, and how to fix it.

    Examples:
        >>> import timm, graftnet
        >>> g = graftnet.graft(timm.create_model("resnet18", num_classes=10),
        ...                    {"big": timm.create_model("resnet50")},
        ...                    {"input_shape": [3, 32, 32],
        ...                     "sites": [{"student": "layer1", "taps": ["big:layer1"]}]})
        >>> g.p_w()
        {'layer1.1.act2': {'student': 0.5, 'big:layer1.2.act3': 0.5}}
    """
    spec = load_spec(spec)  # type: ignore[arg-type]
    if student is None:
        if spec.student is None:
            raise SpecError("student: graft() got no student module, so the spec must name its model")
        student = build_model(spec.student.model, spec.student.kwargs, spec.student.weights, where="student")
    if not isinstance(student, nn.Module):
        raise GraftError(f"the student is a {type(student).__name__}, not a torch.nn.Module")
    student = _unwrapped(student)
    teacher_modules = _teacher_modules(teachers, spec)
    example = _example(example_input, spec.input_shape, "graft")
    student_traced = _traced_with_shapes(student, example, "the student", (True, False))

    input_adapters: dict[str, nn.Module] = {}
    teacher_traced: dict[str, Traced] = {}
    for name, module in teacher_modules.items():
        t_example = example[:1]
        steps = spec.teachers[name].input if name in spec.teachers else []
        if steps:
            pairs = [(s.adapter, dict(s.kwargs)) for s in steps]
            adapter = make_input_adapter(pairs, tuple(example[0].shape[1:]), where=f"teachers.{name}.input")
            input_adapters[name] = adapter
            try:
                with training_mode(adapter, False), torch.no_grad():
                    t_example = (adapter(example[0]),)
            except GraftError:
                raise
            except (RuntimeError, TypeError, ValueError) as e:  # the example's dtype or device, say
                raise AdapterError(
                    f"teachers.{name}.input: the input adapters cannot run on the example input (shape "
                    f"{tuple(example[0].shape)}, dtype {example[0].dtype}): {type(e).__name__}: {clip(str(e))}"
                ) from e
        hint = (
            f"A teacher sees the student's input: if teacher {name!r} expects another shape, give it input "
            f"adapters in the spec (teachers.{name}.input: resize, normalize, conv1x1 …)."
        )
        teacher_traced[name] = _traced_with_shapes(module, t_example, f"teacher {name!r}", (False,), hint)

    plan = make_plan(spec, student_traced, teacher_traced)
    for module in teacher_modules.values():
        module.requires_grad_(False)  # every teacher, tapped or not: the contract is that teachers are frozen
    frozen: dict[str, FrozenTeacher] = {}
    for t_plan in plan.teachers:
        if not t_plan.runs:
            continue
        module = teacher_modules[t_plan.name]
        body = fx.GraphModule(module, truncate_teacher(teacher_traced[t_plan.name].eval_graph, module, t_plan.taps))
        learned_input = any(p.requires_grad for p in input_adapters.get(t_plan.name, nn.Identity()).parameters())
        frozen[t_plan.name] = FrozenTeacher(body, tuple(a.name for a in t_plan.taps), learned_input, module)
    input_adapters = {name: a for name, a in input_adapters.items() if name in frozen}

    mixers: dict[str, Mixer] = {}
    keys: dict[str, str] = {}
    for i, site in enumerate(plan.sites):
        adapters = []
        for k, tap in enumerate(site.taps):
            try:
                adapters.append(make_adapter(site.adapter, tap.activation.shape, site.activation.shape,  # type: ignore[arg-type]
                                             tap.activation.layout, site.activation.layout))  # fmt: skip
            except AdapterError as e:
                raise AdapterError(f"sites[{i}].taps[{k}] ({tap.name} → {site.name}): {e}") from e
        key = site.activation.node
        keys[site.name] = key
        mixers[key] = Mixer(site.name, [t.name for t in site.taps], adapters, spec.mixing.init,
                            spec.mixing.rescale_taps, spec.mixing.calibration_batches)  # fmt: skip
    graphs = {mode: splice_mixers(g, student, plan, keys, set(input_adapters)) for mode, g in student_traced.graphs()}
    graphs.setdefault(True, graphs[False])
    return GraftedModel(student, frozen, input_adapters, mixers, graphs, plan, spec)

