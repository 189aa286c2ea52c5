"""Wall time of MaxMinPPO vs SB3 PPO: what the K group rewards and the rule cost.

Both learn on the same env (HalfCheetah-v5, 4 DummyVecEnv workers), for the
same steps, with the same PPO settings and the same learned-reward wrapper
(:class:`GroupRewardVecEnv`): SB3 PPO gets one learned reward (K = 1, the
standard RLHF set-up), MaxMinPPO a K-member mixture with ``worst_group``.
Runs are interleaved (PPO, MaxMin, MaxMin, PPO, ...) and the median time of
each is compared: ``ratio = maxmin time / ppo time``.
Targets: ratio <= 1.10 at K = 2, <= 1.25 at K = 8.

Writes ``benchmarks/results/maxmin_overhead.json`` and a line in ``benchmarks/RESULTS.md``.

    .venv/bin/python -m benchmarks.maxmin_overhead [--steps 8192] [--repeats 5]

``--quick``: 2,048 steps per timed run, 1 repeat (``results/quick/``).
"""

from __future__ import annotations

import statistics
import time

import gymnasium as gym
import torch
from stable_baselines3 import PPO
from stable_baselines3.common.env_util import make_vec_env

from benchmarks.common import BenchmarkParser, write_result
from egalitarian_rl import MaxMinPPO
from egalitarian_rl.algorithms.aggregation import GroupRewardNormalizer, make_aggregation
from egalitarian_rl.rewards import RewardMixture
from egalitarian_rl.rewards.vec_env import GroupRewardVecEnv, learned_rewards

NAME = "maxmin_overhead"
TARGETS = {2: 1.10, 8: 1.25}
PPO_KWARGS = {"n_steps": 512, "batch_size": 64, "n_epochs": 10, "device": "cpu", "seed": 0}


def mixture(env_id: str, k: int) -> RewardMixture:
    env = gym.make(env_id)
    return RewardMixture(env.observation_space, env.action_space, k, use_next_state=True)


def time_ppo(env_id: str, steps: int) -> float:
    venv = make_vec_env(env_id, n_envs=4, seed=0)
    reward = mixture(env_id, 1)
    env = GroupRewardVecEnv(venv, learned_rewards(reward), make_aggregation("mean"), 1, GroupRewardNormalizer(1))
    model = PPO("MlpPolicy", env, **PPO_KWARGS)
    start = time.perf_counter()
    model.learn(steps)
    return time.perf_counter() - start


def time_maxmin(env_id: str, steps: int, k: int) -> float:
    venv = make_vec_env(env_id, n_envs=4, seed=0)
    model = MaxMinPPO("MlpPolicy", venv, reward_mixture=mixture(env_id, k), aggregation="worst_group", **PPO_KWARGS)
    start = time.perf_counter()
    model.learn(steps)
    return time.perf_counter() - start


def main() -> None:
    parser = BenchmarkParser(__doc__.split("\n\n")[0], quick_defaults={"steps": 2048, "repeats": 1})
    parser.add_argument("--env", default="HalfCheetah-v5")
    parser.add_argument("--steps", type=int, default=8192, help="env steps per timed run (multiple of 4 x 512)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for these MLPs on 2 cores)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    time_ppo(args.env, 2048)  # warm-up: imports, first-call costs
    rows = []
    for k in TARGETS:
        times: dict[str, list[float]] = {"ppo": [], "maxmin": []}
        for repeat in range(args.repeats):
            order = ("ppo", "maxmin") if repeat % 2 == 0 else ("maxmin", "ppo")
            for variant in order:
                seconds = time_ppo(args.env, args.steps) if variant == "ppo" else time_maxmin(args.env, args.steps, k)
                times[variant].append(seconds)
        ppo_s, maxmin_s = statistics.median(times["ppo"]), statistics.median(times["maxmin"])
        rows.append(
            {
                "k": k,
                "ppo_seconds": ppo_s,
                "maxmin_seconds": maxmin_s,
                "ratio": maxmin_s / ppo_s,
                "target_ratio": TARGETS[k],
                "passed": maxmin_s / ppo_s <= TARGETS[k],
                "ppo_runs": times["ppo"],
                "maxmin_runs": times["maxmin"],
            }
        )
        print(f"K={k}: PPO {ppo_s:.2f} s, MaxMinPPO {maxmin_s:.2f} s, ratio {maxmin_s / ppo_s:.3f}")
    result = {
        "env": args.env,
        "steps": args.steps,
        "repeats": args.repeats,
        "n_envs": 4,
        "torch_threads": args.threads,
        "ppo_kwargs": PPO_KWARGS,
        "statistic": "median over interleaved repeats",
        "rows": rows,
        "passed": all(row["passed"] for row in rows),
    }
    summary = f"{args.env}, {args.steps} steps, median of {args.repeats}: " + ", ".join(
        f"K={row['k']} PPO {row['ppo_seconds']:.1f} s vs MaxMin {row['maxmin_seconds']:.1f} s (ratio {row['ratio']:.3f})" for row in rows
    )
    write_result(NAME, result, summary, "ratio <= 1.10 at K=2, <= 1.25 at K=8", quick=args.quick)


if __name__ == "__main__":
    main()
