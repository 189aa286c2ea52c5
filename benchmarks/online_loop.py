"""The online preference loop on FairGrid 80/20 over 3 seeds: does it reach the offline MaxMin result with fewer comparisons?

Runs the shipped ``fairgrid_online`` config (methods ``rlhf``, ``maxmin``, ``online``): ``rlhf``
and ``maxmin`` learn from the offline comparisons (``collect``: 100 users x 30 comparisons of
random behaviour), ``online`` from its own rounds (4 x 100 users x 6 answers on segments of the
current policy), all with 30,000 PPO steps.

Checks: the online method's minority win-rate vs RLHF (pooled over seeds) >= 0.60, with no more
comparisons than the offline run collected, in every seed.

Writes ``benchmarks/results/online_loop.json``, a line in ``benchmarks/RESULTS.md`` and the
report under ``runs/bench_online_loop/``.

    .venv/bin/python -m benchmarks.online_loop [--seeds 0 1 2]

``--quick``: seed 0, 2,048 PPO steps per policy and 2 online rounds of 1,024 steps, under
``runs/quick/bench_online_loop``: ``results/quick/online_loop.json`` and a line in ``results/quick/RESULTS.md``.
"""

from __future__ import annotations

import json
import time
from typing import Any

from benchmarks.common import BenchmarkParser, runs_dir, write_result
from egalitarian_rl.cli import _config_path
from egalitarian_rl.evaluation import build_metrics
from egalitarian_rl.experiments import ExperimentConfig, Pipeline
from egalitarian_rl.preferences import PreferenceDataset

NAME = "online_loop"
#: ``--quick``: PPO steps per offline policy, online rounds and PPO steps per round.
QUICK_TIMESTEPS, QUICK_ROUNDS, QUICK_TIMESTEPS_PER_ROUND = 2048, 2, 1024
MINORITY, MAJORITY = "minority", "majority"


def seed_row(pipeline: Pipeline, seed: int) -> dict[str, Any]:
    """One seed's comparisons and minority win-rates (of ``online`` and ``maxmin`` vs ``rlhf``)."""
    returns = {method: [pipeline.evaluate(seed, method)] for method in ("rlhf", "maxmin", "online")}
    groups = build_metrics(returns, pipeline.group_names, baseline="rlhf")["methods"]
    rounds = json.loads(pipeline.online_rounds_path(seed).read_text())
    fit = json.loads((pipeline.seed_dir(seed) / "rewards" / "fit_metrics.json").read_text())
    return {
        "online_comparisons": rounds[-1]["comparisons"],
        # Collected by the offline run; its fits train on n_train of them (the rest are held out for accuracies).
        "offline_comparisons": len(PreferenceDataset.load(pipeline.seed_dir(seed) / "preferences.npz")),
        "offline_train_comparisons": fit["n_train_comparisons"],
        "online_minority_win_rate_vs_rlhf": groups["online"]["groups"][MINORITY]["win_rate_vs_rlhf"],
        "maxmin_minority_win_rate_vs_rlhf": groups["maxmin"]["groups"][MINORITY]["win_rate_vs_rlhf"],
        "mean_returns": {m: {g: groups[m]["groups"][g]["mean_return"] for g in (MAJORITY, MINORITY)} for m in groups},
        "online_rounds": rounds,
    }


def main() -> None:
    quick = f"{QUICK_TIMESTEPS} PPO steps, {QUICK_ROUNDS} online rounds of {QUICK_TIMESTEPS_PER_ROUND} steps"
    parser = BenchmarkParser(__doc__.split("\n\n")[0], quick=quick, quick_defaults={"seeds": [0]})
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="runs/bench_online_loop")
    args = parser.parse_args()

    config = ExperimentConfig.from_yaml(_config_path("fairgrid_online"))
    config.seeds, config.out_dir = args.seeds, str(runs_dir(args.out, args.quick))
    if args.quick:
        config.train.total_timesteps, config.online.rounds = QUICK_TIMESTEPS, QUICK_ROUNDS
        config.online.timesteps_per_round = QUICK_TIMESTEPS_PER_ROUND
    start = time.perf_counter()
    pipeline = Pipeline(config, progress_bar=False)
    _, metrics = pipeline.run()
    seconds = time.perf_counter() - start
    seeds = {f"seed_{seed}": seed_row(pipeline, seed) for seed in args.seeds}

    methods = metrics["methods"]
    online_win, maxmin_win = (methods[m]["groups"][MINORITY]["win_rate_vs_rlhf"] for m in ("online", "maxmin"))
    fewer = all(row["online_comparisons"] <= row["offline_comparisons"] for row in seeds.values())
    mean_return = {m: {g: methods[m]["groups"][g]["mean_return"] for g in (MAJORITY, MINORITY)} for m in ("rlhf", "maxmin", "online")}
    result = {
        "config": "fairgrid_online",
        "online": config.to_dict()["online"],
        "seeds": seeds,
        "pooled": {
            "online_minority_win_rate_vs_rlhf": online_win,
            "maxmin_minority_win_rate_vs_rlhf": maxmin_win,
            "mean_return": mean_return,
        },
        "seconds": seconds,
        "passes": {"online_minority_win_rate>=0.60": online_win >= 0.60, "online_comparisons<=offline": fewer},
    }
    result["passed"] = all(result["passes"].values())
    per_seed = ", ".join(f"{row['online_comparisons']} vs {row['offline_comparisons']}" for row in seeds.values())
    summary = (
        f"FairGrid 80/20, {len(args.seeds)} seeds: online minority win-rate vs RLHF {online_win:.2f} (offline MaxMin "
        f"{maxmin_win:.2f}); minority/majority return online {mean_return['online'][MINORITY]:.1f}/"
        f"{mean_return['online'][MAJORITY]:.1f}, offline MaxMin {mean_return['maxmin'][MINORITY]:.1f}/"
        f"{mean_return['maxmin'][MAJORITY]:.1f}, RLHF {mean_return['rlhf'][MINORITY]:.1f}/{mean_return['rlhf'][MAJORITY]:.1f}; "
        f"comparisons online vs offline per seed: {per_seed}"
    )
    write_result(NAME, result, summary, "online minority win-rate vs RLHF >= 0.60 with online comparisons <= offline", quick=args.quick)
    print(summary)


if __name__ == "__main__":
    main()
