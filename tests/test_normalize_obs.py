"""``train.normalize_obs``: VecNormalize for the policy, raw observations for the rewards, statistics saved without pickle."""

import numpy as np
import pytest
from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

from egalitarian_rl.experiments import ExperimentConfig, Pipeline
from egalitarian_rl.experiments.config import ConfigError
from egalitarian_rl.experiments.pipeline import ObservationNormalization, ObservationStatisticsError, ObsNormalizedPolicy
from egalitarian_rl.rewards.vec_env import GroupRewardVecEnv

TINY = {
    "env_id": "Hopper-v5",
    "groups": {"fast": 0.8, "steady": 0.2},
    "methods": ["rlhf", "maxmin", "oracle"],
    "collect": {"n_users": 6, "comparisons_per_user": 4, "segment_length": 5},
    "reward": {"epochs": 1, "em": {"max_iter": 2, "m_step_epochs": 1, "final_epochs": 1}},
    "train": {"total_timesteps": 128, "n_envs": 2, "normalize_obs": True, "ppo": {"n_steps": 64, "batch_size": 64, "n_epochs": 1}},
    "evaluate": {"n_episodes": 1},
}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    config = ExperimentConfig.from_dict({**TINY, "out_dir": str(tmp_path_factory.mktemp("hopper"))})
    pipeline = Pipeline(config, progress_bar=False, log=lambda _: None)
    pipeline.evaluate(0, "rlhf")
    return pipeline


def test_statistics_round_trip_without_pickle(tmp_path):
    venv = VecNormalize(DummyVecEnv([lambda: __import__("gymnasium").make("Pendulum-v1")]), norm_reward=False)
    venv.reset()
    for _ in range(20):
        venv.step(np.array([venv.action_space.sample()]))
    saved = ObservationNormalization.from_vec_normalize(venv)
    saved.save(tmp_path / "stats.npz")
    with np.load(tmp_path / "stats.npz", allow_pickle=False) as f:  # plain arrays, no pickled objects
        assert set(f.files) == {"mean", "var", "count", "clip_obs", "epsilon"}
    loaded = ObservationNormalization.load(tmp_path / "stats.npz", obs_shape=(3,))
    np.testing.assert_array_equal(loaded.obs_rms.mean, venv.obs_rms.mean)
    np.testing.assert_array_equal(loaded.obs_rms.var, venv.obs_rms.var)
    assert loaded.obs_rms.count == venv.obs_rms.count
    obs = np.random.default_rng(0).normal(size=(5, 3)) * 3
    np.testing.assert_allclose(loaded.normalize(obs), venv.normalize_obs(obs), rtol=1e-6)  # SB3's own formula
    with pytest.raises(ObservationStatisticsError, match="shape"):
        ObservationNormalization.load(tmp_path / "stats.npz", obs_shape=(4,))


def test_rewards_read_raw_observations_beneath_vec_normalize(pipeline):
    for method in ("rlhf", "maxmin", "oracle_fast"):
        model, _ = pipeline._train_offline(0, method)
        env = model.get_env()
        assert isinstance(env, VecNormalize) and not env.norm_reward
        assert isinstance(env.venv, GroupRewardVecEnv), method  # relabelled before normalising


def test_evaluation_uses_the_saved_statistics(pipeline):
    policy = pipeline.load_policy(0, "rlhf")
    assert isinstance(policy, ObsNormalizedPolicy)
    path = pipeline.obs_norm_path(0, "rlhf")
    saved = ObservationNormalization.load(path)
    np.testing.assert_array_equal(policy.statistics.obs_rms.mean, saved.obs_rms.mean)
    right = pipeline.evaluate(0, "rlhf")
    saved.obs_rms.mean = saved.obs_rms.mean + 3.0  # valid but wrong statistics
    saved.save(path)
    pipeline.force = {"evaluate"}
    pipeline._checked.clear()
    try:
        wrong = pipeline.evaluate(0, "rlhf")
    finally:
        pipeline.force = set()
    assert not np.allclose(right, wrong)


def test_corrupt_statistics_are_one_clear_error(pipeline):
    path = pipeline.obs_norm_path(0, "maxmin")
    pipeline.train(0, "maxmin")
    path.write_bytes(b"not an npz")
    with pytest.raises(ObservationStatisticsError, match=r"maxmin\.obs_norm\.npz: not a readable .*--force train"):
        pipeline.load_policy(0, "maxmin")


def test_off_by_default_and_absent_from_stage_keys(pipeline):
    assert pipeline._stage_inputs("train", 0, "rlhf")["train"]["normalize_obs"] is True
    config = ExperimentConfig.from_dict({**TINY, "train": {**TINY["train"], "normalize_obs": False}, "out_dir": str(pipeline.out_dir)})
    assert config.train.normalize_obs is False and ExperimentConfig(env_id="Hopper-v5", groups={"fast": 1.0}).train.normalize_obs is False
    assert "normalize_obs" not in Pipeline(config, progress_bar=False, log=lambda _: None)._stage_inputs("train", 0, "rlhf")["train"]
    with pytest.raises(ConfigError, match="train.normalize_obs: expected bool"):
        ExperimentConfig.from_dict({**TINY, "train": {"normalize_obs": 1}})
