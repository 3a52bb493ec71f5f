"""graftnet.rl.envs: MinAtar, Atari (real ALE) and classic control behind one vectorised interface."""

from __future__ import annotations

import sys

import gymnasium
import numpy as np
import pytest

from graftnet.errors import EnvError, GraftError
from graftnet.rl import envs as envs_mod
from graftnet.rl.envs import EpisodeEnd, VecEnv, env_info, evaluate, make_env


def _random_actions(env: VecEnv, steps: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, env.num_actions, size=(steps, env.num_envs))


def _check_episode_bookkeeping(env: VecEnv, actions: np.ndarray) -> list[EpisodeEnd]:
    """Step through ``actions`` and check every EpisodeEnd against our own sums since that env's last game end."""
    env.reset()
    running = np.zeros(env.num_envs)
    steps = np.zeros(env.num_envs, dtype=int)
    ends: list[EpisodeEnd] = []
    for a in actions:
        obs, rewards, dones, ended = env.step(a)
        assert obs.dtype == np.float32 and obs.shape == (env.num_envs, *env.observation_shape)
        assert rewards.dtype == np.float32 and rewards.shape == (env.num_envs,)
        assert dones.dtype == np.bool_ and dones.shape == (env.num_envs,)
        running += rewards
        steps += 1
        ended_ids = [e.env_index for e in ended]
        assert len(set(ended_ids)) == len(ended_ids)
        for e in ended:
            assert e.episode_return == pytest.approx(running[e.env_index])
            assert e.length == steps[e.env_index]
            running[e.env_index] = 0.0
            steps[e.env_index] = 0
        # Outside Atari training a done is exactly a game end.
        assert sorted(ended_ids) == np.flatnonzero(dones).tolist()
        ends.extend(ended)
    return ends


# ------------------------------------------------------------------------------------------------------ MinAtar


@pytest.mark.filterwarnings("ignore:.*is out of date")  # the raw -v0 env built below, for comparison
@pytest.mark.parametrize(
    ("env_id", "channels", "actions"),
    [("MinAtar/Breakout-v1", 4, 3), ("MinAtar/Seaquest-v1", 10, 6), ("MinAtar/Breakout-v0", 4, 6)],
)
def test_minatar_observations_are_float_channels_first(env_id: str, channels: int, actions: int) -> None:
    env = make_env(env_id, num_envs=3, seed=7)
    assert (env.observation_shape, env.num_actions, env.frames_per_step) == ((channels, 10, 10), actions, 1)
    assert env_info(env_id) == ((channels, 10, 10), actions)
    obs = env.reset()
    assert obs.dtype == np.float32 and obs.shape == (3, channels, 10, 10) and obs.flags.c_contiguous
    assert set(np.unique(obs).tolist()) <= {0.0, 1.0}
    # The layout must be MinAtar's (10, 10, C) state transposed, not merely reshaped: compare with a raw env.
    raw = gymnasium.make(env_id).unwrapped
    state, _ = raw.reset(seed=7 + 1)
    np.testing.assert_array_equal(obs[1], state.transpose(2, 0, 1).astype(np.float32))
    for a in _random_actions(env, 5):
        obs, *_ = env.step(a)
        state, *_ = raw.step(int(a[1]))
    np.testing.assert_array_equal(obs[1], state.transpose(2, 0, 1).astype(np.float32))
    env.close()


def test_minatar_same_seed_same_actions_same_observations() -> None:
    def run(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        with make_env("MinAtar/Breakout-v1", num_envs=4, seed=seed) as env:
            obs, rews, dones = [env.reset()], [], []
            for a in _random_actions(env, 200, seed=1):
                o, r, d, _ = env.step(a)
                obs.append(o)
                rews.append(r)
                dones.append(d)
        return np.stack(obs), np.stack(rews), np.stack(dones)

    first, again, other = run(3), run(3), run(4)
    for x, y in zip(first, again, strict=True):
        np.testing.assert_array_equal(x, y)
    assert first[2].any(), "200 random steps of 4 Breakout envs should end games"
    assert not np.array_equal(first[0], other[0])


def test_minatar_dones_and_episode_returns() -> None:
    with make_env("MinAtar/Breakout-v1", num_envs=4, seed=0) as env:
        ends = _check_episode_bookkeeping(env, _random_actions(env, 400))
    assert len(ends) >= 8
    assert any(e.episode_return > 0 for e in ends), "random Breakout play scores now and then"
    assert {e.env_index for e in ends} == {0, 1, 2, 3}


# -------------------------------------------------------------------------------------------------------- Atari


def test_atari_pong_smoke() -> None:
    with make_env("ALE/Pong-v5", num_envs=2, seed=0) as env:
        assert (env.observation_shape, env.num_actions, env.frames_per_step) == ((4, 84, 84), 6, 4)
        obs = env.reset()
        assert obs.dtype == np.float32 and obs.shape == (2, 4, 84, 84)
        seen = []
        for a in _random_actions(env, 200):
            obs, rewards, dones, _ = env.step(a)
            assert obs.dtype == np.float32 and obs.shape == (2, 4, 84, 84)
            assert 0.0 <= obs.min() and obs.max() <= 1.0
            seen.append(rewards)
        assert obs.max() > 0.0
        # Raw scores: a random Pong player concedes points within 200 steps.
        assert set(np.unique(np.stack(seen)).tolist()) <= {-1.0, 0.0, 1.0} and np.min(seen) == -1.0


def test_atari_breakout_episodic_life_and_whole_game_returns() -> None:
    breakout_lives = 5
    with make_env("ALE/Breakout-v5", num_envs=1, seed=0, training=False) as env:
        fresh = env.reset()[0, -1]
    bricks = np.flatnonzero((fresh[:, 10:74] > 0).mean(axis=1) > 0.9)  # rows of walls and bricks at game start
    assert len(bricks) > 5

    for training, dones_per_game in [(True, breakout_lives), (False, 1)]:
        with make_env("ALE/Breakout-v5", num_envs=2, seed=0, training=training) as env:
            obs = env.reset()
            rewards_of: list[list[float]] = [[], []]
            dones_of = [0, 0]
            scored_games = 0
            for a in _random_actions(env, 3000):
                before = obs
                obs, rewards, dones, ended = env.step(a)
                for i in range(2):
                    rewards_of[i].append(float(rewards[i]))
                    dones_of[i] += int(dones[i])
                for end in ended:
                    i = end.env_index
                    assert dones_of[i] == dones_per_game
                    assert end.length == len(rewards_of[i])
                    assert end.episode_return == pytest.approx(sum(rewards_of[i]))
                    if end.episode_return > 0:
                        # Same-step autoreset: the game ended with bricks knocked out, yet the observation returned
                        # with its end already shows the next game's intact wall.
                        assert not np.array_equal(before[i, -1, bricks], fresh[bricks])
                        np.testing.assert_array_equal(obs[i, -1, bricks], fresh[bricks])
                        scored_games += 1
                    rewards_of[i], dones_of[i] = [], 0
                if scored_games >= 2:
                    break
            assert scored_games >= 2, "random Breakout play scores in some of its games"


# ------------------------------------------------------------------------------------------------ classic control


def test_cartpole_shapes_and_episode_end() -> None:
    with make_env("CartPole-v1", num_envs=3, seed=0) as env:
        assert (env.observation_shape, env.num_actions, env.frames_per_step) == ((4,), 2, 1)
        obs = env.reset()
        assert obs.dtype == np.float32 and obs.shape == (3, 4)
        ends = _check_episode_bookkeeping(env, _random_actions(env, 100))
    assert len(ends) >= 3
    assert all(e.episode_return == e.length for e in ends)  # CartPole pays 1 per step


def test_cartpole_same_seed_same_observations() -> None:
    def run(seed: int) -> np.ndarray:
        with make_env("CartPole-v1", num_envs=2, seed=seed) as env:
            return np.stack([env.reset()] + [env.step(a)[0] for a in _random_actions(env, 60)])

    np.testing.assert_array_equal(run(11), run(11))
    assert not np.array_equal(run(11), run(12))


# ------------------------------------------------------------------------------------------------------ evaluate


def _random_policy(num_actions: int, calls: list[int] | None = None):
    rng = np.random.default_rng(0)

    def policy(obs: np.ndarray) -> np.ndarray:
        assert obs.dtype == np.float32
        if calls is not None:
            calls.append(len(obs))
        return rng.integers(0, num_actions, size=len(obs))

    return policy


@pytest.mark.parametrize("episodes", [3, 11])
def test_evaluate_counts_exactly_the_games_asked_for_minatar(episodes: int) -> None:
    calls: list[int] = []
    # Random MinAtar Breakout games often end within 30 no-ops: those games count and must not break the loop.
    returns = evaluate(_random_policy(3, calls), "MinAtar/Breakout-v1", episodes=episodes, noop_max=30, seed=1)
    assert len(returns) == episodes and all(isinstance(r, float) and r >= 0 for r in returns)
    # No-op starts: on the first step some of the parallel games are still doing no-ops, so the policy is not asked.
    assert calls[0] < min(episodes, 8)


def test_evaluate_without_noops_asks_the_policy_at_once() -> None:
    calls: list[int] = []
    assert len(evaluate(_random_policy(3, calls), "MinAtar/Breakout-v1", episodes=5, noop_max=0)) == 5
    assert calls[0] == 5


def test_evaluate_cartpole() -> None:
    returns = evaluate(lambda obs: np.zeros(len(obs), dtype=np.int64), "CartPole-v1", episodes=4, noop_max=30)
    assert len(returns) == 4
    assert all(5 <= r <= 20 for r in returns)  # always pushing left topples the pole within a few steps


def test_evaluate_rejects_a_policy_of_the_wrong_shape() -> None:
    with pytest.raises(EnvError, match="integer actions"):
        evaluate(lambda obs: np.zeros((len(obs), 2), dtype=np.int64), "CartPole-v1", episodes=2)


# -------------------------------------------------------------------------------------------------------- errors


def test_unknown_id_lists_the_families_and_extras() -> None:
    with pytest.raises(EnvError) as info:
        make_env("NoSuchGame-v9", num_envs=1, seed=0)
    message = str(info.value)
    for needle in ["MinAtar/", "ALE/Pong-v5", "CartPole-v1", "graftnet[rl]", "graftnet[minatar]"]:
        assert needle in message
    assert isinstance(info.value, GraftError)


def test_unknown_minatar_and_atari_games_list_valid_games() -> None:
    with pytest.raises(EnvError, match=r"Asterix, Breakout, Freeway, Seaquest, SpaceInvaders"):
        env_info("MinAtar/Pong-v1")
    with pytest.raises(EnvError, match=r"Valid games: .*Breakout.*Pong.*SpaceInvaders"):
        make_env("ALE/NotAGame-v5", num_envs=1, seed=0)
    with pytest.raises(EnvError, match="spelt 'MinAtar/'"):
        make_env("minatar/Breakout-v1", num_envs=1, seed=0)


def test_unsupported_spaces_are_refused() -> None:
    with pytest.raises(EnvError, match="discrete action space"):
        make_env("Pendulum-v1", num_envs=1, seed=0)


def test_misuse_of_a_vec_env_raises_env_error() -> None:
    with pytest.raises(EnvError, match="num_envs"):
        make_env("CartPole-v1", num_envs=0, seed=0)
    env = make_env("CartPole-v1", num_envs=2, seed=0)
    with pytest.raises(EnvError, match="reset"):
        env.step(np.zeros(2, dtype=np.int64))
    env.reset()
    with pytest.raises(EnvError, match=r"shape \(2,\)"):
        env.step(np.zeros(3, dtype=np.int64))
    with pytest.raises(EnvError, match=r"0\.\.1"):
        env.step(np.array([0, 2]))
    env.close()
    with pytest.raises(EnvError, match="closed"):
        env.step(np.zeros(2, dtype=np.int64))


@pytest.mark.parametrize(
    ("module", "env_id", "needle"),
    [("minatar.gym", "MinAtar/Breakout-v1", "graftnet[minatar]"), ("ale_py", "ALE/Pong-v5", "graftnet[rl]")],
)
def test_missing_extra_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, module: str, env_id: str, needle: str
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    for cached in (envs_mod._minatar_ids, envs_mod._atari_games):
        cached.cache_clear()
    try:
        with pytest.raises(EnvError, match=needle.replace("[", r"\[").replace("]", r"\]")) as info:
            make_env(env_id, num_envs=1, seed=0)
        if module == "minatar.gym":
            assert "GPL-3.0" in str(info.value)
    finally:
        for cached in (envs_mod._minatar_ids, envs_mod._atari_games):
            cached.cache_clear()
