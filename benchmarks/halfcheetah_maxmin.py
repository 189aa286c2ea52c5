"""MaxMin-RLHF vs single-reward RLHF on HalfCheetah-v5: 80% want speed, 20% a calm cheetah.

Runs the shipped ``halfcheetah`` config (3 seeds, 200k PPO steps per policy,
methods rlhf, maxmin and the two oracles; about 12 minutes on 2 CPU cores,
seconds when ``runs/halfcheetah`` already holds the artefacts: the pipeline
resumes). The groups conflict directly (calm = control cost minus |speed|), so
a policy that serves the calm minority must be slower: the check is the
minority's win-rate and the worst-off group; what the majority keeps is
reported, not targeted.

Writes ``benchmarks/results/halfcheetah_maxmin.json`` and a line in ``benchmarks/RESULTS.md``.

    .venv/bin/python -m benchmarks.halfcheetah_maxmin [--quick]

``--quick``: seed 0 with ``benchmarks.mujoco``'s quick budget (4,096 PPO steps per policy, 20 users x 10
comparisons, 5 reward epochs, 2 evaluation episodes) under ``runs/quick/halfcheetah`` (``results/quick/``).
"""

from __future__ import annotations

import json

from benchmarks.common import BenchmarkParser, maxmin_vs_rlhf, runs_dir, write_result
from benchmarks.mujoco import quick_budget
from egalitarian_rl.cli import _config_path
from egalitarian_rl.experiments import ExperimentConfig, Pipeline

NAME = "halfcheetah_maxmin"


def main() -> None:
    args = BenchmarkParser(__doc__.split("\n\n")[0], quick="seed 0, benchmarks.mujoco's quick budget").parse_args()
    config = ExperimentConfig.from_yaml(_config_path("halfcheetah"))
    if args.quick:
        config.seeds, config.out_dir = [0], str(runs_dir(config.out_dir, quick=True))
        quick_budget(config)
    pipeline = Pipeline(config, progress_bar=False)
    _, metrics = pipeline.run()
    claims = maxmin_vs_rlhf(metrics, majority="fast", minority="calm")
    fit = metrics["extra"]["reward_fit"]
    result = {
        "config": config.to_dict(),
        **claims,
        "reward_fit": fit,
        "passed": claims["passes"]["minority_win_rate>=0.60"] and claims["passes"]["worst_group_highest"],
    }
    aris = ", ".join(f"{seed_fit['adjusted_rand_index']:.2f}" for seed_fit in fit.values())
    seed_rate = claims["minority_seed_win_rate"]  # None with one seed (--quick)
    summary = (
        f"{len(config.seeds)} seeds x {config.train.total_timesteps:,} steps, fast 0.8 / calm 0.2: calm win-rate "
        f"{claims['minority_win_rate']:.2f} (seeds {'n/a' if seed_rate is None else f'{seed_rate:.2f}'}), calm return "
        f"{claims['minority_return']:.0f} vs RLHF {claims['rlhf_minority_return']:.0f}, fast keeps {claims['majority_kept']:.0%}; "
        f"EM ARI {aris}"
    )
    write_result(NAME, result, summary, "calm win-rate >= 0.60, worst group highest", quick=args.quick)
    print(json.dumps(claims, indent=2))


if __name__ == "__main__":
    main()
