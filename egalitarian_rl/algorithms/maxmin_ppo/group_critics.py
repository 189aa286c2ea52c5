"""One value head per group: a K-headed critic and the rollout buffer that feeds it.

With ``worst_group``, ``softmin`` or ``egd`` the reward PPO trains on changes
whenever the group weights change, so a single critic chases a moving target.
K critics each learn one group's (stationary) value; every group gets its own
GAE, and the rule's weights combine the K advantages into the one the policy
gradient uses. That combination is exact for linear rules (the rollout reward
is ``group_rewards @ weights``); ``per_sample_min`` is not linear and keeps a
single critic of its own.

SB3's own ``collect_rollouts`` runs unchanged (gSDE noise resets, callbacks,
time-limit bootstraps, ``VecNormalize``): it sees the aggregated scalar reward
and, through :meth:`GroupCriticPolicy.predict_values`, the value of that
aggregate. Only the buffer differs: it takes the K group rewards of each step
from a bound source (see :meth:`GroupRolloutBuffer.bind`) instead of the scalar.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch as th
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.type_aliases import PyTorchObs, Schedule
from torch import nn


class GroupCriticPolicy(ActorCriticPolicy):
    """SB3's actor-critic policy with ``n_critics`` value outputs.

    ``forward`` and ``evaluate_actions`` return the K group values ``(batch, K)``
    (what the buffer stores and the value loss trains); :meth:`predict_values`
    returns the value of the aggregated reward, ``group_values @ value_weights``
    ``(batch, 1)``, which is what SB3's time-limit bootstrap adds to the
    aggregated reward.

    :param n_critics: K, one value head per group.
    """

    def __init__(self, *args: Any, n_critics: int = 1, **kwargs: Any) -> None:
        self.n_critics = n_critics  # read by _build, which the parent's __init__ calls
        super().__init__(*args, **kwargs)
        self.value_weights = th.full((n_critics,), 1.0 / n_critics)

    def _build(self, lr_schedule: Schedule) -> None:
        super()._build(lr_schedule)
        self.value_net = nn.Linear(self.mlp_extractor.latent_dim_vf, self.n_critics)
        if self.ortho_init:
            self.value_net.apply(lambda module: self.init_weights(module, gain=1.0))
        # The parent built the optimizer over the one-headed value net: rebuild it.
        self.optimizer = self.optimizer_class(self.parameters(), lr=lr_schedule(1), **self.optimizer_kwargs)

    def set_value_weights(self, weights: np.ndarray) -> None:
        """:param weights: ``(K,)`` this rollout's group weights, used by :meth:`predict_values`."""
        self.value_weights = th.as_tensor(np.asarray(weights), dtype=th.float32, device=self.device)

    def predict_group_values(self, obs: PyTorchObs) -> th.Tensor:
        """``(batch, K)`` every group's value of ``obs``."""
        return super().predict_values(obs)

    def predict_values(self, obs: PyTorchObs) -> th.Tensor:
        """``(batch, 1)`` the value of the aggregated reward under this rollout's weights."""
        return self.predict_group_values(obs) @ self.value_weights.to(self.device)[:, None]

    def _get_constructor_parameters(self) -> dict[str, Any]:
        return {**super()._get_constructor_parameters(), "n_critics": self.n_critics}


#: ``() -> (n_envs, K)`` the group rewards of the step just taken, in the units the critics learn.
StepGroupRewards = Callable[[], np.ndarray]
#: ``() -> (n_envs, K)`` every group's value of the observations after the rollout's last step.
LastGroupValues = Callable[[], th.Tensor]


class GroupRolloutBuffer(RolloutBuffer):
    """Rollout buffer with per-group rewards, values and returns ``(n_steps, n_envs, K)``.

    ``advantages`` stay ``(n_steps, n_envs)``: the groups' GAE advantages combined
    with this rollout's ``weights``. Samples flatten values and returns to
    ``batch * K``, in the same order as the policy's flattened ``(batch, K)``
    values, so SB3's PPO loss trains every head on its own group's return unchanged.

    Fed by SB3's rollout loop, which hands :meth:`add` the aggregated scalar
    reward: the K group rewards come from the source given to :meth:`bind`
    (:class:`~egalitarian_rl.algorithms.maxmin_ppo.MaxMinPPO` binds its own).

    :param n_groups: K.
    """

    def __init__(self, *args: Any, n_groups: int = 1, **kwargs: Any) -> None:
        self.n_groups = n_groups
        self.weights = np.full(n_groups, 1.0 / n_groups)
        self._step_group_rewards: StepGroupRewards | None = None
        self._last_group_values: LastGroupValues | None = None
        super().__init__(*args, **kwargs)

    def bind(self, step_group_rewards: StepGroupRewards, last_group_values: LastGroupValues) -> None:
        """Where the K group rewards of each step and the K bootstrap values come from."""
        self._step_group_rewards = step_group_rewards
        self._last_group_values = last_group_values

    def reset(self) -> None:
        super().reset()
        shape = (self.buffer_size, self.n_envs, self.n_groups)
        self.rewards = np.zeros(shape, dtype=np.float32)
        self.values = np.zeros(shape, dtype=np.float32)
        self.returns = np.zeros(shape, dtype=np.float32)

    def add(
        self,
        obs: np.ndarray,
        action: np.ndarray,
        reward: np.ndarray,
        episode_start: np.ndarray,
        value: th.Tensor,
        log_prob: th.Tensor,
    ) -> None:
        """:param reward: ``(n_envs, K)`` group rewards, or SB3's ``(n_envs,)`` aggregate when a source is bound
        (then the K group rewards come from the source). :param value: ``(n_envs, K)`` the heads' values."""
        group_rewards = np.asarray(reward)
        if group_rewards.shape != (self.n_envs, self.n_groups):
            if self._step_group_rewards is None:
                expected = (self.n_envs, self.n_groups)
                raise ValueError(f"reward has shape {group_rewards.shape}: expected (n_envs, K) = {expected} or a bound source")
            group_rewards = self._step_group_rewards()
        position = self.pos
        # The parent stores one value per env: hand it a single zero (it broadcasts) and store the K values here.
        super().add(obs, action, group_rewards, episode_start, th.zeros(1), log_prob)
        self.values[position] = value.detach().cpu().numpy().reshape(self.n_envs, self.n_groups)

    def compute_returns_and_advantage(self, last_values: th.Tensor, dones: np.ndarray) -> None:
        """GAE per group, then ``advantages = group_advantages @ weights``.

        :param last_values: ``(n_envs, K)`` values of the observations after the last step; SB3's
            ``(n_envs, 1)`` aggregate is replaced by the bound source's K values.
        :param dones: ``(n_envs,)`` whether the last step ended an episode.
        """
        if last_values.numel() != self.n_envs * self.n_groups:
            if self._last_group_values is None:
                raise ValueError(f"last_values has shape {tuple(last_values.shape)}: expected (n_envs, K) or a bound source")
            last_values = self._last_group_values()
        next_values = last_values.detach().cpu().numpy().reshape(self.n_envs, self.n_groups)
        next_non_terminal = 1.0 - dones.astype(np.float32)
        group_advantages = np.zeros_like(self.rewards)
        running = np.zeros((self.n_envs, self.n_groups), dtype=np.float32)
        for step in reversed(range(self.buffer_size)):
            if step < self.buffer_size - 1:
                next_non_terminal = 1.0 - self.episode_starts[step + 1]
                next_values = self.values[step + 1]
            alive = next_non_terminal[:, None]
            delta = self.rewards[step] + self.gamma * next_values * alive - self.values[step]
            running = delta + self.gamma * self.gae_lambda * alive * running
            group_advantages[step] = running
        self.returns = group_advantages + self.values
        self.advantages = (group_advantages @ np.asarray(self.weights)).astype(np.float32)
