"""EM against the Bayes limit under annotator noise and few answers per user (issue 10).

For every cell of a grid over comparisons per user, mistake rate, Bradley-Terry beta and
group shares, on FairGrid and HalfCheetah-v5, and every seed:

* **data**: 100 users answer ``comparisons_per_user`` queries each (B-Pref noise: answers are
  Bradley-Terry with ``beta``, then flipped with probability ``mistake_rate``); 10-step
  segments of uniformly random actions (the default of ``collect_preferences``, what a new
  user gets; FairGrid from random start cells). About half of FairGrid's random-walk
  comparisons are "equal" (no goal cell in either segment), which makes its cells hard.
* **EM**: ``EMRewardMixture(K, use_action=False, use_next_state=True, seed=seed)`` (the
  library's defaults otherwise); K = the true number of groups for 80/20 and chosen by
  :func:`~egalitarian_rl.rewards.select_k` from 1..4 for 60/30/10.
* **oracle** (``oracle_ari``): each user goes to the group whose *true* reward, with the true
  beta and mistake rate, gives their answers the highest likelihood under the simulator's own
  answer model -- including its rule that "equal" is answered exactly when the group's returns
  tie, which makes every "equal" answer strong evidence. This is the Bayes limit of any
  clustering of that data.
* **BT oracle** (``oracle_bt_ari``): the same true rewards, beta and mistake rate, but "equal"
  scored as a 0.5 soft target (the Bradley-Terry likelihood every reward model here is
  trained with): the limit of a Bradley-Terry clustering, closer to what the issue measured.
* **tie-model oracles** (``oracle_davidson_ari``, ``oracle_hurdle_ari``): the true rewards again,
  with "equal" scored by the tie model EM can use (Davidson or hurdle, its parameters fitted by
  maximum likelihood on the true groups): the limit of EM's own likelihood when its rewards are
  exactly right. They separate what the likelihood can express from what the rewards' estimation costs.
* **learned-reward oracle** (``oracle_learned_ari``): told the true groups but not their rewards, it learns each
  group's reward (``EMRewardMixture(1)`` with EM's options: the same network and likelihood) from that group's users
  in 4 of 5 folds and puts each user of the fifth in the group whose learned reward makes their answers likeliest.
  It pays for estimating the rewards from this data, as EM must; it need not find the groups, as EM must.
* **held-out accuracy**: the same users answer 10 more queries on segments of a fresh rollout;
  each is predicted by the user's fitted member (per true group).

Recommended EM for noisy annotators: ``--em init=linear ties=davidson mistake_rate=learn`` (a Davidson tie outcome
with a learned flip rate, started from a mixture of linear heads fitted by annealed soft EM); on FairGrid the committed
grid adds ``fairgrid:linear_features=inputs`` (heads on the cells visited, the groups' reward class; on HalfCheetah it
loses the groups, so the option is scoped to FairGrid). Where it stands (the
numbers are in ``benchmarks/RESULTS.md``): from 10 answers a user on, EM is within 0.05 of the exact oracle in most
FairGrid cells; in every 80/20 cell where it misses, it beats the learned-reward oracle, so the gap there is the price
of learning rewards from 5 answers, not EM's search. What EM itself misses is choosing K from 5 answers a user in
60/30/10 (``select_k`` keeps K = 1; with the true K the cells are within 0.06 of the oracle). On HalfCheetah-v5 with
mistakes at 5-20 answers EM is far below the exact oracle, and so is the learned-reward oracle: EM is within 0.15 of
the latter in all 36 HalfCheetah cells. Every measurement behind these
sentences, and everything tried that did not help: ``docs/em_noise_findings.md``.

Rows of ``benchmarks/results/em_noise.json``: one per cell with ``env``,
``comparisons_per_user``, ``mistake_rate``, ``beta``, ``shares``, ``em_ari`` and
``oracle_ari`` (means over the seeds that ran), the per-seed values, K, and held-out accuracy.
The run is resumable: every finished (cell, seed) is stored in ``runs`` and skipped next time;
the JSON is rewritten after each run, so a partial grid is a valid (partial) result.

    .venv/bin/python -m benchmarks.em_noise [--envs fairgrid halfcheetah] [--seeds 0 1 2 3 4]
        [--comparisons 5 10 20 40] [--mistake-rates 0 0.1 0.2] [--betas 1 2 5]
        [--shares 80/20 60/30/10] [--output benchmarks/results/em_noise.json] [--em KEY=VALUE ...]
        [--select-k KEY=VALUE ...] [--jobs N] [--fresh]

``--quick``: one cell per env (20 answers per user, mistake rate 0.1, beta 2, 80/20), seed 0, fresh:
``results/quick/em_noise.json`` (``.png`` and ``results/quick/RESULTS.md`` beside it).
"""

from __future__ import annotations

import argparse
import ast
import itertools
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from egalitarian_rl.envs.gridworld import COMPROMISE, MAJORITY_GOAL, MINORITY_GOAL, MOVES, SIZE

from benchmarks.common import BenchmarkParser, command, results_dir, run_in_processes, write_result
from egalitarian_rl import envs
from egalitarian_rl.io import write_atomic
from egalitarian_rl.preferences import Population, PreferenceDataset, UserGroup, collect_preferences
from egalitarian_rl.rewards import EMRewardMixture, adjusted_rand_index, select_k
from egalitarian_rl.rewards.bradley_terry import TieModel, noisy_log_likelihood

NAME = "em_noise"
N_USERS = 100
HELDOUT_PER_USER = 10
SEGMENT_LENGTH = 10
FAIRGRID = envs.FAIRGRID_ID
GOALS = np.array([MAJORITY_GOAL, MINORITY_GOAL, COMPROMISE])
SHARES = {"80/20": (0.8, 0.2), "60/30/10": (0.6, 0.3, 0.1)}
#: Group names per env, in the order the shares are given.
GROUP_NAMES = {"fairgrid": ("majority", "minority", "compromise"), "halfcheetah": ("fast", "calm", "backward")}
#: The issue's measurements with the EM of that time (FairGrid 80/20, 100 users, seeds 0 and 1).
ISSUE_TABLE = [
    {"comparisons_per_user": 20, "mistake_rate": 0.1, "beta": 2.0, "em_ari": (0.55, 0.61), "oracle_ari": (0.95, 0.86)},
    {"comparisons_per_user": 10, "mistake_rate": 0.1, "beta": 2.0, "em_ari": (0.26, 0.35), "oracle_ari": (0.47, 0.55)},
    {"comparisons_per_user": 30, "mistake_rate": 0.2, "beta": 1.0, "em_ari": (0.15, 0.12), "oracle_ari": (0.58, 0.67)},
]
ACCEPT_CLOSE, ACCEPT_FAR, ACCEPT_ORACLE = 0.05, 0.15, 0.8
#: How the oracles score "equal" (:func:`oracle_log_likelihoods`) -> the key of their ARI in each run and
#: row; the first is the issue's oracle.
ORACLE_KEYS = {"exact": "oracle_ari", "bt": "oracle_bt_ari", "davidson": "oracle_davidson_ari", "hurdle": "oracle_hurdle_ari"}
#: The learned-reward oracle's key and folds: told the true groups, it learns each group's reward from the other
#: folds' users (EM's own model and likelihood) and puts each held-out user in the likeliest group.
LEARNED_ORACLE_KEY = "oracle_learned_ari"
LEARNED_ORACLE_FOLDS = 5
#: EM options that only shape the search for groups; a one-member fit to a known group does not take them.
START_OPTIONS = ("init", "linear_features")
#: Every oracle column a run stores.
ALL_ORACLE_KEYS = (*ORACLE_KEYS.values(), LEARNED_ORACLE_KEY)
#: What identifies a cell of the grid (a run adds its ``seed``).
CELL_KEYS = ("env", "comparisons_per_user", "mistake_rate", "beta", "shares")
#: Logit scale standing in for a noiseless (infinite-beta) group in the tie-model oracles.
LARGE_BETA = 50.0


def nearest_goal_behaviour(epsilon: float, seed: int) -> Callable[[np.ndarray], int]:
    """FairGrid policy ``obs -> action``: step towards the nearest goal cell, random with prob. ``epsilon``.

    Purely random walks rarely reach a goal, so their comparisons are mostly ties on which the
    groups agree; segments of a goal-seeking policy (as in training) show the disagreement.
    """
    rng = np.random.default_rng(seed)

    def act(obs: np.ndarray) -> int:
        if rng.random() < epsilon:
            return int(rng.integers(len(MOVES)))
        position = np.array(divmod(int(np.argmax(obs)), SIZE))
        distance = np.abs(GOALS - position).sum(1)
        goal = GOALS[rng.choice(np.flatnonzero(distance == distance.min()))]
        delta = goal - position
        if not delta.any():
            return len(MOVES) - 1  # stay
        towards = [a for a, move in enumerate(MOVES[:4]) if (move != 0).any() and np.all(np.sign(delta)[move != 0] == move[move != 0])]
        return int(rng.choice(towards))

    return act


def _compromise_reward(t: Any) -> np.ndarray:
    """A third FairGrid group (for 60/30/10): 1 per step at the compromise cell C."""
    return t.next_obs[..., COMPROMISE[0] * SIZE + COMPROMISE[1]]


def make_population(env: str, shares: str, beta: float, mistake_rate: float) -> Population:
    """The env's population with ``shares`` (``"80/20"`` or ``"60/30/10"``) and B-Pref noise."""
    names = GROUP_NAMES[env][: len(SHARES[shares])]
    answering = {"beta": beta, "mistake_rate": mistake_rate}
    if env == "halfcheetah":
        return envs.make_population("HalfCheetah-v5", dict(zip(names, SHARES[shares])), **answering)
    library = envs.group_library(FAIRGRID)
    rewards = {**library.rewards, "compromise": _compromise_reward}
    return Population([UserGroup(name, rewards[name], share, **answering) for name, share in zip(names, SHARES[shares])])


def collect(env: str, population: Population, per_user: int, seed: int, behaviour: str = "random") -> PreferenceDataset:
    """``N_USERS`` users' labelled comparisons of fresh segments (rollout seeded by ``seed``).

    :param behaviour: FairGrid only: ``"goal"`` (:func:`nearest_goal_behaviour`) or ``"random"``.
    """
    if env == "fairgrid":
        gym_env = gym.make(FAIRGRID, random_start=True)
        policy: Any = nearest_goal_behaviour(0.3, seed) if behaviour == "goal" else "random"
    else:
        gym_env, policy = gym.make("HalfCheetah-v5"), "random"
    try:
        return collect_preferences(gym_env, population, N_USERS, per_user, SEGMENT_LENGTH, behaviour=policy, seed=seed)
    finally:
        gym_env.close()


def oracle_log_likelihoods(population: Population, data: PreferenceDataset, ties: str = "exact") -> np.ndarray:
    """``(U, G)`` log-likelihood of each user's answers under each true group's answering model.

    The answering model of :meth:`UserGroup.answer`: a strict answer is right with probability
    ``(1 - m) * sigmoid(beta * |diff|) + m * (1 - sigmoid(beta * |diff|))`` (``m`` the mistake
    rate), "equal" is given exactly when the group's returns differ by at most its
    ``equal_threshold``. Impossible answers get probability ``1e-12`` rather than 0 (floating
    point may differ in the last bit from the labeller's own computation).

    :param ties: how "equal" is scored (a key of :data:`ORACLE_KEYS`). ``"exact"``: the simulator's own
        rule above (the oracle of the issue). ``"bt"``: the soft target 0.5 of the noisy BT
        probability (the Bradley-Terry oracle). ``"davidson"`` / ``"hurdle"``: the tie models
        :class:`EMRewardMixture` can use (:class:`TieModel`), their parameters fitted by maximum
        likelihood on every user's answers under their own true group: the limit of EM's *likelihood*
        when its rewards are exactly right.
    """
    return _oracle_log_likelihoods(population, data, _return_differences(population, data), ties)


def _return_differences(population: Population, data: PreferenceDataset) -> np.ndarray:
    """``(N, G)`` every group's true return of segment a minus segment b."""
    return np.stack([g.segment_returns(data.segments_a) - g.segment_returns(data.segments_b) for g in population.groups], axis=1)


def _oracle_log_likelihoods(population: Population, data: PreferenceDataset, diffs: np.ndarray, ties: str) -> np.ndarray:
    """:func:`oracle_log_likelihoods` from the groups' return differences ``diffs`` ``(N, G)``."""
    if ties not in ORACLE_KEYS:
        raise ValueError(f"ties must be one of {tuple(ORACLE_KEYS)}, got {ties!r}")
    groups = population.groups
    betas = np.array([g.beta for g in groups])
    mistakes = np.array([g.mistake_rate for g in groups])
    labels = data.labels[:, None]
    if ties in ("davidson", "hurdle"):
        logits = np.where(np.isfinite(betas), betas, LARGE_BETA) * diffs
        log_p = _tie_model_log_likelihoods(logits, mistakes, data, ties)
    else:
        with np.errstate(over="ignore", invalid="ignore"):
            p_a = np.where(np.isfinite(betas), 1.0 / (1.0 + np.exp(-betas * diffs)), (diffs > 0).astype(float))
        p_a = mistakes + (1.0 - 2.0 * mistakes) * p_a
        if ties == "exact":
            tie = np.abs(diffs) <= np.array([g.equal_threshold for g in groups])
            p_label = np.where(labels == 1.0, p_a, 1.0 - p_a)
            p_label = np.where(tie, (labels == 0.5).astype(float), np.where(labels == 0.5, 0.0, p_label))
            log_p = np.log(np.clip(p_label, 1e-12, None))
        else:
            p_a = np.clip(p_a, 1e-12, 1 - 1e-12)
            log_p = labels * np.log(p_a) + (1.0 - labels) * np.log(1.0 - p_a)
    user_ll = np.zeros((data.n_users, population.n_groups))
    np.add.at(user_ll, data.user_index(), log_p)
    return user_ll


def _tie_model_log_likelihoods(logits: np.ndarray, mistakes: np.ndarray, data: PreferenceDataset, ties: str) -> np.ndarray:
    """``(N, G)`` per-answer log-likelihood under each group's true ``logits`` and flip rate ``mistakes`` ``(G,)``
    with tie model ``ties``.

    One set of tie parameters for all groups (as EM shares one), fitted by maximum likelihood on
    every answer under its user's own group.
    """
    logits_t, mistakes_t = torch.as_tensor(logits, dtype=torch.float64), torch.as_tensor(mistakes, dtype=torch.float64)
    labels = torch.as_tensor(data.labels, dtype=torch.float64)[:, None]
    own = torch.as_tensor(data.user_groups[data.user_index()])
    own_logits, own_mistakes = logits_t.gather(1, own[:, None]), mistakes_t[own][:, None]
    params = torch.as_tensor(TieModel.initial(ties), dtype=torch.float64).requires_grad_(True)
    optimizer = torch.optim.LBFGS([params], max_iter=100, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = -noisy_log_likelihood(own_logits, labels, own_mistakes, TieModel(ties, params)).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    fitted = TieModel(ties, params.detach())
    with torch.no_grad():
        return noisy_log_likelihood(logits_t, labels, mistakes_t[None, :], fitted).numpy()


def oracle_aris(population: Population, data: PreferenceDataset) -> dict[str, float]:
    """ARI of every oracle (:data:`ORACLE_KEYS`) on ``data``: each user to their likeliest true group."""
    diffs = _return_differences(population, data)  # once for all four oracles
    return {
        key: round(adjusted_rand_index(data.user_groups, _oracle_log_likelihoods(population, data, diffs, ties).argmax(1)), 4)
        for ties, key in ORACLE_KEYS.items()
    }


def em_kwargs(em_options: dict[str, Any], seed: int) -> dict[str, Any]:
    """``EMRewardMixture`` keyword arguments of a run: the benchmark's fixed inputs, its seed, then ``em_options``."""
    return {"use_action": False, "use_next_state": True, "seed": seed, **em_options}


def k_is_chosen(shares: str) -> bool:
    """Whether EM's K is chosen by ``select_k`` in cells with these ``shares`` (more than two groups), not fixed."""
    return len(SHARES[shares]) > 2


def learned_oracle_ari(data: PreferenceDataset, em_options: dict[str, Any], seed: int, folds: int = LEARNED_ORACLE_FOLDS) -> float:
    """ARI of the learned-reward oracle on ``data``: what the answers allow a method that must learn the rewards.

    It is told the true groups but not their rewards. Users are dealt to ``folds`` folds; for each fold, every
    group's reward is fitted (``EMRewardMixture(1)`` with EM's options: its network and likelihood) on that group's
    users in the other folds, and each user of the fold goes to the group whose fitted reward gives their answers
    the highest likelihood (no prior, as :func:`oracle_aris`). Unlike the exact oracle it pays for estimating the
    rewards from this data; unlike EM it need not find the groups.
    """
    groups = data.user_groups
    fold_of = np.random.default_rng(seed).permutation(len(data.users)) % folds
    options = {key: value for key, value in em_kwargs(em_options, seed).items() if key not in START_OPTIONS}
    n_groups = int(groups.max()) + 1
    log_likelihood = np.full((len(data.users), n_groups), -np.inf)
    for fold in range(folds):
        held_out = data.for_users(data.users[fold_of == fold])
        for group in range(n_groups):
            fit_users = data.users[(fold_of != fold) & (groups == group)]
            if len(fit_users):
                member = EMRewardMixture(1, **options).fit(data.for_users(fit_users))
                log_likelihood[fold_of == fold, group] = member.user_log_likelihoods(held_out)[:, 0]
    return round(adjusted_rand_index(groups, log_likelihood.argmax(1)), 4)


def cell_data(
    env: str, per_user: int, mistake_rate: float, beta: float, shares: str, seed: int, behaviour: str = "random"
) -> tuple[Population, PreferenceDataset]:
    """The population and the training answers of one (cell, seed): what EM and the oracles see."""
    population = make_population(env, shares, beta, mistake_rate)
    data = collect(env, population, per_user, seed, behaviour)
    return population, data.for_users(data.users[data.comparisons_per_user() > 0])


def run_oracles(run: dict, em_options: dict[str, Any], threads: int | None = None) -> dict[str, float]:
    """Every oracle of a stored ``run``, from its regenerated data (checked against its stored exact-oracle ARI)."""
    if threads is not None:
        torch.set_num_threads(threads)
    population, data = cell_data(*(run[key] for key in CELL_KEYS), run["seed"])
    oracles = oracle_aris(population, data)
    if oracles["oracle_ari"] != run["oracle_ari"]:
        raise RuntimeError(f"regenerated data of run {[run[key] for key in (*CELL_KEYS, 'seed')]} differ from the stored run's")
    return {**oracles, LEARNED_ORACLE_KEY: learned_oracle_ari(data, options_for(run["env"], em_options), run["seed"])}


def backfill_oracles(runs: list[dict], em_options: dict[str, Any], jobs: int = 1, threads: int | None = None) -> int:
    """Add the oracles a stored run lacks (runs from before they existed), from its regenerated data.

    The data are regenerated from the run's seed; its stored exact-oracle ARI must come out
    the same, which checks that they are the same data. Returns how many runs were filled.

    :param jobs: runs filled at once, each in its own process.
    """
    missing = [run for run in runs if not all(key in run for key in ALL_ORACLE_KEYS)]
    if missing:
        print(f"filling the oracles of {len(missing)} stored runs", flush=True)
    calls = [(run, em_options, threads) for run in missing]
    for (run, _, _), oracles in run_in_processes(run_oracles, calls, jobs):
        run.update(oracles)
    return len(missing)


def run_one(
    env: str,
    per_user: int,
    mistake_rate: float,
    beta: float,
    shares: str,
    seed: int,
    em_options: dict[str, Any],
    behaviour: str = "random",
    threads: int | None = None,
    k_options: dict[str, Any] | None = None,
) -> dict:
    """One (cell, seed): data, oracle, K, EM fit, held-out accuracy.

    :param k_options: :func:`~egalitarian_rl.rewards.select_k` options for the cells whose K is chosen (``criterion``, ...);
        ``{"criterion": "given"}`` gives EM the true number of groups instead (what it reaches when K is known).
    :param threads: torch threads for this process (``None``: leave as is); worker processes start with torch's default.
    """
    if threads is not None:
        torch.set_num_threads(threads)
    em_options = options_for(env, em_options)
    population, data = cell_data(env, per_user, mistake_rate, beta, shares, seed, behaviour)
    heldout = collect(env, population, HELDOUT_PER_USER, seed + 7919, behaviour)  # same users, fresh segments
    oracles = {**oracle_aris(population, data), LEARNED_ORACLE_KEY: learned_oracle_ari(data, em_options, seed)}
    options = em_kwargs(em_options, seed)
    start = time.perf_counter()
    k, k_scores, em = population.n_groups, None, None
    if k_is_chosen(shares) and (k_options or {}).get("criterion") != "given":
        selection = select_k(data, range(1, 5), **(k_options or {}), **options)
        k = selection.k
        # per K: the score and its standard error (held-out criteria) or the shuffled copies' largest gain (permutation)
        spread = selection.noise_gains if selection.criterion == "permutation" else selection.standard_errors
        k_scores = {str(c): [round(selection.scores[c], 4), round(spread.get(c, 0.0), 4)] for c in selection.scores}
        if selection.criterion in ("heldout_users", "permutation"):  # its model of the chosen K is fitted on all of data already
            em = selection.models[k]
    if em is None:
        em = EMRewardMixture(k, **options).fit(data)
    seconds = time.perf_counter() - start
    accuracy = em.accuracy(heldout.for_users(data.users))
    return {
        "env": env,
        "comparisons_per_user": per_user,
        "mistake_rate": mistake_rate,
        "beta": beta,
        "shares": shares,
        "seed": seed,
        "k": k,
        # select_k's held-out log-likelihood per answer and its standard error against the best K
        "k_scores": k_scores,
        "em_ari": round(adjusted_rand_index(data.user_groups, em.assignments_), 4),
        **oracles,
        "heldout_accuracy": {name: round(v, 4) for name, v in accuracy.per_group.items()},
        "em_shares": np.round(np.sort(em.shares_)[::-1], 3).tolist(),
        "seconds": round(seconds, 2),
        "em_hyperparameters": em.hyperparameters(),
    }


def summarise(runs: list[dict]) -> list[dict]:
    """One row per cell: means over its seeds (and the per-seed values)."""
    cells: dict[tuple, list[dict]] = {}
    for run in runs:
        cells.setdefault(tuple(run[key] for key in CELL_KEYS), []).append(run)
    rows = []
    for key, cell in sorted(cells.items(), key=lambda item: tuple(str(v) for v in item[0])):
        em_ari = [r["em_ari"] for r in cell]
        oracle_ari = [r["oracle_ari"] for r in cell]
        groups = sorted({name for r in cell for name in r["heldout_accuracy"]})
        # Every oracle's mean; a run stored before an oracle existed has no value for it.
        oracles = {key: round(float(np.mean([r[key] for r in cell])), 4) for key in ALL_ORACLE_KEYS if all(key in r for r in cell)}
        rows.append(
            {
                **dict(zip(CELL_KEYS, key)),
                "em_ari": round(float(np.mean(em_ari)), 4),
                **oracles,
                "gap": round(float(np.mean(oracle_ari) - np.mean(em_ari)), 4),
                "gap_bt": round(float(oracles["oracle_bt_ari"] - np.mean(em_ari)), 4),
                "seeds": [r["seed"] for r in cell],
                "em_ari_seeds": em_ari,
                "oracle_ari_seeds": oracle_ari,
                "k_seeds": [r["k"] for r in cell],
                "heldout_accuracy": {g: round(float(np.nanmean([r["heldout_accuracy"].get(g, np.nan) for r in cell])), 4) for g in groups},
                "seconds": round(float(np.mean([r["seconds"] for r in cell])), 2),
            }
        )
    return rows


def acceptance(rows: list[dict], oracle: str = "oracle_ari") -> dict:
    """The issue's acceptance over the cells that ran, against ``oracle`` (a value of :data:`ORACLE_KEYS`)."""
    gap = {r_id: rows[r_id][oracle] - rows[r_id]["em_ari"] for r_id in range(len(rows))}
    close = [i for i in gap if rows[i][oracle] >= ACCEPT_ORACLE]
    return {
        "oracle": oracle,
        "cells": len(rows),
        "cells_oracle_ge_0.8": len(close),
        "within_0.05_where_oracle_ge_0.8": sum(gap[i] <= ACCEPT_CLOSE for i in close),
        "within_0.15_everywhere": sum(g <= ACCEPT_FAR for g in gap.values()),
        "worst_gap": round(max(gap.values()), 4) if gap else None,
    }


def learned_oracle_summary(rows: list[dict]) -> str:
    """RESULTS.md's sentence on EM against the learned-reward oracle (empty while a row lacks it)."""
    if not rows or not all(LEARNED_ORACLE_KEY in r for r in rows):
        return ""
    gaps = [r[LEARNED_ORACLE_KEY] - r["em_ari"] for r in rows]
    within = {limit: sum(g <= limit for g in gaps) for limit in (0.0, ACCEPT_CLOSE, ACCEPT_FAR)}
    return (
        f"Against the learned-reward oracle (told the true groups, learns their rewards from {LEARNED_ORACLE_FOLDS - 1} of "
        f"{LEARNED_ORACLE_FOLDS} folds of users): EM at or above it in {within[0.0]}/{len(rows)} cells, "
        f"within 0.05 in {within[ACCEPT_CLOSE]}/{len(rows)}, within 0.15 in {within[ACCEPT_FAR]}/{len(rows)}, worst gap {max(gaps):+.3f}. "
    )


def issue_cells_summary(rows: list[dict]) -> str:
    """RESULTS.md's sentence putting the issue's own measurements beside this grid's (seeds 0 and 1 of the same cells)."""
    parts = []
    for cell in ISSUE_TABLE:
        key = ("fairgrid", cell["comparisons_per_user"], cell["mistake_rate"], cell["beta"], "80/20")
        row = next((r for r in rows if tuple(r[k] for k in CELL_KEYS) == key), None)
        if row is None or row["seeds"][:2] != [0, 1]:
            parts.append(f"{cell['comparisons_per_user']}/{cell['mistake_rate']}/{cell['beta']:g} not in the grid")
            continue
        now = {name: ", ".join(f"{v:.2f}" for v in row[f"{name}_seeds"][:2]) for name in ("em_ari", "oracle_ari")}
        before = {name: ", ".join(f"{v:.2f}" for v in cell[name]) for name in ("em_ari", "oracle_ari")}
        parts.append(
            f"{cell['comparisons_per_user']}/{cell['mistake_rate']}/{cell['beta']:g} EM {before['em_ari']} -> {now['em_ari']} "
            f"(oracle {before['oracle_ari']} -> {now['oracle_ari']})"
        )
    return "The issue's cells (FairGrid 80/20, seeds 0-1, its numbers -> ours): " + "; ".join(parts) + ". "


def plot(rows: list[dict], path: Path) -> None:
    """EM ARI against the exact oracle's (the Bayes limit) and, beside it, the learned-reward oracle's: one point per cell."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("oracle_ari", "exact oracle ARI (true rewards, true noise)", "EM vs. the Bayes limit")]
    if all(LEARNED_ORACLE_KEY in r for r in rows):
        panels.append((LEARNED_ORACLE_KEY, "learned-reward oracle ARI (told the groups)", "EM vs. an oracle that learns the rewards"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 5), squeeze=False)
    for ax, (key, xlabel, title) in zip(axes[0], panels):
        for env, marker in (("fairgrid", "o"), ("halfcheetah", "s")):
            for shares, color in (("80/20", "tab:blue"), ("60/30/10", "tab:orange")):
                cell = [r for r in rows if r["env"] == env and r["shares"] == shares]
                if cell:
                    x, y = [r[key] for r in cell], [r["em_ari"] for r in cell]
                    ax.scatter(x, y, marker=marker, color=color, label=f"{env} {shares}", alpha=0.8)
        ax.plot([-0.05, 1.02], [-0.05, 1.02], "k-", lw=0.8, label="EM = oracle")
        ax.plot([-0.05, 1.02], [-0.2, 0.87], "k:", lw=0.8, label="oracle - 0.15")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("EM ARI")
        ax.set_title(f"{title} (mean over seeds)", fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _parse_options(pairs: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs as a dict (values as Python literals where they parse); ``ENV:KEY=VALUE`` for one env only."""
    options = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        env, scoped, _ = key.rpartition(":")
        if scoped and env not in GROUP_NAMES:
            raise SystemExit(f"--em {pair}: {env!r} is not an env of this benchmark ({', '.join(GROUP_NAMES)})")
        try:
            options[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            options[key] = value
    return options


def options_for(env: str, em_options: dict[str, Any]) -> dict[str, Any]:
    """The EM options one env's runs use: the unscoped ones, then those given as ``<env>:KEY`` (which win)."""
    shared = {key: value for key, value in em_options.items() if ":" not in key}
    return shared | {key.partition(":")[2]: value for key, value in em_options.items() if key.partition(":")[0] == env}


def main() -> None:
    quick = {"comparisons": [20], "mistake_rates": [0.1], "betas": [2.0], "shares": ["80/20"], "seeds": [0], "fresh": True}
    parser = BenchmarkParser(__doc__.split("\n\n")[0], quick_defaults=quick)
    parser.add_argument("--envs", nargs="+", default=["fairgrid", "halfcheetah"], choices=["fairgrid", "halfcheetah"])
    parser.add_argument("--comparisons", type=int, nargs="+", default=[5, 10, 20, 40])
    parser.add_argument("--mistake-rates", type=float, nargs="+", default=[0.0, 0.1, 0.2])
    parser.add_argument("--betas", type=float, nargs="+", default=[1.0, 2.0, 5.0])
    parser.add_argument("--shares", nargs="+", default=list(SHARES), choices=list(SHARES))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument(
        "--em",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="EMRewardMixture options (e.g. ties=davidson); fairgrid:KEY=VALUE for one env only",
    )
    parser.add_argument(
        "--select-k",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="select_k options for 60/30/10 (e.g. criterion=heldout_users; criterion=given: the true K)",
    )
    parser.add_argument("--output", type=Path, default=None, help="default: benchmarks/results/em_noise.json (--quick: results/quick/)")
    parser.add_argument("--fresh", action="store_true", help="ignore the runs already in the output file")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once, each in its own process")
    parser.add_argument("--no-results-md", action="store_true", help="do not touch RESULTS.md (variants, experiments)")
    parser.add_argument("--issue-table", action="store_true", help="only print the issue's three cells (seeds 0, 1) beside its numbers")
    args = parser.parse_args()
    args.output = args.output or default_output(args.quick)
    torch.set_num_threads(args.threads)
    em_options = _parse_options(args.em)
    k_options = _parse_options(args.select_k)
    if args.issue_table:
        print_issue_table(em_options)
        return

    previous = json.loads(args.output.read_text()) if args.output.exists() and not args.fresh else {}
    if previous and previous.get("em_options", {}) != em_options:
        raise SystemExit(f"{args.output} holds runs with EM options {previous.get('em_options')}, not {em_options}: use --output")
    runs, superseded = stored_runs(previous, k_options)
    if backfill_oracles(runs, em_options, args.jobs, args.threads):
        save(args, runs, em_options, k_options, superseded)
    done = {tuple(r[key] for key in (*CELL_KEYS, "seed")) for r in runs}
    # Seeds innermost-last: every cell gets its first seed before any cell gets a second one,
    # so a partial run covers the grid evenly.
    grid = itertools.product(args.seeds, args.envs, args.shares, args.comparisons, args.mistake_rates, args.betas)
    calls = [
        (env, per_user, mistake_rate, beta, shares, seed, em_options, "random", args.threads, k_options)
        for seed, env, shares, per_user, mistake_rate, beta in grid
        if (env, per_user, mistake_rate, beta, shares, seed) not in done
    ]
    for _, run in run_in_processes(run_one, calls, args.jobs):
        runs.append({**run, "command": command(NAME)})  # RESULTS.md names every command behind the stored runs
        print(json.dumps(run), flush=True)
        save(args, runs, em_options, k_options, superseded)
    if runs:  # also when every run was already stored: the JSON, plot and RESULTS.md line follow this code
        save(args, runs, em_options, k_options, superseded)


def stored_runs(previous: dict[str, Any], k_options: dict[str, Any]) -> tuple[list[dict], list[dict]]:
    """The runs of a stored result that hold under ``k_options``, and the superseded ones (kept in the file).

    Only the runs whose K ``select_k`` chose (more than two groups) depend on its options. When the
    stored options differ, those runs are set aside with the options they were run with, and set-aside
    runs made with ``k_options`` come back; the fixed-K runs stay.

    :param previous: the stored JSON (``{}`` for none).
    :param k_options: this invocation's ``select_k`` options.
    :return: ``(runs, superseded_runs)``.
    """
    runs: list[dict] = previous.get("runs", [])
    superseded: list[dict] = previous.get("superseded_runs", [])
    old_options = previous.get("select_k_options", {})
    if not previous or old_options == k_options:
        return runs, superseded
    stale = [run for run in runs if k_is_chosen(run["shares"])]
    print(f"{len(stale)} runs with K chosen by select_k {old_options or 'defaults'} set aside (superseded_runs)", flush=True)
    kept = [run for run in runs if not k_is_chosen(run["shares"])]
    superseded = superseded + [{**run, "select_k_options": old_options} for run in stale]
    restored = [{k: v for k, v in run.items() if k != "select_k_options"} for run in superseded if run["select_k_options"] == k_options]
    return kept + restored, [run for run in superseded if run["select_k_options"] != k_options]


def print_issue_table(em_options: dict[str, Any]) -> None:
    """The issue's table (FairGrid 80/20, 100 users, seeds 0 and 1) with this EM and both oracles beside it."""
    print("| comparisons / user | mistake_rate | beta | issue EM | issue oracle | EM | oracle (exact) | BT oracle |")
    print("|---|---|---|---|---|---|---|---|")
    for cell in ISSUE_TABLE:
        runs = [
            run_one("fairgrid", cell["comparisons_per_user"], cell["mistake_rate"], cell["beta"], "80/20", seed, em_options)
            for seed in (0, 1)
        ]
        values = {key: ", ".join(f"{r[key]:.2f}" for r in runs) for key in ("em_ari", "oracle_ari", "oracle_bt_ari")}
        issue = {key: ", ".join(f"{v:.2f}" for v in cell[key]) for key in ("em_ari", "oracle_ari")}
        print(
            f"| {cell['comparisons_per_user']} | {cell['mistake_rate']} | {cell['beta']:g} | {issue['em_ari']} | {issue['oracle_ari']} "
            f"| {values['em_ari']} | {values['oracle_ari']} | {values['oracle_bt_ari']} |",
            flush=True,
        )


def default_output(quick: bool) -> Path:
    """``results/em_noise.json`` (``results/quick/`` for ``--quick``): the output that also gets the plot and a RESULTS.md line."""
    return results_dir(quick) / f"{NAME}.json"


def save(
    args: argparse.Namespace, runs: list[dict], em_options: dict[str, Any], k_options: dict[str, Any], superseded: list[dict] | None = None
) -> None:
    """Write the JSON (and, for the default output, the plot and the RESULTS.md line).

    :param superseded: runs whose K was chosen with earlier ``select_k`` options, kept but not summarised.
    """
    rows = summarise(runs)
    accepted = acceptance(rows)
    result = {
        "rows": rows,
        "runs": runs,
        "acceptance": accepted,
        # The same acceptance against the other oracles (what EM's likelihood could reach with exact rewards)
        **{
            f"acceptance_{ties}_oracle": acceptance(rows, key)
            for ties, key in ORACLE_KEYS.items()
            if ties != "exact" and all(key in r for r in rows)
        },
        **({"acceptance_learned_oracle": acceptance(rows, LEARNED_ORACLE_KEY)} if all(LEARNED_ORACLE_KEY in r for r in rows) else {}),
        "issue_table": ISSUE_TABLE,
        "em_options": em_options,
        "select_k_options": k_options,
        **({"superseded_runs": superseded} if superseded else {}),
        "passed": bool(rows)
        and accepted["within_0.05_where_oracle_ge_0.8"] == accepted["cells_oracle_ge_0.8"]
        and accepted["within_0.15_everywhere"] == accepted["cells"],
        "setup": {
            "n_users": N_USERS,
            "segment_length": SEGMENT_LENGTH,
            "heldout_per_user": HELDOUT_PER_USER,
            "em": "EMRewardMixture(K, use_action=False, use_next_state=True, seed=seed, **em_options) ('<env>:key' options "
            "for that env only); "
            "K by select_k(1..4, **select_k_options) for 60/30/10",
            "oracle": "argmax over true groups of the users' answer likelihood under the true reward, beta and mistake rate",
            "oracles": "oracle_ari: the simulator's exact tie rule; oracle_bt_ari: 'equal' as the soft target 0.5; "
            "oracle_davidson_ari / oracle_hurdle_ari: 'equal' scored by that tie model, its parameters fitted on the true groups",
        },
    }
    if args.no_results_md or args.output != default_output(args.quick):
        write_atomic(args.output, lambda handle: handle.write((json.dumps(result, indent=2) + "\n").encode()))
        return
    plot(rows, results_dir(args.quick) / f"{NAME}.png")
    gaps, gaps_bt = [r["gap"] for r in rows], [r["gap_bt"] for r in rows]
    davidson = result["acceptance_davidson_oracle"]
    covered = ", ".join(sorted({f"{r['env']} {r['shares']}" for r in rows}))
    options = " ".join(f"{key}={value}" for key, value in em_options.items()) or "defaults"
    k_chosen_by = " ".join(f"{key}={value}" for key, value in k_options.items()) or "criterion=heldout"
    summary = (
        f"{covered}, EM {options}, select_k {k_chosen_by}: "
        f"{len(runs)} runs in {len(rows)} cells (partial grid unless 720): oracle - EM ARI mean {np.mean(gaps):+.3f}, "
        f"worst {max(gaps):+.3f} (BT oracle: {np.mean(gaps_bt):+.3f}, worst {max(gaps_bt):+.3f}); "
        f"within 0.05 in {accepted['within_0.05_where_oracle_ge_0.8']}/{accepted['cells_oracle_ge_0.8']} cells with oracle >= 0.8, "
        f"within 0.15 in {accepted['within_0.15_everywhere']}/{accepted['cells']}. "
        "Against the Davidson oracle (true rewards, 'equal' scored by Davidson's tie model, as EM scores it): "
        f"worst gap {davidson['worst_gap']:+.3f}, "
        f"within 0.05 in {davidson['within_0.05_where_oracle_ge_0.8']}/{davidson['cells_oracle_ge_0.8']}, "
        f"within 0.15 in {davidson['within_0.15_everywhere']}/{davidson['cells']}. "
        f"{learned_oracle_summary(rows)}"
        f"{issue_cells_summary(rows)}"
    )
    target = "EM within 0.05 of oracle where oracle >= 0.8; within 0.15 everywhere"
    write_result(NAME, result, summary, target, quick=args.quick, commands=[r["command"] for r in runs if "command" in r])


if __name__ == "__main__":
    main()
