"""Evaluation: win-rates, metrics.json's shape, true group returns on FairGrid, the report."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch
from egalitarian_rl.envs.gridworld import COMPROMISE, MAJORITY_GOAL, MAX_STEPS, SIZE, START

from egalitarian_rl import envs
from egalitarian_rl.evaluation import (
    build_metrics,
    evaluate_group_returns,
    format_group_table,
    plot_learning_curves,
    save_json_atomic,
    shifted_ratio,
    verdict,
    win_rate,
    win_rate_over_seeds,
    write_report,
)
from egalitarian_rl.preferences import MultiUserPreferenceWrapper

torch.set_num_threads(1)

GROUPS = ["majority", "minority"]


# ---------------------------------------------------------------- helpers
class ScriptedPolicy:
    """Walks from S to ``goal`` on FairGrid, then stays; works on one obs or a batch."""

    def __init__(self, goal: tuple[int, int]) -> None:
        self.goal = np.array(goal)

    def predict(self, observation: Any, state: Any = None, episode_start: Any = None, deterministic: bool = False):
        obs = np.asarray(observation)
        cells = obs.reshape(-1, SIZE * SIZE).argmax(axis=1)
        actions = np.array([self._action(divmod(int(c), SIZE)) for c in cells])
        return (actions if obs.ndim == 2 else actions[0]), None

    def _action(self, position: tuple[int, int]) -> int:
        row, col = position
        if col > self.goal[1]:
            return 2  # left
        if col < self.goal[1]:
            return 3  # right
        if row > self.goal[0]:
            return 0  # up
        if row < self.goal[0]:
            return 1  # down
        return 4  # stay


def fairgrid(**kwargs: Any) -> gym.Env:
    env = gym.make(envs.FAIRGRID_ID, **kwargs)
    return MultiUserPreferenceWrapper(env, envs.make_population(envs.FAIRGRID_ID, {"majority": 0.8, "minority": 0.2}))


def steps_to(goal: tuple[int, int]) -> int:
    return abs(goal[0] - START[0]) + abs(goal[1] - START[1])


def sample_returns() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "rlhf": np.column_stack([rng.normal(28, 1, 20), rng.normal(0.5, 0.5, 20).clip(0)]),
        "maxmin": np.column_stack([rng.normal(22, 1, 20), rng.normal(17, 1, 20)]),
        "mean": np.column_stack([rng.normal(27, 1, 15), rng.normal(1, 1, 15).clip(0)]),
    }


# ---------------------------------------------------------------- win-rate
def test_win_rate_counts_ties_half() -> None:
    assert win_rate([1.0, 2.0, 3.0], [2.0]) == 0.5  # lose, tie, win
    assert win_rate([3.0, 3.0], [1.0, 2.0, 3.0, 4.0]) == pytest.approx(5 / 8)  # per a: 2 wins + 1 tie of 4
    assert win_rate([5.0], [1.0, 2.0]) == 1.0
    assert win_rate([0.0], [1.0, 2.0]) == 0.0


def test_win_rate_identical_and_symmetric() -> None:
    rng = np.random.default_rng(1)
    a = rng.integers(0, 5, 37).astype(float)  # many ties
    b = rng.integers(0, 5, 23).astype(float)
    assert win_rate(a, a) == 0.5
    assert win_rate(a, b) + win_rate(b, a) == pytest.approx(1.0)
    brute = np.mean((a[:, None] > b[None, :]) + 0.5 * (a[:, None] == b[None, :]))
    assert win_rate(a, b) == pytest.approx(brute)


@pytest.mark.parametrize("bad", [[], [1.0, math.nan], [[1.0, 2.0]]])
def test_win_rate_rejects_bad_input(bad: Any) -> None:
    with pytest.raises(ValueError, match="returns_a"):
        win_rate(bad, [1.0])


def test_win_rate_over_seeds() -> None:
    a = [np.array([3.0, 5.0]), np.array([1.0]), np.array([2.0, 2.0])]  # seed means 4, 1, 2
    b = np.array([3.0, 1.0, 5.0])
    assert win_rate_over_seeds(a, b) == pytest.approx((1 + 0.5 + 0) / 3)
    assert win_rate_over_seeds(a, b, paired=False) == pytest.approx(win_rate([4.0, 1.0, 2.0], b))
    assert win_rate_over_seeds(np.array([[1.0, 3.0], [0.0, 0.0]]), [2.0, 1.0]) == 0.25
    with pytest.raises(ValueError, match="as many seeds"):
        win_rate_over_seeds([1.0, 2.0], [1.0])


def test_shifted_ratio() -> None:
    assert shifted_ratio(28.0, 14.0, 0.0) == 2.0
    assert shifted_ratio(-50.0, -100.0, -200.0) == pytest.approx(1.5)  # counted from the floor, not from 0
    assert shifted_ratio(0.0, 0.0, 0.0) == 1.0  # both at the floor
    assert shifted_ratio(5.0, 0.0, 0.0) == math.inf
    with pytest.raises(ValueError, match="below the lowest possible return"):
        shifted_ratio(-1.0, 2.0, 0.0)
    with pytest.raises(ValueError, match="finite"):
        shifted_ratio(math.nan, 2.0, 0.0)


# ---------------------------------------------------------------- metrics
def test_build_metrics_shape_and_json() -> None:
    returns = sample_returns()
    metrics = build_metrics(returns, GROUPS, baseline="rlhf", extra={"seed": np.int64(3), "timing": np.float32(1.5)})
    assert list(metrics) == ["groups", "baseline", "methods", "extra"]
    assert metrics["groups"] == GROUPS and metrics["baseline"] == "rlhf"
    assert list(metrics["methods"]) == ["rlhf", "maxmin", "mean"]
    for method, entry in metrics["methods"].items():
        assert set(entry) == {"groups", "worst_group", "worst_group_return", "average_group_return", "n_episodes", "n_seeds"}
        assert list(entry["groups"]) == GROUPS
        for group, stats in entry["groups"].items():
            assert set(stats) == {"mean_return", "std_return", "win_rate_vs_rlhf"}
            assert all(type(v) is float for v in stats.values())
            k = GROUPS.index(group)
            assert stats["mean_return"] == pytest.approx(returns[method][:, k].mean())
            assert stats["std_return"] == pytest.approx(returns[method][:, k].std(ddof=1))
            assert stats["win_rate_vs_rlhf"] == pytest.approx(win_rate(returns[method][:, k], returns["rlhf"][:, k]))
        means = returns[method].mean(axis=0)
        assert entry["worst_group"] == GROUPS[int(np.argmin(means))]
        assert entry["worst_group_return"] == pytest.approx(means.min())
        assert entry["n_episodes"] == len(returns[method]) and entry["n_seeds"] == 1
    assert metrics["methods"]["rlhf"]["groups"]["minority"]["win_rate_vs_rlhf"] == 0.5
    assert metrics["extra"] == {"seed": 3, "timing": 1.5}
    assert json.loads(json.dumps(metrics, allow_nan=False)) == metrics


def test_build_metrics_ratio_baseline_name_and_seeds() -> None:
    rlhf = np.tile([28.0, 0.0], (4, 1))
    maxmin = np.tile([22.4, 16.8], (4, 1))
    metrics = build_metrics({"rlhf": rlhf, "maxmin": maxmin}, GROUPS, min_episode_return=0.0)
    assert metrics["min_episode_return"] == 0.0
    maxmin_groups = metrics["methods"]["maxmin"]["groups"]
    assert maxmin_groups["majority"]["ratio_vs_rlhf"] == pytest.approx(0.8)
    assert maxmin_groups["minority"]["ratio_vs_rlhf"] is None  # unbounded: rlhf at the floor; strict JSON has no inf
    assert metrics["methods"]["rlhf"]["groups"]["minority"]["ratio_vs_rlhf"] == 1.0
    json.dumps(metrics, allow_nan=False)

    # Another baseline name gives other keys; per-seed lists add seed win-rates.
    seeds = {"single": [rlhf, rlhf + 1.0, rlhf], "maxmin": [maxmin, maxmin, maxmin[:2]]}
    metrics = build_metrics(seeds, GROUPS, baseline="single")
    assert set(metrics["methods"]["maxmin"]["groups"]["minority"]) == {
        "mean_return",
        "std_return",
        "win_rate_vs_single",
        "seed_win_rate_vs_single",
    }
    assert metrics["methods"]["maxmin"]["groups"]["minority"]["seed_win_rate_vs_single"] == 1.0
    assert metrics["methods"]["maxmin"]["groups"]["majority"]["seed_win_rate_vs_single"] == 0.0
    assert metrics["methods"]["single"]["groups"]["majority"]["win_rate_vs_single"] == 0.5
    assert metrics["methods"]["maxmin"]["n_seeds"] == 3 and metrics["methods"]["maxmin"]["n_episodes"] == 10


@pytest.mark.parametrize(
    ("returns", "message"),
    [
        ({}, "returns is empty"),
        ({"maxmin": np.zeros((3, 2))}, "baseline method 'rlhf' is missing"),
        ({"rlhf": np.zeros((3, 2)), "maxmin": np.zeros((3, 3))}, r"returns\['maxmin'\] has shape \(3, 3\).*K = len\(group_names\) = 2"),
        ({"rlhf": np.zeros(3)}, r"returns\['rlhf'\] has shape \(3,\)"),
        ({"rlhf": np.zeros((0, 2))}, "has no episodes"),
        ({"rlhf": np.array([[1.0, math.nan]])}, "NaN"),
        ({"rlhf": np.array([[1.0, -1.0]])}, "below min_episode_return"),
    ],
)
def test_build_metrics_rejects_bad_input(returns: dict[str, np.ndarray], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_metrics(returns, GROUPS, min_episode_return=0.0)


def test_build_metrics_rejects_bad_group_names() -> None:
    with pytest.raises(ValueError, match="unique"):
        build_metrics({"rlhf": np.zeros((2, 2))}, ["a", "a"])
    with pytest.raises(ValueError, match="group_names is empty"):
        build_metrics({"rlhf": np.zeros((2, 0))}, [])


def test_format_group_table() -> None:
    metrics = build_metrics(sample_returns(), GROUPS)
    table = format_group_table(metrics)
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["method", "majority", "minority"]
    assert lines[2].startswith("rlhf (baseline)") and "wr 0.50" in lines[2]
    assert lines[3].startswith("maxmin") and lines[4].startswith("mean")
    assert len({len(line) for line in lines[:5]}) == 1  # fixed width


# ---------------------------------------------------------------- rollouts
def test_evaluate_group_returns_fairgrid_exact() -> None:
    steps_in_goal = MAX_STEPS - steps_to(MAJORITY_GOAL) + 1  # rewarded for every step that ends in the goal
    assert steps_in_goal == 28
    returns = evaluate_group_returns(ScriptedPolicy(MAJORITY_GOAL), fairgrid(), n_episodes=3, seed=0)
    assert returns.shape == (3, 2) and returns.dtype == np.float64
    np.testing.assert_array_equal(returns, np.tile([28.0, 0.0], (3, 1)))

    compromise = evaluate_group_returns(ScriptedPolicy(COMPROMISE), fairgrid(), n_episodes=2, seed=0)
    in_goal = MAX_STEPS - steps_to(COMPROMISE) + 1
    np.testing.assert_allclose(compromise, np.tile([0.8 * in_goal, 0.6 * in_goal], (2, 1)))


def test_evaluate_group_returns_seeding() -> None:
    policy = ScriptedPolicy(COMPROMISE)
    env = fairgrid(random_start=True)
    first = evaluate_group_returns(policy, env, n_episodes=4, seed=10)
    assert len(np.unique(first, axis=0)) > 1  # random starts: different returns
    np.testing.assert_array_equal(first, evaluate_group_returns(policy, env, n_episodes=4, seed=10, progress_bar=True))
    np.testing.assert_array_equal(first[2:3], evaluate_group_returns(policy, env, n_episodes=1, seed=12))  # episode i: seed + i


def test_evaluate_group_returns_vec_env() -> None:
    from stable_baselines3.common.vec_env import DummyVecEnv

    vec_env = DummyVecEnv([fairgrid, fairgrid])
    returns = evaluate_group_returns(ScriptedPolicy(MAJORITY_GOAL), vec_env, n_episodes=3, seed=0)
    np.testing.assert_array_equal(returns, np.tile([28.0, 0.0], (3, 1)))

    with pytest.raises(ValueError, match="MultiUserPreferenceWrapper"):
        evaluate_group_returns(ScriptedPolicy(MAJORITY_GOAL), DummyVecEnv([lambda: gym.make(envs.FAIRGRID_ID)]), 1)


def test_evaluate_group_returns_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="MultiUserPreferenceWrapper"):
        evaluate_group_returns(ScriptedPolicy(MAJORITY_GOAL), gym.make(envs.FAIRGRID_ID), n_episodes=1)
    with pytest.raises(ValueError, match="n_episodes"):
        evaluate_group_returns(ScriptedPolicy(MAJORITY_GOAL), fairgrid(), n_episodes=0)


# ---------------------------------------------------------------- report
def test_write_report(tmp_path: Path) -> None:
    returns = {"rlhf": np.tile([28.0, 0.0], (5, 1)), "maxmin": np.tile([22.4, 16.8], (5, 1))}
    metrics = build_metrics(returns, GROUPS, min_episode_return=0.0, extra={"group_shares": {"majority": 0.8, "minority": 0.2}})
    steps = np.array([0, 1000, 2000])
    curves = {
        "rlhf": {"majority": (steps, [[0, 10, 28], [0, 12, 27]]), "minority": (steps, [0, 0, 0])},
        "maxmin": {"majority": (steps, [0, 5, 22]), "minority": (steps, [0, 5, 17])},
    }
    out = tmp_path / "report"
    path = write_report(metrics, out, curves=curves, config={"env_id": envs.FAIRGRID_ID, "seeds": (0, 1, 2)})
    assert path == out / "report.md"
    names = {"metrics.json", "report.md", "group_returns.png", "win_rates.png", "learning_curves.png"}
    assert {p.name for p in out.iterdir()} == names  # no temporary files left behind
    for png in names - {"metrics.json", "report.md"}:
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "metrics.json").read_text()) == metrics
    report = path.read_text()
    for png in ("group_returns.png", "win_rates.png", "learning_curves.png"):
        assert f"]({png})" in report
    assert "## Verdict" in report and "raised" in report and "kept its return" in report
    assert "| `maxmin` |" in report and envs.FAIRGRID_ID in report

    # Without curves: no learning-curve plot and no link to one; single-series curves also plot.
    other = write_report(metrics, tmp_path / "plain", curves={})
    assert "learning_curves.png" not in other.read_text() and not (tmp_path / "plain" / "learning_curves.png").exists()
    plot_learning_curves({"rlhf": (steps, [0, 10, 28]), "maxmin": (steps, [0, 8, 22])}, tmp_path / "single.png")
    assert (tmp_path / "single.png").stat().st_size > 0


def test_verdict_flags_a_costly_or_useless_method() -> None:
    returns = {"rlhf": np.tile([28.0, 0.0], (3, 1)), "maxmin": np.tile([0.0, 28.0], (3, 1))}
    text = verdict(build_metrics(returns, GROUPS, min_episode_return=0.0))
    assert "did not keep" in text and "at a real cost to the majority" in text
    returns["maxmin"] = returns["rlhf"]
    assert "In short: no" in verdict(build_metrics(returns, GROUPS))
    assert "nothing to compare" in verdict(build_metrics({"rlhf": returns["rlhf"]}, GROUPS))


def test_bad_report_and_plot_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no 'methods' entry"):
        write_report({"groups": GROUPS, "baseline": "rlhf"}, tmp_path)
    metrics = build_metrics({"rlhf": np.zeros((2, 2))}, GROUPS)
    with pytest.raises(ValueError, match="method 'maxmin' is not in metrics"):
        write_report(metrics, tmp_path, method="maxmin")
    with pytest.raises(ValueError, match="empty"):
        plot_learning_curves({}, tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"steps \(3,\) and values \(2,\)"):
        plot_learning_curves({"rlhf": ([0, 1, 2], [0, 1])}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="mixes"):
        plot_learning_curves({"rlhf": ([0, 1], [0, 1]), "maxmin": {"a": ([0, 1], [0, 1])}}, tmp_path / "x.png")


def test_save_json_atomic(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "m.json"
    save_json_atomic({"a": np.float32(0.5), "b": np.arange(3), "c": np.int64(2)}, path)
    assert json.loads(path.read_text()) == {"a": 0.5, "b": [0, 1, 2], "c": 2}
    with pytest.raises(ValueError):
        save_json_atomic({"a": math.nan}, path)
    assert json.loads(path.read_text())["c"] == 2  # the old file survives a failed write
    assert [p.name for p in path.parent.iterdir()] == ["m.json"]


def test_evaluate_group_returns_sb3_model() -> None:
    from stable_baselines3 import PPO
    from stable_baselines3.common.vec_env import DummyVecEnv

    model = PPO("MlpPolicy", fairgrid(), n_steps=64, seed=0, device="cpu")  # untrained: any SB3 predict() works
    returns = evaluate_group_returns(model, fairgrid(), n_episodes=2, seed=0)
    assert returns.shape == (2, 2) and np.all((returns >= 0) & (returns <= MAX_STEPS))
    np.testing.assert_array_equal(returns, evaluate_group_returns(model, fairgrid(), n_episodes=2, seed=0))
    vec_returns = evaluate_group_returns(model, DummyVecEnv([fairgrid, fairgrid]), n_episodes=2, seed=0, deterministic=False)
    assert vec_returns.shape == (2, 2)
