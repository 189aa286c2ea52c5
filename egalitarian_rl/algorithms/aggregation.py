"""Turn K group rewards into the one scalar reward a policy is trained on.

At every environment step the K learned group reward models give a vector
``r = (r_1, ..., r_K)``. A policy optimiser (an SB3 PPO subclass, a language
model trainer) needs one number per step. The rules here decide how to get it,
given the per-step group rewards and each group's *estimated expected return
under the current policy*:

=================  ==========================================  =========
name               rollout reward                              linear?
=================  ==========================================  =========
``worst_group``    ``r_g`` with ``g = argmin_k return_k``      yes
                   (or the average of past argmins)
``per_sample_min`` ``min_k r_k`` separately at every step      no
``softmin``        ``r @ softmax(-returns / tau)``             yes
``egd``            ``r @ w``, ``w`` updated by exponentiated   yes
                   gradient on the returns (stateful)
``mean``           ``r @ w`` with uniform (or fixed) ``w``     yes
=================  ==========================================  =========

``worst_group`` is MaxMin-RLHF's policy step (Chakraborty et al., 2024);
``per_sample_min`` is what the paper's released language-model code does;
``softmin`` is a KL-regularised distributionally robust objective; ``egd`` is
the group-weight update of Group Robust Preference Optimization (Ramesh et al.,
2024); ``mean`` is the utilitarian baseline.

A *linear* rule's reward is ``group_rewards @ weights`` for one weight vector
per rollout, so a K-headed critic's per-group advantages can be combined with
the same weights (see ``Aggregation.is_linear``). ``per_sample_min`` picks a
different group at every step and needs a critic of its own.

Scale matters: argmin, softmin and egd compare groups' returns, and a group
whose rewards are in metres per second is not comparable with one in [-1, 1].
Put the group rewards on one scale first (:class:`GroupRewardNormalizer`), and
compute ``group_returns`` from the normalised rewards.

This module is numpy only on purpose: the SB3 and the language-model trainers
both use it, and neither framework should leak into the other.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import ClassVar

import numpy as np

__all__ = [
    "AGGREGATIONS",
    "Aggregation",
    "AggregationResult",
    "ExponentiatedGradient",
    "GroupRewardNormalizer",
    "Mean",
    "PerSampleMin",
    "SoftMin",
    "WorstGroup",
    "make_aggregation",
]


# --------------------------------------------------------------------------- validation helpers
def _as_float_array(values: np.ndarray | Sequence[float], what: str) -> np.ndarray:
    """``values`` as a float64 array, or a ValueError naming ``what`` if it is not numeric."""
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{what} must be numeric, got {type(values).__name__}: {error}") from error
    return array


def _check_finite(array: np.ndarray, what: str) -> None:
    """Raise a ValueError saying how many NaN / inf values ``array`` holds and where the first one is.

    A single NaN reward silently poisons running statistics, argmins and
    exponentiated weights for the rest of training, so it is refused at the door.
    """
    for bad, label in ((np.isnan(array), "NaN"), (np.isinf(array), "infinite")):
        if bad.any():
            first = tuple(int(i) for i in np.argwhere(bad)[0])
            raise ValueError(f"{what} contains {int(bad.sum())} {label} value(s), the first at index {first}")


def _check_last_axis(array: np.ndarray, num_groups: int, what: str) -> None:
    """Raise a ValueError unless ``array`` has shape ``(..., num_groups)``."""
    if array.ndim == 0 or array.shape[-1] != num_groups:
        raise ValueError(f"{what} must have shape (..., K) with K={num_groups} groups on its last axis, got shape {array.shape}")


def _logsumexp(values: np.ndarray) -> float:
    """``log(sum(exp(values)))`` without overflow."""
    top = float(np.max(values))
    if not np.isfinite(top):  # all -inf: the sum is 0
        return top
    return top + float(np.log(np.sum(np.exp(values - top))))


# --------------------------------------------------------------------------- normaliser
class GroupRewardNormalizer:
    """Puts each group's rewards on a comparable scale: ``(r - mean_k) / sqrt(var_k + eps)``.

    Keeps one running mean and variance per group over every reward passed to
    :meth:`update`. Batches are merged with Chan et al.'s parallel form of
    Welford's algorithm, so the statistics equal ``np.mean`` / ``np.var`` of all
    rewards seen, whatever the batch sizes, without storing them.

    Two ways to use it:

    * running: call :meth:`update` on every rollout's group rewards, then
      :meth:`normalize`; the scale follows the policy as it changes.
    * fixed: :meth:`from_data` on a reference set (for example the learned
      rewards of the preference data's segments) gives a frozen normaliser,
      so the scale, and hence which group counts as worse off, cannot drift
      with the policy. :meth:`freeze` turns a running one into a fixed one.

    Log :attr:`mean` and :attr:`std` with the results: a claim about the
    worst-off group is only as meaningful as the scale it was measured on.

    Before any data is seen the statistics are mean 0, variance 1, so
    :meth:`normalize` is (almost exactly) the identity.

    :param num_groups: K, the number of groups (size of the rewards' last axis).
    :param eps: added to the variance before the square root, so a group whose
        rewards are constant is not divided by zero. Must be > 0.
    """

    def __init__(self, num_groups: int, eps: float = 1e-8) -> None:
        if isinstance(num_groups, bool) or not isinstance(num_groups, (int, np.integer)) or num_groups < 1:
            raise ValueError(f"num_groups must be a positive integer, got {num_groups!r}")
        if not (np.isfinite(eps) and eps > 0):
            raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
        self.num_groups = int(num_groups)
        self.eps = float(eps)
        self._mean = np.zeros(self.num_groups, dtype=np.float64)
        self._var = np.ones(self.num_groups, dtype=np.float64)
        self._count = 0.0
        self._frozen = False

    @classmethod
    def from_data(cls, group_rewards: np.ndarray, eps: float = 1e-8, frozen: bool = True) -> GroupRewardNormalizer:
        """A normaliser whose statistics are those of ``group_rewards``.

        :param group_rewards: ``(..., K)`` reference rewards, at least one sample.
        :param eps: see the class docstring.
        :param frozen: keep these statistics fixed (default); ``False`` lets later
            :meth:`update` calls continue from them.
        """
        array = _as_float_array(group_rewards, "group_rewards")
        if array.ndim == 0:
            raise ValueError(f"group_rewards must have shape (..., K), got a scalar {array!r}")
        if array.size == 0:
            raise ValueError(f"group_rewards must hold at least one sample to compute statistics from, got shape {array.shape}")
        normalizer = cls(array.shape[-1], eps=eps)
        normalizer.update(array)
        if frozen:
            normalizer.freeze()
        return normalizer

    # ------------------------------------------------------------------ statistics
    @property
    def mean(self) -> np.ndarray:
        """``(K,)`` running mean of each group's rewards (a copy)."""
        return self._mean.copy()

    @property
    def var(self) -> np.ndarray:
        """``(K,)`` running population variance (``ddof=0``) of each group's rewards (a copy)."""
        return self._var.copy()

    @property
    def std(self) -> np.ndarray:
        """``(K,)`` running standard deviation, ``sqrt(var)``, without ``eps`` (matches ``np.std``)."""
        return np.sqrt(self._var)

    @property
    def count(self) -> float:
        """Number of samples (vectors of K rewards) the statistics are computed from."""
        return self._count

    @property
    def frozen(self) -> bool:
        """True when :meth:`update` leaves the statistics unchanged."""
        return self._frozen

    def freeze(self) -> None:
        """Stop :meth:`update` from changing the statistics (for evaluation, or a fixed scale)."""
        self._frozen = True

    def unfreeze(self) -> None:
        """Let :meth:`update` change the statistics again."""
        self._frozen = False

    # ------------------------------------------------------------------ update / normalise
    def _checked(self, group_rewards: np.ndarray) -> np.ndarray:
        array = _as_float_array(group_rewards, "group_rewards")
        _check_last_axis(array, self.num_groups, "group_rewards")
        _check_finite(array, "group_rewards")
        return array

    def update(self, group_rewards: np.ndarray) -> None:
        """Fold a batch of rewards into the running statistics (a no-op when frozen).

        Being a no-op rather than an error when frozen lets a training loop call
        ``update`` unconditionally and decide elsewhere whether the scale is fixed.

        :param group_rewards: ``(..., K)``; every leading index is one sample, e.g.
            ``(n_steps, n_envs, K)`` from a rollout. An empty batch changes nothing.
        """
        array = self._checked(group_rewards)
        if self._frozen:
            return
        samples = array.reshape(-1, self.num_groups)
        batch_count = float(samples.shape[0])
        if batch_count == 0:
            return
        batch_mean = samples.mean(axis=0)
        batch_var = samples.var(axis=0)
        # Chan et al. (1979): merging two sets' (count, mean, M2) is exact, so any
        # split into batches gives the same result as one pass over all the data.
        total = self._count + batch_count
        delta = batch_mean - self._mean
        m2 = self._var * self._count + batch_var * batch_count + delta**2 * (self._count * batch_count / total)
        self._mean = self._mean + delta * (batch_count / total)
        self._var = m2 / total
        self._count = total

    def normalize(self, group_rewards: np.ndarray) -> np.ndarray:
        """``(group_rewards - mean) / sqrt(var + eps)``, per group; does not update the statistics.

        :param group_rewards: ``(..., K)``.
        :return: float64 array of the same shape.
        """
        array = self._checked(group_rewards)
        return (array - self._mean) / np.sqrt(self._var + self.eps)

    def log_dict(self, prefix: str = "normalizer") -> dict[str, float]:
        """The statistics as flat scalars for a logger: ``{prefix}/mean_{k}``, ``{prefix}/std_{k}``, ``{prefix}/count``."""
        out: dict[str, float] = {f"{prefix}/count": self._count}
        for k in range(self.num_groups):
            out[f"{prefix}/mean_{k}"] = float(self._mean[k])
            out[f"{prefix}/std_{k}"] = float(np.sqrt(self._var[k]))
        return out

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, np.ndarray]:
        """Everything needed to rebuild the normaliser, as plain arrays (savable with ``np.savez``, no pickle).

        Keys: ``mean`` ``(K,)``, ``var`` ``(K,)``, ``count`` ``()``, ``eps`` ``()``, ``frozen`` ``()`` bool.
        """
        return {
            "mean": self._mean.copy(),
            "var": self._var.copy(),
            "count": np.array(self._count, dtype=np.float64),
            "eps": np.array(self.eps, dtype=np.float64),
            "frozen": np.array(self._frozen, dtype=np.bool_),
        }

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Restore statistics saved by :meth:`state_dict`; K must match this normaliser's.

        ``eps`` and ``frozen`` are optional keys; when absent the current values are kept.
        """
        missing = {"mean", "var", "count"} - set(state)
        if missing:
            raise ValueError(f"normalizer state is missing key(s) {sorted(missing)}; it has {sorted(state)}")
        mean = _as_float_array(state["mean"], "state['mean']")
        var = _as_float_array(state["var"], "state['var']")
        count = _as_float_array(state["count"], "state['count']")
        for name, array in (("mean", mean), ("var", var)):
            if array.shape != (self.num_groups,):
                raise ValueError(f"state[{name!r}] must have shape ({self.num_groups},) for K={self.num_groups}, got {array.shape}")
            _check_finite(array, f"state[{name!r}]")
        if (var < 0).any():
            raise ValueError(f"state['var'] must be >= 0, got {var}")
        if count.shape != () or not np.isfinite(count) or count < 0:
            raise ValueError(f"state['count'] must be a finite scalar >= 0, got {count!r}")
        eps = float(state["eps"]) if "eps" in state else self.eps
        if not (np.isfinite(eps) and eps > 0):
            raise ValueError(f"state['eps'] must be a finite number > 0, got {eps!r}")
        self._mean, self._var, self._count, self.eps = mean.copy(), var.copy(), float(count), eps
        if "frozen" in state:
            self._frozen = bool(state["frozen"])

    def __repr__(self) -> str:
        return f"GroupRewardNormalizer(num_groups={self.num_groups}, count={self._count:g}, frozen={self._frozen})"


# --------------------------------------------------------------------------- aggregation rules
@dataclass(frozen=True)
class AggregationResult:
    """What one rollout's aggregation produced.

    :param rewards: the scalar reward the policy trains on, the input's leading
        shape, e.g. ``(n_steps, n_envs)``; float64.
    :param weights: ``(K,)`` group weights on the simplex used for this rollout.
        For a linear rule ``rewards == group_rewards @ weights``; for
        ``per_sample_min`` it is the fraction of samples at which each group
        was the minimum (ties go to the lowest index), a diagnostic only.
    :param selected_group: index of the group trained on (``worst_group`` only), else None.
    :param diagnostics: scalars worth logging, e.g. ``worst_group_return``,
        ``return_spread``, ``weights_entropy`` and rule-specific values.
    """

    rewards: np.ndarray
    weights: np.ndarray
    selected_group: int | None = None
    diagnostics: dict[str, float] = field(default_factory=dict)


class Aggregation(ABC):
    """A rule turning K group rewards into one reward. Subclasses implement :meth:`_weights`.

    The number of groups K may be given up front (``num_groups``) or is fixed by
    the first call; every later call must use the same K, so a mix-up between
    reward models is an error instead of a silently wrong weight vector.

    Call :meth:`aggregate` (or :meth:`weights`) **once per rollout**: stateful
    rules (``egd``) take one update step per call. To combine per-group
    advantages of a K-headed critic, use the ``weights`` of the
    :class:`AggregationResult` rather than calling :meth:`weights` again.

    :param num_groups: K, or None to take it from the first call.
    """

    #: Registry name, used by :func:`make_aggregation` and in logs.
    name: ClassVar[str] = ""
    #: True if the rollout reward is ``group_rewards @ weights`` for one weight
    #: vector, so a per-group critic's advantages can be combined with the same
    #: weights. False means the rule needs the reward-level result and a critic of its own.
    is_linear: ClassVar[bool] = True

    def __init__(self, num_groups: int | None = None) -> None:
        if num_groups is not None and (isinstance(num_groups, bool) or not isinstance(num_groups, (int, np.integer)) or num_groups < 1):
            raise ValueError(f"{self.name}: num_groups must be a positive integer or None, got {num_groups!r}")
        self.num_groups: int | None = None if num_groups is None else int(num_groups)

    # ------------------------------------------------------------------ checks
    def _register_num_groups(self, k: int, what: str) -> None:
        if self.num_groups is None:
            self.num_groups = k
        elif k != self.num_groups:
            raise ValueError(f"{self.name}: {what} has K={k} groups but this aggregation was set up for K={self.num_groups}")

    def _check_returns(self, group_returns: np.ndarray) -> np.ndarray:
        returns = _as_float_array(group_returns, "group_returns")
        if returns.ndim != 1 or returns.size == 0:
            raise ValueError(f"{self.name}: group_returns must have shape (K,), one expected return per group, got shape {returns.shape}")
        _check_finite(returns, "group_returns")
        return returns

    def _check_rewards(self, group_rewards: np.ndarray, num_groups: int) -> np.ndarray:
        rewards = _as_float_array(group_rewards, "group_rewards")
        if rewards.ndim < 2:
            raise ValueError(
                f"{self.name}: group_rewards must have shape (n_steps, n_envs, K) (or any (..., K) with at least "
                f"one leading axis), got shape {rewards.shape}"
            )
        if rewards.shape[-1] != num_groups:
            raise ValueError(
                f"{self.name}: group_rewards has K={rewards.shape[-1]} groups on its last axis (shape {rewards.shape}) "
                f"but group_returns has {num_groups}"
            )
        if rewards.size == 0:
            raise ValueError(f"{self.name}: group_rewards holds no samples (shape {rewards.shape})")
        _check_finite(rewards, "group_rewards")
        return rewards

    # ------------------------------------------------------------------ the rule
    @abstractmethod
    def _weights(self, group_returns: np.ndarray) -> np.ndarray:
        """``(K,)`` simplex weights from validated ``(K,)`` returns; may update state."""

    def weights(self, group_returns: np.ndarray) -> np.ndarray:
        """Group weights for this rollout, on the simplex.

        :param group_returns: ``(K,)`` each group's estimated expected return under
            the current policy, on a common scale (computed from normalised rewards).
        :return: ``(K,)`` non-negative weights summing to 1. Stateful rules (``egd``)
            take one update step per call.
        """
        returns = self._check_returns(group_returns)
        self._register_num_groups(returns.size, "group_returns")
        return self._weights(returns)

    def aggregate(self, group_rewards: np.ndarray, group_returns: np.ndarray) -> AggregationResult:
        """The scalar reward for one rollout.

        :param group_rewards: ``(n_steps, n_envs, K)`` per-step group rewards
            (normalised); any ``(..., K)`` with at least one leading axis works,
            e.g. ``(batch, K)`` for a language model.
        :param group_returns: ``(K,)`` each group's estimated expected return under
            the current policy, on the same scale.
        :return: an :class:`AggregationResult` whose ``rewards`` have the leading shape of ``group_rewards``.
        """
        returns = self._check_returns(group_returns)
        rewards = self._check_rewards(group_rewards, returns.size)
        # Only a call that passed every check may fix K.
        self._register_num_groups(returns.size, "group_returns")
        weights = self._weights(returns)
        scalar = rewards @ weights
        return AggregationResult(rewards=scalar, weights=weights, diagnostics=self._diagnostics(scalar, weights, returns))

    def initial_weights(self, num_groups: int) -> np.ndarray:
        """``(K,)`` weights of the first rollout, before any return has been estimated: uniform
        unless the rule has fixed weights (``mean`` with given shares). No state change."""
        return np.full(num_groups, 1.0 / num_groups)

    def combine(self, group_rewards: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """Per-sample reward under weights already chosen for this rollout; no state change.

        Lets a trainer relabel step by step (``(n_envs, K) -> (n_envs,)``) with the
        weights that one :meth:`weights` call per rollout produced.

        :param group_rewards: ``(..., K)`` normalised group rewards.
        :param weights: ``(K,)`` this rollout's weights.
        :return: ``(...)`` the reward to train on.
        """
        return np.asarray(group_rewards, dtype=np.float64) @ weights

    def config(self) -> dict[str, object]:
        """Constructor arguments that rebuild this rule with :func:`make_aggregation` (JSON-serialisable)."""
        return {} if self.num_groups is None else {"num_groups": self.num_groups}

    def _diagnostics(self, rewards: np.ndarray, weights: np.ndarray, returns: np.ndarray) -> dict[str, float]:
        positive = weights[weights > 0]
        return {
            "worst_group_return": float(returns.min()),
            "return_spread": float(returns.max() - returns.min()),
            # 0 when one group gets all the weight, log K when weights are uniform.
            "weights_entropy": float(0.0 - (positive * np.log(positive)).sum()),  # 0.0 - x: no "-0.0" in logs
            "reward_mean": float(rewards.mean()),
        }

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, np.ndarray]:
        """Internal state as plain arrays (empty for stateless rules)."""
        return {}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Restore :meth:`state_dict`'s output (stateless rules accept only an empty dict)."""
        if state:
            raise ValueError(f"{self.name} has no state to load, got key(s) {sorted(state)}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_groups={self.num_groups})"


class WorstGroup(Aggregation):
    """MaxMin-RLHF's rule: train this rollout on the group with the lowest expected return.

    Weight 1 on ``argmin(group_returns)``, 0 elsewhere; ties go to the lowest index.

    **Averaged** (``average=True``). The paper's rule is a best response: the whole
    weight jumps to whichever group is behind *now*. When the groups' goals conflict
    (FairGrid's two goals, a fast and a calm walker) the policy answers by moving
    to the selected group's own optimum, the other group falls behind, and the
    last iterate oscillates between the two optima without settling on the
    compromise in between (``benchmarks/fairgrid_maxmin.py`` measures this).
    With ``average=True`` the worst group is still chosen by return, as in the
    paper, but the rollout trains on the running average of all selections so
    far: ``w_k = (rollouts at which k was worst) / (rollouts so far)``. This is
    fictitious play for the adversary of ``max_pi min_k J_k(pi) = max_pi min_w
    sum_k w_k J_k(pi)``: the weights move by O(1/t), the policy can follow
    them, and they settle where the groups' returns are equal or the compromise
    is the best response, i.e. at the max-min solution.

    **Warm-up** (``warmup=W``). While the policy is still random, which group is
    "worst" says nothing about it, yet those first selections would push the
    weights to one end before the policy has answered them, and a policy that
    has converged to one group's optimum rarely explores its way back. The
    first ``W`` rollouts therefore train on uniform weights; with averaging they
    count as ``W / K`` selections of every group, a prior that keeps the early
    averages near uniform.

    Measured on FairGrid (5 seeds, ``benchmarks/fairgrid_maxmin.py``): averaging with a
    10-rollout warm-up settles, but at one goal or the other (4 of 5 seeds), not at the
    compromise; PPO ends at a goal under every fixed weighting there (README, "Which rule"),
    so no weight schedule of a linear rule reaches the compromise with that optimiser.

    :param average: train on the average of the selections so far instead of the latest one.
    :param warmup: rollouts trained on uniform weights before the rule starts selecting.
    :param num_groups: K, or None to take it from the first call.
    """

    name = "worst_group"
    is_linear = True

    def __init__(self, average: bool = False, warmup: int = 0, num_groups: int | None = None) -> None:
        super().__init__(num_groups)
        if not isinstance(average, (bool, np.bool_)):
            raise ValueError(f"worst_group: average must be true or false, got {average!r}")
        if isinstance(warmup, bool) or not isinstance(warmup, (int, np.integer)) or warmup < 0:
            raise ValueError(f"worst_group: warmup must be a whole number of rollouts >= 0, got {warmup!r}")
        self.average = bool(average)
        self.warmup = int(warmup)
        self._selections: np.ndarray | None = None
        self._calls = 0

    def config(self) -> dict[str, object]:
        return {**super().config(), "average": self.average, "warmup": self.warmup}

    def _weights(self, group_returns: np.ndarray) -> np.ndarray:
        k = group_returns.size
        self._calls += 1
        if self._calls <= self.warmup:
            return np.full(k, 1.0 / k)
        selected = np.zeros(k)
        selected[int(np.argmin(group_returns))] = 1.0  # np.argmin returns the first minimum: lowest index wins ties
        if not self.average:
            return selected
        if self._selections is None:
            self._selections = np.full(k, self.warmup / k)  # the warm-up's uniform rollouts, as a prior
        self._selections += selected
        return self._selections / self._selections.sum()

    def aggregate(self, group_rewards: np.ndarray, group_returns: np.ndarray) -> AggregationResult:
        result = super().aggregate(group_rewards, group_returns)
        # The group chosen by return this rollout; with averaging it is not the weights' argmax.
        return replace(result, selected_group=int(np.argmin(self._check_returns(group_returns))))

    def state_dict(self) -> dict[str, np.ndarray]:
        """``selections`` ``(K,)``: the averaged selections incl. the warm-up prior (empty until the
        first averaged step); ``calls`` ``()``: rollouts so far (to know when the warm-up ends)."""
        selections = np.zeros(0) if self._selections is None else self._selections.copy()
        return {"selections": selections, "calls": np.array(self._calls, dtype=np.int64)}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        if not state:  # saved before averaging existed: nothing to restore
            return
        if set(state) != {"selections", "calls"}:
            raise ValueError(f"worst_group state must hold 'selections' and 'calls', got key(s) {sorted(state)}")
        selections = _as_float_array(state["selections"], "state['selections']")
        if selections.ndim != 1 or (selections.size and (not np.isfinite(selections).all() or (selections < 0).any())):
            raise ValueError(f"state['selections'] must be (K,) non-negative counts, got {selections}")
        calls = int(state["calls"])
        if calls < 0:
            raise ValueError(f"state['calls'] must be >= 0, got {calls}")
        if selections.size:
            self._register_num_groups(selections.size, "state['selections']")
        self._selections = selections.copy() if selections.size else None
        self._calls = calls

    def __repr__(self) -> str:
        return f"WorstGroup(average={self.average}, warmup={self.warmup}, num_groups={self.num_groups})"


class PerSampleMin(Aggregation):
    """The released MaxMin-RLHF language-model code's rule: ``min_k r_k`` at every sample.

    Not linear: a different group can be the minimum at each step, so there is
    no single weight vector and a per-group critic cannot be reused; train a
    critic on the min reward itself. ``group_returns`` is only validated and logged.
    """

    name = "per_sample_min"
    is_linear = False

    def _weights(self, group_returns: np.ndarray) -> np.ndarray:
        raise NotImplementedError(
            "per_sample_min has no group weights: min_k r_k is not a weighted sum of the group rewards. "
            "Use aggregate(); its result.weights report how often each group was the minimum."
        )

    def combine(self, group_rewards: np.ndarray, weights: np.ndarray) -> np.ndarray:
        return np.asarray(group_rewards, dtype=np.float64).min(axis=-1)

    def aggregate(self, group_rewards: np.ndarray, group_returns: np.ndarray) -> AggregationResult:
        returns = self._check_returns(group_returns)
        rewards = self._check_rewards(group_rewards, returns.size)
        self._register_num_groups(returns.size, "group_returns")
        scalar = rewards.min(axis=-1)
        argmins = rewards.argmin(axis=-1).ravel()
        frequency = np.bincount(argmins, minlength=returns.size) / argmins.size
        diagnostics = self._diagnostics(scalar, frequency, returns)
        # How much reward the min gives up against the groups' average, per sample.
        diagnostics["min_minus_mean"] = float((scalar - rewards.mean(axis=-1)).mean())
        return AggregationResult(rewards=scalar, weights=frequency, diagnostics=diagnostics)


class SoftMin(Aggregation):
    """Distributionally robust weights: ``softmax(-group_returns / tau)``.

    These weights solve ``min_w  w @ returns + tau * KL(w || uniform)`` over the
    simplex: an adversary that shifts weight to worse-off groups but pays ``tau``
    per nat of departure from uniform. ``tau -> 0`` gives ``worst_group`` (one-hot
    on the argmin; exactly tied groups share the weight), ``tau -> inf`` gives
    ``mean``. The rule acts on the groups' *returns*, not on each sample's
    rewards, so it is linear with one weight vector per rollout and a per-group
    critic can be combined with it; a per-sample softmin would be as non-linear
    as ``per_sample_min``.

    :param tau: temperature > 0, in the units of ``group_returns`` (so feed
        returns of normalised rewards, and choose tau relative to the typical gap
        between groups). ``math.inf`` is allowed and gives the mean.
    :param num_groups: K, or None to take it from the first call.
    """

    name = "softmin"
    is_linear = True

    def __init__(self, tau: float = 1.0, num_groups: int | None = None) -> None:
        super().__init__(num_groups)
        if not (isinstance(tau, (int, float, np.floating, np.integer)) and tau > 0):  # also refuses NaN
            raise ValueError(f"softmin: tau must be a number > 0, got {tau!r}")
        self.tau = float(tau)

    def config(self) -> dict[str, object]:
        return {**super().config(), "tau": self.tau}

    def _weights(self, group_returns: np.ndarray) -> np.ndarray:
        # Measuring from the minimum keeps every exponent <= 0 and the argmin's at
        # exactly 0: no overflow, and no inf - inf = NaN even for a tiny tau.
        with np.errstate(over="ignore"):  # a gap / tau beyond float range is just exp(-inf) = 0
            exponents = -(group_returns - group_returns.min()) / self.tau
        unnormalised = np.exp(exponents)
        return unnormalised / unnormalised.sum()

    def aggregate(self, group_rewards: np.ndarray, group_returns: np.ndarray) -> AggregationResult:
        result = super().aggregate(group_rewards, group_returns)
        returns = np.asarray(group_returns, dtype=np.float64)
        # The soft minimum the weights optimise: -tau * log(mean_k exp(-return_k / tau)).
        with np.errstate(over="ignore"):
            shifted = -(returns - returns.min()) / self.tau
        value = returns.min() - self.tau * (_logsumexp(shifted) - np.log(returns.size)) if np.isfinite(self.tau) else returns.mean()
        result.diagnostics["softmin_value"] = float(value)
        return result

    def __repr__(self) -> str:
        return f"SoftMin(tau={self.tau}, num_groups={self.num_groups})"


class ExponentiatedGradient(Aggregation):
    """Group Robust Preference Optimization's weights (Ramesh et al., 2024): exponentiated gradient on the simplex.

    Starts from uniform weights; every call takes one mirror-descent step
    ``w_k <- w_k * exp(-eta * x_k)``, renormalised, where ``x`` is the groups'
    returns made scale-free (below). Groups doing worse than the others gain
    weight, and keep gaining while they stay behind, so the weights track the
    worst-off groups smoothly instead of jumping like ``worst_group``. The
    updated weights are returned (the step uses the current policy's returns).

    **Scale.** ``x = (returns - mean_k returns) / s``. Subtracting the mean
    changes nothing after renormalisation; it only keeps numbers small. ``s``:

    * ``scale=None`` (default): the root-mean-square of the centred returns over
      *all calls so far*, this one included (AdaGrad-like). The update is then
      unchanged if every return is multiplied by a constant, so ``eta`` means
      "log-weight step for a typical gap between groups", whatever the units of
      the returns (per-step means or discounted sums, raw or normalised). While
      the gaps shrink as the policy evens the groups out, steps shrink too and
      the weights settle. On the very first call ``x`` has unit RMS.
    * ``scale=c`` (a float > 0): ``s = c`` always, so ``eta / c`` is the step per
      unit of return; use this to reproduce a fixed-step GRPO update, feeding
      e.g. mean per-step normalised rewards (z-scores) with ``c = 1``.

    Weights are kept as log-weights so a group that lagged for a long time can
    still regain weight (plain products underflow to an absorbing 0).

    :param eta: step size > 0 (see Scale). With ``scale=None`` and two groups,
        the first step multiplies the worse group's weight ratio by ``exp(2 * eta)``,
        whatever the size of the gap; later steps by ``exp(2 * eta * gap / s)``.
    :param scale: None for the running scale, or a fixed positive float.
    :param num_groups: K, or None to take it from the first call.
    """

    name = "egd"
    is_linear = True

    def __init__(self, eta: float = 0.1, scale: float | None = None, num_groups: int | None = None) -> None:
        super().__init__(num_groups)
        if not (isinstance(eta, (int, float, np.floating, np.integer)) and np.isfinite(eta) and eta > 0):
            raise ValueError(f"egd: eta must be a finite number > 0, got {eta!r}")
        if scale is not None and not (isinstance(scale, (int, float, np.floating, np.integer)) and np.isfinite(scale) and scale > 0):
            raise ValueError(f"egd: scale must be None (running scale) or a finite number > 0, got {scale!r}")
        self.eta = float(eta)
        self.scale = None if scale is None else float(scale)
        self._log_weights: np.ndarray | None = None if self.num_groups is None else self._uniform_log(self.num_groups)
        self._sum_sq = 0.0  # sum over calls of the mean squared centred return
        self._num_updates = 0

    def config(self) -> dict[str, object]:
        return {**super().config(), "eta": self.eta, "scale": self.scale}

    @staticmethod
    def _uniform_log(k: int) -> np.ndarray:
        return np.full(k, -np.log(k))

    @property
    def current_weights(self) -> np.ndarray | None:
        """``(K,)`` weights after the last step (uniform before the first), None while K is unknown."""
        return None if self._log_weights is None else np.exp(self._log_weights)

    @property
    def num_updates(self) -> int:
        """How many steps the weights have taken."""
        return self._num_updates

    def _current_scale(self) -> float:
        """The ``s`` that centred returns are divided by (see the class docstring); 0 before any step."""
        if self.scale is not None:
            return self.scale
        return float(np.sqrt(self._sum_sq / self._num_updates)) if self._num_updates else 0.0

    def _weights(self, group_returns: np.ndarray) -> np.ndarray:
        if self._log_weights is None:
            self._log_weights = self._uniform_log(group_returns.size)
        centred = group_returns - group_returns.mean()
        self._sum_sq += float(np.mean(centred**2))
        self._num_updates += 1
        scale = self._current_scale()
        # All returns equal so far (scale 0): nothing to tell the groups apart, no step.
        step = centred / scale if scale > 0 else np.zeros_like(centred)
        log_weights = self._log_weights - self.eta * step
        self._log_weights = log_weights - _logsumexp(log_weights)
        weights = np.exp(self._log_weights)
        return weights / weights.sum()  # exact simplex despite rounding in exp

    def aggregate(self, group_rewards: np.ndarray, group_returns: np.ndarray) -> AggregationResult:
        result = super().aggregate(group_rewards, group_returns)
        result.diagnostics["egd_scale"] = self._current_scale()
        return result

    def state_dict(self) -> dict[str, np.ndarray]:
        """``log_weights`` ``(K,)`` (empty before K is known), ``sum_sq`` ``()``, ``num_updates`` ``()``."""
        log_weights = np.zeros(0) if self._log_weights is None else self._log_weights.copy()
        return {
            "log_weights": log_weights,
            "sum_sq": np.array(self._sum_sq, dtype=np.float64),
            "num_updates": np.array(self._num_updates, dtype=np.int64),
        }

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        missing = {"log_weights", "sum_sq", "num_updates"} - set(state)
        if missing:
            raise ValueError(f"egd state is missing key(s) {sorted(missing)}; it has {sorted(state)}")
        log_weights = _as_float_array(state["log_weights"], "state['log_weights']")
        if log_weights.ndim != 1:
            raise ValueError(f"state['log_weights'] must have shape (K,), got {log_weights.shape}")
        # -inf (a weight of exactly 0) is allowed, NaN / +inf / all -inf are not.
        if log_weights.size and (np.isnan(log_weights).any() or np.isposinf(log_weights).any() or not np.isfinite(log_weights).any()):
            raise ValueError(f"state['log_weights'] must be finite log-weights, got {log_weights}")
        sum_sq, num_updates = float(state["sum_sq"]), int(state["num_updates"])
        if not (np.isfinite(sum_sq) and sum_sq >= 0 and num_updates >= 0):
            raise ValueError(f"egd state has invalid sum_sq={sum_sq} or num_updates={num_updates}")
        # Everything checked: only now change this object.
        if log_weights.size:
            self._register_num_groups(log_weights.size, "state['log_weights']")
            self._log_weights = log_weights - _logsumexp(log_weights)
        else:
            self._log_weights = None if self.num_groups is None else self._uniform_log(self.num_groups)
        self._sum_sq, self._num_updates = sum_sq, num_updates

    def __repr__(self) -> str:
        return f"ExponentiatedGradient(eta={self.eta}, scale={self.scale}, num_groups={self.num_groups})"


class Mean(Aggregation):
    """Utilitarian baseline: uniform weights, or fixed ones such as the groups' population shares.

    Fixed shares make this the reward a single BT model fitted to everyone's
    comparisons approximates, i.e. the majority-dominated objective MaxMin-RLHF improves on.

    :param weights: ``(K,)`` non-negative weights with a positive sum (normalised
        to the simplex), or None for uniform. Giving them fixes K.
    :param num_groups: K, or None to take it from ``weights`` or the first call.
    """

    name = "mean"
    is_linear = True

    def __init__(self, weights: Sequence[float] | np.ndarray | None = None, num_groups: int | None = None) -> None:
        fixed: np.ndarray | None = None
        if weights is not None:
            fixed = _as_float_array(weights, "mean: weights")
            if fixed.ndim != 1 or fixed.size == 0:
                raise ValueError(f"mean: weights must have shape (K,), got shape {fixed.shape}")
            if not np.isfinite(fixed).all() or (fixed < 0).any() or fixed.sum() <= 0:
                raise ValueError(f"mean: weights must be finite, non-negative and have a positive sum, got {fixed}")
            if num_groups is not None and num_groups != fixed.size:
                raise ValueError(f"mean: {fixed.size} weights given but num_groups={num_groups}")
            num_groups = fixed.size
            fixed = fixed / fixed.sum()
        super().__init__(num_groups)
        self.fixed_weights = fixed

    def initial_weights(self, num_groups: int) -> np.ndarray:
        if self.fixed_weights is not None:
            if self.fixed_weights.size != num_groups:
                raise ValueError(f"mean: {self.fixed_weights.size} weights given for {num_groups} groups")
            return self.fixed_weights.copy()
        return super().initial_weights(num_groups)

    def _weights(self, group_returns: np.ndarray) -> np.ndarray:
        if self.fixed_weights is not None:
            return self.fixed_weights.copy()
        return np.full(group_returns.size, 1.0 / group_returns.size)

    def config(self) -> dict[str, object]:
        fixed = None if self.fixed_weights is None else self.fixed_weights.tolist()
        return {**super().config(), "weights": fixed}

    def __repr__(self) -> str:
        fixed = None if self.fixed_weights is None else self.fixed_weights.tolist()
        return f"Mean(weights={fixed}, num_groups={self.num_groups})"


# --------------------------------------------------------------------------- registry
#: Every rule by its name; :func:`make_aggregation` builds from it.
AGGREGATIONS: dict[str, type[Aggregation]] = {rule.name: rule for rule in (WorstGroup, PerSampleMin, SoftMin, ExponentiatedGradient, Mean)}


def make_aggregation(name: str, **kwargs: object) -> Aggregation:
    """Build a rule by name, e.g. ``make_aggregation("softmin", tau=0.5)``.

    :param name: one of :data:`AGGREGATIONS`' keys (case-insensitive, ``-`` or ``_``).
    :param kwargs: the rule's constructor arguments (all accept ``num_groups``).
    :raises ValueError: for an unknown name, an argument the rule does not take,
        or an invalid value (``tau <= 0``, ``eta <= 0``, ...).
    """
    key = str(name).strip().lower().replace("-", "_")
    if key not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {name!r}; valid names are {sorted(AGGREGATIONS)}")
    rule = AGGREGATIONS[key]
    accepted = [p for p in inspect.signature(rule.__init__).parameters if p != "self"]
    unexpected = sorted(set(kwargs) - set(accepted))
    if unexpected:
        # A typo such as tua=0.1 would otherwise be a TypeError deep in a config loader.
        raise ValueError(f"aggregation {key!r} got unexpected argument(s) {unexpected}; it accepts {accepted}")
    return rule(**kwargs)  # type: ignore[arg-type]
