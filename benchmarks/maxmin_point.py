"""Where the max-min point of ``benchmarks/mujoco.py``'s groups lies, and the majority win-rate it allows at most.

MaxMinPPO z-scores each group's reward with its mean and standard deviation over the preference
data's segments (uniformly random actions), then maximises the worst group's z-scored return. On
both bodies the two groups' true step rewards are linear in the forward speed ``v`` of a body
that stays healthy and goes forward:

- Hopper-v5: ``fast = v``, ``steady = 1 - v`` (``reward_survive - |v|``);
- HalfCheetah-v5: ``fast = v``, ``calm = reward_ctrl - v``, at most ``-v`` (no control cost).

So the two z-scored returns of an episode depend only on the distance it covers, ``sum_t v_t``,
and the max-min policy covers exactly the distance at which they are equal: ``T * u`` with
``z_fast(u) = z_minority(u)``, ``T = 1000`` steps. (Falling early or moving backwards lowers both
groups' returns, so neither helps; on HalfCheetah any control cost lowers ``calm`` and moves the
point to a slower ``u``, so ``T * u`` is an upper bound there.) This assumes the learned rewards are
affine in the true ones, which z-scoring then removes.

The majority's return at the max-min point, ``T * u``, is then compared with single-reward
RLHF's majority return on each of the committed seeds (``results/mujoco.json``, where the env
has been run): even the exact max-min policy wins a seed pair only against an RLHF seed slower
than it, which bounds the majority's win-rate over seed pairs from above. A bound below 0.40
means the acceptance line cannot be met by the max-min solution for these groups.

    .venv/bin/python -m benchmarks.maxmin_point

Writes ``benchmarks/results/maxmin_point.json`` and a line in ``benchmarks/RESULTS.md``.
``--quick``: 2,000 random steps instead of 50,000.
"""

from __future__ import annotations

import json
from typing import Any

import gymnasium as gym
import numpy as np

from benchmarks.common import HERE, BenchmarkParser, write_result
from benchmarks.mujoco import ENVS, MAJORITY_TARGET
from egalitarian_rl import envs
from egalitarian_rl.preferences.segments import Transitions

NAME = "maxmin_point"
EPISODE_STEPS = 1000
RANDOM_STEPS, QUICK_RANDOM_STEPS = 50_000, 2_000
#: The ``info`` entries the groups read, at a healthy step without control cost (``x_velocity`` is set per speed).
HEALTHY_STEP = {"x_velocity": 0.0, "reward_survive": 1.0, "reward_ctrl": 0.0}
INFO_KEYS = tuple(HEALTHY_STEP)


def _group_rewards(env_id: str, infos: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The majority's and minority's true step rewards (the library's own group functions, ``envs/mujoco.py``) on ``infos``."""
    _, majority, minority = ENVS[env_id]
    library = envs.group_library(env_id)
    n = len(infos["x_velocity"])
    steps = Transitions(np.zeros((n, 1)), np.zeros((n, 1)), np.zeros((n, 1)), infos)  # these groups read infos only
    return {
        role: np.asarray(library.rewards[name](steps), dtype=np.float64) for role, name in (("majority", majority), ("minority", minority))
    }


def random_action_rewards(env_id: str, n_steps: int, seed: int = 0) -> dict[str, np.ndarray]:
    """The two groups' true step rewards under uniformly random actions (as the preference segments are recorded)."""
    env = gym.make(env_id)
    env.action_space.seed(seed)
    env.reset(seed=seed)
    infos: dict[str, list[float]] = {key: [] for key in INFO_KEYS}
    for _ in range(n_steps):
        _, _, terminated, truncated, info = env.step(env.action_space.sample())
        for key in INFO_KEYS:
            infos[key].append(info.get(key, HEALTHY_STEP[key]))  # HalfCheetah has no survival bonus
        if terminated or truncated:
            env.reset()
    env.close()
    return _group_rewards(env_id, {key: np.asarray(values) for key, values in infos.items()})


def equalising_speed(env_id: str, rewards: dict[str, np.ndarray]) -> float:
    """The forward speed ``u >= 0`` at which the groups' z-scored step rewards are equal (the max-min point).

    Each group's step reward for a healthy body at speed ``u`` without control cost is a line in ``u``, read
    off its reward function at ``u = 0`` and ``u = 1``; ``rewards`` gives the z-scores' means and stds.
    """
    at = {
        u: _group_rewards(env_id, {**{k: np.array([v]) for k, v in HEALTHY_STEP.items()}, "x_velocity": np.array([u])}) for u in (0.0, 1.0)
    }
    intercept = {role: at[0.0][role][0] for role in rewards}
    slope = {role: at[1.0][role][0] - intercept[role] for role in rewards}
    mean, std = {role: r.mean() for role, r in rewards.items()}, {role: r.std() for role, r in rewards.items()}
    # (a_maj + b_maj u - m_maj) / s_maj = (a_min + b_min u - m_min) / s_min, solved for u
    gap = (intercept["minority"] - mean["minority"]) / std["minority"] - (intercept["majority"] - mean["majority"]) / std["majority"]
    speed = gap / (slope["majority"] / std["majority"] - slope["minority"] / std["minority"])
    return max(float(speed), 0.0)


def rlhf_majority_returns(env_id: str) -> list[float] | None:
    """Single-reward RLHF's majority return per seed in the committed ``results/mujoco.json`` (None: env not run)."""
    path = HERE / "results" / "mujoco.json"
    if not path.exists():
        return None
    env = json.loads(path.read_text())["envs"].get(env_id)
    return None if env is None else env["methods"]["rlhf"]["groups"][env["majority"]]["seed_mean_returns"]


def analyse(env_id: str, n_steps: int) -> dict[str, Any]:
    _, majority, minority = ENVS[env_id]
    rewards = random_action_rewards(env_id, n_steps)
    speed = equalising_speed(env_id, rewards)
    majority_return = EPISODE_STEPS * speed
    row: dict[str, Any] = {
        "groups": {"majority": majority, "minority": minority},
        "random_action_stats": {g: {"mean": float(r.mean()), "std": float(r.std())} for g, r in rewards.items()},
        "equalising_speed": speed,
        "majority_return_at_maxmin_point": majority_return,
    }
    rlhf = rlhf_majority_returns(env_id)
    if rlhf is not None:
        wins = [1.0 if majority_return > r else 0.5 if majority_return == r else 0.0 for r in rlhf]
        row |= {"rlhf_majority_returns": rlhf, "majority_win_rate_bound": float(np.mean(wins))}
    return row


def main() -> None:
    parser = BenchmarkParser(__doc__.split("\n")[0], quick=f"{QUICK_RANDOM_STEPS} random steps per env")
    args = parser.parse_args()
    n_steps = QUICK_RANDOM_STEPS if args.quick else RANDOM_STEPS
    envs = {env_id: analyse(env_id, n_steps) for env_id in ENVS}
    bounds = [row["majority_win_rate_bound"] for row in envs.values() if "majority_win_rate_bound" in row]
    result = {
        "envs": envs,
        "random_steps": n_steps,
        "episode_steps": EPISODE_STEPS,
        "passed": bool(bounds) and min(bounds) >= MAJORITY_TARGET,
    }
    cells = []
    for env_id, row in envs.items():
        cell = (
            f"{env_id} {row['groups']['majority']}/{row['groups']['minority']}: max-min at {row['equalising_speed']:.3f} m/s, "
            f"majority return {row['majority_return_at_maxmin_point']:.0f}"
        )
        if "rlhf_majority_returns" in row:
            rlhf = ", ".join(f"{r:.0f}" for r in row["rlhf_majority_returns"])
            cell += f" vs RLHF seeds {rlhf}: majority win-rate at most {row['majority_win_rate_bound']:.2f}"
        cells.append(cell)
    summary = "; ".join(cells) + f" (`python -m benchmarks.maxmin_point{' --quick' if args.quick else ''}`)"
    write_result(
        NAME, result, summary, f"majority win-rate bound >= {MAJORITY_TARGET:.2f} (else the mujoco line is out of reach)", quick=args.quick
    )
    print(json.dumps(envs, indent=2))


if __name__ == "__main__":
    main()
