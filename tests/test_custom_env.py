"""A user's own env and groups from the config: Pendulum-v1 with three groups the package does not ship."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from egalitarian_rl.cli import main
from egalitarian_rl.experiments import ConfigError, ExperimentConfig, Pipeline

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _config(tmp_path, **changes):
    config = yaml.safe_load((EXAMPLES / "pendulum.yaml").read_text())
    config.update(
        out_dir=str(tmp_path / "run"),
        methods=["rlhf", "maxmin", "oracle"],
        collect={"n_users": 12, "comparisons_per_user": 6, "segment_length": 10},
        reward={"n_members": 3, "hidden_sizes": [16], "epochs": 3, "em": {"max_iter": 3, "final_epochs": 2}},
        train={"total_timesteps": 512, "n_envs": 2, "ppo": {"n_steps": 128, "batch_size": 64, "n_epochs": 2}},
        evaluate={"n_episodes": 2},
    )
    config.update(changes)
    path = tmp_path / "pendulum.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    shutil.copy(EXAMPLES / "pendulum_groups.py", tmp_path / "pendulum_groups.py")  # found next to the config
    return path


@pytest.mark.slow
def test_the_whole_pipeline_runs_on_a_user_env_with_user_groups(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    path = _config(tmp_path)
    assert main(["run", str(path), "--no-progress"]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["groups"] == ["upright", "still", "gentle"]
    assert set(metrics["methods"]) == {"rlhf", "maxmin", "oracle_upright", "oracle_still", "oracle_gentle"}
    for entry in metrics["methods"].values():
        for group in metrics["groups"]:
            assert math.isfinite(entry["groups"][group]["mean_return"])
            assert "normalized_score" in entry["groups"][group]
    assert (tmp_path / "run" / "report.md").exists()
    data = np.load(tmp_path / "run" / "seed_0" / "preferences.npz", allow_pickle=False)
    assert data is not None
    # a second run reuses everything
    policy = tmp_path / "run" / "seed_0" / "policies" / "maxmin.zip"
    stamp = policy.stat().st_mtime_ns
    capsys.readouterr()
    assert main(["run", str(path), "--no-progress"]) == 0
    assert policy.stat().st_mtime_ns == stamp
    assert "training" not in capsys.readouterr().out


def test_per_group_noise_and_rewards_reach_the_population(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    path = _config(
        tmp_path,
        groups_from=None,
        groups={
            "upright": {"share": 0.5, "reward": "pendulum_groups:upright", "mistake_rate": 0.2},
            "gentle": {"share": 0.5, "reward": "pendulum_groups:gentle", "beta": 1.0},
        },
    )
    pipeline = Pipeline(ExperimentConfig.from_yaml(path), progress_bar=False, log=lambda _: None)
    upright, gentle = pipeline.population.groups
    assert (upright.mistake_rate, upright.beta) == (0.2, 5.0)  # beta from collect, mistakes its own
    assert (gentle.mistake_rate, gentle.beta) == (0.0, 1.0)


def test_a_group_reward_returning_nan_is_named(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    path = _config(
        tmp_path,
        groups_from=None,
        groups={"upright": {"share": 0.5, "reward": "pendulum_groups:upright"}, "broken": {"share": 0.5, "reward": "bad_groups:broken"}},
    )
    (tmp_path / "bad_groups.py").write_text("import numpy as np\n\ndef broken(t):\n    return np.full(np.shape(t.next_obs)[:-1], np.nan)\n")
    assert main(["collect", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "group 'broken': its reward function returned" in err and "NaN" in err


def test_a_group_reward_for_one_step_only_says_what_shape_it_must_accept(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "step_groups.py").write_text("def one_step(t):\n    return float(t.next_obs[0])\n")
    path = _config(
        tmp_path,
        groups_from=None,
        groups={"upright": {"share": 0.5, "reward": "pendulum_groups:upright"}, "scalar": {"share": 0.5, "reward": "step_groups:one_step"}},
    )
    assert main(["collect", str(path), "--no-progress"]) == 2
    assert "must accept Transitions with any leading shape" in capsys.readouterr().err


def test_groups_from_must_be_a_library(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    path = _config(tmp_path, groups_from="pendulum_groups:upright")
    with pytest.raises(ConfigError, match="groups_from: pendulum_groups:upright is a function, not a GroupRewardLibrary"):
        Pipeline(ExperimentConfig.from_yaml(path), progress_bar=False, log=lambda _: None)


def test_evaluation_refuses_a_nan_group_reward():
    import gymnasium as gym

    from egalitarian_rl.evaluation import evaluate_group_returns
    from egalitarian_rl.preferences import MultiUserPreferenceWrapper, Population, UserGroup

    def broken(t):
        return np.full(np.shape(t.next_obs)[:-1], np.nan)

    population = Population([UserGroup("fine", lambda t: np.zeros(np.shape(t.next_obs)[:-1]), 0.5), UserGroup("broken", broken, 0.5)])
    env = MultiUserPreferenceWrapper(gym.make("Pendulum-v1"), population)

    class Zero:
        def predict(self, observation, deterministic=True):
            return np.zeros(1, dtype=np.float32), None

    with pytest.raises(ValueError, match="group 'broken': its reward function returned 1 NaN"):
        evaluate_group_returns(Zero(), env, n_episodes=1)
