"""Vectorised environments for A2C/A3C: MinAtar, Atari (ALE) and classic control behind one small interface.

Every family is stepped as a batch of ``num_envs`` sub-environments with same-step autoreset: when
``dones[i]`` is set, ``obs[i]`` is already the first observation of the next episode, so an n-step rollout
never holds a transition that crosses an episode boundary. Observations are float32 and channels-first,
ready for a convnet or an MLP.

* ``MinAtar/<Game>-v0`` / ``-v1``: MinAtar's own games (sticky actions 0.1, as MinAtar ships them), observations
  ``(C, 10, 10)`` in {0, 1}. Needs ``pip install "graftnet[minatar]"`` (MinAtar is GPL-3.0).
* ``ALE/<Game>-v5``: Atari 2600 through ``ale_py.vector_env.AtariVectorEnv`` with the DQN/A3C preprocessing
  (84×84 greyscale, frame skip 4 max-pooled over the last two frames, a 4-frame stack, up to 30 no-op starts,
  no sticky actions, minimal action set), observations ``(4, 84, 84)`` in [0, 1]. Needs ``pip install
  "graftnet[rl]"``.
* Any other Gymnasium id with a discrete action space and a flat observation (``CartPole-v1``, ``Acrobot-v1``,
  ``MountainCar-v0`` …): observations ``(D,)``. Needs ``pip install "graftnet[rl]"``.

Rewards are the games' raw rewards, never clipped: A3C clips Atari rewards to [-1, 1] for learning, which is
the trainer's business, while the returns reported in :class:`EpisodeEnd` and by :func:`evaluate` must be game
scores.

Examples:
    >>> env = make_env("CartPole-v1", num_envs=4, seed=0)
    >>> obs = env.reset()
    >>> obs.shape, obs.dtype
    ((4, 4), dtype('float32'))
    >>> obs, rewards, dones, ended = env.step(np.zeros(4, dtype=np.int64))
    >>> env.close()
"""

from __future__ import annotations

import functools
import logging
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import numpy as np

from graftnet.errors import EnvError

__all__ = ["EpisodeEnd", "VecEnv", "make_env", "env_info", "evaluate"]

_RL_EXTRA = 'pip install "graftnet[rl]"'
_MINATAR_EXTRA = 'pip install "graftnet[minatar]"'
_FAMILIES = (
    "supported environment families: "
    f"MinAtar ('MinAtar/Breakout-v1', 'MinAtar/Seaquest-v0'; needs {_MINATAR_EXTRA}, MinAtar is GPL-3.0), "
    f"Atari ('ALE/Pong-v5', 'ALE/SpaceInvaders-v5'; needs {_RL_EXTRA}) and "
    f"Gymnasium classic control ('CartPole-v1', 'Acrobot-v1', 'MountainCar-v0'; needs {_RL_EXTRA})"
)
_ATARI_FRAME_SKIP = 4
_EVAL_MAX_ENVS = 8


@dataclass(frozen=True)
class EpisodeEnd:
    """One finished game of one sub-environment.

    Attributes:
        env_index: Which sub-environment finished.
        episode_return: Undiscounted sum of the raw rewards over the whole game (for Atari: over all lives, even
            when training ends an episode at every life loss).
        length: Agent steps the game took (an Atari agent step is ``frames_per_step`` emulator frames).
    """

    env_index: int
    episode_return: float
    length: int


class VecEnv(ABC):
    """``num_envs`` sub-environments stepped together, with same-step autoreset.

    Build one with :func:`make_env`. Usable as a context manager that closes it.

    Attributes:
        num_envs: Number of sub-environments.
        observation_shape: Shape of one sub-environment's observation, channels first: MinAtar ``(C, 10, 10)``,
            Atari ``(4, 84, 84)``, classic control ``(D,)``.
        num_actions: Size of the discrete action space; actions are ``0 … num_actions - 1``.
        frames_per_step: Emulator frames per agent step: 4 for Atari (frame skip), 1 otherwise. Multiply agent
            steps by it to count frames the way the A3C paper does.
    """

    num_envs: int
    observation_shape: tuple[int, ...]
    num_actions: int
    frames_per_step: int

    def __init__(self, num_envs: int, observation_shape: tuple[int, ...], num_actions: int, frames_per_step: int):
        self.num_envs = num_envs
        self.observation_shape = observation_shape
        self.num_actions = num_actions
        self.frames_per_step = frames_per_step
        self._started = False
        self._closed = False
        self._returns = [0.0] * num_envs
        self._lengths = [0] * num_envs

    @abstractmethod
    def reset(self) -> np.ndarray:
        """Start a fresh game in every sub-environment.

        The first call seeds sub-environment ``i`` with ``seed + i``; later calls continue the random streams.

        Returns:
            Float32 observations of shape ``(num_envs, *observation_shape)``.
        """

    @abstractmethod
    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[EpisodeEnd]]:
        """Take one agent step in every sub-environment.

        Args:
            actions: Integer actions of shape ``(num_envs,)``.

        Returns:
            ``(obs, rewards, dones, ended)``: float32 observations ``(num_envs, *observation_shape)``, float32 raw
            rewards ``(num_envs,)``, bool ``dones`` ``(num_envs,)`` and the games that finished on this step.
            ``dones[i]`` marks an n-step bootstrapping boundary: the episode terminated or was truncated, or (Atari
            with ``training=True``) a life was lost. When ``dones[i]`` is set ``obs[i]`` already starts the next
            episode (or the next life). A truncated episode is a boundary too: the trainer does not bootstrap
            through it, which is the usual A2C simplification.
        """

    @abstractmethod
    def close(self) -> None:
        """Release the sub-environments. Closing twice is harmless."""

    def __enter__(self) -> VecEnv:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_envs={self.num_envs}, observation_shape={self.observation_shape}, "
            f"num_actions={self.num_actions}, frames_per_step={self.frames_per_step})"
        )

    def _check_step(self, actions: np.ndarray) -> np.ndarray:
        """Validate a batch of actions before it reaches an environment that would fail obscurely or silently."""
        if self._closed:
            raise EnvError(f"{self!r} is closed; build a new one with make_env()")
        if not self._started:
            raise EnvError(f"{self!r} was stepped before reset(); call reset() once before the first step()")
        acts = np.asarray(actions)
        if acts.shape != (self.num_envs,) or acts.dtype.kind not in "iu":
            raise EnvError(
                f"actions must be an integer array of shape ({self.num_envs},), one per sub-environment; "
                f"got dtype {acts.dtype} and shape {acts.shape}"
            )
        # One fused check keeps validation at a few microseconds per batch.
        if acts.size and (int(acts.min()) < 0 or int(acts.max()) >= self.num_actions):
            raise EnvError(f"actions must lie in 0..{self.num_actions - 1} for this environment; got {acts.tolist()}")
        return acts.astype(np.int64, copy=False)

    def _finish(self, i: int) -> EpisodeEnd:
        end = EpisodeEnd(i, self._returns[i], self._lengths[i])
        self._returns[i] = 0.0
        self._lengths[i] = 0
        return end


class _GymVecEnv(VecEnv):
    """A plain loop over Gymnasium environments: MinAtar and classic control.

    A loop beats ``gymnasium.vector.SyncVectorEnv`` here: these environments cost microseconds per step, so the
    per-step overhead is what matters, and the loop writes straight into one observation buffer.
    """

    def __init__(self, envs: Sequence[Any], seed: int, *, channels_last: bool):
        space = envs[0].observation_space
        raw_shape = tuple(int(d) for d in space.shape)
        shape = (raw_shape[-1], *raw_shape[:-1]) if channels_last else raw_shape
        super().__init__(len(envs), shape, int(envs[0].action_space.n), 1)
        self._envs = list(envs)
        self._seed = seed
        self._raw = np.zeros((self.num_envs, *raw_shape), dtype=space.dtype)
        # The channels-first view is built once; every step then copies it into a fresh float32 array in one
        # numpy call instead of transposing each sub-environment's observation.
        nd = len(raw_shape)
        self._view = self._raw.transpose(0, nd, *range(1, nd)) if channels_last else self._raw

    def _obs(self) -> np.ndarray:
        return np.array(self._view, dtype=np.float32, order="C")

    def reset(self) -> np.ndarray:
        if self._closed:
            raise EnvError(f"{self!r} is closed; build a new one with make_env()")
        for i, env in enumerate(self._envs):
            obs, _ = env.reset(seed=None if self._started else self._seed + i)
            self._raw[i] = obs
        self._started = True
        self._returns = [0.0] * self.num_envs
        self._lengths = [0] * self.num_envs
        return self._obs()

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[EpisodeEnd]]:
        acts = self._check_step(actions).tolist()
        rewards = np.empty(self.num_envs, dtype=np.float32)
        dones = np.zeros(self.num_envs, dtype=bool)
        ended: list[EpisodeEnd] = []
        returns, lengths, raw = self._returns, self._lengths, self._raw
        for i, env in enumerate(self._envs):
            obs, reward, terminated, truncated, _ = env.step(acts[i])
            rewards[i] = reward
            returns[i] += float(reward)
            lengths[i] += 1
            if terminated or truncated:
                dones[i] = True
                ended.append(self._finish(i))
                obs, _ = env.reset()
            raw[i] = obs
        return self._obs(), rewards, dones, ended

    def close(self) -> None:
        if not self._closed:
            for env in self._envs:
                env.close()
            self._closed = True


class _AtariVecEnv(VecEnv):
    """``ale_py``'s threaded ``AtariVectorEnv`` with whole-game bookkeeping and our own life-loss boundaries.

    What AtariVectorEnv does, and why this class does not simply forward its flags:

    * ``autoreset_mode="SameStep"`` is supported natively: on ``terminated | truncated`` the returned observation
      and ``info["lives"]`` already belong to the new game (its no-op start included) and the step's reward is
      the final reward of the old game. So no internal extra step is needed and no bogus transition is returned.
    * Its ``episodic_life=True`` does not end a *life*: it resets the whole game at every life loss, so an agent
      would only ever play its first life. Its ``life_loss_info=True`` does keep playing, but then reports game
      over and life loss through the same ``terminated`` flag.
    * So it runs with neither: ``terminated | truncated`` is then exactly "the game is over" (truncated at the
      ALE v5 limit of 108,000 frames), and when training a life loss is read from ``info["lives"]`` dropping,
      the way the DQN ``EpisodicLifeEnv`` wrapper does. A life loss sets ``dones[i]`` while the game, its frame
      stack, its return and its length go on.
    """

    def __init__(self, game: str, num_envs: int, seed: int, *, training: bool, noop_max: int):
        try:
            from ale_py.vector_env import AtariVectorEnv
        except ImportError as e:
            raise EnvError(
                f"Atari environments need ale-py >= 0.11 (for ale_py.vector_env.AtariVectorEnv): {e}. "
                f"Install or upgrade it with {_RL_EXTRA}"
            ) from e
        self._env = AtariVectorEnv(
            game,
            num_envs,
            img_height=84,
            img_width=84,
            grayscale=True,
            stack_num=4,
            frameskip=_ATARI_FRAME_SKIP,
            maxpool=True,
            noop_max=noop_max,
            repeat_action_probability=0.0,  # the A3C paper's deterministic ALE
            full_action_space=False,
            episodic_life=False,
            life_loss_info=False,
            reward_clipping=False,
            autoreset_mode="SameStep",
        )
        obs_space: Any = self._env.single_observation_space
        act_space: Any = self._env.single_action_space
        super().__init__(num_envs, tuple(int(d) for d in obs_space.shape), int(act_space.n), _ATARI_FRAME_SKIP)
        self._seed = seed
        self._training = training
        self._lives = np.zeros(num_envs, dtype=np.int64)
        self._order = np.arange(num_envs)
        self._scale = np.float32(1.0 / 255.0)

    def _in_order(self, arrays: tuple[np.ndarray, ...], info: dict[str, Any]) -> tuple[np.ndarray, ...]:
        # With batch_size == num_envs ALE answers in env order; reorder anyway should a version ever not.
        env_id = np.asarray(info["env_id"])
        if np.array_equal(env_id, self._order):
            return arrays
        perm = np.argsort(env_id)
        return tuple(a[perm] for a in arrays)

    def reset(self) -> np.ndarray:
        if self._closed:
            raise EnvError(f"{self!r} is closed; build a new one with make_env()")
        obs, info = self._env.reset(seed=None if self._started else self._seed)
        obs, lives = self._in_order((obs, np.asarray(info["lives"])), info)
        self._lives = lives.astype(np.int64)
        self._started = True
        self._returns = [0.0] * self.num_envs
        self._lengths = [0] * self.num_envs
        return obs * self._scale

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[EpisodeEnd]]:
        acts = self._check_step(actions)
        obs, reward, terminated, truncated, info = self._env.step(acts)
        obs, reward, terminated, truncated, lives = self._in_order(
            (obs, reward, terminated, truncated, np.asarray(info["lives"])), info
        )
        game_over = np.asarray(terminated | truncated, dtype=bool)
        dones = game_over | (lives < self._lives) if self._training else game_over
        self._lives = lives.astype(np.int64)
        ended: list[EpisodeEnd] = []
        for i, r in enumerate(reward.tolist()):
            self._returns[i] += r
            self._lengths[i] += 1
        for i in np.flatnonzero(game_over).tolist():
            ended.append(self._finish(i))
        return obs * self._scale, reward.astype(np.float32), dones, ended

    def close(self) -> None:
        if not self._closed:
            self._env.close()
            self._closed = True


# --------------------------------------------------------------------------------------------------- id handling


def _import_gymnasium(extra: str) -> Any:
    try:
        import gymnasium
    except ImportError as e:
        raise EnvError(f"reinforcement-learning environments need gymnasium: {e}. Install it with {extra}") from e
    return gymnasium


@contextmanager
def _quiet_logging() -> Iterator[None]:
    # MinAtar warns through the root logger at import that it cannot render without matplotlib/seaborn;
    # graftnet never renders, so the warning would only mislead.
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


@functools.cache
def _minatar_ids() -> tuple[str, ...]:
    """Register MinAtar's Gymnasium ids once and return them."""
    gymnasium = _import_gymnasium(_MINATAR_EXTRA)
    try:
        with _quiet_logging():
            import minatar.gym
    except ImportError as e:
        raise EnvError(
            f"MinAtar environments need the minatar package: {e}. Install it with {_MINATAR_EXTRA} "
            "(MinAtar is GPL-3.0, which is why it is an extra of its own)"
        ) from e
    if "MinAtar/Breakout-v1" not in gymnasium.registry:  # registering twice makes Gymnasium warn
        minatar.gym.register_envs()
    return tuple(sorted(k for k in gymnasium.registry if k.startswith("MinAtar/")))


@functools.cache
def _atari_games() -> dict[str, str]:
    """Map every ``ALE/<Game>-v5`` id to its ROM name, as in ``ALE/SpaceInvaders-v5`` → ``space_invaders``."""
    gymnasium = _import_gymnasium(_RL_EXTRA)
    try:
        import ale_py
    except ImportError as e:
        raise EnvError(f"Atari environments need ale-py: {e}. Install it with {_RL_EXTRA}") from e
    # ale_py's own registry is the authority on which ROMs make single-player v5 games.
    gymnasium.register_envs(ale_py)
    return {
        k: str(spec.kwargs["game"])
        for k, spec in gymnasium.registry.items()
        if k.startswith("ALE/") and k.endswith("-v5") and "game" in spec.kwargs
    }


def _game_names(ids: Sequence[str], prefix: str) -> str:
    return ", ".join(sorted({i.removeprefix(prefix).rsplit("-", 1)[0] for i in ids}))


def _family(env_id: str) -> str:
    if not isinstance(env_id, str) or not env_id:
        raise EnvError(f"an environment id must be a non-empty string, got {env_id!r}; {_FAMILIES}")
    if env_id.startswith("MinAtar/"):
        ids = _minatar_ids()
        if env_id not in ids:
            raise EnvError(
                f"unknown MinAtar environment {env_id!r}; valid games: {_game_names(ids, 'MinAtar/')}, as "
                "'MinAtar/<Game>-v0' (all 6 actions) or 'MinAtar/<Game>-v1' (minimal action set), "
                "e.g. 'MinAtar/Breakout-v1'"
            )
        return "minatar"
    if env_id.startswith("ALE/"):
        games = _atari_games()
        if env_id not in games:
            raise EnvError(
                f"unknown Atari environment {env_id!r}; graftnet takes 'ALE/<Game>-v5' ids, e.g. 'ALE/Pong-v5'. "
                f"Valid games: {_game_names(list(games), 'ALE/')}"
            )
        return "atari"
    if env_id.lower().startswith(("minatar/", "ale/")):
        raise EnvError(f"unknown environment {env_id!r}: the prefixes are spelt 'MinAtar/' and 'ALE/'; {_FAMILIES}")
    gymnasium = _import_gymnasium(_RL_EXTRA)
    if env_id not in gymnasium.registry:
        raise EnvError(f"unknown environment {env_id!r}; {_FAMILIES}")
    return "gym"


def _make_gym(env_id: str) -> Any:
    gymnasium = _import_gymnasium(_RL_EXTRA)
    try:
        env = gymnasium.make(env_id)
    except Exception as e:  # Gymnasium raises anything from DependencyNotInstalled to a plain ImportError
        raise EnvError(f"cannot build Gymnasium environment {env_id!r}: {e}") from e
    obs_space, act_space = env.observation_space, env.action_space
    flat = isinstance(obs_space, gymnasium.spaces.Box) and len(obs_space.shape) == 1
    if not (flat and isinstance(act_space, gymnasium.spaces.Discrete)):
        env.close()
        raise EnvError(
            f"{env_id!r} has observation space {obs_space} and action space {act_space}; graftnet's A2C needs a "
            f"discrete action space and, outside MinAtar and Atari, a flat Box observation; {_FAMILIES}"
        )
    return env


def _whole(name: str, value: object, minimum: int) -> int:
    """``value`` as an int of at least ``minimum``, or an EnvError naming the argument."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        kind = "a positive" if minimum == 1 else "a non-negative"
        raise EnvError(f"{name} must be {kind} integer, got {value!r}")
    return int(value)


def _make(env_id: str, num_envs: int, seed: int, *, training: bool, noop_max: int) -> VecEnv:
    num_envs, seed = _whole("num_envs", num_envs, 1), _whole("seed", seed, 0)
    family = _family(env_id)
    if family == "atari":
        return _AtariVecEnv(_atari_games()[env_id], num_envs, seed, training=training, noop_max=noop_max)
    if family == "minatar":
        gymnasium = _import_gymnasium(_MINATAR_EXTRA)
        # Unwrapped: MinAtar registers no time limit, and Gymnasium's checker wrappers would only add per-step
        # overhead. Gymnasium calls every -v0 "out of date" because a -v1 exists, but MinAtar's v0 and v1 differ in
        # action set, not in age, so that warning would mislead.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is out of date.*")
            envs = [gymnasium.make(env_id).unwrapped for _ in range(num_envs)]
        return _GymVecEnv(envs, seed, channels_last=True)
    return _GymVecEnv([_make_gym(env_id) for _ in range(num_envs)], seed, channels_last=False)


# --------------------------------------------------------------------------------------------------- public API


def make_env(env_id: str, num_envs: int, seed: int, *, training: bool = True) -> VecEnv:
    """Build ``num_envs`` seeded sub-environments of one game.

    Args:
        env_id: ``MinAtar/<Game>-v0|v1``, ``ALE/<Game>-v5`` or a Gymnasium classic-control id such as
            ``CartPole-v1``.
        num_envs: Number of sub-environments stepped together.
        seed: Sub-environment ``i`` is seeded with ``seed + i`` at the first :meth:`VecEnv.reset`; the same seed
            and the same actions give the same observations.
        training: For Atari, end an episode (``dones[i]``) at every life loss, as the A3C paper trains, while the
            game itself goes on; ``False`` (evaluation) ends episodes only at game over. Ignored elsewhere.

    Returns:
        The vectorised environment; call :meth:`VecEnv.reset` before stepping it.

    Raises:
        EnvError: The id is unknown, its extra is not installed, or ``num_envs``/``seed`` are invalid.

    Examples:
        >>> env = make_env("MinAtar/Breakout-v1", num_envs=16, seed=0)
        >>> env.reset().shape
        (16, 4, 10, 10)
        >>> env.close()
    """
    return _make(env_id, num_envs, seed, training=training, noop_max=30)


@functools.cache
def env_info(env_id: str) -> tuple[tuple[int, ...], int]:
    """Observation shape and number of actions of a game, without stepping it (one sub-environment is built).

    Args:
        env_id: As for :func:`make_env`.

    Returns:
        ``(observation_shape, num_actions)``, e.g. ``((4, 10, 10), 3)`` for ``MinAtar/Breakout-v1``.

    Raises:
        EnvError: As for :func:`make_env`.

    Examples:
        >>> env_info("CartPole-v1")
        ((4,), 2)
    """
    with _make(env_id, 1, 0, training=False, noop_max=0) as env:
        return env.observation_shape, env.num_actions


def evaluate(
    policy: Callable[[np.ndarray], np.ndarray],
    env_id: str,
    episodes: int = 30,
    noop_max: int = 30,
    seed: int = 0,
) -> list[float]:
    """Score a policy with the paper's protocol: whole games, each starting with random no-ops.

    Each game (for Atari: all lives, without episodic life) starts with a uniformly random number, from 0 to
    ``noop_max``, of no-op actions (action 0) before ``policy`` acts. For Atari the ALE draws the no-ops itself
    at every reset; classic control has no no-op action, so ``noop_max`` is ignored there. A game that ends
    during its no-ops still counts. Up to 8 games run in parallel; sub-environment ``i`` plays a fixed share of
    the games, so fast-ending games are not over-represented.

    Args:
        policy: Maps a float32 batch of observations ``(n, *observation_shape)`` to ``n`` integer actions.
        env_id: As for :func:`make_env`.
        episodes: Number of games to play.
        noop_max: Most no-op actions at the start of a game.
        seed: Seeds the sub-environments (``seed + i``) and the no-op draws.

    Returns:
        The ``episodes`` game returns (sums of raw rewards), in the order the games ended.

    Raises:
        EnvError: The id is unknown, ``episodes``/``noop_max`` are invalid, or ``policy`` returns the wrong shape.

    Examples:
        >>> returns = evaluate(lambda obs: np.zeros(len(obs), dtype=np.int64), "CartPole-v1", episodes=4)
        >>> len(returns)
        4
    """
    episodes, noop_max = _whole("episodes", episodes, 1), _whole("noop_max", noop_max, 0)
    family = _family(env_id)
    n = min(episodes, _EVAL_MAX_ENVS)
    quota = np.array([episodes // n + (i < episodes % n) for i in range(n)])
    played = np.zeros(n, dtype=np.int64)
    # Atari's no-ops happen inside the ALE's reset; MinAtar's are driven from here.
    python_noops = noop_max if family == "minatar" else 0
    rng = np.random.default_rng(seed)
    noops = rng.integers(0, python_noops + 1, size=n)
    returns: list[float] = []
    with _make(env_id, n, seed, training=False, noop_max=noop_max if family == "atari" else 0) as env:
        obs = env.reset()
        while len(returns) < episodes:
            acting = (noops == 0) & (played < quota)
            actions = np.zeros(n, dtype=np.int64)
            if acting.any():
                k = int(acting.sum())
                chosen = np.asarray(policy(obs[acting]))
                if chosen.shape != (k,) or chosen.dtype.kind not in "iu":
                    raise EnvError(
                        f"policy must map a batch of {k} observations to {k} integer actions, shape ({k},); "
                        f"it returned dtype {chosen.dtype} and shape {chosen.shape}"
                    )
                actions[acting] = chosen
            noops = np.maximum(noops - 1, 0)
            obs, _, dones, ended = env.step(actions)
            for end in ended:
                if played[end.env_index] < quota[end.env_index]:
                    returns.append(end.episode_return)
                    played[end.env_index] += 1
            if dones.any():
                noops[dones] = rng.integers(0, python_noops + 1, size=int(dones.sum()))
    return returns
