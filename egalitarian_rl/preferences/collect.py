"""Ask simulated users to compare segments: the preference-collection loop."""

from __future__ import annotations

import gymnasium as gym
import numpy as np

from egalitarian_rl.preferences.dataset import PreferenceDataset
from egalitarian_rl.preferences.population import Population
from egalitarian_rl.preferences.segments import Behaviour, rollout_segments, sample_pairs


def collect_preferences(
    env: gym.Env,
    population: Population,
    n_users: int,
    comparisons_per_user: int,
    segment_length: int,
    behaviour: Behaviour = "random",
    n_segments: int | None = None,
    seed: int = 0,
    progress_bar: bool = False,
) -> PreferenceDataset:
    """Roll out ``behaviour``, cut segments, and have every user compare pairs.

    :param env: any gymnasium env; the population's ``info_keys`` must be in its ``info``.
    :param population: the groups; users are assigned to them by share.
    :param n_users: how many users (ids ``0..n_users-1``).
    :param comparisons_per_user: queries asked of each user (skipped ones are dropped).
    :param segment_length: steps per segment.
    :param behaviour: who generates the segments (see :func:`rollout_segments`).
    :param n_segments: size of the segment pool pairs are drawn from;
        defaults to the number of comparisons (each segment used about twice).
    :param seed: seeds rollouts, pairing and the users' answers.
    :return: the labelled comparisons, with every user's true group recorded.
    """
    if comparisons_per_user < 1:
        raise ValueError(f"comparisons_per_user must be >= 1, got {comparisons_per_user}")
    rng = np.random.default_rng(seed)
    user_groups = population.make_users(n_users)
    n_comparisons = n_users * comparisons_per_user
    pool = rollout_segments(
        env,
        n_segments or max(n_comparisons, 2),
        segment_length,
        behaviour,
        population.info_keys,
        seed=seed,
        progress_bar=progress_bar,
    )
    pairs = sample_pairs(len(pool.acts), n_comparisons, rng)
    user_ids = np.repeat(np.arange(n_users), comparisons_per_user)
    segments_a, segments_b = pool.index(pairs[:, 0]), pool.index(pairs[:, 1])
    labels, answered = population.label(segments_a, segments_b, user_groups[user_ids], rng)
    keep = np.flatnonzero(answered)
    spec = getattr(env, "spec", None)
    metadata = {
        "env_id": spec.id if spec is not None else None,
        "n_actions": int(env.action_space.n) if isinstance(env.action_space, gym.spaces.Discrete) else None,
        "segment_length": segment_length,
        "seed": seed,
    }
    return PreferenceDataset(
        user_ids[keep],
        segments_a.index(keep),
        segments_b.index(keep),
        labels[keep],
        np.arange(n_users),
        user_groups,
        population.group_names,
        metadata,
    )
