"""Reinforcement learning: n-step returns, the eq. 4 loss, A2C and A3C runs, resume, and bad input."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import graftnet
from graftnet.errors import EnvError, SpecError, TraceError, TrainingError
from graftnet.launch import train
from graftnet.models import build_model
from graftnet.plot import plot_runs, read_metrics
from graftnet.rl.a2c import Rollout, a2c_loss, n_step_returns, policy_and_value
from graftnet.rl.runs import build_agent
from graftnet.rl.trainer import train_rl
from graftnet.training.objectives import METHODS

BREAKOUT = {"model": "graftnet:a3c_minatar", "kwargs": {"in_channels": 4, "num_actions": 3}}
SEAQUEST = {"model": "graftnet:a3c_minatar", "kwargs": {"in_channels": 10, "num_actions": 6}}


def _teacher(tmp_path: Path) -> str:
    path = tmp_path / "seaquest.safetensors"
    torch.manual_seed(7)
    teacher = build_model(SEAQUEST["model"], SEAQUEST["kwargs"])
    save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, path)
    return str(path)


def _spec(tmp_path: Path, method: str = "knowledge_flow", frames: int = 1600, **rl: Any) -> graftnet.Spec:
    spec: dict[str, Any] = {
        "student": BREAKOUT,
        "input_shape": [4, 10, 10],
        "rl": {"env": "MinAtar/Breakout-v1", "frames": frames, "num_envs": 4, "rollout": 5, "log_every": 400,
               "eval_episodes": 3, "noop_max": 5, **rl},  # fmt: skip
        "train": {"method": method, "lr": 1e-3, "threads": 1, "lambda2": 0.1},
    }
    if method in ("knowledge_flow", "finetune"):
        spec["teachers"] = {"seaquest": {**SEAQUEST, "weights": _teacher(tmp_path),
                                         "input": [{"adapter": "conv1x1", "kwargs": {"out_channels": 10}}]}}
    if method == "knowledge_flow":
        spec["sites"] = [{"student": s, "taps": [f"seaquest:{s}"]} for s in ("features.1", "act")]
    if method == "finetune":
        spec["train"]["finetune"] = {"teacher": "seaquest"}
    return graftnet.load_spec(spec)


def test_n_step_returns_bootstrap_and_stop_at_episode_ends() -> None:
    rewards = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0]])
    dones = torch.tensor([[False, False], [True, False], [False, False]])
    returns = n_step_returns(rewards, dones, torch.tensor([10.0, 20.0]), gamma=0.5)
    # env 0: the episode ends after step 1, so steps 0-1 do not see step 2 or the bootstrap value
    assert torch.allclose(returns[:, 0], torch.tensor([1.0, 0.0, 2.0 + 0.5 * 10.0]))
    assert torch.allclose(returns[:, 1], torch.tensor([0.5 * 1.0 + 0.125 * 20.0, 1.0 + 0.25 * 20.0, 0.5 * 20.0]))


def test_policy_and_value_takes_values_of_shape_b_or_b1_and_names_anything_else() -> None:
    logits = torch.zeros(3, 4)
    for value in (torch.arange(3.0), torch.arange(3.0)[:, None]):
        out_logits, out_value = policy_and_value((logits, value))
        assert out_logits is logits and torch.equal(out_value, torch.arange(3.0))
    for out in ((logits, torch.zeros(3, 2)), (logits, torch.zeros(())), (logits[0], torch.zeros(1)), logits):
        with pytest.raises(TrainingError, match="policy_logits of shape"):
            policy_and_value(out)


def test_eq4_loss_trains_student_logits_and_adapters_and_kl_needs_an_old_snapshot(tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    method, _ = build_agent(spec, (4, 10, 10), 3, total_steps=100)
    g = method.model
    g.train()
    torch.manual_seed(0)
    t, n = 5, 4
    rollout = Rollout(torch.rand(t, n, 4, 10, 10).round(), torch.randint(0, 3, (t, n)), torch.rand(t, n),
                      torch.zeros(t, n, dtype=torch.bool), torch.rand(n, 4, 10, 10).round())  # fmt: skip
    assert spec.rl is not None
    total, parts = a2c_loss(method, rollout, spec.rl, 0.5, torch.device("cpu"))
    assert set(parts) == {"loss", "policy_loss", "value_loss", "entropy", "dep_loss", "kl_loss", "hint_loss"}
    assert float(parts["kl_loss"].detach()) == pytest.approx(0.0, abs=1e-5)  # θ_old = θ before any step
    total.backward()
    assert all(m.logits.grad is not None and m.logits.grad.abs().sum() > 0 for m in g.mixers.values())
    assert g.input_adapters["seaquest"].weight.grad is not None  # the learned 1×1 input adapter trains
    assert all(p.grad is None for p in g.teachers.parameters())
    opt = torch.optim.SGD([p for p in g.parameters() if p.requires_grad], lr=0.5)
    method.step(opt)
    _, parts = a2c_loss(method, rollout, spec.rl, 0.5, torch.device("cpu"))
    assert float(parts["kl_loss"].detach()) > 1e-4


def test_a2c_knowledge_flow_run_writes_metrics_checkpoint_and_evaluates_the_detached_student(tmp_path: Path) -> None:
    run = tmp_path / "kf"
    result = train_rl(_spec(tmp_path), run, progress=False, tensorboard=False)
    assert result.frames >= 1600 and result.interrupted is None
    assert len(result.eval_returns) == 3
    m = read_metrics(run)
    assert m["frames"] == [400, 800, 1200, 1600]
    assert all(v > 0 for v in m["steps_per_s"])
    assert {"p_w/features.1/student", "p_w/act/seaquest:act", "kl_loss", "dep_loss", "return_mean"} <= set(m)
    plots = plot_runs([run], tmp_path / "plots")
    assert [p.name for p in plots] == ["returns.png", "p_w.png"]
    results = json.loads((run / "results.json").read_text())
    assert results["eval_returns"] == result.eval_returns
    student = build_model(BREAKOUT["model"], BREAKOUT["kwargs"])
    student.load_state_dict(load_file(str(run / "student.safetensors")), strict=True)
    # resuming a finished run evaluates again without training
    again = train_rl(_spec(tmp_path), run, resume=True, progress=False, tensorboard=False)
    assert again.frames == result.frames


@pytest.mark.parametrize("method", ["scratch", "finetune"])
def test_a2c_baselines_run(tmp_path: Path, method: str) -> None:
    result = train_rl(_spec(tmp_path, method, frames=400), tmp_path / method, progress=False, tensorboard=False)
    assert result.frames >= 400 and result.min_p_w_student is None


def test_finetune_starts_from_the_teacher_where_shapes_match(tmp_path: Path) -> None:
    g = build_agent(_spec(tmp_path, "finetune"), (4, 10, 10), 3)[0].model
    teacher = load_file(_teacher(tmp_path))
    own = g.student.state_dict()
    assert torch.equal(own["fc.weight"], teacher["fc.weight"])  # same shape: copied
    assert own["policy.weight"].shape != teacher["policy.weight"].shape  # 3 actions against 6: kept


def test_a3c_workers_share_the_model_and_finish(tmp_path: Path) -> None:
    run = tmp_path / "a3c"
    result = train_rl(_spec(tmp_path, frames=1600, algorithm="a3c", workers=2), run, progress=False,
                      tensorboard=False)  # fmt: skip
    assert result.frames >= 1600 and len(result.eval_returns) == 3
    assert read_metrics(run)["frames"][-1] >= 1600


def test_a3c_worker_crash_stops_the_run_with_its_error_and_keeps_the_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import graftnet.rl.a3c as a3c

    calls = {"n": 0}
    real = a3c.a2c_update

    def failing(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] > 3:
            raise RuntimeError("boom in the worker")
        return real(*args, **kwargs)

    monkeypatch.setattr(a3c, "a2c_update", failing)  # the forked workers inherit the patch
    run = tmp_path / "crash"
    with pytest.raises(TrainingError, match="boom in the worker"):
        train_rl(_spec(tmp_path, frames=100_000, algorithm="a3c", workers=2), run, progress=False,
                 tensorboard=False)  # fmt: skip
    assert (run / "checkpoint.safetensors").is_file()


def test_a3c_refuses_what_it_cannot_share_before_writing_anything(tmp_path: Path) -> None:
    spec = _spec(tmp_path, "scratch", algorithm="a3c")
    assert spec.train is not None
    sgd = spec.model_copy(update={"train": spec.train.model_copy(update={"optimizer": "sgd"})})
    with pytest.raises(TrainingError, match="shares Adam's statistics"):
        train_rl(sgd, tmp_path / "sgd", progress=False, tensorboard=False)
    assert not (tmp_path / "sgd").exists()


def test_real_ale_smoke_run(tmp_path: Path) -> None:
    spec = graftnet.load_spec({
        "student": {"model": "graftnet:a3c", "kwargs": {"num_actions": 6}},
        "input_shape": [4, 84, 84],
        "rl": {"env": "ALE/Pong-v5", "frames": 1600, "num_envs": 2, "rollout": 5, "log_every": 800,
               "eval_episodes": 1, "noop_max": 0},
        "train": {"method": "scratch", "threads": 1},
    })  # fmt: skip
    result = train_rl(spec, tmp_path / "pong", progress=False, tensorboard=False)
    assert result.frames >= 1600 and len(result.eval_returns) == 1


def test_classic_control_with_an_actor_critic_mlp(tmp_path: Path) -> None:
    spec = graftnet.load_spec({
        "student": {"model": "graftnet:actor_critic_mlp"},
        "rl": {"env": "CartPole-v1", "frames": 2000, "num_envs": 4, "log_every": 1000, "eval_episodes": 2},
        "train": {"method": "scratch", "threads": 1},
    })  # fmt: skip
    result = train_rl(spec, tmp_path / "cartpole", progress=False, tensorboard=False)
    assert len(result.eval_returns) == 2 and all(r >= 1 for r in result.eval_returns)


def test_unknown_environment_names_the_extra(tmp_path: Path) -> None:
    with pytest.raises(EnvError, match="graftnet"):
        train_rl(_spec(tmp_path, "scratch", env="NoSuchGame-v0"), tmp_path / "x", progress=False, tensorboard=False)


def test_observations_the_sites_cannot_take(tmp_path: Path) -> None:
    spec = _spec(tmp_path, "scratch").model_copy(update={"input_shape": [10, 10, 10]})
    with pytest.raises(SpecError, match="observes"):
        build_agent(spec, (4, 10, 10), 3)


def test_a_student_that_cannot_take_the_observations(tmp_path: Path) -> None:
    spec = graftnet.load_spec({"student": {"model": "graftnet:a3c", "kwargs": {"num_actions": 3}},
                               "rl": {"env": "MinAtar/Breakout-v1"}, "train": {"method": "scratch"}})  # fmt: skip
    with pytest.raises(TraceError, match=r"MinAtar/Breakout-v1 observes \[4, 10, 10\].*graftnet:a3c cannot take"):
        build_agent(spec, (4, 10, 10), 3)


def test_wrong_number_of_actions(tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match="3 actions but"):
        build_agent(_spec(tmp_path, "scratch"), (4, 10, 10), 5)


def test_an_rl_spec_without_a_train_section(tmp_path: Path) -> None:
    spec = graftnet.load_spec({"student": BREAKOUT, "rl": {"env": "MinAtar/Breakout-v1"}})
    with pytest.raises(SpecError, match="train: graftnet train needs a 'train' section"):
        train(spec, tmp_path / "x", progress=False, tensorboard=False)


def test_rl_methods_are_the_ones_that_apply() -> None:
    with pytest.raises(SpecError, match="does not apply to 'rl'"):
        graftnet.load_spec({"student": BREAKOUT, "rl": {"env": "MinAtar/Breakout-v1"}, "teachers": {"t": BREAKOUT},
                            "train": {"method": "kd", "kd": {"teacher": "t"}}})  # fmt: skip
    assert "knowledge_flow" in METHODS


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        found += [int(c) for c in task.read_text().split()]
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in state  # a zombie has exited; nobody is left to reap it in some containers


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads the process tree from /proc (Linux)")
def test_a3c_workers_die_with_their_parent_even_on_sigkill(tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    spec = _spec(tmp_path, "scratch", frames=10_000_000, algorithm="a3c", workers=2)
    (tmp_path / "spec.json").write_text(json.dumps(spec.model_dump(mode="json")))
    main = subprocess.Popen(
        [sys.executable, "-m", "graftnet", "train", str(tmp_path / "spec.json"), "--out", str(tmp_path / "run"),
         "--no-progress", "--no-tensorboard"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        workers: list[int] = []
        while time.monotonic() < deadline and len(workers) < 2:
            time.sleep(0.2)
            workers = [c for c in _children(main.pid) if _alive(c)]
        assert len(workers) >= 2, "the A3C workers did not start"
        time.sleep(1.0)  # let them get into their update loop
        os.kill(main.pid, signal.SIGKILL)
        main.wait(timeout=10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_alive(w) for w in workers):
            time.sleep(0.1)
        assert not [w for w in workers if _alive(w)], "workers outlived the killed parent"
    finally:
        if main.poll() is None:
            main.kill()
        for w in _children(main.pid):
            with contextlib.suppress(OSError):
                os.kill(w, signal.SIGKILL)
