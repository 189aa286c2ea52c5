"""The ``egalitarian-rl`` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def _demo(args: argparse.Namespace) -> int:
    import gymnasium as gym

    import envs
    from egalitarian_rl.preferences import collect_preferences

    env_id = envs.FAIRGRID_ID
    population = envs.make_population(env_id, {"majority": 0.8, "minority": 0.2}, beta=5.0)
    data = collect_preferences(
        gym.make(env_id, random_start=True), population, n_users=100, comparisons_per_user=30,
        segment_length=10, seed=args.seed, progress_bar=True,
    )
    out = Path(args.out)
    path = data.save(out / "preferences.npz")
    groups = data.comparison_groups()
    print(f"\n{data}\n")
    print(f"{'group':<10} {'users':>6} {'comparisons':>12} {'prefer a':>9} {'prefer b':>9} {'equal':>7}")
    for index, name in enumerate(data.group_names):
        labels = data.labels[groups == index]
        n_users = int((data.user_groups == index).sum())
        print(
            f"{name:<10} {n_users:>6} {len(labels):>12} {np.mean(labels == 1):>9.1%} "
            f"{np.mean(labels == 0):>9.1%} {np.mean(labels == 0.5):>7.1%}"
        )
    print(f"\npreferences saved to {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="egalitarian-rl", description="MaxMin-RLHF for diverse users on any Gymnasium env.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="collect preferences on FairGrid from 100 simulated users and summarise them")
    demo.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(handler=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
