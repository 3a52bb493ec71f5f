"""The RL benchmarks stay runnable and print every figure the docs quote from them (examples/README.md)."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from graftnet.rl.a2c import Collector, Rollout, a2c_loss, a2c_update
from graftnet.rl.envs import make_env
from graftnet.rl.runs import build_agent
from graftnet.training.optim import make_optimizer

pytest.importorskip("minatar")
BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _run(script: str, *args: str) -> str:
    done = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _check_rows(out: str) -> None:
    lines = out.splitlines()
    in_loop = lines.index(next(line for line in lines if "timed in the loop" in line))
    cases = ("KF, taps at conv and fc", "KF fixed, conv and fc", "KF fixed, taps not cached", "hand-written KF, fixed",
             "hand-written KF, learned")
    for case in cases:
        row = next(line for line in lines if line.strip().startswith(case) and " ms " in line)
        ratio, limit, of_limit = (float(v) for v in row.split()[len(case.split()):][:3])
        assert 0 < ratio <= 1.5 and 0 < limit <= 1 and 0 < of_limit <= 2
        row = next(line for line in lines[in_loop:] if line.strip().startswith(case))
        slower, limit, of_limit = (float(v) for v in row.split()[len(case.split()):][:3])
        assert 0.5 < slower < 5 and 0 < limit <= 1 and 0 < of_limit <= 2  # the calls in the loop, and that limit
    against_controls = [float(line.split()[-1]) for line in lines if "graftnet ÷ hand-written" in line]
    assert len(against_controls) == 2 and all(0 < r < 3 for r in against_controls)


def test_bench_rl_reports_ratio_limit_and_of_limit_for_every_case() -> None:
    _check_rows(_run("bench_rl.py", "--rounds", "1", "--updates", "2"))


@pytest.mark.slow
def test_bench_rl_runs_the_cases_on_atari_frames() -> None:
    pytest.importorskip("ale_py")
    out = _run("bench_rl.py", "--rounds", "1", "--updates", "2", "--env", "ALE/Pong-v5")
    assert "ALE/Pong-v5" in out
    _check_rows(out)


def test_the_overhead_probe_times_every_variant(tmp_path: Path) -> None:
    baseline = tmp_path / "mixer.py"
    baseline.write_text((BENCH.parent / "graftnet" / "mixer.py").read_text())  # a copy stands in for another version
    out = _run("probe_rl_overhead.py", "--rounds", "1", "--updates", "2", "--baseline-mixer", str(baseline))
    rows = [line.split() for line in out.splitlines() if line.startswith("  KF ")]
    variants = {(" ".join(r[:-3]), r[-3]) for r in rows}
    assert variants == {(case, v) for case in ("KF fixed, conv and fc", "KF learned, conv and fc")
                        for v in ("graftnet", "oracle", "baseline")}  # fmt: skip
    assert all(float(r[-2]) > 0 and float(r[-1]) > 0 for r in rows)
    assert "torch " in out  # the versions it ran with


class _Given:
    """A collector that hands out one given rollout: graftnet's own update on the rollout the control learns from."""

    device = torch.device("cpu")

    def __init__(self, rollout: Rollout) -> None:
        self.rollout = rollout

    def collect(self, model: object, steps: int) -> tuple[Rollout, list[object]]:
        return self.rollout, []


@pytest.mark.parametrize("learned", [False, True], ids=["fixed adapters", "learned adapters"])
def test_the_hand_written_control_computes_what_graftnet_computes(learned: bool) -> None:
    """bench_rl.py's hand-written knowledge flow is graftnet's case with taps at conv and fc, value for value: the
    same collection passes, loss parts (with a nonzero KL term once θ_old lags), gradients and parameters after
    each update, on the same rollouts."""
    sys.path.insert(0, str(BENCH))
    try:
        bench_rl = importlib.import_module("bench_rl")
    finally:
        sys.path.remove(str(BENCH))
    torch.manual_seed(0)
    spec = bench_rl._spec(["conv", "fc"], learned=learned)
    env = make_env(bench_rl.ENV, bench_rl.N, seed=0)
    method, _ = build_agent(spec, env.observation_shape, env.num_actions, total_steps=10_000)
    method.model.train()
    optimizer = make_optimizer(method.param_groups(), spec.train)
    collector = Collector(env, torch.device("cpu"))
    collector.collect(method.model, bench_rl.T)  # calibrates the tap scales, which the control copies
    hand = bench_rl._handwritten(method, bench_rl.ENV, make_env(bench_rl.ENV, bench_rl.N, seed=1))
    g = method.grafted
    pairs = [(g.mixers["features.1"].logits, hand.model.w_conv), (g.mixers["act"].logits, hand.model.w_fc)]
    pairs += [(p, dict(hand.model.student.named_parameters())[n]) for n, p in g.student.named_parameters()]
    adapters = [g.input_adapters[name] for name in g.teachers if name in g.input_adapters]
    assert len(adapters) == len(hand.model.input_adapters) == (2 if learned else 0)
    for ours, theirs in zip(adapters, hand.model.input_adapters, strict=True):
        pairs += [(ours.weight, theirs.weight), (ours.bias, theirs.bias)]
    x = torch.rand(7, *env.observation_shape)
    with torch.no_grad():
        for ours, theirs in zip(g(x), hand.model(x, hand.taps(x)), strict=True):
            torch.testing.assert_close(ours, theirs)
    kls = []
    for _ in range(3):
        rollout, _ = collector.collect(method.model, bench_rl.T)
        _, parts = a2c_loss(method, rollout, spec.rl, bench_rl.PROGRESS, torch.device("cpu"))
        ours = [parts[k].item() for k in ("loss", "policy_loss", "value_loss", "entropy", "dep_loss", "kl_loss")]
        assert (rollout.taps is None) == learned
        taps = [rollout.taps[name] for name in g.teachers] if rollout.taps is not None else None
        theirs = hand.learn(rollout.obs, rollout.actions, rollout.rewards, rollout.dones, rollout.last_value, taps)
        assert ours == pytest.approx(theirs, rel=1e-5, abs=1e-6)
        kls.append(ours[-1])
        a2c_update(method, _Given(rollout), optimizer, spec.rl, bench_rl.PROGRESS)  # type: ignore[arg-type]
        for p, q in pairs:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert kls[0] == 0 and kls[1] > 0 and kls[2] > 0  # θ_old = θ before the first step, then the step before
