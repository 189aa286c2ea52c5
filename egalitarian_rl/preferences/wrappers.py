"""Expose every group's true reward on any gymnasium env, without touching the agent's view."""

from __future__ import annotations

from typing import Any, SupportsFloat

import gymnasium as gym
import numpy as np

from egalitarian_rl.preferences.population import Population

GROUP_REWARDS_KEY = "group_rewards"


class MultiUserPreferenceWrapper(gym.Wrapper, gym.utils.RecordConstructorArgs):
    """Puts each group's true step reward into ``info["group_rewards"]``, shape ``(K,)``.

    Observations, actions and the env's own reward pass through unchanged; the
    group rewards are for simulated labelling and for evaluation only, never
    for the agent (it learns from *learned* rewards).

    :param env: any gymnasium env.
    :param population: the groups whose rewards to report.
    """

    def __init__(self, env: gym.Env, population: Population) -> None:
        # Recorded constructor arguments let gymnasium rebuild the wrapped env
        # from ``env.spec`` (``gym.make(env.spec)``, ``check_env``'s close check).
        gym.utils.RecordConstructorArgs.__init__(self, population=population)
        gym.Wrapper.__init__(self, env)
        self.population = population
        self._last_obs: Any = None

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
        obs, info = self.env.reset(seed=seed, options=options)
        self._last_obs = obs
        return obs, info

    def step(self, action: Any) -> tuple[Any, SupportsFloat, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        info[GROUP_REWARDS_KEY] = self.population.step_rewards(self._last_obs, np.asarray(action), obs, info)
        self._last_obs = obs
        return obs, reward, terminated, truncated, info
