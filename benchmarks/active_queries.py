"""Active vs random queries: how many comparisons EM needs to find FairGrid's groups and rewards.

Simulated users (FairGrid, majority 0.8 / minority 0.2, Bradley-Terry beta = 5) answer queries
picked by :mod:`egalitarian_rl.labelling.queries`: ``random`` or ``disagreement`` (variance of
the EM members' ``P(a > b)`` under the user's posterior, 20% random picks). Every user answers
``warmup`` random queries, then ``step`` more per round; EM is refitted from scratch after each
round. A run stops at the first round where

* the users' groups are recovered: ARI >= 0.95, and
* the mixture is accurate for every group: each user's assigned member orders held-out pairs
  (segments never queried, from another rollout) as the user's *true* group reward does on
  >= 85% of the pairs that reward does not tie, averaged over the group's users,

and records the total number of answered comparisons. Medians over seeds; target: active
needs <= 60% of random's comparisons.

Run: ``python -m benchmarks.active_queries`` (about 5 min on 2 shared cores: one EM fit per round, ~1-3 s each).
``--quick``: seed 0, 40 users, 2 queries per user per round up to 8 per user (``results/quick/``).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from benchmarks.common import BenchmarkParser, write_result
from egalitarian_rl import envs
from egalitarian_rl.io import to_jsonable
from egalitarian_rl.labelling.queries import make_rule
from egalitarian_rl.labelling.simulate import SimulatedCampaign
from egalitarian_rl.preferences.population import Population
from egalitarian_rl.preferences.segments import Transitions, rollout_segments, sample_pairs
from egalitarian_rl.rewards import EMRewardMixture, adjusted_rand_index

ENV_ID = envs.FAIRGRID_ID
SHARES = {"majority": 0.8, "minority": 0.2}
ARI_TARGET, ACCURACY_TARGET, RATIO_TARGET = 0.95, 0.85, 0.60


def true_order_accuracy(
    mixture: EMRewardMixture, population: Population, user_groups: np.ndarray, test: Transitions, pairs: np.ndarray
) -> np.ndarray:
    """``(G,)`` per true group: mean over its users of the share of test pairs their member orders like the group's true reward.

    :param user_groups: ``(U,)`` true group of each fitted user (in ``mixture.users_`` order).
    :param test: held-out segments ``(S, L)``; ``pairs`` ``(P, 2)`` positions in it.
    """
    with torch.no_grad():
        member_returns = mixture.reward.segment_returns(test).numpy()  # (S, K)
    member_diff = member_returns[pairs[:, 0]] - member_returns[pairs[:, 1]]  # (P, K)
    accuracy = np.zeros((population.n_groups, member_diff.shape[1]))
    for g, group in enumerate(population.groups):
        true_returns = group.segment_returns(test)
        true_diff = true_returns[pairs[:, 0]] - true_returns[pairs[:, 1]]
        strict = true_diff != 0
        accuracy[g] = (np.sign(member_diff[strict]) == np.sign(true_diff[strict])[:, None]).mean(axis=0)
    per_user = accuracy[user_groups, mixture.assignments_]
    return np.array([per_user[user_groups == g].mean() for g in range(population.n_groups)])


def run(rule_name: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """One campaign until both targets hold (or the budget ends); the history of every round."""
    population = envs.make_population(ENV_ID, SHARES, beta=args.beta)
    env = gym.make(ENV_ID, random_start=True)
    pool = rollout_segments(env, args.pool_size, args.segment_length, "random", population.info_keys, seed=seed)
    test = rollout_segments(env, args.test_size, args.segment_length, "random", population.info_keys, seed=seed + 10_000)
    rng = np.random.default_rng(seed)
    candidates = np.unique(np.sort(sample_pairs(len(pool.acts), args.n_candidates, rng), axis=1), axis=0)
    test_pairs = sample_pairs(len(test.acts), args.test_pairs, rng)
    metadata = {"env_id": ENV_ID, "n_actions": int(env.action_space.n), "segment_length": args.segment_length}
    # The same users and answer noise for both rules: only the picks differ.
    campaign = SimulatedCampaign(
        population, pool, candidates, args.n_users, make_rule(rule_name, args.epsilon), seed=seed, metadata=metadata
    )
    campaign.ask(args.warmup)
    history = []
    while True:
        data = campaign.dataset()
        start = time.perf_counter()
        mixture = EMRewardMixture(2, use_action=False, use_next_state=True, seed=seed).fit(data)
        groups = data.user_groups[data.positions_of(mixture.users_)]
        ari = adjusted_rand_index(groups, mixture.assignments_)
        accuracy = true_order_accuracy(mixture, population, groups, test, test_pairs)
        per_user = len(data) / campaign.n_users
        history.append(
            {
                "comparisons": len(data),
                "per_user": per_user,
                "ari": ari,
                "accuracy": accuracy.tolist(),
                "fit_s": time.perf_counter() - start,
            }
        )
        reached = bool(ari >= ARI_TARGET and accuracy.min() >= ACCURACY_TARGET)
        print(
            f"  {rule_name:12s} seed {seed}: {len(data):5d} comparisons ({per_user:.1f}/user)  ARI {ari:.3f}  "
            f"accuracy {np.round(accuracy, 3).tolist()}",
            flush=True,
        )
        if reached or per_user >= args.max_per_user:
            return {"comparisons": len(data) if reached else None, "reached": reached, "history": history}
        campaign.refresh(mixture)
        campaign.ask(args.step)


def main() -> None:
    quick = {"seeds": [0], "n_users": 40, "step": 2, "max_per_user": 8}
    parser = BenchmarkParser(__doc__, quick_defaults=quick, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--n-users", type=int, default=100)
    parser.add_argument("--beta", type=float, default=5.0)
    parser.add_argument("--segment-length", type=int, default=10)
    parser.add_argument("--pool-size", type=int, default=600)
    parser.add_argument("--n-candidates", type=int, default=6000)
    parser.add_argument("--test-size", type=int, default=400)
    parser.add_argument("--test-pairs", type=int, default=4000)
    parser.add_argument("--warmup", type=int, default=2, help="random queries per user before the first fit")
    parser.add_argument("--step", type=int, default=1, help="queries per user per round")
    parser.add_argument("--epsilon", type=float, default=0.2, help="share of random picks of the disagreement rule")
    parser.add_argument("--max-per-user", type=int, default=60)
    parser.add_argument("--no-write", action="store_true", help="print only (no JSON / RESULTS.md)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    runs: dict[str, list[dict[str, Any]]] = {"disagreement": [], "random": []}
    for seed in args.seeds:
        for rule in runs:
            runs[rule].append(run(rule, seed, args))

    def median(rule: str) -> float | None:
        # A run that never reached the targets counts as needing more than its budget (+inf).
        values = [r["comparisons"] if r["reached"] else np.inf for r in runs[rule]]
        value = float(np.median(values))
        return value if np.isfinite(value) else None

    active, random = median("disagreement"), median("random")
    ratio = None if active is None or random is None else active / random
    passed = ratio is not None and ratio <= RATIO_TARGET
    per_seed = {rule: [r["comparisons"] for r in runs[rule]] for rule in runs}
    result = {
        "env_id": ENV_ID,
        "shares": SHARES,
        "settings": {k: v for k, v in vars(args).items() if k not in ("no_write", "quick")},
        "targets": {"ari": ARI_TARGET, "accuracy_per_group": ACCURACY_TARGET, "ratio": RATIO_TARGET},
        "active_comparisons": active,
        "random_comparisons": random,
        "ratio": ratio,
        "per_seed": per_seed,
        "runs": runs,
        "passed": passed,
    }
    summary = (
        f"FairGrid 80/20, {args.n_users} users, beta {args.beta:g}, {len(args.seeds)} seeds: comparisons to ARI >= {ARI_TARGET} and "
        f"accuracy >= {ACCURACY_TARGET:.0%} per group: active (disagreement) {active} vs random {random} (median), "
        f"ratio {'n/a' if ratio is None else f'{ratio:.2f}'}; per seed active {per_seed['disagreement']}, random {per_seed['random']}"
    )
    print(summary)
    if not args.no_write:
        # to_jsonable: numpy scalars in the histories become plain JSON numbers.
        print(write_result("active_queries", to_jsonable(result), summary, f"active <= {RATIO_TARGET:.0%} of random", quick=args.quick))


if __name__ == "__main__":
    main()
