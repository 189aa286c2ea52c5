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
        # Until a rollout has estimated the groups' returns, weigh them equally.
        self.weights = np.full(n_groups, 1.0 / n_groups)
        self.group_return_estimates: np.ndarray | None = None
        self._last_obs: np.ndarray | None = None
        self._actions: np.ndarray | None = None
        self._running_returns = np.zeros((self.num_envs, n_groups))
        self._finished_returns: list[np.ndarray] = []

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
        self._running_returns += group_rewards
        for index in np.flatnonzero(dones):
            self._finished_returns.append(self._running_returns[index].copy())
            self._running_returns[index] = 0.0
        for index, info in enumerate(infos):
            info["env_reward"] = env_rewards[index]
            info[LEARNED_GROUP_REWARDS_KEY] = group_rewards[index]
        self._last_obs = obs
        return obs, rewards.astype(np.float32), dones, infos

    def end_rollout(self) -> dict[str, Any]:
        """Estimate each group's return from the episodes finished since the last call,
        and let the aggregation rule choose the weights of the next rollout.

        :return: ``group_returns`` (K,) of the learned, normalised rewards (``None``
            until an episode has finished), ``weights`` (K,) and ``n_episodes``.
        """
        finished = np.array(self._finished_returns) if self._finished_returns else None
        self._finished_returns = []
        if finished is not None:
            self.group_return_estimates = finished.mean(axis=0)
            # A non-linear rule (per_sample_min) has no weights: it acts per sample in ``combine``.
            if self.aggregation.is_linear:
                self.weights = self.aggregation.weights(self.group_return_estimates)
        return {
            "group_returns": self.group_return_estimates,
            "weights": self.weights,
            "n_episodes": 0 if finished is None else len(finished),
        }
