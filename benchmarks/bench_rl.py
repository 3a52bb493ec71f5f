"""Steps per second of knowledge-flow A2C against plain A2C, and against what the teachers must cost.

On MinAtar SpaceInvaders by default (the MinAtar A3C net on 10×10 boards); ``--env ALE/SpaceInvaders-v5`` runs the
same cases with the A3C paper's net on 84×84 Atari frames (taps at its second conv layer and the dense layer).

One run, the cases interleaved update by update (median of ``--rounds`` rounds of ``--updates`` updates each):
  plain A2C                   the SpaceInvaders student alone;
  KF, taps at conv and fc     grafted to two teachers (Breakout- and Asterix-shaped, learned 1×1 input adapters)
                              at the conv layer and the dense layer: each teacher runs up to its dense layer;
  KF, taps at conv only       the same teachers tapped only at the conv layer: graftnet cuts each teacher after
                              it, so the teachers' dense layers never run (truncation);
  KF without the KL term      taps at conv and fc, λ2 = 0;
  KF fixed, conv and fc       teachers built for the student's input channels, no input adapter, taps at conv
                              and fc: the taps the collector records are the update's, so the teachers run only
                              while collecting;
  KF fixed, taps not cached   the same with the collector's tap cache off (``Collector(cache_taps=False)``): the
                              update runs the teachers again, as graftnet did before the cache (an A/B in one run);
  hand-written KF, learned    the controls (CPU only): "KF, taps at conv and fc" and "KF fixed, conv and fc"
  hand-written KF, fixed      written by hand in plain PyTorch around copies of the graft's layers, without
                              graftnet's machinery (benchmarks/handwritten_kf.py; the same values, checked by a
                              test). ``graftnet ÷ hand-written``
                              is graftnet's steps/s over its control's, and a control's own ``of limit`` says how
                              near its limit eager PyTorch gets at this size.
An update is what the trainer does: a rollout of 16 environments × 5 steps, the loss, backward, Adam.

For each knowledge-flow case, the components are timed alone in the same rounds:
  required    what the case needs beyond plain A2C whatever the implementation: the teachers (their truncated
              bodies, with their input adapters) on exactly the batches the case cannot avoid — with fixed
              adapters, the T collection calls on batches of N observations; with learned ones, those plus the
              bootstrap pass's call (its taps of the last observation are the adapter's before the update, and the
              next rollout's first step needs them after it), a forward and backward through teacher and adapter
              on the T·N batch (the adapter's gradient) plus, with the KL term, a no-grad forward on it (θ_old's
              adapter) — and, with the KL term, one no-grad
              forward of the plain student on the T·N batch (f_θold needs a forward with θ_old; bench_speed.py
              counts the KL term's cost in the same unit);
  collection  Collector.collect of one rollout (T policy steps and the bootstrap pass), against plain A2C's;
              the teachers run in it T times (T + 1 where the bootstrap pass's taps are not carried over).
``limit`` = t_plain / (t_plain + t_required) per update: the ratio to plain A2C if knowledge flow cost nothing
but that work; ``of limit`` = ratio / limit, taken in each round and then the median over rounds (the issue's
target is ≥ 0.9); ratio and limit are medians over rounds. ``collection overhead``
is KF collection per env step − plain collection per env step − the teachers' own time per env step (their
calls in a rollout, each timed alone, over T): the grafted forward's extra work (mixers, the teacher calls'
Python, the taps' concatenation) while collecting.

On CPU a second table times the teachers' collection calls where they run, inside the timed updates (a clock
around each teacher body and input adapter, about a microsecond per call): there the environment and the student
run between them and evict their weights from the caches, so they cost more than alone in a loop (``in loop /
alone``). ``limit*`` and ``of limit*`` are limit and of limit with those calls at that cost (the rest of the
required work as above), ``collection overhead*`` the collector's calls in the updates less plain A2C's and less
the teachers' calls in them, per env step.

Run:  python benchmarks/bench_rl.py [--rounds 7] [--updates 40] [--threads 1] [--device cpu|cuda] [--env ENV]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import graftnet
from graftnet.graft import FrozenTeacher, GraftedModel
from graftnet.rl.a2c import Collector, a2c_update
from graftnet.rl.envs import env_info, make_env
from graftnet.rl.runs import build_agent
from graftnet.training.optim import make_optimizer

from handwritten_kf import HandWrittenKF  # the control next to this file

ENV = "MinAtar/SpaceInvaders-v1"
N, T = 16, 5
PROGRESS = 0.3  # where in training the updates are taken: λ1 = 40 (of 100), the floor of p_w(student) 0.2
CONTROLS = {"hand-written KF, learned": "KF, taps at conv and fc", "hand-written KF, fixed": "KF fixed, conv and fc"}


@dataclass(frozen=True)
class Game:
    """The networks of one environment family: the student's model and input channels, the learned adapters'
    teachers' channels, and the sites "conv" (the last conv layer's activation) and "fc" (the dense layer's)."""

    model: str
    channels: int
    teacher_channels: int
    conv: str


GAMES = {"MinAtar/": Game("graftnet:a3c_minatar", 6, 4, "features.1"),  # 10×10 boards, conv 16 3×3, fc 128
         "ALE/": Game("graftnet:a3c", 4, 4, "features.3")}  # 84×84 frames: the paper's A3C net, two convs, fc 256


def _game(env: str) -> Game:
    return next(g for prefix, g in GAMES.items() if env.startswith(prefix))


def _teacher(g: Game, actions: int, learned: bool) -> dict[str, Any]:
    if not learned:  # the student's input channels: no input adapter
        return {"model": g.model, "kwargs": {"in_channels": g.channels, "num_actions": actions}}
    return {"model": g.model, "kwargs": {"in_channels": g.teacher_channels, "num_actions": actions},
            "input": [{"adapter": "conv1x1", "kwargs": {"out_channels": g.teacher_channels}}]}  # fmt: skip


def _spec(sites: list[str] | None, lambda2: float = 0.1, learned: bool = True, env: str = ENV) -> graftnet.Spec:
    """Plain A2C (``sites`` None) or knowledge flow from two teachers (Breakout- and Asterix-shaped) at ``sites``,
    which name "conv" and "fc"."""
    g = _game(env)
    shape, actions = env_info(env)
    spec: dict[str, Any] = {
        "student": {"model": g.model, "kwargs": {"in_channels": g.channels, "num_actions": actions}},
        "input_shape": list(shape),
        "rl": {"env": env, "num_envs": N, "rollout": T},
        "train": {"method": "scratch" if sites is None else "knowledge_flow", "lambda2": lambda2,
                  "feature_hint": 0.0},  # the paper's objective, as the limit counts it
    }
    if sites is not None:
        spec["teachers"] = {"breakout": _teacher(g, 3, learned), "asterix": _teacher(g, 5, learned)}
        names = [{"conv": g.conv, "fc": "act"}[s] for s in sites]
        spec["sites"] = [{"student": s, "taps": [f"breakout:{s}", f"asterix:{s}"]} for s in names]
    return graftnet.load_spec(spec)


def _teacher_work(g: GraftedModel, lambda2: float, obs: torch.Tensor,
                  student: nn.Module) -> tuple[Callable[[], None], Callable[[], None]]:  # fmt: skip
    """Two functions: the required work of one update (teachers, and θ_old's student forward with the KL term),
    and the teachers' share of one collection step."""
    runs: list[tuple[nn.Module, FrozenTeacher, bool]] = []
    for name, t in g.teachers.items():
        assert isinstance(t, FrozenTeacher)
        adapter = g.input_adapters[name] if name in g.input_adapters else nn.Identity()
        runs.append((adapter, t, t.needs_input_grad))
    steps = [obs[i] for i in range(len(obs))]  # the T batches of N observations
    batch = obs.reshape(-1, *obs.shape[2:])  # the T·N batch

    def one_step(x: torch.Tensor) -> None:
        with torch.no_grad():
            for adapter, t, _ in runs:
                t.body(adapter(x))

    def update() -> None:
        for x in steps:
            one_step(x)
        with torch.no_grad():  # the bootstrap pass: taps behind a learned adapter cannot be carried to the next
            for adapter, t, learned in runs:  # rollout, whose first step sees the adapter after the update
                if learned:
                    t.body(adapter(steps[0]))
        for adapter, t, learned in runs:
            if not learned:
                continue
            taps = t.body(adapter(batch))
            params = [p for p in adapter.parameters() if p.requires_grad]
            torch.autograd.grad(taps, params, grad_outputs=[torch.ones_like(z) for z in taps])
            if lambda2 > 0:
                with torch.no_grad():
                    t.body(adapter(batch))
        if lambda2 > 0:
            with torch.no_grad():
                student(batch)

    return update, lambda: one_step(steps[0])


def _teacher_calls(bodies: list[nn.Module], collect: Callable[[], Any]) -> float:
    """How many times each teacher runs in ``collect()`` (the mean over teachers): T, or T + 1 where the
    bootstrap pass's taps cannot be carried to the next rollout's first step."""
    calls = [0]
    hooks = [b.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1)) for b in bodies]
    collect()
    for h in hooks:
        h.remove()
    return calls[0] / max(len(hooks), 1)


@dataclass
class _Case:
    """One timed case: ``update()`` takes one update and returns its agent steps, ``collect()`` one rollout;
    ``bodies`` are the teachers' modules (what the teachers' calls are) and ``adapters`` their input adapters (the
    in-loop clock times both), ``collector`` the object whose ``collect`` the update calls."""

    update: Callable[[], int]
    collect: Callable[[], Any]
    bodies: list[nn.Module]
    adapters: list[nn.Module]
    collector: Any
    env: Any
    note: str = ""  # what the teachers run, for the first lines


def _graftnet_case(spec: graftnet.Spec, env_id: str, device: torch.device, cache_taps: bool) -> tuple[_Case, Any]:
    env = make_env(env_id, N, seed=0)
    method, _ = build_agent(spec, env.observation_shape, env.num_actions, total_steps=10_000)
    method.model.train()
    method.to(device)
    assert spec.train is not None and spec.rl is not None
    optimizer = make_optimizer(method.param_groups(), spec.train)
    collector = Collector(env, device, cache_taps=cache_taps)
    rl = spec.rl

    def update() -> int:
        return a2c_update(method, collector, optimizer, rl, PROGRESS)[2]

    bodies: list[nn.Module] = [t.body for t in method.grafted.teachers.values() if isinstance(t, FrozenTeacher)]
    kept = ", ".join(f"teacher runs {t.parameters_run:,} of {t.parameters_total:,} parameters"
                     for t in list(method.grafted.teachers.values())[:1])  # fmt: skip
    case = _Case(update, lambda: collector.collect(method.model, T), bodies,
                 list(method.grafted.input_adapters.values()), collector, env, kept)  # fmt: skip
    return case, method


def _handwritten(method: Any, env_id: str, env: Any) -> HandWrittenKF:
    """The hand-written control of ``method``'s case (taps at conv and fc, fixed or learned adapters), from its
    graft: the same weights, tap scales and settings (benchmarks/handwritten_kf.py)."""
    lrs = {group["name"]: group["lr"] for group in method.param_groups()}
    return HandWrittenKF.from_graft(
        method.grafted, env, int(_game(env_id).conv.split(".")[-1]), lambda1=method.lambda1(PROGRESS),
        lambda2=method.settings.lambda2, floor=method.student_floor(PROGRESS), lr=lrs["student"],
        lr_mixing=lrs["mixing"], lr_adapters=lrs.get("adapters", 0.0), clip_rewards=env_id.startswith("ALE/"),
    )  # fmt: skip


def _handwritten_case(method: Any, env_id: str) -> _Case:
    env = make_env(env_id, N, seed=0)
    hand = _handwritten(method, env_id, env)
    return _Case(lambda: hand.update(T), lambda: hand.collect(T), list(hand.teachers),
                 list(hand.model.input_adapters), hand, env)  # fmt: skip


class _InSituClock:
    """Times the teachers' forwards (and their input adapters') inside the real collection.

    There the environment and the student run between their calls and evict the teachers' weights from the
    caches, so each call costs more than timing it alone in a loop (``required``) says: this is what the same calls
    cost any implementation in the loop. On CPU only (a GPU's calls return before their work is done).
    """

    def __init__(self, modules: list[nn.Module], collector: Any) -> None:
        self.seconds = 0.0  # the teachers' calls while collecting
        self.collecting = 0.0  # the collector's calls, whole
        self._on = False
        for m in modules:
            m.forward = self._timing(m.forward)
        collect = collector.collect

        def collecting(*args: Any, **kwargs: Any) -> Any:
            self._on = True
            start = time.perf_counter()
            try:
                return collect(*args, **kwargs)
            finally:
                self._on = False
                self.collecting += time.perf_counter() - start

        collector.collect = collecting

    def _timing(self, forward: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            if not self._on:
                return forward(*args, **kwargs)
            start = time.perf_counter()
            try:
                return forward(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        return timed


def _timed(fn: Callable[[], Any], repeats: int) -> float:
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)  # GPU work is asynchronous
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - start) / repeats


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (``argv``, default ``sys.argv[1:]``); benchmarks/run_gpu.sh's lines are checked against it."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--updates", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--env", default=ENV, help="a MinAtar/ or an ALE/ game (the A3C paper's net on 84×84 frames)")
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cases = {
        "plain A2C": _spec(None, env=args.env),
        "KF, taps at conv and fc": _spec(["conv", "fc"], env=args.env),
        "KF, taps at conv only": _spec(["conv"], env=args.env),
        "KF without the KL term": _spec(["conv", "fc"], lambda2=0.0, env=args.env),
        "KF fixed, conv and fc": _spec(["conv", "fc"], learned=False, env=args.env),
        "KF fixed, taps not cached": _spec(["conv", "fc"], learned=False, env=args.env),
    }
    device = torch.device(args.device)
    runs: dict[str, _Case] = {}
    methods = {}
    for name, spec in cases.items():
        cache_taps = name != "KF fixed, taps not cached"
        runs[name], methods[name] = _graftnet_case(spec, args.env, device, cache_taps)
    if device.type == "cpu":  # the controls run on the CPU only (written for it: no device moves)
        for control, case in CONTROLS.items():
            runs[control] = _handwritten_case(methods[case], args.env)
    obs = runs["plain A2C"].collect()[0].obs  # real observations for the teachers
    obs = obs.to(device)
    plain_student = methods["plain A2C"].model  # the student alone (a graft without sites)
    work = {name: _teacher_work(m.grafted, m.settings.lambda2, obs, plain_student)
            for name, m in methods.items() if name != "plain A2C"}  # fmt: skip
    for control, case in CONTROLS.items():
        if control in runs:
            work[control] = work[case]  # the same teachers and adapters, and θ_old's forward of the same student
    for run in runs.values():
        run.collect()  # a first rollout: the next ones start from a bootstrap pass's taps
    calls = {name: _teacher_calls(run.bodies, run.collect) for name, run in runs.items() if name in work}
    on_cpu = device.type == "cpu"
    clocks = {name: _InSituClock(run.bodies + run.adapters, run.collector)
              for name, run in runs.items()} if on_cpu else {}  # fmt: skip
    in_situ: dict[str, list[float]] = {name: [] for name in clocks}  # the teachers' collection calls, per update
    collect_in_situ: dict[str, list[float]] = {name: [] for name in clocks}  # the collector's calls, per update
    rates: dict[str, list[float]] = {name: [] for name in runs}
    collect: dict[str, list[float]] = {name: [] for name in runs}
    required: dict[str, list[float]] = {name: [] for name in work}
    per_step: dict[str, list[float]] = {name: [] for name in work}
    for round_ in range(args.rounds + 1):  # round 0 warms up
        for name, run in runs.items():
            if name in clocks:
                clocks[name].seconds = clocks[name].collecting = 0.0
            start, steps = time.perf_counter(), 0
            for _ in range(args.updates):
                steps += run.update()
            took = time.perf_counter() - start
            if round_ and name in clocks:
                in_situ[name].append(clocks[name].seconds / args.updates)
                collect_in_situ[name].append(clocks[name].collecting / args.updates)
            c = _timed(run.collect, args.updates)
            if name in work:
                r, s = _timed(work[name][0], args.updates), _timed(work[name][1], args.updates * T)
            if round_:
                rates[name].append(steps / took)
                collect[name].append(c / T)
                if name in work:
                    required[name].append(r)
                    per_step[name].append(s)
    for run in runs.values():
        run.env.close()
    med = {name: statistics.median(r) for name, r in rates.items()}
    t_plain = T * N / med["plain A2C"]
    c_plain = statistics.median(collect["plain A2C"])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {args.env}, {N} envs x {T} steps per "
          f"update; median of {args.rounds} rounds of {args.updates} updates")
    print(f"  plain A2C: {t_plain * 1e3:.2f} ms per update, collection {c_plain * 1e6:.0f} us per env step")
    for name, rate in med.items():
        kept = runs[name].note
        print(f"  {name:<26} {rate:8,.0f} agent steps/s  ({rate / med['plain A2C']:.2f} of plain A2C)"
              + (f"  [{kept}]" if kept else ""))
    print("  case                       ratio  limit  of limit  teachers/update  teacher calls/rollout  "
          "collection overhead/env step")
    plains = [T * N / r for r in rates["plain A2C"]]  # plain A2C's time per update, round by round
    for name in work:
        # each round's ratio against its own limit, then the median: the machine's speed drifts between rounds
        # (plain A2C alone ranges over ±30% across runs), and a ratio of medians taken apart mixes rounds
        of_limit = statistics.median((rate / rates["plain A2C"][i]) / (plains[i] / (plains[i] + required[name][i]))
                                     for i, rate in enumerate(rates[name]))  # fmt: skip
        ratio = med[name] / med["plain A2C"]
        t_req = statistics.median(required[name])
        limit = t_plain / (t_plain + t_req)
        teacher_time = calls[name] * statistics.median(per_step[name]) / T  # per env step
        overhead = statistics.median(collect[name]) - c_plain - teacher_time
        print(f"  {name:<26} {ratio:5.2f}  {limit:5.2f}  {of_limit:8.2f}  {t_req * 1e3:12.2f} ms"
              f"  {calls[name]:21.0f}  {overhead * 1e6:25.0f} us")
    for control, case in CONTROLS.items():
        if control in rates:
            per_round = statistics.median(a / b for a, b in zip(rates[case], rates[control], strict=True))
            print(f"  graftnet ÷ hand-written: {case} over {control}, steps/s, median over rounds: {per_round:.2f}")
    if not in_situ:
        return
    print("  with the teachers' collection calls timed in the loop (limit*: required work with those calls at their "
          "in-loop cost; overhead*: the collector's calls in the loop less plain A2C's and the teachers')")
    print("  case                       in loop / alone  limit*  of limit*  collection overhead*/env step")
    c_plain_loop = statistics.median(collect_in_situ["plain A2C"])
    for name in work:
        alone = [calls[name] * s for s in per_step[name]]  # the collection calls, timed alone, per update
        req = [r - a + s for r, a, s in zip(required[name], alone, in_situ[name], strict=True)]
        of_limit = statistics.median((rate / rates["plain A2C"][i]) / (plains[i] / (plains[i] + req[i]))
                                     for i, rate in enumerate(rates[name]))  # fmt: skip
        limit = t_plain / (t_plain + statistics.median(req))
        slower = statistics.median(s / a for s, a in zip(in_situ[name], alone, strict=True))
        overhead = statistics.median(c - t for c, t in zip(collect_in_situ[name], in_situ[name], strict=True))
        overhead = (overhead - c_plain_loop) / T
        print(f"  {name:<26} {slower:15.2f}  {limit:6.2f}  {of_limit:9.2f}  {overhead * 1e6:26.0f} us")


if __name__ == "__main__":
    main()
