"""PNG plots of evaluation metrics and learning curves.

Figures are built with :class:`matplotlib.figure.Figure` and rendered by the
Agg backend without touching pyplot's global state, so these functions are
safe in scripts, tests and notebooks alike. A group has the same colour in
every plot (:func:`group_colors`); files are written atomically.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib as mpl
import numpy as np
from matplotlib.figure import Figure

from egalitarian_rl.evaluation.metrics import check_metrics
from egalitarian_rl.io import write_atomic

#: One learning curve: ``(steps (n_points,), values (n_points,) or (n_seeds, n_points))``.
Curve = tuple[Any, Any]
#: ``method -> curve`` (one value per method) or ``method -> {group -> curve}``.
Curves = Mapping[str, Curve | Mapping[str, Curve]]

_DPI = 120


def group_colors(group_names: Sequence[str]) -> dict[str, Any]:
    """Colour of each group, by its position in ``group_names`` (tab10, then tab20)."""
    palette = list(mpl.colormaps["tab10"].colors)
    palette += [c for c in mpl.colormaps["tab20"].colors if c not in palette]
    return {name: palette[i % len(palette)] for i, name in enumerate(group_names)}


def method_colors(methods: Sequence[str]) -> dict[str, Any]:
    """Colour of each method (Dark2, distinct from the group palette)."""
    palette = list(mpl.colormaps["Dark2"].colors) + list(mpl.colormaps["Set1"].colors)
    return {name: palette[i % len(palette)] for i, name in enumerate(methods)}


def _save(fig: Figure, path: str | os.PathLike[str]) -> Path:
    return write_atomic(path, lambda handle: fig.savefig(handle, format="png", dpi=_DPI))


def _method_axis(ax: Any, methods: list[str]) -> None:
    rotate = len(methods) > 4 or max(len(m) for m in methods) > 12
    ax.set_xticks(np.arange(len(methods)))
    ax.set_xticklabels(methods, rotation=25 if rotate else 0, ha="right" if rotate else "center")
    ax.set_xlabel("method")


def plot_group_returns(metrics: Mapping[str, Any], path: str | os.PathLike[str], title: str | None = None) -> Path:
    """Grouped bar chart: each method's mean true return per group, with std error bars.

    :param metrics: output of :func:`~egalitarian_rl.evaluation.build_metrics`.
    :param path: the PNG to write.
    :return: ``path``.
    """
    check_metrics(metrics)
    methods, groups = list(metrics["methods"]), list(metrics["groups"])
    colors = group_colors(groups)
    width = 0.8 / len(groups)
    x = np.arange(len(methods))
    fig = Figure(figsize=(max(6.0, 1.3 * len(methods) + 2.5), 4.5), layout="constrained")
    ax = fig.subplots()
    for k, group in enumerate(groups):
        means = [metrics["methods"][m]["groups"][group]["mean_return"] for m in methods]
        stds = [metrics["methods"][m]["groups"][group]["std_return"] for m in methods]
        bars = ax.bar(x + (k - (len(groups) - 1) / 2) * width, means, width, yerr=stds, capsize=3, color=colors[group], label=group)
        ax.bar_label(bars, fmt="%.3g", fontsize=7, padding=2)
    if metrics.get("min_episode_return") is not None:
        ax.axhline(metrics["min_episode_return"], color="grey", linestyle=":", linewidth=1, label="lowest possible return")
    ax.axhline(0.0, color="black", linewidth=0.6)
    _method_axis(ax, methods)
    ax.set_ylabel("mean true episode return")
    n_episodes = sorted({metrics["methods"][m].get("n_episodes") for m in methods} - {None})
    over = f" over {n_episodes[0]} episodes" if len(n_episodes) == 1 else ""
    ax.set_title(title or f"True return per user group (mean ± std{over})")
    ax.legend(title="group", fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def plot_win_rates(metrics: Mapping[str, Any], path: str | os.PathLike[str], title: str | None = None) -> Path:
    """Grouped bar chart: each method's per-group win-rate vs the baseline (0.5 = no difference).

    :param metrics: output of :func:`~egalitarian_rl.evaluation.build_metrics`.
    :param path: the PNG to write.
    :return: ``path``.
    """
    check_metrics(metrics)
    baseline, groups = metrics["baseline"], list(metrics["groups"])
    methods = [m for m in metrics["methods"] if m != baseline]
    colors = group_colors(groups)
    win_key = f"win_rate_vs_{baseline}"
    fig = Figure(figsize=(max(6.0, 1.3 * len(methods) + 2.5), 4.5), layout="constrained")
    ax = fig.subplots()
    if methods:
        width = 0.8 / len(groups)
        x = np.arange(len(methods))
        for k, group in enumerate(groups):
            rates = [metrics["methods"][m]["groups"][group][win_key] for m in methods]
            bars = ax.bar(x + (k - (len(groups) - 1) / 2) * width, rates, width, color=colors[group], label=group)
            ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=1)
        _method_axis(ax, methods)
        ax.legend(title="group", fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    else:
        ax.text(0.5, 0.5, f"only the baseline {baseline!r} was evaluated", ha="center", va="center", transform=ax.transAxes)
        ax.set_xticks([])
    ax.axhline(0.5, color="black", linestyle="--", linewidth=1)
    ax.set_ylim(0.0, 1.08)
    ax.set_ylabel(f"win-rate vs {baseline} (ties count half)")
    ax.set_title(title or f"Per-group win-rate vs {baseline} (dashed: 0.5, no difference)")
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def _is_curve(value: Any) -> bool:
    return isinstance(value, (tuple, list)) and len(value) == 2 and not isinstance(value, Mapping)


def _curve_arrays(where: str, curve: Any) -> tuple[np.ndarray, np.ndarray]:
    if not _is_curve(curve):
        raise ValueError(f"curves{where} must be a (steps, values) pair, got {type(curve).__name__}")
    steps = np.asarray(curve[0], dtype=np.float64)
    values = np.asarray(curve[1], dtype=np.float64)
    if steps.ndim != 1 or values.ndim not in (1, 2) or values.shape[-1] != steps.shape[0]:
        raise ValueError(
            f"curves{where}: steps {steps.shape} and values {values.shape} must be (n_points,) and (n_points,) or (n_seeds, n_points)"
        )
    if steps.size == 0:
        raise ValueError(f"curves{where} has no points")
    return steps, values


def _draw_curve(ax: Any, steps: np.ndarray, values: np.ndarray, color: Any, label: str) -> None:
    if values.ndim == 1:
        ax.plot(steps, values, color=color, label=label)
        return
    mean = np.nanmean(values, axis=0)
    std = np.nanstd(values, axis=0)
    ax.plot(steps, mean, color=color, label=f"{label} (mean ± std, {values.shape[0]} seeds)")
    ax.fill_between(steps, mean - std, mean + std, color=color, alpha=0.2, linewidth=0)


def plot_learning_curves(
    curves: Curves,
    path: str | os.PathLike[str],
    title: str = "Learning curves",
    xlabel: str = "environment steps",
    ylabel: str = "mean true episode return",
    group_names: Sequence[str] | None = None,
) -> Path:
    """Learning curves, one line per method or one line per group and a panel per method.

    :param curves: either ``method -> (steps, values)`` (one axes, a line per method)
        or ``method -> {group -> (steps, values)}`` (a panel per method with a shared
        y axis, a line per group in the group's colour). ``steps`` is ``(n_points,)``;
        ``values`` is ``(n_points,)`` or ``(n_seeds, n_points)`` (drawn as mean ± std).
    :param path: the PNG to write.
    :param group_names: group order (fixes the colours, as in the other plots);
        default: order of first appearance.
    :raises ValueError: empty ``curves``, mixed forms, or mismatched steps and values.
    :return: ``path``.
    """
    if len(curves) == 0:
        raise ValueError("curves is empty: nothing to plot")
    per_group = [isinstance(value, Mapping) for value in curves.values()]
    if any(per_group) and not all(per_group):
        raise ValueError("curves mixes method -> (steps, values) and method -> {group: (steps, values)}; use one form")
    methods = [str(m) for m in curves]
    if not all(per_group):
        fig = Figure(figsize=(7.0, 4.5), layout="constrained")
        ax = fig.subplots()
        colors = method_colors(methods)
        for method, curve in curves.items():
            steps, values = _curve_arrays(f"[{method!r}]", curve)
            _draw_curve(ax, steps, values, colors[str(method)], str(method))
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend(title="method", fontsize="small")
        ax.grid(alpha=0.3)
        return _save(fig, path)

    order = list(group_names or [])
    for groups in curves.values():
        order += [str(g) for g in groups if str(g) not in order]  # type: ignore[union-attr]
    colors = group_colors(order)
    ncols = min(len(methods), 3)
    nrows = math.ceil(len(methods) / ncols)
    fig = Figure(figsize=(4.2 * ncols + 1.5, 3.4 * nrows + 0.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, sharey=True, squeeze=False)).ravel()
    handles: dict[str, Any] = {}
    for ax, (method, groups) in zip(axes, curves.items()):
        for group, curve in groups.items():  # type: ignore[union-attr]
            steps, values = _curve_arrays(f"[{method!r}][{group!r}]", curve)
            _draw_curve(ax, steps, values, colors[str(group)], str(group))
            handles.setdefault(str(group), ax.get_lines()[-1])
        ax.set_title(str(method))
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    for ax in axes[len(methods) :]:
        ax.set_visible(False)
    for row in range(nrows):
        axes[row * ncols].set_ylabel(ylabel)
    ordered = [g for g in order if g in handles]
    fig.legend([handles[g] for g in ordered], ordered, title="group", loc="outside right upper", fontsize="small")
    multi_seed = any(np.ndim(curve[1]) == 2 for groups in curves.values() for curve in groups.values())  # type: ignore[union-attr]
    fig.suptitle(title + (" (lines: mean over seeds, bands: ± std)" if multi_seed else ""))
    return _save(fig, path)


# --------------------------------------------------------------------------- fairness frontier
def frontier_envelope(returns: Any) -> np.ndarray:
    """The upper-right convex envelope of 2-D points: the achievable (group 1, group 2) frontier.

    A point is on it if no other point is at least as good for both groups and no
    convex combination of two others beats it: playing policy ``i`` with probability
    ``p`` and policy ``j`` otherwise (chosen once per episode) has expected returns
    ``p * returns[i] + (1 - p) * returns[j]``, so everything under the convex hull's
    upper-right boundary is achievable.

    :param returns: ``(n, 2)`` mean returns of ``n`` policies (group 1, group 2).
    :return: indices of the envelope's vertices, by increasing group-1 return
        (so decreasing group-2 return).
    """
    points = np.asarray(returns, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 2 or points.shape[0] == 0:
        raise ValueError(f"returns must have shape (n, 2) with n >= 1, got {points.shape}")
    # Pareto-efficient points first: by group 1 descending, keep a point only if it beats every
    # point to its right for group 2 (ties in group 1 keep the better group-2 point only).
    order = sorted(range(len(points)), key=lambda i: (-points[i, 0], -points[i, 1]))
    efficient: list[int] = []
    best_second = -np.inf
    for index in order:
        if points[index, 1] > best_second:
            efficient.append(index)
            best_second = points[index, 1]
    efficient.reverse()
    # Then the concave chain through them (monotone chain): drop a vertex that lies on or
    # under the segment joining its neighbours, since a mixture of them does as well.
    hull: list[int] = []
    for index in efficient:
        while len(hull) >= 2:
            (ox, oy), (ax, ay), (bx, by) = points[hull[-2]], points[hull[-1]], points[index]
            if (ax - ox) * (by - oy) - (ay - oy) * (bx - ox) < 0:  # a right turn: hull[-1] bulges out
                break
            hull.pop()
        hull.append(index)
    return np.array(hull, dtype=np.int64)


def maxmin_index(returns: Any) -> int:
    """The max-min point among policies: highest worst-group return, ties broken leximin.

    Among policies whose worst-off group gets the same, the one whose next-worst group
    gets most wins (and so on), so a tie at 0 picks a policy that serves someone well.

    :param returns: ``(n, K)`` mean returns of ``n`` policies.
    :return: the row index.
    """
    points = np.asarray(returns, dtype=np.float64)
    if points.ndim != 2 or points.shape[0] == 0:
        raise ValueError(f"returns must have shape (n, K) with n >= 1, got {points.shape}")
    ordered = np.sort(points, axis=1)  # each row from its worst group up
    return int(np.lexsort(ordered.T[::-1])[-1])


def maxmin_on_envelope(returns: Any, envelope: Any | None = None) -> dict[str, Any]:
    """The point of the envelope (mixtures included) whose lower group return is highest.

    ``min(x, y)`` is concave along each envelope segment, so its maximum is at a
    vertex or where a segment crosses the diagonal ``x = y``.

    :param returns: ``(n, 2)`` mean returns, as for :func:`frontier_envelope`.
    :param envelope: its vertices (computed when ``None``).
    :return: ``{"returns": (2,) list, "min_return", "mix": [i, j], "weight_j"}``: play policy
        ``j`` with probability ``weight_j`` and ``i`` otherwise (``i == j`` at a vertex).
    """
    points = np.asarray(returns, dtype=np.float64)
    chain = frontier_envelope(points) if envelope is None else np.asarray(envelope, dtype=np.int64)
    best = {"returns": points[chain[0]].tolist(), "min_return": float(points[chain[0]].min()), "mix": [int(chain[0])] * 2, "weight_j": 0.0}
    for i, j in itertools.pairwise(chain):
        a, b = points[i], points[j]
        candidates = [0.0, 1.0]
        slope = (b[0] - a[0]) - (b[1] - a[1])
        if slope != 0.0:
            t = (a[1] - a[0]) / slope  # where x(t) = y(t) on this segment
            if 0.0 < t < 1.0:
                candidates.append(float(t))
        for t in candidates:
            point = (1.0 - t) * a + t * b
            if point.min() > best["min_return"] + 1e-12:
                best = {"returns": point.tolist(), "min_return": float(point.min()), "mix": [int(i), int(j)], "weight_j": t}
    return best


def plot_frontier(
    frontier: Mapping[str, Any],
    path: str | os.PathLike[str],
    metrics: Mapping[str, Any] | None = None,
    title: str | None = None,
) -> Path:
    """The (group 1, group 2) true-return frontier of fixed-weight policies, with the methods on it.

    Draws every frontier point (one marker per reward source, labelled with group 1's
    weight), each source's sweep as a thin line, the upper-right convex envelope of all
    points (achievable by playing a random one of two policies per episode), the best
    trained point by its lower group return (the max-min point, a star), the diagonal
    ``x = y`` and, from ``metrics``, where each evaluated method landed.

    :param frontier: ``frontier.json``'s content: ``groups`` (names, the first two are
        plotted) and ``points``, each ``{source, weights: {group: w}, groups: {group:
        {mean_return, std_return}}}``.
    :param path: the PNG to write.
    :param metrics: output of :func:`~egalitarian_rl.evaluation.build_metrics` for the same
        groups; every method in it is marked. ``None``: no methods.
    :return: ``path``.
    """
    groups = list(frontier["groups"])[:2]
    points = list(frontier["points"])
    if len(groups) < 2 or not points:
        raise ValueError(f"a frontier needs two groups and at least one point, got groups {groups} and {len(points)} points")
    first, second = groups
    xy = np.array([[p["groups"][g]["mean_return"] for g in groups] for p in points], dtype=np.float64)
    err = np.array([[p["groups"][g]["std_return"] for g in groups] for p in points], dtype=np.float64)
    span = max(float(np.ptp(xy)), 1e-9)
    fig = Figure(figsize=(7.5, 7.5), layout="constrained")
    ax = fig.subplots()
    styles = {"true": ("o", "tab:blue", "true rewards"), "learned": ("s", "tab:orange", "learned EM rewards")}
    for source in dict.fromkeys(p["source"] for p in points):
        marker, color, label = styles.get(source, ("^", "tab:gray", source))
        rows = [i for i, p in enumerate(points) if p["source"] == source]
        rows.sort(key=lambda i: points[i]["weights"][first])
        ax.errorbar(
            xy[rows, 0],
            xy[rows, 1],
            xerr=err[rows, 0],
            yerr=err[rows, 1],
            fmt=marker + "-",
            color=color,
            alpha=0.75,
            elinewidth=0.6,
            capsize=2,
            linewidth=0.8,
            markersize=6,
            label=f"fixed weights, {label}",
        )
        # Policies that land on the same spot (often: every weight past a threshold picks the same goal)
        # share one label giving their weights' range; each source's labels sit on their own side.
        clusters: list[list[int]] = []
        for i in rows:
            if clusters and np.abs(xy[i] - xy[clusters[-1][0]]).max() < 0.08 * span:
                clusters[-1].append(i)
            else:
                clusters.append([i])
        offset = (4, 4) if source == "true" else (4, 14)
        for cluster in clusters:
            low_w, high_w = (points[cluster[k]]["weights"][first] for k in (0, -1))
            text = f"{low_w:.2f}" if len(cluster) == 1 else f"{low_w:.2f}-{high_w:.2f}"
            ax.annotate(text, xy[cluster[0]], textcoords="offset points", xytext=offset, fontsize=7, color=color)
    envelope = frontier_envelope(xy)
    ax.plot(
        xy[envelope, 0], xy[envelope, 1], color="black", linewidth=2, alpha=0.6, zorder=1, label="envelope of these policies (convex hull)"
    )
    best = maxmin_index(xy)
    ax.plot(
        *xy[best],
        marker="*",
        markersize=20,
        color="gold",
        markeredgecolor="black",
        linestyle="none",
        zorder=4,
        label=f"max-min point ({points[best]['source']}, w={points[best]['weights'][first]:.2f})",
    )
    mixture = maxmin_on_envelope(xy, envelope)
    if mixture["min_return"] > xy[best].min() + 1e-9 * max(1.0, abs(xy[best].min())):
        # Only drawn when a mixture of two trained policies beats every single one for the worse-off group.
        ax.plot(
            *mixture["returns"],
            marker="*",
            markersize=16,
            markerfacecolor="none",
            markeredgecolor="black",
            linestyle="none",
            zorder=4,
            label="max-min of mixtures (on the envelope)",
        )
    if metrics is not None:
        methods = list(metrics["methods"])
        colors = method_colors(methods)
        placed: list[tuple[float, float]] = []
        for method in methods:
            stats = metrics["methods"][method]["groups"]
            if first not in stats or second not in stats:
                continue
            where = (stats[first]["mean_return"], stats[second]["mean_return"])
            ax.plot(*where, marker="D", markersize=9, color=colors[method], markeredgecolor="black", linestyle="none", zorder=5)
            # Methods that land on the same spot (mean and an oracle, often) get their labels stacked, not overprinted.
            crowd = sum(abs(where[0] - x) < 0.04 * span and abs(where[1] - y) < 0.04 * span for x, y in placed)
            placed.append(where)
            ax.annotate(
                method, where, textcoords="offset points", xytext=(6, -11 - 11 * crowd), fontsize=9, fontweight="bold", color=colors[method]
            )
    low, high = min(ax.get_xlim()[0], ax.get_ylim()[0]), max(ax.get_xlim()[1], ax.get_ylim()[1])
    ax.plot([low, high], [low, high], color="grey", linestyle=":", linewidth=1, label="equal returns")
    ax.set_xlim(low, high)
    ax.set_ylim(low, high)
    ax.set_xlabel(f"{first}: mean true episode return")
    ax.set_ylabel(f"{second}: mean true episode return")
    fig.suptitle(
        title
        or f"Fairness frontier: one policy per fixed weighting (labels: weight on {first}; bars: std over episodes)\n"
        "Black: the upper-right envelope, achievable by playing one of two policies at random per episode",
        fontsize=10,
    )
    # The frontier lies up and to the right by construction: the lower left is the free corner.
    ax.legend(fontsize="small", loc="lower left", framealpha=0.9)
    ax.grid(alpha=0.3)
    return _save(fig, path)


__all__ = [
    "frontier_envelope",
    "group_colors",
    "maxmin_index",
    "maxmin_on_envelope",
    "method_colors",
    "plot_frontier",
    "plot_group_returns",
    "plot_learning_curves",
    "plot_win_rates",
]
