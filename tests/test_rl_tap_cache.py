"""RL tap caching: the collector records the taps of teachers without a learned input adapter, and the update
reuses them (its forward and the θ_old pass) instead of running those teachers again on the rollout."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

import graftnet
from graftnet.errors import GraftError
from graftnet.graft import FrozenTeacher, GraftedModel
from graftnet.rl.a2c import Collector, Rollout, a2c_loss, a2c_update
from graftnet.rl.envs import VecEnv, make_env
from graftnet.rl.runs import build_agent
from graftnet.rl.trainer import train_rl
from graftnet.training.objectives import Objective
from graftnet.training.optim import make_optimizer

ENV = "MinAtar/Breakout-v1"  # observations (4, 10, 10), 3 actions
T, N = 5, 4
CPU = torch.device("cpu")


def _net(channels: int, actions: int) -> dict[str, Any]:
    return {"model": "graftnet:a3c_minatar", "kwargs": {"in_channels": channels, "num_actions": actions}}


INPUTS: dict[str, list[dict[str, Any]]] = {
    "none": [],
    "fixed": [{"adapter": "normalize", "kwargs": {"mean": [0.5] * 4, "std": [0.25] * 4}}],
}


def _spec(adapters: dict[str, str], lambda2: float = 0.1, feature_hint: float = 0.0, **rl: Any) -> graftnet.Spec:
    """Teachers named by ``adapters``: 'learned' gives one a learned 1×1 input adapter (to 6 channels), 'none' no
    input adapter and 'fixed' a normalization (both take the student's 4 channels). Every teacher is tapped at
    the conv layer and the dense layer."""
    teachers = {}
    for name, kind in adapters.items():
        teachers[name] = {**_net(6, 5), "input": [{"adapter": "conv1x1", "kwargs": {"out_channels": 6}}]} \
            if kind == "learned" else {**_net(4, 6), "input": INPUTS[kind]}  # fmt: skip
    return graftnet.load_spec({
        "student": _net(4, 3),
        "input_shape": [4, 10, 10],
        "rl": {"env": ENV, "num_envs": N, "rollout": T, "frames": 800, "log_every": 400, "eval_episodes": 1, **rl},
        "train": {"method": "knowledge_flow", "lr": 1e-3, "threads": 1, "lambda2": lambda2,
                  "feature_hint": feature_hint},
        "teachers": teachers,
        "sites": [{"student": s, "taps": [f"{name}:{s}" for name in adapters]} for s in ("features.1", "act")],
    })  # fmt: skip


Agent = tuple[Objective, Collector, torch.optim.Optimizer]
Build = Callable[[graftnet.Spec], Agent]


@pytest.fixture
def agent() -> Iterator[Build]:
    """Builds the spec's objective (in train mode), a collector on its own MinAtar environments, and Adam."""
    envs: list[VecEnv] = []

    def build(spec: graftnet.Spec) -> Agent:
        method, _ = build_agent(spec, (4, 10, 10), 3, total_steps=100)
        method.model.train()
        assert spec.train is not None
        envs.append(make_env(ENV, N, seed=0))
        return method, Collector(envs[-1], CPU), make_optimizer(method.param_groups(), spec.train)

    yield build
    for env in envs:
        env.close()


@contextmanager
def _counting(g: GraftedModel) -> Iterator[dict[str, int]]:
    """Counts the calls of every teacher's body (the truncated teacher itself, not its cached-taps shortcut)."""
    calls = dict.fromkeys(g.teachers, 0)
    handles = []
    for name, t in g.teachers.items():
        assert isinstance(t, FrozenTeacher)
        handles.append(t.body.register_forward_pre_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1)))
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


Parts = dict[str, torch.Tensor]


def _loss_and_grads(method: Objective, rollout: Rollout, spec: graftnet.Spec) -> tuple[Parts, Parts]:
    assert spec.rl is not None
    method.model.zero_grad(set_to_none=True)
    total, parts = a2c_loss(method, rollout, spec.rl, 0.5, CPU)
    total.backward()
    grads = {n: p.grad.clone() for n, p in method.model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in parts.items()}, grads


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    # The cached taps come from T teacher calls on batches of N observations, the recomputed ones from one call
    # on the T·N batch. Per sample that is the same arithmetic, but a BLAS or oneDNN kernel may block (and so
    # round) a batch of 80 rows differently from one of 16: bitwise equality holds on the CPUs we measured, but
    # is not a property of the code, so the test allows rounding-level differences.
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("feature_hint", [0.0, 0.5], ids=["paper objective", "feature hint"])
def test_fixed_adapter_teachers_run_only_during_collection_and_the_loss_is_unchanged(
    agent: Build, feature_hint: float
) -> None:
    spec = _spec({"breakout": "none", "asterix": "fixed"}, feature_hint=feature_hint)
    method, collector, optimizer = agent(spec)
    g = method.grafted
    assert spec.rl is not None
    a2c_update(method, collector, optimizer, spec.rl, 0.1)  # a step, so θ_old ≠ θ and the KL term has gradients
    with _counting(g) as calls:
        rollout, _ = collector.collect(g, T)
    # T steps, the first one reusing the previous bootstrap pass's taps of the same observation, and the bootstrap
    assert calls == {"breakout": T, "asterix": T}
    assert rollout.taps is not None and set(rollout.taps) == {"breakout", "asterix"}
    assert rollout.last_value is not None
    obs = rollout.obs.reshape(T * N, 4, 10, 10)
    for name, taps in rollout.taps.items():
        adapter = g.input_adapters[name] if name in g.input_adapters else torch.nn.Identity()
        with torch.no_grad():
            again = g.teachers[name].body(adapter(obs))
        _assert_same(dict(enumerate(taps)), dict(enumerate(again)))  # row t·N + n is obs[t, n]

    recomputing = copy.deepcopy(method)
    with _counting(method.grafted) as calls:
        cached_parts, cached_grads = _loss_and_grads(method, rollout, spec)
    assert calls == {"breakout": 0, "asterix": 0}  # neither the update's forward nor the θ_old pass runs them
    plain = dataclasses.replace(rollout, taps=None, last_value=None)  # what a2c_loss did before the cache
    with _counting(recomputing.grafted) as calls:
        parts, grads = _loss_and_grads(recomputing, plain, spec)
    assert calls == {"breakout": 2, "asterix": 2}  # the bootstrap pass and the update's forward (θ_old reuses)
    assert float(parts["kl_loss"]) > 0 and set(grads) == set(cached_grads)
    assert ("hint_loss" in parts) == (feature_hint > 0) and float(parts.get("hint_loss", 1.0)) > 0
    _assert_same(cached_parts, parts)
    _assert_same(cached_grads, grads)


def test_learned_adapter_teachers_are_recomputed_and_mixed_specs_cache_only_the_fixed_ones(agent: Build) -> None:
    spec = _spec({"breakout": "none", "seaquest": "learned"})
    method, collector, optimizer = agent(spec)
    g = method.grafted
    assert spec.rl is not None
    a2c_update(method, collector, optimizer, spec.rl, 0.1)
    with _counting(g) as calls:
        _, _, steps = a2c_update(method, collector, optimizer, spec.rl, 0.2)
    assert steps == T * N
    # the learned-adapter teacher: T collection steps, the bootstrap, the update's forward and θ_old's (old adapter)
    assert calls == {"breakout": T, "seaquest": T + 3}

    rollout, _ = collector.collect(g, T)
    assert rollout.taps is not None and set(rollout.taps) == {"breakout"}
    recomputing = copy.deepcopy(method)
    cached_parts, cached_grads = _loss_and_grads(method, rollout, spec)
    parts, grads = _loss_and_grads(recomputing, dataclasses.replace(rollout, taps=None, last_value=None), spec)
    assert cached_grads["input_adapters.seaquest.weight"].abs().sum() > 0  # the learned adapter still trains
    _assert_same(cached_parts, parts)
    _assert_same(cached_grads, grads)


def test_only_learned_adapters_record_nothing_and_count_as_before(agent: Build) -> None:
    spec = _spec({"seaquest": "learned"}, lambda2=0.0)
    method, collector, optimizer = agent(spec)
    assert spec.rl is not None
    a2c_update(method, collector, optimizer, spec.rl, 0.1)
    with _counting(method.grafted) as calls:
        a2c_update(method, collector, optimizer, spec.rl, 0.2)
    assert calls == {"seaquest": T + 2}  # no KL term: no θ_old pass
    rollout, _ = collector.collect(method.model, T)
    assert rollout.taps is None


def test_carried_taps_are_dropped_for_another_model(agent: Build) -> None:
    spec = _spec({"breakout": "fixed"})
    method, collector, _ = agent(spec)
    g = method.grafted
    collector.collect(g, T)
    other = copy.deepcopy(g)  # the teachers were cut, say: the bootstrap taps of g are not other's
    with _counting(other) as calls:
        rollout, _ = collector.collect(other, T)
    assert calls == {"breakout": T + 1}
    assert rollout.taps is not None and rollout.taps["breakout"][0].shape[0] == T * N


def test_given_taps_skip_the_teacher_and_its_fixed_input_adapter(agent: Build) -> None:
    method, _, _ = agent(_spec({"asterix": "fixed"}))
    g = method.grafted.eval()  # no tap-scale calibration between the two passes
    x = torch.rand(6, 4, 10, 10).round()
    with torch.no_grad():
        expected = g(x)
        taps = g.teachers["asterix"].body(g.input_adapters["asterix"](x))
        adapter_calls = []
        hook = g.input_adapters["asterix"].register_forward_pre_hook(lambda *_: adapter_calls.append(1))
        with _counting(g) as calls, g.reusing_teacher_features({"asterix": taps}):
            got = g(x)
            assert "asterix.mean" not in dict(g.input_adapters.named_buffers())  # skipped while taps are given
        hook.remove()
    assert calls == {"asterix": 0} and adapter_calls == []
    assert "asterix.mean" in dict(g.input_adapters.named_buffers())  # and put back after the block
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a, b)


def test_reusing_teacher_features_refuses_taps_it_cannot_use(agent: Build) -> None:
    method, _, _ = agent(_spec({"breakout": "none", "seaquest": "learned"}))
    g = method.grafted
    x = torch.rand(6, 4, 10, 10)
    with torch.no_grad():
        taps = g.teachers["breakout"].body(x)
    with pytest.raises(GraftError, match="not a teacher this model runs"), g.reusing_teacher_features({"nope": taps}):
        pass
    with pytest.raises(GraftError, match="learned input adapter"), g.reusing_teacher_features({"seaquest": taps}):
        pass
    with pytest.raises(GraftError, match="2 taps"), g.reusing_teacher_features({"breakout": taps[:1]}):
        pass
    with g.reusing_teacher_features({"breakout": taps}), pytest.raises(GraftError, match="batch of 6"):
        g(x[:3])
    with pytest.raises(GraftError, match="learned input adapter"), g.teachers["seaquest"].recording():
        pass


def test_a3c_workers_with_fixed_adapter_teachers_finish(tmp_path: Path) -> None:
    spec = _spec({"breakout": "none", "asterix": "fixed"}, algorithm="a3c", workers=2)
    result = train_rl(spec, tmp_path / "a3c", progress=False, tensorboard=False)
    assert result.frames >= 800


def test_a_collector_with_the_cache_off_records_nothing(agent: Build) -> None:
    spec = _spec({"breakout": "none", "asterix": "fixed"})
    method, collector, _ = agent(spec)
    off = Collector(collector.env, CPU, cache_taps=False)
    with _counting(method.grafted) as calls:
        rollout, _ = off.collect(method.grafted, T)
    assert rollout.taps is None  # the update recomputes the teachers, as before the cache (bench_rl's A/B case)
    assert calls == {"breakout": T + 1, "asterix": T + 1}  # every step and the bootstrap pass run them
