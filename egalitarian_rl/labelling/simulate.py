"""Simulated annotators answering the queries a :class:`~egalitarian_rl.labelling.queries.QueryRule` picks.

The web app asks real people one pair at a time; :class:`SimulatedCampaign` asks simulated users
(a :class:`~egalitarian_rl.preferences.Population`) a round of pairs each, through the same rule,
so active and random querying can be measured (``benchmarks/active_queries.py``) and the online
loop can run without people.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from egalitarian_rl.labelling.queries import DisagreementRule, QueryRule, segment_member_returns
from egalitarian_rl.preferences.dataset import PreferenceDataset
from egalitarian_rl.preferences.population import Population
from egalitarian_rl.preferences.segments import Transitions, concatenate_transitions


class SimulatedCampaign:
    """Users of ``population`` answering queries on candidate pairs of a segment pool.

    :param population: the simulated users' groups and answer noise.
    :param pool: segments, leading shape ``(S, L)``, with the ``info`` keys the groups read.
    :param pairs: ``(M, 2)`` candidate pairs (positions in ``pool``).
    :param n_users: number of users (ids ``0..n_users-1``, assigned to groups by share).
    :param rule: picks each user's next pairs.
    :param seed: seeds the picks and the answers.
    :param metadata: copied into the datasets (env id, segment length, ...).
    """

    def __init__(
        self,
        population: Population,
        pool: Transitions,
        pairs: np.ndarray,
        n_users: int,
        rule: QueryRule,
        seed: int = 0,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        self.population = population
        self.pool = pool
        self.pairs = np.asarray(pairs, dtype=np.int64)
        self.rule = rule
        self.rng = np.random.default_rng(seed)
        self.user_groups = population.make_users(n_users)
        self.metadata = dict(metadata or {})
        #: ``(U, M)`` which candidates each user has been asked (skips included).
        self.asked = np.zeros((n_users, len(self.pairs)), dtype=bool)
        self._user_ids: list[np.ndarray] = []
        self._candidates: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []

    @property
    def n_users(self) -> int:
        return len(self.user_groups)

    def ask(self, per_user: int) -> int:
        """Every user answers up to ``per_user`` new queries picked by the rule; returns how many were answered."""
        users, candidates = [], []
        for user in range(self.n_users):
            picked = self.rule.select(user, np.flatnonzero(~self.asked[user]), per_user, self.rng)
            self.asked[user, picked] = True
            users.append(np.full(len(picked), user))
            candidates.append(picked)
        user_ids, chosen = np.concatenate(users).astype(np.int64), np.concatenate(candidates).astype(np.int64)
        segments_a, segments_b = self.pool.index(self.pairs[chosen, 0]), self.pool.index(self.pairs[chosen, 1])
        labels, answered = self.population.label(segments_a, segments_b, self.user_groups[user_ids], self.rng)
        self._user_ids.append(user_ids[answered])
        self._candidates.append(chosen[answered])
        self._labels.append(labels[answered])
        return int(answered.sum())

    def __len__(self) -> int:
        return int(sum(len(labels) for labels in self._labels))

    def dataset(self) -> PreferenceDataset:
        """Every answer so far; ``segment_ids`` are pool positions (held-out splits avoid shared segments)."""
        candidates = np.concatenate(self._candidates) if self._candidates else np.zeros(0, dtype=np.int64)
        pairs = self.pairs[candidates]
        return PreferenceDataset(
            np.concatenate(self._user_ids) if self._user_ids else np.zeros(0, dtype=np.int64),
            self.pool.index(pairs[:, 0]),
            self.pool.index(pairs[:, 1]),
            np.concatenate(self._labels) if self._labels else np.zeros(0),
            np.arange(self.n_users),
            self.user_groups,
            self.population.group_names,
            self.metadata,
            segment_ids=pairs,
        )

    def extend(self, segments: Transitions, n_pairs: int) -> None:
        """Add segments to the pool and ``n_pairs`` candidate pairs that each show at least one of them.

        The online loop's new round: segments of the current policy, compared with each other
        and with earlier ones.

        :param segments: new segments, leading shape ``(S', L)``, same info keys as the pool.
        :param n_pairs: candidates to add (duplicates of existing candidates are dropped).
        """
        old = len(self.pool.acts)
        self.pool = concatenate_transitions([self.pool, segments])
        total = len(self.pool.acts)
        first = old + self.rng.integers(total - old, size=n_pairs)
        # Shift by 1..total-1: the partner is any other segment of the pool, old or new.
        second = (first + self.rng.integers(1, total, size=n_pairs)) % total
        new = np.sort(np.stack([first, second], axis=1), axis=1)
        existing = {tuple(pair) for pair in self.pairs.tolist()}
        new = np.unique(new, axis=0)
        new = new[[tuple(pair) not in existing for pair in new.tolist()]]
        self.pairs = np.concatenate([self.pairs, new.astype(np.int64)])
        self.asked = np.concatenate([self.asked, np.zeros((self.n_users, len(new)), dtype=bool)], axis=1)

    def refresh(self, mixture: object) -> None:
        """Tell an active rule about a newly fitted mixture (a random rule needs nothing)."""
        if isinstance(self.rule, DisagreementRule):
            returns = segment_member_returns(mixture, self.pool)
            self.rule.update(mixture, returns, self.pairs, self.dataset())
