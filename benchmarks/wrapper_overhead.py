"""Cost of MultiUserPreferenceWrapper on HalfCheetah-v5: steps/s raw vs wrapped.

Raw ``gym.make("HalfCheetah-v5")`` and the same env wrapped with a two-group
population (fast 0.8 / gentle 0.2 by default) step through one fixed,
pre-sampled action sequence. Runs are interleaved (raw, wrapped, wrapped,
raw, ...) so that load from other processes hits both alike, and the median
time of each is compared: ``ratio = wrapped time / raw time`` (> 1 = slower).
Target: ratio <= 1.15 (at ~30 µs per raw step, a budget of ~4 µs per step).

Writes ``benchmarks/results/wrapper_overhead.json`` and updates this
benchmark's line in ``benchmarks/RESULTS.md``.

    .venv/bin/python benchmarks/wrapper_overhead.py [--steps 5000] [--repeats 9]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import gymnasium as gym
import numpy as np

import envs
from egalitarian_rl.preferences import MultiUserPreferenceWrapper

NAME = "wrapper_overhead"
TARGET_RATIO = 1.15
HERE = Path(__file__).resolve().parent
RESULTS_JSON = HERE / "results" / f"{NAME}.json"
RESULTS_MD = HERE / "RESULTS.md"
MD_HEADER = """# Benchmark results

One line per benchmark, updated in place by each benchmark script (details in `results/*.json`).

| date | benchmark | key numbers | target | result |
|---|---|---|---|---|
"""


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


def machine_info() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    packages = {}
    for package in ("numpy", "gymnasium", "mujoco"):
        try:
            packages[package] = version(package)
        except PackageNotFoundError:
            packages[package] = None
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        **packages,
    }


def update_results_md(line_cells: list[str]) -> None:
    """Replace this benchmark's row in RESULTS.md (matched by the benchmark column), or append it."""
    text = RESULTS_MD.read_text() if RESULTS_MD.exists() else MD_HEADER
    row = "| " + " | ".join(line_cells) + " |"
    lines = text.rstrip("\n").split("\n")
    for i, line in enumerate(lines):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) > 1 and cells[1] == NAME:
            lines[i] = row
            break
    else:
        lines.append(row)
    RESULTS_MD.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--env", default="HalfCheetah-v5")
    parser.add_argument("--groups", default="fast=0.8,gentle=0.2", help="name=share,... from the env's group library")
    parser.add_argument("--steps", type=int, default=5000, help="steps per timed run")
    parser.add_argument("--repeats", type=int, default=9, help="timed runs of each variant (interleaved)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

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
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine_info(),
    }
    RESULTS_JSON.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_JSON.write_text(json.dumps(result, indent=2) + "\n")
    update_results_md(
        [
            result["date"][:10],
            NAME,
            f"{args.env} {population!r}: raw {result['raw_steps_per_s']:,.0f} steps/s, "
            f"wrapped {result['wrapped_steps_per_s']:,.0f} steps/s, ratio {ratio:.3f} "
            f"(+{result['overhead_us_per_step']:.1f} µs/step; median of {args.repeats} x {args.steps} steps)",
            f"ratio <= {TARGET_RATIO}",
            "pass" if result["passed"] else "FAIL",
        ]
    )
    print(json.dumps({k: v for k, v in result.items() if not k.endswith("_seconds")}, indent=2))


if __name__ == "__main__":
    main()
