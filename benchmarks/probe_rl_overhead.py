"""Where knowledge-flow A2C's time goes beyond its limit: the mixers against an oracle, and compiling.

bench_rl.py reports knowledge-flow A2C against plain A2C and its limit; this probe asks how much of the gap the
mixers are. In one process, variants alternate round by round on the same agents (so the machine's drift
hits them alike), timing every update (collect a rollout, the loss, backward, Adam):
  graftnet    the mixers as they are;
  oracle      every mixer replaced by constant-weight arithmetic, 0.5·z + Σ 0.25·t (no softmax, no coefficient
              gradient): what perfect mixing could still save — the results are not knowledge flow;
  baseline    with ``--baseline-mixer FILE``, ``Mixer.forward`` from another version of graftnet/mixer.py, e.g.
              ``git show REV:graftnet/mixer.py > /tmp/old_mixer.py`` (an A/B of a mixer change);
and with ``--compile`` plain A2C with its model compiled (collector and update alike) beside the eager one.
Cases: plain A2C, and the fixed-adapter and learned-adapter specs of bench_rl.py (taps at conv and fc).

Run:  python benchmarks/probe_rl_overhead.py [--rounds 12] [--updates 20] [--baseline-mixer FILE] [--compile]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from graftnet import mixer  # noqa: E402
from graftnet.provenance import command_line, versions  # noqa: E402
from graftnet.rl.a2c import Collector, a2c_loss  # noqa: E402
from graftnet.rl.envs import make_env  # noqa: E402
from graftnet.rl.runs import build_agent  # noqa: E402
from graftnet.training.optim import make_optimizer  # noqa: E402

import bench_rl  # noqa: E402 - the benchmark next to this file: the same specs


def _oracle(self: mixer.Mixer, z: torch.Tensor, *taps: torch.Tensor) -> torch.Tensor:
    out = z * 0.5
    for t in taps:
        out = out + t * 0.25
    return out


def _forward_from(path: str) -> Callable[..., torch.Tensor]:
    spec = importlib.util.spec_from_file_location("baseline_mixer", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"--baseline-mixer: cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Mixer.forward  # type: ignore[no-any-return]


class _Agent:
    """One case: its objective, collector and optimizer, and the module the collector runs."""

    def __init__(self, spec: Any, compiled: bool) -> None:
        self.env = make_env(bench_rl.ENV, bench_rl.N, seed=0)
        self.method, _ = build_agent(spec, self.env.observation_shape, self.env.num_actions, total_steps=10_000)
        self.method.model.train()
        if compiled:
            self.method.settings = self.method.settings.model_copy(update={"compile": True})
        self.optimizer = make_optimizer(self.method.param_groups(), spec.train)
        self.collector = Collector(self.env, torch.device("cpu"))
        self.runs = torch.compile(self.method.model) if compiled else self.method.model
        self.rl = spec.rl

    def update(self) -> None:
        rollout, _ = self.collector.collect(self.runs, bench_rl.T)
        total, _ = a2c_loss(self.method, rollout, self.rl, 0.3, self.collector.device)
        self.optimizer.zero_grad(set_to_none=True)
        self.method.backward(total)
        torch.nn.utils.clip_grad_norm_([p for p in self.method.model.parameters() if p.requires_grad], 0.5)
        self.method.step(self.optimizer, 0.3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--updates", type=int, default=20)
    parser.add_argument("--baseline-mixer", metavar="FILE")
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    variants: dict[str, Callable[..., torch.Tensor]] = {"graftnet": mixer.Mixer.forward, "oracle": _oracle}
    if args.baseline_mixer:
        variants["baseline"] = _forward_from(args.baseline_mixer)
    agents = {
        "plain A2C": _Agent(bench_rl._spec(None), compiled=False),
        "KF fixed, conv and fc": _Agent(bench_rl._spec(["conv", "fc"], learned=False), compiled=False),
        "KF learned, conv and fc": _Agent(bench_rl._spec(["conv", "fc"]), compiled=False),
    }
    if args.compile:
        agents["plain A2C, compiled"] = _Agent(bench_rl._spec(None), compiled=True)
    for agent in agents.values():
        for _ in range(6):  # warm up, and compile where asked
            agent.update()
    times: dict[tuple[str, str], list[float]] = {}
    for round_ in range(args.rounds + 1):  # round 0 warms up
        for variant, forward in variants.items():
            mixer.Mixer.forward = forward  # type: ignore[method-assign]
            for name, agent in agents.items():
                if name.startswith("plain") and variant != "graftnet":
                    continue  # no mixers
                for _ in range(args.updates):
                    start = time.perf_counter()
                    agent.update()
                    if round_:
                        times.setdefault((name, variant), []).append(time.perf_counter() - start)
    for agent in agents.values():
        agent.env.close()
    print(command_line())
    print(", ".join(f"{k} {v}" for k, v in versions().items()))
    print(f"1 thread, {bench_rl.ENV}, {bench_rl.N} envs x {bench_rl.T} steps, "
          f"{args.rounds} rounds of {args.updates} updates per variant")
    print(f"  {'case':<26} {'mixers':<9} {'p25 ms':>8} {'median ms':>10}")
    for (name, variant), ts in times.items():
        q = statistics.quantiles(ts, n=4)
        print(f"  {name:<26} {variant:<9} {q[0] * 1e3:8.2f} {q[1] * 1e3:10.2f}")


if __name__ == "__main__":
    main()
