"""MaxMin-RLHF vs single-reward RLHF on two MuJoCo bodies, over seeds.

Two 80/20 populations whose groups truly conflict (the group definitions and why are in
``envs/mujoco.py``):

- HalfCheetah-v5, the shipped ``halfcheetah`` config: ``fast`` (0.8, forward velocity) vs
  ``calm`` (0.2, control cost minus ``|velocity|``);
- Hopper-v5, the shipped ``hopper`` config: ``fast`` (0.8, forward velocity) vs ``steady``
  (0.2, 1 per healthy step minus ``|velocity|``).

Per env and seed the pipeline collects the simulated users' comparisons, fits the single
Bradley-Terry reward and the K=2 EM mixture, and trains with the same PPO settings and budget:
``rlhf`` (SB3 PPO on the single learned reward), ``maxmin`` (MaxMinPPO on the mixture, the
config's rule: ``worst_group``) and ``oracle_<group>`` (SB3 PPO on that group's TRUE reward, a
reference). Every policy sees observations normalised by VecNormalize
(``train.normalize_obs``, statistics saved beside the policy and frozen at evaluation); the
reward models read raw observations. Each policy is judged by every group's true return over
the config's evaluation episodes (5, deterministic actions).

Budget (this 2-core machine, <= 60 minutes for everything): the shipped configs as they are
(100 users x 40 comparisons of 25-step random-action segments per seed; PPO with 4 envs,
``n_steps`` 512, batch 64, 10 epochs) with their own PPO steps per policy: 200,000 on
HalfCheetah-v5 and 100,000 on Hopper-v5 (where 50,000 already separated the methods). The
benchmark changes only ``train.normalize_obs`` (on; ``hopper`` sets it itself), the methods,
the seeds and ``out_dir``. ``--quick`` runs seed 0 only with ``QUICK_STEPS`` steps, fewer comparisons,
shorter rollouts, 5 reward epochs and 2 evaluation episodes (a few minutes; its numbers mean nothing).
Both are recorded in the JSON (``config`` and ``steps_per_policy`` per env).

Win-rate over seed pairs (``win_rate_vs_rlhf``): for a group, every seed of the method against
every seed of ``rlhf`` (3 x 3 = 9 pairs), each seed summarised by its mean true return over its
evaluation episodes; a pair counts 1 if the method's mean is higher, 0.5 if equal, 0 if lower
(:func:`~egalitarian_rl.evaluation.win_rate_over_seeds` with ``paired=False``). Within one pair
of trained policies the episode noise is far below the gap between policies (docs/DESIGN.md),
so seeds, not episodes, are the unit. ``episode_win_rate_vs_rlhf`` is the pipeline's
all-episode-pairs win-rate, kept beside it. ``mean_return`` / ``std_return`` are over all
evaluation episodes of all seeds; ``seed_mean_returns`` lists each seed's mean.

Acceptance (issue 11), per env: MaxMin's minority win-rate >= 0.60 and its majority win-rate
>= 0.40. Each (env, seed) runs in its own process (``--jobs``, one torch thread each) under
``runs/bench_mujoco/<config>``; every stage is saved, so a killed run resumes, and the JSON,
plot and RESULTS.md line are rewritten each time an (env, seed) finishes.

    nohup .venv/bin/python -m benchmarks.mujoco --jobs 2 > runs/mujoco_bench.log 2>&1 &   # the committed result
    .venv/bin/python -m benchmarks.mujoco --jobs 1 --envs Hopper-v5   # one body only

The committed ``results/mujoco.json`` is the first command (2026-12-05, 12:29-13:08 UTC): both bodies, their full
budgets, 3 seeds, 38 min wall with ``--jobs 2`` (per env and seed 8-11 min on Hopper, 10-18 min on HalfCheetah,
beside an EM benchmark for the first 35 min). It fails the majority line on both bodies and meets the minority's:

- HalfCheetah-v5: MaxMin runs at the max-min point on every seed (``fast`` 322, 401, 420 per episode, i.e. 0.32-0.42
  m/s; ``calm`` -351 to -459), RLHF runs fast on two seeds (3147, 1265) and stood still on one (3). MaxMin wins
  ``calm`` in 6 of 9 seed pairs (0.67) and ``fast`` in 3 (0.33: only against that seed). EM ARI 1.00 on every seed.
- Hopper-v5: MaxMin stands still on seeds 0-1 (``steady`` 986, 975; ``fast`` 14, 25) and half-hops on seed 2
  (403 / 152); RLHF ends steady (967 / 33), diving (-29 / 362) or between (339 / 158). MaxMin wins ``steady`` in 8 of
  9 pairs (0.89) and ``fast`` in 1 (0.11). (The Hopper-only run of 2026-11-25 with the code of then: 979 / 21 on every
  seed, 9 of 9 and 0 of 9.)

That is where the max-min points are: ``benchmarks/maxmin_point.py`` puts them at 0.097 m/s on Hopper (``fast`` 97 per
episode) and at most 0.405 m/s on HalfCheetah (``fast`` 405), under MaxMinPPO's z-scoring. For both pairs every unit of
return the minority gains costs the majority the same (``calm = reward_ctrl - |v|``, ``steady = 1 - |v|``), so the
exact max-min policy beats RLHF's majority only on an RLHF seed slower than that. Other pairs tried (a minority that
wants a moderate pace, small actions, or an upright torso) are in ``envs/mujoco.py``: none met both lines either.

    .venv/bin/python -m benchmarks.mujoco --quick --jobs 2   # a few minutes, runs/quick/bench_mujoco

Writes ``benchmarks/results/mujoco.json``, ``benchmarks/results/mujoco.png`` and a line in
``benchmarks/RESULTS.md`` (``--quick``: the same under ``benchmarks/results/quick/``).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from benchmarks.common import HERE, BenchmarkParser, results_dir, run_in_processes, runs_dir, write_result
from egalitarian_rl.cli import _config_path
from egalitarian_rl.evaluation import win_rate_over_seeds
from egalitarian_rl.evaluation.plots import method_colors
from egalitarian_rl.experiments import ExperimentConfig, Pipeline
from egalitarian_rl.io import write_atomic

NAME = "mujoco"
COMMAND = ".venv/bin/python -m benchmarks.mujoco --jobs 2"
#: env id -> (shipped config, majority group, minority group).
ENVS: dict[str, tuple[str, str, str]] = {
    "HalfCheetah-v5": ("halfcheetah", "fast", "calm"),
    "Hopper-v5": ("hopper", "fast", "steady"),
}
SEEDS = (0, 1, 2)
QUICK_SEEDS = (0,)
QUICK_STEPS = 4_096
#: Quick mode: fewer users and comparisons, so collection and fits take seconds, and shorter rollouts.
QUICK_COLLECT = {"n_users": 20, "comparisons_per_user": 10}
QUICK_PPO = {"n_steps": 256}
MINORITY_TARGET, MAJORITY_TARGET = 0.60, 0.40


def env_config(env_id: str, quick: bool, steps: int | None = None) -> ExperimentConfig:
    """The shipped config of ``env_id`` with this benchmark's budget and observation normalisation.

    :param steps: PPO steps per policy instead of the config's (``--steps``); ``None`` keeps them.
    """
    name = ENVS[env_id][0]
    config = ExperimentConfig.from_yaml(_config_path(name))
    config.methods = ["rlhf", "maxmin", "oracle"]
    config.seeds = list(SEEDS)
    config.out_dir = str(runs_dir(f"runs/bench_mujoco/{name}", quick))
    config.train.normalize_obs = True
    if quick:
        quick_budget(config)
    if steps is not None:
        config.train.total_timesteps = steps
    return config


def quick_budget(config: ExperimentConfig) -> None:
    """``--quick``'s budget for a MuJoCo config, in place: ``QUICK_STEPS`` per policy, ``QUICK_COLLECT``, ``QUICK_PPO``,
    5 reward epochs, 2 evaluation episodes (also ``halfcheetah_maxmin --quick``'s)."""
    config.train.total_timesteps = QUICK_STEPS
    for key, value in QUICK_COLLECT.items():
        setattr(config.collect, key, value)
    config.train.ppo = {**config.train.ppo, **QUICK_PPO}
    config.reward.epochs = 5
    config.evaluate.n_episodes = 2


def run_seed(env_id: str, seed: int, quick: bool, steps: int | None = None) -> float:
    """Every stage of one env and seed (resuming), the random policy's evaluation included; returns wall seconds."""
    start = time.perf_counter()
    config = env_config(env_id, quick, steps)
    config.seeds = [seed]
    pipeline = Pipeline(config, progress_bar=False, log=lambda line: print(f"[{env_id}] {line}", flush=True))
    for method in [*pipeline.methods, "random"]:
        pipeline.evaluate(seed, method)
    return time.perf_counter() - start


def summarise_env(env_id: str, seeds: list[int], quick: bool, steps: int | None = None) -> dict[str, Any]:
    """The finished ``seeds`` of one env pooled by the pipeline's report, with win-rates over seed pairs."""
    config = env_config(env_id, quick, steps)
    config.seeds = seeds
    pipeline = Pipeline(config, progress_bar=False, log=lambda _: None)
    _, metrics = pipeline.run()  # every stage is up to date: this only reads returns and writes the report
    returns = {method: [pipeline.evaluate(seed, method) for seed in seeds] for method in pipeline.methods}
    names = pipeline.group_names
    methods = {}
    for method, per_seed in returns.items():
        groups = {}
        for k, group in enumerate(names):
            entry = metrics["methods"][method]["groups"][group]
            groups[group] = {
                "mean_return": entry["mean_return"],
                "std_return": entry["std_return"],
                "win_rate_vs_rlhf": win_rate_over_seeds([r[:, k] for r in per_seed], [r[:, k] for r in returns["rlhf"]], paired=False),
                "episode_win_rate_vs_rlhf": entry["win_rate_vs_rlhf"],
                "seed_mean_returns": [float(r[:, k].mean()) for r in per_seed],
                **({"normalized_score": entry["normalized_score"]} if "normalized_score" in entry else {}),
            }
        methods[method] = {"groups": groups}
    _, majority, minority = ENVS[env_id]
    maxmin = methods["maxmin"]["groups"]
    passes = {
        f"minority_win_rate>={MINORITY_TARGET:.2f}": maxmin[minority]["win_rate_vs_rlhf"] >= MINORITY_TARGET,
        f"majority_win_rate>={MAJORITY_TARGET:.2f}": maxmin[majority]["win_rate_vs_rlhf"] >= MAJORITY_TARGET,
    }
    return {
        "majority": majority,
        "minority": minority,
        "seeds": seeds,
        "steps_per_policy": config.train.total_timesteps,
        "methods": methods,
        "reward_fit": metrics["extra"]["reward_fit"],
        "report": str(Path(config.out_dir) / "report.md"),
        "config": config.to_dict(),
        "passes": passes,
    }


def git_state() -> dict[str, Any]:
    """The commit the run used and the files that differed from it (others edit the tree while benchmarks run)."""

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=HERE.parent, capture_output=True, text=True, check=True).stdout.rstrip("\n")
        except (OSError, subprocess.CalledProcessError):
            return ""

    return {"commit": git("rev-parse", "HEAD") or None, "modified_files": git("status", "--porcelain", "--untracked-files=no").splitlines()}


def plot(envs: dict[str, dict[str, Any]], path: Path) -> Path:
    """Per env (rows) and group (columns): each method's mean true return (bar) and its seeds' means (dots)."""
    fig = Figure(figsize=(10, 3.6 * len(envs)), layout="constrained")
    axes = fig.subplots(len(envs), 2, squeeze=False)
    for row, (env_id, result) in zip(axes, envs.items()):
        methods = list(result["methods"])
        colors = method_colors(methods)
        for ax, group in zip(row, (result["majority"], result["minority"])):
            for x, method in enumerate(methods):
                cell = result["methods"][method]["groups"][group]
                ax.bar(x, cell["mean_return"], color=colors[method], alpha=0.8)
                ax.scatter([x] * len(cell["seed_mean_returns"]), cell["seed_mean_returns"], color="black", s=12, zorder=3)
                ax.annotate(f"wr {cell['win_rate_vs_rlhf']:.2f}", (x, cell["mean_return"]), ha="center", va="bottom", fontsize=8)
            ax.set_xticks(range(len(methods)), methods, rotation=15)
            ax.axhline(0.0, color="grey", linewidth=0.5)
            share = "majority" if group == result["majority"] else "minority"
            ax.set_title(f"{env_id}: {group} ({share}) true return", fontsize=10)
    fig.suptitle("bars: mean over seeds and episodes; dots: seed means; wr: win-rate vs rlhf over seed pairs", fontsize=9)
    return write_atomic(path, lambda handle: fig.savefig(handle, format="png", dpi=110))


def write(
    finished: dict[str, list[int]],
    quick: bool,
    wall: dict[str, float],
    git: dict[str, Any],
    elapsed: float,
    steps: int | None = None,
    planned: tuple[int, ...] = SEEDS,
    command: str = COMMAND,
) -> dict[str, Any]:
    """The JSON, plot and RESULTS.md line from the (env, seed) runs finished so far.

    :param finished: env id -> its finished seeds.
    :param quick: the ``--quick`` budget (``results/quick/``).
    :param wall: ``"<env id>/seed_<s>"`` -> wall seconds of that run (in its own process).
    :param git: :func:`git_state` at the start.
    :param elapsed: wall seconds since the benchmark started (this invocation; resumed stages cost ~0).
    :param steps: ``--steps`` (``None``: the configs' own budgets).
    :param planned: the seeds asked for; the acceptance needs at least 3, all finished.
    :param command: the command line, for RESULTS.md.
    """
    envs = {env_id: summarise_env(env_id, sorted(seeds), quick, steps) for env_id, seeds in finished.items() if seeds}
    complete = len(planned) >= 3 and all(sorted(finished.get(env_id, [])) == sorted(planned) for env_id in ENVS)
    result = {
        "envs": envs,
        "win_rate_definition": (
            "per group: every seed of the method vs every seed of rlhf, each seed summarised by its mean true return over its "
            "evaluation episodes; 1 if higher, 0.5 if equal, 0 if lower, averaged over the pairs"
        ),
        "acceptance": f"per env: maxmin minority win-rate >= {MINORITY_TARGET:.2f} and majority win-rate >= {MAJORITY_TARGET:.2f}",
        "wall_seconds_per_env_seed": wall,
        "wall_seconds_total": elapsed,
        "complete": complete,
        "passed": complete and all(all(env["passes"].values()) for env in envs.values()),
        "plot": f"results/{'quick/' if quick else ''}{NAME}.png",
        "git": git,
    }
    plot(envs, results_dir(quick) / f"{NAME}.png")
    summary = summary_line(envs, complete, command) + f"; wall {elapsed / 60:.0f} min"
    target = f"per env: minority win-rate >= {MINORITY_TARGET:.2f}, majority >= {MAJORITY_TARGET:.2f}"
    write_result(NAME, result, summary, target, quick=quick)
    return result


def summary_line(envs: dict[str, dict[str, Any]], complete: bool, command: str = COMMAND) -> str:
    """RESULTS.md's key numbers: the command, then per env its budget, MaxMin's win-rates and both groups' returns vs RLHF."""
    cells = []
    for env_id, env in envs.items():
        maxmin, rlhf = env["methods"]["maxmin"]["groups"], env["methods"]["rlhf"]["groups"]
        major, minor = env["majority"], env["minority"]
        cells.append(
            f"{env_id} ({len(env['seeds'])} seeds x {env['steps_per_policy']:,} steps): MaxMin win-rate over seed pairs {minor} "
            f"{maxmin[minor]['win_rate_vs_rlhf']:.2f}, {major} {maxmin[major]['win_rate_vs_rlhf']:.2f}; return MaxMin vs RLHF "
            f"{minor} {maxmin[minor]['mean_return']:.0f} vs {rlhf[minor]['mean_return']:.0f}, {major} "
            f"{maxmin[major]['mean_return']:.0f} vs {rlhf[major]['mean_return']:.0f}"
        )
    missing = [env_id for env_id in ENVS if env_id not in envs]
    partial = "" if complete else f" (partial: {'not run: ' + ', '.join(missing) if missing else 'fewer than 3 seeds per env'})"
    return f"`{command}`{partial}: " + "; ".join(cells)


def main() -> None:
    quick = f"{QUICK_STEPS} PPO steps per policy, {QUICK_COLLECT}, {QUICK_PPO}, 5 reward epochs, 2 evaluation episodes"
    parser = BenchmarkParser(__doc__.split("\n")[0], quick=quick, quick_defaults={"seeds": list(QUICK_SEEDS)})
    parser.add_argument("--jobs", type=int, default=1, help="(env, seed) runs at once, one process and one torch thread each")
    parser.add_argument("--envs", nargs="+", default=list(ENVS), choices=list(ENVS))
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS), help="the acceptance needs 3 or more")
    parser.add_argument("--steps", type=int, default=None, help="PPO steps per policy instead of the configs' own budgets")
    args = parser.parse_args()
    command = " ".join([".venv/bin/python -m benchmarks.mujoco", *sys.argv[1:]])
    finished: dict[str, list[int]] = {env_id: [] for env_id in args.envs}
    wall: dict[str, float] = {}
    result: dict[str, Any] = {}
    git = git_state()  # at the start: the code the runs import
    start = time.perf_counter()
    # Seeds interleaved across envs: a partial run has results for every env.
    jobs = [(env_id, seed) for seed in args.seeds for env_id in args.envs]
    calls = [(env_id, seed, args.quick, args.steps) for env_id, seed in jobs]
    for (env_id, seed, _, _), seconds in run_in_processes(run_seed, calls, args.jobs):
        wall[f"{env_id}/seed_{seed}"] = seconds
        finished[env_id].append(seed)
        print(f"finished {env_id} seed {seed} in {seconds:.0f} s", flush=True)
        elapsed = time.perf_counter() - start
        result = write(finished, args.quick, wall, git, elapsed, args.steps, tuple(args.seeds), command)
    print(json.dumps({env_id: env["passes"] for env_id, env in result["envs"].items()}, indent=2))


if __name__ == "__main__":
    main()
