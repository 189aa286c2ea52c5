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
    n_folds: int | None = None,
) -> PreferenceDataset:
    """Roll out ``behaviour``, cut segments, and have every user compare pairs.

    The segment pool is cut into ``n_folds`` disjoint parts and the comparisons into as many
    folds; the pairs of fold ``f`` are drawn from part ``f`` only, so comparisons of different
    folds never share a segment. Each user's queries are dealt round-robin over the folds from
    a random fold on, so a user's answers spread evenly over them. The dataset records the
    ``segment_ids`` (pool index of both sides) and the ``folds``, and
    :meth:`~egalitarian_rl.preferences.PreferenceDataset.split_by_comparison` holds out whole
    folds: held-out comparisons show only segments the training part never saw.

    :param env: any gymnasium env; the population's ``info_keys`` must be in its ``info``.
    :param population: the groups; users are assigned to them by share.
    :param n_users: how many users (ids ``0..n_users-1``).
    :param comparisons_per_user: queries asked of each user (skipped ones are dropped).
    :param segment_length: steps per segment.
    :param behaviour: who generates the segments (see :func:`rollout_segments`).
    :param n_segments: size of the segment pool pairs are drawn from;
        defaults to the number of comparisons (each segment used about twice).
    :param seed: seeds rollouts, pairing and the users' answers.
    :param progress_bar: show a tqdm bar over the rollout.
    :param n_folds: segment-disjoint folds; default ``comparisons_per_user`` (each user answers
        exactly once per fold, so a split holding out ``f`` of the folds holds out ``f`` of
        every user's answers), capped so that every part of the pool has >= 2 segments.
    :return: the labelled comparisons, with every user's true group recorded.
    """
    if comparisons_per_user < 1:
        raise ValueError(f"comparisons_per_user must be >= 1, got {comparisons_per_user}")
    if n_folds is not None and n_folds < 1:
        raise ValueError(f"n_folds must be >= 1, got {n_folds}")
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
    n_pool = len(pool.acts)
    folds_wanted = comparisons_per_user if n_folds is None else n_folds
    n_folds = max(1, min(folds_wanted, n_pool // 2))
    user_ids = np.repeat(np.arange(n_users), comparisons_per_user)
    # Round-robin from a random offset per user: every user lands in each fold equally often.
    offsets = rng.integers(n_folds, size=n_users)
    folds = (np.tile(np.arange(comparisons_per_user), n_users) + offsets[user_ids]) % n_folds
    parts = np.array_split(rng.permutation(n_pool), n_folds)
    pairs = np.zeros((n_comparisons, 2), dtype=np.int64)
    for fold, part in enumerate(parts):
        rows = np.flatnonzero(folds == fold)
        pairs[rows] = part[sample_pairs(len(part), len(rows), rng)]
    segments_a, segments_b = pool.index(pairs[:, 0]), pool.index(pairs[:, 1])
    labels, answered = population.label(segments_a, segments_b, user_groups[user_ids], rng)
    keep = np.flatnonzero(answered)
    spec = getattr(env, "spec", None)
    metadata = {
        "env_id": spec.id if spec is not None else None,
        "n_actions": int(env.action_space.n) if isinstance(env.action_space, gym.spaces.Discrete) else None,
        "segment_length": segment_length,
        "seed": seed,
        "n_folds": n_folds,
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
        segment_ids=pairs[keep],
        folds=folds[keep],
    )
