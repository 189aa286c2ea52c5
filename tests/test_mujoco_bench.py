"""``benchmarks/mujoco.py`` end to end at a toy budget: the JSON's shape, seed-pair win-rates and the plot."""

import json

import numpy as np
import pytest

from benchmarks import common, mujoco
from egalitarian_rl.evaluation import win_rate_over_seeds


@pytest.fixture
def tiny(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # runs/quick/bench_mujoco/... lands here
    monkeypatch.setattr(common, "HERE", tmp_path)  # results/quick/ under tmp_path, never the repo's
    monkeypatch.setattr(mujoco, "SEEDS", (0, 1))
    monkeypatch.setattr(mujoco, "QUICK_STEPS", 64)
    monkeypatch.setattr(mujoco, "QUICK_COLLECT", {"n_users": 6, "comparisons_per_user": 4})
    monkeypatch.setattr(mujoco, "QUICK_PPO", {"n_steps": 16, "batch_size": 32, "n_epochs": 1})
    return tmp_path


def test_quick_run_writes_the_issue_shape(tiny):
    env_id = "Hopper-v5"
    for seed in (0, 1):
        assert mujoco.run_seed(env_id, seed, quick=True) > 0
    result = mujoco.write({env_id: [0, 1]}, quick=True, wall={}, git={"commit": None, "modified_files": []}, elapsed=1.0)
    saved = json.loads((tiny / "results" / "quick" / "mujoco.json").read_text())
    assert saved["quick"] is True and "| mujoco |" in (tiny / "results" / "quick" / "RESULTS.md").read_text()
    assert saved["envs"].keys() == {env_id} and saved["complete"] is False  # HalfCheetah did not run
    env = saved["envs"][env_id]
    assert env["majority"] == "fast" and env["minority"] == "steady" and env["seeds"] == [0, 1]
    assert set(env["methods"]) == {"rlhf", "maxmin", "oracle_fast", "oracle_steady"}
    for method in env["methods"].values():
        for group in ("fast", "steady"):
            assert {"mean_return", "std_return", "win_rate_vs_rlhf"} <= set(method["groups"][group])
    assert env["methods"]["rlhf"]["groups"]["steady"]["win_rate_vs_rlhf"] == 0.5
    # Every maxmin seed against every rlhf seed, each seed by its mean return.
    maxmin, rlhf = env["methods"]["maxmin"]["groups"]["steady"], env["methods"]["rlhf"]["groups"]["steady"]
    pairs = [1.0 if a > b else 0.5 if a == b else 0.0 for a in maxmin["seed_mean_returns"] for b in rlhf["seed_mean_returns"]]
    assert maxmin["win_rate_vs_rlhf"] == pytest.approx(np.mean(pairs))
    assert maxmin["win_rate_vs_rlhf"] == win_rate_over_seeds(maxmin["seed_mean_returns"], rlhf["seed_mean_returns"], paired=False)
    assert env["config"]["train"]["normalize_obs"] is True and env["steps_per_policy"] == 64
    assert (tiny / "results" / "quick" / "mujoco.png").stat().st_size > 1000
    assert result["passed"] is False  # incomplete runs never pass
    line = mujoco.summary_line(result["envs"], complete=False)
    assert line.startswith(f"`{mujoco.COMMAND}` (partial: not run: HalfCheetah-v5): Hopper-v5 (2 seeds x 64 steps)")
    assert "steady" in line
