"""EM starts from a linear mixture on a shared feature map (``init="linear"`` of :class:`EMRewardMixture`).

Why: with few noisy answers per user (issue 10), EM's result is decided by its start. The
per-user gradient embedding of a pooled reward (``init="split"``/``"kmeans"``) sees only the
*first-order* evidence: how a user's strict answers pull the pooled reward. An "equal" answer
has zero gradient where the pooled reward sees no difference, so the evidence that tells two
FairGrid groups apart -- who says "equal" about which pairs -- is invisible to it, and the
pooled reward, fitted to the majority, is a poor reference for a small group.

What: the segments' last hidden layer ``H`` of the pooled reward (summed over a segment's
steps, as the reward is) is a feature map every member shares; a member's reward is then a
*linear head* ``w_k`` on it, ``R_k(a) - R_k(b) = w_k . (H(a) - H(b))``. Mixtures of such heads
are cheap (a few thousand comparisons of a few dozen features), so this module fits the whole
mixture -- heads, shares, a shared flip rate and (when there are "equal" answers) shared
tie parameters (Davidson or hurdle, :class:`~egalitarian_rl.rewards.bradley_terry.TieModel`) --
by soft EM with deterministic annealing, from many starts, and keeps
the start with the best penalised mixture log-likelihood. The heads are then written into the
members' last layers and the responsibilities start the neural EM.

Details:

* the features are whitened (PCA of the comparisons' feature differences, directions with
  negligible variance dropped, at most ``max_dim`` kept), so one isotropic ridge penalty
  ``ridge / 2 * |w_k|^2`` means the same for every env;
* the likelihood is :func:`~egalitarian_rl.rewards.bradley_terry.noisy_log_likelihood` with a
  learned flip rate ``m`` (annotators' mistakes) and, when the data have "equal" answers, a
  tie outcome (a tie is likely where a head sees no difference; ``LinearStartSettings.ties``
  picks Davidson or hurdle): what the start's
  clustering rests on, whatever likelihood the neural EM uses afterwards;
* annealing: the E-step's log-posteriors are divided by a temperature falling geometrically
  from ``t0`` to 1 over the first half of the iterations, so early iterations keep every user
  partly in every member and the heads separate gradually instead of locking in a random split;
* starts: one from k-means on the per-user gradients of the pooled head (the old
  ``"kmeans"`` start, in the whitened coordinates), the others from random Dirichlet
  responsibilities;
* cost is bounded: at most ``max_comparisons`` comparisons (whole users, drawn at random) are
  used to fit; every user is then assigned with the chosen heads.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from sklearn.cluster import KMeans

from egalitarian_rl.rewards.bradley_terry import ComparisonFeatures, TieModel, noisy_log_likelihood
from egalitarian_rl.rewards.nets import RewardMixture

#: The flip rate is ``MAX_MISTAKE_RATE * sigmoid(theta)``.
MAX_MISTAKE_RATE = 0.45
#: ``theta`` is clamped to +-this (the tie parameters are clamped by :class:`TieModel`): on
#: noiseless data the flip rate heads for 0, L-BFGS's line search then takes ``theta`` so low that
#: ``sigmoid`` underflows to 0 and ``log 0``'s infinite gradient turns every parameter into NaN.
MAX_LOGIT = 30.0


@dataclass(frozen=True)
class LinearStartSettings:
    """How the linear-mixture start is fitted (:func:`fit_linear_mixture`, :func:`linear_mixture_start`).

    :param n_starts: starts tried (the k-means one first, then random Dirichlet responsibilities).
    :param n_iter: most EM iterations per start (the temperature reaches 1 at half of them).
    :param ridge: ``ridge / 2 * |w_k|^2`` per head, in whitened units.
    :param t0: first temperature of the annealing (1 = no annealing).
    :param m_step_iter: L-BFGS iterations per M-step (warm-started).
    :param tol: once the temperature is 1, stop when no responsibility changes by more than this.
    :param max_dim: whitened feature dimensions kept at most.
    :param max_comparisons: fit on whole users drawn at random until this many comparisons;
        all users are then assigned with the fitted heads.
    :param ties: tie model (``"davidson"`` or ``"hurdle"``) used when the data have "equal" answers.
    """

    n_starts: int = 8
    n_iter: int = 40
    ridge: float = 1.0
    t0: float = 4.0
    m_step_iter: int = 15
    tol: float = 1e-4
    max_dim: int = 32
    max_comparisons: int = 50_000
    ties: str = "davidson"


@dataclass
class SegmentHidden:
    """The last hidden layer of some members, summed over each distinct segment's (discounted) steps.

    :param hidden_sums: ``(S', M, h)`` one row per distinct table segment used by a comparison.
    :param pair_rows: ``(N, 2)`` row in ``hidden_sums`` of each comparison's ``a`` and ``b``.
    """

    hidden_sums: torch.Tensor
    pair_rows: torch.Tensor


def _segment_sums(table: ComparisonFeatures, discount: float, per_step: Callable[[torch.Tensor], torch.Tensor]) -> SegmentHidden:
    """``per_step`` features ``(M, c, L, F)`` of segments ``(c, L, D)``, summed over each distinct compared segment's
    (discounted) steps, streamed ``table.chunk_size`` segments at a time: ``hidden_sums`` ``(S', M, F)``."""
    step_weights = discount ** torch.arange(table.length, dtype=torch.float32)
    needed, inverse = torch.unique(table.pairs.reshape(-1), return_inverse=True)
    sums: torch.Tensor | None = None
    with torch.no_grad():
        for start in range(0, len(needed), table.chunk_size):
            summed = torch.einsum("mclf,l->cmf", per_step(table.segments(needed[start : start + table.chunk_size])), step_weights)
            if sums is None:
                sums = torch.empty(len(needed), *summed.shape[1:])
            sums[start : start + len(summed)] = summed
    assert sums is not None
    return SegmentHidden(sums, inverse.view(-1, 2))


def segment_hidden_sums(reward: RewardMixture, table: ComparisonFeatures, members: list[int], discount: float) -> SegmentHidden:
    """``H`` of members ``members`` for every distinct segment of ``table``'s comparisons, streamed in chunks."""

    def hidden(segments: torch.Tensor) -> torch.Tensor:  # (c, L, D) -> (M, c, L, h)
        flat = reward.hidden(segments.reshape(-1, segments.shape[-1]), members)
        return flat.reshape(len(members), len(segments), table.length, -1)

    return _segment_sums(table, discount, hidden)


def segment_input_sums(table: ComparisonFeatures, discount: float) -> SegmentHidden:
    """The members' raw inputs summed over each distinct segment's (discounted) steps, laid out like :func:`segment_hidden_sums`.

    A head on these is a reward *linear in the inputs* (FairGrid, whose observation is a one-hot cell:
    exactly its groups' per-cell rewards), a class the pooled reward's hidden layer need not contain when
    that reward was fitted mostly to the majority.

    :return: ``hidden_sums`` ``(S', 1, D)`` with ``D`` the members' input size, and the comparisons' ``pair_rows``.
    """
    return _segment_sums(table, discount, lambda segments: segments[None])


def whiten(features: torch.Tensor, pair_rows: torch.Tensor, max_dim: int, rel_eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Whitening of segment features by the covariance of the comparisons' differences.

    :param features: ``(S', h)`` per-segment features.
    :param pair_rows: ``(N, 2)`` rows of the compared segments.
    :param max_dim: keep at most this many principal directions (largest variance first).
    :param rel_eps: drop directions whose variance is below ``rel_eps`` times the largest.
    :return: ``z`` ``(S', d)`` float64 whitened features and ``projection`` ``(h, d)`` with
        ``z = features @ projection``, so that a head ``w`` on ``z`` is the head
        ``projection @ w`` on the original features.
    """
    x = features.double()
    diff = x[pair_rows[:, 0]] - x[pair_rows[:, 1]]
    cov = diff.T @ diff / max(len(diff), 1)
    values, vectors = torch.linalg.eigh(cov)
    order = torch.argsort(values, descending=True)
    values, vectors = values[order], vectors[:, order]
    keep = int(min(max_dim, int((values > rel_eps * values[0].clamp_min(1e-300)).sum())))
    keep = max(keep, 1)
    projection = vectors[:, :keep] / values[:keep].clamp_min(1e-300).sqrt()
    return x @ projection, projection


@dataclass
class LinearMixture:
    """A fitted mixture of linear heads on whitened features (see the module docstring).

    :param heads: ``(K, d)`` head of every member on the whitened features.
    :param responsibilities: ``(U, K)`` posterior of every user (temperature 1, fitted shares as prior).
    :param shares: ``(K,)`` mixing weights.
    :param mistake_rate: fitted shared flip rate.
    :param ties: tie model used (``"davidson"``/``"hurdle"``; ``None`` without "equal" answers).
    :param tie_params: ``(P,)`` its fitted shared parameters (:class:`TieModel`), clamped;
        ``None`` without "equal" answers.
    :param objective: penalised mixture log-likelihood on the comparisons it was fitted to.
    :param restart_objectives: that objective for every start tried, in order.
    """

    heads: torch.Tensor
    responsibilities: np.ndarray
    shares: np.ndarray
    mistake_rate: float
    ties: str | None
    tie_params: np.ndarray | None
    objective: float
    restart_objectives: list[float] = field(default_factory=list)


class _Likelihood:
    """Per-comparison log-likelihood of K linear heads, with shared flip rate and tie parameters.

    :param ties: tie model (``"davidson"``/``"hurdle"``), or ``None``: "equal" is the soft target 0.5.
    """

    def __init__(self, z: torch.Tensor, pair_rows: torch.Tensor, labels: torch.Tensor, ties: str | None) -> None:
        self.z, self.pair_rows, self.labels, self.ties = z, pair_rows, labels.double()[:, None], ties

    def __call__(self, heads: torch.Tensor, theta_m: torch.Tensor, tie_params: torch.Tensor) -> torch.Tensor:
        """``(N, K)`` log-likelihood of every comparison under every head.

        :param heads: ``(K, d)``; ``theta_m``: ``()`` flip-rate logit; ``tie_params``: ``(P,)`` (ignored without ties).
        """
        scores = self.z @ heads.T  # (S', K)
        logits = scores[self.pair_rows[:, 0]] - scores[self.pair_rows[:, 1]]
        m = MAX_MISTAKE_RATE * torch.sigmoid(theta_m.clamp(-MAX_LOGIT, MAX_LOGIT))
        ties = None if self.ties is None else TieModel(self.ties, tie_params)
        return noisy_log_likelihood(logits, self.labels, m.expand(heads.shape[0]), ties)


def _user_sums(values: torch.Tensor, user_index: torch.Tensor, n_users: int) -> torch.Tensor:
    return torch.zeros(n_users, values.shape[1], dtype=values.dtype).index_add_(0, user_index, values)


def _posterior(user_ll: torch.Tensor, shares: torch.Tensor, temperature: float) -> torch.Tensor:
    joint = (user_ll + shares.clamp_min(1e-12).log()) / temperature
    return torch.softmax(joint, dim=1)


def _m_step(
    optimizer: torch.optim.LBFGS, likelihood: _Likelihood, heads: torch.Tensor, theta_m: torch.Tensor, tie_params: torch.Tensor,
    weights: torch.Tensor, ridge: float,
) -> None:  # fmt: skip
    """Maximise the responsibility-weighted log-likelihood minus the ridge penalty (warm-started L-BFGS)."""

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = -(likelihood(heads, theta_m, tie_params) * weights).sum() + 0.5 * ridge * heads.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)


def fit_linear_mixture(
    z: torch.Tensor,
    pair_rows: torch.Tensor,
    labels: torch.Tensor,
    user_index: torch.Tensor,
    n_users: int,
    k: int,
    settings: LinearStartSettings = LinearStartSettings(),
    *,
    initial: list[np.ndarray] | None = None,
    seed: int = 0,
) -> LinearMixture:
    """Soft EM with deterministic annealing for a mixture of K linear heads, best of ``settings.n_starts``.

    :param z: ``(S', d)`` whitened segment features (:func:`whiten`).
    :param pair_rows: ``(N, 2)`` rows of ``z`` compared by each comparison.
    :param labels: ``(N,)`` answers in {0, 0.5, 1}.
    :param user_index: ``(N,)`` user (``0..n_users-1``) of each comparison.
    :param n_users: number of users.
    :param k: number of heads.
    :param settings: starts, iterations, ridge, annealing, tie model (:class:`LinearStartSettings`).
    :param initial: ``(U, K)`` responsibilities to start from before the random ones.
    :param seed: seeds the random starts.
    """
    ties = settings.ties if bool((labels == 0.5).any()) else None
    likelihood = _Likelihood(z, pair_rows, labels, ties)
    rng = np.random.default_rng(seed)
    starts = list(initial or [])
    while len(starts) < settings.n_starts:
        starts.append(rng.dirichlet(np.ones(k), size=n_users))
    best: LinearMixture | None = None
    objectives = []
    anneal = max(1, settings.n_iter // 2)
    for start in starts[: settings.n_starts]:
        resp = torch.as_tensor(start, dtype=torch.float64)
        heads = torch.zeros(k, z.shape[1], dtype=torch.float64, requires_grad=True)
        theta_m = torch.tensor(math.log(0.1 / (MAX_MISTAKE_RATE - 0.1)), dtype=torch.float64, requires_grad=True)
        tie_params = torch.as_tensor(TieModel.initial(ties or "davidson"), dtype=torch.float64).requires_grad_(True)
        optimizer = torch.optim.LBFGS([heads, theta_m, tie_params], max_iter=settings.m_step_iter, line_search_fn="strong_wolfe")
        for iteration in range(settings.n_iter):
            _m_step(optimizer, likelihood, heads, theta_m, tie_params, resp[user_index], settings.ridge)
            with torch.no_grad():
                user_ll = _user_sums(likelihood(heads, theta_m, tie_params), user_index, n_users)
                temperature = settings.t0 ** max(0.0, 1.0 - iteration / anneal)
                new = _posterior(user_ll, resp.mean(0), temperature)
                settled = temperature == 1.0 and float((new - resp).abs().max()) < settings.tol
                resp = new
            if settled:
                break
        with torch.no_grad():
            user_ll = _user_sums(likelihood(heads, theta_m, tie_params), user_index, n_users)
            shares = resp.mean(0)
            mixture = torch.logsumexp(user_ll + shares.clamp_min(1e-12).log(), dim=1).sum()
            objective = float(mixture - 0.5 * settings.ridge * heads.square().sum())
            resp = _posterior(user_ll, shares, 1.0)
        objectives.append(objective)
        if math.isfinite(objective) and (best is None or objective > best.objective):
            best = LinearMixture(
                heads.detach().clone(), resp.numpy(), shares.numpy(),
                float(MAX_MISTAKE_RATE * torch.sigmoid(theta_m.detach().clamp(-MAX_LOGIT, MAX_LOGIT))),
                ties, None if ties is None else TieModel(ties, tie_params.detach()).clamped().numpy(), objective,
            )  # fmt: skip
    if best is None:
        raise FloatingPointError(f"linear EM start: every one of {len(objectives)} starts ended with a non-finite likelihood")
    best.restart_objectives = objectives
    return best


def gradient_embedding(
    z: torch.Tensor, pair_rows: torch.Tensor, labels: torch.Tensor, user_index: torch.Tensor, n_users: int
) -> np.ndarray:
    """``(U, d)`` per-user mean Bradley-Terry gradient of one pooled linear head (fitted here) on ``z``."""
    likelihood = _Likelihood(z, pair_rows, labels, ties=None)
    head = torch.zeros(1, z.shape[1], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([head], max_iter=50, line_search_fn="strong_wolfe")
    zero = torch.tensor(-50.0, dtype=torch.float64)  # flip rate ~ 0

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = -likelihood(head, zero, zero).sum() + 0.5 * head.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        diff = z[pair_rows[:, 0]] - z[pair_rows[:, 1]]
        residual = labels.double() - torch.sigmoid(diff @ head[0])
        grads = _user_sums(residual[:, None] * diff, user_index, n_users)
        counts = torch.bincount(user_index, minlength=n_users).clamp_min(1).double()
    return (grads / counts[:, None]).numpy()


def linear_mixture_start(
    hidden: SegmentHidden,
    labels: torch.Tensor,
    user_index: torch.Tensor,
    n_users: int,
    k: int,
    settings: LinearStartSettings = LinearStartSettings(),
    *,
    seed: int = 0,
) -> tuple[LinearMixture, torch.Tensor]:
    """Fit :func:`fit_linear_mixture` on the pooled member's features; return it and the heads in hidden space.

    :param hidden: :func:`segment_hidden_sums` of the pooled member (member axis of size 1).
    :param labels: ``(N,)`` answers.
    :param user_index: ``(N,)`` user of each comparison.
    :param n_users: number of users.
    :param k: number of members.
    :param settings: how to fit (:class:`LinearStartSettings`; ``max_comparisons`` bounds the
        comparisons fitted on, whole users drawn at random; all users are assigned with the fitted heads).
    :return: the mixture (responsibilities of *all* users) and ``(K, h)`` heads on the hidden layer.
    """
    features = hidden.hidden_sums[:, 0, :]
    rng = np.random.default_rng(seed)
    counts = np.bincount(user_index.numpy(), minlength=n_users)
    if counts.sum() > settings.max_comparisons:
        order = rng.permutation(n_users)
        chosen = order[: max(k, int(np.searchsorted(np.cumsum(counts[order]), settings.max_comparisons)))]
        fit_users = np.zeros(n_users, dtype=bool)
        fit_users[chosen] = True
    else:
        fit_users = np.ones(n_users, dtype=bool)
    rows = torch.as_tensor(fit_users)[user_index]
    z, projection = whiten(features, hidden.pair_rows[rows], settings.max_dim)
    renumber = torch.as_tensor(np.cumsum(fit_users) - 1)
    fit_index = renumber[user_index[rows]]
    n_fit = int(fit_users.sum())
    initial = []
    if k > 1:
        embedding = gradient_embedding(z, hidden.pair_rows[rows], labels[rows], fit_index, n_fit)
        initial.append(np.eye(k)[KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(embedding)])
    else:
        initial.append(np.ones((n_fit, 1)))
    if k == 1:
        settings = replace(settings, n_starts=1)
    mixture = fit_linear_mixture(z, hidden.pair_rows[rows], labels[rows], fit_index, n_fit, k, settings, initial=initial, seed=seed)
    if not fit_users.all():
        # Every user's posterior under the chosen heads and shares.
        likelihood = _Likelihood(features.double() @ projection, hidden.pair_rows, labels, mixture.ties)
        theta_m = torch.logit(torch.tensor(mixture.mistake_rate / MAX_MISTAKE_RATE, dtype=torch.float64))
        tie_params = torch.as_tensor(mixture.tie_params if mixture.tie_params is not None else np.zeros(1), dtype=torch.float64)
        with torch.no_grad():
            user_ll = _user_sums(likelihood(mixture.heads, theta_m, tie_params), user_index, n_users)
        mixture.responsibilities = _posterior(user_ll, torch.as_tensor(mixture.shares), 1.0).numpy()
    return mixture, (projection @ mixture.heads.T).T.float()
