"""The impossibility sweep: its CI, its mixed rewards and one tiny end-to-end point."""

from __future__ import annotations

import json
import math
import pickle
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from egalitarian_rl.envs.gridworld import CELL_VALUES, GROUPS
from egalitarian_rl.envs.mujoco import cheetah_calm, cheetah_fast

from benchmarks import common, impossibility, impossibility_rewards
from benchmarks.impossibility import ROW_KEYS, ci95, t_quantile_975
from egalitarian_rl.preferences.segments import Transitions


def test_ci95_from_known_seed_values() -> None:
    # 5 seeds: mean 3, sd (ddof 1) sqrt(2.5), t(0.975, 4) = 2.776.
    mean, half = ci95([1.0, 2.0, 3.0, 4.0, 5.0])
    assert mean == pytest.approx(3.0)
    assert half == pytest.approx(2.776 * math.sqrt(2.5) / math.sqrt(5))
    # 2 seeds: t(0.975, 1) = 12.706, sd = |a - b| / sqrt(2).
    mean, half = ci95([10.0, 12.0])
    assert (mean, half) == (pytest.approx(11.0), pytest.approx(12.706 * math.sqrt(2) / math.sqrt(2)))
    assert ci95([7.0]) == (7.0, None)  # one seed: no spread to estimate
    assert ci95([4.0, 4.0, 4.0])[1] == 0.0


def test_t_table_matches_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    for df in range(1, 31):
        assert t_quantile_975(df) == pytest.approx(stats.t.ppf(0.975, df), abs=6e-4)
    assert t_quantile_975(100) >= stats.t.ppf(0.975, 100)  # beyond the table: conservative


def _fairgrid_transitions(rng: np.random.Generator, shape: tuple[int, ...]) -> Transitions:
    cells = rng.integers(25, size=shape)
    one_hot = np.eye(25, dtype=np.float32)[cells]
    return Transitions(obs=one_hot, acts=rng.integers(5, size=shape), next_obs=one_hot, infos={})


def test_mixed_reward_is_the_formula() -> None:
    rng = np.random.default_rng(0)
    for d in (Fraction(1, 3), Fraction(2, 3), Fraction(1)):
        reward = getattr(impossibility_rewards, f"fairgrid_minority_d{d.numerator}_{d.denominator}")
        t = _fairgrid_transitions(rng, (4, 10))  # any leading shape
        expected = (1 - float(d)) * GROUPS.rewards["majority"](t) + float(d) * GROUPS.rewards["minority"](t)
        np.testing.assert_allclose(reward(t), expected)
        # On the grid: the compromise C is worth 0.8 - 0.2 d to the minority.
        np.testing.assert_allclose((1 - float(d)) * CELL_VALUES["majority"] + float(d) * CELL_VALUES["minority"], reward.__call__(
            Transitions(obs=np.eye(25), acts=np.zeros(25), next_obs=np.eye(25), infos={})))  # fmt: skip
        assert pickle.loads(pickle.dumps(reward)) is reward  # subprocesses get the same reward by name
    infos = {"x_velocity": rng.normal(size=7), "reward_ctrl": -rng.random(7)}
    t = Transitions(obs=np.zeros((7, 17)), acts=np.zeros((7, 6)), next_obs=np.zeros((7, 17)), infos=infos)
    np.testing.assert_allclose(impossibility_rewards.halfcheetah_minority_d2_3(t), cheetah_fast(t) / 3 + 2 * cheetah_calm(t) / 3)
    with pytest.raises(AttributeError, match="lowest terms"):
        impossibility_rewards.fairgrid_minority_d2_6  # noqa: B018
    with pytest.raises(AttributeError):
        impossibility_rewards.nowhere_minority_d1_2  # noqa: B018


def test_tiny_sweep_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One share, one distance, 2 seeds, 256 PPO steps, fewer users and epochs: rows, CI and passes as documented."""
    original = impossibility.point_config

    def small(*args, **kwargs):  # same arguments as point_config
        config = original(*args, **kwargs)
        config.collect.n_users, config.collect.comparisons_per_user = 20, 10
        config.reward.epochs, config.reward.em = 3, {"max_iter": 2, "m_step_epochs": 2, "final_epochs": 2}
        config.evaluate.n_episodes = 3
        config.train.ppo = {**config.train.ppo, "n_steps": 32, "batch_size": 64, "n_epochs": 1}
        return config

    monkeypatch.setattr(impossibility, "point_config", small)  # --jobs 1 runs in this process, so this applies
    monkeypatch.setattr(common, "HERE", tmp_path)  # results/ under tmp_path, never the repo's
    argv = ["--quick", "--shares", "0.2", "--distances", "1", "--seeds", "0", "1", "--timesteps", "256", "--root", str(tmp_path / "runs")]
    result = impossibility.main(argv)
    written = json.loads((tmp_path / "results" / "quick" / "impossibility.json").read_text())
    assert (tmp_path / "results" / "quick" / "impossibility.png").exists()
    assert written["rows"] == result["rows"] and written["complete"]
    assert len(written["rows"]) == 4  # (rlhf, maxmin) x (majority, minority)
    for row in written["rows"]:
        assert set(ROW_KEYS) <= set(row)
        assert (row["domain"], row["minority_share"], row["distance"]) == ("fairgrid", 0.2, 1.0)
        mean, half = ci95(row["seed_means"])
        assert (row["mean_return"], row["ci95"]) == (pytest.approx(mean), pytest.approx(half))
    # The seed means are the pipeline's saved evaluation returns, averaged over episodes.
    saved = np.load(tmp_path / "runs" / "fairgrid" / "share0.2_d1_1" / "seed_1" / "returns" / "maxmin.npy")
    assert saved.shape == (3, 2)
    row = next(r for r in written["rows"] if (r["method"], r["group"]) == ("maxmin", "minority"))
    assert row["seed_means"][1] == pytest.approx(saved[:, 1].mean())
    assert set(written["passes"]) >= {"fairgrid/worst_group_maxmin>=rlhf", "fairgrid/rlhf_minority_falls_with_share"}
    assert written["passes"]["fairgrid/rlhf_minority_falls_with_share"] is None  # one share: nothing to compare
    assert len(written["points"][0]["em_ari"]) == 2


def test_reacher_groups_read_the_fingertip_and_mix() -> None:
    """The Reacher groups' fingertip is the simulator's; each group's reward is 0 at its goal; d mixes them."""
    import gymnasium as gym
    from egalitarian_rl.envs.mujoco import NORTH_GOAL, SOUTH_GOAL, reacher_north, reacher_south

    env = gym.make("Reacher-v5")
    obs, _ = env.reset(seed=3)
    tips, next_obs = [], []
    for _ in range(20):
        obs, *_ = env.step(env.action_space.sample())
        next_obs.append(obs)
        tips.append(env.unwrapped.get_body_com("fingertip")[:2].copy())
    next_obs, tips = np.array(next_obs), np.array(tips)
    t = Transitions(obs=next_obs, acts=np.zeros((20, 2)), next_obs=next_obs, infos={})
    np.testing.assert_allclose(-reacher_north(t), np.linalg.norm(tips - np.array(NORTH_GOAL), axis=1), atol=1e-6)
    np.testing.assert_allclose(-reacher_south(t), np.linalg.norm(tips - np.array(SOUTH_GOAL), axis=1), atol=1e-6)
    # A fingertip exactly at the north goal (the target at the origin, so obs[8:10] is the tip itself).
    at_north = np.zeros((1, 10))
    at_north[0, 8:10] = NORTH_GOAL
    t = Transitions(obs=at_north, acts=np.zeros((1, 2)), next_obs=at_north, infos={})
    assert reacher_north(t)[0] == 0.0 and reacher_south(t)[0] == pytest.approx(-0.3)
    assert impossibility_rewards.reacher_minority_d1_3(t)[0] == pytest.approx(-0.1)  # (1/3) * 0.3 m


def test_a_run_keeps_the_other_domains_stored_points(tmp_path: Path) -> None:
    """Running one domain keeps another complete domain's points (with their own command); partial ones are dropped."""
    point = {"domain": "fairgrid", "minority_share": 0.2, "distance": 1.0, "seeds": [0, 1]}
    row = {"domain": "fairgrid", "minority_share": 0.2, "distance": 1.0, "method": "rlhf", "group": "minority"}
    stored = {"command": "old command", "complete": True, "grid": {"domains": ["fairgrid"]}, "points": [point], "rows": [row]}
    path = tmp_path / "impossibility.json"
    path.write_text(json.dumps(stored))
    kept = impossibility.stored_points(path, exclude=["reacher"])
    assert kept == [{"command": "old command", **point, "rows": [row]}]
    assert impossibility.stored_points(path, exclude=["fairgrid"]) == []
    path.write_text(json.dumps({**stored, "complete": False, "complete_domains": []}))
    assert impossibility.stored_points(path, exclude=["reacher"]) == []
    assert impossibility.stored_points(tmp_path / "missing.json", exclude=[]) == []
