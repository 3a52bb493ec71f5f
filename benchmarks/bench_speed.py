"""Speed of knowledge-flow training with graftnet: against its limits and a hand-written implementation (issue 8).

For each case — a timm resnet18 student (3×32×32) with timm resnet50 and densenet121 teachers; the A3C
convnet (4×84×84) with two A3C teachers; Hinton's 2×800 MLP with a 2×1200 teacher — it times, in one
run, interleaved in a shuffled order, the median of ``--rounds`` rounds of:

  student step      the plain student: forward, cross-entropy, backward, Adam step;
  teacher NAME      each teacher's forward up to its deepest tap, alone (hand-written: forward hooks that
                    save the taps and stop the forward at the deepest one), without autograd;
  graftnet step     the knowledge-flow step graftnet's trainer makes (``graftnet.KnowledgeFlow.loss``): task loss +
                    λ1·ℓ_dep through the grafted model, backward, Adam step;
  hand-written step the identical knowledge-flow model written the straightforward eager way: teacher taps by
                    forward hooks, mixing in modules wrapped around the student's activations (same adapters,
                    same weights — checked equal to graftnet's output before timing);
  graftnet + KL     the graftnet step with the KL term against θ_old (λ2 > 0, θ_old one step old);
  student forward   one forward of the plain student without autograd (the unit for the KL's extra cost);
  original/exported the eval-mode forward of the original student and of the student exported by
                    ``graftnet.detach`` + safetensors, loaded into a freshly built model.

and prints the ratios the issue asks for, plus peak memory of one training step (CPU: the allocator's
running total from the profiler's memory events; CUDA: ``max_memory_allocated``).

``--precision bf16|fp16`` runs every step under autocast (graftnet through ``train.precision``, the others in
``torch.autocast``). ``--compile`` adds, in the same rounds, the student, graftnet (``train.compile``) and
hand-written steps compiled with torch.compile, and reports compiled ÷ eager, compiled graftnet ÷ compiled
hand-written, and the time the first (compiling) call of each took.

Run:  python benchmarks/bench_speed.py [--case resnet a3c mlp] [--device cpu|cuda] [--rounds 20] [--threads 2]
                                       [--precision fp32|bf16|fp16] [--compile]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from safetensors.torch import load_file, save_file
from torch import nn
from torch._C._profiler import _EventType  # the profiler's raw events: allocations with sizes
from torch.profiler import ProfilerActivity

import graftnet
from graftnet.adapters import MapAdapter
from graftnet.graft import FrozenTeacher, GraftedModel
from graftnet.losses import ParameterSnapshot
from graftnet.models import build_model
from graftnet.training.evaluation import logits_of
from graftnet.training.objectives import KnowledgeFlow

# ---- the cases ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    spec: dict[str, Any]
    batch: int
    classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.spec["input_shape"])


def _a3c(actions: int) -> dict[str, Any]:
    return {"model": "graftnet:a3c", "kwargs": {"num_actions": actions}}


CASES = {
    "resnet": Case(
        "timm resnet18 student, timm resnet50 + densenet121 teachers, 3x32x32",
        {
            "student": {"model": "timm:resnet18", "kwargs": {"num_classes": 10}},
            "teachers": {
                "r50": {"model": "timm:resnet50", "kwargs": {"num_classes": 100}},
                "d121": {"model": "timm:densenet121", "kwargs": {"num_classes": 10}},
            },
            "input_shape": [3, 32, 32],
            "sites": [
                {"student": "layer1", "taps": ["r50:layer1", "d121:features.denseblock1"]},
                {"student": "layer2", "taps": ["r50:layer2", "d121:features.denseblock2"]},
            ],
        },
        batch=64,
        classes=10,
    ),
    "a3c": Case(
        "A3C convnet student (6 actions), two A3C teachers from other games (18 and 4 actions), 4x84x84",
        {
            "student": _a3c(6),
            "teachers": {"seaquest": _a3c(18), "breakout": _a3c(4)},
            "input_shape": [4, 84, 84],
            "sites": [
                {"student": name, "taps": [f"seaquest:{name}", f"breakout:{name}"]}
                for name in ("features.1", "features.3", "act")
            ],
        },
        batch=80,  # an A2C update: 16 environments x 5-step rollouts
        classes=6,
    ),
    "mlp": Case(
        "MLP 784-800-800-10 student, 784-1200-1200-10 teacher (dropout 0.5)",
        {
            "student": {"model": "graftnet:mlp"},
            "teachers": {"big": {"model": "graftnet:mlp", "kwargs": {"hidden": [1200, 1200], "dropout": 0.5}}},
            "input_shape": [784],
            "sites": [{"student": "body.2", "taps": ["big:body.2"]}, {"student": "body.4", "taps": ["big:body.5"]}],
        },
        batch=128,
        classes=10,
    ),
}

# ---- the hand-written eager implementation ---------------------------------------------------------------------


class _StopForwardError(Exception):
    """Raised by the hook on a teacher's deepest tap: the rest of the teacher is not needed."""


class HookedTeacher(nn.Module):
    """A frozen teacher whose tap pre-activations are saved by forward pre-hooks on the activation modules;
    the hook on the last tap to fire stops the forward."""

    def __init__(self, teacher: nn.Module, taps: list[str]) -> None:
        super().__init__()
        self.teacher = teacher.eval().requires_grad_(False)
        self.taps = taps
        self.saved: dict[str, torch.Tensor] = {}
        for name in taps:
            self.teacher.get_submodule(name).register_forward_pre_hook(partial(self._save, name))

    def _save(self, name: str, module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        if len(self.saved) + 1 == len(self.taps):
            self.saved[name] = args[0]
            raise _StopForwardError
        # an in-place activation would overwrite the saved pre-activation
        self.saved[name] = args[0].clone() if getattr(module, "inplace", False) else args[0]

    def train(self, mode: bool = True) -> HookedTeacher:
        return super().train(False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        self.saved = {}
        with torch.no_grad():
            try:
                self.teacher(x)
            except _StopForwardError:
                pass
        return [self.saved[name] for name in self.taps]


class HandMap(nn.Module):
    """1×1 conv plus adaptive pooling (shrink) or bilinear interpolation (grow), at the cheaper resolution."""

    def __init__(self, conv: nn.Module, size: tuple[int, ...], pool_first: bool) -> None:
        super().__init__()
        self.conv, self.size, self.pool_first = conv, size, pool_first

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        if tuple(t.shape[2:]) == self.size:
            return self.conv(t)  # type: ignore[no-any-return]
        if self.pool_first:
            return self.conv(F.adaptive_avg_pool2d(t, self.size))  # type: ignore[no-any-return, arg-type]
        return F.interpolate(self.conv(t), size=self.size, mode="bilinear", align_corners=False)


class MixedActivation(nn.Module):
    """Wraps a student activation: act(p_0·z + Σ_l p_l·Q_l(s_l·t_l)), the taps handed in before each forward."""

    scales: torch.Tensor

    def __init__(self, act: nn.Module, logits: torch.Tensor, scales: torch.Tensor, adapters: list[nn.Module]) -> None:
        super().__init__()
        self.act = act
        self.logits = nn.Parameter(logits.detach().clone())
        self.register_buffer("scales", scales.detach().clone())
        self.adapters = nn.ModuleList(adapters)
        self.taps: list[torch.Tensor] = []

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        p = torch.softmax(self.logits, dim=0)
        out = p[0] * z
        for i, (adapter, t) in enumerate(zip(self.adapters, self.taps, strict=True)):
            out = out + p[i + 1] * adapter(t * self.scales[i])
        return self.act(out)  # type: ignore[no-any-return]


def _hand_adapter(adapter: nn.Module) -> nn.Module:
    if isinstance(adapter, MapAdapter):
        return HandMap(copy.deepcopy(adapter.conv), adapter.size, adapter.resize_first)
    return copy.deepcopy(adapter)  # Identity, Linear, Flatten+Linear: plain torch modules


class HandWrittenKnowledgeFlow(nn.Module):
    """The model graftnet builds for ``g``, written by hand: copies of its student, teachers and mixer weights."""

    def __init__(self, g: GraftedModel, teachers: dict[str, nn.Module]) -> None:
        super().__init__()
        self.student = copy.deepcopy(g.student)
        self.wrapped: list[tuple[MixedActivation, list[tuple[str, int]]]] = []
        tap_modules: dict[str, list[str]] = {}
        for site in g.plan.sites:
            mixer = g.mixers[site.name]
            refs = []
            for tap in site.taps:
                names = tap_modules.setdefault(tap.teacher, [])
                names.append(_activation_module(teachers[tap.teacher], tap.activation.name))
                refs.append((tap.teacher, len(names) - 1))
            path = _activation_module(self.student, site.name)
            adapters = [_hand_adapter(a) for a in mixer.adapters]
            wrap = MixedActivation(self.student.get_submodule(path), mixer.logits, mixer.tap_scale, adapters)
            self.student.set_submodule(path, wrap)
            self.wrapped.append((wrap, refs))
        self.teachers = nn.ModuleDict(
            {name: HookedTeacher(copy.deepcopy(teachers[name]), taps) for name, taps in tap_modules.items()}
        )

    def forward(self, x: torch.Tensor) -> Any:
        features = {name: teacher(x) for name, teacher in self.teachers.items()}
        for wrap, refs in self.wrapped:
            wrap.taps = [features[teacher][i] for teacher, i in refs]
        return self.student(x)

    def dependency_loss(self) -> torch.Tensor:
        return -torch.stack([torch.log_softmax(w.logits, dim=0)[0] for w, _ in self.wrapped]).mean()


def _activation_module(model: nn.Module, name: str) -> str:
    """The module whose input is the pre-activation: the activation itself, or a fused norm+act layer's ``act``."""
    module = model.get_submodule(name)
    return f"{name}.act" if hasattr(module, "act") and isinstance(module.act, nn.Module) else name


Allocation = _EventType.Allocation


@dataclass(frozen=True)
class Ratio:
    """The median of per-round ratios and their quartiles (how much the rounds disagree)."""

    median: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.median:.3f}  [quartiles {self.low:.3f}, {self.high:.3f}]"

# ---- measuring ----------------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _walk(nodes: list[Any]) -> Iterator[Any]:
    for node in nodes:
        yield node
        yield from _walk(node.children)


@contextmanager
def _stderr_silenced() -> Iterator[None]:
    """The profiler's C++ side logs every start and stop on file descriptor 2."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak memory allocated during ``fn()`` above what was allocated before it."""
    if device.type == "cuda":
        _sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    # The profiler records every allocation and free with its size and time: their running total is the
    # memory held, relative to the start.
    with _stderr_silenced(), torch.profiler.profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    allocations = [e for e in _walk(prof.profiler.kineto_results.experimental_event_tree()) if e.tag == Allocation]
    running = peak = 0
    for event in sorted(allocations, key=lambda e: e.start_time_ns):
        running += event.extra_fields.alloc_size
        peak = max(peak, running)
    return peak


def _step(model: nn.Module, loss: Callable[[], torch.Tensor], opt: torch.optim.Optimizer,
          before_step: Callable[[], None] | None = None) -> None:  # fmt: skip
    opt.zero_grad(set_to_none=True)
    loss().backward()
    if before_step is not None:
        before_step()
    opt.step()


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def run_case(key: str, case: Case, device: torch.device, rounds: int, warmup: int, precision: str = "fp32",
             compile: bool = False) -> dict[str, Ratio]:  # noqa: A002  # fmt: skip
    torch.manual_seed(0)
    # feature_hint 0: the paper's objective, which the limit and the recorded figures count (the hint adds a
    # squared distance per site and tap on top)
    train = {"method": "knowledge_flow", "lambda2": 0.1, "kl_lag": 1, "precision": precision, "feature_hint": 0.0}
    spec = graftnet.load_spec({**case.spec, "train": train})
    no_kl = spec.model_copy(update={"train": spec.train.model_copy(update={"lambda2": 0.0})})  # type: ignore[union-attr]
    x = torch.randn(case.batch, *case.input_shape)
    y = torch.randint(0, case.classes, (case.batch,))

    student = build_model(spec.student.model, spec.student.kwargs)  # type: ignore[union-attr]
    plain = copy.deepcopy(student)
    teachers = {name: build_model(t.model, t.kwargs) for name, t in spec.teachers.items()}  # type: ignore[arg-type]
    g = graftnet.graft(student, teachers, spec.graft_part(), example_input=x[:2])
    kf, kf_no_kl = (KnowledgeFlow(g, s.train, total_steps=1000) for s in (spec, no_kl))
    # today's default objective, the feature hint on: timed on its own, with the hints kept only while it runs
    kf_hint = KnowledgeFlow(g, spec.train.model_copy(update={"feature_hint": 0.3}), total_steps=1000)  # type: ignore[union-attr]
    g.keep_feature_hints(False)
    hand = HandWrittenKnowledgeFlow(g, teachers)

    g.eval(), hand.eval()
    with torch.no_grad():
        diff = (logits_of(g(x)) - logits_of(hand(x))).abs().max().item()
    if diff > 1e-4:
        raise RuntimeError(f"{key}: the hand-written model differs from graftnet's by {diff:.2e}")
    g.train(), hand.train(), plain.train()
    for model in (g, hand, plain):
        model.to(device)
    kf.snapshot = ParameterSnapshot(g)  # θ_old, as KnowledgeFlow makes it, on the device
    kf_hint.snapshot = ParameterSnapshot(g)
    x, y = x.to(device), y.to(device)
    low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    def autocast() -> Any:
        """What ``train.precision`` does inside graftnet's objective, for the steps written without it."""
        return torch.autocast(device.type, dtype=low) if low is not None else contextlib.nullcontext()

    def task_loss(model: nn.Module) -> torch.Tensor:
        with autocast():
            out = logits_of(model(x))
        return F.cross_entropy(out.float(), y)
    lam = kf.lambda1(0.5)
    opt_g, opt_hand, opt_plain = (torch.optim.Adam(_trainable(m), lr=1e-4) for m in (g, hand, plain))
    hooked = {name: t for name, t in hand.teachers.items()}
    exported, original = _exported_pair(g, spec, device)

    adapter_inputs = _adapter_inputs(g, x)
    adapter_params = [p for m in g.mixers.values() for p in m.adapters.parameters()]
    opt_adapters = torch.optim.Adam(adapter_params, lr=1e-4) if adapter_params else None

    def adapters_step() -> None:
        """The adapters' own work in a step, alone: forward on the taps, backward, Adam."""
        if opt_adapters is not None:
            _step(g, lambda: sum(a(t).sum() for a, t in adapter_inputs), opt_adapters)  # type: ignore[arg-type, misc]

    def student_step(model: nn.Module = plain) -> None:
        _step(plain, lambda: task_loss(model), opt_plain)

    def graftnet_step(objective: KnowledgeFlow = kf_no_kl) -> None:
        _step(g, lambda: objective.loss(x, y, 0.5).total, opt_g)

    def graftnet_kl_step(objective: KnowledgeFlow = kf) -> None:
        _step(g, lambda: objective.loss(x, y, 0.5).total, opt_g, objective.before_step)

    def graftnet_default_step() -> None:
        g.keep_feature_hints()
        graftnet_kl_step(kf_hint)
        g.keep_feature_hints(False)

    def hand_step(model: nn.Module = hand) -> None:
        _step(hand, lambda: task_loss(model) + lam * hand.dependency_loss(), opt_hand)

    @torch.no_grad()
    def student_forward() -> None:
        with autocast():
            plain(x)

    @torch.no_grad()
    def forward_of(model: nn.Module) -> None:
        model(x)

    timed: dict[str, Callable[[], object]] = {
        "student step": student_step,
        **{f"teacher {name}": partial(t, x) for name, t in hooked.items()},
        "adapters alone": adapters_step,
        "graftnet step": graftnet_step,
        "hand-written step": hand_step,
        "graftnet + KL step": graftnet_kl_step,
        "graftnet + KL + hint step": graftnet_default_step,
        "student forward": student_forward,
        "original forward (eval)": partial(forward_of, original),
        "exported forward (eval)": partial(forward_of, exported),
    }
    compile_seconds: dict[str, float] = {}
    if compile:
        kf_c, kf_no_kl_c = (KnowledgeFlow(g, s.train, total_steps=1000, compile=True) for s in (spec, no_kl))
        kf_c.snapshot = ParameterSnapshot(g, compile=True)
        compiled: dict[str, Callable[[], object]] = {
            "student step (compiled)": partial(student_step, torch.compile(plain)),  # type: ignore[arg-type]
            "graftnet step (compiled)": partial(graftnet_step, kf_no_kl_c),
            "hand-written step (compiled)": partial(hand_step, torch.compile(hand)),  # type: ignore[arg-type]
            "graftnet + KL step (compiled)": partial(graftnet_kl_step, kf_c),
        }
        for name, first in compiled.items():  # the first call compiles: time it alone
            _sync(device)
            start = time.perf_counter()
            first()
            _sync(device)
            compile_seconds[name] = time.perf_counter() - start
        timed.update(compiled)
    for _ in range(warmup):
        for fn in timed.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in timed}
    order = list(timed)
    shuffle = random.Random(0).shuffle
    for _ in range(rounds):
        shuffle(order)  # no case always runs after the same one (caches, allocator state)
        for name in order:
            fn = timed[name]
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(ts) for name, ts in times.items()}

    def paired(ratio: Callable[[Callable[[str], float]], float]) -> Ratio:
        """A ratio of times from the same round (rounds interleave every case), over all rounds."""
        values = [ratio(lambda name, r=r: times[name][r]) for r in range(rounds)]  # type: ignore[misc]
        low, _, high = statistics.quantiles(values, n=4)
        return Ratio(statistics.median(values), low, high)

    def teachers_alone(t: Callable[[str], float]) -> float:
        return sum(t(name) for name in times if name.startswith("teacher "))

    ratios = {
        "machinery": paired(lambda t: t("graftnet step") / (t("student step") + teachers_alone(t))),
        "machinery without adapters": paired(
            lambda t: t("graftnet step") / (t("student step") + teachers_alone(t) + t("adapters alone"))
        ),
        "vs hand-written": paired(lambda t: t("graftnet step") / t("hand-written step")),
        "KL extra / student forward": paired(
            lambda t: (t("graftnet + KL step") - t("graftnet step")) / t("student forward")
        ),
        "exported / original": paired(lambda t: t("exported forward (eval)") / t("original forward (eval)")),
        "hint extra / student forward": paired(
            lambda t: (t("graftnet + KL + hint step") - t("graftnet + KL step")) / t("student forward")
        ),
    }
    if compile:
        ratios.update({
            "student compiled / eager": paired(lambda t: t("student step (compiled)") / t("student step")),
            "graftnet compiled / eager": paired(lambda t: t("graftnet step (compiled)") / t("graftnet step")),
            "compiled graftnet / compiled hand-written": paired(
                lambda t: t("graftnet step (compiled)") / t("hand-written step (compiled)")),
            "KL extra / student forward, compiled": paired(
                lambda t: (t("graftnet + KL step (compiled)") - t("graftnet step (compiled)")) / t("student forward")),
        })  # fmt: skip

    with torch.no_grad():
        tap_bytes = sum(t.numel() * t.element_size() for teacher in g.teachers.values() for t in teacher(x))
    memory = {
        "student step": _peak_bytes(student_step, device),
        "graftnet step": _peak_bytes(graftnet_step, device),
        "hand-written step": _peak_bytes(hand_step, device),
    }

    print(f"\n== {key}: {case.name}, batch {case.batch}, {precision}" + (", with compiled steps" if compile else ""))
    for name, t in med.items():
        print(f"  {name:<28} {t * 1e3:9.2f} ms")
    lines = [
        ("graftnet step / (student step + teachers to deepest tap)", "machinery", "target <= 1.10"),
        ("  the same with the adapters' own work in the denominator", "machinery without adapters", ""),
        ("graftnet step / hand-written step", "vs hand-written", "target <= 1.00"),
        ("KL term's extra time / one student forward", "KL extra / student forward", "target <= 1.00"),
        ("exported forward / original forward", "exported / original", "target 1.00 within noise"),
        ("the feature hint's extra time / one student forward", "hint extra / student forward", ""),
    ]
    if compile:
        lines += [
            ("compiled student step / eager student step", "student compiled / eager", ""),
            ("compiled graftnet step / eager graftnet step", "graftnet compiled / eager", ""),
            ("compiled graftnet step / compiled hand-written step", "compiled graftnet / compiled hand-written", ""),
            ("KL term's extra time, compiled / one student forward", "KL extra / student forward, compiled", ""),
        ]
    for text, key_, target in lines:
        print(f"  {text:<58} = {ratios[key_]}" + (f"  ({target})" if target else ""))
    for name, seconds in compile_seconds.items():
        print(f"  first call of {name:<40} {seconds:7.1f} s (compiling)")
    mib = 2.0**20
    expected = memory["student step"] + tap_bytes
    print(f"  peak memory of a step: student {memory['student step'] / mib:.1f} MiB, teachers' taps kept "
          f"{tap_bytes / mib:.1f} MiB, graftnet {memory['graftnet step'] / mib:.1f} MiB "
          f"({memory['graftnet step'] / expected:.2f}x student + taps), hand-written "
          f"{memory['hand-written step'] / mib:.1f} MiB")
    return ratios


def _adapter_inputs(g: GraftedModel, x: torch.Tensor) -> list[tuple[nn.Module, torch.Tensor]]:
    """Every adapter with the rescaled tap it reads, from one run of the teachers."""
    with torch.no_grad():
        teachers = {name: t for name, t in g.teachers.items() if isinstance(t, FrozenTeacher)}
        outputs = {name: dict(zip(t.taps, t(x), strict=True)) for name, t in teachers.items()}
    pairs = []
    for site in g.plan.sites:
        mixer = g.mixers[site.name]
        for i, (adapter, tap) in enumerate(zip(mixer.adapters, site.taps, strict=True)):
            pairs.append((adapter, outputs[tap.teacher][tap.activation.name] * mixer.tap_scale[i]))
    return pairs


def _exported_pair(g: GraftedModel, spec: graftnet.Spec, device: torch.device) -> tuple[nn.Module, nn.Module]:
    """A student exported the way ``graftnet export`` does (detach → safetensors → fresh model) and the original."""
    import tempfile
    from pathlib import Path

    ref = spec.student
    assert ref is not None
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "student.safetensors")
        detached = graftnet.detach(g, force=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in detached.state_dict().items()}, path)
        exported = build_model(ref.model, ref.kwargs)
        exported.load_state_dict(load_file(path), strict=True)
    original = build_model(ref.model, ref.kwargs)
    original.load_state_dict(exported.state_dict())
    return exported.eval().to(device), original.eval().to(device)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (``argv``, default ``sys.argv[1:]``); benchmarks/run_gpu.sh's lines are checked against it."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", nargs="+", choices=sorted(CASES), default=list(CASES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--compile", action="store_true", help="also time the steps compiled with torch.compile")
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"graftnet {graftnet.__version__}, torch {torch.__version__}, {where}, {args.precision}; "
          f"median of {args.rounds} interleaved rounds after {args.warmup} warm-up rounds")
    for key in args.case:
        run_case(key, CASES[key], device, args.rounds, args.warmup, args.precision, args.compile)


if __name__ == "__main__":
    main()
