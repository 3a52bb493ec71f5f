"""Advantage actor-critic with knowledge flow (paper §4.1, eq. 4): rollouts, n-step returns and the loss.

Shared by the synchronous learner (A2C) and every A3C worker. The policy loss gets λ1·ℓ_dep + λ2·KL(π_θ ‖ π_θold);
the value loss is plain, and trains w and Q too, through the shared trunk.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from graftnet.errors import TrainingError
from graftnet.graft import FrozenTeacher, GraftedModel
from graftnet.rl.envs import EpisodeEnd, VecEnv
from graftnet.spec import RLSpec
from graftnet.training.objectives import Objective

__all__ = ["Collector", "Rollout", "a2c_loss", "a2c_update", "n_step_returns", "policy_and_value"]

LOSS_PARTS = ("loss", "policy_loss", "value_loss", "entropy", "dep_loss", "kl_loss", "hint_loss")


def policy_and_value(out: object) -> tuple[torch.Tensor, torch.Tensor]:
    """``(policy_logits (B, A), value (B,))`` from an actor-critic's output, or a clear error."""
    if isinstance(out, (tuple, list)) and len(out) == 2 and all(isinstance(t, torch.Tensor) for t in out):
        logits, value = out
        if logits.ndim == 2 and value.ndim and value.numel() == len(value):  # (B,) or (B, 1)
            return logits, value if value.ndim == 1 else value.reshape(-1)
    raise TrainingError(
        "reinforcement learning needs a student that returns (policy_logits of shape (batch, actions), value of "
        "shape (batch,)), such as graftnet:a3c or graftnet:a3c_minatar"
    )


Taps = dict[str, tuple[torch.Tensor, ...]]  # teacher name -> its taps of a batch


@dataclass
class Rollout:
    """``T`` steps of ``N`` environments, and the observation after them (to bootstrap from).

    A :class:`Collector` also gives the value of ``last_obs`` (computed with the parameters that collected
    the rollout, which are the update's) and ``taps``: the taps of every teacher without a learned input
    adapter on ``obs`` (batch order ``t·N + n``, as ``obs.reshape(T·N, ...)``), so that the update's passes
    on the rollout do not run those teachers again.
    """

    obs: torch.Tensor  # (T, N, *shape)
    actions: torch.Tensor  # (T, N)
    rewards: torch.Tensor  # (T, N)
    dones: torch.Tensor  # (T, N), episode boundaries: no bootstrapping across them
    last_obs: torch.Tensor  # (N, *shape)
    last_value: torch.Tensor | None = None  # (N,) the value of last_obs; None: a2c_loss computes it
    taps: Mapping[str, tuple[torch.Tensor, ...]] | None = None  # (T·N, ...) per tap; None: the update recomputes

    @property
    def steps(self) -> int:
        return int(self.actions.numel())


def _recordable(model: nn.Module) -> dict[str, FrozenTeacher]:
    """The teachers of ``model`` whose taps depend on no trainable parameter, so a later pass may reuse them."""
    if not isinstance(model, GraftedModel):
        return {}
    return {name: t for name, t in model.teachers.items() if isinstance(t, FrozenTeacher) and not t.needs_input_grad}


def _reusing(model: nn.Module, taps: Taps | None) -> contextlib.AbstractContextManager[None]:
    if taps is None or not isinstance(model, GraftedModel):
        return contextlib.nullcontext()
    return model.reusing_teacher_features(taps)


class Collector:
    """Steps a :class:`VecEnv` with the current policy, carrying its observation from one rollout to the next.

    Teachers without a learned input adapter are recorded (:meth:`FrozenTeacher.recording`): their taps of
    the rollout go into :attr:`Rollout.taps`, and their taps of the last observation (from the bootstrap pass)
    are carried to the next rollout, whose first step sees that observation again.
    """

    def __init__(self, env: VecEnv, device: torch.device, *, cache_taps: bool = True) -> None:
        self.env = env
        self.device = device
        self.cache_taps = cache_taps  # False: the update recomputes every teacher (for comparisons)
        self.obs = torch.from_numpy(env.reset())
        self._carried: tuple[weakref.ref[nn.Module], Taps] | None = None  # the model, its teachers' taps of obs

    def _taps_of_obs(self, model: nn.Module, teachers: Mapping[str, FrozenTeacher],
                     device: torch.device) -> Taps | None:  # fmt: skip
        """The taps of :attr:`obs` that the last rollout's bootstrap pass recorded, if they are this model's."""
        carried, self._carried = self._carried, None
        if carried is None or carried[0]() is not model or set(carried[1]) != set(teachers):
            return None  # the first rollout, or another model (the teachers were cut, say)
        if any(z.device != device for taps in carried[1].values() for z in taps):
            return None  # the model moved to another device
        return carried[1]

    @torch.no_grad()
    def collect(self, model: nn.Module, steps: int) -> tuple[Rollout, list[EpisodeEnd]]:
        n = self.env.num_envs
        obs = torch.empty((steps, n, *self.env.observation_shape))
        actions = torch.empty((steps, n), dtype=torch.long)
        rewards = torch.empty((steps, n))
        dones = torch.empty((steps, n), dtype=torch.bool)
        ended: list[EpisodeEnd] = []
        teachers = _recordable(model) if self.cache_taps else {}
        with contextlib.ExitStack() as stack:
            records = {name: stack.enter_context(t.recording()) for name, t in teachers.items()}
            for t in range(steps):
                obs[t] = self.obs
                x = self.obs.to(self.device)
                with _reusing(model, self._taps_of_obs(model, teachers, x.device) if t == 0 else None):
                    logits, _ = policy_and_value(model(x))
                action = torch.multinomial(torch.softmax(logits, dim=-1), 1).squeeze(1).cpu()
                next_obs, reward, done, ends = self.env.step(action.numpy())
                actions[t], rewards[t], dones[t] = action, torch.from_numpy(reward), torch.from_numpy(done)
                ended += ends
                self.obs = torch.from_numpy(next_obs)
            # one tensor per tap, the steps' batches in order: row t·N + n, as obs.reshape(T·N, ...)
            taps = {name: tuple(map(torch.cat, zip(*calls, strict=True))) for name, calls in records.items()}
            for calls in records.values():
                calls.clear()
            # The bootstrap pass: the value after the rollout, with the parameters the update starts from.
            _, last_value = policy_and_value(model(self.obs.to(self.device)))
            if teachers:
                self._carried = (weakref.ref(model), {name: calls[0] for name, calls in records.items()})
        return Rollout(obs, actions, rewards, dones, self.obs.clone(), last_value, taps or None), ended


def n_step_returns(rewards: torch.Tensor, dones: torch.Tensor, last_value: torch.Tensor, gamma: float) -> torch.Tensor:
    """Discounted returns of a (T, N) rollout, bootstrapped from the value after it and cut at episode ends."""
    returns = torch.empty_like(rewards)
    running = last_value
    keep = (~dones).float()
    for t in reversed(range(len(rewards))):
        running = rewards[t] + gamma * running * keep[t]
        returns[t] = running
    return returns


def _policy_logits(out: object) -> torch.Tensor:
    return policy_and_value(out)[0]


def a2c_loss(
    objective: Objective, rollout: Rollout, rl: RLSpec, progress: float, device: torch.device
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The actor-critic loss of one rollout, plus the objective's regularizer on the policy (eq. 4 for
    knowledge flow: λ1·ℓ_dep + λ2·KL(π_θ ‖ π_θold))."""
    g = objective.grafted
    last_value = rollout.last_value
    if last_value is None:
        with torch.no_grad():
            _, last_value = policy_and_value(g(rollout.last_obs.to(device)))
    t, n = rollout.actions.shape
    obs = rollout.obs.reshape(t * n, *rollout.obs.shape[2:]).to(device)
    actions = rollout.actions.reshape(-1).to(device)
    clip = rl.clip_rewards if rl.clip_rewards is not None else rl.env.startswith("ALE/")
    rewards = rollout.rewards.clamp(-1.0, 1.0) if clip else rollout.rewards
    returns = n_step_returns(rewards, rollout.dones, last_value.cpu(), rl.gamma).reshape(-1).to(device)
    # The θ_old pass reads the same teacher taps; the collector's recorded taps spare the teachers both passes.
    with g.reusing_teacher_features(dict(rollout.taps) if rollout.taps is not None else None):
        logits, values = policy_and_value(objective.forward(obs))
        log_p = F.log_softmax(logits, dim=-1)
        advantage = (returns - values).detach()
        policy_loss = -(log_p.gather(1, actions[:, None]).squeeze(1) * advantage).mean()
        entropy = -(log_p.exp() * log_p).sum(-1).mean()
        value_loss = 0.5 * (returns - values).pow(2).mean()
        parts = {"policy_loss": policy_loss, "value_loss": value_loss, "entropy": entropy}
        total = policy_loss - rl.entropy * entropy + rl.value_coef * value_loss
        terms, extra = objective.regularizer(obs, logits, progress, head=_policy_logits)
        for term in terms:
            total = total + term
        parts.update(extra)
    return total, {"loss": total, **parts}


def a2c_update(
    objective: Objective, collector: Collector, optimizer: torch.optim.Optimizer, rl: RLSpec, progress: float
) -> tuple[dict[str, float], list[EpisodeEnd], int]:
    """Collect one rollout, take one optimizer step on its loss (the gradients of the optimizer's parameters clipped
    to ``rl.max_grad_norm`` together); returns the loss parts, ended games, agent steps."""
    rollout, ended = collector.collect(objective.model, rl.rollout)
    total, parts = a2c_loss(objective, rollout, rl, progress, collector.device)
    # one device-to-host copy for the finiteness check and every logged number
    values = dict(zip(parts, torch.stack([v.detach().float() for v in parts.values()]).tolist(), strict=True))
    if not math.isfinite(values["loss"]):
        raise TrainingError(
            f"the loss is not finite at update {objective.steps + 1} ({values}); lower train.lr or "
            "train.lambda1.final"
        )
    optimizer.zero_grad(set_to_none=True)
    objective.backward(total)  # total.backward(), scaled first with train.precision fp16
    if rl.max_grad_norm is not None:
        objective.unscale_gradients(optimizer)  # clip the true gradients, not fp16-scaled ones
        # the gradients this step applies: the optimizer's parameters (walking the model's modules cost more)
        stepped = [p for group in optimizer.param_groups for p in group["params"]]
        nn.utils.clip_grad_norm_(stepped, rl.max_grad_norm)
    objective.step(optimizer, progress)
    return values, ended, rollout.steps
