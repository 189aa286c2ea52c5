"""The impossibility sweep (issue 11): single-reward RLHF vs MaxMin as the minority shrinks and the groups diverge.

The paper's theorem: one reward fitted to everyone's preferences sacrifices the minority, the
more so the smaller it is and the more its reward differs from the majority's; MaxMin-RLHF does
not. This benchmark draws that as curves on two domains:

- ``fairgrid``: the shipped FairGrid config (majority goal A, minority goal B, compromise C),
  MaxMin's rule ``per_sample_min``;
- ``reacher`` (the MuJoCo setup of the committed result): the shipped Reacher-v5 config (majority
  wants the fingertip at the ``north`` point, minority at the ``south`` point, 0.3 m apart; the
  compromise is halfway), MaxMin's rule ``per_sample_min``, 50,000 PPO steps per policy;
- ``halfcheetah`` (not in the default grid: 7-25 h here, see Cost): the shipped HalfCheetah-v5
  config (majority ``fast``, minority ``calm``), its rule ``worst_group``.

Grid: minority share in 50, 30, 20, 10, 5 % (the rest is the majority) x distance ``d`` in
1/3, 2/3, 1, where the minority's true reward is ``(1 - d) * r_majority + d * r_minority`` and
the majority keeps its own (``benchmarks/impossibility_rewards.py``: the groups agree on a
fraction ``1 - d`` of what the minority values; ``d = 0`` would be identical groups). Every
point is one pipeline run of the shipped config with only the groups, the methods
(``rlhf``, ``maxmin``), the seeds (0-4) and ``out_dir``
(``runs/bench_impossibility/<domain>/share<s>_d<p>_<q>``) changed. ``n_users`` stays the
config's 100, so a 5% minority is 5 users with 30 (FairGrid) or 40 (HalfCheetah) comparisons
each: EM may merge them into the majority, and then MaxMin has no minority to protect. That is
part of what the sweep shows; each point reports EM's adjusted Rand index per seed.

Per (point, method, group): every seed's mean true return over its evaluation episodes, then
the mean over seeds +- ``t(0.975, n - 1) * sd / sqrt(n)`` (:func:`ci95`; seeds, not episodes,
are the unit). ``benchmarks/results/impossibility.json`` holds ``rows``: one per
(domain, minority_share, distance, method, group) with ``mean_return``, ``ci95`` (the
half-width) and ``seed_means``, plus per point EM's ARI and timings, and ``passes``:

- ``<domain>/worst_group_maxmin>=rlhf``: at every point MaxMin's worst-group return (per seed
  the lower of the two groups' means) is at least RLHF's within the CI: the mean paired
  difference (same seed = same preferences) plus its ``ci95`` is >= 0;
- ``<domain>/rlhf_minority_falls_with_share``: at the largest distance, RLHF's minority return
  at the smallest share is below its return at the largest share;
- ``<domain>/rlhf_minority_falls_with_distance``: at the smallest share, RLHF's minority return
  at the largest distance is below its return at the smallest distance (part of this fall is
  by construction: the minority's reward itself changes with ``d``; ``minority_gap``, MaxMin's
  minority return minus RLHF's, is stored per point to separate the two);
- ``<domain>/maxmin_minority_holds_with_share``: at the largest distance, MaxMin's minority
  return at the smallest share is not significantly below its return at the largest share
  (mean + ci95 >= the other's mean - ci95).

A run over some domains keeps the finished points of the other domains already in
``results/impossibility.json`` (each point records the command that produced it), so the domains
can be run one at a time and the file holds them all.

The JSON, the plot (``impossibility.png``: per domain, both groups' return vs minority share,
one line per (method, distance) with CI bands) and the RESULTS.md line (with the exact command)
are rewritten after every finished point, so a partial run is valid and says ``complete:
false``. Every stage is saved by the pipeline, so a killed run resumes where it stopped.

    nohup nice -n 15 .venv/bin/python -m benchmarks.impossibility --jobs 2 > runs/bench_impossibility.log 2>&1 &
    nice -n 15 .venv/bin/python -m benchmarks.impossibility --quick   # results/quick/impossibility.{json,png}

``--quick`` runs FairGrid only, shares 30 and 5 %, distances 1/3 and 1, seeds 0-1, 4,096 PPO
steps per policy, under ``runs/quick/bench_impossibility``; it writes ``results/quick/impossibility.*``
and a line in ``results/quick/RESULTS.md`` (never the real result). ``--domains``, ``--shares``,
``--distances``, ``--seeds`` and ``--timesteps`` override either.

Cost, measured on this 2-core machine while other engineers' jobs kept the load average at 7-9
(everything here under ``nice -n 15``), so CPU seconds of the process are the stable number and
wall seconds say how crowded the machine was. PPO is scaled linearly from the measured steps;
collection, fits and evaluation do not depend on them.

- FairGrid (the quick run, 8 seed runs at 4,096 steps, ``--jobs 2``): per seed 7.4 s CPU for
  collect + fit + evaluate and 9.0 s for both policies -> 73 s CPU per seed at the shipped 30,000
  steps, 6 min CPU per 5-seed point, about 1.5 h CPU for the 15 points (about 0.8 h with
  ``--jobs 2`` on two free cores). Wall at this load: 39 min per point, about 10 h for the grid per
  process (about 5 h with ``--jobs 2``). The whole quick run took 18 min wall.
- Reacher-v5 (the committed run, 2026-12-05, 75 seed runs at 50,000 steps, ``--jobs 2`` under ``nice``): per seed
  about 10 s CPU for collect + fit + evaluate and 24 s per policy on a free core (37-39 s while two language-model
  runs shared the cores), about 1 h CPU for the 15 points. Wall 00:38-03:07 UTC, most of it beside two
  pre-registered IMDB runs; about 30 min on two free cores.
- HalfCheetah-v5 (one seed at 2,048 steps, one rollout per policy): 43 s CPU for collect + fit +
  evaluate, 3.4 s per policy -> about 12 min CPU per seed at 200,000 steps, about 1 h per point,
  about 15 h CPU for the grid in one process (7-8 h with ``--jobs 2`` on two free cores). This is
  extrapolated from one rollout; docs/DESIGN.md measured 8-10 min wall per 200k-step policy on a
  free core, which gives 1.4-1.7 h per point and 20-25 h for the grid in one process.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from benchmarks.common import BenchmarkParser, results_dir, run_in_processes, runs_dir, write_result
from benchmarks.impossibility_rewards import DOMAINS, mixed_reward_name
from benchmarks.mujoco import git_state
from egalitarian_rl.cli import _config_path
from egalitarian_rl.experiments import ExperimentConfig, Pipeline
from egalitarian_rl.io import to_jsonable, write_atomic

NAME = "impossibility"
SHARES = (0.5, 0.3, 0.2, 0.1, 0.05)
DISTANCES = (Fraction(1, 3), Fraction(2, 3), Fraction(1))
SEEDS = (0, 1, 2, 3, 4)
METHODS = ("rlhf", "maxmin")
ROOT = Path("runs/bench_impossibility")
#: The domains run when ``--domains`` is not given (HalfCheetah's grid takes 7-25 h here).
DEFAULT_DOMAINS = ("fairgrid", "reacher")
QUICK = {"domains": ["fairgrid"], "shares": [0.3, 0.05], "distances": [Fraction(1, 3), Fraction(1)], "seeds": [0, 1], "timesteps": 4096}
#: Two-sided 95% Student t quantiles t(0.975, df) for df = 1..30 (scipy is not a dependency).
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)  # fmt: skip
#: The row keys issue 11 asks for (each row holds more: ``group_name``, ``seed_means``, ``n_seeds``, ``distance_label``).
ROW_KEYS = ("domain", "minority_share", "distance", "method", "group", "mean_return", "ci95")


# ----------------------------------------------------------------------------- statistics
def t_quantile_975(df: int) -> float:
    """``t(0.975, df)``, the two-sided 95% Student t quantile; above 30 degrees of freedom the df-30 value (conservative)."""
    if df < 1:
        raise ValueError(f"need at least 1 degree of freedom, got {df}")
    return T_975[min(df, len(T_975)) - 1]


def ci95(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and 95% CI half-width of ``values`` (one per seed): ``t(0.975, n - 1) * sd / sqrt(n)``, sd with ``n - 1``.

    :return: ``(mean, half_width)``; the half-width is ``None`` for a single value (no spread to estimate).
    """
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        raise ValueError("no values")
    if x.size == 1:
        return float(x[0]), None
    return float(x.mean()), t_quantile_975(x.size - 1) * float(x.std(ddof=1)) / math.sqrt(x.size)


# ----------------------------------------------------------------------------- the grid
@dataclass(frozen=True)
class Point:
    """One point of the sweep.

    :param domain: a key of :data:`~benchmarks.impossibility_rewards.DOMAINS`.
    :param share: the minority's share of the users, in (0, 0.5].
    :param distance: ``d`` of the minority's mixed reward, in (0, 1].
    """

    domain: str
    share: float
    distance: Fraction

    @property
    def label(self) -> str:
        """``share0.05_d1_3``: the point's folder name."""
        return f"share{self.share:g}_d{self.distance.numerator}_{self.distance.denominator}"

    @property
    def distance_label(self) -> str:
        return str(self.distance)  # "1/3", "1"


def parse_distance(text: str) -> Fraction:
    """``"1/3"``, ``"0.5"`` or ``"1"`` as a fraction in (0, 1] (0 would be two identical groups)."""
    try:
        value = Fraction(text).limit_denominator(1000)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"not a number or fraction: {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"a distance must be in (0, 1], got {text}")
    return value


def parse_share(text: str) -> float:
    """A minority share in (0, 0.5]: above one half the "minority" would be the majority."""
    value = float(text)
    if not 0 < value <= 0.5:
        raise argparse.ArgumentTypeError(f"a minority share must be in (0, 0.5], got {text}")
    return value


def point_config(point: Point, seeds: Sequence[int], timesteps: int | None, root: Path) -> ExperimentConfig:
    """The shipped config of ``point.domain`` with the point's groups, the two methods, ``seeds`` and its own ``out_dir``.

    :param timesteps: PPO steps per policy; ``None`` keeps the config's.
    :param root: the folder holding every point's run.
    """
    domain = DOMAINS[point.domain]
    config = ExperimentConfig.from_yaml(_config_path(domain.config))
    # The majority keeps its library reward (reward: null); the minority's is the mixed one. Majority first:
    # the pipeline's group order is the config's, and the JSON reads group k of the returns by it.
    groups = {
        domain.majority: {"share": round(1.0 - point.share, 10)},
        domain.minority: {
            "share": point.share,
            "reward": f"benchmarks.impossibility_rewards:{mixed_reward_name(point.domain, point.distance)}",
        },
    }
    raw = {**config.to_dict(), "groups": groups, "methods": list(METHODS), "seeds": list(seeds)}
    raw["out_dir"] = str(root / point.domain / point.label)
    raw["name"] = f"{config.name} minority {point.share:.0%} d={point.distance_label}"
    if timesteps is not None:
        raw["train"]["total_timesteps"] = timesteps
    return ExperimentConfig.from_dict(raw)


def run_seed(point: Point, seed: int, timesteps: int | None, root: str) -> dict[str, dict[str, float]]:
    """Every stage of one point and seed (resuming saved ones), timed; runs in a worker process (or this one).

    :return: ``{"wall": ..., "cpu": ...}``, each stage -> seconds: ``collect``, ``fit``, ``train_<method>``,
        ``evaluate`` (~0 for a resumed stage). CPU seconds are this process's (1 torch thread): on a shared
        machine wall time says how busy the others were, CPU time what the stage costs.
    """
    config = point_config(point, [seed], timesteps, Path(root))
    pipeline = Pipeline(config, progress_bar=False, log=lambda line: print(f"[{point.domain} {point.label}] {line}", flush=True))
    stages: list[tuple[str, Any]] = [("collect", lambda: pipeline.collect(seed)), ("fit", lambda: pipeline.fit(seed))]
    stages += [(f"train_{m}", lambda m=m: pipeline.train(seed, m)) for m in pipeline.methods]
    stages += [("evaluate", lambda: [pipeline.evaluate(seed, m) for m in pipeline.methods])]
    timing: dict[str, dict[str, float]] = {"wall": {}, "cpu": {}}
    for name, stage in stages:
        wall, cpu = time.perf_counter(), time.process_time()
        stage()
        timing["wall"][name], timing["cpu"][name] = time.perf_counter() - wall, time.process_time() - cpu
    return timing


def summarise_point(point: Point, seeds: Sequence[int], timesteps: int | None, root: Path) -> dict[str, Any]:
    """The rows of one finished point (every seed's stages saved), its EM fit and its worst-group comparison.

    Also writes the point's own ``metrics.json`` and ``report.md`` (the pipeline's report over its seeds).
    """
    config = point_config(point, seeds, timesteps, root)
    pipeline = Pipeline(config, progress_bar=False, log=lambda _: None)
    _, metrics = pipeline.run()  # every stage is up to date: this reads the returns and writes the report
    domain = DOMAINS[point.domain]
    roles = {domain.majority: "majority", domain.minority: "minority"}
    # (n_episodes, K) per seed -> (n_seeds, K) seed means: the seed is the unit of the CI.
    seed_means = {m: np.stack([pipeline.evaluate(s, m).mean(axis=0) for s in seeds]) for m in METHODS}
    rows = []
    for method in METHODS:
        for k, group in enumerate(pipeline.group_names):
            mean, half = ci95(seed_means[method][:, k])
            row = {"domain": point.domain, "minority_share": point.share, "distance": float(point.distance), "method": method}
            row |= {"group": roles[group], "mean_return": mean, "ci95": half, "group_name": group}
            row |= {"distance_label": point.distance_label, "seed_means": seed_means[method][:, k].tolist(), "n_seeds": len(seeds)}
            rows.append(row)
    worst = {m: seed_means[m].min(axis=1) for m in METHODS}  # per seed: the lower group's mean return
    difference = worst["maxmin"] - worst["rlhf"]  # paired: a seed's rlhf and maxmin share its preferences and fits
    diff_mean, diff_half = ci95(difference)
    minority = pipeline.group_names.index(domain.minority)
    fit = metrics["extra"]["reward_fit"]
    return {
        "domain": point.domain,
        "minority_share": point.share,
        "distance": float(point.distance),
        "distance_label": point.distance_label,
        "out_dir": config.out_dir,
        "seeds": list(seeds),
        "steps_per_policy": config.train.total_timesteps,
        "aggregation": config.train.aggregation,
        "n_minority_users": round(point.share * config.collect.n_users),
        "em_ari": [fit[f"seed_{s}"]["adjusted_rand_index"] for s in seeds],
        "em_shares": [sorted(fit[f"seed_{s}"]["shares"], reverse=True) for s in seeds],
        "worst_group": {
            "rlhf_seed_values": worst["rlhf"].tolist(),
            "maxmin_seed_values": worst["maxmin"].tolist(),
            "maxmin_minus_rlhf": diff_mean,
            "ci95": diff_half,
            "maxmin>=rlhf_within_ci": bool(diff_mean + (diff_half or 0.0) >= 0.0),
        },
        "minority_gap": float((seed_means["maxmin"][:, minority] - seed_means["rlhf"][:, minority]).mean()),
        "rows": rows,
    }


# ----------------------------------------------------------------------------- checks, plot, output
def _lookup(
    rows: list[dict[str, Any]], domain: str, share: float, distance: float, method: str, group: str = "minority"
) -> dict[str, Any] | None:
    """The row of one (domain, share, distance, method, group role), or ``None`` if that point is not finished."""
    for row in rows:
        key = (row["domain"], row["minority_share"], row["distance"], row["method"], row["group"])
        if key == (domain, share, distance, method, group):
            return row
    return None


def checks(points: list[dict[str, Any]]) -> dict[str, bool | None]:
    """The acceptance checks per domain over the finished points (``None``: the grid cannot say, e.g. one share only)."""
    rows = [row for point in points for row in point["rows"]]
    passes: dict[str, bool | None] = {}
    for domain in dict.fromkeys(point["domain"] for point in points):
        mine = [p for p in points if p["domain"] == domain]
        passes[f"{domain}/worst_group_maxmin>=rlhf"] = all(p["worst_group"]["maxmin>=rlhf_within_ci"] for p in mine)
        shares = sorted({p["minority_share"] for p in mine})
        distances = sorted({p["distance"] for p in mine})
        small, large, near, far = shares[0], shares[-1], distances[0], distances[-1]

        cells = [_lookup(rows, domain, small, far, "rlhf"), _lookup(rows, domain, large, far, "rlhf")]
        passes[f"{domain}/rlhf_minority_falls_with_share"] = (
            None if len(shares) < 2 or None in cells else bool(cells[0]["mean_return"] < cells[1]["mean_return"])
        )
        cells = [_lookup(rows, domain, small, far, "rlhf"), _lookup(rows, domain, small, near, "rlhf")]
        passes[f"{domain}/rlhf_minority_falls_with_distance"] = (
            None if len(distances) < 2 or None in cells else bool(cells[0]["mean_return"] < cells[1]["mean_return"])
        )
        cells = [_lookup(rows, domain, small, far, "maxmin"), _lookup(rows, domain, large, far, "maxmin")]
        holds = None
        if len(shares) >= 2 and None not in cells:
            low, high = cells
            holds = bool(low["mean_return"] + (low["ci95"] or 0.0) >= high["mean_return"] - (high["ci95"] or 0.0))
        passes[f"{domain}/maxmin_minority_holds_with_share"] = holds
    return passes


def plot(points: list[dict[str, Any]], path: Path) -> Path:
    """Per domain (rows): the minority's and the majority's true return (columns) vs minority share.

    One colour per distance, solid MaxMin, dashed RLHF, shaded 95% CI over seeds; shares run from
    50% on the left to the smallest on the right, so "the minority shrinks" reads left to right.
    """
    domains = list(dict.fromkeys(p["domain"] for p in points))
    fig = Figure(figsize=(11, 4.2 * len(domains)), layout="constrained")
    axes = fig.subplots(len(domains), 2, squeeze=False)
    for row_axes, domain in zip(axes, domains):
        mine = [p for p in points if p["domain"] == domain]
        rows = [row for p in mine for row in p["rows"]]
        shares = sorted({p["minority_share"] for p in mine}, reverse=True)
        distances = sorted({(p["distance"], p["distance_label"]) for p in mine})
        colours = {d: c for (d, _), c in zip(distances, _palette(len(distances)))}
        x = np.arange(len(shares))
        for ax, role in zip(row_axes, ("minority", "majority")):
            means: list[float] = []
            for distance, label in distances:
                for method, style in (("rlhf", "--"), ("maxmin", "-")):
                    cells = [_lookup(rows, domain, share, distance, method, role) for share in shares]
                    have = [i for i, c in enumerate(cells) if c is not None]
                    if not have:
                        continue
                    mean = np.array([cells[i]["mean_return"] for i in have])
                    half = np.array([cells[i]["ci95"] or 0.0 for i in have])
                    means += mean.tolist()
                    ax.plot(x[have], mean, style, marker="o" if method == "maxmin" else "s", color=colours[distance],
                            label=f"{'MaxMin' if method == 'maxmin' else 'RLHF'}, d={label}")  # fmt: skip
                    ax.fill_between(x[have], mean - half, mean + half, color=colours[distance], alpha=0.12 if method == "maxmin" else 0.07)
            group_name = (
                mine[0]["rows"][0]["group_name"]
                if role == "majority"
                else next(r["group_name"] for r in mine[0]["rows"] if r["group"] == "minority")
            )
            ax.set_xticks(x, [f"{s:.0%}" for s in shares])
            ax.set_xlabel("minority share of the users (shrinking to the right)")
            ax.set_ylabel("true return (mean over seeds, 95% CI)")
            ax.set_title(f"{domain}: {role}{'' if group_name == role else f' ({group_name})'} true return", fontsize=10)
            ax.grid(alpha=0.3)
            if means:
                # Few seeds make wide bands (t(0.975, 1) = 12.7): keep the lines readable, say when bands are cut.
                low, high = min(means), max(means)
                margin = max(0.6 * (high - low), 0.1 * max(abs(low), abs(high)), 1.0)
                bottom, top = ax.get_ylim()
                if bottom < low - margin or top > high + margin:
                    ax.set_ylim(max(bottom, low - margin), min(top, high + margin))
                    ax.text(0.99, 0.01, "CI bands clipped", transform=ax.transAxes, ha="right", va="bottom", fontsize=7, color="grey")
        # EM's separation of the groups, averaged over seeds, under each share: where MaxMin can and cannot help.
        ari = {s: np.mean([a for p in mine if p["minority_share"] == s for a in p["em_ari"] if a is not None] or [np.nan]) for s in shares}
        row_axes[0].set_xticks(x, [f"{s:.0%}\nEM ARI {ari[s]:.2f}" for s in shares])
        row_axes[0].legend(fontsize=8, ncol=2)
    fig.suptitle(
        "Impossibility sweep: single-reward RLHF (dashed) vs MaxMin (solid); minority reward (1-d) r_major + d r_minor", fontsize=11
    )
    return write_atomic(path, lambda handle: fig.savefig(handle, format="png", dpi=110))


def _palette(n: int) -> list[Any]:
    import matplotlib as mpl

    cmap = mpl.colormaps["viridis"]
    return [cmap(0.15 + 0.7 * i / max(n - 1, 1)) for i in range(n)]


def projection(timing: dict[str, list[dict[str, dict[str, float]]]], steps: dict[str, int], n_points: int, n_seeds: int) -> dict[str, Any]:
    """Projected time of the full grid per domain, scaled from the seed runs of this invocation, by wall and by CPU clock.

    PPO's cost grows linearly with its steps; collection, fits and evaluation do not depend on them (same settings).
    The CPU projection is the wall time one free core would take; the wall one assumes this run's load persists.

    :param timing: domain -> per seed run its :func:`run_seed` timing.
    :param steps: domain -> PPO steps per policy in those runs.
    :param n_points: points per domain in the full grid; ``n_seeds``: seeds per point.
    """
    out: dict[str, Any] = {}
    for domain, runs in timing.items():
        full_steps = ExperimentConfig.from_yaml(_config_path(DOMAINS[domain].config)).train.total_timesteps
        out[domain] = {"measured_seed_runs": len(runs), "measured_steps_per_policy": steps[domain], "full_steps_per_policy": full_steps}
        for clock in ("wall", "cpu"):
            fixed = float(np.mean([r[clock]["collect"] + r[clock]["fit"] + r[clock]["evaluate"] for r in runs]))
            train = float(np.mean([sum(v for k, v in r[clock].items() if k.startswith("train_")) for r in runs]))
            per_seed = fixed + train * full_steps / steps[domain]
            out[domain][clock] = {
                "measured_seconds_per_seed": {"collect+fit+evaluate": fixed, "train(rlhf+maxmin)": train},
                "projected_seconds_per_point": per_seed * n_seeds,
                "projected_hours_full_grid_one_process": per_seed * n_seeds * n_points / 3600,
            }
    return out


def write(
    points: list[dict[str, Any]],
    expected: int,
    args: argparse.Namespace,
    command: str,
    timing: dict[str, Any],
    git: dict[str, Any],
    elapsed: float,
) -> dict[str, Any]:
    """The JSON, plot and RESULTS.md line (``--quick``: under ``results/quick/``) from the points finished so far.

    :param expected: points in the requested grid (``complete`` when all are done).
    :param command: the exact command line (stated in RESULTS.md).
    """
    points = sorted(points, key=lambda p: (p["domain"], -p["minority_share"], p["distance"]))
    passes = checks(points)
    complete = len(points) == expected
    per_domain = len(args.shares) * len(args.distances)
    complete_domains = [
        d
        for d in dict.fromkeys(p["domain"] for p in points)
        if d not in args.domains or sum(p["domain"] == d for p in points) == per_domain
    ]
    result = {
        "command": command,
        # domain -> the command that produced its points (a domain kept from an earlier run keeps its own)
        "commands": {p["domain"]: p["command"] for p in points},
        "complete_domains": complete_domains,
        "grid": {
            "domains": list(dict.fromkeys([*(p["domain"] for p in points), *args.domains])),
            "shares": args.shares,
            "distances": [str(d) for d in args.distances],
            "seeds": args.seeds,
            "methods": list(METHODS),
            "timesteps": args.timesteps or "config's",
        },
        "distance_definition": "minority true reward (1 - d) * r_majority + d * r_minority; the majority keeps r_majority",
        "ci_definition": "per seed the mean true return over its evaluation episodes; mean over seeds +- t(0.975, n-1) * sd / sqrt(n)",
        "row_keys": list(ROW_KEYS),
        "rows": [row for point in points for row in point["rows"]],
        "points": [{k: v for k, v in point.items() if k != "rows"} for point in points],
        "passes": passes,
        "complete": complete,
        "passed": complete and all(v is not False for v in passes.values()),
        "timing": timing,
        "wall_seconds": elapsed,
        "plot": f"results/{'quick/' if args.quick else ''}{NAME}.png",
        "git": git,
    }
    result = to_jsonable(result)  # a CI of one seed is None, never NaN
    plot(points, results_dir(args.quick) / f"{NAME}.png")
    write_result(
        NAME,
        result,
        summary_line(points, passes, complete),
        "MaxMin worst group >= RLHF within CI at every point; RLHF minority falls with share and distance, MaxMin's holds",
        quick=args.quick,
    )
    return result


def summary_line(points: list[dict[str, Any]], passes: dict[str, bool | None], complete: bool) -> str:
    """RESULTS.md's key numbers: per domain the command that produced it, then the minority's return at the largest
    distance, RLHF vs MaxMin, largest and smallest share."""
    rows = [row for point in points for row in point["rows"]]
    cells = []
    for domain in dict.fromkeys(p["domain"] for p in points):
        mine = [p for p in points if p["domain"] == domain]
        shares = sorted({p["minority_share"] for p in mine}, reverse=True)
        far = max(p["distance"] for p in mine)
        label = next(p["distance_label"] for p in mine if p["distance"] == far)
        parts = []
        for share in (shares[0], shares[-1]) if len(shares) > 1 else shares:
            values = []
            for method in METHODS:
                row = _lookup(rows, domain, share, far, method)
                values.append("n/a" if row is None else f"{row['mean_return']:.1f}±{row['ci95'] or 0:.1f}")
            parts.append(f"{share:.0%}: RLHF {values[0]} vs MaxMin {values[1]}")
        held = sum(p["worst_group"]["maxmin>=rlhf_within_ci"] for p in mine)
        parts.append(f"MaxMin worst group >= RLHF within CI at {held}/{len(mine)} points")
        failed = [k.split("/", 1)[1] for k, v in passes.items() if k.startswith(domain) and v is False]
        seeds = len(mine[0]["seeds"])
        steps = mine[0].get("steps_per_policy")
        cells.append(
            f"`{mine[0]['command']}`: {domain} ({len(mine)} points, {seeds} seeds"
            + (f", {steps:,} PPO steps per policy" if steps else "")
            + f"): minority return at d={label}, "
            + "; ".join(parts)
            + (f" (failed: {', '.join(failed)})" if failed else "")
        )
    return ("" if complete else "(partial) ") + "; ".join(cells)


def stored_points(path: Path, exclude: Sequence[str]) -> list[dict[str, Any]]:
    """The finished points of other domains in a stored result, each with the command that produced it.

    A result written before points carried their command takes the file's own ``command``. Only a
    complete domain is kept (a partial one would make the checks judge part of a grid).
    """
    if not path.exists():
        return []
    stored = json.loads(path.read_text())
    complete = stored.get("complete_domains", stored["grid"]["domains"] if stored.get("complete") else [])
    rows: dict[tuple, list[dict[str, Any]]] = {}
    for row in stored["rows"]:
        rows.setdefault((row["domain"], row["minority_share"], row["distance"]), []).append(row)
    return [
        {"command": stored["command"], **point, "rows": rows[(point["domain"], point["minority_share"], point["distance"])]}
        for point in stored.get("points", [])
        if point["domain"] in complete and point["domain"] not in exclude
    ]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = BenchmarkParser(__doc__.split("\n")[0], quick_defaults=QUICK)
    parser.add_argument("--domains", nargs="+", choices=list(DOMAINS), default=list(DEFAULT_DOMAINS))
    parser.add_argument("--shares", nargs="+", type=parse_share, default=list(SHARES), help="minority shares in (0, 0.5]")
    parser.add_argument("--distances", nargs="+", type=parse_distance, default=list(DISTANCES), help="d in (0, 1], e.g. 1/3 2/3 1")
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    parser.add_argument("--timesteps", type=int, help="PPO steps per policy (default: each config's own)")
    parser.add_argument("--jobs", type=int, default=1, help="(point, seed) runs at once, one process and one torch thread each")
    parser.add_argument("--root", type=Path, default=None, help=f"where the runs go (default {ROOT}, quick: {runs_dir(ROOT, quick=True)})")
    args = parser.parse_args(argv)
    if len(set(args.seeds)) != len(args.seeds) or len(args.seeds) < 2:
        parser.error("give at least 2 distinct seeds (a CI needs a spread)")
    root = args.root or runs_dir(ROOT, args.quick)
    command = " ".join([".venv/bin/python -m benchmarks.impossibility", *map(shlex.quote, sys.argv[1:] if argv is None else argv)])

    grid = [Point(d, s, dist) for d in args.domains for s in args.shares for dist in args.distances]
    for point in grid:
        point_config(point, args.seeds, args.timesteps, root)  # every config valid before any work starts
    git = git_state()
    start = time.perf_counter()
    finished: dict[Point, list[int]] = {point: [] for point in grid}
    timing_runs: dict[str, list[dict[str, dict[str, float]]]] = {}
    steps = {d: args.timesteps or ExperimentConfig.from_yaml(_config_path(DOMAINS[d].config)).train.total_timesteps for d in args.domains}
    kept = [] if args.quick else stored_points(results_dir(False) / f"{NAME}.json", exclude=args.domains)
    points: list[dict[str, Any]] = list(kept)
    result: dict[str, Any] = {}
    jobs = [(point, seed) for point in grid for seed in args.seeds]
    calls = [(point, seed, args.timesteps, str(root)) for point, seed in jobs]
    for (point, seed, _, _), seconds in run_in_processes(run_seed, calls, args.jobs):
        timing_runs.setdefault(point.domain, []).append(seconds)
        finished[point].append(seed)
        spent = ", ".join(f"{k} {seconds['wall'][k]:.0f} s ({seconds['cpu'][k]:.0f} s CPU)" for k in seconds["wall"])
        print(f"finished {point.domain} {point.label} seed {seed}: {spent}", flush=True)
        if sorted(finished[point]) != sorted(args.seeds):
            continue
        points.append(summarise_point(point, args.seeds, args.timesteps, root) | {"command": command})
        n_full = len(SHARES) * len(DISTANCES)
        timing = {
            "runs": timing_runs,
            "projection_full_grid": projection(timing_runs, steps, n_full, len(SEEDS)),
            "note": "stages resumed from an earlier invocation count ~0 s: project from a fresh run",
        }
        result = write(points, len(grid) + len(kept), args, command, timing, git, time.perf_counter() - start)
    print({k: v for k, v in result.get("passes", {}).items()})
    return result


if __name__ == "__main__":
    main()
