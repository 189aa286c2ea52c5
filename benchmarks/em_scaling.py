"""EM reward-mixture fit time vs. number of comparisons (K = 3, HalfCheetah-sized transitions).

Synthetic data with HalfCheetah-v5 shapes: observations ``(17,)`` drawn
``N(0, 1)``, actions ``(6,)`` uniform in ``[-1, 1]``, segments of 25 steps,
``next_obs`` = ``obs`` + small noise. Three groups with 60/30/10 shares read
the "velocity" coordinate (index 8, where HalfCheetah keeps the root's x
velocity): ``fast`` = ``v``, ``backward`` = ``-v``, ``calm`` = ``-|v| - 0.1 |a|^2``
(HalfCheetah's groups of ``envs/mujoco.py``, on synthetic states). Every user
answers 25 comparisons, deterministically (Bradley-Terry ``beta = inf``).

For each size the full :meth:`EMRewardMixture.fit` is timed (feature encoding,
pooled initial fit, splitting initialisation, EM iterations, final M-step),
with default hyperparameters and one torch thread; the median of ``--repeats``
fits on different data seeds is reported. Targets: 10,000 comparisons
in <= 30 s; doubling the data at most 2.3 times the time.

Every fit runs in a fresh child process, so ``peak_memory_mb`` (the child's peak resident
memory: data, features and EM) belongs to that size alone. Sizes whose projected memory or
time (linear in the comparisons, from the largest size measured so far) exceeds
``--max-memory-mb`` / ``--max-seconds`` are not run: their row says so (the current EM holds
every comparison's segments in memory, so 1,000,000 comparisons of this shape do not fit).

Writes ``benchmarks/results/em_scaling.json`` and updates this benchmark's line
in ``benchmarks/RESULTS.md``.

    .venv/bin/python -m benchmarks.em_scaling [--sizes 2500 5000 10000 20000] [--repeats 3] [--seed 0]
        [--max-memory-mb 6000] [--max-seconds 600]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import time

import numpy as np
import torch

from benchmarks.common import write_result
from egalitarian_rl.preferences import PreferenceDataset, Transitions, UserGroup
from egalitarian_rl.preferences.population import Population
from egalitarian_rl.rewards import EMRewardMixture, adjusted_rand_index

NAME = "em_scaling"
OBS_DIM, ACT_DIM, SEGMENT_LENGTH, VELOCITY = 17, 6, 25, 8
COMPARISONS_PER_USER = 25
TARGET_SECONDS_10K = 30.0
TARGET_DOUBLING = 2.3


def _fast(t: Transitions) -> np.ndarray:
    return t.next_obs[..., VELOCITY]


def _backward(t: Transitions) -> np.ndarray:
    return -t.next_obs[..., VELOCITY]


def _calm(t: Transitions) -> np.ndarray:
    return -np.abs(t.next_obs[..., VELOCITY]) - 0.1 * np.square(t.acts).sum(-1)


POPULATION = Population([UserGroup("fast", _fast, 0.6), UserGroup("backward", _backward, 0.3), UserGroup("calm", _calm, 0.1)])


def synthetic_dataset(n_comparisons: int, seed: int) -> PreferenceDataset:
    """``n_comparisons`` labelled comparisons of fresh synthetic segments, 25 per user."""
    rng = np.random.default_rng(seed)
    n_users = n_comparisons // COMPARISONS_PER_USER
    user_groups = POPULATION.make_users(n_users)
    user_ids = np.repeat(np.arange(n_users), COMPARISONS_PER_USER)

    def segments() -> Transitions:
        obs = rng.standard_normal((n_comparisons, SEGMENT_LENGTH, OBS_DIM)).astype(np.float32)
        acts = rng.uniform(-1, 1, (n_comparisons, SEGMENT_LENGTH, ACT_DIM)).astype(np.float32)
        next_obs = (obs + 0.1 * rng.standard_normal(obs.shape)).astype(np.float32)
        return Transitions(obs, acts, next_obs, {})

    segments_a, segments_b = segments(), segments()
    labels, _ = POPULATION.label(segments_a, segments_b, user_groups[user_ids], rng)
    return PreferenceDataset(
        user_ids, segments_a, segments_b, labels, np.arange(n_users), user_groups, POPULATION.group_names, {"synthetic": True}
    )


def fit_one(n_comparisons: int, seed: int, threads: int) -> dict:
    """Time one EM fit on fresh data (run in a child process: its peak memory is this fit's)."""
    torch.set_num_threads(threads)
    # Warm-up on a tiny fit: first-call costs (lazy imports in torch.optim, allocator) are not EM's.
    EMRewardMixture(3, seed=seed, max_iter=1, final_epochs=0).fit(synthetic_dataset(300, seed))
    dataset = synthetic_dataset(n_comparisons, seed)
    start = time.perf_counter()
    model = EMRewardMixture(3, seed=seed, use_next_state=True).fit(dataset)
    seconds = time.perf_counter() - start
    return {
        "seed": seed,
        "seconds": round(seconds, 3),
        "iterations": model.n_iter_,
        "converged": model.converged_,
        "ari": round(adjusted_rand_index(dataset.user_groups, model.assignments_), 4),
        # ru_maxrss is in KiB on Linux.
        "peak_memory_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def _in_child(n_comparisons: int, seed: int, threads: int) -> dict:
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fit_one, (n_comparisons, seed, threads))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2500, 5000, 10000, 20000])
    parser.add_argument("--seed", type=int, default=0, help="data and EM seed of the first repeat")
    parser.add_argument("--repeats", type=int, default=3, help="fits per size (seeds seed, seed+1, ...); the median is reported")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: the machine is shared)")
    parser.add_argument("--dry-run", action="store_true", help="print, do not write results")
    parser.add_argument("--max-memory-mb", type=float, default=6000.0, help="do not run sizes projected to need more")
    parser.add_argument("--max-seconds", type=float, default=600.0, help="do not run sizes projected to take longer")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    # Sizes are interleaved across repeats (2.5k, 5k, 10k, 20k, 2.5k, ...) so that load from
    # other processes on the shared machine hits every size alike; each repeat uses its own
    # data seed, and the median over repeats is reported (EM's iteration count varies by data).
    runs: dict[int, list[dict]] = {n: [] for n in args.sizes}
    skipped: dict[int, str] = {}
    for repeat in range(args.repeats):
        for n in args.sizes:
            measured = [m for m in args.sizes if runs[m] and m < n]
            if n in skipped:
                continue
            if measured:
                # Projection from the largest size measured so far, linear in the comparisons.
                base = max(measured)
                memory = max(r["peak_memory_mb"] for r in runs[base]) * n / base
                seconds = max(r["seconds"] for r in runs[base]) * n / base
                if memory > args.max_memory_mb or seconds > args.max_seconds:
                    skipped[n] = (
                        f"not run: projected {memory:,.0f} MB and {seconds:,.0f} s from {base:,} comparisons "
                        f"(bounds --max-memory-mb {args.max_memory_mb:g}, --max-seconds {args.max_seconds:g})"
                    )
                    print(json.dumps({"n_comparisons": n, "skipped": skipped[n]}), flush=True)
                    continue
            run = _in_child(n, args.seed + repeat, args.threads)
            runs[n].append(run)
            print(json.dumps({"n_comparisons": n, **run}), flush=True)
    rows = [
        {
            "n_comparisons": n,
            "seconds": round(float(np.median([r["seconds"] for r in runs[n]])), 3),
            "iterations": float(np.median([r["iterations"] for r in runs[n]])),
            "peak_memory_mb": round(float(np.median([r["peak_memory_mb"] for r in runs[n]])), 1),
            "n_users": n // COMPARISONS_PER_USER,
            "runs": runs[n],
        }
        if runs[n]
        else {"n_comparisons": n, "n_users": n // COMPARISONS_PER_USER, "skipped": skipped.get(n, "not run")}
        for n in args.sizes
    ]

    by_size = {r["n_comparisons"]: r["seconds"] for r in rows if "seconds" in r}
    ratios = {
        f"{a}->{b}": round(by_size[b] / by_size[a], 3)
        for a, b in zip(args.sizes[:-1], args.sizes[1:])
        if b == 2 * a and {a, b} <= set(by_size)
    }
    passed_10k = by_size.get(10000, float("inf")) <= TARGET_SECONDS_10K if 10000 in by_size else None
    passed_doubling = all(r <= TARGET_DOUBLING for r in ratios.values()) if ratios else None
    result = {
        "rows": rows,
        "doubling_ratios": ratios,
        "targets": {"seconds_at_10000": TARGET_SECONDS_10K, "doubling_ratio": TARGET_DOUBLING},
        "passed": bool(passed_10k) and bool(passed_doubling),
        "setup": {
            "K": 3,
            "segment_length": SEGMENT_LENGTH,
            "obs_dim": OBS_DIM,
            "act_dim": ACT_DIM,
            "comparisons_per_user": COMPARISONS_PER_USER,
            "groups": {g.name: g.share for g in POPULATION.groups},
            "data": "synthetic HalfCheetah-shaped transitions (see module docstring)",
            "em": "EMRewardMixture defaults (hidden (64, 64), hard EM, split init), use_next_state=True",
            "statistic": f"median of {args.repeats} fits per size (different data seeds), sizes interleaved",
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
        },
    }
    if args.dry_run:
        print(json.dumps(result, indent=2))
        return
    timings = ", ".join(
        f"{r['n_comparisons']:,}: {r['seconds']:.1f} s ({r['iterations']:g} it, {r['peak_memory_mb']:,.0f} MB)"
        if "seconds" in r
        else f"{r['n_comparisons']:,}: not run (projected over the bounds)"
        for r in rows
    )
    ratio_text = ", ".join(f"{k} x{v}" for k, v in ratios.items())
    path = write_result(
        NAME,
        result,
        f"EM K=3, L=25, obs 17 / act 6, 1 thread, median of {args.repeats}: {timings}; doubling {ratio_text}",
        f"10,000 <= {TARGET_SECONDS_10K:g} s; doubling <= x{TARGET_DOUBLING}",
    )
    print(f"wrote {path}")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
