"""The fairness frontier of FairGrid: where every fixed weighting of the two groups lands, and each method.

Runs the shipped ``fairgrid`` pipeline, then ``egalitarian-rl frontier fairgrid``
(:class:`~egalitarian_rl.experiments.frontier.FrontierPipeline` on the shipped config, seed 0, 9 weights from
all-majority to all-minority, each trained on the groups' TRUE rewards and on the learned EM mixture) and
records, from its ``frontier.json``:

- how many fixed-weight policies serve both groups (true return above ``SERVED`` for each);
- the best worst-group return any fixed weighting reaches, alone or mixed at random with another
  (the max-min point of the upper-right convex envelope);
- each method's (majority, minority) return and how far it lies beyond that envelope.

The claim it checks (issue "Evidence across domains", the paper's rule): a rule that trains on a
*linear* weighting of the groups' rewards (``worst_group`` and its variants, ``mean``) can at best
reach the envelope, while ``per_sample_min`` (the shipped ``maxmin``) reaches the compromise
goal beyond it. Passes when MaxMin's worst-group return exceeds the envelope's max-min value.

The frontier resumes: every point is saved under the config's ``out_dir`` (``runs/fairgrid``, the
same folder as ``make demo``), so a rerun only evaluates what is missing.

    .venv/bin/python -m benchmarks.frontier [--points 9] [--out runs/fairgrid]

``--quick``: 3 weights, 2,048 PPO steps per policy, under ``runs/quick/fairgrid``: ``results/quick/frontier.json``.

Writes ``benchmarks/results/frontier.json`` (the frontier itself under ``frontier``), a copy of the
plot ``benchmarks/results/frontier.png`` and a line in ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import json
import shutil
from typing import Any

from benchmarks.common import BenchmarkParser, results_dir, runs_dir, write_result
from egalitarian_rl.cli import _config_path
from egalitarian_rl.experiments import ExperimentConfig
from egalitarian_rl.experiments.frontier import DEFAULT_POINTS, FrontierPipeline

NAME = "frontier"
#: A group counts as served by a policy when its mean true return is above this (FairGrid pays 0 away from its goal).
SERVED = 1.0
#: ``--quick``: PPO steps per policy.
QUICK_TIMESTEPS = 2048


def summarise(frontier: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The checked numbers and the one-line summary of a ``frontier.json``."""
    majority, minority = frontier["groups"]
    points = frontier["points"]
    served_both = [p for p in points if min(p["groups"][g]["mean_return"] for g in (majority, minority)) > SERVED]
    envelope_maxmin = float(frontier["maxmin_mixture"]["min_return"])
    methods = {
        name: {"majority": m["returns"][majority], "minority": m["returns"][minority], "beyond_envelope": -m["gap_to_maxmin_mixture"]}
        for name, m in frontier["methods"].items()
    }
    maxmin_worst = min(methods["maxmin"]["majority"], methods["maxmin"]["minority"])
    checked = {
        "points": len(points),
        "points_serving_both_groups": len(served_both),
        "envelope_maxmin_return": envelope_maxmin,
        "methods": methods,
        "passes": {"maxmin_beyond_fixed_weight_envelope": maxmin_worst > envelope_maxmin},
    }
    where = ", ".join(f"{name} ({m['majority']:.1f}, {m['minority']:.1f})" for name, m in methods.items())
    summary = (
        f"FairGrid seed {frontier['seeds']}, {len(points)} fixed-weight policies ({len(points) // 2} weights x true/learned rewards, "
        f"{frontier['total_timesteps']:,} steps each): {len(served_both)} of {len(points)} serve both groups "
        "(the rest end at one group's goal); "
        f"best worst-group return of the fixed weightings, mixtures included: {envelope_maxmin:.1f}; "
        f"(majority, minority) returns: {where}; MaxMin (per_sample_min) worst group {maxmin_worst:.1f}"
    )
    return checked, summary


def main() -> None:
    parser = BenchmarkParser(__doc__.split("\n")[0], quick=f"{QUICK_TIMESTEPS} PPO steps per policy", quick_defaults={"points": 3})
    parser.add_argument("--points", type=int, default=DEFAULT_POINTS, help="weights on the grid (default 9)")
    parser.add_argument("--out", help="output folder (default: the shipped config's out_dir, runs/fairgrid)")
    args = parser.parse_args()
    config = ExperimentConfig.from_yaml(_config_path("fairgrid"))
    config.out_dir = str(runs_dir(args.out or config.out_dir, args.quick))
    if args.quick:
        config.train.total_timesteps = QUICK_TIMESTEPS
    pipeline = FrontierPipeline(config, progress_bar=False)
    pipeline.run()  # the methods marked on the frontier (every stage already on disk, e.g. from `make demo`, is reused)
    path = pipeline.frontier(args.points)
    frontier = json.loads(path.read_text())
    checked, summary = summarise(frontier)
    results_dir(args.quick).mkdir(parents=True, exist_ok=True)
    shutil.copyfile(path.with_name("frontier.png"), results_dir(args.quick) / f"{NAME}.png")
    result = {**checked, "frontier": frontier, "passed": all(checked["passes"].values())}
    write_result(NAME, result, summary, "MaxMin's worst-group return beyond every fixed weighting (mixtures included)", quick=args.quick)
    print(summary)


if __name__ == "__main__":
    main()
