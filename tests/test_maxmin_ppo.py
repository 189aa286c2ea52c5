"""MaxMinPPO behaves as a stable-baselines3 agent."""

import gymnasium as gym
import numpy as np
import pytest
import torch
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.vec_env import SubprocVecEnv

from egalitarian_rl import MaxMinPPO, envs
from egalitarian_rl.algorithms.aggregation import GroupRewardNormalizer
from egalitarian_rl.rewards.nets import RewardMixture
from egalitarian_rl.rewards.vec_env import GroupRewardVecEnv

FAIRGRID = envs.FAIRGRID_ID
SMALL = {"n_steps": 64, "batch_size": 64, "n_epochs": 2, "device": "cpu"}


def _mixture(k=2, seed=0):
    torch.manual_seed(seed)
    env = gym.make(FAIRGRID)
    return RewardMixture(env.observation_space, env.action_space, k, use_action=False, use_next_state=True, hidden_sizes=(16,))


def test_save_load_round_trip_gives_identical_actions(tmp_path):
    model = MaxMinPPO("MlpPolicy", FAIRGRID, reward_mixture=_mixture(), aggregation="egd", seed=0, **SMALL)
    model.learn(256)
    model.save(tmp_path / "maxmin.zip")
    loaded = MaxMinPPO.load(tmp_path / "maxmin.zip", env=gym.make(FAIRGRID), device="cpu")
    obs = np.eye(25, dtype=np.float32)
    np.testing.assert_array_equal(model.predict(obs, deterministic=True)[0], loaded.predict(obs, deterministic=True)[0])
    # the reward mixture, the rule's state and the group weights travel with the agent
    np.testing.assert_allclose(
        loaded.reward_mixture.predict_rewards(obs, np.zeros(25, dtype=int), obs),
        model.reward_mixture.predict_rewards(obs, np.zeros(25, dtype=int), obs),
    )
    np.testing.assert_allclose(loaded.group_env.weights, model.group_env.weights)
    assert loaded.aggregation.name == "egd"
    for key, value in model.aggregation.state_dict().items():
        np.testing.assert_allclose(loaded.aggregation.state_dict()[key], value)
    np.testing.assert_allclose(loaded.normalizer.mean, model.normalizer.mean)
    loaded.learn(128)  # and it keeps training


def test_learns_with_four_subprocess_workers():
    # "egalitarian_rl.envs:" makes each worker process import the package that registers the id
    venv = make_vec_env(f"egalitarian_rl.envs:{FAIRGRID}", n_envs=4, seed=0, vec_env_cls=SubprocVecEnv)
    try:
        model = MaxMinPPO("MlpPolicy", venv, reward_mixture=_mixture(), seed=0, **SMALL)
        model.learn(4 * 64 * 2)
        assert model.num_timesteps == 512
        assert isinstance(model.get_env(), GroupRewardVecEnv)
    finally:
        venv.close()


def test_evaluate_policy_works_on_a_plain_env():
    model = MaxMinPPO("MlpPolicy", FAIRGRID, reward_mixture=_mixture(), seed=0, **SMALL)
    mean_reward, std_reward = evaluate_policy(model, gym.make(FAIRGRID), n_eval_episodes=3)
    assert np.isfinite(mean_reward) and std_reward >= 0


class _RecordRewards(BaseCallback):
    def __init__(self):
        super().__init__()
        self.seen = []

    def _on_step(self) -> bool:
        infos = self.locals["infos"]
        self.seen.append(
            (
                np.array(self.locals["rewards"]),
                np.stack([info["learned_group_rewards"] for info in infos]),
                np.array([info["env_reward"] for info in infos]),
                self.model.group_env.weights.copy(),
            )
        )
        return True


def test_a_callback_sees_the_relabelled_reward():
    normalizer = GroupRewardNormalizer.from_data(np.random.default_rng(0).normal(size=(100, 2)))
    model = MaxMinPPO("MlpPolicy", FAIRGRID, reward_mixture=_mixture(), normalizer=normalizer, seed=0, **SMALL)
    callback = _RecordRewards()
    model.learn(192, callback=callback)
    for rewards, group_rewards, _, weights in callback.seen:
        np.testing.assert_allclose(rewards, group_rewards @ weights, rtol=1e-5, atol=1e-6)
    all_rewards = np.concatenate([s[0] for s in callback.seen])
    all_env = np.concatenate([s[2] for s in callback.seen])
    assert not np.allclose(all_rewards, all_env)  # the env's own reward is not what PPO trains on
    # after a rollout, worst_group puts all weight on one group
    assert sorted(callback.seen[-1][3].tolist()) == [0.0, 1.0]


def test_the_learned_reward_is_what_the_buffer_holds():
    # GAE is computed from the rollout buffer: it must hold the relabelled rewards
    normalizer = GroupRewardNormalizer.from_data(np.random.default_rng(0).normal(size=(100, 2)))
    model = MaxMinPPO("MlpPolicy", FAIRGRID, reward_mixture=_mixture(), normalizer=normalizer, aggregation="mean", seed=0, **SMALL)
    callback = _RecordRewards()
    model.learn(64, callback=callback)
    buffer_rewards = model.rollout_buffer.rewards[:, 0]
    seen = np.array([s[0][0] for s in callback.seen])
    # FairGrid truncates after 30 steps: SB3 adds gamma * V(terminal obs) to that step's reward
    truncated = np.zeros(64, dtype=bool)
    truncated[29::30] = True
    np.testing.assert_allclose(buffer_rewards[~truncated], seen[~truncated], rtol=1e-5)
    assert not np.allclose(buffer_rewards[truncated], seen[truncated])


def test_group_names_must_match_the_mixture():
    with pytest.raises(ValueError, match="3 group names for a reward mixture of 2"):
        MaxMinPPO("MlpPolicy", FAIRGRID, reward_mixture=_mixture(), group_names=["a", "b", "c"], **SMALL)
    with pytest.raises(ValueError, match="unknown aggregation"):
        MaxMinPPO("MlpPolicy", FAIRGRID, reward_mixture=_mixture(), aggregation="median", **SMALL)


def test_tensorboard_scalars_per_group(tmp_path):
    model = MaxMinPPO(
        "MlpPolicy",
        FAIRGRID,
        reward_mixture=_mixture(),
        group_names=["majority", "minority"],
        tensorboard_log=str(tmp_path),
        seed=0,
        **SMALL,
    )
    model.learn(256)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next(tmp_path.glob("*")))).Reload()
    tags = set(events.Tags()["scalars"])
    assert {"groups/return_majority", "groups/weight_minority", "groups/selected", "groups/reward_std_majority"} <= tags


def test_a_reward_mixture_is_required():
    with pytest.raises(ValueError, match="needs reward_mixture"):
        MaxMinPPO("MlpPolicy", FAIRGRID, **SMALL)


def test_observation_normalisation_stays_outside_the_reward_model():
    from stable_baselines3.common.vec_env import VecNormalize

    seen_obs = []
    mixture = _mixture()
    predict = mixture.predict_rewards

    def recording_predict(obs, acts, next_obs):
        seen_obs.append(np.array(obs))
        return predict(obs, acts, next_obs)

    mixture.predict_rewards = recording_predict
    venv = VecNormalize(make_vec_env(FAIRGRID, n_envs=2, seed=0), norm_obs=True, norm_reward=False)
    model = MaxMinPPO("MlpPolicy", venv, reward_mixture=mixture, seed=0, **SMALL)
    model.learn(128)
    assert isinstance(model.get_env(), VecNormalize)
    raw = np.concatenate(seen_obs)
    assert set(np.unique(raw)) <= {0.0, 1.0}  # one-hot cells, not normalised values
    assert model.group_env.num_envs == 2


def test_group_critics_learn_one_value_per_group(tmp_path):
    normalizer = GroupRewardNormalizer.from_data(np.random.default_rng(0).normal(size=(100, 2)))
    model = MaxMinPPO(
        "MlpPolicy", make_vec_env(FAIRGRID, n_envs=2, seed=0), reward_mixture=_mixture(), normalizer=normalizer,
        aggregation="softmin", aggregation_kwargs={"tau": 1.0}, group_critics=True, seed=0, **SMALL,
    )  # fmt: skip
    model.learn(512)
    obs = model.policy.obs_to_tensor(np.eye(25, dtype=np.float32))[0]
    assert model.policy.predict_values(obs).shape == (25, 2)
    buffer = model.rollout_buffer
    assert buffer.returns.shape == (128, 2) and buffer.advantages.shape == (128, 1)  # as flattened by get()
    model.save(tmp_path / "critics.zip")
    loaded = MaxMinPPO.load(tmp_path / "critics.zip", env=gym.make(FAIRGRID), device="cpu")
    np.testing.assert_allclose(loaded.policy.predict_values(obs).detach(), model.policy.predict_values(obs).detach(), rtol=1e-6)
    loaded.learn(128)


def test_group_advantages_are_combined_with_the_rollout_weights():
    from egalitarian_rl.algorithms.maxmin_ppo.group_critics import GroupRolloutBuffer

    env = gym.make(FAIRGRID)
    buffer = GroupRolloutBuffer(3, env.observation_space, env.action_space, gamma=0.5, gae_lambda=1.0, n_groups=2)
    rewards = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    for step in range(3):
        buffer.add(np.zeros((1, 25)), np.zeros((1, 1)), rewards[step : step + 1], np.array([step == 0]), torch.zeros(1, 2), torch.zeros(1))
    buffer.compute_returns_and_advantage(torch.zeros(1, 2), np.array([True]), weights=np.array([0.25, 0.75]))
    # with zero values, each group's advantage is its discounted return-to-go
    returns = np.array([[1.0 + 0.0 + 0.25, 0.0 + 1.0 + 0.25], [0.5, 2.5], [1.0, 1.0]])
    np.testing.assert_allclose(buffer.returns[:, 0], returns)
    np.testing.assert_allclose(buffer.advantages[:, 0], returns @ [0.25, 0.75])


def test_group_critics_refuse_per_sample_min():
    with pytest.raises(ValueError, match="linear aggregation"):
        MaxMinPPO("MlpPolicy", FAIRGRID, reward_mixture=_mixture(), aggregation="per_sample_min", group_critics=True, **SMALL)
