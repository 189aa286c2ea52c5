"""Relabel a VecEnv's transitions with K group rewards, aggregated into the one reward PPO sees.

The relabelling happens inside ``step_wait``, so SB3's ``collect_rollouts``
stores the aggregated reward in the rollout buffer *before* it computes GAE,
adds its time-limit bootstrap in the same units, and passes it to callbacks
as ``locals["rewards"]``. The env's own reward stays in ``info["env_reward"]``
(as imitation's ``RewardVecEnvWrapper`` keeps it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import gymnasium as gym
import numpy as np
from stable_baselines3.common.vec_env import VecEnv, VecEnvWrapper
from stable_baselines3.common.vec_env.base_vec_env import VecEnvStepReturn

from egalitarian_rl.algorithms.aggregation import Aggregation, GroupRewardNormalizer
from egalitarian_rl.preferences.wrappers import GROUP_REWARDS_KEY

#: ``(obs, actions, next_obs, infos) -> (n_envs, K)`` group rewards of one vectorised step.
GroupRewardSource = Callable[[np.ndarray, np.ndarray, np.ndarray, Sequence[dict[str, Any]]], np.ndarray]

LEARNED_GROUP_REWARDS_KEY = "learned_group_rewards"


def learned_rewards(reward_mixture: Any) -> GroupRewardSource:
    """Group rewards from a learned :class:`~egalitarian_rl.rewards.RewardMixture` (the RLHF case)."""

    def source(obs: np.ndarray, actions: np.ndarray, next_obs: np.ndarray, infos: Sequence[dict[str, Any]]) -> np.ndarray:
        return reward_mixture.predict_rewards(obs, actions, next_obs)

    return source


def true_rewards(group_indices: Sequence[int] | None = None) -> GroupRewardSource:
    """The true group rewards that a :class:`MultiUserPreferenceWrapper` put in ``info``.

    Only for reference policies ("what if we knew the group's reward"); RLHF
    methods must train on learned rewards.
    """

    def source(obs: np.ndarray, actions: np.ndarray, next_obs: np.ndarray, infos: Sequence[dict[str, Any]]) -> np.ndarray:
        try:
            rewards = np.stack([info[GROUP_REWARDS_KEY] for info in infos])
        except KeyError:
            raise KeyError("true_rewards needs envs wrapped in MultiUserPreferenceWrapper (no info['group_rewards'])") from None
        return rewards if group_indices is None else rewards[:, list(group_indices)]

    return source


def check_reward_spaces(reward_mixture: Any, observation_space: gym.Space, action_space: gym.Space) -> None:
    """Raise a ValueError naming both shapes if ``reward_mixture`` was fitted on other spaces than the env's.

    A reward model fitted on another env's data (CartPole preferences for
    Pendulum) would otherwise fail deep inside a matrix product.
    """
    pairs = [("observation", reward_mixture.observation_space, observation_space)]
    if getattr(reward_mixture, "use_action", True):
        pairs.append(("action", reward_mixture.action_space, action_space))
    for what, fitted, env_space in pairs:
        # Spaces rebuilt from a dataset are Box or Discrete; compare like with like (shape or size).
        same_kind = type(fitted) is type(env_space)
        if same_kind and gym.spaces.flatdim(fitted) != gym.spaces.flatdim(env_space):
            raise ValueError(
                f"the reward model was fitted on {what}s {_describe(fitted)} but the env's {what} space is {_describe(env_space)}: "
                "was it fitted on preferences from another env?"
            )


def _describe(space: gym.Space) -> str:
    if isinstance(space, gym.spaces.Discrete):
        return f"Discrete({int(space.n)})"
    return f"{type(space).__name__} of shape {space.shape}"


class GroupRewardVecEnv(VecEnvWrapper):
    """Replaces the reward with ``aggregation`` over K (normalised) group rewards.

    :param venv: the vectorised env.
    :param group_rewards: where the ``(n_envs, K)`` group rewards of a step come from
        (:func:`learned_rewards` or :func:`true_rewards`).
    :param aggregation: the rule turning K rewards into one.
    :param normalizer: puts the K groups on one scale before the rule
        (running statistics, updated while ``training`` is True); ``None`` leaves them raw.
    :param group_names: names for logs, defaults to ``group_0..group_{K-1}``.
    """

    def __init__(
        self,
        venv: VecEnv,
        group_rewards: GroupRewardSource,
        aggregation: Aggregation,
        n_groups: int,
        normalizer: GroupRewardNormalizer | None = None,
        group_names: Sequence[str] | None = None,
    ) -> None:
        super().__init__(venv)
        self.group_rewards = group_rewards
        self.aggregation = aggregation
        self.n_groups = n_groups
        self.normalizer = normalizer
        self.group_names = tuple(group_names) if group_names is not None else tuple(f"group_{k}" for k in range(n_groups))
        if len(self.group_names) != n_groups:
            raise ValueError(f"{len(self.group_names)} group names for {n_groups} groups")
        self.training = True
        # Until a rollout has estimated the groups' returns: equal weights, or the rule's fixed ones.
        self.weights = aggregation.initial_weights(n_groups) if aggregation.is_linear else np.full(n_groups, 1.0 / n_groups)
        self.group_return_estimates: np.ndarray | None = None
        #: The last step's ``(n_envs, K)`` normalised group rewards, dones and infos (read by a per-group critic's buffer).
        self.last_group_rewards = np.zeros((self.num_envs, n_groups))
        self.last_dones = np.zeros(self.num_envs, dtype=bool)
        self.last_infos: list[dict[str, Any]] = [{} for _ in range(self.num_envs)]
        self._last_obs: np.ndarray | None = None
        self._actions: np.ndarray | None = None
        self._running_returns = np.zeros((self.num_envs, n_groups))
        # Sums, not lists: under plain PPO nobody calls end_rollout, and memory must stay bounded.
        self._finished_sum = np.zeros(n_groups)
        self._finished_count = 0
        # How often each group was the per-step minimum since the last end_rollout (what per_sample_min trains on).
        self._minimum_counts = np.zeros(n_groups, dtype=np.int64)

    def reset(self) -> np.ndarray:
        obs = self.venv.reset()
        self._last_obs = obs
        self._running_returns[:] = 0.0
        return obs

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = actions
        self.venv.step_async(actions)

    def step_wait(self) -> VecEnvStepReturn:
        obs, env_rewards, dones, infos = self.venv.step_wait()
        # After an auto-reset ``obs`` is the new episode's start; the transition
        # ended in the terminal observation that SB3 keeps in ``info``.
        next_obs = np.array(obs, copy=True)
        for index in np.flatnonzero(dones):
            next_obs[index] = infos[index]["terminal_observation"]
        group_rewards = np.asarray(self.group_rewards(self._last_obs, self._actions, next_obs, infos), dtype=np.float64)
        if group_rewards.shape != (self.num_envs, self.n_groups):
            raise ValueError(f"group rewards have shape {group_rewards.shape}, expected {(self.num_envs, self.n_groups)}")
        if self.normalizer is not None:
            if self.training:
                self.normalizer.update(group_rewards)
            group_rewards = self.normalizer.normalize(group_rewards)
        rewards = self.aggregation.combine(group_rewards, self.weights)
        self._minimum_counts += np.bincount(group_rewards.argmin(axis=1), minlength=self.n_groups)
        self._running_returns += group_rewards
        for index in np.flatnonzero(dones):
            self._finished_sum += self._running_returns[index]
            self._finished_count += 1
            self._running_returns[index] = 0.0
        for index, info in enumerate(infos):
            info["env_reward"] = env_rewards[index]
            info[LEARNED_GROUP_REWARDS_KEY] = group_rewards[index]
        self._last_obs = obs
        self.last_group_rewards, self.last_dones, self.last_infos = group_rewards, np.asarray(dones, dtype=bool), list(infos)
        return obs, rewards.astype(np.float32), dones, infos

    def end_rollout(self) -> dict[str, Any]:
        """Estimate each group's return from the episodes finished since the last call,
        and let the aggregation rule choose the weights of the next rollout.

        :return: ``group_returns`` (K,) of the learned, normalised rewards (``None``
            until an episode has finished), ``weights`` (K,) the next rollout's weights
            (``None`` for a non-linear rule such as ``per_sample_min``, which has none),
            ``minimum_shares`` (K,) the fraction of this rollout's steps at which each
            group had the lowest reward (what ``per_sample_min`` trains on), and ``n_episodes``.
        """
        n_episodes = self._finished_count
        if n_episodes:
            self.group_return_estimates = self._finished_sum / n_episodes
            # A non-linear rule (per_sample_min) has no weights: it acts per sample in ``combine``.
            if self.aggregation.is_linear:
                self.weights = self.aggregation.weights(self.group_return_estimates)
        steps = max(int(self._minimum_counts.sum()), 1)
        stats = {
            "group_returns": self.group_return_estimates,
            "weights": self.weights if self.aggregation.is_linear else None,
            "minimum_shares": self._minimum_counts / steps,
            "n_episodes": n_episodes,
        }
        self._finished_sum[:] = 0.0
        self._finished_count = 0
        self._minimum_counts[:] = 0
        return stats
