"""Steps per second of knowledge-flow A2C against plain A2C on MinAtar, and against what the teachers must cost.

One run, the cases interleaved update by update (median of ``--rounds`` rounds of ``--updates`` updates each):
  plain A2C                   the SpaceInvaders student alone;
  KF, taps at conv and fc     grafted to two teachers (Breakout- and Asterix-shaped, learned 1×1 input adapters)
                              at the conv layer and the dense layer: each teacher runs up to its dense layer;
  KF, taps at conv only       the same teachers tapped only at the conv layer: graftnet cuts each teacher after
                              it, so the teachers' dense layers never run (truncation);
  KF without the KL term      taps at conv and fc, λ2 = 0;
  KF fixed, conv and fc       teachers built for the student's 6 input channels, no input adapter, taps at conv
                              and fc: the taps the collector records are the update's, so the teachers run only
                              while collecting;
  KF fixed, taps not cached   the same with the collector's tap cache off (``Collector(cache_taps=False)``): the
                              update runs the teachers again, as graftnet did before the cache (an A/B in one run).
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

Run:  python benchmarks/bench_rl.py [--rounds 7] [--updates 40] [--threads 1] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import graftnet
from graftnet.graft import FrozenTeacher, GraftedModel
from graftnet.rl.a2c import Collector, a2c_update
from graftnet.rl.envs import make_env
from graftnet.rl.runs import build_agent
from graftnet.training.optim import make_optimizer

ENV = "MinAtar/SpaceInvaders-v1"
STUDENT = {"model": "graftnet:a3c_minatar", "kwargs": {"in_channels": 6, "num_actions": 4}}
N, T = 16, 5


def _teacher(channels: int, actions: int, learned: bool) -> dict[str, Any]:
    if not learned:  # the student's 6 input channels: no input adapter
        return {"model": "graftnet:a3c_minatar", "kwargs": {"in_channels": 6, "num_actions": actions}}
    return {"model": "graftnet:a3c_minatar", "kwargs": {"in_channels": channels, "num_actions": actions},
            "input": [{"adapter": "conv1x1", "kwargs": {"out_channels": channels}}]}  # fmt: skip


def _spec(sites: list[str] | None, lambda2: float = 0.1, learned: bool = True) -> graftnet.Spec:
    spec: dict[str, Any] = {
        "student": STUDENT,
        "input_shape": [6, 10, 10],
        "rl": {"env": ENV, "num_envs": N, "rollout": T},
        "train": {"method": "scratch" if sites is None else "knowledge_flow", "lambda2": lambda2,
                  "feature_hint": 0.0},  # the paper's objective, as the limit counts it
    }
    if sites is not None:
        spec["teachers"] = {"breakout": _teacher(4, 3, learned), "asterix": _teacher(4, 5, learned)}
        spec["sites"] = [{"student": s, "taps": [f"breakout:{s}", f"asterix:{s}"]} for s in sites]
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


def _teacher_calls(g: GraftedModel, collect: Callable[[], Any]) -> float:
    """How many times each teacher runs in ``collect()`` (the mean over teachers): T, or T + 1 where the
    bootstrap pass's taps cannot be carried to the next rollout's first step."""
    calls = [0]
    hooks = [t.body.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
             for t in g.teachers.values() if isinstance(t, FrozenTeacher)]  # fmt: skip
    collect()
    for h in hooks:
        h.remove()
    return calls[0] / max(len(hooks), 1)


def _timed(fn: Callable[[], Any], repeats: int) -> float:
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)  # GPU work is asynchronous
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--updates", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cases = {
        "plain A2C": _spec(None),
        "KF, taps at conv and fc": _spec(["features.1", "act"]),
        "KF, taps at conv only": _spec(["features.1"]),
        "KF without the KL term": _spec(["features.1", "act"], lambda2=0.0),
        "KF fixed, conv and fc": _spec(["features.1", "act"], learned=False),
        "KF fixed, taps not cached": _spec(["features.1", "act"], learned=False),
    }
    device = torch.device(args.device)
    runs = {}
    for name, spec in cases.items():
        env = make_env(ENV, N, seed=0)
        method, _ = build_agent(spec, env.observation_shape, env.num_actions, total_steps=10_000)
        method.model.train()
        method.to(device)
        assert spec.train is not None
        optimizer = make_optimizer(method.param_groups(), spec.train)
        collector = Collector(env, device, cache_taps=name != "KF fixed, taps not cached")
        runs[name] = (method, collector, optimizer, spec, env)
    obs = runs["plain A2C"][1].collect(runs["plain A2C"][0].model, T)[0].obs  # real observations for the teachers
    obs = obs.to(device)
    plain_student = runs["plain A2C"][0].model  # the student alone (a graft without sites)
    work = {name: _teacher_work(run[0].grafted, run[3].train.lambda2, obs, plain_student)
            for name, run in runs.items() if name != "plain A2C"}  # fmt: skip
    for method, collector, *_ in runs.values():
        collector.collect(method.model, T)  # a first rollout: the next ones start from a bootstrap pass's taps
    calls = {name: _teacher_calls(run[0].grafted, lambda run=run: run[1].collect(run[0].model, T))
             for name, run in runs.items() if name in work}  # fmt: skip
    teachers = {name: [(t, t.parameters_run, t.parameters_total) for t in run[0].model.teachers.values()]
                for name, run in runs.items()}  # fmt: skip
    rates: dict[str, list[float]] = {name: [] for name in cases}
    collect: dict[str, list[float]] = {name: [] for name in cases}
    required: dict[str, list[float]] = {name: [] for name in work}
    per_step: dict[str, list[float]] = {name: [] for name in work}
    for round_ in range(args.rounds + 1):  # round 0 warms up
        for name, (method, collector, optimizer, spec, _) in runs.items():
            assert spec.rl is not None
            start, steps = time.perf_counter(), 0
            for _ in range(args.updates):
                _, _, n = a2c_update(method, collector, optimizer, spec.rl, 0.3)
                steps += n
            took = time.perf_counter() - start
            c = _timed(lambda method=method, collector=collector: collector.collect(method.model, T), args.updates)
            if name in work:
                r, s = _timed(work[name][0], args.updates), _timed(work[name][1], args.updates * T)
            if round_:
                rates[name].append(steps / took)
                collect[name].append(c / T)
                if name in work:
                    required[name].append(r)
                    per_step[name].append(s)
    for *_, env in runs.values():
        env.close()
    med = {name: statistics.median(r) for name, r in rates.items()}
    t_plain = T * N / med["plain A2C"]
    c_plain = statistics.median(collect["plain A2C"])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {ENV}, {N} envs x {T} steps per update; "
          f"median of {args.rounds} rounds of {args.updates} updates")
    print(f"  plain A2C: {t_plain * 1e3:.2f} ms per update, collection {c_plain * 1e6:.0f} us per env step")
    for name, rate in med.items():
        kept = ", ".join(f"teacher runs {run:,} of {total:,} parameters" for _, run, total in teachers[name][:1])
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


if __name__ == "__main__":
    main()
