"""Cost of MultiUserPreferenceWrapper on HalfCheetah-v5: steps/s raw vs wrapped.

Raw ``gym.make("HalfCheetah-v5")`` and the same env wrapped with a two-group
population (fast 0.8 / gentle 0.2 by default) step through one fixed,
pre-sampled action sequence. Runs are interleaved (raw, wrapped, wrapped,
raw, ...) so that load from other processes hits both alike, and the median
time of each is compared: ``ratio = wrapped time / raw time`` (> 1 = slower).
Target: ratio <= 1.15 (at ~30 µs per raw step, a budget of ~4 µs per step).

Writes ``benchmarks/results/wrapper_overhead.json`` and updates this
benchmark's line in ``benchmarks/RESULTS.md``.

    .venv/bin/python -m benchmarks.wrapper_overhead [--steps 5000] [--repeats 9] [--quick]

``--quick``: 1,000 steps x 3 repeats (``results/quick/``, see ``benchmarks/common.py``).
"""

from __future__ import annotations

import json
import statistics
import time

import gymnasium as gym
import numpy as np

from benchmarks.common import BenchmarkParser, write_result
from egalitarian_rl import envs
from egalitarian_rl.preferences import MultiUserPreferenceWrapper

NAME = "wrapper_overhead"
TARGET_RATIO = 1.15


def run(env: gym.Env, actions: np.ndarray, seed: int) -> float:
    """Seconds to step ``env`` through ``actions`` (resetting at episode ends; resets are timed too)."""
    env.reset(seed=seed)
    step = env.step
    start = time.perf_counter()
    for action in actions:
        _, _, terminated, truncated, _ = step(action)
        if terminated or truncated:
            env.reset()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = BenchmarkParser(__doc__.split("\n\n")[0], quick_defaults={"steps": 1000, "repeats": 3})
    parser.add_argument("--env", default="HalfCheetah-v5")
    parser.add_argument("--groups", default="fast=0.8,gentle=0.2", help="name=share,... from the env's group library")
    parser.add_argument("--steps", type=int, default=5000, help="steps per timed run")
    parser.add_argument("--repeats", type=int, default=9, help="timed runs of each variant (interleaved)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    shares = {name: float(share) for name, share in (item.split("=") for item in args.groups.split(","))}
    population = envs.make_population(args.env, shares)
    raw = gym.make(args.env)
    wrapped = MultiUserPreferenceWrapper(gym.make(args.env), population)
    raw.action_space.seed(args.seed)
    actions = np.array([raw.action_space.sample() for _ in range(args.steps)])

    run(raw, actions[:500], args.seed)  # warm-up: first-call costs, caches
    run(wrapped, actions[:500], args.seed)
    times: dict[str, list[float]] = {"raw": [], "wrapped": []}
    for repeat in range(args.repeats):
        order = ("raw", "wrapped") if repeat % 2 == 0 else ("wrapped", "raw")
        for variant in order:
            times[variant].append(run(raw if variant == "raw" else wrapped, actions, args.seed))
    raw.close()
    wrapped.close()

    raw_s, wrapped_s = statistics.median(times["raw"]), statistics.median(times["wrapped"])
    ratio = wrapped_s / raw_s
    result = {
        "env": args.env,
        "population": repr(population),
        "raw_steps_per_s": args.steps / raw_s,
        "wrapped_steps_per_s": args.steps / wrapped_s,
        "ratio": ratio,
        "overhead_us_per_step": (wrapped_s - raw_s) / args.steps * 1e6,
        "raw_us_per_step": raw_s / args.steps * 1e6,
        "target_ratio": TARGET_RATIO,
        "passed": ratio <= TARGET_RATIO,
        "repeats": args.repeats,
        "steps": args.steps,
        "statistic": "median over interleaved repeats",
        "raw_seconds": times["raw"],
        "wrapped_seconds": times["wrapped"],
    }
    write_result(
        NAME,
        result,
        (
            f"{args.env} {population!r}: raw {result['raw_steps_per_s']:,.0f} steps/s, "
            f"wrapped {result['wrapped_steps_per_s']:,.0f} steps/s, ratio {ratio:.3f} "
            f"(+{result['overhead_us_per_step']:.1f} µs/step; median of {args.repeats} x {args.steps} steps)"
        ),
        f"ratio <= {TARGET_RATIO}",
        quick=args.quick,
    )
    print(json.dumps({k: v for k, v in result.items() if not k.endswith("_seconds")}, indent=2))


if __name__ == "__main__":
    main()
