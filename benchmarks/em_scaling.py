"""EM reward-mixture fit time and peak memory vs. number of comparisons (K = 3, HalfCheetah-sized transitions).

Synthetic data with HalfCheetah-v5 shapes: observations ``(17,)`` drawn
``N(0, 1)``, actions ``(6,)`` uniform in ``[-1, 1]``, segments of 25 steps,
``next_obs`` = ``obs`` + small noise. Three groups with 60/30/10 shares read
the "velocity" coordinate (index 8, where HalfCheetah keeps the root's x
velocity): ``fast`` = ``v``, ``backward`` = ``-v``, ``calm`` = ``-|v| - 0.1 |a|^2``
(HalfCheetah's groups of ``envs/mujoco.py``, on synthetic states). Every user
answers ``--comparisons-per-user`` comparisons (25; the 1,000,000 row of issue 10 uses 10,
i.e. 100,000 users), deterministically (Bradley-Terry ``beta = inf``).

Segments come from a **pool** (a :class:`~egalitarian_rl.preferences.dataset.PooledPreferenceDataset`:
each distinct segment stored once, comparisons index it). The pool holds
``min(2 * n_comparisons, --pool-size)`` segments (default 200,000), generated chunk by chunk
in float32. Up to 100,000 comparisons every comparison has two fresh segments of its own (each
pool segment used once, as the per-comparison data of earlier versions); beyond, pairs are drawn
uniformly from the pool (two distinct segments), so at 1,000,000 comparisons each segment appears
in about 10 comparisons. 1,000,000 comparisons x 2 segments x 25 steps x 40 floats would be 8 GB
of float32; the 200,000-segment pool is 0.8 GB.

For each size the full :meth:`EMRewardMixture.fit` is timed (feature encoding,
pooled initial fit, splitting initialisation, EM iterations, final M-step),
with default hyperparameters, ``max_memory_mb=--em-max-memory-mb`` (EM's memory flag, 2048 MiB),
``max_epoch_comparisons=--em-max-epoch-comparisons`` (EM's cap on the comparisons an M-step epoch
trains on, its default 100,000: it binds only above about 110,000 comparisons) and ``--threads``
torch threads (1 by default); the median of ``--repeats`` fits on different data seeds is reported.
Targets: 10,000 comparisons in <= 30 s; doubling the data at most 2.3 times the time (between
rows of the same settings); 1,000,000 comparisons in <= 600 s (issue 10).

Every fit runs in a fresh child process, so ``peak_memory_mb`` (the child's peak resident
memory: torch, data generation, features and EM) belongs to that size alone;
``rss_before_fit_mb`` is that peak before the fit began (torch, warm-up and data), so the
fit's own share is the difference. Each run records the load averages of the machine at its
end (other jobs share the 2 cores).

Resumable: every finished run is written at once; a rerun with the same settings (comparisons
per user, pool size, memory flag, threads, repeats, seed) reuses the runs already in
``em_scaling.json`` for that size, and rows of sizes not asked for are kept. ``--fresh`` ignores them.

Writes ``benchmarks/results/em_scaling.json`` and updates this benchmark's line
in ``benchmarks/RESULTS.md``.

    .venv/bin/python -m benchmarks.em_scaling [--sizes 2500 5000 10000 20000] [--repeats 3] [--seed 0]
        [--comparisons-per-user 25] [--pool-size 200000] [--em-max-memory-mb 2048] [--threads 1]
        [--em-max-epoch-comparisons 100000]
    .venv/bin/python -m benchmarks.em_scaling --sizes 1000000 --repeats 1 --comparisons-per-user 10

``--quick``: sizes 1,250 and 2,500, one fit each, fresh (no reuse of earlier runs); ``results/quick/em_scaling.json``.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import resource
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import BenchmarkParser, command, results_dir, write_result
from egalitarian_rl.preferences import Transitions, UserGroup
from egalitarian_rl.preferences.dataset import PooledPreferenceDataset
from egalitarian_rl.preferences.population import Population
from egalitarian_rl.rewards import EMRewardMixture, adjusted_rand_index

NAME = "em_scaling"
OBS_DIM, ACT_DIM, SEGMENT_LENGTH, VELOCITY = 17, 6, 25, 8
COMPARISONS_PER_USER = 25
POOL_SIZE = 200_000
EM_MAX_MEMORY_MB = 2048.0
#: EMRewardMixture's default ``max_epoch_comparisons``, recorded in every row's settings.
EM_MAX_EPOCH_COMPARISONS = 100_000
TARGET_SECONDS_10K = 30.0
TARGET_DOUBLING = 2.3
TARGET_SECONDS_1M = 600.0
#: Pool segments generated per chunk (float32, ~80 MB of transitions at a time).
GENERATION_CHUNK = 20_000


def _fast(t: Transitions) -> np.ndarray:
    return t.next_obs[..., VELOCITY]


def _backward(t: Transitions) -> np.ndarray:
    return -t.next_obs[..., VELOCITY]


def _calm(t: Transitions) -> np.ndarray:
    return -np.abs(t.next_obs[..., VELOCITY]) - 0.1 * np.square(t.acts).sum(-1)


POPULATION = Population([UserGroup("fast", _fast, 0.6), UserGroup("backward", _backward, 0.3), UserGroup("calm", _calm, 0.1)])


def synthetic_dataset(
    n_comparisons: int, seed: int, comparisons_per_user: int = COMPARISONS_PER_USER, pool_size: int = POOL_SIZE
) -> PooledPreferenceDataset:
    """``n_comparisons`` labelled comparisons, ``comparisons_per_user`` per user, of segments from a pool.

    :param n_comparisons: ``N``; ``N // comparisons_per_user`` users.
    :param seed: seeds segments, pairs and answers.
    :param comparisons_per_user: answers per user.
    :param pool_size: most distinct segments; the pool has ``S = min(2 N, pool_size)``. With
        ``2 N <= pool_size`` every segment is used by exactly one comparison; otherwise pairs are
        drawn uniformly (two distinct segments).
    :return: a pooled dataset (pool ``(S, 25)`` steps of float32 transitions, ``segment_ids`` ``(N, 2)``).
    """
    rng = np.random.default_rng(seed)
    n_users = n_comparisons // comparisons_per_user
    user_groups = POPULATION.make_users(n_users)
    user_ids = np.repeat(np.arange(n_users), comparisons_per_user)
    n = len(user_ids)
    n_pool = min(2 * n, pool_size)
    obs = np.empty((n_pool, SEGMENT_LENGTH, OBS_DIM), dtype=np.float32)
    acts = np.empty((n_pool, SEGMENT_LENGTH, ACT_DIM), dtype=np.float32)
    next_obs = np.empty_like(obs)
    returns = np.empty((n_pool, POPULATION.n_groups))  # (S, G) each group's return of each segment
    for start in range(0, n_pool, GENERATION_CHUNK):
        # Generated in float32 chunk by chunk: never a float64 copy of the pool.
        rows = slice(start, min(start + GENERATION_CHUNK, n_pool))
        size = rows.stop - rows.start
        obs[rows] = rng.standard_normal((size, SEGMENT_LENGTH, OBS_DIM), dtype=np.float32)
        acts[rows] = rng.random((size, SEGMENT_LENGTH, ACT_DIM), dtype=np.float32) * 2 - 1
        next_obs[rows] = obs[rows] + np.float32(0.1) * rng.standard_normal((size, SEGMENT_LENGTH, OBS_DIM), dtype=np.float32)
        chunk = Transitions(obs[rows], acts[rows], next_obs[rows], {})
        for g, group in enumerate(POPULATION.groups):
            returns[rows, g] = group.segment_returns(chunk)
    if 2 * n <= n_pool:
        pairs = rng.permutation(n_pool)[: 2 * n].reshape(n, 2)
    else:
        first = rng.integers(n_pool, size=n)
        pairs = np.stack([first, (first + rng.integers(1, n_pool, size=n)) % n_pool], axis=1)
    labels = np.empty(n)
    comparison_groups = user_groups[user_ids]
    for g, group in enumerate(POPULATION.groups):
        rows = np.flatnonzero(comparison_groups == g)
        labels[rows], _ = group.answer(returns[pairs[rows, 0], g], returns[pairs[rows, 1], g], rng)
    return PooledPreferenceDataset(
        Transitions(obs, acts, next_obs, {}), pairs, user_ids, labels, np.arange(n_users), user_groups,
        POPULATION.group_names, {"synthetic": True},
    )  # fmt: skip


def _peak_mb() -> float:
    # ru_maxrss is in KiB on Linux.
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def fit_one(
    n_comparisons: int, seed: int, threads: int, comparisons_per_user: int, pool_size: int, em_max_memory_mb: float | None,
    em_max_epoch_comparisons: int | None = EM_MAX_EPOCH_COMPARISONS,
) -> dict[str, Any]:  # fmt: skip
    """Time one EM fit on fresh data (run in a child process: its peak memory is this fit's)."""
    torch.set_num_threads(threads)
    # Warm-up on a tiny fit: first-call costs (lazy imports in torch.optim, allocator) are not EM's.
    EMRewardMixture(3, seed=seed, max_iter=1, final_epochs=0).fit(synthetic_dataset(300, seed))
    began = time.perf_counter()
    dataset = synthetic_dataset(n_comparisons, seed, comparisons_per_user, pool_size)
    data_seconds = time.perf_counter() - began
    rss_before = _peak_mb()
    load_before = os.getloadavg()
    start = time.perf_counter()
    model = EMRewardMixture(
        3, seed=seed, use_next_state=True, max_memory_mb=em_max_memory_mb, max_epoch_comparisons=em_max_epoch_comparisons
    ).fit(dataset)
    seconds = time.perf_counter() - start
    return {
        "seed": seed,
        "seconds": round(seconds, 3),
        "iterations": model.n_iter_,
        "converged": model.converged_,
        "ari": round(adjusted_rand_index(dataset.user_groups, model.assignments_), 4),
        "peak_memory_mb": _peak_mb(),
        "rss_before_fit_mb": rss_before,
        "data_seconds": round(data_seconds, 2),
        "n_segments": dataset.n_segments,
        "memory_plan": model.memory_plan_,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }


def _in_child(*args: Any) -> dict:
    """:func:`fit_one` with ``args`` in a fresh (spawned) process."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fit_one, args)


def _row(n: int, settings: dict[str, Any], runs: list[dict], skipped: str | None = None) -> dict[str, Any]:
    """One size's row: medians over its runs (or why it was not run)."""
    row: dict[str, Any] = {"n_comparisons": n, "n_users": n // settings["comparisons_per_user"], "settings": settings}
    if not runs:
        return {**row, "skipped": skipped or "not run"}
    return {
        **row,
        "seconds": round(float(np.median([r["seconds"] for r in runs])), 3),
        "iterations": float(np.median([r["iterations"] for r in runs])),
        "peak_memory_mb": round(float(np.median([r["peak_memory_mb"] for r in runs])), 1),
        "ari": round(float(np.median([r["ari"] for r in runs])), 4),
        "runs": runs,
    }


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Doubling ratios (between rows of the same settings) and the target checks."""
    measured = sorted((r for r in rows if "seconds" in r), key=lambda r: r["n_comparisons"])
    ratios = {}
    for a in measured:
        for b in measured:
            if b["n_comparisons"] == 2 * a["n_comparisons"] and a["settings"] == b["settings"]:
                ratios[f"{a['n_comparisons']}->{b['n_comparisons']}"] = round(b["seconds"] / a["seconds"], 3)
    by_size = {r["n_comparisons"]: r for r in measured}
    checks = {
        "seconds_at_10000": None if 10000 not in by_size else by_size[10000]["seconds"] <= TARGET_SECONDS_10K,
        "doubling_ratio": None if not ratios else all(v <= TARGET_DOUBLING for v in ratios.values()),
        "seconds_at_1000000": None
        if 1_000_000 not in by_size
        else by_size[1_000_000]["seconds"] <= TARGET_SECONDS_1M and "peak_memory_mb" in by_size[1_000_000],
    }
    passed = checks["seconds_at_10000"] is True and all(v is not False for v in checks.values())
    return {"doubling_ratios": ratios, "checks": checks, "passed": passed}


def _load_previous(path: Path) -> dict[int, dict[str, Any]]:
    """Rows already in a results file (``em_scaling.json``), by size (none if it is missing or unreadable)."""
    try:
        previous = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return {int(r["n_comparisons"]): r for r in previous.get("rows", []) if "settings" in r}


def main() -> None:
    parser = BenchmarkParser(__doc__.split("\n\n")[0], quick_defaults={"sizes": [1250, 2500], "repeats": 1, "fresh": True})
    parser.add_argument("--sizes", type=int, nargs="+", default=[2500, 5000, 10000, 20000])
    parser.add_argument("--seed", type=int, default=0, help="data and EM seed of the first repeat")
    parser.add_argument("--repeats", type=int, default=3, help="fits per size (seeds seed, seed+1, ...); the median is reported")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: the machine is shared)")
    parser.add_argument("--comparisons-per-user", type=int, default=COMPARISONS_PER_USER)
    parser.add_argument("--pool-size", type=int, default=POOL_SIZE, help="most distinct segments in the data's pool")
    parser.add_argument("--em-max-memory-mb", type=float, default=EM_MAX_MEMORY_MB, help="EMRewardMixture(max_memory_mb=...); 0 = None")
    parser.add_argument(
        "--em-max-epoch-comparisons", type=int, default=EM_MAX_EPOCH_COMPARISONS,
        help="EMRewardMixture(max_epoch_comparisons=...): most comparisons an M-step epoch trains on; 0 = None (full passes)",
    )  # fmt: skip
    parser.add_argument("--max-seconds", type=float, default=None, help="skip sizes projected (linearly) to take longer")
    parser.add_argument("--fresh", action="store_true", help="ignore runs already in the results file")
    parser.add_argument("--resume-from", type=Path, default=None, help="reuse runs from this copy of a results file too")
    parser.add_argument("--dry-run", action="store_true", help="print, do not write results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    em_memory = args.em_max_memory_mb or None
    epoch_cap = args.em_max_epoch_comparisons or None
    settings = {
        "comparisons_per_user": args.comparisons_per_user,
        "pool_size": args.pool_size,
        "em_max_memory_mb": em_memory,
        "em_max_epoch_comparisons": epoch_cap,
        "threads": args.threads,
        "repeats": args.repeats,
        "seed": args.seed,
    }
    result_path = results_dir(args.quick) / f"{NAME}.json"
    previous = {} if args.fresh else _load_previous(result_path)
    if args.resume_from is not None:
        # A copy of an earlier results file (e.g. before another process rewrote it): its rows are reused too.
        previous = {**_load_previous(args.resume_from), **previous}
    # Runs of a size with the same settings are reused; other sizes' rows are kept as they are.
    runs: dict[int, list[dict]] = {
        n: list(previous[n].get("runs", [])) if n in previous and previous[n]["settings"] == settings else [] for n in args.sizes
    }
    kept = {n: r for n, r in previous.items() if n not in args.sizes}
    skipped: dict[int, str] = {}

    def rows() -> list[dict[str, Any]]:
        # Rows of other sizes are re-read at every save: a run of other sizes writing the file
        # meanwhile (e.g. the 1,000,000 row in another process) is kept, not overwritten.
        others = {**kept, **{n: r for n, r in ({} if args.fresh else _load_previous(result_path)).items() if n not in args.sizes}}
        # each row keeps the command that measured it: RESULTS.md names every command behind the table
        mine = {n: {**_row(n, settings, runs[n], skipped.get(n)), "command": command(NAME)} for n in args.sizes}
        return [{**others, **mine}[n] for n in sorted({**others, **mine})]

    def save() -> None:
        table = rows()
        summary = _summary(table)
        result = {
            "rows": table,
            **summary,
            "targets": {
                "seconds_at_10000": TARGET_SECONDS_10K,
                "doubling_ratio": TARGET_DOUBLING,
                "seconds_at_1000000": TARGET_SECONDS_1M,
            },
            "setup": {
                "K": 3,
                "segment_length": SEGMENT_LENGTH,
                "obs_dim": OBS_DIM,
                "act_dim": ACT_DIM,
                "groups": {g.name: g.share for g in POPULATION.groups},
                "data": "synthetic HalfCheetah-shaped transitions from a segment pool of min(2N, pool_size) float32 "
                "segments; each used once up to N = pool_size / 2, pairs drawn uniformly from the pool beyond "
                "(see module docstring); per-row settings in rows[].settings",
                "em": "EMRewardMixture defaults (hidden (64, 64), hard EM, split init), use_next_state=True, "
                "max_memory_mb = settings.em_max_memory_mb, max_epoch_comparisons = settings.em_max_epoch_comparisons "
                "(rows without it: EM before that cap, full passes)",
                "statistic": "median of settings.repeats fits per size (different data seeds), sizes interleaved",
                "torch": torch.__version__,
            },
        }
        if args.dry_run:
            return
        timings = ", ".join(
            f"{r['n_comparisons']:,}: {r['seconds']:.1f} s ({r['iterations']:g} it, {r['peak_memory_mb']:,.0f} MB, ARI {r['ari']:.2f}, "
            f"{r['settings']['threads']} thread{'s' if r['settings']['threads'] > 1 else ''})"
            if "seconds" in r
            else f"{r['n_comparisons']:,}: not run"
            for r in table
        )
        ratio_text = ", ".join(f"{k} x{v}" for k, v in summary["doubling_ratios"].items())
        write_result(
            NAME,
            result,
            f"EM K=3, L=25, obs 17 / act 6, pooled segments, median of runs: {timings}; doubling {ratio_text}",
            f"10,000 <= {TARGET_SECONDS_10K:g} s; doubling <= x{TARGET_DOUBLING}; 1,000,000 <= {TARGET_SECONDS_1M:g} s",
            quick=args.quick,
            commands=[r["command"] for r in table if "command" in r],
        )

    # Sizes are interleaved across repeats (2.5k, 5k, 10k, 20k, 2.5k, ...) so that load from
    # other processes on the shared machine hits every size alike; each repeat uses its own
    # data seed, and the median over repeats is reported (EM's iteration count varies by data).
    for repeat in range(args.repeats):
        for n in args.sizes:
            seed = args.seed + repeat
            if n in skipped or any(r["seed"] == seed for r in runs[n]):
                if any(r["seed"] == seed for r in runs[n]):
                    print(json.dumps({"n_comparisons": n, "seed": seed, "reused": True}), flush=True)
                continue
            measured = [m for m in args.sizes if runs[m] and m < n]
            if args.max_seconds is not None and measured:
                base = max(measured)
                projected = max(r["seconds"] for r in runs[base]) * n / base
                if projected > args.max_seconds:
                    skipped[n] = f"not run: projected {projected:,.0f} s from {base:,} comparisons (--max-seconds {args.max_seconds:g})"
                    print(json.dumps({"n_comparisons": n, "skipped": skipped[n]}), flush=True)
                    continue
            run = _in_child(n, seed, args.threads, args.comparisons_per_user, args.pool_size, em_memory, epoch_cap)
            runs[n].append(run)
            print(json.dumps({"n_comparisons": n, **run}), flush=True)
            save()  # every finished run is kept, whatever happens to the next
    save()
    print(json.dumps({"rows": [{k: v for k, v in r.items() if k != "runs"} for r in rows()], **_summary(rows())}, indent=2))


if __name__ == "__main__":
    main()
