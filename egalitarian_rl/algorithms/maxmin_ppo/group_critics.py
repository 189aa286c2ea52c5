"""One value head per group: a K-headed critic and the rollout buffer that feeds it.

With ``worst_group``, ``softmin`` or ``egd`` the reward PPO trains on changes
whenever the group weights change, so a single critic chases a moving target.
K critics each learn one group's (stationary) value; every group gets its own
GAE, and the rule's weights combine the K advantages into the one the policy
gradient uses. That combination is exact for linear rules (the rollout reward
is ``group_rewards @ weights``); ``per_sample_min`` is not linear and keeps a
single critic of its own.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch as th
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.type_aliases import Schedule
from torch import nn


class GroupCriticPolicy(ActorCriticPolicy):
    """SB3's actor-critic policy with ``n_critics`` value outputs: ``values`` are ``(batch, K)``.

    :param n_critics: K, one value head per group.
    """

    def __init__(self, *args: Any, n_critics: int = 1, **kwargs: Any) -> None:
        self.n_critics = n_critics  # read by _build, which the parent's __init__ calls
        super().__init__(*args, **kwargs)

    def _build(self, lr_schedule: Schedule) -> None:
        super()._build(lr_schedule)
        self.value_net = nn.Linear(self.mlp_extractor.latent_dim_vf, self.n_critics)
        if self.ortho_init:
            self.value_net.apply(lambda module: self.init_weights(module, gain=1.0))
        # The parent built the optimizer over the one-headed value net: rebuild it.
        self.optimizer = self.optimizer_class(self.parameters(), lr=lr_schedule(1), **self.optimizer_kwargs)

    def _get_constructor_parameters(self) -> dict[str, Any]:
        return {**super()._get_constructor_parameters(), "n_critics": self.n_critics}


class GroupRolloutBuffer(RolloutBuffer):
    """Rollout buffer with per-group rewards, values and returns ``(n_steps, n_envs, K)``.

    ``advantages`` stay ``(n_steps, n_envs)``: the weighted sum of the groups'
    GAE advantages. Samples flatten values and returns to ``batch * K``, in the
    same order as the policy's flattened ``(batch, K)`` values, so SB3's PPO loss
    trains every head on its own group's return unchanged.

    :param n_groups: K.
    """

    def __init__(self, *args: Any, n_groups: int = 1, **kwargs: Any) -> None:
        self.n_groups = n_groups
        super().__init__(*args, **kwargs)

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
        """:param reward: ``(n_envs, K)`` group rewards. :param value: ``(n_envs, K)`` the heads' values."""
        position = self.pos
        # The parent stores one value per env: hand it a single zero (it broadcasts)
        # and store the K values per env here.
        super().add(obs, action, reward, episode_start, th.zeros(1), log_prob)
        self.values[position] = value.detach().cpu().numpy().reshape(self.n_envs, self.n_groups)

    def compute_returns_and_advantage(self, last_values: th.Tensor, dones: np.ndarray, weights: np.ndarray | None = None) -> None:
        """GAE per group, then ``advantages = group_advantages @ weights``.

        :param last_values: ``(n_envs, K)`` values of the observations after the last step.
        :param dones: ``(n_envs,)`` whether the last step ended an episode.
        :param weights: ``(K,)`` this rollout's group weights (uniform if None).
        """
        weights = np.full(self.n_groups, 1.0 / self.n_groups) if weights is None else np.asarray(weights)
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
        self.advantages = (group_advantages @ weights).astype(np.float32)
