"""Knowledge-flow A2C written by hand, without graftnet's machinery: the control for bench_rl.py's conv-and-fc cases.

What a careful engineer would write for one student and two teachers of the A3C family, mixing at two sites (the
pre-activation of one conv layer's ReLU and of the dense layer's), in plain eager PyTorch: the mixing inline in the
forward pass (``c_0·z + c_1·t_1 + c_2·t_2``, autograd as it comes), the coefficients computed once per rollout,
θ_old a second copy of the student (with its input adapters) refreshed with one fused copy before each step. With
fixed adapters (the teachers take the student's observations) the teachers' taps of the rollout are kept for the
update and θ_old's pass, and the bootstrap pass's carried to the next rollout; with learned ones (a 1×1
convolution in front of each teacher) the update runs the teachers again through θ's adapters and θ_old's.
It computes what graftnet's knowledge flow computes for those specs, value for value (tests/test_bench_rl.py checks
the loss, the gradients and the collection passes against graftnet's), so its speed is what graftnet's machinery
is measured against: bench_rl.py reports graftnet ÷ hand-written beside both cases' ratios to their limit.

Not part of graftnet: a benchmark's control, for bench_rl.py's specs only. Its layers are the graft's own modules,
copied: the student, the teachers' truncated bodies and the learned input adapters (graftnet's ``PointwiseConv2d``,
a 1×1 convolution computed as a batched matrix product), so that what differs is the machinery around them.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from graftnet.graft import FrozenTeacher, GraftedModel
from graftnet.rl.a2c import n_step_returns
from graftnet.rl.envs import VecEnv

Taps = list[tuple[torch.Tensor, torch.Tensor]]  # per teacher: (conv tap, dense tap)


class TeacherTaps(nn.Module):
    """A frozen A3C teacher run up to its dense layer: its pre-activations at the conv site and the dense layer.

    ``layers``: the teacher's ``features`` up to the conv site's ReLU (the last one given), ``fc`` its dense layer.
    """

    def __init__(self, layers: Sequence[nn.Module], fc: nn.Module) -> None:
        super().__init__()
        *before, self.relu = layers
        self.before = nn.Sequential(*before)
        self.fc = fc
        self.requires_grad_(False).eval()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        conv = self.before(x)
        return conv, self.fc(self.relu(conv).flatten(1))


class MixedStudent(nn.Module):
    """The student with each site's mixing weights w (index 0: the student) and its teachers' fixed tap scales."""

    def __init__(self, student: nn.Module, conv_site: int, scales: Sequence[torch.Tensor],
                 input_adapters: Sequence[nn.Module] = ()) -> None:  # fmt: skip
        super().__init__()
        self.student = student
        self.input_adapters = nn.ModuleList(input_adapters)  # one per teacher, or none (fixed: the observations)
        self.conv_site = conv_site
        self.w_conv = nn.Parameter(torch.zeros(3))
        self.w_fc = nn.Parameter(torch.zeros(3))
        # (1, s_1, s_2): the teachers' tap scales multiply into their coefficients
        self.register_buffer("s_conv", torch.cat([torch.ones(1), scales[0]]))
        self.register_buffer("s_fc", torch.cat([torch.ones(1), scales[1]]))

    def coefficients(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.softmax(self.w_conv, 0) * self.s_conv, torch.softmax(self.w_fc, 0) * self.s_fc

    def forward(self, x: torch.Tensor, taps: Taps,
                coefficients: tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]] | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        c_conv, c_fc = coefficients or [c.unbind() for c in self.coefficients()]
        (a_conv, a_fc), (b_conv, b_fc) = taps
        h = x
        for i, layer in enumerate(self.student.features):
            if i == self.conv_site:
                h = c_conv[0] * h + c_conv[1] * a_conv + c_conv[2] * b_conv
            h = layer(h)
        z = self.student.fc(h.flatten(1))
        h = self.student.act(c_fc[0] * z + c_fc[1] * a_fc + c_fc[2] * b_fc)
        return self.student.policy(h), self.student.value(h).squeeze(-1)


class HandWrittenKF:
    """Knowledge-flow A2C: collect a rollout, the loss (eq. 4), backward, clipping, θ_old's refresh, Adam, the floor.

    Built from a graftnet knowledge-flow graft (:meth:`from_graft`) so that both start from the same weights and
    tap scales; from then on nothing of graftnet runs but the copied layers, :func:`n_step_returns` (the returns,
    shared with plain A2C) and the environment.
    """

    def __init__(self, model: MixedStudent, teachers: Sequence[TeacherTaps], env: VecEnv, *, lambda1: float,
                 lambda2: float, floor: float, lr: float, lr_mixing: float, lr_adapters: float, gamma: float = 0.99,
                 entropy: float = 0.01, value_coef: float = 0.5, max_grad_norm: float = 0.5,
                 clip_rewards: bool = False) -> None:  # fmt: skip
        self.model, self.teachers, self.env = model, list(teachers), env
        self.old = copy.deepcopy(model).requires_grad_(False)  # θ_old
        self.lambda1, self.lambda2, self.floor = lambda1, lambda2, floor
        self.gamma, self.entropy, self.value_coef, self.max_grad_norm = gamma, entropy, value_coef, max_grad_norm
        self.clip_rewards = clip_rewards  # to [-1, 1], as A2C does on Atari
        self.learned = len(model.input_adapters) > 0
        self.params = [p for p in model.parameters() if p.requires_grad]
        groups = [(list(model.student.parameters()), lr), ([model.w_conv, model.w_fc], lr_mixing),
                  (list(model.input_adapters.parameters()), lr_adapters)]  # fmt: skip
        self.optimizer = torch.optim.Adam([{"params": params, "lr": rate} for params, rate in groups if params])
        self.obs = torch.from_numpy(env.reset())
        self.carried: Taps | None = None  # the bootstrap pass's taps of self.obs

    @classmethod
    def from_graft(cls, g: GraftedModel, env: VecEnv, conv_site: int, **settings: Any) -> HandWrittenKF:
        """The same student, teachers (in ``g.teachers``' order), w, tap scales and input adapters as ``g`` (a copy
        of each)."""
        teachers, adapters = [], []
        for name, t in g.teachers.items():
            assert isinstance(t, FrozenTeacher)
            body = copy.deepcopy(t.body)  # graftnet's truncated copy of the teacher: features up to the site, fc
            features = body.get_submodule("features")
            layers = [features.get_submodule(str(i)) for i in range(conv_site + 1)]
            teachers.append(TeacherTaps(layers, body.get_submodule("fc")))
            if name in g.input_adapters:
                adapters.append(copy.deepcopy(g.input_adapters[name]))
        mixers = list(g.mixers.values())  # the conv site, then the dense layer's
        model = MixedStudent(copy.deepcopy(g.student), conv_site, [m.tap_scale.clone() for m in mixers], adapters)
        with torch.no_grad():
            model.w_conv.copy_(mixers[0].logits)
            model.w_fc.copy_(mixers[1].logits)
        return cls(model, teachers, env, **settings)

    def taps(self, x: torch.Tensor, model: MixedStudent | None = None) -> Taps:
        """The teachers' taps of ``x``, through ``model``'s input adapters (default: θ's) if they have some."""
        adapters = (model or self.model).input_adapters
        if not adapters:
            return [t(x) for t in self.teachers]
        return [t(a(x)) for t, a in zip(self.teachers, adapters, strict=True)]

    @torch.no_grad()
    def collect(self, steps: int) -> tuple[Any, ...]:
        """``steps`` policy steps and the bootstrap pass: (obs, actions, rewards, dones, last value, taps); taps
        None with learned adapters (the update recomputes them: they depend on the adapters it trains)."""
        n = self.env.num_envs
        obs = torch.empty((steps, n, *self.env.observation_shape))
        actions = torch.empty((steps, n), dtype=torch.long)
        rewards = torch.empty((steps, n))
        dones = torch.empty((steps, n), dtype=torch.bool)
        coefficients = [c.unbind() for c in self.model.coefficients()]  # one w for the whole rollout
        recorded = []
        for t in range(steps):
            obs[t] = self.obs
            taps = self.carried if t == 0 and self.carried is not None else self.taps(self.obs)
            recorded.append(taps)
            logits, _ = self.model(self.obs, taps, coefficients)  # type: ignore[arg-type]
            action = torch.multinomial(torch.softmax(logits, dim=-1), 1).squeeze(1)
            next_obs, reward, done, _ = self.env.step(action.numpy())
            actions[t], rewards[t], dones[t] = action, torch.from_numpy(reward), torch.from_numpy(done)
            self.obs = torch.from_numpy(next_obs)
        last_taps = self.taps(self.obs)
        _, last_value = self.model(self.obs, last_taps, coefficients)  # type: ignore[arg-type]
        if self.learned:  # after the update the adapters differ: nothing of this rollout's taps is reused
            return obs, actions, rewards, dones, last_value, None
        self.carried = last_taps
        taps = [tuple(torch.cat(parts) for parts in zip(*(step[k] for step in recorded), strict=True))
                for k in range(len(self.teachers))]  # fmt: skip
        return obs, actions, rewards, dones, last_value, taps

    def loss(self, obs: torch.Tensor, actions: torch.Tensor, rewards: torch.Tensor, dones: torch.Tensor,
             last_value: torch.Tensor, taps: Taps | None) -> tuple[torch.Tensor, list[torch.Tensor]]:  # fmt: skip
        """The A2C loss plus λ1·ℓ_dep + λ2·KL(π_θ ‖ π_θold), and its parts (total, policy, value, entropy, dep, KL);
        ``taps`` None: the teachers run here, through θ's input adapters and θ_old's."""
        t, n = actions.shape
        x = obs.reshape(t * n, *obs.shape[2:])
        rewards = rewards.clamp(-1.0, 1.0) if self.clip_rewards else rewards
        returns = n_step_returns(rewards, dones, last_value, self.gamma).reshape(-1)
        logits, values = self.model(x, taps if taps is not None else self.taps(x))
        log_p = F.log_softmax(logits, dim=-1)
        advantage = (returns - values).detach()
        policy_loss = -(log_p.gather(1, actions.reshape(-1, 1)).squeeze(1) * advantage).mean()
        entropy = -(log_p.exp() * log_p).sum(-1).mean()
        value_loss = 0.5 * (returns - values).pow(2).mean()
        dep = -(torch.log_softmax(self.model.w_conv, 0)[0] + torch.log_softmax(self.model.w_fc, 0)[0]) / 2
        with torch.no_grad():
            old_logits, _ = self.old(x, taps if taps is not None else self.taps(x, self.old))
        kl = (log_p.exp() * (log_p - F.log_softmax(old_logits, dim=-1))).sum(-1).mean()
        total = (policy_loss - self.entropy * entropy + self.value_coef * value_loss
                 + self.lambda1 * dep + self.lambda2 * kl)  # fmt: skip
        return total, [total, policy_loss, value_loss, entropy, dep, kl]

    def update(self, steps: int) -> int:
        """One rollout of ``steps`` steps and one optimizer step on it; returns the agent steps taken."""
        self.learn(*self.collect(steps))
        return steps * self.env.num_envs

    def learn(self, obs: torch.Tensor, actions: torch.Tensor, rewards: torch.Tensor, dones: torch.Tensor,
              last_value: torch.Tensor, taps: Taps | None) -> list[float]:  # fmt: skip
        """One optimizer step on a rollout; returns the loss parts (as :meth:`loss` orders them)."""
        total, parts = self.loss(obs, actions, rewards, dones, last_value, taps)
        values: list[float] = torch.stack([v.detach() for v in parts]).tolist()  # one host copy: check and log
        if not math.isfinite(values[0]):
            raise RuntimeError(f"the loss is not finite: {values}")
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        torch._foreach_copy_(list(self.old.parameters()), list(self.model.parameters()))  # θ_old = θ before the step
        self.optimizer.step()
        self._raise_floor()
        return values

    @torch.no_grad()
    def _raise_floor(self) -> None:
        """p_w(student) ≥ floor at both sites: the teachers' logits drop together where it is below (checked on the
        host first, as graftnet does on the CPU: no op at all while p_w(student) is clearly above the floor)."""
        allowed = math.log((1.0 - self.floor) / self.floor)
        for w in (self.model.w_conv, self.model.w_fc):
            v = w.tolist()
            if max(v[1:]) - v[0] + math.log(len(v) - 1) < allowed - 1e-3:
                continue
            w[1:] -= (torch.logsumexp(w[1:] - w[0], dim=0) - allowed).clamp_min(0)
