"""Trajectory segments: the pieces of behaviour that users compare.

A :class:`Transitions` holds step data with *any* leading batch shape: one
step (no batch axis), a batch of steps ``(n,)`` or a batch of segments
``(n_segments, segment_length)``. Group reward functions are written once
against it and broadcast over whatever leading shape they are given.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import gymnasium as gym
import numpy as np
from tqdm.auto import tqdm


class Transitions(NamedTuple):
    """Step data sharing one leading batch shape ``(...)``.

    :param obs: observations before the step, ``(..., *obs_shape)``.
    :param acts: actions taken, ``(..., *act_shape)`` (``(...)`` for discrete actions).
    :param next_obs: observations after the step, ``(..., *obs_shape)``.
    :param infos: named step features read from the env's ``info`` (for example
        ``x_velocity``), each ``(..., *feature_shape)``. For a single step this can
        be the ``info`` dict itself.
    """

    obs: np.ndarray
    acts: np.ndarray
    next_obs: np.ndarray
    infos: Mapping[str, Any]

    def flatten_steps(self) -> Transitions:
        """Segments ``(n, L, ...)`` as a batch of ``n * L`` single steps."""
        return Transitions(
            self.obs.reshape(-1, *self.obs.shape[2:]),
            self.acts.reshape(-1, *self.acts.shape[2:]),
            self.next_obs.reshape(-1, *self.next_obs.shape[2:]),
            {key: np.asarray(value).reshape(-1, *np.shape(value)[2:]) for key, value in self.infos.items()},
        )

    def index(self, idx: Any) -> Transitions:
        """Select along the first axis (numpy indexing) in every field."""
        return Transitions(
            self.obs[idx],
            self.acts[idx],
            self.next_obs[idx],
            {key: value[idx] for key, value in self.infos.items()},
        )


def concatenate_transitions(parts: Sequence[Transitions]) -> Transitions:
    """Concatenate along the first axis; all parts must have the same info keys."""
    keys = set(parts[0].infos)
    for part in parts[1:]:
        if set(part.infos) != keys:
            raise ValueError(f"cannot concatenate transitions with info keys {sorted(keys)} and {sorted(part.infos)}")
    return Transitions(
        np.concatenate([p.obs for p in parts]),
        np.concatenate([p.acts for p in parts]),
        np.concatenate([p.next_obs for p in parts]),
        {key: np.concatenate([p.infos[key] for p in parts]) for key in sorted(keys)},
    )


#: What can generate behaviour: ``"random"``, an SB3-style model with
#: ``predict(obs, deterministic=False)``, or a callable ``obs -> action``.
Behaviour = str | Callable[[np.ndarray], Any] | Any


def _make_policy(behaviour: Behaviour, env: gym.Env) -> Callable[[np.ndarray], Any]:
    if isinstance(behaviour, str):
        if behaviour != "random":
            raise ValueError(f"unknown behaviour {behaviour!r}: use 'random', a model with .predict, or a callable")
        return lambda _obs: env.action_space.sample()
    if hasattr(behaviour, "predict"):
        return lambda obs: behaviour.predict(obs, deterministic=False)[0]
    if callable(behaviour):
        return behaviour
    raise TypeError(f"behaviour must be 'random', a model with .predict or a callable, got {type(behaviour).__name__}")


#: Give up when this many episodes in a row were too short to hold one segment.
MAX_SHORT_EPISODES = 1000


def rollout_segments(
    env: gym.Env,
    n_segments: int,
    segment_length: int,
    behaviour: Behaviour = "random",
    info_keys: Sequence[str] = (),
    seed: int | None = None,
    progress_bar: bool = False,
) -> Transitions:
    """Roll out ``behaviour`` in ``env`` and cut episodes into segments.

    Segments are consecutive, non-overlapping windows of ``segment_length``
    steps inside one episode, so no segment straddles a reset. They are cut
    backwards from the episode's end: an episode's last steps (where it
    terminates: the pole falls, the text ends) are always in a segment, and a
    remainder shorter than a segment is dropped at the episode's start.

    :param env: any gymnasium env (wrapped or not).
    :param n_segments: how many segments to return.
    :param segment_length: steps per segment, ``L``.
    :param behaviour: who acts: ``"random"``, an SB3 model or a callable ``obs -> action``.
    :param info_keys: ``info`` entries to record with every step (what group rewards read).
    :param seed: seeds the env's first reset and its action space.
    :return: transitions with leading shape ``(n_segments, segment_length)``.
    :raises ValueError: if :data:`MAX_SHORT_EPISODES` episodes in a row end before ``segment_length`` steps.
    """
    if n_segments < 1 or segment_length < 1:
        raise ValueError(f"n_segments and segment_length must be >= 1, got {n_segments} and {segment_length}")
    policy = _make_policy(behaviour, env)
    env.action_space.seed(seed)
    obs, _ = env.reset(seed=seed)
    segments: list[Transitions] = []
    short_in_a_row, longest = 0, 0
    with tqdm(total=n_segments, desc="segments", unit="seg", disable=not progress_bar) as bar:
        while len(segments) < n_segments:
            # An env without a time limit: stop once the episode holds every segment still needed.
            episode = _run_episode(env, policy, obs, info_keys, max_steps=(n_segments - len(segments)) * segment_length)
            length = len(episode.acts)
            longest = max(longest, length)
            short_in_a_row = short_in_a_row + 1 if length < segment_length else 0
            if short_in_a_row >= MAX_SHORT_EPISODES:
                raise ValueError(
                    f"{MAX_SHORT_EPISODES} episodes in a row ended before segment_length={segment_length} steps "
                    f"(the longest lasted {longest}): choose segment_length <= {longest}"
                )
            ends = range(length, segment_length - 1, -segment_length)[: n_segments - len(segments)]
            for end in reversed(ends):  # in time order
                segments.append(episode.index(slice(end - segment_length, end)))
                bar.update(1)
            obs, _ = env.reset()
    return Transitions(
        np.stack([s.obs for s in segments]),
        np.stack([s.acts for s in segments]),
        np.stack([s.next_obs for s in segments]),
        {key: np.stack([s.infos[key] for s in segments]) for key in info_keys},
    )


def _run_episode(env: gym.Env, policy: Callable[[np.ndarray], Any], obs: Any, info_keys: Sequence[str], max_steps: int) -> Transitions:
    """One episode from ``obs`` to ``terminated or truncated`` (or ``max_steps``), leading shape ``(T,)``."""
    obs_buf, act_buf, next_buf = [], [], []
    info_buf: dict[str, list[Any]] = {key: [] for key in info_keys}
    done = False
    while not done:
        action = policy(obs)
        next_obs, _, terminated, truncated, info = env.step(action)
        obs_buf.append(obs)
        act_buf.append(action)
        next_buf.append(next_obs)
        for key in info_keys:
            if key not in info:
                raise KeyError(f"info has no key {key!r} needed by the group rewards; it has {sorted(info)}")
            info_buf[key].append(info[key])
        obs = next_obs
        done = terminated or truncated or len(act_buf) >= max_steps
    return Transitions(
        np.asarray(obs_buf), np.asarray(act_buf), np.asarray(next_buf), {key: np.asarray(values) for key, values in info_buf.items()}
    )


def sample_pairs(n_segments: int, n_pairs: int, rng: np.random.Generator) -> np.ndarray:
    """Draw ``n_pairs`` pairs of distinct segment indices, shape ``(n_pairs, 2)``."""
    if n_segments < 2:
        raise ValueError(f"need at least 2 segments to form pairs, got {n_segments}")
    first = rng.integers(n_segments, size=n_pairs)
    # Shift by 1..n-1 so the second index is uniform over the others, never equal.
    second = (first + rng.integers(1, n_segments, size=n_pairs)) % n_segments
    return np.stack([first, second], axis=1)
