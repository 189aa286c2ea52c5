"""``report.md`` with ``metrics.json`` and plots: what was run, the numbers, a plain verdict."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from egalitarian_rl.evaluation.metrics import check_metrics, shifted_ratio
from egalitarian_rl.evaluation.plots import (
    Curves,
    frontier_envelope,
    maxmin_on_envelope,
    plot_frontier,
    plot_group_returns,
    plot_learning_curves,
    plot_win_rates,
)
from egalitarian_rl.io import save_json_atomic, to_jsonable, write_text_atomic

METRICS_FILE = "metrics.json"
REPORT_FILE = "report.md"
GROUP_RETURNS_PLOT = "group_returns.png"
WIN_RATES_PLOT = "win_rates.png"
LEARNING_CURVES_PLOT = "learning_curves.png"
#: Written by ``egalitarian-rl frontier`` (:mod:`egalitarian_rl.experiments.frontier`); the report shows it when present.
FRONTIER_FILE = "frontier.json"
FRONTIER_PLOT = "frontier.png"

#: Share of its baseline return the majority must keep for the verdict to say "kept" (issue 4: 75%).
MAJORITY_KEEP = 0.75


def _fmt(value: float) -> str:
    return f"{value:.2f}" if abs(value) < 1e5 else f"{value:.3g}"


def _markdown_table(metrics: Mapping[str, Any]) -> str:
    baseline, groups = metrics["baseline"], list(metrics["groups"])
    win_key, ratio_key, seed_key = f"win_rate_vs_{baseline}", f"ratio_vs_{baseline}", f"seed_win_rate_vs_{baseline}"
    header = ["method", *[f"{g}: mean ± std" for g in groups], *[f"{g}: win-rate" for g in groups], "worst group"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for method, entry in metrics["methods"].items():
        name = f"`{method}`" + (" (baseline)" if method == baseline else "")
        cells = [name]
        for g in groups:
            stats = entry["groups"][g]
            cell = f"{_fmt(stats['mean_return'])} ± {_fmt(stats['std_return'])}"
            if ratio_key in stats and method != baseline:
                ratio = stats[ratio_key]
                cell += f" (×{ratio:.2f})" if ratio is not None else " (×∞)"
            if stats.get("normalized_score") is not None:
                cell += f"; score {stats['normalized_score']:.2f}"
            cells.append(cell)
        for g in groups:
            stats = entry["groups"][g]
            seed_rate = stats.get(seed_key)
            cells.append(f"{stats[win_key]:.2f}" + (f" (seeds {seed_rate:.2f})" if seed_rate is not None else ""))
        worst = f"{_fmt(entry['worst_group_return'])} ({entry['worst_group']})"
        if entry.get("worst_group_normalized") is not None:
            worst = f"score {entry['worst_group_normalized_score']:.2f} ({entry['worst_group_normalized']}); raw {worst}"
        cells.append(worst)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _choose_method(metrics: Mapping[str, Any], method: str | None) -> str | None:
    baseline, methods = metrics["baseline"], metrics["methods"]
    if method is not None:
        if method not in methods:
            raise ValueError(f"method {method!r} is not in metrics; methods: {list(methods)}")
        return method
    if "maxmin" in methods and baseline != "maxmin":
        return "maxmin"
    others = [m for m in methods if m != baseline]
    return max(others, key=lambda m: methods[m]["worst_group_return"]) if others else None


def _majority(metrics: Mapping[str, Any], group_shares: Mapping[str, float] | None) -> tuple[str, str]:
    baseline, groups = metrics["baseline"], list(metrics["groups"])
    shares = group_shares if group_shares is not None else metrics.get("extra", {}).get("group_shares")
    if isinstance(shares, Mapping) and all(g in shares for g in groups):
        majority = max(groups, key=lambda g: shares[g])
        return majority, f"majority ({majority}, {shares[majority]:.0%} of users)"
    base = metrics["methods"][baseline]["groups"]
    majority = max(groups, key=lambda g: base[g]["mean_return"])
    return majority, f"group `{baseline}` serves best ({majority}, taken as the majority: no group shares were given)"


def verdict(
    metrics: Mapping[str, Any],
    method: str | None = None,
    group_shares: Mapping[str, float] | None = None,
    keep: float = MAJORITY_KEEP,
) -> str:
    """One plain-language paragraph: did ``method`` lift the worst-off group without costing the majority?

    The worst-off group is the one with the lowest mean true return under the
    baseline. The majority is the group with the largest share (``group_shares``,
    or ``metrics["extra"]["group_shares"]``), else the group the baseline serves
    best. The majority "kept its return" if ``method`` reaches at least ``keep``
    times its baseline return, counted from ``metrics["min_episode_return"]`` when
    known (else from 0).

    :param method: the method to judge; default ``maxmin`` if present, else the
        non-baseline method with the highest worst-group return.
    """
    check_metrics(metrics)
    baseline, groups = metrics["baseline"], list(metrics["groups"])
    chosen = _choose_method(metrics, method)
    if chosen is None:
        return f"Only the baseline `{baseline}` was evaluated, so there is nothing to compare it with."
    base, other = metrics["methods"][baseline], metrics["methods"][chosen]
    win_key = f"win_rate_vs_{baseline}"
    floor = metrics.get("min_episode_return")
    worst = min(groups, key=lambda g: base["groups"][g]["mean_return"])
    b_worst, c_worst = base["groups"][worst]["mean_return"], other["groups"][worst]["mean_return"]
    wr_worst = other["groups"][worst][win_key]
    if c_worst > b_worst:
        lifted = "raised"
    elif c_worst == b_worst:
        lifted = "left unchanged"
    else:
        lifted = "lowered"
    text = (
        f"Compared with `{baseline}`, `{chosen}` {lifted} the true return of the group worst off under `{baseline}`, "
        f"{worst}, from {_fmt(b_worst)} to {_fmt(c_worst)} (win-rate {wr_worst:.2f}, where 0.5 means no difference)."
    )
    majority, who = _majority(metrics, group_shares)
    b_maj, c_maj = base["groups"][majority]["mean_return"], other["groups"][majority]["mean_return"]
    counted_from = 0.0 if floor is None else float(floor)
    kept_ok: bool
    if majority == worst and len(groups) > 1:
        text += f" The {who} is itself the worst-off group under `{baseline}`."
        kept_ok = c_maj >= b_maj
    else:
        try:
            ratio = shifted_ratio(c_maj, b_maj, counted_from)
        except ValueError:  # returns below 0 with no known floor: a ratio means nothing
            ratio = math.nan
        if math.isnan(ratio):
            kept_ok = c_maj >= b_maj
            share = "no meaningful share (returns below 0 and no floor known)"
        elif math.isinf(ratio):
            kept_ok = True
            share = f"more than `{baseline}` gave it (which was the lowest possible return)"
        else:
            kept_ok = ratio >= keep
            share = f"{ratio:.0%} of its `{baseline}` return"
        if floor is not None:
            floor_note = f", counted from the lowest possible return {_fmt(counted_from)}"
        else:
            floor_note = ", counted from 0 (no lowest possible return was given)"
        text += (
            f" The {who} {'kept' if kept_ok else 'did not keep'} its return: it got {_fmt(c_maj)} vs {_fmt(b_maj)}, "
            f"{share}{floor_note} (threshold {keep:.0%})."
        )
    b_min, c_min = base["worst_group_return"], other["worst_group_return"]
    best = max(metrics["methods"], key=lambda m: metrics["methods"][m]["worst_group_return"])
    text += (
        f" `{chosen}`'s worst-group return is {_fmt(c_min)} ({other['worst_group']}) against {_fmt(b_min)} "
        f"({base['worst_group']}) for `{baseline}`; the highest worst-group return of all evaluated methods is "
        f"`{best}`'s ({_fmt(metrics['methods'][best]['worst_group_return'])})."
    )
    if lifted == "raised" and kept_ok:
        text += f" In short: yes, `{chosen}` served the worst-off group better without costing the majority much."
    elif lifted == "raised":
        text += f" In short: `{chosen}` helped the worst-off group, but at a real cost to the majority."
    else:
        text += f" In short: no, `{chosen}` did not serve the worst-off group better than `{baseline}`."
    return text


def _what_was_run(metrics: Mapping[str, Any], config: Any) -> str:
    baseline, groups, methods = metrics["baseline"], list(metrics["groups"]), metrics["methods"]
    names = ", ".join(f"`{m}`" + (" (baseline)" if m == baseline else "") for m in methods)
    episodes = ", ".join(f"`{m}`: {e.get('n_episodes', '?')} episodes over {e.get('n_seeds', 1)} seed(s)" for m, e in methods.items())
    lines = [
        f"- Methods: {names}.",
        f"- User groups: {', '.join(groups)}. Every policy is scored by every group's *true* return "
        "(the sum of the group's true step rewards over an episode), never by a learned reward.",
        f"- Evaluation: {episodes}.",
        f"- Win-rate vs `{baseline}`: over all pairs (episode of the method, episode of `{baseline}`), the fraction "
        "in which the method's true group return is higher, ties counting half; 0.5 means no difference.",
    ]
    if any(f"seed_win_rate_vs_{baseline}" in e["groups"][g] for e in methods.values() for g in groups):
        lines.append(
            f'- Seed win-rate vs `{baseline}` ("seeds" in the table): the same over training seeds\' mean returns, '
            "seed-paired when both have as many seeds."
        )
    if metrics.get("min_episode_return") is not None:
        lines.append(
            f"- Ratio (×) vs `{baseline}`: (return − m) / ({baseline} return − m) with m = "
            f"{_fmt(metrics['min_episode_return'])}, the lowest possible episode return; ∞ where `{baseline}` is at m."
        )
    lines.append(
        "- The worst group of a method is the group with its lowest mean return (raw returns: groups are compared as they are scaled)."
    )
    text = "\n".join(lines)
    if config is not None:
        rendered = json.dumps(to_jsonable(config), indent=2)
        text += f"\n\nConfiguration:\n\n```json\n{rendered}\n```"
    extra = {k: v for k, v in metrics.get("extra", {}).items() if k != "group_shares"}
    if extra:
        text += f"\n\nAlso recorded:\n\n```json\n{json.dumps(extra, indent=2)}\n```"
    return text


def method_positions(frontier: Mapping[str, Any], metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Where each method of ``metrics`` lands relative to a fairness frontier.

    :param frontier: ``frontier.json``'s content (``groups``, ``maxmin_point``, ``maxmin_mixture``).
    :param metrics: output of :func:`~egalitarian_rl.evaluation.build_metrics` for the same groups.
    :return: method -> ``{"returns": {group: mean}, "min_return", "gap_to_maxmin_point",
        "gap_to_maxmin_mixture", "envelope_margin", "n_seeds"}``; the gaps are the frontier's best
        lower group return minus the method's (return units; > 0: the method's worst-off group is
        worse off); ``envelope_margin`` is the largest amount a mixture of frontier policies beats
        the method by for both (plotted) groups at once (< 0: the method is beyond the traced frontier).
    """
    groups = list(frontier["groups"])
    plotted = groups[:2]
    xy = np.array([[p["groups"][g]["mean_return"] for g in plotted] for p in frontier["points"]], dtype=np.float64)
    envelope = frontier_envelope(xy)
    positions = {}
    for method, entry in metrics["methods"].items():
        returns = {g: float(entry["groups"][g]["mean_return"]) for g in groups}
        lowest = min(returns.values())
        where = np.array([returns[g] for g in plotted])
        positions[method] = {
            "returns": returns,
            "min_return": lowest,
            "gap_to_maxmin_point": float(frontier["maxmin_point"]["min_return"]) - lowest,
            "gap_to_maxmin_mixture": float(frontier["maxmin_mixture"]["min_return"]) - lowest,
            # The most a mix of frontier policies adds to both plotted groups at once: >= 0 means the envelope
            # reaches or dominates the method; < 0 means the method lies beyond the traced frontier by that much.
            "envelope_margin": float(maxmin_on_envelope(xy - where, envelope)["min_return"]),
            "n_seeds": entry.get("n_seeds"),
        }
    return positions


def frontier_section(frontier: Mapping[str, Any], metrics: Mapping[str, Any] | None) -> str:
    """report.md's "Fairness frontier" section: the plot, every point and where each method of ``metrics`` lands."""
    groups = list(frontier["groups"])
    first, second = groups[:2]
    seeds = frontier.get("seeds", [])
    lines = [
        "| source | weights | " + " | ".join(f"{g}: mean ± std" for g in groups) + " | worst group |",
        "|---|---|" + "---:|" * (len(groups) + 1),
    ]
    for index, point in enumerate(frontier["points"]):
        weights = " / ".join(f"{point['weights'][g]:.3f}" for g in groups)
        cells = [f"{_fmt(point['groups'][g]['mean_return'])} ± {_fmt(point['groups'][g]['std_return'])}" for g in groups]
        mark = " **(max-min point)**" if index == frontier["maxmin_point"]["index"] else ""
        on_envelope = " (on the envelope)" if index in frontier.get("envelope", []) else ""
        lines.append(f"| {point['source']}{on_envelope} | {weights} | " + " | ".join(cells) + f" | {_fmt(point['min_return'])}{mark} |")
    best, mixture = frontier["maxmin_point"], frontier["maxmin_mixture"]
    text = (
        "## Fairness frontier\n\n"
        f"One policy per fixed weighting `(w, 1 - w)` of ({first}, {second}), trained with the same PPO budget "
        f"({frontier.get('total_timesteps', '?')} steps) on the groups' *true* rewards and on the *learned* EM rewards, "
        f"scored like the methods by every group's true return (seeds {seeds}, episodes pooled). The black line is the "
        "upper-right envelope of all points: playing one of two policies at random per episode achieves any mixture of "
        "their returns, so the convex hull is achievable. The max-min point is the trained point with the highest "
        f"worst-group return: {best['source']} rewards at weights "
        + " / ".join(f"{best['weights'][g]:.3f}" for g in groups)
        + f", worst group {_fmt(best['min_return'])}; the best mixture on the envelope reaches {_fmt(mixture['min_return'])}. "
        f"Full numbers: [`{FRONTIER_FILE}`]({FRONTIER_FILE}).\n\n"
        f"![Fairness frontier: true returns of fixed-weight policies, with the methods]({FRONTIER_PLOT})\n\n" + "\n".join(lines)
    )
    if frontier.get("notes"):
        text += "\n\nNotes: " + "; ".join(frontier["notes"]) + "."
    if metrics is not None:
        header = "worst group | below the max-min point by | below the best mixture by | a mixture beats it for both groups by"
        rows = ["| method | " + " | ".join(groups) + f" | {header} |", "|---|" + "---:|" * (len(groups) + 4)]
        for method, where in method_positions(frontier, metrics).items():
            cells = [_fmt(where["returns"][g]) for g in groups]
            margin = where["envelope_margin"]
            beaten = _fmt(margin) if margin >= 0 else f"{_fmt(margin)} (beyond the frontier)"
            gaps = f"{_fmt(where['gap_to_maxmin_point'])} | {_fmt(where['gap_to_maxmin_mixture'])} | {beaten}"
            rows.append(f"| `{method}` | " + " | ".join(cells) + f" | {_fmt(where['min_return'])} | {gaps} |")
        text += "\n\nWhere each method lands (mean true returns from [`metrics.json`](metrics.json)):\n\n" + "\n".join(rows)
        beyond = [f"`{m}`" for m, where in method_positions(frontier, metrics).items() if where["envelope_margin"] < 0]
        if beyond:
            text += (
                f"\n\n{', '.join(beyond)} {'lies' if len(beyond) == 1 else 'lie'} beyond the envelope: a policy that no "
                "fixed weighting reached with this PPO budget. The frontier is what PPO found for each weighting, "
                "not that weighting's exact optimum."
            )
    return text


def _frontier_for_report(out: Path, metrics: Mapping[str, Any]) -> str | None:
    """Redraw ``frontier.png`` with the current methods and return the report section, if ``frontier.json`` exists."""
    path = out / FRONTIER_FILE
    if not path.exists():
        return None
    try:
        frontier = json.loads(path.read_text())
        if list(frontier["groups"]) != list(metrics["groups"]):
            stale = f"is for groups {frontier['groups']}, not {list(metrics['groups'])}"
            return f"## Fairness frontier\n\n`{FRONTIER_FILE}` {stale}: rerun `egalitarian-rl frontier`."
        plot_frontier(frontier, out / FRONTIER_PLOT, metrics)
        return frontier_section(frontier, metrics)
    except (ValueError, KeyError, TypeError) as err:  # a hand-edited or older file must not break the whole report
        return f"## Fairness frontier\n\n`{FRONTIER_FILE}` could not be read ({err}): rerun `egalitarian-rl frontier`."


def write_report(
    metrics: Mapping[str, Any],
    out_dir: str | os.PathLike[str],
    curves: Curves | None = None,
    config: Any = None,
    *,
    method: str | None = None,
    group_shares: Mapping[str, float] | None = None,
    title: str = "MaxMin-RLHF evaluation",
) -> Path:
    """Write ``metrics.json``, the plots and ``report.md`` into ``out_dir`` (each file atomically).

    Files: ``metrics.json`` (``metrics`` as strict JSON), ``group_returns.png``,
    ``win_rates.png``, ``learning_curves.png`` (only with ``curves``) and
    ``report.md``: what was run, the per-group table, a plain-language verdict
    (:func:`verdict`) and the plots embedded by relative links; when ``out_dir`` holds a
    ``frontier.json`` (``egalitarian-rl frontier``), ``frontier.png`` is redrawn with these
    methods and a "Fairness frontier" section is added. ``report.md`` is
    written last, so its presence means the report is complete.

    :param metrics: output of :func:`~egalitarian_rl.evaluation.build_metrics`.
    :param out_dir: folder for the files (created if needed).
    :param curves: learning curves for :func:`~egalitarian_rl.evaluation.plot_learning_curves`;
        ``None`` or empty: no learning-curve plot.
    :param config: what was run (a dataclass, a mapping, ...), shown as JSON.
    :param method: the method the verdict judges (see :func:`verdict`).
    :param group_shares: group name -> share of users, names the majority in the verdict.
    :param title: the report's heading.
    :return: the path of ``report.md``.
    :raises ValueError: ``metrics`` is not shaped like :func:`build_metrics` output.
    """
    check_metrics(metrics)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_json_atomic(metrics, out / METRICS_FILE)
    baseline = metrics["baseline"]
    plots = [
        (GROUP_RETURNS_PLOT, "Mean true return per group (error bars: std over episodes)"),
        (WIN_RATES_PLOT, f"Per-group win-rate vs {baseline}"),
    ]
    plot_group_returns(metrics, out / GROUP_RETURNS_PLOT)
    plot_win_rates(metrics, out / WIN_RATES_PLOT)
    if curves:  # None or empty: no learning-curve plot
        plot_learning_curves(curves, out / LEARNING_CURVES_PLOT, group_names=metrics["groups"])
        plots.append((LEARNING_CURVES_PLOT, "Learning curves"))
    sections = [
        f"# {title}",
        "## What was run\n\n" + _what_was_run(metrics, config),
        "## Results\n\n" + _markdown_table(metrics) + f"\n\nFull numbers: [`{METRICS_FILE}`]({METRICS_FILE}).",
        "## Verdict\n\n" + verdict(metrics, method=method, group_shares=group_shares),
        "## Plots\n\n" + "\n\n".join(f"![{caption}]({name})" for name, caption in plots),
    ]
    frontier = _frontier_for_report(out, metrics)
    if frontier is not None:
        sections.append(frontier)
    return write_text_atomic("\n\n".join(sections) + "\n", out / REPORT_FILE)


__all__ = [
    "FRONTIER_FILE",
    "FRONTIER_PLOT",
    "GROUP_RETURNS_PLOT",
    "LEARNING_CURVES_PLOT",
    "METRICS_FILE",
    "REPORT_FILE",
    "WIN_RATES_PLOT",
    "frontier_section",
    "method_positions",
    "verdict",
    "write_report",
]
