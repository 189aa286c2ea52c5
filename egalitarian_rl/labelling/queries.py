"""Which pair to show a user next: at random, or where the mixture's members disagree most.

A comparison tells EM most about a user's group when the members of the reward mixture
predict different answers for it: under member ``k`` the user prefers ``a`` with probability
``p_k = P_k(a > b)``. The disagreement rule scores a candidate pair for user ``u`` by the
variance of ``p_k`` over members, weighted by the user's current posterior ``w_u`` (the fitted
shares for a user EM has not seen)::

    score(u, pair) = sum_k w_uk (p_k - sum_j w_uj p_j)^2

This is the "query by committee" of active learning with the mixture's members as the
committee. A share ``epsilon`` of the picks stays uniform at random, so pairs every member
agrees on (which teach the members themselves, not the grouping) are still asked.

The same rules drive the web app (one pair per request) and simulated users (a batch per round).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from egalitarian_rl.preferences.dataset import PreferenceDataset
from egalitarian_rl.preferences.segments import Transitions

#: Names accepted by :func:`make_rule` (the ``queries.rule`` config key).
RULES = ("random", "disagreement")


class QueryRule(Protocol):
    """Chooses the next queries for a user among the candidates they have not answered."""

    def select(self, user_id: int, available: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
        """Pick up to ``n`` of ``available`` (candidate positions ``(m,)``), best first; returns ``(min(n, m),)``."""
        ...


class RandomRule:
    """Uniformly random candidates (the baseline)."""

    def select(self, user_id: int, available: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
        available = np.asarray(available, dtype=np.int64)
        return rng.permutation(available)[:n]


def segment_member_returns(mixture: object, segments: Transitions, chunk_size: int = 1024) -> np.ndarray:
    """``(S, K)`` each member's return of each segment (leading shape ``(S, L)``) of a fitted mixture.

    :param mixture: a fitted :class:`~egalitarian_rl.rewards.EMRewardMixture`.
    """
    import torch  # only once a mixture exists: the labelling server starts without torch

    reward = mixture.reward  # type: ignore[attr-defined]
    discount = getattr(mixture, "discount", 1.0)
    with torch.no_grad():
        parts = [
            reward.segment_returns(segments.index(slice(start, start + chunk_size)), discount).numpy()
            for start in range(0, len(segments.acts), chunk_size)
        ]
    return np.concatenate(parts).astype(np.float64)


def member_preference_probs(mixture: object, returns: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """``(M, K)`` probability under each member that ``a`` is preferred, for candidate ``pairs``.

    Uses the mixture's own answer model: its per-member scale on return differences and its
    annotator flip rate, when it has them (``logit_scales_``, ``mistake_rates_``).

    :param returns: ``(S, K)`` from :func:`segment_member_returns`.
    :param pairs: ``(M, 2)`` positions in ``returns`` of each candidate's segments ``a`` and ``b``.
    """
    k = returns.shape[1]
    scales = getattr(mixture, "logit_scales_", None)
    mistakes = getattr(mixture, "mistake_rates_", None)
    scales = np.ones(k) if scales is None else np.asarray(scales, dtype=np.float64)
    mistakes = np.zeros(k) if mistakes is None else np.asarray(mistakes, dtype=np.float64)
    logits = (returns[pairs[:, 0]] - returns[pairs[:, 1]]) * scales
    return mistakes + (1.0 - 2.0 * mistakes) / (1.0 + np.exp(-logits))


@dataclass
class DisagreementRule:
    """Ask where the mixture's members, weighted by the user's posterior, disagree most.

    :param probs: ``(M, K)`` ``P_k(a > b)`` of every candidate (:func:`member_preference_probs`);
        ``None`` until a mixture has been fitted (the rule then picks at random).
    :param prior: ``(K,)`` weights for users without a posterior (the mixture's shares).
    :param posteriors: user id -> ``(K,)`` posterior over members given their answers so far.
    :param epsilon: share of picks made uniformly at random instead.
    """

    probs: np.ndarray | None = None
    prior: np.ndarray | None = None
    posteriors: dict[int, np.ndarray] = field(default_factory=dict)
    epsilon: float = 0.2

    def __post_init__(self) -> None:
        if not 0.0 <= self.epsilon <= 1.0:
            raise ValueError(f"epsilon must be in [0, 1], got {self.epsilon}")

    def update(self, mixture: object, candidate_returns: np.ndarray, pairs: np.ndarray, answered: PreferenceDataset | None) -> None:
        """Refresh from a newly fitted mixture.

        :param mixture: the fitted :class:`~egalitarian_rl.rewards.EMRewardMixture`.
        :param candidate_returns: ``(S, K)`` member returns of the segments the candidates use.
        :param pairs: ``(M, 2)`` candidates as positions in ``candidate_returns``.
        :param answered: the comparisons so far (posteriors of their users), or ``None``.
        """
        self.probs = member_preference_probs(mixture, candidate_returns, pairs)
        self.prior = np.asarray(mixture.shares_, dtype=np.float64)  # type: ignore[attr-defined]
        self.posteriors = {}
        if answered is not None and len(answered):
            present = answered.for_users(np.unique(answered.user_ids))
            posterior = mixture.predict_proba(present)  # type: ignore[attr-defined]
            self.posteriors = dict(zip(present.users.tolist(), posterior))

    def scores(self, user_id: int, candidates: np.ndarray) -> np.ndarray:
        """``(m,)`` posterior-weighted variance of ``P_k(a > b)`` over members for ``candidates`` (positions)."""
        if self.probs is None:
            raise RuntimeError("DisagreementRule has no mixture yet: call update() first")
        k = self.probs.shape[1]
        fallback = self.prior if self.prior is not None else np.full(k, 1.0 / k)
        weights = self.posteriors.get(int(user_id), fallback)
        probs = self.probs[candidates]
        mean = probs @ weights
        return ((probs - mean[:, None]) ** 2) @ weights

    def select(self, user_id: int, available: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
        available = np.asarray(available, dtype=np.int64)
        if self.probs is None or len(available) == 0 or available.max() >= len(self.probs):
            # No mixture yet, or candidates added after the last fit (not scored): pick at random.
            return rng.permutation(available)[:n]
        n = min(n, len(available))
        # Random tie-break: many pairs score exactly alike (e.g. two segments no member rewards).
        order = np.lexsort((rng.random(len(available)), -self.scores(user_id, available)))
        ranked = available[order]
        n_random = int(rng.binomial(n, self.epsilon))
        chosen = list(ranked[: n - n_random])
        rest = ranked[n - n_random :]
        chosen.extend(rng.choice(rest, size=n_random, replace=False).tolist() if n_random else [])
        return np.asarray(chosen, dtype=np.int64)


def make_rule(name: str, epsilon: float = 0.2) -> RandomRule | DisagreementRule:
    """The rule named in a config: ``"random"`` or ``"disagreement"`` (with its ``epsilon``)."""
    if name == "random":
        return RandomRule()
    if name == "disagreement":
        return DisagreementRule(epsilon=epsilon)
    raise ValueError(f"unknown query rule {name!r}; choose one of {RULES}")
