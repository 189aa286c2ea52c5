"""Run a policy and score every episode by every user group's *true* return."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import gymnasium as gym
import numpy as np
from tqdm.auto import tqdm

from egalitarian_rl.preferences.wrappers import GROUP_REWARDS_KEY, MultiUserPreferenceWrapper

if TYPE_CHECKING:
    from stable_baselines3.common.vec_env import VecEnv


class Predictor(Protocol):
    """Anything with a stable-baselines3-style ``predict``: SB3 models, scripted policies, ...

    ``predict`` gets one observation from a gymnasium env, or a batch
    ``(n_envs, ...)`` from a VecEnv, and returns ``(action(s), state)``; the
    state is ignored (recurrent policies are not supported).
    """

    def predict(self, observation: Any, *, deterministic: bool = ...) -> tuple[Any, Any]: ...


def find_preference_wrapper(env: gym.Env) -> MultiUserPreferenceWrapper | None:
    """The :class:`MultiUserPreferenceWrapper` that ``env`` is or contains, else ``None``."""
    current: Any = env
    while current is not None:
        if isinstance(current, MultiUserPreferenceWrapper):
            return current
        current = getattr(current, "env", None) if isinstance(current, gym.Wrapper) else None
    return None


def _is_vec_env(env: Any) -> bool:
    from stable_baselines3.common.vec_env import VecEnv

    return isinstance(env, VecEnv)


def _step_group_rewards(info: dict[str, Any], n_groups: int | None) -> np.ndarray:
    if GROUP_REWARDS_KEY not in info:
        raise ValueError(
            f"info has no {GROUP_REWARDS_KEY!r}: the env must be wrapped in MultiUserPreferenceWrapper "
            "(and no outer wrapper may drop the info entries)"
        )
    rewards = np.asarray(info[GROUP_REWARDS_KEY], dtype=np.float64)
    if rewards.ndim != 1 or rewards.size == 0 or (n_groups is not None and rewards.shape != (n_groups,)):
        expected = "(K,)" if n_groups is None else f"({n_groups},)"
        raise ValueError(f"info[{GROUP_REWARDS_KEY!r}] has shape {rewards.shape}, expected {expected}")
    return rewards


def evaluate_group_returns(
    policy: Predictor,
    env: gym.Env | VecEnv,
    n_episodes: int,
    seed: int | None = 0,
    deterministic: bool = True,
    progress_bar: bool = False,
) -> np.ndarray:
    """Every group's true return of ``n_episodes`` episodes of ``policy`` in ``env``.

    The return of group ``k`` in an episode is the sum of
    ``info["group_rewards"][k]`` over its steps, as reported by a
    :class:`~egalitarian_rl.preferences.MultiUserPreferenceWrapper`; the env's
    own reward is ignored. Episodes end at ``terminated or truncated``, so the
    env needs a time limit (``gym.make`` adds the registered one).

    :param policy: anything with ``predict(obs, deterministic=...) -> (action, state)``.
    :param env: a gymnasium env that is or contains a ``MultiUserPreferenceWrapper``;
        or a stable-baselines3 ``VecEnv`` whose every sub-env contains one.
    :param n_episodes: how many episodes to run, >= 1.
    :param seed: gymnasium env: episode ``i`` is reset with ``seed + i``.
        VecEnv: sub-env ``j`` is seeded with ``seed + j`` before the first reset
        (SB3's ``VecEnv.seed``); later episodes follow from the automatic
        resets, so the episodes differ from the single-env ones. ``None``: unseeded.
    :param deterministic: passed to ``policy.predict``.
    :param progress_bar: show a tqdm bar over episodes.
    :return: ``(n_episodes, K)`` float64 true group returns, one row per episode
        (VecEnv: in order of completion; as SB3's ``evaluate_policy``, each
        sub-env contributes a fixed quota of episodes so short episodes are not
        over-represented).
    :raises ValueError: ``n_episodes < 1``, or the env reports no group rewards.
    """
    if isinstance(n_episodes, bool) or not isinstance(n_episodes, (int, np.integer)) or n_episodes < 1:
        raise ValueError(f"n_episodes must be an int >= 1, got {n_episodes!r}")
    n_episodes = int(n_episodes)
    with tqdm(total=n_episodes, desc="evaluate", unit="ep", disable=not progress_bar) as bar:
        if _is_vec_env(env):
            return _evaluate_vec_env(policy, env, n_episodes, seed, deterministic, bar)  # type: ignore[arg-type]
        return _evaluate_env(policy, env, n_episodes, seed, deterministic, bar)  # type: ignore[arg-type]


def _evaluate_env(policy: Predictor, env: gym.Env, n_episodes: int, seed: int | None, deterministic: bool, bar: tqdm) -> np.ndarray:
    wrapper = find_preference_wrapper(env)
    if wrapper is None:
        raise ValueError(f"env {env} is not and does not contain a MultiUserPreferenceWrapper: it reports no group rewards")
    n_groups = wrapper.population.n_groups
    returns = np.zeros((n_episodes, n_groups), dtype=np.float64)
    for episode in range(n_episodes):
        obs, _ = env.reset(seed=None if seed is None else seed + episode)
        done = False
        while not done:
            action, _ = policy.predict(obs, deterministic=deterministic)
            obs, _, terminated, truncated, info = env.step(action)
            returns[episode] += _step_group_rewards(info, n_groups)
            done = bool(terminated or truncated)
        bar.update(1)
    return returns


def _evaluate_vec_env(policy: Predictor, env: VecEnv, n_episodes: int, seed: int | None, deterministic: bool, bar: tqdm) -> np.ndarray:
    n_envs = env.num_envs
    wrapped = env.env_is_wrapped(MultiUserPreferenceWrapper)
    if not all(wrapped):
        missing = [i for i, ok in enumerate(wrapped) if not ok]
        raise ValueError(f"VecEnv sub-envs {missing} do not contain a MultiUserPreferenceWrapper: they report no group rewards")
    # Each sub-env runs a fixed quota of episodes (as SB3's evaluate_policy does).
    targets = np.array([(n_episodes + i) // n_envs for i in range(n_envs)], dtype=np.int64)
    counts = np.zeros(n_envs, dtype=np.int64)
    if seed is not None:
        env.seed(seed)
    obs = env.reset()
    n_groups: int | None = None
    current: np.ndarray | None = None
    finished: list[np.ndarray] = []
    while (counts < targets).any():
        actions, _ = policy.predict(obs, deterministic=deterministic)
        obs, _, dones, infos = env.step(actions)
        for i in range(n_envs):
            step = _step_group_rewards(infos[i], n_groups)
            if current is None:
                n_groups = step.shape[0]
                current = np.zeros((n_envs, n_groups), dtype=np.float64)
            if counts[i] < targets[i]:
                current[i] += step
                if dones[i]:
                    finished.append(current[i].copy())
                    counts[i] += 1
                    bar.update(1)
            if dones[i]:
                current[i] = 0.0
    return np.stack(finished)


__all__ = ["Predictor", "evaluate_group_returns", "find_preference_wrapper"]
