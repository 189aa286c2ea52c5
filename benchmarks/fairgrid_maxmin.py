"""The paper's claim on FairGrid over seeds: MaxMin-RLHF vs single-reward RLHF, per aggregation rule.

Runs the shipped FairGrid pipeline (80% majority / 20% minority, learned
rewards only) for the given seeds (committed result: 0-4), once per aggregation rule (one critic; the
linear rules also with one value head per group): the variant under test
replaces MaxMinPPO's; preferences, fitted rewards and the ``rlhf`` and ``mean``
policies are shared between variants (copied, not retrained).

Checks, for the shipped rule (``per_sample_min``):
- minority win-rate of MaxMin vs RLHF >= 0.60;
- minority mean true return >= 1.33 x RLHF's, counted from the lowest possible return (0);
- MaxMin's worst-group return is the highest among learned-reward methods (rlhf, maxmin, mean);
- the majority keeps >= 75% of its RLHF return.
The other rules are measured and reported with the same checks.

Writes ``benchmarks/results/fairgrid_maxmin.json``, a line in ``benchmarks/RESULTS.md``
and each rule's report under ``runs/bench_fairgrid/<rule>/``.

    .venv/bin/python -m benchmarks.fairgrid_maxmin [--seeds 0 1 2 3 4] [--rules per_sample_min worst_group ...] [--timesteps N]

``--quick``: seed 0, rules ``per_sample_min`` and ``worst_group``, 4,096 PPO steps per policy, runs under
``runs/quick/bench_fairgrid`` (``results/quick/``).

Why the return-level rules (``worst_group``, its averaged variant, ``softmin``, ``egd``) miss the
compromise C here, measured: every one of them trains on a linear weighting of the groups' rewards,
and PPO ends at goal A or goal B under *every* fixed weighting, also where C pays most per step
(``egalitarian-rl frontier fairgrid``: 18 of 18 points at A or B; with the true rewards at weights
(0.5, 0.5), where C pays 2.68 z per step against 1.74 at A and 1.95 at B, 5 of 5 PPO runs ended at
A or B, with entropy coefficient 0.01 and 0.05). ``per_sample_min``'s reward is positive at C only.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from benchmarks.common import BenchmarkParser, maxmin_vs_rlhf, runs_dir, write_result
from egalitarian_rl.cli import _config_path
from egalitarian_rl.experiments import ExperimentConfig, Pipeline

NAME = "fairgrid_maxmin"
OUT = "runs/bench_fairgrid"
QUICK = {"seeds": [0], "rules": ["per_sample_min", "worst_group"], "timesteps": 4096, "out": str(runs_dir(OUT, quick=True))}
#: variant name -> (aggregation rule, its arguments, one value head per group)
RULES = {
    "per_sample_min": ("per_sample_min", {}, False),
    "worst_group": ("worst_group", {}, False),
    "worst_group_average": ("worst_group", {"average": True, "warmup": 10}, False),
    "softmin": ("softmin", {"tau": 5.0}, False),
    "egd": ("egd", {"eta": 0.1}, False),
    "worst_group+critics": ("worst_group", {}, True),
    "softmin+critics": ("softmin", {"tau": 5.0}, True),
    "egd+critics": ("egd", {"eta": 0.1}, True),
}
SHARED = ("preferences.npz", "rewards", "policies/rlhf.zip", "policies/rlhf.curve.npz", "policies/mean.zip",
          "policies/mean.curve.npz", "returns/rlhf.npy", "returns/mean.npy",
          # the stage records: without them the copies would not count as up to date and be redone
          "stages/collect.json", "stages/fit.json", "stages/train_rlhf.json", "stages/train_mean.json",
          "stages/evaluate_rlhf.json", "stages/evaluate_mean.json")  # fmt: skip


def main() -> None:
    parser = BenchmarkParser(__doc__.split("\n\n")[0], quick_defaults=QUICK)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rules", nargs="+", default=list(RULES), choices=list(RULES))
    parser.add_argument("--timesteps", type=int, default=None, help="PPO steps per policy (default: the config's)")
    parser.add_argument("--out", default=OUT)
    args = parser.parse_args()

    rows, first_dir = {}, None
    for rule in args.rules:
        config = ExperimentConfig.from_yaml(_config_path("fairgrid"))
        config.seeds, config.methods = args.seeds, ["rlhf", "maxmin", "mean"]
        config.train.aggregation, config.train.aggregation_kwargs, config.train.group_critics = RULES[rule]
        config.out_dir = str(Path(args.out) / rule)
        if args.timesteps is not None:
            config.train.total_timesteps = args.timesteps
        if first_dir is not None:
            for seed in args.seeds:
                for item in SHARED:
                    source, target = first_dir / f"seed_{seed}" / item, Path(config.out_dir) / f"seed_{seed}" / item
                    if source.exists() and not target.exists():
                        target.parent.mkdir(parents=True, exist_ok=True)
                        (shutil.copytree if source.is_dir() else shutil.copy2)(source, target)
        start = time.perf_counter()
        _, metrics = Pipeline(config, progress_bar=False).run()
        _, kwargs, critics = RULES[rule]
        claims = maxmin_vs_rlhf(metrics, majority="majority", minority="minority")
        rows[rule] = {"aggregation_kwargs": kwargs, "group_critics": critics, "seconds": time.perf_counter() - start, **claims}
        first_dir = first_dir or Path(config.out_dir)
        print(rule, rows[rule]["passes"])

    main_rule = "per_sample_min" if "per_sample_min" in rows else args.rules[0]
    main_row = rows[main_rule]
    result = {"seeds": args.seeds, "shipped_rule": main_rule, "rules": rows, "passed": all(main_row["passes"].values())}
    options = f"--seeds {' '.join(map(str, args.seeds))} --rules {' '.join(rows)}"
    if args.timesteps is not None:
        options += f" --timesteps {args.timesteps}"
    if args.quick:
        options += " --quick"
    command = f"`python -m benchmarks.fairgrid_maxmin {options}`"
    summary = (
        f"{len(args.seeds)} seeds, {main_rule}: minority win-rate {main_row['minority_win_rate']:.2f}, minority return "
        f"{main_row['minority_return']:.1f} vs RLHF {main_row['rlhf_minority_return']:.1f}, majority {main_row['majority_return']:.1f} "
        f"vs RLHF {main_row['rlhf_majority_return']:.1f} ({main_row['majority_kept']:.0%}); other rules (minority win-rate, "
        "minority / majority return): "
        + ", ".join(
            f"{r} {row['minority_win_rate']:.2f}, {row['minority_return']:.1f} / {row['majority_return']:.1f}"
            for r, row in rows.items()
            if r != main_rule
        )
        + f". {command}"
    )
    write_result(NAME, result, summary, "win-rate >= 0.60, ratio >= 1.33, worst group highest, majority >= 75%", quick=args.quick)


if __name__ == "__main__":
    main()
