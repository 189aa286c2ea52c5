"""The people: groups of users with different true reward functions.

A :class:`UserGroup` is a named reward function over transitions, the share
of users who belong to it, and how those users answer comparisons: a
Bradley-Terry rationality ``beta`` and B-Pref-style teacher noise (Lee et al.,
2021), all off by default. A :class:`Population` is a list of groups; a user is
``(user_id, group)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from egalitarian_rl.preferences.segments import Transitions

#: A true group reward: transitions with any leading shape ``(...)`` in, rewards ``(...)`` out.
RewardFn = Callable[[Transitions], np.ndarray]


def check_finite_rewards(rewards: np.ndarray, group_name: str) -> None:
    """Refuse NaN or infinite true rewards, naming the group.

    A NaN return makes every comparison silently "b preferred" and every
    evaluation column NaN: better to stop where it first appears.
    """
    rewards = np.asarray(rewards)
    if not np.isfinite(rewards).all():
        bad = int((~np.isfinite(rewards)).sum())
        raise ValueError(f"group {group_name!r}: its reward function returned {bad} NaN or infinite value(s) of {rewards.size}")


@dataclass(frozen=True)
class UserGroup:
    """One group of users who share a reward function and a way of answering.

    :param name: the group's name (used in logs, metrics and plots).
    :param reward_fn: true step reward, vectorised over any leading shape.
    :param share: fraction of the population's users in this group, in (0, 1].
    :param beta: Bradley-Terry rationality: ``P(a > b) = sigmoid(beta * (R_a - R_b))``.
        ``math.inf`` (default) answers deterministically; ``0`` answers at random.
    :param mistake_rate: probability of flipping a strict answer (B-Pref "mistake").
    :param skip_threshold: skip a query when both segments' returns are below it
        (B-Pref "skip"); ``None`` never skips.
    :param equal_threshold: answer "equal" (label 0.5) when the returns differ by
        at most this much (B-Pref "equal"). Exact ties are always "equal".
    :param myopic_discount: weight ``gamma ** (L - 1 - t)`` on step ``t`` of a
        segment of length ``L``, so later steps count more (B-Pref "myopic").
    """

    name: str
    reward_fn: RewardFn
    share: float
    beta: float = math.inf
    mistake_rate: float = 0.0
    skip_threshold: float | None = None
    equal_threshold: float = 0.0
    myopic_discount: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 < self.share <= 1.0:
            raise ValueError(f"group {self.name!r}: share must be in (0, 1], got {self.share}")
        if not self.beta >= 0.0:
            raise ValueError(f"group {self.name!r}: beta must be >= 0, got {self.beta}")
        if not 0.0 <= self.mistake_rate <= 1.0:
            raise ValueError(f"group {self.name!r}: mistake_rate must be in [0, 1], got {self.mistake_rate}")
        if not self.equal_threshold >= 0.0:
            raise ValueError(f"group {self.name!r}: equal_threshold must be >= 0, got {self.equal_threshold}")
        if not 0.0 < self.myopic_discount <= 1.0:
            raise ValueError(f"group {self.name!r}: myopic_discount must be in (0, 1], got {self.myopic_discount}")

    def segment_returns(self, segments: Transitions) -> np.ndarray:
        """Return of each segment as this group's users perceive it, ``(n,)``.

        :param segments: transitions with leading shape ``(n, L)``.
        """
        leading = np.shape(segments.obs)[:2]
        try:
            rewards = np.asarray(self.reward_fn(segments), dtype=np.float64)
        except (TypeError, ValueError, IndexError) as error:
            raise ValueError(
                f"group {self.name!r}: its reward function failed on segments of leading shape {leading} ({error}); "
                "a group reward must accept Transitions with any leading shape: (...) in, (...) out"
            ) from error
        if rewards.shape != leading:
            raise ValueError(
                f"group {self.name!r}: its reward function returned shape {rewards.shape} for segments of leading shape "
                f"{leading}; a group reward must accept Transitions with any leading shape: (...) in, (...) out"
            )
        check_finite_rewards(rewards, self.name)
        length = rewards.shape[-1]
        weights = self.myopic_discount ** np.arange(length - 1, -1, -1, dtype=np.float64)
        return rewards @ weights

    def answer(self, returns_a: np.ndarray, returns_b: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Answer comparisons given both segments' returns, each ``(n,)``.

        :return: ``labels`` ``(n,)`` with 1 = ``a`` preferred, 0 = ``b`` preferred,
            0.5 = equal; and ``answered`` ``(n,)``, False where the query was skipped.
        """
        diff = returns_a - returns_b
        with np.errstate(over="ignore", invalid="ignore"):
            if math.isinf(self.beta):
                prob_a = (diff > 0).astype(np.float64)
            else:
                prob_a = 1.0 / (1.0 + np.exp(-self.beta * diff))
        labels = (rng.random(diff.shape) < prob_a).astype(np.float64)
        flip = rng.random(diff.shape) < self.mistake_rate
        labels = np.where(flip, 1.0 - labels, labels)
        labels = np.where(np.abs(diff) <= self.equal_threshold, 0.5, labels)
        answered = np.ones(diff.shape, dtype=bool)
        if self.skip_threshold is not None:
            answered = np.maximum(returns_a, returns_b) >= self.skip_threshold
        return labels, answered


class Population:
    """Groups of simulated users with different true rewards.

    :param groups: the groups; their shares must sum to 1.
    :param info_keys: ``info`` entries the groups' reward functions read
        (recorded with every step of a segment).
    """

    def __init__(self, groups: Sequence[UserGroup], info_keys: Sequence[str] = ()) -> None:
        if len(groups) == 0:
            raise ValueError("a population needs at least one group")
        names = [g.name for g in groups]
        if len(set(names)) != len(names):
            raise ValueError(f"group names must be unique, got {names}")
        total = sum(g.share for g in groups)
        if not math.isclose(total, 1.0, abs_tol=1e-6):
            raise ValueError(f"group shares must sum to 1, got {total:.6g} from {[g.share for g in groups]}")
        self.groups = tuple(groups)
        self.info_keys = tuple(info_keys)
        self._reward_fns = tuple(g.reward_fn for g in groups)

    @property
    def group_names(self) -> tuple[str, ...]:
        return tuple(g.name for g in self.groups)

    @property
    def n_groups(self) -> int:
        return len(self.groups)

    @property
    def shares(self) -> np.ndarray:
        return np.array([g.share for g in self.groups])

    def group_rewards(self, transitions: Transitions) -> np.ndarray:
        """Every group's true reward, ``(..., K)`` for transitions of leading shape ``(...)``."""
        rewards = np.stack([np.asarray(fn(transitions), dtype=np.float64) for fn in self._reward_fns], axis=-1)
        if not np.isfinite(rewards).all():
            for group, column in zip(self.groups, np.moveaxis(rewards, -1, 0)):
                check_finite_rewards(column, group.name)
        return rewards

    def step_rewards(self, obs: np.ndarray, action: np.ndarray, next_obs: np.ndarray, info: dict) -> np.ndarray:
        """Every group's true reward for one env step, ``(K,)``. The wrapper's hot path."""
        step = Transitions(obs, action, next_obs, info)
        rewards = np.array([fn(step) for fn in self._reward_fns], dtype=np.float64)
        if not np.isfinite(rewards).all():
            for group, reward in zip(self.groups, rewards):
                check_finite_rewards(reward, group.name)
        return rewards

    def make_users(self, n_users: int) -> np.ndarray:
        """Assign ``n_users`` users to groups by share (largest remainder).

        :return: ``user_groups`` ``(n_users,)``: the group index of user ``i``.
        """
        if n_users < self.n_groups:
            raise ValueError(f"{n_users} users cannot cover {self.n_groups} groups")
        exact = self.shares * n_users
        counts = np.floor(exact).astype(int)
        remainder_order = np.argsort(-(exact - counts), kind="stable")
        counts[remainder_order[: n_users - counts.sum()]] += 1
        empty = [g.name for g, c in zip(self.groups, counts) if c == 0]
        if empty:
            raise ValueError(f"groups {empty} get no users out of {n_users}; raise n_users or their share")
        return np.repeat(np.arange(self.n_groups), counts)

    def label(
        self,
        segments_a: Transitions,
        segments_b: Transitions,
        comparison_groups: np.ndarray,
        rng: np.random.Generator,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Have users of ``comparison_groups`` ``(n,)`` compare segment pairs.

        :return: ``labels`` ``(n,)`` (1 = a preferred, 0 = b, 0.5 = equal) and
            ``answered`` ``(n,)`` (False where the user skipped).
        """
        labels = np.zeros(len(comparison_groups))
        answered = np.ones(len(comparison_groups), dtype=bool)
        for index, group in enumerate(self.groups):
            rows = np.flatnonzero(comparison_groups == index)
            if rows.size == 0:
                continue
            returns_a = group.segment_returns(segments_a.index(rows))
            returns_b = group.segment_returns(segments_b.index(rows))
            labels[rows], answered[rows] = group.answer(returns_a, returns_b, rng)
        return labels, answered

    def __repr__(self) -> str:
        parts = ", ".join(f"{g.name}={g.share:g}" for g in self.groups)
        return f"Population({parts})"


@dataclass(frozen=True)
class GroupRewardLibrary:
    """The named true reward functions an env offers, to build populations from.

    :param rewards: group name -> reward function.
    :param info_keys: ``info`` entries these functions read.
    """

    rewards: dict[str, RewardFn]
    info_keys: tuple[str, ...] = ()

    def population(self, shares: dict[str, float], **answering: float | None) -> Population:
        """A population of the named groups with the given shares.

        :param shares: group name -> share of users, for example ``{"fast": 0.8, "calm": 0.2}``.
        :param answering: :class:`UserGroup` answer settings applied to every group
            (``beta``, ``mistake_rate``, ``skip_threshold``, ``equal_threshold``, ``myopic_discount``).
        """
        unknown = sorted(set(shares) - set(self.rewards))
        if unknown:
            raise ValueError(f"unknown group {unknown}; this env offers {sorted(self.rewards)}")
        groups = [UserGroup(name, self.rewards[name], share, **answering) for name, share in shares.items()]
        return Population(groups, self.info_keys)
