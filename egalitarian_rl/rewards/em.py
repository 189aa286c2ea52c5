"""EM reward mixture (MaxMin-RLHF, "Learning Rewards with EM"): K rewards for K hidden user groups.

Users fall into groups with different reward functions, but nobody tells us
which user is in which group. EM alternates:

* **E-step** -- for every *user* (all their comparisons together) and every
  member ``k``, the summed Bradley-Terry log-likelihood ``LL[u, k]``. Hard EM
  (the paper's) assigns the user to ``argmax_k LL[u, k]``; soft EM keeps the
  responsibilities ``softmax_k(LL[u, k] + log share_k)``.
* **M-step** -- every member is trained on its users' comparisons (weighted
  by responsibility in soft EM), continuing from its current parameters.

until no assignment changes (or the log-likelihood changes by less than
``tol`` relative) or ``max_iter`` iterations.

Initialisation avoids the degenerate "everyone in one cluster" start. A
single BT reward is fitted to all the data and copied into every member.
Each user is then described by the gradient of their log-likelihood with
respect to the last layer of the reward that represents them
(``mean_i (y_i - P_i(a > b)) * (H(a_i) - H(b_i))``, ``H`` = a segment's summed
last hidden layer), i.e. *how that reward would have to change to explain
this user*: a well-served group has small, incoherent gradients, a group the
reward ignores has large, consistent ones. ``init="split"`` (default) splits
clusters one at a time with 2-means on this embedding, refitting the members
in between, so a small group hidden behind a large one is found once the
large one has a member of its own; ``init="kmeans"`` runs k-means++
(sklearn's ``KMeans``) once on the pooled reward's embedding;
``init="random"`` starts from a random balanced partition and fresh members.
``n_init`` restarts keep the fit with the best final log-likelihood.

After EM stops, a last, longer M-step (``final_epochs``) trains every member
on its final users and keeps each member's best epoch on held-out comparisons
(never trained on): EM can stop after a few short M-steps, before the members
are fully trained. A final E-step on those returned rewards then sets
``assignments_``, ``responsibilities_`` and ``shares_`` (E-steps with the rewards
fixed until the shares stop changing), with the rule :meth:`EMRewardMixture.assign_users`
uses: the posterior with the fitted shares as prior. So ``assign_users(train)``
equals ``assignments_`` and the ARI of the assignments is the returned model's.

M-step budget: ``m_step_epochs`` per EM iteration, ``final_epochs`` for the final
M-step, ``init_epochs`` for the pooled reward the initialisation starts from. An epoch
trains the largest member on at most ``max_epoch_comparisons`` comparisons (a fresh random
subset each epoch, the other members in proportion): on large data the members, warm-started,
need no full pass per EM iteration, and the M-steps' cost stops growing with the data (the
E-steps still score every comparison).

Noisy annotators (issue 10), all off by default, measured in ``benchmarks/em_noise.py``:
``mistake_rate`` puts B-Pref's answer flips into the likelihood (given, or one
learned rate); ``shared_scale`` gives every member the same confidence in the
E-step, so users are not grouped by how noisily they answer; ``cross_fit`` scores
every user with out-of-fold members, removing the pull of in-sample likelihoods
towards whatever partition the members were just fitted to.

Empty clusters (hard EM): a member left without users takes over the users
the current fit explains worst (lowest mean log-likelihood per comparison,
``reseed_fraction`` of all users), so K members stay in use. In soft EM a
member's share may shrink towards zero; it is kept as it is.

Large data (issue 10): every distinct segment is encoded once (float32; normalisation statistics
streamed in float64, never a float64 copy of the data) into a segment table that comparisons index
(a :class:`~egalitarian_rl.preferences.dataset.PooledPreferenceDataset` stores its segments that way
too), M-steps read mini-batches from it, and E-steps, embeddings and held-out scores stream over it
in chunks, scoring each distinct segment once. ``max_memory_mb`` bounds the memory EM allocates for
the data (see :meth:`EMRewardMixture.memory_plan`): the table is cached only if it fits, otherwise
re-encoded from the raw segments per chunk, and chunks shrink to fit; ``memory_plan_`` records
what was chosen. Without the flag the table is cached and chunks are 512 segments.

Users and bad input: every user listed in the dataset must have at least one
comparison (``ValueError`` naming the user otherwise; drop them with
``dataset.for_users``), K must lie in ``1..n_users``, an empty dataset is
rejected, and a non-finite loss or log-likelihood raises
:class:`~egalitarian_rl.rewards.bradley_terry.RewardTrainingError`.
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import os
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from sklearn.cluster import KMeans
from tqdm.auto import tqdm

from egalitarian_rl.io import write_text_atomic
from egalitarian_rl.preferences.dataset import PooledPreferenceDataset, PreferenceDataset
from egalitarian_rl.rewards import em_start
from egalitarian_rl.rewards.bradley_terry import (
    DEFAULT_CHUNK_SEGMENTS,
    TIE_PARAMETERS,
    ComparisonFeatures,
    RewardTrainingError,
    TieModel,
    build_comparison_features,
    noisy_log_likelihood,
    pair_logits,
    train_reward,
)
from egalitarian_rl.rewards.metrics import (
    AccuracyReport,
    accuracy_from_differences,
    adjusted_rand_index,
    purity,
    return_differences,
)
from egalitarian_rl.rewards.nets import RewardMixture, space_from_json, space_to_json, spaces_from_dataset

_FORMAT = "egalitarian_rl.EMRewardMixture"
_FORMAT_VERSION = 1
_REWARD_FILE = "reward.safetensors"
_STATE_FILE = "em.json"


class NotFittedError(RuntimeError):
    """The mixture has not been fitted (or loaded) yet."""


def _check_users_have_comparisons(dataset: PreferenceDataset, what: str) -> None:
    if len(dataset) == 0:
        raise ValueError(f"{what}: the preference dataset is empty (no comparisons)")
    counts = dataset.comparisons_per_user()
    missing = dataset.users[counts == 0]
    if len(missing):
        shown = ", ".join(str(u) for u in missing[:10].tolist()) + (" ..." if len(missing) > 10 else "")
        raise ValueError(
            f"{what}: user {shown} has no comparisons ({len(missing)} such users); an EM user needs at least one. "
            "Drop them with dataset.for_users(...) first."
        )


#: What the ``"linear"`` start's heads read (``EMRewardMixture(linear_features=...)``).
LINEAR_FEATURES = ("hidden", "inputs", "both")


@dataclass(frozen=True)
class Assignment:
    """One user's group, as decided from their comparisons by :meth:`EMRewardMixture.assign_with_confidence`.

    :param member: the assigned member, or ``None`` when ``confidence`` is below the threshold
        asked for (the caller should not personalise).
    :param best_member: the most probable member, whatever its confidence.
    :param posterior: ``(K,)`` posterior probability of each member.
    :param n_comparisons: how many comparisons the decision rests on.
    """

    member: int | None
    best_member: int
    posterior: np.ndarray
    n_comparisons: int

    @property
    def confidence(self) -> float:
        """Posterior probability of ``best_member``."""
        return float(self.posterior[self.best_member])


def _posterior(user_ll: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """``(U, K)`` posterior from log-likelihoods ``(U, K)`` and a prior ``(K,)`` (need not sum to 1)."""
    joint = user_ll + np.log(np.clip(prior, 1e-12, None))
    return np.exp(joint - np.logaddexp.reduce(joint, axis=1, keepdims=True))


def _posterior_or_hard(user_ll: np.ndarray, prior: np.ndarray, hard: bool, k: int) -> np.ndarray:
    """Posterior ``(U, K)``, or its argmax one-hot when ``hard``."""
    posterior = _posterior(user_ll, prior)
    return np.eye(k)[posterior.argmax(1)] if hard else posterior


class EMRewardMixture:
    """K Bradley-Terry rewards for K hidden user groups, fitted by (hard or soft) EM over users.

    :param n_components: ``K``, the number of reward members / groups (>= 1).
    :param observation_space: the env's observation space; inferred from the data at ``fit`` if ``None``.
    :param action_space: the env's action space; inferred likewise (Discrete from ``metadata["n_actions"]``).
    :param soft: soft EM (responsibilities, shares as mixing weights) instead of the paper's hard EM.
    :param hidden_sizes: hidden widths of every member's MLP.
    :param use_state: feed ``s`` to the rewards; ``use_action`` feeds ``a``; ``use_next_state`` feeds ``s'``.
    :param init: ``"split"`` (divisive: repeatedly 2-means the per-user gradient embedding of a
        cluster and split it), ``"kmeans"`` (k-means++ once on the per-user gradients of the
        pooled BT fit) or ``"random"`` (random balanced partition, fresh members).
        ``"linear"``: a mixture of linear heads on the pooled reward's last hidden layer, fitted by
        annealed soft EM from ``linear_starts`` starts (:mod:`~egalitarian_rl.rewards.em_start`);
        its heads become the members' last layers and its responsibilities start EM. Use it with
        ``ties="davidson"`` and ``mistake_rate="learn"`` (the start's own likelihood): with plain
        Bradley-Terry the first EM iterations undo it (FairGrid 80/20, 20 answers, mistake rate
        0.1, beta 2: start ARI 1.00, EM 0.06-0.28 over 3 seeds; with both options EM 1.00).
    :param linear_features: what the ``"linear"`` start's heads read, summed over a segment's steps:
        ``"hidden"`` (the pooled reward's last hidden layer; the heads are then written into the members),
        ``"inputs"`` (the members' raw inputs: rewards linear in them, which the pooled reward's hidden
        layer, fitted mostly to the majority, need not represent for a small group) or ``"both"``
        (side by side). With ``"inputs"`` and ``"both"`` only the responsibilities start EM; the members
        start as copies of the pooled reward. Neither wins everywhere (benchmarks/em_noise.py): on
        FairGrid 80/20 with 5 answers per user, ``"inputs"`` is closer to the oracle in all 9 cells
        (mean gap 0.101 against 0.145, 5 seeds); on the tests' 16-cell toy, whose one hidden layer on
        one-hot cells spans the inputs anyway, it is worse (4 answers: 0.30-0.39 against 0.47-0.77),
        because the hidden start's heads carry into the members and the inputs start's do not.
    :param n_init: EM restarts (different k-means / random seeds); the best final log-likelihood wins.
    :param max_iter: maximum EM iterations per restart.
    :param tol: stop when the log-likelihood changes by less than ``tol`` relative.
    :param assignment_tol: hard EM also stops when at most this share of users changed member
        (0 = only when no assignment changes; users equally well explained by two members
        representing one group can otherwise swap back and forth until ``max_iter``).
    :param init_epochs: epochs of the pooled BT fit that ``"split"`` and ``"kmeans"`` start from.
    :param split_iterations: hard EM iterations after each intermediate split of ``"split"``.
    :param m_step_epochs: epochs per M-step (warm-started, so a few suffice).
    :param final_epochs: epochs of a last, longer M-step on the final groups, after which every
        member keeps its parameters of the epoch with its best held-out loss (0 = none).
    :param final_patience: stop that M-step after this many epochs without improvement; ``None``
        (default) runs all ``final_epochs`` (a fixed budget: fit time then scales linearly with
        the data) and keeps each member's best held-out epoch.
    :param max_epoch_comparisons: most comparisons the largest member trains on in one epoch of
        any M-step (the pooled fit, EM's M-steps, the final M-step); beyond it each epoch draws a
        fresh random subset, the same fraction of every member's comparisons. The default,
        100,000 (about 780 steps of 128), changes nothing up to about 110,000 comparisons; at
        1,000,000 (60/30/10 groups) a default fit's M-steps visit about 2 million comparisons
        instead of 12.6 million (benchmarks/em_scaling.py). ``None``: always full passes.
    :param validation_fraction: share of comparisons (drawn at random, seeded) that M-steps never
        train on, so that the final M-step's choice of epoch is honest. E-steps use every comparison.
    :param lr: Adam learning rate.
    :param batch_size: comparisons per step for the largest member.
    :param weight_decay: decoupled (AdamW-style) weight decay.
    :param discount: step ``t`` of a segment is weighted ``discount ** t`` in its return.
    :param normalize_inputs: standardise continuous inputs with statistics of the training data.
    :param reseed_fraction: share of users (at least one) moved to a member that lost all its users.
    :param mistake_rate: annotator noise in the likelihood (training and E-steps):
        ``P(a > b) = m + (1 - 2 m) sigmoid(R(a) - R(b))``. ``None``: plain Bradley-Terry
        (``m = 0``); a number in [0, 0.5): that known flip rate for every member; ``"learn"``:
        one ``m`` shared by all members, re-estimated after every M-step (maximum likelihood
        over a grid of 0..0.45). Fitted values are in ``mistake_rates_``.
    :param ties: ``"davidson"``: an "equal" answer is a third outcome with its own likelihood,
        ``P(equal) = nu / (e^(d/2) + e^(-d/2) + nu)`` for a return difference ``d``, with one
        ``nu`` for all members fitted after every M-step (``tie_log_nu_``), in training and
        E-steps (:func:`~egalitarian_rl.rewards.bradley_terry.noisy_log_likelihood`). ``None``:
        "equal" is the soft target 0.5, which is nearly flat in ``d`` and so says little about
        which group a user belongs to. With true rewards on FairGrid (half the answers
        "equal"), scoring users this way raised the oracle's ARI from 0.49-0.87 to 0.82-1.00.
        ``"hurdle"``: ``P(equal) = sigmoid(c - s |d|)`` and strict answers Bradley-Terry given
        not "equal" (:class:`~egalitarian_rl.rewards.bradley_terry.TieModel`), with ``c`` and
        ``s`` shared by all members and fitted by L-BFGS after every M-step: the tie
        probability's sharpness ``s`` is learned apart from the preference logit's scale,
        to which Davidson binds it. Fitted parameters are in ``tie_params_``. Measured on
        em_noise (FairGrid 80/20, init="linear", mistake_rate="learn", same data as Davidson):
        no better overall. 10 answers: mean ARI 0.968 vs Davidson 0.956 (27 runs, oracle 0.990);
        5 answers: 0.660 vs 0.667 (35 runs, oracle 0.817), per run -0.64..+0.31 (one collapse,
        5/0.2/2 seed 1: 0.72 -> 0.08). In the two 5-answer runs diagnosed its linear start drove
        ``c`` to the clamp (start ARI 0.51/0.38 vs Davidson 0.56/0.48) and hard EM took 30 and
        11 iterations, wandering, where Davidson settled in 4 and 7.
    :param shared_scale: in the E-step likelihood, rescale every member's return differences to
        one common confidence (RMS 1 times a shared, fitted rationality ``beta``; ``logit_scales_``),
        so users are grouped by what they prefer, not by how noisily they answer.
    :param cross_fit: out-of-fold E-steps. Every user's comparisons are split in two halves and
        every member has a twin; member ``k`` trains on the first halves of its users, its twin on
        the second halves, and a user's log-likelihood under ``k`` sums each half under the copy
        that did *not* train on it. In-sample likelihoods favour whatever partition the members
        were just fitted to, so with few noisy answers per user hard EM drifts away from the true
        groups even when started on them; out-of-fold evidence removes that pull. Costs twice
        the M-step compute. After EM, member ``k`` is trained on all its users' comparisons in
        the final M-step (``final_epochs``, at least ``m_step_epochs``) and the twins are dropped.
    :param max_memory_mb: upper bound, in MiB, on the memory EM allocates for the data it works
        on: the encoded segment table (cached only if it fits), per-comparison and per-segment
        arrays, one M-step mini-batch and one streamed chunk (estimated before fitting, see
        :meth:`memory_plan`). Not counted: the dataset the caller holds, the networks, Python and
        torch themselves. ``None`` (default): cache the table, 512-segment chunks. A budget too
        small for the per-comparison arrays raises ``ValueError`` at ``fit``.
    :param seed: seeds everything (initialisation, k-means, shuffling).
    :param logger: SB3-style logger; ``em/*`` scalars are recorded and dumped once per EM iteration.
    :param progress_bar: show a tqdm bar over EM iterations.
    """

    def __init__(
        self,
        n_components: int,
        observation_space: gym.Space | None = None,
        action_space: gym.Space | None = None,
        *,
        soft: bool = False,
        hidden_sizes: Sequence[int] = (64, 64),
        use_state: bool = True,
        use_action: bool = True,
        use_next_state: bool = False,
        init: str = "split",
        n_init: int = 1,
        max_iter: int = 30,
        tol: float = 1e-4,
        assignment_tol: float = 0.01,
        init_epochs: int = 5,
        split_iterations: int = 1,
        m_step_epochs: int = 1,
        final_epochs: int = 6,
        final_patience: int | None = None,
        max_epoch_comparisons: int | None = 100_000,
        validation_fraction: float = 0.1,
        lr: float = 3e-3,
        batch_size: int = 128,
        weight_decay: float = 1e-4,
        discount: float = 1.0,
        normalize_inputs: bool = True,
        reseed_fraction: float = 0.05,
        mistake_rate: float | str | None = None,
        ties: str | None = None,
        shared_scale: bool = False,
        cross_fit: bool = False,
        linear_starts: int = 8,
        linear_ridge: float = 1.0,
        linear_anneal: float = 4.0,
        linear_features: str = "hidden",
        max_memory_mb: float | None = None,
        seed: int = 0,
        logger: Any = None,
        progress_bar: bool = False,
    ) -> None:
        if not isinstance(n_components, (int, np.integer)) or n_components < 1:
            raise ValueError(f"n_components (K) must be an integer >= 1, got {n_components!r}")
        if init not in ("split", "kmeans", "random", "linear"):
            raise ValueError(f"init must be 'split', 'kmeans', 'random' or 'linear', got {init!r}")
        if linear_starts < 1 or not linear_ridge > 0 or not linear_anneal >= 1:
            raise ValueError(
                f"need linear_starts >= 1, linear_ridge > 0 and linear_anneal >= 1, got {linear_starts}, {linear_ridge}, {linear_anneal}"
            )
        if linear_features not in LINEAR_FEATURES:
            raise ValueError(f"linear_features must be one of {LINEAR_FEATURES}, got {linear_features!r}")
        if not 0.0 <= validation_fraction < 1.0:
            raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
        if not (mistake_rate is None or mistake_rate == "learn" or (isinstance(mistake_rate, (int, float)) and 0 <= mistake_rate < 0.5)):
            raise ValueError(f"mistake_rate must be None, 'learn' or a number in [0, 0.5), got {mistake_rate!r}")
        if ties is not None and ties not in TIE_PARAMETERS:
            raise ValueError(f"ties must be None (soft target 0.5), 'davidson' or 'hurdle', got {ties!r}")
        if n_init < 1 or max_iter < 1:
            raise ValueError(f"n_init and max_iter must be >= 1, got {n_init} and {max_iter}")
        if max_epoch_comparisons is not None and (
            isinstance(max_epoch_comparisons, bool) or not isinstance(max_epoch_comparisons, (int, np.integer)) or max_epoch_comparisons < 1
        ):
            raise ValueError(f"max_epoch_comparisons must be an integer >= 1 or None, got {max_epoch_comparisons!r}")
        if max_memory_mb is not None and (
            isinstance(max_memory_mb, bool) or not isinstance(max_memory_mb, (int, float)) or not max_memory_mb > 0
        ):
            raise ValueError(f"max_memory_mb must be a positive number of MiB or None, got {max_memory_mb!r}")
        self.n_components = int(n_components)
        self.observation_space = observation_space
        self.action_space = action_space
        self.soft = soft
        self.hidden_sizes = tuple(int(h) for h in hidden_sizes)
        self.use_state, self.use_action, self.use_next_state = use_state, use_action, use_next_state
        self.init = init
        self.n_init = n_init
        self.max_iter = max_iter
        self.tol = tol
        self.assignment_tol = assignment_tol
        self.init_epochs = init_epochs
        self.split_iterations = split_iterations
        self.m_step_epochs = m_step_epochs
        self.final_epochs = final_epochs
        self.final_patience = final_patience
        self.max_epoch_comparisons = None if max_epoch_comparisons is None else int(max_epoch_comparisons)
        self.validation_fraction = validation_fraction
        self.lr = lr
        self.batch_size = batch_size
        self.weight_decay = weight_decay
        self.discount = discount
        self.normalize_inputs = normalize_inputs
        self.reseed_fraction = reseed_fraction
        self.mistake_rate = mistake_rate
        self.ties = ties
        self.shared_scale = shared_scale
        self.cross_fit = cross_fit
        self.linear_starts = int(linear_starts)
        self.linear_ridge = float(linear_ridge)
        self.linear_features = linear_features
        self.linear_anneal = float(linear_anneal)
        self.max_memory_mb = None if max_memory_mb is None else float(max_memory_mb)
        self.seed = seed
        self.logger = logger
        self.progress_bar = progress_bar

        #: The K fitted rewards (``None`` before ``fit``).
        self.reward: RewardMixture | None = None
        #: Observation / action spaces the rewards were built for (given or inferred from the data).
        self.observation_space_: gym.Space | None = None
        self.action_space_: gym.Space | None = None
        #: ``(U,)`` user ids the assignments refer to.
        self.users_: np.ndarray | None = None
        #: ``(U,)`` member index of every user: the final E-step of the returned rewards, the same
        #: rule as :meth:`assign_users` (MAP with ``shares_``), so ``assign_users(train)`` equals it.
        self.assignments_: np.ndarray | None = None
        #: ``(U, K)`` responsibilities (one-hot in hard EM; posterior with prior ``shares_`` in soft EM).
        self.responsibilities_: np.ndarray | None = None
        #: ``(U, K)`` posterior group probabilities of every fitted user under the returned rewards
        #: (prior ``shares_``): equal to ``responsibilities_`` in soft EM, the uncertainty that hard
        #: EM's one-hot assignments drop. :meth:`heldout_user_scores` weights the members with it.
        self.posteriors_: np.ndarray | None = None
        #: ``(K,)`` mixing weights: the prior of the final E-step, equal (at its fixed point) to the
        #: mean of ``responsibilities_``.
        self.shares_: np.ndarray | None = None
        #: Final EM objective (hard: sum of each user's LL under their member; soft: mixture LL).
        self.log_likelihood_: float = float("nan")
        #: Per EM iteration of the kept restart: log_likelihood, changed, shares, train_loss, seconds, (ari, purity).
        self.history_: list[dict[str, Any]] = []
        #: ``(K,)`` answer-flip probability of each member's likelihood (zeros for plain BT).
        self.mistake_rates_: np.ndarray | None = None
        #: ``(P,)`` parameters of the tie model shared by all members (``None`` unless ``ties`` is set):
        #: ``[log nu]`` for ``"davidson"``, ``[c, log s]`` for ``"hurdle"``
        #: (:class:`~egalitarian_rl.rewards.bradley_terry.TieModel`).
        self.tie_params_: np.ndarray | None = None
        #: ``(K,)`` factor on each member's return differences in the likelihood (ones unless ``shared_scale``).
        self.logit_scales_: np.ndarray | None = None
        self.n_iter_: int = 0
        self.converged_: bool = False
        #: How the last fit held its data (see :meth:`memory_plan`): table cached or streamed, chunk size, estimate.
        self.memory_plan_: dict[str, Any] | None = None

    @property
    def tie_log_nu_(self) -> float | None:
        """``log nu`` of the Davidson tie model (``None`` unless ``ties="davidson"`` and fitted)."""
        return float(self.tie_params_[0]) if self.ties == "davidson" and self.tie_params_ is not None else None

    # ----------------------------------------------------------------- helpers
    def hyperparameters(self) -> dict[str, Any]:
        """JSON-serialisable constructor arguments (without spaces, logger and progress bar)."""
        return {
            "n_components": self.n_components,
            "soft": self.soft,
            "hidden_sizes": list(self.hidden_sizes),
            "use_state": self.use_state,
            "use_action": self.use_action,
            "use_next_state": self.use_next_state,
            "init": self.init,
            "n_init": self.n_init,
            "max_iter": self.max_iter,
            "tol": self.tol,
            "assignment_tol": self.assignment_tol,
            "init_epochs": self.init_epochs,
            "split_iterations": self.split_iterations,
            "m_step_epochs": self.m_step_epochs,
            "final_epochs": self.final_epochs,
            "final_patience": self.final_patience,
            "max_epoch_comparisons": self.max_epoch_comparisons,
            "validation_fraction": self.validation_fraction,
            "lr": self.lr,
            "batch_size": self.batch_size,
            "weight_decay": self.weight_decay,
            "discount": self.discount,
            "normalize_inputs": self.normalize_inputs,
            "reseed_fraction": self.reseed_fraction,
            "mistake_rate": self.mistake_rate,
            "ties": self.ties,
            "shared_scale": self.shared_scale,
            "cross_fit": self.cross_fit,
            "linear_starts": self.linear_starts,
            "linear_ridge": self.linear_ridge,
            "linear_anneal": self.linear_anneal,
            "linear_features": self.linear_features,
            "max_memory_mb": self.max_memory_mb,
            "seed": self.seed,
        }

    def _scoring_data(self, reward: RewardMixture, dataset: PreferenceDataset) -> _Data:
        """``dataset`` prepared for scoring with the fitted reward, within ``max_memory_mb`` (no normalisation fit)."""
        plan = self.memory_plan(dataset, reward.input_dim)
        return _Data.build(reward, dataset, False, cache=plan["cache_features"], chunk_size=plan["chunk_segments"])

    def _require_fitted(self) -> RewardMixture:
        if self.reward is None or self.assignments_ is None:
            raise NotFittedError("this EMRewardMixture is not fitted yet: call fit(dataset) or load(dir)")
        return self.reward

    def _train(
        self, reward: RewardMixture, data: _Data, weights: torch.Tensor, epochs: int, generator: torch.Generator,
        validate: bool = False, patience: int | None = None,
    ) -> float:  # fmt: skip
        """Train members on their weighted comparisons (the shared BT loop); returns the last train loss.

        Held-out comparisons (``data.held_out``) are never trained on; with ``validate`` every
        member keeps its best held-out epoch (stopping after ``patience`` epochs without one).
        """
        validate = validate and bool(data.held_out.any())
        if self._twinned(reward):
            assert data.half is not None
            second = data.half[:, None].to(weights.dtype)
            weights = torch.cat([weights * (1.0 - second), weights * second], dim=1)  # (N, 2K): member, twin
        mistake_rates = self._mistake_tensor()
        if mistake_rates is not None and self._twinned(reward):
            mistake_rates = torch.cat([mistake_rates, mistake_rates])
        history = train_reward(
            reward, data.features, None, data.labels, weights,
            epochs=epochs, lr=self.lr, batch_size=self.batch_size, weight_decay=self.weight_decay,
            validation_mask=data.held_out if validate else None,
            exclude_mask=data.held_out, patience=patience if validate else None, discount=self.discount, generator=generator,
            mistake_rates=mistake_rates, ties=self._tie_model(), max_epoch_comparisons=self.max_epoch_comparisons,
        )  # fmt: skip
        return history.train_loss[-1] if history.train_loss else float("nan")

    def _new_reward(self, observation_space: gym.Space, action_space: gym.Space, n_members: int) -> RewardMixture:
        return RewardMixture(
            observation_space, action_space, n_members, use_state=self.use_state,
            use_action=self.use_action, use_next_state=self.use_next_state, hidden_sizes=self.hidden_sizes,
        )  # fmt: skip

    def _twinned(self, reward: RewardMixture) -> bool:
        """Whether ``reward`` holds cross-fitting twins (members ``K..2K-1``) besides the K members."""
        return reward.n_members == 2 * self.n_components

    def _copy_member(self, reward: RewardMixture, source: int, targets: Iterable[int]) -> None:
        """Copy member ``source`` into ``targets`` (and its twin into theirs when cross-fitting)."""
        targets = list(targets)
        reward.copy_member(source, targets)
        if self._twinned(reward):
            reward.copy_member(self.n_components + source, [self.n_components + t for t in targets])

    def _drop_twins(self, reward: RewardMixture) -> RewardMixture:
        """A K-member mixture holding members ``0..K-1`` of a twinned one (input normalisation included)."""
        single = self._new_reward(reward.observation_space, reward.action_space, self.n_components)
        per_member = ("weights.", "biases.")
        single.load_state_dict({n: t[: self.n_components] if n.startswith(per_member) else t for n, t in reward.state_dict().items()})
        return single

    def _logits(self, reward: RewardMixture, data: _Data, n_active: int, rows: torch.Tensor | None = None) -> torch.Tensor:
        """``(N', n_active)`` return differences of members ``0..n_active-1`` on comparisons ``rows`` (all by default).

        Cross-fitting: each comparison is scored by the twin that did not train on it.
        """
        if not self._twinned(reward):
            return pair_logits(reward, data.features, rows, self.discount, list(range(n_active)))
        k = self.n_components
        members = list(range(n_active)) + [k + m for m in range(n_active)]
        raw = pair_logits(reward, data.features, rows, self.discount, members)
        assert data.half is not None
        second_half = (data.half if rows is None else data.half[rows])[:, None]
        # Member k trained on first halves: it scores the second halves, its twin the first.
        return torch.where(second_half, raw[:, :n_active], raw[:, n_active:])

    def _mistake_tensor(self, n_active: int | None = None) -> torch.Tensor | None:
        """``(n_active,)`` flip rates of the first members for the likelihood, or ``None`` for plain BT."""
        if self.mistake_rates_ is None or not self.mistake_rates_.any():
            return None
        return torch.as_tensor(self.mistake_rates_[:n_active], dtype=torch.float32)

    def _tie_model(self, params: torch.Tensor | np.ndarray | None = None) -> TieModel | None:
        """The tie model with ``params`` (default ``tie_params_``), or ``None`` when ties are the soft target 0.5."""
        params = self.tie_params_ if params is None else params
        if self.ties is None or params is None:
            return None
        return TieModel(self.ties, torch.as_tensor(params, dtype=torch.float32))

    def _calibrate(self, reward: RewardMixture, data: _Data, responsibilities: np.ndarray, n_active: int | None = None) -> None:
        """Fit the likelihood's per-member logit scales and (``mistake_rate="learn"``) the shared flip rate.

        ``shared_scale``: every member's return differences are divided by their RMS over all
        comparisons and multiplied by one rationality ``beta`` shared by all members (maximum
        likelihood over a grid). Members then differ in *what* they prefer, not in how
        confidently: otherwise a member trained on mixed users predicts flatter, explains noisy
        users of every group better, attracts them and gets flatter still -- EM clusters users
        by their noise instead of their preferences. Comparisons held out for early stopping
        are left out, as in training.
        """
        if self.mistake_rate != "learn" and not self.shared_scale and self.ties is None:
            return
        assert self.mistake_rates_ is not None and self.logit_scales_ is not None
        n_active = self.n_components if n_active is None else n_active
        train = ~data.held_out
        raw = self._logits(reward, data, n_active, rows=torch.nonzero(train).squeeze(1))
        weights = torch.as_tensor(responsibilities[:, :n_active], dtype=torch.float32)[data.user_index[train]]  # (N', M)
        labels = data.labels[train, None]
        if self.shared_scale:
            unit = raw / raw.square().mean(0).sqrt().clamp_min(1e-6)  # (N', M), RMS 1 per member
            m = self._mistake_tensor(n_active)
            betas = torch.exp(torch.linspace(math.log(0.05), math.log(20.0), 40))
            ties = self._tie_model()
            scores = torch.stack([(noisy_log_likelihood(beta * unit, labels, m, ties) * weights).sum() for beta in betas])
            beta = betas[scores.argmax()]
            self.logit_scales_[:n_active] = (beta / raw.square().mean(0).sqrt().clamp_min(1e-6)).double().numpy()
        if self.mistake_rate == "learn":
            logits = raw * torch.as_tensor(self.logit_scales_[:n_active], dtype=torch.float32)
            grid = torch.linspace(0.0, 0.45, 46)
            # One rate for all members: noise belongs to the annotators, not to a group (a rate per
            # member lets EM group users by how noisy they are, measured: ARI 0.55 -> 0.18).
            ties = self._tie_model()
            scores = torch.stack([(noisy_log_likelihood(logits, labels, m.expand(n_active), ties) * weights).sum() for m in grid])
            self.mistake_rates_[:n_active] = float(grid[scores.argmax()])
        if self.ties is not None:
            logits = raw * torch.as_tensor(self.logit_scales_[:n_active], dtype=torch.float32)
            m = self._mistake_tensor(n_active)
            # One tie model for all members, like the flip rate: how readily people say "equal"
            # belongs to the annotators; what they call equal is in each member's reward.
            if self.ties == "davidson":
                grid = torch.linspace(-4.0, 6.0, 41)
                scores = torch.stack([(noisy_log_likelihood(logits, labels, m, self._tie_model(v[None])) * weights).sum() for v in grid])
                self.tie_params_ = np.array([float(grid[scores.argmax()])])
            else:
                self.tie_params_ = self._fit_tie_params(logits, labels, m, weights)

    def _fit_tie_params(self, logits: torch.Tensor, labels: torch.Tensor, m: torch.Tensor | None, weights: torch.Tensor) -> np.ndarray:
        """``(P,)`` tie parameters maximising the weighted likelihood of fixed ``logits`` (L-BFGS from ``tie_params_``, clamped)."""
        assert self.ties is not None and self.tie_params_ is not None
        logits, weights = logits.detach().double(), weights.double()
        m = None if m is None else m.double()
        params = torch.as_tensor(self.tie_params_, dtype=torch.float64).clone().requires_grad_(True)
        optimizer = torch.optim.LBFGS([params], max_iter=50, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = -(noisy_log_likelihood(logits, labels.double(), m, TieModel(self.ties, params)) * weights).sum()  # type: ignore[arg-type]
            loss.backward()
            return loss

        optimizer.step(closure)
        fitted = TieModel(self.ties, params.detach()).clamped()
        return fitted.numpy() if bool(torch.isfinite(fitted).all()) else self.tie_params_

    def _user_ll(self, reward: RewardMixture, data: _Data, n_active: int | None = None) -> torch.Tensor:
        """``(U, K)`` summed log-likelihood of each user's comparisons under each member (noise-aware if set).

        :param n_active: evaluate only members ``0..n_active-1``; the others get ``-inf``.
        """
        n_active = self.n_components if n_active is None else n_active
        logits = self._logits(reward, data, n_active)
        if self.logit_scales_ is not None:
            logits = logits * torch.as_tensor(self.logit_scales_[:n_active], dtype=torch.float32)
        ll = noisy_log_likelihood(logits, data.labels[:, None], self._mistake_tensor(n_active), self._tie_model())
        user_ll = torch.full((data.n_users, self.n_components), -math.inf, dtype=torch.float64)
        user_ll[:, :n_active] = torch.zeros(data.n_users, n_active, dtype=torch.float64).index_add_(0, data.user_index, ll.double())
        return user_ll

    def memory_plan(self, dataset: PreferenceDataset, input_dim: int | None = None) -> dict[str, Any]:
        """How EM will hold ``dataset`` within ``max_memory_mb``: cache the encoded segments or not, chunk size.

        Estimated bytes (float32 unless said): per comparison, the pairs, label, user index and
        masks (30) plus per member its weight, mini-batch slots, logit and float64 log-likelihood
        (44); per table segment (the pool, or both sides of every comparison), returns, indices
        and the split embedding's last hidden layer per member; one M-step mini-batch with its
        activations and gradients; per streamed segment its inputs and activations. The cached
        table is ``S * L * input_dim * 4`` bytes.

        :param dataset: the comparisons to fit or score.
        :param input_dim: network input width (from the spaces when ``None``).
        :return: ``cache_features``, ``chunk_segments``, ``n_segments``, ``n_chunks`` (of a streamed
            pass over all segments), ``estimated_mb`` (the plan's total), ``budget_mb``, ``cache_mb``
            (what caching the table costs) and ``chunk_mb_per_segment``.
        :raises ValueError: if ``max_memory_mb`` cannot hold even the per-comparison arrays and a
            minimal chunk (the message says how much would).
        """
        if input_dim is None:
            obs_space, act_space = spaces_from_dataset(dataset)
            obs_space = obs_space if self.observation_space is None else self.observation_space
            act_space = act_space if self.action_space is None else self.action_space
            input_dim = self._new_reward(obs_space, act_space, 1).input_dim
        n = len(dataset)
        n_segments = dataset.n_segments if isinstance(dataset, PooledPreferenceDataset) else 2 * n
        length = dataset.segment_length
        k = (2 if self.cross_fit else 1) * self.n_components
        widths = sum(self.hidden_sizes) + 1
        h_last = self.hidden_sizes[-1] if self.hidden_sizes else input_dim
        fixed = n * (30 + 44 * k) + n_segments * (24 + 4 * k + 4 * k * h_last)
        # A mini-batch: inputs, pre- and post-activation per layer, and their gradients.
        step = self.batch_size * k * 2 * length * (input_dim + 2 * widths) * 4 * 2
        per_chunk_segment = length * (input_dim + 2 * k * widths) * 4 * 2
        cache = n_segments * length * input_dim * 4
        mib = 2.0**20
        min_chunk = 16
        if self.max_memory_mb is None:
            cached, chunk = True, DEFAULT_CHUNK_SEGMENTS
        else:
            available = self.max_memory_mb * mib - fixed - step
            if available < min_chunk * per_chunk_segment:
                need = (fixed + step + min_chunk * per_chunk_segment) / mib
                raise ValueError(
                    f"max_memory_mb={self.max_memory_mb:g} is too small for {n:,} comparisons of {n_segments:,} segments: "
                    f"EM needs at least {need:,.0f} MiB without caching the encoded segments "
                    f"({(need + cache / mib):,.0f} MiB with). Raise it, or fit fewer comparisons."
                )
            cached = cache + DEFAULT_CHUNK_SEGMENTS * per_chunk_segment <= available
            room = available - (cache if cached else 0)
            chunk = int(max(min_chunk, min(DEFAULT_CHUNK_SEGMENTS, room // per_chunk_segment)))
        estimated = fixed + step + chunk * per_chunk_segment + (cache if cached else 0)
        return {
            "cache_features": cached,
            "chunk_segments": chunk,
            "n_segments": n_segments,
            "n_chunks": math.ceil(n_segments / chunk),
            "estimated_mb": round(estimated / mib, 3),
            "budget_mb": self.max_memory_mb,
            "cache_mb": round(cache / mib, 3),
            "chunk_mb_per_segment": per_chunk_segment / mib,
        }

    # -------------------------------------------------------------------- fit
    def fit(self, dataset: PreferenceDataset) -> EMRewardMixture:
        """Fit K rewards and the users' groups to ``dataset``.

        :param dataset: comparisons by identified users; every listed user needs >= 1 comparison
            (a user without any raises ``ValueError`` naming them).
        :return: ``self``, with ``reward``, ``assignments_``, ``responsibilities_``, ``shares_``,
            ``history_``, ``log_likelihood_``, ``n_iter_`` and ``converged_`` set.
        """
        _check_users_have_comparisons(dataset, "EMRewardMixture.fit")
        if self.n_components > dataset.n_users:
            raise ValueError(f"K = {self.n_components} components but only {dataset.n_users} users: K must be <= the number of users")
        # Constructor arguments stay as given (sklearn convention); inferred spaces are fitted state.
        observation_space, action_space = self.observation_space, self.action_space
        if observation_space is None or action_space is None:
            obs_space, act_space = spaces_from_dataset(dataset)
            observation_space = obs_space if observation_space is None else observation_space
            action_space = act_space if action_space is None else action_space
        generator = torch.Generator().manual_seed(self.seed)
        reward = self._new_reward(observation_space, action_space, 2 * self.n_components if self.cross_fit else self.n_components)
        reward.reset_parameters(generator=generator)
        self.memory_plan_ = self.memory_plan(dataset, reward.input_dim)
        data = _Data.build(
            reward, dataset, self.normalize_inputs, self.validation_fraction, self.seed, halves=self.cross_fit,
            cache=self.memory_plan_["cache_features"], chunk_size=self.memory_plan_["chunk_segments"],
        )  # fmt: skip
        # "learn" starts from a moderate 10% flip rate and re-estimates it after every M-step.
        initial_m = {None: 0.0, "learn": 0.1}.get(self.mistake_rate, self.mistake_rate)  # type: ignore[call-overload]
        self.mistake_rates_ = np.full(self.n_components, float(initial_m))
        self.tie_params_ = None if self.ties is None else TieModel.initial(self.ties)
        self.logit_scales_ = np.ones(self.n_components)

        pooled_state = None
        if self.init in ("split", "kmeans", "linear"):
            # Member 0 learns the pooled (single) reward; the other members are skipped (zero
            # weight, no compute) and then start as copies of it.
            pooled_weights = torch.zeros(len(data.labels), self.n_components)
            pooled_weights[:, 0] = 1.0
            self._train(reward, data, pooled_weights, self.init_epochs, generator)
            self._copy_member(reward, 0, range(1, self.n_components))
            pooled_state = {name: t.clone() for name, t in reward.state_dict().items()}

        best: dict[str, Any] | None = None
        for restart in range(self.n_init):
            restart_seed = self.seed + 1000 * restart
            restart_generator = torch.Generator().manual_seed(restart_seed)
            if pooled_state is not None:
                reward.load_state_dict(pooled_state)
            self.mistake_rates_ = np.full(self.n_components, float(initial_m))
            # Davidson nu = 1 ("equal" has 1/3 at d = 0), hurdle c = 0, s = 1 until fitted.
            self.tie_params_ = None if self.ties is None else TieModel.initial(self.ties)
            self.logit_scales_ = np.ones(self.n_components)
            if self.init == "split":
                start = self._split_start(reward, data, restart_seed, restart_generator)
            elif self.init == "linear":
                start = self._linear_start(reward, data, restart_seed)
            elif self.init == "kmeans":
                embedding = self._gradient_embedding(reward, data, np.zeros(data.n_users, dtype=np.int64))
                start = self._kmeans_start(embedding, restart_seed)
            else:
                reward.reset_parameters(generator=restart_generator)
                start = self._random_start(data.n_users, restart_seed)
            result = self._run_em(reward, data, dataset, start, restart_generator, restart)
            if best is None or result["log_likelihood"] > best["log_likelihood"]:
                state = {name: t.clone() for name, t in result["reward"].state_dict().items()}
                ties = None if self.tie_params_ is None else self.tie_params_.copy()
                fitted = {"m": self.mistake_rates_.copy(), "scales": self.logit_scales_.copy(), "ties": ties}
                best = {**result, "state": state, **fitted}

        assert best is not None
        reward = best["reward"]
        reward.load_state_dict(best["state"])
        reward.eval()
        self.reward = reward
        self.observation_space_, self.action_space_ = observation_space, action_space
        self.users_ = dataset.users.copy()
        self.responsibilities_ = best["responsibilities"]
        self.assignments_ = self.responsibilities_.argmax(1)
        self.posteriors_ = best["posteriors"]
        self.shares_ = best["shares"]
        self.mistake_rates_ = best["m"]
        self.tie_params_ = best["ties"]
        self.logit_scales_ = best["scales"]
        self.log_likelihood_ = best["log_likelihood"]
        self.history_ = best["history"]
        self.n_iter_ = len(best["history"])
        self.converged_ = best["converged"]
        return self

    # --------------------------------------------------------- initialisation
    def _gradient_embedding(self, reward: RewardMixture, data: _Data, labels: np.ndarray) -> np.ndarray:
        """``(U, h_last)``: each user's mean BT log-likelihood gradient w.r.t. the last layer of *their* member.

        ``g_u = mean_i (y_i - sigmoid(R(a_i) - R(b_i))) * (H(a_i) - H(b_i))`` with ``H`` the
        segment's (discounted) sum of the member's last hidden layer: the direction in which
        user ``u`` pulls the reward that currently represents them. ``H`` is computed once per
        distinct segment (streamed in chunks), the per-user sums over chunks of comparisons.

        :param labels: ``(U,)`` member of every user; members ``0..max(labels)`` are evaluated.
        """
        used = list(range(int(labels.max()) + 1))
        member_of = torch.as_tensor(labels, dtype=torch.long)[data.user_index]  # (N,)
        w_last = reward.weights[-1][used, :, 0]  # (M, h_last); the last bias cancels in R(a) - R(b)
        table = data.features
        step_weights = self.discount ** torch.arange(table.length, dtype=torch.float32)
        needed, inverse = torch.unique(table.pairs.reshape(-1), return_inverse=True)
        inverse = inverse.view(-1, 2)
        summed_per_user = None
        with torch.no_grad():
            hidden_sums = None
            for start in range(0, len(needed), table.chunk_size):
                segments = table.segments(needed[start : start + table.chunk_size])  # (c, L, D)
                c = len(segments)
                hidden = reward.hidden(segments.reshape(-1, segments.shape[-1]), used).reshape(len(used), c, table.length, -1)
                summed = torch.einsum("mclh,l->cmh", hidden, step_weights)  # H per segment and member
                if hidden_sums is None:
                    hidden_sums = torch.empty(len(needed), len(used), summed.shape[-1])
                hidden_sums[start : start + c] = summed
            assert hidden_sums is not None
            summed_per_user = torch.zeros(data.n_users, hidden_sums.shape[-1], dtype=torch.float64)
            step = table.chunk_size * 8  # comparisons per chunk: (step, h) temporaries
            for start in range(0, len(data.labels), step):
                rows = slice(start, start + step)
                members = member_of[rows]
                own = hidden_sums[inverse[rows, 0], members] - hidden_sums[inverse[rows, 1], members]  # (n, h)
                residual = data.labels[rows] - torch.sigmoid((own * w_last[members]).sum(-1))
                summed_per_user.index_add_(0, data.user_index[rows], (residual[:, None] * own).double())
        return (summed_per_user / data.counts[:, None]).numpy()

    def _kmeans_start(self, embedding: np.ndarray, seed: int) -> np.ndarray:
        """``(U, K)`` one-hot start from k-means++ on the per-user embedding."""
        k = self.n_components
        if k == 1:
            return np.ones((len(embedding), 1))
        labels = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(embedding)
        return np.eye(k)[labels]

    def _split_start(self, reward: RewardMixture, data: _Data, seed: int, generator: torch.Generator) -> np.ndarray:
        """``(U, K)`` one-hot start by divisive splitting, from the pooled reward in member 0.

        K - 1 times: embed every user by the gradient of *their own* member
        (:meth:`_gradient_embedding`), 2-means each cluster and split the one whose split
        explains the most embedding variance; the half its member explains worse (larger
        gradients) moves to a fresh copy of that member; then a few hard EM iterations among
        the members in use. Each split looks at the residuals of the reward that currently
        represents the cluster, so a small group hidden behind a large one is found once the
        large one has a member of its own.
        """
        labels = np.zeros(data.n_users, dtype=np.int64)
        for new in range(1, self.n_components):
            embedding = self._gradient_embedding(reward, data, labels)
            best_gain, best_split = -np.inf, None
            for cluster in range(new):
                users = np.flatnonzero(labels == cluster)
                if len(users) < 2:
                    continue
                x = embedding[users]
                km = KMeans(n_clusters=2, n_init=10, random_state=seed).fit(x)
                gain = float(((x - x.mean(0)) ** 2).sum() - km.inertia_)
                if gain > best_gain:
                    best_gain, best_split = gain, (cluster, users, km.labels_, x)
            if best_split is None:  # every cluster is a single user (K == U): nothing left to split
                break
            cluster, users, halves, x = best_split
            worse = int(np.argmax([np.square(x[halves == side]).sum(1).mean() for side in (0, 1)]))
            labels[users[halves == worse]] = new
            self._copy_member(reward, cluster, [new])
            if new == self.n_components - 1:
                break  # the main EM loop takes over from here
            responsibilities = np.eye(self.n_components)[labels]
            for _ in range(self.split_iterations):
                responsibilities, _, changed, _ = self._em_iteration(reward, data, responsibilities, generator, n_active=new + 1, hard=True)
                if changed == 0:
                    break
            labels = responsibilities.argmax(1)
        return np.eye(self.n_components)[labels]

    def _linear_start(self, reward: RewardMixture, data: _Data, seed: int) -> np.ndarray:
        """``(U, K)`` start from a mixture of linear heads on the pooled member's last hidden layer.

        Fits :func:`~egalitarian_rl.rewards.em_start.linear_mixture_start` (annealed soft EM over
        ``linear_starts`` starts, ridge ``linear_ridge``, first temperature ``linear_anneal``) on
        the training comparisons, writes each head into the last layer of a copy of the pooled
        member (and of its cross-fitting twin), and takes over its fitted flip rate
        (``mistake_rate="learn"``) and tie parameters (the start uses the hurdle model with
        ``ties="hurdle"``, Davidson otherwise). Hard EM starts from the argmax of its
        responsibilities, soft EM from the responsibilities themselves.
        """
        k = self.n_components
        train = ~data.held_out
        parts = []
        if self.linear_features in ("hidden", "both"):
            parts.append(em_start.segment_hidden_sums(reward, data.features, [0], self.discount))
        if self.linear_features in ("inputs", "both"):
            parts.append(em_start.segment_input_sums(data.features, self.discount))
        # Both parts list the same distinct segments in the same order, so their pair rows agree.
        features = em_start.SegmentHidden(torch.cat([part.hidden_sums for part in parts], dim=2), parts[0].pair_rows[train])
        ties = "hurdle" if self.ties == "hurdle" else "davidson"
        settings = em_start.LinearStartSettings(n_starts=self.linear_starts, ridge=self.linear_ridge, t0=self.linear_anneal, ties=ties)
        labels, user_index = data.labels[train], data.user_index[train]
        mixture, heads = em_start.linear_mixture_start(features, labels, user_index, data.n_users, k, settings, seed=seed)
        if self.linear_features == "hidden":  # heads on the inputs have no place in the members' last layers
            members = list(range(k)) + ([k + m for m in range(k)] if self._twinned(reward) else [])
            with torch.no_grad():
                for member in members:
                    reward.weights[-1][member, :, 0] = heads[member % k]
        if self.mistake_rate == "learn":
            self.mistake_rates_[:] = mixture.mistake_rate
        if self.ties is not None and mixture.ties == self.ties and mixture.tie_params is not None:
            self.tie_params_ = mixture.tie_params.copy()
        if self.soft:
            return mixture.responsibilities
        return np.eye(k)[mixture.responsibilities.argmax(1)]

    def _random_start(self, n_users: int, seed: int) -> np.ndarray:
        """``(U, K)`` one-hot random balanced partition (every member gets users)."""
        rng = np.random.default_rng(seed)
        labels = rng.permutation(np.arange(n_users) % self.n_components)
        return np.eye(self.n_components)[labels]

    # ------------------------------------------------------------- iterations
    def _objective(self, user_ll: np.ndarray, responsibilities: np.ndarray, hard: bool) -> float:
        """Hard EM: sum of each user's LL under their member. Soft EM: the mixture log-likelihood."""
        if hard:
            return float(user_ll[np.arange(len(user_ll)), responsibilities.argmax(1)].sum())
        log_prior = np.log(np.clip(responsibilities.mean(0), 1e-12, None))
        return float(np.logaddexp.reduce(user_ll + log_prior, axis=1).sum())

    def _e_step(self, user_ll: np.ndarray, responsibilities: np.ndarray, hard: bool) -> np.ndarray:
        """New ``(U, K)`` responsibilities from ``user_ll`` ``(U, K)`` (members at -inf are not in use)."""
        if hard:
            return np.eye(self.n_components)[user_ll.argmax(1)]
        return _posterior(user_ll, responsibilities.mean(0))

    def _reseed_empty(self, responsibilities: np.ndarray, user_ll: np.ndarray, counts: np.ndarray, n_active: int) -> np.ndarray:
        """Give every member (of the first ``n_active``) without users the users the current fit explains worst."""
        labels = responsibilities.argmax(1)
        fit = user_ll[np.arange(len(labels)), labels] / counts  # mean LL per comparison
        n_move = max(1, round(self.reseed_fraction * len(labels)))
        for member in range(n_active):
            if (labels == member).any():
                continue
            moved = 0
            for user in np.argsort(fit):  # worst-fitting first
                if moved == n_move:
                    break
                if (labels == labels[user]).sum() > 1:  # never empty another member
                    labels[user] = member
                    fit[user] = np.inf
                    moved += 1
        return np.eye(self.n_components)[labels]

    def _em_iteration(
        self, reward: RewardMixture, data: _Data, responsibilities: np.ndarray, generator: torch.Generator,
        n_active: int | None = None, hard: bool | None = None,
    ) -> tuple[np.ndarray, float, int, float]:  # fmt: skip
        """One M-step (warm-started) and E-step.

        :param n_active: only the first ``n_active`` members may receive users (splitting init).
        :param hard: hard assignments; defaults to ``not self.soft``.
        :return: new responsibilities ``(U, K)``, the objective, how many users changed member, train loss.
        """
        hard = (not self.soft) if hard is None else hard
        n_active = self.n_components if n_active is None else n_active
        weights = torch.as_tensor(responsibilities, dtype=torch.float32)[data.user_index]  # (N, K)
        train_loss = self._train(reward, data, weights, self.m_step_epochs, generator)
        self._calibrate(reward, data, responsibilities, n_active)
        user_ll = self._user_ll(reward, data, n_active).numpy()
        new = self._e_step(user_ll, responsibilities, hard)
        if hard:
            new = self._reseed_empty(new, user_ll, data.counts.numpy(), n_active)
        objective = self._objective(user_ll, new, hard)
        if not np.isfinite(objective):
            raise RewardTrainingError(f"EM log-likelihood became {objective}; lower the learning rate or check the inputs")
        changed = int((new.argmax(1) != responsibilities.argmax(1)).sum())
        return new, objective, changed, train_loss

    def _run_em(
        self, reward: RewardMixture, data: _Data, dataset: PreferenceDataset, start: np.ndarray,
        generator: torch.Generator, restart: int,
    ) -> dict[str, Any]:  # fmt: skip
        """EM iterations from ``start`` ``(U, K)`` until convergence or ``max_iter``, then the final M-step."""
        responsibilities = start
        history: list[dict[str, Any]] = []
        objective = previous = -math.inf
        converged = False
        known = bool((dataset.user_groups >= 0).all())
        bar = tqdm(range(1, self.max_iter + 1), desc=f"EM K={self.n_components}", unit="it", disable=not self.progress_bar)
        for iteration in bar:
            began = time.perf_counter()
            responsibilities, objective, changed, train_loss = self._em_iteration(reward, data, responsibilities, generator)
            entry: dict[str, Any] = {
                "iteration": iteration,
                "log_likelihood": objective,
                "changed": changed,
                "shares": responsibilities.mean(0).tolist(),
                "train_loss": train_loss,
                "seconds": time.perf_counter() - began,
            }
            if known:
                entry["ari"] = adjusted_rand_index(dataset.user_groups, responsibilities.argmax(1))
                entry["purity"] = purity(dataset.user_groups, responsibilities.argmax(1))
            history.append(entry)
            self._log(entry, restart)
            bar.set_postfix(ll=f"{objective:.1f}", changed=changed)
            relative = abs(objective - previous) / max(abs(objective), 1e-12)
            previous = objective
            if (not self.soft and changed <= self.assignment_tol * data.n_users) or relative < self.tol:
                converged = True
                break
        bar.close()
        final_epochs = self.final_epochs
        if self._twinned(reward):
            # Member k saw only the first halves: it continues on all its users' comparisons.
            reward = self._drop_twins(reward)
            final_epochs = max(final_epochs, self.m_step_epochs)
        else:
            # Restarts reuse the module: the result keeps its own copy.
            reward = copy.deepcopy(reward)
        if final_epochs > 0:
            # A longer M-step on the final groups, each member keeping its best held-out epoch:
            # EM may stop after a few short M-steps, before the members are fully trained.
            weights = torch.as_tensor(responsibilities, dtype=torch.float32)[data.user_index]
            self._train(reward, data, weights, final_epochs, generator, validate=True, patience=self.final_patience)
            self._calibrate(reward, data, responsibilities)
        # The final E-step, on the rewards that are returned, so the assignments describe them.
        user_ll = self._user_ll(reward, data).numpy()
        responsibilities, shares = self._final_e_step(user_ll, responsibilities, hard=not self.soft)
        objective = self._objective(user_ll, responsibilities, not self.soft)
        return {
            "reward": reward,
            "responsibilities": responsibilities,
            "posteriors": _posterior(user_ll, shares),
            "shares": shares,
            "log_likelihood": objective,
            "history": history,
            "converged": converged,
        }

    def _final_e_step(
        self, user_ll: np.ndarray, responsibilities: np.ndarray, hard: bool, max_rounds: int = 100
    ) -> tuple[np.ndarray, np.ndarray]:
        """Responsibilities and shares consistent with each other and with :meth:`assign_users`.

        E-steps with the rewards fixed, alternating ``r = posterior(user_ll, prior=shares)`` (one-hot
        argmax in hard EM) and ``shares = mean(r)`` until the shares stop changing: EM over the
        mixing weights alone. The returned shares are the prior the returned responsibilities were
        computed with, so ``assign_users`` (MAP with ``shares_``) reproduces them exactly.

        :param user_ll: ``(U, K)`` per-user log-likelihood under each member.
        :param responsibilities: ``(U, K)`` the last EM responsibilities (their mean starts the shares).
        :param hard: one-hot responsibilities (hard EM) instead of posteriors.
        :return: responsibilities ``(U, K)`` and shares ``(K,)``.
        """
        shares = responsibilities.mean(0)
        for _ in range(max_rounds):
            new = _posterior_or_hard(user_ll, shares, hard, self.n_components)
            new_shares = new.mean(0)
            if np.allclose(new_shares, shares, rtol=0.0, atol=1e-10):
                return new, shares
            shares = new_shares
        # No fixed point (hard assignments can cycle): keep the last shares as the prior used.
        return _posterior_or_hard(user_ll, shares, hard, self.n_components), shares

    def _log(self, entry: dict[str, Any], restart: int) -> None:
        if self.logger is None:
            return
        self.logger.record("em/log_likelihood", entry["log_likelihood"])
        self.logger.record("em/changed_assignments", entry["changed"])
        self.logger.record("em/train_loss", entry["train_loss"])
        self.logger.record("em/restart", restart)
        for k, share in enumerate(entry["shares"]):
            self.logger.record(f"em/share_{k}", share)
        for key in ("ari", "purity"):
            if key in entry:
                self.logger.record(f"em/{key}", entry[key])
        # One x-axis across restarts: restart r's iterations follow restart r - 1's.
        self.logger.dump(step=restart * self.max_iter + entry["iteration"])

    # ------------------------------------------------------------ prediction
    def user_log_likelihoods(self, dataset: PreferenceDataset) -> np.ndarray:
        """``(U, K)`` summed BT log-likelihood of each of ``dataset.users``' comparisons under each member.

        A user without comparisons raises ``ValueError`` naming them.
        """
        reward = self._require_fitted()
        _check_users_have_comparisons(dataset, "EMRewardMixture")
        return self._user_ll(reward, self._scoring_data(reward, dataset)).numpy()

    def user_marginal_log_likelihoods(self, dataset: PreferenceDataset) -> np.ndarray:
        """``(U,)`` each user's log-likelihood of all their comparisons under the mixture, ``log sum_k shares_k p_k(answers)``."""
        ll = self.user_log_likelihoods(dataset)
        assert self.shares_ is not None
        return np.logaddexp.reduce(ll + np.log(np.clip(self.shares_, 1e-12, None)), axis=1)

    def predict_proba(self, dataset: PreferenceDataset, prior: bool = True) -> np.ndarray:
        """``(U, K)`` posterior group probabilities of ``dataset.users`` given their comparisons.

        :param dataset: comparisons of the users to score (new or fitted users).
        :param prior: ``True`` (default): posterior with the fitted mixing weights ``shares_`` as
            the prior; ``False``: uniform prior (normalised likelihoods).
        """
        ll = self.user_log_likelihoods(dataset)
        assert self.shares_ is not None
        return _posterior(ll, self.shares_ if prior else np.ones(ll.shape[1]))

    def assign_users(self, dataset: PreferenceDataset, prior: bool = True) -> np.ndarray:
        """``(U,)`` member for every user of ``dataset`` (new or known): argmax of :meth:`predict_proba`.

        :param dataset: comparisons of the users to assign.
        :param prior: ``True`` (default): MAP with the fitted ``shares_`` as prior, the rule of the
            final E-step (so ``assign_users(train_data)`` equals ``assignments_``); ``False``: the
            paper's maximum-likelihood rule (uniform prior).
        """
        return self.predict_proba(dataset, prior=prior).argmax(1)

    def assign(self, dataset: PreferenceDataset, prior: bool = True) -> int:
        """The member (group) of the one user in ``dataset``, e.g. a new user who answered a few queries.

        Same rule as :meth:`assign_users` (default: MAP with the fitted ``shares_`` as prior); see
        :meth:`assign_with_confidence` for the posterior and a refusal threshold.

        :raises ValueError: if ``dataset`` has no comparisons or more than one user.
        """
        return self.assign_with_confidence(dataset, prior=prior).best_member

    def assign_with_confidence(self, dataset: PreferenceDataset, min_confidence: float = 0.0, prior: bool = True) -> Assignment:
        """The group of one (new) user with its posterior, refusing below ``min_confidence``.

        :param dataset: the comparisons of exactly one user.
        :param min_confidence: the smallest posterior probability of the best member at which
            the user is assigned; below it :attr:`Assignment.member` is ``None`` (do not
            personalise: e.g. serve the MaxMin policy instead of a group's).
        :param prior: as in :meth:`assign_users` (default: posterior with the fitted ``shares_``).
        :raises ValueError: if ``dataset`` has no comparisons or more than one user.
        """
        if not 0.0 <= min_confidence <= 1.0:
            raise ValueError(f"min_confidence must be in [0, 1], got {min_confidence}")
        present = np.unique(dataset.user_ids)
        if len(present) > 1:
            raise ValueError(f"assign() takes the comparisons of one user, got {len(present)} users; use assign_users()")
        if len(present) == 0:
            shown = dataset.users[:1].tolist()
            raise ValueError(f"assign(): user {shown[0] if shown else '?'} has no comparisons to assign by")
        posterior = self.predict_proba(dataset.for_users(present), prior=prior)[0]
        best = int(posterior.argmax())
        confident = bool(posterior[best] >= min_confidence)
        return Assignment(best if confident else None, best, posterior, len(dataset))

    def _fitted_rows(self, user_ids: np.ndarray) -> np.ndarray:
        """Positions in ``users_`` of ``user_ids``; raises ``ValueError`` naming users that were not fitted."""
        self._require_fitted()
        assert self.users_ is not None
        order = np.argsort(self.users_)
        rows = order[np.searchsorted(self.users_, user_ids, sorter=order).clip(0, len(order) - 1)]
        unknown = self.users_[rows] != user_ids
        if unknown.any():
            raise ValueError(
                f"users {np.unique(user_ids[unknown])[:10].tolist()} were not in the fitted data; assign them with assign_users() first"
            )
        return rows

    def comparison_members(self, dataset: PreferenceDataset) -> np.ndarray:
        """``(N,)`` the fitted member of each comparison's user (all users must have been fitted)."""
        rows = self._fitted_rows(dataset.user_ids)
        assert self.assignments_ is not None
        return self.assignments_[rows]

    def accuracy(self, dataset: PreferenceDataset, members: np.ndarray | None = None) -> AccuracyReport:
        """Preference accuracy (ties excluded), each comparison judged by its user's member.

        :param dataset: comparisons (typically held out) of fitted users.
        :param members: ``(N,)`` member per comparison; defaults to :meth:`comparison_members`.
        """
        reward = self._require_fitted()
        members = self.comparison_members(dataset) if members is None else np.asarray(members)
        differences = return_differences(reward, dataset, self.discount)
        return accuracy_from_differences(differences[np.arange(len(dataset)), members], dataset)

    def heldout_user_scores(self, dataset: PreferenceDataset) -> tuple[np.ndarray, np.ndarray]:
        """Held-out log-likelihood of fitted users' new comparisons, per user.

        Score of user ``u``: the posterior predictive ``log sum_k p[u, k] * exp(LL_heldout[u, k])``
        with ``p`` = :attr:`posteriors_`, the user's group posterior given their fitted answers. Not
        hard EM's one-hot assignment: from 8-10 noisy answers a user's group is often uncertain, and
        scoring only their MAP member charged every near-miss with the full held-out LL of the wrong
        member, so on FairGrid 60/30/10 at 10 answers per user K = 1 scored best although K = 3
        recovered the groups (ARI 0.92); with the posterior K = 3 scores -0.31 against K = 1's -0.58.

        :return: ``users`` ``(U',)`` (users of ``dataset`` with comparisons) and their scores ``(U',)``.
        """
        reward = self._require_fitted()
        sub = dataset.for_users(np.unique(dataset.user_ids))  # only users with held-out comparisons
        rows = self._fitted_rows(sub.users)
        ll = self._user_ll(reward, self._scoring_data(reward, sub)).numpy()
        assert self.posteriors_ is not None
        with np.errstate(divide="ignore"):  # log 0 = -inf: a member the user surely is not adds nothing
            log_posterior = np.log(self.posteriors_[rows])
        return sub.users, np.logaddexp.reduce(log_posterior + ll, axis=1)

    # -------------------------------------------------------------- storage
    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``reward.safetensors`` and ``em.json`` (assignments, shares, history) into ``directory``.

        Each file is written atomically; nothing is pickled.
        """
        reward = self._require_fitted()
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        reward.save(directory / _REWARD_FILE)
        assert self.users_ is not None and self.responsibilities_ is not None and self.shares_ is not None
        state = {
            "format": _FORMAT,
            "format_version": _FORMAT_VERSION,
            "hyperparameters": self.hyperparameters(),
            "observation_space": space_to_json(reward.observation_space),
            "action_space": space_to_json(reward.action_space),
            "users": self.users_.tolist(),
            "assignments": self.assignments_.tolist(),
            "responsibilities": self.responsibilities_.tolist(),
            "posteriors": None if self.posteriors_ is None else self.posteriors_.tolist(),
            "shares": self.shares_.tolist(),
            "mistake_rates": None if self.mistake_rates_ is None else self.mistake_rates_.tolist(),
            "tie_params": None if self.tie_params_ is None else self.tie_params_.tolist(),
            "tie_log_nu": self.tie_log_nu_,  # Davidson only: read by versions before "tie_params"
            "logit_scales": None if self.logit_scales_ is None else self.logit_scales_.tolist(),
            "log_likelihood": self.log_likelihood_,
            "history": self.history_,
            "n_iter": self.n_iter_,
            "converged": self.converged_,
        }
        write_text_atomic(json.dumps(state, indent=1), directory / _STATE_FILE)
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> EMRewardMixture:
        """Read a directory written by :meth:`save`."""
        directory = Path(directory)
        state_path = directory / _STATE_FILE
        if not state_path.is_file():
            raise FileNotFoundError(f"{state_path} does not exist: not a saved EMRewardMixture directory")
        try:
            state = json.loads(state_path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{state_path} is not valid JSON ({err})") from None
        if state.get("format") != _FORMAT or state.get("format_version") != _FORMAT_VERSION:
            raise ValueError(f"{state_path}: not a saved EMRewardMixture (format {state.get('format')!r})")
        params = state["hyperparameters"]
        # A directory saved by another version may name settings this one lacks (or lack new ones, which
        # take their defaults): the fitted state does not depend on them, so load it and say what was dropped.
        accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
        unknown = sorted(set(params) - accepted)
        if unknown:
            warnings.warn(f"{state_path}: ignoring settings this version does not know: {unknown}", stacklevel=2)
        params = {key: value for key, value in params.items() if key in accepted}
        model = cls(
            params.pop("n_components"),
            space_from_json(state["observation_space"]),
            space_from_json(state["action_space"]),
            **params,
        )
        model.reward = RewardMixture.load(directory / _REWARD_FILE)
        model.observation_space_, model.action_space_ = model.reward.observation_space, model.reward.action_space
        if model.reward.n_members != model.n_components:
            raise ValueError(f"{directory}: reward has {model.reward.n_members} members, state says {model.n_components}")
        model.users_ = np.asarray(state["users"], dtype=np.int64)
        model.assignments_ = np.asarray(state["assignments"], dtype=np.int64)
        model.responsibilities_ = np.asarray(state["responsibilities"], dtype=np.float64).reshape(-1, model.n_components)
        model.shares_ = np.asarray(state["shares"], dtype=np.float64)
        # Saved before posteriors were kept: the responsibilities are the best record of them.
        posteriors = state.get("posteriors") or state["responsibilities"]
        model.posteriors_ = np.asarray(posteriors, dtype=np.float64).reshape(-1, model.n_components)
        # Saved before noise-aware likelihoods existed: plain Bradley-Terry.
        model.mistake_rates_ = np.asarray(state.get("mistake_rates") or np.zeros(model.n_components), dtype=np.float64)
        # Saved before the hurdle model: Davidson's log nu alone.
        tie_params = state.get("tie_params", None if state.get("tie_log_nu") is None else [state["tie_log_nu"]])
        model.tie_params_ = None if tie_params is None else np.asarray(tie_params, dtype=np.float64)
        model.logit_scales_ = np.asarray(state.get("logit_scales") or np.ones(model.n_components), dtype=np.float64)
        model.log_likelihood_ = float(state["log_likelihood"])
        model.history_ = state["history"]
        model.n_iter_ = int(state["n_iter"])
        model.converged_ = bool(state["converged"])
        return model

    def __repr__(self) -> str:
        fitted = f", shares={np.round(self.shares_, 3).tolist()}" if self.shares_ is not None else ""
        return f"EMRewardMixture(K={self.n_components}, {'soft' if self.soft else 'hard'}{fitted})"


@dataclass
class _Data:
    """A dataset prepared once for EM: the segment table and pairs, labels, user index."""

    features: ComparisonFeatures  # segment table (S, L, D) and pairs (N, 2)
    labels: torch.Tensor  # (N,)
    user_index: torch.Tensor  # (N,) position of each comparison's user in dataset.users
    counts: torch.Tensor  # (U,) comparisons per user
    n_users: int
    held_out: torch.Tensor  # (N,) True: never trained on (early stopping only)
    half: torch.Tensor | None = None  # (N,) cross-fitting: True for the second half of each user's comparisons

    @classmethod
    def build(
        cls, reward: RewardMixture, dataset: PreferenceDataset, fit_normalization: bool,
        validation_fraction: float = 0.0, seed: int = 0, halves: bool = False,
        cache: bool = True, chunk_size: int = DEFAULT_CHUNK_SEGMENTS,
    ) -> _Data:  # fmt: skip
        """Encode ``dataset`` for ``reward``.

        :param fit_normalization: fit the reward's input standardisation on these segments first.
        :param validation_fraction: share of comparisons drawn (seeded) as ``held_out``.
        :param seed: seed of the held-out draw and of the cross-fitting halves.
        :param halves: draw the cross-fitting halves.
        :param cache: keep the encoded segment table in memory (else re-encode per chunk).
        :param chunk_size: segments per streamed chunk.
        """
        features = build_comparison_features(reward, dataset, fit_normalization, cache=cache, chunk_size=chunk_size)
        user_index_np = dataset.user_index()
        user_index = torch.as_tensor(user_index_np, dtype=torch.long)
        counts = torch.as_tensor(np.bincount(user_index_np, minlength=dataset.n_users), dtype=torch.float64)
        labels = torch.as_tensor(dataset.labels, dtype=torch.float32)
        rng = np.random.default_rng(seed)
        held_out = torch.as_tensor(rng.random(len(dataset)) < validation_fraction)
        half = None
        if halves:
            # Each user's comparisons in random order, alternately to the two halves (balanced per user).
            order = np.lexsort((rng.random(len(dataset)), user_index_np))
            rank = np.empty(len(dataset), dtype=np.int64)
            rank[order] = np.arange(len(dataset)) - np.searchsorted(user_index_np[order], user_index_np[order])
            half = torch.as_tensor(rank % 2 == 1)
        return cls(features, labels, user_index, counts, dataset.n_users, held_out, half)


# ----------------------------------------------------------------------------- choosing K


@dataclass
class KSelection:
    """Result of :func:`select_k`.

    :param k: the chosen number of components.
    :param criterion: one of :data:`CRITERIA`.
    :param scores: K -> score (held-out: mean log-likelihood per held-out comparison, higher is
        better; BIC: lower is better; permutation: the linear mixture's penalised log-likelihood).
    :param standard_errors: K -> standard error of the score difference to the best K (held-out only).
    :param noise_gains: K -> the largest gain over K - 1 on a shuffled copy of the data (permutation only).
    :param models: K -> the fitted mixture (held-out: fitted on the training split).
    """

    k: int
    criterion: str
    scores: dict[int, float] = field(default_factory=dict)
    standard_errors: dict[int, float] = field(default_factory=dict)
    noise_gains: dict[int, float] = field(default_factory=dict)
    models: dict[int, EMRewardMixture] = field(default_factory=dict)


#: The ways :func:`select_k` chooses K.
CRITERIA = ("heldout", "heldout_users", "permutation", "bic")
#: Below this median number of answers a user, :func:`select_k` warns that its choice is unreliable.
FEW_ANSWERS_PER_USER = 8


def n_parameters(reward: RewardMixture) -> int:
    """Free parameters of a mixture for BIC: all network weights plus K - 1 shares."""
    return sum(p.numel() for p in reward.parameters()) + reward.n_members - 1


def select_k(
    dataset: PreferenceDataset,
    k_range: Iterable[int] = range(1, 6),
    criterion: str = "heldout",
    *,
    heldout_fraction: float = 0.2,
    se_factor: float = 1.0,
    split_seed: int = 0,
    n_folds: int = 5,
    n_permutations: int = 5,
    margin: float = 2.0,
    **em_kwargs: Any,
) -> KSelection:
    """Choose the number of groups K.

    ``"heldout"``: every user's comparisons are split (``heldout_fraction`` held out); each K
    is fitted on the rest and scored by the held-out per-user log-likelihood (each user's
    members weighted by their group posterior, see :meth:`EMRewardMixture.heldout_user_scores`). Extra members
    only split groups and barely change this score, so the smallest K within ``se_factor``
    standard errors of the best (paired over users) is chosen: the one-standard-error rule.

    ``"heldout_users"``: the users are split into ``n_folds`` folds; each K is fitted on the other
    folds' users and scores every held-out user by the mixture's marginal likelihood of ALL their
    answers, ``log sum_k shares_k prod_j p_k(answer_j)`` (per answer). This reads the evidence
    ``"heldout"`` cannot at a few answers per user: that one user's answers agree with each other.
    With 5 answers a user, ``"heldout"`` scores one held-out answer with a group posterior from the
    other four, and on FairGrid 60/30/10 kept K = 1 (ARI 0) where K >= 2 recovered the groups.
    It costs ``n_folds`` fits per K. The same one-standard-error rule (paired over users) picks K.
    On FairGrid 60/30/10 at 5 answers a little better than ``"heldout"``, not a fix (``docs/em_noise_findings.md``).

    ``"permutation"``: a test of whether a K-th group explains the users better than chance. The single reward
    (the K = 1 fit) gives a fixed feature map -- its last hidden layer and the raw inputs, summed over a segment
    -- on which mixtures of K linear heads are cheap to fit (:func:`~egalitarian_rl.rewards.em_start.fit_linear_mixture`).
    Each K is scored by that mixture's penalised log-likelihood, and the same on ``n_permutations`` copies of the data
    whose answers are dealt to the users at random (each keeps their number of answers): within one group that
    changes nothing, so the copies show what a K-th head gains by fitting noise. K grows while its gain over K - 1
    beats the largest of the copies' gains by ``margin`` nats. Unlike the held-out criteria it scores every answer
    of every user with its own user's other answers, which is what tells groups apart with 5 answers a user.
    At 5 answers a user it keeps K >= 2 more often than ``"heldout"``; at 10 answers it stops too early, because on
    the shuffled copies the linear mixture escapes its collapsed start only from K = 3 on, which inflates the null for
    that step. Measured in ``docs/em_noise_findings.md``; not the default.

    ``"bic"``: each K is fitted on all data and scored by ``-2 * mixture LL + p * ln(N)``,
    ``p`` = all network parameters. With neural rewards ``p`` is large, so BIC favours small K
    strongly; prefer ``"heldout"`` unless the networks are tiny.

    :param dataset: comparisons by identified users.
    :param k_range: candidate K values.
    :param criterion: ``"heldout"``, ``"heldout_users"``, ``"permutation"`` or ``"bic"``.
    :param heldout_fraction: share of each user's comparisons held out (``"heldout"``).
    :param se_factor: how many standard errors below the best score still count as "as good".
    :param split_seed: seed of the held-out split (``"heldout"``) or of the user folds (``"heldout_users"``).
    :param n_folds: user folds (``"heldout_users"``), at least 2.
    :param n_permutations: shuffled copies of the data (``"permutation"``), at least 1.
    :param margin: nats by which a K-th head's gain must beat the copies' largest (``"permutation"``).
    :param em_kwargs: passed to :class:`EMRewardMixture` (``n_components`` is set per K).
    """
    ks = sorted({int(k) for k in k_range})
    if not ks:
        raise ValueError("k_range is empty")
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    _check_users_have_comparisons(dataset, "select_k")
    if ks[0] < 1 or ks[-1] > dataset.n_users:
        raise ValueError(f"k_range must lie in 1..{dataset.n_users} (the number of users), got {ks}")
    answers = float(np.median(dataset.comparisons_per_user()))
    if answers < FEW_ANSWERS_PER_USER:
        # Measured on FairGrid 60/30/10 at 5 answers: every criterion here often keeps K = 1 where EM given K = 3
        # recovers the groups (docs/em_noise_findings.md). Say so rather than let a merged minority pass silently.
        warnings.warn(
            f"select_k: the users gave a median of {answers:g} answers each; below {FEW_ANSWERS_PER_USER} no criterion "
            "here chooses K reliably and small groups are often merged. If you know the number of groups, fix it "
            "(EMRewardMixture(K), or reward.n_members in a config).",
            stacklevel=2,
        )
    result = KSelection(k=ks[0], criterion=criterion)
    if criterion == "bic":
        for k in ks:
            model = EMRewardMixture(k, **em_kwargs).fit(dataset)
            assert model.reward is not None and model.shares_ is not None
            mixture_ll = float(model.user_marginal_log_likelihoods(dataset).sum())
            result.scores[k] = -2.0 * mixture_ll + n_parameters(model.reward) * math.log(len(dataset))
            result.models[k] = model
        result.k = min(ks, key=lambda k: result.scores[k])
        return result
    if criterion == "heldout_users":
        return _select_k_by_heldout_users(dataset, ks, se_factor, split_seed, n_folds, em_kwargs)
    if criterion == "permutation":
        return _select_k_by_permutation(dataset, ks, n_permutations, margin, split_seed, em_kwargs)

    train, test = dataset.split_by_comparison(heldout_fraction, seed=split_seed)
    keep = train.users[train.comparisons_per_user() > 0]
    train = train.for_users(keep)
    test = test.for_users(np.intersect1d(keep, np.unique(test.user_ids)))
    if len(test) == 0:
        raise ValueError("no held-out comparisons: users need more comparisons or a larger heldout_fraction")
    per_user: dict[int, np.ndarray] = {}
    for k in ks:
        if k > train.n_users:
            break
        model = EMRewardMixture(k, **em_kwargs).fit(train)
        _, scores = model.heldout_user_scores(test)
        per_user[k] = scores
        result.scores[k] = float(scores.sum() / len(test))
        result.models[k] = model
    return _one_standard_error_rule(result, per_user, len(test), se_factor)


def _select_k_by_permutation(
    dataset: PreferenceDataset, ks: list[int], n_permutations: int, margin: float, seed: int, em_kwargs: dict[str, Any]
) -> KSelection:
    """:func:`select_k`'s ``"permutation"`` criterion; ``result.models`` holds the K = 1 fit and the chosen K's."""
    if n_permutations < 1:
        raise ValueError(f"n_permutations must be >= 1, got {n_permutations}")
    result = KSelection(k=ks[0], criterion="permutation")
    single = EMRewardMixture(1, **em_kwargs).fit(dataset)
    reward = single._require_fitted()
    table = build_comparison_features(reward, dataset)
    parts = [em_start.segment_hidden_sums(reward, table, [0], single.discount), em_start.segment_input_sums(table, single.discount)]
    settings = em_start.LinearStartSettings(n_starts=max(1, single.linear_starts), ridge=single.linear_ridge, t0=single.linear_anneal)
    features = torch.cat([part.hidden_sums[:, 0, :] for part in parts], dim=1)
    z, _ = em_start.whiten(features, parts[0].pair_rows, settings.max_dim)
    labels = torch.as_tensor(dataset.labels, dtype=torch.float64)
    users = dataset.user_index()
    rng = np.random.default_rng(seed)
    # Comparisons dealt to users at random: every user keeps their count, any group structure is gone.
    dealt = [users] + [rng.permutation(users) for _ in range(n_permutations)]

    def objective(k: int, user_index: np.ndarray, copy: int) -> float:
        fit_settings = settings if k > 1 else replace(settings, n_starts=1)
        index = torch.as_tensor(user_index, dtype=torch.long)
        fitted = em_start.fit_linear_mixture(z, parts[0].pair_rows, labels, index, dataset.n_users, k, fit_settings, seed=seed + copy)
        return fitted.objective

    previous = [objective(ks[0], user_index, c) for c, user_index in enumerate(dealt)]
    result.scores[ks[0]] = previous[0]
    for k in ks[1:]:
        current = [objective(k, user_index, c) for c, user_index in enumerate(dealt)]
        result.scores[k] = current[0]
        gains = [now - before for now, before in zip(current, previous)]
        result.noise_gains[k] = max(gains[1:])
        if gains[0] <= max(gains[1:]) + margin:
            break
        result.k, previous = k, current
    result.models[result.k] = single if result.k == 1 else EMRewardMixture(result.k, **em_kwargs).fit(dataset)
    return result


def _one_standard_error_rule(result: KSelection, per_user: dict[int, np.ndarray], n_answers: int, se_factor: float) -> KSelection:
    """Set ``result.k`` to the smallest K whose score is within ``se_factor`` standard errors of the best.

    :param per_user: K -> ``(U,)`` each scored user's held-out log-likelihood (the same users, one order, for every K).
    :param n_answers: the held-out answers behind the scores (the scores are per answer).
    """
    best = max(per_user, key=lambda k: result.scores[k])
    for k in per_user:
        diff = per_user[k] - per_user[best]
        result.standard_errors[k] = float(diff.std(ddof=1) * math.sqrt(len(diff)) / n_answers) if len(diff) > 1 else 0.0
    result.k = min(k for k in per_user if result.scores[k] >= result.scores[best] - se_factor * result.standard_errors[k])
    return result


def _select_k_by_heldout_users(
    dataset: PreferenceDataset, ks: list[int], se_factor: float, split_seed: int, n_folds: int, em_kwargs: dict[str, Any]
) -> KSelection:
    """:func:`select_k`'s ``"heldout_users"`` criterion; ``result.models`` are refitted on all users."""
    if not 2 <= n_folds <= dataset.n_users:
        raise ValueError(f"n_folds must be in 2..{dataset.n_users} (the number of users), got {n_folds}")
    folds = np.array_split(np.random.default_rng(split_seed).permutation(dataset.users), n_folds)
    result = KSelection(k=ks[0], criterion="heldout_users")
    per_user: dict[int, np.ndarray] = {}
    for k in ks:
        if k > dataset.n_users - max(len(fold) for fold in folds):
            break
        scores = []
        for fold in folds:
            model = EMRewardMixture(k, **em_kwargs).fit(dataset.for_users(np.setdiff1d(dataset.users, fold)))
            scores.append(model.user_marginal_log_likelihoods(dataset.for_users(fold)))
        per_user[k] = np.concatenate(scores)
        result.scores[k] = float(per_user[k].sum() / len(dataset))
    _one_standard_error_rule(result, per_user, len(dataset), se_factor)
    result.models[result.k] = EMRewardMixture(result.k, **em_kwargs).fit(dataset)
    return result
