"""Per-group metrics: mean true returns, win-rates against a baseline, shifted ratios.

Conventions used throughout (and written into every report):

* **win-rate** of A vs B: over *all* pairs (episode of A, episode of B), the
  fraction in which A's true return is higher, ties counting half. 0.5 means
  no difference, ``win_rate(a, b) + win_rate(b, a) == 1``.
* **shifted ratio** of A vs B: ``(A - min) / (B - min)``, returns counted from
  the env's lowest possible episode return ``min``, so that "33% more" means
  the same thing whatever the reward's offset.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from egalitarian_rl.io import to_jsonable

#: Evaluation returns of one method: ``(n_episodes, K)`` for one training seed, or
#: per training seed a list of ``(n_episodes_s, K)`` arrays / an array ``(n_seeds, n_episodes, K)``.
MethodReturns = np.ndarray | Sequence[np.ndarray]

#: Relative tolerance used to decide that a return sits at the lowest possible return.
_FLOOR_RTOL = 1e-9


def _finite_1d(values: Any, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D (n,), got shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"{name} is empty: need at least one return")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} holds NaN or infinite returns")
    return array


def win_rate(returns_a: Any, returns_b: Any) -> float:
    """Fraction of all pairs ``(a_i, b_j)`` in which A's return beats B's, ties counting half.

    Every episode of A is compared with every episode of B (``n * m`` pairs),
    so the result is the probability that a random episode of A beats a random
    episode of B (the Mann-Whitney U statistic divided by ``n * m``). 0.5 means
    no difference; ``win_rate(a, b) + win_rate(b, a) == 1``; identical inputs
    give 0.5. Computed by sorting, in ``O((n + m) log m)``.

    :param returns_a: ``(n,)`` finite returns of A.
    :param returns_b: ``(m,)`` finite returns of B.
    :raises ValueError: empty, not 1-D, or non-finite inputs.
    """
    a = _finite_1d(returns_a, "returns_a")
    b = np.sort(_finite_1d(returns_b, "returns_b"))
    below = np.searchsorted(b, a, side="left")  # per a_i: how many b_j < a_i
    below_or_equal = np.searchsorted(b, a, side="right")  # ... b_j <= a_i
    ties = below_or_equal - below
    twice_wins = 2 * int(below.sum()) + int(ties.sum())
    return twice_wins / (2 * a.size * b.size)


def _seed_means(per_seed: Any, name: str) -> np.ndarray:
    if isinstance(per_seed, np.ndarray) and per_seed.ndim == 2:
        per_seed = list(per_seed)
    if isinstance(per_seed, np.ndarray):
        return _finite_1d(per_seed, name)
    if len(per_seed) == 0:
        raise ValueError(f"{name} is empty: need at least one seed")
    means = [float(np.mean(_finite_1d(np.atleast_1d(seed), f"{name}[{i}]"))) for i, seed in enumerate(per_seed)]
    return np.array(means)


def win_rate_over_seeds(seeds_a: Any, seeds_b: Any, paired: bool = True) -> float:
    """Win-rate of A vs B between training seeds, comparing each seed's mean return.

    Within one trained policy the episode-to-episode noise is often far below
    the gap between methods (a deterministic policy in a deterministic env gives
    identical episodes), so an episode win-rate is 0, 0.5 or 1; comparing seeds
    says how reliably a method wins.

    :param seeds_a: per training seed of A either its mean return (array ``(n_seeds,)``)
        or its episode returns (array ``(n_seeds, n_episodes)``, or a list of 1-D arrays,
        reduced by their mean).
    :param seeds_b: the same for B.
    :param paired: compare seed ``i`` of A with seed ``i`` of B only (both must have
        the same number of seeds; use when seed ``i`` of both shares data, such as the
        same preference data and reward model); else all ``n_a * n_b`` seed pairs,
        as :func:`win_rate`. Ties count half either way.
    :raises ValueError: empty or non-finite inputs, or unequal seed counts when paired.
    """
    a = _seed_means(seeds_a, "seeds_a")
    b = _seed_means(seeds_b, "seeds_b")
    if not paired:
        return win_rate(a, b)
    if a.shape != b.shape:
        raise ValueError(f"paired comparison needs as many seeds for A as for B, got {a.size} and {b.size}")
    return float(np.mean(np.where(a > b, 1.0, np.where(a == b, 0.5, 0.0))))


def shifted_ratio(a_mean: float, b_mean: float, min_return: float) -> float:
    """``(a_mean - min_return) / (b_mean - min_return)``: A's return as a multiple of B's, counted from the floor.

    ``min_return`` is the env's lowest possible episode return (e.g.
    ``FairGridEnv.min_episode_return == 0``), so 1.33 means A gets 33% more of
    what is attainable above the floor than B does, whatever the reward's offset.
    Division by zero is handled: when B sits at the floor (within a relative
    tolerance of 1e-9), the ratio is ``1.0`` if A does too and ``math.inf`` if A
    is above it. Never NaN.

    :raises ValueError: a non-finite argument, or a mean below ``min_return``
        (the floor is wrong).
    """
    a, b, floor = float(a_mean), float(b_mean), float(min_return)
    if not all(math.isfinite(x) for x in (a, b, floor)):
        raise ValueError(f"shifted_ratio needs finite numbers, got a={a}, b={b}, min_return={floor}")
    tolerance = _FLOOR_RTOL * max(1.0, abs(a), abs(b), abs(floor))
    numerator, denominator = a - floor, b - floor
    if numerator < -tolerance or denominator < -tolerance:
        raise ValueError(f"mean return below the lowest possible return {floor} (a={a}, b={b}): is min_return right?")
    if denominator <= tolerance:
        return 1.0 if numerator <= tolerance else math.inf
    return max(numerator, 0.0) / denominator


def _per_seed_arrays(method: str, value: MethodReturns, n_groups: int, group_names: Sequence[str]) -> list[np.ndarray]:
    expected = f"(n_episodes, K) with K = len(group_names) = {n_groups} {list(group_names)}"
    if isinstance(value, np.ndarray) or not isinstance(value, Sequence):
        array = np.asarray(value, dtype=np.float64)
        if array.ndim == 2:
            seeds = [array]
        elif array.ndim == 3:
            seeds = list(array)
        else:
            raise ValueError(f"returns[{method!r}] has shape {array.shape}: expected {expected}, or (n_seeds, n_episodes, K)")
    else:
        if len(value) == 0:
            raise ValueError(f"returns[{method!r}] is an empty list of seeds")
        seeds = [np.asarray(seed, dtype=np.float64) for seed in value]
    for i, seed in enumerate(seeds):
        where = f"returns[{method!r}]" + (f"[{i}]" if len(seeds) > 1 else "")
        if seed.ndim != 2 or seed.shape[1] != n_groups:
            raise ValueError(f"{where} has shape {seed.shape}: expected {expected}")
        if seed.shape[0] == 0:
            raise ValueError(f"{where} has no episodes (shape {seed.shape})")
        if not np.all(np.isfinite(seed)):
            raise ValueError(f"{where} holds NaN or infinite returns")
    return seeds


def build_metrics(
    returns: Mapping[str, MethodReturns],
    group_names: Sequence[str],
    baseline: str = "rlhf",
    min_episode_return: float | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Per-method, per-group summary of true evaluation returns, ready for ``metrics.json``.

    Shape (``B`` is the ``baseline`` name, e.g. ``rlhf``)::

        {"groups": [group, ...],
         "baseline": B,
         "methods": {method: {
             "groups": {group: {"mean_return": float,       # over all episodes (all seeds pooled)
                                "std_return": float,        # sample std (ddof=1), 0.0 for one episode
                                "win_rate_vs_B": float,     # win_rate(method, B) in this group; B itself: 0.5
                                "ratio_vs_B": float | None, # only with min_episode_return; see below
                                "seed_win_rate_vs_B": float}},  # only if method and B have >= 2 seeds
             "worst_group": group,              # group with the lowest mean_return
             "worst_group_return": float,       # that mean_return
             "average_group_return": float,     # unweighted mean of the groups' mean_return
             "n_episodes": int, "n_seeds": int}},
         "min_episode_return": float,   # only if given
         "extra": {...}}                # only if given

    ``ratio_vs_B`` is :func:`shifted_ratio` of the group's mean returns; it is
    ``None`` (JSON ``null``) where unbounded, i.e. where B sits at the floor and
    the method is above it (strict JSON has no infinity). ``seed_win_rate_vs_B``
    is :func:`win_rate_over_seeds`, seed-paired when both have the same number of
    seeds, else over all seed pairs. Worst group and averages compare raw returns:
    put groups on one scale first if their rewards are not comparable.
    Everything is plain Python (JSON-serialisable) and NaN-free.

    :param returns: method name -> true group returns ``(n_episodes, K)`` (columns
        ordered as ``group_names``), or per training seed a list of ``(n_episodes_s, K)``
        arrays, or an array ``(n_seeds, n_episodes, K)``.
    :param group_names: the K groups' names.
    :param baseline: the method the others are compared with (single-reward RLHF).
    :param min_episode_return: the env's lowest possible episode return; enables ``ratio_vs_B``.
    :param extra: anything else to record (converted by :func:`~egalitarian_rl.io.to_jsonable`).
    :raises ValueError: no methods, baseline missing, bad group names, an array of the
        wrong shape, no episodes, non-finite returns, or returns below ``min_episode_return``.
    """
    names = [str(name) for name in group_names]
    if len(names) == 0:
        raise ValueError("group_names is empty: need at least one group")
    if len(set(names)) != len(names):
        raise ValueError(f"group names must be unique, got {names}")
    if len(returns) == 0:
        raise ValueError(f"returns is empty: need at least the baseline method {baseline!r}")
    if baseline not in returns:
        raise ValueError(f"baseline method {baseline!r} is missing from returns; methods given: {list(returns)}")
    n_groups = len(names)
    seeds = {str(method): _per_seed_arrays(str(method), value, n_groups, names) for method, value in returns.items()}
    if min_episode_return is not None:
        floor = float(min_episode_return)
        if not math.isfinite(floor):
            raise ValueError(f"min_episode_return must be finite, got {min_episode_return}")
        tolerance = _FLOOR_RTOL * max(1.0, abs(floor))
        for method, arrays in seeds.items():
            lowest = min(float(a.min()) for a in arrays)
            if lowest < floor - tolerance:
                raise ValueError(
                    f"returns[{method!r}] has an episode return {lowest} below min_episode_return {floor}: is the floor right?"
                )

    pooled = {method: np.concatenate(arrays, axis=0) for method, arrays in seeds.items()}
    base = pooled[baseline]
    win_key, ratio_key, seed_key = f"win_rate_vs_{baseline}", f"ratio_vs_{baseline}", f"seed_win_rate_vs_{baseline}"
    methods: dict[str, Any] = {}
    for method, episodes in pooled.items():
        means = episodes.mean(axis=0)
        stds = episodes.std(axis=0, ddof=1) if episodes.shape[0] > 1 else np.zeros(n_groups)
        n_seeds, base_seeds = len(seeds[method]), len(seeds[baseline])
        groups: dict[str, Any] = {}
        for k, name in enumerate(names):
            entry: dict[str, Any] = {
                "mean_return": float(means[k]),
                "std_return": float(stds[k]),
                win_key: 0.5 if method == baseline else win_rate(episodes[:, k], base[:, k]),
            }
            if min_episode_return is not None:
                ratio = 1.0 if method == baseline else shifted_ratio(means[k], base[:, k].mean(), float(min_episode_return))
                entry[ratio_key] = ratio if math.isfinite(ratio) else None
            if n_seeds >= 2 and base_seeds >= 2:
                if method == baseline:
                    entry[seed_key] = 0.5
                else:
                    entry[seed_key] = win_rate_over_seeds(
                        [s[:, k] for s in seeds[method]], [s[:, k] for s in seeds[baseline]], paired=n_seeds == base_seeds
                    )
            groups[name] = entry
        worst = int(np.argmin(means))
        methods[method] = {
            "groups": groups,
            "worst_group": names[worst],
            "worst_group_return": float(means[worst]),
            "average_group_return": float(means.mean()),
            "n_episodes": int(episodes.shape[0]),
            "n_seeds": n_seeds,
        }
    metrics: dict[str, Any] = {"groups": names, "baseline": baseline, "methods": methods}
    if min_episode_return is not None:
        metrics["min_episode_return"] = float(min_episode_return)
    if extra is not None:
        metrics["extra"] = to_jsonable(dict(extra))
    return metrics


def add_normalized_scores(
    metrics: dict[str, Any], random_returns: Mapping[str, float], oracle_returns: Mapping[str, float]
) -> dict[str, Any]:
    """Put every group's return on one scale: 0 = a random policy, 1 = the group's oracle.

    Raw returns of different groups are not comparable (metres per second vs
    control cost), so "the worst-off group" is only meaningful on a common scale.
    Adds, in place, ``normalized_score`` to every method's group entries,
    ``worst_group_normalized`` / ``worst_group_normalized_score`` to every method,
    and ``normalization -> group -> {random, oracle}`` (the anchors, mean true returns).
    A group whose oracle is no better than random gets no score (``None``).

    :param metrics: output of :func:`build_metrics`.
    :param random_returns: group -> mean true return of a uniformly random policy.
    :param oracle_returns: group -> mean true return of the policy trained on that group's true reward.
    :return: ``metrics``.
    """
    groups = list(metrics["groups"])
    missing = [g for g in groups if g not in random_returns or g not in oracle_returns]
    if missing:
        raise ValueError(f"normalised scores need a random and an oracle return for every group; missing {missing}")
    metrics["normalization"] = {g: {"random": float(random_returns[g]), "oracle": float(oracle_returns[g])} for g in groups}
    for entry in metrics["methods"].values():
        scores = {}
        for group in groups:
            span = oracle_returns[group] - random_returns[group]
            score = (entry["groups"][group]["mean_return"] - random_returns[group]) / span if span > 1e-12 else None
            entry["groups"][group]["normalized_score"] = None if score is None else float(score)
            if score is not None:
                scores[group] = score
        worst = min(scores, key=scores.get) if scores else None
        entry["worst_group_normalized"] = worst
        entry["worst_group_normalized_score"] = None if worst is None else float(scores[worst])
    return metrics


def check_metrics(metrics: Mapping[str, Any]) -> None:
    """Raise ValueError unless ``metrics`` looks like :func:`build_metrics` output."""
    for key in ("groups", "baseline", "methods"):
        if key not in metrics:
            raise ValueError(f"metrics has no {key!r} entry: build it with build_metrics")
    if metrics["baseline"] not in metrics["methods"]:
        raise ValueError(f"metrics: baseline {metrics['baseline']!r} is not among the methods {list(metrics['methods'])}")
    for method, entry in metrics["methods"].items():
        missing = [g for g in metrics["groups"] if g not in entry.get("groups", {})]
        if missing:
            raise ValueError(f"metrics: method {method!r} has no entry for groups {missing}")


def _fmt(value: float) -> str:
    return f"{value:.2f}" if abs(value) < 1e5 else f"{value:.3g}"


def format_group_table(metrics: Mapping[str, Any]) -> str:
    """Fixed-width text table for the terminal: methods as rows, groups as columns.

    Each cell is ``mean ± std  wr W`` (true episode return; win-rate vs the
    baseline, ties half); a last column gives the worst group's mean return.

    :param metrics: output of :func:`build_metrics`.
    """
    check_metrics(metrics)
    baseline, groups = metrics["baseline"], list(metrics["groups"])
    win_key = f"win_rate_vs_{baseline}"
    header = ["method", *groups, "worst group"]
    rows: list[list[str]] = []
    for method, entry in metrics["methods"].items():
        cells = [method + (" (baseline)" if method == baseline else "")]
        for group in groups:
            g = entry["groups"][group]
            cell = f"{_fmt(g['mean_return'])} ± {_fmt(g['std_return'])}  wr {g[win_key]:.2f}"
            if g.get("normalized_score") is not None:
                cell += f"  score {g['normalized_score']:.2f}"
            cells.append(cell)
        if entry.get("worst_group_normalized") is not None:
            cells.append(f"score {entry['worst_group_normalized_score']:.2f} ({entry['worst_group_normalized']})")
        else:
            cells.append(f"{_fmt(entry['worst_group_return'])} ({entry['worst_group']})")
        rows.append(cells)
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = [cell.rjust(width) for cell, width in zip(cells[1:], widths[1:])]
        return "  ".join([first, *rest]).rstrip()

    rule = "  ".join("-" * width for width in widths)
    note = f"true episode return: mean ± std; wr = win-rate vs {baseline} (all episode pairs, ties half)"
    if "normalization" in metrics:
        note += "; score = normalised return (0 = random policy, 1 = the group's oracle), worst group by score"
    return "\n".join([line(header), rule, *(line(row) for row in rows), note])


__all__ = [
    "MethodReturns",
    "add_normalized_scores",
    "build_metrics",
    "check_metrics",
    "format_group_table",
    "shifted_ratio",
    "win_rate",
    "win_rate_over_seeds",
]
