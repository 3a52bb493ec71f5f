"""Steps per second of knowledge-flow A2C against plain A2C on MinAtar (issue: reinforcement learning, point 7).

One run, the cases interleaved update by update (median of ``--rounds`` rounds of ``--updates`` updates each):
  plain A2C                 the SpaceInvaders student alone;
  KF, taps at conv and fc   grafted to two teachers (Breakout- and Asterix-shaped, learned 1×1 input adapters)
                            at the conv layer and the dense layer: each teacher runs up to its dense layer;
  KF, taps at conv only     the same teachers tapped only at the conv layer: graftnet cuts each teacher after
                            it, so the teachers' dense layers never run (truncation);
  KF without the KL term    taps at conv and fc, λ2 = 0.
An update is what the trainer does: a rollout of 16 environments × 5 steps, the loss, backward, Adam.

Run:  python benchmarks/bench_rl.py [--rounds 7] [--updates 40] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

import graftnet
from graftnet.rl.a2c import Collector, a2c_update
from graftnet.rl.envs import make_env
from graftnet.rl.runs import build_agent
from graftnet.training.optim import make_optimizer

ENV = "MinAtar/SpaceInvaders-v1"
STUDENT = {"model": "graftnet:a3c_minatar", "kwargs": {"in_channels": 6, "num_actions": 4}}


def _teacher(channels: int, actions: int) -> dict[str, Any]:
    return {"model": "graftnet:a3c_minatar", "kwargs": {"in_channels": channels, "num_actions": actions},
            "input": [{"adapter": "conv1x1", "kwargs": {"out_channels": channels}}]}  # fmt: skip


def _spec(sites: list[str] | None, lambda2: float = 0.1) -> graftnet.Spec:
    spec: dict[str, Any] = {
        "student": STUDENT,
        "input_shape": [6, 10, 10],
        "rl": {"env": ENV, "num_envs": 16, "rollout": 5},
        "train": {"method": "scratch" if sites is None else "knowledge_flow", "lambda2": lambda2},
    }
    if sites is not None:
        spec["teachers"] = {"breakout": _teacher(4, 3), "asterix": _teacher(4, 5)}
        spec["sites"] = [{"student": s, "taps": [f"breakout:{s}", f"asterix:{s}"]} for s in sites]
    return graftnet.load_spec(spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--updates", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cases = {
        "plain A2C": _spec(None),
        "KF, taps at conv and fc": _spec(["features.1", "act"]),
        "KF, taps at conv only": _spec(["features.1"]),
        "KF without the KL term": _spec(["features.1", "act"], lambda2=0.0),
    }
    device = torch.device("cpu")
    runs = {}
    for name, spec in cases.items():
        env = make_env(ENV, 16, seed=0)
        method, _ = build_agent(spec, env.observation_shape, env.num_actions, total_steps=10_000)
        method.model.train()
        assert spec.train is not None
        optimizer = make_optimizer(method.param_groups(), spec.train)
        runs[name] = (method, Collector(env, device), optimizer, spec, env)
    teachers = {name: [(t, t.parameters_run, t.parameters_total) for t in run[0].model.teachers.values()]
                for name, run in runs.items()}  # fmt: skip
    rates: dict[str, list[float]] = {name: [] for name in cases}
    for round_ in range(args.rounds + 1):  # round 0 warms up
        for name, (method, collector, optimizer, spec, _) in runs.items():
            assert spec.rl is not None
            start, steps = time.perf_counter(), 0
            for _ in range(args.updates):
                _, _, n = a2c_update(method, collector, optimizer, spec.rl, 0.3)
                steps += n
            if round_:
                rates[name].append(steps / (time.perf_counter() - start))
    for *_, env in runs.values():
        env.close()
    med = {name: statistics.median(r) for name, r in rates.items()}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {ENV}, 16 envs x 5 steps per update; "
          f"median of {args.rounds} rounds of {args.updates} updates")
    for name, rate in med.items():
        kept = ", ".join(f"teacher runs {run:,} of {total:,} parameters" for _, run, total in teachers[name][:1])
        print(f"  {name:<26} {rate:8,.0f} agent steps/s  ({rate / med['plain A2C']:.2f} of plain A2C)"
              + (f"  [{kept}]" if kept else ""))


if __name__ == "__main__":
    main()
